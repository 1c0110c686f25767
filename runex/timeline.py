"""A run's trace in time order: the events of the trace files, and the events that the run's
rows in the ledger tell (`trace.ROW_FACTS`: the run submitted, fired, started and finished,
each attempt claimed, its steps, its commit). Streamed: a run of a million partitions is read
a row at a time, in two orders the database sorts (attempts by start, by end), merged."""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from runex import trace
from runex.runs import TERMINAL, steps_of

if TYPE_CHECKING:
    from runex.ledger import Ledger


def events(ledger: Ledger, run: dict[str, Any], traces_dir: str | os.PathLike
           ) -> Iterator[dict[str, Any]]:
    """The events of `run` (a row of the ledger), in time order."""
    base = {"run_id": run["id"], "pipeline": run["pipeline"]}
    spec = json.loads(run["spec"])
    # Files written before runex kept each fact once hold the rows' events too: the rows win.
    written = (e for e in trace.read(traces_dir, run["id"], run["created_at"],
                                     run["finished_at"] or time.time())
               if e["event"] not in trace.ROW_FACTS)
    return heapq.merge(_run_events(ledger, run, base),
                       _claimed(ledger.attempts_in_order(run["id"], "started_at"), base),
                       _ended(ledger.attempts_in_order(run["id"], "finished_at"), base, spec),
                       written, key=lambda e: e["ts"])


def _run_events(ledger: Ledger, run: dict[str, Any], base: dict[str, Any]
                ) -> Iterator[dict[str, Any]]:
    told = [{"ts": run["created_at"], "event": "run.submitted", "level": "info", **base,
             "partitions": run["partition_count"], "scheduled_for": run["scheduled_for"]}]
    told += [{"ts": f["created_at"], "event": "schedule.fired", "level": "info", **base,
              "fire_time": f["fire_time"]} for f in ledger.fires_of_run(run["id"])]
    if run["started_at"] is not None:
        told.append({"ts": run["started_at"], "event": "run.started", "level": "info", **base,
                     "partitions": run["partition_count"]})
    if run["status"] in TERMINAL:
        counts = ledger.progress(run["id"])
        told.append({
            "ts": run["finished_at"], "event": "run.finished",
            "level": "info" if run["status"] == "succeeded" else "warning", **base,
            "status": run["status"], "partitions": run["partition_count"],
            "failed": run["partition_count"] - counts.get("succeeded", 0)
            - counts.get("skipped", 0),
            "records_in": run["records_in"], "records_out": run["records_out"],
            "seconds": round(run["finished_at"] - (run["started_at"] or run["created_at"]), 3),
            "error": run["error"]})
    return iter(sorted(told, key=lambda e: e["ts"]))


def _where(a: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "partition": json.loads(a["key"]), "partition_index": a["idx"],
            "attempt": a["attempt"], "pid": a["pid"], "host": a["host"]}


def _claimed(attempts: Iterable[dict[str, Any]], base: dict[str, Any]
             ) -> Iterator[dict[str, Any]]:
    for a in attempts:
        yield {"ts": a["started_at"], "event": "partition.claimed", "level": "info",
               **_where(a, base)}


def _ended(attempts: Iterable[dict[str, Any]], base: dict[str, Any], spec: dict[str, Any]
           ) -> Iterator[dict[str, Any]]:
    for a in attempts:
        where = _where(a, base)
        for i, step in enumerate(steps_of(a["steps"], spec)):
            yield {"ts": a["finished_at"], "event": "step.finished", "level": "info", **where,
                   "step": i, **step}
        if a["status"] == "succeeded":
            yield {"ts": a["finished_at"], "event": "partition.committed", "level": "info",
                   **where, "records_in": a["records_in"], "records_out": a["records_out"],
                   "seconds": round(a["finished_at"] - a["started_at"], 4)}
