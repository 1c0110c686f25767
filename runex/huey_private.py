"""Every use runex makes of huey's private API, in one place.

huey's public API covers tasks, storage and the consumer as most programs use them. runex
goes further in a few places, each for a measured reason given beside it. Each use here has a
test in `tests/test_huey_private.py` that fails if huey changes it, so that an upgrade of
huey breaks a test rather than silently slowing or weakening runex.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Any

from runex import _standing_in

# huey imports hashlib and hmac, and so OpenSSL's library (3.7 MiB in every runex process),
# for signed messages, which runex does not use: stand-ins take their place in huey's
# modules, which import them only if used. runex's modules import huey after this one.
with _standing_in("hashlib", "hmac"):
    from huey import SqliteHuey, crontab
    from huey.consumer import Consumer, ConsumerStopped, Scheduler, Worker
    from huey.registry import Message
    from huey.serializer import Serializer
    from huey.storage import PostgresStorage, SqliteStorage

# huey's public names that runex's other modules use, imported here first (see above).
__all__ = ["ConsumerStopped", "Message", "PostgresStorage", "Scheduler", "Worker", "crontab"]


def task_class(huey: Any, name: str) -> Any:
    """The task class registered under `name` (module.function), to make messages of it
    without the task's wrapper (which would take one queue transaction per message)."""
    return huey._registry.string_to_task(name)


def insert_messages(storage: SqliteStorage, rows: Iterable[tuple[str, bytes, int]]) -> None:
    """Add (queue name, serialized message, priority) rows to huey's SQLite `task` table in
    one transaction: huey's own `enqueue` commits once per message."""
    with storage.db(commit=True) as cursor:
        cursor.executemany("insert into task (queue, data, priority) values (?, ?, ?)", rows)


def insert_messages_postgres(storage: PostgresStorage,
                             rows: Iterable[tuple[str, bytes, int]]) -> None:
    """The same in huey's PostgreSQL `task` table, with the notification its own `enqueue`
    sends (idle workers listen for it)."""
    with storage.db(commit=True) as cursor:
        cursor.executemany(f"insert into {storage.table_task} (queue, data, priority) "
                           "values (%s, %s, %s)", rows)
        cursor.execute("select pg_notify(%s, '')", (storage.channel,))


def forget_connection(storage: SqliteStorage | PostgresStorage) -> None:
    """In a forked process: drop the database connection inherited from the parent (never
    use it there), so that the storage opens its own."""
    storage._conn = None


def now(huey: Any) -> Any:
    """huey's notion of the current time (naive UTC with `utc=True`), as its consumer passes
    it to `read_schedule`."""
    return huey._get_timestamp()


def stop_fd(stop_flag: Any) -> int | None:
    """The file descriptor that a process worker's stop flag (a pipe) becomes readable on
    when the consumer stops, so an idle worker can wait on it and the queue file at once;
    None for a flag that has none (thread workers)."""
    return getattr(stop_flag, "_r", None)


def drain_on_sigterm(consumer: Consumer) -> None:
    """SIGTERM drains like SIGINT (no new work, running tasks finish within the grace
    period), where huey stops at once: systemd stops a service with SIGTERM."""
    consumer._signal_actions[signal.SIGTERM] = (False, True)


def stop_signal(consumer: Consumer) -> int | None:
    """The signal that made the consumer stop, if one did (huey records it for its loop)."""
    return consumer._signum


def check_stop_every(consumer: Consumer, seconds: float) -> None:
    """Make the consumer's main loop look at its stop flag at least every `seconds` (0.1 s in
    huey): a short-lived consumer (`runex run`) notices its end sooner."""
    consumer._stop_flag_timeout = min(consumer._stop_flag_timeout, seconds)


class WithoutRevocation(SqliteHuey):
    """huey without revocation, which runex never uses (a run is cancelled in the ledger):
    huey reads a task's revoke flag before running it and deletes it after, a read and a
    write transaction per task that this saves."""

    def is_revoked(self, task: Any, timestamp: Any = None, peek: bool = True) -> bool:
        return False

    def delete(self, key: str) -> Any:
        if key.startswith("r:"):  # a task's revoke flag (`task.revoke_id`): there is none
            return False
        return super().delete(key)


class ConnectionHook(SqliteStorage):
    """huey's SQLite storage calling `connected(conn)` on each connection it opens (the
    pragmas and file mode runex wants, see `runex.tasks.QueueStorage`)."""

    def _create_connection(self):  # noqa: ANN202 - huey's signature
        conn = super()._create_connection()
        self.connected(conn)
        return conn

    def connected(self, conn: Any) -> None:
        """Called with each new connection."""


class ProcessHook(Consumer):
    """huey's consumer calling `worker_made(worker, name)` for each worker it starts or
    restarts, with huey's name for it (`Worker-1`, `Worker-2`...: a restarted worker gets
    the name of the one it replaces)."""

    def _create_process(self, process: Worker, name: str) -> Any:
        self.worker_made(process, name)
        return super()._create_process(process, name)

    def worker_made(self, process: Worker, name: str) -> None:
        """Called before each worker process starts."""


class SerializerHook(Serializer):
    """huey's serializer with `dumps`/`loads` in place of pickle; huey compresses around
    them when asked (runex does not)."""

    def _serialize(self, data: Any) -> bytes:
        return self.dumps(data)

    def _deserialize(self, data: bytes) -> Any:
        return self.loads(data)

    def dumps(self, data: Any) -> bytes:
        raise NotImplementedError

    def loads(self, data: bytes) -> Any:
        raise NotImplementedError
