"""The ledger: the database of record for runs, partitions, attempts, schedules and fires.

All of runex's SQL lives here, written once for every engine (`runex.storage`: SQLite in the
home). The schema is versioned, and migrated when a ledger of an earlier version is opened.
Every write is one short transaction that takes the write lock first; each process keeps one
connection (re-opened after a fork).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from runex import trace
from runex.errors import NotFound, RunexError, Unreachable
from runex.registry import key_text
from runex.storage import engine_for

TERMINAL_RUN = ("succeeded", "failed", "cancelled")  # a run in one of these is over
# A partition is over unless it is `queued` or `running`: succeeded, skipped, failed,
# cancelled or quarantined.
LEASE_SECONDS = 60.0  # a claim not renewed for this long is lost (`lease` in runex.toml)
# The conditions of the partial indexes, written the same in every query that uses them (an
# engine uses such an index only for a query whose WHERE has the index's condition).
# partitions: not done, or not done well (skipped: an incremental run found it done before)
UNSETTLED = "status NOT IN ('succeeded', 'skipped')"
DONE = ("succeeded", "skipped")
RUNNING = "status = 'running'"  # attempts
OPEN_RUN = "status IN ('queued', 'running')"  # runs
# Fires that pruning keeps: the newest of each pipeline (its schedule's memory), and waiting ones
KEEP_FIRES = ("NOT IN (SELECT pipeline || ' ' || MAX(fire_time) FROM fires GROUP BY pipeline) "
              "AND status != 'waiting'")
FINISHED = "status IN ('succeeded', 'failed', 'cancelled')"  # runs


def _steps_from_events(conn: Any) -> None:
    """Version 4: the steps' counts and times, which were `step.finished` events, become
    their attempt's `steps`."""
    rows = conn.execute("SELECT run_id, idx, attempt, data FROM events WHERE event = "
                        "'step.finished' ORDER BY run_id, idx, attempt")
    steps = []
    for (run_id, idx, attempt), events in itertools.groupby(rows, key=lambda r: r[:3]):
        done = sorted((json.loads(e[3]) for e in events), key=lambda e: e.get("step", 0))
        steps.append((json.dumps([[e.get("records_in"), e.get("records_out"), e.get("seconds")]
                                  for e in done], separators=(",", ":")), run_id, idx, attempt))
        if len(steps) >= 1000:
            conn.executemany("UPDATE attempts SET steps = ? WHERE run_id = ? AND idx = ? AND "
                             "attempt = ?", steps)
            steps = []
    conn.executemany("UPDATE attempts SET steps = ? WHERE run_id = ? AND idx = ? AND "
                     "attempt = ?", steps)


SCHEMA = [
    # version 1
    [
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            pipeline TEXT NOT NULL,
            spec TEXT NOT NULL,
            project_dir TEXT NOT NULL,
            status TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            scheduled_for TEXT,
            partition_count INTEGER NOT NULL,
            records_in INTEGER,
            records_out INTEGER,
            error TEXT,
            finalizer TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL)""",
        "CREATE INDEX runs_created ON runs (created_at)",
        """CREATE TABLE partitions (
            run_id TEXT NOT NULL REFERENCES runs (id),
            idx INTEGER NOT NULL,
            key TEXT NOT NULL,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,
            attempt_base INTEGER NOT NULL DEFAULT 0,
            records_in INTEGER,
            records_out INTEGER,
            error TEXT,
            queued_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            PRIMARY KEY (run_id, idx))""",
        "CREATE INDEX partitions_status ON partitions (status)",
        "CREATE INDEX partitions_run_status ON partitions (run_id, status)",
        """CREATE TABLE attempts (
            run_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            status TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            pid_started TEXT,
            lease_until REAL,
            started_at REAL NOT NULL,
            finished_at REAL,
            records_in INTEGER,
            records_out INTEGER,
            error TEXT,
            traceback TEXT,
            PRIMARY KEY (run_id, idx, attempt))""",
        """CREATE TABLE events (
            ts REAL NOT NULL,
            run_id TEXT,
            idx INTEGER,
            attempt INTEGER,
            event TEXT NOT NULL,
            data TEXT NOT NULL)""",
        "CREATE INDEX events_run ON events (run_id, ts)",
        """CREATE TABLE schedules (
            pipeline TEXT PRIMARY KEY,
            since TEXT NOT NULL)""",
        """CREATE TABLE fires (
            pipeline TEXT NOT NULL,
            fire_time TEXT NOT NULL,
            status TEXT NOT NULL,
            run_id TEXT,
            reason TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (pipeline, fire_time))""",
        "CREATE INDEX fires_status ON fires (status)",
        "CREATE INDEX runs_pipeline ON runs (pipeline, status)",
    ],
    # version 2 (runex 0.2): an attempt's boot, so that a reboot tells at once that its
    # worker is gone; the consumers running on this home
    [
        "ALTER TABLE attempts ADD COLUMN boot_id TEXT",
        """CREATE TABLE consumers (
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            pid_started TEXT,
            boot_id TEXT,
            workers INTEGER NOT NULL,
            started_at REAL NOT NULL,
            PRIMARY KEY (host, pid))""",
    ],
    # version 3: the code each attempt ran
    [
        "ALTER TABLE attempts ADD COLUMN code_version TEXT",
    ],
    # version 4: each fact once, in few bytes. Partitions and attempts are stored in their
    # primary key's order (no second copy of the key); their other indexes hold only what is
    # not settled yet, so they are empty once work is done; each run keeps its partitions'
    # counts by status and its records so far (progress, completion and a run's end read
    # a few rows, not the run's partitions); the ledger keeps no trace events (those that
    # restate no row are in the trace files).
    [
        """CREATE TABLE run_counts (
            run_id TEXT NOT NULL,
            status TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (run_id, status)){clustered}""",
        "INSERT INTO run_counts (run_id, status, n) "
        "SELECT run_id, status, COUNT(*) FROM partitions GROUP BY run_id, status",
        "UPDATE runs SET "
        "records_in = (SELECT COALESCE(SUM(records_in), 0) FROM partitions p "
        "WHERE p.run_id = runs.id AND p.status = 'succeeded'), "
        "records_out = (SELECT COALESCE(SUM(records_out), 0) FROM partitions p "
        "WHERE p.run_id = runs.id AND p.status = 'succeeded') WHERE records_in IS NULL",
        """CREATE TABLE partitions_4 (
            run_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            key TEXT NOT NULL,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,
            attempt_base INTEGER NOT NULL DEFAULT 0,
            records_in INTEGER,
            records_out INTEGER,
            error TEXT,
            queued_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            PRIMARY KEY (run_id, idx)){clustered}""",
        "INSERT INTO partitions_4 SELECT run_id, idx, key, status, attempt, attempt_base, "
        "records_in, records_out, error, queued_at, started_at, finished_at FROM partitions",
        "DROP TABLE partitions",
        "ALTER TABLE partitions_4 RENAME TO partitions",
        # (the condition of its time: version 7 makes the index again with today's)
        "CREATE INDEX partitions_unsettled ON partitions (run_id, status) WHERE "
        "status != 'succeeded'",
        """CREATE TABLE attempts_4 (
            run_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            status TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            pid_started TEXT,
            boot_id TEXT,
            lease_until REAL,
            started_at REAL NOT NULL,
            finished_at REAL,
            records_in INTEGER,
            records_out INTEGER,
            error TEXT,
            traceback TEXT,
            code_version TEXT,
            steps TEXT,
            PRIMARY KEY (run_id, idx, attempt)){clustered}""",
        "INSERT INTO attempts_4 SELECT run_id, idx, attempt, status, host, pid, pid_started, "
        "boot_id, lease_until, started_at, finished_at, records_in, records_out, error, "
        "traceback, code_version, NULL FROM attempts",
        "DROP TABLE attempts",
        "ALTER TABLE attempts_4 RENAME TO attempts",
        f"CREATE INDEX attempts_running ON attempts (host, pid) WHERE {RUNNING}",
        f"CREATE INDEX runs_open ON runs (created_at) WHERE {OPEN_RUN}",
        "CREATE INDEX fires_run ON fires (run_id)",
        # runs being pruned: their row is gone, their partitions and attempts go in slices
        """CREATE TABLE pruning (
            run_id TEXT PRIMARY KEY,
            partition_count INTEGER NOT NULL,
            done INTEGER NOT NULL DEFAULT 0)""",
        _steps_from_events,
        "DROP TABLE events",
    ],
    # version 5: the code a run was submitted with (JSON: its version, files, host), which
    # workers on other hosts compare with theirs; until when its finalizer holds it (a host
    # that died while finalizing lets go when that time passes)
    [
        "ALTER TABLE runs ADD COLUMN code TEXT",
        "ALTER TABLE runs ADD COLUMN finalizer_until REAL",
    ],
    # version 6: what is paused: a scheduled pipeline (by name: its fire times are skipped)
    # or all work (ALL_WORK: consumers start no partition), since when and by whom; each
    # consumer's worker processes
    [
        """CREATE TABLE pauses (
            target TEXT PRIMARY KEY,
            paused_at REAL NOT NULL,
            source TEXT)""",
        "ALTER TABLE consumers ADD COLUMN worker_pids TEXT",
    ],
    # version 7: lineage. The input each attempt read (its source's fingerprint); a
    # partition an incremental run skips (`skipped`: not unsettled); and, per sink target and
    # partition key, the last commit of an incremental run: what it read and with which
    # code and parameters.
    [
        "ALTER TABLE attempts ADD COLUMN fingerprint TEXT",
        "DROP INDEX partitions_unsettled",
        f"CREATE INDEX partitions_unsettled ON partitions (run_id, status) WHERE {UNSETTLED}",
        """CREATE TABLE outputs (
            target TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT,
            version TEXT NOT NULL,
            run_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            committed_at REAL NOT NULL,
            PRIMARY KEY (target, key)){clustered}""",
    ],
]
ALL_WORK = "*"  # the target of a pause of all work


def new_run_id() -> str:
    """Sortable by creation time and short enough to type: `20261127-174502-3fa9c1d0`."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(4).hex()


@dataclass
class Claim:
    run_id: str
    index: int
    key: Any
    attempt: int
    failures: int  # failed or timed-out attempts since `runex retry` last re-queued it
    pipeline: str
    spec: dict[str, Any]
    project_dir: str
    partition_count: int
    run_started: bool = False  # this claim started the run (its first)
    code: dict[str, Any] | None = None  # what the run was submitted with (`NewRun.code`)


@dataclass
class Outcome:
    """How an attempt ended, for `Ledger.finish_many`."""

    claim: Claim
    status: str  # succeeded, failed, timeout, cancelled, interrupted; released: not started
    records_in: int = 0
    records_out: int = 0
    error: str | None = None
    traceback: str | None = None
    requeue: bool = False  # back to `queued`: retried, or given back
    started: float | None = None  # when it really started, if after its claim
    code_version: str | None = None  # of the code it ran (`extensions.code_version`)
    steps: list[list[float]] | None = None  # per step: records in, records out, seconds
    fingerprint: str | None = None  # of the input it read (JSON), if its source tells
    # Where it committed and with what (sink target, inputs version), and whether its run is
    # incremental (which records it; another run updates only a record that is there)
    output: tuple[str, str, bool] | None = None


@dataclass(frozen=True)
class NewRun:
    """A run to record, with its partitions' keys (see `Ledger.create_run`)."""

    id: str
    pipeline: str
    spec: dict[str, Any]
    project_dir: str
    priority: int
    keys: Iterable[str]  # each partition's key as JSON text, in order, read once
    scheduled_for: str | None = None  # the fire time of a scheduled run
    # The code it was submitted with: {"version", "files": {path: hash}, "host", "runex"}
    code: dict[str, Any] | None = None


@dataclass(frozen=True)
class Recorded:
    """What `Ledger.finish_many` did."""

    applied: list[bool]  # for each outcome: False if a newer attempt holds its partition
    complete: bool  # no partition of the run is queued or running any more


@dataclass(frozen=True)
class Lost:
    """What `Ledger.lose_attempt` did."""

    status: str | None  # the partition's new status; None if the attempt had ended already
    complete: bool


@dataclass
class Pruned:
    """What `Ledger.prune` deleted (or, dry, would delete)."""

    runs: int = 0
    partitions: int = 0
    attempts: int = 0
    fires: int = 0


@dataclass(frozen=True)
class Cancelled:
    """What `Ledger.cancel` did."""

    cancelled: int  # partitions cancelled before they started
    running: int  # partitions still running, which stop at their next batch
    complete: bool


class Pace:
    """How much a background transaction (a prune's, a reclaim's) does: as many rows as take
    about `seconds` (learned as it goes; None: always `rows`), then it waits `rest` times as
    long as it took, at least `least` seconds, so that workers waiting for the write lock
    barely notice."""

    def __init__(self, rows: int = 100, seconds: float | None = 0.001, rest: float = 4.0,
                 least: float = 0.005):
        self.rows, self.seconds, self.rest, self.least = rows, seconds, rest, least

    @contextlib.contextmanager
    def step(self, dry_run: bool, rows: int, after: Callable[[], None] | None = None
             ) -> Iterator[None]:
        """One transaction of `rows` rows (0: none to learn from; a dry run only reads: no
        pace for it); `after` it, what the rest is for (a checkpoint)."""
        if dry_run:
            yield
            return
        began = time.perf_counter()
        yield
        took = time.perf_counter() - began
        if self.seconds and rows and took > 0:  # halfway to the rows that take `seconds`
            self.rows = max(10, min(10_000, (self.rows + int(rows * self.seconds / took)) // 2))
        rest = time.perf_counter()
        if after is not None:
            after()
        time.sleep(max(0.0, max(self.least, self.rest * took) - (time.perf_counter() - rest)))


class Ledger:
    """The ledger in `target`: an engine (`runex.storage`, `runex.postgres`), a
    `postgresql://` URL, or the path of a SQLite file. Claims
    taken through it hold their partition for `lease` seconds unless renewed."""

    def __init__(self, target: str | os.PathLike | Any, lease: float = LEASE_SECONDS,
                 patient: bool = True):
        self.engine: Any = engine_for(target)
        self.lease = lease
        self.patient = patient  # a broken connection is made again with a while's retries
        self.path = self.engine.path
        self._conn: Any = None
        self._pid = 0
        self._abandoned: list[Any] = []

    # -- connection --------------------------------------------------------------------

    @property
    def conn(self) -> Any:
        again = False
        if self._conn is not None and self._pid == os.getpid() and self.engine.broken(
                self._conn):  # the server restarted, or the network dropped: connect again
            self._conn, again = None, True
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                # Inherited through fork: never use or close it here; the parent owns it.
                self._abandoned.append(self._conn)
                self._conn = None
            conn = self.engine.connect(again and self.patient)
            with self._storage_errors():
                self._migrate(conn)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @contextlib.contextmanager
    def _storage_errors(self) -> Iterator[None]:
        """Storage errors a user can act on (a full disk...) as the engine words them."""
        try:
            yield
        except Exception as exc:
            error = self.engine.error(exc)
            if error is exc:
                raise
            raise error from exc

    def checkpoint(self) -> None:
        """Copy what the write-ahead log holds into the database, without waiting for anyone
        (consumers do it every `reap_every`, off the path of submits and claims). On a full
        disk: `DiskFull`."""
        with self._storage_errors():
            self.engine.checkpoint(self.conn)

    def _migrate(self, conn: Any) -> None:
        engine = self.engine
        if engine.schema_version(conn) >= len(SCHEMA):
            return
        engine.begin(conn)
        try:
            version = engine.schema_version(conn)
            for statements in SCHEMA[version:]:
                for sql in statements:
                    if callable(sql):  # a step of Python
                        sql(conn)
                    else:
                        conn.execute(engine.ddl(sql))
            engine.set_schema_version(conn, len(SCHEMA))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    @contextlib.contextmanager
    def tx(self) -> Iterator[Any]:
        """One short write transaction; a full or read-only disk rolls it back whole and
        raises `StorageError`. It is not synced: see `sync`."""
        with self._storage_errors():
            conn = self.conn
            self.engine.begin(conn)
            try:
                yield conn
                try:
                    conn.execute("COMMIT")
                except Unreachable as exc:  # the answer was lost, not the question
                    raise Unreachable(f"{exc}; the connection broke during the commit, "
                                      "which may have been recorded or not: look before "
                                      "doing it again (`runex runs`)") from exc
            except BaseException:
                # A failed COMMIT (a full disk) may leave the transaction open, or SQLite may
                # have rolled it back by itself.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def sync(self) -> None:
        """Make every transaction committed so far survive a power cut.

        On SQLite the ledger runs `synchronous=NORMAL`: a commit survives a crash of the
        process, and reaches the disk at the next checkpoint (consumers make one every
        `reap_every`) or the next `sync`, one fsync of the write-ahead log. What a power cut
        can take is then a claim or an outcome, which only costs running a partition again
        (sinks make that harmless). runex calls `sync` before it acknowledges anything: a
        submit, a cancel, a retry, a run's end."""
        self.conn  # noqa: B018 - opened: an open connection keeps the log from being removed
        self.engine.sync()

    def _rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    # -- writes ----------------------------------------------------------------------

    def create_run(self, run: NewRun) -> int:
        """The run and all its partitions, `queued`, in one transaction; returns how many
        partitions it has. The keys are read as they come (never held as one list); if reading
        them raises, nothing is written."""
        with self.tx() as conn:
            return self._insert_run(conn, run)

    def fire_run(self, run: NewRun) -> int | None:
        """A scheduled run (at its fire time, `run.scheduled_for`) with its row in `fires`, in
        one transaction; nothing is written if the fire time has a row already (another
        consumer fired it): then None, else how many partitions the run has."""
        return self._create_fired(run, (
            "INSERT INTO fires (pipeline, fire_time, status, run_id, created_at) "
            "VALUES (?, ?, 'fired', ?, ?) ON CONFLICT DO NOTHING",
            (run.pipeline, run.scheduled_for, run.id, time.time())))

    def fire_waiting_run(self, run: NewRun) -> int | None:
        """The run of a fire time that waited for an earlier run (`overlap = "queue"`), if
        it still waits (else None)."""
        return self._create_fired(run, (
            "UPDATE fires SET status = 'fired', run_id = ? WHERE pipeline = ? AND "
            "fire_time = ? AND status = 'waiting'", (run.id, run.pipeline, run.scheduled_for)))

    def refire_run(self, run: NewRun) -> int | None:
        """A run of a fire time that may have fired before (backfill): its row in `fires`
        points at the new run."""
        return self._create_fired(run, (
            "INSERT INTO fires (pipeline, fire_time, status, run_id, created_at) "
            "VALUES (?, ?, 'fired', ?, ?) ON CONFLICT (pipeline, fire_time) DO UPDATE "
            "SET status = 'fired', run_id = excluded.run_id, reason = NULL",
            (run.pipeline, run.scheduled_for, run.id, time.time())))

    def _create_fired(self, run: NewRun, fire: tuple[str, tuple[Any, ...]]) -> int | None:
        with self.tx() as conn:
            if conn.execute(*fire).rowcount != 1:
                return None  # the transaction commits nothing
            return self._insert_run(conn, run)

    def _insert_run(self, conn: Any, run: NewRun) -> int:
        now = time.time()
        conn.execute(
            "INSERT INTO runs (id, pipeline, spec, project_dir, status, priority, "
            "scheduled_for, partition_count, records_in, records_out, created_at, code) "
            "VALUES (?, ?, ?, ?, 'queued', ?, ?, 0, 0, 0, ?, ?)",
            (run.id, run.pipeline, json.dumps(run.spec), run.project_dir, run.priority,
             run.scheduled_for, now, run.code and json.dumps(run.code, separators=(",", ":"))))
        count = 0

        def rows() -> Iterator[tuple[Any, ...]]:
            nonlocal count
            for key in run.keys:
                yield run.id, count, key, now
                count += 1

        conn.executemany("INSERT INTO partitions (run_id, idx, key, status, queued_at) "
                         "VALUES (?, ?, ?, 'queued', ?)", rows())
        conn.execute("UPDATE runs SET partition_count = ? WHERE id = ?", (count, run.id))
        self._count(conn, run.id, {"queued": count})
        return count

    @staticmethod
    def _count(conn: Any, run_id: str, moved: dict[str, int]) -> None:
        """Add to the run's partition counts by status (`run_counts`): +n to the status
        partitions moved to, -n to the one they left."""
        changes = [(run_id, status, n) for status, n in moved.items() if n]
        if changes:
            conn.executemany(
                "INSERT INTO run_counts (run_id, status, n) VALUES (?, ?, ?) ON CONFLICT "
                "(run_id, status) DO UPDATE SET n = run_counts.n + excluded.n", changes)

    # -- schedules ---------------------------------------------------------------------

    def schedule_since(self, pipeline: str, now: str) -> str:
        """When the ledger first saw `pipeline` scheduled (fire times before are not missed)."""
        row = self.conn.execute("SELECT since FROM schedules WHERE pipeline = ?",
                                (pipeline,)).fetchone()
        if row is None:
            with self.tx() as conn:
                conn.execute("INSERT INTO schedules (pipeline, since) VALUES (?, ?) "
                             "ON CONFLICT DO NOTHING", (pipeline, now))
            row = self.conn.execute("SELECT since FROM schedules WHERE pipeline = ?",
                                    (pipeline,)).fetchone()
        return row[0]

    def last_fire(self, pipeline: str) -> str | None:
        return self.conn.execute("SELECT MAX(fire_time) FROM fires WHERE pipeline = ?",
                                 (pipeline,)).fetchone()[0]

    def fire(self, pipeline: str, fire_time: str) -> dict[str, Any] | None:
        """A fire with the status of its run (`run_status`), or None."""
        rows = self._rows(
            "SELECT f.*, r.status AS run_status FROM fires f LEFT JOIN runs r "
            "ON r.id = f.run_id WHERE f.pipeline = ? AND f.fire_time = ?", (pipeline, fire_time))
        return rows[0] if rows else None

    def fires(self, pipeline: str, limit: int = 1) -> list[dict[str, Any]]:
        """The latest fires of a pipeline, newest first, with their runs' status."""
        return self._rows(
            "SELECT f.*, r.status AS run_status FROM fires f LEFT JOIN runs r "
            "ON r.id = f.run_id WHERE f.pipeline = ? ORDER BY f.fire_time DESC LIMIT ?",
            (pipeline, limit))

    def record_fire(self, pipeline: str, fire_time: str, status: str, reason: str) -> bool:
        """A fire without a run: `skipped`, `waiting` or `error`. It changes a fire that was
        waiting, and no other: False when the fire time has another row."""
        with self.tx() as conn:
            cur = conn.execute(
                "INSERT INTO fires (pipeline, fire_time, status, reason, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (pipeline, fire_time) DO UPDATE "
                "SET status = excluded.status, reason = excluded.reason "
                "WHERE fires.status = 'waiting'",
                (pipeline, fire_time, status, reason, time.time()))
            return cur.rowcount == 1

    def pause(self, target: str, source: str | None = None) -> bool:
        """Pause a scheduled pipeline, or all work (`ALL_WORK`); False if it was paused."""
        with self.tx() as conn:
            return conn.execute("INSERT INTO pauses (target, paused_at, source) VALUES "
                                "(?, ?, ?) ON CONFLICT DO NOTHING",
                                (target, time.time(), source)).rowcount == 1

    def resume(self, target: str) -> bool:
        """Resume what `pause` paused; False if it was not paused."""
        with self.tx() as conn:
            return conn.execute("DELETE FROM pauses WHERE target = ?", (target,)).rowcount == 1

    def pauses(self) -> dict[str, dict[str, Any]]:
        """What is paused: {target: {paused_at, source}}."""
        return {r.pop("target"): r for r in self._rows("SELECT * FROM pauses")}

    def waiting_fires(self) -> list[tuple[str, str]]:
        return self.conn.execute("SELECT pipeline, fire_time FROM fires WHERE status = "
                                 "'waiting' ORDER BY fire_time").fetchall()

    def active_run(self, pipeline: str) -> str | None:
        """The newest queued or running run of a pipeline."""
        row = self.conn.execute(
            f"SELECT id FROM runs WHERE pipeline = ? AND {OPEN_RUN} "
            "ORDER BY created_at DESC LIMIT 1", (pipeline,)).fetchone()
        return row[0] if row else None

    def claim_many(self, run_id: str, indexes: Sequence[int], host: str, pid: int,
                   pid_started: str | None, boot_id: str | None = None) -> list[Claim]:
        """Take the partitions of `indexes` that are queued, in one transaction, bumping each
        one's attempt number (the fencing token). A partition running elsewhere, done, or of
        a cancelled run is left out. The attempt records its worker: `host`, `pid`, the
        process's start time and the machine's `boot_id`."""
        now = time.time()
        marks = ", ".join("?" * len(indexes))
        with self.tx() as conn:
            rows = conn.execute(
                "UPDATE partitions SET status = 'running', attempt = attempt + 1, "
                f"started_at = ? WHERE run_id = ? AND idx IN ({marks}) AND status = 'queued' "
                "RETURNING idx, attempt, attempt_base, key", (now, run_id, *indexes)).fetchall()
            if not rows:
                return []
            order = {idx: i for i, idx in enumerate(indexes)}
            rows.sort(key=lambda r: order[r[0]])
            again = [r[0] for r in rows if r[1] > r[2] + 1]  # tried before, since the base
            failures = self._failures(conn, run_id, again)
            conn.executemany(
                "INSERT INTO attempts (run_id, idx, attempt, status, host, pid, pid_started, "
                "boot_id, lease_until, started_at) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                [(run_id, idx, attempt, host, pid, pid_started, boot_id, now + self.lease,
                  now) for idx, attempt, _, _ in rows])
            run = conn.execute(
                "UPDATE runs SET status = 'running', started_at = COALESCE(started_at, ?) "
                "WHERE id = ? RETURNING pipeline, spec, project_dir, partition_count, "
                "started_at, code", (now, run_id)).fetchone()
            self._count(conn, run_id, {"queued": -len(rows), "running": len(rows)})
        spec, code = json.loads(run[1]), run[5] and json.loads(run[5])
        claims = [Claim(run_id, idx, json.loads(key), attempt, failures.get(idx, 0), run[0],
                        spec, run[2], run[3], code=code) for idx, attempt, _, key in rows]
        claims[0].run_started = run[4] == now
        return claims

    @staticmethod
    def _failures(conn: Any, run_id: str, indexes: Sequence[int]
                  ) -> dict[int, int]:
        """Failed or timed-out attempts of these partitions since `runex retry` last
        re-queued them (what spends their retry budget)."""
        if not indexes:
            return {}
        return dict(conn.execute(
            "SELECT a.idx, COUNT(*) FROM attempts a JOIN partitions p ON "
            "p.run_id = a.run_id AND p.idx = a.idx WHERE a.run_id = ? AND a.idx IN "
            f"({', '.join('?' * len(indexes))}) AND a.attempt > p.attempt_base AND "
            "a.status IN ('failed', 'timeout') GROUP BY a.idx", (run_id, *indexes)).fetchall())

    def running_claim(self, host: str, pid: int, index: int, attempt: int) -> Claim | None:
        """The claim of a running attempt of process `pid` on `host`, or None."""
        row = self.conn.execute(
            "SELECT r.id, p.key, r.pipeline, r.spec, r.project_dir, r.partition_count, r.code FROM "
            "attempts a JOIN partitions p ON p.run_id = a.run_id AND p.idx = a.idx JOIN runs r "
            "ON r.id = a.run_id WHERE a.host = ? AND a.pid = ? AND a.idx = ? AND a.attempt = ? "
            "AND a.status = 'running'", (host, pid, index, attempt)).fetchone()
        if row is None:
            return None
        failures = self._failures(self.conn, row[0], [index]).get(index, 0)
        return Claim(row[0], index, json.loads(row[1]), attempt, failures, row[2],
                     json.loads(row[3]), row[4], row[5], code=row[6] and json.loads(row[6]))

    def finish_many(self, outcomes: Sequence[Outcome]) -> Recorded:
        """Record how attempts of one run ended, in one transaction. A partition moves only
        if its attempt still holds it (a fenced, stale attempt changes nothing); `requeue`
        puts it back to `queued` for a retry."""
        if not outcomes:
            return Recorded([], False)
        now = time.time()
        run_id = outcomes[0].claim.run_id
        moved: dict[str, int] = {}
        records = [0, 0]
        with self.tx() as conn:
            held = set(conn.execute(  # the attempts that still hold their partition
                "SELECT idx, attempt FROM partitions WHERE run_id = ? AND idx IN "
                f"({', '.join('?' * len(outcomes))}) AND status = 'running'",
                (run_id, *(o.claim.index for o in outcomes))).fetchall())
            applied = [(o.claim.index, o.claim.attempt) in held for o in outcomes]
            released = [(run_id, o.claim.index, o.claim.attempt)  # never started: unclaimed
                        for o, ok in zip(outcomes, applied, strict=True)
                        if ok and o.status == "released"]
            conn.executemany("UPDATE partitions SET status = 'queued', attempt = attempt - 1 "
                             "WHERE run_id = ? AND idx = ? AND attempt = ?", released)
            conn.executemany("DELETE FROM attempts WHERE run_id = ? AND idx = ? AND "
                             "attempt = ?", released)
            ended = [(o, ok, "queued" if o.requeue else o.status)
                     for o, ok in zip(outcomes, applied, strict=True) if o.status != "released"]
            conn.executemany(
                "UPDATE partitions SET status = ?, records_in = ?, records_out = ?, error = ?, "
                "started_at = COALESCE(?, started_at), finished_at = ?, queued_at = ? "
                "WHERE run_id = ? AND idx = ? AND attempt = ?",
                [(status, o.records_in, o.records_out, o.error, o.started,
                  None if o.requeue else now, now, run_id, o.claim.index, o.claim.attempt)
                 for o, ok, status in ended if ok])
            conn.executemany(
                "UPDATE attempts SET status = ?, started_at = COALESCE(?, started_at), "
                "finished_at = ?, records_in = ?, records_out = ?, error = ?, traceback = ?, "
                "code_version = ?, steps = ?, fingerprint = ? WHERE run_id = ? AND idx = ? AND "
                f"attempt = ? AND {RUNNING}",
                [(o.status if ok else "fenced", o.started, now, o.records_in, o.records_out,
                  o.error, o.traceback, o.code_version,
                  o.steps and json.dumps(o.steps, separators=(",", ":")), o.fingerprint,
                  run_id, o.claim.index, o.claim.attempt) for o, ok, _ in ended])
            self._record_outputs(conn, run_id, now, [o for o, ok, status in ended
                                                     if ok and status == "succeeded"])
            moved["running"] = -sum(applied)
            moved["queued"] = len(released)
            for o, ok, status in ended:
                if ok:
                    moved[status] = moved.get(status, 0) + 1
                    if status == "succeeded":
                        records[0] += o.records_in
                        records[1] += o.records_out
            self._count(conn, run_id, moved)
            if records != [0, 0]:  # a run's records: those of its committed partitions
                conn.execute("UPDATE runs SET records_in = records_in + ?, records_out = "
                             "records_out + ? WHERE id = ?", (*records, run_id))
            over = any(ok and not o.requeue for o, ok in zip(outcomes, applied, strict=True))
            complete = over and self._complete(conn, run_id)
        return Recorded(applied, complete)

    @staticmethod
    def _record_outputs(conn: Any, run_id: str, now: float, done: list[Outcome]) -> None:
        """The last commit of each key into each sink, which the next incremental run
        compares with: recorded by incremental runs, kept up to date by the others (where
        an incremental run into their sink recorded some: one look per chunk otherwise)."""
        done = [o for o in done if o.output]
        if not done:
            return
        target, _, incremental = done[0].output  # a run has one sink
        if not incremental and not conn.execute(
                "SELECT 1 FROM outputs WHERE target = ? LIMIT 1", (target,)).fetchone():
            return
        rows = [(o.fingerprint, o.output[1], run_id, o.claim.index, o.claim.attempt, now,
                 target, key_text(o.claim.key)) for o in done]
        if incremental:
            conn.executemany(
                "INSERT INTO outputs (fingerprint, version, run_id, idx, attempt, "
                "committed_at, target, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT "
                "(target, key) DO UPDATE SET fingerprint = excluded.fingerprint, version = "
                "excluded.version, run_id = excluded.run_id, idx = excluded.idx, attempt = "
                "excluded.attempt, committed_at = excluded.committed_at", rows)
        else:
            conn.executemany(
                "UPDATE outputs SET fingerprint = ?, version = ?, run_id = ?, idx = ?, "
                "attempt = ?, committed_at = ? WHERE target = ? AND key = ?", rows)

    @staticmethod
    def _complete(conn: Any, run_id: str) -> bool:
        """No partition of the run is queued or running (its counts, not its partitions)."""
        return conn.execute(
            "SELECT COALESCE(SUM(n), 0) FROM run_counts WHERE run_id = ? AND status IN "
            "('queued', 'running')", (run_id,)).fetchone()[0] == 0

    def renew_lease(self, claims: Sequence[Claim]) -> int:
        """Extend the lease of running attempts; returns how many are still running."""
        with self.tx() as conn:
            until = time.time() + self.lease  # from when the write lock is held
            return sum(conn.execute(
                "UPDATE attempts SET lease_until = ? WHERE run_id = ? AND idx = ? "
                f"AND attempt = ? AND {RUNNING}",
                (until, c.run_id, c.index, c.attempt)).rowcount for c in claims)

    def running_attempts(self) -> list[dict[str, Any]]:
        return self._rows("SELECT run_id, idx, attempt, host, pid, pid_started, boot_id, "
                          f"lease_until FROM attempts WHERE {RUNNING}")

    def forget_outputs(self, target: str, keys: Iterable[Any]) -> int:
        """Forget the last commits into `target` of every key but `keys` (their rows were
        pruned: a key that comes back is run again); returns how many."""
        keep = {key_text(k) for k in keys}
        gone = [(target, k) for (k,) in self.conn.execute(
            "SELECT key FROM outputs WHERE target = ?", (target,)).fetchall() if k not in keep]
        with self.tx() as conn:
            conn.executemany("DELETE FROM outputs WHERE target = ? AND key = ?", gone)
        return len(gone)

    def last_output(self, target: str, key: Any) -> tuple[str | None, str] | None:
        """(fingerprint, inputs version) of the last commit of partition `key` into `target`
        by an incremental run, or None."""
        return self.conn.execute(
            "SELECT fingerprint, version FROM outputs WHERE target = ? AND key = ?",
            (target, key_text(key))).fetchone()

    def running_work(self) -> list[dict[str, Any]]:
        """The attempts running now with their pipeline and partition key, oldest first."""
        return self._rows(
            "SELECT a.run_id, r.pipeline, a.idx, p.key, a.attempt, a.host, a.pid, "
            "a.started_at, a.lease_until FROM (SELECT * FROM attempts WHERE "
            f"{RUNNING}) a JOIN partitions p ON p.run_id = a.run_id AND p.idx = a.idx "
            "JOIN runs r ON r.id = a.run_id ORDER BY a.started_at")

    # -- consumers ---------------------------------------------------------------------

    def add_consumer(self, host: str, pid: int, pid_started: str | None, boot_id: str | None,
                     workers: int) -> None:
        """Record a consumer as it starts (and forget any earlier one with its pid)."""
        with self.tx() as conn:
            conn.execute("INSERT INTO consumers (host, pid, pid_started, boot_id, workers, "
                         "started_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (host, pid) DO "
                         "UPDATE SET pid_started = excluded.pid_started, boot_id = "
                         "excluded.boot_id, workers = excluded.workers, started_at = "
                         "excluded.started_at",
                         (host, pid, pid_started, boot_id, workers, time.time()))

    def set_worker_pids(self, host: str, pid: int, pids: Sequence[int]) -> None:
        """The worker processes of a consumer, as it starts them (and starts others in place
        of those that died)."""
        with self.tx() as conn:
            conn.execute("UPDATE consumers SET worker_pids = ? WHERE host = ? AND pid = ?",
                         (json.dumps(list(pids)), host, pid))

    def remove_consumer(self, host: str, pid: int) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM consumers WHERE host = ? AND pid = ?", (host, pid))

    def consumers(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM consumers ORDER BY started_at")

    def lose_attempt(self, run_id: str, index: int, attempt: int, reason: str,
                     quarantine_after: int) -> Lost:
        """Declare a running attempt lost (its worker died). The partition goes back to the
        queue, or, lost `quarantine_after` times, to `quarantined`."""
        now = time.time()
        with self.tx() as conn:
            cur = conn.execute(
                "UPDATE attempts SET status = 'lost', finished_at = ?, error = ? "
                f"WHERE run_id = ? AND idx = ? AND attempt = ? AND {RUNNING}",
                (now, reason, run_id, index, attempt))
            if cur.rowcount != 1:
                return Lost(None, False)
            lost = conn.execute(
                "SELECT COUNT(*) FROM attempts a JOIN partitions p ON p.run_id = a.run_id "
                "AND p.idx = a.idx WHERE a.run_id = ? AND a.idx = ? AND a.status = 'lost' "
                "AND a.attempt > p.attempt_base", (run_id, index)).fetchone()[0]
            if lost >= quarantine_after:
                status = "quarantined"
                error = (f"quarantined: lost {lost} times, its worker died each time (killed, "
                         "or out of memory?); fix the cause, then `runex retry`")
            else:
                status, error = "queued", None
            cur = conn.execute(
                "UPDATE partitions SET status = ?, error = ?, queued_at = ?, finished_at = ? "
                "WHERE run_id = ? AND idx = ? AND attempt = ? AND status = 'running'",
                (status, error, now, now if status == "quarantined" else None,
                 run_id, index, attempt))
            if cur.rowcount == 1:
                self._count(conn, run_id, {"running": -1, status: 1})
            complete = status == "quarantined" and self._complete(conn, run_id)
        return Lost(status, complete)

    def queued_counts(self) -> dict[str, int]:
        """For each run with partitions queued: how many."""
        return dict(self.conn.execute(
            "SELECT run_id, n FROM run_counts WHERE status = 'queued' AND n > 0 AND run_id IN "
            f"(SELECT id FROM runs WHERE {OPEN_RUN})").fetchall())

    def queued_before(self, run_id: str, cutoff: float) -> Iterator[int]:
        """The indexes of the run's partitions queued since before `cutoff`, as read."""
        for row in self.conn.execute(
                f"SELECT idx FROM partitions WHERE run_id = ? AND {UNSETTLED} AND "
                "status = 'queued' AND queued_at < ?", (run_id, cutoff)):
            yield row[0]

    def unfinalized_runs(self) -> list[tuple[str, str | None, float | None]]:
        """(id, finalizer, until when it holds the run) of runs whose partitions are all over
        but that are not finished: nobody finalized them, or their finalizer died."""
        return self.conn.execute(
            f"SELECT id, finalizer, finalizer_until FROM runs r WHERE {OPEN_RUN} AND NOT "
            "EXISTS (SELECT 1 "
            "FROM run_counts c WHERE c.run_id = r.id AND c.status IN ('queued', 'running') "
            "AND c.n > 0)").fetchall()

    def release_finalizer(self, run_id: str, finalizer: str) -> None:
        with self.tx() as conn:
            conn.execute("UPDATE runs SET finalizer = NULL WHERE id = ? AND finalizer = ? "
                         f"AND {OPEN_RUN}", (run_id, finalizer))

    def cancel(self, run_id: str) -> Cancelled:
        """Cancel a run: queued partitions never start, running ones stop at their next
        batch."""
        now = time.time()
        with self.tx() as conn:
            conn.execute(f"UPDATE runs SET cancel_requested = 1 WHERE id = ? AND {OPEN_RUN}",
                         (run_id,))
            cancelled = conn.execute(
                "UPDATE partitions SET status = 'cancelled', finished_at = ?, "
                f"error = 'cancelled before it started' WHERE run_id = ? AND {UNSETTLED} AND "
                "status = 'queued'", (now, run_id)).rowcount
            self._count(conn, run_id, {"queued": -cancelled, "cancelled": cancelled})
            running = conn.execute("SELECT COALESCE(SUM(n), 0) FROM run_counts WHERE "
                                   "run_id = ? AND status = 'running'", (run_id,)).fetchone()[0]
            complete = self._complete(conn, run_id)
        return Cancelled(cancelled, running, complete)

    def cancel_requested(self, run_id: str) -> bool:
        row = self.conn.execute("SELECT cancel_requested FROM runs WHERE id = ?",
                                (run_id,)).fetchone()
        return bool(row and row[0])

    def retry(self, run_id: str, index: int | None = None) -> list[int]:
        """Re-queue the failed, timed-out, quarantined and cancelled partitions of a run (or only
        `index`), with a fresh retry budget; their earlier attempts are kept. Returns the
        indexes re-queued (none of a run being pruned)."""
        now = time.time()
        only, params = ("", (run_id,)) if index is None else (" AND idx = ?", (run_id, index))
        which = (f"WHERE run_id = ? AND {UNSETTLED} AND status IN ('failed', 'timeout', "
                 f"'quarantined', 'cancelled'){only}")
        with self.tx() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                return []
            before = dict(conn.execute(f"SELECT status, COUNT(*) FROM partitions {which} "
                                       "GROUP BY status", params).fetchall())
            rows = conn.execute(
                "UPDATE partitions SET status = 'queued', attempt_base = attempt, error = NULL, "
                f"finished_at = NULL, queued_at = ? {which} RETURNING idx",
                (now, *params)).fetchall()
            if rows:
                self._count(conn, run_id, {"queued": len(rows),
                                           **{status: -n for status, n in before.items()}})
                conn.execute(
                    "UPDATE runs SET status = CASE WHEN started_at IS NULL THEN 'queued' "
                    "ELSE 'running' END, finalizer = NULL, finished_at = NULL, error = NULL, "
                    "cancel_requested = 0 WHERE id = ?", (run_id,))
        return sorted(r[0] for r in rows)

    def claim_finalize(self, run_id: str, worker: str) -> bool:
        """Exactly one caller wins the right to finalize a run whose partitions are all done
        (the winner may claim it again), for `lease` seconds unless renewed."""
        with self.tx() as conn:
            cur = conn.execute(
                "UPDATE runs SET finalizer = ?, finalizer_until = ? WHERE id = ? AND "
                f"(finalizer IS NULL OR finalizer = ?) AND {OPEN_RUN}",
                (worker, time.time() + self.lease, run_id, worker))
            return cur.rowcount == 1

    def renew_finalizer(self, run_id: str, worker: str) -> None:
        with self.tx() as conn:
            conn.execute(f"UPDATE runs SET finalizer_until = ? WHERE id = ? AND finalizer = ? "
                         f"AND {OPEN_RUN}", (time.time() + self.lease, run_id, worker))

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        """Set the run's final status."""
        now = time.time()
        with self.tx() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ?, "
                "started_at = COALESCE(started_at, ?) WHERE id = ?",
                (status, error, now, now, run_id))

    def prune(self, before: float | None, keep_last: int = 0, dry_run: bool = False,
              beyond_newest: int | None = None, max_runs: int | None = None,
              max_partitions: int | None = None, pace: Pace | None = None) -> Pruned:
        """Delete the finished runs that ended before `before` and (`beyond_newest`) those
        not among the newest `beyond_newest` runs, but never the newest `keep_last` runs: at
        most `max_runs` of them, oldest first, with their partitions, attempts, counts and
        fires; and the fires without a run from before the oldest run kept. Runs not over are
        never pruned, nor the newest fire of each pipeline (what its schedule already fired)
        or a fire still waiting. `dry_run`: count only. `reclaim` gives the space back.

        Workers go on meanwhile: each transaction deletes as many partitions as take about a
        millisecond, and the next waits a while (`Pace`), so that a worker waiting for the
        write lock gets it first. A large run's row goes first (it is gone at once for
        everyone), then its partitions and attempts in slices (`pruning` says how far). With
        `max_partitions`, it stops after about that many partitions: the next call goes on."""
        done = Pruned()
        pace = pace or Pace()
        if not dry_run:
            self._prune_slices(done, max_partitions, pace)
        old = []
        if before is not None:
            old.append("COALESCE(finished_at, created_at) < ?")
        if beyond_newest is not None:
            old.append("id NOT IN (SELECT id FROM runs ORDER BY created_at DESC LIMIT ?)")
        keep = (" AND id NOT IN (SELECT id FROM runs ORDER BY created_at DESC LIMIT ?)"
                if keep_last else "")
        found = [] if not old else self.conn.execute(
            f"SELECT id, partition_count FROM runs WHERE {FINISHED} AND ({' OR '.join(old)})"
            f"{keep} ORDER BY created_at{'' if max_runs is None else ' LIMIT ?'}",
            tuple(p for p in (before, beyond_newest, keep_last or None, max_runs)
                  if p is not None)).fetchall()
        group: list[str] = []
        size = 0
        for run_id, count in found:
            if max_partitions is not None and done.partitions >= max_partitions:
                break
            if count > pace.rows:  # a large run: its row now, its partitions in slices
                with pace.step(dry_run, 0, self._short_log):  # a row: nothing to learn
                    self._prune_runs([run_id], done, dry_run, later=True)
                if not dry_run:
                    self._prune_slices(done, max_partitions, pace)
                continue
            if group and size + count > pace.rows:
                with pace.step(dry_run, size, self._short_log):
                    self._prune_runs(group, done, dry_run)
                group, size = [], 0
            group.append(run_id)
            size += count
        if group:
            with pace.step(dry_run, size, self._short_log):
                self._prune_runs(group, done, dry_run)
        oldest = self.oldest_run_time()
        cutoff = min((t for t in (before, oldest) if t is not None), default=None)
        if cutoff is not None:
            orphans = ("FROM fires WHERE run_id IS NULL AND created_at < ? AND "
                       f"pipeline || ' ' || fire_time {KEEP_FIRES}")
            done.fires += self.conn.execute(f"SELECT COUNT(*) {orphans}", (cutoff,)
                                            ).fetchone()[0]
            if not dry_run:
                with self.tx() as conn:
                    conn.execute(f"DELETE {orphans}", (cutoff,))
        return done

    def _prune_runs(self, ids: list[str], done: Pruned, dry_run: bool,
                    later: bool = False) -> None:
        """Delete finished runs `ids` (those still finished) in one transaction; `later`:
        leave their partitions and attempts to `_prune_slices`."""
        marks = ", ".join("?" * len(ids))
        # A dry run only reads: no write lock for it.
        with contextlib.nullcontext(self.conn) if dry_run else self.tx() as conn:
            ids = [r[0] for r in conn.execute(  # a run retried meanwhile is not over
                f"SELECT id FROM runs WHERE id IN ({marks}) AND {FINISHED}", ids)]
            if not ids:
                return
            marks = ", ".join("?" * len(ids))
            fires = conn.execute(f"SELECT COUNT(*) FROM fires WHERE run_id IN ({marks}) AND "
                                 f"pipeline || ' ' || fire_time {KEEP_FIRES}", ids).fetchone()[0]
            if dry_run or not later:
                partitions, attempts = (conn.execute(
                    f"SELECT COUNT(*) FROM {table} WHERE run_id IN ({marks})", ids).fetchone()[0]
                    for table in ("partitions", "attempts"))
                done.partitions += partitions
                done.attempts += attempts
            if not dry_run:
                if later:
                    conn.executemany("INSERT INTO pruning (run_id, partition_count) SELECT id, "
                                     "partition_count FROM runs WHERE id = ?",
                                     [(i,) for i in ids])
                else:
                    for table in ("attempts", "partitions"):
                        conn.execute(f"DELETE FROM {table} WHERE run_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM run_counts WHERE run_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM fires WHERE run_id IN ({marks}) AND "
                             f"pipeline || ' ' || fire_time {KEEP_FIRES}", ids)
                # A newest fire kept for its schedule no longer names a run.
                conn.execute(f"UPDATE fires SET run_id = NULL WHERE run_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM runs WHERE id IN ({marks})", ids)
        done.runs += len(ids)
        done.fires += fires

    def _prune_slices(self, done: Pruned, max_partitions: int | None, pace: Pace) -> None:
        """Delete the partitions and attempts of runs being pruned, a slice per
        transaction."""
        for run_id, count, low in self.conn.execute(
                "SELECT run_id, partition_count, done FROM pruning").fetchall():
            while low < count:
                if max_partitions is not None and done.partitions >= max_partitions:
                    return
                rows = pace.rows
                with pace.step(False, rows, self._short_log), self.tx() as conn:
                    for table in ("attempts", "partitions"):
                        deleted = conn.execute(
                            f"DELETE FROM {table} WHERE run_id = ? AND idx >= ? AND idx < ?",
                            (run_id, low, low + rows)).rowcount
                        setattr(done, table, getattr(done, table) + deleted)
                    low += rows
                    if low < count:
                        conn.execute("UPDATE pruning SET done = ? WHERE run_id = ?",
                                     (low, run_id))
                    else:
                        conn.execute("DELETE FROM pruning WHERE run_id = ?", (run_id,))

    def _short_log(self) -> None:
        with self._storage_errors():
            self.engine.keep_log_short(self.conn)

    def oldest_run_time(self) -> float | None:
        """When the oldest run the ledger keeps was created."""
        return self.conn.execute("SELECT MIN(created_at) FROM runs").fetchone()[0]

    def reclaim(self, most: int | None = None, least: int = 1, pace: Pace | None = None
                ) -> int:
        """Give the ledger's free pages back to the file system (at most `most` of them; none
        if fewer than `least` are free), as many per transaction as take about a millisecond
        (`Pace`). Returns how many it gave."""
        pace = pace or Pace()
        given = 0
        with self._storage_errors():
            conn, engine = self.conn, self.engine
            if engine.free_pages(conn) < least:
                return 0
            while engine.can_reclaim(conn) and engine.free_pages(conn) and (
                    most is None or given < most):
                pages = pace.rows if most is None else min(pace.rows, most - given)
                with pace.step(False, pages, self._short_log), self.tx():
                    given += engine.reclaim(conn, pages)
        return given

    def settle(self) -> None:
        """When nothing is queued or running: make a ledger of an earlier runex able to give
        space back (once: it is rewritten), and cut the write-ahead log back to nothing."""
        with self._storage_errors():
            conn, engine = self.conn, self.engine
            if not engine.can_reclaim(conn) and engine.allow_reclaim(conn):
                trace.logger().info("ledger.compacted", path=str(self.path))
            engine.truncate_log(conn)

    # -- reads -----------------------------------------------------------------------

    def resolve_run_id(self, ref: str) -> str:
        """A run id, `last` for the newest run, or any part of one id that no other id has
        (a prefix, or the random suffix people copy)."""
        if ref == "last":
            rows = self.conn.execute(
                "SELECT id FROM runs ORDER BY created_at DESC LIMIT 1").fetchall()
        else:
            rows = self.conn.execute("SELECT id FROM runs WHERE id = ?", (ref,)).fetchall()
            if not rows and ref:  # a part of an id: a scan, over what people type
                part = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = self.conn.execute(
                    "SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' ORDER BY id LIMIT 3",
                    (f"%{part}%",)).fetchall()
        if not rows:
            raise NotFound(f"no run {ref!r} in {self.path}; `runex runs` lists the runs")
        if len(rows) > 1:
            shown = ", ".join(r[0] for r in rows[:2])
            raise NotFound(f"{ref!r} is part of more than one run id ({shown}"
                           f"{', ...' if len(rows) > 2 else ''}); give more of the id")
        return rows[0][0]

    def run(self, run_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise NotFound(f"no run {run_id!r} in {self.path}; `runex runs` lists the runs")
        return rows[0]

    def runs(self, limit: int = 20, status: str | None = None, pipeline: str | None = None,
             since: float | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The newest runs, newest first: of one `status`, one `pipeline`, created since;
        after the first `offset` of them."""
        where, params = [], []
        for clause, value in (("status = ?", status), ("pipeline = ?", pipeline),
                              ("created_at >= ?", since)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = " WHERE " + " AND ".join(where) if where else ""
        return self._rows(f"SELECT * FROM runs{sql} ORDER BY created_at DESC LIMIT ? "
                          "OFFSET ?", (*params, limit, offset))

    def partitions(self, run_id: str, after: int = -1, limit: int | None = None,
                   status: str | None = None, unsettled: bool = False
                   ) -> list[dict[str, Any]]:
        """The run's partitions in index order, from the first after index `after`: at most
        `limit`, of one `status` only, or (`unsettled`) only those that did not succeed."""
        where = ""
        params: list[Any] = [run_id, after]
        if unsettled or status not in (None, *DONE):
            where += f" AND {UNSETTLED}"
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        if limit is not None:
            params.append(limit)
        return self._rows(f"SELECT * FROM partitions WHERE run_id = ? AND idx > ?{where} "
                          f"ORDER BY idx{'' if limit is None else ' LIMIT ?'}", tuple(params))

    def attempts(self, run_id: str, indexes: Sequence[int] | None = None
                 ) -> list[dict[str, Any]]:
        """The run's attempts (of the partitions of `indexes` only, if given)."""
        only = "" if indexes is None else f" AND idx IN ({', '.join('?' * len(indexes))})"
        return self._rows(f"SELECT * FROM attempts WHERE run_id = ?{only} ORDER BY idx, "
                          "attempt", (run_id, *(indexes or ())))

    def attempts_in_order(self, run_id: str, by: str) -> Iterator[dict[str, Any]]:
        """The run's attempts with their partition's key, ordered `by` "started_at" or
        "finished_at" (those that ended), as they are read: the database sorts them."""
        assert by in ("started_at", "finished_at")
        cur = self.conn.execute(
            "SELECT a.*, p.key FROM attempts a JOIN partitions p ON p.run_id = a.run_id AND "
            f"p.idx = a.idx WHERE a.run_id = ? AND a.{by} IS NOT NULL ORDER BY a.{by}",
            (run_id,))
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row, strict=True))

    def fires_of_run(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM fires WHERE run_id = ?", (run_id,))

    def progress(self, run_id: str) -> dict[str, int]:
        """Partition counts by status."""
        return dict(self.conn.execute(
            "SELECT status, n FROM run_counts WHERE run_id = ? AND n > 0 ORDER BY status",
            (run_id,)).fetchall())

    def server(self) -> tuple[str, float]:
        """What keeps the ledger (`PostgreSQL 15.2`, `SQLite 3.40.1`) and its clock."""
        with self._storage_errors():
            return self.engine.server(self.conn)

    # -- what the dashboard and the metrics read ----------------------------------------

    def runs_by_status(self, since: float | None = None) -> list[tuple[str, str, int]]:
        """(pipeline, status, runs) for every pipeline and status the ledger holds (of the
        runs created `since` only)."""
        return self.conn.execute(
            "SELECT pipeline, status, COUNT(*) FROM runs WHERE created_at >= ? GROUP BY "
            "pipeline, status ORDER BY pipeline, status", (since or 0,)).fetchall()

    def partitions_by_status(self) -> dict[str, int]:
        """Partitions of every run the ledger holds, by status (from the runs' counts)."""
        return dict(self.conn.execute(
            "SELECT status, SUM(n) FROM run_counts GROUP BY status HAVING SUM(n) > 0 "
            "ORDER BY status").fetchall())

    def run_ends(self) -> list[tuple[str, str, float | None]]:
        """(id, status, finished_at) of every run."""
        return self.conn.execute("SELECT id, status, finished_at FROM runs").fetchall()

    def attempt_totals(self, bounds: Sequence[float], runs: Sequence[str] | None = None
                       ) -> Iterator[tuple[Any, ...]]:
        """The attempts of `runs` (None: of every run), per run and attempt status: (run id,
        the run's pipeline, status and end, the attempts' status, how many, how many of them
        ended within each of `bounds` seconds (cumulative), how many ended, their seconds in
        all)."""
        buckets = "".join(f"SUM(CASE WHEN a.finished_at - a.started_at <= {float(b)!r} THEN 1 "
                          "ELSE 0 END), " for b in bounds)
        sql = ("SELECT a.run_id, r.pipeline, r.status, r.finished_at, a.status, COUNT(*), "
               f"{buckets}COUNT(a.finished_at), COALESCE(SUM(a.finished_at - a.started_at), 0) "
               "FROM attempts a JOIN runs r ON r.id = a.run_id {} GROUP BY a.run_id, "
               "r.pipeline, r.status, r.finished_at, a.status")
        if runs is None:
            yield from self.conn.execute(sql.format(""))
            return
        for i in range(0, len(runs), 500):
            chunk = runs[i:i + 500]
            yield from self.conn.execute(
                sql.format(f"WHERE a.run_id IN ({', '.join('?' * len(chunk))})"), chunk)

    def oldest_queued(self) -> float | None:
        """When the partition queued longest ago (of a run not over) was queued."""
        return self.conn.execute(
            f"SELECT MIN(queued_at) FROM partitions WHERE {UNSETTLED} AND status = 'queued' "
            f"AND run_id IN (SELECT id FROM runs WHERE {OPEN_RUN})").fetchone()[0]

    def partition_statuses(self, run_id: str) -> Iterator[tuple[int, str]]:
        """(index, status) of each of the run's partitions, in index order, as read."""
        return iter(self.conn.execute(
            "SELECT idx, status FROM partitions WHERE run_id = ? ORDER BY idx", (run_id,)))

    def finished_per_minute(self, since: float) -> dict[int, int]:
        """{minute (Unix seconds // 60): partitions that ended in it} since `since`, read
        from the partitions of the runs still going or over since then only."""
        return dict(self.conn.execute(
            "SELECT CAST(p.finished_at AS BIGINT) / 60 AS m, COUNT(*) FROM partitions p "
            "WHERE p.finished_at >= ? AND p.run_id IN (SELECT id FROM runs WHERE "
            f"finished_at >= ? OR ({OPEN_RUN})) GROUP BY m", (since, since)).fetchall())

    def runs_over(self, since: float, limit: int = 500) -> list[dict[str, Any]]:
        """Runs over since `since` (oldest first, the latest `limit`): pipeline, status,
        times, partitions and records, for charts."""
        return self._rows(
            "SELECT * FROM (SELECT id, pipeline, status, started_at, finished_at, "
            "partition_count, records_out FROM runs WHERE finished_at >= ? AND started_at IS "
            "NOT NULL ORDER BY finished_at DESC LIMIT ?) AS r ORDER BY finished_at",
            (since, limit))

    def newest_time(self) -> float | None:
        """The latest time the ledger holds (a run created or finished)."""
        return self.conn.execute("SELECT MAX(COALESCE(finished_at, created_at)) FROM runs"
                                 ).fetchone()[0]

    # What `copy_into` copies, in this order (a run before its partitions); consumers are
    # not history: those of the new ledger register as they start.
    HISTORY = ("runs", "partitions", "attempts", "run_counts", "schedules", "fires", "pruning",
               "pauses", "outputs")

    def copy_into(self, target: Ledger, batch: int = 5000) -> dict[str, int]:
        """Copy this ledger's history (runs with their partitions, attempts and counts;
        schedules and fires) into `target`, an empty ledger of another engine, in one
        transaction there: all of it or nothing. Returns the rows copied per table."""
        copied = {}
        with target.tx() as conn:
            held = {table: n for table in self.HISTORY
                    if (n := conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])}
            if held:
                shown = ", ".join(f"{n} {table}" for table, n in held.items())
                raise RunexError(f"{target.path} holds {shown} already: copy into an empty "
                                 "ledger (another database, or another ?schema=)")
            for table in self.HISTORY:
                cur = self.conn.execute(f"SELECT * FROM {table}")
                names = [d[0] for d in cur.description]
                sql = (f"INSERT INTO {table} ({', '.join(names)}) "
                       f"VALUES ({', '.join('?' * len(names))})")
                copied[table] = 0
                while rows := cur.fetchmany(batch):
                    conn.executemany(sql, rows)
                    copied[table] += len(rows)
        return copied

    def backup(self, path: str | os.PathLike) -> None:
        """A consistent copy of the ledger in `path`, made while others write it, synced."""
        self.engine.backup(self.conn, path)

    def highest_waiting_priority(self) -> int | None:
        """The highest priority of the runs queued or running, if any."""
        return self.conn.execute(f"SELECT MAX(priority) FROM runs WHERE {OPEN_RUN}"
                                 ).fetchone()[0]

    def other_work(self, run_id: str, since: float, host: str, pids: Sequence[int]
                   ) -> tuple[int, int, int]:
        """Beside run `run_id`: (partitions of other runs that processes `pids` of `host`
        attempted since `since`, partitions of other runs still queued or running, how many
        such runs)."""
        marks = ", ".join("?" * len(pids)) or "NULL"
        done = self.conn.execute(
            "SELECT COUNT(*) FROM attempts WHERE run_id IN (SELECT id FROM runs WHERE id != ? "
            "AND (finished_at IS NULL OR finished_at >= ?)) AND started_at >= ? AND host = ? "
            f"AND pid IN ({marks})", (run_id, since, since, host, *pids)).fetchone()[0]
        left, runs = self.conn.execute(
            "SELECT COALESCE(SUM(n), 0), COUNT(DISTINCT run_id) FROM run_counts WHERE "
            "run_id != ? AND status IN ('queued', 'running') AND n > 0", (run_id,)).fetchone()
        return done, left, runs

    def unfinished_partitions(self) -> int:
        """Partitions queued or running in any run: zero means a burst worker may stop."""
        return self.conn.execute(
            "SELECT COALESCE(SUM(n), 0) FROM run_counts WHERE status IN ('queued', 'running') "
            f"AND run_id IN (SELECT id FROM runs WHERE {OPEN_RUN})").fetchone()[0]
