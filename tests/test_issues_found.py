"""Bugs a new user hit, each pinned by a test that failed before its fix."""

import json
import os
import sqlite3

from runex import Runex, trace

from .conftest import drain, runex_cli, show, write
from .test_execution import EXT, pipeline


def setup(project):
    write(project / "extensions" / "k.py", EXT)
    return Runex()


def test_show_prints_attempts_that_have_no_traceback(project):
    """An interrupted or lost attempt has an error but no traceback: `show` (and `-v`) print
    it without crashing."""
    rx = setup(project)
    run_id = rx.submit(pipeline(project, stop=20, size=10, sink='use = "null"'))
    claims = rx.ledger.claim_many(run_id, [0, 1], trace.HOST, 1, None)
    rx.ledger.finish_attempt(claims[0], "interrupted", error="the worker was stopped",
                             requeue=True)
    assert rx.ledger.lose_attempt(run_id, 1, 1, "worker pid 1 on x is gone", 3)[0] == "queued"
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
