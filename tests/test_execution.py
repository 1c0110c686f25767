"""A run end to end in this process: submit, drain the queue, check sink and ledger."""

import json
import sqlite3

import pytest

from runex import Runex, tasks, trace

from .conftest import drain, show, traced, write

pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL

EXT = """
    import time
    from runex import register_kernel

    @register_kernel("fragile")
    def fragile(record, bad=-1):
        if record["n"] == bad:
            raise ValueError(f"cannot take {record['n']}")
        return {**record, "square": record["n"] ** 2}

    @register_kernel("evens")
    def evens(record):
        return record if record["n"] % 2 == 0 else None

    @register_kernel("slow")
    def slow(record, seconds=0.0):
        time.sleep(seconds)
        return record
"""


@pytest.fixture
def rx(project):
    write(project / "extensions" / "k.py", EXT)
    return Runex()


def pipeline(project, steps="", sink='use = "sqlite"\npath = "out/r.db"\ntable = "t"',
             options="", stop=100, size=10):
    return write(project / "pipelines" / "p.toml",
                 f'[source]\nuse = "range"\nstop = {stop}\nsize = {size}\n{steps}\n'
                 f"[sink]\n{sink}\n[options]\n{options}\n")


def rows(project, sql="SELECT n, square FROM t ORDER BY n"):
    with sqlite3.connect(project / "out" / "r.db") as conn:
        return conn.execute(sql).fetchall()


def test_a_run_commits_every_partition_once(rx, project):
    run_id = rx.submit(pipeline(project, '[[steps]]\nuse = "fragile"\n[[steps]]\nuse = "evens"'))
    drain(rx)
    data = show(rx, run_id)
    assert data["status"] == "succeeded"
    assert [p["status"] for p in data["partitions"]] == ["succeeded"] * 10
    assert [(p["records_in"], p["records_out"]) for p in data["partitions"]] == [(10, 5)] * 10
    assert (data["records_in"], data["records_out"]) == (100, 50)
    assert rows(project) == [(n, n * n) for n in range(0, 100, 2)]
    assert rows(project, "SELECT COUNT(*) FROM _runex_commits") == [(10,)]


def test_kernel_error_fails_only_its_partition_after_its_retries(rx, project):
    path = pipeline(project, '[[steps]]\nuse = "fragile"\nbad = 42',
                    options='retries = 2\nretry_delay = "10ms"')
    run_id = rx.submit(path)
    drain(rx)
    data = show(rx, run_id)
    assert data["status"] == "failed"
    assert data["error"] == ('partition 4 ([40, 50]): ValueError: cannot take 42; '
                             '1 of 10 partitions did not succeed: 4 ([40, 50]): failed')
    bad = data["partitions"][4]
    assert bad["status"] == "failed"
    assert [a["status"] for a in bad["attempts"]] == ["failed", "failed", "failed"]
    assert bad["attempts"][-1]["error"] == "ValueError: cannot take 42"
    assert 'raise ValueError(f"cannot take' in bad["attempts"][-1]["traceback"]
    assert "extensions/k.py" in bad["attempts"][-1]["traceback"]
    assert all(p["status"] == "succeeded" for i, p in enumerate(data["partitions"]) if i != 4)
    assert len(rows(project)) == 90  # the other partitions committed; none of 40..49


def test_retry_succeeds_when_the_error_goes_away(rx, project):
    # The kernel fails on the first attempt only: it leaves a flag file behind.
    write(project / "extensions" / "flaky.py", """
        import os
        from runex import register_kernel

        @register_kernel("flaky")
        def flaky(record):
            if not os.path.exists("tried"):
                open("tried", "w").close()
                raise RuntimeError("first try fails")
            return record
    """)
    rx = Runex()
    run_id = rx.submit(pipeline(project, '[[steps]]\nuse = "flaky"', stop=5, size=5,
                                sink='use = "null"', options='retries = 1\nretry_delay = "10ms"'))
    drain(rx)
    data = show(rx, run_id)
    assert data["status"] == "succeeded"
    assert [a["status"] for a in data["partitions"][0]["attempts"]] == ["failed", "succeeded"]


@pytest.mark.slow
def test_timeout_is_enforced_and_recorded(rx, project):
    path = pipeline(project, '[[steps]]\nuse = "slow"\nseconds = 0.2', stop=10, size=10,
                    sink='use = "null"', options='timeout = "300ms"')
    run_id = rx.submit(path)
    drain(rx)
    attempt = show(rx, run_id)["partitions"][0]["attempts"][0]
    assert attempt["status"] == "timeout"
    assert attempt["error"] == "PartitionTimeout: the attempt ran past its timeout of 0.3s"


def test_a_repeated_message_does_not_run_a_partition_twice(rx, project):
    run_id = rx.submit(pipeline(project, '[[steps]]\nuse = "fragile"'))
    tasks.enqueue(rx.huey, run_id, range(10))  # every message twice
    drain(rx)
    while (task := rx.huey.dequeue()) is not None:
        rx.huey.execute(task)
    assert len(rows(project)) == 100
    assert all(len(p["attempts"]) == 1 for p in show(rx, run_id)["partitions"])


def test_queue_messages_are_json_with_ids_only(rx, project):
    run_id = rx.submit(pipeline(project, stop=20, size=10))
    raw = rx.huey.storage.enqueued_items()  # as stored, in the order they are taken
    messages = [json.loads(r)["message"] for r in raw]
    assert [(m["name"], m["args"]) for m in messages] == [
        ("runex.tasks.partition", [run_id, [0]]), ("runex.tasks.partition", [run_id, [1]])]
    assert set(messages[0]) <= {"id", "name", "args", "kwargs", "priority", "retries",
                                "retry_delay", "retry_backoff"}


def test_each_fact_is_kept_once_and_the_trace_puts_them_together(rx, project):
    run_id = rx.submit(pipeline(project, '[[steps]]\nuse = "evens"', stop=20, size=10))
    drain(rx)
    events = list(rx.trace(run_id))
    names = [e["event"] for e in events]
    assert names[0] == "run.submitted" and names[-1] == "run.finished"
    assert names.count("partition.claimed") == 2 and names.count("partition.committed") == 2
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    step = next(e for e in events if e["event"] == "step.finished")
    assert step["kernel"] == "evens" and step["records_in"] == 10 and step["records_out"] == 5
    assert {"run_id", "pipeline", "partition", "attempt", "pid", "host", "seconds"} <= set(
        next(e for e in events if e["event"] == "partition.committed"))
    # every event of a run that went well is a fact of the ledger's rows: none in the files
    assert {e["event"] for e in events} <= trace.ROW_FACTS
    assert [e for e in traced(project) if e.get("run_id") == run_id] == []
    shown = rx.show(run_id).partitions[0].attempts[0]["steps"]
    assert [(s["kernel"], s["records_in"], s["records_out"]) for s in shown] == [
        ("evens", 10, 5)]


def test_priority_orders_the_queue(rx, project):
    low = rx.submit(pipeline(project, stop=10, size=10, sink='use = "null"'))
    high = rx.submit(pipeline(project, stop=10, size=10, sink='use = "null"',
                              options="priority = 5"))
    assert rx.huey.dequeue().args == (high, [0])
    assert rx.huey.dequeue().args == (low, [0])


def test_backoff_doubles_with_jitter_up_to_the_cap():
    from runex.executor import backoff

    for attempt, full in [(1, 1.0), (2, 2.0), (3, 4.0), (8, 10.0)]:
        delays = [backoff(attempt, 1.0, 10.0) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 100  # jittered
