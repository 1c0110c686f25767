"""Extension files dropped in, edited and removed under a running consumer."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from runex import Runex

from .conftest import drain, runex_cli, show, write

TAG = """
from runex import register_kernel


@register_kernel("tag")
def tag(record):
    return {**record, "v": VERSION}
"""


def pipeline(project, name, kernel):
    return write(project / "pipelines" / f"{name}.toml",
                 f'[source]\nuse = "range"\nstop = 4\nsize = 2\n\n[[steps]]\nuse = "{kernel}"\n\n'
                 f'[sink]\nuse = "sqlite"\npath = "out/{name}.db"\ntable = "t"\n')


def values(project, name, column):
    with sqlite3.connect(project / "out" / f"{name}.db") as conn:
        return sorted({row[0] for row in conn.execute(f"SELECT {column} FROM t")})


def run_to_end(project, name):
    run_id = runex_cli("submit", f"pipelines/{name}.toml", cwd=project, check=True).stdout
    run_id = run_id.strip()
    deadline = time.monotonic() + 30
    while (status := show(Runex(), run_id)["status"]) in ("queued", "running"):
        assert time.monotonic() < deadline, f"run {name} did not end"
        time.sleep(0.05)
    return run_id, status


@pytest.mark.slow
def test_a_running_worker_picks_up_added_changed_and_removed_extensions(project):
    write(project / "extensions" / "tag.py", TAG.replace("VERSION", "1"))
    write(project / "workers" / "fast.toml", "reap_every = 0.5\nmax_delay = 0.1\n")
    for name, kernel in (("a", "tag"), ("b", "fresh"), ("c", "tag")):
        pipeline(project, name, kernel)
    proc = subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "1", "--profile",
                             "fast"], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run_a, status = run_to_end(project, "a")
        assert status == "succeeded" and values(project, "a", "v") == [1]
        write(project / "extensions" / "tag.py", TAG.replace("VERSION", "2"))  # changed
        write(project / "extensions" / "fresh.py", TAG.replace('"tag"', '"fresh"').replace(
            "def tag", "def fresh").replace("VERSION", "'new'"))  # added
        run_b, status = run_to_end(project, "b")
        assert status == "succeeded" and values(project, "b", "v") == ["new"]
        run_c, status = run_to_end(project, "c")
        assert status == "succeeded" and values(project, "c", "v") == [2]
        os.unlink(project / "extensions" / "fresh.py")  # removed
        run_a2, status = run_to_end(project, "a")
        assert status == "succeeded"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    versions = {run: {a["code_version"] for p in show(Runex(), run)["partitions"]
                      for a in p["attempts"]} for run in (run_a, run_b, run_c, run_a2)}
    assert all(len(v) == 1 and None not in v for v in versions.values())
    # a's code changed (tag.py); each run's pipeline is in its version too
    assert len({frozenset(v) for v in versions.values()}) == 4
    events = [json.loads(line) for f in (project / ".runex" / "traces").glob("*.jsonl")
              for line in f.read_text().splitlines()]
    reloads = [(e["added"], e["changed"], e["removed"]) for e in events
               if e["event"] == "extensions.reloaded"]
    assert (["extensions/fresh.py"], ["extensions/tag.py"], []) in reloads
    assert ([], [], ["extensions/fresh.py"]) in reloads
    shown = runex_cli("show", run_c, cwd=project, check=True).stdout
    assert "CODE" in shown and next(iter(versions[run_c])) in shown


def test_a_broken_edit_fails_only_the_runs_that_need_it(project):
    write(project / "extensions" / "tag.py", TAG.replace("VERSION", "1"))
    write(project / "extensions" / "other.py", TAG.replace('"tag"', '"other"').replace(
        "def tag", "def other").replace("VERSION", "0"))
    pipeline(project, "a", "tag")
    pipeline(project, "b", "other")
    rx = Runex()
    run_a, run_b = rx.submit("pipelines/a.toml"), rx.submit("pipelines/b.toml")
    write(project / "extensions" / "tag.py", "from runex import register_kernel\n\ndef tag(:\n")
    drain(rx)
    a, b = show(rx, run_a), show(rx, run_b)
    assert b["status"] == "succeeded"
    assert a["status"] == "failed"
    error = a["partitions"][0]["error"]
    assert "unknown kernel 'tag'" in error
    assert "these extension files failed to load: extensions/tag.py:3: SyntaxError" in error
