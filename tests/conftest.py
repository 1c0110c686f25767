import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest

from runex import Runex, trace
from runex.ledger import Claim, Ledger, Outcome, Recorded

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def require(ok: bool, reason: str) -> None:
    """Skip a test that needs something this machine lacks (a tool, root), except under CI
    (`RUNEX_CI=1`, set by .ci/run, which installs what the tests need): there it fails."""
    if ok:
        return
    if os.environ.get("RUNEX_CI"):
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("RUNEX_HOME", raising=False)
    monkeypatch.delenv("RUNEX_EXTENSIONS", raising=False)
    monkeypatch.delenv("RUNEX_DATABASE", raising=False)
    yield
    trace.reset()


ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    """A test that uses `database` (a module's `pytestmark = pytest.mark.usefixtures(
    "database")`) runs once per engine; one marked `sqlite_only(reason)` or
    `postgres_only(reason)` on that engine only."""
    if "database" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker
        engines = (ENGINES[:1] if marked("sqlite_only") else ENGINES[1:]
                   if marked("postgres_only") else ENGINES)
        metafunc.parametrize("database", engines, indirect=True)


@pytest.fixture
def database(request, monkeypatch):
    """The engine of the queue and ledger: SQLite in the home (None), or a schema of its own
    in a PostgreSQL server (its URL, also in RUNEX_DATABASE for every runex of the test)."""
    if request.param == "sqlite":
        yield None
        return
    url = postgres_server(request) + f"?schema=t_{os.urandom(6).hex()}"
    monkeypatch.setenv("RUNEX_DATABASE", url)
    yield url
    from runex import postgres

    postgres.drop_schema(url)


@pytest.fixture
def pg_target(request):
    """A PostgreSQL database for a `postgres` source or sink: a URL whose tables are in a
    schema of their own, dropped after the test."""
    import psycopg

    server = postgres_server(request)
    schema = f"s_{os.urandom(6).hex()}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{server}?options=-csearch_path%3D{schema}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def postgres_server(request) -> str:
    """A PostgreSQL server's URL: RUNEX_TEST_DATABASE, else a throwaway cluster started once
    for the session with the binaries on this machine (`tests/pg.py`)."""
    url = os.environ.get("RUNEX_TEST_DATABASE")
    if url:
        return url
    from tests import pg

    cluster = request.getfixturevalue("throwaway_postgres")
    require(cluster is not None, pg.MISSING)
    return cluster


@pytest.fixture(scope="session")
def throwaway_postgres():
    from tests import pg

    if pg.binaries() is None:
        yield None
        return
    with pg.cluster() as cluster:
        yield cluster.url


def children(parent: int | None = None) -> list[int]:
    """The processes that `parent` (this one) started and that still run (Linux)."""
    parent = parent or os.getpid()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_process_left():
    """A test that fails while its consumers run must not leave them running: whatever it
    started and did not stop is killed (their workers die with them)."""
    yield
    for pid in children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def traced(project: Path, *names: str) -> list[dict]:
    """The events in the home's trace files (of `names` only, if given), in file order."""
    events = [json.loads(line) for f in sorted((project / ".runex" / "traces").glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    return [e for e in events if not names or e["event"] in names]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder (runex.toml, extensions/) as the current folder."""
    write(tmp_path / "runex.toml", 'extensions = ["extensions"]\n')
    (tmp_path / "extensions").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


WORK_KERNEL = """
    import os, signal, time
    from runex import register_kernel

    @register_kernel("work")
    def work(record, pause=0.0, fail_on=-1, die_on=-1, fail_unless=""):
        if record["n"] == fail_on:
            raise ZeroDivisionError("boom")
        if record["n"] == die_on:
            os.kill(os.getpid(), signal.SIGKILL)
        if fail_unless and not os.path.exists(fail_unless):
            raise RuntimeError("not yet")
        time.sleep(pause)
        return {**record, "sq": record["n"] ** 2}
"""


def work_pipeline(project: Path, stop: int, size: int = 10, options: str = "",
                  **params: object) -> Path:
    """pipelines/p.toml: `range` through the `work` kernel (`params`) into out/sq.db, and a
    worker profile `fast` that polls and reaps often."""
    write(project / "extensions" / "k.py", WORK_KERNEL)
    write(project / "workers" / "fast.toml", "reap_every = 0.3\nmax_delay = 0.1\ngrace = 20\n")
    step = "".join(f"{k} = {json.dumps(v)}\n" for k, v in params.items())
    return write(project / "pipelines" / "p.toml",
                 f'[source]\nuse = "range"\nstop = {stop}\nsize = {size}\n\n'
                 f'[[steps]]\nuse = "work"\n{step}\n'
                 f'[sink]\nuse = "sqlite"\npath = "out/sq.db"\ntable = "sq"\n\n'
                 f"[options]\n{options}\n")


def hanging_project(root: Path) -> Path:
    """A project whose p.toml has 2 partitions, each sleeping 30 s in its kernel: what a
    Ctrl-C test interrupts."""
    write(root / "runex.toml", 'extensions = ["extensions"]\n')
    write(root / "extensions" / "slow.py", """
        import time
        from runex import register_kernel

        @register_kernel("slow")
        def slow(record):
            time.sleep(30)
            return record
    """)
    return write(root / "p.toml", '[source]\nuse = "range"\nstop = 2\nsize = 1\n\n'
                                  '[[steps]]\nuse = "slow"\n\n[sink]\nuse = "null"\n')


def drain(rx: Runex, timeout: float = 30) -> None:
    """Work the queue in this process, without a consumer, until nothing is left to do
    (retries included: tests give them a tiny retry_delay)."""
    deadline = time.monotonic() + timeout

    def too_long() -> bool:
        assert time.monotonic() < deadline, "the queue did not drain"
        return False

    rx.work(workers=0, burst=True, until=too_long)


def home_of_fixture(name: str, tmp_path: Path) -> Path:
    """A copy of tests/fixtures/NAME (a home written by an earlier runex, with the project
    that wrote it) at `tmp_path/fx`, its runs pointed at it; returns the project folder."""
    fixture = TESTS / "fixtures" / name
    project = tmp_path / "fx"  # where the project was: its runs recorded /tmp/fx
    shutil.copytree(fixture / "project", project)
    home = project / ".runex"
    home.mkdir()
    for part in ("ledger.db", "queue.db"):
        shutil.copy(fixture / part, home / part)
    shutil.copytree(fixture / "traces", home / "traces")
    with contextlib.closing(sqlite3.connect(home / "ledger.db")) as conn, conn:
        conn.execute("UPDATE runs SET project_dir = ?", (str(project),))
    return project


def ledger_rows(project: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of a query of the project's ledger, on its engine (SQLite, or RUNEX_DATABASE)."""
    ledger = Runex(root=project).ledger
    try:
        return [tuple(r) for r in ledger.conn.execute(sql, args).fetchall()]
    finally:
        ledger.close()


def claim(ledger: Ledger, run_id: str, index: int, pid: int | None = None,
          started: str | None = None, boot_id: str | None = None) -> Claim | None:
    """Claim one partition as a worker `pid` (this process by default) of this host would."""
    claims = ledger.claim_many(run_id, [index], trace.HOST, pid or os.getpid(), started,
                               boot_id=boot_id)
    return claims[0] if claims else None


def finish(ledger: Ledger, claim: Claim, status: str, **fields: object) -> Recorded:
    """Record how one attempt ended, as a worker does for a chunk of them."""
    return ledger.finish_many([Outcome(claim, status, **fields)])


# Commands that start no worker process: run in this process, through click's test runner.
IN_PROCESS = {"submit", "show", "runs", "trace", "cancel", "retry", "schedules", "extensions",
              "validate", "init", "workers", "pause", "resume", "lineage"}


def runex_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120,
              check: bool = False, child: bool = False) -> subprocess.CompletedProcess:
    """The command line. Commands that start worker processes (or `child`) run as a real
    `python -m runex` child process; the others in this process (click's `CliRunner`), which
    is the same code without the start-up."""
    command = next((a for a in args if not a.startswith("-")), "")
    if child or not (command in IN_PROCESS or (command == "backfill" and "--no-wait" in args)):
        full_env = {**os.environ, **(env or {})}
        full_env.pop("RUNEX_HOME", None) if "RUNEX_HOME" not in (env or {}) else None
        result = subprocess.run([sys.executable, "-m", "runex", *args], cwd=cwd, env=full_env,
                                capture_output=True, text=True, timeout=timeout)
    else:
        result = invoke(list(args), cwd, {"RUNEX_HOME": None, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def invoke(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from runex import cli

    before = os.getcwd()
    os.chdir(cwd)
    try:
        got = CliRunner().invoke(cli.cli, args, env=env, prog_name="runex")
    finally:
        os.chdir(before)
        trace.reset()  # as a new process would start
    stderr = got.stderr
    if got.exception is not None and not isinstance(got.exception, SystemExit):
        stderr += "".join(traceback.format_exception(got.exception))
    return subprocess.CompletedProcess(["runex", *args], got.exit_code, got.stdout, stderr)


def show(rx: Runex, run_id: str) -> dict:
    return json.loads(json.dumps(rx.show(run_id).to_dict(), default=str))
