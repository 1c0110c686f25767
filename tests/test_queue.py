"""runex's queue over huey: what a message costs and where it is written."""

import sqlite3

from runex import tasks


class Spy:
    def __init__(self, conn):
        self.statements = []
        conn.set_trace_callback(self.statements.append)


def test_a_task_costs_one_queue_write_and_no_revoke_lookups(tmp_path):
    ran = []
    huey = tasks.make_huey(tmp_path / "queue.db")
    huey.serve(lambda run_id, indexes: ran.append((run_id, indexes)))
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
