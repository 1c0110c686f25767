"""scripts/bench runs (a smoke run: its numbers are not looked at)."""

import json
import subprocess
import sys

from .conftest import ROOT


def test_bench_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--quick",
                             "--reps", "1", "--only", "overhead", "records", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no-op partitions/s, -w 2" in result.stdout
    data = json.loads(out.read_text())
    assert data["overhead"]["runex_per_s"] > 0 and data["records"]["loop_seconds"] > 0
