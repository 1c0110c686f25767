"""A short run of scripts/chaos: random SIGKILLs of workers and consumers during a run."""

import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_chaos_short_run_loses_and_doubles_nothing():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos"), "--seconds", "4",
                             "--partitions", "40", "--seed", "7"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "chaos: every check passed" in result.stdout
    kills = next(line for line in result.stdout.splitlines() if line.startswith("kills:"))
    assert kills != "kills: 0 workers, 0 consumers"
