"""runex's huey queue: the `SqliteHuey` instance and runex's only huey task.

Messages carry ids only (a run id and a pack of partition indexes) and are JSON, never
pickle: whoever can write the queue file must not be able to run code as a worker. Extension
code never becomes a huey task; the task looks the pipeline up in the ledger and the kernels up
by name. Many partitions share a message when a run has many (`packs`), so that tiny partitions
do not each pay for a queue write; a worker hands back what it has not started of a pack after
a moment (see `runex.worker`), so packing costs no parallelism.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from runex import huey_private, postgres, trace
from runex.errors import DiskFull, Unreachable
from runex.huey_private import Message, PostgresStorage
from runex.project import cpu_count
from runex.reserve import Reserve, is_disk_full
from runex.storage import (
    FREE_KEEP_PAGES,
    FileWatch,
    create_private,
    give_back,
    truncate_log,
    tune,
)

QUEUE_NAME = "runex"
TASK_NAME = "runex.tasks.partition"  # huey's identity for the task: module + name
LOCK_TIMEOUT = 60  # seconds; huey loses post-task work on "database is locked"


class JSONSerializer(huey_private.SerializerHook):
    """huey messages as JSON. Datetimes (eta, expiry) are tagged; nothing else is needed."""

    def dumps(self, data: Any) -> bytes:
        if isinstance(data, Message):
            data = {"message": {k: v for k, v in data._asdict().items() if v is not None}}
        else:
            data = {"value": data}
        return json.dumps(data, default=_encode, separators=(",", ":")).encode()

    def deserialize(self, data: bytes) -> Any:
        """huey drops a message it cannot read (it was deleted when taken): say so in the
        trace; the reaper queues its partition again."""
        try:
            return super().deserialize(data)
        except Exception as exc:
            trace.logger().error("message.unreadable", error=f"{type(exc).__name__}: {exc}",
                                 bytes=len(data))
            raise

    def loads(self, data: bytes) -> Any:
        decoded = json.loads(bytes(data), object_hook=_decode)
        if "message" in decoded:
            fields = decoded["message"]
            fields["args"] = tuple(fields.get("args", ()))
            return Message(**fields)
        return decoded["value"]


def _encode(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot put {type(value).__name__} in a queue message")


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$dt" in obj:
        return datetime.datetime.fromisoformat(obj["$dt"])
    return obj


class QueueStorage(huey_private.ConnectionHook):
    """huey's SQLite storage with `synchronous=NORMAL` (about 4x the throughput, still safe
    in WAL mode against a process crash) and a data file only its owner can read.

    What runex asks of a queue's storage, beside huey's own: `location` and `home` (this
    host's folder, whose disk its reserve watches), `insert_messages`, `notify` and `watch`,
    `checkpoint` and `settle`, and `writing`."""

    def __init__(self, name: str, filename: str, **options: Any):
        create_private(filename)
        if os.path.getsize(filename) == 0:  # new: before huey sets its journal mode
            with contextlib.closing(sqlite3.connect(filename, isolation_level=None)) as conn:
                tune(conn)
        super().__init__(name, filename, **options)

    @property
    def location(self) -> str:
        return self.filename

    @property
    def home(self) -> str:
        return os.path.dirname(os.path.abspath(self.filename))

    def insert_messages(self, rows: Iterator[tuple[str, bytes, int]]) -> None:
        """(queue, message, priority) rows, in one transaction."""
        huey_private.insert_messages(self, rows)

    def connected(self, conn: Any) -> None:
        tune(conn)  # see runex.storage

    def notify(self) -> None:
        """Touch the queue file, so that idle workers watching it (`watch`) wake after the
        commit: the writes of a transaction wake them too, but may do so a moment before it
        is visible."""
        with contextlib.suppress(OSError):
            os.utime(self.filename)

    def watch(self) -> FileWatch:
        """Something an idle worker waits on until the queue is written."""
        return FileWatch(self.filename)

    def checkpoint(self) -> None:
        with self.writing():
            self.sql("pragma wal_checkpoint(PASSIVE)")

    def settle(self) -> None:
        """When the queue is idle: its free pages back to the file system, and its
        write-ahead log cut back to nothing (if over a MiB and no reader is in the way)."""
        with contextlib.suppress(DiskFull), self.writing():
            give_back(self.conn, 1 << 30, least=FREE_KEEP_PAGES)
            truncate_log(self.conn, self.filename)

    @functools.cached_property
    def reserve(self) -> Reserve:
        return Reserve(self.home)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A full disk refusing a write to the queue becomes `DiskFull`, and releases the
        home's reserve, which stops this machine's consumers taking work until there is room
        (see `runex.reserve`)."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            raise self.reserve.full(f"cannot write the queue {self.filename}") from exc

    def dequeue(self) -> bytes | None:
        """huey's dequeue; on a full disk, nothing (the message stays queued)."""
        with contextlib.suppress(DiskFull), self.writing():
            return super().dequeue()
        return None

    def read_schedule(self, ts: Any) -> list[bytes]:
        """The delayed messages that are due (retries), taken off the schedule; none while
        the disk is full: they stay there until there is room."""
        if self.reserve.ok():
            with contextlib.suppress(DiskFull), self.writing():
                return super().read_schedule(ts)
        return []


class Queue(huey_private.WithoutRevocation):
    """runex's queue: huey's `SqliteHuey`, without revocation (see `huey_private`), waking
    idle workers on each write, with runex's one task, which runs the pack of partitions it
    is given with the executor handed to it (`serve`)."""

    executor: Callable[[str, list[int]], None] | None = None

    def serve(self, executor: Callable[[str, list[int]], None]) -> None:
        """Run partitions with `executor(run_id, indexes)` when this process takes them."""
        self.executor = executor

    def partition(self, run_id: str, indexes: list[int] | int) -> None:
        """Execute a pack of partitions (or one, in messages of runex 0.1)."""
        if self.executor is None:
            raise RuntimeError("this queue has no executor: see Queue.serve")
        self.executor(run_id, [indexes] if isinstance(indexes, int) else indexes)

    def enqueue(self, task: Any) -> Any:
        """huey's enqueue (its scheduler moves due retries with it), waking idle workers."""
        try:
            with self.storage.writing():
                result = super().enqueue(task)
        except DiskFull as exc:  # huey took it off the schedule: the reaper queues it again
            trace.logger().warning("message.not_queued", error=str(exc))
            return None
        self.storage.notify()
        return result


class PostgresQueueStorage(PostgresStorage):
    """huey's PostgreSQL storage (`FOR UPDATE SKIP LOCKED`, LISTEN/NOTIFY) in runex's schema
    (see `runex.postgres`), its tables made once, with what runex asks of a queue's storage
    (see `QueueStorage`). A dequeue does not block: idle workers wait on `watch`, which also
    wakes on their stop."""

    def __init__(self, name: str, url: str, home: str, **options: Any):
        self.database = postgres.Database(url)
        self.home = home
        with contextlib.closing(self.database.connect()) as conn:  # makes the schema
            missing = conn.execute("SELECT to_regclass(%s)",
                                   (f"{postgres.QUEUE_PREFIX}_task",)).fetchone()[0] is None
        super().__init__(name, dsn=self.database.dsn, blocking=False,
                         table_prefix=postgres.QUEUE_PREFIX, create_tables=missing,
                         options=f"-c search_path={self.database.schema}", **postgres.ALIVE)
        self.channel = self.database.queue_channel  # huey's is the same in every schema

    def initialize_schema(self) -> None:
        with contextlib.suppress(postgres.psycopg().errors.UniqueViolation):  # made meanwhile
            super().initialize_schema()

    @property
    def location(self) -> str:
        return self.database.url

    def insert_messages(self, rows: Iterator[tuple[str, bytes, int]]) -> None:
        huey_private.insert_messages_postgres(self, rows)

    def notify(self) -> None:
        with contextlib.suppress(Exception):
            self.sql("SELECT pg_notify(%s, '')", (self.channel,))

    def watch(self) -> postgres.Watch:
        return postgres.Watch(self.database, self.channel)

    def checkpoint(self) -> None:
        pass

    def settle(self) -> None:
        pass

    @functools.cached_property
    def reserve(self) -> Reserve:
        return Reserve(self.home)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A server that cannot be reached becomes `Unreachable` (what a worker keeps to
        write again later, see `lease.Holding`)."""
        try:
            yield
        except postgres.psycopg().OperationalError as exc:
            raise Unreachable(f"cannot write the queue in {self.database} "
                              f"({postgres.first_line(exc)})") from exc


def make_huey(location: str | os.PathLike, home: str | os.PathLike | None = None) -> Queue:
    """The queue in `location` (a SQLite file, or a `postgresql://` URL with `home`, this
    host's folder), with runex's task registered."""
    if postgres.is_url(location):
        storage: dict[str, Any] = {"storage_class": PostgresQueueStorage, "url": location,
                                   "home": str(home or os.getcwd())}
    else:
        storage = {"storage_class": QueueStorage, "filename": str(location),
                   "timeout": LOCK_TIMEOUT}
    huey = Queue(QUEUE_NAME, results=False, utc=True, serializer=JSONSerializer(), **storage)
    huey.task(name="partition")(huey.partition)  # huey's name for it: TASK_NAME
    return huey


MIN_MESSAGES = 64  # a run is split into at least this many messages (16 per CPU) before packing
MAX_PACK = 256


def packs(indexes: Sequence[int], cpus: int | None = None) -> Iterator[list[int]]:
    """Split partition indexes (a list, or a `range`: a million is never held) into messages:
    one each up to 16 per CPU (at least 64), then packs of equal size (up to 256), so that
    there are about that many messages."""
    messages = max(MIN_MESSAGES, 16 * (cpus or cpu_count()))
    size = min(MAX_PACK, max(1, -(-len(indexes) // messages)))
    for i in range(0, len(indexes), size):
        yield list(indexes[i:i + size])


def enqueue(huey: Queue, run_id: str, indexes: Sequence[int], priority: int = 0,
            delay: float | None = None, one_pack: bool = False) -> None:
    """Put the partitions on the queue, packed (`packs`; or all in one message), in one
    transaction (huey's own `enqueue` takes one transaction per message)."""
    task = huey_private.task_class(huey, TASK_NAME)
    messages = [list(indexes)] if one_pack else packs(indexes)
    with huey.storage.writing():
        if delay:
            eta = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + \
                datetime.timedelta(seconds=delay)
            for pack in messages:
                huey.add_schedule(task((run_id, pack), {}, eta=eta, priority=priority))
            return
        huey.storage.insert_messages(
            (QUEUE_NAME, huey.serialize_task(task((run_id, pack), {}, priority=priority)),
             priority) for pack in messages)
    huey.storage.notify()
