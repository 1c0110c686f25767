"""The queue and the ledger in PostgreSQL, for workers on several hosts (`runex[postgres]`).

`database = "postgresql://user@host:5432/db"` (or `RUNEX_DATABASE`, or `--database`) puts them
in that database, in a schema of their own (`runex`; `?schema=NAME` in the URL for another).
The ledger is the same `Ledger` as on SQLite, through `PostgresEngine`; the queue is huey's
own PostgreSQL storage (`FOR UPDATE SKIP LOCKED`, LISTEN/NOTIFY), with runex's hooks.

What SQLite gives the ledger for nothing, the engine gives here:
- One writer at a time. SQLite's `BEGIN IMMEDIATE` serializes writes, and the ledger's
  transactions read, then write what they read (a claim, an outcome fenced by its attempt).
  Each write transaction here first takes one transaction-scoped advisory lock, so the same
  holds; readers take no lock.
- Durability. A commit returns once the server has synced it (PostgreSQL's default); `sync`
  has nothing left to do.
- Waking waiters. Every write transaction sends a notification, delivered at its commit;
  `watch` listens for it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from runex.errors import ConfigError, StorageError, Unreachable

SCHEMA = "runex"  # where runex's tables go, unless the URL says `?schema=NAME`
QUEUE_PREFIX = "queue"  # huey's tables: queue_task, queue_schedule, queue_kv, queue_counter
CONNECT_TIMEOUT = 10  # seconds to reach the server before a try counts as failed
# libpq's settings that tell a dead network from a slow one within about half a minute (its
# default is the kernel's: minutes to hours), for every connection runex makes.
ALIVE = {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 10,
         "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30_000}
# Seconds a statement waits for a server that went away to come back (a restart takes a few);
# beyond, it fails, and the loop around it tries again later (a worker's, a consumer's job).
RECONNECT_FOR = 10.0


def is_url(target: Any) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def psycopg() -> Any:
    """psycopg 3, or a clear error saying how to install it."""
    try:
        import psycopg as module  # noqa: PLC0415 - only for users of PostgreSQL
    except ImportError:
        raise ConfigError("a postgresql:// database needs psycopg: pip install "
                          "'runex[postgres]'") from None
    return module


class Database:
    """A `postgresql://` URL as runex reads it: the server and database to connect to, and
    the schema (`?schema=NAME`, runex's own parameter; `runex` by default)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((v for k, v in query if k == "schema"), SCHEMA)
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,49}", schema):
            raise ConfigError(f"database {self.shown(url)!r}: schema {schema!r} must be a "
                              "lower-case name (letters, digits, _) of at most 50")
        self.url = url
        self.schema = schema
        self.dsn = urlunsplit(parts._replace(
            query=urlencode([(k, v) for k, v in query if k != "schema"])))
        # Each schema's own: the advisory lock that serializes its ledger's writers, and the
        # channels its ledger's and its queue's writes notify.
        import hashlib  # noqa: PLC0415 - OpenSSL's library: only where there is a database

        self.write_lock = int.from_bytes(hashlib.sha256(f"runex {schema}".encode()).digest()[:8],
                                         "big") >> 1
        self.ledger_channel, self.queue_channel = f"{schema}_ledger", f"{schema}_queue"

    def __str__(self) -> str:
        return self.shown(self.url)

    @staticmethod
    def shown(url: str) -> str:
        """The URL without its password, to print."""
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))

    def connect(self) -> Any:
        """A connection (autocommit: transactions are begun by the caller) whose tables are
        this database's schema's, made if missing. A server that cannot be reached (or that
        refuses the user) is `Unreachable`, saying which and why."""
        pg = psycopg()
        try:
            conn = pg.connect(self.dsn, autocommit=True, options=f"-c search_path={self.schema}",
                              **ALIVE)
            conn.adapters.register_loader("numeric", numeric_loader())  # SUM(bigint)
            if conn.execute("SELECT to_regnamespace(%s)", (self.schema,)).fetchone()[0] is None:
                with contextlib.suppress(pg.errors.UniqueViolation):  # made meanwhile
                    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        except pg.OperationalError as exc:  # no connection: whatever it says, unreached
            raise Unreachable(f"cannot reach the database {self} ({first_line(exc)}); check "
                              "that the server runs and the URL is right") from exc
        return conn


def lost(exc: BaseException) -> bool:
    """Whether a psycopg error says the server cannot be reached: no connection made, or the
    one there was broke (SQLSTATE class 08, or the server shutting down). A statement's own
    errors (a deadlock, a timeout, a full disk on the server) are not."""
    if not isinstance(exc, psycopg().OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@functools.cache
def numeric_loader() -> Any:
    from psycopg.types.numeric import NumericLoader  # noqa: PLC0415 - see `psycopg`

    class Integral(NumericLoader):
        """`numeric` as an int when it is whole (a sum of counts), else a float: the ledger
        stores no decimals, and its callers expect what SQLite gives."""

        def load(self, data: Any) -> Any:
            value = super().load(data)
            return int(value) if value == value.to_integral_value() else float(value)

    return Integral


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """The ledger's SQL (`?` placeholders) in psycopg's (`%s`; a literal % doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class Connection:
    """A psycopg connection that speaks the ledger's SQL as sqlite3's connection does:
    `execute` and `executemany` with `?` placeholders, and `in_transaction`."""

    def __init__(self, conn: Any):
        self.raw = conn

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        params = tuple(params)
        with self.reaching():
            return (self.raw.execute(translate(sql), params) if params
                    else self.raw.execute(sql))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> Any:
        with self.reaching():
            cur = self.raw.cursor()
            cur.executemany(translate(sql), rows)
        return cur

    @contextlib.contextmanager
    def reaching(self) -> Iterator[None]:
        """A connection that broke (the server restarted, the network dropped) as
        `Unreachable`, whatever the statement: the ledger connects again on next use."""
        try:
            yield
        except psycopg().OperationalError as exc:
            if not (lost(exc) or self.raw.broken):
                raise  # a statement's own error (a deadlock, say)
            raise Unreachable(f"lost the database ({first_line(exc)})") from exc

    @property
    def in_transaction(self) -> bool:
        status = psycopg().pq.TransactionStatus
        return self.raw.info.transaction_status in (status.ACTIVE, status.INTRANS,
                                                    status.INERROR)

    def close(self) -> None:
        self.raw.close()


def ddl(sql: str) -> str:
    """A statement of the ledger's schema (written for SQLite) for PostgreSQL: whole numbers
    of 64 bits (counts of records), times in double precision (REAL is 4 bytes here)."""
    sql = sql.replace("{clustered}", "")
    return re.sub(r"\bINTEGER\b", "BIGINT", re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql))


class PostgresEngine:
    """The ledger in a PostgreSQL schema: one connection per process, write transactions
    serialized by an advisory lock (see the module's docstring), the schema version in a
    table, commits durable when they return, waiters woken by LISTEN/NOTIFY."""

    name = "postgresql"

    def __init__(self, url: str, home: str | os.PathLike | None = None):
        self.database = Database(url)
        self.path = self.database  # what messages name
        self._home = Path(home) if home is not None else None

    def __str__(self) -> str:
        return str(self.database)

    @property
    def home(self) -> Path:
        """This host's folder for runex's files (traces, the reserve)."""
        return self._home if self._home is not None else Path.cwd()

    def connect(self, again: bool = False) -> Connection:
        """A new connection; `again` (the last one broke: the server restarted, the network
        dropped), tried with a growing pause for up to RECONNECT_FOR seconds."""
        return Connection(reconnecting(self.database.connect, RECONNECT_FOR if again else 0))

    @staticmethod
    def broken(conn: Connection) -> bool:
        return conn.raw.closed or conn.raw.broken

    def ddl(self, sql: str) -> str:
        return ddl(sql)

    def begin(self, conn: Connection) -> None:
        """The transaction, its lock, and the notification its commit sends: one round
        trip."""
        conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({self.database.write_lock}), "
                     f"pg_notify('{self.database.ledger_channel}', '')")

    @staticmethod
    def schema_version(conn: Connection) -> int:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return row[0] if row else 0

    @staticmethod
    def set_schema_version(conn: Connection, version: int) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (int(version),))

    # What SQLite's files need and a server does for itself: nothing to do here.
    def checkpoint(self, conn: Connection) -> None:
        pass

    def keep_log_short(self, conn: Connection) -> None:
        pass

    def truncate_log(self, conn: Connection) -> bool:
        return False

    @staticmethod
    def free_pages(conn: Connection) -> int:
        return 0  # autovacuum reuses the space of deleted rows

    def reclaim(self, conn: Connection, pages: int) -> int:
        return 0

    @staticmethod
    def can_reclaim(conn: Connection) -> bool:
        return True

    def allow_reclaim(self, conn: Connection) -> bool:
        return True

    def sync(self) -> None:
        pass  # a commit is on the server's disk when it returns (synchronous_commit)

    def backup(self, conn: Connection, path: str | os.PathLike) -> None:
        raise StorageError(f"the ledger is in {self}: back it up with pg_dump "
                           f"--schema={self.database.schema}")

    def error(self, exc: Exception) -> Exception:
        if lost(exc):
            return Unreachable(f"lost the database {self} ({first_line(exc)}); the change "
                               "was rolled back whole")
        return exc

    def watch(self) -> Watch:
        return Watch(self.database, self.database.ledger_channel)

    @staticmethod
    def server(conn: Connection) -> tuple[str, float]:
        """The server's version and clock (Unix seconds)."""
        version, now = conn.execute("SELECT current_setting('server_version'), "
                                    "EXTRACT(EPOCH FROM clock_timestamp())").fetchone()
        return f"PostgreSQL {version}", float(now)


def reconnecting(connect: Callable[[], Any], patience: float) -> Any:
    """`connect()`, tried again with a growing pause (up to 5 s) while the server cannot be
    reached (restarting, say), for up to `patience` seconds."""
    deadline, pause = time.monotonic() + patience, 0.1
    while True:
        try:
            return connect()
        except Unreachable:
            if time.monotonic() + pause > deadline:
                raise
            from runex import trace  # noqa: PLC0415 - structlog; `runex.project` imports this

            trace.logger().warning("database.unreachable", retry_in=round(pause, 1))
            time.sleep(pause)
            pause = min(5.0, pause * 2)


class Watch:
    """Wakes a waiting process when a channel is notified (a ledger or queue write commits):
    its own connection, listening."""

    def __init__(self, database: Database, channel: str):
        self.database, self.channel = database, channel
        self.conn: Any = None

    def _listening(self) -> Any:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = self.database.connect()
            self.conn.execute(f'LISTEN "{self.channel}"')
        return self.conn

    def wait(self, seconds: float, stop: Callable[[], bool] = lambda: False,
             stop_fd: int | None = None) -> None:
        """Return when the channel was notified, `stop()` is true, or after `seconds` (a
        stop is seen within 0.1 s; `stop_fd`, which `FileWatch` waits on, is not needed)."""
        deadline = time.monotonic() + seconds
        while not stop() and (left := deadline - time.monotonic()) > 0:
            try:
                if any(True for _ in self._listening().notifies(timeout=min(left, 0.1),
                                                                 stop_after=1)):
                    self._drain()
                    return
            except (Unreachable, psycopg().OperationalError):
                self.close()  # the server went away: wait, then listen again
                time.sleep(min(left, 0.5))

    def _drain(self) -> None:
        """Take the notifications that came with the first (one write wakes once)."""
        with contextlib.suppress(Exception):
            for _ in self.conn.notifies(timeout=0):
                pass

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


def drop_schema(url: str) -> None:
    """Delete runex's schema with everything in it (tests, `runex migrate` gone wrong)."""
    database = Database(url)
    with contextlib.closing(database.connect()) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {database.schema} CASCADE")
