"""Freshness: is a persona's posting calendar, and its stock of approved images, far enough ahead?

- calendar: the live scheduled posts must reach at least `min_days` into the future;
- library: the approved images not posted yet must last at least `min_days` at the persona's
  posting rate (posts_per_week).

A persona that does not post (posts_per_week 0) is fresh by definition. Pure: the caller reads the
numbers from the database (persona_pipeline.db.freshness).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

CALENDAR_CHECK = "calendar_covers_ahead"
LIBRARY_CHECK = "library_runway"


@dataclass(frozen=True)
class FreshnessResult:
    now: datetime
    min_days: float
    posts_per_week: float
    scheduled: int  # live scheduled posts still ahead
    awaiting_approval: int
    unposted: int  # approved library images not posted yet
    covered_days: float  # how far the latest scheduled post reaches; 0 when none
    runway_days: float  # how long the unposted images last at posts_per_week; inf at rate 0
    calendar_ok: bool
    library_ok: bool
    calendar_text: str
    library_text: str

    def ok(self, check: str) -> bool:
        return {CALENDAR_CHECK: self.calendar_ok, LIBRARY_CHECK: self.library_ok}[check]

    def text(self, check: str) -> str:
        return {CALENDAR_CHECK: self.calendar_text, LIBRARY_CHECK: self.library_text}[check]


def _days(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.1f}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def evaluate(*, now: datetime, upcoming: Iterable[datetime], awaiting_approval: int, unposted: int,
             posts_per_week: float, min_days: float) -> FreshnessResult:
    """The two freshness verdicts. `upcoming`: the slots of live scheduled posts (times not after
    `now` are ignored); `now` and the slots are timezone-aware."""
    ahead = [t for t in upcoming if t > now]
    covered = max(((t - now).total_seconds() / 86400 for t in ahead), default=0.0)
    posting = posts_per_week > 0
    calendar_ok = covered >= min_days or not posting
    waiting = f"; {awaiting_approval} more await approval" if awaiting_approval else ""
    if not posting:
        calendar_text = "posts_per_week is 0: nothing needs scheduling"
    elif not ahead:
        calendar_text = f"no posts scheduled ahead (0 days {'>=' if calendar_ok else '<'} {min_days:g}){waiting}"
    else:
        calendar_text = (f"{_plural(len(ahead), 'scheduled post')} {'covers' if len(ahead) == 1 else 'cover'} "
                         f"{_days(covered)} days ahead "
                         f"({'>=' if calendar_ok else '<'} {min_days:g}){waiting}")

    runway = unposted / (posts_per_week / 7) if posting else math.inf
    library_ok = runway >= min_days
    if not posting:
        library_text = f"posts_per_week is 0: {_plural(unposted, 'approved unposted image')} last indefinitely"
    else:
        library_text = (f"{_plural(unposted, 'approved unposted image')} {'lasts' if unposted == 1 else 'last'} "
                        f"{_days(runway)} days at "
                        f"{posts_per_week:g} posts/week ({'>=' if library_ok else '<'} {min_days:g})")
    return FreshnessResult(now=now, min_days=min_days, posts_per_week=posts_per_week, scheduled=len(ahead),
                           awaiting_approval=awaiting_approval, unposted=unposted, covered_days=covered,
                           runway_days=runway, calendar_ok=calendar_ok, library_ok=library_ok,
                           calendar_text=calendar_text, library_text=library_text)
