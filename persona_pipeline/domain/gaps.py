"""Content-pillar gap analysis over the coming days, as the older content planner did it
(docs/rules.md#gap-analysis).

Over a horizon of `days` (30) starting today:
- total posts = ⌈posts_per_week × days / 7⌉ (3/week over 30 days: ⌈12.86⌉ = 13);
- a pillar needs ⌈total × weight / 100⌉ (weights 40/35/25 → 6/5/4);
- available = its approved, not yet posted images (the caller counts them);
- gap = needed − available (negative when there is a surplus);
- status, first rule that applies: `exhausted` (nothing available), `critical` (gap > 5),
  `low` (gap > 0), else `ready`.

Rules the reference leaves open, decided here:
- Date window: a pillar's `starts_on`..`ends_on` (both inclusive, either open) is compared with the
  horizon [today, today + days). No overlap: the pillar needs 0. Partial overlap: the need is
  scaled by the overlapping days, ⌈total × weight/100 × overlap/days⌉, so a pillar that runs for
  the last 3 days is not asked for a month's share.
- `target_posts_per_week` set: it overrides the weight, because it is the more explicit wish:
  needed = ⌈target × active_days / 7⌉ (1/week over 30 days → 5). A target of 0 needs nothing.
- A pillar that needs 0 (out of its window, weight 0 or target 0) is `ready` even with nothing
  available: there is nothing for it to run out of, and it must not head the urgency order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction

STATUSES: tuple[str, ...] = ("exhausted", "critical", "low", "ready")  # most urgent first
CRITICAL_GAP = 5  # a gap above this is critical


@dataclass(frozen=True)
class PillarInput:
    name: str
    weight: int
    priority: int
    available: int
    starts_on: date | None = None
    ends_on: date | None = None
    target_posts_per_week: int | None = None


@dataclass(frozen=True)
class PillarGap:
    name: str
    weight: int
    priority: int
    needed: int
    available: int
    gap: int
    status: str  # exhausted | critical | low | ready


def total_posts(posts_per_week: float = 3, days: int = 30) -> int:
    """Posts due over `days`: ⌈posts_per_week × days / 7⌉."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if posts_per_week < 0 or not math.isfinite(posts_per_week):
        raise ValueError(f"posts_per_week must be a finite number >= 0, got {posts_per_week}")
    # Exact decimal arithmetic: 3.5/week must not become ⌈x.0000000001⌉ through float error.
    return math.ceil(Fraction(str(posts_per_week)) * days / 7)


def active_days(pillar: PillarInput, today: date, days: int) -> int:
    """Days of the horizon [today, today + days) inside the pillar's inclusive date window."""
    first = max(today, pillar.starts_on) if pillar.starts_on else today
    last = today + timedelta(days=days - 1)
    if pillar.ends_on and pillar.ends_on < last:
        last = pillar.ends_on
    return max(0, (last - first).days + 1)


def status_of(available: int, gap: int, needed: int) -> str:
    """The reference's status rules, plus: a pillar that needs nothing is ready."""
    if needed == 0:
        return "ready"
    if available == 0:
        return "exhausted"
    if gap > CRITICAL_GAP:
        return "critical"
    if gap > 0:
        return "low"
    return "ready"


def urgency_key(gap: PillarGap) -> tuple[int, int, int, str]:
    """Sort key, most urgent first: status severity, larger gap, higher priority (1), name."""
    return STATUSES.index(gap.status), -gap.gap, gap.priority, gap.name


def _check(pillar: PillarInput) -> None:
    where = f"pillar {pillar.name!r}"
    if not pillar.name:
        raise ValueError("pillar name is empty")
    if not 0 <= pillar.weight <= 100:
        raise ValueError(f"{where}: weight must be 0-100, got {pillar.weight}")
    if not 1 <= pillar.priority <= 5:
        raise ValueError(f"{where}: priority must be 1-5, got {pillar.priority}")
    if pillar.available < 0:
        raise ValueError(f"{where}: available must be >= 0, got {pillar.available}")
    if pillar.target_posts_per_week is not None and pillar.target_posts_per_week < 0:
        raise ValueError(f"{where}: target_posts_per_week must be >= 0, got {pillar.target_posts_per_week}")
    if pillar.starts_on and pillar.ends_on and pillar.ends_on < pillar.starts_on:
        raise ValueError(f"{where}: ends_on {pillar.ends_on} is before starts_on {pillar.starts_on}")


def analyse_gaps(pillars: Sequence[PillarInput], today: date, *, days: int = 30,
                 posts_per_week: float = 3) -> list[PillarGap]:
    """One `PillarGap` per pillar, most urgent first (see the module docstring for the rules)."""
    total = total_posts(posts_per_week, days)
    seen: set[str] = set()
    out: list[PillarGap] = []
    for pillar in pillars:
        _check(pillar)
        if pillar.name in seen:
            raise ValueError(f"pillar {pillar.name!r} appears twice")
        seen.add(pillar.name)
        active = active_days(pillar, today, days)
        if pillar.target_posts_per_week is not None:
            needed = -(-pillar.target_posts_per_week * active // 7)
        else:
            needed = math.ceil(Fraction(total * pillar.weight, 100) * Fraction(active, days))
        gap = needed - pillar.available
        out.append(PillarGap(pillar.name, pillar.weight, pillar.priority, needed, pillar.available, gap,
                             status_of(pillar.available, gap, needed)))
    return sorted(out, key=urgency_key)
