"""Scheduled pipelines: once per fire time, catch-up, overlap, backfill, with a given clock
in this process, and with real consumers on the real clock."""

import datetime as dt
import itertools
import json
import signal
import subprocess
import sys
import time
from zoneinfo import ZoneInfo

import pytest

from runex import PipelineError, Runex
from runex.cron import Schedule
from runex.errors import NotFound
from runex.pipeline import from_mapping
from runex.scheduler import fire_times

from .conftest import drain, runex_cli, traced, write

pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL

T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def at(minutes=0, seconds=0):
    return T0 + dt.timedelta(minutes=minutes, seconds=seconds)


def scheduled(project, options, name="p", path='"out/{fire_time:%H%M}"'):
    return write(project / "pipelines" / f"{name}.toml", f"""
        [source]
        use = "range"
        stop = 3
        [sink]
        use = "jsonl"
        path = {path}
        [options]
        {options}
    """)


def runs(rx):
    return sorted((r["scheduled_for"], r["status"]) for r in rx.ledger.runs(100))


def test_cron_and_interval_fire_times():
    every_15 = Schedule.parse("*/15 * * * *", None)
    assert every_15.after(at(1), 3) == [at(15), at(30), at(45)]
    assert every_15.latest(at(-120), at(1), 2) == [at(-15), at(0)]
    paris_9am = Schedule.parse("0 9 * * *", None, "Europe/Paris")
    assert paris_9am.after(T0, 1) == [dt.datetime(2026, 11, 28, 8, 0, tzinfo=dt.UTC)]
    every_10m = Schedule.parse(None, 600)
    assert list(every_10m.between(at(0), at(30))) == [at(10), at(20), at(30)]


def test_bad_schedules_name_the_file_and_key():
    base = {"source": {"use": "range"}, "sink": {"use": "null"}}
    for options, message in [
        ({"schedule": "* * *"}, "schedule '* * *' must have five fields"),
        ({"schedule": "61 * * * *"}, "61 is not a valid input"),
        ({"schedule": "* * * * *", "every": "1m"}, "either schedule (cron) or every"),
        ({"every": "1m", "timezone": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'"),
        ({"every": "1m", "catchup": "some"}, "options.catchup must be one of skip, latest, all"),
    ]:
        with pytest.raises(PipelineError) as info:
            from_mapping({**base, "options": options}, "p", "pipelines/p.toml")
        assert str(info.value).startswith("pipelines/p.toml: ")
        assert message in str(info.value)


def test_three_consumers_fire_each_time_once_even_after_a_restart_or_a_clock_step_back(project):
    scheduled(project, 'schedule = "* * * * *"\noverlap = "allow"')
    consumers = [Runex().scheduler() for _ in range(3)]
    for s in consumers:
        s.tick(at(0))  # first seen: nothing is due yet
    fired = [s.tick(at(1, 2)) for s in consumers]
    assert sorted(len(f) for f in fired) == [0, 0, 1]
    assert Runex().scheduler().tick(at(1, 40)) == []  # a restart inside the minute
    assert Runex().scheduler().tick(at(0, 50)) == []  # the clock stepped back
    assert [len(s.tick(at(2, 1))) for s in consumers] == [1, 0, 0]
    assert runs(Runex()) == [("2026-11-27T12:01:00Z", "queued"), ("2026-11-27T12:02:00Z", "queued")]


@pytest.mark.parametrize("catchup, expected, missed", [
    ("skip", [], ("12:30", "3 fire times")), ("latest", ["12:30"], ("12:20", "2 fire times")),
    ("all", ["12:20", "12:30"], ("12:10", "1 fire time"))])
def test_catchup_after_downtime(project, catchup, expected, missed):
    scheduled(project, f'every = "10m"\ncatchup = "{catchup}"\nmax_catchup = 2\noverlap = "allow"')
    rx = Runex()
    scheduler = rx.scheduler()
    scheduler.tick(at(-5))
    assert len(scheduler.tick(at(0, 5))) == 1  # 12:00, on time
    created = scheduler.tick(at(35))  # no consumer ran from 12:01 to 12:35
    got = sorted(rx.ledger.run(r)["scheduled_for"][11:16] for r in created)
    assert got == expected
    # the latest fire time not fired is recorded as missed, with how many were
    fire = rx.ledger.fire("p", f"2026-11-27T{missed[0]}:00Z")
    assert (fire["status"], fire["reason"]) == ("missed", f"{missed[1]} up to this one missed "
                                                f"while no consumer ran (catchup = {catchup!r})")
    assert scheduler.tick(at(35, 30)) == []  # nothing more
    assert [f["status"] for f in rx.ledger.fires("p", 10)].count("missed") == 1


@pytest.mark.parametrize("overlap", ["skip", "queue", "allow"])
def test_overlap_with_a_run_still_going(project, overlap):
    scheduled(project, f'every = "10m"\noverlap = "{overlap}"')
    rx = Runex()
    scheduler = rx.scheduler()
    scheduler.tick(at(-5))
    scheduler.tick(at(0, 1))  # the 12:00 run, left queued
    second = scheduler.tick(at(10, 1))
    fire = rx.ledger.fire("p", "2026-11-27T12:10:00Z")
    if overlap == "allow":
        assert len(second) == 1 and fire["status"] == "fired"
        return
    assert second == []
    assert fire["status"] == {"skip": "skipped", "queue": "waiting"}[overlap]
    assert fire["reason"].startswith("run ") and fire["reason"].endswith(" was still going")
    # the fire is a row of the ledger; the skip or the wait, with its reason, is traced too
    assert [e["event"] for e in traced(project) if e["event"].startswith("schedule.")] == [
        f"schedule.{fire['status']}"]
    drain(rx)  # the 12:00 run ends
    promoted = scheduler.tick(at(10, 30))
    if overlap == "queue":
        assert [rx.ledger.run(r)["scheduled_for"] for r in promoted] == ["2026-11-27T12:10:00Z"]
    else:
        assert promoted == []


def test_a_paused_schedule_skips_its_fire_times_with_the_reason_until_resumed(project):
    scheduled(project, 'every = "10m"')
    scheduled(project, 'every = "10m"', name="other", path='"out/other"')
    rx = Runex()
    scheduler = rx.scheduler()
    scheduler.tick(at(-5))
    assert rx.pause("p", source="test") is True and rx.pause("p") is False
    assert [s.get("paused", {}) and s["paused"]["source"] for s in rx.schedules()] == [
        None, "test"]  # other, p
    fired = scheduler.tick(at(0, 1))
    assert [rx.ledger.run(r)["pipeline"] for r in fired] == ["other"]  # the others go on
    fire = rx.ledger.fire("p", "2026-11-27T12:00:00Z")
    assert (fire["status"], fire["reason"]) == ("skipped", "the schedule was paused")
    assert scheduler.tick(at(0, 30)) == []  # once per fire time
    assert rx.resume("p") is True and rx.resume("p") is False
    assert [rx.ledger.run(r)["scheduled_for"] for r in scheduler.tick(at(10, 1))
            if rx.ledger.run(r)["pipeline"] == "p"] == ["2026-11-27T12:10:00Z"]
    with pytest.raises(NotFound, match="no scheduled pipeline 'nope' to pause"):
        rx.pause("nope")
    events = [(e["event"], e.get("source")) for e in traced(project)
              if e["event"].startswith("schedule.") and e.get("pipeline") == "p"]
    assert events[:2] == [("schedule.paused", "test"), ("schedule.paused", "api")]
    assert ("schedule.skipped", None) in events and ("schedule.resumed", "api") in events


def test_fire_time_fills_parameters(project):
    scheduled(project, 'schedule = "30 9 * * *"\ntimezone = "Europe/Paris"')
    rx = Runex()
    scheduler = rx.scheduler()
    scheduler.tick(at(0))
    (run_id,) = scheduler.tick(dt.datetime(2026, 11, 28, 8, 30, 5, tzinfo=dt.UTC))
    spec = rx.show(run_id).to_dict()["spec"]
    assert spec["sink"]["params"]["path"] == "out/0930"  # 09:30 in Paris


def test_pipeline_files_are_reread_and_a_broken_one_does_not_stop_the_others(project):
    scheduled(project, 'every = "10m"', name="good")
    scheduled(project, 'every = "10m"', name="broken", path="1")  # jsonl path must be text
    rx = Runex()
    scheduler = rx.scheduler()
    scheduler.tick(at(-5))
    assert len(scheduler.tick(at(0, 1))) == 1
    listing = {r["file"]: r for r in scheduler.listing(at(0, 2))}
    assert "path must name the folder" in listing["pipelines/broken.toml"]["error"]
    assert listing["pipelines/good.toml"]["next"][0] == "2026-11-27T12:10:00Z"
    assert listing["pipelines/good.toml"]["last"]["run_status"] == "queued"
    invalid = traced(project, "schedule.invalid")
    assert len(invalid) == 1  # reported once, not every second
    assert invalid[0]["file"] == "pipelines/broken.toml"
    scheduled(project, 'every = "5m"\noverlap = "allow"', name="good")  # edited
    assert len(scheduler.tick(at(5, 1))) == 1
    (project / "pipelines" / "good.toml").unlink()  # deleted
    assert scheduler.tick(at(10, 1)) == []


def test_backfill_runs_each_fire_time_once_unless_forced(project):
    scheduled(project, 'schedule = "0 * * * *"')
    rx = Runex()
    first = rx.backfill("pipelines/p.toml", at(0), at(120))
    assert [f["fire_time"][11:16] for f in first] == ["12:00", "13:00", "14:00"]
    assert all(f["submitted"] for f in first)
    again = rx.backfill("pipelines/p.toml", at(0), at(120))
    assert not any(f["submitted"] for f in again)  # queued: left alone
    drain(rx)
    assert [s for _, s in runs(rx)] == ["succeeded"] * 3
    assert not any(f["submitted"] for f in rx.backfill("pipelines/p.toml", at(0), at(120)))
    forced = rx.backfill("pipelines/p.toml", at(60), at(120), force=True)
    assert [f["submitted"] for f in forced] == [True, True]
    assert rx.ledger.fire("p", "2026-11-27T13:00:00Z")["run_id"] == forced[0]["run_id"]


def test_backfill_command_processes_the_range_in_order(project):
    scheduled(project, 'schedule = "0 * * * *"')
    result = runex_cli("backfill", "pipelines/p.toml", "--from", "2026-11-27T12:00",
                       "--to", "2026-11-27T14:00", "-w", "1", cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["3 of 3 fire times queued", "3 succeeded"]
    listing = json.loads(runex_cli("runs", "--json", cwd=project, check=True).stdout)
    by_start = sorted(listing, key=lambda r: r["started_at"])
    assert [r["scheduled_for"] for r in by_start] == [
        "2026-11-27T12:00:00Z", "2026-11-27T13:00:00Z", "2026-11-27T14:00:00Z"]
    assert sorted((project / "out").iterdir())[0].name == "1200"


@pytest.mark.slow
def test_three_real_consumers_fire_every_second_once(project):
    write(project / "pipelines" / "tick.toml", """
        [source]
        use = "range"
        stop = 1
        [sink]
        use = "null"
        [options]
        every = "1s"
        overlap = "allow"
        catchup = "skip"
    """)
    consumers = [subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "1"],
                                  cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(3)]
    deadline = time.monotonic() + 60
    while len(Runex().runs(limit=10)) < 5:  # five fire times, a second apart
        assert time.monotonic() < deadline, "the consumers did not fire"
        time.sleep(0.1)
    for c in consumers:
        c.send_signal(signal.SIGINT)
    for c in consumers:
        c.wait(timeout=60)
    listing = json.loads(runex_cli("runs", "--json", "-n", "100", cwd=project, check=True).stdout)
    fired = sorted(r["scheduled_for"] for r in listing)
    assert len(fired) >= 3
    assert len(set(fired)) == len(fired)  # no fire time twice
    seconds = [dt.datetime.fromisoformat(f.replace("Z", "+00:00")).timestamp() for f in fired]
    assert all(b - a == 1 for a, b in zip(seconds, seconds[1:], strict=False))  # none missed
    schedules = json.loads(runex_cli("schedules", "--json", cwd=project, check=True).stdout)
    assert schedules[0]["pipeline"] == "tick" and schedules[0]["schedule"] == "every 1s"
    assert schedules[0]["last"]["fire_time"] == fired[-1]


def test_schedules_command_lists_errors_apart_from_its_json(project):
    scheduled(project, 'every = "10m"', name="good")
    scheduled(project, 'every = "10m"', name="broken", path="1")
    result = runex_cli("schedules", "--json", cwd=project, check=True)
    rows = {r["file"]: r for r in json.loads(result.stdout)}
    assert rows["pipelines/good.toml"]["schedule"] == "every 600s"
    assert "path must name the folder" in rows["pipelines/broken.toml"]["error"]
    text = runex_cli("schedules", cwd=project, check=True)
    assert text.stdout.splitlines()[0].split() == ["PIPELINE", "SCHEDULE", "TZ", "NEXT", "LAST"]
    assert "error: pipelines/broken.toml: [sink]" in text.stderr


def test_a_fire_that_cannot_be_submitted_is_recorded_once(project):
    write(project / "data" / "1200.csv", "n\n1\n")
    write(project / "pipelines" / "p.toml", """
        [source]
        use = "csv"
        path = "data/{fire_time:%H%M}.csv"
        [sink]
        use = "null"
        [options]
        every = "10m"
        overlap = "queue"
    """)
    rx = Runex()
    scheduler = rx.scheduler()
    scheduler.tick(at(-5))
    assert len(scheduler.tick(at(0, 1))) == 1  # data/1200.csv is there
    assert scheduler.tick(at(10, 1)) == []  # waits for the 12:00 run
    drain(rx)
    for seconds in (2, 3, 4):
        assert scheduler.tick(at(10, seconds)) == []  # data/1210.csv is not
    fire = rx.ledger.fire("p", "2026-11-27T12:10:00Z")
    assert fire["status"] == "error" and "matches no file" in fire["reason"]
    assert len(traced(project, "schedule.failed")) == 1


# Daylight saving time in 2026, checked against zoneinfo by the first test below: Paris
# springs forward on 03-29 (02:00 -> 03:00) and falls back on 10-25 (03:00 -> 02:00); Sydney,
# in the other hemisphere, falls back on 04-05 (03:00 -> 02:00) and springs forward on 10-04
# (02:00 -> 03:00).
SPRING, FALL = "spring", "fall"
TRANSITIONS = {
    ("Europe/Paris", SPRING): dt.date(2026, 3, 29),
    ("Europe/Paris", FALL): dt.date(2026, 10, 25),
    ("Australia/Sydney", SPRING): dt.date(2026, 10, 4),
    ("Australia/Sydney", FALL): dt.date(2026, 4, 5),
}
MINUTE = dt.timedelta(minutes=1)
OFFSETS = {"Europe/Paris": ("+01:00", "+02:00"), "Australia/Sydney": ("+10:00", "+11:00")}


def local_day(timezone, day, days=1):
    """From local midnight of `day` to just before local midnight `days` later, in UTC."""
    zone = ZoneInfo(timezone)
    start = dt.datetime.combine(day, dt.time(), zone)
    end = dt.datetime.combine(day + dt.timedelta(days=days), dt.time(), zone)
    return start.astimezone(dt.UTC), end.astimezone(dt.UTC) - dt.timedelta(seconds=1)


def local_fire_times(schedule, timezone, day, days=1):
    """What `fire_times` (backfill's) gives over local days, as local `HH:MM+offset`, with
    the date when more than one day is asked for."""
    pipeline = from_mapping({"source": {"use": "range"}, "sink": {"use": "null"},
                             "options": {"schedule": schedule, "timezone": timezone}},
                            "p", "pipelines/p.toml")
    local = [t.astimezone(ZoneInfo(timezone)).isoformat(timespec="minutes")
             for t in fire_times(pipeline, *local_day(timezone, day, days))]
    return [t[11:] if days == 1 else t[8:10] + "T" + t[11:] for t in local]


def test_the_transitions_of_the_dst_tests_are_the_real_ones():
    for (timezone, kind), day in TRANSITIONS.items():
        zone, (winter, summer) = ZoneInfo(timezone), OFFSETS[timezone]
        start, end = local_day(timezone, day)
        before, after = (start.astimezone(zone).isoformat()[-6:],
                         end.astimezone(zone).isoformat()[-6:])
        assert (before, after) == ((winter, summer) if kind == SPRING else (summer, winter))
        assert end - start == dt.timedelta(hours=23 if kind == SPRING else 25, seconds=-1)


@pytest.mark.parametrize("timezone", ["Europe/Paris", "Australia/Sydney"])
def test_a_daily_time_skipped_by_the_change_fires_once_at_the_first_valid_time(timezone):
    day = TRANSITIONS[timezone, SPRING]
    summer = OFFSETS[timezone][1]
    assert local_fire_times("30 2 * * *", timezone, day) == [f"03:00{summer}"]
    # Every day of the three around the change has its fire.
    three = local_fire_times("30 2 * * *", timezone, day - dt.timedelta(days=1), days=3)
    assert [t[:2] for t in three] == [f"{d.day:02}" for d in (
        day - dt.timedelta(days=1), day, day + dt.timedelta(days=1))]
    assert [t[3:8] for t in three] == ["02:30", "03:00", "02:30"]
    # Several times inside the skipped hour make one fire, not four at once.
    assert local_fire_times("*/15 2 * * *", timezone, day) == [f"03:00{summer}"]
    # A skipped time and the first valid time both matched: still one fire at 03:00.
    assert local_fire_times("0 2,3 * * *", timezone, day) == [f"03:00{summer}"]


@pytest.mark.parametrize("timezone", ["Europe/Paris", "Australia/Sydney"])
def test_a_daily_time_that_happens_twice_fires_once_at_its_first_occurrence(timezone):
    day = TRANSITIONS[timezone, FALL]
    summer = OFFSETS[timezone][1]
    assert local_fire_times("30 2 * * *", timezone, day) == [f"02:30{summer}"]
    assert local_fire_times("*/15 2 * * *", timezone, day) == [
        f"02:{m}{summer}" for m in ("00", "15", "30", "45")]
    three = local_fire_times("30 2 * * *", timezone, day - dt.timedelta(days=1), days=3)
    assert [t[3:8] for t in three] == ["02:30"] * 3


@pytest.mark.parametrize("timezone", ["Europe/Paris", "Australia/Sydney"])
def test_a_wildcard_hour_keeps_the_real_clock_across_the_changes(timezone):
    winter, summer = OFFSETS[timezone]
    spring = local_fire_times("0 * * * *", timezone, TRANSITIONS[timezone, SPRING])
    assert len(spring) == 23 and not any(t.startswith("02:") for t in spring)
    assert spring[1:3] == [f"01:00{winter}", f"03:00{summer}"]  # an hour apart, as always
    fall = local_fire_times("0 * * * *", timezone, TRANSITIONS[timezone, FALL])
    assert len(fall) == 25
    assert fall[2:4] == [f"02:00{summer}", f"02:00{winter}"]  # both 02:00, an hour apart
    fall_15 = local_fire_times("*/15 * * * *", timezone, TRANSITIONS[timezone, FALL])
    assert len(fall_15) == 25 * 4
    # An interval is counted in UTC and knows nothing of the change.
    start, end = local_day(timezone, TRANSITIONS[timezone, FALL])
    hourly = list(Schedule.parse(None, 3600, timezone).between(start - MINUTE, end))
    assert len(hourly) == 25 and all(t.minute == 0 for t in hourly)


@pytest.mark.parametrize("expression", ["30 2 * * *", "*/15 2 * * *", "0 * * * *",
                                        "0 2,3 * * *", "*/7 1-3 * * *"])
@pytest.mark.parametrize("timezone, kind", list(TRANSITIONS))
def test_next_latest_and_backfill_agree_across_the_changes(expression, timezone, kind):
    schedule = Schedule.parse(expression, None, timezone)
    start, end = local_day(timezone, TRANSITIONS[timezone, kind])
    everything = list(schedule.between(start, end))
    assert everything == schedule.after(start, len(everything))
    assert everything == schedule.latest(start, end, len(everything))
    # The day cut into one-minute windows, as a consumer ticking each minute cuts it, gives
    # the same fire times: each minute is one or not whatever window it falls in.
    cuts = [start + dt.timedelta(minutes=m, seconds=30) for m in range(25 * 60)]
    windows = itertools.pairwise([start, *(c for c in cuts if c < end), end])
    assert [t for a, b in windows for t in schedule.between(a, b)] == everything


def test_consumers_fire_a_daily_time_once_on_both_change_days(project):
    scheduled(project, 'schedule = "30 2 * * *"\ntimezone = "Europe/Paris"\ncatchup = "skip"\n'
                       'overlap = "allow"')
    rx = Runex()
    scheduler = rx.scheduler()
    for day in (dt.datetime(2026, 3, 28, 23, 0, tzinfo=dt.UTC),
                dt.datetime(2026, 10, 24, 23, 0, tzinfo=dt.UTC)):
        for minute in range(0, 4 * 60, 2):  # a consumer ticking through the night
            scheduler.tick(day + dt.timedelta(minutes=minute, seconds=5))
    assert runs(rx) == [("2026-03-29T01:00:00Z", "queued"), ("2026-10-25T00:30:00Z", "queued")]


@pytest.mark.parametrize("timezone, kind", list(TRANSITIONS))
def test_backfill_command_makes_one_run_on_a_change_day(project, timezone, kind):
    scheduled(project, f'schedule = "30 2 * * *"\ntimezone = "{timezone}"',
              path='"out/{fire_time:%H%M%z}"')
    start, end = local_day(timezone, TRANSITIONS[timezone, kind])
    result = runex_cli("backfill", "pipelines/p.toml", "--from", start.isoformat(),
                       "--to", end.isoformat(), "-w", "1", cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["1 of 1 fire times queued", "1 succeeded"]
    summer = OFFSETS[timezone][1].replace(":", "")
    expected = "0300" if kind == SPRING else "0230"
    assert [p.name for p in (project / "out").iterdir()] == [expected + summer]


@pytest.mark.slow
def test_day_of_month_and_day_of_week_both_given_fire_on_either_as_in_posix_cron():
    def days(expression):
        june = Schedule.parse(expression, None)  # June 2026: Monday the 1st
        return [t.day for t in june.between(dt.datetime(2026, 5, 31, 23, 59, tzinfo=dt.UTC),
                                            dt.datetime(2026, 6, 30, 23, 59, tzinfo=dt.UTC))]

    assert days("0 0 1,15 * 1") == [1, 8, 15, 22, 29]  # the 1st, the 15th, every Monday
    assert days("0 0 2,16 * 1") == [1, 2, 8, 15, 16, 22, 29]
    assert days("0 0 2,16 * *") == [2, 16]  # one field restricted: it alone decides
    assert days("0 0 * * 1") == [1, 8, 15, 22, 29]
    assert days("0 0 20 * 0") == days("0 0 20 * 7") == [7, 14, 20, 21, 28]  # 0 and 7: Sunday
    # A field with `*` in it counts as unrestricted, as in cronie: odd days that are Mondays.
    assert days("0 0 */2 * 1") == [1, 15, 29]
