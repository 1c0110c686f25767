"""What a worker process holds, and keeps holding while it works: the leases of the
partitions it runs, the rest of its pack, and the writes a full disk refused.

A worker renews its claims' leases from a thread of its own, so that a partition that runs for
an hour is not taken for lost; the same thread hands the unstarted rest of a pack back to the
queue after PACK_SLICE, so that a long partition does not keep it from idle workers.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from runex import tasks, trace
from runex.errors import DiskFull
from runex.ledger import Claim, Ledger

PACK_SLICE = 0.2  # seconds a worker keeps a pack before handing back what it has not started
RENEW_RETRY = 2.0  # seconds (at most a tenth of the lease) before a failed renewal is retried
# A worker process whose leases were not renewed for this part of their time (the database
# unreachable, or a renewal hanging on a dead network) exits before another host may take
# its partitions or its run's end: it must not commit what is no longer its own.
LEASE_MARGIN = 0.8
EXIT_LEASE_LOST = 75  # the exit status of such a worker (EX_TEMPFAIL); its consumer starts
# another in its place


class Holding:
    """What this worker process holds: the claims of the chunk it runs and the run it
    finalizes, whose leases a thread renews, and the rest of its pack, which that thread hands
    back to the queue once the pack has been held PACK_SLICE seconds (a long partition must
    not keep the rest of its pack from idle workers). The thread starts on first use, has its
    own connections, and writes nothing while nothing is held. In a consumer's worker
    (`exit_on_lost_lease`), a second thread ends the process if the leases go unrenewed for
    most of their time, whatever the first is stuck in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = False  # the thread waits for a wake, with nothing to renew
        self._claims: list[Claim] = []
        # Ledger and queue writes that a full disk refused, to redo in order once there is
        # room, with the claims whose lease is renewed meanwhile.
        self._deferred: list[tuple[Callable[[], None], list[Claim]]] = []
        self._run_id = ""
        self._pending: list[int] = []
        self._due = 0.0  # when the pending partitions go back (time.monotonic)
        self._pid = 0
        self._stores: tuple[Any, Any] = (None, None)  # the ledger's engine, the queue's storage
        self._finalizing: tuple[str, str] | None = None  # (run id, finalizer name)
        self._renewed = 0.0  # when the held leases were last taken or renewed (monotonic)
        self._lease = 60.0  # seconds a claim is held unless renewed (the ledger's `lease`)
        self.exit_on_lost_lease = False  # set in a consumer's worker process

    def _start(self) -> None:
        if self._pid != os.getpid():  # first use in this process: threads do not survive fork
            self._pid = os.getpid()
            threading.Thread(target=self._run, daemon=True, name="runex-holding").start()
            if self.exit_on_lost_lease:
                threading.Thread(target=self._watch_leases, daemon=True,
                                 name="runex-lease-watch").start()

    def pack(self, run_id: str, indexes: list[int], ledger: Ledger, huey: Any) -> None:
        with self._lock:
            self._run_id, self._pending = run_id, list(indexes)
            self._due = time.monotonic() + PACK_SLICE
            self._stores = (ledger.engine, huey.storage)
        if len(indexes) > 1:
            self._start()
            self._wake.set()

    def take(self, count: int) -> list[int]:
        with self._lock:
            chunk, self._pending = self._pending[:count], self._pending[count:]
        return chunk

    def untake(self, chunk: list[int]) -> None:
        with self._lock:
            self._pending = chunk + self._pending

    def defer(self, write: Callable[[], None], claims: list[Claim] = ()) -> None:
        """Keep a write that a full disk refused (recording a chunk, finalizing a run), to
        redo once there is room; meanwhile `claims` stay held (their lease renewed)."""
        with self._lock:
            self._deferred.append((write, list(claims)))
            idle, self._idle = self._idle, False
        self._start()
        if idle:  # their renewals are due
            self._wake.set()

    def redo(self) -> None:
        """Redo the deferred writes in order; one that fails again (`DiskFull`,
        `Unreachable`) stays, with those after it."""
        while self._deferred:
            write, _ = self._deferred[0]
            write()
            with self._lock:
                self._deferred.pop(0)

    def give_back(self, huey: Any, ledger: Ledger, now: bool = False) -> list[int]:
        """Queue again the pending partitions, if the pack was held long enough (or `now`)."""
        with self._lock:
            if not self._pending or not (now or time.monotonic() >= self._due):
                return []
            run_id, pending, self._pending = self._run_id, self._pending, []
        try:
            tasks.enqueue(huey, run_id, pending, ledger.run(run_id)["priority"],
                          one_pack=True)
        except BaseException:
            with self._lock:  # still held: try again later (if it is lost, the reaper
                if self._run_id == run_id:  # queues it again)
                    self._pending = pending + self._pending
                    self._due = time.monotonic() + PACK_SLICE
            raise
        return pending

    @contextlib.contextmanager
    def hold(self, ledger: Ledger, claims: list[Claim]) -> Iterator[None]:
        with self._lock:
            self._claims = claims
            self._stores = (ledger.engine, self._stores[1])
            self._renewed, self._lease = time.monotonic(), ledger.lease
            idle, self._idle = self._idle, False
        self._start()
        if idle:  # its renewals are due from now (a thread asleep until a renewal sees it then)
            self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._claims = []

    @contextlib.contextmanager
    def finalizing(self, ledger: Ledger, run_id: str, name: str) -> Iterator[None]:
        """Renew the finalizer's hold on run `run_id` (`Ledger.claim_finalize`) while the
        sink's `finalize` runs, which may take a while (a merge of part files)."""
        with self._lock:
            self._finalizing = (run_id, name)
            self._stores = (ledger.engine, self._stores[1])
            self._renewed, self._lease = time.monotonic(), ledger.lease
            idle, self._idle = self._idle, False
        self._start()
        if idle:
            self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._finalizing = None

    def _watch_leases(self) -> None:
        """End the process once what it holds went unrenewed for LEASE_MARGIN of its lease
        (see `exit_on_lost_lease`): it looks every tenth of a lease (at most a second), so
        by 0.9 of it at the latest, and costs a hold nothing."""
        while True:
            time.sleep(min(self._lease / 10, 1.0))
            with self._lock:
                held, finalizing = [*self._claims], self._finalizing
                give_up_at = self._renewed + self._lease * LEASE_MARGIN
            if (held or finalizing) and time.monotonic() >= give_up_at:
                self._lost_lease(held, finalizing)

    def _run(self) -> None:
        ledger: Ledger | None = None
        huey: Any = None
        retry_after = 0.0  # a renewal failed: not again before then
        while True:
            self._wake.clear()  # before looking: a wake from now on ends the wait below
            with self._lock:
                claims, finalizing, pending, due, (engine, queue) = (
                    self._claims + [c for _, held in self._deferred for c in held],
                    self._finalizing, self._pending, self._due, self._stores)
                renew_at = (max(self._renewed + self._lease / 3, retry_after)
                            if claims or finalizing else math.inf)
                self._idle = renew_at == math.inf and not pending  # see `hold`
            now = time.monotonic()
            if now < renew_at:
                claims, finalizing = [], None
            if not (claims or finalizing or (pending and now >= due)):
                wake_at = min(renew_at, due if pending else math.inf)
                self._wake.wait(None if wake_at == math.inf else max(0.0, wake_at - now))
                continue
            try:
                if ledger is None or ledger.engine is not engine:
                    if ledger is not None:
                        ledger.close()
                    # Not patient: a lease it cannot renew must not keep it from giving up.
                    ledger = Ledger(engine, self._lease, patient=False)
                if claims or finalizing:
                    began = time.monotonic()  # the leases run from before the call
                    if claims:
                        ledger.renew_lease(claims)
                    if finalizing:
                        ledger.renew_finalizer(*finalizing)
                    with self._lock:
                        self._renewed = began
                if pending:
                    if huey is None or huey.storage.location != queue.location:
                        huey = tasks.make_huey(queue.location, queue.home)
                    self.give_back(huey, ledger)
            except DiskFull:  # the consumer says so; the next round tries again
                retry_after = time.monotonic() + min(RENEW_RETRY, self._lease / 10)
            except Exception:  # noqa: BLE001 - the next round tries again
                trace.logger().exception("holding.failed")
                retry_after = time.monotonic() + min(RENEW_RETRY, self._lease / 10)

    def _lost_lease(self, claims: list[Claim], finalizing: tuple[str, str] | None) -> None:
        """The leases of what this process holds could not be renewed for most of their
        time: another host may soon take it. Exit now, committing nothing; the consumer starts
        another worker, which takes work once the ledger can be reached again."""
        run_id = claims[0].run_id if claims else finalizing[0] if finalizing else ""
        what = (f"{len(claims)} partition(s)" if claims else "the end") + f" of run {run_id}"
        trace.logger().error(
            "lease.lost", run_id=run_id, partitions=len(claims),
            message=f"could not renew the lease of {what} for "
                    f"{self._lease * LEASE_MARGIN:.0f}s (the ledger unreachable?): this "
                    "worker stops without committing; another takes over when the lease ends")
        os._exit(EXIT_LEASE_LOST)
