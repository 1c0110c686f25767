"""Bugs a new user hit, each pinned by a test that failed before its fix."""

import json
import os
import sqlite3
from pathlib import Path

import pytest

from runex import Runex, trace

from .conftest import drain, finish, runex_cli, show, write
from .test_execution import EXT, pipeline


def setup(project):
    write(project / "extensions" / "k.py", EXT)
    return Runex()


@pytest.mark.slow
def test_show_prints_attempts_that_have_no_traceback(project):
    """An interrupted or lost attempt has an error but no traceback: `show` (and `-v`) print
    it without crashing."""
    rx = setup(project)
    run_id = rx.submit(pipeline(project, stop=20, size=10, sink='use = "null"'))
    claims = rx.ledger.claim_many(run_id, [0, 1], trace.HOST, 1, None)
    finish(rx.ledger, claims[0], "interrupted", error="the worker was stopped", requeue=True)
    assert rx.ledger.lose_attempt(run_id, 1, 1, "worker pid 1 on x is gone", 3).status == "queued"
    drain(rx)
    for args in (["show", run_id], ["-v", "show", run_id]):
        result = runex_cli(*args, cwd=project)
        assert result.returncode == 0, result.stderr
        assert "attempt 1 (interrupted, pid 1" in result.stdout
        assert "the worker was stopped" in result.stdout
    assert "attempt 1 (lost, pid 1" in runex_cli("-v", "show", run_id, cwd=project).stdout


def test_partitions_that_timed_out_can_be_retried(project):
    rx = setup(project)
    path = pipeline(project, '[[steps]]\nuse = "slow"\nseconds = 0.2', stop=20, size=10,
                    sink='use = "null"', options='timeout = "100ms"')
    run_id = rx.submit(path)
    drain(rx)
    data = show(rx, run_id)
    assert data["status"] == "failed"
    assert [p["status"] for p in data["partitions"]] == ["timeout", "timeout"]
    assert rx.retry(run_id, 0) == [0]
    assert rx.retry(run_id) == [1]


def test_a_run_without_partitions_succeeds_with_zero_counts_and_finalizes(project):
    rx = setup(project)
    path = pipeline(project, stop=0,
                    sink='use = "jsonl"\npath = "out/parts"\nmerge = "out/all.jsonl"')
    run_id = rx.submit(path)
    data = show(rx, run_id)
    assert data["status"] == "succeeded" and data["partition_count"] == 0
    assert (data["records_in"], data["records_out"]) == (0, 0)
    assert data["seconds"] is not None
    assert (project / "out" / "all.jsonl").read_text() == ""  # finalize ran: merged nothing
    out = runex_cli("show", run_id, cwd=project, check=True).stdout
    assert "None" not in out


def test_run_totals_count_only_what_was_committed(project):
    """Records read by an attempt that failed are not in the run's totals; a running run
    shows what is committed so far, not None."""
    rx = setup(project)
    run_id = rx.submit(pipeline(project, '[[steps]]\nuse = "fragile"\nbad = 15', stop=30,
                                size=10))
    running = show(rx, run_id)
    assert (running["records_in"], running["records_out"]) == (0, 0)
    drain(rx)
    data = show(rx, run_id)
    assert data["status"] == "failed"
    assert [p["status"] for p in data["partitions"]] == ["succeeded", "failed", "succeeded"]
    assert (data["records_in"], data["records_out"]) == (20, 20)


def test_a_csv_file_with_a_byte_order_mark(project, tmp_path):
    """Spreadsheet programs save CSV with a byte-order mark: it is not part of the first
    column's name, with or without chunks."""
    from runex.extensions import load

    source = load([]).source("csv")
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffid,name\n1,a\n2,b\n".encode())
    os.chdir(tmp_path)
    for chunk_bytes in (None, 6):
        keys = source.partitions(path="bom.csv", chunk_bytes=chunk_bytes)
        records = [r for key in keys for r in source.read(key)]
        assert records == [{"id": "1", "name": "a"}, {"id": "2", "name": "b"}], chunk_bytes
    lines = load([]).source("jsonl")
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"a": 1}\n'.encode())
    assert list(lines.read("bom.jsonl")) == [{"a": 1}]


def test_json_and_sqlite_of_a_run_without_partitions(project):
    rx = setup(project)
    run_id = rx.submit(pipeline(project, stop=0))
    with sqlite3.connect(project / ".runex" / "ledger.db") as conn:
        row = conn.execute("SELECT status, records_in, records_out FROM runs").fetchone()
    assert row == ("succeeded", 0, 0)
    data = json.loads(runex_cli("show", run_id, "--json", cwd=project, check=True).stdout)
    assert data["partitions"] == []


@pytest.mark.slow
def test_a_parameter_of_the_wrong_type_is_refused_at_submit(project):
    """Found at submit (exit 3, nothing stored), not after every retry is spent."""
    write(project / "extensions" / "k.py", """
        from runex import register_kernel

        @register_kernel("longer")
        def longer(record, min_length=3):
            return record if len(str(record["n"])) >= min_length else None

        @register_kernel("scale")
        def scale(record, by: float = 1, label: "str" = ""):
            return {**record, "x": record["n"] * by}
    """)
    write(project / "p.toml", '[source]\nuse = "range"\nstop = 10\n\n[[steps]]\nuse = "longer"'
                              '\n\n[[steps]]\nuse = "scale"\n\n[sink]\nuse = "null"\n')
    bad = runex_cli("submit", "p.toml", "-p", "steps.0.min_length=three", cwd=project)
    assert bad.returncode == 3, bad.stderr
    assert ("steps[0] (kernel 'longer', extensions/k.py:3): parameter 'min_length' must be "
            "int (its default is 3), not 'three'") in bad.stderr
    assert "must be float (annotated float), not True" in runex_cli(
        "submit", "p.toml", "-p", "steps.1.by=true", cwd=project).stderr
    assert "must be str (annotated str), not 5" in runex_cli(
        "submit", "p.toml", "-p", "steps.1.label=5", cwd=project).stderr
    assert not (project / ".runex" / "ledger.db").exists() or json.loads(runex_cli(
        "runs", "--json", cwd=project, check=True).stdout) == []
    ok = runex_cli("submit", "p.toml", "-p", "steps.1.by=2", "-p", "steps.0.min_length=1",
                   cwd=project)
    assert ok.returncode == 0, ok.stderr  # an int where a float is asked is fine


@pytest.mark.slow
def test_config_and_profiles_are_checked_key_by_key(project):
    from runex.errors import EXIT_INVALID

    write(project / "extensions" / "k.py", EXT)
    write(project / "p.toml", '[source]\nuse = "range"\nstop = 10\n\n[sink]\nuse = "null"\n')
    cases = {
        "workers/bad.toml": ('workers = "two"\n',
                             "key 'workers' must be a whole number of at least 1, not 'two'"),
        "workers/zero.toml": ("workers = 0\n", "key 'workers' must be a whole number"),
        "workers/slow.toml": ('max_delay = "fast"\n',
                              "key 'max_delay' must be a number of seconds above 0"),
        "workers/neg.toml": ("grace = -5\n", "key 'grace' must be a number of seconds, 0 or"),
    }
    for file, (text, message) in cases.items():
        write(project / file, text)
        result = runex_cli("run", "p.toml", "--profile", file.split("/")[1][:-5], cwd=project)
        assert result.returncode == EXIT_INVALID, (file, result.stderr)
        assert f"{project / file}: {message}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    for text, message in (('home = 5\nextensions = ["extensions"]\n',
                           "key 'home' must be a folder name, not 5"),
                          ('extension = ["extensions"]\n',
                           "unknown key(s) extension; runex.toml accepts: code_drift, database, "
                           "extensions, home, lease, pipelines")):
        write(project / "runex.toml", text)
        result = runex_cli("runs", cwd=project)
        assert result.returncode == EXIT_INVALID, result.stderr
        assert f"{project / 'runex.toml'}: {message}" in result.stderr, result.stderr


BAD_EXTENSIONS = """
    from runex import DataSourceSpec, SinkSpec, register_kernel

    @register_kernel("nothing")
    def nothing():
        return {}

    @register_kernel("word")
    def word(record):
        return record["n"] == 3 and "three" or record

    strings = DataSourceSpec(name="strings", read=lambda partition: iter(["a", "b"]))
    unconfigured = SinkSpec(name="unconfigured", write=lambda ctx, records: None,
                            configure=lambda path: None)
    one_argument = SinkSpec(name="one_argument", write=lambda records: None)
"""


@pytest.mark.slow
def test_signatures_and_configure_are_checked_at_validate(project):
    write(project / "extensions" / "bad.py", BAD_EXTENSIONS)
    cases = [
        ('[source]\nuse = "range"\nstop = 3\n[[steps]]\nuse = "nothing"\n[sink]\nuse = "null"\n',
         "steps[0] (kernel 'nothing', extensions/bad.py:3) must take the record as its first "
         "argument, as in `def nothing(record, ...)`; it takes ()"),
        ('[source]\nuse = "range"\nstop = 3\n[sink]\nuse = "unconfigured"\npath = "x"\n',
         "its configure must return the parameters as a dict (they become ctx.params), not None"),
        ('[source]\nuse = "range"\nstop = 3\n[sink]\nuse = "one_argument"\n',
         "its write must take the ctx and records as its first arguments, as in "
         "`def write(ctx, records)`; it takes (records)"),
    ]
    for text, message in cases:
        write(project / "p.toml", text)
        result = runex_cli("validate", "p.toml", cwd=project)
        assert result.returncode == 3, result.stdout
        assert message in result.stderr, result.stderr


def test_a_record_that_is_not_a_mapping_fails_naming_where_it_came_from(project):
    write(project / "extensions" / "bad.py", BAD_EXTENSIONS)
    rx = Runex()
    for sink in ('use = "null"', 'use = "jsonl"\npath = "out/j"',
                 'use = "sqlite"\npath = "out/s.db"\ntable = "t"'):
        write(project / "p.toml", f'[source]\nuse = "strings"\n[sink]\n{sink}\n')
        run_id = rx.submit("p.toml")
        drain(rx)
        data = show(rx, run_id)
        assert data["status"] == "failed", sink
        assert data["partitions"][0]["error"] == (
            "TypeError: the source 'strings' made a record that is not a mapping: 'a' (str); "
            "records are dicts of field names to values"), sink
    write(project / "p.toml", '[source]\nuse = "range"\nstop = 5\n[[steps]]\nuse = "word"\n'
                              '[sink]\nuse = "null"\n')
    run_id = rx.submit("p.toml")
    drain(rx)
    assert show(rx, run_id)["partitions"][0]["error"].startswith(
        "TypeError: step 0 (kernel 'word') made a record that is not a mapping: 'three' (str)")


HANGING = """
    import os, time
    from runex import register_kernel

    @register_kernel("in_c")
    def in_c(record):
        return {**record, "s": sum(range(10**11))}  # minutes in one C call: no signal is seen

    @register_kernel("hang")
    def hang(record, flag=""):
        if not os.path.exists(flag):
            open(flag + ".started", "w").close()  # in the kernel: its time limit is armed
            time.sleep(2)
        return record
"""


def hard_timeout_project(project, step, options):
    write(project / "extensions" / "hang.py", HANGING)
    write(project / "workers" / "fast.toml", "reap_every = 0.5\nmax_delay = 0.1\n")
    write(project / "p.toml", f'[source]\nuse = "range"\nstop = 1\n\n[[steps]]\n{step}\n\n'
                              f'[sink]\nuse = "null"\n\n[options]\n{options}\n')


@pytest.mark.slow
def test_a_kernel_inside_one_long_c_call_is_stopped_at_its_timeout(project):
    hard_timeout_project(project, 'use = "in_c"', 'timeout = "1s"\nretries = 0')
    run_id = runex_cli("submit", "p.toml", cwd=project, check=True).stdout.strip()
    # The C call alone would take minutes; the burst worker ends within the subprocess's
    # time limit only because the consumer killed it a few seconds past its timeout.
    runex_cli("worker", "--burst", "-w", "1", "--profile", "fast", cwd=project, check=True,
              timeout=60)
    data = show(Runex(), run_id)
    assert data["status"] == "failed"
    [attempt] = data["partitions"][0]["attempts"]
    assert attempt["status"] == "timeout"
    assert attempt["error"].startswith("PartitionTimeout: the attempt ran past its timeout of "
                                       "1s and had not stopped 3s later: its worker (pid ")


@pytest.mark.slow
def test_a_stopped_worker_loses_its_partition_at_its_timeout_not_its_lease(project):
    import signal
    import subprocess
    import sys
    import time

    flag = project / "go"
    hard_timeout_project(project, f'use = "hang"\nflag = "{flag}"',
                         'timeout = "1s"\nretries = 1\nretry_delay = "10ms"')
    run_id = runex_cli("submit", "p.toml", cwd=project, check=True).stdout.strip()
    proc = subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "1", "--profile",
                             "fast"], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ledger = project / ".runex" / "ledger.db"
        deadline = time.monotonic() + 30
        # In its kernel (not between its claim and the arming of its time limit, a moment
        # that a stop would otherwise leave to the 60 s lease)
        while not (Path(f"{flag}.started").exists() and (pid := sqlite3.connect(
                ledger).execute("SELECT pid FROM attempts WHERE status = 'running'"
                                ).fetchone())):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(pid[0], signal.SIGSTOP)  # no SIGALRM reaches it, and its lease runs 60 s
        flag.touch()
        while show(Runex(), run_id)["status"] != "succeeded":
            assert time.monotonic() < deadline, "not recovered before its lease would expire"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    attempts = show(Runex(), run_id)["partitions"][0]["attempts"]
    assert [a["status"] for a in attempts] == ["timeout", "succeeded"]
    assert "its worker (pid" in attempts[0]["error"]


def test_show_of_an_unfinished_run_says_whether_anything_runs_it(project):
    rx = setup(project)
    run_id = rx.submit(pipeline(project, stop=20, size=10, sink='use = "null"'))
    waiting = runex_cli("show", run_id, cwd=project, check=True).stdout
    assert "nothing is running it now" in waiting and "took" not in waiting
    assert "records 0 in, 0 out so far" in waiting
    rx.ledger.claim_many(run_id, [0], trace.HOST, os.getpid(), None)
    assert "running for " in runex_cli("show", run_id, cwd=project, check=True).stdout
