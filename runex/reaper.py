"""Recovery of work whose worker died: runs in every consumer, at start and periodically.

huey deletes a message before running it, so a worker killed mid-partition takes its message
with it. The ledger still says `running`; the reaper finds such attempts (their process gone,
or replaced by another with the same pid, or, for other hosts, their lease expired), records
them as `lost` and queues the partition again, or quarantines a partition that was lost too
often. It also re-queues queued partitions whose message vanished, and finalizes runs whose
finalizing worker died. It only reads unless it finds something to mend.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from runex import tasks, trace
from runex.errors import PartitionTimeout
from runex.executor import Recording, Stats, failed
from runex.finalizer import finalize_run
from runex.identity import BOOT_ID, alive, holder, holder_alive, my_start, rebooted
from runex.pipeline import Pipeline
from runex.worker import HARD_GRACE, WorkerState

# Partitions queued at least this long ago, without a message, are queued again by a consumer
# that starts while no other runs: not zero, for a submit between its ledger write and its
# queue write.
VANISHED_ALONE = 2.0


def register(state: WorkerState, workers: int) -> None:
    """Record this consumer in the ledger, and forget the consumers of this host that are
    gone (killed, or from before a reboot)."""
    ledger = state.ledger
    for c in ledger.consumers():
        if c["host"] == trace.HOST and not alive(c["pid"], c["pid_started"], c["boot_id"]):
            ledger.remove_consumer(c["host"], c["pid"])
    ledger.add_consumer(trace.HOST, os.getpid(), my_start(), BOOT_ID, workers)


def unregister(state: WorkerState) -> None:
    state.ledger.remove_consumer(trace.HOST, os.getpid())


def others_alive(state: WorkerState) -> bool:
    """Whether another consumer may be working this home: one of this host that runs, or
    one of another host (which cannot be checked from here)."""
    return any(c["host"] != trace.HOST
               or (c["pid"] != os.getpid() and alive(c["pid"], c["pid_started"], c["boot_id"]))
               for c in state.ledger.consumers())


def reap_lost(state: WorkerState, now: float | None = None) -> int:
    """Declare lost the running attempts whose worker is gone; returns how many."""
    now = now or time.time()
    found = 0
    runs: dict[str, tuple[dict, Any]] = {}  # run id -> (run, options), read once per run
    for a in state.ledger.running_attempts():
        # A worker that stopped renewing its lease has let go of the partition (paused, or its
        # ledger write failed) even if its process lives on; on another host, the lease is
        # all there is to go by.
        local = a["host"] == trace.HOST
        expired = (a["lease_until"] or 0) <= now
        restarted = local and rebooted(a["boot_id"])
        if not expired and (not local or alive(a["pid"], a["pid_started"], a["boot_id"])):
            continue
        if a["run_id"] not in runs:
            run = state.ledger.run(a["run_id"])
            runs[a["run_id"]] = (run, Pipeline.from_dict(json.loads(run["spec"])).options)
        run, options = runs[a["run_id"]]
        reason = (f"worker pid {a['pid']} on {a['host']} is gone: the machine restarted"
                  if restarted else f"lease of worker pid {a['pid']} on {a['host']} expired"
                  if expired else f"worker pid {a['pid']} on {a['host']} is gone")
        trace.logger(run_id=a["run_id"], pipeline=run["pipeline"], partition_index=a["idx"],
                     attempt=a["attempt"]).warning("partition.lost", reason=reason)
        lost = state.ledger.lose_attempt(a["run_id"], a["idx"], a["attempt"], reason,
                                         options.quarantine_after)
        if lost.status is None:
            continue
        found += 1
        if lost.status == "queued":
            # Alone in its message, so that a partition that kills its worker runs by itself
            # next time rather than taking the rest of a chunk down with it again.
            tasks.enqueue(state.huey, a["run_id"], [a["idx"]], options.priority)
        if lost.complete:
            finalize_run(state, a["run_id"])
    return found


def kill_overdue(state: WorkerState, pid: int, index: int, attempt: int,
                 kill: Callable[[], None]) -> bool:
    """Past its timeout and HARD_GRACE, worker `pid` still runs partition `index` (a kernel
    in a long C call, or a stopped process): `kill` it, record the attempt as `timeout`, which
    follows the partition's retries, and recover the rest of its chunk (lost, as the worker
    is gone). Returns whether the attempt was still running."""
    kill()
    claim = state.ledger.running_claim(trace.HOST, pid, index, attempt)
    if claim is not None:
        timeout = Pipeline.from_dict(claim.spec).options.timeout
        log = trace.logger(run_id=claim.run_id, pipeline=claim.pipeline, partition=claim.key,
                           partition_index=index, attempt=attempt)
        exc = PartitionTimeout(f"the attempt ran past its timeout of {timeout:g}s and had not "
                               f"stopped {HARD_GRACE:g}s later: its worker (pid {pid}) was "
                               "killed")
        outcome, delay = failed(claim, exc, Stats(), log)
        Recording(state, claim.run_id, [outcome], {index: delay})()
    reap_lost(state)
    return claim is not None


def requeue_vanished(state: WorkerState, older_than: float = 30.0) -> int:
    """Queue again the partitions queued since before `older_than` seconds that have no
    message on the queue.

    A run's queued partitions are counted against the partitions its messages carry. Fewer
    carried is normal while a worker holds a pack (a moment); a run is looked at partition
    by partition only when it stays short without moving between two looks (its queued count
    and its messages the same), or at once when `older_than` is short (a consumer alone, or
    workers lost). A run of a million queued partitions so costs a count per look."""
    queued = state.ledger.queued_counts()
    carried = {run_id: 0 for run_id in queued}
    for run_id, indexes in _messages(state):
        if run_id in carried:
            carried[run_id] += len(indexes)
    seen, state.queued_seen = state.queued_seen, {r: (queued[r], carried[r]) for r in queued}
    short = [r for r in queued if carried[r] < queued[r]
             and (older_than <= VANISHED_ALONE or seen.get(r) == (queued[r], carried[r]))]
    missing = 0
    cutoff = time.time() - older_than
    carrying: dict[str, list[tuple[int, int]]] = {run_id: [] for run_id in short}
    for run_id, indexes in _messages(state) if short else ():  # one more read of the queue
        if run_id in carrying and indexes:
            carrying[run_id] += _spans(indexes)
    for run_id in short:
        spans = sorted(carrying[run_id])
        starts = [low for low, _ in spans]
        priority = state.ledger.run(run_id)["priority"]
        for idx in state.ledger.queued_before(run_id, cutoff):
            at = bisect.bisect_right(starts, idx) - 1
            if at >= 0 and spans[at][0] <= idx <= spans[at][1]:
                continue  # a message carries it (a pack is a span of indexes)
            trace.logger(run_id=run_id, partition_index=idx).warning(
                "partition.requeued", reason="its queue message vanished")
            tasks.enqueue(state.huey, run_id, [idx], priority)
            missing += 1
    return missing


def _spans(indexes: list[int]) -> list[tuple[int, int]]:
    """A message's indexes as spans (first, last): one, for a pack of consecutive ones."""
    low, high = min(indexes), max(indexes)
    if high - low + 1 == len(indexes):
        return [(low, high)]
    return [(i, i) for i in indexes]


def _messages(state: WorkerState) -> Iterator[tuple[str, list[int]]]:
    """(run id, partition indexes) of each message on the queue, due or scheduled."""
    storage = state.huey.storage
    for raw in storage.enqueued_items() + storage.scheduled_items():
        try:
            run_id, indexes = json.loads(bytes(raw))["message"]["args"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not ours, or unreadable: huey drops it when a worker takes it
        yield run_id, [indexes] if isinstance(indexes, int) else indexes


def reap_unfinalized(state: WorkerState) -> int:
    """Finalize the runs whose partitions are all over and that nobody finalizes: nobody
    began, their finalizer died, or this process began and a full disk stopped it."""
    runs = state.ledger.unfinalized_runs()
    for run_id, finalizer, until in runs:
        if finalizer and finalizer != holder():
            alive = holder_alive(finalizer)
            if alive or (alive is None and (until is None or until > time.time())):
                continue  # being finalized right now, here or by another host
            state.ledger.release_finalizer(run_id, finalizer)
        finalize_run(state, run_id)
    return len(runs)


def reap(state: WorkerState, vanished_after: float = 30.0) -> dict[str, int]:
    lost = reap_lost(state)
    # A dead worker may have taken messages with it (the rest of a pack): look at once, for
    # partitions without a message for longer than a living worker keeps one (a moment).
    vanished = requeue_vanished(state, min(vanished_after, 2.0) if lost else vanished_after)
    return {"lost": lost, "vanished": vanished, "finalized": reap_unfinalized(state)}
