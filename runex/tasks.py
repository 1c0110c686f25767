"""runex's huey queue: the `SqliteHuey` instance and runex's only huey task.

Messages carry ids only (run id, partition index) and are JSON, never pickle: whoever can
write the queue file must not be able to run code as a worker. Extension code never becomes a
huey task; the task looks the pipeline up in the ledger and the kernels up by name.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huey import SqliteHuey
from huey.registry import Message
from huey.serializer import Serializer
from huey.storage import SqliteStorage

from runex import trace

QUEUE_NAME = "runex"
TASK_NAME = "runex.tasks.partition"  # huey's identity for the task: module + name
LOCK_TIMEOUT = 60  # seconds; huey loses post-task work on "database is locked"


class JSONSerializer(Serializer):
    """huey messages as JSON. Datetimes (eta, expiry) are tagged; nothing else is needed."""

    def _serialize(self, data: Any) -> bytes:
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

    def _deserialize(self, data: bytes) -> Any:
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


class QueueStorage(SqliteStorage):
    """huey's SQLite storage with `synchronous=NORMAL` (about 4x the throughput, still safe
    in WAL mode against a process crash) and a data file only its owner can read."""

    def _create_connection(self):  # noqa: ANN202 - huey's signature
        if not os.path.exists(self.filename):
            os.close(os.open(self.filename, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = super()._create_connection()
        conn.execute("pragma synchronous=NORMAL")
        return conn


class Queue(SqliteHuey):
    """huey without revocation, which runex never uses (a run is cancelled in the ledger):
    this saves a read before every task and a write transaction after it. Pinned to huey's
    `is_revoked`/`delete(task.revoke_id)` internals; tests/test_queue.py checks it."""

    def is_revoked(self, task: Any, timestamp: Any = None, peek: bool = True) -> bool:
        return False

    def delete(self, key: str) -> Any:
        if key.startswith("r:"):  # a task's revoke flag: there is none to clear
            return False
        return super().delete(key)


def make_huey(path: str | os.PathLike) -> SqliteHuey:
    """The queue in `path`, with runex's task registered."""
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    huey = Queue(QUEUE_NAME, filename=str(path), results=False, utc=True,
                      serializer=JSONSerializer(), storage_class=QueueStorage,
                      timeout=LOCK_TIMEOUT)
    huey.task(name="partition")(partition)
    return huey


def partition(run_id: str, index: int) -> None:
    """Execute one partition in this worker process."""
    from runex import worker

    worker.execute(run_id, index)


def enqueue(huey: SqliteHuey, run_id: str, indexes: Iterable[int], priority: int = 0,
            delay: float | None = None) -> None:
    """Put one message per partition on the queue, all in one transaction (huey's own
    `enqueue` takes one transaction per message)."""
    task = huey._registry.string_to_task(TASK_NAME)
    if delay:
        eta = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + \
            datetime.timedelta(seconds=delay)
        for index in indexes:
            huey.add_schedule(task((run_id, index), {}, eta=eta, priority=priority))
        return
    rows = [(QUEUE_NAME, huey.serialize_task(task((run_id, index), {}, priority=priority)),
             priority) for index in indexes]
    with huey.storage.db(commit=True) as cursor:
        cursor.executemany("insert into task (queue, data, priority) values (?, ?, ?)", rows)
