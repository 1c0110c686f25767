"""Worker processes: claim a partition, stream it through the steps into the sink, commit.

`execute` is the body of runex's huey task; `runex.consumer` runs the processes it runs in.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from runex import tasks, trace
from runex.errors import PartitionTimeout
from runex.ledger import LEASE_SECONDS, Claim, Ledger
from runex.pipeline import Pipeline, Plan, check
from runex.project import chdir
from runex.registry import Records, Registry, SinkContext


@dataclass
class WorkerState:
    """What every worker process of a consumer shares, set up before the fork."""

    registry: Registry
    ledger: Ledger
    huey: Any
    plans: dict[str, Plan] = field(default_factory=dict)

    def plan(self, run_id: str, spec: dict[str, Any]) -> Plan:
        plan = self.plans.get(run_id)
        if plan is None:
            plan = check(Pipeline.from_dict(spec), self.registry)
            self.plans = {run_id: plan}  # one run at a time is the common case
        return plan


_state: WorkerState | None = None


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), which tells a pid
    reused by a new process from the one that claimed a partition; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, started: str | None) -> bool:
    if started is not None and os.path.exists("/proc/self/stat"):
        return process_start(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_START = process_start(os.getpid())  # this process's start time, reset after a fork


def after_fork() -> None:
    """In a new worker process: its own identity, and no use of the queue connection of
    the process it was forked from (the ledger re-opens its own, see `Ledger.conn`)."""
    global _START
    _START = process_start(os.getpid())
    if _state is not None:
        _state.huey.storage._conn = None


def setup(registry: Registry, ledger: Ledger, huey: Any) -> WorkerState:
    global _state
    _state = WorkerState(registry, ledger, huey)
    return _state


@dataclass
class StepStats:
    name: str
    records_in: int = 0
    records_out: int = 0
    seconds: float = 0.0


@dataclass
class Stats:
    records_in: int = 0
    records_out: int = 0
    steps: list[StepStats] = field(default_factory=list)


def execute(run_id: str, index: int) -> None:
    """Run one partition: the body of runex's huey task."""
    state = _state
    assert state is not None, "runex.worker.setup() was not called in this process"
    claim = state.ledger.claim(run_id, index, trace.HOST, os.getpid(), _START,
                               events=trace.drain())
    if claim is None:
        return  # running elsewhere, done, or cancelled: a duplicate message is harmless
    log = trace.logger(run_id=run_id, pipeline=claim.pipeline, partition=claim.key,
                       partition_index=index, attempt=claim.attempt)
    log.info("partition.claimed")
    options = Pipeline.from_dict(claim.spec).options
    stats = Stats()
    started = time.perf_counter()
    try:
        plan = state.plan(claim.run_id, claim.spec)
        with chdir(Path(claim.project_dir)), deadline(options.timeout), \
                _lease.hold(state.ledger.path, claim):
            process(plan, claim, stats, Cancellation(state.ledger, run_id))
    except KeyboardInterrupt:
        # The consumer stopped this worker mid-partition: give the partition back.
        log.warning("partition.interrupted", records_in=stats.records_in)
        applied, _ = state.ledger.finish_attempt(
            claim, "interrupted", error="the worker was stopped", requeue=True,
            events=trace.drain())
        if applied:
            tasks.enqueue(state.huey, run_id, [index], options.priority)
        raise
    except Exception as exc:  # noqa: BLE001 - a partition's failure must not stop the worker
        status = ("timeout" if isinstance(exc, PartitionTimeout)
                  else "cancelled" if isinstance(exc, RunCancelled) else "failed")
        # Only failures spend the retry budget: a lost or interrupted attempt does not.
        failures = claim.failures + 1
        retry = status != "cancelled" and failures <= options.retries
        delay = backoff(failures, options.retry_delay, options.max_retry_delay)
        error = f"{type(exc).__name__}: {exc}"
        _log_steps(log, stats)
        log.error("partition.failed", status=status, error=error,
                  retry_in=round(delay, 3) if retry else None,
                  seconds=round(time.perf_counter() - started, 4))
        applied, complete = state.ledger.finish_attempt(
            claim, status, records_in=stats.records_in, records_out=stats.records_out,
            error=error, traceback="".join(traceback.format_exception(exc)),
            requeue=retry, events=trace.drain())
        if applied and retry:
            tasks.enqueue(state.huey, run_id, [index], options.priority, delay=delay)
    else:
        _log_steps(log, stats)
        log.info("partition.committed", records_in=stats.records_in,
                 records_out=stats.records_out, seconds=round(time.perf_counter() - started, 4))
        applied, complete = state.ledger.finish_attempt(
            claim, "succeeded", records_in=stats.records_in, records_out=stats.records_out,
            events=trace.drain())
    if not applied:
        log.warning("partition.fenced", reason="a newer attempt holds this partition")
        state.ledger.add_events(trace.drain())
    if complete:
        finalize_run(state, run_id)


def _log_steps(log: Any, stats: Stats) -> None:
    for i, step in enumerate(stats.steps):
        log.info("step.finished", step=i, kernel=step.name, records_in=step.records_in,
                 records_out=step.records_out, seconds=round(step.seconds, 4))


class RunCancelled(Exception):
    """`runex cancel` was asked for the run of the partition being processed."""


class Cancellation:
    """Tells, at most every `every` seconds (a ledger read), whether the run was cancelled."""

    def __init__(self, ledger: Ledger, run_id: str, every: float = 0.5):
        self.ledger, self.run_id, self.every = ledger, run_id, every
        self.next_check = time.monotonic() + every

    def check(self) -> None:
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + self.every
            if self.ledger.cancel_requested(self.run_id):
                raise RunCancelled("the run was cancelled")


class Lease:
    """Renews the lease of the partition this process holds, from one thread per process,
    started on first use. It writes only while a partition is held, so an idle worker writes
    nothing; it has its own ledger connection."""

    def __init__(self) -> None:
        self._claim: Claim | None = None
        self._ledger: Ledger | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, ledger_path: Path, claim: Claim) -> Iterator[None]:
        if self._pid != os.getpid():  # first use in this process: threads do not survive fork
            self._pid, self._ledger = os.getpid(), Ledger(ledger_path)
            threading.Thread(target=self._renew, daemon=True, name="runex-lease").start()
        with self._lock:
            self._claim = claim
        try:
            yield
        finally:
            with self._lock:
                self._claim = None

    def _renew(self) -> None:
        while True:
            time.sleep(LEASE_SECONDS / 3)
            with self._lock:
                claim = self._claim
            if claim is not None:
                try:
                    self._ledger.renew_lease(claim)
                except Exception:  # noqa: BLE001 - the next renewal tries again
                    trace.logger().exception("lease.renew_failed")


_lease = Lease()


def process(plan: Plan, claim: Claim, stats: Stats, cancel: Cancellation | None = None) -> None:
    """Read the partition, run the steps batch by batch, and hand the stream to the sink."""
    records = plan.source_read(claim.key, **plan.source_read_params)
    ctx = SinkContext(run_id=claim.run_id, pipeline=claim.pipeline, params=plan.sink_params,
                      partition=claim.key, index=claim.index, attempt=claim.attempt,
                      partition_count=claim.partition_count)
    plan.sink_write(ctx, Records(stream(records, plan, stats, cancel)))


def stream(records: Iterable[dict], plan: Plan, stats: Stats,
           cancel: Cancellation | None = None) -> Iterator[list[dict]]:
    """Batches of `batch_size` records through every step; memory stays one batch deep."""
    steps = []
    for kernel, params in plan.kernels:
        fn = partial(kernel.fn, **params) if params else kernel.fn
        step = StepStats(kernel.name)
        stats.steps.append(step)
        steps.append((fn, kernel.batch, step))
    size = plan.pipeline.options.batch_size
    source = iter(records)
    clock = time.perf_counter
    while batch := list(islice(source, size)):
        if cancel is not None:
            cancel.check()
        stats.records_in += len(batch)
        for fn, is_batch, step in steps:
            step.records_in += len(batch)
            t0 = clock()
            if is_batch:
                batch = list(fn(batch))
            else:
                batch = [out for record in batch if (out := fn(record)) is not None]
            step.seconds += clock() - t0
            step.records_out += len(batch)
            if not batch:
                break
        stats.records_out += len(batch)
        if batch:
            yield batch


def finalize_run(state: WorkerState, run_id: str) -> None:
    """Called when the last partition of a run is over; exactly one caller proceeds."""
    if not state.ledger.claim_finalize(run_id, f"{trace.HOST}:{os.getpid()}"):
        return
    run = state.ledger.run(run_id)
    log = trace.logger(run_id=run_id, pipeline=run["pipeline"])
    parts = state.ledger.partitions(run_id)
    bad = [p for p in parts if p["status"] != "succeeded"]
    error = None
    if bad:
        shown = ", ".join(f"{p['idx']} ({p['key']}): {p['status']}" for p in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        error = f"{len(bad)} of {len(parts)} partitions did not succeed: {shown}{more}"
    else:
        try:
            plan = state.plan(run_id, json.loads(run["spec"]))
            if plan.sink_finalize is not None:
                ctx = SinkContext(run_id=run_id, pipeline=run["pipeline"],
                                  params=plan.sink_params, partition_count=len(parts))
                with chdir(Path(run["project_dir"])):
                    plan.sink_finalize(ctx)
        except Exception as exc:  # noqa: BLE001 - reported as the run's error
            error = f"the sink's finalize step failed: {type(exc).__name__}: {exc}"
            log.error("run.finalize_failed", error=error,
                      traceback="".join(traceback.format_exception(exc)))
    status = ("cancelled" if run["cancel_requested"] else "failed" if error else "succeeded")
    log.info("run.finished", status=status, partitions=len(parts),
             records_in=sum(p["records_in"] or 0 for p in parts),
             records_out=sum(p["records_out"] or 0 for p in parts), error=error)
    state.ledger.finish_run(run_id, status, error, events=trace.drain())


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter in its upper half: base * 2**(attempt-1),
    at most `cap`, then a random point between half of it and all of it."""
    delay = min(cap, base * 2 ** (attempt - 1))
    return delay / 2 + random.random() * delay / 2


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise PartitionTimeout in this (main) thread after `seconds`."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise PartitionTimeout(f"the attempt ran past its timeout of {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
