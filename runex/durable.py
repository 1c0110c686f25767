"""Writes that survive a power cut.

A power cut loses whatever the operating system had not yet written to the disk. A change is
durable once `fsync` returned for its file and, for a file created or renamed, for the folder
that names it. runex records a partition as succeeded only after its output is durable (see
`SinkSpec.sync`); `atomic_write` is the helper a file sink needs for that, and `sync_log` the
one for an SQLite file in WAL mode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make durable the names in `folder` (a file created, renamed or deleted in it)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: str | os.PathLike) -> None:
    """`os.makedirs`, with each new folder's name made durable in its parent."""
    folder = Path(folder).absolute()
    if folder.is_dir():
        return
    make_dirs(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    fsync_dir(folder.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file by its path: on Linux it writes out every change made to the file,
    through any descriptor of any process, not only this one's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 newline: str | None = "") -> Iterator[IO[Any]]:
    """Write `path` whole or not at all, durably: the block writes into a temporary file
    beside it, which is then flushed and synced, renamed over `path`, and the folder synced.
    Readers, and a machine that lost power, see the old file or the whole new one. An
    exception in the block leaves `path` as it was.

        with atomic_write("out/part-00001.jsonl") as f:
            f.write(...)
    """
    target = Path(path)
    folder = target.parent
    make_dirs(folder)
    temp = folder / f".{target.name}.tmp-{os.getpid()}"
    binary = "b" in mode
    try:
        with open(temp, mode, **({} if binary else {"encoding": encoding, "newline": newline})
                  ) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def sync_log(database: str | os.PathLike, synced: dict[str, tuple[int, int]]) -> None:
    """Make durable every transaction committed so far to the SQLite file `database` in WAL
    mode (with `synchronous=NORMAL`, SQLite syncs its write-ahead log only at checkpoints): one
    fsync of the log and, when the log file is new since the last call (`synced` remembers
    each log's identity), of the folder that names it. A connection of the caller's must be
    open on the file, which keeps the log from being removed meanwhile."""
    log = os.fspath(database) + "-wal"
    try:
        st = os.stat(log)
    except FileNotFoundError:
        return  # nothing in a log: the last checkpoint synced the database
    fsync_path(log)
    if synced.get(log) != (st.st_dev, st.st_ino):
        fsync_dir(os.path.dirname(os.path.abspath(log)))
        synced[log] = (st.st_dev, st.st_ino)
