"""Development runs of pair-selector variants on the review-effort grid, on seeds the judged run
does not use (docs/benchmarks.md#reviewer-effort says what they measured).

    python bench/_pair_variants.py --cells 3:20:0,5:30:0.1 [--seeds 40] [--offset 1000]
                                   [--variants cur:0.1,kg:0.1] [--boundary]

Each variant NAME:EXPLORATION replaces `pairing.select` inside bench/review_effort.py's simulation
(so its check against `choose_pair` replays the variant too) and prints, per cell, the median votes
until the top 3 is right and stays, the share right after 100/200/300 votes and the mean of the
votes-until (budget + 1 where never). Names: cur (doubt x variance share: today's
`boundary_score`), simple (the boundary rule's doubt alone), kg (the expected fall of the pair's
doubt after one vote, by Gauss-Hermite: judged once and not kept), softexp / stradexp / doubtexp (exploration drawn in proportion to the score, to
straddling, to the doubt, with a tenth of it uniform), gate (exploration x 2 x the doubt of the
best pair); a trailing s splits the top K by stable order instead of sharing ties. --offset 0 (the
judged seeds) is refused.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from scipy.special import ndtr  # noqa: E402

import review_effort as re_  # noqa: E402
from persona_pipeline.domain import bradley_terry as bt  # noqa: E402
from persona_pipeline.domain import pairing  # noqa: E402

ORIG = pairing.select
_x, _w = np.polynomial.hermite.hermgauss(24)
GH_X, GH_W = np.sqrt(2) * _x, _w / np.sqrt(np.pi)

def mixture(score, pairs, eps, rng, q_explore=None):
    """greedy argmax score w.p. 1-eps, else draw from q_explore (default uniform)."""
    count = len(pairs)
    best = float(score.max())
    greedy = np.flatnonzero(score >= best - 1e-9 * max(1.0, abs(best)))
    if q_explore is None:
        q_explore = np.full(count, 1.0 / count)
    explored = rng.random() < eps
    if explored:
        u = rng.random()
        index = int(min(np.searchsorted(np.cumsum(q_explore), u * q_explore.sum(), side="right"), count - 1))
    else:
        index = int(greedy[rng.randrange(len(greedy))])
    is_g = bool(np.any(greedy == index))
    prob = (1 - eps) * (1.0 / len(greedy) if is_g else 0.0) + eps * q_explore[index] / q_explore.sum()
    return index, prob, "explore" if explored else "active"

def parts(theta, cov, k, pairs):
    i, j = pairs[:, 0], pairs[:, 1]
    var = np.diag(cov)
    s2 = np.maximum(var[i] + var[j] - 2 * cov[i, j], 1e-300)
    z = np.abs(theta[i] - theta[j]) / np.sqrt(s2)
    st = pairing.straddles(theta, k, pairs)
    p = bt.sigmoid((theta[i] - theta[j]) / np.sqrt(1 + np.pi * s2 / 8))
    h = p * (1 - p)
    share = h * s2 / (1 + h * s2)
    return z, st, share, s2

def make(name0, eps):
    def sel(theta, cov, k, pairs, *, exploration, rng):
        if k >= len(theta):
            return rng.randrange(len(pairs)), 1 / len(pairs), "explore"
        name = name0
        z, st, share, s2 = parts(theta, cov, k, pairs)
        if name.endswith("s"):      # strict split: the top K by stable argsort, no tie-sharing
            name = name[:-1]
            order = np.argsort(-theta, kind="stable"); up = np.zeros(len(theta), bool); up[order[:k]] = True
            st = up[pairs[:, 0]] != up[pairs[:, 1]]
        doubt = ndtr(-z)
        if name == "cur":
            return mixture(np.where(st, doubt * share, 0), pairs, eps, rng)
        if name == "simple":
            return mixture(np.where(st, doubt, 0), pairs, eps, rng)
        if name.startswith("softexp"):   # explore proportional to score, plus 10% uniform
            score = np.where(st, doubt * share, 0)
            q = 0.9 * score / max(score.sum(), 1e-300) + 0.1 / len(pairs)
            return mixture(score, pairs, eps, rng, q)
        if name == "stradexp":   # explore uniformly among straddling pairs (+10% uniform)
            score = np.where(st, doubt * share, 0)
            q = 0.9 * st / st.sum() + 0.1 / len(pairs)
            return mixture(score, pairs, eps, rng, q)
        if name == "simple_stradexp":
            score = np.where(st, doubt, 0)
            q = 0.9 * st / st.sum() + 0.1 / len(pairs)
            return mixture(score, pairs, eps, rng, q)
        if name == "doubtexp":   # explore among straddling pairs weighted by doubt (+10% uniform)
            score = np.where(st, doubt * share, 0)
            w = np.where(st, doubt, 0)
            q = 0.9 * w / w.sum() + 0.1 / len(pairs)
            return mixture(score, pairs, eps, rng, q)
        if name == "gate":   # cur greedy; exploration scaled by how much the best pair's order is still in doubt
            score = np.where(st, doubt * share, 0)
            g = float(2 * doubt[np.argmax(score)])
            return mixture(score, pairs, eps * g, rng)
        if name == "kg":     # expected fall of this pair's doubt from one vote (Gauss-Hermite preposterior)
            m = np.abs(theta[pairs[:, 0]] - theta[pairs[:, 1]])
            a = np.sqrt(s2 * share); b = np.sqrt(s2 * (1 - share))
            after = (GH_W[None, :] * ndtr(-np.abs(m[:, None] + a[:, None] * GH_X[None, :]) / b[:, None])).sum(axis=1)
            return mixture(np.where(st, np.maximum(doubt - after, 0), 0), pairs, eps, rng)
        raise KeyError(name)
    return sel

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", required=True, help="sigma:N:flip separated by commas")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--offset", type=int, default=1000, help="first seed (>= 40: not the judged seeds)")
    parser.add_argument("--variants", default="cur:0.1", help="NAME:EXPLORATION separated by commas")
    parser.add_argument("--boundary", action="store_true", help="also run the simple boundary rule")
    args = parser.parse_args()
    if args.offset < 40:
        parser.error(f"--offset {args.offset}: the judged seeds start at 0; develop on others (e.g. 1000)")
    started = time.time()
    for text in args.cells.split(","):
        sigma, n, flip = (float(x) for x in text.split(":"))
        cell = re_.Cell(sigma, int(n), flip, args.seeds, 3, 0.1, args.offset)
        row = [f"s{sigma:g} N{int(n)} f{flip:g}"]
        if args.boundary:
            result = re_.simulate(cell, "boundary")
            row.append(f"boundary {re_.show(result['median'])} acc {[round(v, 2) for v in result['accuracy'].values()]}")
        for variant in args.variants.split(","):
            name, exploration = variant.split(":")
            pairing.select = make(name, float(exploration))
            try:
                result = re_.simulate(cell, "ours")
            finally:
                pairing.select = ORIG
            row.append(f"{variant} {re_.show(result['median'])} acc {[round(v, 2) for v in result['accuracy'].values()]} "
                       f"until {np.mean(result['until']):.0f}")
        print(" | ".join(row), f"[{time.time() - started:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
