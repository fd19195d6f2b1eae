"""The strategy that learns from the audience, inside the operator's bounds (docs/insights.md).

Model. Each post's log engagement rate y = log((interactions + 0.5) / (reach + 1)) is a pillar
effect plus a local-hour effect plus noise: a Bayesian linear regression with Gaussian priors
(pillar effects around the account's pooled log-rate, sd 1; hour effects around 0, sd 0.3,
correlated between neighbouring hours by a periodic kernel on the 24-hour day, length 6 hours) and a
per-post noise variance of the content's own spread (estimated from the fit's residuals) plus the binomial
variance 1/(interactions + 0.5). Old posts count less (weight 0.5^(age / half_life_days)), since
the audience's taste drifts.

Decisions, by Thompson sampling from that posterior:
- Pillar shares: each of `draws` posterior samples gives the share vector that maximises expected
  engagement within the bounds (lower bounds first, then the rest to the best sampled pillars up to
  their upper bounds); the target is their mean, i.e. each pillar gets its bounded share in
  proportion to the posterior probability that it is among the best. Bounds: each pillar's
  configured share (weight / sum of weights) ± `max_share_shift` points, clipped to 0..100, or the
  persona's own `pillar_bounds`; a weight-0 pillar stays at 0.
- Posting hours: one posterior sample per slot; the slot moves to the best sampled hour of its own
  local date inside the posting windows (the caller keeps spacing and the weekly cap).

Deterministic: the random stream is seeded from `seed` and the observations, so the same state and
seed give the same plan. With fewer than `min_posts` posts with insights the configured weights
are used and the note says so; with learning off nothing here runs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from persona_pipeline.domain.insight_stats import pct, ratio_interval

if TYPE_CHECKING:  # numpy is imported where it runs: persona.yaml's checks use this module when the code location loads
    import numpy as np

HOURS = 24
PILLAR_PRIOR_SD = 1.0
HOUR_PRIOR_SD = 0.3
# Hours: an audience's activity changes smoothly through the day (a day has one or two busy
# stretches, not a different taste every hour), so evidence is shared over about a quarter day.
HOUR_PRIOR_LENGTH = 6.0


def hour_correlation(length_hours: float) -> np.ndarray:
    """The 24 × 24 prior correlation of the hour effects: a periodic (exp-sine-squared) kernel on
    the 24-hour circle, so a few posts at 13:00 also say something about 11:00 and 15:00, and 23:00
    is next to 00:00. Nearby hours correlate as a squared exponential of `length_hours` would;
    unlike a squared exponential of the circular distance, it is a valid (positive semi-definite)
    correlation at any length (that one is not from about 3 hours on)."""
    import numpy as np

    hours = np.arange(HOURS)
    length = 2 * math.pi * length_hours / HOURS
    return np.exp(-2 * np.sin(math.pi * (hours[:, None] - hours[None, :]) / HOURS) ** 2 / length ** 2)


@lru_cache(maxsize=1)
def _hour_prior_precision() -> np.ndarray:
    import numpy as np

    return np.linalg.inv(HOUR_PRIOR_SD ** 2 * hour_correlation(HOUR_PRIOR_LENGTH) + 1e-4 * np.eye(HOURS))


@dataclass(frozen=True)
class LearningSettings:
    enabled: bool = False
    max_share_shift: float = 15.0  # points each pillar's share may move from its configured share
    pillar_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (min %, max %)
    learn_hours: bool = True
    min_posts: int = 3  # Thompson sampling needs no long warm-up: the bounds cap what a few posts move
    half_life_days: float = 120.0  # at a few posts a week one post's noise outweighs months of drift
    draws: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Observation:
    """One post's insights, as the learner sees them."""

    pillar: str | None
    local_hour: int
    reach: int
    interactions: int
    at: datetime  # when it went out (aware)


@dataclass(frozen=True)
class Posterior:
    pillars: tuple[str, ...]
    mean: np.ndarray  # pillar effects, then 24 hour effects
    cov: np.ndarray
    n: int

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.multivariate_normal(self.mean, self.cov, size=size, method="cholesky")


@dataclass(frozen=True)
class PillarDecision:
    name: str
    configured: Fraction
    target: Fraction
    low: Fraction
    high: Fraction
    note: str


@dataclass(frozen=True)
class LearnedStrategy:
    """Target shares by pillar name, one note per pillar, and a summary (the fallback reason when
    there was too little data)."""

    shares: dict[str, Fraction]
    pillars: dict[str, PillarDecision]
    summary: str
    learned: bool
    posterior: Posterior | None = None


def share_bounds(weights: Mapping[str, int], settings: LearningSettings) -> dict[str, tuple[Fraction, Fraction]]:
    """Each pillar's (low, high) share. Bounds that cannot make a valid share are refused naming
    the field: `strategy.learning.max_share_shift` / `strategy.learning.pillar_bounds.<pillar>`."""
    where = "strategy.learning"
    if not 0 <= settings.max_share_shift <= 100:
        raise ValueError(f"{where}.max_share_shift={settings.max_share_shift} must be 0..100 points")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("pillar weights sum to 0: no share to learn around")
    unknown = sorted(set(settings.pillar_bounds) - set(weights))
    if unknown:
        raise ValueError(f"{where}.pillar_bounds names unknown pillars: {', '.join(unknown)}")
    shift = Fraction(settings.max_share_shift).limit_denominator(10000) / 100
    bounds = {}
    for name, weight in weights.items():
        configured = Fraction(weight, total)
        if name in settings.pillar_bounds:
            low, high = (Fraction(v).limit_denominator(10000) / 100 for v in settings.pillar_bounds[name])
            if not 0 <= low <= high <= 1:
                raise ValueError(f"{where}.pillar_bounds.{name}={list(settings.pillar_bounds[name])}: "
                                 "needs 0 <= min <= max <= 100")
            if not low <= configured <= high:
                raise ValueError(f"{where}.pillar_bounds.{name}={list(settings.pillar_bounds[name])} does not hold "
                                 f"the configured share {float(configured):.0%}")
        elif weight == 0:
            low = high = Fraction(0)
        else:
            low, high = max(Fraction(0), configured - shift), min(Fraction(1), configured + shift)
        bounds[name] = (low, high)
    lows, highs = sum(lo for lo, _ in bounds.values()), sum(hi for _, hi in bounds.values())
    if lows > 1 or highs < 1:
        raise ValueError(f"{where}.pillar_bounds: the minimum shares sum to {float(lows):.0%} and the maximum "
                         f"shares to {float(highs):.0%}; a valid share needs min <= 100% <= max")
    return bounds


def bounded_best(values: Mapping[str, float], bounds: Mapping[str, tuple[Fraction, Fraction]]) -> dict[str, Fraction]:
    """The share vector maximising Σ share × value inside `bounds` (exact, greedy: lows, then the rest
    to the highest values up to their highs; ties by name)."""
    shares = {name: low for name, (low, _) in bounds.items()}
    left = 1 - sum(shares.values())
    for name in sorted(bounds, key=lambda n: (-values.get(n, -math.inf), n)):
        room = bounds[name][1] - shares[name]
        step = min(room, left)
        shares[name] += step
        left -= step
    return shares


def _stream(seed: int, observations: Sequence[Observation]) -> np.random.Generator:
    import numpy as np

    digest = hashlib.sha256(str(seed).encode())
    for o in observations:
        digest.update(f"{o.pillar}|{o.local_hour}|{o.reach}|{o.interactions}|{o.at.isoformat()}".encode())
    return np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))


def fit_posterior(observations: Sequence[Observation], pillars: Sequence[str], now: datetime,
                  half_life_days: float) -> Posterior:
    """The regression posterior (module docstring); observations of unknown pillars inform hours only."""
    import numpy as np

    names = tuple(sorted(pillars))
    index = {name: i for i, name in enumerate(names)}
    size = len(names) + HOURS
    reach = np.array([o.reach for o in observations], dtype=float)
    inter = np.array([o.interactions for o in observations], dtype=float)
    y = np.log((inter + 0.5) / (reach + 1.0))
    pooled = math.log((inter.sum() + 0.5) / (reach.sum() + 1.0)) if len(observations) else math.log(0.03)
    binomial = 1.0 / (inter + 0.5)
    age = np.array([(now - o.at).total_seconds() / 86400 for o in observations], dtype=float)
    decay = 0.5 ** (np.maximum(age, 0.0) / half_life_days)
    prior_mean = np.concatenate([np.full(len(names), pooled), np.zeros(HOURS)])
    prior = np.zeros((size, size))
    prior[:len(names), :len(names)] = np.eye(len(names)) * PILLAR_PRIOR_SD ** -2
    prior[len(names):, len(names):] = _hour_prior_precision()  # computed once, copied in
    x = np.zeros((len(observations), size))
    for row, o in enumerate(observations):
        if o.pillar in index:
            x[row, index[o.pillar]] = 1.0
        x[row, len(names) + o.local_hour % HOURS] = 1.0

    def solve(spread: float) -> tuple[np.ndarray, np.ndarray]:
        weight = decay / (spread + binomial)
        precision = prior + (x.T * weight) @ x
        cov = np.linalg.inv(precision)
        return cov @ (prior @ prior_mean + x.T @ (weight * y)), (cov + cov.T) / 2

    # The content's own spread: first from the raw variance (which still holds the pillar and hour
    # effects, so it errs wide), then once more from the residuals of that fit.
    if len(observations) < 5:
        mean, cov = solve(0.3 ** 2)
    else:
        mean, cov = solve(max(0.02, float(np.var(y) - binomial.mean())))
        mean, cov = solve(max(0.02, float(np.mean((y - x @ mean) ** 2) - binomial.mean())))
    return Posterior(names, mean, cov, len(observations))


def learn_shares(weights: Mapping[str, int], observations: Sequence[Observation], settings: LearningSettings,
                 now: datetime) -> LearnedStrategy:
    """Target shares by Thompson sampling within the bounds, with one note per pillar."""
    bounds = share_bounds(weights, settings)
    total = sum(weights.values())
    configured = {name: Fraction(w, total) for name, w in weights.items()}
    known = [o for o in observations if o.reach > 0]
    if len(known) < settings.min_posts:
        summary = (f"learning on, but only {len(known)} post(s) with insights (needs {settings.min_posts}): "
                   "configured weights")
        decisions = {name: PillarDecision(name, configured[name], configured[name], *bounds[name], summary)
                     for name in weights}
        return LearnedStrategy(dict(configured), decisions, summary, learned=False)
    posterior = fit_posterior(known, list(weights), now, settings.half_life_days)
    draws = posterior.sample(_stream(settings.seed, known), settings.draws)
    names = posterior.pillars
    totals = {name: Fraction(0) for name in weights}
    for draw in draws:
        best = bounded_best({name: float(draw[i]) for i, name in enumerate(names)}, bounds)
        for name, share in best.items():
            totals[name] += share
    shares = {name: (value / len(draws)).limit_denominator(10000) for name, value in totals.items()}
    # limit_denominator may leave the sum a hair off 1: give the rest to the largest share.
    top = max(shares, key=lambda n: (shares[n], n))
    shares[top] += 1 - sum(shares.values())
    decisions = {}
    for name in weights:
        mine = [o for o in known if o.pillar == name]
        rate, low, high = ratio_interval([o.interactions for o in mine], [o.reach for o in mine])
        said = (f"{pct(rate)} ± {(high - low) / 2 * 100:.1f} engagement over {len(mine)} posts" if low is not None
                else f"{pct(rate)} engagement over {len(mine)} post(s)" if rate is not None else "no posts yet")
        before, after = round(float(configured[name]) * 100), round(float(shares[name]) * 100)
        verb = "raised" if after > before else "lowered" if after < before else "kept"
        move = f"share {verb} {before} → {after}%" if verb != "kept" else f"share kept at {after}%"
        decisions[name] = PillarDecision(name, configured[name], shares[name], *bounds[name], f"{name}: {said}, {move}")
    summary = f"learned from {len(known)} posts with insights (Thompson sampling, {settings.draws} draws)"
    return LearnedStrategy(shares, decisions, summary, learned=True, posterior=posterior)


def window_moments(day: date, windows: Sequence[tuple[time, time]], tz: str) -> list[datetime]:
    """Candidate posting moments of a local date: each window's start and every full hour inside it
    (aware, in `tz`)."""
    zone = ZoneInfo(tz)
    out: set[datetime] = set()
    for start, end in windows:
        moment = datetime.combine(day, start, tzinfo=zone)
        stop = datetime.combine(day, end, tzinfo=zone) if end != time.max else datetime.combine(
            day + timedelta(days=1), time(0), tzinfo=zone)
        while moment < stop:
            out.add(moment)
            moment = (moment.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1))
    return sorted(out)


def pick_hours(posterior: Posterior | None, slots: Sequence[datetime], windows: Sequence[tuple[time, time]], tz: str,
               settings: LearningSettings, allowed=lambda moment: True) -> list[tuple[datetime, str]]:
    """Each slot moved to the best Thompson-sampled hour of its local date inside the windows, with
    why; `allowed(moment)` lets the caller refuse moments (spacing, taken slots). Without a posterior
    or with hour learning off the slots stay."""
    if posterior is None or not settings.learn_hours:
        return [(slot, "") for slot in slots]
    rng = _hour_seed(settings.seed, posterior, slots)
    zone = ZoneInfo(tz)
    out = []
    for slot in slots:
        draw = posterior.sample(rng, 1)[0][len(posterior.pillars):]
        candidates = [m for m in window_moments(slot.astimezone(zone).date(), windows, tz) if allowed(m)]
        if not candidates:
            out.append((slot, ""))
            continue
        best = max(candidates, key=lambda m: (draw[m.hour], -m.timestamp()))
        effect = math.exp(float(posterior.mean[len(posterior.pillars) + best.hour])) - 1
        out.append((best.astimezone(slot.tzinfo), f"hour {best:%H:%M} picked by Thompson sampling "
                                                  f"(estimated hour effect {effect:+.0%})"))
    return out


def move_slots(learned: LearnedStrategy, slots: Sequence[datetime], windows: Sequence[tuple[time, time]], tz: str,
               settings: LearningSettings, taken: Sequence[datetime], gap: timedelta, now: datetime,
               until: datetime) -> list[tuple[datetime, str]]:
    """Each slot moved to its learned hour (`pick_hours`), kept `gap` apart from every taken and
    already moved slot and inside (now, until); a slot with no allowed hour stays, with why "" ."""
    out: list[tuple[datetime, str]] = []
    for index, slot in enumerate(slots):
        others = [*taken, *(s for s, _ in out), *slots[index + 1:]]

        def allowed(moment: datetime, others=others) -> bool:
            return now < moment < until and all(abs(moment - t) >= gap for t in others)

        out.append(pick_hours(learned.posterior, [slot], windows, tz, settings, allowed)[0])
    return out


def rotation_scale(learned: LearnedStrategy | None) -> dict[str, float]:
    """Per pillar, learned share / configured share: how much more (or less) of it the content plan
    should make. Empty when learning is off or fell back to the configured weights."""
    if learned is None or not learned.learned:
        return {}
    return {name: float(d.target / d.configured) for name, d in learned.pillars.items() if d.configured}


def _hour_seed(seed: int, posterior: Posterior, slots: Sequence[datetime]) -> np.random.Generator:
    import numpy as np

    digest = hashlib.sha256(f"hours|{seed}|{posterior.n}".encode() + posterior.mean.tobytes())
    for slot in slots:
        digest.update(slot.isoformat().encode())
    return np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
