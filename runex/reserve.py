"""The home's reserve: what runex does when the disk under its home fills up.

A full disk under the home (ledger, queue, traces) would leave a worker unable to record even
its failure. Every home keeps a small `reserve` file. The first process that finds the disk
full deletes it, which frees room to record what it was doing, and is the sign for every
consumer of the home to take no more work. A consumer's main process makes the reserve again
once there is room for it, and work resumes by itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from runex.errors import DiskFull

RESERVE_BYTES = 1 << 20  # enough for thousands of ledger rows; less on a disk under 32 MiB


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


def describe_full(folder: str | os.PathLike, hint: str = "") -> str:
    """What a person reads when the disk under `folder` is full, and what to do."""
    return (f"the disk under {folder} is full ({free_bytes(folder):,} bytes free): free some "
            f"space there{hint}")


class Reserve:
    """The reserve file of a home: present while its disk has room, gone once a process found
    the disk full. Looking costs a `stat`; nothing is written while the disk has room."""

    def __init__(self, home: str | os.PathLike, size: int = RESERVE_BYTES):
        self.home = Path(home)
        self.path = self.home / "reserve"
        self.size = size
        self.problem = ""  # why the last `make` failed, when it was not for want of space

    def ok(self) -> bool:
        return self.path.exists()

    def release(self) -> bool:
        """Free the reserve's space (the disk is full); True if this call freed it."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True

    def full(self, what: str, then: str = "") -> DiskFull:
        """Release the reserve, and the error to raise for `what` (`cannot write X`), which
        failed because the disk under the home is full; `then` follows the advice."""
        self.release()
        return DiskFull(f"{what}: {self.describe()}{then}")

    def describe(self) -> str:
        return describe_full(self.home, " (old traces, old output)")

    def make(self) -> bool:
        """Write the reserve if it is missing and the disk has room for it twice over (one
        for the reserve, one to work in); True when it is in place. A home that cannot be
        written for another reason (read-only) gets no reserve: `problem` says why."""
        if self.ok():
            return True
        size = self._size()
        if free_bytes(self.home) < 2 * size:
            return False
        temp = self.path.with_name(f".reserve.tmp-{os.getpid()}")
        try:
            with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
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
            if not is_disk_full(exc):
                self.problem = f"cannot write {self.path} ({exc}); check {self.home}"
            return False
        self.problem = ""
        return True

    def _size(self) -> int:
        """The reserve's size: `size`, or a 32nd of a smaller disk (in 64 KiB blocks)."""
        try:
            st = os.statvfs(self.home)
        except OSError:
            return self.size
        return max(1 << 16, min(self.size, st.f_blocks * st.f_frsize // 32) >> 16 << 16)
