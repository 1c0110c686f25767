"""Several hosts on one queue and ledger (`RUNEX_HOST` names each, on this one machine): code
drift between hosts, a host that dies whole, connections that drop."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from runex import Runex

from .conftest import drain, ledger_rows, runex_cli, traced, work_pipeline, write
from .test_recovery import wait_for

pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL


def host(project, name, workers=1, *args):
    """A consumer of host `name`, in its own process group (all of it dies at once)."""
    return subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", str(workers),
                             "--profile", "fast", *args], cwd=project,
                            env={**os.environ, "RUNEX_HOST": name}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def kill_host(proc):
    os.killpg(proc.pid, signal.SIGKILL)  # every process of the host at once: a power cut
    proc.wait(timeout=30)


def show(project, run_id):
    return json.loads(runex_cli("show", run_id, "--json", "--partitions", cwd=project,
                                check=True).stdout)


@pytest.mark.slow
def test_a_host_with_other_code_refuses_the_run_or_warns(project):
    work_pipeline(project, stop=20, options="retries = 0")
    submit = runex_cli("submit", "pipelines/p.toml", cwd=project, child=True,
                       env={"RUNEX_HOST": "board-a"}, check=True)
    run_id = submit.stdout.strip()
    kernel = project / "extensions" / "k.py"
    kernel.write_text(kernel.read_text() + "\n# board-b's copy, edited since\n")
    runex_cli("worker", "--burst", "-w", "1", cwd=project, env={"RUNEX_HOST": "board-b"},
              check=True)
    data = show(project, run_id)
    assert data["status"] == "failed"
    error = data["partitions"][0]["attempts"][0]["error"]
    assert error.startswith(f"CodeDrift: code drift: run {run_id} was submitted on board-a "
                            "with code version ")
    assert ", this host (board-b) has " in error and "files that differ: extensions/k.py;" in error
    assert 'set code_drift = "warn" in runex.toml' in error

    write(project / "runex.toml", 'extensions = ["extensions"]\ncode_drift = "warn"\n')
    runex_cli("retry", run_id, cwd=project, check=True)
    runex_cli("worker", "--burst", "-w", "1", cwd=project, env={"RUNEX_HOST": "board-b"},
              check=True)
    assert show(project, run_id)["status"] == "succeeded"
    warned = traced(project, "code.drifted")
    assert len(warned) == 1 and "files that differ: extensions/k.py" in warned[0]["message"]


def test_a_run_queued_before_runex_was_upgraded_runs_with_the_new_runex(project):
    """Only runex's own files differ from the run's (an upgrade since it was queued): it
    runs, and the log says which changed; the extension files are the run's."""
    work_pipeline(project, stop=20, options="retries = 0")
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    code = json.loads(ledger_rows(project, "SELECT code FROM runs")[0][0])
    assert "runex/builtins/basic.py" in code["files"] and "extensions/k.py" in code["files"]
    code["files"]["runex/builtins/basic.py"] = "0" * 12  # as an earlier runex had it
    code["version"] = "0" * 12
    with rx.ledger.tx() as conn:
        conn.execute("UPDATE runs SET code = ? WHERE id = ?", (json.dumps(code), run_id))
    drain(rx)
    assert rx.show(run_id).status == "succeeded"
    (warned,) = traced(project, "code.drifted")
    assert "files that differ: runex/builtins/basic.py;" in warned["message"]
    assert warned["message"].endswith("running it with this runex (only runex's own files "
                                      "differ)")


@pytest.mark.slow
def test_the_partitions_of_a_host_that_died_whole_go_to_another_when_its_leases_end(project):
    write(project / "runex.toml", 'extensions = ["extensions"]\nlease = "2s"\n')
    work_pipeline(project, stop=40, size=10, options="batch_size = 1", pause=0.1)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    a = host(project, "board-a", workers=2)
    try:
        wait_for(lambda: len(ledger_rows(project, "SELECT 1 FROM attempts WHERE status = "
                                         "'running'")) == 2)
        kill_host(a)
        died = time.time()
        b = host(project, "board-b")
        try:
            wait_for(lambda: ledger_rows(project, "SELECT status FROM runs")[0][0]
                     == "succeeded")
        finally:
            kill_host(b)
    finally:
        if a.poll() is None:
            kill_host(a)
    lost = ledger_rows(project, "SELECT host, error, finished_at FROM attempts WHERE "
                       "status = 'lost'")
    assert len(lost) == 2 and {h for h, _, _ in lost} == {"board-a"}
    assert all("lease of worker pid" in e and "on board-a expired" in e for _, e, _ in lost)
    assert all(t >= died + 1 for _, _, t in lost)  # not before the lease ran out
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT n) FROM sq").fetchone() == (40, 40)
    done = {p["index"]: [a["host"] for a in p["attempts"]] for p in show(project, run_id)[
        "partitions"]}
    assert sum(hosts[-1] == "board-b" for hosts in done.values()) >= 2


@pytest.mark.slow
@pytest.mark.postgres_only("a SQLite file has no connection to drop")
def test_dropped_database_connections_lose_and_double_nothing(project, database):
    import psycopg

    work_pipeline(project, stop=60, size=10, options="batch_size = 1", pause=0.02)
    run_id = runex_cli("submit", "pipelines/p.toml", cwd=project, check=True).stdout.strip()
    a = host(project, "board-a", workers=2)
    server = database.split("?")[0]
    dropped = 0
    try:
        for _ in range(3):
            wait_for(lambda: ledger_rows(project, "SELECT 1 FROM attempts WHERE status = "
                                         "'running'"))
            with psycopg.connect(server, autocommit=True) as conn:  # all but this one
                dropped += conn.execute(
                    "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM "
                    "pg_stat_activity WHERE pid != pg_backend_pid() AND datname = "
                    "current_database() AND backend_type = 'client backend' AND "
                    "application_name = ''").fetchone()[0]
            time.sleep(0.3)
        wait_for(lambda: ledger_rows(project, "SELECT status FROM runs")[0][0] == "succeeded",
                 timeout=120)
    finally:
        kill_host(a)
    assert dropped >= 3
    with sqlite3.connect(project / "out" / "sq.db") as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT n) FROM sq").fetchone() == (60, 60)
    data = show(project, run_id)
    assert data["counts"] == {"succeeded": 6} and data["records_out"] == 60


@pytest.mark.slow
@pytest.mark.postgres_only("stops a PostgreSQL server of its own")
def test_a_worker_cut_off_from_the_database_past_its_lease_commits_nothing(
        project, database, monkeypatch):
    from . import pg
    from .conftest import require

    require(pg.binaries() is not None, pg.MISSING)
    with pg.cluster() as server:
        monkeypatch.setenv("RUNEX_DATABASE", server.url + "?schema=cut")
        write(project / "runex.toml", 'extensions = ["extensions"]\nlease = "3s"\n')
        work_pipeline(project, stop=2, size=2, options="batch_size = 1", pause=2)  # 4 s
        run_id = runex_cli("submit", "pipelines/p.toml", cwd=project,
                           check=True).stdout.strip()
        a = host(project, "board-a")
        try:
            wait_for(lambda: ledger_rows(project, "SELECT 1 FROM attempts WHERE status = "
                                         "'running'"))
            server.stop()  # for longer than the lease: the worker must not commit
            time.sleep(7)
            with sqlite3.connect(project / "out" / "sq.db") as conn:  # made, nothing in it
                assert conn.execute("SELECT COUNT(*) FROM _runex_commits").fetchone() == (0,)
            server.start()
            wait_for(lambda: ledger_rows(project, "SELECT status FROM runs")[0][0]
                     == "succeeded", timeout=120)
        finally:
            kill_host(a)
        _, err = a.communicate()
        assert "lease.lost" in err.decode(), err.decode()
        attempts = ledger_rows(project, "SELECT status, error FROM attempts ORDER BY attempt")
        assert [s for s, _ in attempts] == ["lost", "succeeded"]
        with sqlite3.connect(project / "out" / "sq.db") as conn:
            assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT n) FROM sq").fetchone() == (
                2, 2)
        assert show(project, run_id)["status"] == "succeeded"


def test_a_run_whose_finalizing_host_died_is_finalized_once_that_lease_ends(project):
    from runex import Runex, reaper

    from .conftest import claim, finish

    work_pipeline(project, stop=10, size=10)
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    assert finish(rx.ledger, claim(rx.ledger, run_id, 0), "succeeded", records_in=10,
                  records_out=10).complete
    assert rx.ledger.claim_finalize(run_id, "board-b:4242::")  # then board-b lost its power
    state = rx.prepare_workers()
    reaper.reap_unfinalized(state)
    assert rx.ledger.run(run_id)["status"] == "running"  # its lease is not over: still its
    with rx.ledger.tx() as conn:  # the lease ran out
        conn.execute("UPDATE runs SET finalizer_until = ? WHERE id = ?", (time.time() - 1,
                                                                         run_id))
    reaper.reap_unfinalized(state)
    assert rx.ledger.run(run_id)["status"] == "succeeded"
