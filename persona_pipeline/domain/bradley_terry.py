"""Bradley–Terry ranking from pairwise votes, with bootstrap confidence intervals (docs/rules.md#bradley-terry).

Model: P(a beats b) = σ(ln10·(r_a − r_b)/400), the Elo curve, so scores read like Elo points. Unlike
online Elo (domain/elo.py) the fit does not depend on the order of the votes.

Internally a candidate's strength is θ = (r − 1000)/ELO_SCALE (natural log-odds units). The fit is the
maximum a posteriori estimate under a small Gaussian prior θ ~ N(0, (PRIOR_SD/ELO_SCALE)²), i.e. the
maximum-likelihood fit plus a ridge toward the mean:

    minimise  Σ_votes −log σ(θ_winner − θ_loser)  +  λ/2 · Σ θ²,   λ = (ELO_SCALE/PRIOR_SD)² ≈ 0.19

Why the prior: the pure maximum-likelihood fit diverges for a candidate that never lost (its score
goes to +∞), never won, or sits in a group with no votes linking it to the rest — exactly the
situation early in a review step. With PRIOR_SD = 400 Elo the prior weighs less than one vote between
equals (Fisher information 0.25 per vote against λ ≈ 0.19), so it only matters for candidates with
very few votes: an undefeated candidate gets a large but finite score, a candidate with no votes gets
exactly 1000. The likelihood does not change when all θ shift together, so a ridge toward 0 is a ridge
toward the mean; scores are re-centred so that the mean over the fitted candidates is exactly 1000.

Votes that name a candidate not in `candidate_ids` (for example a killed candidate's old votes) are
ignored, together with the other side of that vote: the fit ranks only the listed candidates, from
the comparisons among them. A vote of a candidate against itself is an error.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from persona_pipeline.domain.standings import BTStanding  # re-exported: the fit's output type

ELO_SCALE = 400.0 / math.log(10.0)
MEAN_SCORE = 1000.0
PRIOR_SD = 400.0          # Elo points; see the module docstring
SCORE_DECIMALS = 3        # scores are compared after rounding to 0.001 Elo, far above the solver's error
CI_LEVEL = 0.95
# Dense batched Newton (bootstrap) keeps at most this many float64 matrix cells in memory at once.
_BATCH_CELLS = 8_000_000


# OpenBLAS threads (numpy's and scipy's copies) are counter-productive here: our arrays are small
# or handled by numpy ufuncs, and L-BFGS-B's vector operations and 30×30 solves handed to idle-
# spinning BLAS threads are slow on a busy machine (measured on 2 shared cores: fit of 120 votes
# 80 ms with the default 2 threads, 2.3 ms with 1). We limit BLAS to one thread around our numeric
# work; the limit is restored on exit and costs ~15 µs. scipy (and the controller, which must see
# scipy's BLAS loaded) are imported on first use: loading the code location must not pay for them.
@functools.cache
def _blas_controller():
    import scipy.optimize  # noqa: F401  (loads scipy's OpenBLAS, so the controller sees it)
    try:  # shipped with scikit-learn, which we depend on
        import threadpoolctl
    except ImportError:  # pragma: no cover - without it we merely run with the BLAS default threads
        return None
    return threadpoolctl.ThreadpoolController()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


@dataclass(frozen=True)
class PairData:
    """Votes aggregated per unordered pair (a < b, as indices 0..n-1): wins of a and total votes."""

    n: int
    a: np.ndarray
    b: np.ndarray
    wins_a: np.ndarray
    total: np.ndarray


def _prior_precision(prior_sd: float) -> float:
    if not prior_sd > 0:
        raise ValueError(f"prior_sd must be > 0 (math.inf for no prior), got {prior_sd!r}")
    return 0.0 if math.isinf(prior_sd) else (ELO_SCALE / prior_sd) ** 2


def aggregate(n: int, winners: np.ndarray, losers: np.ndarray, counts: np.ndarray | None = None) -> PairData:
    """Sum votes per unordered pair with numpy (one sort of the pair codes, then bincounts)."""
    winners = np.asarray(winners, dtype=np.int64)
    losers = np.asarray(losers, dtype=np.int64)
    if winners.shape != losers.shape or winners.ndim != 1:
        raise ValueError(f"winners and losers must be 1-d arrays of one length, got {winners.shape} and {losers.shape}")
    weights = np.ones(len(winners)) if counts is None else np.asarray(counts, dtype=np.float64)
    if weights.shape != winners.shape:
        raise ValueError(f"counts must have the shape of winners {winners.shape}, got {weights.shape}")
    if len(winners) and (min(winners.min(), losers.min()) < 0 or max(winners.max(), losers.max()) >= n):
        raise ValueError(f"winners and losers must be indices in 0..{n - 1}")
    if np.any(winners == losers):
        bad = int(winners[np.argmax(winners == losers)])
        raise ValueError(f"candidate index {bad} cannot win against itself")
    low = np.minimum(winners, losers)
    high = np.maximum(winners, losers)
    codes, inverse = np.unique(low * n + high, return_inverse=True)
    wins_a = np.bincount(inverse, weights=weights * (winners == low), minlength=len(codes))
    total = np.bincount(inverse, weights=weights, minlength=len(codes))
    return PairData(n, codes // n, codes % n, wins_a, total)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # stable for any x, one transcendental call


def _softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) without overflow (about twice as fast as np.logaddexp(0, x))."""
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _objective(theta: np.ndarray, data: PairData, lam: float) -> tuple[float, np.ndarray]:
    """Negative log posterior and its gradient in θ (vectorised over pairs).

    Per pair: wins_a·softplus(−d) + wins_b·softplus(d) = total·softplus(−d) + wins_b·d, d = θ_a − θ_b."""
    d = theta[data.a] - theta[data.b]
    softplus = _softplus(-d)
    # np.sum of products, not `@`: a BLAS dot product hands work to OpenBLAS threads, which on a
    # busy machine cost milliseconds per call (measured 10 ms for 12,000 pairs on 2 shared cores).
    value = float(np.sum(data.total * softplus + (data.total - data.wins_a) * d)) + 0.5 * lam * float(np.sum(theta * theta))
    residual = data.total * sigmoid(d) - data.wins_a      # d(loss)/d(d)
    grad = np.bincount(data.a, residual, data.n) - np.bincount(data.b, residual, data.n) + lam * theta
    return value, grad


def fit_pairs(data: PairData, *, prior_sd: float = PRIOR_SD, theta0: np.ndarray | None = None) -> np.ndarray:
    """θ (natural units, mean 0) by scipy's L-BFGS-B with the analytic gradient.

    Variables are scaled by the square root of each candidate's Fisher information at θ = 0 (Jacobi
    preconditioning) so that candidates with 2 votes and with 2,000 votes converge together."""
    lam = _prior_precision(prior_sd)
    n = data.n
    if n == 0:
        return np.zeros(0)
    degree = np.bincount(data.a, data.total, n) + np.bincount(data.b, data.total, n)
    scale = np.sqrt(0.25 * degree + lam)
    scale[scale == 0] = 1.0                     # no votes and no prior: the variable never moves

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = _objective(x / scale, data, lam)
        return value, grad / scale

    x0 = np.zeros(n) if theta0 is None else np.asarray(theta0, dtype=np.float64) * scale
    import scipy.optimize

    # gtol is on the scaled gradient (≈ the error in θ·scale): 1e-9 puts the error far below 0.001 Elo.
    with single_threaded_blas():
        result = scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B",
                                         options={"maxiter": 10_000, "maxcor": 20, "ftol": 1e-15, "gtol": 1e-9})
    theta = result.x / scale
    # L-BFGS-B may stop with a line-search message once it is at machine precision; only an
    # objective with a large gradient left is a real failure.
    _, grad = _objective(theta, data, lam)
    if not np.all(np.isfinite(theta)) or np.max(np.abs(grad / scale), initial=0.0) > 1e-4:
        raise RuntimeError(f"Bradley–Terry fit did not converge: {result.message}")
    return theta - theta.mean()


def fit_arrays(n: int, winners: np.ndarray, losers: np.ndarray, counts: np.ndarray | None = None,
               *, prior_sd: float = PRIOR_SD) -> np.ndarray:
    """Scores on the Elo scale (mean 1000) for candidates 0..n-1 from vote arrays of indices.

    `counts` weighs each (winner, loser) row (default 1 vote each). `prior_sd=math.inf` gives the
    plain maximum-likelihood fit, which only exists when the comparison graph is strongly connected."""
    return MEAN_SCORE + ELO_SCALE * fit_pairs(aggregate(n, winners, losers, counts), prior_sd=prior_sd)


# --- batched Newton: the bootstrap's 1000 refits at once -------------------------------------------------

def _batch_objective(theta: np.ndarray, data: PairData, wins_a: np.ndarray, total: np.ndarray,
                     lam: float) -> np.ndarray:
    d = theta[:, data.a] - theta[:, data.b]
    return (np.sum(total * _softplus(-d) + (total - wins_a) * d, axis=1)
            + 0.5 * lam * np.sum(theta * theta, axis=1))


def _scatter(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """(R, U) per-pair values summed per candidate `index[u]`: (R, n). One bincount over all rounds
    (no BLAS: see _objective)."""
    rounds = values.shape[0]
    codes = (np.arange(rounds)[:, None] * n + index[None, :]).ravel()
    return np.bincount(codes, weights=values.ravel(), minlength=rounds * n).reshape(rounds, n)


def _batch_hessian(theta: np.ndarray, data: PairData, total: np.ndarray, lam: float) -> np.ndarray:
    p = sigmoid(theta[:, data.a] - theta[:, data.b])
    h = total * p * (1.0 - p)
    n = data.n
    matrix = np.zeros((theta.shape[0], n, n))
    matrix[:, data.a, data.b] = -h           # pairs are unique and a < b: plain assignment is safe
    matrix[:, data.b, data.a] = -h
    diagonal = np.arange(n)
    matrix[:, diagonal, diagonal] = _scatter(h, data.a, n) + _scatter(h, data.b, n) + lam
    return matrix


def newton_batch(data: PairData, wins_a: np.ndarray, total: np.ndarray, theta0: np.ndarray, *,
                 prior_sd: float = PRIOR_SD, max_iter: int = 50, tol: float = 1e-8) -> np.ndarray:
    """Minimise the same objective as `fit_pairs` for R resampled count vectors at once.

    wins_a, total: (R, U) counts over `data`'s pairs; theta0: (R, n) or (n,) start. Returns θ (R, n),
    not centred. Damped Newton (halving until the objective does not increase), vectorised over R:
    1000 separate scipy calls would cost ~1000× their Python overhead, while a dense 30×30 solve
    per round costs microseconds. Rounds stop once their Newton step is below `tol` (natural
    units; 1e-8 is 2e-6 Elo). The prior keeps every Hessian positive definite, so it needs a
    finite prior_sd."""
    lam = _prior_precision(prior_sd)
    if lam == 0:
        raise ValueError("newton_batch needs a finite prior_sd (the Hessian is singular without a prior)")
    n = data.n
    rounds = wins_a.shape[0]
    theta = np.array(np.broadcast_to(theta0, (rounds, n)), dtype=np.float64)
    active = np.arange(rounds)
    value = _batch_objective(theta, data, wins_a, total, lam)
    for _ in range(max_iter):
        th, wa, tt, val = theta[active], wins_a[active], total[active], value[active]
        residual = tt * sigmoid(th[:, data.a] - th[:, data.b]) - wa
        grad = _scatter(residual, data.a, n) - _scatter(residual, data.b, n) + lam * th
        with single_threaded_blas():
            step = np.linalg.solve(_batch_hessian(th, data, tt, lam), grad[..., None])[..., 0]
        t = np.ones(len(active))
        for _halving in range(40):
            candidate = th - t[:, None] * step
            new_value = _batch_objective(candidate, data, wa, tt, lam)
            worse = new_value > val + 1e-12 * np.abs(val)
            if not worse.any():
                break
            t[worse] *= 0.5
        theta[active] = candidate
        value[active] = np.minimum(new_value, val)
        moving = np.max(np.abs(t[:, None] * step), axis=1) >= tol
        active = active[moving]
        if not len(active):
            break
    return theta


def laplace(data: PairData, *, prior_sd: float = PRIOR_SD) -> tuple[np.ndarray, np.ndarray]:
    """Laplace approximation of the posterior: the MAP θ (natural units, mean 0) and the Hessian of
    the negative log posterior there (the posterior precision, n × n). Dense Newton: meant for a
    review step's tens of candidates, where it is faster than L-BFGS-B and gives the Hessian too."""
    theta, hessian = laplace_batch(data, data.wins_a[None], data.total[None], np.zeros(data.n), prior_sd=prior_sd)
    return theta[0], hessian[0]


def laplace_batch(data: PairData, wins_a: np.ndarray, total: np.ndarray, theta0: np.ndarray, *,
                  prior_sd: float = PRIOR_SD) -> tuple[np.ndarray, np.ndarray]:
    """`laplace` for R count vectors over `data`'s pairs at once (wins_a, total: (R, U)), from `theta0`
    ((R, n) or (n,); a warm start only saves Newton steps): θ (R, n), each centred, and the
    precisions (R, n, n). Used by the review-effort simulation to fit every seed after each vote."""
    theta = newton_batch(data, wins_a, total, theta0, prior_sd=prior_sd, tol=1e-10)
    hessian = _batch_hessian(theta, data, total, _prior_precision(prior_sd))
    return theta - theta.mean(axis=1, keepdims=True), hessian


# --- ids in, standings out ---------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexedVotes:
    ids: list[int]
    winners: np.ndarray     # indices into ids
    losers: np.ndarray


def index_votes(candidate_ids: Sequence[int], votes: Iterable[tuple[int, int]]) -> IndexedVotes:
    """(winner, loser) id votes as index arrays into the sorted candidate ids. Votes naming an unlisted id are
    dropped; a self-vote or a repeated candidate id is a ValueError."""
    # Sorted ids: results (bootstrap draws included) do not depend on the order of the listing.
    ids = sorted(int(c) for c in candidate_ids)
    index = {cid: i for i, cid in enumerate(ids)}
    if len(index) != len(ids):
        dupes = sorted({c for c in ids if ids.count(c) > 1})
        raise ValueError(f"candidate_ids lists {dupes} more than once")
    winners: list[int] = []
    losers: list[int] = []
    for vote in votes:
        winner, loser = vote
        if winner == loser:
            raise ValueError(f"vote {tuple(vote)!r}: candidate {winner} cannot win against itself")
        if winner in index and loser in index:   # votes touching an unlisted candidate are ignored
            winners.append(index[winner])
            losers.append(index[loser])
    return IndexedVotes(ids, np.array(winners, dtype=np.int64), np.array(losers, dtype=np.int64))


def fit(candidate_ids: Sequence[int], votes: Iterable[tuple[int, int]]) -> dict[int, float]:
    """Score per candidate id (Elo scale, mean 1000, rounded to SCORE_DECIMALS) from (winner, loser)
    votes. Every listed candidate gets a score; votes involving unlisted ids are ignored."""
    indexed = index_votes(candidate_ids, votes)
    scores = fit_arrays(len(indexed.ids), indexed.winners, indexed.losers)
    return {cid: round(float(s), SCORE_DECIMALS) for cid, s in zip(indexed.ids, scores)}


def bootstrap_scores(data: PairData, theta: np.ndarray, rounds: int, seed: int,
                     prior_sd: float = PRIOR_SD) -> np.ndarray:
    """(rounds, n) Elo scores refitted on votes resampled with replacement.

    Resampling N votes with replacement is drawing N outcomes from the distinct (winner, loser)
    outcomes with probability count/N: one multinomial draw per round, equivalent and independent
    of N. Each refit starts from the full-data fit (warm start), usually 3–5 Newton steps."""
    n = data.n
    # Distinct outcomes: (pair u, a won) and (pair u, b won), only those that happened.
    wins_b = data.total - data.wins_a
    counts = np.concatenate([data.wins_a, wins_b])
    pair = np.concatenate([np.arange(len(data.a))] * 2)
    a_won = np.concatenate([np.ones(len(data.a), bool), np.zeros(len(data.a), bool)])
    seen = counts > 0
    counts, pair, a_won = counts[seen], pair[seen], a_won[seen]
    total_votes = int(round(counts.sum()))
    rng = np.random.default_rng(seed)
    scores = np.empty((rounds, n))
    chunk = max(1, _BATCH_CELLS // max(1, n * n))
    for start in range(0, rounds, chunk):
        size = min(chunk, rounds - start)
        drawn = rng.multinomial(total_votes, counts / counts.sum(), size=size).astype(np.float64)
        wins_a = np.zeros((size, len(data.a)))
        total = np.zeros((size, len(data.a)))
        wins_a[:, pair[a_won]] = drawn[:, a_won]
        total[:, pair[a_won]] += drawn[:, a_won]
        total[:, pair[~a_won]] += drawn[:, ~a_won]      # each pair appears once per direction
        refit = newton_batch(data, wins_a, total, theta, prior_sd=prior_sd)
        scores[start:start + size] = MEAN_SCORE + ELO_SCALE * (refit - refit.mean(axis=1, keepdims=True))
    return scores


def rank(candidate_ids: Sequence[int], votes: Iterable[tuple[int, int]], *, rounds: int = 1000,
         seed: int = 0) -> list[BTStanding]:
    """Standings best first, with a 95% bootstrap confidence interval per candidate.

    - score: `fit` (Elo scale, mean 1000); wins/losses count only votes among the listed candidates.
    - CI: the 2.5th and 97.5th percentiles of the score over `rounds` refits on the votes resampled
      with replacement (numpy Generator seeded with `seed`, so the same input and seed give the same
      intervals). A candidate with no votes has nothing to resample; it gets the prior's interval,
      1000 ± 1.96·PRIOR_SD, rather than a zero-width one that would look certain. rounds=0 gives
      ci_low = ci_high = score.
    - Order (deterministic, never random): higher score rounded to SCORE_DECIMALS (so float noise
      cannot reorder candidates), then more wins, then fewer losses, then the lower candidate id (the
      older candidate).
    Sized for a review step (tens to a few hundred candidates): the refits are dense Newton solves.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    indexed = index_votes(candidate_ids, votes)
    n = len(indexed.ids)
    if n == 0:
        return []
    data = aggregate(n, indexed.winners, indexed.losers)
    theta = fit_pairs(data)
    scores = np.round(MEAN_SCORE + ELO_SCALE * theta, SCORE_DECIMALS)
    wins = np.bincount(indexed.winners, minlength=n)
    losses = np.bincount(indexed.losers, minlength=n)
    if rounds and len(indexed.winners):
        boot = bootstrap_scores(data, theta, rounds, seed)
        tail = 100.0 * (1.0 - CI_LEVEL) / 2.0
        low, high = np.percentile(boot, [tail, 100.0 - tail], axis=0)
    else:
        low, high = scores.copy(), scores.copy()
    z = 1.959963984540054
    standings = []
    for i, cid in enumerate(indexed.ids):
        if wins[i] + losses[i] == 0 and rounds:
            lo, hi = MEAN_SCORE - z * PRIOR_SD, MEAN_SCORE + z * PRIOR_SD
        else:
            # Keep the point inside its interval even when a skewed bootstrap puts it at the edge.
            lo, hi = min(float(low[i]), float(scores[i])), max(float(high[i]), float(scores[i]))
        standings.append(BTStanding(cid, float(scores[i]), round(lo, SCORE_DECIMALS), round(hi, SCORE_DECIMALS),
                                    int(wins[i]), int(losses[i])))
    return sort_standings(standings)


def sort_standings(standings: Iterable[BTStanding]) -> list[BTStanding]:
    """Best first: higher score rounded to SCORE_DECIMALS (float noise cannot reorder), then more
    wins, then fewer losses, then the lower candidate id (the older candidate). Never random."""
    return sorted(standings, key=lambda s: (-round(s.score, SCORE_DECIMALS), -s.wins, s.losses, s.candidate_id))
