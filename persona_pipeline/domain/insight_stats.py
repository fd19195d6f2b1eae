"""What the audience did, in numbers: per-post rates and per-group aggregates with intervals.

Engagement rate = interactions / reach; reach per follower = reach / followers at publishing.
A group's rate is the ratio of its sums (Σ interactions / Σ reach: a post seen by more people
weighs more, as an audience-level rate should), with a percentile bootstrap interval over its posts
(resampling posts, not impressions: posts are what vary) and its sample size n. The bootstrap is
seeded from the group's own numbers, so the same data always gives the same interval.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime


BOOTSTRAP_ROUNDS = 1000
CAPTION_BUCKETS = ((0, 60, "short (<60)"), (60, 200, "medium (60-199)"), (200, 10**9, "long (200+)"))
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass(frozen=True)
class PostPerformance:
    """One published post with its latest insights (`local_at`: publishing time in the persona's zone)."""

    post_id: int
    pillar: str
    cluster: str
    theme: str
    media_format: str
    local_at: datetime
    caption_chars: int
    hashtags: tuple[str, ...]
    reach: int
    interactions: int
    followers: float | None  # followers when it went out; None when unknown
    simulated: bool = False

    @property
    def engagement_rate(self) -> float | None:
        return self.interactions / self.reach if self.reach > 0 else None

    @property
    def reach_per_follower(self) -> float | None:
        return self.reach / self.followers if self.followers else None


@dataclass(frozen=True)
class GroupStat:
    """A group's engagement rate and reach per follower, each with a 95 % interval, over n posts."""

    dimension: str
    key: str
    n: int
    engagement_rate: float | None
    engagement_low: float | None
    engagement_high: float | None
    reach_per_follower: float | None
    reach_low: float | None
    reach_high: float | None

    @property
    def half_width(self) -> float | None:
        if self.engagement_low is None or self.engagement_high is None:
            return None
        return (self.engagement_high - self.engagement_low) / 2


def caption_bucket(chars: int) -> str:
    return next(label for low, high, label in CAPTION_BUCKETS if low <= chars < high)


DIMENSIONS: dict[str, Callable[[PostPerformance], str]] = {
    "pillar": lambda p: p.pillar or "(unassigned)",
    "cluster": lambda p: p.cluster or "(none)",
    "theme": lambda p: p.theme or "(none)",
    "format": lambda p: p.media_format,
    "hour": lambda p: f"{p.local_at.hour:02d}:00",
    "weekday": lambda p: WEEKDAYS[p.local_at.weekday()],
    "caption_length": lambda p: caption_bucket(p.caption_chars),
    "hashtags": lambda p: " ".join(sorted(p.hashtags)) or "(none)",
}


def _seed(values: Sequence[float]) -> int:
    import numpy as np

    digest = hashlib.sha256(np.asarray(values, dtype=np.float64).tobytes()).digest()
    return int.from_bytes(digest[:8], "little")


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float],
                   rounds: int = BOOTSTRAP_ROUNDS) -> tuple[float | None, float | None, float | None]:
    """(Σ num / Σ den, 2.5th, 97.5th percentile of the bootstrap over items); Nones without data.
    One item gives the point value with no interval."""
    import numpy as np

    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) == 0 or den.sum() <= 0:
        return None, None, None
    point = float(num.sum() / den.sum())
    if len(num) == 1:
        return point, None, None
    order = np.lexsort((den, num))  # the seed and the resamples do not depend on the input order
    num, den = num[order], den[order]
    rng = np.random.default_rng(_seed(np.concatenate([num, den])))
    picks = rng.integers(0, len(num), size=(rounds, len(num)))
    sums = den[picks].sum(axis=1)
    ratios = num[picks].sum(axis=1)[sums > 0] / sums[sums > 0]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return point, float(low), float(high)


def group_stats(posts: Sequence[PostPerformance], dimension: str) -> list[GroupStat]:
    """One GroupStat per key of `dimension` (one of DIMENSIONS), best engagement first."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; one of: {', '.join(DIMENSIONS)}")
    groups: dict[str, list[PostPerformance]] = {}
    for post in posts:
        groups.setdefault(DIMENSIONS[dimension](post), []).append(post)
    out = []
    for key, members in groups.items():
        rate = ratio_interval([p.interactions for p in members], [p.reach for p in members])
        known = [p for p in members if p.followers]
        reach = ratio_interval([p.reach for p in known], [p.followers or 0 for p in known])
        out.append(GroupStat(dimension, key, len(members), *rate, *reach))
    return sorted(out, key=lambda s: (-(s.engagement_rate or -1.0), s.key))


def all_group_stats(posts: Sequence[PostPerformance]) -> dict[str, list[GroupStat]]:
    return {dimension: group_stats(posts, dimension) for dimension in DIMENSIONS}


def hour_weekday_grid(posts: Sequence[PostPerformance]) -> tuple[np.ndarray, np.ndarray]:
    """(7 × 24 engagement rate, NaN where no post; 7 × 24 post counts), weekday by local hour."""
    import numpy as np

    interactions = np.zeros((7, 24))
    reach = np.zeros((7, 24))
    counts = np.zeros((7, 24), dtype=int)
    for post in posts:
        row, col = post.local_at.weekday(), post.local_at.hour
        interactions[row, col] += post.interactions
        reach[row, col] += post.reach
        counts[row, col] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(reach > 0, interactions / np.maximum(reach, 1), math.nan)
    return rates, counts


def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"
