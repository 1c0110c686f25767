"""What a worker process works with: one `WorkerState`, made before the consumer forks its
workers and passed to each (the registry, the ledger, the queue, and this process's stop flag
and timeout slot). `runex.executor` runs partitions with it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runex.extensions import refresh
from runex.lease import Holding
from runex.ledger import Claim, Ledger
from runex.pipeline import Pipeline, Plan, check
from runex.registry import Registry
from runex.reserve import Reserve

HARD_GRACE = 3.0  # seconds past its timeout before the consumer kills an attempt's worker


class Running:
    """The partition this worker process runs, in three numbers of memory shared with its
    consumer: when the consumer must kill the process if it is still at it (the timeout plus
    HARD_GRACE; infinity: no limit; 0: idle), the partition's index and its attempt. The
    timeout raises in the kernel (SIGALRM); a kernel inside one long C call, or a stopped
    process, never sees it, and the consumer, which looks every second, is the hard limit
    (see `runex.consumer`)."""

    def __init__(self, slots: Any = None, slot: int = 0):
        self.slots, self.at = slots, 3 * slot

    def begin(self, claim: Claim, timeout: float | None) -> None:
        if self.slots is not None:
            self.slots[self.at + 1], self.slots[self.at + 2] = claim.index, claim.attempt
            self.slots[self.at] = time.time() + timeout + HARD_GRACE if timeout else math.inf

    def end(self) -> None:
        if self.slots is not None:
            self.slots[self.at] = 0.0


def _never() -> bool:
    return False


@dataclass
class WorkerState:
    """What a worker process works with. Made before the fork; in each worker process, its
    consumer's worker sets `stopping` (huey's stop flag) and `running` (its slot)."""

    registry: Registry
    ledger: Ledger
    huey: Any
    home: Path
    plans: dict[str, Plan] = field(default_factory=dict)
    holding: Holding = field(default_factory=Holding)
    stopping: Callable[[], bool] = _never  # set: a pack is handed back, no new chunk taken
    running: Running = field(default_factory=Running)
    reserve: Reserve = field(init=False)  # gone while the disk under the home is full
    chunk: tuple[str, int] = ("", 1)  # (run id, chunk size) learned by this process's last pack
    # The reaper's last look at each run with queued partitions: (queued, carried by messages)
    queued_seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    code_drift: str = "refuse"  # what a worker does with a run of other code (`executor`)
    drift_told: set[str] = field(default_factory=set)  # runs whose drift was logged here

    def __post_init__(self) -> None:
        self.reserve = Reserve(self.home)

    def plan(self, run_id: str, spec: dict[str, Any]) -> Plan:
        """The checked pipeline of a run, made when this process first meets the run, with
        the extension files as they are then: added, changed and removed files are loaded
        again first (`extensions.refresh`)."""
        plan = self.plans.get(run_id)
        if plan is None:
            self.registry = refresh(self.registry)
            plan = check(Pipeline.from_dict(spec), self.registry)
            self.plans = {run_id: plan}  # one run at a time is the common case
        return plan
