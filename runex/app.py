"""`Runex`: one object over a project, its extensions, ledger and queue. The CLI is a thin
layer over it, and so can a user's own script be."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import functools
import itertools
import json
import multiprocessing
import os
import signal
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runex import (
    __version__,
    consumer,
    extensions,
    huey_private,
    postgres,
    reaper,
    retention,
    tasks,
    timeline,
    trace,
)
from runex.cron import iso, parse_time
from runex.doctor import Finding, examine
from runex.durable import make_dirs
from runex.errors import (
    DiskFull,
    ExtensionError,
    NotFound,
    PipelineError,
    RunexError,
    ScheduleError,
    StorageError,
    UsageError,
)
from runex.executor import Stats, execute, stream
from runex.finalizer import finalize_run
from runex.identity import alive
from runex.ledger import ALL_WORK, TERMINAL_RUN, Ledger, NewRun, new_run_id
from runex.pipeline import Pipeline, Plan, check, load, parse_duration
from runex.project import Project, chdir, cpu_count, load_profile, open_project
from runex.registry import Registry
from runex.reserve import Reserve
from runex.runs import Run, steps_of
from runex.scheduler import DEFAULT_PIPELINES, Scheduler, fire_times
from runex.storage import engine_for
from runex.worker import WorkerState

REAP_HERE = 2.0  # seconds idle before `work(workers=0)` looks for lost work
LISTED_IN_MEMORY = 10_000  # partition keys a submit holds in memory; more go to a file
PLANS_KEPT = 64  # checked pipeline files a Runex remembers (see `Runex.plan`)


class Runex:
    """A project seen from the current folder (or `root`), with its data folder `home`."""

    def __init__(self, home: str | os.PathLike | None = None,
                 extensions: Sequence[str | os.PathLike] = (),
                 root: str | os.PathLike | None = None, database: str | None = None):
        self.project: Project = open_project(home, extensions, root, database)
        self._registry: Registry | None = None
        self._ledger: Ledger | None = None
        self._huey: Any = None
        self._extra_extensions: list[Path] = []
        self._plans: dict[tuple[Any, ...], tuple[Registry, Plan]] = {}  # see `plan`

    # -- parts, opened on first use ------------------------------------------------------

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = extensions.load(self.project.extension_dirs + self._extra_extensions)
        return self._registry

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self.project.ensure_home()
            self._ledger = Ledger(engine_for(self.project.database or self.project.ledger_path,
                                             self.project.home), self.project.lease)
        return self._ledger

    @property
    def huey(self) -> tasks.Queue:
        if self._huey is None:
            self.project.ensure_home()
            self._huey = tasks.make_huey(self.project.database or self.project.queue_path,
                                         self.project.home)
        return self._huey

    @property
    def load_errors(self) -> list[ExtensionError]:
        """The extension files that failed to load (the others did)."""
        return list(self.registry.errors)

    def prepare_workers(self) -> WorkerState:
        """Make what worker processes work with, and set the queue to run partitions with it:
        before a consumer forks them, or to run partitions (or finalize a run) in this
        process."""
        state = WorkerState(self.registry, self.ledger, self.huey, self.project.home,
                            code_drift=self.project.config.get("code_drift", "refuse"))
        self.huey.serve(functools.partial(execute, state))
        return state

    def scheduler(self, check: bool = True) -> Scheduler:
        """The project's scheduled pipelines, fired through this `Runex`; each checked
        against the extensions (`check`), or only read."""
        self.ensure_trace()
        return Scheduler(self.project.root, self.pipeline_files, self.ledger,
                         self.plan if check else lambda pipeline: None, self._submit)

    @property
    def pipeline_files(self) -> str:
        """Where the project's pipeline files are (a glob under its root)."""
        return self.project.config.get("pipelines", DEFAULT_PIPELINES)

    def trace_to_home(self, console: bool | None = None, verbose: bool = False,
                      log_format: str | None = None, log_level: str = "info") -> None:
        """Trace to this home's `traces/`, and (`console`; by default on a terminal) to the
        operator's log on stderr (see `runex.trace`)."""
        self.project.ensure_home()
        trace.configure(self.project.traces_dir, console=console, verbose=verbose,
                        log_format=log_format, log_level=log_level)

    def ensure_trace(self, console: bool | None = False) -> None:
        """Trace to this home unless the caller configured traces already."""
        if not trace.configured():
            self.trace_to_home(console=console)

    # -- pipelines and runs -------------------------------------------------------------

    def plan(self, pipeline: str | os.PathLike | Pipeline, params: Sequence[str] = (),
             fire_time: dt.datetime | None = None) -> Plan:
        """Load (when given a path) and check a pipeline against the loaded extensions, with
        `{fire_time}` in its parameters filled in (by default: with the current time). A file
        loaded before, unchanged, without `{fire_time}`, with the same extensions, gives the
        plan it gave then (a program submitting again and again pays for one check)."""
        # A long-lived caller (a consumer firing schedules) sees extension files as they are.
        self._registry = extensions.refresh(self.registry)
        key = None
        if not isinstance(pipeline, Pipeline):
            with contextlib.suppress(OSError):
                info = os.stat(pipeline)
                key = (os.path.abspath(pipeline), info.st_ino, info.st_mtime_ns, info.st_size,
                       tuple(params))
            if key in self._plans and self._plans[key][0] is self._registry:
                return self._plans[key][1]
            pipeline = load(pipeline, params)
        filled = pipeline.with_fire_time(fire_time or dt.datetime.now(dt.UTC))
        plan = check(filled, self._registry)
        if key is not None and filled == pipeline:  # no fire time in it: the same next time
            if len(self._plans) >= PLANS_KEPT:
                self._plans.clear()
            self._plans[key] = (self._registry, plan)
        return plan

    def submit(self, pipeline: str | os.PathLike | Pipeline, params: Sequence[str] = ()) -> str:
        """Check the pipeline, list its partitions, record the run and queue its partitions;
        returns the run id once all of that is on disk. Workers (`work`, `runex worker`)
        run it; `wait` waits for it."""
        run_id = self._submit(pipeline, params)
        assert run_id is not None  # only a fire can find its fire time taken
        return run_id

    def _submit(self, pipeline: str | os.PathLike | Pipeline, params: Sequence[str] = (),
                fire_time: dt.datetime | None = None,
                record: Callable[[NewRun], bool] | None = None) -> str | None:
        """`submit`, for a scheduled run too: its `fire_time`, and the ledger method that
        records it with its fire (`Ledger.fire_run`, `fire_waiting_run`, `refire_run`), which
        may find the fire time taken by another consumer: then None."""
        plan = self.plan(pipeline, params, fire_time)
        pipe = plan.pipeline
        self.ensure_trace()
        # The source's code runs now, not while the ledger's write lock is held.
        with _listed(self._partition_keys(plan), self.project.home) as keys:
            new = NewRun(new_run_id(), pipe.name, pipe.to_dict(), str(self.project.root),
                         pipe.options.priority, keys, iso(fire_time) if fire_time else None,
                         {"version": plan.code_version, "files": plan.code_files,
                          "host": trace.HOST, "runex": __version__})
            count = self.ledger.create_run(new) if record is None else record(new)
        if count is None:
            return None
        trace.logger(run_id=new.id, pipeline=pipe.name).debug(
            "run.submitted", partitions=count, source=pipe.source.use, sink=pipe.sink.use,
            scheduled_for=new.scheduled_for)
        try:
            if count:
                tasks.enqueue(self.huey, new.id, range(count), pipe.options.priority)
            else:  # nothing to run: finalized now, like any run (a merge of nothing)
                finalize_run(self.prepare_workers(), new.id)
        except DiskFull as exc:  # the run is recorded: a consumer queues it again
            self.ledger.sync()
            raise DiskFull(f"{exc}; run {new.id} is recorded, and a consumer queues its "
                           "partitions once there is room") from exc
        self.ledger.sync()  # on disk before its id is returned (and printed)
        return new.id

    def _partition_keys(self, plan: Plan) -> Iterator[str]:
        """The source's partition keys as JSON text, as the source lists them (a list of a
        million is never held); a key that is not JSON-able, or a failing source, raises
        `PipelineError` as they come, and the run is not recorded."""
        where = plan.pipeline.path or plan.pipeline.name
        if plan.source_partitions is None:
            yield "null"
            return
        source = plan.pipeline.source.use
        try:
            with chdir(self.project.root):
                keys = iter(plan.source_partitions(**plan.source_partitions_params))
                while True:
                    try:
                        key = next(keys)
                    except StopIteration:
                        return
                    try:
                        yield json.dumps(key)
                    except (TypeError, ValueError):
                        raise PipelineError(
                            f"{where}: source {source!r} returned a partition key that is not "
                            f"JSON-able: {key!r}; use strings, numbers, lists or dicts") from None
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code: report, store nothing
            raise PipelineError(f"{where}: source {source!r} could not list its partitions: "
                                f"{type(exc).__name__}: {exc}") from exc

    def work(self, workers: int | None = None, profile: str | None = None, burst: bool = False,
             until: Callable[[], bool] | None = None, schedules: bool = True,
             web: dict[str, Any] | None = None) -> consumer.RunexConsumer | None:
        """Process the queue with `workers` processes until stopped by a signal, or (`burst`)
        until nothing is queued or running, or until `until()` is true. With `schedules`
        (not in burst mode), fire the project's scheduled pipelines when due. With `web`
        (the arguments of `web`), serve the dashboard too, from a thread of the consumer
        with its own connection to the ledger. Blocks.
        `workers=0` works in this process, without a consumer (for tests and notebooks),
        and needs `burst` or `until`. Returns the consumer it ran, if any."""
        stops = [f for f in (until, self._nothing_left if burst else None) if f]
        if workers == 0:  # in this process, until a stop condition holds
            if not stops:
                raise ValueError("work(workers=0) needs burst=True or until=")
            self._work_here(lambda: any(f() for f in stops))
            return None
        settings = load_profile(self.project, profile)
        extra = list(settings.get("extensions", []))
        if extra != self._extra_extensions:
            self._extra_extensions, self._registry = extra, None
        count = workers or settings.get("workers") or cpu_count()
        self.ensure_trace(console=None)
        self._wait_for_room(wait=not stops)  # a consumer that must not wait raises DiskFull
        self._say_started(count, profile)
        state = self.prepare_workers()
        reap_every = float(settings.get("reap_every", 10))
        jobs = [(1.0, self.scheduler().tick)] if schedules and not burst else []
        jobs.append((reap_every, self._retain))
        runner = consumer.make(state, count, float(settings.get("max_delay", 0.5)),
                               grace=float(settings.get("grace", 60)),
                               reap_every=reap_every, jobs=jobs,
                               stop_when=(lambda: any(f() for f in stops)) if stops else None,
                               stop_on_full=bool(stops))
        dashboard = self._serve_beside(web) if web is not None else None
        try:
            runner.run()
        finally:
            if dashboard is not None:
                dashboard.terminate()
                dashboard.join(10)
        with contextlib.suppress(StorageError):  # done: the logs back to their small size
            retention.settle(self.ledger, self.huey)
        if runner.disk_full and runner.stop_on_full:
            raise DiskFull(f"{runner.reserve.describe()}; stopped, nothing is lost: what was "
                           "not done is queued, and `runex worker` does it once there is room")
        # What the caller reads next (a run's end, to print it) is on disk, whichever worker
        # wrote it.
        self.ledger.sync()
        return runner

    def _serve_beside(self, web: dict[str, Any]) -> Any:
        """The dashboard, bound here (an address in use fails at once) and served by a child
        process forked now, before the workers are: over a copy of this `Runex` with the
        same extensions and its own ledger connection. (Not a thread: a process that forks
        workers must not have threads, whose locks a fork would copy held.) It dies with
        this process."""
        viewer = copy.copy(self)
        viewer._ledger, viewer._huey, viewer._plans = None, None, {}
        server = viewer.web(**web).server()
        child = multiprocessing.get_context("fork").Process(
            target=_serve_dashboard, args=(server, os.getpid()), name="runex-web", daemon=True)
        child.start()
        server.socket.close()  # the child's now
        host, port = server.server_address[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        trace.logger().info("web.started", url=url)
        trace.tell_operator(f"dashboard on {url}")
        return child

    def _say_started(self, workers: int, profile: str | None) -> None:
        """The operator's first lines: what this consumer is, and what failed to load."""
        reg = self.registry
        log = trace.logger()
        where = {"database": str(self.ledger.engine)} if self.project.database else {}
        log.info("consumer.started", version=__version__, home=str(self.project.home),
                 **where, host=trace.HOST, workers=workers, profile=profile or "default",
                 kernels=len(reg.kernels), sources=len(reg.sources), sinks=len(reg.sinks),
                 failed_files=len(reg.errors))
        for error in reg.errors:
            log.warning("extension.failed", error=str(error))

    def _wait_for_room(self, wait: bool) -> None:
        """A consumer that starts while the disk under the home is full (its reserve cannot
        be made, see `runex.reserve`) waits for room before it opens anything, or raises
        `DiskFull` when it must not wait (`runex run`, burst)."""
        reserve = Reserve(self.project.home)
        if reserve.make():
            return
        home = self.project.home
        why = reserve.problem or reserve.describe()
        if not wait:
            raise DiskFull(f"{why}; no worker was started")
        message = f"{why}; runex waits until it can write there before it takes work"
        trace.logger().error("disk.full", home=str(home), message=message)
        trace.tell_operator(message)
        while not reserve.make():
            time.sleep(1.0)
        message = f"the disk under {home} has room again: work resumes"
        trace.logger().warning("disk.resumed", home=str(home), message=message)
        trace.tell_operator(message)

    def _nothing_left(self) -> bool:
        return self.ledger.unfinished_partitions() == 0

    def run(self, pipeline: str | os.PathLike | Pipeline, params: Sequence[str] = (),
            workers: int | None = None, profile: str | None = None,
            on_progress: Callable[[dict[str, int]], None] | None = None) -> Run:
        """Submit a pipeline and work the queue until its run ends; returns the run. With
        `workers=0`, the partitions run in this process, through the same claims, commits
        and ledger (for notebooks, debuggers and tests).

        The run goes ahead of what was queued before it (its priority is raised above theirs
        if need be): a worker takes other runs' partitions only while it has none of this
        one's left to start, and the log says so, and what is left of them. Refused while
        all work is paused (`pause`)."""
        pause = self.ledger.pauses().get(ALL_WORK)
        if pause is not None:
            raise UsageError(f"all work is paused (by {pause['source'] or 'someone'}): "
                             "`runex resume` first, or `runex submit` to queue the run")
        if not isinstance(pipeline, Pipeline):
            pipeline = load(pipeline, params)
        ahead = self.ledger.highest_waiting_priority()
        if ahead is not None and ahead >= pipeline.options.priority:
            pipeline = dataclasses.replace(
                pipeline, options=dataclasses.replace(pipeline.options, priority=ahead + 1))
        run_id = self.submit(pipeline)
        started = time.time()
        progress = None if on_progress is None else (
            lambda over: on_progress(self.ledger.progress(run_id)))
        try:
            runner = self._work_until_over([run_id], workers, profile, progress)
        except DiskFull as exc:
            raise DiskFull(f"{exc} (run {run_id}; `runex show {run_id}` tells how far it "
                           "got)") from exc
        pids = [p.pid for _, p in runner.worker_threads] if runner else [os.getpid()]
        self._say_what_else(run_id, started, pids)
        return self.show(run_id)

    def _say_what_else(self, run_id: str, since: float, pids: list[int]) -> None:
        worked, left, runs = self.ledger.other_work(run_id, since, trace.HOST, pids)
        log = trace.logger(run_id=run_id)
        if worked:
            log.info("run.other_work", partitions=worked,
                     message=f"worked on {worked} partition{'s' if worked != 1 else ''} "
                             "of other runs too, while this run had none left to start")
        if left:
            others = "another run" if runs == 1 else f"{runs} other runs"
            log.info("run.others_queued", partitions=left, runs=runs,
                     message=f"{others} still {'has' if runs == 1 else 'have'} {left} "
                             f"partition{'s' if left != 1 else ''} to do; `runex worker` "
                             "runs them")

    def _work_until_over(self, run_ids: list[str], workers: int | None, profile: str | None,
                         progress: Callable[[int], None] | None = None
                         ) -> consumer.RunexConsumer | None:
        """Work the queue here until every run of `run_ids` is over: with worker processes,
        or (`workers=0`) in this process. `progress(runs over)` is called at each look.
        Returns the consumer that ran, if any."""
        def over() -> bool:
            done = sum(self.ledger.run(r)["status"] in TERMINAL_RUN for r in run_ids)
            if progress is not None:
                progress(done)
            return done == len(run_ids)

        if workers == 0 or not over():
            return self.work(workers, profile, until=over, schedules=False)
        return None

    def _work_here(self, done: Callable[[], bool]) -> None:
        """Take messages off the queue and run them in this process until `done()`. While
        there is nothing to take, the reaper looks every REAP_HERE seconds, as a consumer's
        does: a partition whose worker died, or whose message was lost, is queued again
        rather than waited for."""
        huey = self.huey
        state = self.prepare_workers()
        reap_at = time.monotonic() + REAP_HERE
        while not done():
            for task in huey.read_schedule(huey_private.now(huey)):  # due retries
                huey.enqueue(task)
            task = huey.dequeue()
            if task is not None:
                huey.execute(task)
                reap_at = time.monotonic() + REAP_HERE
            elif time.monotonic() >= reap_at:
                reaper.reap(state, vanished_after=REAP_HERE)
                reap_at = time.monotonic() + REAP_HERE
            else:
                time.sleep(0.01)  # a retry's delay: nothing else to do here meanwhile

    def wait(self, ref: str, timeout: float | None = None) -> Run:
        """Block until the run is over (succeeded, failed or cancelled) and return it; raise
        `TimeoutError` if `timeout` seconds pass first. It wakes when the ledger is written
        (inotify on Linux), not on a fixed sleep."""
        run_id = self.ledger.resolve_run_id(ref)
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = self.ledger.engine.watch()
        try:
            while (status := self.ledger.run(run_id)["status"]) not in TERMINAL_RUN:
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"run {run_id} is still {status} after {timeout:g}s")
                watch.wait(min(left, 1.0))
        finally:
            watch.close()
        return self.show(run_id)

    def backfill(self, pipeline: str | os.PathLike, start: dt.datetime, end: dt.datetime,
                 force: bool = False, wait: bool = False, workers: int | None = None,
                 profile: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 on_fire: Callable[[dict[str, Any]], None] | None = None
                 ) -> list[dict[str, Any]]:
        """One run per fire time of a scheduled pipeline from `start` to `end` (both
        included, not in the future), queued in fire-time order. A fire time whose run
        succeeded, or is still going, is left alone; `force` runs the succeeded ones again.
        With `wait`, work the queue here (as `run` does) until every one of those runs is
        over; `on_progress(over, total)` is called at each look. `on_fire(fire)` is called
        for each fire time once it is queued or left alone, before any waiting. Returns, per
        fire time, its run and whether it was submitted now, with the run's status at the
        end."""
        pipe = load(pipeline)
        now = dt.datetime.now(dt.UTC)
        if end > now:
            raise PipelineError(f"--to {iso(end)} is in the future; scheduled runs fire it "
                                "when it comes")
        result = []
        for fire_time in fire_times(pipe, start, end):
            when = iso(fire_time)
            fire = self.ledger.fire(pipe.name, when)
            status = fire and fire["run_status"]
            if status in ("queued", "running") or (status == "succeeded" and not force):
                result.append({"fire_time": when, "run_id": fire["run_id"], "status": status,
                               "submitted": False})
            else:
                run_id = self._submit(pipe, fire_time=fire_time,
                                      record=self.ledger.refire_run)
                result.append({"fire_time": when, "run_id": run_id, "status": "queued",
                               "submitted": True})
            if on_fire is not None:
                on_fire(dict(result[-1]))
        run_ids = [f["run_id"] for f in result]
        if wait and run_ids:
            progress = None if on_progress is None else (
                lambda over: on_progress(over, len(run_ids)))
            self._work_until_over(run_ids, workers, profile, progress)
        for f in result:
            f["status"] = self.ledger.run(f["run_id"])["status"]
        return result

    def cancel(self, ref: str) -> dict[str, Any]:
        """Cancel a run: queued partitions never start, running ones stop at their next
        batch, and the run ends `cancelled`."""
        run_id = self.ledger.resolve_run_id(ref)
        status = self.ledger.run(run_id)["status"]
        if status in TERMINAL_RUN:  # nothing to cancel
            return {"run_id": run_id, "cancelled": 0, "running": 0, "status": status,
                    "already_over": True}
        trace.logger(run_id=run_id).info("run.cancel_requested")
        done = self.ledger.cancel(run_id)
        if done.complete:
            finalize_run(self.prepare_workers(), run_id)
        self.ledger.sync()
        return {"run_id": run_id, "cancelled": done.cancelled, "running": done.running,
                "status": self.ledger.run(run_id)["status"], "already_over": False}

    def retry(self, ref: str, partition: int | str | None = None) -> list[int]:
        """Queue again the failed, timed-out, quarantined or cancelled partitions of a run (or
        one of them, by index or key), with a fresh retry budget; the earlier attempts are
        kept."""
        run = self.ledger.run(self.ledger.resolve_run_id(ref))
        if partition is not None:
            partition = self._partition_index(run["id"], partition)
        indexes = self.ledger.retry(run["id"], partition)
        if not indexes:
            raise NotFound(f"run {run['id']} has no failed, timed-out, quarantined or cancelled "
                           "partition"
                           + ("" if partition is None else f" with index {partition}"))
        trace.logger(run_id=run["id"], pipeline=run["pipeline"]).info(
            "run.retried", partitions=indexes)
        tasks.enqueue(self.huey, run["id"], indexes, run["priority"])
        self.ledger.sync()
        return indexes

    def pause(self, pipeline: str | None = None, source: str = "api") -> bool:
        """Pause a scheduled pipeline (by name): its fire times are skipped, each recorded
        with the reason, until `resume`. Without one, all work: consumers start no partition
        (those running finish; submits and fires still queue runs). `source` says who asked
        (`cli`, `web 127.0.0.1`...). False if it was paused already."""
        if pipeline is not None and pipeline not in (
                names := {s["pipeline"] for s in self.schedules() if s.get("schedule")}):
            raise NotFound(f"no scheduled pipeline {pipeline!r} to pause"
                           + (f" (scheduled: {', '.join(sorted(names))})" if names else "")
                           + "; `runex schedules` lists them")
        paused = self.ledger.pause(pipeline or ALL_WORK, source)
        self.ledger.sync()
        trace.logger(pipeline=pipeline).info("schedule.paused" if pipeline else "work.paused",
                                             source=source, already=not paused)
        return paused

    def resume(self, pipeline: str | None = None, source: str = "api") -> bool:
        """Resume a paused scheduled pipeline (its next fire time fires; those skipped while
        paused stay skipped), or, without one, all work. False if it was not paused."""
        resumed = self.ledger.resume(pipeline or ALL_WORK)
        self.ledger.sync()
        trace.logger(pipeline=pipeline).info(
            "schedule.resumed" if pipeline else "work.resumed", source=source,
            already=not resumed)
        return resumed

    def paused(self) -> dict[str, Any]:
        """What is paused: `{"all": {paused_at, source} or None, "schedules": {pipeline:
        {paused_at, source}}}`."""
        pauses = self.ledger.pauses()
        return {"all": pauses.pop(ALL_WORK, None), "schedules": pauses}

    def replay(self, ref: str, partition: int | str) -> Replay:
        """One partition of a run (by key or index) again, in this process, with the run's
        recorded pipeline and today's code, writing nothing: a `Replay`, whose `records()`
        are what the steps make of the partition now (read as iterated, in the run's
        project folder), and which says how today's code differs from the run's."""
        run = self.ledger.run(self.ledger.resolve_run_id(ref))
        index = self._partition_index(run["id"], partition)
        key = json.loads(self.ledger.partitions(run["id"], index - 1, 1)[0]["key"])
        with chdir(Path(run["project_dir"])):
            plan = check(Pipeline.from_dict(json.loads(run["spec"])), self.registry)
        then = json.loads(run["code"]) if run["code"] else {}
        files = then.get("files", {})
        differ = sorted(f for f in files.keys() | plan.code_files.keys()
                        if files.get(f) != plan.code_files.get(f))
        return Replay(run["id"], index, key, plan, Path(run["project_dir"]),
                      then.get("version"), plan.code_version, differ if then else None)

    def lineage(self, run: str | None = None, partition: int | str | None = None,
                db: str | os.PathLike | None = None, table: str | None = None,
                rowid: int | None = None) -> dict[str, Any]:
        """Where output came from: a partition of a run (`run`, `partition`: its key or
        index), or a row that a sink with `lineage = true` wrote (`db`: a SQLite file or a
        PostgreSQL URL, `table`, `rowid`: its rowid, or its `id` column in PostgreSQL). The
        run and pipeline, the partition, the attempt that committed it (host, pid, when),
        the code version it ran and the files of that code, the fingerprint of the input it
        read, and the parameters of its source, steps and sink."""
        if db is not None:
            run, key = _stamp_of(str(db), table, rowid)
        run_id = self.ledger.resolve_run_id(run or "")
        parts = self.show(run_id).partitions
        if db is not None:
            found = next((p for p in parts if p.key == key), None)
            if found is None:
                raise NotFound(f"run {run_id} has no partition {json.dumps(key)}")
        else:
            (found,) = parts.where(after=self._partition_index(run_id, partition) - 1,
                                   limit=1)
        data = self.ledger.run(run_id)
        spec = json.loads(data["spec"])
        done = [a for a in found.attempts if a["status"] in ("succeeded", "skipped")]
        attempt = (done or found.attempts or [{}])[-1]
        return {"run_id": run_id, "pipeline": data["pipeline"], "run_status": data["status"],
                "partition": {"index": found.index, "key": found.key,
                              "status": found.status},
                "attempt": {k: attempt.get(k) for k in ("attempt", "status", "host", "pid",
                                                        "started_at", "finished_at")},
                "code_version": attempt.get("code_version"),
                "code_files": (json.loads(data["code"]) if data["code"] else {}).get("files"),
                "fingerprint": attempt.get("fingerprint") and json.loads(attempt["fingerprint"]),
                "params": {k: spec[k] for k in ("source", "steps", "sink")}}

    def openlineage(self, ref: str) -> list[dict[str, Any]]:
        """A run as OpenLineage run events, for a lineage tool: START, and once it is over
        COMPLETE, FAIL or ABORT (cancelled), with its job (namespace `runex`, the pipeline's
        name), its input and output datasets (from the source's and sink's `path`, `table`
        or `url`), the code version and files it ran, and its error."""
        import uuid  # noqa: PLC0415 - 3 ms that no other command needs

        run = self.ledger.run(self.ledger.resolve_run_id(ref))
        spec = json.loads(run["spec"])
        code = json.loads(run["code"]) if run["code"] else {}
        project = Path(run["project_dir"])
        facet = {"_producer": OPENLINEAGE_PRODUCER,
                 "_schemaURL": f"{OPENLINEAGE_SCHEMA}#/$defs/RunFacet"}
        base = {
            "run": {"runId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:runex:run:{run['id']}")),
                    "facets": {"runex": {**facet, "runId": run["id"],
                                         "codeVersion": code.get("version"),
                                         "codeFiles": code.get("files"),
                                         "partitions": run["partition_count"]}}},
            "job": {"namespace": "runex", "name": run["pipeline"]},
            "inputs": _datasets(spec["source"], project),
            "outputs": _datasets(spec["sink"], project),
            "producer": OPENLINEAGE_PRODUCER,
            "schemaURL": f"{OPENLINEAGE_SCHEMA}#/$defs/RunEvent"}
        events = [{"eventType": "START", "eventTime": _event_time(run["started_at"]
                                                                  or run["created_at"]),
                   **base}]
        if run["status"] in TERMINAL_RUN:
            end = copy.deepcopy(base)
            if run["error"]:
                end["run"]["facets"]["errorMessage"] = {
                    **facet, "message": run["error"], "programmingLanguage": "python"}
            events.append({"eventType": {"succeeded": "COMPLETE", "failed": "FAIL",
                                         "cancelled": "ABORT"}[run["status"]],
                           "eventTime": _event_time(run["finished_at"]), **end})
        return events

    def replay_to_sink(self, replayed: Replay) -> dict[str, Any]:
        """Run a replayed partition that did not succeed into the run's real sink: a new
        attempt of the run, claimed, fenced and recorded as any other, run in this process
        (`retry` with a fresh budget, without waiting for a worker), with today's code even
        where it differs from the run's (the log says so: `code.drifted`). Returns the
        partition as `show` has it."""
        run_id, index = replayed.run_id, replayed.index
        if not self.ledger.retry(run_id, index):
            raise NotFound(f"partition {index} of run {run_id} succeeded or is still going: "
                           "only one that did not succeed is written again")
        trace.logger(run_id=run_id).info("run.retried", partitions=[index], source="replay")
        state = self.prepare_workers()
        state.code_drift = "warn"  # today's code is what the replay was asked to write with
        execute(state, run_id, [index])
        self.ledger.sync()
        (part,) = self.show(run_id).partitions.where(after=index - 1, limit=1)
        return part.to_dict()

    def _partition_index(self, run_id: str, ref: int | str) -> int:
        """A partition by its key (as `show` prints it, or the plain string) or its index."""
        parts = self.ledger.partitions(run_id)
        for p in parts:
            if str(ref) in (p["key"], str(json.loads(p["key"]))):
                return p["idx"]
        if str(ref).isdigit() and int(ref) < len(parts):
            return int(ref)
        raise NotFound(f"run {run_id} has no partition {ref!r}; `runex show {run_id}` lists "
                       "them with their index and key")

    def runs(self, limit: int = 20, status: str | None = None, pipeline: str | None = None,
             since: dt.datetime | str | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The newest runs (of one `status`, one `pipeline`, created `since`: a time, or a
        string such as `2026-11-01`, `2026-11-01T06:00`, or `30m`, `2h`, `7d` back from now),
        newest first, after the first `offset`, each as `runex runs --json` prints it: the
        run without its partitions, with the `seconds` it took (or so far)."""
        if isinstance(since, str):
            since = since_time(since)
        rows = self.ledger.runs(limit, status, pipeline, since and since.timestamp(), offset)
        for row in rows:
            del row["spec"]
            _public(row)
            _with_seconds(row)
        return rows

    def trace(self, ref: str) -> Iterator[dict[str, Any]]:
        """The trace events of a run, in time order (each a dict with `ts` and `event`), as
        they are read: those of the trace files, and those that the ledger's rows tell (see
        `runex.timeline`)."""
        run = self.ledger.run(self.ledger.resolve_run_id(ref))
        return timeline.events(self.ledger, run, self.project.traces_dir)

    def schedules(self, now: dt.datetime | None = None, check: bool = True
                  ) -> list[dict[str, Any]]:
        """Each pipeline file with a schedule: its next fire times, its last fire and that
        run's status; and each pipeline file that has an error, with it. Without `check`,
        the files are read but not checked against the extensions (which are then not
        loaded): an unknown kernel is not an error there."""
        return self.scheduler(check).listing(now)

    def extensions(self) -> dict[str, Any]:
        """Every kernel, source and sink loaded, with where it is defined; the extension
        files that failed to load; the extension folders."""
        reg = self.registry
        items = ([{"kind": "kernel", "name": k.name, "origin": k.origin, "batch": k.batch}
                  for k in reg.kernels.values()]
                 + [{"kind": "source", "name": s.name, "origin": s.origin}
                    for s in reg.sources.values()]
                 + [{"kind": "sink", "name": s.name, "origin": s.origin}
                    for s in reg.sinks.values()])
        items.sort(key=lambda i: (i["kind"], i["name"]))
        return {"extensions": items, "errors": [str(e) for e in reg.errors],
                "folders": [str(d) for d in self.project.extension_dirs]}

    def workers(self) -> dict[str, Any]:
        """The consumers (`runex worker`, `runex run`) recorded as running, each with its
        host, pid, start time, worker processes (`worker_pids`) and whether it is `alive`
        (known on its own host only: None elsewhere); and the attempts running now (what
        each worker process runs: run, partition, pid, since when), oldest first."""
        consumers = self.ledger.consumers()
        for c in consumers:
            c["worker_pids"] = json.loads(c["worker_pids"] or "[]")
            c["alive"] = (alive(c["pid"], c["pid_started"], c["boot_id"])
                          if c["host"] == trace.HOST else None)
        running = self.ledger.running_work()
        for a in running:
            a["key"] = json.loads(a["key"])
        return {"consumers": consumers, "running": running}

    def validate(self, pipeline: str | os.PathLike | Pipeline, params: Sequence[str] = ()
                 ) -> Plan:
        """Check a pipeline against the loaded extensions without running it: raises
        `PipelineError` (or `UnknownName`...) saying what is wrong; returns the checked plan."""
        return self.plan(pipeline, params)

    def web(self, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
            read_only: bool = False) -> Any:
        """What `runex web` serves (a `runex.web.Dashboard`): its `server()` is bound, and
        answers until stopped (`serve_forever()`)."""
        from runex.web import Dashboard  # noqa: PLC0415 - the dashboard's own module

        return Dashboard(self, host, port, token, read_only)

    def migrate(self, to: str) -> dict[str, Any]:
        """Copy this home's SQLite ledger (runs, partitions, attempts, schedules, fires) into
        the PostgreSQL database `to`, in one transaction, and queue there the partitions
        queued here: to move from one machine to several. Refused while a consumer works on
        the home, or if `to` holds a ledger's rows already. The SQLite files stay where they
        are (their schema brought up to date first, as any command does)."""
        if not postgres.is_url(to):
            raise UsageError(f"--to {to!r}: give a postgresql://user@host:5432/db URL")
        path = self.project.ledger_path
        if not path.exists():
            raise NotFound(f"no ledger in {self.project.home}: nothing to migrate")
        source = Ledger(path)
        working = [c for c in source.consumers() if c["host"] != trace.HOST
                   or alive(c["pid"], c["pid_started"], c["boot_id"])]
        if working:
            shown = ", ".join(f"pid {c['pid']} on {c['host']}" for c in working)
            raise RunexError(f"consumers are working on {self.project.home} ({shown}): stop "
                             "them first (Ctrl-C, or `systemctl stop`), then migrate")
        target = Ledger(engine_for(to, self.project.home), self.project.lease)
        copied = source.copy_into(target)
        huey = tasks.make_huey(to, self.project.home)
        queued = 0
        for run_id in target.queued_counts():
            indexes = list(target.queued_before(run_id, time.time() + 1))
            tasks.enqueue(huey, run_id, indexes, target.run(run_id)["priority"])
            queued += len(indexes)
        source.close()
        target.close()
        return {"from": str(path), "to": str(target.path), "copied": copied,
                "queued_partitions": queued}

    def prune(self, older_than: str | float = "30d", keep_last: int = 0,
              dry_run: bool = False) -> dict[str, Any]:
        """Delete what the home keeps of runs that ended more than `older_than` ago (a
        duration: `30d`, `12h`, or seconds), except the newest `keep_last` runs: their
        partitions, attempts and fires in the ledger, and the trace files of the days before
        them and before the oldest run kept; then give the space back. Runs not over, and the
        fires a schedule needs, are kept. `dry_run`: count only. Returns the counts, and the
        trace files removed."""
        try:
            seconds = parse_duration(older_than, "--older-than")
        except PipelineError as exc:
            raise UsageError(str(exc)) from None
        before = time.time() - seconds
        done = self.ledger.prune(before, keep_last, dry_run)
        files = retention.prune_trace_files(self.project.traces_dir, self.ledger, before,
                                            dry_run)
        if not dry_run:
            self.ledger.reclaim()
            retention.settle(self.ledger, self.huey)
            self.ledger.sync()
        return {**dataclasses.asdict(done), "trace_files": files, "dry_run": dry_run,
                "before": iso(dt.datetime.fromtimestamp(before, dt.UTC))}

    def _retain(self) -> None:
        """A consumer's step of retention (see `runex.retention`)."""
        retention.step(self.ledger, self.huey, self.project)

    def doctor(self) -> list[Finding]:
        """What is wrong with this installation: the home, extensions, pipeline files,
        consumers, attempts that lost their worker, storage, the clock (see `runex.doctor`)."""
        return examine(self)

    def backup(self, path: str | os.PathLike) -> dict[str, Any]:
        """A consistent copy of the ledger (every run, attempt, schedule and fire) in `path`,
        made while workers run. The queue is not copied: what it held is in the ledger, and
        a consumer queues it again."""
        target = Path(path).absolute()
        if target.is_dir():
            raise RunexError(f"{path} is a folder; give the file to write the backup to")
        try:
            make_dirs(target.parent)
            self.ledger.backup(target)
        except OSError as exc:
            raise StorageError(f"cannot write the backup {target} ({exc}); check that "
                               f"{target.parent} is writable and has room") from exc
        runs = self.ledger.runs(1)
        return {"path": str(target), "bytes": target.stat().st_size,
                "newest_run": runs[0]["id"] if runs else None}

    def show(self, ref: str) -> Run:
        """A run, with counts of its partitions by status; its `partitions`, with their
        attempts, are read from the ledger as they are used. `to_dict()` is what `runex show
        --json` prints."""
        run = self.ledger.run(self.ledger.resolve_run_id(ref))
        run_id = run["id"]
        spec = json.loads(run.pop("spec"))
        _public(run)
        run["counts"] = self.ledger.progress(run_id)

        def fetch(after: int = -1, limit: int | None = None, status: str | None = None,
                  unsettled: bool = False) -> list[dict[str, Any]]:
            rows = self.ledger.partitions(run_id, after, limit, status, unsettled)
            if not rows:
                return []
            attempts: dict[int, list[dict[str, Any]]] = {}
            for a in self.ledger.attempts(run_id, [p["idx"] for p in rows]):
                attempts.setdefault(a.pop("idx"), []).append(_with_seconds(a))
                a["steps"] = steps_of(a["steps"], spec)
                del a["run_id"]
            return [{"index": p["idx"], "key": json.loads(p["key"]), "status": p["status"],
                     "attempts": attempts.get(p["idx"], []), "records_in": p["records_in"],
                     "records_out": p["records_out"], "error": p["error"],
                     "seconds": _with_seconds(p)["seconds"]} for p in rows]

        return Run.from_ledger({**_with_seconds(run), "spec": spec}, fetch)


@dataclasses.dataclass
class Replay:
    """A partition of a run replayed with today's code (see `Runex.replay`)."""

    run_id: str
    index: int
    key: Any
    plan: Plan
    project_dir: Path
    run_code_version: str | None  # None: the run was submitted before runex recorded it
    code_version: str
    files_changed: list[str] | None  # the files of its code that differ from the run's

    def records(self) -> Iterator[dict[str, Any]]:
        """What the source and the steps make of the partition now; an error of a kernel
        is raised as it was (a debugger stops there)."""
        plan = self.plan
        with chdir(self.project_dir):
            source = plan.source_read(self.key, **plan.source_read_params)
            for batch in stream(source, plan, Stats()):
                yield from batch


def _serve_dashboard(server: Any, parent: int) -> None:
    """A `runex worker --web` dashboard's process: answers until its consumer stops it (or
    dies: the kernel stops it then), leaving Ctrl-C to the consumer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    consumer.start_child(None, parent)
    server.serve_forever()


OPENLINEAGE_PRODUCER = f"urn:runex:{__version__}"
OPENLINEAGE_SCHEMA = "https://openlineage.io/spec/2-0-2/OpenLineage.json"


def _event_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _datasets(step: dict[str, Any], project: Path) -> list[dict[str, str]]:
    """The dataset a source or sink reads or writes, as OpenLineage names them: a file by
    its path (a table of a SQLite file after a `#`), a PostgreSQL table by its server."""
    params = step.get("params") or {}
    if isinstance(params.get("url"), str) and params.get("table"):
        where = urlsplit(params["url"])
        return [{"namespace": f"postgres://{where.hostname}:{where.port or 5432}",
                 "name": f"{where.path.strip('/')}.{params['table']}"}]
    if isinstance(params.get("path"), str):
        path = str((project / params["path"]).resolve())
        table = params.get("table")
        return [{"namespace": "file", "name": f"{path}#{table}" if table else path}]
    return []


def _stamp_of(db: str, table: str | None, rowid: int | None) -> tuple[str, Any]:
    """(run id, partition key) that a row of a sink with `lineage = true` carries: a row of a
    SQLite file by its rowid, of a PostgreSQL table (`db` a URL) by its `id` column."""
    if not table or rowid is None:
        raise UsageError("give the row: --table T --rowid N (with --db PATH or URL)")
    quoted = ".".join('"' + part.replace('"', '""') + '"' for part in table.split("."))
    sql = f"SELECT _runex_run, _runex_partition FROM {quoted} WHERE "
    where = postgres.Database.shown(db) if postgres.is_url(db) else db  # no password
    problem = (f"{where}, table {table!r}: {{}}; rows say where they came from when their "
               "sink has lineage = true")
    if postgres.is_url(db):
        psycopg = postgres.psycopg()
        try:
            with psycopg.connect(db) as conn:
                row = conn.execute(sql + "id = %s", (rowid,)).fetchone()
        except psycopg.Error as exc:
            raise UsageError(problem.format(str(exc).strip())) from None
    else:
        if not Path(db).is_file():
            raise UsageError(f"--db {db}: no such SQLite file")
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                row = conn.execute(sql + "rowid = ?", (rowid,)).fetchone()
        except sqlite3.OperationalError as exc:
            raise UsageError(problem.format(exc)) from None
    if row is None:
        raise NotFound(f"{where}, table {table!r}: no row {rowid}")
    return row[0], json.loads(row[1])


@contextlib.contextmanager
def _listed(keys: Iterator[str], folder: Path) -> Iterator[Iterable[str]]:
    """Every one of `keys` read now, kept in memory if they are few, else in a temporary file
    in `folder` (the home: not /tmp, which may be memory), so that a million is never held."""
    first = list(itertools.islice(keys, LISTED_IN_MEMORY))
    if len(first) < LISTED_IN_MEMORY:
        yield first
        return
    with tempfile.TemporaryFile("w+", dir=folder, encoding="utf-8") as spool:
        try:
            for key in itertools.chain(first, keys):  # JSON text: one line each
                spool.write(key + "\n")
            spool.seek(0)
        except OSError as exc:
            raise StorageError(f"cannot list the partitions in {folder} ({exc}); check that "
                               "it is writable and has room") from exc
        del first
        yield (line[:-1] for line in spool)


def since_time(text: str) -> dt.datetime:
    """A time (see `cron.parse_time`) or a duration back from now (`30m`, `2h`, `7d`)."""
    try:
        return parse_time(text)
    except ScheduleError:
        pass
    try:
        back = parse_duration(text, "--since")
    except PipelineError:
        raise UsageError(f"--since {text!r} is neither a time (2026-11-01, 2026-11-01T06:00) "
                         "nor a duration back from now (30m, 2h, 7d)") from None
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=back)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A run's row as commands show it: without who finalizes it and until when (the
    workers' business), its `code` as an object."""
    del row["finalizer"], row["finalizer_until"]
    row["code"] = row["code"] and json.loads(row["code"])
    return row


def _with_seconds(row: dict[str, Any]) -> dict[str, Any]:
    start, end = row.get("started_at"), row.get("finished_at")
    row["seconds"] = round((end or time.time()) - start, 3) if start else None
    return row
