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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from runex import tasks, trace
from runex.errors import DiskFull, PartitionTimeout
from runex.extensions import refresh
from runex.ledger import LEASE_SECONDS, Claim, Ledger, Outcome
from runex.pipeline import Pipeline, Plan, check
from runex.project import chdir
from runex.registry import Records, Registry, SinkContext
from runex.reserve import Reserve, describe_full, is_disk_full


@dataclass
class WorkerState:
    """What every worker process of a consumer shares, set up before the fork."""

    registry: Registry
    ledger: Ledger
    huey: Any
    plans: dict[str, Plan] = field(default_factory=dict)
    reserve: Reserve = field(init=False)  # gone while the disk under the home is full
    chunk: tuple[str, int] = ("", 1)  # (run id, chunk size) learned by this process's last pack

    def __post_init__(self) -> None:
        self.reserve = Reserve(self.ledger.path.parent)

    def plan(self, run_id: str, spec: dict[str, Any]) -> Plan:
        """The checked pipeline of a run, made when this process first meets the run, with
        the extension files as they are then: added, changed and removed files are loaded
        again first (`extensions.refresh`)."""
        plan = self.plans.get(run_id)
        if plan is None:
            self.registry = refresh(self.registry)
            plan = check(Pipeline.from_dict(spec), self.registry)
            self.plans = {run_id: plan}  # one run at a time is the common case
        return plan


_state: WorkerState | None = None


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


_START = process_start(os.getpid())  # this process's start time, reset after a fork


def holder() -> str:
    """This process, as the ledger records who finalizes a run: `host:pid:start:boot` (the
    last two empty where unknown)."""
    return f"{trace.HOST}:{os.getpid()}:{_START or ''}:{BOOT_ID or ''}"


def holder_alive(text: str) -> bool | None:
    """Whether the process `holder()` gave `text` runs (`host:pid` from runex 0.1 too); None
    for a process of another host, which cannot be told from here."""
    host, pid, *rest = text.split(":")
    if host != trace.HOST:
        return None
    started, boot = (*rest, "", "")[:2]
    return alive(int(pid), started or None, boot or None)


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


PACK_SLICE = 0.2  # seconds a worker keeps a pack before handing back what it has not started
CHUNK_SECONDS = 0.05  # about this much work (as measured so far) is claimed at once
MAX_CHUNK = 256


def _never() -> bool:
    return False


stopping = _never  # the consumer's stop flag, set in each worker process (`runex.consumer`)

HARD_GRACE = 3.0  # seconds past its timeout before the consumer kills an attempt's worker


class Running:
    """The partition this worker process runs, in three numbers of memory shared with its
    consumer: when the consumer must kill the process if it is still at it (the timeout plus
    HARD_GRACE; 0: no limit), the partition's index and its attempt. The timeout raises in the
    kernel (SIGALRM); a kernel inside one long C call, or a stopped process, never sees it,
    and the consumer, which looks every second, is the hard limit (see `runex.consumer`)."""

    def __init__(self, slots: Any = None, slot: int = 0):
        self.slots, self.at = slots, 3 * slot

    def begin(self, claim: Claim, timeout: float | None) -> None:
        if self.slots is not None and timeout:
            self.slots[self.at + 1], self.slots[self.at + 2] = claim.index, claim.attempt
            self.slots[self.at] = time.time() + timeout + HARD_GRACE

    def end(self) -> None:
        if self.slots is not None:
            self.slots[self.at] = 0.0


running = Running()  # this process's slot, set in each worker process (`runex.consumer`)


def execute(run_id: str, indexes: list[int]) -> None:
    """Run a pack of partitions of one run: the body of runex's huey task.

    Partitions are claimed in chunks, one ledger transaction to claim a chunk and one to
    record how its partitions ended; a chunk is one partition at first, then as many as take
    about CHUNK_SECONDS by the time measured so far (in this pack, or for the first chunk, in
    the process's previous pack of the run). What is not started after PACK_SLICE
    goes back to the queue for any idle worker (see `Holding`), and so does everything not
    started when the consumer stops."""
    state = _state
    assert state is not None, "runex.worker.setup() was not called in this process"
    _holding.pack(state, run_id, indexes)
    # One partition first, to time it, unless an earlier pack of this run in this process did.
    size = state.chunk[1] if state.chunk[0] == run_id else 1
    try:
        _holding.redo()  # what a full disk kept from the ledger, before anything new
        # No new chunk once the consumer stops, or the disk under the home is full.
        while not stopping() and state.reserve.ok() and (chunk := _holding.take(size)):
            try:
                claims = state.ledger.claim_many(run_id, chunk, trace.HOST, os.getpid(),
                                                 _START, events=trace.drain(), boot_id=BOOT_ID)
            except DiskFull:
                _holding.untake(chunk)  # nothing was claimed: they go back to the queue
                break
            if claims:
                started = time.perf_counter()
                done = run_chunk(state, claims)
                each = (time.perf_counter() - started) / max(done, 1)
                size = min(MAX_CHUNK, max(1, int(CHUNK_SECONDS / each) if each else MAX_CHUNK))
                state.chunk = (run_id, size)
            _holding.give_back(state.huey, state.ledger)
    except DiskFull:
        # The disk under the home is full: take nothing more. What could not be written is
        # kept (see `Holding.defer`) and written once there is room.
        pass
    finally:
        try:
            _holding.give_back(state.huey, state.ledger, now=True)
        except DiskFull:  # kept: the holding thread gives them back once there is room
            pass


def run_chunk(state: WorkerState, claims: list[Claim]) -> int:
    """Run claimed partitions one after the other and record how each ended, all in one
    transaction. Those not started when the consumer stops are released unstarted. Returns
    how many ran."""
    first = claims[0]
    cancel = Cancellation(state.ledger, first.run_id)
    outcomes: list[Outcome] = []
    delays: dict[int, float] = {}
    interrupted = synced = False
    try:
        with chdir(Path(first.project_dir)), _holding.hold(state.ledger.path, claims):
            for claim in claims:
                if outcomes and stopping():
                    break
                outcome, delays[claim.index] = run_one(state, claim, cancel)
                outcomes.append(outcome)
                if interrupted := outcome.status == "interrupted":
                    break
            sync_outputs(state, outcomes, delays)
            synced = True
    finally:  # a second signal may land anywhere: record what is known
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
                   earlier and earlier.started, earlier and earlier.code_version), delay


def run_one(state: WorkerState, claim: Claim, cancel: Cancellation) -> tuple[Outcome, float]:
    """Run one claimed partition; returns how it ended, and in how many seconds to retry it
    (0: now, for an interrupted one)."""
    log = trace.logger(run_id=claim.run_id, pipeline=claim.pipeline, partition=claim.key,
                       partition_index=claim.index, attempt=claim.attempt)
    log.info("partition.claimed")
    stats = Stats()
    began, started = time.time(), time.perf_counter()
    plan: Plan | None = None
    try:
        plan = state.plan(claim.run_id, claim.spec)
        timeout = plan.pipeline.options.timeout
        running.begin(claim, timeout)
        try:
            with deadline(timeout):
                process(plan, claim, stats, cancel)
        finally:
            running.end()
    except KeyboardInterrupt:
        # The consumer stopped this worker mid-partition: give the partition back.
        log.warning("partition.interrupted", records_in=stats.records_in)
        return Outcome(claim, "interrupted", stats.records_in, stats.records_out,
                       error="the worker was stopped", requeue=True, started=began,
                       code_version=plan and plan.code_version), 0.0
    except Exception as exc:  # noqa: BLE001 - a partition's failure must not stop the worker
        _log_steps(log, stats)
        outcome, delay = failed(claim, exc, stats, log.bind(
            seconds=round(time.perf_counter() - started, 4)))
        outcome.started, outcome.code_version = began, plan and plan.code_version
        return outcome, delay
    _log_steps(log, stats)
    log.info("partition.committed", records_in=stats.records_in,
             records_out=stats.records_out, seconds=round(time.perf_counter() - started, 4))
    return Outcome(claim, "succeeded", stats.records_in, stats.records_out,
                   started=began, code_version=plan.code_version), 0.0


def _record(state: WorkerState, run_id: str, outcomes: list[Outcome],
            delays: dict[int, float]) -> None:
    """Write how a chunk ended (see `Recording`); what a full disk refuses is kept and
    written once there is room (`Holding.defer`), and `DiskFull` raised."""
    recording = Recording(state, run_id, outcomes, delays)
    try:
        recording()
    except DiskFull:
        _holding.defer(recording, [o.claim for o in outcomes])
        raise


class Recording:
    """Writing how a chunk ended: its outcomes to the ledger, what goes back to the queue,
    then the run's end if it is complete. Called again after a full disk stopped it, it goes
    on from the write that failed.

    A full disk that refuses the ledger write has released the home's reserve, which leaves
    room to try once more at once, without the trace events (they are in the trace files,
    if those had room)."""

    def __init__(self, state: WorkerState, run_id: str, outcomes: list[Outcome],
                 delays: dict[int, float]):
        self.state, self.run_id, self.outcomes, self.delays = state, run_id, outcomes, delays
        self.events = trace.drain()
        self.applied: list[bool] | None = None
        self.complete = self.queued = False

    def __call__(self) -> None:
        state, run_id, outcomes = self.state, self.run_id, self.outcomes
        if self.applied is None:
            try:
                self.applied, self.complete = state.ledger.finish_many(outcomes, self.events)
            except DiskFull:
                self.applied, self.complete = state.ledger.finish_many(outcomes)
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
        self.state.ledger.add_events(trace.drain())
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


class Holding:
    """What this worker process holds: the claims of the chunk it runs, whose lease a thread
    renews, and the rest of its pack, which that thread hands back to the queue once the
    pack has been held PACK_SLICE seconds (a long partition must not keep the rest of its
    pack from idle workers). The thread starts on first use, has its own connections, and
    writes nothing while nothing is held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._claims: list[Claim] = []
        # Ledger and queue writes that a full disk refused, to redo in order once there is
        # room, with the claims whose lease is renewed meanwhile.
        self._deferred: list[tuple[Callable[[], None], list[Claim]]] = []
        self._run_id = ""
        self._pending: list[int] = []
        self._due = 0.0  # when the pending partitions go back (time.monotonic)
        self._pid = 0
        self._paths: tuple[Path, str] = (Path(), "")  # the ledger's, the queue's

    def _start(self) -> None:
        if self._pid != os.getpid():  # first use in this process: threads do not survive fork
            self._pid = os.getpid()
            threading.Thread(target=self._run, daemon=True, name="runex-holding").start()

    def pack(self, state: WorkerState, run_id: str, indexes: list[int]) -> None:
        with self._lock:
            self._run_id, self._pending = run_id, list(indexes)
            self._due = time.monotonic() + PACK_SLICE
            self._paths = (state.ledger.path, state.huey.storage.filename)
        if len(indexes) > 1:
            self._start()
            self._wake.set()

    def take(self, count: int) -> list[int]:
        with self._lock:
            chunk, self._pending = self._pending[:count], self._pending[count:]
        return chunk

    def untake(self, chunk: list[int]) -> None:
        with self._lock:
            self._pending = chunk + self._pending

    def defer(self, write: Callable[[], None], claims: list[Claim] = ()) -> None:
        """Keep a write that a full disk refused (recording a chunk, finalizing a run), to
        redo once there is room; meanwhile `claims` stay held (their lease renewed)."""
        with self._lock:
            self._deferred.append((write, list(claims)))
        self._start()

    def redo(self) -> None:
        """Redo the deferred writes in order; one that fails again (`DiskFull`) stays, with
        those after it."""
        while self._deferred:
            write, _ = self._deferred[0]
            write()
            with self._lock:
                self._deferred.pop(0)

    def give_back(self, huey: Any, ledger: Ledger, now: bool = False) -> list[int]:
        """Queue again the pending partitions, if the pack was held long enough (or `now`)."""
        with self._lock:
            if not self._pending or not (now or time.monotonic() >= self._due):
                return []
            run_id, pending, self._pending = self._run_id, self._pending, []
        try:
            tasks.enqueue(huey, run_id, pending, ledger.run(run_id)["priority"],
                          one_pack=True)
        except BaseException:
            with self._lock:  # still held: try again later (if it is lost, the reaper
                if self._run_id == run_id:  # queues it again)
                    self._pending = pending + self._pending
                    self._due = time.monotonic() + PACK_SLICE
            raise
        return pending

    @contextlib.contextmanager
    def hold(self, ledger_path: Path, claims: list[Claim]) -> Iterator[None]:
        with self._lock:
            self._claims = claims
            self._paths = (ledger_path, self._paths[1])
        self._start()
        try:
            yield
        finally:
            with self._lock:
                self._claims = []

    def _run(self) -> None:
        ledger: Ledger | None = None
        huey: Any = None
        renew_at = time.monotonic() + LEASE_SECONDS / 3
        while True:
            with self._lock:
                wake_at = min(renew_at, self._due) if self._pending else renew_at
            self._wake.wait(max(0.0, wake_at - time.monotonic()))
            self._wake.clear()
            with self._lock:
                claims, pending, (ledger_path, queue_path) = (
                    self._claims + [c for _, held in self._deferred for c in held],
                    self._pending, self._paths)
            if time.monotonic() < renew_at:
                claims = []
            else:
                renew_at = time.monotonic() + LEASE_SECONDS / 3
            if not (claims or pending):
                continue
            try:
                if ledger is None or ledger.path != ledger_path:
                    if ledger is not None:
                        ledger.close()
                    ledger = Ledger(ledger_path)
                if claims:
                    ledger.renew_lease(claims)
                if pending:
                    if huey is None or huey.storage.filename != queue_path:
                        huey = tasks.make_huey(queue_path)
                    self.give_back(huey, ledger)
            except DiskFull:  # the consumer says so; the next round tries again
                pass
            except Exception:  # noqa: BLE001 - the next round tries again
                trace.logger().exception("holding.failed")


_holding = Holding()


def redo_deferred() -> None:
    """Write what a full disk kept from the ledger and the queue in this process (see
    `Holding.defer`); raises `DiskFull` if the disk is still full."""
    _holding.redo()


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


def finalize_run(state: WorkerState, run_id: str) -> None:
    """Called when the last partition of a run is over; exactly one process proceeds (and
    may call again, if a full disk stopped it)."""
    if not state.ledger.claim_finalize(run_id, holder()):
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
        first = next((p for p in bad if p["error"]), None)
        if first is not None:
            error += f"; partition {first['idx']}: {first['error']}"
    else:
        try:
            plan = state.plan(run_id, json.loads(run["spec"]))
            if plan.sink_finalize is not None:
                ctx = SinkContext(run_id=run_id, pipeline=run["pipeline"],
                                  params=plan.sink_params, partition_count=len(parts))
                with chdir(Path(run["project_dir"])):
                    plan.sink_finalize(ctx)
                    if plan.sink_sync is not None:  # durable before the run is recorded
                        plan.sink_sync(ctx)
        except Exception as exc:  # noqa: BLE001 - reported as the run's error
            error = f"the sink's finalize step failed: {type(exc).__name__}: {exc}"
            log.error("run.finalize_failed", error=error,
                      traceback="".join(traceback.format_exception(exc)))
    status = ("cancelled" if run["cancel_requested"] else "failed" if error else "succeeded")
    done = [p for p in parts if p["status"] == "succeeded"]
    log.info("run.finished", status=status, partitions=len(parts),
             records_in=sum(p["records_in"] or 0 for p in done),
             records_out=sum(p["records_out"] or 0 for p in done), error=error)
    state.ledger.finish_run(run_id, status, error, events=trace.drain())
    state.ledger.sync()  # on disk before anyone reads that the run is over


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
