"""Where the ledger and the queue live: SQLite's plumbing, and the seam for storage engines.

The ledger writes its SQL once: `?` placeholders, `ON CONFLICT` upserts and `RETURNING`, which
SQLite and PostgreSQL both accept. What differs between engines sits in one engine class each:
how to connect, how a write transaction takes its lock, where the schema version is kept, what
makes a commit durable, which storage errors a user can act on, and how a waiting process
learns that something was written. `SqliteEngine` is that class for a file in the home.

The queue (huey's `SqliteHuey`, see `runex.tasks`) and the `sqlite` sink use the same helpers:
a file only its owner can read, the lock retries, the pragmas.
"""

from __future__ import annotations

import os
import select
import sqlite3
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from runex.durable import fsync_dir, fsync_path, sync_log
from runex.errors import StorageError
from runex.reserve import Reserve, free_bytes

BUSY_TIMEOUT = 60.0  # seconds a writer waits for the lock before SQLite gives up
# A commit that finds this many pages in the write-ahead log copies them into the database
# and syncs it, which takes milliseconds to tens of them. SQLite's default is 1000 (4 MiB);
# consumers checkpoint every `reap_every` instead, so submits and claims seldom pay for it.
AUTOCHECKPOINT_PAGES = 10_000
# A write-ahead log that grew in a burst of work is cut back to this size once checkpointed.
WAL_KEEP_BYTES = 1024 * 1024
# Free pages worth giving back to the file system in the background (fewer are reused soon,
# and writing nothing while idle matters more).
FREE_KEEP_PAGES = 256

T = TypeVar("T")


def create_private(path: str | os.PathLike) -> None:
    """Create the file `path` (and its folder) readable by its owner only, if missing."""
    if not os.path.exists(path):
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def tune(conn: sqlite3.Connection, autocheckpoint: bool = True, ours: bool = True) -> None:
    """Write-ahead logging with `synchronous=NORMAL`: a commit survives a crash of the process
    and costs no fsync; what makes it survive a power cut is an explicit sync (see
    `durable.sync_log`). Switching a new file to WAL fails at once, not after the busy
    timeout, while another process holds it: retried.

    A file of runex's own (`ours`: the ledger, the queue; not a sink's) gives freed pages back
    to the file system when asked (`give_back`), if it is new (this must come before anything
    else sets its journal mode), and its write-ahead log is cut back to `WAL_KEEP_BYTES` after
    each checkpoint that empties it."""
    if ours and conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table only
    retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
    conn.execute("PRAGMA synchronous=NORMAL")
    if ours:
        conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
    if autocheckpoint:
        conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")


def give_back(conn: sqlite3.Connection, pages: int, least: int = 1) -> int:
    """Give up to `pages` free pages of a file that allows it (`tune`) back to the file
    system, if it has at least `least`; returns how many it gave."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # not incremental
        return 0
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    given = min(pages, free) if free >= least else 0
    for _ in range(given):  # Python's sqlite3 runs one step of it: a page each time
        conn.execute("PRAGMA incremental_vacuum(1)")
    return given


def truncate_log(conn: sqlite3.Connection, path: str | os.PathLike) -> bool:
    """Checkpoint the whole write-ahead log of the database file `path` and cut it to nothing,
    if no reader is in the way; returns whether it was cut. It waits for nobody (for when work
    is done), and touches nothing when the log holds `WAL_KEEP_BYTES` or less: a log that
    small is not worth a checkpoint and a sync (a `runex run` of a few partitions)."""
    try:
        if os.path.getsize(f"{path}-wal") <= WAL_KEEP_BYTES:
            return False
    except FileNotFoundError:
        return False
    busy = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        return conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    except sqlite3.OperationalError:
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout = {busy}")


def begin_immediate(conn: sqlite3.Connection, timeout: float = BUSY_TIMEOUT) -> None:
    """Take the write lock, retrying every millisecond or so while another writer holds it.
    SQLite's own busy handler sleeps 1, 2, 5, 10, 15 ms... between tries, so a lock held for
    4 ms costs a waiter 8, and one held for 9 ms costs 18: most of a submit's worst times.
    The connection's busy timeout, for its other statements, is left as it was."""
    previous = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"), timeout, first=0.0005,
                     most=0.005)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {previous}")


def retry_locked(fn: Callable[[], T], timeout: float = BUSY_TIMEOUT, first: float = 0.01,
                 most: float = 0.01) -> T:
    """Retry a statement that SQLite refuses with 'database is locked' without waiting on its
    busy handler (switching a new file to WAL is one)."""
    deadline, delay = time.monotonic() + timeout, first
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(most, delay * 1.5)


def storage_error(path: Path, exc: sqlite3.OperationalError, what: str = "the ledger"
                  ) -> Exception:
    """A clear error for the disk problems a user can fix; others are returned as they are.
    A full disk also releases the home's reserve (`runex.reserve`): room to record
    what was going on, and the sign for every consumer here to take no more work."""
    text = str(exc)
    # SQLite reports a full disk met while creating a write-ahead log as an I/O error.
    if "full" in text or ("disk I/O error" in text and free_bytes(path.parent) < 1 << 20):
        return Reserve(path.parent).full(f"cannot write {what} {path}", ". The change was "
                                         "rolled back whole; nothing stored was changed")
    if "readonly" in text or "read-only" in text:
        why = f"it is read-only: check that you may write to {path.parent}"
    elif "disk I/O error" in text or "unable to open" in text:
        why = f"the disk failed to read or write it: check {path.parent}"
    else:
        return exc
    return StorageError(f"cannot write {what} {path} ({text}); {why}. The change was rolled "
                        "back whole; nothing stored was changed")


class FileWatch:
    """Wakes a waiting process when a SQLite file is written (Linux inotify on its folder,
    which sees the file and its write-ahead log), so waiting for work needs no polling;
    elsewhere, or if inotify is refused, it just sleeps."""

    IN_MODIFY, IN_ATTRIB, IN_CREATE = 0x2, 0x4, 0x100

    def __init__(self, path: str | os.PathLike):
        self.name = os.path.basename(path).encode()
        self.fd = -1
        if sys.platform.startswith("linux"):
            import ctypes  # noqa: PLC0415 - Linux only; loaded once by the consumer anyway

            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            folder = os.path.dirname(os.path.abspath(path)).encode()
            mask = self.IN_MODIFY | self.IN_ATTRIB | self.IN_CREATE
            if fd >= 0 and libc.inotify_add_watch(fd, folder, mask) >= 0:
                self.fd = fd
            elif fd >= 0:
                os.close(fd)

    def wait(self, seconds: float, stop: Callable[[], bool] = lambda: False,
             stop_fd: int | None = None) -> None:
        """Return when the file was written, `stop()` is true, or after `seconds`. Given the
        file descriptor that signals a stop (`stop_fd`), it wakes on that at once; without, it
        looks at `stop()` every 0.1 s."""
        deadline = time.monotonic() + seconds
        if self.fd < 0:
            while not stop() and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.1))
            return
        fds, tick = ([self.fd], 0.1) if stop_fd is None else ([self.fd, stop_fd], seconds)
        while not stop():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select(fds, [], [], min(left, tick))
            if self.fd in ready and self._written():
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _written(self) -> bool:
        written, data, offset = False, os.read(self.fd, 65536), 0
        while offset < len(data):
            _, _, _, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16:offset + 16 + length].rstrip(b"\0")
            written = written or name.startswith(self.name)  # x.db, x.db-wal
            offset += 16 + length
        return written


class SqliteEngine:
    """The ledger in a SQLite file: one connection per process, write transactions that take
    the lock first (`BEGIN IMMEDIATE`), the schema version in `PRAGMA user_version`, commits
    made durable by syncing the write-ahead log, and waiters woken by inotify."""

    name = "sqlite"
    clustered = " WITHOUT ROWID"  # a table stored in its primary key's order

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._logs: dict[str, tuple[int, int]] = {}  # see `durable.sync_log`

    def __str__(self) -> str:
        return str(self.path)

    @property
    def home(self) -> Path:
        """The folder whose disk the engine writes (for the reserve, see `runex.reserve`)."""
        return self.path.parent

    def connect(self, again: bool = False) -> sqlite3.Connection:
        try:
            create_private(self.path)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            tune(conn)
        except sqlite3.OperationalError as exc:
            raise self.error(exc) from exc
        return conn

    def begin(self, conn: sqlite3.Connection) -> None:
        begin_immediate(conn)

    @staticmethod
    def broken(conn: sqlite3.Connection) -> bool:
        return False  # a file does not go away

    def ddl(self, sql: str) -> str:
        """A statement of the ledger's schema as this engine takes it."""
        return sql.replace("{clustered}", self.clustered)

    @staticmethod
    def schema_version(conn: sqlite3.Connection) -> int:
        return conn.execute("PRAGMA user_version").fetchone()[0]

    @staticmethod
    def set_schema_version(conn: sqlite3.Connection, version: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(version)}")

    @staticmethod
    def checkpoint(conn: sqlite3.Connection) -> None:
        """Copy what the write-ahead log holds into the database, without waiting for
        anyone."""
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def keep_log_short(self, conn: sqlite3.Connection) -> None:
        """For a process writing much in the background (a prune): checkpoint the write-ahead
        log itself once it holds a few MiB, outside any transaction, so that the commit of a
        submit or a claim never meets SQLite's own checkpoint (see AUTOCHECKPOINT_PAGES)."""
        try:
            if os.path.getsize(f"{self.path}-wal") > WAL_KEEP_BYTES * 4:
                self.checkpoint(conn)
        except FileNotFoundError:
            pass

    def truncate_log(self, conn: sqlite3.Connection) -> bool:
        """See `truncate_log`."""
        return truncate_log(conn, self.path)

    @staticmethod
    def free_pages(conn: sqlite3.Connection) -> int:
        """Pages of the file that hold nothing (what `reclaim` gives back)."""
        return conn.execute("PRAGMA freelist_count").fetchone()[0]

    def reclaim(self, conn: sqlite3.Connection, pages: int) -> int:
        """In a write transaction: give up to `pages` free pages back to the file system
        (the file shrinks); returns how many it gave."""
        return give_back(conn, pages)

    @staticmethod
    def can_reclaim(conn: sqlite3.Connection) -> bool:
        return conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental

    def allow_reclaim(self, conn: sqlite3.Connection) -> bool:
        """Make a ledger written before runex gave space back able to (`reclaim`): it is
        rewritten whole, once, outside any transaction, while every writer waits; so only
        when idle, and when the disk has room for a copy. Returns whether it is done."""
        size = sum(os.path.getsize(f) for f in (self.path, f"{self.path}-wal")
                   if os.path.exists(f))
        if free_bytes(self.home) < 2 * size + (8 << 20):
            return False
        try:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("VACUUM")
        except sqlite3.OperationalError:  # a full disk, or busy: another time
            return False
        return self.can_reclaim(conn)

    def sync(self) -> None:
        """Make every transaction committed so far survive a power cut (a connection of this
        process must be open, see `durable.sync_log`)."""
        try:
            sync_log(self.path, self._logs)
        except OSError as exc:
            raise StorageError(f"cannot sync the ledger {self.path} to disk ({exc}); check "
                               f"{self.path.parent}") from exc

    @staticmethod
    def backup(conn: sqlite3.Connection, path: str | os.PathLike) -> None:
        """SQLite's online backup of the ledger into the file `path` (written beside it,
        synced, then renamed: a power cut leaves the old file or the whole copy). Errors
        writing the copy are `OSError`s naming it."""
        target = Path(path)
        temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        temp.unlink(missing_ok=True)
        try:
            copy = sqlite3.connect(temp)
            try:
                # In one step: a copy in steps starts again whenever a worker commits
                # meanwhile, and may never end. A reader holds no writer up in WAL mode.
                conn.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")  # one file, readable anywhere
            finally:
                copy.close()
        except sqlite3.Error as exc:
            temp.unlink(missing_ok=True)
            raise OSError(str(exc)) from exc
        fsync_path(temp)
        os.replace(temp, target)
        fsync_dir(target.parent)

    def error(self, exc: Exception) -> Exception:
        """What to raise for a storage error `exc` of this engine."""
        if isinstance(exc, sqlite3.OperationalError):
            return storage_error(self.path, exc)
        return exc

    def watch(self) -> FileWatch:
        """Something to wait on until the ledger is written."""
        return FileWatch(self.path)

    @staticmethod
    def server(conn: sqlite3.Connection) -> tuple[str, float]:
        """What keeps the ledger, and its clock: this machine's."""
        return f"SQLite {sqlite3.sqlite_version}", time.time()


def engine_for(target: str | os.PathLike | Any, home: str | os.PathLike | None = None) -> Any:
    """The engine of a ledger given as an engine, as a `postgresql://` URL (with `home`, this
    host's folder for traces), or as the path of a SQLite file."""
    from runex import postgres  # noqa: PLC0415 - a module most homes never use

    if isinstance(target, SqliteEngine | postgres.PostgresEngine):
        return target
    if postgres.is_url(target):
        return postgres.PostgresEngine(target, home)
    return SqliteEngine(target)
