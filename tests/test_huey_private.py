"""Each use runex makes of huey's private API (`runex.huey_private`), pinned: an upgrade of
huey that moves one fails here, rather than leaving, say, idle workers to poll."""

import datetime
import os
import signal
import sqlite3
import time

from huey.consumer import Consumer

from runex import huey_private, tasks
from runex.consumer import RunexConsumer


def test_task_class_finds_runex_task_by_its_name(tmp_path):
    huey = tasks.make_huey(tmp_path / "queue.db")
    task = huey_private.task_class(huey, tasks.TASK_NAME)
    message = task(("r1", [0]), {}, priority=3)
    assert (message.args, message.priority) == (("r1", [0]), 3)


def test_insert_messages_writes_huey_task_table_and_huey_reads_them(tmp_path):
    huey = tasks.make_huey(tmp_path / "queue.db")
    task = huey_private.task_class(huey, tasks.TASK_NAME)
    huey_private.insert_messages(huey.storage, [
        (tasks.QUEUE_NAME, huey.serialize_task(task(("r1", [i]), {}, priority=i)), i)
        for i in (0, 5)])
    assert [huey.dequeue().args for _ in range(2)] == [("r1", [5]), ("r1", [0])]  # priority
    assert huey.dequeue() is None


def test_insert_messages_postgres_writes_huey_table_and_wakes_listeners(tmp_path, request):
    from .conftest import postgres_server

    url = postgres_server(request) + f"?schema=t_{os.urandom(6).hex()}"
    try:
        huey = tasks.make_huey(url, tmp_path)
        watch = huey.storage.watch()
        watch.wait(0.01)  # listening from now on
        task = huey_private.task_class(huey, tasks.TASK_NAME)
        huey_private.insert_messages_postgres(huey.storage, [
            (tasks.QUEUE_NAME, huey.serialize_task(task(("r1", [i]), {}, priority=i)), i)
            for i in (0, 5)])
        woke = time.monotonic()
        watch.wait(5)
        assert time.monotonic() - woke < 1  # notified, not timed out
        assert [huey.dequeue().args for _ in range(2)] == [("r1", [5]), ("r1", [0])]
        assert huey.dequeue() is None
        watch.close()
    finally:
        from runex import postgres

        postgres.drop_schema(url)


def test_forget_connection_makes_the_storage_open_a_new_one(tmp_path):
    huey = tasks.make_huey(tmp_path / "queue.db")
    first = huey.storage.conn
    huey_private.forget_connection(huey.storage)
    assert huey.storage.conn is not first
    first.close()


def test_now_is_huey_clock_in_naive_utc(tmp_path):
    huey = tasks.make_huey(tmp_path / "queue.db")
    now = huey_private.now(huey)
    assert isinstance(now, datetime.datetime) and now.tzinfo is None
    utc = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs((now - utc).total_seconds()) < 5


def test_the_stop_flag_of_process_workers_is_a_pipe_that_becomes_readable(tmp_path):
    runner = Consumer(tasks.make_huey(tmp_path / "queue.db"), workers=1, worker_type="process")
    fd = huey_private.stop_fd(runner.stop_flag)
    assert isinstance(fd, int)
    import select

    assert select.select([fd], [], [], 0)[0] == []
    runner.stop_flag.set()
    assert select.select([fd], [], [], 1)[0] == [fd]


def test_sigterm_drains_and_the_stop_flag_is_checked_as_often_as_asked(tmp_path):
    runner = Consumer(tasks.make_huey(tmp_path / "queue.db"), workers=1, worker_type="process")
    assert runner._signal_actions[signal.SIGINT] == (False, True)  # huey: Ctrl-C drains
    assert huey_private.stop_signal(runner) is None
    huey_private.drain_on_sigterm(runner)
    runner._set_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert huey_private.stop_signal(runner) == signal.SIGTERM
        assert runner._graceful and not runner._restart  # drain, then exit
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    huey_private.check_stop_every(runner, 0.02)
    assert runner._stop_flag_timeout == 0.02


def test_the_storage_hook_sees_every_connection_with_runex_pragmas(tmp_path):
    huey = tasks.make_huey(tmp_path / "queue.db")
    conn = huey.storage.conn
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert os.stat(tmp_path / "queue.db").st_mode & 0o777 == 0o600


def test_the_process_hook_names_each_worker_it_makes(tmp_path):
    from runex.ledger import Ledger
    from runex.registry import Registry
    from runex.worker import WorkerState

    huey = tasks.make_huey(tmp_path / "queue.db")
    state = WorkerState(Registry(), Ledger(tmp_path / "ledger.db"), huey, tmp_path)
    runner = RunexConsumer(huey, workers=2, worker_type="process", state=state)
    assert [w.slot for w, _ in runner.worker_threads] == [0, 1]  # Worker-1, Worker-2
    assert all(w.slots is runner.slots and w.state is state for w, _ in runner.worker_threads)
    assert len(runner.slots) == 3 * 2
    assert all(w.consumer_pid == os.getpid() for w, _ in runner.worker_threads)


def test_the_serializer_hook_carries_messages_as_json(tmp_path):
    huey = tasks.make_huey(tmp_path / "queue.db")
    tasks.enqueue(huey, "r1", [0, 1], delay=60)  # a scheduled message has an eta
    tasks.enqueue(huey, "r1", [2])
    with sqlite3.connect(tmp_path / "queue.db") as conn:
        raw = conn.execute("SELECT data FROM task").fetchone()[0]
        scheduled = conn.execute("SELECT data FROM schedule").fetchone()[0]
    assert raw.startswith(b'{"message":') and b'"$dt"' in scheduled
    assert huey.dequeue().args == ("r1", [2])


def test_revocation_is_never_looked_up(tmp_path):
    """huey reads a task's revoke flag (`is_revoked`) before running it and deletes it
    (`delete(task.revoke_id)`) after: runex's queue does neither."""
    huey = tasks.make_huey(tmp_path / "queue.db")
    huey.serve(lambda run_id, indexes: None)
    tasks.enqueue(huey, "r1", [0])
    task = huey.dequeue()
    assert task.revoke_id.startswith("r:")
    assert huey.is_revoked(task) is False
    statements = []
    huey.storage.conn.set_trace_callback(statements.append)
    huey.execute(task)
    assert not any(" kv " in s for s in statements)


def test_psycopg_is_loaded_only_when_used_though_huey_imports_it():
    """huey's storage imports psycopg when it is installed; runex puts a stand-in in its
    place (`runex._psycopg_on_first_use`), so that a SQLite home does not load it."""
    import subprocess
    import sys

    code = ("import sys, runex.app, huey.storage\n"
            "print('psycopg.pq' in sys.modules)\n"
            "print(huey.storage.psycopg.Connection.__name__, 'psycopg.pq' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["False", "Connection True"]


def test_what_runex_never_calls_is_loaded_only_when_used():
    """structlog imports asyncio, http.server imports ssl, huey imports hashlib and hmac:
    each loads a C library of megabytes that runex's commands and dashboard never call on.
    Stand-ins take their place in those modules (`runex._standing_in`): not loaded until
    used; once used, the real modules; anything imported later gets the real ones."""
    import subprocess
    import sys

    code = ("import sys, runex.cli, runex.app, runex.web\n"
            "print(sorted(m for m in ('asyncio', 'ssl', 'hashlib', '_hashlib', 'hmac')\n"
            "             if m in sys.modules))\n"
            "import huey.serializer, structlog.stdlib, http.client\n"
            "print(huey.serializer.hashlib.sha1(b'x').hexdigest()[:6],\n"
            "      structlog.stdlib.asyncio.iscoroutinefunction(print),\n"
            "      http.client.ssl.PROTOCOL_TLS_CLIENT is not None)\n"
            "import asyncio, hashlib\n"
            "print(asyncio.run.__module__, hashlib.sha256.__name__, '_hashlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:3] == ["[]", "11f6ad False True", "asyncio.runners openssl_sha256 True"]
