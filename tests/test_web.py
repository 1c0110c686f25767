"""`runex web`: pages, JSON, Prometheus metrics and the safety rules, served for real."""

import http.client
import json
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runex import Runex
from runex.errors import UsageError
from runex.web import Dashboard

from .conftest import drain, runex_cli, write

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


def test_pages_show_runs_and_escape_what_comes_from_data(served):
    rx, port, run_id = served
    for path in ("/", "/runs", f"/runs/{run_id}"):
        response, body = get(port, path)
        assert response.status == 200, body
        assert response.getheader("Content-Type") == "text/html; charset=utf-8"
        assert "Content-Security-Policy" in response.headers
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert "<script>" not in body and "<img" not in body
    _, overview = get(port, "/")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; in bad" in overview  # the run's first error
    _, run_page = get(port, f"/runs/{run_id}")
    assert "data/&lt;img src=x onerror=alert(1)&gt;.jsonl" in run_page  # the key
    assert 'class="failed"' in run_page and "pid " in run_page
    response, css = get(port, "/runex.css")
    assert response.status == 200 and "font" in css
    assert get(port, "/runs/no-such-run")[0].status == 404


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
    _, overview = get(port, "/api/overview")
    assert json.loads(overview)["runs"] == {"p": {"failed": 1}}


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
