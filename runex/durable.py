"""Writes that survive a power cut, and what runex does when the disk under its home is full.

A power cut loses whatever the operating system had not yet written to the disk. A change is
durable once `fsync` returned for its file and, for a file created or renamed, for the folder
that names it. runex records a partition as succeeded only after its output is durable (see
`SinkSpec.sync`); `atomic_write` is the helper a file sink needs for that.

A full disk under the home (ledger, queue, traces) would leave a worker unable to record even
its failure. Every home keeps a small `reserve` file: the first process that finds the disk
full deletes it, which frees room to record what it was doing and tells every consumer on this
machine to take no more work. A consumer's main process makes the reserve again once there is
room for it and work resumes by itself (see `Reserve`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

RESERVE_BYTES = 1 << 20  # enough for thousands of ledger rows; less on a disk under 32 MiB


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


def is_disk_full(exc: BaseException) -> bool:
    """A write refused for want of space (SQLite's SQLITE_FULL, or ENOSPC/EDQUOT)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "database or disk is full" in str(exc)  # sqlite3's error for SQLITE_FULL


def free_bytes(folder: str | os.PathLike) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def describe_full(folder: str | os.PathLike) -> str:
    """What a person reads when the disk under `folder` is full, and what to do."""
    return (f"the disk under {folder} is full ({free_bytes(folder):,} bytes free): free some "
            "space there (old traces, old output)")


class Reserve:
    """The reserve file of a home: present while its disk has room, gone once a process of
    this machine found the disk full. Looking costs a `stat`; nothing is written while the
    disk has room."""

    def __init__(self, home: str | os.PathLike, size: int = RESERVE_BYTES):
        self.home = Path(home)
        self.path = self.home / "reserve"
        self.size = size

    def _size(self) -> int:
        """The reserve's size: `size`, or a 32nd of a smaller disk."""
        try:
            st = os.statvfs(self.home)
        except OSError:
            return self.size
        return max(1 << 16, min(self.size, st.f_blocks * st.f_frsize // 32) >> 16 << 16)

    def ok(self) -> bool:
        return self.path.exists()

    def release(self) -> bool:
        """Free the reserve's space (the disk is full); True if this call freed it."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True

    def make(self) -> bool:
        """Write the reserve if it is missing and the disk has room for it and some more;
        True when it is in place."""
        if self.ok():
            return True
        size = self._size()
        if free_bytes(self.home) < 2 * size:  # room for it, and as much again to work in
            return False
        temp = self.path.with_name(f".reserve.tmp-{os.getpid()}")
        try:
            with open(temp, "wb") as f:
                # Real blocks, not a sparse file: deleting it must give space back.
                chunk = b"\0" * (1 << 16)
                for _ in range(size // len(chunk)):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if is_disk_full(exc):
                return False
            raise
        return True
