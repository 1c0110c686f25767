"""Prometheus metrics of the ledger, as `/metrics` of `runex web` serves them: computed at
each scrape from what the ledger holds, so right whatever the number of processes and hosts
that write it; the attempts of runs that are over are read once (`AttemptTotals`)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from runex.ledger import TERMINAL_RUN as TERMINAL

# Attempt durations' histogram buckets, in seconds (Prometheus' `le`).
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0)


def exposition(rx: Any, attempts_read: AttemptTotals) -> str:
    """Prometheus' text format of `rx`'s ledger, computed now (so right whatever the number
    of processes and hosts); `attempts_read` keeps what it read of the attempts before."""
    ledger = rx.ledger
    out = Exposition()
    out.family("runex_runs", "gauge", "Runs the ledger keeps, by pipeline and status.",
               [({"pipeline": p, "status": s}, n) for p, s, n in ledger.runs_by_status()])
    out.family("runex_partitions", "gauge", "Partitions of the runs kept, by status.",
               [({"status": s}, n) for s, n in ledger.partitions_by_status().items()])
    attempts = attempts_read.read(ledger)
    out.family("runex_attempts", "counter", "Attempts at partitions, by pipeline and "
               "outcome (of the runs kept).",
               [({"pipeline": p, "outcome": s}, n)
                for (p, s), n in sorted(attempts.outcomes.items())])
    out.histogram("runex_attempt_duration_seconds", "How long attempts that ended took.",
                  BUCKETS, attempts.buckets, attempts.ended, attempts.seconds)
    out.family("runex_queue_depth", "gauge", "Partitions queued, of runs not over.",
               [({}, sum(ledger.queued_counts().values()))])
    oldest = ledger.oldest_queued()
    out.family("runex_queue_oldest_age_seconds", "gauge", "How long the partition queued "
               "longest ago has waited (0: none queued).",
               [({}, 0 if oldest is None else max(0.0, time.time() - oldest))])
    out.family("runex_consumers", "gauge", "Consumers (runex worker) recorded as running, "
               "by host.", [({"host": h}, n) for h, n in
                            consumers_by_host(rx.workers()["consumers"]).items()])
    out.family("runex_recovered", "counter", "Attempts declared lost (their worker died) "
               "and recovered.", [({}, sum(n for (_, s), n in attempts.outcomes.items()
                                           if s == "lost"))])
    last, upcoming = [], []
    for s in rx.schedules(check=False):
        if s.get("pipeline") and s.get("last"):
            last.append(({"pipeline": s["pipeline"]}, _timestamp(s["last"]["fire_time"])))
        if s.get("pipeline") and s.get("next") and not s.get("paused"):
            upcoming.append(({"pipeline": s["pipeline"]}, _timestamp(s["next"][0])))
    out.family("runex_schedule_last_fire_timestamp_seconds", "gauge",
               "When each scheduled pipeline last fired.", last)
    out.family("runex_schedule_next_fire_timestamp_seconds", "gauge",
               "When each scheduled pipeline fires next (none while paused).", upcoming)
    return out.text()


@dataclass
class Totals:
    """Attempts by (pipeline, outcome); of those that ended, how many took at most each of
    `BUCKETS` seconds, how many, and their seconds."""

    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    ended: int = 0
    seconds: float = 0.0

    def add(self, row: tuple[Any, ...]) -> None:
        """Add a row of `Ledger.attempt_totals`."""
        _, pipeline, _, _, state, n, *buckets, ended, seconds = row
        self.outcomes[pipeline, state] = self.outcomes.get((pipeline, state), 0) + n
        self.buckets = [a + (b or 0) for a, b in zip(self.buckets, buckets, strict=True)]
        self.ended += ended
        self.seconds += seconds

    def plus(self, other: Totals) -> Totals:
        both = Totals(dict(self.outcomes), list(self.buckets), self.ended, self.seconds)
        for key, n in other.outcomes.items():
            both.outcomes[key] = both.outcomes.get(key, 0) + n
        both.buckets = [a + b for a, b in zip(both.buckets, other.buckets, strict=True)]
        both.ended += other.ended
        both.seconds += other.seconds
        return both


class AttemptTotals:
    """The attempts of the runs the ledger keeps, as `/metrics` counts them, without reading
    a million of them at every scrape: the runs over are read once and their attempts kept
    as totals, with the latest end among them (`mark`) and a checksum of the runs counted;
    then each scrape reads the runs not over and those that ended after the mark. A run
    counted that changed (retried: a new end) or went (pruned) changes the checksum, and
    everything is read again."""

    def __init__(self) -> None:
        self.totals = Totals()
        self.mark = float("-inf")
        self.check: tuple[int, int] | None = None  # (runs counted, checksum): None, unbuilt

    def read(self, ledger: Any) -> Totals:
        runs = ledger.run_ends()
        ends = {run_id: end for run_id, state, end in runs
                if state in TERMINAL and end is not None}
        if self.check != checksum((r, e) for r, e in ends.items() if e <= self.mark):
            self.totals, self.mark, self.check = Totals(), float("-inf"), None
        fresh = {run_id: end for run_id, end in ends.items() if end > self.mark}
        going = [run_id for run_id, _, end in runs if run_id not in ends]
        counted, now, settled = Totals(), Totals(), True
        for row in ledger.attempt_totals(BUCKETS, None if self.check is None
                                         else [*fresh, *going]):
            run_id, _, _, end = row[:4]
            if run_id in fresh and fresh[run_id] == end:  # over, as seen above
                counted.add(row)
            else:
                now.add(row)
                settled = settled and run_id not in ends  # changed since it was seen
        if settled:  # else those runs are read again next time
            self.totals = self.totals.plus(counted)
            self.mark = max([self.mark, *fresh.values()])
            self.check = checksum((r, e) for r, e in ends.items() if e <= self.mark)
            return self.totals.plus(now)
        return self.totals.plus(counted).plus(now)


def checksum(runs: Iterable[tuple[str, float]]) -> tuple[int, int]:
    """How many `runs` (id, end) there are, and a sum of their hashes."""
    n = total = 0
    for run_id, end in runs:
        n += 1
        total += zlib.crc32(f"{run_id} {end!r}".encode())
    return n, total


class Exposition:
    """Prometheus' text exposition format, a family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        if kind == "counter":  # the text format names a counter by its sample: `x_total`
            name += "_total"
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{labels(ls)} {value:g}" for ls, value in samples]

    def histogram(self, name: str, help_text: str, bounds: Iterable[float], counts: list[int],
                  total: int, seconds: float) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        self.lines += [f'{name}_bucket{{le="{b:g}"}} {n}'
                       for b, n in zip(bounds, counts, strict=True)]
        self.lines += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_count {total}",
                       f"{name}_sum {seconds:g}"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def consumers_by_host(consumers: list[dict[str, Any]]) -> dict[str, int]:
    """How many of `consumers` (`Runex.workers()`'s) run on each host (those known gone
    left out)."""
    hosts: dict[str, int] = {}
    for c in consumers:
        if c["alive"] is not False:
            hosts[c["host"]] = hosts.get(c["host"], 0) + 1
    return dict(sorted(hosts.items()))


def labels(values: dict[str, str]) -> str:
    if not values:
        return ""
    quoted = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
              for v in values.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(values, quoted, strict=True)) + "}"


def _timestamp(iso_time: str) -> float:
    from runex.cron import parse_time  # noqa: PLC0415 - only with schedules

    return parse_time(iso_time).timestamp()
