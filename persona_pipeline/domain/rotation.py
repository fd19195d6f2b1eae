"""Topic rotation: which pillar each planned prompt is for, and which theme it is about.

Two rotations, both driven by a small state per pillar (`RotationState`) that the database keeps
between plans (db/rotation.py), so a restart goes on where the last plan stopped:

- Pillars, in proportion to their weights (`rotate_pillars`). Each pillar has a *credit*: how far
  it is behind its share, in weight units (picks × weight − total weight × times picked). Every
  pick goes to the pillar whose next turn is due soonest (earliest deadline first) among those not
  ahead of their share. Over any run of picks with the same pillars and weights, each pillar's
  count stays strictly within 1 of `weight share × picks`, and because the credits are kept, this
  holds across plans too: three plans of 2 prompts pick as one plan of 6 would.
- Themes within a pillar, in rounds (`take_themes`): each round is the pillar's theme list in a
  seeded shuffled order, and a theme is taken only once per round, so no theme comes back before
  all the others have had their turn; a new round never starts with the theme that ended the last.

Pure: no Dagster, no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

from persona_pipeline.domain.content_prompts import guideline_themes

MAX_THEME_CHARS = 200  # content_prompts.theme is a VARCHAR(200)
_EPSILON = 1e-9  # relative tolerance on credits: weights may be fractions (a target's weight)


@dataclass
class RotationState:
    """A pillar's place in the rotation: its credit (see the module docstring), the themes rounds
    completed, and the themes already used in the current round, in the order they were used."""

    credit: float = 0.0
    round: int = 0
    used: list[str] = field(default_factory=list)


def rotation_weight(weight: float, target_posts_per_week: float | None, posts_per_week: float) -> float:
    """The weight a pillar rotates with: its persona.yaml weight, or, when it has a
    `target_posts_per_week`, the weight that target stands for (100 × target / posts per week),
    because the gap analysis lets the target override the weight too (domain/gaps.py). With a
    posting rate of 0 the target itself is used: only such pillars need anything then."""
    if target_posts_per_week is None:
        return float(weight)
    if posts_per_week > 0:
        return 100.0 * target_posts_per_week / posts_per_week
    return float(target_posts_per_week)


def rotate_pillars(weights: Mapping[str, float], states: MutableMapping[str, RotationState], n: int,
                   order: Sequence[str] | None = None) -> list[str]:
    """The pillars of the next `n` picks; updates the credits in `states` (fresh states are added).

    Only pillars of `weights` with a weight above 0 take part; the others' states are left as they
    are, so a pillar that sits a plan out keeps what it was owed. Each pick:
    1. candidates: the taking-part pillars with credit >= 0, i.e. not ahead of their share (all of
       them if none, which only happens after the set of pillars changed);
    2. the winner is the candidate whose next turn is due soonest, (total − credit) / weight picks
       from now; ties go to the pillar that comes first in `order` (the caller's urgency order;
       default: the order of `weights`);
    3. every taking-part pillar's credit grows by its weight and the winner's shrinks by the total.

    Why not nginx's smooth weighted round robin (add the weights, then the largest credit wins):
    it can drift past 1 pick from the exact share with five or more pillars (weights
    82/58/8/1/70/1 reach 1.045), while this earliest-deadline rule with its "not ahead" condition
    is the chairman-assignment schedule whose deviation stays below 1 for any weights (Tijdeman).
    The state is the same credit either way.
    """
    if n < 0:
        raise ValueError(f"number of picks must be >= 0, got {n}")
    bad = {name: w for name, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0}
    if bad:
        raise ValueError(f"pillar weights must be finite numbers >= 0; got {bad}")
    order = list(order) if order is not None else list(weights)
    unknown = [name for name in order if name not in weights]
    if unknown:
        raise ValueError(f"order names pillars without a weight: {unknown}; weighted: {list(weights)}")
    repeated = sorted({name for name in order if order.count(name) > 1})
    if repeated:
        raise ValueError(f"order repeats pillars: {repeated}")
    # Pillars missing from `order` come after it, in the order of `weights`.
    ranked = order + [name for name in weights if name not in order]
    taking_part = [name for name in ranked if weights[name] > 0]
    if n == 0:
        return []
    if not taking_part:
        raise ValueError(f"cannot pick {n} pillar(s): no pillar has a weight above 0 ({dict(weights)})")
    total = float(sum(weights[name] for name in taking_part))
    for name in taking_part:
        states.setdefault(name, RotationState())
    picks: list[str] = []
    for _ in range(n):
        candidates = [name for name in taking_part if states[name].credit >= -_EPSILON * total] or taking_part
        # min() keeps the first of equal keys: the earlier pillar in `ranked` wins a tie.
        winner = min(candidates, key=lambda name: (total - states[name].credit) / weights[name])
        for name in taking_part:
            states[name].credit += weights[name]
        states[winner].credit -= total
        picks.append(winner)
    return picks


def _clean(theme: str) -> str:
    return " ".join(str(theme).split())[:MAX_THEME_CHARS].strip()


def _key(theme: str) -> str:
    """Themes are the same when they differ only in case and spaces."""
    return " ".join(theme.split()).casefold()


def pillar_themes(configured: Sequence[str], guidelines: str, pillar: str) -> list[str]:
    """The themes a pillar rotates through: persona.yaml `generation.themes[pillar]` when it lists
    any, else short phrases of the pillar's guidelines, else the pillar name. Whitespace is
    collapsed, each is cut to MAX_THEME_CHARS, and repeats (ignoring case) are dropped, first kept."""
    for source in (configured, guideline_themes(guidelines or ""), [pillar]):
        themes = _distinct(source)
        if themes:
            return themes
    raise ValueError("pillar name is empty")


def _distinct(themes: Sequence[str]) -> list[str]:
    """Cleaned, non-empty themes without repeats (ignoring case), first kept."""
    out: list[str] = []
    seen: set[str] = set()
    for theme in themes:
        clean = _clean(theme)
        if clean and _key(clean) not in seen:
            seen.add(_key(clean))
            out.append(clean)
    return out


def round_order(themes: Sequence[str], seed: str, round_number: int) -> list[str]:
    """The themes in the order of round `round_number`: shuffled by a string seed, which Python
    hashes the same in every process (an int/str hash would not be stable with PYTHONHASHSEED)."""
    order = list(themes)
    random.Random(f"{seed}:{round_number}").shuffle(order)
    return order


def take_themes(themes: Sequence[str], state: RotationState, k: int, seed: str) -> list[str]:
    """The next `k` themes of a pillar; updates `state` (round and used themes).

    A theme is taken in the current round's order (`round_order`) unless it is in `state.used`.
    When every listed theme is used, the next round begins (round + 1, nothing used) — lazily, at
    the next take, so the theme that ended the round is still known: with two or more themes the
    new round's first pick skips it, so no theme comes twice in a row across the boundary.

    The list may change between calls (persona.yaml edited): used themes no longer listed are
    dropped from `state.used`, and new themes are simply not used yet, so they get their turn in
    the current round. Comparisons ignore case and spaces. Deterministic for the same inputs.
    """
    if k < 0:
        raise ValueError(f"number of themes must be >= 0, got {k}")
    listed = _distinct(themes)
    if k == 0:
        return []
    if not listed:
        raise ValueError(f"cannot take {k} theme(s) from an empty theme list")
    keys = {_key(t) for t in listed}
    last = _key(state.used[-1]) if state.used else None  # the theme used most recently
    # Themes taken off the list no longer count as used; keep the rest in the order they were used.
    state.used = [t for t in state.used if _key(t) in keys]
    taken: list[str] = []
    for _ in range(k):
        used = {_key(t) for t in state.used}
        avoid = None
        if used >= keys:  # every theme has had its turn: a new round
            avoid = last if len(listed) > 1 else None
            state.round += 1
            state.used, used = [], set()
        theme = next(t for t in round_order(listed, seed, state.round) if _key(t) not in used and _key(t) != avoid)
        state.used.append(theme)
        taken.append(theme)
        last = _key(theme)
    return taken
