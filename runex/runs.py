"""What the Python API returns about a run: `Run`, with its `Partition`s and their attempts.

`Run.to_dict()` is exactly what `runex show RUN --json` prints.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")  # a run in one of these is over


@dataclass(frozen=True)
class Partition:
    index: int
    key: Any
    status: str  # queued running succeeded failed timeout cancelled quarantined
    attempts: list[dict[str, Any]]  # each as `runex show --json` prints it
    records_in: int | None
    records_out: int | None
    error: str | None


@dataclass(frozen=True)
class Run:
    id: str
    pipeline: str
    status: str  # queued running succeeded failed cancelled
    partitions: list[Partition]
    records_in: int
    records_out: int
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    scheduled_for: str | None
    _data: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        parts = [Partition(p["index"], p["key"], p["status"], p["attempts"], p["records_in"],
                           p["records_out"], p["error"]) for p in data["partitions"]]
        return cls(data["id"], data["pipeline"], data["status"], parts, data["records_in"],
                   data["records_out"], data["error"], data["created_at"], data["started_at"],
                   data["finished_at"], data["scheduled_for"], data)

    @property
    def over(self) -> bool:
        """Whether the run has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)
