"""The post calendar's pure parts: which days a week or month view covers, where a dragged post
lands, and where Instagram cuts a caption with "… more". No database, no web framework.

- Weeks start on Monday (ISO); a month view shows the whole weeks that hold the month's days.
- The view's `date` is a day (YYYY-MM-DD); a month view also takes a month (YYYY-MM).
- A post dropped on another day keeps its local wall time (the persona's timezone); the time itself
  is changed in the edit form.
- The feed shows a caption's first CAPTION_LINES lines, at most CAPTION_CHARS characters, cut at the
  last space before that point; the rest is behind "more".
"""

from __future__ import annotations

import calendar as _calendar
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from persona_pipeline.domain import post_states

# What the calendar shows: posts waiting for approval, scheduled, on their way out and published.
STATUSES = (post_states.AWAITING_APPROVAL, post_states.SCHEDULED, post_states.PUBLISHING, post_states.PUBLISHED)
VIEWS = ("month", "week")
CAPTION_CHARS = 125
CAPTION_LINES = 2


class CalendarInputError(ValueError):
    """A view or date the calendar cannot show; the message names the field and the value."""


@dataclass(frozen=True)
class CalendarRange:
    view: str
    anchor: date
    weeks: list[list[date]]  # rows of 7 days, Monday first
    title: str
    previous: date
    next: date

    @property
    def first(self) -> date:
        return self.weeks[0][0]

    @property
    def last(self) -> date:
        return self.weeks[-1][-1]

    def in_view(self, day: date) -> bool:
        """Whether `day` belongs to what the view is about (a month view also shows its edge weeks)."""
        if self.view == "month":
            return (day.year, day.month) == (self.anchor.year, self.anchor.month)
        return self.first <= day <= self.last


def parse_view(value: str | None) -> str:
    if value in (None, ""):
        return "month"
    if value not in VIEWS:
        raise CalendarInputError(f"view {value[:20]!r} is not one of: {', '.join(VIEWS)}")
    return value


def parse_day(value: str | None, today: date, *, field: str = "date", month_ok: bool = False) -> date:
    """A day as YYYY-MM-DD (or a month as YYYY-MM, read as its 1st, where `month_ok`); `today` when empty."""
    if value in (None, ""):
        return today
    text = value.strip()
    formats = ("%Y-%m-%d", "%Y-%m") if month_ok else ("%Y-%m-%d",)
    for fmt in formats:
        try:
            parsed = datetime.strptime(text, fmt).date()
        except ValueError:
            continue
        if len(text) == len(parsed.strftime(fmt)):  # no "2026-1-5": one spelling per day
            return parsed
    shape = "a day like 2026-03-09 or a month like 2026-03" if month_ok else "a day like 2026-03-09"
    raise CalendarInputError(f"{field} {value[:40]!r} is not {shape}")


def week_of(day: date) -> list[date]:
    monday = day - timedelta(days=day.weekday())
    return [monday + timedelta(days=i) for i in range(7)]


def month_weeks(year: int, month: int) -> list[list[date]]:
    """The Monday-first weeks that hold the month's days (4 to 6 rows)."""
    return _calendar.Calendar(firstweekday=0).monthdatescalendar(year, month)


def calendar_range(view: str, anchor: date) -> CalendarRange:
    if view == "week":
        days = week_of(anchor)
        title = f"Week of {days[0]:%d %b %Y}"
        return CalendarRange(view, days[0], [days], title, days[0] - timedelta(days=7), days[0] + timedelta(days=7))
    first = anchor.replace(day=1)
    previous = (first - timedelta(days=1)).replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return CalendarRange(view, first, month_weeks(first.year, first.month), f"{first:%B %Y}", previous, following)


def same_time_on(slot_local: datetime, day: date) -> str:
    """The datetime-local text ("2026-03-09T12:30") of `slot_local`'s wall time on `day`: where a
    post dropped on `day` goes (the form's own parser then reads it in the persona's timezone)."""
    return f"{day.isoformat()}T{slot_local:%H:%M}"


def caption_cut(caption: str, chars: int = CAPTION_CHARS, lines: int = CAPTION_LINES) -> tuple[str, str]:
    """(what the feed shows, what "more" hides) of a caption: the first `lines` lines, at most
    `chars` characters, cut at the last space before the limit (mid-word only for a word longer
    than the limit). ("whole caption", "") when it fits."""
    kept = "\n".join(caption.split("\n")[:lines])
    if len(kept) <= chars and len(kept) == len(caption):
        return caption, ""
    if len(kept) > chars:
        space = kept.rfind(" ", 0, chars + 1)
        kept = kept[:space] if space > 0 else kept[:chars]
    kept = kept.rstrip()
    return kept, caption[len(kept):].lstrip()
