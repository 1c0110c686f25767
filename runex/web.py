"""`runex web`: the ledger seen from a browser, as JSON, and as Prometheus metrics.

Served by the standard library's HTTP server: each connection in a thread of its own (a
browser opens some it leaves idle), the answers one at a time (a dashboard's load; the
ledger's connection is used by one request at a time), from the same ledger the commands
read, SQLite or PostgreSQL. Pages are drawn on the server, charts as inline SVG and a run's
partitions as a PNG of one pixel each; every string that comes from users or data is
escaped. The stylesheet and the one small script (a running run's progress, without
reloading) are runex's own, so a page needs nothing from elsewhere and works offline.

Pages read the ledger and the pipeline files; the extensions (the user's code) are loaded
only for the extensions page and for actions, so a schedule's pipeline is not checked
against them here (`runex schedules` does, and consumers log what they cannot fire).

Safe by default: it binds to loopback, where the `Host` header must name loopback too (a page
elsewhere cannot reach it through DNS rebinding); any other address needs a token
(`--token-file`), sent as `Authorization: Bearer TOKEN` or once as `?token=TOKEN`, which sets a
cookie. Reading is GET and writes nothing; acting (cancel a run, retry it or one partition,
run a schedule now, pause or resume a schedule or all work) is POST only, with the form's
CSRF token (made when the server starts), traced with the client's address; `read_only`
refuses every action.
"""

from __future__ import annotations

import datetime as dt
import html
import ipaddress
import itertools
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from runex import __version__, _standing_in, trace

# The HTTP server imports http.client, which imports ssl (and OpenSSL's libraries: 5 MiB) for
# HTTPS connections, which the server never makes.
with _standing_in("ssl"):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from runex.errors import NotFound, UsageError
from runex.metrics import AttemptTotals, consumers_by_host, exposition

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; img-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
COLOURS = {  # a partition's status: its colour in the grid and the stylesheet
    "queued": "#d0d7de", "running": "#0969da", "succeeded": "#2da44e", "skipped": "#9be9a8",
    "failed": "#cf222e",
    "timeout": "#bc4c00", "cancelled": "#8c959f", "quarantined": "#8250df"}
RETRYABLE = ("failed", "timeout", "quarantined", "cancelled")
PAGE = 50  # runs on a page of runs
CHARTED = 60  # the latest runs of each pipeline in its charts
CACHE_KIB = 512  # the ledger's page cache (SQLite's default: 2 MiB)
SHOWN = 200  # partitions on a run's page
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 80em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { text-align: left; padding: .2em .8em .2em 0; border-bottom: 1px solid #ddd;
         vertical-align: top; }
td.n { text-align: right; }
form { display: inline; margin-right: .5em; }
form.filter input, form.filter select { margin-right: .5em; }
.banner { background: #fff8c5; padding: .5em; border: 1px solid #d4a72c; }
.chart { margin-right: 1.5em; }
.chart rect { fill: #0969da; } .chart rect.failed { fill: #cf222e; }
.grid { image-rendering: pixelated; border: 1px solid #ddd; }
.key { display: inline-block; width: .8em; height: .8em; margin: 0 .3em 0 .8em; }
pre { background: #f6f8fa; padding: .6em; overflow: auto; max-height: 30em; }
details summary { cursor: pointer; color: #0969da; }
""" + "".join(f".{name} {{ color: {colour}; }} .key.{name} {{ background: {colour}; }}\n"
              for name, colour in COLOURS.items())
# While a run's page shows a run that is not over: its counts and grid every 2 s, and the
# page again once it is over.
SCRIPT = """
"use strict";
const live = document.getElementById("live");
if (live && live.dataset.over === "0") {
  const grid = document.getElementById("grid");
  const tick = async () => {
    try {
      const answer = await fetch(live.dataset.progress, {credentials: "same-origin"});
      if (answer.ok) {
        const p = await answer.json();
        if (p.over) { location.reload(); return; }
        live.textContent = p.text;
        if (grid) grid.src = grid.dataset.src + "?t=" + Date.now();
      }
    } catch (e) { /* the server is away for a moment: try again */ }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}
"""

Answer = tuple[str, Iterable[str] | bytes]


def same(given: str, secret: str) -> bool:
    """Whether `given` is `secret`, in a time that does not tell how much of it matched."""
    import hmac  # noqa: PLC0415 - it loads OpenSSL's library (3.7 MiB): when first needed

    return hmac.compare_digest(given.encode(), secret.encode())


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard:
    """What `runex web` serves, over a `Runex` (see the module's docstring)."""

    def __init__(self, rx: Any, host: str = "127.0.0.1", port: int = 8765,
                 token: str | None = None, read_only: bool = False):
        if not is_loopback(host) and not token:
            raise UsageError(f"runex web --host {host}: an address other than loopback needs a "
                             "token (--token-file FILE, a file holding a secret of your own)")
        self.rx, self.host, self.port, self.token = rx, host, port, token
        self.read_only = read_only
        if rx.ledger.engine.name == "sqlite":  # pages read little: a small page cache
            rx.ledger.conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self.csrf = os.urandom(16).hex()  # what every form carries back
        self.lock = threading.Lock()  # one answer at a time
        self.attempts = AttemptTotals()  # for /metrics
        self.routes: list[tuple[str, Callable[[str, dict[str, str]], Answer]]] = [
            ("/api/runs/", self.api_run), ("/api/runs", self.api_runs),
            ("/api/schedules", self.api_schedules), ("/api/workers", self.api_workers),
            ("/api/extensions", self.api_extensions), ("/api/overview", self.api_overview),
            ("/metrics", self.metrics), ("/runex.css", self.style), ("/runex.js", self.script),
            ("/favicon.ico", self.icon),
            ("/runs/", self.page_run), ("/runs", self.page_runs),
            ("/schedules", self.page_schedules), ("/workers", self.page_workers),
            ("/extensions", self.page_extensions), ("/", self.page_overview)]

    def server(self) -> ThreadingHTTPServer:
        """The server, bound (port 0: any free one, then `server.server_port`)."""
        dashboard = self

        class Handler(Request):
            pass

        Handler.dashboard = dashboard
        Handler.timeout = 30  # seconds a client may take to send its request

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        return Server((self.host, self.port), Handler)

    # -- data --------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """What the overview shows, as `/api/overview` returns it."""
        ledger = self.rx.ledger
        now = time.time()
        runs: dict[str, dict[str, int]] = {}
        for pipeline, state, n in ledger.runs_by_status(now - 86400):
            runs.setdefault(pipeline, {})[state] = n
        oldest = ledger.oldest_queued()
        minute = int(now // 60)
        ended = ledger.finished_per_minute((minute - 59) * 60)
        return {"paused": self.rx.paused(), "runs_24h": runs,
                "partitions": ledger.partitions_by_status(),
                "partitions_per_minute": [ended.get(m, 0) for m in range(minute - 59,
                                                                         minute + 1)],
                "queue_depth": sum(ledger.queued_counts().values()),
                "oldest_queued_seconds": None if oldest is None else now - oldest,
                "consumers": consumers_by_host(self.rx.workers()["consumers"]),
                "failures": [{"id": r["id"], "pipeline": r["pipeline"], "error": r["error"],
                              "finished_at": r["finished_at"]}
                             for r in self.rx.runs(10, status="failed")],
                "schedules": [{"pipeline": s.get("pipeline"), "next": s.get("next", [])[:1],
                               "paused": bool(s.get("paused")), "error": s.get("error")}
                              for s in self.rx.schedules(check=False)],
                "pipelines": self.pipeline_history(now - 7 * 86400)}

    def pipeline_history(self, since: float) -> dict[str, list[dict[str, Any]]]:
        """Each pipeline's runs over since `since` (the latest `CHARTED`): when each ended,
        how long it took, its records per second."""
        history: dict[str, list[dict[str, Any]]] = {}
        for r in self.rx.ledger.runs_over(since, CHARTED * 10):
            seconds = max(r["finished_at"] - r["started_at"], 1e-6)
            history.setdefault(r["pipeline"], []).append(
                {"id": r["id"], "status": r["status"], "finished_at": r["finished_at"],
                 "seconds": seconds, "records_per_second": (r["records_out"] or 0) / seconds})
        return {name: runs[-CHARTED:] for name, runs in history.items()}

    def run_query(self, query: dict[str, str]) -> list[dict[str, Any]]:
        """The runs a page of runs shows: `pipeline`, `status`, `since`, `offset`."""
        return self.rx.runs(PAGE, query.get("status") or None, query.get("pipeline") or None,
                            query.get("since") or None, int(query.get("offset") or 0))

    # -- JSON --------------------------------------------------------------------------

    def api_runs(self, rest: str, query: dict[str, str]) -> Answer:
        return as_json(self.run_query(query))

    def api_run(self, rest: str, query: dict[str, str]) -> Answer:
        """A run as `runex show --json` prints it; `RUN/progress`: its counts now (what the
        page's script reads); `RUN/trace`: its events as `runex trace --json`."""
        ref, _, part = rest.partition("/")
        if part == "progress":
            run = self.rx.show(ref)
            return as_json({"status": run.status, "over": run.over, "counts": run.counts,
                            "text": progress_text(run)})
        if part == "trace":
            events = self.rx.trace(ref)
            return "application/json", itertools.chain(
                ["["], (("," if i else "") + "\n  " + json.dumps(ev, default=str)
                        for i, ev in enumerate(events)), ["\n]\n"])
        if part:
            raise NotFound(f"no page /api/runs/{rest}")
        return "application/json", self.rx.show(ref).json_text()

    def api_schedules(self, rest: str, query: dict[str, str]) -> Answer:
        return as_json(self.rx.schedules(check=False))

    def api_workers(self, rest: str, query: dict[str, str]) -> Answer:
        return as_json(self.rx.workers())

    def api_extensions(self, rest: str, query: dict[str, str]) -> Answer:
        return as_json(self.rx.extensions())

    def api_overview(self, rest: str, query: dict[str, str]) -> Answer:
        return as_json(self.overview())

    # -- actions -----------------------------------------------------------------------

    def act(self, path: str, form: dict[str, str], client: str) -> str:
        """Do what a form posted to `path` asks: `/runs/RUN/cancel`, `/runs/RUN/retry` (a
        `partition` field: that one only), `/schedules/PIPELINE/run`, `.../pause`,
        `.../resume`, `/work/pause`, `/work/resume`. Returns where to go next."""
        if self.read_only:
            raise PermissionError("this dashboard is read-only (runex web --read-only)")
        if not same(form.get("csrf", ""), self.csrf):
            raise PermissionError("the form's CSRF token is missing or stale: reload the page")
        parts = [unquote(part) for part in path.strip("/").split("/")]
        source = f"web {client}"
        rx = self.rx
        rx.ensure_trace()
        match parts:
            case ["runs", ref, ("cancel" | "retry") as action]:
                run_id = rx.ledger.resolve_run_id(ref)
                partition = form.get("partition") or None
                trace.logger(run_id=run_id).info("web.acted", action=action, source="web",
                                                 client=client, partition=partition)
                if action == "cancel":
                    rx.cancel(run_id)
                else:
                    rx.retry(run_id, int(partition) if partition else None)
                return f"/runs/{run_id}"
            case ["schedules", name, ("run" | "pause" | "resume") as action]:
                trace.logger(pipeline=name).info("web.acted", action=action, source="web",
                                                 client=client)
                if action == "run":
                    return f"/runs/{rx.submit(self.pipeline_file(name))}"
                getattr(rx, action)(name, source=source)
                return "/schedules"
            case ["work", ("pause" | "resume") as action]:
                trace.logger().info("web.acted", action=f"{action} all work", source="web",
                                    client=client)
                getattr(rx, action)(None, source=source)
                return form.get("back") if form.get("back") in ("/", "/schedules") else "/"
        raise NotFound(f"no action {path}")

    def pipeline_file(self, name: str) -> Any:
        """The file of the scheduled pipeline `name` (what "run now" submits)."""
        for entry in self.rx.scheduler().scan():
            if entry.pipeline is not None and entry.pipeline.name == name:
                return entry.path
        raise NotFound(f"no pipeline file of {name!r}; `runex schedules` lists them")

    def form(self, action: str, label: str, **fields: Any) -> str:
        """A button that posts to `action`, or nothing in a read-only dashboard."""
        if self.read_only:
            return ""
        hidden = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">'
                         for k, v in {"csrf": self.csrf, **fields}.items())
        return (f'<form method="post" action="{e(action)}">{hidden}'
                f"<button>{e(label)}</button></form>")

    def pause_banner(self, paused: dict[str, Any], back: str) -> str:
        """That all work is paused, since when and by whom, and the button to pause or
        resume it."""
        pause = paused["all"]
        if pause is None:
            return f"<p>{self.form('/work/pause', 'pause all work', back=back)}</p>"
        return (f'<p class="banner">All work is paused since {e(clock(pause["paused_at"]))} '
                f"(by {e(pause['source'])}): workers finish what they run and start nothing "
                f"else. {self.form('/work/resume', 'resume all work', back=back)}</p>")

    # -- Prometheus --------------------------------------------------------------------

    def metrics(self, rest: str, query: dict[str, str]) -> Answer:
        """Prometheus' text format, computed from the ledger now (see `runex.metrics`)."""
        return "text/plain; version=0.0.4; charset=utf-8", [
            exposition(self.rx, self.attempts)]

    # -- pages -------------------------------------------------------------------------

    def style(self, rest: str, query: dict[str, str]) -> Answer:
        return "text/css; charset=utf-8", [STYLE]

    def script(self, rest: str, query: dict[str, str]) -> Answer:
        return "text/javascript; charset=utf-8", [SCRIPT]

    def icon(self, rest: str, query: dict[str, str]) -> Answer:
        """runex's icon: a grid of partitions."""
        return "image/png", png(4, bytes([3, 3, 3, 2, 3, 3, 4, 1, 3, 2, 1, 1, 1, 1, 1, 1]),
                                ["#ffffff", *COLOURS.values()])

    def page_overview(self, rest: str, query: dict[str, str]) -> Answer:
        if rest:
            raise NotFound(f"no page /{rest}")
        o = self.overview()
        statuses = sorted({s for counts in o["runs_24h"].values() for s in counts})
        per_minute = o["partitions_per_minute"]
        charts = [f"<tr><td>{link(f'/runs?pipeline={quote(name)}', name)}</td><td>"
                  + bars([r["seconds"] for r in runs], "seconds", runs)
                  + "</td><td>" + bars([r["records_per_second"] for r in runs],
                                        "records per second", runs) + "</td></tr>"
                  for name, runs in o["pipelines"].items()]
        body = ["<h1>runex</h1>", self.pause_banner(o["paused"], "/"),
                f"<p id=\"summary\">Queue: {num(o['queue_depth'])} partitions"
                + (f", the oldest waiting {duration(o['oldest_queued_seconds'])}"
                   if o["oldest_queued_seconds"] is not None else "")
                + ". Consumers: "
                + (", ".join(f"{e(h)} {n}" for h, n in o["consumers"].items()) or "none")
                + f" ({link('/workers', 'workers')}).</p>",
                f"<h2>Partitions ended per minute, the last hour ({sum(per_minute):,})</h2>",
                bars(per_minute, "partitions", width=600) + "<br><small>an hour ago"
                "&emsp;…&emsp;now</small>",
                "<h2>Runs of the last 24 hours</h2>",
                table(["pipeline", *statuses],
                      [[link(f"/runs?pipeline={quote(p)}", p),
                        *(link(f"/runs?pipeline={quote(p)}&status={s}", f"{counts[s]:,}")
                          if counts.get(s) else "" for s in statuses)]
                       for p, counts in o["runs_24h"].items()]),
                "<h2>Pipelines over the last 7 days</h2>",
                "<table><tr><th>pipeline</th><th>how long each run took</th><th>records per "
                "second</th></tr>" + "".join(charts) + "</table>" if charts else "<p>None.</p>",
                "<h2>Recent failures</h2>",
                table(["run", "pipeline", "ended", "first error"],
                      [[link(f"/runs/{f['id']}", f["id"]), e(f["pipeline"]),
                        e(clock(f["finished_at"])), e(f["error"])] for f in o["failures"]]),
                f"<h2>Next fires ({link('/schedules', 'schedules')})</h2>",
                table(["pipeline", "next", "error"],
                      [[e(s["pipeline"]), "paused" if s["paused"] else e(", ".join(s["next"])),
                        e(s["error"])] for s in o["schedules"]])]
        return page("runex", body)

    def page_runs(self, rest: str, query: dict[str, str]) -> Answer:
        rows = self.run_query(query)
        offset = int(query.get("offset") or 0)
        pipelines = sorted({p for p, _, _ in self.rx.ledger.runs_by_status()})
        chosen = {k: v for k, v in query.items() if k in ("pipeline", "status", "since") and v}

        def options(values: list[str], name: str) -> str:
            return "".join(f'<option{" selected" if query.get(name) == v else ""}>{e(v)}'
                           "</option>" for v in ["", *values])

        pages = [link("/runs?" + urlencode({**chosen, "offset": offset + step}), label)
                 for step, label in ((-PAGE, "newer"), (PAGE, "older"))
                 if offset + step >= 0 and (step < 0 or len(rows) == PAGE)]
        return page("runs", [
            "<h1>Runs</h1>",
            '<form class="filter" method="get" action="/runs">'
            f'pipeline <select name="pipeline">{options(pipelines, "pipeline")}</select>'
            'status <select name="status">'
            f"{options(['queued', 'running', 'succeeded', 'failed', 'cancelled'], 'status')}"
            '</select>created since <input name="since" size="12" placeholder="2h, 7d, '
            f'2026-11-01" value="{e(query.get("since", ""))}"><button>show</button></form>',
            table(["run", "pipeline", "status", "partitions", "records out", "created",
                   "took", "fire time", "error"],
                  [[link(f"/runs/{r['id']}", r["id"]), e(r["pipeline"]), status(r["status"]),
                    num(r["partition_count"]), num(r["records_out"]),
                    e(clock(r["created_at"])), e(duration(r["seconds"])),
                    e(r["scheduled_for"]), e(r["error"])] for r in rows]),
            "<p>" + " ".join(pages) + "</p>"])

    def page_run(self, rest: str, query: dict[str, str]) -> Answer:
        ref, _, part = rest.partition("/")
        if part == "grid.png":
            return self.grid(ref)
        if part == "trace":
            return self.page_trace(ref)
        if part:
            raise NotFound(f"no page /runs/{rest}")
        run = self.rx.show(ref)
        summary = run.summary()
        spec = summary.get("spec") or {}
        everything = query.get("partitions") == "all"
        after = int(query.get("after") or -1)
        shown = list(run.partitions.where(unsettled=not everything, after=after, limit=SHOWN))
        retryable = any(s in run.counts for s in RETRYABLE)
        sink = spec.get("sink") or {}
        size = len(run.partitions)
        body = [f"<h1>Run {e(run.id)}</h1>",
                "" if run.over else self.form(f"/runs/{run.id}/cancel", "cancel the run"),
                self.form(f"/runs/{run.id}/retry", "retry what did not succeed")
                if retryable else "",
                f'<p id="summary">{e(run.pipeline)}: '
                f'<span id="live" data-over="{int(run.over)}" '
                f'data-progress="/api/runs/{e(run.id)}/progress">{e(progress_text(run))}</span>'
                f"; records {num(run.records_in)} in, {num(run.records_out)} out. Created "
                f"{e(clock(run.created_at))}"
                + (f", fire time {e(run.scheduled_for)}" if run.scheduled_for else "")
                + (f", took {e(duration(summary.get('seconds')))}"
                   if summary.get("seconds") is not None else "") + ".</p>",
                f"<p>{e(summary.get('error'))}</p>" if summary.get("error") else "",
                f"<p>Output: sink {e(sink.get('use'))} "
                + e(", ".join(f"{k} = {json.dumps(v)}" for k, v in
                              (sink.get("params") or {}).items())) + "</p>",
                "<h2>Partitions</h2>", grid_image(run.id, size),
                "<p>" + "".join(f'<span class="key {s}"></span>{s}' for s in COLOURS) + "</p>",
                "<h2>" + ("All partitions" if everything else "Partitions that did not succeed")
                + "</h2>",
                table(["index", "key", "status", "attempts"],
                      [[num(p.index), e(json.dumps(p.key)), status(p.status),
                        self.attempts_cell(p)
                        + (self.form(f"/runs/{run.id}/retry", "retry", partition=p.index)
                           if p.status in RETRYABLE else "")]
                       for p in shown]),
                "<p>" + " ".join(
                    [link(f"/runs/{run.id}?partitions=all&after={shown[-1].index}",
                          f"the next {SHOWN}")] if len(shown) == SHOWN else [])
                + " " + (link(f"/runs/{run.id}", "those that did not succeed") if everything
                         else link(f"/runs/{run.id}?partitions=all", "all partitions"))
                + " " + link(f"/runs/{run.id}/trace", "trace events") + " "
                + link(f"/api/runs/{run.id}", "JSON") + "</p>",
                "<h2>Pipeline as submitted</h2>",
                f"<pre>{e(json.dumps(spec, indent=2))}</pre>"]
        return page(f"run {run.id}", body)

    @staticmethod
    def attempts_cell(p: Any) -> str:
        """A partition's attempts: where each ran, how long, how it ended, its error and
        traceback, and the time of each step."""
        lines = []
        for a in p.attempts:
            steps = ", ".join(f"{s['kernel']} {s['seconds']:.3f} s" for s in a.get("steps") or [])
            lines.append(
                f"#{a['attempt']} {e(a['host'])} pid {a['pid']}, {status(a['status'])}"
                + (f" in {e(duration(a['seconds']))}" if a.get("seconds") is not None else "")
                + (f": {e(a['error'])}" if a.get("error") else "")
                + (f"<br><small>code {e(a.get('code_version'))}, input "
                   f"{e(a['fingerprint'])}</small>" if a.get("fingerprint") else "")
                + (f"<br><small>steps: {e(steps)}</small>" if steps else "")
                + (f"<details><summary>traceback</summary><pre>{e(a['traceback'])}</pre>"
                   "</details>" if a.get("traceback") else ""))
        return "<br>".join(lines)

    def grid(self, ref: str) -> Answer:
        """A run's partitions as a PNG, one pixel each in index order, coloured by status."""
        run_id = self.rx.ledger.resolve_run_id(ref)
        size = self.rx.ledger.run(run_id)["partition_count"]
        columns, _ = grid_shape(size)
        palette = list(COLOURS)
        shade = {name: i + 1 for i, name in enumerate(palette)}  # 0: no partition
        cells = bytearray(-(-size // columns) * columns or columns)
        for index, state in self.rx.ledger.partition_statuses(run_id):
            cells[index] = shade.get(state, 0)
        return "image/png", png(columns, cells, ["#ffffff", *COLOURS.values()])

    def page_trace(self, ref: str) -> Answer:
        run_id = self.rx.ledger.resolve_run_id(ref)
        skip = {"ts", "event", "run_id", "level", "pipeline", "host"}
        rows = ("<tr><td>" + e(clock(ev["ts"], True)) + f"</td><td>{e(ev['event'])}</td><td>"
                + e(" ".join(f"{k}={json.dumps(v, default=str)}" for k, v in ev.items()
                             if k not in skip)) + "</td></tr>"
                for ev in itertools.islice(self.rx.trace(run_id), 5000))
        kind, head = page(f"trace of {run_id}", [
            f"<h1>Trace of {link(f'/runs/{run_id}', run_id)}</h1><p>The first 5,000 events; "
            f"all of them: {link(f'/api/runs/{run_id}/trace', 'JSON')}.</p>"
            "<table><tr><th>time</th><th>event</th><th></th></tr>"])
        *start, end = head
        return kind, itertools.chain(start, rows, ["</table>", end])

    def page_schedules(self, rest: str, query: dict[str, str]) -> Answer:
        rows = []
        schedules = self.rx.schedules(check=False)
        for s in schedules:
            if s.get("error"):
                continue
            name = s["pipeline"]
            fires = self.rx.ledger.fires(name, 5)
            paused = s.get("paused")
            rows.append([
                e(name), e(f"{s['schedule']} ({s['timezone'] or 'UTC'})"),
                f"paused since {e(clock(paused['paused_at']))} by {e(paused['source'])}"
                if paused else e(", ".join(s["next"])),
                "<br>".join(f"{e(f['fire_time'])} {status(f['run_status'] or f['status'])}"
                            + (f" {link('/runs/' + f['run_id'], f['run_id'])}"
                               if f["run_id"] else "")
                            + (f": {e(f['reason'])}" if f["reason"] else "") for f in fires),
                self.form(f"/schedules/{quote(name)}/run", "run now")
                + self.form(f"/schedules/{quote(name)}/{'resume' if paused else 'pause'}",
                            "resume" if paused else "pause")])
        errors = [s for s in schedules if s.get("error")]
        return page("schedules", [
            "<h1>Schedules</h1>", self.pause_banner(self.rx.paused(), "/schedules"),
            table(["pipeline", "schedule", "next fires", "last fires", ""], rows),
            "<h2>Pipeline files with errors</h2>" if errors else "",
            table(["file", "error"], [[e(s["file"]), e(s["error"])] for s in errors])
            if errors else ""])

    def page_workers(self, rest: str, query: dict[str, str]) -> Answer:
        found = self.rx.workers()
        running = {(a["host"], a["pid"]): a for a in found["running"]}
        rows = []
        for c in found["consumers"]:
            state = {True: "", False: " (gone)", None: ""}[c["alive"]]
            for i, pid in enumerate(c["worker_pids"] or [None]):
                a = running.pop((c["host"], pid), None)
                rows.append([e(c["host"]) if i == 0 else "",
                             f"{num(c['pid'])}{state}, since {e(clock(c['started_at']))}"
                             if i == 0 else "", num(pid),
                             self.running_cell(a) if a else "idle" if pid else ""])
        return page("workers", [
            "<h1>Workers</h1>",
            table(["host", "consumer", "worker process", "running"], rows),
            "<h2>Other attempts running</h2>" if running else "",
            table(["host", "pid", "running"],
                  [[e(a["host"]), num(a["pid"]), self.running_cell(a)]
                   for a in running.values()]) if running else ""])

    @staticmethod
    def running_cell(a: dict[str, Any]) -> str:
        """What a worker process runs: the run, its partition and attempt, since when."""
        run = link(f"/runs/{a['run_id']}", a["run_id"])
        return (f"{run} {e(a['pipeline'])}, partition {a['idx']} {e(json.dumps(a['key']))}, "
                f"attempt {a['attempt']}, since {e(clock(a['started_at']))}")

    def page_extensions(self, rest: str, query: dict[str, str]) -> Answer:
        found = self.rx.extensions()
        return page("extensions", [
            "<h1>Extensions</h1>",
            f"<p>Loaded from {e(', '.join(found['folders']) or 'no folder')}.</p>",
            table(["kind", "name", "defined at"],
                  [[e(i["kind"]), e(i["name"] + (" (batch)" if i.get("batch") else "")),
                    e(i["origin"])] for i in found["extensions"]]),
            "<h2>Files that failed to load</h2>",
            table(["error"], [[f"<pre>{e(error)}</pre>"] for error in found["errors"]])])


def progress_text(run: Any) -> str:
    """A run's status and counts, as its page shows them (and its script updates)."""
    return (f"{run.status}; partitions "
            + ", ".join(f"{n:,} {s}" for s, n in sorted(run.counts.items())))


def grid_shape(size: int) -> tuple[int, int]:
    """(columns, pixels per cell) of a run's grid: about 600 pixels wide."""
    scale = 12 if size <= 500 else 6 if size <= 5000 else 3 if size <= 50000 else 2
    return max(1, min(size, 600 // scale)), scale


def grid_image(run_id: str, size: int) -> str:
    columns, scale = grid_shape(size)
    rows = -(-size // columns) if size else 0
    src = f"/runs/{run_id}/grid.png"
    return (f'<img id="grid" class="grid" src="{e(src)}" data-src="{e(src)}" '
            f'width="{columns * scale}" height="{max(rows, 1) * scale}" '
            f'alt="{size:,} partitions by status">')


def png(width: int, cells: bytes | bytearray, colours: list[str]) -> bytes:
    """A PNG of `cells` (palette indexes, `width` to a row) in `colours` (#rrggbb)."""
    height = len(cells) // width
    raw = b"".join(b"\0" + bytes(cells[y * width:(y + 1) * width]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", b"".join(bytes.fromhex(c[1:]) for c in colours))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def bars(values: list[float], unit: str, runs: list[dict[str, Any]] | None = None,
         width: int = 300, height: int = 40) -> str:
    """A small bar chart in SVG, drawn here: each value a bar (of a failed run: red), the
    latest on the right, its value on hover."""
    if not values:
        return ""
    top = max(values) or 1
    step = min(width / len(values), 12.0)
    rects = []
    for i, v in enumerate(values):
        h = max(1.0, v / top * height) if v else 0.0
        run = runs[i] if runs else None
        tip = f"{short(v)} {unit}" + (f", run {run['id']} {run['status']}" if run else "")
        failed = ' class="failed"' if run and run["status"] != "succeeded" else ""
        rects.append(f'<rect{failed} x="{width - (len(values) - i) * step:.1f}" '
                     f'y="{height - h:.1f}" width="{max(step - 1, 1):.1f}" height="{h:.1f}">'
                     f"<title>{e(tip)}</title></rect>")
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" '
            f'aria-label="{e(unit)}, at most {short(top)}">{"".join(rects)}</svg>'
            f"<small> at most {short(top)} {e(unit)}</small>")


def short(value: float) -> str:
    """A number for people: 12,345 or 0.0123."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def as_json(data: Any) -> Answer:
    return "application/json", [json.dumps(data, indent=2, default=str)]


def clock(ts: float | None, precise: bool = False) -> str | None:
    """A Unix time as this machine's local time."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts).isoformat(" ", "milliseconds" if precise else
                                                    "seconds")


def duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def e(value: Any) -> str:
    """Any value, escaped for HTML (None: nothing)."""
    return "" if value is None else html.escape(str(value), quote=True)


def num(value: Any) -> str:
    return "" if value is None else f"{value:,}" if isinstance(value, int) else e(value)


def status(value: str) -> str:
    return f'<span class="{e(value)}">{e(value)}</span>'


def link(href: str, text: str) -> str:
    return f'<a href="{e(href)}">{e(text)}</a>'


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A table of cells already made HTML (escaped)."""
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: list[str]) -> tuple[str, list[str]]:
    nav = "".join(link(f"/{name}", name or "overview") for name in
                  ("", "runs", "schedules", "workers", "extensions", "metrics"))
    return "text/html; charset=utf-8", [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}'
        '</title><link rel="stylesheet" href="/runex.css"><link rel="icon" '
        'href="/favicon.ico"><script src="/runex.js" defer></script></head><body>',
        f"<nav>{nav}</nav>", *body,
        f"<footer><small>runex {e(__version__)}</small></footer></body></html>"]


class Request(BaseHTTPRequestHandler):
    """One request to a `Dashboard` (set on the subclass it makes)."""

    dashboard: Dashboard
    server_version = f"runex/{__version__}"

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        with self.dashboard.lock:
            self._get()

    def _get(self) -> None:
        refused = self._refused()
        if refused is not None:
            self._plain(*refused)
            return
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        token = self.dashboard.token
        if "token" in query and token and same(query["token"], token):  # once: the cookie
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Set-Cookie", f"runex_token={token}; HttpOnly; "
                             "SameSite=Strict; Path=/")
            self.send_header("Location", parts.path or "/")
            self._end()
            return
        for prefix, handler in self.dashboard.routes:
            if parts.path == prefix or (prefix.endswith("/") and
                                        parts.path.startswith(prefix)):
                rest = parts.path[len(prefix):].strip("/")
                answer = self._answer(handler, rest, query)
                if answer is None:
                    return
                kind, body = answer
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", kind)
                if isinstance(body, bytes | list):
                    chunks = [body] if isinstance(body, bytes) else [c.encode() for c in body]
                    self.send_header("Content-Length", str(sum(len(c) for c in chunks)))
                else:  # streamed as it is read (a run's partitions): the end closes it
                    chunks = (c.encode() for c in body)
                self._end()
                for chunk in chunks:
                    self.wfile.write(chunk)
                return
        self._plain(HTTPStatus.NOT_FOUND, f"no page {parts.path}")

    def do_POST(self) -> None:  # noqa: N802
        refused = self._refused()
        if refused is not None:
            self._plain(*refused)
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > 4096:
            self._plain(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "a form is a few fields")
            return
        form = {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        with self.dashboard.lock:
            where = self._answer(self.dashboard.act, urlsplit(self.path).path, form,
                                 self.client_address[0])
        if where is None:
            return
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", where)
        self._end()

    def _answer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, or None once its error is answered: no such run 404, a refused action
        403 (405 in a read-only dashboard), a bad parameter 400."""
        try:
            return fn(*args)
        except PermissionError as exc:
            read_only = self.dashboard.read_only
            self._plain(HTTPStatus.METHOD_NOT_ALLOWED if read_only else HTTPStatus.FORBIDDEN,
                        str(exc), allow="GET" if read_only else None)
        except NotFound as exc:
            self._plain(HTTPStatus.NOT_FOUND, str(exc))
        except (ValueError, UsageError) as exc:
            self._plain(HTTPStatus.BAD_REQUEST, str(exc))
        return None

    def _refused(self) -> tuple[HTTPStatus, str] | None:
        """Why a request is refused (a Host that is not loopback on loopback, no token
        where one is needed), or None."""
        dashboard = self.dashboard
        if is_loopback(dashboard.host):
            name = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if name and not is_loopback(name):
                return HTTPStatus.FORBIDDEN, f"Host {name!r} is not this machine"
        if dashboard.token:
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            cookies = dict(c.strip().split("=", 1) for c in
                           self.headers.get("Cookie", "").split(";") if "=" in c)
            query = parse_qs(urlsplit(self.path).query).get("token", [""])[-1]
            if not any(same(t, dashboard.token)
                       for t in (given, cookies.get("runex_token", ""), query) if t):
                return HTTPStatus.UNAUTHORIZED, "a token is needed (see --token-file)"
        return None

    def _plain(self, code: HTTPStatus, text: str, allow: str | None = None) -> None:
        data = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        self._end()
        self.wfile.write(data)

    def _end(self) -> None:
        for name, value in HEADERS.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - its name
        """Requests are not logged (a dashboard polled every few seconds would fill the
        log)."""
