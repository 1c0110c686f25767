"""`runex doctor`: what is wrong with this installation, in one screen.

Each check reads; none changes anything. A finding is `ok`, `warn` (worth knowing, nothing is
broken) or `fail` (something will not work until it is fixed), with what to do.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from runex import __version__, trace
from runex.errors import RunexError
from runex.identity import alive, rebooted
from runex.reserve import Reserve, free_bytes
from runex.scheduler import scan

if TYPE_CHECKING:  # for type checkers only: `runex.app` imports this module
    from runex.app import Runex

LOW_SPACE = 100 << 20  # bytes free under the home below which a warning is given
BIG_LOG = 64 << 20  # a write-ahead log larger than this has not been checkpointed for long
SKEW = 60.0  # seconds: a ledger time further ahead than this means the clock went back
HOST_SKEW = 5.0  # seconds between this host's clock and the database server's worth a word


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok, warn, fail
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def examine(rx: Runex) -> list[Finding]:
    found = [Finding("versions", "ok", f"runex {__version__}, Python {platform.python_version()}"
                     f" ({sys.executable})")]
    found += _home(rx)
    if any(f.status == "fail" for f in found):
        return found  # the rest reads the home
    found += _extensions(rx)
    found += _pipelines(rx)
    if rx.project.database:
        found += _database(rx)
        if found[-1].status == "fail":
            return found
    elif not rx.project.ledger_path.exists():  # nothing has run: nothing more to read
        return found
    found += _consumers(rx)
    found += _attempts(rx)
    if not rx.project.database:
        found += _logs(rx)
    found += _clock(rx)
    return found


def _database(rx: Runex) -> list[Finding]:
    """The PostgreSQL server of the queue and ledger: reachable, and its clock close to this
    host's (leases are judged by the clocks of every host)."""
    try:
        what, server_now = rx.ledger.server()
    except RunexError as exc:
        return [Finding("database", "fail", str(exc))]
    found = [Finding("database", "ok", f"{what}: {rx.ledger.engine}")]
    skew = server_now - time.time()
    if abs(skew) > HOST_SKEW:
        found.append(Finding("clock", "warn", f"this host's clock is {abs(skew):,.0f} s "
                             f"{'behind' if skew > 0 else 'ahead of'} the database server's: "
                             "leases and schedules need the hosts' clocks set alike (NTP: "
                             "`timedatectl`)"))
    return found


def _home(rx: Runex) -> list[Finding]:
    home = rx.project.home
    if not home.exists():
        return [Finding("home", "warn", f"{home} does not exist yet: the first submit or "
                                        "worker makes it")]
    try:
        with tempfile.NamedTemporaryFile(dir=home, prefix=".doctor-"):
            pass
    except OSError as exc:
        return [Finding("home", "fail", f"cannot write to {home} ({exc.strerror}); check "
                                        "its owner and permissions")]
    free = free_bytes(home)
    reserve = Reserve(home)
    if not reserve.ok() and free < 2 * reserve.size:
        return [Finding("home", "fail", (reserve.problem or reserve.describe())
                        + "; consumers take no work until there is room")]
    if not reserve.ok():
        return [Finding("home", "warn", f"{home}: the reserve file is missing, with "
                        f"{free / (1 << 20):,.0f} MiB free; the next consumer makes it again")]
    status = "warn" if free < LOW_SPACE else "ok"
    return [Finding("home", status, f"{home}: writable, {free / (1 << 20):,.0f} MiB free"
                    + ("; free some space before it fills" if status == "warn" else ""))]


def _extensions(rx: Runex) -> list[Finding]:
    errors = rx.load_errors
    reg = rx.registry
    loaded = (f"{len(reg.kernels)} kernels, {len(reg.sources)} sources, {len(reg.sinks)} sinks "
              f"from {', '.join(str(d) for d in rx.project.extension_dirs) or 'no folder'}")
    if errors:
        return [Finding("extensions", "fail", f"{e}") for e in errors] + [
            Finding("extensions", "ok", loaded)]
    return [Finding("extensions", "ok", loaded)]


def _pipelines(rx: Runex) -> list[Finding]:
    rows = scan(rx.project.root, rx.pipeline_files, rx.plan)
    bad = [e for e in rows if e.error]
    found = [Finding("pipelines", "fail", e.error or "") for e in bad]
    scheduled = sum(1 for e in rows if e.schedule is not None)
    found.append(Finding("pipelines", "ok" if not bad else "warn",
                         f"{len(rows) - len(bad)} of {len(rows)} pipeline files load "
                         f"({scheduled} scheduled)"))
    return found


def _consumers(rx: Runex) -> list[Finding]:
    found = []
    running = []
    for c in rx.ledger.consumers():
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["started_at"]))
        where = f"{c['host']} pid {c['pid']} ({c['workers']} workers) since {since}"
        if c["host"] == trace.HOST and not alive(c["pid"], c["pid_started"], c["boot_id"]):
            why = "the machine restarted" if rebooted(c["boot_id"]) else "it is gone"
            found.append(Finding("consumers", "warn", f"{where}: recorded as running, but {why}"
                                 "; the next consumer to start forgets it"))
        else:
            running.append(where)
    found.append(Finding("consumers", "ok" if running else "warn",
                         "running: " + "; ".join(running) if running else
                         "no consumer is running: queued work waits for `runex worker`"))
    return found


def _attempts(rx: Runex) -> list[Finding]:
    now = time.time()
    stale = [a for a in rx.ledger.running_attempts()
             if (a["lease_until"] or 0) <= now or (
                 a["host"] == trace.HOST and not alive(a["pid"], a["pid_started"], a["boot_id"]))]
    if not stale:
        return [Finding("attempts", "ok", "no running attempt has lost its worker")]
    shown = ", ".join(f"{a['run_id']} #{a['idx']} (pid {a['pid']} on {a['host']})"
                      for a in stale[:3])
    return [Finding("attempts", "warn", f"{len(stale)} running attempts have lost their worker: "
                    f"{shown}; a running consumer's reaper queues them again")]


def _logs(rx: Runex) -> list[Finding]:
    found = []
    for path in (rx.project.ledger_path, rx.project.queue_path):
        log = f"{path}-wal"
        size = os.path.getsize(log) if os.path.exists(log) else 0
        db = os.path.getsize(path) if os.path.exists(path) else 0
        status = "warn" if size > BIG_LOG else "ok"
        found.append(Finding("storage", status, f"{os.path.basename(path)} {db / (1 << 20):,.1f}"
                             f" MiB, write-ahead log {size / (1 << 20):,.1f} MiB"
                             + ("; a reader holding it open keeps it from being checkpointed"
                                if status == "warn" else "")))
    return found


def _clock(rx: Runex) -> list[Finding]:
    newest = rx.ledger.newest_time()
    ahead = (newest or 0) - time.time()
    if ahead > SKEW:
        return [Finding("clock", "fail", f"the ledger has times {ahead:,.0f} s ahead of this "
                        "machine's clock: the clock went back, or another host's runs ahead; "
                        "schedules would wait for it (check NTP: `timedatectl`)")]
    return [Finding("clock", "ok", "this machine's clock is not behind the ledger")]
