"""Crash recovery, fencing, cancel and retry, with real processes where it matters."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from runex import Runex, lease, reaper
from runex.errors import NotFound
from runex.identity import alive, my_start
from runex.ledger import Lost, Recorded

from .conftest import (
    children,
    claim,
    drain,
    finish,
    ledger_rows,
    runex_cli,
    show,
    traced,
    work_pipeline,
    write,
)

pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL


def make(project, stop=40, size=10, options="", **params):
    return work_pipeline(project, stop, size, "batch_size = 1\n" + options, **params)


def consumer(project, workers=1, profile="fast"):
    return subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", str(workers),
                             "--profile", profile], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


ledger = ledger_rows


def running_pid(project):
    rows = ledger(project, "SELECT pid FROM attempts WHERE status = 'running'")
    return rows[0][0] if rows else None


def stop(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_worker_loses_nothing_and_doubles_nothing(project):
    make(project, stop=40, size=10, pause=0.05)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    proc = consumer(project)
    try:
        os.kill(wait_for(lambda: running_pid(project)), signal.SIGKILL)  # mid-partition
        wait_for(lambda: ledger(project, "SELECT status FROM runs")[0][0] == "succeeded")
    finally:
        stop(proc)
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT n) FROM sq").fetchone() == (40, 40)
    data = json.loads(runex_cli("show", run_id, "--json", cwd=project, check=True).stdout)
    statuses = [[a["status"] for a in p["attempts"]] for p in data["partitions"]]
    assert ["lost", "succeeded"] in statuses
    lost = next(a for p in data["partitions"] for a in p["attempts"] if a["status"] == "lost")
    assert lost["error"].startswith(f"worker pid {lost['pid']} on ")


@pytest.mark.slow
def test_a_partition_that_kills_its_worker_is_quarantined(project):
    make(project, stop=30, size=10, die_on=15, options="quarantine_after = 2")
    runex_cli("submit", "pipelines/p.toml", cwd=project, check=True)
    proc = consumer(project)
    try:
        wait_for(lambda: ledger(project, "SELECT status FROM runs")[0][0] == "failed")
    finally:
        stop(proc)
    parts = ledger(project, "SELECT idx, status, error FROM partitions ORDER BY idx")
    assert [p[1] for p in parts] == ["succeeded", "quarantined", "succeeded"]
    assert parts[1][2].startswith("quarantined: lost 2 times")
    assert ledger(project, "SELECT status FROM attempts WHERE idx = 1") == [("lost",), ("lost",)]


@pytest.mark.slow
def test_killing_the_consumer_leaves_no_orphan_worker(project):
    make(project, stop=10, size=10, pause=1.0)
    runex_cli("submit", "pipelines/p.toml", cwd=project, check=True)
    proc = consumer(project, workers=2)
    child = wait_for(lambda: running_pid(project))
    kids = wait_for(lambda: len(found := children(proc.pid)) == 3 and found)
    os.kill(proc.pid, signal.SIGKILL)  # only the parent
    proc.wait(timeout=10)
    assert child in kids
    for pid in kids:  # the busy worker, the idle one, and huey's scheduler process
        wait_for(lambda pid=pid: not alive(pid, None), timeout=10)



@pytest.mark.slow
def test_sigterm_drains_running_partitions(project):
    make(project, stop=30, size=10, pause=0.05)
    runex_cli("submit", "pipelines/p.toml", cwd=project, check=True)
    proc = consumer(project)
    wait_for(lambda: running_pid(project))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    statuses = sorted(s for (s,) in ledger(project, "SELECT status FROM partitions"))
    assert statuses == ["queued", "queued", "succeeded"]  # the running one finished
    assert ledger(project, "SELECT status FROM attempts") == [("succeeded",)]


def test_a_stale_attempt_is_fenced(project):
    make(project, stop=10, size=10)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    first = claim(rx.ledger, run_id, 0, pid=1)
    assert rx.ledger.lose_attempt(run_id, 0, 1, "test", 3) == Lost("queued", False)
    second = claim(rx.ledger, run_id, 0, pid=2)
    assert (first.attempt, second.attempt) == (1, 2)
    assert finish(rx.ledger, first, "succeeded") == Recorded([False], False)  # fenced
    assert finish(rx.ledger, second, "succeeded") == Recorded([True], True)
    assert [a["status"] for a in show(rx, run_id)["partitions"][0]["attempts"]] == [
        "lost", "succeeded"]


def test_a_vanished_message_is_requeued(project):
    make(project, stop=20, size=10)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    rx.huey.storage.flush_queue()  # as if a worker died between dequeue and claim
    state = rx.prepare_workers()
    assert reaper.requeue_vanished(state, older_than=0) == 2
    assert reaper.requeue_vanished(state, older_than=0) == 0  # messages are back
    drain(rx)
    assert show(rx, run_id)["status"] == "succeeded"


def test_cancel_before_start_and_retry_with_a_fresh_budget(project):
    make(project, stop=20, size=10, fail_unless="go", options='retries = 1\nretry_delay = "10ms"')
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    assert rx.cancel(run_id) == {"run_id": run_id, "cancelled": 2, "running": 0,
                                 "status": "cancelled", "already_over": False}
    assert rx.huey.dequeue() is not None  # the message is still there, but claims nothing
    drain(rx)
    assert show(rx, run_id)["status"] == "cancelled"
    assert rx.retry(run_id) == [0, 1]
    drain(rx)
    data = show(rx, run_id)
    assert data["status"] == "failed"  # the kernel fails until "go" exists
    assert [a["status"] for a in data["partitions"][0]["attempts"]] == ["failed", "failed"]
    (project / "go").touch()
    assert rx.retry(run_id, partition=1) == [1]
    drain(rx)
    assert [a["status"] for a in show(rx, run_id)["partitions"][1]["attempts"]] == [
        "failed", "failed", "succeeded"]
    assert rx.retry(run_id) == [0]
    drain(rx)
    assert show(rx, run_id)["status"] == "succeeded"
    with pytest.raises(NotFound, match="has no failed, timed-out, quarantined or cancelled"):
        rx.retry(run_id)


@pytest.mark.slow
def test_cancel_stops_a_running_partition_at_its_next_batch(project):
    make(project, stop=200, size=100, pause=0.02)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    proc = consumer(project)
    try:
        wait_for(lambda: running_pid(project))
        result = runex_cli("cancel", run_id, cwd=project, check=True)
        assert "1 queued partition cancelled, 1 running will stop" in result.stdout
        wait_for(lambda: ledger(project, "SELECT status FROM runs")[0][0] == "cancelled")
    finally:
        stop(proc)
    (status, records_in), = ledger(project, "SELECT status, records_in FROM attempts")
    assert status == "cancelled" and records_in < 100


@pytest.mark.slow
def test_pausing_all_work_lets_the_running_partition_finish_and_starts_no_other(project):
    make(project, stop=30, size=10, pause=0.2)  # 3 partitions of 2 s: the pause
    # is seen (within a second) while the first runs
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    proc = consumer(project)
    try:
        wait_for(lambda: running_pid(project))
        assert runex_cli("pause", cwd=project, check=True).stdout == "all work paused\n"
        assert "already paused" in runex_cli("pause", cwd=project, check=True).stdout
        wait_for(lambda: progress(project, run_id) == {"succeeded": 1, "queued": 2})
        time.sleep(2.5)  # two looks at the pause: still nothing taken
        assert progress(project, run_id) == {"succeeded": 1, "queued": 2}
        refused = runex_cli("run", "pipelines/p.toml", cwd=project)  # it would wait forever
        assert refused.returncode == 2 and "all work is paused (by cli)" in refused.stderr
        assert runex_cli("resume", cwd=project, check=True).stdout == "all work resumed\n"
        wait_for(lambda: progress(project, run_id) == {"succeeded": 3})
    finally:
        stop(proc)
    stderr = proc.stderr.read().decode()
    assert "all work is paused (by cli)" in stderr and "all work is resumed" in stderr
    events = [e["event"] for e in traced(project) if e["event"].startswith("work.")]
    assert events == ["work.paused", "work.paused", "work.paused", "work.resumed",
                      "work.resumed"]  # asked (twice), seen by the consumer, asked, seen


def progress(project, run_id):
    return dict(ledger(project, "SELECT status, n FROM run_counts WHERE run_id = ? AND n > 0",
                       (run_id,)))


@pytest.mark.slow
def test_the_lease_is_renewed_only_while_the_partition_is_held(project, monkeypatch):
    make(project, stop=10, size=10)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    rx.ledger.lease = 0.3  # renewed every 0.1 s
    held = claim(rx.ledger, run_id, 0)
    lease_until = lambda: ledger(project, "SELECT lease_until FROM attempts")[0][0]  # noqa: E731
    first = lease_until()
    holding = lease.Holding()
    with holding.hold(rx.ledger, [held]):
        time.sleep(0.5)
    renewed = lease_until()
    assert renewed > first
    time.sleep(0.4)
    assert lease_until() == renewed  # no longer held: no more writes


def test_a_finalizers_hold_on_its_run_is_renewed_while_it_finalizes(project):
    make(project, stop=10, size=10)
    rx = Runex()
    rx.ledger.lease = 0.3  # renewed every 0.1 s
    run_id = rx.submit("pipelines/p.toml")
    assert rx.ledger.claim_finalize(run_id, "me")
    until = lambda: ledger(project, "SELECT finalizer_until FROM runs")[0][0]  # noqa: E731
    first = until()
    with lease.Holding().finalizing(rx.ledger, run_id, "me"):
        time.sleep(0.5)
    assert until() > first + 0.2


@pytest.mark.slow
def test_lost_attempts_do_not_spend_the_retry_budget(project):
    make(project, stop=10, size=10, fail_unless="never", options="retries = 1")
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    for pid in (1, 2):  # two workers die holding it
        taken = claim(rx.ledger, run_id, 0, pid=pid)
        rx.ledger.lose_attempt(run_id, 0, taken.attempt, "test", quarantine_after=3)
    drain(rx)
    attempts = [a["status"] for a in show(rx, run_id)["partitions"][0]["attempts"]]
    assert attempts == ["lost", "lost", "failed", "failed"]  # one try and one retry


DIE_AFTER_COMMIT = """
    import os, signal
    from runex import SinkSpec
    from runex.builtins import files, postgres, sqlite

    def then_die(write):
        def wrapped(ctx, records):
            write(ctx, records)
            if ctx.index == 1 and not os.path.exists("died"):
                open("died", "w").close()
                os.kill(os.getpid(), signal.SIGKILL)  # committed, but the ledger never hears
        return wrapped

    die_sqlite = SinkSpec("die_sqlite", then_die(sqlite.write_sqlite),
                          configure=sqlite.configure_sqlite)
    die_jsonl = SinkSpec("die_jsonl", then_die(files.write_jsonl),
                         finalize=lambda ctx: files.merge_parts(ctx, "jsonl", False),
                         configure=files.configure_files)
    die_csv = SinkSpec("die_csv", then_die(files.write_csv),
                       finalize=lambda ctx: files.merge_parts(ctx, "csv", True),
                       configure=files.configure_files)
    die_postgres = SinkSpec("die_postgres", then_die(postgres.write_postgres),
                            configure=postgres.configure_postgres)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "jsonl", "csv", "postgres"])
def test_a_kill_between_sink_commit_and_ledger_update_doubles_nothing(project, kind, request):
    make(project, stop=30, size=10)
    write(project / "extensions" / "die.py", DIE_AFTER_COMMIT)
    pipeline = project / "pipelines" / "p.toml"
    sink = {"sqlite": 'path = "out/sq.db"\ntable = "sq"',
            "jsonl": 'path = "out/parts"\nmerge = "out/all.jsonl"',
            "csv": 'path = "out/parts"\nmerge = "out/all.csv"',
            "postgres": "url = 'URL'\ntable = \"sq\""}[kind]
    if kind == "postgres":
        url = request.getfixturevalue("pg_target")
        sink = sink.replace("URL", url)
    text = pipeline.read_text()
    text = text.replace('use = "sqlite"\npath = "out/sq.db"\ntable = "sq"',
                        f'use = "die_{kind}"\n{sink}')
    pipeline.write_text(text)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    proc = consumer(project)
    try:
        wait_for(lambda: ledger(project, "SELECT status FROM runs")[0][0] == "succeeded")
    finally:
        stop(proc)
    assert (project / "died").exists()
    data = json.loads(runex_cli("show", run_id, "--json", cwd=project, check=True).stdout)
    assert [a["status"] for a in data["partitions"][1]["attempts"]] == ["lost", "succeeded"]
    if kind == "sqlite":
        with sqlite3.connect(project / "out" / "sq.db") as conn:
            got = [n for (n,) in conn.execute("SELECT n FROM sq ORDER BY n")]
    elif kind == "jsonl":
        lines = (project / "out" / "all.jsonl").read_text().splitlines()
        got = sorted(json.loads(line)["n"] for line in lines)
    elif kind == "csv":
        lines = (project / "out" / "all.csv").read_text().splitlines()
        got = sorted(int(line.split(",")[0]) for line in lines[1:])
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            got = [n for (n,) in conn.execute("SELECT n FROM sq ORDER BY n")]
    assert got == list(range(30))


def test_a_paused_worker_that_stopped_renewing_its_lease_loses_the_partition(project):
    make(project, stop=10, size=10)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    claim(rx.ledger, run_id, 0, started=my_start())
    state = rx.prepare_workers()
    assert reaper.reap_lost(state) == 0  # alive, lease fresh
    assert reaper.reap_lost(state, now=time.time() + 120) == 1  # alive, lease expired
    attempt = show(rx, run_id)["partitions"][0]["attempts"][0]
    assert attempt["status"] == "lost" and "lease of worker pid" in attempt["error"]


@pytest.mark.slow
@pytest.mark.sqlite_only("writes the queue's SQLite file")
def test_an_unreadable_queue_message_is_traced_and_its_partition_recovered(project):
    import pickle

    make(project, stop=20, size=10)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    with sqlite3.connect(project / ".runex" / "queue.db") as conn:
        first = conn.execute("SELECT MIN(id) FROM task").fetchone()[0]
        conn.execute("UPDATE task SET data = ? WHERE id = ?",
                     (pickle.dumps(("not", "json")), first))
    proc = consumer(project)
    try:
        wait_for(lambda: ledger(project, "SELECT status FROM runs")[0][0] == "succeeded")
    finally:
        stop(proc)
    events = [json.loads(line) for f in (project / ".runex" / "traces").glob("*.jsonl")
              for line in f.read_text().splitlines()]
    unreadable = [e for e in events if e["event"] == "message.unreadable"]
    assert len(unreadable) == 1 and unreadable[0]["error"].startswith("UnicodeDecodeError")
    requeued = [e for e in events if e["event"] == "partition.requeued"]
    assert [(e["run_id"], e["partition_index"]) for e in requeued] == [(run_id, 0)]


@pytest.mark.slow
@pytest.mark.sqlite_only("a full disk under SQLite's files (a server's disk is its own)")
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_disk_is_a_clear_error_and_changes_nothing(project, fault):
    from runex.errors import StorageError

    make(project, stop=100_000, size=1)  # 100,000 partitions: more pages than we allow
    rx = Runex()
    rx.ledger.runs()  # the schema is in place
    if fault == "full":
        pages = rx.ledger.conn.execute("PRAGMA page_count").fetchone()[0]
        rx.ledger.conn.execute(f"PRAGMA max_page_count = {pages + 5}")
        expected = f": the disk under {rx.project.home} is full ("
    else:  # root may write any file, so make the connection refuse writes instead
        rx.ledger.conn.execute("PRAGMA query_only = 1")
        expected = " (attempt to write a readonly database); it is read-only"
    with pytest.raises(StorageError) as info:
        rx.submit("pipelines/p.toml")
    assert str(info.value).startswith(f"cannot write the ledger {rx.ledger.path}{expected}")
    assert "nothing stored was changed" in str(info.value)
    rx.ledger.conn.execute("PRAGMA query_only = 0")
    assert rx.ledger.runs() == [] and rx.huey.pending_count() == 0


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_gives_the_partition_back(project):
    make(project, stop=10, size=10, pause=0.5)  # one partition of five seconds
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    proc = consumer(project)
    wait_for(lambda: running_pid(project))
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=4)  # well before the partition could have finished
    assert ledger(project, "SELECT status FROM partitions") == [("queued",)]
    assert ledger(project, "SELECT status FROM attempts") == [("interrupted",)]
    proc = consumer(project)  # the message is back on the queue: a new consumer finishes it
    try:
        wait_for(lambda: ledger(project, "SELECT status FROM runs")[0][0] == "succeeded")
    finally:
        stop(proc)
    assert [a["status"] for a in show(Runex(), run_id)["partitions"][0]["attempts"]] == [
        "interrupted", "succeeded"]


@pytest.mark.slow
@pytest.mark.sqlite_only("SQLite's write lock")
def test_a_writer_waits_for_the_lock_then_gets_it_and_the_busy_timeout_is_kept(tmp_path):
    from runex.ledger import Ledger
    from runex.storage import begin_immediate

    rx_ledger = Ledger(tmp_path / "ledger.db")
    rx_ledger.runs()
    holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(rx_ledger.conn, timeout=0.1)
    assert rx_ledger.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 60000
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    with rx_ledger.tx() as conn:  # waits out the holder
        conn.execute("INSERT INTO schedules (pipeline, since) VALUES ('p', 'now')")
    assert rx_ledger.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 60000
    assert ledger_rows(tmp_path / "ledger.db", "SELECT pipeline FROM schedules") == [("p",)]


def ledger_rows(path, sql):
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()
