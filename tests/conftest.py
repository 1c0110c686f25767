import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runex import Runex, trace, worker

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def require(ok: bool, reason: str) -> None:
    """Skip a test that needs something this machine lacks (a tool, root), except under CI
    (`RUNEX_CI=1`, set by .ci/run, which installs what the tests need): there it fails."""
    if ok:
        return
    if os.environ.get("RUNEX_CI"):
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("RUNEX_HOME", raising=False)
    monkeypatch.delenv("RUNEX_EXTENSIONS", raising=False)
    yield
    trace.reset()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder (runex.toml, extensions/) as the current folder."""
    write(tmp_path / "runex.toml", 'extensions = ["extensions"]\n')
    (tmp_path / "extensions").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


WORK_KERNEL = """
    import os, signal, time
    from runex import register_kernel

    @register_kernel("work")
    def work(record, pause=0.0, fail_on=-1, die_on=-1, fail_unless=""):
        if record["n"] == fail_on:
            raise ZeroDivisionError("boom")
        if record["n"] == die_on:
            os.kill(os.getpid(), signal.SIGKILL)
        if fail_unless and not os.path.exists(fail_unless):
            raise RuntimeError("not yet")
        time.sleep(pause)
        return {**record, "sq": record["n"] ** 2}
"""


def work_pipeline(project: Path, stop: int, size: int = 10, options: str = "",
                  **params: object) -> Path:
    """pipelines/p.toml: `range` through the `work` kernel (`params`) into out/sq.db, and a
    worker profile `fast` that polls and reaps often."""
    write(project / "extensions" / "k.py", WORK_KERNEL)
    write(project / "workers" / "fast.toml", "reap_every = 0.3\nmax_delay = 0.1\ngrace = 20\n")
    step = "".join(f"{k} = {json.dumps(v)}\n" for k, v in params.items())
    return write(project / "pipelines" / "p.toml",
                 f'[source]\nuse = "range"\nstop = {stop}\nsize = {size}\n\n'
                 f'[[steps]]\nuse = "work"\n{step}\n'
                 f'[sink]\nuse = "sqlite"\npath = "out/sq.db"\ntable = "sq"\n\n'
                 f"[options]\n{options}\n")


def drain(rx: Runex, timeout: float = 30) -> None:
    """Work the queue in this process, without a consumer, until nothing is left to do
    (retries included: tests give them a tiny retry_delay)."""
    huey = rx.huey
    worker.setup(rx.registry, rx.ledger, huey)
    deadline = time.monotonic() + timeout
    while rx.ledger.unfinished_partitions():
        assert time.monotonic() < deadline, "the queue did not drain"
        for task in huey.read_schedule(huey._get_timestamp()):
            huey.enqueue(task)
        task = huey.dequeue()
        if task is None:
            time.sleep(0.01)
            continue
        huey.execute(task)


def runex_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120,
              check: bool = False) -> subprocess.CompletedProcess:
    """The real command line, in a child process."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RUNEX_HOME", None) if "RUNEX_HOME" not in (env or {}) else None
    result = subprocess.run([sys.executable, "-m", "runex", *args], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def show(rx: Runex, run_id: str) -> dict:
    return json.loads(json.dumps(rx.show(run_id).to_dict(), default=str))
