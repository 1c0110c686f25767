"""Built-in file sources (`csv`, `jsonl`, `lines`) and file sinks (`jsonl`, `csv`).

Sources take a glob `path` (relative to the project folder): one partition per file, or, with
`chunk_bytes`, large files split into chunks of about that size at line boundaries (which
assumes one record per line: no quoted newlines in CSV).

Sinks write one file per partition, `part-NNNNN.<ext>` in the folder `path`, through a
temporary file renamed into place (`runex.atomic_write`: synced, then renamed, then the folder
synced), so a repeated partition replaces its file rather than adding to it, and a partition is
on disk before runex records it as done. With `merge`, the parts are joined in partition order
into that one file, the same way, once every partition is in.
"""

import csv
import glob
import json
import os

from runex import DataSourceSpec, SinkSpec, atomic_write


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


def header_of(partition, encoding, delimiter):
    name = partition if isinstance(partition, str) else partition[0]
    with open(name, encoding=text_encoding(encoding), newline="") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def read_csv(partition, delimiter=",", encoding="utf-8"):
    if isinstance(partition, str):  # a whole file: the csv module reads it directly
        with open(partition, encoding=text_encoding(encoding), newline="") as f:
            rows = csv.reader(f, delimiter=delimiter)
            yield from as_dicts(rows, next(rows, []))
        return
    fields = header_of(partition, encoding, delimiter)
    lines = read_lines(partition, encoding, skip_header=True)
    yield from as_dicts(csv.reader(lines, delimiter=delimiter), fields)


def as_dicts(rows, fields):
    """Rows as dicts keyed by the header, as `csv.DictReader` makes them (blank lines
    skipped; a short row's missing fields None, a long row's extra values in a list under
    None), at about twice its speed."""
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


csv_source = DataSourceSpec(name="csv", partitions=file_partitions, read=read_csv)
jsonl_source = DataSourceSpec(name="jsonl", partitions=file_partitions, read=read_jsonl)
lines_source = DataSourceSpec(name="lines", partitions=file_partitions, read=read_text)


# -- sinks ---------------------------------------------------------------------------------

def configure_files(path, merge=None):
    if not isinstance(path, str) or not path:
        raise ValueError("path must name the folder the part files go in")
    return {"path": path, "merge": merge}


def part_name(folder, index, ext):
    return os.path.join(folder, f"part-{index:05d}.{ext}")


def write_jsonl(ctx, records):
    dumps = json.dumps
    with atomic_write(part_name(ctx.params["path"], ctx.index, "jsonl")) as f:
        f.writelines(dumps(r, default=str) + "\n" for r in records)


def write_csv(ctx, records):
    with atomic_write(part_name(ctx.params["path"], ctx.index, "csv")) as f:
        writer = None
        for record in records:
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(record))
                writer.writeheader()
            writer.writerow(record)


def merge_parts(ctx, ext, skip_header):
    merge = ctx.params.get("merge")
    if not merge:
        return

    with atomic_write(merge) as out:
        header_written = False
        for index in range(ctx.partition_count):
            with open(part_name(ctx.params["path"], index, ext), encoding="utf-8",
                      newline="") as part:
                first = part.readline()
                if first and not (skip_header and header_written):
                    out.write(first)
                header_written = header_written or bool(first)
                copy = part.read(1 << 20)
                while copy:
                    out.write(copy)
                    copy = part.read(1 << 20)


jsonl_sink = SinkSpec(name="jsonl", write=write_jsonl, configure=configure_files,
                      finalize=lambda ctx: merge_parts(ctx, "jsonl", skip_header=False))
csv_sink = SinkSpec(name="csv", write=write_csv, configure=configure_files,
                    finalize=lambda ctx: merge_parts(ctx, "csv", skip_header=True))
