"""Workers that speak: the operator's log on stderr, and Ctrl-C on a terminal."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from runex import Runex

from .conftest import hanging_project, runex_cli, work_pipeline, write


def lines(text: str, event: str) -> list[str]:
    return [line for line in text.splitlines() if f"event={event} " in line + " "]


@pytest.mark.slow
def test_a_worker_under_a_pipe_logs_one_line_per_run_finished(project):
    work_pipeline(project, stop=40, size=10)
    write(project / "extensions" / "broken.py", "import nothing_of_the_sort\n")
    runs = [runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
            for _ in range(2)]
    result = runex_cli("worker", "--burst", "-w", "2", cwd=project, check=True)
    log = result.stderr
    [started] = lines(log, "consumer.started")
    assert "workers=2" in started and "failed_files=1" in started and "version=" in started
    [failed] = lines(log, "extension.failed")
    assert "broken.py:1: ModuleNotFoundError" in failed
    finished = lines(log, "run.finished")
    assert len(finished) == 2
    for run_id in runs:
        [line] = [f for f in finished if f"run_id={run_id}" in f]
        assert "status=succeeded" in line and "records_out=40" in line and "seconds=" in line
    assert len(lines(log, "run.started")) == 2
    assert not lines(log, "partition.claimed") and not lines(log, "step.finished")
    assert len(lines(log, "consumer.stopped")) == 1


@pytest.mark.slow
def test_json_lines_and_levels(project):
    work_pipeline(project, stop=20, size=10, fail_on=15, options="retries = 0")
    runex_cli("submit", "pipelines/p.toml", cwd=project, check=True)
    result = runex_cli("worker", "--burst", "-w", "1", "--log-format", "json", "--log-level",
                       "warning", cwd=project)
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert {e["event"] for e in events} == {"partition.failed", "run.finished"}
    failed = next(e for e in events if e["event"] == "partition.failed")
    assert failed["level"] == "error" and "ZeroDivisionError: boom" in failed["error"]
    assert runex_cli("worker", "--burst", "-q", cwd=project).stderr == ""


def read_until(fd: int, wanted: str, timeout: float = 30) -> str:
    text, deadline = "", time.monotonic() + timeout
    while wanted not in text:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {wanted!r} in:\n{text}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            text += chunk.decode(errors="replace")
    return text


@pytest.mark.slow
def test_ctrl_c_on_a_terminal_says_what_it_finishes_and_a_second_stops_at_once(project):
    hanging_project(project)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "runex", "run", "p.toml", "-w", "1"],
                            cwd=project, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True,
                            preexec_fn=lambda: __import__("fcntl").ioctl(
                                0, __import__("termios").TIOCSCTTY, 0))
    os.close(slave)
    try:
        text = read_until(master, "0/2 partitions")
        deadline = time.monotonic() + 30
        while not Runex(root=project).ledger.progress(
                Runex(root=project).ledger.resolve_run_id("last")).get("running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.write(master, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground group
        text += read_until(master, "Ctrl-C again to stop now")
        assert "finishing 1 running partition (up to 60 s)" in text
        os.write(master, b"\x03")
        assert proc.wait(timeout=30) == 130
        text += read_until(master, "interrupted:", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(master)
    assert "Received exit signal" not in text and "did not finish" not in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_run_goes_ahead_of_queued_work_and_says_what_it_leaves(project):
    work_pipeline(project, stop=100, size=1)
    write(project / "quick.toml", '[source]\nuse = "range"\nstop = 2\nsize = 1\n\n'
                                  '[sink]\nuse = "null"\n')
    queued = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    result = runex_cli("run", "quick.toml", "-w", "1", cwd=project, check=True)
    assert "2 succeeded" in result.stdout
    [left] = lines(result.stderr, "run.others_queued")
    assert "another run still has" in left and "partitions to do" in left
    rx = Runex()
    quick = rx.show("last")
    assert quick.pipeline == "quick" and quick.status == "succeeded"
    # its partitions went first: no partition of the queued run started before them
    began = [a["started_at"] for p in rx.show(queued).to_dict()["partitions"]
             for a in p["attempts"]]
    assert all(t >= min(a["started_at"] for p in quick.partitions for a in p.attempts)
               for t in began)
    assert rx.ledger.progress(queued).get("succeeded", 0) < 100  # left for `runex worker`


@pytest.mark.slow
def test_debug_shows_every_partition_and_step_which_no_file_keeps(project):
    work_pipeline(project, stop=30, size=10)
    result = runex_cli("run", "pipelines/p.toml", "-w", "1", "--log-level", "debug",
                       "--log-format", "json", cwd=project, check=True)
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.count("partition.claimed") == names.count("partition.committed") == 3
    step = next(e for e in events if e["event"] == "step.finished")
    assert step["kernel"] == "work" and step["records_in"] == 10
    quiet = runex_cli("run", "pipelines/p.toml", "-w", "1", "--log-format", "json",
                      cwd=project, check=True)
    assert "partition.claimed" not in quiet.stderr and "run.finished" in quiet.stderr
