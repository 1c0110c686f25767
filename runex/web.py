"""`runex web`: the ledger seen from a browser, as JSON, and as Prometheus metrics.

Served by the standard library's HTTP server: each connection in a thread of its own (a
browser opens some it leaves idle), the answers one at a time (a dashboard's load; the
ledger's connection is used by one request at a time), from the same
ledger the commands read, SQLite or PostgreSQL. Pages are drawn on the server, every string
that comes from users or data escaped; the one stylesheet is runex's own, so a page needs
nothing from elsewhere and works offline.

Safe by default: it binds to loopback, where the `Host` header must name loopback too (a page
elsewhere cannot reach it through DNS rebinding); any other address needs a token
(`--token-file`), sent as `Authorization: Bearer TOKEN` or once as `?token=TOKEN`, which sets a
cookie. Reading is GET; acting (cancel a run, retry its failed partitions or one of them) is
POST only, with the form's CSRF token (made when the server starts), traced with the client's
address; `read_only` refuses every action.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from runex import __version__, trace
from runex.errors import NotFound, UsageError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# Attempt durations' histogram buckets, in seconds (Prometheus' `le`).
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { text-align: left; padding: .2em .8em .2em 0; border-bottom: 1px solid #ddd; }
td.n { text-align: right; }
.succeeded { color: #1a7f37; } .failed, .quarantined, .timeout { color: #cf222e; }
.running { color: #0969da; } .queued, .cancelled { color: #777; }
pre { background: #f6f8fa; padding: .6em; overflow: auto; }
"""


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
        self.csrf = secrets.token_urlsafe(16)  # what every form carries back
        self.lock = threading.Lock()  # one answer at a time
        self.actions = {"cancel": self.cancel, "retry": self.retry}
        self.routes: list[tuple[str, Callable[..., tuple[str, Iterable[str]]]]] = [
            ("/api/runs/", self.api_run), ("/api/runs", self.api_runs),
            ("/api/schedules", self.api_schedules), ("/api/overview", self.api_overview),
            ("/metrics", self.metrics), ("/runex.css", self.style),
            ("/runs/", self.page_run), ("/runs", self.page_runs), ("/", self.page_overview)]

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
        for pipeline, status, n in ledger.runs_by_status():
            runs.setdefault(pipeline, {})[status] = n
        oldest = ledger.oldest_queued()
        return {"runs": runs, "partitions": ledger.partitions_by_status(),
                "queue_depth": sum(ledger.queued_counts().values()),
                "oldest_queued_seconds": None if oldest is None else now - oldest,
                "consumers": consumers_by_host(ledger),
                "failures": [{"id": r["id"], "pipeline": r["pipeline"], "error": r["error"],
                              "finished_at": r["finished_at"]}
                             for r in self.rx.runs(10, status="failed")],
                "schedules": [{"pipeline": s.get("pipeline"), "next": s.get("next", [])[:1],
                               "error": s.get("error")} for s in self.rx.schedules()]}

    # -- JSON --------------------------------------------------------------------------

    def api_runs(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        rows = self.rx.runs(int(query.get("limit", 50)), query.get("status"),
                            query.get("pipeline"), query.get("since"))
        return "application/json", [json.dumps(rows, indent=2, default=str)]

    def api_run(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        return "application/json", self.rx.show(rest).json_text()

    def api_schedules(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        return "application/json", [json.dumps(self.rx.schedules(), indent=2, default=str)]

    def api_overview(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        return "application/json", [json.dumps(self.overview(), indent=2, default=str)]

    # -- actions -----------------------------------------------------------------------

    def act(self, path: str, form: dict[str, str], client: str) -> str:
        """Do what a form posted to `path` (`/runs/RUN/cancel`, `/runs/RUN/retry`) asks;
        returns where to go next."""
        if self.read_only:
            raise PermissionError("this dashboard is read-only (runex web --read-only)")
        if not hmac.compare_digest(form.get("csrf", "").encode(), self.csrf.encode()):
            raise PermissionError("the form's CSRF token is missing or stale: reload the page")
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "runs" or parts[2] not in self.actions:
            raise NotFound(f"no action {path}")
        run_id = self.rx.ledger.resolve_run_id(parts[1])
        self.rx.ensure_trace()
        trace.logger(run_id=run_id).info("web.acted", action=parts[2], source="web",
                                         client=client, partition=form.get("partition"))
        self.actions[parts[2]](run_id, form)
        return f"/runs/{run_id}"

    def cancel(self, run_id: str, form: dict[str, str]) -> None:
        self.rx.cancel(run_id)

    def retry(self, run_id: str, form: dict[str, str]) -> None:
        partition = form.get("partition")
        self.rx.retry(run_id, int(partition) if partition else None)

    def form(self, action: str, label: str, **fields: Any) -> str:
        """A button that posts to `action`, or nothing in a read-only dashboard."""
        if self.read_only:
            return ""
        hidden = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">'
                         for k, v in {"csrf": self.csrf, **fields}.items())
        return (f'<form method="post" action="{e(action)}">{hidden}'
                f"<button>{e(label)}</button></form>")

    # -- Prometheus --------------------------------------------------------------------

    def metrics(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        """Prometheus' text format, computed from the ledger now (so right whatever the
        number of processes and hosts)."""
        ledger = self.rx.ledger
        out = Exposition()
        out.family("runex_runs", "gauge", "Runs the ledger keeps, by pipeline and status.",
                   [({"pipeline": p, "status": s}, n) for p, s, n in ledger.runs_by_status()])
        out.family("runex_partitions", "gauge", "Partitions of the runs kept, by status.",
                   [({"status": s}, n) for s, n in ledger.partitions_by_status().items()])
        outcomes = ledger.attempts_by_outcome()
        out.family("runex_attempts", "counter", "Attempts at partitions, by pipeline and "
                   "outcome (of the runs kept).",
                   [({"pipeline": p, "outcome": s}, n) for p, s, n in outcomes])
        counts, total, seconds = ledger.attempt_seconds(BUCKETS)
        out.histogram("runex_attempt_duration_seconds", "How long attempts that ended took.",
                      BUCKETS, counts, total, seconds)
        out.family("runex_queue_depth", "gauge", "Partitions queued, of runs not over.",
                   [({}, sum(ledger.queued_counts().values()))])
        oldest = ledger.oldest_queued()
        out.family("runex_queue_oldest_age_seconds", "gauge", "How long the partition queued "
                   "longest ago has waited (0: none queued).",
                   [({}, 0 if oldest is None else max(0.0, time.time() - oldest))])
        out.family("runex_consumers", "gauge", "Consumers (runex worker) recorded as running, "
                   "by host.", [({"host": h}, n) for h, n in consumers_by_host(ledger).items()])
        out.family("runex_recovered", "counter", "Attempts declared lost (their worker died) "
                   "and recovered.", [({}, sum(n for _, s, n in outcomes if s == "lost"))])
        last, upcoming = [], []
        for s in self.rx.schedules():
            if s.get("pipeline") and s.get("last"):
                last.append(({"pipeline": s["pipeline"]}, _timestamp(s["last"]["fire_time"])))
            if s.get("pipeline") and s.get("next"):
                upcoming.append(({"pipeline": s["pipeline"]}, _timestamp(s["next"][0])))
        out.family("runex_schedule_last_fire_timestamp_seconds", "gauge",
                   "When each scheduled pipeline last fired.", last)
        out.family("runex_schedule_next_fire_timestamp_seconds", "gauge",
                   "When each scheduled pipeline fires next.", upcoming)
        return "text/plain; version=0.0.4; charset=utf-8", [out.text()]

    # -- pages -------------------------------------------------------------------------

    def style(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        return "text/css; charset=utf-8", [STYLE]

    def page_overview(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        if rest:
            raise NotFound(f"no page /{rest}")
        o = self.overview()
        statuses = sorted({s for counts in o["runs"].values() for s in counts})
        body = ["<h1>runex</h1>",
                f"<p>Queue: {o['queue_depth']} partitions"
                + (f", the oldest waiting {o['oldest_queued_seconds']:.0f} s"
                   if o["oldest_queued_seconds"] is not None else "") + ". Consumers: "
                + (", ".join(f"{e(h)} {n}" for h, n in o["consumers"].items()) or "none")
                + ".</p>",
                "<h2>Runs</h2>",
                table(["pipeline", *statuses],
                      [[link(f"/runs?pipeline={p}", p),
                        *(num(counts.get(s, 0)) for s in statuses)]
                       for p, counts in o["runs"].items()]),
                "<h2>Recent failures</h2>",
                table(["run", "pipeline", "error"],
                      [[link(f"/runs/{f['id']}", f["id"]), e(f["pipeline"]), e(f["error"])]
                       for f in o["failures"]]),
                "<h2>Next fires</h2>",
                table(["pipeline", "next", "error"],
                      [[e(s["pipeline"]), e(", ".join(s["next"])), e(s["error"])]
                       for s in o["schedules"]])]
        return page("runex", body)

    def page_runs(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        rows = self.rx.runs(int(query.get("limit", 50)), query.get("status"),
                            query.get("pipeline"), query.get("since"))
        return page("runs", ["<h1>Runs</h1>", table(
            ["run", "pipeline", "status", "partitions", "records out", "fire time", "error"],
            [[link(f"/runs/{r['id']}", r["id"]), e(r["pipeline"]), status(r["status"]),
              num(r["partition_count"]), num(r["records_out"]), e(r["scheduled_for"]),
              e(r["error"])] for r in rows])])

    def page_run(self, rest: str, query: dict[str, str]) -> tuple[str, Iterable[str]]:
        run = self.rx.show(rest)
        summary = run.summary()
        shown = list(run.partitions.where(unsettled=True, limit=200))
        over = run.status in ("succeeded", "failed", "cancelled")
        retryable = any(s in run.counts for s in ("failed", "timeout", "quarantined",
                                                  "cancelled"))
        body = [f"<h1>Run {e(run.id)}</h1>",
                "" if over else self.form(f"/runs/{run.id}/cancel", "cancel the run"),
                self.form(f"/runs/{run.id}/retry", "retry what did not succeed")
                if retryable else "",
                f"<p>{e(run.pipeline)}: {status(run.status)}; partitions "
                + ", ".join(f"{n} {status(s)}" for s, n in sorted(run.counts.items()))
                + f"; records {num(run.records_in)} in, {num(run.records_out)} out.</p>",
                f"<p>{e(summary.get('error'))}</p>" if summary.get("error") else "",
                "<h2>Partitions that did not succeed</h2>" if shown else "",
                table(["index", "key", "status", "attempts: host, pid, error", ""],
                      [[num(p.index), e(json.dumps(p.key)), status(p.status),
                        "<br>".join(
                            f"#{a['attempt']} {e(a['host'])} pid {a['pid']}: "
                            f"{status(a['status'])} {e(a.get('error'))}" for a in p.attempts),
                        self.form(f"/runs/{run.id}/retry", "retry", partition=p.index)
                        if p.status in ("failed", "timeout", "quarantined", "cancelled")
                        else ""]
                       for p in shown]) if shown else "",
                "<h2>Pipeline</h2>",
                f"<pre>{e(json.dumps(summary.get('spec'), indent=2))}</pre>"]
        return page(f"run {run.id}", body)


class Exposition:
    """Prometheus' text exposition format, a family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        if kind == "counter":  # the text format names a counter by its sample: `x_total`
            name += "_total"
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{labels(ls)} {value:g}" for ls, value in samples]

    def histogram(self, name: str, help_text: str, bounds: Iterable[float], counts: list[int],
                  total: int, seconds: float) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        self.lines += [f'{name}_bucket{{le="{b:g}"}} {n}'
                       for b, n in zip(bounds, counts, strict=True)]
        self.lines += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_count {total}",
                       f"{name}_sum {seconds:g}"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def consumers_by_host(ledger: Any) -> dict[str, int]:
    """How many consumers the ledger records as running on each host."""
    hosts: dict[str, int] = {}
    for c in ledger.consumers():
        hosts[c["host"]] = hosts.get(c["host"], 0) + 1
    return dict(sorted(hosts.items()))


def labels(values: dict[str, str]) -> str:
    if not values:
        return ""
    quoted = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
              for v in values.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(values, quoted, strict=True)) + "}"


def _timestamp(iso_time: str) -> float:
    from runex.cron import parse_time  # noqa: PLC0415 - only with schedules

    return parse_time(iso_time).timestamp()


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
    nav = (f'<nav>{link("/", "overview")}{link("/runs", "runs")}{link("/metrics", "metrics")}'
           f"</nav>")
    return "text/html; charset=utf-8", [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}'
        '</title><link rel="stylesheet" href="/runex.css"></head><body>', nav, *body,
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
        if "token" in query and self.dashboard.token:  # once: then the cookie
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Set-Cookie", f"runex_token={query['token']}; HttpOnly; "
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
                if isinstance(body, list):
                    chunks = [c.encode() for c in body]
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
            if not any(hmac.compare_digest(t.encode(), dashboard.token.encode())
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
