"""Scheduled pipelines, fired by every consumer and yet once per fire time.

Each consumer reads the project's pipeline files (`pipelines/*.toml`, or `pipelines` in
`runex.toml`), re-reading a file when it changes, and every second fires what is due. A fire is
a ledger row keyed by (pipeline, fire time), written in the same transaction as its run, so two
consumers, a restart inside a minute, or a clock stepped back never fire a time twice.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runex import trace
from runex.cron import UTC, Schedule, iso, parse_time
from runex.errors import RunexError
from runex.ledger import Ledger, NewRun
from runex.pipeline import Pipeline, load
from runex.registry import display_path

# Submits a scheduled run: (pipeline, fire time, the ledger method that records the run with
# its fire) -> its id, or None when the ledger method found the fire time taken.
Submit = Callable[[Pipeline, Any, dt.datetime, Callable[[NewRun], bool]], str | None]

MISSED_AFTER = dt.timedelta(seconds=60)  # a fire time older than this when seen was missed
MISSED_COUNTED = 10000  # missed fire times counted at most (a year of every minute is more)
DEFAULT_PIPELINES = "pipelines/*.toml"


@dataclass
class Entry:
    """One pipeline file as last read: its pipeline and schedule, or why it cannot be used."""

    path: Path
    stamp: tuple[int, int]
    pipeline: Pipeline | None = None
    schedule: Schedule | None = None
    error: str | None = None
    reported: bool = False  # the error was traced (once per version of the file)
    next_fire: tuple[dt.datetime, dt.datetime | None] | None = None  # (after, first fire time)


class Scheduler:
    """The pipeline files matching `pattern` under `root`, checked with `check`, fired into
    `ledger` by `submit` (see `Runex.scheduler`)."""

    def __init__(self, root: Path, pattern: str, ledger: Ledger,
                 check: Callable[[Pipeline], Any], submit: Submit):
        self.root, self.pattern, self.ledger = root, pattern, ledger
        self.check, self.submit = check, submit
        self.entries: dict[Path, Entry] = {}

    def scan(self) -> list[Entry]:
        """Every pipeline file, re-read when its modification time or size changed."""
        return scan(self.root, self.pattern, self.check, self.entries)

    def tick(self, now: dt.datetime | None = None) -> list[str]:
        """Fire what is due at `now`; returns the ids of the runs this call created."""
        now = now or dt.datetime.now(UTC)
        entries = []
        for entry in self.scan():
            if entry.error and not entry.reported:
                trace.logger(pipeline=entry.path.stem).warning(
                    "schedule.invalid", file=display_path(str(entry.path)), error=entry.error)
                entry.reported = True
            if entry.schedule is not None:
                entries.append(entry)
        by_name = {e.pipeline.name: e for e in entries}
        paused = self.ledger.pauses()
        created = [run_id for name, fire_time in self.ledger.waiting_fires()
                   if name in by_name and name not in paused
                   and (run_id := self._promote(by_name[name], fire_time))]
        for entry in entries:
            for fire_time in self.due(entry, now):
                run_id = self.fire(entry, fire_time, paused)
                if run_id:
                    created.append(run_id)
        return created

    def due(self, entry: Entry, now: dt.datetime) -> list[dt.datetime]:
        """The fire times to fire now, after the pipeline's last fire, per its catch-up. The
        latest of those it will not fire (missed while no consumer ran) is recorded as
        `missed`, with how many were."""
        options, ledger = entry.pipeline.options, self.ledger
        start = parse_time(ledger.schedule_since(entry.pipeline.name, iso(now)))
        last = ledger.last_fire(entry.pipeline.name)
        if last is not None:
            start = max(start, parse_time(last))
        # Most ticks find nothing due: remember the first fire time after `start`, so they
        # cost two reads and no cron matching.
        if entry.next_fire is None or entry.next_fire[0] != start:
            upcoming = entry.schedule.after(start, 1)
            entry.next_fire = (start, upcoming[0] if upcoming else None)
        if entry.next_fire[1] is None or now < entry.next_fire[1]:
            return []
        count = options.max_catchup if options.catchup == "all" else 1
        times = entry.schedule.latest(start, now, count + 1)  # and the latest one missed
        if options.catchup == "skip":
            fire = [t for t in times if now - t <= MISSED_AFTER][-count:]
        else:
            fire = times[-count:]
        missed = [t for t in times if t not in fire][-1:]  # and any before it
        if missed:
            self.missed(entry, start, missed[0], options.catchup)
        return fire

    def missed(self, entry: Entry, start: dt.datetime, latest: dt.datetime,
               catchup: str) -> None:
        """Record the latest fire time missed while no consumer ran, with how many were."""
        name, when = entry.pipeline.name, iso(latest)
        n = sum(1 for _ in itertools.islice(entry.schedule.between(start, latest), MISSED_COUNTED))
        reason = (f"{'more than ' if n == MISSED_COUNTED else ''}{n:,} fire time"
                  f"{'s' if n != 1 else ''} up to this one missed while no consumer ran "
                  f"(catchup = {catchup!r})")
        if self.ledger.record_fire(name, when, "missed", reason):
            trace.logger(pipeline=name, fire_time=when).warning("schedule.missed",
                                                                 reason=reason)

    def fire(self, entry: Entry, fire_time: dt.datetime, paused: Container[str] = ()
             ) -> str | None:
        """Fire `entry` at `fire_time`, unless another consumer did; a time that comes while
        the schedule is `paused`, or while its last run is going and it may not overlap, is
        recorded as skipped (or waiting) with the reason."""
        pipeline, ledger = entry.pipeline, self.ledger
        name, when = pipeline.name, iso(fire_time)
        if ledger.fire(name, when) is not None:
            return None  # another consumer fired it
        log = trace.logger(pipeline=name, fire_time=when)
        if name in paused:
            reason = "the schedule was paused"
            log.info("schedule.skipped", reason=reason)
            ledger.record_fire(name, when, "skipped", reason)
            return None
        active = ledger.active_run(name)
        if active is not None and pipeline.options.overlap != "allow":
            status = "skipped" if pipeline.options.overlap == "skip" else "waiting"
            reason = f"run {active} was still going"
            log.info(f"schedule.{status}", because=active, reason=reason)
            ledger.record_fire(name, when, status, reason)
            return None
        return self._submit(entry, fire_time, ledger.fire_run, log)

    def _promote(self, entry: Entry, fire_time: str) -> str | None:
        """Fire a time that waited (overlap = "queue") once the earlier run is over."""
        if self.ledger.active_run(entry.pipeline.name) is not None:
            return None
        log = trace.logger(pipeline=entry.pipeline.name, fire_time=fire_time)
        return self._submit(entry, parse_time(fire_time), self.ledger.fire_waiting_run, log)

    def _submit(self, entry: Entry, fire_time: dt.datetime, record: Callable[[NewRun], int | None],
                log: Any) -> str | None:
        try:
            run_id = self.submit(entry.pipeline, (), fire_time, record)
        except RunexError as exc:
            # Recorded, so that a pipeline failing at a fire time does not retry every second.
            log.error("schedule.failed", error=str(exc))
            self.ledger.record_fire(entry.pipeline.name, iso(fire_time), "error", str(exc))
            return None
        if run_id is not None:
            log.info("schedule.fired", run_id=run_id)
        return run_id

    def listing(self, now: dt.datetime | None = None, upcoming: int = 3) -> list[dict]:
        """What `runex schedules` shows: each pipeline file with its schedule, next fire
        times, last fire and its run's status, whether it is paused (since when, by whom), or
        its error."""
        now = now or dt.datetime.now(UTC)
        paused = self.ledger.pauses()
        rows = []
        for entry in self.scan():
            row = {"file": display_path(str(entry.path)), "error": entry.error}
            if entry.pipeline is not None:
                row["pipeline"] = entry.pipeline.name
            if entry.schedule is not None:
                options = entry.pipeline.options
                last = self.ledger.fires(entry.pipeline.name, 1)
                row.update(
                    schedule=entry.schedule.expression, timezone=options.timezone,
                    catchup=options.catchup, overlap=options.overlap,
                    next=[iso(t) for t in entry.schedule.after(now, upcoming)],
                    last=last[0] if last else None,
                    paused=paused.get(entry.pipeline.name))
            if entry.error or entry.schedule is not None:
                rows.append(row)
        return rows


def scan(root: Path, pattern: str, check: Callable[[Pipeline], Any],
         entries: dict[Path, Entry] | None = None) -> list[Entry]:
    """The pipeline files matching `pattern` under `root`, each loaded and checked (with
    `check`), or with its error; `entries` (updated) keeps those read before, read again
    only when their modification time or size changed."""
    entries = {} if entries is None else entries
    paths = sorted(root.glob(pattern))
    for gone in set(entries) - set(paths):
        del entries[gone]
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        stamp = (st.st_mtime_ns, st.st_size)
        entry = entries.get(path)
        if entry is None or entry.stamp != stamp:
            entries[path] = _read(path, stamp, check)
    return list(entries.values())


def _read(path: Path, stamp: tuple[int, int], check: Callable[[Pipeline], Any]) -> Entry:
    entry = Entry(path, stamp)
    try:
        pipeline = load(path)  # kept with its {fire_time} placeholders
        check(pipeline)  # against the extensions
        entry.pipeline, entry.schedule = pipeline, pipeline.schedule
    except RunexError as exc:
        entry.error = str(exc)
    return entry


def fire_times(pipeline: Pipeline, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Fire times of a scheduled pipeline from `start` to `end`, both included (backfill)."""
    schedule = pipeline.schedule
    if schedule is None:
        raise RunexError(f"{pipeline.path}: has no schedule or every in [options] to backfill")
    return list(schedule.between(start - dt.timedelta(microseconds=1), end))

