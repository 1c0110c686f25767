"""The built-in sources and sinks, called directly."""

import csv
import io
import json
import random
import sqlite3

import pytest

from runex import extensions
from runex.pipeline import Signature
from runex.registry import SinkContext

from .conftest import write


@pytest.fixture
def registry():
    return extensions.load([])


def ctx(index, params, run_id="r1", attempt=1, count=0):
    return SinkContext(run_id=run_id, pipeline="p", params=params, partition=index,
                       index=index, attempt=attempt, partition_count=count)


def read_all(source, params):
    """Partition keys and records of a source, each function given the parameters it takes,
    as runex gives them."""
    keys = list(source.partitions(**Signature.of(source.partitions, 0).select(params)))
    extra = Signature.of(source.read, 1).select(params)
    return keys, [r for key in keys for r in source.read(key, **extra)]


def dictreader(path, delimiter=",", encoding="utf-8-sig"):
    """What the csv module makes of a whole file: what the `csv` source must give."""
    with open(path, encoding=encoding, newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


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


def test_a_quoted_line_end_across_a_chunk_boundary_stays_in_its_record(registry, tmp_path,
                                                                      monkeypatch):
    """Issue 10, item 9: chunks cut at line ends split a quoted note holding a line end into
    two malformed records (3,000 rows in, 3,001 records out), silently."""
    monkeypatch.chdir(tmp_path)
    rows = [[i, "line one\nline two" if i % 7 == 0 else f"note {i}", "Zürich"] for i in range(3000)]
    with open("notes.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["id", "note", "city"], *rows])
    data = (tmp_path / "notes.csv").read_bytes()
    inside = data.index(b'\n2646,"line one\n') + len(b'\n2646,"line one')  # its line end
    expected = dictreader("notes.csv")
    assert len(expected) == 3000 and expected[2646]["note"] == "line one\nline two"
    source = registry.source("csv")
    for chunk in (inside, inside - 1, 1000, 4099, len(data) // 2):
        keys, records = read_all(source, {"path": "notes.csv", "chunk_bytes": chunk})
        assert len(keys) > 1 and json.loads(json.dumps(keys)) == keys
        assert records == expected, chunk


CSV_CASES = {
    "ragged": 'a,b,c\n1,2,3\n\n\n4,5\n6,7,8,9\n,,\n"x, y",z,\n7\n',
    "crlf": 'id,note\r\n1,"one\r\ntwo"\r\n2,plain\r\n\r\n3,"x, ""y"""\r\n',
    "lone cr": 'a,b\r1,2\r"3\r4",5\r\r6,"7\r\n"\r',
    "quoted header": '"first\nname","last, name",id\n"Ann","Lee",1\nBo,"Ng\n",2\n',
    "non-ascii": 'ville,note\nZürich,"naïve, ça va\n日本"\nKraków,🙂\n',
    "bom": '\ufeff"id",name\n1,"a\nb"\n\ufeff2,c\n',
    "stray quotes": 'a,b\nx"y,"p"q"r\n"s""t",u"\n"v"\n,w\n""\n',
    "no final line end": 'a,b\n1,"2\n3"',
    "unclosed quote": 'a,b\n1,"2\n3,4\n5,6\n',
}


@pytest.mark.parametrize("text", CSV_CASES.values(), ids=CSV_CASES.keys())
def test_csv_records_are_what_dictreader_makes_of_the_whole_file(registry, tmp_path,
                                                                 monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    size = (tmp_path / "t.csv").write_bytes(text.encode())
    expected = dictreader("t.csv")
    for chunk in (None, *range(1, size + 1)):
        assert read_all(registry.source("csv"), {"path": "t.csv", "chunk_bytes": chunk})[1] == (
            expected), chunk


FIELD_PIECES = ["a", "Zürich", "日本", "🙂", ",", ";", "\t", '"', '""', "\n", "\r\n", "\r", " ", ""]


def random_csv(rng):
    """A random CSV text and its delimiter: rows as `csv.writer` quotes them (some ragged,
    some ending in `\\r\\n`), lines of raw pieces among them (stray quotes, blank lines, lone
    `\\r`), or only raw pieces; at times a byte-order mark, or no last line end."""
    delimiter = rng.choice(",;\t|")
    pieces = FIELD_PIECES + [delimiter] * 2
    width = rng.randint(1, 4)
    out = io.StringIO()
    for _ in range(rng.randint(1, 15)):
        if rng.random() < 0.15:
            out.write("".join(rng.choices(pieces, k=rng.randint(0, 8))))
        else:
            writer = csv.writer(out, delimiter=delimiter, lineterminator=rng.choice(["\n", "\r\n"]))
            writer.writerow(["".join(rng.choices(FIELD_PIECES, k=rng.randint(0, 3)))
                             for _ in range(max(1, width + rng.choice([-1, 0, 0, 0, 1])))])
    text = out.getvalue() if rng.random() < 0.9 else "".join(rng.choices(pieces, k=40))
    if rng.random() < 0.2:
        text = text.rstrip("\r\n")
    return ("\ufeff" if rng.random() < 0.2 else "") + text, delimiter


@pytest.mark.parametrize("seed", range(8))
def test_csv_chunks_of_random_files_give_what_dictreader_gives(registry, tmp_path, monkeypatch,
                                                               seed):
    """Fields with delimiters, quotes, line ends and non-ASCII text, cut at random chunk sizes
    from one byte up: the records are always those of `csv.DictReader` over the whole file."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(seed)
    source = registry.source("csv")
    for number in range(50):
        text, delimiter = random_csv(rng)
        size = (tmp_path / "r.csv").write_bytes(text.encode())
        expected = dictreader("r.csv", delimiter)
        for chunk in (None, 1, rng.randint(1, 8), rng.randint(1, size + 1), size):
            params = {"path": "r.csv", "chunk_bytes": chunk, "delimiter": delimiter}
            keys, records = read_all(source, params)
            assert json.loads(json.dumps(keys)) == keys
            assert records == expected, (seed, number, chunk, text)


def test_csv_is_chunked_only_where_bytes_tell_records_apart(registry, tmp_path, monkeypatch):
    """UTF-8 and one-byte encodings are chunked; in UTF-16 or Shift JIS a `"` or a line end
    byte can be half of another character, so such files are read whole, as is a file whose
    delimiter is not one ASCII byte."""
    monkeypatch.chdir(tmp_path)
    source = registry.source("csv")
    for encoding, delimiter, letter, chunked in [
            ("latin-1", ",", "é", True), ("cp1252", ";", "€", True), ("utf-8", "§", "é", False),
            ("utf-16", ",", "表", False), ("shift_jis", ",", "表", False)]:
        text = "id,note,x\n" + "".join(f'{i},"{letter}\n{i}",{letter}\n' for i in range(20))
        (tmp_path / "e.csv").write_bytes(text.replace(",", delimiter).encode(encoding))
        params = {"path": "e.csv", "chunk_bytes": 16, "encoding": encoding, "delimiter": delimiter}
        keys, records = read_all(source, params)
        assert (len(keys) > 1) == chunked, encoding
        assert records == dictreader("e.csv", delimiter, encoding) and len(records) == 20
    with pytest.raises(ValueError, match="chunk_bytes must be a positive number"):
        source.partitions(path="e.csv", chunk_bytes=-5)


def test_a_csv_chunk_key_of_an_older_runex_still_reads(registry, tmp_path, monkeypatch):
    """A key `[path, start, end]`, cut at line ends by an older runex, may still be queued:
    it reads as it did then."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.csv", "id,name\n" + "".join(f"{i},name-{i}\n" for i in range(100)))
    size = (tmp_path / "a.csv").stat().st_size
    keys = [["a.csv", start, min(start + 50, size)] for start in range(0, size, 50)]
    assert [r for key in keys for r in registry.source("csv").read(key)] == dictreader("a.csv")


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
    keys = list(source.partitions(path=str(db), table="t", rows=10))
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

