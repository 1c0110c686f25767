"""The built-in sources and sinks, called directly."""

import csv
import json
import sqlite3

import pytest

from runex import extensions
from runex.registry import SinkContext

from .conftest import write


@pytest.fixture
def registry():
    return extensions.load([])


def ctx(index, params, run_id="r1", attempt=1, count=0):
    return SinkContext(run_id=run_id, pipeline="p", params=params, partition=index,
                       index=index, attempt=attempt, partition_count=count)


def read_all(source, params):
    keys = source.partitions(**{k: v for k, v in params.items() if k in ("path", "chunk_bytes")})
    extra = {k: v for k, v in params.items() if k not in ("path", "chunk_bytes")}
    return keys, [r for key in keys for r in source.read(key, **extra)]


def test_chunked_csv_reads_every_row_once(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = ["id,name"] + [f"{i},name-{i}" for i in range(1000)]
    write(tmp_path / "a.csv", "\n".join(lines) + "\n")
    write(tmp_path / "b.csv", "id,name\n7,small\n")
    source = registry.source("csv")
    whole_keys, whole = read_all(source, {"path": "*.csv"})
    assert whole_keys == ["a.csv", "b.csv"]
    for chunk in (7, 100, 4096):
        keys, chunked = read_all(source, {"path": "*.csv", "chunk_bytes": chunk})
        assert len(keys) > 2 or chunk == 4096
        assert chunked == whole
    assert whole[0] == {"id": "0", "name": "name-0"} and len(whole) == 1001


def test_csv_records_are_what_dictreader_makes_of_ragged_rows(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = 'a,b,c\n1,2,3\n\n4,5\n6,7,8,9\n,,\n"x, y",z,\n'
    write(tmp_path / "r.csv", text)
    with open(tmp_path / "r.csv", newline="") as f:
        expected = list(csv.DictReader(f))
    for params in ({"path": "r.csv"}, {"path": "r.csv", "chunk_bytes": 8}):
        assert read_all(registry.source("csv"), params)[1] == expected
    assert expected[1] == {"a": "4", "b": "5", "c": None}
    assert expected[2] == {"a": "6", "b": "7", "c": "8", None: ["9"]}


def test_jsonl_and_lines_sources(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "d.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    write(tmp_path / "t.txt", "one\ntwo\n")
    assert read_all(registry.source("jsonl"), {"path": "d.jsonl"})[1] == [{"a": 1}, {"a": 2}]
    assert read_all(registry.source("lines"), {"path": "t.txt"})[1] == [
        {"text": "one"}, {"text": "two"}]
    write(tmp_path / "bad.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"^bad.jsonl:2: invalid JSON"):
        read_all(registry.source("jsonl"), {"path": "bad.jsonl"})
    with pytest.raises(ValueError, match="matches no file"):
        registry.source("csv").partitions(path="nothing/*.csv")


def test_sqlite_source_partitions_by_rowid(registry, tmp_path):
    db = tmp_path / "in.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(25)])
    source = registry.source("sqlite")
    keys = source.partitions(path=str(db), table="t", rows=10)
    assert keys == [[1, 11], [11, 21], [21, 31]]
    got = [r["x"] for k in keys for r in source.read(k, path=str(db), table="t")]
    assert got == list(range(25))
    odd = [r["x"] for k in keys for r in source.read(k, path=str(db), table="t", where="x % 2")]
    assert odd == list(range(1, 25, 2))
    assert list(source.read(None, path=str(db), query="SELECT max(x) AS m FROM t")) == [{"m": 24}]


@pytest.mark.parametrize("spill_rows", [1000, 3])
def test_sqlite_sink_commits_a_partition_once(registry, tmp_path, spill_rows):
    sink = registry.sink("sqlite")
    params = sink.configure(path=str(tmp_path / "o.db"), table="t", spill_rows=spill_rows)
    records = [{"a": i, "b": f"x{i}"} for i in range(10)] + [{"a": 10, "c": 1.5}]
    sink.write(ctx(0, params), iter(records))
    sink.write(ctx(0, params, attempt=2), iter(records))  # a repeat: nothing more
    sink.write(ctx(1, params), iter(records[:2]))
    with sqlite3.connect(tmp_path / "o.db") as conn:
        got = conn.execute("SELECT a, b, c FROM t ORDER BY rowid").fetchall()
        markers = conn.execute("SELECT partition_index, attempt, rows FROM _runex_commits "
                               "ORDER BY 1").fetchall()
    assert got[:11] == [(i, f"x{i}", None) for i in range(10)] + [(10, None, 1.5)]
    assert len(got) == 13
    assert markers == [(0, 1, 11), (1, 1, 2)]
    assert list(tmp_path.glob("*.stage-*")) == []


@pytest.mark.parametrize("spill_rows", [1000, 2])
def test_sqlite_sink_keeps_types_and_widens_for_new_keys(registry, tmp_path, spill_rows):
    sink = registry.sink("sqlite")
    params = sink.configure(path=str(tmp_path / "o.db"), table="t", spill_rows=spill_rows)
    records = [{"a": 1, "b": "x"}, {"b": "y", "a": 2}, {"a": 3, "c": b"\x00\x01"},
               {"a": 2**62, "b": None, "c": 0.5}, {"d": "only d"}]
    sink.write(ctx(0, params), iter(records))
    with sqlite3.connect(tmp_path / "o.db") as conn:
        got = conn.execute("SELECT a, b, c, d FROM t ORDER BY rowid").fetchall()
    assert got == [(1, "x", None, None), (2, "y", None, None), (3, None, b"\x00\x01", None),
                   (2**62, None, 0.5, None), (None, None, None, "only d")]


def test_sqlite_sink_rolls_back_when_the_stream_fails(registry, tmp_path):
    sink = registry.sink("sqlite")
    params = sink.configure(path=str(tmp_path / "o.db"), table="t", spill_rows=2)

    def failing():
        yield {"a": 1}
        yield {"a": 2}
        yield {"a": 3}
        raise RuntimeError("kernel broke")

    with pytest.raises(RuntimeError):
        sink.write(ctx(0, params), failing())
    with sqlite3.connect(tmp_path / "o.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM _runex_commits").fetchone() == (0,)
    assert list(tmp_path.glob("*.stage-*")) == []


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_file_sinks_replace_their_part_and_merge_in_order(registry, tmp_path, kind):
    sink = registry.sink(kind)
    params = sink.configure(path=str(tmp_path / "parts"), merge=str(tmp_path / f"all.{kind}"))
    sink.write(ctx(1, params), iter([{"n": 3}]))
    sink.write(ctx(0, params), iter([{"n": 1}, {"n": 2}]))
    sink.write(ctx(0, params, attempt=2), iter([{"n": 1}, {"n": 2}]))  # a repeat replaces
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        f"part-00000.{kind}", f"part-00001.{kind}"]
    sink.finalize(ctx(None, params, count=2))
    text = (tmp_path / f"all.{kind}").read_text()
    if kind == "jsonl":
        assert [json.loads(line)["n"] for line in text.splitlines()] == [1, 2, 3]
    else:
        assert text.splitlines() == ["n", "1", "2", "3"]

