"""The real command line with real worker processes on a temporary home."""

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from runex import Runex

from .conftest import ROOT, runex_cli, work_pipeline, write
from .test_recovery import wait_for


def make(project, stop=300, size=10, **params):
    return work_pipeline(project, stop, size, "retries = 0", **params)


@pytest.mark.slow
def test_two_burst_consumers_share_a_run_and_commit_each_partition_once(project):
    make(project, stop=600, size=10, pause=0.002)
    submitted = runex_cli("submit", "pipelines/p.toml", "--json", cwd=project, check=True)
    run_id = json.loads(submitted.stdout)["run_id"]
    consumers = [subprocess.Popen([sys.executable, "-m", "runex", "worker", "--burst", "-w", "2"],
                                  cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    for c in consumers:
        assert c.wait(timeout=120) == 0, c.stderr.read().decode()
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT n), SUM(sq) FROM sq").fetchone() == (
            600, 600, sum(n * n for n in range(600)))
    data = json.loads(runex_cli("show", run_id, "--json", cwd=project, check=True).stdout)
    assert data["status"] == "succeeded"
    assert {p["status"] for p in data["partitions"]} == {"succeeded"}
    assert all(len(p["attempts"]) == 1 for p in data["partitions"])
    pids = {p["attempts"][0]["pid"] for p in data["partitions"]}
    assert len(pids) >= 2  # more than one worker process took partitions
    with sqlite3.connect(project / ".runex" / "ledger.db") as conn:
        assert conn.execute("SELECT status, COUNT(*) FROM attempts GROUP BY 1").fetchall() == [
            ("succeeded", 60)]


def test_run_exits_0_on_success_and_prints_where_the_output_is(project):
    make(project, stop=50)
    result = runex_cli("run", "pipelines/p.toml", "-w", "2", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "): succeeded in " in result.stdout
    assert "records: 50 in, 50 out" in result.stdout
    assert "output: sink 'sqlite' (path=out/sq.db, table=sq" in result.stdout
    runs = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    assert [(r["pipeline"], r["status"], r["partition_count"], r["scheduled_for"])
            for r in runs] == [("p", "succeeded", 5, None)]


@pytest.mark.slow
def test_run_exits_1_when_a_partition_fails_and_show_has_the_traceback(project):
    make(project, stop=50, fail_on=23)
    result = runex_cli("run", "pipelines/p.toml", "-w", "2", cwd=project)
    assert result.returncode == 1
    assert "failed in" in result.stdout
    assert ("error: partition 2 ([20, 30]): ZeroDivisionError: boom; 1 of 5 partitions did "
            "not succeed: 2 ([20, 30]): failed") in result.stdout
    shown = runex_cli("show", "last", cwd=project)
    assert "partition 2 attempt 1 (failed, pid" in shown.stdout
    assert "ZeroDivisionError: boom" in shown.stdout
    assert 'raise ZeroDivisionError("boom")' in shown.stdout
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM sq").fetchone() == (40,)
    retried = runex_cli("retry", "last", "--partition", "[20, 30]", cwd=project, check=True)
    assert retried.stdout.strip() == "re-queued 1 partition: 2"
    missing = runex_cli("retry", "last", "--partition", "[20, 31]", cwd=project)
    assert missing.returncode == 4 and "has no partition '[20, 31]'" in missing.stderr


@pytest.mark.slow
def test_show_json_shape(project):
    make(project, stop=20)
    runex_cli("run", "pipelines/p.toml", "-w", "1", cwd=project, check=True)
    data = json.loads(runex_cli("show", "last", "--json", cwd=project, check=True).stdout)
    assert {"id", "pipeline", "status", "partitions"} <= set(data)
    assert data["pipeline"] == "p" and data["status"] == "succeeded"
    part = data["partitions"][0]
    assert {"key", "status", "attempts", "records_in", "records_out"} <= set(part)
    assert part["key"] == [0, 10] and part["records_in"] == part["records_out"] == 10
    assert part["attempts"][0]["status"] == "succeeded"
    events = json.loads(runex_cli("trace", "last", "--json", cwd=project, check=True).stdout)
    assert [e["event"] for e in events][0] == "run.submitted"
    assert [e["event"] for e in events][-1] == "run.finished"


def test_invalid_pipeline_exits_3_with_the_key_and_stores_nothing(project):
    make(project, pasue=0.0)
    result = runex_cli("submit", "pipelines/p.toml", cwd=project)
    assert result.returncode == 3
    assert result.stderr.startswith("Error: pipelines/p.toml: steps[0] (kernel 'work', "
                                    "extensions/k.py:4): unknown parameter 'pasue' (did you "
                                    "mean 'pause'?)")
    assert json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout) == []
    bad_toml = write(project / "pipelines" / "bad.toml", "[source\nuse = 1\n")
    result = runex_cli("validate", str(bad_toml), cwd=project)
    assert result.returncode == 3 and "invalid TOML" in result.stderr and "line 1" in result.stderr


def test_a_broken_extension_is_reported_and_the_others_still_work(project):
    make(project, stop=20)
    write(project / "extensions" / "broken.py", "import nope_not_installed\n")
    result = runex_cli("run", "pipelines/p.toml", "-w", "1", cwd=project)
    assert result.returncode == 0
    assert ("event=extension.failed error=\"extensions/broken.py:1: ModuleNotFoundError: "
            "No module named 'nope_not_installed'\"") in result.stderr
    quiet = runex_cli("run", "pipelines/p.toml", "-w", "1", "-q", cwd=project)
    assert quiet.stderr == ("warning: extensions/broken.py:1: ModuleNotFoundError: "
                            "No module named 'nope_not_installed'\n")
    listing = runex_cli("extensions", cwd=project)
    assert listing.returncode == 3
    assert "kernel  work" in listing.stdout and "extensions/k.py:4" in listing.stdout


def test_an_unknown_run_exits_4(project):
    result = runex_cli("show", "nope", cwd=project)
    assert result.returncode == 4 and "no run 'nope'" in result.stderr


@pytest.mark.slow
def test_a_worker_stops_on_sigint_and_leaves_queued_work_for_later(project):
    """Ctrl-C while a run is half done: the partition running finishes, the worker exits 0,
    the rest stays queued, and the next worker finishes the run."""
    make(project, stop=40, size=1, pause=0.05)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    proc = subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "1"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: progress(project, run_id).get("succeeded", 0) >= 3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    counts = progress(project, run_id)
    assert counts.get("running", 0) == 0 and 3 <= counts["succeeded"] < 40
    assert counts["queued"] == 40 - counts["succeeded"]  # left for later, none lost
    runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)
    assert Runex().show(run_id).status == "succeeded"


def progress(project, run_id) -> dict[str, int]:
    return Runex(root=project).ledger.progress(run_id)


def test_init_scaffolds_a_project_that_runs(tmp_path):
    result = runex_cli("init", "demo", cwd=tmp_path, check=True)
    assert "created demo/runex.toml" in result.stdout
    project = tmp_path / "demo"
    result = runex_cli("run", "pipelines/example.toml", "-w", "2", cwd=project)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(project / "out" / "words.db") as conn:
        count = conn.execute("SELECT COUNT(*) FROM words WHERE word = 'partition'").fetchone()
    assert count == (3,)
    assert (project / "workers" / "raspberry-pi.toml").is_file()


@pytest.mark.slow
def test_the_bundled_example_runs_and_run_twice_leaves_the_same_rows(tmp_path):
    for _ in range(2):  # its sink replaces the table: a second run does not double it
        result = runex_cli("run", "examples/readings.toml", "-w", "2", "--home",
                           str(tmp_path / "h"), "-p", f"sink.path={tmp_path / 'readings.db'}",
                           cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert "16 succeeded" in result.stdout and "records: 8000 in, 7927 out" in result.stdout
        with sqlite3.connect(tmp_path / "readings.db") as conn:
            assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT station) FROM readings"
                                ).fetchone() == (7927, 40)


@pytest.mark.parametrize("command", ["init", "run", "submit", "worker", "runs", "show", "trace",
                                     "extensions", "validate"])
def test_every_command_has_help(command, tmp_path):
    result = runex_cli(command, "--help", cwd=tmp_path, check=True)
    assert "Usage: runex " + command in result.stdout
    summary = result.stdout.split("\n\n")[1].strip()
    assert len(summary) > 20


@pytest.mark.slow
def test_many_submitters_and_consumers_on_one_home(project):
    """Three consumers and three submitters at once: every run succeeds, no partition runs
    twice, and no 'database is locked' reaches anyone."""
    make(project, stop=40, size=5, pause=0.001)
    consumers = [subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "2"],
                                  cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(3)]
    submit = (f"for i in 1 2 3 4; do {sys.executable} -m runex submit pipelines/p.toml "
              "|| exit 1; done")
    submitters = [subprocess.Popen(["bash", "-c", submit], cwd=project, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE) for _ in range(3)]
    outputs = [s.communicate(timeout=120) for s in submitters]
    assert [s.returncode for s in submitters] == [0, 0, 0], outputs
    import time
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
        if len(runs) == 12 and all(r["status"] == "succeeded" for r in runs):
            break
        time.sleep(0.2)
    for c in consumers:
        c.send_signal(signal.SIGINT)
    errors = [c.communicate(timeout=60)[1].decode() for c in consumers]
    assert [r["status"] for r in runs] == ["succeeded"] * 12
    assert not any("locked" in text for text in errors + [e.decode() for _, e in outputs]), errors
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM sq").fetchone() == (480,)
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT run_id || ':' || partition_index) "
                            "FROM _runex_commits").fetchone() == (96, 96)
    with sqlite3.connect(project / ".runex" / "ledger.db") as conn:
        assert conn.execute("SELECT status, COUNT(*) FROM attempts GROUP BY 1").fetchall() == [
            ("succeeded", 96)]


@pytest.mark.slow
def test_an_idle_consumer_writes_nothing_to_its_home(project):
    """After a run, a consumer (reaper and checkpoints every 0.3 s, scheduler every second)
    leaves every file of its home as it is: SD cards wear out."""
    import time

    make(project, stop=200, size=10)
    runex_cli("submit", "pipelines/p.toml", cwd=project, check=True)
    proc = subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "2", "--profile",
                             "fast"], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)[0][
                "status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(2)  # the run's last writes, and a checkpoint of them

        def state():
            return {p.name: (p.stat().st_size, p.stat().st_mtime_ns)
                    for p in (project / ".runex").rglob("*") if p.is_file()}

        before = state()
        time.sleep(3)  # ten rounds of reaper and checkpoint, three of the scheduler
        assert state() == before
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_runex_host_names_this_machine_in_the_ledger(project):
    work_pipeline(project, stop=20)
    env = {**os.environ, "RUNEX_HOST": "board-a"}
    runex_cli("submit", "pipelines/p.toml", cwd=project, check=True)
    runex_cli("worker", "--burst", "-w", "1", cwd=project, env=env, check=True)
    data = json.loads(runex_cli("show", "last", "--json", cwd=project, check=True).stdout)
    assert {a["host"] for p in data["partitions"] for a in p["attempts"]} == {"board-a"}
