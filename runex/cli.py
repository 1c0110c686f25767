"""The `runex` command: parse, call one `Runex` method, print. Errors become messages here."""

from __future__ import annotations

import datetime
import gc
import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from runex import errors
from runex.runs import PARTITION_STATUSES
from runex.runs import TERMINAL as TERMINAL_RUN

if TYPE_CHECKING:
    from runex.app import Runex


class Group(click.Group):
    """Turns runex's own errors into a one-line message and a named exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.RunexError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:  # `runex trace RUN | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing at exit
            ctx.exit(errors.EXIT_PIPE_CLOSED)
        except KeyboardInterrupt:  # a second Ctrl-C: one line, not a traceback
            click.echo("\ninterrupted: stopped at once; `runex runs` tells what is left, and "
                       "`runex worker` goes on with it", err=True)
            ctx.exit(errors.EXIT_INTERRUPTED)


def project_options(fn: Callable) -> Callable:
    fn = click.option("--home", envvar="RUNEX_HOME", type=click.Path(file_okay=False),
                      help="The data folder (queue, ledger, traces). Env: RUNEX_HOME. "
                           "Default: .runex in the project folder.")(fn)
    fn = click.option("-e", "--extensions", "extension_dirs", multiple=True,
                      type=click.Path(file_okay=False),
                      help="Another extension folder to load (repeatable). "
                           "Env: RUNEX_EXTENSIONS, separated by ':'.")(fn)
    fn = click.option("--database", metavar="URL", expose_value=False, callback=_database,
                      help="The queue and ledger in PostgreSQL (postgresql://user@host/db), "
                           "for workers on several hosts. Env: RUNEX_DATABASE. Default: "
                           "`database` in runex.toml, else SQLite in the home.")(fn)
    return fn


def _database(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta["runex.database"] = value  # read by `open_runex` (RUNEX_DATABASE by open_project)


def worker_options(fn: Callable) -> Callable:
    fn = click.option("--profile", help="A worker profile: workers/NAME.toml, or built-in "
                                        "'default' and 'raspberry-pi'.")(fn)
    fn = click.option("-w", "--workers", type=click.IntRange(1),
                      help="Worker processes. Default: every core.")(fn)
    return fn


def log_options(fn: Callable) -> Callable:
    fn = click.option("-q", "--quiet", is_flag=True,
                      help="No log lines on stderr but what must be acted on (a full disk); "
                           "traces are still written.")(fn)
    fn = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                      default="info", show_default=True,
                      help="The least level logged on stderr; debug adds every partition "
                           "and step.")(fn)
    fn = click.option("--log-format", type=click.Choice(["console", "logfmt", "json"]),
                      help="How log lines look. Default: console on a terminal, logfmt (one "
                           "line per event, for journald) otherwise.")(fn)
    return fn


def open_runex(home: str | None, extension_dirs: tuple[str, ...]) -> Runex:
    from runex.app import Runex  # here, so that `runex --help` does not load the runtime

    # RUNEX_HOME is read by click into `home`; RUNEX_EXTENSIONS by open_project.
    ctx = click.get_current_context(silent=True)
    database = ctx.meta.get("runex.database") if ctx is not None else None
    return Runex(home=home, extensions=extension_dirs, database=database)


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def dump_each(items: Iterable[Any]) -> None:
    """A JSON list, an item at a time as they come."""
    click.echo("[", nl=False)
    for i, item in enumerate(items):
        click.echo(("," if i else "") + "\n  " + json.dumps(item, default=str), nl=False)
    click.echo("\n]")


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [headers] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def report_load_errors(rx: Runex, verbose: bool, label: str = "warning",
                       color: str = "yellow") -> None:
    for error in rx.load_errors:
        click.secho(f"{label}: {error}", fg=color, err=True)
        if verbose and getattr(error, "traceback", None):
            click.echo(error.traceback, err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runex")
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks and debug traces.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """runex runs data pipelines on this machine: a source, kernels, a sink, split into
    partitions that worker processes take from a SQLite queue.

    Exit codes: 0 ok; 1 the run failed or was cancelled; 2 bad command line; 3 invalid
    pipeline, extension or config; 4 no such run; 5 the data folder cannot be written
    (disk full, read-only); 130 interrupted; 141 the output's reader went away.
    """
    ctx.obj = {"verbose": verbose}


PARAM_HELP = "Override a pipeline value: key.path=value, e.g. source.path=data/x.csv (repeatable)."


@cli.command()
@click.argument("folder", default=".", type=click.Path(file_okay=False, path_type=Path))
def init(folder: Path) -> None:
    """Scaffold a project in FOLDER: runex.toml, extensions/, pipelines/, data/, workers/."""
    from runex.project import init_project

    folder.mkdir(parents=True, exist_ok=True)
    written = init_project(folder)
    for path in written:
        click.echo(f"created {path}")
    if not written:
        click.echo(f"{folder} already has every file of a project; nothing written")
    go = "" if folder.resolve() == Path.cwd().resolve() else f"cd {folder} && "
    click.echo(f"next: {go}runex run pipelines/example.toml")


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("-p", "--param", "params", multiple=True, help=PARAM_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the run id as JSON.")
@project_options
@click.pass_context
def submit(ctx: click.Context, pipeline: str, params: tuple[str, ...], as_json: bool,
           home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """Check PIPELINE and queue a run of it; print the run id. `runex worker` runs it."""
    rx = open_runex(home, extension_dirs)
    rx.trace_to_home(console=False)
    report_load_errors(rx, ctx.obj["verbose"])
    run_id = rx.submit(pipeline, params)
    dump({"run_id": run_id}) if as_json else click.echo(run_id)


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("-p", "--param", "params", multiple=True, help=PARAM_HELP)
@click.option("--changed", is_flag=True, help="Incremental: skip the partitions whose input, "
              "code and parameters are those of their last commit (options.incremental).")
@worker_options
@log_options
@project_options
@click.pass_context
def run(ctx: click.Context, pipeline: str, params: tuple[str, ...], changed: bool,
        workers: int | None, profile: str | None, log_format: str | None, log_level: str,
        quiet: bool, home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """Submit PIPELINE and process it here with worker processes until the run ends.

    Exits 0 when the run succeeded, 1 when it failed or was cancelled."""
    if changed:
        params = (*params, "options.incremental=true")
    rx = open_runex(home, extension_dirs)
    rx.trace_to_home(console=not quiet, verbose=ctx.obj["verbose"], log_format=log_format,
                     log_level=log_level)
    if quiet:  # else the log says so (`extension.failed`)
        report_load_errors(rx, ctx.obj["verbose"])
    started = time.monotonic()
    progress = Progress() if sys.stderr.isatty() else None
    if progress:  # a log line first clears the bar's line; the bar is drawn again after it
        from runex.trace import before_each_line

        before_each_line("\r\x1b[K")
    try:
        result = rx.run(pipeline, params, workers=workers, profile=profile, on_progress=progress)
    finally:  # an error (a full disk) is printed below the bar, not over it
        if progress:
            progress.done()
    print_summary(result.summary(), time.monotonic() - started)
    if not result.over:
        click.echo(f"interrupted: the run goes on with `runex worker`; "
                   f"`runex show {result.id}` tells how far it got", err=True)
        ctx.exit(errors.EXIT_INTERRUPTED)
    ctx.exit(errors.EXIT_OK if result.status == "succeeded" else errors.EXIT_RUN_FAILED)


class Progress:
    """One line on the terminal: a bar of finished partitions and counts by status."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, counts: dict[str, int]) -> None:
        total = sum(counts.values())
        done = sum(counts.get(s, 0) for s in ("succeeded", "skipped", "failed", "cancelled"))
        width = 30
        filled = width * done // total if total else width
        extra = "".join(f"  {counts[s]} {s}" for s in ("running", "failed") if counts.get(s))
        line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} partitions"
                f"{extra}  {time.monotonic() - self.start:.1f}s")
        click.echo(line, nl=False, err=True)
        self.shown = True

    def done(self) -> None:
        if self.shown:
            click.echo("", err=True)


def print_summary(run: dict[str, Any], seconds: float) -> None:
    parts = run["counts"]
    color = {"succeeded": "green", "failed": "red"}.get(run["status"], "yellow")
    click.echo(f"run {run['id']} ({run['pipeline']}): "
               + click.style(run["status"], fg=color) + f" in {seconds:.2f}s")
    click.echo(f"  partitions: {sum(parts.values())} ("
               + ", ".join(f"{n} {s}" for s, n in sorted(parts.items())) + ")")
    if run["status"] in TERMINAL_RUN:
        click.echo(f"  records: {run['records_in'] or 0} in, {run['records_out'] or 0} out")
    sink = run["spec"]["sink"]
    where = ", ".join(f"{k}={v}" for k, v in sink["params"].items() if v is not None)
    click.echo(f"  output: sink {sink['use']!r}" + (f" ({where})" if where else ""))
    if run["error"]:
        click.echo(f"  error: {run['error']}")
    click.echo(f"  details: runex show {run['id']}")


@cli.command()
@worker_options
@click.option("--burst", is_flag=True, help="Stop when nothing is queued or running "
                                           "(scheduled pipelines are not fired then).")
@click.option("--no-schedules", is_flag=True, help="Do not fire scheduled pipelines.")
@click.option("--web", "web_address", metavar="[HOST:]PORT",
              help="Serve the dashboard (as `runex web`) from this consumer too.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="With --web: a file holding the secret that requests must carry.")
@click.option("--web-read-only", is_flag=True, help="With --web: show, never act.")
@log_options
@project_options
@click.pass_context
def worker(ctx: click.Context, workers: int | None, profile: str | None, burst: bool,
           no_schedules: bool, web_address: str | None, token_file: str | None,
           web_read_only: bool, log_format: str | None, log_level: str, quiet: bool,
           home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """Process the queue with worker processes, until Ctrl-C (or, with --burst, until it
    is empty), and fire the project's scheduled pipelines when due. Several `runex worker`
    commands on one home share the work and fire each fire time once."""
    rx = open_runex(home, extension_dirs)
    rx.trace_to_home(console=not quiet, verbose=ctx.obj["verbose"], log_format=log_format,
                     log_level=log_level)
    web = None
    if web_address is not None:
        host, _, port = web_address.rpartition(":")
        if not port.isdigit():
            raise errors.UsageError(f"--web {web_address!r}: give PORT or HOST:PORT "
                                    "(8765, 0.0.0.0:8765, [::1]:8765)")
        web = {"host": host.strip("[]") or "127.0.0.1", "port": int(port),
               "token": read_token(token_file), "read_only": web_read_only}
    rx.work(workers, profile, burst=burst, schedules=not no_schedules, web=web)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def schedules(as_json: bool, home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """List the scheduled pipelines (pipelines/*.toml with a schedule or every): their next
    fire times, their last fire and its run, and the files that have errors."""
    rows = open_runex(home, extension_dirs).schedules()
    if as_json:
        dump(rows)
        return
    table([[r.get("pipeline"), r.get("schedule"), r.get("timezone"),
            "paused" if r.get("paused") else ", ".join(r.get("next", [])[:2]) or None,
            (f"{r['last']['fire_time']} {r['last']['run_status'] or r['last']['status']}"
             if r.get("last") else None)] for r in rows if not r["error"]],
          ["PIPELINE", "SCHEDULE", "TZ", "NEXT", "LAST"])
    for r in rows:
        if r["error"]:
            click.secho(f"error: {r['error']}", fg="red", err=True)


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--from", "start", required=True, help="First fire time: 2026-11-01 or "
                                                     "2026-11-01T06:00 (UTC unless an offset).")
@click.option("--to", "end", help="Last fire time, included. Default: now.")
@click.option("--force", is_flag=True, help="Run fire times whose run succeeded again.")
@click.option("--no-wait", is_flag=True, help="Only queue the runs; `runex worker` runs them.")
@worker_options
@log_options
@project_options
@click.pass_context
def backfill(ctx: click.Context, pipeline: str, start: str, end: str | None, force: bool,
             no_wait: bool, workers: int | None, profile: str | None, log_format: str | None,
             log_level: str, quiet: bool, home: str | None,
             extension_dirs: tuple[str, ...]) -> None:
    """One run per fire time of a scheduled PIPELINE in a range, in order; fire times whose
    run succeeded are skipped unless --force. Then process them here, as `run` does.

    Exits 0 when every run of the range succeeded."""
    from runex.cron import parse_time

    rx = open_runex(home, extension_dirs)
    rx.trace_to_home(console=not (quiet or no_wait), verbose=ctx.obj["verbose"],
                     log_format=log_format, log_level=log_level)
    report_load_errors(rx, ctx.obj["verbose"])
    try:
        first = parse_time(start)
        last = parse_time(end) if end else datetime.datetime.now(datetime.UTC)
    except errors.ScheduleError as exc:
        raise click.BadParameter(str(exc)) from None
    tty = sys.stderr.isatty()

    def fired(f: dict[str, Any]) -> None:
        note = "queued" if f["submitted"] else f"left alone: {f['status']}"
        click.echo(f"{f['fire_time']}  run {f['run_id']}  {note}")

    def progress(over: int, total: int) -> None:
        click.echo(f"\r{over}/{total} runs over", nl=False, err=True)

    if tty and not no_wait:  # a log line first clears the progress line
        from runex.trace import before_each_line

        before_each_line("\r\x1b[K")
    fires = rx.backfill(pipeline, first, last, force, wait=not no_wait, workers=workers,
                        profile=profile, on_progress=progress if tty else None, on_fire=fired)
    if tty and not no_wait and fires:
        click.echo("", err=True)
    click.echo(f"{sum(f['submitted'] for f in fires)} of {len(fires)} fire times queued")
    if no_wait or not fires:
        return
    final = [f["status"] for f in fires]
    click.echo(", ".join(f"{final.count(s)} {s}" for s in sorted(set(final))))
    ctx.exit(errors.EXIT_OK if set(final) == {"succeeded"} else errors.EXIT_RUN_FAILED)


@cli.command()
@click.option("-n", "--limit", default=20, show_default=True, help="How many runs, newest first.")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed",
                                             "cancelled"]), help="Only runs in this status.")
@click.option("--pipeline", help="Only runs of this pipeline (its name).")
@click.option("--since", help="Only runs created since: 2026-11-01, 2026-11-01T06:00 (UTC "
                              "unless an offset), or a duration back from now: 30m, 2h, 7d.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def runs(limit: int, status: str | None, pipeline: str | None, since: str | None,
         as_json: bool, home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """List runs, newest first: status, partitions, records written, when created and for
    which fire time, how long each took, and the first error of a failed one."""
    rows = open_runex(home, extension_dirs).runs(limit, status, pipeline, since)
    if as_json:
        dump(rows)
        return
    table([[r["id"], r["pipeline"], r["status"], r["partition_count"], r["records_out"],
            when(r["created_at"]), r["scheduled_for"],
            f"{r['seconds']:.2f}s" if r["finished_at"] and r["seconds"] is not None else None,
            shorten(r["error"])]
           for r in rows],
          ["RUN", "PIPELINE", "STATUS", "PARTITIONS", "RECORDS OUT", "CREATED", "FIRE TIME",
           "TOOK", "ERROR"])


def shorten(text: str | None, width: int = 60) -> str | None:
    if text is None:
        return None
    line = text.splitlines()[0] if text else text
    return line if len(line) <= width else line[:width - 1] + "…"


SHOWN = 50  # partitions listed by `runex show` without --partitions: all of a run this small


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--partitions", "listed", is_flag=True,
              help=f"List every partition (by default: all of a run of up to {SHOWN}, else "
                   "those that did not succeed, up to 20).")
@click.option("--status", type=click.Choice(PARTITION_STATUSES),
              help="List only the partitions with this status.")
@click.option("--after", type=int, default=-1, metavar="INDEX",
              help="List from the partition after this index: the next page.")
@click.option("--limit", type=click.IntRange(1), help="List at most this many partitions.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: the run and its partitions (all, unless filtered), streamed.")
@project_options
@click.pass_context
def show(ctx: click.Context, run_ref: str, listed: bool, status: str | None, after: int,
         limit: int | None, as_json: bool, home: str | None,
         extension_dirs: tuple[str, ...]) -> None:
    """Show a run: status, counts of partitions by status, partitions with their attempts,
    errors with tracebacks. A run of a million partitions answers at once: its partitions
    are listed only when asked, a page at a time.

    RUN is a run id, a unique prefix of one, or `last`."""
    run = open_runex(home, extension_dirs).show(run_ref)
    data = run.summary()
    if as_json:  # one partition at a time, never the whole run in memory
        for text in run.json_text(status, after, limit):
            click.echo(text, nl=False)
        return
    click.echo(f"run {data['id']}  pipeline {data['pipeline']}  status {data['status']}")
    counts = data["counts"]
    if data["status"] in TERMINAL_RUN:
        took = f"finished {when(data['finished_at'])}  took {data['seconds']}s"
    elif counts.get("running"):
        took = f"running for {data['seconds']}s"
    else:  # queued, waiting for a retry, or its consumer was stopped
        took = "not finished, and nothing is running it now (`runex worker` goes on with it)"
    click.echo(f"created {when(data['created_at'])}  started {when(data['started_at'])}  "
               + took)
    committed = "" if data["status"] in TERMINAL_RUN else " so far"
    click.echo(f"records {data['records_in']} in, {data['records_out']} out{committed}")
    click.echo(f"partitions {data['partition_count']:,}: "
               + (", ".join(f"{n:,} {s}" for s, n in sorted(counts.items())) or "none"))
    if data["error"]:
        click.echo(f"error: {data['error']}")
    total = len(run.partitions)
    everything = listed or status is not None or after >= 0 or limit is not None
    if everything or total <= SHOWN:
        parts = run.partitions.where(status, after=after, limit=limit)
        note = ""
    else:
        unsettled = total - counts.get("succeeded", 0) - counts.get("skipped", 0)
        parts = run.partitions.where(unsettled=True, limit=20) if unsettled else iter(())
        note = (f"({min(unsettled, 20):,} of {total:,} partitions shown: those that did not "
                "succeed; `--partitions` lists them all, `--status failed` the failed ones)")
    show_partitions(ctx, parts)
    if note:
        click.echo(f"\n{note}")


def last_attempt(p: Any, *fields: str) -> list[Any]:
    """`fields` of a partition's latest attempt (None each, before its first)."""
    attempt = p.attempts[-1] if p.attempts else {}
    return [attempt.get(f) for f in fields]


def show_partitions(ctx: click.Context, parts: Iterator[Any]) -> None:
    """The partitions as a table, then the errors of their attempts, a page at a time."""
    page: list[Any] = []
    for p in itertools.chain(parts, [None]):
        if p is not None:
            page.append(p)
        if len(page) < 1000 and (p is not None or not page):
            continue
        click.echo("")
        table([[p.index, json.dumps(p.key), p.status, len(p.attempts), p.records_in,
                p.records_out, p.seconds, *last_attempt(p, "host", "code_version",
                                                         "fingerprint")] for p in page],
              ["#", "KEY", "STATUS", "ATTEMPTS", "IN", "OUT", "SECONDS", "HOST", "CODE",
               "INPUT"])
        for p in page:
            for a in p.attempts:
                if a["error"]:
                    click.echo(f"\npartition {p.index} attempt {a['attempt']} ({a['status']}, "
                               f"pid {a['pid']} on {a['host']}): {a['error']}")
                    if a["traceback"] and (ctx.obj["verbose"] or a is p.attempts[-1]):
                        click.echo(a["traceback"].rstrip())
        page = []


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--openlineage", is_flag=True, help="Print the run as OpenLineage run events "
              "(JSON lines: START, then COMPLETE, FAIL or ABORT).")
@project_options
def trace(run_ref: str, as_json: bool, openlineage: bool, home: str | None,
          extension_dirs: tuple[str, ...]) -> None:
    """The trace events of a run, in time order. RUN: a run id, a prefix, or `last`."""
    if openlineage:
        for event in open_runex(home, extension_dirs).openlineage(run_ref):
            click.echo(json.dumps(event, default=str))
        return
    data = open_runex(home, extension_dirs).trace(run_ref)
    if as_json:
        dump_each(data)
        return
    skip = {"ts", "event", "run_id", "level", "pipeline", "host"}
    for e in data:
        stamp = datetime.datetime.fromtimestamp(e["ts"]).strftime("%H:%M:%S.%f")[:-3]
        rest = " ".join(f"{k}={json.dumps(v)}" for k, v in e.items() if k not in skip)
        click.echo(f"{stamp} {e['event']:<20} {rest}")


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def cancel(run_ref: str, as_json: bool, home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """Cancel a run: queued partitions never start, running ones stop at their next batch.
    RUN: a run id, a prefix, or `last`."""
    rx = open_runex(home, extension_dirs)
    rx.trace_to_home(console=False)
    result = rx.cancel(run_ref)
    if as_json:
        dump(result)
        return
    if result["already_over"]:
        click.echo(f"run {result['run_id']} was already over ({result['status']}); nothing "
                   "to cancel")
        return
    click.echo(f"run {result['run_id']}: {plural(result['cancelled'], 'queued partition')} "
               f"cancelled, {result['running']} running will stop at their next batch; "
               f"status {result['status']}")


@cli.command()
@click.argument("pipeline", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def pause(pipeline: str | None, as_json: bool, home: str | None,
          extension_dirs: tuple[str, ...]) -> None:
    """Pause a scheduled PIPELINE (by name: its fire times are skipped until `resume`), or,
    without one, all work: workers finish what they run and start nothing else."""
    pause_or_resume("pause", pipeline, as_json, home, extension_dirs)


@cli.command()
@click.argument("pipeline", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def resume(pipeline: str | None, as_json: bool, home: str | None,
           extension_dirs: tuple[str, ...]) -> None:
    """Resume a paused scheduled PIPELINE, or, without one, all work."""
    pause_or_resume("resume", pipeline, as_json, home, extension_dirs)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def workers(as_json: bool, home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """The consumers running on this home (every host), and what their workers run now."""
    found = open_runex(home, extension_dirs).workers()
    if as_json:
        dump(found)
        return
    table([[c["host"], c["pid"], c["workers"], when(c["started_at"])]
           for c in found["consumers"]], ["HOST", "PID", "WORKERS", "SINCE"])
    click.echo()
    table([[a["host"], a["pid"], a["run_id"], a["pipeline"], a["idx"], json.dumps(a["key"]),
            a["attempt"], when(a["started_at"])] for a in found["running"]],
          ["HOST", "PID", "RUN", "PIPELINE", "PARTITION", "KEY", "ATTEMPT", "SINCE"])


def pause_or_resume(action: str, pipeline: str | None, as_json: bool, home: str | None,
                    extension_dirs: tuple[str, ...]) -> None:
    rx = open_runex(home, extension_dirs)
    rx.trace_to_home(console=False)
    changed = getattr(rx, action)(pipeline, source="cli")
    if as_json:
        dump({"pipeline": pipeline, action + "d": changed})
        return
    what = f"schedule {pipeline}" if pipeline else "all work"
    click.echo(f"{what} {action}d" if changed else
               f"{what} was {'already paused' if action == 'pause' else 'not paused'}")


@cli.command()
@click.argument("run_ref", metavar="RUN", required=False)
@click.option("--partition", help="With RUN: its key or its index, from `show`.")
@click.option("--db", help="A SQLite file, or a PostgreSQL URL, a sink with lineage = true "
              "wrote into ...")
@click.option("--table", help="... its table ...")
@click.option("--rowid", type=int, help="... and the row: its rowid (SQLite), its id column "
              "(PostgreSQL).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def lineage(run_ref: str | None, partition: str | None, db: str | None, table: str | None,
            rowid: int | None, as_json: bool, home: str | None,
            extension_dirs: tuple[str, ...]) -> None:
    """Where output came from: RUN --partition KEY, or a row (--db PATH --table T --rowid N):
    the run, the attempt that committed it (host, pid, when), its code version and files, the
    fingerprint of the input it read, and the parameters of its source, steps and sink."""
    if db is None and (run_ref is None or partition is None):
        raise errors.UsageError("give RUN --partition KEY, or --db PATH --table T --rowid N")
    found = open_runex(home, extension_dirs).lineage(run_ref, partition, db, table, rowid)
    if as_json:
        dump(found)
        return
    a, p = found["attempt"], found["partition"]
    for label, value in (
            ("run", f"{found['run_id']} ({found['pipeline']}, {found['run_status']})"),
            ("partition", f"{p['index']} {json.dumps(p['key'])} ({p['status']})"),
            ("attempt", f"{a['attempt']} ({a['status']}) on {a['host']}, pid {a['pid']}, "
                        f"ended {when(a['finished_at'])}"),
            ("code version", found["code_version"]),
            ("code files", ", ".join(f"{k} {v}" for k, v in (found["code_files"] or {}).items())
             or None),
            ("input", json.dumps(found["fingerprint"])),
            ("parameters", json.dumps(found["params"]))):
        click.echo(f"{label + ':':<14}{value if value is not None else '-'}")


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--partition", required=True, help="Its key or its index, from `show`.")
@click.option("--limit", type=click.IntRange(0), help="Print the first N records only.")
@click.option("--pdb", "debug", is_flag=True, help="Stop in the debugger where it raises.")
@click.option("--to-sink", is_flag=True, help="Then write it to the run's sink, as a new "
              "attempt of the run (a partition that did not succeed).")
@project_options
@click.pass_context
def replay(ctx: click.Context, run_ref: str, partition: str, limit: int | None, debug: bool,
           to_sink: bool, home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """Run one partition of RUN again in this process, with the run's pipeline and today's
    code, and print the records it makes (JSON lines); nothing is written unless --to-sink.
    Says which files of the code differ from the run's."""
    rx = open_runex(home, extension_dirs)
    replayed = rx.replay(run_ref, partition)
    changed = replayed.files_changed
    click.echo(f"run {replayed.run_id}, partition {replayed.index} "
               f"({json.dumps(replayed.key)}), with today's code ({replayed.code_version}): "
               + ("the run's code was not recorded" if changed is None
                  else "the run's code" if replayed.run_code_version == replayed.code_version
                  else f"the run had {replayed.run_code_version}"
                  + (f"; files changed since: {', '.join(changed)}" if changed else
                     " (the same files: runex or the pipeline differ)")), err=True)
    try:
        for record in itertools.islice(replayed.records(), limit):
            click.echo(json.dumps(record, default=str))
    except Exception:  # shown, or debugged
        click.echo(traceback.format_exc(), err=True, nl=False)
        if debug:
            import pdb  # noqa: PLC0415 - only when asked for

            pdb.post_mortem(sys.exc_info()[2])
        ctx.exit(errors.EXIT_RUN_FAILED)
    if to_sink:
        rx.trace_to_home(console=False)
        part = rx.replay_to_sink(replayed)
        click.echo(f"written to the sink as attempt {part['attempts'][-1]['attempt']}: "
                   f"{part['status']}, {part['records_out']} records"
                   + (f"; {part['error']}" if part["error"] else ""), err=True)
        if part["status"] not in ("succeeded", "skipped"):
            ctx.exit(errors.EXIT_RUN_FAILED)


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--partition", help="Only this partition: its key or its index, from `show`.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def retry(run_ref: str, partition: str | None, as_json: bool, home: str | None,
          extension_dirs: tuple[str, ...]) -> None:
    """Queue again the failed, timed-out, quarantined or cancelled partitions of a run, with a fresh
    retry budget (earlier attempts are kept). `runex worker` then runs them."""
    rx = open_runex(home, extension_dirs)
    rx.trace_to_home(console=False)
    indexes = rx.retry(run_ref, partition)
    if as_json:
        dump({"requeued": indexes})
        return
    click.echo(f"re-queued {plural(len(indexes), 'partition')}: "
               f"{', '.join(map(str, indexes))}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
@click.pass_context
def extensions(ctx: click.Context, as_json: bool, home: str | None,
               extension_dirs: tuple[str, ...]) -> None:
    """List every kernel, source and sink with the file and line it comes from, and the
    extension files that failed to load."""
    rx = open_runex(home, extension_dirs)
    data = rx.extensions()
    if as_json:
        dump(data)
        return
    table([[i["kind"], i["name"] + (" (batch)" if i.get("batch") else ""), i["origin"]]
           for i in data["extensions"]], ["KIND", "NAME", "DEFINED AT"])
    report_load_errors(rx, ctx.obj["verbose"], "error", "red")
    if data["errors"]:
        ctx.exit(errors.EXIT_INVALID)


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("-p", "--param", "params", multiple=True, help=PARAM_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: ok, and the pipeline as it would run, or the error.")
@project_options
@click.pass_context
def validate(ctx: click.Context, pipeline: str, params: tuple[str, ...], as_json: bool,
             home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """Check PIPELINE against the loaded extensions without running it."""
    rx = open_runex(home, extension_dirs)
    if as_json:
        try:
            p = rx.validate(pipeline, params).pipeline
        except errors.RunexError as exc:
            dump({"ok": False, "file": pipeline, "error": str(exc),
                  "extension_errors": [str(e) for e in rx.load_errors]})
            ctx.exit(exc.exit_code)
        dump({"ok": True, "file": pipeline, "pipeline": p.to_dict(),
              "extension_errors": [str(e) for e in rx.load_errors]})
        return
    report_load_errors(rx, ctx.obj["verbose"])
    p = rx.validate(pipeline, params).pipeline
    steps = " -> ".join(s.use for s in p.steps) or "no steps"
    click.echo(f"ok: {pipeline}: source {p.source.use!r} -> {steps} -> sink {p.sink.use!r}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, home: str | None,
           extension_dirs: tuple[str, ...]) -> None:
    """What is wrong with this installation: the home (writable, free space), extension
    and pipeline files that do not load, consumers, attempts whose worker is gone, storage
    sizes, the clock. Exits 1 when something fails."""
    findings = open_runex(home, extension_dirs).doctor()
    if as_json:
        dump([f.to_dict() for f in findings])
    else:
        marks = {"ok": ("ok  ", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "red")}
        for f in findings:
            mark, color = marks[f.status]
            click.echo(click.style(mark, fg=color) + f"  {f.check:<11} {f.detail}")
    if any(f.status == "fail" for f in findings):
        ctx.exit(errors.EXIT_RUN_FAILED)


@cli.command()
@click.option("--older-than", default="30d", show_default=True,
              help="Prune runs that ended longer ago than this: 30d, 12h, 90m.")
@click.option("--keep-last", type=click.IntRange(0), default=0,
              help="Keep the newest N runs whatever their age.")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def prune(older_than: str, keep_last: int, dry_run: bool, as_json: bool, home: str | None,
          extension_dirs: tuple[str, ...]) -> None:
    """Delete finished runs older than --older-than from the ledger (with their partitions,
    attempts and fires) and the trace files of those days, and give the space back to the
    disk. Runs not over, and the fires a schedule needs, are kept. Workers may run meanwhile
    (consumers also prune by themselves: `retain` in runex.toml)."""
    rx = open_runex(home, extension_dirs)
    rx.trace_to_home(console=False)
    done = rx.prune(older_than, keep_last, dry_run)
    if as_json:
        dump(done)
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {plural(done['runs'], 'run')} that ended before {done['before']}: "
               f"{plural(done['partitions'], 'partition')}, "
               f"{plural(done['attempts'], 'attempt')}, {plural(done['fires'], 'fire')}; "
               f"{plural(len(done['trace_files']), 'trace file')}")


@cli.command()
@click.option("--to", "to", required=True, metavar="URL",
              help="The PostgreSQL database: postgresql://user@host:5432/db")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@project_options
def migrate(to: str, as_json: bool, home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """Copy this home's ledger (every run, partition, attempt, schedule and fire) into a
    PostgreSQL database, and queue there what is queued here: to move from one machine to
    several. Stop the consumers first; then set `database` in runex.toml on every host."""
    result = open_runex(home, extension_dirs).migrate(to)
    if as_json:
        dump(result)
        return
    copied = result["copied"]
    click.echo(f"copied {plural(copied['runs'], 'run')} "
               f"({plural(copied['partitions'], 'partition')}, "
               f"{plural(copied['attempts'], 'attempt')}, {plural(copied['fires'], 'fire')}) "
               f"from {result['from']} to {result['to']}; "
               f"{plural(result['queued_partitions'], 'partition')} queued there")
    click.echo(f'next: database = "{to}" in runex.toml (or RUNEX_DATABASE) on every host; '
               f"{result['from']} stays, unused from then on")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on; other than loopback, it needs --token-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="The port (0: any free one, printed).")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="A file holding a secret that requests must carry (Authorization: Bearer "
                   "TOKEN, or ?token=TOKEN once).")
@click.option("--read-only", is_flag=True, help="Show, never act: no cancel or retry buttons.")
@project_options
def web(host: str, port: int, token_file: str | None, read_only: bool, home: str | None,
        extension_dirs: tuple[str, ...]) -> None:
    """Serve the ledger's runs, schedules and Prometheus metrics over HTTP until Ctrl-C:
    pages (with cancel and retry buttons), /api/... (JSON, as the commands' --json) and
    /metrics."""
    server = open_runex(home, extension_dirs).web(host, port, read_token(token_file),
                                                  read_only).server()
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"runex web on http://{shown}:{server.server_port}/ (Ctrl-C stops it)",
               err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # how it is stopped
        pass
    finally:
        server.server_close()


def read_token(token_file: str | None) -> str | None:
    if not token_file:
        return None
    token = Path(token_file).read_text().strip()
    if not token:
        raise errors.UsageError(f"--token-file {token_file}: the file is empty")
    return token


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@project_options
def backup(file: str, home: str | None, extension_dirs: tuple[str, ...]) -> None:
    """Copy the ledger (every run, attempt, schedule and fire) to FILE, consistent and
    synced, while workers run. To restore: stop the workers, copy FILE to the home's
    ledger.db, start them; the queue is rebuilt from the ledger."""
    result = open_runex(home, extension_dirs).backup(file)
    click.echo(f"ledger copied to {result['path']} ({result['bytes']:,} bytes; newest run "
               f"{result['newest_run'] or '-'})")


def main() -> None:
    try:
        cli(prog_name="runex")
    finally:
        # Nothing is left to collect that matters at exit: skipping the collector's passes
        # over every imported module's objects saves about 0.1 s per command.
        gc.freeze()
