"""The README's Python API section, run as a script in a fresh project."""

import re
import subprocess
import sys

from runex import Runex

from .conftest import ROOT, work_pipeline, write


def readme_example() -> str:
    """The Python API section's code blocks, one after the other."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return "".join(re.findall(r"```python\n(.*?)```", section, re.S))


def test_the_readme_python_api_example_runs_as_it_says(tmp_path):
    write(tmp_path / "runex.toml", 'extensions = ["extensions"]\n')
    (tmp_path / "extensions").mkdir()
    (tmp_path / "example.py").write_text(readme_example())
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Each print(...) says what it prints in its comment.
    expected = re.findall(r"^print\(.*#\s*(.*)$", readme_example(), re.M)
    assert len(expected) >= 7
    assert result.stdout.splitlines() == expected


def test_wait_gives_up_after_its_timeout(project):
    import pytest

    from runex import Runex

    write(project / "p.toml", '[source]\nuse = "range"\nstop = 10\n\n[sink]\nuse = "null"\n')
    rx = Runex()
    run_id = rx.submit("p.toml")
    with pytest.raises(TimeoutError, match=f"run {run_id} is still queued after 0.2s"):
        rx.wait(run_id, timeout=0.2)
    assert rx.run("p.toml", workers=0).over  # its own run first: the other waits
    assert rx.show(run_id).status == "queued"
    rx.work(workers=0, burst=True)
    assert rx.wait(run_id, timeout=5).status == "succeeded"


def test_the_repository_keeps_the_built_in_worker_profiles_in_workers():
    shipped = {p.name: p.read_text() for p in (ROOT / "runex" / "profiles").glob("*.toml")}
    assert {p.name: p.read_text() for p in (ROOT / "workers").glob("*.toml")} == shipped
    assert set(shipped) == {"default.toml", "raspberry-pi.toml"}


def test_a_pipeline_file_is_checked_again_only_when_it_or_the_extensions_change(project):
    work_pipeline(project, stop=20)
    rx = Runex()
    first = rx.plan("pipelines/p.toml")
    assert rx.plan("pipelines/p.toml") is first  # unchanged: the plan it gave
    assert rx.plan("pipelines/p.toml", ["source.stop=10"]) is not first
    work_pipeline(project, stop=30)  # edited
    again = rx.plan("pipelines/p.toml")
    assert again is not first and again.pipeline.source.params["stop"] == 30
    write(project / "extensions" / "more.py", "X = 1\n")  # the extensions changed
    assert rx.plan("pipelines/p.toml") is not again
    write(project / "pipelines" / "p.toml",
          (project / "pipelines" / "p.toml").read_text().replace(
              'table = "sq"', 'table = "sq_{fire_time:%H%M%S%f}"'))
    timed = rx.plan("pipelines/p.toml")
    assert rx.plan("pipelines/p.toml") is not timed  # the fire time is in it: filled each time
