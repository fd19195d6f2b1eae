"""Which pair a reviewer sees next (docs/rules.md#pair-choice): active selection at the top-K boundary.

`choose_pair` shows, of the pairs straddling the top-K boundary, the one whose order is the most in
doubt weighted by how much one vote can still settle it (`boundary_score`), and with probability
`exploration` a uniformly random pair instead. It reports the exact probability the shown pair had
under that mixture, so that analyses of the votes can reweight them.

A pair may be shown again after it has votes. A close pair at the boundary needs several votes
(two candidates 0.3 logits apart: one vote goes the "wrong" way 43% of the time). When each pair
could be voted once, the fitted top K stopped improving once the boundary's pairs were used up: on
30 candidates with strengths ~ N(0, 3) logits the top 3 was right in 17–19 of 40 seeds after 100,
150, 200 and 300 votes alike.

The doubt is measured on a Laplace (Gaussian) approximation of the Bradley–Terry posterior:
mean = the MAP fit of domain/bradley_terry (same prior), covariance = the inverse Hessian there,
so every pair is scored at once, vectorised (bench/bt_fit.py times it; bench/review_effort.py
compares the rule with random pairs and with the plain most-doubtful-pair rule).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from persona_pipeline.domain import bradley_terry as bt

ACTIVE = "active"
EXPLORE = "explore"
# Scores within this distance of the best (absolute; relative for scores above 1) count as a tie; the
# tied pairs share the greedy branch's probability (float noise must not pick a favourite).
TIE_TOLERANCE = 1e-9
# Means this close count as equal when splitting candidates at the boundary (natural units, 1e-7 Elo).
EQUAL_MEANS = 1e-9


@dataclass(frozen=True)
class PairChoice:
    left_id: int
    right_id: int
    probability: float      # probability that this (unordered) pair was the one shown
    strategy: str           # "active" (the greedy branch) or "explore" (the uniform branch)


def _pairs(candidate_ids: Sequence[int], votes: Iterable[tuple[int, int]],
           exclude: frozenset | set = frozenset()) -> tuple[bt.IndexedVotes, np.ndarray]:
    """Index pairs (i < j, positions in the sorted ids) not in `exclude`, in a fixed order (so a
    seeded rng picks reproducibly whatever the listing order)."""
    indexed = bt.index_votes(candidate_ids, votes)
    n = len(indexed.ids)
    exclude = {frozenset(pair) for pair in exclude}     # tuples work too
    ids = indexed.ids
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)
                      if frozenset((ids[i], ids[j])) not in exclude], dtype=np.int64).reshape(-1, 2)
    return indexed, pairs


def _oriented(ids: list[int], pair: Sequence[int], rng: random.Random) -> tuple[int, int]:
    # Left/right by a fair coin: a reviewer's bias toward one side must not favour older candidates.
    a, b = ids[int(pair[0])], ids[int(pair[1])]
    return (a, b) if rng.random() < 0.5 else (b, a)


def straddles(theta: np.ndarray, top_k: int, pairs: np.ndarray) -> np.ndarray:
    """Per pair, whether it straddles the top-K boundary: one candidate in the top K by posterior
    mean, the other not. Candidates tied in mean with the K-th or (K+1)-th count on both sides, so
    the split does not depend on candidate order (with no votes at all, every pair straddles)."""
    ordered = np.sort(theta)[::-1]
    upper = theta >= ordered[top_k - 1] - EQUAL_MEANS      # top K and any tied with the K-th
    lower = theta <= ordered[top_k] + EQUAL_MEANS          # the rest and any tied with the (K+1)-th
    i, j = pairs[:, 0], pairs[:, 1]
    return (upper[i] & lower[j]) | (upper[j] & lower[i])


def boundary_score(theta: np.ndarray, covariance: np.ndarray, top_k: int, pairs: np.ndarray) -> np.ndarray:
    """How much one vote on each pair (pairs: (P, 2)) is expected to settle the top K: for a pair
    straddling the boundary, doubt × share, else 0.

    - doubt = Φ(−|μ_i − μ_j|/s_ij), s_ij² = Var(θ_i − θ_j): the posterior probability that the
      likelier order of the two is wrong (0.5 for a pair we know nothing about or a dead heat).
    - share = h·s_ij²/(1 + h·s_ij²), h = p(1 − p) the Fisher information of a vote whose predictive
      win probability is p: the fraction of Var(θ_i − θ_j) that this vote removes (Sherman–Morrison
      with u = e_i − e_j). It is near 1 for a pair of barely known candidates and falls like
      1/(votes so far) for a pair asked many times.
    So the most doubtful (member, outsider) orders are asked first, a close pair is asked again
    while a vote still moves it, and a dead heat that many votes have not settled gives way to
    orders nobody has checked (an outsider with few votes), which is what the top K waits on.
    A one-step look-ahead at the expected fall of the summed doubt (exact for the Gaussian, with
    the means moving, via Owen's T) was tried first: it favours sharpening near-ties over checking
    barely known outsiders, and on the one grid cell it was run on (σ 3 logits, N 20, no flips,
    40 seeds) it needed as many votes (median 68–72 against 67.5) at 10–50 times the cost."""
    from scipy.special import ndtr  # here, not at module level: loading the code location skips scipy

    i, j = pairs[:, 0], pairs[:, 1]
    var = np.diag(covariance)
    s2 = np.maximum(var[i] + var[j] - 2.0 * covariance[i, j], 1e-300)
    doubt = ndtr(-np.abs(theta[i] - theta[j]) / np.sqrt(s2))
    # Predictive probability that i wins, integrating over the uncertainty of θ_i − θ_j (probit
    # approximation of the logistic-normal integral): an uncertain pair is not a sure thing.
    p = bt.sigmoid((theta[i] - theta[j]) / np.sqrt(1.0 + np.pi * s2 / 8.0))
    h = p * (1.0 - p)
    share = h * s2 / (1.0 + h * s2)
    return np.where(straddles(theta, top_k, pairs), doubt * share, 0.0)


def posterior(n: int, winners: np.ndarray, losers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Laplace approximation of the Bradley–Terry posterior: MAP θ and its covariance."""
    theta, precision = bt.laplace(bt.aggregate(n, winners, losers))
    with bt.single_threaded_blas():
        covariance = np.linalg.inv(precision)
    return theta, covariance


def select(theta: np.ndarray, covariance: np.ndarray, top_k: int, pairs: np.ndarray, *, exploration: float,
           rng: random.Random) -> tuple[int, float, str]:
    """The rule of `choose_pair` on a fitted posterior: (index into `pairs`, probability, strategy).
    Split out so that the review-effort simulation can fit many seeds at once and still choose with
    exactly this code."""
    count = len(pairs)
    if top_k >= len(theta):
        return rng.randrange(count), 1.0 / count, EXPLORE
    score = boundary_score(theta, covariance, top_k, pairs)
    best = float(score.max())
    greedy = np.flatnonzero(score >= best - TIE_TOLERANCE * max(1.0, abs(best)))
    explored = rng.random() < exploration
    if explored:
        index = rng.randrange(count)
    else:
        index = int(greedy[rng.randrange(len(greedy))])
    is_greedy = bool(np.any(greedy == index))
    probability = (1.0 - exploration) * (1.0 / len(greedy) if is_greedy else 0.0) + exploration / count
    return index, probability, EXPLORE if explored else ACTIVE


def choose_pair(candidate_ids: Sequence[int], votes: Iterable[tuple[int, int]], top_k: int, *,
                exclude: frozenset | set = frozenset(), exploration: float = 0.1,
                rng: random.Random) -> PairChoice | None:
    """The next pair to show for a top-`top_k` decision, or None when there is no pair to show
    (fewer than two candidates, or every pair in `exclude`).

    - Any pair of `candidate_ids` not in `exclude` (a set of frozenset({a, b}) of ids, e.g. pairs
      offered to someone else and not yet answered), whether or not it has votes: a close pair at
      the boundary needs more than one. Votes naming candidates not in `candidate_ids` (killed
      ones) are ignored.
    - With probability 1 − exploration ("active"): the pair with the largest `boundary_score`; ties
      (within TIE_TOLERANCE) are broken uniformly by `rng`. With probability exploration
      ("explore"): any allowed pair uniformly, the greedy one included.
    - probability = (1 − exploration)·[pair is greedy]/#greedy + exploration/#allowed: the chance
      this pair was shown under the mixture, whichever branch picked it.
    - When top_k >= the number of candidates there is no boundary; likewise, once no vote can change
      the boundary any more, every pair ties. Either way the choice is uniform over the allowed
      pairs (probability 1/#allowed); the first case reports "explore".
    Sides are a fair coin flip; the probability is for the unordered pair.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not 0.0 <= exploration <= 1.0:
        raise ValueError(f"exploration must be within [0, 1], got {exploration!r}")
    indexed, pairs = _pairs(candidate_ids, votes, exclude)
    if not len(pairs):
        return None
    n = len(indexed.ids)
    if top_k >= n:                  # no boundary: nothing to fit
        theta, covariance = np.zeros(n), np.eye(n)
    else:
        theta, covariance = posterior(n, indexed.winners, indexed.losers)
    index, probability, strategy = select(theta, covariance, top_k, pairs, exploration=exploration, rng=rng)
    left, right = _oriented(indexed.ids, pairs[index], rng)
    return PairChoice(left, right, probability, strategy)
