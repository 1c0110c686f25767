"""A full disk, on a real small file system (tmpfs, mounted as root; CI runs as root).

Under the home: consumers take no more work and say so once, `runex run` exits 5, nothing is
lost, and a running `runex worker` resumes by itself when there is room again. Under a sink's
output: only the partitions that could not be written fail, and the run ends. Never a hang.
"""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import hanging_project, require, runex_cli, write

PAD = """
    from runex import register_kernel

    @register_kernel("pad")
    def pad(record, size=100):
        return {**record, "pad": "x" * size}
"""


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` at `folder`; `remount(size)` grows or shrinks it."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    require(mounted, "mounting a small tmpfs needs root, and the right to mount")
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(folder)],
                                         check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def project_on(tmp_path: Path, home: Path, sink_db: Path, stop: int, size: int,
               options: str = "", pad: int = 0) -> Path:
    root = tmp_path / "project"
    write(root / "runex.toml", f'extensions = ["extensions"]\nhome = "{home}"\n')
    write(root / "extensions" / "pad.py", PAD)
    write(root / "workers" / "fast.toml", "reap_every = 0.5\nmax_delay = 0.1\ngrace = 10\n")
    steps = f'[[steps]]\nuse = "pad"\nsize = {pad}\n\n' if pad else ""
    write(root / "p.toml", f'[source]\nuse = "range"\nstop = {stop}\nsize = {size}\n\n{steps}'
                           f'[sink]\nuse = "sqlite"\npath = "{sink_db}"\ntable = "t"\n\n'
                           f"[options]\n{options}\n")
    return root


def query(db: Path, sql: str) -> list:
    """Read without writing: a read-only connection neither checkpoints nor removes a WAL."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error):  # not created yet
            if value := predicate():
                return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s: {what}")


def resume(proc: subprocess.Popen, remount, home: Path, sink: Path, within: float) -> None:
    """Give the disk room: the paused worker `proc` finishes the run within `within` seconds,
    having said once that the disk was full and once that it has room again; every row is
    in the sink once."""
    try:
        remount("64m")
        wait_for(lambda: query(home / "ledger.db", "SELECT status FROM runs") == [
            ("succeeded",)], within, "the worker did not resume")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert err.count("is full") == 1, err
    assert "has room again" in err and "Traceback" not in err, err
    assert query(sink, "SELECT COUNT(*), COUNT(DISTINCT n) FROM t") == [(3000, 3000)]


def worker(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "2", "--profile",
                             "fast"], cwd=root, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True)


@pytest.mark.slow
def test_a_full_home_stops_run_with_exit_5_loses_nothing_and_a_worker_resumes(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, "4m") as remount:
        home, sink = disk / "home", tmp_path / "out" / "t.db"
        root = project_on(tmp_path, home, sink, stop=3000, size=1)  # fills 4 MB of ledger
        result = runex_cli("run", "p.toml", "-w", "2", "--profile", "fast", cwd=root,
                           timeout=120)
        assert result.returncode == 5, result.stdout + result.stderr
        assert f"the disk under {home} is full (" in result.stderr
        assert "nothing is lost" in result.stderr
        assert "Traceback" not in result.stderr and "huey" not in result.stderr
        # Every file is sound, and whatever the ledger calls done is in the sink.
        for db in (home / "ledger.db", home / "queue.db", sink):
            assert query(db, "PRAGMA integrity_check") == [("ok",)]
        done = query(home / "ledger.db",
                     "SELECT COUNT(*) FROM partitions WHERE status = 'succeeded'")[0][0]
        assert 0 < done < 3000
        assert query(sink, "SELECT COUNT(*), COUNT(DISTINCT n) FROM t")[0][0] >= done
        assert not (home / "reserve").exists()  # released: the sign that the disk is full

        # A worker started on the full disk waits, says so once, and goes on once there is
        # room, without a restart.
        proc = worker(root)
        time.sleep(2)
        assert proc.poll() is None
        resume(proc, remount, home, sink, within=60)
        assert (home / "reserve").exists()


@pytest.mark.slow
def test_a_running_worker_pauses_on_a_full_home_and_resumes_at_once(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, "4m") as remount:
        home, sink = disk / "home", tmp_path / "out" / "t.db"
        root = project_on(tmp_path, home, sink, stop=3000, size=1)
        proc = worker(root)
        try:
            wait_for(lambda: (home / "reserve").exists(), 30, "the worker made no reserve")
            runex_cli("submit", "p.toml", cwd=root, check=True)
            wait_for(lambda: not (home / "reserve").exists(), 60, "the disk never filled up")
            time.sleep(2)  # paused: it takes nothing, and stays up
            assert proc.poll() is None
            paused = query(home / "ledger.db", "SELECT status, COUNT(*) FROM partitions "
                                               "GROUP BY status")
            time.sleep(1)
            assert query(home / "ledger.db", "SELECT status, COUNT(*) FROM partitions "
                                             "GROUP BY status") == paused
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        # Well before a lease (60 s) could expire: what the full disk kept from the ledger is
        # written by the worker that kept it, not recovered by the reaper.
        resume(proc, remount, home, sink, within=20)
        lost = query(home / "ledger.db", "SELECT COUNT(*) FROM attempts WHERE status = 'lost'")
        assert lost == [(0,)]


@pytest.mark.slow
def test_a_full_disk_under_the_sink_fails_only_what_could_not_be_written(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, "3m"):
        home, sink = tmp_path / "home", disk / "t.db"
        root = project_on(tmp_path, home, sink, stop=200_000, size=20_000, pad=100,
                          options='retries = 1\nretry_delay = "10ms"')
        result = runex_cli("run", "p.toml", "-w", "2", "--profile", "fast", cwd=root,
                           timeout=120)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "database or disk is full (the disk under" in result.stdout
        assert f"{disk} is full" in result.stdout
        parts = dict(query(home / "ledger.db", "SELECT status, COUNT(*) FROM partitions "
                                               "GROUP BY status"))
        assert parts.get("succeeded", 0) > 0 and parts["failed"] > 0
        assert set(parts) == {"succeeded", "failed"}
        attempts = query(home / "ledger.db", "SELECT COUNT(*) FROM attempts a JOIN partitions "
                                             "p USING (run_id, idx) WHERE p.status = 'failed'")
        assert attempts == [(2 * parts["failed"],)]  # retried once each, as asked
        # What succeeded is in the sink once; nothing of what failed is.
        rows = query(sink, "SELECT COUNT(*), COUNT(DISTINCT n) FROM t")[0]
        assert rows == (20_000 * parts["succeeded"],) * 2


@pytest.mark.slow
def test_sigterm_stops_a_consumer_whose_partitions_keep_failing(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, "1m"):
        home, sink = tmp_path / "home", disk / "t.db"
        root = project_on(tmp_path, home, sink, stop=400_000, size=20_000, pad=100,
                          options='retries = 100\nretry_delay = "10ms"\nmax_retry_delay = "50ms"')
        runex_cli("submit", "p.toml", cwd=root, check=True)
        proc = worker(root)
        try:
            wait_for(lambda: query(home / "ledger.db", "SELECT 1 FROM attempts WHERE status = "
                                                       "'failed' LIMIT 1"), 30, "no failure")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10 + 5) == 0  # within the profile's grace of 10 s
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        running = query(home / "ledger.db", "SELECT COUNT(*) FROM partitions WHERE status "
                                            "NOT IN ('queued', 'running', 'succeeded')")
        assert running == [(0,)]  # nothing spent its retries while stopping


@pytest.mark.slow
def test_a_second_ctrl_c_of_run_exits_at_once_with_one_line(tmp_path):
    root = tmp_path / "project"
    hanging_project(root)
    proc = subprocess.Popen([sys.executable, "-m", "runex", "run", "p.toml", "-w", "2"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ledger = root / ".runex" / "ledger.db"
    wait_for(lambda: ledger.exists() and query(ledger, "SELECT COUNT(*) FROM attempts") == [
        (2,)], 30, "the partitions did not start")
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err


def test_an_interrupt_anywhere_in_a_command_is_one_line_and_exit_130(tmp_path, monkeypatch):
    """Wherever the second Ctrl-C lands (here: in `Runex.run` itself), one line, no traceback."""
    from click.testing import CliRunner

    from runex import Runex, cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runex, "run", interrupted)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.cli, ["run", "p.toml"])
    assert result.exit_code == 130
    assert result.output.strip().startswith("interrupted: stopped at once")
    assert "Traceback" not in result.output
