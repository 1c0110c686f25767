"""Load extension folders: plain `.py` files that register kernels, sources and sinks.

Each file is imported under its real path, so tracebacks name the user's file and line. A
file that fails to import is reported as `path:line: ErrorType: message` and the others still
load. Loading always builds a fresh `Registry`.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.util
import json
import os
import pwd
import stat
import sys
import traceback
import zlib
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from runex import trace
from runex.errors import ExtensionError
from runex.registry import (
    DataSourceSpec,
    Kernel,
    Registry,
    SinkSpec,
    _loading,
    default_registry,
    display_path,
)

BUILTINS_DIR = Path(__file__).parent / "builtins"


def load(dirs: Iterable[str | os.PathLike], *, builtins: bool = True) -> Registry:
    """Import the built-in extensions and every `*.py` file in `dirs`, in that order.

    A folder that does not exist is skipped. Problems are collected in `registry.errors`.
    """
    registry = Registry()
    registry.dirs = [Path(d) for d in dirs]
    registry.files = fingerprint(registry.dirs)  # before: a change while loading shows later
    folders = ([BUILTINS_DIR] if builtins else []) + registry.dirs
    seen: set[Path] = set()
    for folder in folders:
        folder = folder.resolve()
        if folder in seen or not folder.is_dir():
            continue
        seen.add(folder)
        trusted = folder == BUILTINS_DIR.resolve()
        if not trusted:
            problem = unsafe_permissions(folder)
            if problem:
                registry.errors.append(ExtensionError(display_path(str(folder)), None,
                                                      "PermissionError", problem))
                continue
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith(("_", ".")):
                continue
            load_file(registry, path, check_permissions=not trusted)
    # What the calling program registered itself (a script, a notebook): forked workers
    # inherit it.
    for kind in ("kernel", "source", "sink"):
        for name, item in default_registry.table(kind).items():
            registry.add(kind, name, item)
    return registry


def fingerprint(dirs: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """Each extension file of `dirs` with its modification time and size: what tells a
    running worker that a file was added, changed or removed."""
    files = {}
    for folder in dirs:
        for path in sorted(Path(folder).glob("*.py")):
            if not path.name.startswith(("_", ".")):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    files[str(path.resolve())] = (st.st_mtime_ns, st.st_size)
    return files


def refresh(registry: Registry) -> Registry:
    """`registry` itself if its extension files are as they were when it was loaded, else a
    registry loaded again from the same folders (and a trace event that says what changed).
    A file that now fails to load is reported in the new registry's errors; the rest load."""
    now = fingerprint(registry.dirs)
    if now == registry.files:
        return registry
    fresh = load(registry.dirs)
    before = registry.files
    trace.logger().info(
        "extensions.reloaded",
        added=sorted(display_path(f) for f in now.keys() - before.keys()),
        changed=sorted(display_path(f) for f in now.keys() & before.keys()
                       if now[f] != before[f]),
        removed=sorted(display_path(f) for f in before.keys() - now.keys()),
        errors=[str(e) for e in fresh.errors])
    return fresh


def code_files(*fns: Any) -> dict[str, str]:
    """The files that define `fns` (the callables of a run's kernels, source and sink), as
    shown (relative to the current folder when under it), with a short hash of each."""
    return {_code_name(path): _file_digest(path).hex()[:12]
            for path in sorted({_file_of(fn) for fn in fns} - {None})}


def _code_name(path: str) -> str:
    """A file of runex's own as `runex/...` (installed elsewhere on each host), another as
    shown from the project folder."""
    package = os.path.dirname(os.path.abspath(__file__))
    if os.path.abspath(path).startswith(package + os.sep):
        return "runex/" + os.path.relpath(path, package)
    return display_path(path)


def code_version(files: dict[str, str], spec: Any = None) -> str:
    """A short hash of runex's version, the files that define a run's code (`code_files`)
    and its resolved pipeline (`spec`): what ran, recorded with each attempt."""
    import hashlib  # noqa: PLC0415 - OpenSSL's library: 3.7 MiB, for what hashes only

    from runex import __version__

    digest = hashlib.sha256(__version__.encode())
    for path, content in sorted(files.items()):
        digest.update(f"{os.path.basename(path)} {content}".encode())
    if spec is not None:
        digest.update(json.dumps(spec, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def digest(value: Any) -> str:
    """A short hash of a JSON-able value (a sink and its parameters: where output goes),
    the same from one runex version to the next."""
    import hashlib  # noqa: PLC0415 - as in `code_version`

    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


_digests: dict[tuple[str, int, int], bytes] = {}  # (path, mtime, size) -> its content's hash


def _file_digest(path: str) -> bytes:
    """A file's content hash, read again only when its time or size changed."""
    try:
        st = os.stat(path)
    except OSError:
        return b""
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _digests:
        import hashlib  # noqa: PLC0415 - as in `code_version`

        with contextlib.suppress(OSError):
            _digests[key] = hashlib.sha256(Path(path).read_bytes()).digest()
    return _digests.get(key, b"")


def _file_of(fn: Any) -> str | None:
    """The file a callable (a function, a partial of one, an object with `__call__`) is
    written in."""
    fn = getattr(fn, "func", fn)
    code = getattr(fn, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    return code.co_filename if code else None


def load_file(registry: Registry, path: Path, *, check_permissions: bool = True) -> None:
    shown = display_path(str(path))
    if check_permissions:
        problem = unsafe_permissions(path)
        if problem:
            registry.errors.append(ExtensionError(shown, None, "PermissionError", problem))
            registry.failed_files.append(shown)
            return
    module_name = f"runex_ext_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    scratch = Registry()  # what this file registers; merged only if the whole file loads
    _loading.append(scratch)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported
        del sys.modules[module_name]
        message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        error = ExtensionError(shown, _error_line(exc, str(path)), type(exc).__name__, message)
        error.traceback = "".join(traceback.format_exception(exc))
        registry.errors.append(error)
        registry.failed_files.append(shown)
        return
    finally:
        _loading.pop()
    _discover(scratch, module, path)
    registry.errors += scratch.errors
    for kind in ("kernel", "source", "sink"):
        for name, item in scratch.table(kind).items():
            registry.add(kind, name, item)


def _error_line(exc: BaseException, filename: str) -> int | None:
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        return exc.lineno
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == filename:
            line = lineno
    return line


def _discover(registry: Registry, module: ModuleType, path: Path) -> None:
    """Register a module's `KERNELS` dict and its module-level source and sink specs."""
    shown = display_path(str(path))
    kernels = getattr(module, "KERNELS", None)
    if kernels is not None:
        if not isinstance(kernels, dict):
            registry.errors.append(ExtensionError(
                shown, None, "TypeError",
                f"KERNELS must be a dict of name to callable, not {type(kernels).__name__}"))
        else:
            for name, fn in kernels.items():
                if not callable(fn):
                    registry.errors.append(ExtensionError(
                        shown, None, "TypeError", f"KERNELS[{name!r}] is not callable"))
                    continue
                code = getattr(fn, "__code__", None)
                line = code.co_firstlineno if code and code.co_filename == str(path) else None
                origin = f"{shown}:{line}" if line else shown
                registry.add("kernel", name, Kernel(name, fn, False, origin))
    seen: set[int] = set()
    for value in list(vars(module).values()):
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, DataSourceSpec):
            registry.add("source", value.name, value)
        elif isinstance(value, SinkSpec):
            registry.add("sink", value.name, value)


def unsafe_permissions(path: Path) -> str | None:
    """Why `path` is unsafe to import code from, or None. Extensions are code: a file or
    folder that another user can write would let that user run code as the worker."""
    st = path.stat()
    kind = "folder" if path.is_dir() else "file"
    if st.st_mode & stat.S_IWOTH:
        return (f"{kind} is writable by every user; refusing to load code from it "
                f"(fix: chmod o-w {path})")
    if st.st_mode & stat.S_IWGRP and _group_is_shared(st.st_gid, st.st_uid):
        return (f"{kind} is writable by group members other than its owner; refusing to load "
                f"code from it (fix: chmod g-w {path})")
    if st.st_uid not in (os.getuid(), 0):
        return (f"{kind} belongs to another user (uid {st.st_uid}); refusing to load code "
                f"from it (fix: chown it to yourself)")
    return None


def _group_is_shared(gid: int, owner_uid: int) -> bool:
    """A group-writable file is fine when the group is its owner's private group."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return True
    try:
        owner = pwd.getpwuid(owner_uid)
    except KeyError:
        return True
    return not (owner.pw_gid == gid and set(group.gr_mem) <= {owner.pw_name})
