"""Built-in `sqlite` source and sink.

Source: rows of `table` in the SQLite file `path`, partitioned by rowid ranges of `rows` rows;
optional `columns` (default all) and a `where` condition. Or a `query`, read as one partition.

Sink: rows into `table` of the SQLite file `path`, the table created from the records' keys
(and widened when new keys appear). The file is put in WAL mode, so that readers, and workers
checking their commit markers, never wait for another worker's commit; `wal = false` leaves
its journal mode as it is (a new file: the rollback journal, a little faster for one writer).

Each partition commits its rows and a marker row `(run_id, partition_index)` in
`_runex_commits` in one transaction; a partition whose marker is already there writes nothing,
so a repeated partition never duplicates rows. In WAL mode a commit is not synced (SQLite's
`synchronous=NORMAL`); the sink's `sync` syncs the log once per chunk of partitions, before
runex records them as done. With `wal = false` SQLite syncs every commit itself, and `sync`
syncs the folder (see `sync_sqlite`). Rows are held in
memory up to `spill_rows`, then staged in a temporary file beside the database, so memory does
not grow with the partition and the write lock is held only for the final copy.
"""

import itertools
import operator
import os
import sqlite3
import time

from runex import DataSourceSpec, SinkSpec
from runex.durable import fsync_dir, make_dirs, sync_log
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
    return [[start, start + rows] for start in range(low, high + 1, rows)]


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


sqlite_source = DataSourceSpec(name="sqlite", partitions=sqlite_partitions, read=read_sqlite)


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
            tune(conn, autocheckpoint=False)  # see runex.storage
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


def configure_sqlite(path, table, spill_rows=50_000, wal=True):
    if not isinstance(table, str) or not table or table.startswith("_runex"):
        raise ValueError(f"table must be a name (not starting with _runex), not {table!r}")
    if not isinstance(spill_rows, int) or spill_rows < 1:
        raise ValueError("spill_rows must be a whole number >= 1")
    return {"path": path, "table": table, "spill_rows": spill_rows, "wal": bool(wal)}


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
    columns, rows, stage, keys = {}, [], None, None
    batches = records.batches() if hasattr(records, "batches") else batched(records, 1000)
    try:
        for batch in batches:
            for record in batch:
                if record.keys() != keys:  # most records have the keys of the one before
                    keys = record.keys()
                    for name in keys:
                        columns.setdefault(name, len(columns))
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


def insert_sql(table, columns):
    return (f"INSERT INTO {table} ({', '.join(quote(c) for c in columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})")


def commit(conn, ctx, columns, rows, stage):
    """The rows and the partition's marker, in one transaction, unless a marker is there."""
    table = ctx.params["table"]
    begin_immediate(conn)  # workers committing to one file take turns without long sleeps
    try:
        if committed(conn, ctx):  # another attempt got there while this one computed
            conn.execute("ROLLBACK")
            return
        count = 0
        if columns:
            ensure_table(conn, table, columns)
            if stage is not None:
                count += stage.copy_into(conn, table)
            conn.executemany(insert_sql(quote(table), columns), as_tuples(rows, columns))
            count += len(rows)
        conn.execute(
            "INSERT INTO _runex_commits (run_id, partition_index, attempt, rows, committed_at) "
            "VALUES (?, ?, ?, ?, ?)", (ctx.run_id, ctx.index, ctx.attempt, count, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def ensure_table(conn, table, columns):
    conn.execute(f"CREATE TABLE IF NOT EXISTS {quote(table)} "
                 f"({', '.join(quote(c) for c in columns)})")
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({quote(table)})")}
    for name in columns:
        if name not in have:
            conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(name)}")


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

    def copy_into(self, conn, table):
        names = ", ".join(quote(c) for c in self.columns)
        cursor = conn.execute(f"INSERT INTO {quote(table)} ({names}) "
                              f"SELECT {names} FROM stage.rows ORDER BY rowid")
        return cursor.rowcount

    def close(self, conn):
        try:
            self.conn.close()
            if any(row[1] == "stage" for row in conn.execute("PRAGMA database_list")):
                conn.execute("DETACH DATABASE stage")
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)


sqlite_sink = SinkSpec(name="sqlite", write=write_sqlite, configure=configure_sqlite,
                      sync=sync_sqlite)
