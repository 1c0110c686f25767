"""Lineage: what each attempt read (its source's fingerprint), and incremental runs that skip
the partitions whose input, code and parameters are those of their last commit."""

import json
import os
import sqlite3

import pytest

from runex import DataSourceSpec, PipelineError, Runex, extensions
from runex.pipeline import check, from_mapping

from .conftest import runex_cli, write

pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL

KERNEL = """
    from runex import register_kernel

    @register_kernel("shout")
    def shout(record):
        return {"text": record["text"].strip().upper()}
"""
MONTHLY = """
    [source]
    use = "lines"
    path = "data/*.txt"

    [[steps]]
    use = "shout"

    [sink]
    use = "sqlite"
    path = "out/m.db"
    table = "lines"
    mode = "partition"
    prune_missing = true

    [options]
    incremental = true
"""


def month(project, m, text="line"):
    (project / "data" / f"2026-{m:02}.txt").write_text(
        "".join(f"{text} {m} {i}\n" for i in range(3)))


def rows(project):
    with sqlite3.connect(project / "out" / "m.db") as conn:
        return conn.execute("SELECT rowid, text, _runex_partition FROM lines ORDER BY rowid"
                            ).fetchall()


def run(rx):
    run = rx.run("pipelines/monthly.toml", workers=0)
    assert run.status == "succeeded", run.summary()
    return run


def test_twelve_monthly_files_run_again_only_where_input_or_code_changed(project):
    write(project / "extensions" / "k.py", KERNEL)
    write(project / "pipelines" / "monthly.toml", MONTHLY)
    (project / "data").mkdir()
    for m in range(1, 13):
        month(project, m)
    rx = Runex()
    first = run(rx)
    assert first.counts == {"succeeded": 12} and len(rows(project)) == 36
    # each attempt records the input it read: the file's size and time
    attempt = first.partitions[0].attempts[0]
    size = (project / "data" / "2026-01.txt").stat().st_size
    assert json.loads(attempt["fingerprint"])[0] == size
    before = rows(project)

    again = run(rx)  # nothing changed: nothing runs, the output is as it was
    assert again.counts == {"skipped": 12} and again.records_in == 0
    assert rows(project) == before
    (finished,) = [e for e in rx.trace(again.id) if e["event"] == "run.finished"]
    assert (finished["status"], finished["failed"]) == ("succeeded", 0)

    month(project, 5, text="changed")  # one file of twelve changes
    third = run(rx)
    assert third.counts == {"skipped": 11, "succeeded": 1}
    assert [p.key for p in third.partitions if p.status == "succeeded"] == ["data/2026-05.txt"]
    after = rows(project)
    assert [r for r in after if "2026-05" not in r[2]] == [
        r for r in before if "2026-05" not in r[2]]  # the others' rows untouched
    assert sorted(r[1] for r in after if "2026-05" in r[2]) == [
        "CHANGED 5 0", "CHANGED 5 1", "CHANGED 5 2"]

    write(project / "extensions" / "k.py", KERNEL + "    # edited\n")  # its code changes
    assert run(rx).counts == {"succeeded": 12}

    december = project / "data" / "2026-12.txt"
    kept = december.read_bytes(), december.stat().st_mtime_ns
    december.unlink()  # gone from the source: its rows too
    last = run(rx)
    assert last.counts == {"skipped": 11}
    assert {r[2] for r in rows(project)} == {f'"data/2026-{m:02}.txt"' for m in range(1, 12)}
    assert rx.ledger.partitions_by_status()["skipped"] == 12 + 11 + 11
    december.write_bytes(kept[0])  # back as it was (a backup restored): it runs again
    os.utime(december, ns=(kept[1], kept[1]))
    assert run(rx).counts == {"skipped": 11, "succeeded": 1}
    assert len(rows(project)) == 36


def test_run_changed_makes_a_pipeline_incremental_from_the_command_line(project):
    write(project / "extensions" / "k.py", KERNEL)
    write(project / "pipelines" / "monthly.toml", MONTHLY.replace("incremental = true", ""))
    (project / "data").mkdir()
    for m in (1, 2):
        month(project, m)
    for expected in ({"succeeded": 2}, {"skipped": 2}):
        runex_cli("run", "pipelines/monthly.toml", "--changed", "-w", "1", cwd=project,
                  check=True)
        shown = json.loads(runex_cli("show", "last", "--json", cwd=project, check=True).stdout)
        assert shown["counts"] == expected and shown["spec"]["options"]["incremental"] is True
    runex_cli("run", "pipelines/monthly.toml", "-w", "1", cwd=project, check=True)
    shown = json.loads(runex_cli("show", "last", "--json", cwd=project, check=True).stdout)
    assert shown["counts"] == {"succeeded": 2}  # not incremental: every partition runs


@pytest.mark.sqlite_only("a check of the pipeline alone")
@pytest.mark.parametrize("sink, source, message", [
    ({"use": "sqlite", "path": "x.db", "table": "t"}, {"use": "range", "stop": 3},
     "options.incremental: the sink 'sqlite' with mode = 'append' would keep rows"),
    ({"use": "null"}, {"use": "plain"},
     "options.incremental: the source 'plain' (here) gives no fingerprint"),
])
def test_an_incremental_pipeline_needs_a_sink_by_partition_and_a_fingerprint(sink, source,
                                                                             message):
    registry = extensions.load([])  # the built-ins
    registry.sources["plain"] = DataSourceSpec(name="plain", read=lambda p: iter(()),
                                               origin="here")
    pipeline = from_mapping({"source": source, "sink": sink,
                             "options": {"incremental": True}}, "p", "p.toml")
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(pipeline, registry)


PICKY = """
    from runex import register_kernel

    @register_kernel("picky")
    def picky(record):
        text = record["text"].strip()
        if text.startswith("bad"):
            raise ValueError(f"cannot read {text!r}")
        return {"text": text}
"""


def picky(project, sink=""):
    """p.toml: the lines of data/*.txt through `picky` into out/p.db (table t, and `sink`'s
    lines), no retries; an empty data/."""
    write(project / "extensions" / "k.py", PICKY)
    write(project / "p.toml", '[source]\nuse = "lines"\npath = "data/*.txt"\n\n'
          '[[steps]]\nuse = "picky"\n\n[sink]\nuse = "sqlite"\npath = "out/p.db"\n'
          f'table = "t"\n{sink}\n[options]\nretries = 0\n')
    (project / "data").mkdir()


def read_until(fd, marker, timeout=30.0):
    """What a pseudo-terminal's program wrote, up to `marker`."""
    import os
    import select
    import time

    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} in {seen.decode(errors='replace')!r}")
        seen += os.read(fd, 4096)
    return seen.decode(errors="replace")


@pytest.mark.sqlite_only("one engine is enough for a debugger")
@pytest.mark.slow
def test_a_failed_partition_is_replayed_debugged_and_written_to_its_sink(project):
    import os
    import pty
    import sys

    picky(project, 'mode = "partition"\n')
    (project / "data" / "a.txt").write_text("one\ntwo\n")
    (project / "data" / "b.txt").write_text("fine\nbad line\n")
    rx = Runex()
    run_id = rx.run("p.toml", workers=0).id
    assert rx.show(run_id).counts == {"failed": 1, "succeeded": 1}

    good = runex_cli("replay", run_id, "--partition", "data/a.txt", cwd=project, check=True)
    assert [json.loads(line) for line in good.stdout.splitlines()] == [
        {"text": "one"}, {"text": "two"}]
    assert "with today's code" in good.stderr and "the run's code" in good.stderr
    first = runex_cli("replay", run_id, "--partition", "0", "--limit", "1", cwd=project)
    assert first.stdout.splitlines() == ['{"text": "one"}']
    bad = runex_cli("replay", run_id, "--partition", "data/b.txt", cwd=project)
    assert bad.returncode == 1 and bad.stdout == ""  # its batch failed
    assert "ValueError: cannot read 'bad line'" in bad.stderr and "k.py" in bad.stderr

    # the debugger stops in the kernel, at the record that failed
    pid, fd = pty.fork()
    if pid == 0:  # the child: runex on the pseudo-terminal
        os.chdir(project)
        os.execv(sys.executable, [sys.executable, "-m", "runex", "replay", run_id,
                                  "--partition", "data/b.txt", "--pdb"])
    try:
        read_until(fd, b"(Pdb) ")
        os.write(fd, b"p record['text']\n")
        assert "'bad line'" in read_until(fd, b"(Pdb) ")
        os.write(fd, b"q\n")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 1

    # fixed today: the replay says what changed since the run, and writes it for real
    fixed_kernel = PICKY.replace('text.startswith("bad")', 'text == "worse"')
    write(project / "extensions" / "k.py", fixed_kernel)
    fixed = runex_cli("replay", run_id, "--partition", "data/b.txt", "--to-sink", cwd=project)
    assert fixed.returncode == 0, fixed.stderr
    assert "files changed since: extensions/k.py" in fixed.stderr
    assert "written to the sink as attempt 2: succeeded, 2 records" in fixed.stderr
    run = Runex().show(run_id)
    assert run.status == "succeeded" and run.counts == {"succeeded": 2}
    with sqlite3.connect(project / "out" / "p.db") as conn:
        assert sorted(r[0] for r in conn.execute("SELECT text FROM t")) == [
            "bad line", "fine", "one", "two"]


def test_a_row_says_which_run_attempt_code_and_input_made_it(project):
    write(project / "extensions" / "k.py", KERNEL)
    write(project / "p.toml", '[source]\nuse = "lines"\npath = "data/*.txt"\n\n'
          '[[steps]]\nuse = "shout"\n\n[sink]\nuse = "sqlite"\npath = "out/l.db"\n'
          'table = "t"\nlineage = true\n')
    (project / "data").mkdir()
    month(project, 1)
    month(project, 2)
    rx = Runex()
    run = rx.run("p.toml", workers=0)
    with sqlite3.connect(project / "out" / "l.db") as conn:
        rowid, partition = conn.execute("SELECT rowid, _runex_partition FROM t WHERE text = "
                                        "'LINE 2 1'").fetchone()
    assert json.loads(partition) == "data/2026-02.txt"
    found = json.loads(runex_cli("lineage", "--db", "out/l.db", "--table", "t", "--rowid",
                                 str(rowid), "--json", cwd=project, check=True).stdout)
    attempt = run.partitions[1].attempts[0]
    stat = (project / "data" / "2026-02.txt").stat()
    assert found["run_id"] == run.id and found["partition"]["key"] == "data/2026-02.txt"
    assert (found["attempt"]["attempt"], found["attempt"]["host"]) == (1, attempt["host"])
    assert found["code_version"] == attempt["code_version"]
    assert "extensions/k.py" in found["code_files"]
    assert found["fingerprint"] == [stat.st_size, stat.st_mtime_ns]
    assert found["params"]["source"]["params"]["path"] == "data/*.txt"
    by_key = json.loads(runex_cli("lineage", run.id, "--partition", "data/2026-02.txt",
                                  "--json", cwd=project, check=True).stdout)
    assert by_key == found
    text = runex_cli("lineage", run.id, "--partition", "1", cwd=project, check=True).stdout
    assert f"run:          {run.id} (p, succeeded)" in text
    missing = runex_cli("lineage", "--db", "out/l.db", "--table", "nope", "--rowid", "1",
                        cwd=project)
    assert missing.returncode == 2 and "no such table: nope" in missing.stderr


def test_a_run_exports_as_openlineage_events(project):
    import uuid

    picky(project)
    (project / "data" / "a.txt").write_text("one\n")
    rx = Runex()
    good = rx.run("p.toml", workers=0)
    (project / "data" / "b.txt").write_text("bad\n")
    bad = rx.run("p.toml", workers=0)
    out = runex_cli("trace", good.id, "--openlineage", cwd=project, check=True).stdout
    start, complete = [json.loads(line) for line in out.splitlines()]
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    assert start["run"]["runId"] == complete["run"]["runId"]
    assert uuid.UUID(start["run"]["runId"]).version == 5
    assert start["job"] == {"namespace": "runex", "name": "p"}
    assert start["inputs"] == [{"namespace": "file", "name": str(project / "data/*.txt")}]
    assert start["outputs"] == [{"namespace": "file", "name": f"{project / 'out/p.db'}#t"}]
    facet = complete["run"]["facets"]["runex"]
    assert facet["runId"] == good.id and facet["codeVersion"] == good.summary()["code"]["version"]
    assert complete["eventTime"].endswith("Z") and start["eventTime"] <= complete["eventTime"]
    assert complete["schemaURL"].startswith("https://openlineage.io/spec/")
    failed = rx.openlineage(bad.id)
    assert [e["eventType"] for e in failed] == ["START", "FAIL"]
    assert "cannot read 'bad'" in failed[1]["run"]["facets"]["errorMessage"]["message"]


def test_a_jsonl_sink_by_partition_rewrites_only_the_changed_keys_part(project):
    write(project / "extensions" / "k.py", KERNEL)
    write(project / "pipelines" / "monthly.toml", MONTHLY.replace(
        'use = "sqlite"\n    path = "out/m.db"\n    table = "lines"',
        'use = "jsonl"\n    path = "out/parts"\n    merge = "out/all.jsonl"\n    lineage = true'))
    (project / "data").mkdir()
    for m in (1, 2, 3):
        month(project, m)
    rx = Runex()
    assert run(rx).counts == {"succeeded": 3}
    parts = project / "out" / "parts"
    names = sorted(p.name for p in parts.iterdir())
    assert len(names) == 3 and names[0].startswith("part-data_2026-01.txt-")
    stamps = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    month(project, 2, text="changed")
    assert run(rx).counts == {"skipped": 2, "succeeded": 1}
    changed = [p.name for p in parts.iterdir() if p.stat().st_mtime_ns != stamps[p.name]]
    assert changed == [names[1]]  # only February's part was written again
    lines = [json.loads(line) for line in
             (project / "out" / "all.jsonl").read_text().splitlines()]
    merged = [line["text"] for line in lines]
    assert lines[3]["_runex_partition"] == '"data/2026-02.txt"'
    assert lines[3]["_runex_run"] == Runex().show("last").id != lines[0]["_runex_run"]
    assert merged == ["LINE 1 0", "LINE 1 1", "LINE 1 2", "CHANGED 2 0", "CHANGED 2 1",
                      "CHANGED 2 2", "LINE 3 0", "LINE 3 1", "LINE 3 2"]
    (project / "data" / "2026-03.txt").unlink()
    assert run(rx).counts == {"skipped": 2}
    assert sorted(p.name for p in parts.iterdir()) == names[:2]  # March's part pruned
    assert len((project / "out" / "all.jsonl").read_text().splitlines()) == 6


def test_a_full_run_between_incremental_ones_is_the_last_commit_they_compare_with(project):
    write(project / "extensions" / "k.py", KERNEL)
    write(project / "pipelines" / "monthly.toml", MONTHLY.replace("incremental = true", ""))
    (project / "data").mkdir()
    month(project, 1)

    def changed_run():
        runex_cli("run", "pipelines/monthly.toml", "--changed", "-w", "1", cwd=project,
                  check=True)
        return Runex().show("last").counts

    assert changed_run() == {"succeeded": 1}
    write(project / "extensions" / "k.py", KERNEL.replace(".upper()", ".lower()"))
    runex_cli("run", "pipelines/monthly.toml", "-w", "1", cwd=project, check=True)  # all
    assert rows(project)[0][1] == "line 1 0"
    write(project / "extensions" / "k.py", KERNEL)  # back to the first code: the table holds
    assert changed_run() == {"succeeded": 1}         # the other's rows, so it runs again
    assert rows(project)[0][1] == "LINE 1 0"
    assert changed_run() == {"skipped": 1}


def test_chunks_of_a_large_csv_file_have_fingerprints_and_are_skipped_when_unchanged(project):
    (project / "data").mkdir()
    (project / "data" / "big.csv").write_text(
        "n,text\n" + "".join(f"{i},row {i}\n" for i in range(2000)))
    write(project / "p.toml", '[source]\nuse = "csv"\npath = "data/*.csv"\nchunk_bytes = 8000\n'
          'fingerprint = "content"\n\n[sink]\nuse = "sqlite"\npath = "out/c.db"\ntable = "t"\n'
          'mode = "partition"\n\n[options]\nincremental = true\n')
    rx = Runex()
    first = rx.run("p.toml", workers=0)
    assert first.status == "succeeded" and len(first.partitions) > 2
    assert first.records_out == 2000
    fingerprint = json.loads(first.partitions[1].attempts[0]["fingerprint"])
    assert isinstance(fingerprint, str) and len(fingerprint) == 64  # a sha256 of its bytes
    assert set(rx.run("p.toml", workers=0).counts) == {"skipped"}


def test_prune_missing_deletes_nothing_when_the_source_has_no_partitions(project):
    (project / "data").mkdir()
    with sqlite3.connect(project / "data" / "in.db") as conn:
        conn.execute("CREATE TABLE items (n INTEGER)")
        conn.executemany("INSERT INTO items VALUES (?)", [(i,) for i in range(5)])
    write(project / "p.toml", '[source]\nuse = "sqlite"\npath = "data/in.db"\ntable = "items"\n'
          'rows = 2\n\n[sink]\nuse = "sqlite"\npath = "out/o.db"\ntable = "t"\n'
          'mode = "partition"\nprune_missing = true\n')
    rx = Runex()
    assert rx.run("p.toml", workers=0).status == "succeeded"
    with sqlite3.connect(project / "data" / "in.db") as conn:
        conn.execute("DELETE FROM items")  # emptied by mistake
    emptied = rx.run("p.toml", workers=0)
    assert emptied.status == "failed" and "nothing was deleted" in emptied.summary()["error"]
    with sqlite3.connect(project / "out" / "o.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (5,)


@pytest.mark.sqlite_only("a source's fingerprint alone")
def test_a_sqlite_query_source_sees_commits_still_in_the_write_ahead_log(tmp_path):
    from runex.builtins.sqlite import sqlite_fingerprint

    path = tmp_path / "in.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")  # commits stay in the log
    writer.execute("CREATE TABLE t (n INTEGER)")
    before = sqlite_fingerprint(None, str(path), query="SELECT * FROM t")
    writer.execute("INSERT INTO t VALUES (1)")
    assert sqlite_fingerprint(None, str(path), query="SELECT * FROM t") != before
    writer.close()
