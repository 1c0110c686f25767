"""Built-in `postgres` source and sink (they need `pip install 'runex[postgres]'`).

Source: rows of `table` in the database `url`, partitioned by ranges of `rows` values of the
whole-number column `key` (default `id`); optional `columns` (default all) and a `where`
condition. Or a `query`, read as one partition. Rows are read with a server-side cursor, so a
partition of any size is never held in memory.

Sink: rows into `table` (`schema.table` for another schema than the URL's default) of the
database `url`, the table created from the records' keys, each column typed by its first
value that is not null (whole numbers BIGINT, numbers DOUBLE PRECISION, text TEXT, true/false
BOOLEAN, lists and mappings JSONB), and widened as new keys appear. `mode` is the `sqlite`
sink's: `append`, `replace` (a stage table that becomes `table` in one transaction when the
run succeeds) or `upsert` with `key = ["column", ...]`.

A server that cannot be reached (restarting, say) interrupts the partition rather than failing
it (`runex.errors.Unreachable`): it is tried again shortly, without spending its retries.

Exactly once under any kill: each partition writes a marker row `(run_id, partition_index)`
in `_runex_commits`, first, then its rows, in one transaction. An attempt whose marker is there
already (an earlier attempt committed, or a concurrent one did meanwhile: the server makes the
second insert wait for the first transaction) writes nothing. A commit is durable when it
returns (the server syncs it), so the sink needs no `sync`.
"""

import contextlib
import os
import time

from runex import DataSourceSpec, SinkSpec
from runex.errors import Unreachable
from runex.postgres import ALIVE, first_line, is_url, lost, psycopg
from runex.registry import PARTITION, RUN, key_text


@contextlib.contextmanager
def reaching(url):
    """psycopg's errors of a server that cannot be reached, as `Unreachable`."""
    try:
        yield
    except psycopg().OperationalError as exc:
        if not lost(exc):
            raise  # the statement's own error (a deadlock, say): the partition fails
        for ddl in (False, True):
            _connections.pop((os.getpid(), url, ddl), None)
        raise Unreachable(f"the database of the postgres source or sink ({first_line(exc)})"
                          ) from exc

# -- source --------------------------------------------------------------------------------


def quote(name):
    """An identifier, or `schema.name`, quoted."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in str(name).split(".", 1))


def connect_readonly(url):
    conn = psycopg().connect(url, autocommit=False)
    conn.read_only = True
    return conn


def postgres_partitions(url, table=None, query=None, key="id", rows=10_000):
    with reaching(url):
        return _partitions(url, table, query, key, rows)


def _partitions(url, table, query, key, rows):
    if (table is None) == (query is None):
        raise ValueError("give either table (partitioned by ranges of key) or query (one "
                         "partition)")
    if not isinstance(rows, int) or rows < 1:
        raise ValueError("rows must be a whole number >= 1")
    if query is not None:
        return [None]
    with connect_readonly(url) as conn:
        low, high = conn.execute(f"SELECT MIN({quote(key)}), MAX({quote(key)}) "
                                 f"FROM {quote(table)}").fetchone()
    if low is None:
        return []
    if not isinstance(low, int):
        raise ValueError(f"key {key!r} of {table!r} must be a whole-number column, not "
                         f"{type(low).__name__}")
    return ([start, start + rows] for start in range(low, high + 1, rows))


def read_postgres(partition, url, table=None, query=None, key="id", columns="*", where=None):
    with reaching(url):
        yield from _read(partition, url, table, query, key, columns, where)


def _read(partition, url, table, query, key, columns, where):
    with connect_readonly(url) as conn, conn.cursor(name=f"runex_{os.getpid()}") as cursor:
        if partition is None:
            cursor.execute(query)
        else:
            cursor.execute(f"SELECT {columns} FROM {quote(table)} WHERE {quote(key)} >= %s AND "
                           f"{quote(key)} < %s" + (f" AND ({where})" if where else "")
                           + f" ORDER BY {quote(key)}", partition)
        names = None
        while rows := cursor.fetchmany(1000):
            names = names or [d.name for d in cursor.description]
            for row in rows:
                yield dict(zip(names, row, strict=True))


def postgres_fingerprint(partition, url, table=None, key="id", where=None):
    """A cheap change marker of a partition's rows: how many there are and the newest
    transaction that wrote one of them (`xmin`: an insert or an update in place); None for a
    query's one partition, which is then never skipped."""
    if partition is None:
        return None
    with reaching(url), connect_readonly(url) as conn:
        count, newest = conn.execute(
            f"SELECT COUNT(*), MAX(xmin::text::bigint) FROM {quote(table)} WHERE {quote(key)} "
            f">= %s AND {quote(key)} < %s" + (f" AND ({where})" if where else ""),
            partition).fetchone()
    return [count, newest]


postgres_source = DataSourceSpec(name="postgres", partitions=postgres_partitions,
                                 read=read_postgres, fingerprint=postgres_fingerprint)


# -- sink ----------------------------------------------------------------------------------

MARKERS = """CREATE TABLE IF NOT EXISTS _runex_commits (
    run_id TEXT NOT NULL,
    partition_index BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    rows BIGINT NOT NULL,
    committed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, partition_index))"""
OUTPUTS = """CREATE TABLE IF NOT EXISTS _runex_outputs (
    name TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    replaced_at DOUBLE PRECISION NOT NULL)"""
MODES = ("append", "replace", "upsert", "partition")

_connections = {}  # (pid, url, ddl) -> connection, two per worker process and database


def connect(url, ddl=False):
    """This process's connection to `url` (`ddl`: its second one, for making tables)."""
    key = (os.getpid(), url, ddl)
    conn = _connections.get(key)
    if conn is None or conn.closed or conn.broken:
        conn = psycopg().connect(url, autocommit=True, **ALIVE)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('_runex_commits'))")
            conn.execute(MARKERS)
            conn.execute(OUTPUTS)
        _connections[key] = conn
    return conn


def configure_postgres(url, table, mode="append", key=None, prune_missing=False,
                       lineage=False):
    if not is_url(url):
        raise ValueError(f"url must be a postgresql:// URL, not {url!r}")
    name = table.rsplit(".", 1)[-1] if isinstance(table, str) else ""
    if not name or name.startswith("_runex"):
        raise ValueError(f"table must be a name (not starting with _runex), not {table!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "upsert":
        key = [key] if isinstance(key, str) else key
        if not key or not all(isinstance(k, str) and k for k in key):
            raise ValueError('mode = "upsert" needs key = ["column", ...]: the columns that '
                             "tell one row from another")
    elif key is not None:
        raise ValueError(f'key is for mode = "upsert" (mode is {mode!r})')
    if prune_missing and mode != "partition":
        raise ValueError(f'prune_missing is for mode = "partition" (mode is {mode!r})')
    return {"url": url, "table": table, "mode": mode, "key": key,
            "prune_missing": bool(prune_missing), "lineage": bool(lineage)}


def target(ctx):
    """The table this run writes into: its stage table when it replaces `table`."""
    table = ctx.params["table"]
    return stage_name(table, ctx.run_id) if ctx.params["mode"] == "replace" else table


def stage_name(table, run_id):
    """`_runex_stage_<table>_<run id>`, with a hash of the table's name where the whole would
    pass PostgreSQL's 63 bytes (which would cut the run id off)."""
    schema, _, name = table.rpartition(".")
    if len(f"_runex_stage_{name}_20261128-000000-00000000".encode()) > 63:
        import hashlib  # noqa: PLC0415 - OpenSSL's library (3.7 MiB): for long names only

        name = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{schema + '.' if schema else ''}_runex_stage_{name}_{run_id}"


def column_type(value):
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "BIGINT"
    if isinstance(value, float):
        return "DOUBLE PRECISION"
    if isinstance(value, dict | list):
        return "JSONB"
    if isinstance(value, bytes):
        return "BYTEA"
    return "TEXT"


def value(v):
    return psycopg().types.json.Jsonb(v) if isinstance(v, dict | list) else v


def write_postgres(ctx, records):
    with reaching(ctx.params["url"]):
        _write(ctx, records)


def _write(ctx, records):
    conn = connect(ctx.params["url"])
    if committed(conn, ctx):
        for _ in records:  # committed by an earlier attempt: keep the counts, write nothing
            pass
        return
    table, key = target(ctx), ctx.params["key"]
    with conn.transaction():
        marked = conn.execute(
            "INSERT INTO _runex_commits (run_id, partition_index, attempt, rows, committed_at) "
            "VALUES (%s, %s, %s, 0, %s) ON CONFLICT DO NOTHING RETURNING 1",
            (ctx.run_id, ctx.index, ctx.attempt, time.time())).fetchone()
        if marked is None:  # another attempt committed meanwhile
            for _ in records:
                pass
            return
        columns, count = {}, 0
        batches = records.batches() if hasattr(records, "batches") else [list(records)]
        stamp = {}  # what each row says of where it came from
        if ctx.params["mode"] == "partition" or ctx.params.get("lineage"):
            stamp[PARTITION] = key_text(ctx.partition)
        if ctx.params.get("lineage"):
            stamp[RUN] = ctx.run_id
        if ctx.params["mode"] == "partition" and PARTITION in existing_columns(conn, table):
            # a newer commit of the key replaces its rows; commits of one key take turns
            # (two at once would each miss the rows the other has not committed yet)
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                         (f"{table} {stamp[PARTITION]}",))
            conn.execute(f"DELETE FROM {quote(table)} WHERE {PARTITION} = %s",
                         (stamp[PARTITION],))
        for batch in batches:
            for record in batch if stamp else ():
                record.update(stamp)
            fresh = {}
            for record in batch:
                for name, v in record.items():
                    if name not in columns and (name not in fresh or fresh[name] is None):
                        fresh[name] = v
            if fresh and count == 0:  # before any row: the table made apart (see ensure_columns)
                with connect(ctx.params["url"], ddl=True).transaction() as apart:
                    ensure_columns(apart.connection, table, fresh, key)
            elif fresh:  # a field first seen in a later batch: in this transaction
                widen(conn, table, fresh)
            columns.update((name, None) for name in fresh)
            names = list(columns)
            with conn.cursor() as cur:
                cur.executemany(insert_sql(table, names, key),
                                [tuple(value(r.get(c)) for c in names) for r in batch])
            count += len(batch)
        conn.execute("UPDATE _runex_commits SET rows = %s WHERE run_id = %s AND "
                     "partition_index = %s", (count, ctx.run_id, ctx.index))


def committed(conn, ctx):
    return conn.execute("SELECT 1 FROM _runex_commits WHERE run_id = %s AND "
                        "partition_index = %s", (ctx.run_id, ctx.index)).fetchone() is not None


def insert_sql(table, columns, key=None):
    sql = (f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in columns)}) "
           f"VALUES ({', '.join(['%s'] * len(columns))})")
    if key:
        rest = [c for c in columns if c not in key]
        action = ("DO UPDATE SET " + ", ".join(f"{quote(c)} = excluded.{quote(c)}"
                                               for c in rest) if rest else "DO NOTHING")
        sql += f" ON CONFLICT ({', '.join(quote(k) for k in key)}) {action}"
    return sql


def existing_columns(conn, table):
    schema, _, name = table.rpartition(".")
    return {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
        "AND NOT attisdropped", (quote(table),))} if name else set()


def ensure_columns(conn, table, sample, key):
    """The table, with a column for each key of `sample` (name: a first value), made or
    widened under a lock of its name, so that workers starting together do not race; in a
    transaction of its own, on a connection of its own, before the partition's transaction
    writes a row into the table (which would keep the table from being altered)."""
    have = existing_columns(conn, table)
    if set(sample) <= have:
        return
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (table,))
    have = existing_columns(conn, table)
    if not have:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {quote(table)} ("
                     + ", ".join(f"{quote(c)} {column_type(v)}" for c, v in sample.items())
                     + ")")
        if PARTITION in sample:
            index_partitions(conn, table)
        if key:
            missing = [k for k in key if k not in sample]
            if missing:
                raise ValueError(f"the upsert key column {missing[0]!r} is in no record; "
                                 f"records have {', '.join(sample)}")
            conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS "
                         f"{quote('_runex_key_' + table.rsplit('.', 1)[-1])} ON "
                         f"{quote(table)} ({', '.join(quote(k) for k in key)})")
        return
    widen(conn, table, sample, have)
    if PARTITION in sample and PARTITION not in have:  # mode = "partition" on a table of old
        index_partitions(conn, table)


def index_partitions(conn, table):
    """An index on the partition key column, which a commit of a key deletes its rows by."""
    conn.execute(f"CREATE INDEX IF NOT EXISTS {quote('_runex_part_' + table.rsplit('.', 1)[-1])}"
                 f" ON {quote(table)} ({PARTITION})")


def widen(conn, table, sample, have=None):
    """A column for each key of `sample` that the table lacks."""
    have = existing_columns(conn, table) if have is None else have
    for name, v in sample.items():
        if name not in have:
            conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN IF NOT EXISTS {quote(name)} "
                         f"{column_type(v)}")


def finalize_postgres(ctx):
    """`mode = "replace"`: the run's stage table becomes the table, in one transaction, if
    it holds every row the run committed. `mode = "partition"` with `prune_missing`: the rows
    of partitions that are no longer in the source (not among the run's) are deleted."""
    if ctx.params.get("prune_missing"):
        with reaching(ctx.params["url"]):
            _prune_missing(ctx)
    if ctx.params["mode"] == "replace":
        with reaching(ctx.params["url"]):
            _replace(ctx)


def _prune_missing(ctx):
    table = ctx.params["table"]
    conn = connect(ctx.params["url"])
    if PARTITION not in existing_columns(conn, table):
        return
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS runex_keys (key TEXT PRIMARY KEY) "
                     "ON COMMIT DELETE ROWS")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO runex_keys (key) VALUES (%s) ON CONFLICT DO NOTHING",
                            ((key_text(k),) for k in ctx.partition_keys()))
        # rows without a key (written before mode = "partition") are not the source's
        conn.execute(f"DELETE FROM {quote(table)} t WHERE t.{PARTITION} IS NOT NULL AND NOT "
                     f"EXISTS (SELECT 1 FROM runex_keys k WHERE k.key = t.{PARTITION})")


def _replace(ctx):
    table = ctx.params["table"]
    stage = stage_name(table, ctx.run_id)
    conn = connect(ctx.params["url"])
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (table,))
        done = conn.execute("SELECT run_id FROM _runex_outputs WHERE name = %s",
                            (table,)).fetchone()
        if done and done[0] == ctx.run_id:  # finalized before
            return
        first = "SELECT MIN(committed_at) FROM _runex_commits WHERE run_id = %s"
        mine = conn.execute(first, (ctx.run_id,)).fetchone()[0] or time.time()
        if done and (conn.execute(first, (done[0],)).fetchone()[0] or 0) > mine:
            raise RuntimeError(f"run {done[0]} replaced {table!r} meanwhile; run the pipeline "
                               "again if this one's output is wanted")
        rows = conn.execute("SELECT COALESCE(SUM(rows), 0)::bigint FROM _runex_commits "
                            "WHERE run_id = %s", (ctx.run_id,)).fetchone()[0]
        exists = conn.execute("SELECT to_regclass(%s)", (quote(stage),)).fetchone()[0]
        staged = conn.execute(f"SELECT COUNT(*) FROM {quote(stage)}").fetchone()[0] \
            if exists else 0
        if staged != rows:
            raise RuntimeError(f"{staged:,} of the {rows:,} rows this run wrote are in "
                               f"{stage}: a newer run replaced {table!r} meanwhile")
        if exists:
            conn.execute(f"DROP TABLE IF EXISTS {quote(table)}")
            conn.execute(f"ALTER TABLE {quote(stage)} RENAME TO "
                         f"{quote(table.rsplit('.', 1)[-1])}")
        elif conn.execute("SELECT to_regclass(%s)", (quote(table),)).fetchone()[0]:
            conn.execute(f"DELETE FROM {quote(table)}")  # a run without rows
        # Stages of this table's runs that began before this one: failed, cancelled or
        # superseded.
        schema, _, name = stage_name(table, "").rpartition(".")
        for (other,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = COALESCE(NULLIF(%s, ''), "
                "current_schema()) AND starts_with(tablename, %s)", (schema, name)).fetchall():
            began = conn.execute(first, (other[len(name):],)).fetchone()[0]
            if began is not None and began <= mine:
                conn.execute(f"DROP TABLE {quote((schema + '.' if schema else '') + other)}")
        conn.execute("INSERT INTO _runex_outputs (name, run_id, replaced_at) VALUES "
                     "(%s, %s, %s) ON CONFLICT (name) DO UPDATE SET run_id = excluded.run_id, "
                     "replaced_at = excluded.replaced_at", (table, ctx.run_id, time.time()))


postgres_sink = SinkSpec(name="postgres", write=write_postgres, configure=configure_postgres,
                         finalize=finalize_postgres)
