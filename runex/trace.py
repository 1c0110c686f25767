"""Execution traces: structlog, configured here and only here.

Every event is written as one JSON line to `RUNEX_HOME/traces/YYYY-MM-DD.jsonl` (UTC), kept
for the ledger (written in the same transaction as the partition or run it belongs to, see
`drain`), and, on a terminal, shown by a readable console renderer. Events are dotted verbs
(`partition.claimed`, `step.finished`, ...), traced per partition and per step, never per record.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from runex.reserve import Reserve, is_disk_full

HOST = socket.gethostname()
# Events not yet in the ledger, as its rows: (ts, run_id, idx, attempt, event, data as JSON).
_pending: list[tuple[Any, ...]] = []
_state: dict[str, Any] = {"dir": None, "fd": None, "until": 0.0, "pid": None,
                         "configured": False, "console": False}


def _stamp(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["ts"] = time.time()
    event["level"] = method
    event.setdefault("pid", os.getpid())
    event.setdefault("host", HOST)
    return event


def _write(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Append the event to today's JSON lines file and keep it for the ledger."""
    data = json.dumps(event, default=str)
    ts = event["ts"]
    _pending.append((ts, event.get("run_id"), event.get("partition_index"),
                     event.get("attempt"), event["event"], data))
    folder = _state["dir"]
    if folder is not None:
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
            # A trace line is not worth stopping work for: it is dropped (the ledger keeps
            # the event). A full disk releases the home's reserve (see runex.reserve).
            if is_disk_full(exc):
                Reserve(Path(folder).parent).release()
    return event


def _drop(logger: Any, method: str, event: dict[str, Any]) -> Any:
    raise structlog.DropEvent


def configure(traces_dir: str | os.PathLike | None, console: bool | None = None,
              verbose: bool = False) -> None:
    """Route events to `traces_dir` (None: nowhere but the ledger) and, when `console` (by
    default: when stderr is a terminal), to stderr for people to read."""
    if console is None:
        console = sys.stderr.isatty()
    _state["dir"], _state["until"] = traces_dir, 0.0  # the next event opens its file there
    _state["configured"] = True
    _state["console"] = console
    last = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console else _drop)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _stamp, _write, last],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def tell_operator(message: str) -> None:
    """A line for the person running runex, on stderr, when the console renderer (which shows
    every event) is off: what they must act on should not hide in a file."""
    if _state["console"] is False:
        print(f"runex: {message}", file=sys.stderr, flush=True)


def reset() -> None:
    """Forget the configuration and pending events (for tests)."""
    if _state["fd"] is not None and _state["pid"] == os.getpid():
        os.close(_state["fd"])
    _state.update(dir=None, fd=None, until=0.0, pid=None, configured=False, console=False)
    _pending.clear()
    structlog.reset_defaults()


def configured() -> bool:
    return _state["configured"]


def logger(**bound: Any) -> Any:
    return structlog.get_logger("runex").bind(**bound)


def drain() -> list[tuple[Any, ...]]:
    """Take the events not yet written to the ledger, as rows of its `events` table."""
    events = _pending[:]
    _pending.clear()
    return events
