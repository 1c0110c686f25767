"""PostgreSQL: the built-in `postgres` source and sink, and the commands on both engines."""

import json
import os

import psycopg
import pytest

from runex import Runex
from runex.errors import ConfigError

from .conftest import drain, runex_cli, write

KERNEL = """
    from runex import register_kernel

    @register_kernel("double")
    def double(record):
        return {**record, "twice": record["v"] * 2, "tags": {"even": record["v"] % 2 == 0}}
"""


def pipeline(project, url, sink):
    write(project / "extensions" / "k.py", KERNEL)
    return write(project / "p.toml", f"""
        [source]
        use = "postgres"
        url = "{url}"
        table = "items"
        rows = 1000

        [[steps]]
        use = "double"

        [sink]
        use = "postgres"
        url = "{url}"
        {sink}
    """)


def fill(url, n):
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE items (id BIGINT PRIMARY KEY, v BIGINT)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO items VALUES (%s, %s)", [(i, i * 10) for i in range(
                1, n + 1)])


def query(url, sql):
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def test_a_table_read_by_key_ranges_replaces_a_table_once_per_run(project, pg_target):
    fill(pg_target, 2500)
    pipeline(project, pg_target, 'table = "out"\nmode = "replace"')
    rx = Runex()
    for _ in range(2):  # the second run replaces the first's rows
        run_id = rx.submit("p.toml")
        drain(rx)
        run = rx.show(run_id)
        assert (run.status, len(run.partitions), run.records_out) == ("succeeded", 3, 2500)
    assert query(pg_target, "SELECT COUNT(*), COUNT(DISTINCT id), SUM(twice) FROM out")[0] == (
        2500, 2500, sum(i * 20 for i in range(1, 2501)))
    types = dict(query(pg_target, "SELECT column_name, data_type FROM information_schema."
                       "columns WHERE table_name = 'out'"))
    assert types == {"id": "bigint", "v": "bigint", "twice": "bigint", "tags": "jsonb"}
    assert query(pg_target, "SELECT tags FROM out WHERE id = 2") == [({"even": True},)]
    stages = query(pg_target, "SELECT tablename FROM pg_tables WHERE tablename LIKE "
                   "'\\_runex\\_stage%'")
    assert stages == []


def test_an_incremental_run_rereads_only_the_key_ranges_whose_rows_changed(project,
                                                                           pg_target):
    fill(pg_target, 2500)  # three ranges of ids: 1-1000, 1001-2000, 2001-2500
    path = pipeline(project, pg_target, 'table = "out"\nmode = "partition"\n'
                    "prune_missing = true\nlineage = true")
    path.write_text(path.read_text() + "\n[options]\nincremental = true\n")
    rx = Runex()

    def run():
        run_id = rx.submit("p.toml")
        drain(rx)
        assert rx.show(run_id).status == "succeeded"
        return run_id, rx.show(run_id).counts

    first, counts = run()
    assert counts == {"succeeded": 3}
    assert run()[1] == {"skipped": 3}
    with psycopg.connect(pg_target) as conn:  # a row of the second range changed in place
        conn.execute("UPDATE items SET v = 7 WHERE id = 1500")
    changed, counts = run()
    assert counts == {"skipped": 2, "succeeded": 1}
    assert query(pg_target, "SELECT twice, _runex_run, _runex_partition FROM out "
                 "WHERE id = 1500") == [(14, changed, "[1001,2001]")]
    assert query(pg_target, "SELECT COUNT(*), COUNT(DISTINCT id) FROM out")[0] == (2500, 2500)
    found = rx.lineage(db=pg_target, table="out", rowid=1500)  # where the row came from
    assert (found["run_id"], found["partition"]["key"]) == (changed, [1001, 2001])
    assert json.loads(runex_cli("lineage", "--db", pg_target, "--table", "out", "--rowid",
                                "1500", "--json", cwd=project, check=True).stdout) == found
    assert query(pg_target, "SELECT DISTINCT _runex_run FROM out WHERE id < 1001") == [
        (first,)]  # the unchanged ranges' rows are the first run's
    with psycopg.connect(pg_target) as conn:  # the last range is gone from the source
        conn.execute("DELETE FROM items WHERE id > 2000")
    assert run()[1] == {"skipped": 2}
    assert query(pg_target, "SELECT COUNT(*), MAX(id) FROM out")[0] == (2000, 2000)


def test_upsert_replaces_rows_by_key_and_a_repeated_partition_writes_nothing(project, pg_target):
    fill(pg_target, 1500)
    pipeline(project, pg_target, 'table = "out"\nmode = "upsert"\nkey = ["id"]')
    rx = Runex()
    first = rx.submit("p.toml")
    drain(rx)
    with psycopg.connect(pg_target) as conn:
        conn.execute("UPDATE items SET v = 0 WHERE id = 1")
    rx.submit("p.toml")
    drain(rx)
    assert query(pg_target, "SELECT COUNT(*) FROM out")[0][0] == 1500
    assert query(pg_target, "SELECT twice FROM out WHERE id = 1") == [(0,)]
    # A partition of the first run, committed already, written again: nothing changes.
    from runex.builtins.postgres import configure_postgres, write_postgres
    from runex.registry import SinkContext

    params = configure_postgres(pg_target, "out", mode="upsert", key=["id"])
    write_postgres(SinkContext(first, "p", params, [1, 1001], 0, 9), iter([{"id": 1, "v": 5}]))
    assert query(pg_target, "SELECT twice FROM out WHERE id = 1") == [(0,)]
    assert query(pg_target, f"SELECT attempt FROM _runex_commits WHERE run_id = '{first}' "
                 "AND partition_index = 0") == [(1,)]


def test_json_output_has_the_same_shape_on_both_engines(tmp_path, request, monkeypatch):
    from .conftest import WORK_KERNEL

    def shapes(folder, database):
        write(folder / "runex.toml", 'extensions = ["extensions"]\n'
              + (f'database = "{database}"\n' if database else ""))
        write(folder / "extensions" / "k.py", WORK_KERNEL)
        write(folder / "p.toml", '[source]\nuse = "range"\nstop = 20\nsize = 5\n\n'
              '[[steps]]\nuse = "work"\nfail_on = 7\n\n[sink]\nuse = "null"\n\n'
              '[options]\nretries = 0\n')
        monkeypatch.chdir(folder)
        rx = Runex()
        run_id = rx.submit("p.toml")
        drain(rx)
        out = {}
        for args in (["show", run_id], ["runs"], ["trace", run_id], ["schedules"],
                     ["retry", run_id]):
            got = runex_cli(*args, "--json", cwd=folder, check=True).stdout
            out[args[0]] = shape(json.loads(got))
        return out

    url = request.getfixturevalue("pg_target").split("?")[0] + f"?schema=t_{os.urandom(6).hex()}"
    try:
        assert shapes(tmp_path / "a", None) == shapes(tmp_path / "b", url)
    finally:
        from runex import postgres

        postgres.drop_schema(url)


def shape(value):
    """The keys and types of a JSON value, not its values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else (
        type(value).__name__)


def test_a_bad_database_url_names_where_it_came_from(project, monkeypatch):
    monkeypatch.setenv("RUNEX_DATABASE", "mysql://x")
    with pytest.raises(ConfigError, match="from --database or RUNEX_DATABASE"):
        Runex()
    monkeypatch.delenv("RUNEX_DATABASE")
    write(project / "runex.toml", 'database = "sqlite:///x"\n')
    with pytest.raises(ConfigError, match="runex.toml: key 'database' must be a PostgreSQL URL"):
        Runex()


def test_an_unreachable_server_is_a_clear_error(project, monkeypatch):
    result = runex_cli("runs", "--database", "postgresql://nobody@127.0.0.1:1/x", cwd=project)
    assert result.returncode != 0
    assert "cannot reach the database postgresql://nobody@127.0.0.1:1/x" in result.stderr


@pytest.mark.slow
def test_migrate_copies_a_sqlite_home_into_postgresql_and_work_goes_on_there(
        tmp_path, request, monkeypatch):
    import subprocess
    import sys
    import time

    from runex import postgres

    from .conftest import home_of_fixture, postgres_server

    project = home_of_fixture("home-schema-4", tmp_path)  # 4 runs, one queued, a fire
    home = project / ".runex"
    monkeypatch.chdir(project)
    url = postgres_server(request) + f"?schema=t_{os.urandom(6).hex()}"
    before = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    try:
        consumer = subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "1"],
                                    cwd=project, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(100):  # registered in the ledger
                if "consumer.started" in (consumer.stderr.readline() or ""):
                    break
            refused = runex_cli("migrate", "--to", url, cwd=project)
        finally:
            consumer.terminate()
            consumer.wait(30)
        assert refused.returncode != 0
        assert f"consumers are working on {home} (pid {consumer.pid} on " in refused.stderr
        # Meanwhile that consumer ran the queued run: queue another to be migrated.
        queued = runex_cli("submit", "pipelines/example.toml", cwd=project,
                           check=True).stdout.strip()
        time.sleep(0.01)
        result = runex_cli("migrate", "--to", url, cwd=project, check=True)
        assert "copied 5 runs (10 partitions, 8 attempts, 1 fire)" in result.stdout
        assert "2 partitions queued there" in result.stdout
        again = runex_cli("migrate", "--to", url, cwd=project)
        assert again.returncode != 0 and "holds 5 runs, 10 partitions" in again.stderr

        monkeypatch.setenv("RUNEX_DATABASE", url)
        after = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
        assert [r["id"] for r in after] == [queued] + [r["id"] for r in before]
        assert [r["status"] for r in after[1:]] == ["succeeded", "succeeded", "failed",
                                                    "succeeded"]
        schedules = json.loads(runex_cli("schedules", "--json", cwd=project,
                                         check=True).stdout)
        assert schedules[0]["last"]["fire_time"] == "2026-11-26T06:00:00Z"
        runex_cli("worker", "--burst", "-w", "1", cwd=project, check=True)
        done = json.loads(runex_cli("show", queued, "--json", cwd=project, check=True).stdout)
        assert done["status"] == "succeeded" and done["records_out"] == 43
    finally:
        postgres.drop_schema(url)


def test_doctor_checks_the_database_server(project, request):
    from runex import postgres

    from .conftest import postgres_server

    url = postgres_server(request) + f"?schema=t_{os.urandom(6).hex()}"
    try:
        found = json.loads(runex_cli("doctor", "--json", "--database", url, cwd=project,
                                     check=True).stdout)
        [database] = [f for f in found if f["check"] == "database"]
        assert database["status"] == "ok" and database["detail"].startswith("PostgreSQL ")
        assert url.split("?")[0] in database["detail"]
    finally:
        postgres.drop_schema(url)
    gone = runex_cli("doctor", "--json", "--database", "postgresql://nobody@127.0.0.1:1/x",
                     cwd=project)
    assert gone.returncode == 1
    [database] = [f for f in json.loads(gone.stdout) if f["check"] == "database"]
    assert database["status"] == "fail" and "cannot reach the database" in database["detail"]
