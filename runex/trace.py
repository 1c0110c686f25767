"""Execution traces and the operator's log: structlog, configured here and only here.

Events are dotted verbs (`partition.failed`, `step.finished`, ...), traced per partition and
per step, never per record. Each fact is kept once: an event that only restates a row of the
ledger (a run submitted, started or finished, a partition claimed or committed, its steps'
counts and times, a schedule fired: `ROW_FACTS`) is not written again; every other event is
written as one JSON line to `RUNEX_HOME/traces/YYYY-MM-DD.jsonl` (UTC). `runex trace` puts the
two back together.

The operator's log is the same events on stderr, one line each, for the person or the service
manager running runex: a readable console renderer on a terminal, logfmt or JSON lines
otherwise (`journalctl -u runex-worker` shows them). At the default level it shows what an
operator acts on (consumers starting and stopping, runs starting and finishing, failed and lost
partitions, recoveries, schedule fires, disk trouble) and leaves out the per-partition and
per-step events, which `debug` shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from runex import _standing_in

# structlog imports asyncio for its async logging methods only, which runex never calls:
# 7 MiB of memory (asyncio, and ssl with OpenSSL's libraries) in every runex process.
with _standing_in("asyncio"):
    import structlog

from runex.reserve import Reserve, is_disk_full

# This machine's name in the ledger (attempts, consumers); RUNEX_HOST names it otherwise.
HOST = os.environ.get("RUNEX_HOST") or socket.gethostname()
_state: dict[str, Any] = {"dir": None, "fd": None, "until": 0.0, "pid": None,
                         "configured": False, "console": False, "before_line": "",
                         "debug": False}

LOG_FORMATS = ("console", "logfmt", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Events of every partition and step: in the operator's log at `debug` only.
CHATTER = {"partition.claimed", "partition.committed", "step.finished", "run.submitted",
           "extensions.reloaded"}
# Events whose facts the ledger's rows hold: in the operator's log, not in the trace files.
ROW_FACTS = {"run.submitted", "run.started", "run.finished", "partition.claimed",
             "partition.committed", "step.finished", "schedule.fired"}


def _stamp(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["ts"] = time.time()
    event["level"] = method
    event.setdefault("pid", os.getpid())
    event.setdefault("host", HOST)
    return event


def _write(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Append the event to today's JSON lines file, unless the ledger holds its facts."""
    folder = _state["dir"]
    if folder is not None and event["event"] not in ROW_FACTS:
        data = json.dumps(event, default=str)
        ts = event["ts"]
        try:
            if _state["fd"] is None or ts >= _state["until"] or _state["pid"] != os.getpid():
                if _state["fd"] is not None and _state["pid"] == os.getpid():
                    os.close(_state["fd"])
                    _state["fd"] = None
                day = time.strftime("%Y-%m-%d", time.gmtime(ts))
                _state["fd"] = os.open(Path(folder) / f"{day}.jsonl",
                                       os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                _state["until"], _state["pid"] = (ts // 86400 + 1) * 86400, os.getpid()
            os.write(_state["fd"], (data + "\n").encode())
        except OSError as exc:
            # A trace line is not worth stopping work for: it is dropped. A full disk
            # releases the home's reserve (see runex.reserve).
            if is_disk_full(exc):
                Reserve(Path(folder).parent).release()
    return event


def _drop(logger: Any, method: str, event: dict[str, Any]) -> Any:
    raise structlog.DropEvent


def _for_operator(log_format: str, log_level: str) -> Callable[..., Any]:
    """The last processor: the event as one line on stderr, if the operator's level shows
    it, else nothing."""
    least = LOG_LEVELS.index(log_level)
    if log_format == "console":
        render = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                               exception_formatter=structlog.dev.plain_traceback)
    elif log_format == "json":
        render = structlog.processors.JSONRenderer(default=str)
    else:
        render = structlog.processors.LogfmtRenderer(
            key_order=["time", "level", "event"], drop_missing=True, bool_as_flag=False)

    def show(logger: Any, method: str, event: dict[str, Any]) -> Any:
        level = "debug" if event["event"] in CHATTER else method
        if LOG_LEVELS.index(level if level in LOG_LEVELS else "error") >= least:
            line = {k: v for k, v in event.items() if v is not None}
            if log_format == "logfmt":  # lists and dicts as JSON, not Python's repr
                line = {k: json.dumps(v, default=str) if isinstance(v, list | dict) else v
                        for k, v in line.items()}
            if log_format == "console":  # the time first, short: a person reads it
                line.pop("host", None)  # the terminal knows it
                line.pop("ts", None)
                line["timestamp"] = time.strftime("%H:%M:%S", time.localtime(event["ts"]))
            elif log_format == "logfmt":
                line.pop("host", None)  # the journal knows it
                line.pop("ts", None)
                line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S",
                                              time.localtime(event["ts"])), **line}
            text = render(logger, method, line)
            sys.stderr.write(_state["before_line"] + text + "\n")
            sys.stderr.flush()
        raise structlog.DropEvent

    return show


def configure(traces_dir: str | os.PathLike | None, console: bool | None = None,
              verbose: bool = False, log_format: str | None = None,
              log_level: str = "info") -> None:
    """Route events to `traces_dir` (None: to no file) and, when `console`, to
    the operator's log on stderr (by default: when stderr is a terminal) in `log_format`
    (`console` on a terminal, `logfmt` otherwise, or `json`) from `log_level` up."""
    if console is None:
        console = sys.stderr.isatty()
    if log_format is None:
        log_format = "console" if sys.stderr.isatty() else "logfmt"
    _state["dir"], _state["until"] = traces_dir, 0.0  # the next event opens its file there
    _state["configured"] = True
    _state["console"] = console
    _state["debug"] = console and (verbose or log_level == "debug")
    last = _for_operator(log_format, log_level) if console else _drop
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _stamp,
                    structlog.processors.format_exc_info, _write, last],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose or log_level == "debug" else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    _quiet_huey()


def before_each_line(text: str) -> None:
    """Write `text` before each line of the operator's log (`runex run` clears its progress
    bar's line so)."""
    _state["before_line"] = text


class _HueyLog(logging.Handler):
    """huey's own warnings and errors, as runex events; its notices of what runex reports
    itself (a task interrupted by a stop) are left out."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Received exit signal"):  # runex says partition.interrupted
            return
        log = logger()
        (log.error if record.levelno >= logging.ERROR else log.warning)(
            "huey." + record.levelname.lower(), message=message)


def _quiet_huey() -> None:
    huey_log = logging.getLogger("huey")
    huey_log.handlers = [_HueyLog(logging.WARNING)]
    huey_log.propagate = False


def tell_operator(message: str) -> None:
    """A line for the person running runex, on stderr, when the console renderer (which shows
    every event) is off: what they must act on should not hide in a file."""
    if _state["console"] is False:
        print(f"runex: {message}", file=sys.stderr, flush=True)


def reset() -> None:
    """Forget the configuration (for tests)."""
    if _state["fd"] is not None and _state["pid"] == os.getpid():
        os.close(_state["fd"])
    _state.update(dir=None, fd=None, until=0.0, pid=None, configured=False, console=False,
                  before_line="", debug=False)
    structlog.reset_defaults()


def configured() -> bool:
    return _state["configured"]


def debugging() -> bool:
    """Whether the operator's log shows debug events (every partition and step); only then
    are they worth making, as no trace file keeps them (`ROW_FACTS`)."""
    return _state["debug"]


def logger(**bound: Any) -> Any:
    return structlog.get_logger("runex").bind(**bound)


def read(traces_dir: str | os.PathLike, run_id: str, since: float, until: float
         ) -> Iterator[dict[str, Any]]:
    """The events of run `run_id` in the trace files of the days from `since` to `until`."""
    mark = f'"run_id": {json.dumps(run_id)}'
    day = since - since % 86400
    while day <= until:
        path = Path(traces_dir) / time.strftime("%Y-%m-%d.jsonl", time.gmtime(day))
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8",
                                                          errors="replace") as lines:
            for line in lines:
                if mark in line:
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if event.get("run_id") == run_id:
                            yield event
        day += 86400
