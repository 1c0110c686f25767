"""Kernels, sources and sinks by name: what extensions register and pipelines look up.

A `Registry` is three plain dicts. Loading extensions builds a fresh one (see
`runex.extensions`); `register_kernel` called while a file loads goes into that registry,
and outside of loading into `default_registry`, for pipelines built in Python.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runex.errors import DuplicateName, UnknownName, suggest

KINDS = ("kernel", "source", "sink")


def origin_of(frame_depth: int) -> str:
    """`path:line` of a caller, the path relative to the current folder when under it."""
    frame = sys._getframe(frame_depth + 1)
    return f"{display_path(frame.f_code.co_filename)}:{frame.f_lineno}"


def display_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith("..") else rel


@dataclass
class Kernel:
    name: str
    fn: Callable[..., Any]
    batch: bool = False
    origin: str = "?"


@dataclass
class DataSourceSpec:
    """A source: `partitions(**params)` lists JSON-able partition keys (any iterable; a
    generator is read as it goes, so a million keys are never held at once; missing: one
    partition, key `None`); `read(partition, **params)` yields the records of one partition;
    `fingerprint(partition, **params)`, when given, a JSON-able value that changes when the
    partition's input does (its size and time, a hash, a change counter), recorded with each
    attempt: an incremental run skips a partition whose fingerprint is the one it committed
    with last time."""

    name: str
    read: Callable[..., Iterable[dict]]
    partitions: Callable[..., Iterable[Any]] | None = None
    fingerprint: Callable[..., Any] | None = None
    origin: str = field(default="?", compare=False)

    def __post_init__(self) -> None:
        if self.origin == "?":
            self.origin = origin_of(2)


# What the built-in sinks add to each row with `mode = "partition"` or `lineage = true`.
PARTITION = "_runex_partition"  # the key of the partition that wrote it (`key_text`)
RUN = "_runex_run"  # the run that wrote it (lineage)


def key_text(key: Any) -> str:
    """A partition key as JSON text, the same for the same key: how rows carry it (sinks'
    `_runex_partition`), part files are named by it, and the ledger's `outputs` keeps it."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


@dataclass
class SinkContext:
    """What a sink knows about the partition it writes (or, in `finalize`, about the run)."""

    run_id: str
    pipeline: str
    params: dict[str, Any]
    partition: Any = None  # the partition key; None in finalize
    index: int | None = None  # the partition's position in the run, 0-based; None in finalize
    attempt: int = 0  # the attempt number, which fences commits
    partition_count: int = 0
    # In finalize: the run's partition keys, read as iterated (a sink that prunes what the
    # source no longer has compares its rows with them).
    partition_keys: Callable[[], Iterable[Any]] = field(default=lambda: iter(()), repr=False)


class Records:
    """The records a sink writes: iterate it for one record at a time, or, cheaper, call
    `batches()` for lists of records. It can be read once."""

    def __init__(self, batches: Iterable[list[dict]]):
        self._batches = batches

    def __iter__(self) -> Iterator[dict]:
        for batch in self._batches:
            yield from batch

    def batches(self) -> Iterable[list[dict]]:
        return self._batches


@dataclass
class SinkSpec:
    """A sink: `write(ctx, records)` commits one partition's records so that a repeat of the
    same partition never duplicates output, and returns nothing; `finalize(ctx)` runs once per
    successful run. `configure(**params)`, when given, declares (by its signature) and checks
    the sink's parameters and returns them, normalized, as the `ctx.params` dict.

    Durability: runex records a partition as succeeded once `write` returned and, if the sink
    has one, `sync(ctx)` returned: by then the partition's output must survive a power cut.
    Either `write` syncs what it commits (`runex.atomic_write` does it for a file), or `sync`
    makes durable every commit this process's `write` calls made with `ctx.params` since the
    last `sync`; runex calls it once per chunk of partitions, which is cheaper than a sync
    per partition. The same holds for `finalize`, which runex follows with `sync` too."""

    name: str
    write: Callable[[SinkContext, Iterator[dict]], Any]
    finalize: Callable[[SinkContext], Any] | None = None
    configure: Callable[..., dict] | None = None
    sync: Callable[[SinkContext], Any] | None = None
    origin: str = field(default="?", compare=False)

    def __post_init__(self) -> None:
        if self.origin == "?":
            self.origin = origin_of(2)


class Registry:
    """Names to kernels, sources and sinks, with where each was defined."""

    def __init__(self) -> None:
        self.kernels: dict[str, Kernel] = {}
        self.sources: dict[str, DataSourceSpec] = {}
        self.sinks: dict[str, SinkSpec] = {}
        self.errors: list[Exception] = []  # load problems, reported but not fatal
        self.failed_files: list[str] = []  # extension files that failed to load
        self._ambiguous: dict[tuple[str, str], DuplicateName] = {}
        # What it was loaded from: the extension folders, and each file's (mtime, size) then.
        self.dirs: list[Path] = []
        self.files: dict[str, tuple[int, int]] = {}

    def table(self, kind: str) -> dict[str, Any]:
        return {"kernel": self.kernels, "source": self.sources, "sink": self.sinks}[kind]

    def add(self, kind: str, name: str, item: Kernel | DataSourceSpec | SinkSpec) -> None:
        table = self.table(kind)
        existing = table.get(name)
        if existing is not None and existing is not item:
            err = DuplicateName(
                f"{kind} {name!r} is defined twice: {existing.origin} and {item.origin}; "
                "rename one of them"
            )
            self._ambiguous[(kind, name)] = err
            self.errors.append(err)
            return
        table[name] = item

    def get(self, kind: str, name: str) -> Any:
        if (kind, name) in self._ambiguous:
            raise self._ambiguous[(kind, name)]
        table = self.table(kind)
        if name in table:
            return table[name]
        message = suggest(name, table.keys(), kind)
        if self.failed_files:
            failed = [str(e) for e in self.errors if getattr(e, "path", None) in self.failed_files]
            message += "; these extension files failed to load: " + "; ".join(
                failed or self.failed_files)
        raise UnknownName(message)

    def kernel(self, name: str) -> Kernel:
        return self.get("kernel", name)

    def source(self, name: str) -> DataSourceSpec:
        return self.get("source", name)

    def sink(self, name: str) -> SinkSpec:
        return self.get("sink", name)


default_registry = Registry()
_loading: list[Registry] = []  # the registry being filled by an extension load, innermost last


def current_registry() -> Registry:
    return _loading[-1] if _loading else default_registry


def register_kernel(name: str, fn: Callable | None = None, *, batch: bool = False) -> Any:
    """Register `fn` as kernel `name`. Usable as a call or, without `fn`, as a decorator.

    A per-record kernel is `fn(record, **params)` and returns a record, or None to drop it.
    A batch kernel (`batch=True`) is `fn(records, **params)`: a list in, an iterable out.
    """
    origin = origin_of(1)

    def decorate(func: Callable) -> Callable:
        if not callable(func):
            raise TypeError(f"register_kernel({name!r}): {func!r} is not callable")
        current_registry().add("kernel", name, Kernel(name, func, batch, origin))
        return func

    return decorate if fn is None else decorate(fn)
