"""The consumer: huey's consumer with runex's worker processes, its reaper, and its stops.

Extensions are loaded once, in the consumer, before it forks its workers, so every worker
starts with them imported. SIGTERM and SIGINT both drain it; its workers die with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from runex import huey_private, reaper, trace
from runex.errors import DiskFull, Unreachable
from runex.huey_private import ConsumerStopped, Scheduler, Worker
from runex.ledger import ALL_WORK
from runex.reserve import Reserve, free_bytes
from runex.worker import Running, WorkerState

DISK_CHECK = 1.0  # seconds between looks at the home's reserve (a stat) while it is full
PAUSE_CHECK = 1.0  # seconds between looks at the ledger for a pause of all work


def start_child(huey: Any, consumer: int) -> None:
    """First thing in a process the consumer (pid `consumer`) forked, worker, scheduler or
    dashboard: its own queue connection (never the parent's; `huey` None: it has none), and,
    on Linux, a SIGKILL from the kernel when the consumer dies, so that a killed consumer
    leaves no orphan consuming the queue (the reaper recovers what it held)."""
    if huey is not None:
        huey_private.forget_connection(huey.storage)
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != consumer:  # the consumer died before prctl took effect
        os._exit(1)


class RunexWorker(Worker):
    """huey's worker, waiting for the queue file to change rather than polling it, and
    taking nothing while the disk under the home is full or all work is paused."""

    state: WorkerState | None = None  # the consumer's, given before the fork
    slots: Any = None  # the consumer's shared `worker.Running` slots, and this one's
    slot = 0
    paused: Any = None  # the consumer's shared flag: all work is paused
    consumer_pid = 0

    def initialize(self) -> None:
        """In the new worker process, first: its own queue connection, and its stop flag and
        timeout slot in the state it works with."""
        start_child(self.huey, self.consumer_pid)
        super().initialize()
        self.watch = self.huey.storage.watch()
        self.stop_fd = huey_private.stop_fd(self.stop_flag)
        self.reserve = Reserve(self.huey.storage.home)
        if self.state is not None:
            self.state.stopping = self.stop_flag.is_set  # a pack is handed back when set
            self.state.running = Running(self.slots, self.slot)
            self.state.holding.exit_on_lost_lease = True  # see `lease.Holding`

    def loop(self, now: Any = None) -> None:
        if not self.reserve.ok():  # the consumer makes it again once there is room
            self.stop_flag.wait(DISK_CHECK)
            return
        if self.paused is not None and self.paused.value:  # partitions wait in the queue
            self.stop_flag.wait(PAUSE_CHECK)
            return
        try:
            if self.state is not None:  # what a full disk or a database away kept, first
                self.state.holding.redo()
        except DiskFull:
            return
        except Unreachable:
            self.stop_flag.wait(DISK_CHECK)  # it was tried for a while: again in a moment
            return
        super().loop(now)

    def sleep(self) -> None:
        self.delay = min(self.delay, self.max_delay)
        self.watch.wait(self.delay, self.stop_flag.is_set, self.stop_fd)
        self.delay *= self.backoff


class RunexScheduler(Scheduler):
    """huey's scheduler process (it moves due retries to the queue), with its own queue
    connection and tied to its consumer, as the workers are."""

    consumer_pid = 0

    def initialize(self) -> None:
        start_child(self.huey, self.consumer_pid)
        super().initialize()


class RunexConsumer(huey_private.ProcessHook):
    """huey's consumer with workers that wake on queue writes, and runex's periodic jobs in
    its main process: the reaper, the scheduler, and a stop condition (burst mode, `run`)."""

    worker_class = RunexWorker
    scheduler_class = RunexScheduler

    def __init__(self, huey: Any, jobs: list[tuple[float, Callable[[], Any]]] = (),
                 stop_when: Callable[[], bool] | None = None, check_every: float = 0.05,
                 stop_on_full: bool = False, state: WorkerState | None = None,
                 **options: Any):
        # What each worker runs, and until when (see `worker.Running`): made before the
        # workers are, and shared with them through the fork.
        self.slots = multiprocessing.RawArray("d", 3 * options.get("workers", 1))
        self.paused = multiprocessing.RawValue("b", 0)  # see `_watch_pause`
        self.pause_told = False
        self.recorded_pids: list[int] = []  # see `_record_workers`
        self.state = state
        super().__init__(huey, **options)
        self.home = huey.storage.home
        self.reserve = Reserve(self.home)
        self.disk_full = False
        self.stop_on_full = stop_on_full
        # SIGTERM drains like SIGINT: no new partitions, running ones finish within the
        # grace period (shutdown_timeout); a second signal stops at once.
        huey_private.drain_on_sigterm(self)
        # [seconds, job, next run, runs while the disk is full]
        self.jobs = [[DISK_CHECK, self._watch_disk, 0.0, True],
                     [1.0, self._kill_overdue, 0.0, False],
                     [2.0, self._record_workers, 0.0, False],
                     *([[PAUSE_CHECK, self._watch_pause, 0.0, False]] if state else []),
                     *([every, job, 0.0, False] for every, job in jobs)]
        if stop_when is not None:  # short-lived (burst, `run`): notice the end sooner
            self.jobs.append([check_every, self._stop_if(stop_when), 0.0, True])
            huey_private.check_stop_every(self, check_every)

    def start(self) -> None:
        """Fork the workers, with what is loaded so far kept out of the collector's reach:
        its pages stay shared with the workers (copy-on-write) instead of being touched by
        every collection in each of them."""
        if self.state is not None:  # paused from the start: no worker takes anything
            self.paused.value = 1 if ALL_WORK in self.state.ledger.pauses() else 0
        gc.freeze()
        super().start()
        if self.state is not None:
            with contextlib.suppress(DiskFull):  # the watch says so
                reaper.register(self.state, self.workers)
                self._record_workers()

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.state is not None:
                with contextlib.suppress(DiskFull):
                    reaper.unregister(self.state)
            trace.logger().info("consumer.stopped")

    def stop(self, graceful: bool = False) -> None:
        """Stop, and touch the queue file so that idle workers notice at once. Stopped by a
        signal, say what is left to finish and how to stop at once."""
        self.stop_flag.set()
        self.huey.storage.notify()
        if graceful and huey_private.stop_signal(self) is not None:
            busy = sum(1 for i in range(len(self.worker_threads)) if self.slots[3 * i])
            grace = self.shutdown_timeout
            again = ("Ctrl-C again to stop now" if sys.stdin.isatty()
                     else "a second signal stops them now")
            plural = "partition" if busy == 1 else "partitions"
            trace.logger().warning(
                "consumer.stopping", running=busy,
                message=(f"finishing {busy} running {plural}"
                         + (f" (up to {grace:g} s)" if grace is not None else "")
                         + f"; {again}") if busy else "nothing running: stopping")
        super().stop(graceful)

    def worker_made(self, process: Any, name: str) -> None:
        """Give each worker the state and its slot (huey names them Worker-1, Worker-2...
        and gives a restarted worker the name of the one it replaces); tell each process,
        workers and scheduler, whose child it is."""
        process.consumer_pid = os.getpid()
        if isinstance(process, RunexWorker):
            process.state, process.paused = self.state, self.paused
            process.slots, process.slot = self.slots, int(name.rsplit("-", 1)[1]) - 1

    def _kill_overdue(self) -> None:
        """The hard limit of `timeout`: kill a worker still at a partition past its time (see
        `worker.Running`); huey's health check starts another in its place."""
        now = time.time()
        for i, (_, proc) in enumerate(self.worker_threads):
            until, index, attempt = self.slots[3 * i:3 * i + 3]
            if not until or now < until or self.state is None:
                continue
            self.slots[3 * i] = 0.0

            def kill(proc: Any = proc) -> None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)

            reaper.kill_overdue(self.state, proc.pid, int(index), int(attempt), kill)

    def _record_workers(self) -> None:
        """Record this consumer's worker processes in the ledger when they change (huey
        starts another in place of one that died): nothing is written while they do not."""
        pids = [proc.pid for _, proc in self.worker_threads]
        if self.state is None or pids == self.recorded_pids:
            return
        self.state.ledger.set_worker_pids(trace.HOST, os.getpid(), pids)
        self.recorded_pids = pids

    def _watch_pause(self) -> None:
        """While all work is paused (`runex pause`), workers take nothing from the queue;
        what they run goes on to its end. Said once when it pauses and when it resumes. A
        short-lived consumer (`stop_on_full`: burst, `runex run`) stops instead."""
        pause = self.state.ledger.pauses().get(ALL_WORK)
        self.paused.value = 1 if pause else 0
        if bool(pause) == self.pause_told:
            return
        self.pause_told = bool(pause)
        if pause:
            message = (f"all work is paused (by {pause['source'] or 'someone'}): running "
                       "partitions finish, no other starts until `runex resume`")
            trace.logger().warning("work.paused", source=pause["source"], message=message)
        else:
            message = "all work is resumed"
            trace.logger().warning("work.resumed", message=message)
        trace.tell_operator(message)
        if pause and self.stop_on_full:
            self.stop(graceful=True)
            raise ConsumerStopped

    def _watch_disk(self) -> None:
        """While the home's reserve is missing (the disk is full), workers take nothing; make
        it again once there is room, and work resumes. A `stop_on_full` consumer (burst,
        `runex run`) stops instead."""
        if self.reserve.ok():
            return
        if self.reserve.make():
            if self.disk_full:
                free = free_bytes(self.home)
                message = (f"the disk under {self.home} has room again ({free:,} bytes free): "
                           "work resumes")
                trace.logger().warning("disk.resumed", home=self.home, free_bytes=free,
                                       message=message)
                trace.tell_operator(message)
            self.disk_full = False
            return
        if not self.disk_full:
            self.disk_full = True
            message = ((self.reserve.problem or self.reserve.describe())
                       + "; runex takes no more work until it can write there"
                       + ("" if self.stop_on_full else ", then goes on by itself"))
            trace.logger().error("disk.full", home=self.home, free_bytes=free_bytes(self.home),
                                 message=message)
            trace.tell_operator(message)
        if self.stop_on_full:
            self.stop(graceful=True)
            raise ConsumerStopped

    def _stop_if(self, stop_when: Callable[[], bool]) -> Callable[[], None]:
        def check() -> None:
            if stop_when():
                self.stop(graceful=True)
                raise ConsumerStopped
        return check

    def loop(self, health_check_ts: float | None = None) -> float | None:
        """runex's periodic jobs, in this process, then huey's loop (a wait for signals, up to
        0.1 s; worker health)."""
        now = time.monotonic()
        for job in self.jobs:
            if now >= job[2] and (job[3] or not self.disk_full):
                job[2] = now + job[0]
                try:
                    job[1]()
                except ConsumerStopped:
                    raise
                except DiskFull:  # `_watch_disk` says so, once
                    pass
                except Unreachable as exc:  # no traceback: what, and that it goes on
                    trace.logger().warning("consumer.job_failed", job=job[1].__qualname__,
                                           error=str(exc), message="tried again next round")
                except Exception:  # noqa: BLE001 - the next round tries again
                    trace.logger().exception("consumer.job_failed", job=job[1].__qualname__)
        return super().loop(health_check_ts)


def make(state: WorkerState, workers: int, max_delay: float, grace: float | None = None,
         reap_every: float = 10.0, jobs: list[tuple[float, Callable[[], Any]]] = (),
         stop_when: Callable[[], bool] | None = None, stop_on_full: bool = False
         ) -> RunexConsumer:
    """A consumer of `workers` processes over the queue of `state`, not yet started. Its
    main process runs the reaper every `reap_every` seconds, and `jobs` (every, callable).
    While the disk under the home is full it takes no work, or, `stop_on_full`, stops."""
    state.ledger.close()
    # A message is missing for a moment between a worker's dequeue and its claim: only a
    # partition without one over three rounds counts as vanished. But a consumer that starts
    # while no other runs (after a reboot, say) looks at once: nobody else can hold them.
    rounds = itertools.count()

    def reap() -> None:
        alone = next(rounds) == 0 and not reaper.others_alive(state)
        reaper.reap(state, vanished_after=reaper.VANISHED_ALONE if alone else 3 * reap_every)
        state.ledger.checkpoint()  # nothing to copy while idle: writes nothing
        state.huey.storage.checkpoint()

    return RunexConsumer(state.huey, jobs=[(reap_every, reap), *jobs], stop_when=stop_when,
                         stop_on_full=stop_on_full, state=state, workers=workers,
                         worker_type="process",
                         periodic=False, initial_delay=min(0.05, max_delay),
                         max_delay=max_delay, backoff=1.15, scheduler_interval=1,
                         check_worker_health=True, health_check_interval=2,
                         shutdown_timeout=grace)
