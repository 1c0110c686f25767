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


@pytest.mark.slow
def test_chaos_on_postgresql_across_three_hosts_with_a_database_restart():
    """Three hosts on one PostgreSQL (a throwaway cluster), whole hosts and workers killed,
    the server restarted halfway, the run writing to the `postgres` sink."""
    from . import pg
    from .conftest import require

    require(pg.binaries() is not None, pg.MISSING)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos"), "--seconds", "6",
                             "--partitions", "60", "--seed", "11", "--database", "local",
                             "--hosts", "3", "--restart-db"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "chaos: every check passed" in result.stdout
    assert "whole hosts; the database restarted once" in result.stdout
