"""Which library image goes into which free posting slot, as the older content planner decided it
(docs/rules.md#posting-strategy): the pillar furthest below its weight over the last 30 days,
variety rules for themes, a weekly post cap, and relaxation when the rules leave nothing.

Rules, per slot, slots taken in time order (each slot gets at most one post, each option is used
at most once):
- Weekly cap: no half-open 7-day window [t, t + 7 days) may hold more than `weekly_cap` posts,
  counting `history` (published and already planned/scheduled posts, past or future) and the posts
  planned earlier in this call. The cap is the audience-facing budget, so it is never relaxed: a
  slot that would break it is skipped with the reason.
- Pillar order: target share = weight / sum of the weights of the pillars active on the slot's
  local date (`starts_on`..`ends_on`, both inclusive, in `tz`); actual share = the pillar's posts /
  all posts (any pillar, or none) in [slot − share_days, slot). Largest target − actual first;
  ties: priority (1 first), then name. A pillar with no eligible option falls through to the next;
  unassigned options (pillar_id None) come after every pillar. With `share_bounds` (the learning
  strategy's (min, max) shares), the posts in [slot − bound_days, slot) plus this one decide first:
  a pillar that would fall below its minimum if this slot went elsewhere comes before every other,
  and one this post would lift above its maximum after every other. So a target at its bound
  cannot round its pillar past the bound the operator set.
- Themes: the theme key is the theme casefolded with whitespace collapsed; "" means no theme and
  is never limited. A post may not be closer than `theme_spacing` (strictly less) to a post with the
  same key, in either direction; no 7-day window may hold more than `theme_max_per_week` posts of
  one key.
- Item order within a pillar: highest score first (None last), then lowest item_id.

Rules the reference leaves open, decided here:
- Relaxation: when nothing fits under all rules, drop rules cumulatively in RELAXATION_ORDER:
  (1) `theme_spacing`, (2) `theme_max_per_week`, (3) `zero_weight_pillar`: weight-0 pillars that
  are active on the date become eligible (target 0, so ordered by their recent share). A pillar's
  date window is never relaxed (seasonal content out of season is wrong, not merely repetitive),
  and neither is the weekly cap: such a slot is skipped. `PlannedPost.relaxed` lists the rules the
  chosen post actually breaks, in that order, so a strict pick has `()`.
- Windows and spacing are measured in absolute time (UTC), so a 7-day window across a DST change
  is 168 hours; the local date in `tz` is used only for pillar date windows.
- Unassigned options are eligible under the strict rules (after every weighted pillar); their
  posts count towards the total share denominator, never towards a pillar.
- Weight-0 or inactive pillars get no posts under the strict rules; if no active pillar has a
  weight, every target is 0 and only unassigned options (then weight-0 pillars) are picked.
- History posts whose pillar is unknown or None count towards the total, never towards a pillar.
- Determinism: inputs are sorted internally (slots by time; options by score, then item_id;
  pillars by share gap, priority, name) and shares are exact fractions, so the same state gives
  the same plan in any input order. Duplicate slots (the same instant) are one slot; returned
  slots are in UTC.
- Validation (ValueError naming the value): naive datetimes, unknown `tz`, weight outside 0-100,
  priority outside 1-5, `ends_on` before `starts_on`, duplicate pillar ids or names, duplicate
  item ids, options naming an unknown pillar, non-finite scores, rules out of range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEK = timedelta(days=7)
THEME_SPACING = "theme_spacing"
THEME_MAX_PER_WEEK = "theme_max_per_week"
ZERO_WEIGHT_PILLAR = "zero_weight_pillar"
RELAXATION_ORDER: tuple[str, ...] = (THEME_SPACING, THEME_MAX_PER_WEEK, ZERO_WEIGHT_PILLAR)


@dataclass(frozen=True)
class StrategyPillar:
    pillar_id: int
    name: str
    weight: int
    priority: int
    starts_on: date | None = None
    ends_on: date | None = None


@dataclass(frozen=True)
class LibraryOption:
    item_id: int
    pillar_id: int | None
    theme: str
    score: float | None


@dataclass(frozen=True)
class PastPost:
    """A published or already planned/scheduled post (timezone-aware `at`)."""
    pillar_id: int | None
    theme: str
    at: datetime


@dataclass(frozen=True)
class StrategyRules:
    theme_spacing: timedelta = timedelta(days=2)
    theme_max_per_week: int = 3
    weekly_cap: int = 5
    share_days: int = 30
    # The learning bounds are held over a quarter (about 39 posts at 3 a week), not over share_days:
    # over 30 days (13 posts) one post is 7.7 points, so holding a ±15-point bound there would
    # push the learner off targets the operator allowed (docs/insights.md, "the bounds").
    bound_days: int = 90


@dataclass(frozen=True)
class PlannedPost:
    item_id: int
    pillar_id: int | None
    theme: str
    slot: datetime  # UTC
    relaxed: tuple[str, ...]  # rules this post breaks, in RELAXATION_ORDER
    reason: str


@dataclass(frozen=True)
class StrategyPlan:
    posts: list[PlannedPost] = field(default_factory=list)
    skipped: list[tuple[datetime, str]] = field(default_factory=list)  # (slot in UTC, why)


@dataclass(frozen=True)
class _Post:
    pillar_id: int | None
    theme_key: str
    at: datetime  # UTC


def theme_key(theme: str) -> str:
    """Comparison key of a theme: casefolded, whitespace collapsed; "" is no theme."""
    return " ".join(theme.split()).casefold()


def _utc(moment: datetime, what: str) -> datetime:
    if not isinstance(moment, datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {moment!r}")
    return moment.astimezone(timezone.utc)


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown timezone tz={tz!r}") from exc


def _check_rules(rules: StrategyRules) -> None:
    if rules.theme_spacing < timedelta(0):
        raise ValueError(f"rules.theme_spacing must be >= 0, got {rules.theme_spacing}")
    if rules.theme_max_per_week < 1:
        raise ValueError(f"rules.theme_max_per_week must be >= 1, got {rules.theme_max_per_week}")
    if rules.weekly_cap < 0:
        raise ValueError(f"rules.weekly_cap must be >= 0, got {rules.weekly_cap}")
    if rules.share_days < 1:
        raise ValueError(f"rules.share_days must be >= 1, got {rules.share_days}")
    if rules.bound_days < 1:
        raise ValueError(f"rules.bound_days must be >= 1, got {rules.bound_days}")


def _check_pillars(pillars: Sequence[StrategyPillar]) -> dict[int, StrategyPillar]:
    by_id: dict[int, StrategyPillar] = {}
    names: set[str] = set()
    for pillar in pillars:
        where = f"pillar {pillar.name!r} (id {pillar.pillar_id})"
        if not pillar.name:
            raise ValueError(f"pillar id {pillar.pillar_id}: name is empty")
        if not 0 <= pillar.weight <= 100:
            raise ValueError(f"{where}: weight must be 0-100, got {pillar.weight}")
        if not 1 <= pillar.priority <= 5:
            raise ValueError(f"{where}: priority must be 1-5, got {pillar.priority}")
        if pillar.starts_on and pillar.ends_on and pillar.ends_on < pillar.starts_on:
            raise ValueError(f"{where}: ends_on {pillar.ends_on} is before starts_on {pillar.starts_on}")
        if pillar.pillar_id in by_id:
            raise ValueError(f"pillar id {pillar.pillar_id} appears twice")
        if pillar.name in names:
            raise ValueError(f"pillar name {pillar.name!r} appears twice")
        by_id[pillar.pillar_id] = pillar
        names.add(pillar.name)
    return by_id


def _check_options(options: Sequence[LibraryOption], pillars: dict[int, StrategyPillar]) -> list[LibraryOption]:
    seen: set[int] = set()
    for option in options:
        if option.item_id in seen:
            raise ValueError(f"library item id {option.item_id} appears twice")
        seen.add(option.item_id)
        if option.pillar_id is not None and option.pillar_id not in pillars:
            raise ValueError(f"library item #{option.item_id}: unknown pillar id {option.pillar_id}")
        if option.score is not None and not math.isfinite(option.score):
            raise ValueError(f"library item #{option.item_id}: score must be finite, got {option.score}")
    # Best first: highest score, unscored last, then lowest id.
    return sorted(options, key=lambda o: (o.score is None, -(o.score or 0.0), o.item_id))


def _active(pillar: StrategyPillar, day: date) -> bool:
    return (pillar.starts_on is None or pillar.starts_on <= day) and (pillar.ends_on is None or day <= pillar.ends_on)


def _breaks_window_limit(times: list[datetime], slot: datetime, limit: int) -> tuple[datetime, datetime] | None:
    """With `slot` added, the first and last of `limit` + 1 posts that fit in one half-open 7-day
    window containing the slot, or None. Posts fit in one [t, t + 7d) iff last − first < 7 days."""
    near = sorted([t for t in times if abs(t - slot) < WEEK] + [slot])
    mine = near.index(slot)  # any copy of the slot's instant works: equal times span 0 either way
    for first in range(max(0, mine - limit), mine + 1):
        last = first + limit
        if last < len(near) and near[last] - near[first] < WEEK:
            return near[first], near[last]
    return None


def weekly_cap_refusal(times: Sequence[datetime], slot: datetime, cap: int) -> str | None:
    """Why a post at `slot` would break the weekly cap given the account's other posts at `times`
    (UTC), or None when it fits: the one cap check, used by the planner and by a reviewer's move."""
    over = _breaks_window_limit(list(times), slot, cap)
    if over is None:
        return None
    return (f"weekly cap {cap} reached: {cap + 1} posts would fall within 7 days "
            f"({over[0]:%Y-%m-%d %H:%M} to {over[1]:%Y-%m-%d %H:%M} UTC)")


def _pct(value: Fraction) -> str:
    return f"{float(value):.0%}"


def _score(score: float | None) -> str:
    if score is None:
        return "unscored"
    return f"score {score:g}"


def plan_posts(*, slots: Sequence[datetime], pillars: Sequence[StrategyPillar], options: Sequence[LibraryOption],
               history: Sequence[PastPost], rules: StrategyRules, tz: str,
               target_shares: Mapping[int, Fraction] | None = None,
               share_bounds: Mapping[int, tuple[Fraction, Fraction]] | None = None,
               pillar_notes: Mapping[int, str] | None = None) -> StrategyPlan:
    """Fill `slots` from `options` (see the module docstring for the rules). `target_shares` (pillar
    id -> share, from the learning strategy, domain/learning.py) replace weight / total weight as the
    targets, renormalised over the pillars active on the slot's date; `share_bounds` (pillar id ->
    (min, max) share, the operator's learning bounds) are held over `rules.bound_days`; `pillar_notes` are added to the
    reason of each post of that pillar. Without them the plan is exactly the weights' plan."""
    _check_rules(rules)
    zone = _zone(tz)
    by_id = _check_pillars(pillars)
    ordered_options = _check_options(options, by_id)
    slot_times = sorted({_utc(s, "slot") for s in slots})
    posts = sorted((_Post(p.pillar_id, theme_key(p.theme), _utc(p.at, f"history post ({p.theme!r})")) for p in history),
                   key=lambda p: (p.at, p.pillar_id is None, p.pillar_id or 0, p.theme_key))
    used: set[int] = set()
    plan = StrategyPlan()

    for slot in slot_times:
        why = weekly_cap_refusal([p.at for p in posts], slot, rules.weekly_cap)
        if why is not None:
            plan.skipped.append((slot, why))
            continue
        post = _plan_slot(slot, zone, by_id, ordered_options, used, posts, rules, target_shares, share_bounds or {},
                          pillar_notes or {})
        if isinstance(post, str):
            plan.skipped.append((slot, post))
            continue
        plan.posts.append(post)
        used.add(post.item_id)
        posts.append(_Post(post.pillar_id, theme_key(post.theme), slot))
    return plan


def _plan_slot(slot: datetime, zone: ZoneInfo, by_id: dict[int, StrategyPillar], options: list[LibraryOption],
               used: set[int], posts: list[_Post], rules: StrategyRules, target_shares: Mapping[int, Fraction] | None,
               share_bounds: Mapping[int, tuple[Fraction, Fraction]], pillar_notes: Mapping[int, str]) -> PlannedPost | str:
    """The post for one slot, or why there is none."""
    day = slot.astimezone(zone).date()
    active = [p for p in by_id.values() if _active(p, day)]
    total_weight = sum(p.weight for p in active)
    learned_total = sum(target_shares.get(p.pillar_id, Fraction(0)) for p in active) if target_shares else 0
    recent = [p for p in posts if slot - timedelta(days=rules.share_days) <= p.at < slot]
    counts: dict[int | None, int] = {}
    for p in recent:
        counts[p.pillar_id] = counts.get(p.pillar_id, 0) + 1

    def target(pillar: StrategyPillar) -> Fraction:
        if target_shares is not None and learned_total:
            return target_shares.get(pillar.pillar_id, Fraction(0)) / learned_total
        return Fraction(pillar.weight, total_weight) if total_weight else Fraction(0)

    def actual(pillar: StrategyPillar) -> Fraction:
        return Fraction(counts.get(pillar.pillar_id, 0), len(recent)) if recent else Fraction(0)

    bounded = [p for p in posts if slot - timedelta(days=rules.bound_days) <= p.at < slot] if share_bounds else []
    bounded_counts: dict[int | None, int] = {}
    for p in bounded:
        bounded_counts[p.pillar_id] = bounded_counts.get(p.pillar_id, 0) + 1

    def share_with(pillar: StrategyPillar, extra: int) -> Fraction:
        """The pillar's share of the bound window once this slot is filled, `extra` posts of it here."""
        return Fraction(bounded_counts.get(pillar.pillar_id, 0) + extra, len(bounded) + 1)

    def under_floor(pillar: StrategyPillar) -> bool:
        return pillar.pillar_id in share_bounds and share_with(pillar, 0) < share_bounds[pillar.pillar_id][0]

    def over_cap(pillar: StrategyPillar) -> bool:
        return pillar.pillar_id in share_bounds and share_with(pillar, 1) > share_bounds[pillar.pillar_id][1]

    ranked = sorted(active, key=lambda p: (not under_floor(p), over_cap(p), actual(p) - target(p), p.priority, p.name))
    weighted = [p for p in ranked if p.weight > 0]
    zero_weight = [p for p in ranked if p.weight == 0]

    # What each theme would break in this slot: computed once per theme, not per option.
    broken_cache: dict[str, tuple[str, ...]] = {}

    def broken(option: LibraryOption) -> tuple[str, ...]:
        key = theme_key(option.theme)
        if not key:
            return ()
        if key not in broken_cache:
            same = [p.at for p in posts if p.theme_key == key]
            rules_broken = []
            if any(abs(t - slot) < rules.theme_spacing for t in same):
                rules_broken.append(THEME_SPACING)
            if _breaks_window_limit(same, slot, rules.theme_max_per_week) is not None:
                rules_broken.append(THEME_MAX_PER_WEEK)
            broken_cache[key] = tuple(rules_broken)
        return broken_cache[key]

    free = [o for o in options if o.item_id not in used]
    groups: list[StrategyPillar | None] = [*weighted, None]  # None: the unassigned options
    for level in range(len(RELAXATION_ORDER) + 1):
        dropped = set(RELAXATION_ORDER[:level])
        if ZERO_WEIGHT_PILLAR in dropped:
            groups = [*weighted, None, *zero_weight]
        passed: list[str] = []
        for group in groups:
            group_id = group.pillar_id if group else None
            for option in free:
                if option.pillar_id != group_id:
                    continue
                breaks = broken(option)
                if set(breaks) <= dropped:
                    relaxed = tuple(r for r in RELAXATION_ORDER
                                    if r in breaks or (r == ZERO_WEIGHT_PILLAR and group and group.weight == 0))
                    if group is None:
                        head = "unassigned image (no pillar had an eligible option)"
                    else:
                        head = (f"pillar {group.name}: target {_pct(target(group))} vs {_pct(actual(group))} "
                                f"({counts.get(group.pillar_id, 0)} of {len(recent)} posts) "
                                f"in the last {rules.share_days} days")
                        by_target = sorted(weighted, key=lambda p: (actual(p) - target(p), p.priority, p.name))
                        ahead = by_target[:by_target.index(group)] if group in by_target else []
                        head += _bound_note(group, [p for p in ahead if over_cap(p)], under_floor(group),
                                            share_bounds, rules.bound_days)
                        if group.pillar_id in pillar_notes:
                            head += f"; learned: {pillar_notes[group.pillar_id]}"
                    return PlannedPost(option.item_id, option.pillar_id, option.theme, slot, relaxed,
                                       _reason(head, option, passed if group else [], relaxed))
            passed.append(group.name if group else "unassigned")
    if not free:
        return "no unused library option left"
    inactive = sorted({by_id[o.pillar_id].name for o in free if o.pillar_id is not None} - {p.name for p in active})
    return (f"no eligible option: the {len(free)} unused option(s) belong to pillars outside their date window on "
            f"{day}: {', '.join(inactive)}")


def _bound_note(chosen: StrategyPillar, capped: list[StrategyPillar], floored: bool,
                bounds: Mapping[int, tuple[Fraction, Fraction]], days: int) -> str:
    """Why the operator's share bounds placed this pillar where the targets alone would not: it was
    about to fall below its minimum, or pillars ahead of it by target (`capped`) were at their maximum."""
    notes = []
    if floored:
        notes.append(f"kept at its minimum {_pct(bounds[chosen.pillar_id][0])}")
    if capped:
        notes.append(", ".join(f"{p.name} held at its maximum {_pct(bounds[p.pillar_id][1])}" for p in capped))
    return f"; {'; '.join(notes)} over the last {days} days" if notes else ""


def _reason(head: str, option: LibraryOption, passed: list[str], relaxed: tuple[str, ...]) -> str:
    text = f"{head}; best unused image #{option.item_id} ({_score(option.score)})"
    if passed:
        text += f"; nothing eligible in {', '.join(passed)}"
    if relaxed:
        text += f"; relaxed {', '.join(relaxed)}"
    return text
