"""The huey internals runex relies on (huey is pinned; these fail if an upgrade moves them)."""

import sqlite3

from runex import tasks


class Spy:
    def __init__(self, conn):
        self.statements = []
        conn.set_trace_callback(self.statements.append)


def test_a_task_costs_one_queue_write_and_no_revoke_lookups(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr("runex.worker.execute",
                        lambda run_id, indexes: ran.append((run_id, indexes)))
    huey = tasks.make_huey(tmp_path / "queue.db")
    tasks.enqueue(huey, "r1", [0, 1])
    spy = Spy(huey.storage.conn)
    while (task := huey.dequeue()) is not None:
        huey.execute(task)
    assert ran == [("r1", [0]), ("r1", [1])]
    writes = [s for s in spy.statements if s.lower().startswith(("insert", "delete", "update"))]
    assert [w.split()[0:3] for w in writes] == [["delete", "from", "task"]] * 2
    assert not any(" kv " in s for s in spy.statements)


def test_queue_tables_are_where_runex_writes_them(tmp_path):
    huey = tasks.make_huey(tmp_path / "queue.db")
    tasks.enqueue(huey, "r1", [0])
    with sqlite3.connect(tmp_path / "queue.db") as conn:
        assert conn.execute("SELECT queue, priority FROM task").fetchall() == [("runex", 0)]
    assert huey.pending_count() == 1


def test_every_huey_internal_runex_uses_is_where_runex_expects_it(tmp_path):
    """huey's private names runex touches (runex.tasks, runex.consumer, runex.worker, runex.app):
    each is checked here, so that an upgrade that moves one fails this test instead of, say,
    leaving idle workers to poll."""
    import datetime
    import inspect
    import signal

    from huey.consumer import Consumer

    from runex import consumer

    huey = tasks.make_huey(tmp_path / "queue.db")
    assert huey._registry.string_to_task(tasks.TASK_NAME) is not None  # tasks.enqueue
    assert isinstance(huey._get_timestamp(), datetime.datetime)  # app._work_here: retries
    first = huey.storage.conn
    huey.storage._conn = None  # dropped after a fork (worker.after_fork) ...
    assert huey.storage.conn is not first  # ... and made again on next use
    runner = consumer.RunexConsumer(huey, workers=2, worker_type="process")
    assert runner._signal_actions[signal.SIGTERM] == (False, True)  # SIGTERM drains
    assert isinstance(runner._stop_flag_timeout, float)
    assert hasattr(runner.stop_flag, "_r")  # the pipe idle workers wait on (QueueWatch)
    assert [w.slot for w, _ in runner.worker_threads] == [0, 1]  # _create_process names
    assert list(inspect.signature(Consumer._create_process).parameters) == [
        "self", "process", "name"]
