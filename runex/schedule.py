"""When a pipeline fires: a five-field cron expression (`schedule`) or a fixed interval
(`every`), evaluated in a time zone (UTC unless `timezone` is given).

Fire times are exact instants: cron ones fall on whole minutes, interval ones on multiples of
the interval counted from the Unix epoch, so every consumer computes the same fire times.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from huey import crontab

UTC = dt.UTC
MINUTE = dt.timedelta(minutes=1)
MAX_SCAN = dt.timedelta(days=366)  # the furthest back or ahead a cron schedule is searched


class ScheduleError(ValueError):
    pass


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

    def _matcher(self):  # noqa: ANN202 - huey's crontab test function
        minute, hour, day, month, weekday = self.expression.split()
        return crontab(minute=minute, hour=hour, day=day, month=month, day_of_week=weekday,
                       strict=True)

    def between(self, start: dt.datetime, end: dt.datetime) -> Iterator[dt.datetime]:
        """Fire times t with start < t <= end, ascending, as aware UTC datetimes."""
        if self.every is not None:
            first = math.floor(start.timestamp() / self.every) + 1
            last = math.floor(end.timestamp() / self.every)
            for n in range(first, last + 1):
                yield dt.datetime.fromtimestamp(n * self.every, UTC)
            return
        matches, zone = self._matcher(), ZoneInfo(self.timezone)
        t = start.astimezone(UTC).replace(second=0, microsecond=0) + MINUTE
        end = min(end, start + MAX_SCAN)
        while t <= end:
            if matches(t.astimezone(zone)):
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
