"""runex: a local-first job and pipeline runtime.

Extensions (plain `.py` files) register kernels with `register_kernel` or a `KERNELS` dict,
and sources and sinks as module-level `DataSourceSpec` and `SinkSpec` instances. `Runex` is
the whole runtime over one project: submit pipelines, work the queue, read the ledger.
"""

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from runex.durable import atomic_write
from runex.errors import ExtensionError, PipelineError, RunexError
from runex.registry import DataSourceSpec, Registry, SinkContext, SinkSpec, register_kernel

if TYPE_CHECKING:  # for type checkers; at run time `__getattr__` imports them on first use
    from runex.app import Runex
    from runex.extensions import load as load_extensions
    from runex.pipeline import Pipeline
    from runex.pipeline import load as load_pipeline


class _OnFirstUse(types.ModuleType):
    """A module that stands in for an installed one until one of its names is used, then
    imports it and hands each name on (see `_psycopg_on_first_use`)."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


@contextlib.contextmanager
def _standing_in(*names: str) -> Iterator[None]:
    """While a module is imported that imports `names` but uses them only when called:
    stand-ins in their place, which import them if and when used. Only that module holds
    them; anything imported afterwards gets the real modules."""
    placed = [name for name in names if name not in sys.modules]
    for name in placed:
        sys.modules[name] = _OnFirstUse(name)
    try:
        yield
    finally:
        for name in placed:
            if isinstance(sys.modules.get(name), _OnFirstUse):
                del sys.modules[name]


def _psycopg_on_first_use() -> None:
    """huey's storage module imports psycopg whenever it is installed (`runex[postgres]`),
    whether the queue is PostgreSQL's or not: some 60 ms and 20 MiB more for every runex
    process of a SQLite home. Until something uses it, a stand-in takes its place (before
    anything imports huey); code that uses psycopg sees no difference."""
    if "psycopg" not in sys.modules and importlib.util.find_spec("psycopg") is not None:
        sys.modules["psycopg"] = _OnFirstUse("psycopg")


_psycopg_on_first_use()

__version__ = "0.1.0"
__all__ = [
    "DataSourceSpec",
    "ExtensionError",
    "Pipeline",
    "PipelineError",
    "Registry",
    "Runex",
    "RunexError",
    "SinkContext",
    "SinkSpec",
    "atomic_write",
    "load_extensions",
    "load_pipeline",
    "register_kernel",
]

_LAZY = {  # imported on first use, so that `import runex` stays cheap for extension files
    "Runex": ("runex.app", "Runex"),
    "Pipeline": ("runex.pipeline", "Pipeline"),
    "load_pipeline": ("runex.pipeline", "load"),
    "load_extensions": ("runex.extensions", "load"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'runex' has no attribute {name!r}")
