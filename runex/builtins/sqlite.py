"""Built-in `sqlite` source and sink.

Source: rows of `table` in the SQLite file `path`, partitioned by rowid ranges of `rows` rows;
optional `columns` (default all) and a `where` condition. Or a `query`, read as one partition.

Sink: rows into `table` of the SQLite file `path`, the table created from the records' keys
(and widened when new keys appear). The file is put in WAL mode, so that readers, and workers
checking their commit markers, never wait for another worker's commit; `wal = false` leaves
its journal mode as it is (a new file: the rollback journal, a little faster for one writer).

`mode` says what happens to rows already there:
- `append` (the default): a run adds its rows to the table.
- `replace`: a run writes into a table of its own (`_runex_stage_<table>_<run id>`) and, when
  every partition succeeded, that table becomes `table` in one transaction (the old one is
  dropped, with its indexes): readers see the old rows or the new ones, never a mix, and a
  run that fails or is cancelled leaves the table as it was. `_runex_outputs` records which
  run's rows the table holds. When runs of one pipeline overlap, the one that began last
  wins: an older one that ends after it fails at its end, saying so.
- `upsert`, with `key = ["column", ...]`: a row whose key is in the table already replaces
  that row (a unique index on the key is made; a table with duplicate keys is refused).

Each partition commits its rows and a marker row `(run_id, partition_index)` in
`_runex_commits` in one transaction; a partition whose marker is already there writes nothing,
so a repeated partition never duplicates rows. In WAL mode a commit is not synced (SQLite's
`synchronous=NORMAL`); the sink's `sync` syncs the log once per chunk of partitions, before
runex records them as done. With `wal = false` SQLite syncs every commit itself, and `sync`
syncs the folder (see `sync_sqlite`). Rows are held in
memory up to `spill_rows`, then staged in a temporary file beside the database, so memory does
not grow with the partition and the write lock is held only for the final copy.
"""

import contextlib
import itertools
import operator
import os
import re
import sqlite3
import time

from runex import DataSourceSpec, SinkSpec
from runex.durable import fsync_dir, make_dirs, sync_log
from runex.registry import PARTITION, RUN, key_text
from runex.storage import BUSY_TIMEOUT, begin_immediate, tune


def quote(name):
    return '"' + str(name).replace('"', '""') + '"'


# -- source --------------------------------------------------------------------------------

def open_readonly(path):
    if not os.path.isfile(path):
        raise ValueError(f"no SQLite file {path!r} (looked from {os.getcwd()})")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)


def sqlite_partitions(path, table=None, query=None, rows=10_000):
    if (table is None) == (query is None):
        raise ValueError("give either table (partitioned by rowid) or query (one partition)")
    if query is not None:
        return [None]
    with open_readonly(path) as conn:
        low, high = conn.execute(f"SELECT MIN(rowid), MAX(rowid) FROM {quote(table)}").fetchone()
    if low is None:
        return []
    return ([start, start + rows] for start in range(low, high + 1, rows))  # as they are read


def read_sqlite(partition, path, table=None, query=None, columns="*", where=None):
    conn = open_readonly(path)
    try:
        if partition is None:
            cursor = conn.execute(query)
        else:
            sql = (f"SELECT {columns} FROM {quote(table)} WHERE rowid >= ? AND rowid < ?"
                   + (f" AND ({where})" if where else "") + " ORDER BY rowid")
            cursor = conn.execute(sql, partition)
        names = [d[0] for d in cursor.description]
        while rows := cursor.fetchmany(1000):
            for row in rows:
                yield dict(zip(names, row, strict=True))
    finally:
        conn.close()


def sqlite_fingerprint(partition, path, table=None, query=None, where=None):
    """A cheap change marker of a partition's rows: how many there are and their highest
    rowid (rows added or removed), and for a query's one partition the size and time of the
    file and of its write-ahead log (where the latest commits may still be). A row changed
    in place is not seen: use `fingerprint` of your own where rows are."""
    if partition is None:
        marks = []
        for name in (path, path + "-wal"):
            try:
                st = os.stat(name)
            except FileNotFoundError:
                continue
            marks += [st.st_size, st.st_mtime_ns]
        return marks
    with contextlib.closing(open_readonly(path)) as conn:
        return list(conn.execute(
            f"SELECT COUNT(*), MAX(rowid) FROM {quote(table)} WHERE rowid >= ? AND rowid < ?"
            + (f" AND ({where})" if where else ""), partition).fetchone())


sqlite_source = DataSourceSpec(name="sqlite", partitions=sqlite_partitions, read=read_sqlite,
                               fingerprint=sqlite_fingerprint)


# -- sink ----------------------------------------------------------------------------------

MARKERS = """CREATE TABLE IF NOT EXISTS _runex_commits (
    run_id TEXT NOT NULL,
    partition_index INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    committed_at REAL NOT NULL,
    PRIMARY KEY (run_id, partition_index))"""

_connections = {}  # (pid, path) -> connection, one per worker process and database


def connect(path, wal=True):
    key = (os.getpid(), os.path.abspath(path))
    conn = _connections.get(key)
    if conn is None:
        make_dirs(os.path.dirname(os.path.abspath(path)))
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        if wal:
            tune(conn, autocheckpoint=False, ours=False)  # see runex.storage
        conn.execute(MARKERS)
        _connections[key] = conn
    return conn


def sync_sqlite(ctx):
    """Make durable every commit this process made to the file so far. In WAL mode: fsync the
    write-ahead log (see `runex.durable.sync_log`). With a rollback journal SQLite synced each
    commit, but a commit ends by deleting the journal, and a power cut that undid the deletion
    would roll the commit back: the folder is synced."""
    path = os.path.abspath(ctx.params["path"])
    conn = _connections.get((os.getpid(), path))
    if conn is None:
        return  # this process wrote nothing here
    if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        sync_log(path, _logs)
    else:
        fsync_dir(os.path.dirname(path))


_logs = {}  # see `runex.durable.sync_log`


MODES = ("append", "replace", "upsert", "partition")


def configure_sqlite(path, table, spill_rows=50_000, wal=True, mode="append", key=None,
                     prune_missing=False, lineage=False):
    if not isinstance(table, str) or not table or table.startswith("_runex"):
        raise ValueError(f"table must be a name (not starting with _runex), not {table!r}")
    if not isinstance(spill_rows, int) or spill_rows < 1:
        raise ValueError("spill_rows must be a whole number >= 1")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "upsert":
        if isinstance(key, str):
            key = [key]
        if not key or not all(isinstance(k, str) and k for k in key):
            raise ValueError('mode = "upsert" needs key = ["column", ...]: the columns that '
                             "tell one row from another")
    elif key is not None:
        raise ValueError(f'key is for mode = "upsert" (mode is {mode!r})')
    if prune_missing and mode != "partition":
        raise ValueError(f'prune_missing is for mode = "partition" (mode is {mode!r})')
    return {"path": path, "table": table, "spill_rows": spill_rows, "wal": bool(wal),
            "mode": mode, "key": key, "prune_missing": bool(prune_missing),
            "lineage": bool(lineage)}


def target(ctx):
    """The table this run writes into: its stage table when it replaces `table`."""
    table = ctx.params["table"]
    if ctx.params.get("mode") == "replace":
        return stage_name(table, ctx.run_id)
    return table


def stage_name(table, run_id):
    return f"_runex_stage_{table}_{run_id}"


def committed(conn, ctx):
    return conn.execute(
        "SELECT 1 FROM _runex_commits WHERE run_id = ? AND partition_index = ?",
        (ctx.run_id, ctx.index)).fetchone() is not None


def write_sqlite(ctx, records):
    path, spill_rows = ctx.params["path"], ctx.params["spill_rows"]
    conn = connect(path, ctx.params["wal"])
    if committed(conn, ctx):
        for _ in records:  # committed by an earlier attempt: keep the counts, write nothing
            pass
        return
    columns, rows, stage, known = {}, [], None, set()
    batches = records.batches() if hasattr(records, "batches") else batched(records, 1000)
    stamp = {}  # what each row says of where it came from
    if ctx.params.get("mode") == "partition" or ctx.params.get("lineage"):
        stamp[PARTITION] = key_text(ctx.partition)
    if ctx.params.get("lineage"):
        stamp[RUN] = ctx.run_id
    if stamp:
        batches = tagged(batches, stamp)
    try:
        for batch in batches:
            if not set().union(*batch) <= known:  # a new field: columns in order of first use
                for record in batch:
                    for name in record:
                        columns.setdefault(name, len(columns))
                known = set(columns)
            rows += batch
            if len(rows) >= spill_rows:
                stage = stage or Stage(path)
                stage.add(list(columns), rows)
                rows = []
        if stage is not None:
            stage.attach(conn)  # SQLite cannot attach inside a transaction
        commit(conn, ctx, list(columns), rows, stage)
    finally:
        if stage is not None:
            stage.close(conn)


def tagged(batches, stamp):
    for batch in batches:
        for record in batch:
            record.update(stamp)
        yield batch


def batched(records, size):
    records = iter(records)
    while batch := list(itertools.islice(records, size)):
        yield batch


def as_tuples(rows, columns):
    """The rows' values in column order (None where a record lacks a column)."""
    if len(columns) > 1:
        try:
            return list(map(operator.itemgetter(*columns), rows))
        except KeyError:
            pass
    return [tuple(r.get(c) for c in columns) for r in rows]


def insert_sql(table, columns, key=None):
    return (f"INSERT INTO {table} ({', '.join(quote(c) for c in columns)}) "
            f"VALUES ({', '.join('?' * len(columns))}){on_conflict(columns, key)}")


def on_conflict(columns, key):
    """What an upsert does with a row whose key is there already: replaces its values."""
    if not key:
        return ""
    rest = [c for c in columns if c not in key]
    action = ("DO UPDATE SET " + ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in rest)
              if rest else "DO NOTHING")
    return f" ON CONFLICT ({', '.join(quote(k) for k in key)}) {action}"


def commit(conn, ctx, columns, rows, stage):
    """The rows and the partition's marker, in one transaction, unless a marker is there."""
    table, key = target(ctx), ctx.params.get("key")
    begin_immediate(conn)  # workers committing to one file take turns without long sleeps
    try:
        if committed(conn, ctx):  # another attempt got there while this one computed
            conn.execute("ROLLBACK")
            return
        count = 0
        if ctx.params.get("mode") == "partition":  # a newer commit replaces the key's rows
            if columns:
                ensure_table(conn, table, columns)
            if table_exists(conn, table) and has_column(conn, table, PARTITION):
                conn.execute(f"CREATE INDEX IF NOT EXISTS {quote('_runex_part_' + table)} ON "
                             f"{quote(table)} ({PARTITION})")
                conn.execute(f"DELETE FROM {quote(table)} WHERE {PARTITION} = ?",
                             (key_text(ctx.partition),))
        if columns:
            ensure_table(conn, table, columns, key)
            if stage is not None:
                count += stage.copy_into(conn, table, key)
            conn.executemany(insert_sql(quote(table), columns, key), as_tuples(rows, columns))
            count += len(rows)
        conn.execute(
            "INSERT INTO _runex_commits (run_id, partition_index, attempt, rows, committed_at) "
            "VALUES (?, ?, ?, ?, ?)", (ctx.run_id, ctx.index, ctx.attempt, count, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def ensure_table(conn, table, columns, key=None):
    conn.execute(f"CREATE TABLE IF NOT EXISTS {quote(table)} "
                 f"({', '.join(quote(c) for c in columns)})")
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({quote(table)})")}
    for name in columns:
        if name not in have:
            conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(name)}")
    if key:
        missing = [k for k in key if k not in have and k not in columns]
        if missing:
            raise ValueError(f"the upsert key column {missing[0]!r} is in no record; records "
                             f"have {', '.join(columns)}")
        try:
            conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {quote('_runex_key_' + table)} "
                         f"ON {quote(table)} ({', '.join(quote(k) for k in key)})")
        except sqlite3.IntegrityError:
            raise ValueError(f"table {table!r} has rows with the same key "
                             f"({', '.join(key)}) already, so it cannot be upserted into by "
                             "that key; remove the duplicates or use another table") from None


class Stage:
    """Rows of a large partition in a scratch SQLite file beside the database, in a table
    with the same columns (widened as new keys appear)."""

    def __init__(self, path):
        self.path = f"{os.path.abspath(path)}.stage-{os.getpid()}"
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        self.columns = []

    def add(self, columns, rows):
        if not self.columns:
            self.conn.execute(f"CREATE TABLE rows ({', '.join(quote(c) for c in columns)})")
        for name in columns[len(self.columns):] if self.columns else ():
            self.conn.execute(f"ALTER TABLE rows ADD COLUMN {quote(name)}")
        self.columns = list(columns)
        self.conn.execute("BEGIN")
        self.conn.executemany(insert_sql("rows", columns), as_tuples(rows, columns))
        self.conn.execute("COMMIT")

    def attach(self, conn):
        self.conn.close()
        conn.execute("ATTACH DATABASE ? AS stage", (self.path,))

    def copy_into(self, conn, table, key=None):
        names = ", ".join(quote(c) for c in self.columns)
        # "WHERE true": SQLite's parser needs it before an upsert's ON CONFLICT.
        cursor = conn.execute(f"INSERT INTO {quote(table)} ({names}) "
                              f"SELECT {names} FROM stage.rows WHERE true ORDER BY rowid"
                              + on_conflict(self.columns, key))
        return cursor.rowcount

    def close(self, conn):
        try:
            self.conn.close()
            if any(row[1] == "stage" for row in conn.execute("PRAGMA database_list")):
                conn.execute("DETACH DATABASE stage")
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)


OUTPUTS = """CREATE TABLE IF NOT EXISTS _runex_outputs (
    name TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    replaced_at REAL NOT NULL)"""


def superseded(table, newer=None):
    who = f"run {newer}" if newer else "a newer run of the pipeline"
    return (f"{who} replaced {table!r} meanwhile and dropped this run's rows, and the table "
            "holds that run's output; run the pipeline again if this one's is wanted")


def stage_run(table, name):
    """The run id of `name` if it is a stage table of `table`, else None."""
    prefix = stage_name(table, "")
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    return rest if RUN_ID.fullmatch(rest) else None


RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")


def has_column(conn, table, name):
    return any(row[1] == name for row in conn.execute(f"PRAGMA table_info({quote(table)})"))


def table_exists(conn, table):
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone() is not None


def first_commit(conn, run_id):
    return conn.execute("SELECT MIN(committed_at) FROM _runex_commits WHERE run_id = ?",
                        (run_id,)).fetchone()[0]


def finalize_sqlite(ctx):
    """`mode = "replace"`: the run's stage table becomes the table, in one transaction, if
    it holds every row the run committed (an older run's stage that a newer run dropped
    does not). `mode = "partition"` with `prune_missing`: the rows of partitions that are no
    longer in the source (not among the run's) are deleted."""
    if ctx.params.get("prune_missing"):
        prune_missing(ctx)
    if ctx.params.get("mode") != "replace":
        return
    table = ctx.params["table"]
    stage = stage_name(table, ctx.run_id)
    conn = connect(ctx.params["path"], ctx.params["wal"])
    conn.execute(OUTPUTS)
    begin_immediate(conn)
    try:
        done = conn.execute("SELECT run_id FROM _runex_outputs WHERE name = ?",
                            (table,)).fetchone()
        if done and done[0] == ctx.run_id:  # finalized before (then stopped: a full disk)
            conn.execute("ROLLBACK")
            return
        mine = first_commit(conn, ctx.run_id) or time.time()
        if done and (first_commit(conn, done[0]) or 0) > mine:
            raise RuntimeError(superseded(table, done[0]))
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = "
                                            "'table' AND name LIKE '\\_runex\\_stage\\_%' "
                                            "ESCAPE '\\'")}
        committed_rows = conn.execute("SELECT COALESCE(SUM(rows), 0) FROM _runex_commits "
                                      "WHERE run_id = ?", (ctx.run_id,)).fetchone()[0]
        staged = (conn.execute(f"SELECT COUNT(*) FROM {quote(stage)}").fetchone()[0]
                  if stage in names else 0)
        if staged != committed_rows:
            raise RuntimeError(f"{staged:,} of the {committed_rows:,} rows this run wrote are "
                               f"in {stage}: " + superseded(table))
        if stage in names:
            conn.execute(f"DROP TABLE IF EXISTS {quote(table)}")
            conn.execute(f"ALTER TABLE {quote(stage)} RENAME TO {quote(table)}")
        elif table_exists(conn, table):  # a run without rows: the table stays, empty
            conn.execute(f"DELETE FROM {quote(table)}")
        # Stages of this table's runs that began before this one: failed, cancelled or
        # superseded. (Run ids made in one second do not sort by time: first commits do.)
        for name in names:
            run_id = stage_run(table, name)
            if run_id and run_id != ctx.run_id:
                began = first_commit(conn, run_id)
                if began is not None and began <= mine:
                    conn.execute(f"DROP TABLE {quote(name)}")
        conn.execute("INSERT INTO _runex_outputs (name, run_id, replaced_at) VALUES (?, ?, ?) "
                     "ON CONFLICT (name) DO UPDATE SET run_id = excluded.run_id, "
                     "replaced_at = excluded.replaced_at", (table, ctx.run_id, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def prune_missing(ctx):
    table = ctx.params["table"]
    conn = connect(ctx.params["path"], ctx.params["wal"])
    if not table_exists(conn, table) or not has_column(conn, table, PARTITION):
        return
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS runex_keys (key TEXT PRIMARY KEY)")
    begin_immediate(conn)
    try:
        conn.execute("DELETE FROM temp.runex_keys")
        conn.executemany("INSERT OR IGNORE INTO temp.runex_keys (key) VALUES (?)",
                         ((key_text(k),) for k in ctx.partition_keys()))
        # rows without a key (written before mode = "partition") are not the source's
        conn.execute(f"DELETE FROM {quote(table)} WHERE {PARTITION} IS NOT NULL AND "
                     f"{PARTITION} NOT IN (SELECT key FROM temp.runex_keys)")
        conn.execute("DELETE FROM temp.runex_keys")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


sqlite_sink = SinkSpec(name="sqlite", write=write_sqlite, configure=configure_sqlite,
                      finalize=finalize_sqlite, sync=sync_sqlite)
