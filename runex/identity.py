"""Which process is which: a worker recorded in the ledger is known by its host, pid, the
process's start time and the machine's boot, so that a pid reused by a new process, or a
machine restarted since, is never taken for the worker that is gone."""

from __future__ import annotations

import os

from runex import trace


def process_start(pid: int, running: bool = False) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), which tells a pid
    reused by a new process from the one that claimed a partition; None where unknown, or,
    with `running`, for a process that has exited but was not yet reaped (a zombie: a killed
    consumer's workers are zombies for a moment)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or (running and fields[0] in ("Z", "X")):
        return None
    return fields[19]


def boot_id() -> str | None:
    """This boot of the machine (Linux): it changes at every boot, so a process recorded with
    another boot id on this host is gone, whatever its pid and start time."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


BOOT_ID = boot_id()


def rebooted(boot: str | None) -> bool:
    """Whether this host restarted since boot `boot` (False where either is unknown)."""
    return boot is not None and BOOT_ID is not None and boot != BOOT_ID


def alive(pid: int, started: str | None, boot: str | None = None) -> bool:
    """Whether process `pid` of this host, started at `started` during boot `boot` (either
    may be unknown), still runs."""
    if rebooted(boot):
        return False
    if started is not None and os.path.exists("/proc/self/stat"):
        return process_start(pid, running=True) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Me:
    """This process's start time, read once, and again in a forked child."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.started = process_start(os.getpid())


_me = _Me()


def my_start() -> str | None:
    """This process's start time (see `process_start`)."""
    return _me.started


def holder() -> str:
    """This process, as the ledger records who finalizes a run: `host:pid:start:boot` (the
    last two empty where unknown)."""
    return f"{trace.HOST}:{os.getpid()}:{_me.started or ''}:{BOOT_ID or ''}"


def holder_alive(text: str) -> bool | None:
    """Whether the process `holder()` gave `text` runs (`host:pid` from runex 0.1 too); None
    for a process of another host, which cannot be told from here."""
    host, pid, *rest = text.split(":")
    if host != trace.HOST:
        return None
    started, boot = (*rest, "", "")[:2]
    return alive(int(pid), started or None, boot or None)
