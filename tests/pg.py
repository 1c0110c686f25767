"""A throwaway PostgreSQL cluster for the tests, from the binaries on this machine (Debian's
packages put them in /usr/lib/postgresql/VERSION/bin), run as an unprivileged user when the
tests run as root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MISSING = ("no PostgreSQL for these tests: set RUNEX_TEST_DATABASE=postgresql://... or "
           "install PostgreSQL's server binaries (Debian: apt-get install postgresql)")
UNPRIVILEGED = "nobody"


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl (the newest version found), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A running throwaway cluster: its `url` (database `postgres`); `restart()`, `stop()`
    and `start()` it."""

    def __init__(self, url: str, pg_ctl: Callable[[str], None]):
        self.url = url
        self.restart = lambda: pg_ctl("restart")
        self.stop = lambda: pg_ctl("stop")
        self.start = lambda: pg_ctl("start")


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """Start a cluster in a new temporary folder on a free loopback port, trusting local
    connections; stops it and deletes the folder after."""
    bin_dir = binaries()
    assert bin_dir is not None, MISSING
    folder = Path(tempfile.mkdtemp(prefix="runex-postgres-"))
    data, port = folder / "data", free_port()
    as_user: dict = {}
    if os.geteuid() == 0:
        os.chmod(folder, 0o755)
        shutil.chown(folder, UNPRIVILEGED)
        as_user = {"user": UNPRIVILEGED}
    run = dict(check=True, capture_output=True, text=True, **as_user)
    subprocess.run([bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust",
                    "--no-sync"], **run)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=on"
    pg_ctl = [bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", folder / "log", "-w"]
    subprocess.run([*pg_ctl, "start"], **run)
    try:
        yield Cluster(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                      lambda what: subprocess.run([*pg_ctl, "-m", "fast", what], **run))
    finally:
        subprocess.run([bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, **as_user)
        shutil.rmtree(folder, ignore_errors=True)
