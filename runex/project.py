"""The project folder, its `runex.toml`, the data folder (`RUNEX_HOME`) and worker profiles.

The project folder is the nearest folder, from the current one upwards, that holds a
`runex.toml`; without one, the current folder. Relative paths in pipeline parameters and in
`runex.toml` are relative to the project folder, for the submitter and every worker alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runex.durations import duration_seconds
from runex.errors import ConfigError
from runex.postgres import is_url
from runex.reserve import Reserve

CONFIG_FILE = "runex.toml"
PACKAGE_DIR = Path(__file__).parent


def _folders(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(e, str) for e in v)


def _number(low: float, above: bool) -> Any:
    def check(v: Any) -> bool:
        return (isinstance(v, int | float) and not isinstance(v, bool)
                and (v > low if above else v >= low))
    return check


# What each key of runex.toml and of a worker profile takes: (what to say, a check).
CONFIG_KEYS = {
    "home": ("a folder name", lambda v: isinstance(v, str) and v != ""),
    "database": ('a PostgreSQL URL, "postgresql://user@host:5432/dbname"', is_url),
    "extensions": ("a list of folder names", _folders),
    "pipelines": ("a glob of pipeline files, e.g. \"pipelines/*.toml\"",
                  lambda v: isinstance(v, str) and v != ""),
    "retain": ('a duration such as "30d", "12h" or "90m" (or seconds), or "forever"',
               lambda v: v == "forever" or bool(duration_seconds(v))),
    "code_drift": ('"refuse" (a worker with other code than a run\'s does not run it) or '
                   '"warn" (it runs it, and says so)', lambda v: v in ("refuse", "warn")),
    "lease": ('a duration such as "60s" or "2m": how long a host that stopped answering '
              "holds its partitions before other hosts take them (default 60s)",
              lambda v: bool(duration_seconds(v))),
    "retain_runs": ("a whole number of at least 1",
                    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
}
RETAIN = "30d"  # how long finished runs are kept by default
LEASE = 60  # seconds a claim holds its partition unless renewed, by default
PROFILE_KEYS = {
    "workers": ("a whole number of at least 1",
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "max_delay": ("a number of seconds above 0", _number(0, above=True)),
    "grace": ("a number of seconds, 0 or more", _number(0, above=False)),
    "reap_every": ("a number of seconds above 0", _number(0, above=True)),
    "extensions": ("a list of folder names", _folders),
}


def check_keys(path: Path, data: dict[str, Any], keys: dict[str, tuple[str, Any]],
               what: str) -> None:
    """Every key known and of its type, or a `ConfigError` naming the file and the key."""
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; {what} accepts: "
                          f"{', '.join(sorted(keys))}")
    for key, value in data.items():
        wanted, ok = keys[key]
        if not ok(value):
            raise ConfigError(f"{path}: key {key!r} must be {wanted}, not {value!r}")


@dataclass
class Project:
    root: Path
    home: Path
    extension_dirs: list[Path]
    config: dict[str, Any] = field(default_factory=dict)
    database: str | None = None  # a PostgreSQL URL for the queue and ledger; None: the home

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.db"

    @property
    def queue_path(self) -> Path:
        return self.home / "queue.db"

    @property
    def traces_dir(self) -> Path:
        return self.home / "traces"

    @property
    def retention(self) -> tuple[float | None, int | None]:
        """How long finished runs are kept (seconds; None: forever), and how many of the
        newest runs at most (None: any number): `retain` and `retain_runs` in runex.toml."""
        retain = self.config.get("retain", RETAIN)
        return (None if retain == "forever" else duration_seconds(retain),
                self.config.get("retain_runs"))

    @property
    def lease(self) -> float:
        """Seconds a claim holds its partition unless its worker renews it: `lease`."""
        return duration_seconds(self.config.get("lease", LEASE)) or float(LEASE)

    def ensure_home(self) -> None:
        """Create the data folder (0700), its traces folder, and its reserve (see
        `runex.reserve`) when there is room for it."""
        for folder in (self.home, self.traces_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        Reserve(self.home).make()


def find_root(start: Path | None = None) -> Path:
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return here


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error names the file and line."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def open_project(
    home: str | os.PathLike | None = None,
    extensions: Sequence[str | os.PathLike] = (),
    root: str | os.PathLike | None = None,
    database: str | None = None,
) -> Project:
    """The project seen from the current folder, with flags over environment over config."""
    root_path = Path(root).resolve() if root else find_root()
    config_path = root_path / CONFIG_FILE
    config = read_toml(config_path) if config_path.is_file() else {}
    check_keys(config_path, config, CONFIG_KEYS, "runex.toml")
    home = home or os.environ.get("RUNEX_HOME") or config.get("home", ".runex")
    conf_ext = config.get("extensions", ["extensions"])
    env_ext = [e for e in os.environ.get("RUNEX_EXTENSIONS", "").split(os.pathsep) if e]
    dirs = [root_path / e for e in conf_ext] + [Path(e).resolve() for e in (*env_ext, *extensions)]
    database = database or os.environ.get("RUNEX_DATABASE") or config.get("database")
    if database is not None and not CONFIG_KEYS["database"][1](database):
        raise ConfigError(f"database {database!r} (from --database or RUNEX_DATABASE) must be "
                          f"{CONFIG_KEYS['database'][0]}")
    return Project(root_path, (root_path / home).resolve(), dirs, config, database)


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    """Run user code from the project folder, so relative paths mean the same everywhere."""
    before = os.getcwd()
    if before == str(path):
        yield
        return
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def load_profile(project: Project, name: str | None) -> dict[str, Any]:
    """A worker profile: `workers/NAME.toml` in the project, else a built-in one."""
    name = name or "default"
    candidates = [project.root / "workers" / f"{name}.toml",
                  PACKAGE_DIR / "profiles" / f"{name}.toml"]
    for path in candidates:
        if path.is_file():
            profile = read_toml(path)
            check_keys(path, profile, PROFILE_KEYS, "a worker profile")
            profile["extensions"] = [project.root / e for e in profile.get("extensions", [])]
            return profile
    known = sorted({p.stem for folder in (project.root / "workers", PACKAGE_DIR / "profiles")
                    if folder.is_dir() for p in folder.glob("*.toml")})
    raise ConfigError(f"no worker profile {name!r}; known profiles: {', '.join(known)} "
                      f"(add one as workers/{name}.toml)")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_project(folder: Path) -> list[Path]:
    """Scaffold a project: runex.toml, an extension, a pipeline, its data, worker profiles.
    Existing files are kept; returns the files written."""
    template = PACKAGE_DIR / "templates" / "project"
    written = []
    for src in sorted(template.rglob("*")):
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        dest = folder / src.relative_to(template)
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        written.append(dest)
    for profile in sorted((PACKAGE_DIR / "profiles").glob("*.toml")):
        dest = folder / "workers" / profile.name
        if not dest.exists():
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(profile, dest)
            written.append(dest)
    return written
