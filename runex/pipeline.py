"""Pipeline files: parse the TOML, apply `-p` overrides, and check every name and parameter
against the registry, so that a typo fails at `submit` with the file and key, not in a worker."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import inspect
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from runex.cron import Schedule
from runex.durations import duration_seconds
from runex.errors import PipelineError, RunexError, ScheduleError, suggest
from runex.extensions import code_files, code_version, digest
from runex.registry import Kernel, Registry, display_path

SECTIONS = ("source", "steps", "sink", "options")


@dataclass
class Step:
    use: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Options:
    retries: int = 0  # further attempts after failures (a worker's death is not a failure)
    retry_delay: float = 1.0  # seconds before the first retry; doubles each time, with jitter
    max_retry_delay: float = 300.0
    timeout: float | None = None  # seconds per attempt
    batch_size: int = 1000
    priority: int = 0  # higher runs first
    quarantine_after: int = 3  # a partition whose worker died this many times is quarantined
    schedule: str | None = None  # five-field cron, evaluated in `timezone`
    every: float | None = None  # or an interval in seconds
    timezone: str = "UTC"
    catchup: str = "latest"  # fire times missed while no consumer ran: skip | latest | all
    max_catchup: int = 10  # with catchup = "all": at most this many of the latest
    overlap: str = "skip"  # when the previous run still goes: skip | queue | allow
    incremental: bool = False  # skip a partition whose input and code are its last commit's

    @property
    def scheduled(self) -> bool:
        return self.schedule is not None or self.every is not None


OPTION_TYPES = {"retries": int, "retry_delay": "duration", "max_retry_delay": "duration",
                "timeout": "duration", "batch_size": int, "priority": int,
                "quarantine_after": int, "schedule": str, "every": "duration", "timezone": str,
                "catchup": ("skip", "latest", "all"), "max_catchup": int,
                "overlap": ("skip", "queue", "allow"), "incremental": bool}


@dataclass
class Pipeline:
    name: str
    source: Step
    sink: Step
    steps: list[Step] = field(default_factory=list)
    options: Options = field(default_factory=Options)
    path: str | None = None  # the file it came from, for messages

    @property
    def schedule(self) -> Schedule | None:
        o = self.options
        return Schedule.parse(o.schedule, o.every, o.timezone) if o.scheduled else None

    def with_fire_time(self, fire_time: dt.datetime) -> Pipeline:
        """A copy whose string parameters have `{fire_time}` or `{fire_time:%Y-%m-%d}` replaced
        by the fire time, in the schedule's time zone."""
        local = fire_time.astimezone(ZoneInfo(self.options.timezone))

        def fill(value: Any) -> Any:
            if isinstance(value, str):
                return _FIRE_TIME.sub(lambda m: format(local, m.group(1) or ""), value)
            if isinstance(value, list):
                return [fill(v) for v in value]
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            return value

        return dataclasses.replace(
            self,
            source=Step(self.source.use, fill(self.source.params)),
            steps=[Step(s.use, fill(s.params)) for s in self.steps],
            sink=Step(self.sink.use, fill(self.sink.params)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["path"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pipeline:
        return cls(
            name=data["name"],
            source=Step(**data["source"]),
            sink=Step(**data["sink"]),
            steps=[Step(**s) for s in data.get("steps", [])],
            options=Options(**data.get("options", {})),
        )


_FIRE_TIME = re.compile(r"\{fire_time(?::([^}]*))?\}")
def parse_duration(value: Any, where: str) -> float:
    """`90`, `"90s"`, `"10m"`, `"1h30m"`, `"250ms"`, `"30d"` to seconds."""
    seconds = duration_seconds(value)
    if seconds is None:
        raise PipelineError(f"{where}: {value!r} is not a duration; write seconds (30) "
                            'or a string such as "500ms", "30s", "10m", "1h30m"')
    return seconds


def load(path: str | Path, overrides: Iterable[str] = ()) -> Pipeline:
    """Read a pipeline file and apply `key.path=value` overrides. Names are not checked here:
    see `check`."""
    path = Path(path)
    shown = display_path(str(path))
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{shown}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise PipelineError(f"{shown}: cannot read the pipeline: {exc.strerror}") from None
    for item in overrides:
        apply_override(data, item, shown)
    return from_mapping(data, name=path.stem, where=shown)


def apply_override(data: dict[str, Any], item: str, where: str) -> None:
    """`source.path=data/x.csv` or `steps.0.threshold=3`; the value is read as TOML when it
    parses as a TOML value (numbers, booleans, quoted strings, lists), else as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise PipelineError(f"-p {item!r}: write key.path=value, for example source.path=data.csv")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise PipelineError(f"-p {item!r}: {'.'.join(parts[:i])} has no item {part} "
                                    f"in {where} (it has {len(node)})")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        raise PipelineError(f"-p {item!r}: name an item of the list, such as steps.0.{parts[-1]}")
    node[parts[-1]] = value


def from_mapping(data: dict[str, Any], name: str, where: str = "<pipeline>") -> Pipeline:
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise PipelineError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}; "
                            f"a pipeline has: {', '.join(SECTIONS)}")

    def step(section: Any, label: str) -> Step:
        if not isinstance(section, dict):
            raise PipelineError(f"{where}: {label} must be a table with a 'use' key")
        params = dict(section)
        use = params.pop("use", None)
        if not isinstance(use, str) or not use:
            raise PipelineError(f"{where}: {label}.use is missing: name the "
                                f"{'kernel' if label.startswith('steps') else label} to use")
        return Step(use, params)

    for required in ("source", "sink"):
        if required not in data:
            raise PipelineError(f"{where}: the [{required}] section is missing")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise PipelineError(f"{where}: steps must be an array of tables: write [[steps]]")
    raw_options = data.get("options", {})
    if not isinstance(raw_options, dict):
        raise PipelineError(f"{where}: options must be a table: write [options]")
    options = Options()
    for key, value in raw_options.items():
        kind = OPTION_TYPES.get(key)
        if kind is None:
            raise PipelineError(f"{where}: {suggest(key, OPTION_TYPES, 'option')} "
                                "(in [options])")
        if kind == "duration":
            value = parse_duration(value, f"{where}: options.{key}")
        elif kind is str:
            if not isinstance(value, str):
                raise PipelineError(f"{where}: options.{key} must be a string, not {value!r}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise PipelineError(f"{where}: options.{key} must be true or false, "
                                    f"not {value!r}")
        elif isinstance(kind, tuple):
            if value not in kind:
                raise PipelineError(f"{where}: options.{key} must be one of "
                                    f"{', '.join(kind)}, not {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PipelineError(f"{where}: options.{key} must be a whole number >= 0, "
                                f"not {value!r}")
        setattr(options, key, value)
    if options.batch_size < 1:
        raise PipelineError(f"{where}: options.batch_size must be at least 1")
    if options.scheduled or options.timezone != "UTC":
        try:
            Schedule.parse(options.schedule, options.every, options.timezone)
        except ScheduleError as exc:
            raise PipelineError(f"{where}: [options] {exc}") from None
    return Pipeline(
        name=name,
        source=step(data["source"], "source"),
        sink=step(data["sink"], "sink"),
        steps=[step(s, f"steps[{i}]") for i, s in enumerate(steps)],
        options=options,
        path=where,
    )


# -- checking against the registry ---------------------------------------------------------

def parameters(fn: Callable) -> tuple[inspect.Parameter, ...]:
    """`fn`'s parameters, read once per function (every submit checks the pipeline's)."""
    try:
        return _parameters(fn)
    except TypeError:  # not hashable: read every time
        return tuple(inspect.signature(fn).parameters.values())


@functools.lru_cache(maxsize=1024)
def _parameters(fn: Callable) -> tuple[inspect.Parameter, ...]:
    return tuple(inspect.signature(fn).parameters.values())


@dataclass
class Signature:
    """The parameters a callable takes after its first `skip` positional ones."""

    accepted: list[str]
    required: list[str]
    any_keyword: bool
    # The type a parameter must have, where its annotation is one of TYPES, or, without an
    # annotation, where its default is of one: (type, how the user can tell).
    types: dict[str, tuple[type, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, fn: Callable, skip: int) -> Signature:
        try:
            params = list(parameters(fn))[skip:]
        except (TypeError, ValueError):  # builtins without a signature: accept anything
            return cls([], [], True)
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return cls(
            accepted=[p.name for p in named],
            required=[p.name for p in named if p.default is p.empty],
            any_keyword=any(p.kind == p.VAR_KEYWORD for p in params),
            types={p.name: t for p in named if (t := _declared_type(p)) is not None},
        )

    def select(self, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters this callable takes, out of a section's parameters."""
        if self.any_keyword:
            return params
        return {k: v for k, v in params.items() if k in self.accepted}


def _check_arguments(fn: Callable, count: int, what: str, label: str, example: str
                     ) -> list[str]:
    """A callable must take its first `count` arguments by position (`what` they are)."""
    try:
        params = list(parameters(fn))
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= count or any(p.kind == p.VAR_POSITIONAL for p in params):
        return []
    return [f"{label} must take the {what} as its first argument{'s' if count > 1 else ''}, "
            f"as in `{example}`; it takes ({', '.join(p.name for p in params)})"]


TYPES = {t.__name__: t for t in (bool, int, float, str, list, dict)}


def _declared_type(p: inspect.Parameter) -> tuple[type, str] | None:
    if isinstance(p.annotation, str):  # `from __future__ import annotations` in its file
        name = p.annotation
    elif isinstance(p.annotation, type):
        name = p.annotation.__name__ if TYPES.get(p.annotation.__name__) is p.annotation else ""
    else:
        name = ""
    if name in TYPES:
        return TYPES[name], f"annotated {name}"
    if p.annotation is p.empty and type(p.default) in TYPES.values():
        return type(p.default), f"its default is {p.default!r}"
    return None


def _of_type(value: Any, wanted: type) -> bool:
    if isinstance(value, bool) and wanted is not bool:
        return False  # a bool is an int to Python, not to a person
    if wanted is float:
        return isinstance(value, int | float)
    return isinstance(value, wanted)


def _check_params(params: dict[str, Any], sigs: list[Signature], label: str) -> list[str]:
    problems = []
    for key, value in params.items():
        for sig in sigs:
            if key in sig.types and not _of_type(value, sig.types[key][0]):
                wanted, why = sig.types[key]
                problems.append(f"{label}: parameter {key!r} must be {wanted.__name__} ({why}), "
                                f"not {value!r}")
                break
    any_keyword = any(s.any_keyword for s in sigs)
    accepted = sorted({a for s in sigs for a in s.accepted})
    takes = ", ".join(accepted) if accepted else "no parameters"
    for key in params:
        if not any_keyword and key not in accepted:
            problems.append(f"{label}: {suggest(key, accepted, 'parameter')}" if accepted
                            else f"{label}: unknown parameter {key!r}; it takes no parameters")
    for key in sorted({r for s in sigs for r in s.required}):
        if key not in params:
            problems.append(f"{label}: missing required parameter {key!r}; it takes: {takes}")
    return problems


@dataclass
class Plan:
    """A checked pipeline with its callables looked up: what a worker runs."""

    pipeline: Pipeline
    source_read: Callable
    source_read_params: dict[str, Any]
    source_partitions: Callable | None
    source_partitions_params: dict[str, Any]
    kernels: list[tuple[Kernel, dict[str, Any]]]
    sink_write: Callable
    sink_finalize: Callable | None
    sink_sync: Callable | None
    sink_params: dict[str, Any]
    code_version: str = ""  # see `extensions.code_version`
    code_files: dict[str, str] = field(default_factory=dict)  # see `extensions.code_files`
    source_fingerprint: Callable | None = None
    source_fingerprint_params: dict[str, Any] = field(default_factory=dict)
    # What an incremental run compares with a partition's last commit, beside its key and
    # fingerprint: the code and the parameters of its source, steps and sink (not the
    # pipeline's name or options); and where it commits (the sink and its parameters).
    inputs_version: str = ""
    target: str = ""


def check(pipeline: Pipeline, registry: Registry) -> Plan:
    """Look up every name and check every parameter; raise one `PipelineError` listing all
    the problems, each with the file and key."""
    where = pipeline.path or pipeline.name
    problems: list[str] = []

    def lookup(kind: str, name: str, label: str) -> Any:
        try:
            return registry.get(kind, name)
        except RunexError as exc:
            problems.append(f"{label}: {exc}")
            return None

    source = lookup("source", pipeline.source.use, "source.use")
    if source is not None:
        problems += _check_arguments(source.read, 1, "partition", f"source {source.name!r}'s "
                                     f"read ({source.origin})", "def read(partition, ...)")
        sigs = [Signature.of(source.read, 1)]
        if source.partitions is not None:
            sigs.append(Signature.of(source.partitions, 0))
        if source.fingerprint is not None:
            sigs.append(Signature.of(source.fingerprint, 1))
        problems += _check_params(pipeline.source.params, sigs,
                                  f"[source] (source {source.name!r}, {source.origin})")
    kernels = []
    for i, step in enumerate(pipeline.steps):
        kernel = lookup("kernel", step.use, f"steps[{i}].use")
        if kernel is not None:
            what = "records" if kernel.batch else "record"
            problems += _check_arguments(kernel.fn, 1, what, f"steps[{i}] (kernel "
                                         f"{kernel.name!r}, {kernel.origin})",
                                         f"def {kernel.name}({what}, ...)")
            problems += _check_params(step.params, [Signature.of(kernel.fn, 1)],
                                      f"steps[{i}] (kernel {kernel.name!r}, {kernel.origin})")
            kernels.append((kernel, step.params))
    sink = lookup("sink", pipeline.sink.use, "sink.use")
    sink_params = pipeline.sink.params
    if sink is not None:
        label = f"[sink] (sink {sink.name!r}, {sink.origin})"
        problems += _check_arguments(sink.write, 2, "ctx and records", f"{label}: its write",
                                     "def write(ctx, records)")
    if sink is not None and sink.configure is not None:
        before = len(problems)
        problems += _check_params(sink_params, [Signature.of(sink.configure, 0)], label)
        if len(problems) == before:
            try:
                sink_params = sink.configure(**sink_params)
            except (ValueError, TypeError) as exc:
                problems.append(f"{label}: {exc}")
            else:
                if not isinstance(sink_params, dict):
                    problems.append(f"{label}: its configure must return the parameters as a "
                                    f"dict (they become ctx.params), not {sink_params!r}")
    if pipeline.options.incremental and not problems:
        mode = sink_params.get("mode")
        if mode not in (None, "partition"):
            problems.append(f"options.incremental: the sink {sink.name!r} with mode = {mode!r} "
                            "would keep rows of a changed partition's earlier commit, or lose "
                            'those of one it skips: use mode = "partition" (a newer commit of '
                            "a key replaces its rows)")
        if source.fingerprint is None:
            problems.append(f"options.incremental: the source {source.name!r} ({source.origin})"
                            " gives no fingerprint of its partitions' input, so none can be "
                            "skipped: give its DataSourceSpec a fingerprint")
    if problems:
        raise PipelineError(f"{where}: " + (problems[0] if len(problems) == 1 else
                            f"{len(problems)} problems:\n  " + "\n  ".join(problems)))
    read_sig = Signature.of(source.read, 1)
    part_sig = Signature.of(source.partitions, 0) if source.partitions else None
    print_sig = Signature.of(source.fingerprint, 1) if source.fingerprint else None
    files = code_files(source.read, *(k.fn for k, _ in kernels), sink.write,
                       *([source.fingerprint] if source.fingerprint else []))
    spec = pipeline.to_dict()
    return Plan(
        pipeline=pipeline,
        source_read=source.read,
        source_read_params=read_sig.select(pipeline.source.params),
        source_partitions=source.partitions,
        source_partitions_params=part_sig.select(pipeline.source.params) if part_sig else {},
        kernels=kernels,
        sink_write=sink.write,
        sink_finalize=sink.finalize,
        sink_sync=sink.sync,
        sink_params=sink_params,
        code_version=code_version(files, spec),
        code_files=files,
        source_fingerprint=source.fingerprint,
        source_fingerprint_params=print_sig.select(pipeline.source.params) if print_sig else {},
        inputs_version=code_version(files, {k: spec[k] for k in ("source", "steps", "sink")}),
        target=digest({"sink": pipeline.sink.use, "params": sink_params}),
    )
