"""When a pipeline fires: a five-field cron expression (`schedule`) or a fixed interval
(`every`), evaluated in a time zone (UTC unless `timezone` is given).

Fire times are exact instants: cron ones fall on whole minutes, interval ones on multiples of
the interval counted from the Unix epoch, so every consumer computes the same fire times.
`Schedule.between` is the one definition of them: next fire times, catch-up and backfill all
read it.

A cron line means what it means in a crontab (crontab(5), POSIX): when day-of-month and
day-of-week are both restricted, a day matching either one fires. Across a daylight saving
change, as cronie does for jobs at a fixed hour: a local time that does not exist fires once
at the first valid time after the gap, and a local time that happens twice fires at its first
occurrence only. A schedule with `*` in its hour field (`0 * * * *`, `*/5 * * * *`) keeps
the real clock instead: the skipped times do not fire and the repeated ones fire both times.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from runex.errors import ScheduleError
from runex.huey_private import crontab

UTC = dt.UTC
MINUTE = dt.timedelta(minutes=1)
WILDCARD = "*"
MAX_SCAN = dt.timedelta(days=366)  # the furthest back or ahead a cron schedule is searched


@dataclass(frozen=True)
class Schedule:
    expression: str  # what the user wrote: the cron line, or `every 10m`
    every: float | None = None  # seconds, for interval schedules
    timezone: str = "UTC"

    @classmethod
    def parse(cls, cron: str | None, every: float | None, timezone: str = "UTC") -> Schedule:
        if cron is not None and every is not None:
            raise ScheduleError("give either schedule (cron) or every (an interval), not both")
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(f"unknown timezone {timezone!r}; use a name such as "
                                "'UTC' or 'Europe/Paris'") from None
        if every is not None:
            if every < 1:
                raise ScheduleError("every must be at least 1s")
            return cls(f"every {every:g}s", every, timezone)
        fields = str(cron).split()
        if len(fields) != 5:
            raise ScheduleError(f"schedule {cron!r} must have five fields: minute hour "
                                "day-of-month month day-of-week, e.g. '*/15 * * * *'")
        schedule = cls(" ".join(fields), None, timezone)
        try:
            schedule._matcher()
        except ValueError as exc:
            raise ScheduleError(f"schedule {cron!r}: {exc}") from None
        return schedule

    def _matcher(self) -> Callable[[dt.datetime], bool]:
        """Whether a local wall-clock time matches the cron line.

        huey's `crontab` parses the fields (0-7 for the weekday, 0 and 7 being Sunday) but
        requires day-of-month and day-of-week to match both. crontab(5) and POSIX fire on a
        day matching either when both are restricted, so that case asks huey twice, each time
        with one day field opened up. A field with a `*` in it (`*`, `*/2`) is unrestricted,
        as crontab(5) says, and then the other field alone decides, as in huey."""
        minute, hour, day, month, weekday = self.expression.split()

        def huey_crontab(day: str, weekday: str) -> Callable[[dt.datetime], bool]:
            return crontab(minute=minute, hour=hour, day=day, month=month,
                           day_of_week=weekday, strict=True)

        if WILDCARD in day or WILDCARD in weekday:
            return huey_crontab(day, weekday)
        by_day, by_weekday = huey_crontab(day, WILDCARD), huey_crontab(WILDCARD, weekday)
        return lambda wall: by_day(wall) or by_weekday(wall)

    @property
    def fixed_hours(self) -> bool:
        """Whether a daylight saving change moves the fire times (see the module): the cron
        line's hour field has no `*`."""
        return self.every is None and WILDCARD not in self.expression.split()[1]

    def between(self, start: dt.datetime, end: dt.datetime) -> Iterator[dt.datetime]:
        """Fire times t with start < t <= end, ascending, as aware UTC datetimes.

        Each UTC minute decides alone whether it is a fire time, from its own local time and
        the one a minute before, so that any cut of a range into windows gives the same
        fire times. With fixed hours, a minute fires when its local time matches at its
        first occurrence, or when it ends a gap (the first valid time after a change forward)
        in which some local time matched: several matches in the gap make one fire."""
        if self.every is not None:
            first = math.floor(start.timestamp() / self.every) + 1
            last = math.floor(end.timestamp() / self.every)
            for n in range(first, last + 1):
                yield dt.datetime.fromtimestamp(n * self.every, UTC)
            return
        matches, zone, fixed_hours = self._matcher(), ZoneInfo(self.timezone), self.fixed_hours
        t = start.astimezone(UTC).replace(second=0, microsecond=0) + MINUTE
        end = min(end, start + MAX_SCAN)
        offset_before = (t - MINUTE).astimezone(zone).utcoffset()
        while t <= end:
            local = t.astimezone(zone)
            if not fixed_hours:
                fires = matches(local)
            else:
                offset = local.utcoffset()
                if offset > offset_before:  # the clocks went forward: t is the end of a gap
                    fires = matches(local) or any(map(matches, skipped(t, zone)))
                else:  # fold is 1 on the second occurrence of a local time
                    fires = not local.fold and matches(local)
                offset_before = offset
            if fires:
                yield t
            t += MINUTE

    def latest(self, start: dt.datetime, end: dt.datetime, count: int) -> list[dt.datetime]:
        """The last `count` fire times in (start, end], ascending."""
        if self.every is not None:
            start = max(start, end - dt.timedelta(seconds=self.every * count))
            return list(self.between(start, end))[-count:]
        found: list[dt.datetime] = []
        step = dt.timedelta(hours=6)
        window_end = end
        while len(found) < count and window_end > start:
            window_start = max(start, window_end - step)
            found = list(self.between(window_start, window_end)) + found
            window_end = window_start
        return found[-count:]

    def after(self, start: dt.datetime, count: int) -> list[dt.datetime]:
        """The next `count` fire times after `start`."""
        return list(itertools.islice(self.between(start, start + MAX_SCAN), count))


def wall_clock(t: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """What a clock in `zone` shows at the instant `t`, as a naive datetime."""
    return t.astimezone(zone).replace(tzinfo=None)


def skipped(t: dt.datetime, zone: ZoneInfo) -> Iterator[dt.datetime]:
    """The local times (naive) that the clocks of `zone` skipped in the minute before the
    instant `t`: none, except when they went forward."""
    before, after = wall_clock(t - MINUTE, zone), wall_clock(t, zone)
    while (before := before + MINUTE) < after:
        yield before


def iso(t: dt.datetime) -> str:
    """The ledger's form of a fire time: `2026-11-27T18:15:00Z`."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    """`2026-11-27`, `2026-11-27T18:00`, with an offset or `Z`; UTC when none is given."""
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ScheduleError(f"{text!r} is not a date or time; write 2026-11-27 or "
                            "2026-11-27T18:00 (UTC unless an offset is given)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
