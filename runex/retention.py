"""Retention: what a home lets go of, so that its size levels off. Every consumer takes a
small step as often as it reaps (`step`): the finished runs that `retain` and `retain_runs`
(runex.toml) let go leave the ledger (`Ledger.prune`), with the trace files of the days before
the oldest run kept; and once nothing is queued or running (`settle`), the space goes back to
the file system and the write-ahead logs are cut back (to nothing, those over a MiB)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from runex import trace
from runex.ledger import Ledger
from runex.project import Project
from runex.storage import FREE_KEEP_PAGES

# A step prunes at most STEP_RUNS runs and about STEP_PARTITIONS partitions, and gives at
# most STEP_PAGES pages back: a second or so, after which the consumer answers a signal.
STEP_RUNS = 100
STEP_PARTITIONS = 20_000
STEP_PAGES = 4096


def step(ledger: Ledger, huey: Any, project: Project) -> None:
    """One step of a consumer's retention (a job of its main process)."""
    seconds, runs = project.retention
    before = None if seconds is None else time.time() - seconds
    done = ledger.prune(before, beyond_newest=runs, max_runs=STEP_RUNS,
                        max_partitions=STEP_PARTITIONS)
    if done.runs or done.partitions:
        trace.logger().debug("ledger.pruned", **dataclasses.asdict(done))
        prune_trace_files(project.traces_dir, ledger, before)
    ledger.reclaim(most=STEP_PAGES, least=FREE_KEEP_PAGES)
    settle(ledger, huey)


def settle(ledger: Ledger, huey: Any) -> None:
    """Once nothing is queued or running (else nothing): the ledger's and the queue's
    write-ahead logs cut back (to nothing, if over a MiB), the queue's free pages given back (see
    `Ledger.settle`, `QueueStorage.settle`)."""
    if ledger.unfinished_partitions() == 0:
        ledger.settle()
        huey.storage.settle()


def prune_trace_files(traces: str | os.PathLike, ledger: Ledger, before: float | None,
                      dry_run: bool = False) -> list[str]:
    """Delete the trace files of the whole days before `before` and before the oldest run
    the ledger keeps (whose events stay); returns their names."""
    until = min((t for t in (before, ledger.oldest_run_time()) if t is not None), default=None)
    if until is None or not Path(traces).exists():
        return []
    last_day = time.strftime("%Y-%m-%d", time.gmtime(until))
    files = []
    for path in sorted(Path(traces).glob("????-??-??.jsonl")):
        if path.stem < last_day:
            files.append(path.name)
            if not dry_run:
                path.unlink(missing_ok=True)
    return files
