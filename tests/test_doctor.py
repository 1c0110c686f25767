"""`runex doctor` on a healthy and on a broken project; `runex backup` while workers run."""

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from runex import Runex

from .conftest import runex_cli, work_pipeline, write


def findings(project) -> tuple[int, dict[str, list[dict]]]:
    result = runex_cli("doctor", "--json", cwd=project)
    by_check: dict[str, list[dict]] = {}
    for f in json.loads(result.stdout):
        by_check.setdefault(f["check"], []).append(f)
    return result.returncode, by_check


def test_doctor_on_a_healthy_project(project):
    work_pipeline(project, stop=20)
    Runex().run("pipelines/p.toml", workers=0)
    code, found = findings(project)
    assert code == 0
    assert all(f["status"] != "fail" for fs in found.values() for f in fs)
    assert found["home"][0]["status"] == "ok" and "writable" in found["home"][0]["detail"]
    assert found["pipelines"][0]["detail"] == "1 of 1 pipeline files load (0 scheduled)"
    assert found["consumers"][0]["status"] == "warn"  # none running: worth knowing
    text = runex_cli("doctor", cwd=project).stdout
    assert text.splitlines()[0].startswith("ok    versions    runex ")


def test_doctor_on_a_broken_project(project):
    work_pipeline(project, stop=20)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    write(project / "extensions" / "broken.py", "def oops(:\n")
    write(project / "pipelines" / "bad.toml", '[source]\nuse = "nope"\n[sink]\nuse = "null"\n')
    now = time.time()
    with rx.ledger.tx() as conn:  # a worker of this host that died holding a partition,
        conn.execute("UPDATE partitions SET status = 'running' WHERE run_id = ? AND idx = 0",
                     (run_id,))
        conn.execute("INSERT INTO attempts (run_id, idx, attempt, status, host, pid, "
                     "pid_started, lease_until, started_at) VALUES (?, 0, 1, 'running', ?, "
                     "999999, '1', ?, ?)", (run_id, os.uname().nodename, now + 60, now))
        # ... and a run from an hour ahead of this clock
        conn.execute("UPDATE runs SET created_at = ? WHERE id = ?", (now + 3600, run_id))
    code, found = findings(project)
    assert code == 1
    [ext] = [f for f in found["extensions"] if f["status"] == "fail"]
    assert "broken.py:1: SyntaxError" in ext["detail"]
    [bad] = [f for f in found["pipelines"] if f["status"] == "fail"]
    assert "bad.toml" in bad["detail"] and "unknown source 'nope'" in bad["detail"]
    assert found["attempts"][0]["status"] == "warn" and "pid 999999" in found["attempts"][0][
        "detail"]
    assert found["clock"][0]["status"] == "fail" and "ahead" in found["clock"][0]["detail"]
    result = runex_cli("doctor", cwd=project)
    assert result.returncode == 1 and "FAIL  extensions" in result.stdout


def test_doctor_says_when_the_home_cannot_be_written(project):
    """A folder nobody may create files in, root included: sysfs."""
    assert os.path.isdir("/sys/kernel")
    result = runex_cli("doctor", "--home", "/sys/kernel", cwd=project)
    assert result.returncode == 1
    assert "FAIL  home        cannot write to /sys/kernel (Permission denied)" in result.stdout
    assert len(result.stdout.splitlines()) == 2  # nothing else is read from such a home


@pytest.mark.slow
def test_backup_while_a_worker_runs_is_a_whole_ledger(project):
    work_pipeline(project, stop=400, size=1, pause=0.01)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    proc = subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "2", "-q"],
                            cwd=project)
    try:
        deadline = time.monotonic() + 30
        while not Runex().ledger.progress(run_id).get("succeeded"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = runex_cli("backup", "copy.db", cwd=project, check=True)
        assert result.stdout.startswith(f"ledger copied to {project / 'copy.db'}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    with sqlite3.connect(project / "copy.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        done = conn.execute("SELECT COUNT(*) FROM partitions WHERE status = 'succeeded'"
                            ).fetchone()[0]
        assert conn.execute("SELECT id FROM runs").fetchall() == [(run_id,)]
    assert 0 < done <= 400
    # The copy is a ledger runex opens, with the run as it was then.
    copy = Runex(home=project / "restored")
    copy.project.ensure_home()
    os.replace(project / "copy.db", project / "restored" / "ledger.db")
    assert copy.show(run_id).id == run_id


def test_doctor_changes_nothing_in_a_project_that_never_ran(project):
    work_pipeline(project, stop=20)
    code, found = findings(project)
    assert code == 0 and found["home"][0]["status"] == "warn"  # it does not exist yet
    assert not (project / ".runex").exists()


def test_backup_makes_its_folder_and_says_when_it_cannot_write(project):
    work_pipeline(project, stop=20)
    rx = Runex()
    rx.run("pipelines/p.toml", workers=0)
    assert rx.backup(project / "backups" / "one.db")["newest_run"] == rx.runs(1)[0]["id"]
    result = runex_cli("backup", "/sys/kernel/ledger.db", cwd=project)
    assert result.returncode == 5
    assert "cannot write the backup /sys/kernel/ledger.db" in result.stderr
