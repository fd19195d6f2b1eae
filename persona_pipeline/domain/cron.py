"""Five-field cron expressions in a persona's timezone, with explicit DST rules.

`parse_cron` validates (minute hour day-of-month month day-of-week, Vixie-cron syntax: `*`, `a`,
`a-b`, `*/s`, `a-b/s`, `a/s`, lists, JAN-DEC and SUN-SAT in any case, day-of-week 7 = Sunday,
and the macros @hourly @daily @midnight @weekly @monthly @yearly @annually). A `CronError` quotes
the whole expression and names the field and the bad part.

Days, as in Vixie cron: when both day-of-month and day-of-week are restricted (neither field
starts with `*`), a day matches if EITHER matches; otherwise both must match.

Wall times become instants (`fire_times`, `next_fire_times`) by these DST rules:
- a local time that does not exist (the spring-forward gap) fires once, at the first instant
  after the gap, however many of the skipped minutes matched;
- a local time that occurs twice (fall back) fires at its first occurrence only.

Pure: no I/O, no Dagster.
"""

from __future__ import annotations

import calendar
import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_RANGES = {"minute": (0, 59), "hour": (0, 23), "day-of-month": (1, 31), "month": (1, 12), "day-of-week": (0, 7)}
_MONTHS = {name: i for i, name in enumerate(
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], start=1)}
_WEEKDAYS = {name: i for i, name in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
_NAMES = {"month": _MONTHS, "day-of-week": _WEEKDAYS}
MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_ITEM_RE = re.compile(r"^(?:(?P<star>\*)|(?P<a>[0-9A-Za-z]+)(?:-(?P<b>[0-9A-Za-z]+))?)(?:/(?P<step>[0-9]+))?$")
# How far next_fire_times looks: the Gregorian calendar repeats every 400 years, so an expression
# that can fire at all fires within one cycle (Feb 29 on a Sunday comes round every 28 years).
_SEARCH_YEARS = 401
_UTC = timezone.utc


class CronError(ValueError):
    """An invalid cron expression or timezone; the message quotes the expression and names the part."""


@dataclass(frozen=True)
class CronSpec:
    """A parsed expression: the values each field allows (day-of-week 0-6, Sunday = 0)."""

    expression: str  # whitespace collapsed; a macro is kept as written (lower case)
    minutes: frozenset[int]
    hours: frozenset[int]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]
    # Vixie rule: both day fields restricted → a day matches if either matches.
    day_or: bool = False
    _minutes_sorted: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _hours_sorted: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_minutes_sorted", tuple(sorted(self.minutes)))
        object.__setattr__(self, "_hours_sorted", tuple(sorted(self.hours)))

    def day_matches(self, day: date) -> bool:
        """Whether the schedule runs at all on this calendar day."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days_of_month
        dow = (day.weekday() + 1) % 7 in self.days_of_week  # Python: Monday = 0; cron: Sunday = 0
        return (dom or dow) if self.day_or else (dom and dow)

    def matches(self, local: datetime) -> bool:
        """Whether the naive local wall time (minute resolution) is one the schedule names."""
        return local.minute in self.minutes and local.hour in self.hours and self.day_matches(local.date())

    def walls(self, after: datetime, until: datetime | None = None) -> Iterator[datetime]:
        """The matching naive wall minutes w, after < w (<= until), in order. Skips whole months,
        days and hours that cannot match, so rare expressions are found quickly."""
        first = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = first.date()
        last_day = until.date() if until is not None else date(min(day.year + _SEARCH_YEARS, 9999), 12, 31)
        while day <= last_day:
            if day.month not in self.months:
                day = date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)
                continue
            if self.day_matches(day):
                on_first_day = day == first.date()
                hours = self._hours_sorted
                for hour in hours[bisect_left(hours, first.hour):] if on_first_day else hours:
                    minutes = self._minutes_sorted
                    if on_first_day and hour == first.hour:
                        minutes = minutes[bisect_left(minutes, first.minute):]
                    for minute in minutes:
                        wall = datetime.combine(day, time(hour, minute))
                        if until is not None and wall > until:
                            return
                        yield wall
            if day == date.max:
                return
            day += timedelta(days=1)


def _bad(expression: str, message: str) -> CronError:
    return CronError(f"invalid cron {expression!r}: {message}")


def _value(expression: str, name: str, token: str, part: str) -> int:
    names = _NAMES.get(name, {})
    if token.upper() in names:
        return names[token.upper()]
    if not token.isdigit():
        allowed = {"month": " or JAN-DEC", "day-of-week": " or SUN-SAT"}.get(name, "")
        raise _bad(expression, f"{name} {part!r} is not a number{allowed}")
    value = int(token)
    lo, hi = _RANGES[name]
    if not lo <= value <= hi:
        raise _bad(expression, f"{name} {part!r} is out of range {lo}-{hi}")
    return value


def _parse_field(expression: str, name: str, text: str) -> frozenset[int]:
    lo, hi = _RANGES[name]
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise _bad(expression, f"{name} {text!r} has an empty list item")
        match = _ITEM_RE.match(item)
        if not match:
            raise _bad(expression, f"{name} {item!r} is not a value, range (a-b) or step (*/s, a-b/s)")
        step = int(match["step"]) if match["step"] is not None else 1
        if step == 0:
            raise _bad(expression, f"{name} {item!r} has step 0; a step must be 1 or more")
        if match["star"]:
            start, stop = lo, hi
        else:
            start = _value(expression, name, match["a"], item if match["b"] is None and match["step"] is None else match["a"])
            if match["b"] is not None:
                stop = _value(expression, name, match["b"], match["b"])
                if stop < start:
                    raise _bad(expression, f"{name} {item!r} is a reversed range ({start} > {stop})")
            else:
                # `a/s` runs from a to the field's end; a bare `a` is the one value
                stop = hi if match["step"] is not None else start
        values.update(range(start, stop + 1, step))
    if name == "day-of-week" and 7 in values:  # 7 is Sunday too
        values.discard(7)
        values.add(0)
    return frozenset(values)


def parse_cron(expression: str) -> CronSpec:
    """Parse and validate a five-field cron expression or macro; raises CronError."""
    if not isinstance(expression, str):
        raise CronError(f"invalid cron {expression!r}: expected a string, got {type(expression).__name__}")
    normalised = " ".join(expression.split())
    if not normalised:
        raise _bad(expression, "the expression is empty; expected 5 fields (minute hour day-of-month month day-of-week)")
    if normalised.startswith("@"):
        macro = normalised.lower()
        if macro not in MACROS:
            raise _bad(normalised, f"unknown macro {normalised!r}; known: {', '.join(sorted(MACROS))}")
        fields = MACROS[macro].split()
        normalised = macro
    else:
        fields = normalised.split(" ")
        if len(fields) != 5:
            raise _bad(normalised, f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}")
    parsed = [_parse_field(normalised, name, text) for name, text in zip(FIELD_NAMES, fields)]
    # Vixie cron: a day field that starts with `*` (even `*/2`) counts as unrestricted.
    day_or = not fields[2].startswith("*") and not fields[4].startswith("*")
    spec = CronSpec(normalised, *parsed, day_or=day_or)
    if not day_or and not any(day <= _month_days(month) for month in spec.months for day in spec.days_of_month):
        months = ", ".join(calendar.month_abbr[m].upper() for m in sorted(spec.months))
        raise _bad(normalised, f"never fires: day-of-month {fields[2]!r} does not occur in month {fields[3]!r} ({months})")
    return spec


def _month_days(month: int) -> int:
    return 29 if month == 2 else calendar.monthrange(2001, month)[1]  # Feb 29 exists in leap years


def zone(tz: str | ZoneInfo) -> ZoneInfo:
    """A ZoneInfo from a zone name; CronError names an unknown one."""
    if isinstance(tz, ZoneInfo):
        return tz
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise CronError(f"unknown timezone {tz!r}") from None


def _wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


def resolve_wall(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant a naive wall time fires at: its first occurrence, or the end of the
    spring-forward gap it falls into."""
    instant = wall.replace(tzinfo=tz, fold=0).astimezone(_UTC)  # fold=0: the earlier occurrence
    if _wall(instant, tz) == wall:
        return instant
    # In a gap: fold=1 reads the wall with the offset after the switch (an instant before the
    # switch), fold=0 with the one before (an instant after it); the switch lies in between.
    # Find the first second whose wall time is past `wall`.
    lo, hi = sorted(int(wall.replace(tzinfo=tz, fold=f).astimezone(_UTC).timestamp()) for f in (0, 1))
    hi += 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(datetime.fromtimestamp(mid, _UTC), tz) > wall:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, _UTC)


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(_UTC)


def fire_times(spec: CronSpec, tz: str | ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The aware UTC instants u, start < u <= end, at which the schedule fires in `tz`.

    Walls map to instants monotonically (gap walls all to the gap's end, repeated walls to their
    first occurrence), so only walls after wall(start) can fire after `start`, and only walls up
    to wall(end) (plus the repeated hour, when `end` lies in its second pass) by `end`. A one-
    minute window therefore looks at one wall minute."""
    tz = zone(tz)
    start, end = _aware(start, "start"), _aware(end, "end")
    if end <= start:
        return []
    local_end = end.astimezone(tz)
    until = local_end.replace(tzinfo=None, fold=0)
    if local_end.fold:  # second pass of a repeated hour: walls later than this fired in the first pass
        until += local_end.replace(fold=0).utcoffset() - local_end.utcoffset()
    out: list[datetime] = []
    for wall in spec.walls(_wall(start, tz), until):
        instant = resolve_wall(wall, tz)
        if start < instant <= end and (not out or instant != out[-1]):
            out.append(instant)
    return out


def next_fire_times(spec: CronSpec, tz: str | ZoneInfo, after: datetime, count: int = 3) -> list[datetime]:
    """The next `count` aware UTC fire instants strictly after `after` (same DST rules)."""
    tz = zone(tz)
    after = _aware(after, "after")
    out: list[datetime] = []
    if count <= 0:
        return out
    for wall in spec.walls(_wall(after, tz)):
        instant = resolve_wall(wall, tz)
        if instant > after and (not out or instant != out[-1]):
            out.append(instant)
            if len(out) == count:
                break
    return out
