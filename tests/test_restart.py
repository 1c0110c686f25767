"""After a power cut: a consumer that starts on a new boot recovers at once, and a home
written by an earlier runex opens and keeps working."""

import json
import os
import shutil
import sqlite3
import subprocess
import time

import pytest

from runex import Runex, reaper, trace
from runex.identity import BOOT_ID, alive, holder, my_start, process_start
from runex.ledger import SCHEMA

from .conftest import (
    TESTS,
    claim,
    finish,
    home_of_fixture,
    runex_cli,
    show,
    work_pipeline,
    write,
)


def slow_reaper(project):
    """A profile whose reaper looks every minute: what a test sees in seconds came from the
    consumer's first look, at its start."""
    write(project / "workers" / "slow.toml", "reap_every = 60\nmax_delay = 0.1\n")


def after_a_power_cut(rx, run_id, running=True):
    """What a power cut leaves: the queue's unsynced messages gone, partitions queued long
    a moment ago, and (`running`) partition 0 held by a worker of the previous boot whose pid and
    start time happen to match a live process (this one), with a lease not yet expired."""
    rx.huey.storage.flush_queue()
    with rx.ledger.tx() as conn:
        conn.execute("UPDATE partitions SET queued_at = queued_at - 10")
    if running:
        claim(rx.ledger, run_id, 0, started=my_start(), boot_id="an-earlier-boot")
    rx.ledger.add_consumer(trace.HOST, os.getpid(),
                           process_start(os.getpid()), "an-earlier-boot", 2)
    rx.ledger.close()


def test_a_consumer_on_a_new_boot_requeues_at_once_what_the_old_boot_held(project):
    work_pipeline(project, stop=30, size=10)
    slow_reaper(project)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    after_a_power_cut(rx, run_id)
    started = time.monotonic()
    runex_cli("worker", "--burst", "-w", "1", "--profile", "slow", cwd=project, check=True,
              timeout=60)
    assert time.monotonic() - started < 30  # well before the reaper's next round, at 60 s
    data = show(Runex(), run_id)
    assert data["status"] == "succeeded"
    first = data["partitions"][0]["attempts"][0]
    assert first["status"] == "lost"
    assert first["error"].endswith("is gone: the machine restarted")
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT n) FROM sq").fetchone() == (30, 30)
    # The consumer of the earlier boot was forgotten, and this one removed itself.
    assert Runex().ledger.consumers() == []


def test_vanished_messages_are_requeued_at_once_when_no_other_consumer_runs(project):
    work_pipeline(project, stop=30, size=10)
    slow_reaper(project)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    after_a_power_cut(rx, run_id, running=False)
    runex_cli("worker", "--burst", "-w", "1", "--profile", "slow", cwd=project, check=True,
              timeout=60)
    assert show(Runex(), run_id)["status"] == "succeeded"


def test_another_live_consumer_is_seen_and_one_of_an_earlier_boot_is_not(project):
    work_pipeline(project, stop=10)
    rx = Runex()
    state = rx.prepare_workers()
    other = subprocess.Popen(["sleep", "30"])
    try:
        started = process_start(other.pid)
        rx.ledger.add_consumer(trace.HOST, other.pid, started, "an-earlier-boot", 1)
        assert not reaper.others_alive(state)
        rx.ledger.add_consumer(trace.HOST, other.pid, started, BOOT_ID, 1)
        assert reaper.others_alive(state)
        reaper.register(state, 2)  # this process: not another one
        assert reaper.others_alive(state)
        other.kill()
        other.wait()
        assert not reaper.others_alive(state)
        reaper.register(state, 2)  # forgets the dead one
        assert [c["pid"] for c in rx.ledger.consumers()] == [os.getpid()]
    finally:
        other.kill()
        other.wait()


def test_alive_knows_a_process_of_an_earlier_boot_is_gone():
    me, started = os.getpid(), process_start(os.getpid())
    assert alive(me, started, BOOT_ID)
    assert alive(me, started, None)  # recorded by runex 0.1: no boot id
    assert not alive(me, started, "an-earlier-boot")


@pytest.mark.slow
def test_a_home_written_by_runex_0_1_opens_and_keeps_working(project):
    """tests/fixtures/home-0.1.0: ledger schema 1, one succeeded and one failed run."""
    shutil.copytree(TESTS / "fixtures" / "home-0.1.0", project / ".runex",
                    ignore=shutil.ignore_patterns("README.md"))
    runs = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    assert [(r["pipeline"], r["status"]) for r in runs] == [("example", "failed"),
                                                            ("example", "succeeded")]
    old = json.loads(runex_cli("show", runs[1]["id"], "--json", cwd=project, check=True).stdout)
    assert old["records_out"] == 43 and [p["status"] for p in old["partitions"]] == [
        "succeeded", "succeeded"]
    with sqlite3.connect(project / ".runex" / "ledger.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(SCHEMA),)
        assert conn.execute("SELECT boot_id FROM attempts").fetchall() == [(None,)] * 4
    work_pipeline(project, stop=20)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)
    runs = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    assert [(r["id"] == run_id, r["status"]) for r in runs] == [
        (True, "succeeded"), (False, "failed"), (False, "succeeded")]
    new = json.loads(runex_cli("show", run_id, "--json", cwd=project, check=True).stdout)
    assert all(a["boot_id"] == BOOT_ID for p in new["partitions"]
               for a in p["attempts"])


def test_an_exited_process_not_yet_reaped_is_not_alive():
    """A killed consumer's workers are zombies until their parent is reaped: the reaper of a
    consumer started meanwhile must not take them for live workers."""
    child = subprocess.Popen(["sleep", "30"])
    started = process_start(child.pid)
    assert alive(child.pid, started)
    child.kill()
    deadline = time.monotonic() + 10
    while process_start(child.pid) is not None and alive(child.pid, started):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert process_start(child.pid) == started  # a zombie: not waited for yet
    assert not alive(child.pid, started)
    child.wait()


def test_the_reaper_finalizes_runs_whose_finalizer_is_gone_or_was_itself(project):
    """A finalizer of an earlier boot is gone even if its pid now runs; one that is this
    process (a full disk stopped it mid-way) is taken up again."""
    work_pipeline(project, stop=20)
    rx = Runex()
    state = rx.prepare_workers()
    runs = []
    for finalizer in (f"{trace.HOST}:{os.getpid()}:{my_start()}:an-earlier-boot",
                      holder()):
        run_id = rx.submit("pipelines/p.toml")
        for taken in rx.ledger.claim_many(run_id, [0, 1], trace.HOST, 1, None):
            finish(rx.ledger, taken, "succeeded")
        assert rx.ledger.claim_finalize(run_id, finalizer)
        runs.append(run_id)
    assert reaper.reap_unfinalized(state) == 2
    assert [rx.ledger.run(r)["status"] for r in runs] == ["succeeded", "succeeded"]


@pytest.mark.slow
def test_a_home_of_ledger_schema_3_opens_and_keeps_working(tmp_path, monkeypatch):
    """tests/fixtures/home-schema-3: written before each fact was kept once (trace events in
    the ledger too, partitions with a rowid, no counts). Its history, fires and queued run
    are all there after the upgrade, and the queued run goes on."""
    project = home_of_fixture("home-schema-3", tmp_path)
    home = project / ".runex"
    monkeypatch.chdir(project)
    runs = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    assert [(r["pipeline"], r["status"], r["records_out"]) for r in runs] == [
        ("example", "queued", 0), ("daily", "succeeded", 43), ("broken", "failed", 0),
        ("example", "succeeded", 43)]
    with sqlite3.connect(home / "ledger.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(SCHEMA),)
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)  # rewritten when idle
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        counts = conn.execute("SELECT status, SUM(n) FROM run_counts GROUP BY status "
                              "ORDER BY status").fetchall()
    assert "events" not in tables and "partitions_4" not in tables
    assert counts == [("failed", 2), ("queued", 2), ("succeeded", 4)]
    broken = json.loads(runex_cli("show", runs[2]["id"], "--json", cwd=project,
                                  check=True).stdout)
    assert broken["counts"] == {"failed": 2}
    assert "ValueError: cannot read" in broken["partitions"][0]["attempts"][0]["traceback"]
    # the trace of an old run: its events were in the files and the ledger; now the files
    events = json.loads(runex_cli("trace", runs[3]["id"], "--json", cwd=project,
                                  check=True).stdout)
    names = [e["event"] for e in events]
    assert names[0] == "run.submitted" and names[-1] == "run.finished"
    assert names.count("partition.committed") == 2
    # its steps were events; now they are its attempts' `steps`, told the same
    steps = [(e["kernel"], e["partition_index"]) for e in events if e["event"] == "step.finished"]
    assert sorted(steps) == [("lower", 0), ("lower", 1), ("words", 0), ("words", 1)]
    schedules = json.loads(runex_cli("schedules", "--json", cwd=project, check=True).stdout)
    assert schedules[0]["last"]["fire_time"] == "2026-11-26T06:00:00Z"
    runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)  # the queued run
    done = json.loads(runex_cli("show", runs[0]["id"], "--json", cwd=project,
                                check=True).stdout)
    assert done["status"] == "succeeded" and done["records_out"] == 43
    assert done["counts"] == {"succeeded": 2}
    with sqlite3.connect(home / "ledger.db") as conn:  # idle: rewritten, it can give space back
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)


@pytest.mark.slow
def test_a_home_of_ledger_schema_4_opens_and_keeps_working(tmp_path, monkeypatch):
    """tests/fixtures/home-schema-4: written before runs recorded the code they were
    submitted with. Its history is all there after the upgrade; its queued run goes on (its
    code unknown: not checked); a new run records its code, and its attempts ran that code."""
    project = home_of_fixture("home-schema-4", tmp_path)
    home = project / ".runex"
    monkeypatch.chdir(project)
    runs = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    assert [(r["pipeline"], r["status"], r["records_out"]) for r in runs] == [
        ("example", "queued", 0), ("daily", "succeeded", 43), ("broken", "failed", 0),
        ("example", "succeeded", 43)]
    with sqlite3.connect(home / "ledger.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(SCHEMA),)
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE code IS NULL").fetchone() == (4,)
    runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)  # the queued run
    done = json.loads(runex_cli("show", runs[0]["id"], "--json", cwd=project,
                                check=True).stdout)
    assert done["status"] == "succeeded" and done["records_out"] == 43
    runex_cli("run", "pipelines/example.toml", "-w", "1", cwd=project, check=True)
    run = json.loads(runex_cli("show", "last", "--json", cwd=project, check=True).stdout)
    with sqlite3.connect(home / "ledger.db") as conn:
        code = json.loads(conn.execute("SELECT code FROM runs WHERE id = ?",
                                       (run["id"],)).fetchone()[0])
        ran = {r[0] for r in conn.execute("SELECT code_version FROM attempts WHERE run_id = ?",
                                          (run["id"],))}
    assert run["status"] == "succeeded" and ran == {code["version"]}
    assert set(code["files"]) == {"extensions/example.py", "runex/builtins/files.py",
                                  "runex/builtins/sqlite.py"}


@pytest.mark.slow
def test_a_home_of_ledger_schema_5_opens_and_its_schedules_can_be_paused(tmp_path, monkeypatch):
    """tests/fixtures/home-schema-5: written before anything could be paused. Its history
    is all there after the upgrade; its daily schedule pauses and resumes; its queued run
    waits while all work is paused and goes on once resumed."""
    project = home_of_fixture("home-schema-5", tmp_path)
    monkeypatch.chdir(project)
    runs = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    assert [(r["pipeline"], r["status"], r["records_out"]) for r in runs] == [
        ("example", "queued", 0), ("daily", "succeeded", 43), ("broken", "failed", 0),
        ("example", "succeeded", 43)]
    with sqlite3.connect(project / ".runex" / "ledger.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(SCHEMA),)
    runex_cli("pause", "daily", cwd=project, check=True)
    schedules = json.loads(runex_cli("schedules", "--json", cwd=project, check=True).stdout)
    assert schedules[0]["paused"]["source"] == "cli"
    assert schedules[0]["last"]["fire_time"] == "2026-11-26T06:00:00Z"  # the fire it had
    runex_cli("pause", cwd=project, check=True)
    runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)  # takes nothing
    assert Runex().show(runs[0]["id"]).status == "queued"
    runex_cli("resume", cwd=project, check=True)
    runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)
    assert Runex().show(runs[0]["id"]).status == "succeeded"


@pytest.mark.slow
def test_a_home_of_ledger_schema_6_opens_and_runs_incrementally(tmp_path, monkeypatch):
    """tests/fixtures/home-schema-6: written before attempts recorded their input and
    partitions could be skipped. Its history and its paused schedule are there after the
    upgrade; its queued run goes on; the example pipeline, made incremental, runs its two
    files once and then skips them."""
    project = home_of_fixture("home-schema-6", tmp_path)
    monkeypatch.chdir(project)
    runs = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    assert [(r["pipeline"], r["status"], r["records_out"]) for r in runs] == [
        ("example", "queued", 0), ("daily", "succeeded", 43), ("broken", "failed", 0),
        ("example", "succeeded", 43)]
    with sqlite3.connect(project / ".runex" / "ledger.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(SCHEMA),)
        (index,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = "
                                "'partitions_unsettled'").fetchone()
        assert "NOT IN ('succeeded', 'skipped')" in index
    schedules = json.loads(runex_cli("schedules", "--json", cwd=project, check=True).stdout)
    assert schedules[0]["paused"]["source"] == "cli"
    runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)
    assert Runex().show(runs[0]["id"]).status == "succeeded"
    pipeline = project / "pipelines" / "example.toml"
    pipeline.write_text(pipeline.read_text().replace('mode = "replace"', 'mode = "partition"'))
    for expected in ({"succeeded": 2}, {"skipped": 2}):
        runex_cli("run", "pipelines/example.toml", "--changed", "-w", "1", cwd=project,
                  check=True)
        assert Runex().show("last").counts == expected
