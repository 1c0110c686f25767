"""scripts/bench runs (a smoke run: its numbers are not looked at)."""

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, require


@pytest.mark.slow
def test_bench_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--quick",
                             "--reps", "1", "--only", "overhead", "records", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no-op partitions/s, -w 2" in result.stdout
    data = json.loads(out.read_text())
    assert data["overhead"]["runex_per_s"] > 0 and data["records"]["loop_seconds"] > 0


@pytest.mark.slow
def test_bench_web_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--quick",
                             "--reps", "1", "--only", "web", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "runex web over 1,000 runs, 100,000 partitions" in result.stdout
    assert "the home while runex web only read it: " in result.stdout
    web = json.loads(out.read_text())["web"]
    assert {"/", "/runs", "/metrics", "/api/overview"} <= set(web["pages"])
    assert all(p["median_ms"] > 0 and p["bytes"] > 0 for p in web["pages"].values())
    assert web["largest_json"]["bytes"] > 0
    assert web["memory_mib"]["fresh, asked nothing"]["rss"] > 0
    # Only runex web reads the home between the snapshots; the ledger itself is never written.
    assert not any("ledger.db " in line for lines in web["home_changes"].values()
                   for line in lines)


@pytest.mark.slow
def test_bench_compare_smoke_run(tmp_path):
    require(shutil.which("git") is not None and (ROOT / ".git").exists(),
            "--compare needs git and a git checkout")
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--quick",
                             "--reps", "1", "--compare", "HEAD", "--only", "overhead", "sink",
                             "--json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "before (HEAD " in result.stdout and "-> after (working tree)" in result.stdout
    assert "no-op partitions/s, -w 2" in result.stdout
    assert "tiny partitions into sqlite/s, -w 2" in result.stdout
    compare = json.loads(out.read_text())["compare"]
    assert compare["ref"] == "HEAD" and len(compare["commit"]) == 40
    for name in ("overhead", "sink"):
        figure = compare["figures"][name]
        for side in ("before", "after"):
            assert len(figure["every_run"][side]) == 1
            assert figure["per_s"][side] > 0


@pytest.mark.slow
def test_bench_postgres_smoke_run(tmp_path, request):
    from .conftest import postgres_server

    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--quick",
                             "--reps", "1", "--database", postgres_server(request),
                             "--json", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "queue and ledger in" in result.stdout and "3 consumers (hosts)" in result.stdout
    data = json.loads(out.read_text())["postgres"]
    assert data["per_s"]["3"] > 0 and data["latency"]["postgresql"]["p99"] > 0
