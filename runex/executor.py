"""Running partitions: claim a chunk of a pack, stream each partition through the steps into
the sink, sync the sink, record how each ended.

`execute` is what runex's one huey task does (`runex.tasks`); it runs in a worker process of a
consumer (`runex.consumer`), or in the caller's process (`Runex.run(..., workers=0)`).
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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from runex import __version__, tasks, trace
from runex.errors import DEFERRED, CodeDrift, PartitionTimeout, RunCancelled, Unreachable
from runex.finalizer import finalize_run
from runex.identity import BOOT_ID, my_start
from runex.ledger import Claim, Ledger, Outcome
from runex.pipeline import Pipeline, Plan
from runex.project import chdir
from runex.registry import Records, SinkContext
from runex.reserve import describe_full, is_disk_full
from runex.worker import WorkerState

CHUNK_SECONDS = 0.05  # about this much work (as measured so far) is claimed at once
UNREACHABLE_RETRY = 2.0  # seconds before a partition whose database was away is tried again
MAX_CHUNK = 256


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

    def step_rows(self) -> list[list[float]] | None:
        """Each step's records in, records out and seconds, as the attempt's row keeps them."""
        return [[s.records_in, s.records_out, round(s.seconds, 6)] for s in self.steps] or None


def execute(state: WorkerState, run_id: str, indexes: list[int]) -> None:
    """Run a pack of partitions of one run: the body of runex's huey task.

    Partitions are claimed in chunks, one ledger transaction to claim a chunk and one to
    record how its partitions ended; a chunk is one partition at first, then as many as take
    about CHUNK_SECONDS by the time measured so far (in this pack, or for the first chunk, in
    the process's previous pack of the run). What is not started after PACK_SLICE
    goes back to the queue for any idle worker (see `lease.Holding`), and so does everything
    not started when the consumer stops."""
    holding = state.holding
    holding.pack(run_id, indexes, state.ledger, state.huey)
    # One partition first, to time it, unless an earlier pack of this run in this process did.
    size = state.chunk[1] if state.chunk[0] == run_id else 1
    try:
        holding.redo()  # what a full disk kept from the ledger, before anything new
        # No new chunk once the consumer stops, or the disk under the home is full.
        while not state.stopping() and state.reserve.ok() and (chunk := holding.take(size)):
            try:
                claims = state.ledger.claim_many(run_id, chunk, trace.HOST, os.getpid(),
                                                 my_start(), boot_id=BOOT_ID)
            except DEFERRED:  # a full disk, the database away: nothing was claimed
                holding.untake(chunk)  # they go back to the queue
                break
            if claims:
                started = time.perf_counter()
                done = run_chunk(state, claims)
                each = (time.perf_counter() - started) / max(done, 1)
                size = min(MAX_CHUNK, max(1, int(CHUNK_SECONDS / each) if each else MAX_CHUNK))
                state.chunk = (run_id, size)
            holding.give_back(state.huey, state.ledger)
    except DEFERRED:
        # The disk under the home is full, or the database away: take nothing more. What
        # could not be written is kept (see `Holding.defer`) and written once it can be.
        pass
    finally:
        try:
            holding.give_back(state.huey, state.ledger, now=True)
        except DEFERRED:  # kept: the holding thread gives them back once it can
            pass


def run_chunk(state: WorkerState, claims: list[Claim]) -> int:
    """Run claimed partitions one after the other and record how each ended, all in one
    transaction. Those not started when the consumer stops are released unstarted. Returns
    how many ran."""
    first = claims[0]
    # The hard limit starts now, not once the partition's code is loaded: a worker stopped
    # (SIGSTOP) at any point after its claim is killed at the timeout, not left to its lease.
    timeout = Pipeline.from_dict(first.spec).options.timeout
    state.running.begin(first, timeout)
    if first.run_started:
        trace.logger(run_id=first.run_id, pipeline=first.pipeline).info(
            "run.started", partitions=first.partition_count)
    cancel = Cancellation(state.ledger, first.run_id)
    outcomes: list[Outcome] = []
    delays: dict[int, float] = {}
    interrupted = synced = False
    try:
        with chdir(Path(first.project_dir)), state.holding.hold(state.ledger, claims):
            for claim in claims:
                if outcomes and state.stopping():
                    break
                outcome, delays[claim.index] = run_one(state, claim, cancel, timeout)
                outcomes.append(outcome)
                if interrupted := outcome.status == "interrupted":
                    break
            sync_outputs(state, outcomes, delays)
            synced = True
    finally:  # a second signal may land anywhere: record what is known
        state.running.end()  # whatever happened before a partition began
        ran = len(outcomes)
        if not synced:  # output that may not be on disk yet is not recorded as done
            outcomes = [Outcome(o.claim, "interrupted", o.records_in, o.records_out,
                                "the worker was stopped", requeue=True, started=o.started,
                                code_version=o.code_version)
                        if o.status == "succeeded" else o for o in outcomes]
        outcomes += [Outcome(c, "released", requeue=True) for c in claims[ran:]]
        _record(state, first.run_id, outcomes, delays)
    if interrupted:
        raise KeyboardInterrupt
    return ran


def sync_outputs(state: WorkerState, outcomes: list[Outcome], delays: dict[int, float]) -> None:
    """Make the output of the chunk's succeeded partitions durable before the ledger says
    so: one `sync` of the sink per chunk (see `SinkSpec`). If it fails, so do they."""
    done = [i for i, o in enumerate(outcomes) if o.status == "succeeded"]
    if not done:
        return
    claim = outcomes[done[0]].claim
    plan = state.plan(claim.run_id, claim.spec)
    if plan.sink_sync is None:
        return
    try:
        plan.sink_sync(SinkContext(run_id=claim.run_id, pipeline=claim.pipeline,
                                   params=plan.sink_params,
                                   partition_count=claim.partition_count))
    except Exception as exc:  # noqa: BLE001 - the partitions fail, the worker goes on
        for i in done:
            o = outcomes[i]
            log = trace.logger(run_id=o.claim.run_id, pipeline=o.claim.pipeline,
                               partition=o.claim.key, partition_index=o.claim.index,
                               attempt=o.claim.attempt)
            outcomes[i], delays[o.claim.index] = failed(
                o.claim, RuntimeError(f"could not sync the sink's output to disk: "
                                      f"{type(exc).__name__}: {exc}"), o, log)


def failed(claim: Claim, exc: BaseException, done: Stats | Outcome, log: Any
           ) -> tuple[Outcome, float]:
    """How an attempt that raised `exc` ended, and in how many seconds to retry it."""
    options = Pipeline.from_dict(claim.spec).options
    status = ("timeout" if isinstance(exc, PartitionTimeout)
              else "cancelled" if isinstance(exc, RunCancelled) else "failed")
    # Only failures spend the retry budget: a lost or interrupted attempt does not.
    failures = claim.failures + 1
    retry = status != "cancelled" and failures <= options.retries
    delay = backoff(failures, options.retry_delay, options.max_retry_delay)
    error = f"{type(exc).__name__}: {exc}"
    if status == "cancelled":  # asked for: no traceback, and not an error
        log.info("partition.cancelled")
        earlier = done if isinstance(done, Outcome) else None
        return Outcome(claim, status, done.records_in, done.records_out, error, None, False,
                       earlier and earlier.started, earlier and earlier.code_version,
                       earlier and earlier.steps), 0.0
    if is_disk_full(exc):  # most likely under the sink's output, when the sink has a path
        target = claim.spec.get("sink", {}).get("params", {}).get("path")
        target = os.path.abspath(target if isinstance(target, str) else ".")
        folder = target if os.path.isdir(target) else os.path.dirname(target)
        error += f" ({describe_full(folder)}; then `runex retry {claim.run_id}`)"
    log.error("partition.failed", status=status, error=error,
              retry_in=round(delay, 3) if retry else None)
    earlier = done if isinstance(done, Outcome) else None
    return Outcome(claim, status, done.records_in, done.records_out, error,
                   "".join(traceback.format_exception(exc)), retry,
                   earlier and earlier.started, earlier and earlier.code_version,
                   earlier and earlier.steps), delay


def check_code(state: WorkerState, claim: Claim, plan: Plan, log: Any) -> None:
    """Refuse to run a partition with code other than the run's (`code_drift = "refuse"`,
    the default: `CodeDrift`), or say so once per run and go on (`"warn"`, and always when
    only runex's own files differ: an upgrade keeps the runs it finds queued). Runs
    submitted before runex recorded their code are not checked."""
    code = claim.code
    if not code or code.get("version") == plan.code_version:
        return
    theirs, ours = code.get("files", {}), plan.code_files
    differ = sorted(f for f in theirs.keys() | ours.keys() if theirs.get(f) != ours.get(f))
    message = (f"code drift: run {claim.run_id} was submitted on {code.get('host')} with code "
               f"version {code.get('version')}, this host ({trace.HOST}) has "
               f"{plan.code_version}"
               + (f"; files that differ: {', '.join(differ)}" if differ else "")
               + (f"; runex {code.get('runex')} there, {__version__} here"
                  if code.get("runex") != __version__ else "")
               + (" (the pipeline file is the same run's: only the code differs)"
                  if not differ and code.get("runex") == __version__ else ""))
    # runex's own files differ (it was upgraded since the run was queued, or hosts run two
    # versions of it), the extensions do not: the run goes on with this runex, and says so.
    upgraded = bool(differ) and all(f.startswith("runex/") for f in differ)
    if state.code_drift == "warn" or upgraded:
        if claim.run_id not in state.drift_told:
            state.drift_told.add(claim.run_id)
            log().warning("code.drifted", message=message + (
                "; running it with this runex (only runex's own files differ)" if upgraded
                else '; running it anyway (code_drift = "warn")'))
        return
    raise CodeDrift(message + "; give every host the same extension files and runex version "
                    '(or set code_drift = "warn" in runex.toml to run it anyway)')


def run_one(state: WorkerState, claim: Claim, cancel: Cancellation, timeout: float | None
            ) -> tuple[Outcome, float]:
    """Run one claimed partition (within `timeout` seconds); returns how it ended, and in
    how many seconds to retry it (0: now, for an interrupted one)."""
    # The partition's logger, made only when there is something to say (a partition that
    # goes well says nothing).
    def log() -> Any:
        return trace.logger(run_id=claim.run_id, pipeline=claim.pipeline,
                            partition=claim.key, partition_index=claim.index,
                            attempt=claim.attempt)

    chatty = trace.debugging()  # the operator's log shows every partition and step
    if chatty:
        log().debug("partition.claimed")
    stats = Stats()
    began, started = time.time(), time.perf_counter()
    plan: Plan | None = None
    fingerprint: str | None = None
    skip = False
    state.running.begin(claim, timeout)
    try:
        # The soft limit starts with the hard one: loading the pipeline's code counts too.
        with deadline(timeout):
            try:
                plan = state.plan(claim.run_id, claim.spec)
                check_code(state, claim, plan, log)
                fingerprint = fingerprint_of(plan, claim)
                skip = unchanged(state, plan, claim, fingerprint)
                if not skip:
                    process(plan, claim, stats, cancel)
            finally:
                state.running.end()
    except KeyboardInterrupt:
        # The consumer stopped this worker mid-partition: give the partition back.
        log().warning("partition.interrupted", records_in=stats.records_in)
        return Outcome(claim, "interrupted", stats.records_in, stats.records_out,
                       error="the worker was stopped", requeue=True, started=began,
                       code_version=plan and plan.code_version), 0.0
    except Unreachable as exc:  # its database away (a restart): not the partition's fault
        log().warning("partition.interrupted", records_in=stats.records_in, error=str(exc))
        return Outcome(claim, "interrupted", stats.records_in, stats.records_out,
                       error=f"Unreachable: {exc}", requeue=True, started=began,
                       code_version=plan and plan.code_version), UNREACHABLE_RETRY
    except Exception as exc:  # noqa: BLE001 - a partition's failure must not stop the worker
        if chatty:
            _log_steps(log(), stats)
        outcome, delay = failed(claim, exc, stats, log().bind(
            seconds=round(time.perf_counter() - started, 4)))
        outcome.started, outcome.code_version = began, plan and plan.code_version
        outcome.steps, outcome.fingerprint = stats.step_rows(), fingerprint
        return outcome, delay
    if chatty:
        _log_steps(log(), stats)
        log().debug("partition.committed", records_in=stats.records_in,
                    records_out=stats.records_out,
                    seconds=round(time.perf_counter() - started, 4))
    if skip:
        if chatty:
            log().debug("partition.skipped", fingerprint=fingerprint)
        return Outcome(claim, "skipped", started=began, code_version=plan.code_version,
                       fingerprint=fingerprint), 0.0
    return Outcome(claim, "succeeded", stats.records_in, stats.records_out,
                   started=began, code_version=plan.code_version,
                   steps=stats.step_rows(), fingerprint=fingerprint,
                   output=(plan.target, plan.inputs_version,
                           plan.pipeline.options.incremental)), 0.0


def fingerprint_of(plan: Plan, claim: Claim) -> str | None:
    """What the partition's input is now, as its source tells (JSON), or None."""
    if plan.source_fingerprint is None:
        return None
    value = plan.source_fingerprint(claim.key, **plan.source_fingerprint_params)
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def unchanged(state: WorkerState, plan: Plan, claim: Claim, fingerprint: str | None) -> bool:
    """Whether an incremental run may skip the partition: its last commit into the same
    sink target read the same input (fingerprint) with the same code and parameters."""
    if not plan.pipeline.options.incremental or fingerprint is None:
        return False
    return state.ledger.last_output(plan.target, claim.key) == (fingerprint,
                                                                  plan.inputs_version)


def _record(state: WorkerState, run_id: str, outcomes: list[Outcome],
            delays: dict[int, float]) -> None:
    """Write how a chunk ended (see `Recording`); what a full disk refuses is kept and
    written once there is room (`Holding.defer`), and `DiskFull` raised; the same when the
    database cannot be reached (`Unreachable`)."""
    recording = Recording(state, run_id, outcomes, delays)
    try:
        recording()
    except DEFERRED:
        state.holding.defer(recording, [o.claim for o in outcomes])
        raise


class Recording:
    """Writing how a chunk ended: its outcomes to the ledger, what goes back to the queue,
    then the run's end if it is complete. Called again after a full disk stopped it, it goes
    on from the write that failed.

    A full disk that refuses the ledger write has released the home's reserve, which leaves
    room to try once more."""

    def __init__(self, state: WorkerState, run_id: str, outcomes: list[Outcome],
                 delays: dict[int, float]):
        self.state, self.run_id, self.outcomes, self.delays = state, run_id, outcomes, delays
        self.applied: list[bool] | None = None
        self.complete = self.queued = False

    def __call__(self) -> None:
        state, run_id, outcomes = self.state, self.run_id, self.outcomes
        if self.applied is None:
            recorded = state.ledger.finish_many(outcomes)
            self.applied, self.complete = recorded.applied, recorded.complete
        if not self.queued:
            self._queue_again()
            self.queued = True
        if self.complete:
            finalize_run(state, run_id)

    def _queue_again(self) -> None:
        now, later = [], []
        for o, ok in zip(self.outcomes, self.applied, strict=True):
            if not ok:
                trace.logger(run_id=self.run_id, partition_index=o.claim.index,
                             attempt=o.claim.attempt).warning(
                    "partition.fenced", reason="a newer attempt holds this partition")
            elif o.requeue:
                (later if self.delays.get(o.claim.index) else now).append(o.claim.index)
        if not (now or later):
            return
        huey = self.state.huey
        priority = Pipeline.from_dict(self.outcomes[0].claim.spec).options.priority
        if now:
            tasks.enqueue(huey, self.run_id, now, priority, one_pack=True)
        for index in later:
            tasks.enqueue(huey, self.run_id, [index], priority, delay=self.delays[index])


def _log_steps(log: Any, stats: Stats) -> None:
    for i, step in enumerate(stats.steps):
        log.debug("step.finished", step=i, kernel=step.name, records_in=step.records_in,
                  records_out=step.records_out, seconds=round(step.seconds, 4))


class Cancellation:
    """Tells, at most every `every` seconds (a ledger read), whether the run was cancelled."""

    def __init__(self, ledger: Ledger, run_id: str, every: float = 0.5):
        self.ledger, self.run_id, self.every = ledger, run_id, every
        self.next_check = time.monotonic() + every

    def check(self) -> None:
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + self.every
            try:
                cancelled = self.ledger.cancel_requested(self.run_id)
            except Unreachable:  # the database away for a moment: the next look tells
                return
            if cancelled:
                raise RunCancelled("the run was cancelled")


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
    for i, (kernel, params) in enumerate(plan.kernels):
        fn = partial(kernel.fn, **params) if params else kernel.fn
        step = StepStats(kernel.name)
        stats.steps.append(step)
        steps.append((fn, kernel.batch, step, f"step {i} (kernel {kernel.name!r})"))
    size = plan.pipeline.options.batch_size
    source = iter(records)
    clock = time.perf_counter
    origin = f"the source {plan.pipeline.source.use!r}"
    while batch := list(islice(source, size)):
        if cancel is not None:
            cancel.check()
        stats.records_in += len(batch)
        check_records(batch, origin)
        for fn, is_batch, step, name in steps:
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
            check_records(batch, name)
        stats.records_out += len(batch)
        if batch:
            yield batch


def check_records(batch: list[Any], origin: str) -> None:
    """Records are mappings (dicts): say which source or step made one that is not, before a
    sink fails on it somewhere inside. One pass over the batch's types, in C."""
    odd = set(map(type, batch)) - {dict}
    if odd and not all(issubclass(t, Mapping) for t in odd):
        bad = next(r for r in batch if not isinstance(r, Mapping))
        raise TypeError(f"{origin} made a record that is not a mapping: {bad!r:.80} "
                        f"({type(bad).__name__}); records are dicts of field names to values")


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
