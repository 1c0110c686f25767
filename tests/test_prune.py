"""`runex prune`: finished runs older than a cutoff leave every table and the trace files;
runs not over and the fires a schedule needs stay."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from runex import Runex
from runex.ledger import Pace
from runex.storage import WAL_KEEP_BYTES

from .conftest import runex_cli, work_pipeline, write


def count(db, sql, *args):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchone()[0]


def test_prune_deletes_old_runs_everywhere_and_keeps_what_is_needed(project):
    work_pipeline(project, stop=30)
    rx = Runex()
    old = [rx.run("pipelines/p.toml", workers=0).id for _ in range(2)]
    waiting = rx.submit("pipelines/p.toml")  # queued, never run: not over
    fresh = rx.run("pipelines/p.toml", workers=0).id
    ledger = project / ".runex" / "ledger.db"
    now = time.time()
    with rx.ledger.tx() as conn:  # the old runs ended 40 days ago, the queued one began then
        conn.execute("UPDATE runs SET finished_at = ?, created_at = ? WHERE id IN (?, ?, ?)",
                     (now - 40 * 86400, now - 40 * 86400, *old, waiting))
        # the schedule's fires: an old one, and the newest, both of old runs
        conn.execute("INSERT INTO fires (pipeline, fire_time, status, run_id, created_at) "
                     "VALUES ('p', '2026-10-01T00:00:00Z', 'fired', ?, ?), "
                     "('p', '2026-10-02T00:00:00Z', 'fired', ?, ?)",
                     (old[0], now - 40 * 86400, old[1], now - 40 * 86400))
    traces = project / ".runex" / "traces"
    write(traces / "2026-10-01.jsonl", '{"event": "x"}\n')
    today = time.strftime("%Y-%m-%d.jsonl", time.gmtime())
    write(traces / today, '{"event": "y"}\n')

    dry = json.loads(runex_cli("prune", "--dry-run", "--json", cwd=project, check=True).stdout)
    assert dry["runs"] == 2 and dry["partitions"] == 6 and dry["fires"] == 1
    assert dry["trace_files"] == ["2026-10-01.jsonl"]
    assert count(ledger, "SELECT COUNT(*) FROM runs") == 4  # nothing deleted

    result = runex_cli("prune", cwd=project, check=True)
    assert result.stdout.startswith("deleted 2 runs that ended before ")
    for table in ("partitions", "attempts", "run_counts"):
        assert count(ledger, f"SELECT COUNT(*) FROM {table} WHERE run_id IN (?, ?)",
                     *old) == 0, table
    assert {r["id"] for r in rx.runs()} == {waiting, fresh}
    # the newest fire stays (the schedule must know it fired), without its run
    assert count(ledger, "SELECT COUNT(*) FROM fires") == 1
    assert count(ledger, "SELECT run_id IS NULL FROM fires WHERE fire_time = "
                         "'2026-10-02T00:00:00Z'") == 1
    assert rx.ledger.last_fire("p") == "2026-10-02T00:00:00Z"
    assert sorted(p.name for p in traces.glob("*.jsonl")) == [today]
    assert rx.show(fresh).status == "succeeded" and rx.show(waiting).status == "queued"


def test_keep_last_and_bad_durations(project):
    work_pipeline(project, stop=10)
    rx = Runex()
    ids = [rx.run("pipelines/p.toml", workers=0).id for _ in range(3)]
    time.sleep(0.01)
    done = rx.prune(older_than="0s", keep_last=1)
    assert done["runs"] == 2 and [r["id"] for r in rx.runs()] == [ids[-1]]
    result = runex_cli("prune", "--older-than", "soon", cwd=project)
    assert result.returncode == 2 and "'soon' is not a duration" in result.stderr


def on_disk(home) -> int:
    """The size of the ledger's file (its write-ahead log aside: that is cut back when the
    next write finds it copied, or when nothing is queued or running)."""
    return (home / "ledger.db").stat().st_size


@pytest.mark.slow
def test_consumers_prune_what_retain_lets_go_and_give_the_space_back(project):
    """`retain` and `retain_runs` in runex.toml: a consumer prunes by itself, never a run
    that is not over, and the ledger file shrinks."""
    write(project / "runex.toml", 'extensions = ["extensions"]\nretain = "1d"\n'
                                  "retain_runs = 3\n")
    work_pipeline(project, stop=1500, size=1)
    rx = Runex()
    old = [rx.run("pipelines/p.toml", workers=0).id for _ in range(3)]
    going = rx.submit("pipelines/p.toml", ["steps.0.pause=30", "source.stop=1"])
    fresh = [rx.run("pipelines/p.toml", workers=0).id for _ in range(4)]
    with rx.ledger.tx() as conn:  # three runs ended two days ago; one began then, not over
        conn.execute("UPDATE runs SET created_at = created_at - 172800, finished_at = "
                     "finished_at - 172800 WHERE id IN (?, ?, ?, ?)", (*old, going))
    home = project / ".runex"
    rx.ledger.checkpoint()  # what the runs above left in the write-ahead log, in the file
    before = on_disk(home)
    proc = subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "1", "--profile",
                             "fast"], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while ({r["id"] for r in rx.runs()} != {going, *fresh[1:]} or on_disk(home) > before / 2
               or count(home / "ledger.db", "SELECT COUNT(*) FROM pruning")
               or count(home / "ledger.db", "PRAGMA freelist_count")):
            assert time.monotonic() < deadline, (rx.runs(), on_disk(home), before)
            time.sleep(0.1)
        assert not rx.show(going).over  # old, but not over: kept
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ledger = home / "ledger.db"
    gone = (*old, fresh[0])
    for table in ("partitions", "attempts", "run_counts"):
        assert count(ledger, f"SELECT COUNT(*) FROM {table} WHERE run_id IN (?, ?, ?, ?)",
                     *gone) == 0, table
    assert count(ledger, "SELECT COUNT(*) FROM partitions") == 3 * 1500 + 1


def test_a_bad_retain_names_the_file_and_key(project):
    write(project / "runex.toml", 'extensions = ["extensions"]\nretain = "a month"\n')
    result = runex_cli("runs", cwd=project)
    assert result.returncode == 3
    assert "runex.toml: key 'retain' must be a duration such as \"30d\"" in result.stderr
    write(project / "runex.toml", 'extensions = ["extensions"]\nretain = "forever"\n'
                                  "retain_runs = 5\n")
    assert Runex().project.retention == (None, 5)


def test_a_run_retried_while_a_prune_goes_on_is_kept(project, monkeypatch):
    """A prune reads which runs to delete first, then deletes them a slice at a time: a run
    retried in between is not over any more, and stays whole; a large run's row goes first,
    so that nothing can retry it once its partitions are going."""
    work_pipeline(project, stop=30, size=10, options="retries = 0", fail_on=15)
    rx = Runex()
    first, second = (rx.run("pipelines/p.toml", workers=0).id for _ in range(2))
    large = rx.run("pipelines/p.toml", ["source.size=1", "source.stop=12"], workers=0).id
    ledger = rx.ledger
    pauses = []

    def pause(seconds):  # between the prune's transactions: someone retries the second run
        pauses.append(seconds)
        if len(pauses) == 1:
            assert ledger.retry(second) == [1]

    monkeypatch.setattr("runex.ledger.time.sleep", pause)
    done = ledger.prune(time.time() + 1, pace=Pace(rows=5, seconds=None))
    assert done.runs == 2 and done.partitions == 3 + 12
    assert {r["id"] for r in rx.runs()} == {second}
    assert ledger.progress(second) == {"queued": 1, "succeeded": 2}
    assert ledger.retry(large) == []  # gone, and not brought back
    with sqlite3.connect(project / ".runex" / "ledger.db") as conn:
        left = conn.execute("SELECT run_id, COUNT(*) FROM partitions GROUP BY 1").fetchall()
        assert left == [(second, 3)] and conn.execute("SELECT * FROM pruning").fetchall() == []


def test_a_prune_stopped_half_way_goes_on_next_time(project):
    work_pipeline(project, stop=40, size=1)
    rx = Runex()
    run_id = rx.run("pipelines/p.toml", workers=0).id
    done = rx.ledger.prune(time.time() + 1, pace=Pace(rows=10, seconds=None, least=0),
                           max_partitions=15)
    assert (done.runs, done.partitions) == (1, 20)  # the row at once, two slices of ten
    assert rx.runs() == [] and count(project / ".runex" / "ledger.db",
                                      "SELECT done FROM pruning") == 20
    done = rx.ledger.prune(time.time() + 1, pace=Pace(rows=10, seconds=None, least=0))
    assert (done.runs, done.partitions, done.attempts) == (0, 20, 20)
    assert count(project / ".runex" / "ledger.db",
                 "SELECT COUNT(*) FROM partitions WHERE run_id = ?", run_id) == 0


@pytest.mark.slow
def test_once_work_is_done_the_logs_are_cut_back(project):
    work_pipeline(project, stop=20_000, size=1)  # logs of megabytes while it runs
    runex_cli("run", "pipelines/p.toml", "-w", "2", cwd=project, check=True)
    home = project / ".runex"
    for log in ("ledger.db-wal", "queue.db-wal"):  # nothing, or what a reset left (1 MiB)
        assert (home / log).stat().st_size <= WAL_KEEP_BYTES, log
