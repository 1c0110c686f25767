"""The deployment files in ops/: the systemd unit is one systemd accepts as it is."""

import os
import shutil
import subprocess

from .conftest import ROOT, require

UNIT = ROOT / "ops" / "runex-worker.service"


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path):
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    project = tmp_path / "project"
    (project / ".venv" / "bin").mkdir(parents=True)
    runex = project / ".venv" / "bin" / "runex"
    runex.write_text("#!/bin/sh\n")
    runex.chmod(0o755)
    unit = tmp_path / "runex-worker.service"
    unit.write_text(UNIT.read_text().replace("/srv/runex-project", str(project)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"})
    assert result.returncode == 0, result.stderr
    # verify warns, and still exits 0, for a line it ignores: none may be about this unit
    assert unit.name not in result.stderr, result.stderr


def test_the_unit_is_hardened_and_drains_on_stop():
    text = UNIT.read_text()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ReadWritePaths=/srv/runex-project", "PrivateTmp=yes", "KillMode=mixed",
                 "ExecStart=/srv/runex-project/.venv/bin/runex worker --profile raspberry-pi"):
        assert line in text.splitlines(), line
    stop = int(text.split("TimeoutStopSec=")[1].split()[0])
    assert stop > 60  # longer than the default grace: systemd's SIGKILL comes after the drain
