"""Outputs safe to run twice: the sinks' `mode` (append, replace, upsert)."""

import json
import os
import sqlite3

import pytest

from runex import PipelineError, Runex

from .conftest import write

FLAKY = """
    import os
    from runex import register_kernel

    @register_kernel("maybe_fail")
    def maybe_fail(record, fail_on=-1):
        if record["n"] == fail_on and not os.path.exists("fixed"):
            raise RuntimeError("not today")
        return {**record, "sq": record["n"] ** 2}
"""


def pipeline(project, sink, stop=30, size=10, fail_on=-1):
    write(project / "extensions" / "flaky.py", FLAKY)
    return write(project / "p.toml", f"""
        [source]
        use = "range"
        stop = {stop}
        size = {size}
        [[steps]]
        use = "maybe_fail"
        fail_on = {fail_on}
        [sink]
        {sink}
        [options]
        retries = 0
    """)


def rows(path, sql):
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


SQLITE = 'use = "sqlite"\npath = "out/o.db"\ntable = "t"\n'


def test_append_adds_and_replace_replaces(project):
    rx = Runex()
    pipeline(project, SQLITE)
    for _ in range(2):
        assert rx.run("p.toml", workers=0).status == "succeeded"
    assert rows("out/o.db", "SELECT COUNT(*) FROM t") == [(60,)]  # append: the default
    pipeline(project, SQLITE + 'mode = "replace"\n')
    for _ in range(2):
        run = rx.run("p.toml", workers=0)
        assert run.status == "succeeded"
        assert rows("out/o.db", "SELECT COUNT(*), COUNT(DISTINCT n) FROM t") == [(30, 30)]
        assert rows("out/o.db", "SELECT run_id FROM _runex_outputs") == [(run.id,)]
    names = {n for (n,) in rows("out/o.db", "SELECT name FROM sqlite_master")}
    assert not [n for n in names if n.startswith("_runex_stage")]


def test_a_failed_replace_leaves_the_previous_table_and_its_retry_replaces_it(project):
    rx = Runex()
    pipeline(project, SQLITE + 'mode = "replace"\n', stop=30)
    rx.run("p.toml", workers=0)
    pipeline(project, SQLITE + 'mode = "replace"\n', stop=50, fail_on=42)
    failed = rx.run("p.toml", workers=0)
    assert failed.status == "failed"
    assert rows("out/o.db", "SELECT COUNT(*) FROM t") == [(30,)]  # untouched
    (project / "fixed").touch()
    rx.retry(failed.id)
    rx.work(workers=0, burst=True)
    assert rx.show(failed.id).status == "succeeded"
    assert rows("out/o.db", "SELECT COUNT(*), COUNT(DISTINCT n) FROM t") == [(50, 50)]


def test_an_older_run_that_ends_after_a_newer_one_fails_and_leaves_the_newer_output(project):
    rx = Runex()
    pipeline(project, SQLITE + 'mode = "replace"\n', stop=30, fail_on=12)
    older = rx.run("p.toml", workers=0)  # failed: its stage is kept for a retry
    (project / "fixed").touch()
    newer = rx.run("p.toml", workers=0)
    assert newer.status == "succeeded"
    rx.retry(older.id)
    rx.work(workers=0, burst=True)
    run = rx.show(older.id)
    assert run.status == "failed" and f"run {newer.id} replaced 't' meanwhile" in run.error
    assert rows("out/o.db", "SELECT run_id FROM _runex_outputs") == [(newer.id,)]
    assert rows("out/o.db", "SELECT COUNT(*) FROM t") == [(30,)]


def test_a_replace_without_rows_empties_the_table_and_other_tables_stages_are_kept(project):
    rx = Runex()
    pipeline(project, SQLITE + 'mode = "replace"\n', stop=30)
    rx.run("p.toml", workers=0)
    other = 'use = "sqlite"\npath = "out/o.db"\ntable = "t_x"\nmode = "replace"\n'
    pipeline(project, other, stop=20, fail_on=12)
    rx.run("p.toml", workers=0)  # failed: its stage of t_x is kept, for a retry
    pipeline(project, SQLITE + 'mode = "replace"\n', stop=0)
    assert rx.run("p.toml", workers=0).status == "succeeded"
    assert rows("out/o.db", "SELECT COUNT(*) FROM t") == [(0,)]  # empty, not gone
    names = [n for (n,) in rows("out/o.db", "SELECT name FROM sqlite_master")]
    assert any(n.startswith("_runex_stage_t_x_") for n in names)


def test_upsert_replaces_rows_with_the_same_key(project):
    rx = Runex()
    sink = SQLITE + 'mode = "upsert"\nkey = ["n"]\n'
    pipeline(project, sink, stop=30)
    rx.run("p.toml", workers=0)
    pipeline(project, sink, stop=45)
    rx.run("p.toml", workers=0)
    assert rows("out/o.db", "SELECT COUNT(*), COUNT(DISTINCT n), MAX(sq) FROM t") == [
        (45, 45, 44 ** 2)]


def test_upsert_into_a_table_with_duplicate_keys_fails_and_says_why(project):
    rx = Runex()
    pipeline(project, SQLITE, stop=10)
    rx.run("p.toml", workers=0)
    rx.run("p.toml", workers=0)  # appended twice: every key twice
    pipeline(project, SQLITE + 'mode = "upsert"\nkey = ["n"]\n', stop=10)
    run = rx.run("p.toml", workers=0)
    assert run.status == "failed"
    assert "table 't' has rows with the same key (n) already" in run.error
    assert rows("out/o.db", "SELECT COUNT(*) FROM t") == [(20,)]


@pytest.mark.parametrize("sink, message", [
    ('mode = "upsert"', 'mode = "upsert" needs key'),
    ('mode = "merge"', "mode must be one of append, replace, upsert, partition, not 'merge'"),
    ('key = ["n"]', 'key is for mode = "upsert"'),
])
def test_bad_modes_are_refused_before_anything_runs(project, sink, message):
    pipeline(project, SQLITE + sink + "\n")
    with pytest.raises(PipelineError, match=message):
        Runex().submit("p.toml")
    assert not os.path.exists("out/o.db")


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_replace_swaps_the_whole_folder_and_a_failed_run_leaves_it(project, ext):
    rx = Runex()
    sink = f'use = "{ext}"\npath = "out/parts"\nmerge = "out/all.{ext}"\nmode = "replace"\n'
    pipeline(project, sink, stop=30)
    first = rx.run("p.toml", workers=0)
    assert os.path.islink("out/parts") and len(os.listdir("out/parts")) == 3
    pipeline(project, sink, stop=50)
    rx.run("p.toml", workers=0)
    assert len(os.listdir("out/parts")) == 5
    assert os.listdir("out/parts.runs") == [os.readlink("out/parts").split("/")[-1]]
    assert first.id not in os.readlink("out/parts")
    merged = open(f"out/all.{ext}").read().splitlines()
    assert len(merged) == 50 + (ext == "csv")
    pipeline(project, sink, stop=70, fail_on=61)
    assert rx.run("p.toml", workers=0).status == "failed"
    assert len(os.listdir("out/parts")) == 5  # the previous output, untouched
    assert len(open(f"out/all.{ext}").read().splitlines()) == len(merged)
    if ext == "jsonl":
        assert json.loads(merged[-1])["n"] == 49


def test_replace_over_a_folder_written_by_append_runs(project):
    rx = Runex()
    pipeline(project, 'use = "jsonl"\npath = "out/parts"\n', stop=30)
    rx.run("p.toml", workers=0)
    assert os.path.isdir("out/parts") and not os.path.islink("out/parts")
    pipeline(project, 'use = "jsonl"\npath = "out/parts"\nmode = "replace"\n', stop=20)
    rx.run("p.toml", workers=0)
    assert os.path.islink("out/parts") and len(os.listdir("out/parts")) == 2
    assert len(os.listdir("out/parts.runs")) == 1
