"""Which pair a reviewer sees next (REFERENCES.md §4): active selection at the top-K boundary.

`choose_pair` shows the unvoted pair whose vote is expected to shrink the uncertainty about which
candidates are in the top K the most, and with probability `exploration` a uniformly random unvoted
pair instead. It reports the exact probability the shown pair had under that mixture, so that
analyses of the votes can reweight them.

The uncertainty is measured on a Laplace (Gaussian) approximation of the Bradley–Terry posterior:
mean = the MAP fit of domain/bradley_terry (same prior), covariance = the inverse Hessian there. A
full bootstrap (1000 refits) would be ~100× slower; the Gaussian approximation costs one 30-candidate
Newton fit and one 30×30 inverse, and the effect of one more vote on it is an exact rank-one update,
so every unvoted pair is scored at once, vectorised: ~2 ms per choice for 30 candidates (bench/bt_fit.py).

`random_unvoted_pair` is the older tool's rule (any unvoted pair, uniformly), kept for the
benchmark in bench/review_effort.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from persona_pipeline.domain import bradley_terry as bt

ACTIVE = "active"
EXPLORE = "explore"
# Gains within this distance of the best (absolute; relative for gains above 1) count as a tie; the
# tied pairs share the greedy branch's probability (float noise must not pick a favourite).
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PairChoice:
    left_id: int
    right_id: int
    probability: float      # probability that this (unordered) pair was the one shown
    strategy: str           # "active" (the greedy branch) or "explore" (the uniform branch)


def _unvoted_pairs(candidate_ids: Sequence[int], votes: Iterable[tuple[int, int]],
                   exclude: frozenset | set = frozenset()) -> tuple[bt.IndexedVotes, list[tuple[int, int]]]:
    """Index pairs (i < j, positions in the sorted ids) nobody voted on in either order and not in
    `exclude`, in a fixed order (so a seeded rng picks reproducibly whatever the listing order)."""
    indexed = bt.index_votes(candidate_ids, votes)
    exclude = {frozenset(pair) for pair in exclude}     # tuples work too
    voted = {(min(w, l), max(w, l)) for w, l in zip(indexed.winners.tolist(), indexed.losers.tolist())}
    ids = indexed.ids
    pairs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))
             if (i, j) not in voted and frozenset((ids[i], ids[j])) not in exclude]
    return indexed, pairs


def _oriented(ids: list[int], pair: tuple[int, int], rng: random.Random) -> tuple[int, int]:
    # Left/right by a fair coin: a reviewer's bias toward one side must not favour older candidates.
    a, b = ids[pair[0]], ids[pair[1]]
    return (a, b) if rng.random() < 0.5 else (b, a)


def random_unvoted_pair(candidate_ids: Sequence[int], votes: Iterable[tuple[int, int]],
                        rng: random.Random) -> tuple[int, int] | None:
    """The older tool's rule: any unvoted pair, uniformly at random (sides by a coin); None when every
    pair has a vote."""
    indexed, pairs = _unvoted_pairs(candidate_ids, votes)
    if not pairs:
        return None
    return _oriented(indexed.ids, pairs[rng.randrange(len(pairs))], rng)


def boundary_gain(theta: np.ndarray, covariance: np.ndarray, top_k: int, pairs: np.ndarray) -> np.ndarray:
    """Expected fall of the uncertainty at the top-K boundary from one vote on each pair
    (pairs: (P, 2) index array).

    The uncertainty is E = Σ_{a in S, b not in S} P(θ_b > θ_a) = Σ Φ(−(μ_a − μ_b)/s_ab), S = the
    current top K by posterior mean: the expected number of (member, outsider) orderings that are
    wrong. It is dominated by candidates straddling the boundary, and by outsiders so uncertain
    (few votes) that they might still belong in.

    In the Gaussian approximation a vote between i and j (i wins with probability p, Fisher
    information h = p(1 − p)) shrinks the covariance by a rank-one term whatever the outcome
    (Sherman–Morrison with u = e_i − e_j):
        Σ' = Σ − h·Σu·uᵀΣ/(1 + h·uᵀΣu),
    so s_ab shrinks by a known amount for every (a, b), including through the covariance (a vote of
    b against a common opponent of a informs a − b). We score E(Σ) − E(Σ') at the current means.
    We deliberately do not move the means in the look-ahead: with the boundary recomputed from
    the moved means, the one-step expected uncertainty is not coherent (it can rise for exactly the
    pairs that matter most), while the variance-only fall is ≥ 0 and ranks pairs by how much they
    sharpen the comparisons that decide the top K. A pair far from the boundary, or between a
    near-certain winner and loser (h ≈ 0), scores ~0. (A knowledge-gradient variant that also
    averages over the means' move scored no better in bench/review_effort.py and cost ~10× more.)
    Limitation: a (member, outsider) pair with exactly equal means counts 0.5 before and after, so
    it adds nothing; with no votes at all every pair scores 0 and the choice is uniform."""
    rows = np.arange(len(pairs))
    i, j = pairs[:, 0], pairs[:, 1]
    v = covariance[:, i].T - covariance[:, j].T                 # Σu per pair: (P, n)
    s2 = v[rows, i] - v[rows, j]                                # uᵀΣu
    # Predictive probability that i wins, integrating over the uncertainty of θ_i − θ_j (probit
    # approximation of the logistic-normal integral): an uncertain pair is not a sure thing.
    p = bt.sigmoid((theta[i] - theta[j]) / np.sqrt(1.0 + np.pi * s2 / 8.0))
    h = p * (1.0 - p)
    shrink = h / (1.0 + h * s2)                                 # (P,)

    # Deterministic split (stable sort by mean, ties by index): members S and outsiders O.
    order = np.argsort(-theta, kind="stable")
    members, outsiders = order[:top_k], order[top_k:]
    delta = theta[members][:, None] - theta[outsiders][None, :]               # (K, n−K), ≥ 0
    var = np.diag(covariance)
    s2_ab = var[members][:, None] + var[outsiders][None, :] - 2.0 * covariance[np.ix_(members, outsiders)]
    before = ndtr(-delta / np.sqrt(s2_ab))
    dv = v[:, members][:, :, None] - v[:, outsiders][:, None, :]              # (P, K, n−K)
    after_s2 = np.maximum(s2_ab[None] - shrink[:, None, None] * dv ** 2, 1e-12)
    after = ndtr(-delta[None] / np.sqrt(after_s2))
    return np.sum(before[None] - after, axis=(1, 2))


def choose_pair(candidate_ids: Sequence[int], votes: Iterable[tuple[int, int]], top_k: int, *,
                exclude: frozenset | set = frozenset(), exploration: float = 0.1,
                rng: random.Random) -> PairChoice | None:
    """The next pair to show for a top-`top_k` decision, or None when no unvoted pair is left.

    - Never a pair with a vote (either order) or in `exclude` (a set of frozenset({a, b}) of ids,
      e.g. pairs offered to someone else and not yet answered). Votes naming candidates not in
      `candidate_ids` (killed ones) are ignored.
    - With probability 1 − exploration ("active"): the unvoted pair with the largest
      `boundary_gain`; ties (within TIE_TOLERANCE) are broken uniformly by `rng`. With probability
      exploration ("explore"): any unvoted pair uniformly, the greedy one included.
    - probability = (1 − exploration)·[pair is greedy]/#greedy + exploration/#unvoted: the chance
      this pair was shown under the mixture, whichever branch picked it.
    - When top_k >= the number of candidates there is no boundary; likewise, once no vote can change
      the boundary any more, every pair ties. Either way the choice is uniform over the unvoted pairs
      (probability 1/#unvoted), so reviewers can keep voting; the first case reports "explore".
    Sides are a fair coin flip; the probability is for the unordered pair.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not 0.0 <= exploration <= 1.0:
        raise ValueError(f"exploration must be within [0, 1], got {exploration!r}")
    indexed, pairs = _unvoted_pairs(candidate_ids, votes, exclude)
    if not pairs:
        return None
    ids = indexed.ids
    count = len(pairs)
    if top_k >= len(ids):
        pick = pairs[rng.randrange(count)]
        left, right = _oriented(ids, pick, rng)
        return PairChoice(left, right, 1.0 / count, EXPLORE)

    data = bt.aggregate(len(ids), indexed.winners, indexed.losers)
    theta, precision = bt.laplace(data)
    with bt.single_threaded_blas():
        covariance = np.linalg.inv(precision)
    gain = boundary_gain(theta, covariance, top_k, np.array(pairs, dtype=np.int64))
    best = float(gain.max())
    greedy = np.flatnonzero(gain >= best - TIE_TOLERANCE * max(1.0, abs(best)))

    explored = rng.random() < exploration
    if explored:
        index = rng.randrange(count)
    else:
        index = int(greedy[rng.randrange(len(greedy))])
    is_greedy = bool(np.any(greedy == index))
    probability = (1.0 - exploration) * (1.0 / len(greedy) if is_greedy else 0.0) + exploration / count
    left, right = _oriented(ids, pairs[index], rng)
    return PairChoice(left, right, probability, EXPLORE if explored else ACTIVE)
