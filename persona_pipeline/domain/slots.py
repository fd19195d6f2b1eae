"""Posting slots inside a persona's local posting windows."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from typing import Iterable
from zoneinfo import ZoneInfo


def in_window(moment: datetime, windows: list[tuple[time, time]], tz_name: str) -> bool:
    """Whether a moment falls inside one of the posting windows, read in the persona's timezone."""
    local = moment.astimezone(ZoneInfo(tz_name)).timetz().replace(tzinfo=None)
    return any(ws <= local < we or (we == time.max and local >= ws) for ws, we in windows)


def next_free_slot(
    after: datetime,
    windows: list[tuple[time, time]],
    tz_name: str,
    taken: Iterable[datetime],
    min_gap: timedelta,
    horizon_days: int = 60,
) -> datetime:
    """Earliest moment at or after `after` that lies inside a posting window (persona's local
    time) and is at least `min_gap` from every taken slot of the same account. Returns UTC.

    Candidate moments are `after` itself, each window start, and each taken slot + min_gap, so the
    result is exact without scanning minute by minute.
    """
    if after.tzinfo is None:
        raise ValueError("`after` must be timezone-aware")
    tz = ZoneInfo(tz_name)
    taken = sorted(t.astimezone(timezone.utc) for t in taken)
    start_utc = after.astimezone(timezone.utc).replace(microsecond=0)
    local_start = start_utc.astimezone(tz)

    def free(moment: datetime) -> bool:
        return all(abs(moment - t) >= min_gap for t in taken)

    candidates = {start_utc}
    for day in range(horizon_days + 1):
        local_day = (local_start + timedelta(days=day)).date()
        for window_start, _ in windows:
            moment = datetime.combine(local_day, window_start, tzinfo=tz).astimezone(timezone.utc)
            if moment >= start_utc:
                candidates.add(moment)
    candidates.update(t + min_gap for t in taken if t + min_gap >= start_utc)
    for moment in sorted(candidates):
        if in_window(moment, windows, tz_name) and free(moment):
            return moment
    raise ValueError(f"no free posting slot within {horizon_days} days of {after.isoformat()}")


def spaced_slots(
    now: datetime,
    count: int,
    every: timedelta,
    windows: list[tuple[time, time]],
    tz_name: str,
    taken: Iterable[datetime],
    min_gap: timedelta,
    until: datetime,
) -> list[datetime]:
    """Up to `count` free slots before `until`, about `every` apart, queued after the last taken
    slot (so new posts follow the ones already planned rather than crowding them). UTC."""
    taken = sorted(t.astimezone(timezone.utc) for t in taken)
    after = now.astimezone(timezone.utc)
    upcoming = [t for t in taken if t >= after]
    if upcoming:
        after = max(after, upcoming[-1] + every)
    out: list[datetime] = []
    for _ in range(max(0, count)):
        try:
            slot = next_free_slot(after, windows, tz_name, taken + out, min_gap)
        except ValueError:
            break
        if slot >= until:
            break
        out.append(slot)
        after = slot + every
    return out
