"""The end of a run: once its last partition is over, exactly one process records how it
ended, after the sink's `finalize` step (a merge of part files, say) when every partition
succeeded."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runex import trace
from runex.errors import Unreachable
from runex.identity import holder
from runex.project import chdir
from runex.registry import SinkContext
from runex.worker import WorkerState

NOTHING_TO_KEEP = ("prune_missing: the run has no partitions, and deleting every row is more "
                   "likely a mistake (an empty or unreachable source) than what is meant; "
                   "nothing was deleted")


def finalize_run(state: WorkerState, run_id: str) -> None:
    """Called when the last partition of a run is over; exactly one process proceeds (and
    may call again, if a full disk stopped it)."""
    if not state.ledger.claim_finalize(run_id, holder()):
        return
    run = state.ledger.run(run_id)
    log = trace.logger(run_id=run_id, pipeline=run["pipeline"])
    counts = state.ledger.progress(run_id)
    total = run["partition_count"]
    failed = total - counts.get("succeeded", 0) - counts.get("skipped", 0)
    error = None
    if failed:
        bad = state.ledger.partitions(run_id, unsettled=True, limit=10)
        shown = ", ".join(f"{p['idx']} ({p['key']}): {p['status']}" for p in bad)
        more = f" and {failed - len(bad)} more" if failed > len(bad) else ""
        error = f"{failed} of {total} partitions did not succeed: {shown}{more}"
        first = next((p for p in bad if p["error"]), None)
        if first is not None:  # what to read first
            error = f"partition {first['idx']} ({first['key']}): {first['error']}; {error}"
    elif total == 0 and json.loads(run["spec"])["sink"]["params"].get("prune_missing"):
        error = NOTHING_TO_KEEP  # an empty source is more likely a mistake than the truth
    else:
        try:
            plan = state.plan(run_id, json.loads(run["spec"]))
            if plan.sink_finalize is not None:
                ctx = SinkContext(run_id=run_id, pipeline=run["pipeline"],
                                  params=plan.sink_params, partition_count=total,
                                  partition_keys=lambda: keys_of(state.ledger, run_id))
                with chdir(Path(run["project_dir"])), state.holding.finalizing(
                        state.ledger, run_id, holder()):
                    plan.sink_finalize(ctx)
                    if plan.sink_sync is not None:  # durable before the run is recorded
                        plan.sink_sync(ctx)
                if plan.sink_params.get("prune_missing"):  # their rows went: so their record
                    state.ledger.forget_outputs(plan.target, keys_of(state.ledger, run_id))
        except Unreachable:  # a database away: finalized again once it is back
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the run's error
            error = f"the sink's finalize step failed: {type(exc).__name__}: {exc}"
            log.error("run.finalize_failed", error=error,
                      traceback="".join(traceback.format_exception(exc)))
    status = ("cancelled" if run["cancel_requested"] else "failed" if error else "succeeded")
    began = run["started_at"] or run["created_at"]
    log_at = log.info if status == "succeeded" else log.warning
    log_at("run.finished", status=status, partitions=total, failed=failed,
           records_in=run["records_in"], records_out=run["records_out"],
           seconds=round(time.time() - began, 3), error=error)
    state.ledger.finish_run(run_id, status, error)
    state.ledger.sync()  # on disk before anyone reads that the run is over


def keys_of(ledger: Any, run_id: str, page: int = 1000) -> Iterator[Any]:
    """The run's partition keys in index order, read a page at a time."""
    after = -1
    while rows := ledger.partitions(run_id, after, page):
        yield from (json.loads(p["key"]) for p in rows)
        after = rows[-1]["idx"]
