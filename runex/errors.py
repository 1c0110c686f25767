"""Errors a user can act on, and the exit codes the command line turns them into."""

from __future__ import annotations

import difflib

# Exit codes of the `runex` command. Scripts may rely on these numbers.
EXIT_OK = 0  # the command did what it was asked; `run`: the run succeeded
EXIT_RUN_FAILED = 1  # `run`: the run ended failed or cancelled; `doctor`: a check failed
EXIT_USAGE = 2  # bad command line (click's own code for usage errors)
EXIT_INVALID = 3  # a pipeline, extension or config file is invalid; nothing was stored
EXIT_NOT_FOUND = 4  # the named run, partition or pipeline does not exist
EXIT_STORAGE = 5  # the data folder cannot be written: disk full, read-only, failing
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C before the run ended
EXIT_PIPE_CLOSED = 141  # the output's reader went away (`| head`), as for other Unix tools


class RunexError(Exception):
    """Base of every error runex raises on purpose. `str()` is what the user reads."""

    exit_code = EXIT_INVALID


class ExtensionError(RunexError):
    """An extension file failed to import, or registered something wrong."""

    def __init__(self, path: str, line: int | None, kind: str, message: str):
        self.path, self.line, self.kind, self.message = path, line, kind, message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {kind}: {message}")


class DuplicateName(RunexError):
    """The same kernel, source or sink name registered in two places."""


class UnknownName(RunexError):
    """A pipeline names a kernel, source or sink that no extension registered."""


class PipelineError(RunexError):
    """A pipeline file is malformed or does not fit the callables it names."""


class ConfigError(RunexError):
    """`runex.toml`, a worker profile or an environment variable is wrong."""


class UsageError(RunexError):
    """A value given on the command line (or to the matching `Runex` method) is malformed."""

    exit_code = EXIT_USAGE


class NotFound(RunexError):
    exit_code = EXIT_NOT_FOUND


class StorageError(RunexError):
    exit_code = EXIT_STORAGE


class DiskFull(StorageError):
    """The disk under runex's home is full: nothing more is taken until there is room."""


class Unreachable(StorageError):
    """The database server of the queue and ledger cannot be reached (restarting, or the
    network down): nothing more is taken until it can be."""


# What a worker keeps, to write once it can, rather than losing it: see `lease.Holding`.
DEFERRED = (DiskFull, Unreachable)


class CodeDrift(RuntimeError):
    """This host's code for a run is not the code the run was submitted with (a partition's
    attempt fails with it, see `executor.check_code`)."""


class PartitionTimeout(Exception):
    """Raised inside a worker when an attempt runs past the pipeline's `timeout`."""


class RunCancelled(Exception):
    """Raised inside a worker when `runex cancel` was asked for the run it is processing."""


class ScheduleError(ValueError):
    """A schedule (cron line, interval, time zone) or a time given for one is malformed;
    a pipeline file's becomes a `PipelineError` naming the file."""


def suggest(name: str, known: list[str] | set[str], what: str) -> str:
    """`unknown kernel 'lowr' (did you mean 'lower'?); known kernels: lower, words`."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    text = f"unknown {what} {name!r}"
    if close:
        text += " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    listed = ", ".join(known) if known else "none are registered"
    return f"{text}; known {what}s: {listed}"
