"""runex: a local-first job and pipeline runtime.

Extensions (plain `.py` files) register kernels with `register_kernel` or a `KERNELS` dict,
and sources and sinks as module-level `DataSourceSpec` and `SinkSpec` instances. `Runex` is
the whole runtime over one project: submit pipelines, work the queue, read the ledger.
"""

from typing import TYPE_CHECKING, Any

from runex.durable import atomic_write
from runex.errors import ExtensionError, PipelineError, RunexError
from runex.registry import DataSourceSpec, Registry, SinkContext, SinkSpec, register_kernel

if TYPE_CHECKING:  # for type checkers; at run time `__getattr__` imports them on first use
    from runex.app import Runex
    from runex.extensions import load as load_extensions
    from runex.pipeline import Pipeline
    from runex.pipeline import load as load_pipeline

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
