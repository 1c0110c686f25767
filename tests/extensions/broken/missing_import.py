"""Registers 'shout', but the import below fails first."""
import runex_no_such_module  # noqa: F401

from runex import register_kernel

register_kernel("shout", lambda record: record)
