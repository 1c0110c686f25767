"""What the Python API returns about a run: `Run`, with its `Partition`s and their attempts.

`Run.to_dict()` is exactly what `runex show RUN --json` prints. A run's partitions are read
from the ledger as they are used, a page at a time.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")  # a run in one of these is over
PARTITION_STATUSES = ("queued", "running", "succeeded", "skipped", "failed", "timeout",
                      "cancelled", "quarantined")


@dataclass(frozen=True)
class Partition:
    index: int
    key: Any
    status: str  # queued running succeeded skipped failed timeout cancelled quarantined
    attempts: list[dict[str, Any]]  # each as `runex show --json` prints it
    records_in: int | None
    records_out: int | None
    error: str | None
    seconds: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        return cls(data["index"], data["key"], data["status"], data["attempts"],
                   data["records_in"], data["records_out"], data["error"], data["seconds"])

    def to_dict(self) -> dict[str, Any]:
        """What `runex show --json` prints of the partition."""
        return {"index": self.index, "key": self.key, "status": self.status,
                "attempts": copy.deepcopy(self.attempts), "records_in": self.records_in,
                "records_out": self.records_out, "error": self.error, "seconds": self.seconds}


def steps_of(stored: str | None, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """An attempt's steps as its row keeps them (records in, records out, seconds per step,
    as JSON), with their kernels' names from the run's pipeline `spec`."""
    kernels = [step.get("use") for step in spec.get("steps", [])]
    return [{"kernel": kernels[i] if i < len(kernels) else None, "records_in": n_in,
             "records_out": n_out, "seconds": seconds}
            for i, (n_in, n_out, seconds) in enumerate(json.loads(stored) if stored else [])]


# Reads partitions, in index order, from the first after index `after`: at most `limit`, of
# one `status`, or (`unsettled`) those that did not succeed; each as `Partition.to_dict`.
Fetch = Callable[..., list[dict[str, Any]]]
PAGE = 250  # partitions read at a time (a page of a dashboard's or `show --json`'s stream)


class Partitions(Sequence[Partition]):
    """A run's partitions, read from the ledger a page at a time as they are used (a run of
    a million is never held whole): `len`, indexing, slicing and iteration, and `where` for
    some of them."""

    def __init__(self, fetch: Fetch, count: int):
        self._fetch, self._count = fetch, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, at: Any) -> Any:
        if isinstance(at, slice):
            return [self[i] for i in range(*at.indices(self._count))]
        if at < 0:
            at += self._count
        if not 0 <= at < self._count:
            raise IndexError("partition index out of range")
        return Partition.from_dict(self._fetch(after=at - 1, limit=1)[0])

    def __iter__(self) -> Iterator[Partition]:
        return self.where()

    def where(self, status: str | None = None, unsettled: bool = False, after: int = -1,
              limit: int | None = None) -> Iterator[Partition]:
        """The partitions of one `status`, or (`unsettled`) those that did not succeed, in
        index order from the first after index `after`, at most `limit` of them."""
        left = limit
        while left is None or left > 0:
            page = self._fetch(after=after, limit=PAGE if left is None else min(PAGE, left),
                               status=status, unsettled=unsettled)
            for data in page:
                yield Partition.from_dict(data)
            if len(page) < PAGE:
                return
            after = page[-1]["index"]
            left = None if left is None else left - len(page)


@dataclass(frozen=True)
class Run:
    """A run as the ledger holds it when read; its `partitions` are read as they are used.
    `to_dict()` is what `runex show --json` prints."""

    id: str
    pipeline: str
    status: str  # queued running succeeded failed cancelled
    partitions: Partitions
    counts: dict[str, int]  # partitions by status
    records_in: int
    records_out: int
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    scheduled_for: str | None
    _data: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_ledger(cls, data: dict[str, Any], fetch: Fetch) -> Run:
        """`data`: the run as `to_dict` prints it, without its partitions; `fetch` reads
        them."""
        return cls(data["id"], data["pipeline"], data["status"],
                   Partitions(fetch, data["partition_count"]), data["counts"],
                   data["records_in"], data["records_out"], data["error"], data["created_at"],
                   data["started_at"], data["finished_at"], data["scheduled_for"], data)

    @property
    def over(self) -> bool:
        """Whether the run has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL

    def summary(self) -> dict[str, Any]:
        """The run without its partitions (`counts` tells them by status)."""
        return copy.deepcopy(self._data)

    def to_dict(self) -> dict[str, Any]:
        """The run with every partition (for a run of a million, mind the memory:
        `summary()` and iterating `partitions` read a page at a time)."""
        return {**self.summary(), "partitions": [p.to_dict() for p in self.partitions]}

    def json_text(self, status: str | None = None, after: int = -1, limit: int | None = None
                  ) -> Iterator[str]:
        """`to_dict()` as JSON text, in pieces, with the partitions (of `status` only, from
        the first after index `after`, at most `limit`) read a page at a time."""
        head = json.dumps(self.summary(), indent=2, default=str)  # ends with "\n}"
        yield head[:-2] + ',\n  "partitions": ['
        for i, p in enumerate(self.partitions.where(status, after=after, limit=limit)):
            yield ("," if i else "") + "\n    " + json.dumps(p.to_dict(), default=str)
        yield "\n  ]\n}\n"
