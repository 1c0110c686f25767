"""Runs of many partitions: what the ledger counts instead of reading every partition, and
`show`, which lists a large run's partitions only when asked, a page at a time."""

import json

from runex import Runex

from .conftest import claim, finish, runex_cli, work_pipeline


def by_status(rx: Runex, run_id: str) -> dict[str, int]:
    """The partitions of a run counted one by one (what the run's counts must say)."""
    return dict(rx.ledger.conn.execute(
        "SELECT status, COUNT(*) FROM partitions WHERE run_id = ? GROUP BY status",
        (run_id,)).fetchall())


def test_a_runs_counts_by_status_follow_every_move_of_its_partitions(project):
    work_pipeline(project, stop=60, size=10, options="retries = 1")
    rx = Runex()
    run_id = rx.submit("pipelines/p.toml")
    ledger = rx.ledger
    seen = []

    def check() -> None:
        seen.append(ledger.progress(run_id))
        assert seen[-1] == by_status(rx, run_id)

    check()
    taken = [claim(ledger, run_id, i) for i in range(5)]
    check()
    finish(ledger, taken[0], "succeeded", records_in=10, records_out=10)
    finish(ledger, taken[1], "failed", error="boom", requeue=True)  # retried: queued
    finish(ledger, taken[2], "failed", error="boom")
    finish(ledger, taken[3], "released", requeue=True)  # never started
    check()
    ledger.lose_attempt(run_id, 4, taken[4].attempt, "gone", quarantine_after=1)
    check()
    ledger.cancel(run_id)
    check()
    assert ledger.retry(run_id, 2) == [2]
    check()
    ledger.retry(run_id)
    check()
    assert ledger.run(run_id)["records_out"] == 10  # the committed partition's
    assert seen[0] == {"queued": 6} and seen[1] == {"queued": 1, "running": 5}
    assert seen[2] == {"failed": 1, "queued": 3, "running": 1, "succeeded": 1}
    assert seen[3]["quarantined"] == 1
    assert seen[4] == {"cancelled": 3, "failed": 1, "quarantined": 1, "succeeded": 1}
    assert seen[-1] == {"queued": 5, "succeeded": 1}


def test_show_lists_a_large_runs_unsuccessful_partitions_and_pages_on_request(project):
    work_pipeline(project, stop=120, size=1, options="retries = 0", fail_on=7)
    rx = Runex()
    run = rx.run("pipelines/p.toml", workers=0)
    assert run.status == "failed" and run.counts == {"failed": 1, "succeeded": 119}
    parts = run.partitions
    assert len(parts) == 120 and parts[7].status == "failed" and parts[-1].index == 119
    assert [p.index for p in parts[10:13]] == [10, 11, 12]
    assert [p.index for p in parts.where(status="failed")] == [7]
    assert [p.index for p in parts.where(after=115)] == [116, 117, 118, 119]
    assert sum(1 for _ in parts) == 120

    shown = runex_cli("show", run.id, cwd=project, check=True).stdout
    assert "partitions 120: 1 failed, 119 succeeded" in shown
    rows = [line.split()[0] for line in shown.splitlines() if line[:1].isdigit()]
    assert rows == ["7"]  # only what did not succeed
    assert "(1 of 120 partitions shown" in shown and "ZeroDivisionError: boom" in shown

    page = runex_cli("show", run.id, "--partitions", "--after", "49", "--limit", "10",
                     cwd=project, check=True).stdout
    assert [line.split()[0] for line in page.splitlines() if line[:1].isdigit()] == [
        str(i) for i in range(50, 60)]
    data = json.loads(runex_cli("show", run.id, "--json", cwd=project, check=True).stdout)
    assert len(data["partitions"]) == 120 and data["counts"] == run.counts
    assert data == run.to_dict()
    some = json.loads(runex_cli("show", run.id, "--json", "--status", "succeeded",
                                "--limit", "3", cwd=project, check=True).stdout)
    assert [p["index"] for p in some["partitions"]] == [0, 1, 2]
