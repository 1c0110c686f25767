"""Built-in file sources (`csv`, `jsonl`, `lines`) and file sinks (`jsonl`, `csv`).

Sources take a glob `path` (relative to the project folder): one partition per file, or, with
`chunk_bytes`, large files split into chunks of about that size that begin where a record does.
A `jsonl` or `lines` record is a line. A CSV record can span lines (a quoted field may hold a
line end), so `csv` finds where its records begin with one scan of the file's bytes, done once
when the partitions are listed (see `csv_chunks`); each chunk is then read on its own.

Sinks write one file per partition, `part-NNNNN.<ext>` in the folder `path`, through a
temporary file renamed into place (`runex.atomic_write`: synced, then renamed, then the folder
synced), so a repeated partition replaces its file rather than adding to it, and a partition is
on disk before runex records it as done. With `merge`, the parts are joined in partition order
into that one file, the same way, once every partition is in.

`mode = "append"` (the default) writes the parts into `path` itself. `mode = "replace"` writes
them into a folder of the run's own, `<path>.runs/<run id>`, and when every partition
succeeded makes `path` a symbolic link to it, swapped in one rename: readers see the old
folder or the new one, never a mix, and a run that fails or is cancelled leaves `path` as it
was. Older runs' folders are then removed. (The first replace over a real folder at `path`
moves that folder into `<path>.runs` first, the one moment `path` is missing.)
"""

import codecs
import contextlib
import csv
import glob
import io
import json
import mmap
import os
import re
import shutil
import time

from runex import DataSourceSpec, SinkSpec, atomic_write
from runex.durable import fsync_dir, make_dirs
from runex.registry import PARTITION, RUN, key_text

# The last element of a `csv` chunk's key `[path, start, end, RECORDS]`: start and end are
# where records begin. A key of three elements comes from a runex that cut chunks at line ends.
RECORDS = "records"


def file_partitions(path, chunk_bytes=None):
    """One key per file (its path), or `[path, start, end]` per chunk of a large file."""
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
        raise ValueError(f"path {path!r} matches no file (looked from {os.getcwd()})")
    if not chunk_bytes:
        return files
    keys = []
    for name in files:
        size = os.path.getsize(name)
        if size <= chunk_bytes:
            keys.append(name)
        else:
            keys += [[name, start, min(start + chunk_bytes, size)]
                     for start in range(0, size, chunk_bytes)]
    return keys


def text_encoding(encoding):
    """UTF-8 files may begin with a byte-order mark (spreadsheet programs write one): read it
    as one, not as part of the first line."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def read_lines(partition, encoding="utf-8", skip_header=False):
    """The text lines of a partition key made by `file_partitions`; with `skip_header`, the
    first line of the file is left out (it is in the first chunk only)."""
    if isinstance(partition, str):
        with open(partition, encoding=text_encoding(encoding), newline="") as f:
            if skip_header:
                next(f, None)
            yield from f
        return
    name, start, end = partition
    with open(name, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # finish the line the previous chunk owns
        elif skip_header:
            f.readline()
        elif text_encoding(encoding) == "utf-8-sig" and f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        while f.tell() < end:
            line = f.readline()
            if not line:
                break
            yield line.decode(encoding)


def csv_partitions(path, chunk_bytes=None, delimiter=",", encoding="utf-8"):
    """One key per file (its path), or `[path, start, end, RECORDS]` per chunk of a large
    file, cut where records begin (`csv_chunks`). Files are read whole when bytes cannot tell
    where records begin (`record_pattern` is None)."""
    keys = file_partitions(path)
    if chunk_bytes and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, not {chunk_bytes}")
    pattern = record_pattern(delimiter, encoding) if chunk_bytes else None
    if pattern is None:
        return keys
    bom = codecs.lookup(text_encoding(encoding)).name == "utf-8-sig"
    chunked = []
    for name in keys:
        if os.path.getsize(name) <= chunk_bytes:
            chunked.append(name)
        else:
            chunked += [[name, start, end, RECORDS]
                        for start, end in csv_chunks(name, chunk_bytes, pattern, bom)]
    return chunked


def record_pattern(delimiter, encoding):
    """A regular expression that matches whole CSV records in a file's bytes, as the csv
    module reads them (default dialect, this delimiter): fields split by the delimiter, up to
    a line end (`\\r\\n`, `\\n` or `\\r`) outside quotes. A field that begins with `"` is quoted up
    to the next `"` that is not doubled, and may go on unquoted after it (`"a"b` reads `ab`);
    a `"` anywhere else is a plain character. The quantifiers never give back (`*+`), as the
    csv module never goes back, so a scan is one pass.

    None when bytes cannot tell: the delimiter is not one ASCII character (other than `"` or
    a line end), or an ASCII byte of the encoding can be part of another character
    (`bytes_are_ascii`)."""
    if not (isinstance(delimiter, str) and len(delimiter) == 1 and delimiter.isascii()
            and delimiter not in '"\r\n' and bytes_are_ascii(encoding)):
        return None
    d = re.escape(delimiter)
    field = rf'"[^"]*+(?:""[^"]*+)*+"[^{d}\r\n]*+|[^"{d}\r\n][^{d}\r\n]*+|'
    record = rf'(?:{field})(?:{d}(?:{field}))*+(?:\r\n?|\n)'
    return re.compile(f"(?:{record})*+".encode())


def bytes_are_ascii(encoding):
    """Whether each ASCII byte in text of this encoding is that ASCII character: true of UTF-8
    and of one-byte encodings that extend ASCII (Latin-1, cp1252), not of UTF-16 or Shift JIS,
    where it can be half of another character."""
    name = codecs.lookup(encoding).name
    if name in ("utf-8", "utf-8-sig"):
        return True
    decoder = codecs.getincrementaldecoder(name)(errors="replace")
    for byte in range(256):
        decoder.reset()
        text = decoder.decode(bytes([byte]))
        if len(text) != 1 or (byte < 128 and text != chr(byte)):
            return False
    return True


def csv_chunks(name, chunk_bytes, pattern, bom):
    """`(start, end)` byte ranges that cover a file, each holding the whole records that end
    within `chunk_bytes` of its start (within twice that if none does, and so on), found in
    one pass over the file's bytes, mapped rather than read. With `bom`, a UTF-8 byte-order
    mark at the start is left out of the first field."""
    with open(name, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = 0
        scan_from = 3 if bom and data[:3] == codecs.BOM_UTF8 else 0
        while start < len(data):
            end = records_end(data, scan_from, chunk_bytes, pattern)
            yield start, end
            start = scan_from = end


def records_end(data, start, size, pattern):
    """Where the last of the records from `start` (where one begins) that end within `size`
    bytes of it ends, doubling `size` while none does; the end of the data if none ends."""
    while start + size < len(data):
        limit = start + size
        if data.find(b'"', start, limit) < 0:  # no quote: every line end ends a record
            end = max(data.rfind(b"\n", start, limit), data.rfind(b"\r", start, limit)) + 1
        else:
            end = pattern.match(data, start, limit).end()
        if end > start:
            return end + 1 if data[end - 1:end + 1] == b"\r\n" else end
        size *= 2
    return len(data)


class ByteRange(io.RawIOBase):
    """Bytes `start` to `end` of a file, read as a file of their own."""

    def __init__(self, name, start, end):
        super().__init__()
        self.file = open(name, "rb", buffering=0)  # closed by close()
        self.file.seek(start)
        self.left = end - start

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self.file.readinto(memoryview(buffer)[:self.left])
        self.left -= count
        return count

    def close(self):
        self.file.close()
        super().close()


def open_csv(partition, encoding):
    """A whole file, or the chunk `[path, start, end, RECORDS]` of one, as text for the csv
    module (lines split at `\\r\\n`, `\\n` and `\\r`, kept whole)."""
    if isinstance(partition, str):
        return open(partition, encoding=text_encoding(encoding), newline="")
    name, start, end, _ = partition
    chunk = io.BufferedReader(ByteRange(name, start, end), buffer_size=1 << 20)
    return io.TextIOWrapper(chunk, text_encoding(encoding) if start == 0 else encoding,
                            newline="")


def header_of(partition, encoding, delimiter):
    name = partition if isinstance(partition, str) else partition[0]
    with open(name, encoding=text_encoding(encoding), newline="") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def read_csv(partition, delimiter=",", encoding="utf-8"):
    if not isinstance(partition, str) and len(partition) == 3:
        # A key of an older runex, whose chunks end at line ends: read as it read them.
        fields = header_of(partition, encoding, delimiter)
        lines = read_lines(partition, encoding, skip_header=True)
        yield from as_dicts(csv.reader(lines, delimiter=delimiter), fields)
        return
    with open_csv(partition, encoding) as f:
        rows = csv.reader(f, delimiter=delimiter)
        if isinstance(partition, str) or partition[1] == 0:
            fields = next(rows, [])  # the chunk begins with the header
        else:
            fields = header_of(partition, encoding, delimiter)
        yield from as_dicts(rows, fields)


def as_dicts(rows, fields):
    """Rows as dicts keyed by the header, as `csv.DictReader` makes them (blank lines
    skipped; a short row's missing fields None, a long row's extra values in a list under
    None), at about twice its speed."""
    if not fields:  # a blank first line: every value is an extra one
        yield from ({None: row} for row in rows if row)
        return
    width = len(fields)
    for row in rows:
        if len(row) == width:
            yield dict(zip(fields, row, strict=True))
        elif row:
            record = dict(zip(fields, row, strict=False))
            if len(row) < width:
                record.update(dict.fromkeys(fields[len(row):]))
            else:
                record[None] = row[width:]
            yield record


def read_jsonl(partition, encoding="utf-8"):
    for number, line in enumerate(read_lines(partition, encoding), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                where = (f"{partition}:{number}" if isinstance(partition, str)
                         else f"{partition[0]} (chunk at byte {partition[1]}, line {number})")
                raise ValueError(f"{where}: invalid JSON: {exc}") from None


def read_text(partition, encoding="utf-8", field="text"):
    for line in read_lines(partition, encoding):
        yield {field: line.rstrip("\r\n")}


def file_fingerprint(partition, fingerprint="stat"):
    """What a file partition's input is now: its file's size and modification time
    (`fingerprint = "stat"`, a stat call), or a hash of its bytes (`"content"`: a chunk's
    only, for a chunk of a large file)."""
    name, start, end = (partition, 0, None) if isinstance(partition, str) else partition[:3]
    if fingerprint == "stat":
        st = os.stat(name)
        return [st.st_size, st.st_mtime_ns]
    if fingerprint != "content":
        raise ValueError(f'fingerprint must be "stat" or "content", not {fingerprint!r}')
    import hashlib  # noqa: PLC0415 - OpenSSL's library: for content fingerprints only

    digest = hashlib.sha256()
    with open(name, "rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while chunk := f.read(1 << 20 if left is None else min(1 << 20, left)):
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


csv_source = DataSourceSpec(name="csv", partitions=csv_partitions, read=read_csv,
                            fingerprint=file_fingerprint)
jsonl_source = DataSourceSpec(name="jsonl", partitions=file_partitions, read=read_jsonl,
                              fingerprint=file_fingerprint)
lines_source = DataSourceSpec(name="lines", partitions=file_partitions, read=read_text,
                              fingerprint=file_fingerprint)


# -- sinks ---------------------------------------------------------------------------------

def configure_files(path, merge=None, mode="append", prune_missing=False, lineage=False):
    if not isinstance(path, str) or not path:
        raise ValueError("path must name the folder the part files go in")
    if mode not in ("append", "replace", "partition"):
        raise ValueError(f"mode must be append, replace or partition, not {mode!r}")
    if prune_missing and mode != "partition":
        raise ValueError(f'prune_missing is for mode = "partition" (mode is {mode!r})')
    return {"path": path, "merge": merge, "mode": mode, "prune_missing": bool(prune_missing),
            "lineage": bool(lineage)}


def parts_folder(ctx):
    """Where this run writes its parts: `path`, or with `mode = "replace"` its own folder."""
    path = ctx.params["path"]
    if ctx.params.get("mode") == "replace":
        return os.path.join(f"{path}.runs", ctx.run_id)
    return path


def part_name(folder, index, ext):
    return os.path.join(folder, f"part-{index:05d}.{ext}")


def key_part(folder, key, ext):
    """`mode = "partition"`: the part file of a partition key, whichever run wrote it last:
    `part-<the key, made a file name>-<a hash of it>` (the hash tells keys apart)."""
    import hashlib  # noqa: PLC0415 - OpenSSL's library: for this mode only

    text = key_text(key)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:60]
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    return os.path.join(folder, f"part-{slug}-{digest}.{ext}")


def part_of(ctx, ext):
    if ctx.params.get("mode") == "partition":
        return key_part(ctx.params["path"], ctx.partition, ext)
    return part_name(parts_folder(ctx), ctx.index, ext)


def stamped(ctx, records):
    """With `lineage = true`: each record with the run and the partition key that wrote it
    (`_runex_run`, `_runex_partition`, as the database sinks' columns)."""
    if not ctx.params.get("lineage"):
        return records
    stamp = {RUN: ctx.run_id, PARTITION: key_text(ctx.partition)}
    return ({**record, **stamp} for record in records)


def write_jsonl(ctx, records):
    dumps = json.dumps
    with atomic_write(part_of(ctx, "jsonl")) as f:
        f.writelines(dumps(r, default=str) + "\n" for r in stamped(ctx, records))


def write_csv(ctx, records):
    with atomic_write(part_of(ctx, "csv")) as f:
        writer = None
        for record in stamped(ctx, records):
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(record))
                writer.writeheader()
            writer.writerow(record)


def finalize_files(ctx, ext, skip_header):
    """The merged file first, then (replace) the folder swapped in: a merge that fails
    leaves `path` as it was."""
    replace = ctx.params.get("mode") == "replace"
    if replace:
        check_parts(ctx, ext)
    if ctx.params.get("prune_missing"):
        prune_parts(ctx, ext)
    merge_parts(ctx, ext, skip_header)
    if replace:
        swap_in(ctx)


def prune_parts(ctx, ext):
    """`mode = "partition"`: remove the part files of keys the source no longer has."""
    folder = ctx.params["path"]
    keep = {os.path.basename(key_part(folder, k, ext)) for k in ctx.partition_keys()}
    gone = [name for name in os.listdir(folder) if name.startswith("part-")
            and name.endswith(f".{ext}") and name not in keep] if os.path.isdir(folder) else []
    for name in gone:
        os.unlink(os.path.join(folder, name))
    if gone:
        fsync_dir(folder)


def check_parts(ctx, ext):
    """Every part of the run is in its folder (a newer run's replace removes an older's)."""
    mine = parts_folder(ctx)
    missing = [i for i in range(ctx.partition_count)
               if not os.path.exists(part_name(mine, i, ext))]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of this run's {ctx.partition_count} parts are not in {mine}: a "
            f"newer run of the pipeline replaced {ctx.params['path']} meanwhile and removed "
            "them; run the pipeline again if this one's output is wanted")


def swap_in(ctx):
    """Make `path` the run's folder: a symbolic link replaced in one rename, then synced."""
    path = os.path.abspath(ctx.params["path"])
    runs = f"{path}.runs"
    mine = os.path.join(runs, ctx.run_id)
    make_dirs(mine)  # a run without partitions has an empty folder
    if os.path.isdir(path) and not os.path.islink(path):  # written by an append run
        os.replace(path, os.path.join(runs, f"previous-{time.time():.0f}"))
    link = f"{path}.link-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    os.symlink(os.path.join(os.path.basename(runs), ctx.run_id), link)
    os.replace(link, path)
    fsync_dir(os.path.dirname(path))
    # Folders of runs that began before this one: superseded, failed or cancelled. (Run ids
    # made in one second do not sort by time: their first parts do.)
    began = first_part(mine) or time.time()
    for name in os.listdir(runs):
        other = first_part(os.path.join(runs, name))  # None: just begun, or gone
        if name != ctx.run_id and (name.startswith("previous-") or (
                other is not None and other <= began)):
            shutil.rmtree(os.path.join(runs, name), ignore_errors=True)


def first_part(folder):
    """When the first part file in `folder` was written (None: it has none)."""
    times = []
    with contextlib.suppress(OSError):  # removed meanwhile by another run's finalize
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                times.append(entry.stat().st_mtime)
    return min(times, default=None)


def merge_parts(ctx, ext, skip_header):
    merge = ctx.params.get("merge")
    if not merge:
        return

    if ctx.params.get("mode") == "partition":  # the current key's parts, in the run's order
        parts = (key_part(ctx.params["path"], k, ext) for k in ctx.partition_keys())
    else:
        parts = (part_name(parts_folder(ctx), i, ext) for i in range(ctx.partition_count))
    with atomic_write(merge) as out:
        header_written = False
        for name in parts:
            with open(name, encoding="utf-8", newline="") as part:
                first = part.readline()
                if first and not (skip_header and header_written):
                    out.write(first)
                header_written = header_written or bool(first)
                copy = part.read(1 << 20)
                while copy:
                    out.write(copy)
                    copy = part.read(1 << 20)


jsonl_sink = SinkSpec(name="jsonl", write=write_jsonl, configure=configure_files,
                      finalize=lambda ctx: finalize_files(ctx, "jsonl", skip_header=False))
csv_sink = SinkSpec(name="csv", write=write_csv, configure=configure_files,
                    finalize=lambda ctx: finalize_files(ctx, "csv", skip_header=True))
