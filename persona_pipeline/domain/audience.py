"""A seeded simulated Instagram audience: what the outbox (dry-run) publisher reads back as insights,
and what bench/audience_learning.py measures strategies against. Everything it reports is labelled
"simulated" by its callers; nothing here pretends to be Instagram.

The model, per post (docs/insights.md#the-simulated-audience says why each part is there):
- a hidden engagement rate per pillar (interactions / reach), times a smooth daily hour profile
  (peak hour, amplitude), times a per-format multiplier;
- the pillar rates drift: each pillar's log-rate takes a Gaussian random walk step every day
  (`drift_sd`), so what worked in spring need not work in autumn;
- per-post content quality varies (lognormal `quality_sd` on the rate): two travel posts differ;
- reach = followers × `reach_rate` × lognormal noise (`reach_sd`), raised by the post's own
  engagement with elasticity `reach_elasticity` (the feed shows posts that engage to more people);
- interactions ~ Binomial(reach, rate), split into likes/comments/saves/shares by fixed shares;
- followers grow by `follow_per_interaction` per interaction and shrink by `churn_per_day`.

Deterministic: the hidden rates and every post's noise come from `seed` (a post's noise from the
seed and the post's key), so the same post gets the same insights on every read and every rerun.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import date, datetime


# Shares of interactions by kind (likes dominate on Instagram; saves and shares are rarer).
INTERACTION_SPLIT = (("likes", 0.86), ("comments", 0.05), ("saved", 0.06), ("shares", 0.03))
# Fraction of the final (7-day) numbers a post has at a given age in hours (reads before 7 d).
_AGE_CURVE = ((1.0, 0.35), (24.0, 0.80), (72.0, 0.94), (168.0, 1.0))


@dataclass(frozen=True)
class AudienceParams:
    """The hidden truth. `pillar_rates` maps a pillar name to its mean engagement rate; a pillar not
    named gets `base_rate` × a seeded lognormal(0, `pillar_spread`) draw (so benchmarks vary it)."""

    seed: int = 0
    base_rate: float = 0.035
    pillar_rates: dict[str, float] = field(default_factory=dict)
    pillar_spread: float = 0.3
    peak_hour: float | None = 19.0  # local hour of the engagement peak; None: drawn from the seed
    hour_amplitude: float = 0.2  # log-rate amplitude of the daily cycle
    format_rates: dict[str, float] = field(default_factory=lambda: {"image": 1.0, "carousel": 1.1, "reel": 1.25})
    drift_sd: float = 0.02  # per day, on the log-rate
    quality_sd: float = 0.3
    reach_rate: float = 0.3
    reach_sd: float = 0.4
    reach_elasticity: float = 0.5
    start_followers: int = 10_000
    follow_per_interaction: float = 0.02
    churn_per_day: float = 0.0005

    def __post_init__(self) -> None:
        for name, rate in self.pillar_rates.items():
            if not 0 < rate < 1:
                raise ValueError(f"audience pillar rate {name}={rate} must be between 0 and 1")
        for name, rate in self.format_rates.items():
            if not 0 < rate <= 10:
                raise ValueError(f"audience format rate {name}={rate} must be in (0, 10]")
        if not 0 < self.base_rate < 1:
            raise ValueError(f"audience base_rate={self.base_rate} must be between 0 and 1")
        if self.peak_hour is not None and not 0 <= self.peak_hour < 24:
            raise ValueError(f"audience peak_hour={self.peak_hour} must be 0..24")


@dataclass(frozen=True)
class PostInsight:
    """One post's numbers at one age (hours after publishing)."""

    reach: int
    views: int
    likes: int
    comments: int
    saved: int
    shares: int
    total_interactions: int

    def as_metrics(self) -> dict[str, int]:
        return {"reach": self.reach, "views": self.views, "likes": self.likes, "comments": self.comments,
                "saved": self.saved, "shares": self.shares, "total_interactions": self.total_interactions}


def _stream(*parts: object) -> np.random.Generator:
    """A generator keyed by `parts`: the same key gives the same draws in any process."""
    import numpy as np

    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def age_fraction(age_hours: float) -> float:
    """Share of a post's 7-day numbers it has reached `age_hours` after publishing."""
    if age_hours <= 0:
        return 0.0
    previous = (0.0, 0.0)
    for hours, share in _AGE_CURVE:
        if age_hours <= hours:
            return previous[1] + (share - previous[1]) * (age_hours - previous[0]) / (hours - previous[0])
        previous = (hours, share)
    return 1.0


class SimulatedAudience:
    """The hidden rates of one seeded audience and the insights it gives (see the module docstring)."""

    def __init__(self, params: AudienceParams, pillars: list[str], start: date) -> None:
        self.params = params
        self.pillars = sorted(pillars)
        self.start = start
        rng = _stream("audience", params.seed)
        draws = rng.normal(0.0, params.pillar_spread, len(self.pillars))
        self.base = {name: params.pillar_rates.get(name, params.base_rate * math.exp(draw))
                     for name, draw in zip(self.pillars, draws)}
        self.peak_hour = params.peak_hour if params.peak_hour is not None else float(rng.uniform(0, 24))
        self._walk: dict[str, list[float]] = {name: [0.0] for name in self.pillars}
        self._walk_rng = _stream("drift", params.seed)

    def _drift(self, pillar: str, day: int) -> float:
        """The pillar's log-rate drift on `day` (days since start): one random walk per audience."""
        while len(self._walk[self.pillars[0]]) <= day:
            steps = self._walk_rng.normal(0.0, self.params.drift_sd, len(self.pillars))
            for name, step in zip(self.pillars, steps):
                self._walk[name].append(self._walk[name][-1] + step)
        return self._walk[pillar][max(0, day)]

    def hour_factor(self, hour: float) -> float:
        """The daily cycle's multiplier at a local hour (geometric mean 1 over the day)."""
        return math.exp(self.params.hour_amplitude * math.cos(2 * math.pi * (hour - self.peak_hour) / 24))

    def rate(self, pillar: str | None, hour: float, day: date, media_format: str = "image") -> float:
        """The hidden mean engagement rate of a post of `pillar` at local `hour` on `day`."""
        if pillar in self.base:
            base = self.base[pillar] * math.exp(self._drift(pillar, (day - self.start).days))
        else:  # an unassigned post: the audience's average taste
            base = self.params.base_rate
        return min(0.5, base * self.hour_factor(hour) * self.params.format_rates.get(media_format, 1.0))

    def post(self, key: str, *, pillar: str | None, hour: float, day: date, followers: float,
             media_format: str = "image") -> PostInsight:
        """The 7-day insights of one post (`key` makes its noise; the same key gives the same numbers)."""
        p = self.params
        rng = _stream("post", p.seed, key)
        mean = self.rate(pillar, hour, day, media_format)
        rate = min(0.9, mean * math.exp(rng.normal(0.0, p.quality_sd) - p.quality_sd ** 2 / 2))
        lift = (rate / p.base_rate) ** p.reach_elasticity
        reach = int(max(1.0, followers * p.reach_rate * lift * math.exp(rng.normal(0.0, p.reach_sd) - p.reach_sd ** 2 / 2)))
        interactions = int(rng.binomial(reach, rate))
        split = rng.multinomial(interactions, [share for _, share in INTERACTION_SPLIT])
        kinds = dict(zip((name for name, _ in INTERACTION_SPLIT), (int(n) for n in split)))
        views = int(reach * (1.0 + rng.gamma(4.0, 0.1)))  # repeat views: views >= reach
        return PostInsight(reach=reach, views=views, total_interactions=interactions, **kinds)

    def at_age(self, insight: PostInsight, age_hours: float) -> PostInsight:
        """The numbers a read at `age_hours` sees: the 7-day numbers scaled by the age curve."""
        share = age_fraction(age_hours)
        metrics = {name: int(round(value * share)) for name, value in insight.as_metrics().items()}
        metrics["total_interactions"] = metrics["likes"] + metrics["comments"] + metrics["saved"] + metrics["shares"]
        return PostInsight(**metrics)

    def follower_step(self, followers: float, interactions: int, days: float = 1.0) -> float:
        """Followers after `days` with `interactions` in them."""
        return max(0.0, followers * (1 - self.params.churn_per_day) ** days
                   + self.params.follow_per_interaction * interactions)


def followers_on(audience: SimulatedAudience, day: date, interactions_by_day: dict[date, int],
                 since: date | None = None) -> float:
    """Followers on `day` given every earlier day's interactions (for the outbox account insights),
    counting from `start_followers` on `since` (the account's first post; default the audience's start)."""
    followers = float(audience.params.start_followers)
    current = since or audience.start
    while current < day:
        followers = audience.follower_step(followers, interactions_by_day.get(current, 0))
        current = date.fromordinal(current.toordinal() + 1)
    return followers


def local_hour(moment: datetime, tz) -> float:
    """The local hour of day (fractional) of an aware datetime in zone `tz`."""
    local = moment.astimezone(tz)
    return local.hour + local.minute / 60


def parse_rates(text: str, what: str) -> dict[str, float]:
    """`name=0.04,name=0.03` as a dict; errors name `what` (the setting) and the entry."""
    out: dict[str, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = entry.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{what}: entry {entry!r} is not name=number") from None
    return out
