"""`runex web`: pages, JSON, Prometheus metrics and the safety rules, served for real."""

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from urllib.parse import urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runex import Runex
from runex.errors import UsageError
from runex.web import COLOURS, Dashboard

from .conftest import children, claim, drain, runex_cli, write

pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL

EVIL = "<script>alert(1)</script>"
EVIL_NAME = "<img src=x onerror=alert(1)>"  # a file name: no slash
KERNEL = f"""
    from runex import register_kernel

    @register_kernel("picky")
    def picky(record):
        if record["name"] == "bad":
            raise ValueError({EVIL!r} + " in " + record["name"])
        return record
"""


@pytest.fixture
def served(project):
    """A project with a succeeded run and a failed one (whose error and partition key hold
    markup), and a dashboard over it on a free port: (Runex, port, the run ids)."""
    write(project / "extensions" / "k.py", KERNEL)
    (project / "data").mkdir()
    (project / "data" / "ok.jsonl").write_text('{"name": "ok"}\n')
    (project / "data" / f"{EVIL_NAME}.jsonl").write_text('{"name": "bad"}\n')
    write(project / "p.toml", '[source]\nuse = "jsonl"\npath = "data/*.jsonl"\n\n'
          '[[steps]]\nuse = "picky"\n\n[sink]\nuse = "null"\n\n[options]\nretries = 0\n')
    write(project / "pipelines" / "nightly.toml", '[source]\nuse = "range"\nstop = 2\n\n'
          '[sink]\nuse = "null"\n\n[options]\nschedule = "0 3 * * *"\n')
    rx = Runex()
    run_id = rx.submit("p.toml")
    drain(rx)
    server = Dashboard(rx, "127.0.0.1", 0).server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rx, server.server_port, run_id
    server.shutdown()
    server.server_close()


def get(port, path, headers=None, method="GET", body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body,
                 headers={"Host": f"127.0.0.1:{port}", **(headers or {}),
                          **({"Content-Type": "application/x-www-form-urlencoded"}
                             if body else {})})
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    return response, body


PAGES = ("/", "/runs", "/runs?pipeline=p&status=failed&since=1d", "/runs/{run}",
         "/runs/{run}?partitions=all", "/runs/{run}/trace", "/schedules", "/workers",
         "/extensions")


def test_every_page_answers_and_escapes_what_comes_from_data(served):
    rx, port, run_id = served
    for path in PAGES:
        response, body = get(port, path.format(run=run_id))
        assert response.status == 200, (path, body)
        assert response.getheader("Content-Type") == "text/html; charset=utf-8"
        assert "script-src 'self'" in response.getheader("Content-Security-Policy")
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert EVIL not in body and EVIL_NAME not in body, path
        assert body.count("<script") == 1 and '<script src="/runex.js" defer>' in body
        assert "http://" not in body and "https://" not in body  # nothing from elsewhere
    _, overview = get(port, "/")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; in bad" in overview  # the run's first error
    _, run_page = get(port, f"/runs/{run_id}")
    assert "data/&lt;img src=x onerror=alert(1)&gt;.jsonl" in run_page  # the key
    assert 'class="failed"' in run_page and "pid " in run_page and "traceback" in run_page
    assert "ValueError: &lt;script&gt;" in run_page  # in the traceback too, escaped
    assert "picky " in run_page  # the time of its step
    assert 'data-over="1"' in run_page and "Output: sink null" in run_page
    _, trace_page = get(port, f"/runs/{run_id}/trace")
    assert "run.submitted" in trace_page and "partition.failed" in trace_page
    _, runs = get(port, "/runs?status=succeeded")
    assert run_id not in runs
    for path, kind, text in (("/runex.css", "text/css", "font"),
                             ("/runex.js", "text/javascript", "fetch(")):
        response, body = get(port, path)
        assert response.getheader("Content-Type").startswith(kind) and text in body
    assert get(port, "/runs/no-such-run")[0].status == 404
    assert get(port, "/nowhere")[0].status == 404


def test_runs_are_paged_fifty_at_a_time(served):
    rx, port, first = served
    for _ in range(51):
        rx.submit("p.toml")
    _, page = get(port, "/runs?pipeline=p")
    assert page.count('<a href="/runs/2') == 50 and first not in page
    assert '<a href="/runs?pipeline=p&amp;offset=50">older</a>' in page and ">newer<" not in page
    _, page = get(port, "/runs?pipeline=p&offset=50")
    assert page.count('<a href="/runs/2') == 2 and first in page
    assert '<a href="/runs?pipeline=p&amp;offset=0">newer</a>' in page and ">older<" not in page
    assert [r["id"] for r in json.loads(get(port, "/api/runs?offset=52")[1])] == []


def png_pixels(data):
    """The rows of palette indexes of a PNG that `runex.web.png` wrote."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        chunks[data[at + 4:at + 8]] = data[at + 8:at + 8 + size]
        at += 12 + size
    width, height = int.from_bytes(chunks[b"IHDR"][:4], "big"), int.from_bytes(
        chunks[b"IHDR"][4:8], "big")
    raw = zlib.decompress(chunks[b"IDAT"])
    return [list(raw[y * (width + 1) + 1:(y + 1) * (width + 1)]) for y in range(height)]


def test_a_runs_grid_is_a_png_of_its_partitions_by_status(served):
    rx, port, run_id = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/runs/{run_id}/grid.png", headers={"Host": f"127.0.0.1:{port}"})
    response = conn.getresponse()
    assert response.getheader("Content-Type") == "image/png"
    pixels = png_pixels(response.read())
    shades = ["none", *COLOURS]
    # data/<img...>.jsonl sorts before data/ok.jsonl
    assert [shades[i] for i in pixels[0]] == ["failed", "succeeded"]


def test_the_api_answers_as_the_commands_json(served, project):
    rx, port, run_id = served
    _, runs = get(port, "/api/runs")
    cli = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    assert [r["id"] for r in json.loads(runs)] == [r["id"] for r in cli] == [run_id]
    assert set(json.loads(runs)[0]) == set(cli[0])
    response, run = get(port, f"/api/runs/{run_id}")
    shown = json.loads(runex_cli("show", run_id, "--json", cwd=project, check=True).stdout)
    assert json.loads(run) == shown
    assert response.getheader("Content-Length") is None  # streamed, a page at a time
    for api, command in (("schedules", ["schedules"]), ("workers", ["workers"]),
                         ("extensions", ["extensions"]), (f"runs/{run_id}/trace",
                                                          ["trace", run_id])):
        _, body = get(port, f"/api/{api}")
        assert json.loads(body) == json.loads(
            runex_cli(*command, "--json", cwd=project, check=True).stdout), api
    _, overview = get(port, "/api/overview")
    overview = json.loads(overview)
    assert overview["runs_24h"] == {"p": {"failed": 1}}
    assert sum(overview["partitions_per_minute"]) == 2 and overview["paused"]["all"] is None
    assert [r["id"] for r in overview["pipelines"]["p"]] == [run_id]
    _, progress = get(port, f"/api/runs/{run_id}/progress")
    assert json.loads(progress) == {"status": "failed", "over": True,
                                    "counts": {"failed": 1, "succeeded": 1},
                                    "text": "failed; partitions 1 failed, 1 succeeded"}


def test_metrics_parse_with_the_prometheus_client_and_agree_with_the_ledger(served):
    rx, port, run_id = served
    response, text = get(port, "/metrics")
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("runex_runs", (("pipeline", "p"), ("status", "failed")))] == 1
    assert samples[("runex_partitions", (("status", "failed"),))] == 1
    assert samples[("runex_partitions", (("status", "succeeded"),))] == 1
    assert samples[("runex_attempts_total", (("outcome", "failed"), ("pipeline", "p")))] == 1
    assert samples[("runex_attempt_duration_seconds_count", ())] == 2
    assert samples[("runex_attempt_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("runex_queue_depth", ())] == 0
    assert samples[("runex_recovered_total", ())] == 0
    assert families["runex_attempt_duration_seconds"].type == "histogram"
    assert families["runex_attempts"].type == "counter"
    # Runs over are read once and remembered; one retried (a new end) is read again, and a
    # run submitted since is counted too.
    (rx.project.root / "data" / f"{EVIL_NAME}.jsonl").write_text(
        '{"name": "good"}\n')
    rx.retry(run_id)
    drain(rx)
    second = rx.submit("p.toml")
    drain(rx)
    assert rx.show(second).status == "succeeded"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(get(port, "/metrics")[1])
               for s in f.samples}
    assert samples[("runex_attempts_total", (("outcome", "failed"), ("pipeline", "p")))] == 1
    assert samples[("runex_attempts_total", (("outcome", "succeeded"), ("pipeline", "p")))] == 4
    assert samples[("runex_attempt_duration_seconds_count", ())] == 5
    assert samples[("runex_runs", (("pipeline", "p"), ("status", "succeeded")))] == 2


def test_it_refuses_other_hosts_tokens_missing_and_writes(served, tmp_path):
    rx, port, run_id = served
    response, _ = get(port, "/", headers={"Host": "evil.example:80"})  # DNS rebinding
    assert response.status == 403
    response, _ = get(port, f"/runs/{run_id}/retry", method="POST")  # no CSRF token
    assert response.status == 403
    with pytest.raises(UsageError, match="needs a token"):
        Dashboard(rx, "0.0.0.0", 0)
    server = Dashboard(rx, "127.0.0.1", 0, token="s3cret").server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        other = server.server_port
        assert get(other, "/api/runs")[0].status == 401
        assert get(other, "/api/runs", {"Authorization": "Bearer wrong"})[0].status == 401
        assert get(other, "/api/runs", {"Authorization": "Bearer s3cret"})[0].status == 200
        response, _ = get(other, "/runs?token=wrong")
        assert response.status == 401 and response.getheader("Set-Cookie") is None
        response, _ = get(other, "/runs?token=s3cret")
        assert response.status == 303 and response.getheader("Location") == "/runs"
        cookie = response.getheader("Set-Cookie").split(";")[0]
        assert get(other, "/runs", {"Cookie": cookie})[0].status == 200
    finally:
        server.shutdown()
        server.server_close()


def serve(dashboard):
    server = dashboard.server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_failed_partition_is_retried_from_its_page_and_the_action_traced(project):
    from .conftest import WORK_KERNEL, traced

    write(project / "extensions" / "k.py", WORK_KERNEL)
    write(project / "p.toml", '[source]\nuse = "range"\nstop = 4\nsize = 2\n\n'
          '[[steps]]\nuse = "work"\nfail_unless = "fixed"\n\n[sink]\nuse = "null"\n\n'
          '[options]\nretries = 0\n')
    rx = Runex()
    run_id = rx.submit("p.toml")
    drain(rx)
    dashboard = rx.web(port=0)
    server = serve(dashboard)
    try:
        port = server.server_port
        _, page = get(port, f"/runs/{run_id}")
        assert f'action="/runs/{run_id}/retry"' in page and dashboard.csrf in page
        (project / "fixed").touch()  # what made it fail is fixed
        response, _ = get(port, f"/runs/{run_id}/retry", method="POST",
                          body=f"csrf={dashboard.csrf}&partition=1")
        assert response.status == 303 and response.getheader("Location") == f"/runs/{run_id}"
        drain(rx)
        data = rx.show(run_id)
        assert [p.status for p in data.partitions] == ["failed", "succeeded"]
        assert data.status == "failed"  # partition 0 was left as it was
        response, _ = get(port, f"/runs/{run_id}/retry", method="POST",
                          body=f"csrf={dashboard.csrf}")
        drain(rx)
        assert rx.show(run_id).status == "succeeded"
    finally:
        server.shutdown()
        server.server_close()
    acted = traced(project, "web.acted")
    assert [(a["action"], a["partition"], a["client"], a["source"]) for a in acted] == [
        ("retry", "1", "127.0.0.1", "web"), ("retry", None, "127.0.0.1", "web")]


def test_a_read_only_dashboard_shows_no_buttons_and_takes_no_action(served):
    rx, _, run_id = served
    dashboard = rx.web(port=0, read_only=True)
    server = serve(dashboard)
    try:
        port = server.server_port
        _, page = get(port, f"/runs/{run_id}")
        assert "<form" not in page
        response, body = get(port, f"/runs/{run_id}/retry", method="POST",
                             body=f"csrf={dashboard.csrf}")
        assert response.status == 405 and "read-only" in body
        assert rx.show(run_id).status == "failed"
    finally:
        server.shutdown()
        server.server_close()


def test_a_queued_run_is_cancelled_from_its_page(served):
    rx, _, _ = served
    queued = rx.submit("p.toml")
    dashboard = rx.web(port=0)
    server = serve(dashboard)
    try:
        port = server.server_port
        _, page = get(port, f"/runs/{queued}")
        assert f'action="/runs/{queued}/cancel"' in page
        response, _ = get(port, f"/runs/{queued}/cancel", method="POST",
                          body=f"csrf={dashboard.csrf}")
        assert response.status == 303
        assert rx.show(queued).status == "cancelled"
        _, page = get(port, f"/runs/{queued}")
        assert f'action="/runs/{queued}/cancel"' not in page  # over: nothing to cancel
    finally:
        server.shutdown()
        server.server_close()


def post(port, dashboard, path, **fields):
    response, _ = get(port, path, method="POST",
                      body=urlencode({"csrf": dashboard.csrf, **fields}))
    return response.status, response.getheader("Location")


def test_a_schedule_is_run_now_paused_and_resumed_and_all_work_too(served, project):
    from .conftest import traced

    rx, _, _ = served
    dashboard = rx.web(port=0)
    server = serve(dashboard)
    try:
        port = server.server_port
        _, page = get(port, "/schedules")
        assert 'action="/schedules/nightly/run"' in page
        assert 'action="/schedules/nightly/pause"' in page and "0 3 * * *" in page
        assert post(port, dashboard, "/schedules/nightly/pause") == (303, "/schedules")
        assert rx.paused()["schedules"]["nightly"]["source"] == "web 127.0.0.1"
        _, page = get(port, "/schedules")
        assert "paused since" in page and 'action="/schedules/nightly/resume"' in page
        assert post(port, dashboard, "/schedules/nightly/resume") == (303, "/schedules")
        assert rx.paused()["schedules"] == {}
        status, where = post(port, dashboard, "/schedules/nightly/run")
        (run,) = rx.runs(1, pipeline="nightly")
        assert (status, where, run["status"]) == (303, f"/runs/{run['id']}", "queued")
        assert post(port, dashboard, "/work/pause", back="/schedules") == (303, "/schedules")
        _, overview = get(port, "/")
        assert "All work is paused since" in overview and "by web 127.0.0.1" in overview
        assert 'action="/work/resume"' in overview
        assert post(port, dashboard, "/work/resume", back="https://elsewhere") == (303, "/")
        assert rx.paused()["all"] is None
        assert post(port, dashboard, "/schedules/nope/pause")[0] == 404
        write(project / "pipelines" / "night shift.toml", '[source]\nuse = "range"\nstop = 2\n'
              '\n[sink]\nuse = "null"\n\n[options]\nschedule = "0 4 * * *"\n')
        assert post(port, dashboard, "/schedules/night%20shift/pause") == (303, "/schedules")
        assert "night shift" in rx.paused()["schedules"]
        rx.resume("night shift")
        assert post(port, dashboard, "/work/stop")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
    assert [(a["action"], a["client"]) for a in traced(project, "web.acted")] == [
        ("pause", "127.0.0.1"), ("resume", "127.0.0.1"), ("run", "127.0.0.1"),
        ("pause all work", "127.0.0.1"), ("resume all work", "127.0.0.1"),
        ("pause", "127.0.0.1"), ("pause", "127.0.0.1")]


def test_the_workers_page_shows_consumers_and_what_runs_and_a_running_run_is_live(served):
    rx, port, _ = served
    run_id = rx.submit("p.toml")
    claim(rx.ledger, run_id, 1)
    rx.ledger.add_consumer("host-a", 4242, None, None, 2)
    _, page = get(port, "/workers")
    assert "host-a" in page and "4,242" in page
    assert f'href="/runs/{run_id}"' in page and "1 &quot;data/ok.jsonl&quot;" in page
    _, page = get(port, f"/runs/{run_id}")
    assert 'data-over="0"' in page and f'data-progress="/api/runs/{run_id}/progress"' in page
    assert "running; partitions 1 queued, 1 running" in page
    _, overview = get(port, "/")
    assert "host-a 1" in overview


@pytest.mark.slow
def test_a_worker_serves_the_dashboard_beside_its_work(served, project):
    rx, _, _ = served
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = subprocess.Popen(
        [sys.executable, "-m", "runex", "worker", "-w", "1", "--web", f"127.0.0.1:{port}"],
        cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _, body = get(port, "/api/workers")
                if json.loads(body)["consumers"]:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        (consumer,) = json.loads(body)["consumers"]
        assert consumer["pid"] == worker.pid and consumer["alive"] is True
        (worker_pid,) = consumer["worker_pids"]
        assert children(worker.pid) and worker_pid in children(worker.pid)
        _, page = get(port, "/workers")
        assert f"<td>{worker_pid:,}</td><td>idle</td>" in page
        queued = rx.submit("p.toml")  # the worker runs it; the page shows it
        while time.monotonic() < deadline and rx.show(queued).status != "failed":
            time.sleep(0.1)
        response, page = get(port, f"/runs/{queued}")
        assert response.status == 200 and "failed; partitions 1 failed, 1 succeeded" in page
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr
    assert "web.started" in stderr and f"http://127.0.0.1:{port}/" in stderr
