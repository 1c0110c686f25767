"""Lineage: what each attempt read (its source's fingerprint), and incremental runs that skip
the partitions whose input, code and parameters are those of their last commit."""

import json
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

    (project / "data" / "2026-12.txt").unlink()  # gone from the source: its rows too
    last = run(rx)
    assert last.counts == {"skipped": 11}
    assert {r[2] for r in rows(project)} == {f'"data/2026-{m:02}.txt"' for m in range(1, 12)}
    assert rx.ledger.partitions_by_status()["skipped"] == 12 + 11 + 11


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
     "options.incremental: the sink 'sqlite' with mode = 'append' would keep the rows"),
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
