"""Many partitions per queue message: claimed in chunks, handed back when slow or stopped."""

import json
import signal
import sqlite3

import pytest

from runex import Runex, reaper, tasks
from runex.executor import execute

from .conftest import drain, runex_cli, show, work_pipeline, write
from .test_recovery import consumer, ledger, wait_for

pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL

SLOW_FIRST = """
    import time
    from runex import register_kernel

    @register_kernel("slow_first")
    def slow_first(record, seconds=1.0):
        if record["n"] == 0:
            time.sleep(seconds)
        return record
"""


def test_partitions_are_packed_only_when_there_are_many():
    assert list(tasks.packs(range(40), cpus=2)) == [[i] for i in range(40)]
    for count, cpus in ((3000, 2), (3000, 64), (100_000, 4)):
        packs = list(tasks.packs(range(count), cpus=cpus))
        # About 16 messages per CPU (at least MIN_MESSAGES), unless packs would pass MAX_PACK.
        messages = max(tasks.MIN_MESSAGES, 16 * cpus, -(-count // tasks.MAX_PACK))
        assert [i for p in packs for i in p] == list(range(count))  # every index, in order
        assert len({len(p) for p in packs[:-1]}) == 1  # packs of one size, but the last
        assert messages // 2 < len(packs) <= messages
        assert max(map(len, packs)) <= tasks.MAX_PACK
    assert max(len(p) for p in tasks.packs(range(10**6), cpus=2)) == tasks.MAX_PACK


@pytest.mark.slow
def test_tiny_partitions_share_messages_and_ledger_transactions(project, monkeypatch):
    monkeypatch.setattr(tasks, "cpu_count", lambda: 2)
    work_pipeline(project, stop=1000, size=1)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    messages = rx.huey.pending_count()
    assert 1 < messages <= 1000 // 8  # packed, many partitions to a message
    drain(rx)
    # the attempts of one claim (one transaction) share its lease (not renewed this soon)
    claims = ledger(project, "SELECT DISTINCT lease_until FROM attempts")
    # one partition first, then chunks of about 50 ms: here the rest of a pack, mostly
    assert messages <= len(claims) < 1000 // 3
    data = show(rx, run_id)
    assert data["status"] == "succeeded"
    assert all([a["status"] for a in p["attempts"]] == ["succeeded"]
               for p in data["partitions"])
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT n) FROM sq").fetchone() == (
            1000, 1000)


@pytest.mark.slow
def test_a_slow_partition_hands_back_the_rest_of_its_pack(project):
    write(project / "extensions" / "slow.py", SLOW_FIRST)
    write(project / "pipelines" / "p.toml", """
        [source]
        use = "range"
        stop = 4
        size = 1
        [[steps]]
        use = "slow_first"
        [sink]
        use = "null"
    """)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    rx.huey.flush()
    # partition 0 takes a second; PACK_SLICE is 0.2 s
    execute(rx.prepare_workers(), run_id, [0, 1, 2, 3])
    task = rx.huey.dequeue()
    assert task.args == (run_id, [1, 2, 3]) and rx.huey.dequeue() is None
    parts = show(rx, run_id)["partitions"]
    assert [(p["status"], len(p["attempts"])) for p in parts] == [
        ("succeeded", 1), ("queued", 0), ("queued", 0), ("queued", 0)]
    rx.huey.execute(task)
    assert show(rx, run_id)["status"] == "succeeded"


STOP_AT = """
    from pathlib import Path
    from runex import register_kernel

    @register_kernel("stop_at")
    def stop_at(record, at=0):
        if record["n"] == at:  # the consumer is told to stop while this partition runs
            Path("stop").touch()
        return record
"""


@pytest.mark.parametrize("at", [0, 2])
def test_a_stopping_worker_gives_back_what_it_has_not_started(project, at):
    """Told to stop while partition `at` runs (0: in the first chunk, which is one partition;
    2: inside the second chunk), a worker finishes that partition, releases the rest of its
    chunk unstarted and hands the rest of its pack back to the queue."""
    write(project / "extensions" / "stop.py", STOP_AT)
    write(project / "pipelines" / "p.toml", f"""
        [source]
        use = "range"
        stop = 10
        size = 1
        [[steps]]
        use = "stop_at"
        at = {at}
        [sink]
        use = "null"
    """)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    rx.huey.flush()
    state = rx.prepare_workers()
    state.stopping = (project / "stop").exists
    execute(state, run_id, list(range(10)))
    messages = []
    while (task := rx.huey.dequeue()) is not None:
        messages.append(task)
    assert {m.args[0] for m in messages} == {run_id}
    assert sorted(i for m in messages for i in m.args[1]) == list(range(at + 1, 10))
    parts = show(rx, run_id)["partitions"]
    assert [(p["status"], len(p["attempts"])) for p in parts] == (
        [("succeeded", 1)] * (at + 1) + [("queued", 0)] * (9 - at))
    (project / "stop").unlink()
    for task in messages:
        rx.huey.execute(task)
    assert show(rx, run_id)["status"] == "succeeded"


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])
def test_stopping_mid_pack_loses_and_doubles_nothing(project, signals):
    """One SIGTERM: the partition in progress finishes, the rest of the chunk is released
    unstarted, the rest of the pack goes back to the queue. Two: the one in progress is
    interrupted too. Either way another worker finishes the run, every partition once."""
    make = work_pipeline(project, stop=300, size=1, pause=0.01, options="batch_size = 1")
    run_id = runex_cli("submit", str(make), cwd=project, check=True).stdout.strip()
    proc = consumer(project)
    succeeded = "SELECT COUNT(*) FROM partitions WHERE status = 'succeeded'"
    wait_for(lambda: ledger(project, succeeded)[0][0] >= 30)
    for _ in range(signals):
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    left = ledger(project, succeeded)[0][0]
    assert left < 300
    rx = Runex()
    if signals == 1:
        assert ledger(project, "SELECT COUNT(*) FROM partitions WHERE status = 'running'") == [
            (0,)]
        assert ledger(project, "SELECT DISTINCT status FROM attempts") == [("succeeded",)]
        state = rx.prepare_workers()
        assert reaper.requeue_vanished(state, older_than=0) == 0  # all are on the queue
    runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)
    data = show(rx, run_id)
    assert data["status"] == "succeeded"
    for p in data["partitions"]:
        statuses = [a["status"] for a in p["attempts"]]
        assert statuses[-1] == "succeeded" and set(statuses[:-1]) <= {"interrupted", "lost"}
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT n) FROM sq").fetchone() == (
            300, 300)
    assert json.loads(runex_cli("show", run_id, "--json", cwd=project).stdout)["records_out"] \
        == 300
