"""Durations as people write them in runex.toml, pipeline options and on the command line."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value: Any) -> float | None:
    """`90`, `"90s"`, `"10m"`, `"1h30m"`, `"250ms"`, `"30d"` to seconds; None if it is not a
    duration."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and value and _DURATION.sub("", value.replace(" ", "")) == "":
        return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value))
    return None
