"""Reviewer effort: votes until the fitted top 3 is the true one and stays so, over a grid of review
steps nobody tuned to; `choose_pair` against two references run in the same process.

    python bench/review_effort.py [--quick] [--seeds S] [--sigmas 1,2,3,5] [--sizes 20,30,60]
                                  [--flips 0,0.1,0.2] [--cells S:N:F,...] [--top-k K] [--exploration E]
                                  [--jobs J] [--seed-offset O]

Grid (full): hidden Bradley–Terry strengths θ ~ Normal(0, σ) in logits (natural units; 1 logit =
174 Elo) for σ in {1, 2, 3, 5}, N in {20, 30, 60} candidates, voters who flip {0, 10, 20}% of their
answers, 40 seeds per cell, top K = 3. No condition on the draw: the K-th and (K+1)-th are as close
as chance makes them (an older version redrew until they were 400 Elo apart, which hid that the
selector stopped learning). --quick: σ in {1, 3}, N = 20, flips {0, 0.2}, 20 seeds. --cells
3:20:0,5:60:0.1 runs only those (σ, N, flip) cells of the grid, each with the same draws as in the
full grid (the draws depend on the seed, N and σ only), e.g. to recheck the cells a change targets.
--seed-offset O runs seeds O, O+1, ... instead of 0, 1, ...: for developing a selector on draws
that the judged run (offset 0) does not use; a run with an offset is never the judged figure.

Voter: asked about (i, j), picks i with probability (1 − flip)·σ(θ_i − θ_j) + flip·σ(θ_j − θ_i).
A pair can be asked again. The m-th answer on a pair comes from a uniform drawn for (seed, pair, m),
so every method gets the same answer when it asks the same pair the same time (common random
numbers), and the same strengths; the flip rates share the strengths and uniforms too.

Methods, each given random.Random(seed), each allowed any pair at any time:
- random: any of the least-voted pairs, uniformly (the older tool's "random unvoted pair", continued
  into second votes once every pair has one; a shuffled round robin);
- boundary: the simple rule: of the (member, outsider) pairs of the current top K by posterior
  mean, the one whose order is the least certain, min |μ_a − μ_b|/s_ab (Laplace posterior; ties
  uniformly); no exploration;
- ours: `pairing.choose_pair(top_k=K)` with its default exploration (0.1). The simulation fits all
  seeds at once (`bradley_terry.laplace_batch`, warm-started) and calls `pairing.select`, the rule
  `choose_pair` applies to its own fit; a sample of choices is recomputed with `choose_pair` itself
  from the vote list and must be the same pair with the same probability.

After every vote each seed's votes are fitted (the fit of `rank`; a sample is recomputed with
`bradley_terry.rank(..., rounds=0)` and must agree), and the top K with `rank`'s tie-break is
compared with the true top K. Budget: B = max(435, 10·N) votes per seed (435: every pair of 30
once; 10 votes per candidate for larger steps), the same for every method.

Reported per cell and method: the median over seeds of the votes until the fitted top K is right
and stays right to the end of the budget ("-" = not reached within B in at least half the seeds),
and the share of seeds right after 100, 200 and 300 votes.

Targets, per cell: ours' median <= the boundary rule's, and ours' median <= 0.5 x random's. Where
the reference does not reach it within B, its count is above B, so ours <= limit x (B + 1) meets the
target; otherwise the budget cannot decide and the cell is reported as undetermined (counted neither
way; the RESULT lines and BENCH_RESULT notes name those cells). Where ours does not reach it and the
reference does, the target is missed.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from persona_pipeline.domain import bradley_terry as bt  # noqa: E402
from persona_pipeline.domain import pairing  # noqa: E402

from _report import emit, record  # noqa: E402  (bench/, the script's folder, is on sys.path)

METHODS = ("random", "boundary", "ours")
MARKS = (100, 200, 300)
RANDOM_RATIO = 0.5          # ours' median votes <= this x random's
CHECK_EVERY = 37            # every so many votes, one seed's fit and choice are recomputed the slow way
BLOCK = 32                  # answers drawn per pair at a time


def budget(n: int) -> int:
    return max(435, 10 * n)


@dataclass(frozen=True)
class Cell:
    sigma: float
    n: int
    flip: float
    seeds: int
    top_k: int
    exploration: float
    seed_offset: int = 0

    @property
    def label(self) -> str:
        return f"sigma={self.sigma:g} N={self.n} flip={self.flip:.0%}"


class Voter:
    """One seed's hidden strengths and its stream of answers per pair."""

    def __init__(self, cell: Cell, seed: int, pairs: np.ndarray):
        self.seed = seed
        self.theta = np.random.default_rng([seed, cell.n, round(cell.sigma * 1000)]).normal(0.0, cell.sigma, cell.n)
        self.true_top = frozenset(int(c) + 1 for c in np.argsort(-self.theta, kind="stable")[:cell.top_k])
        d = self.theta[pairs[:, 0]] - self.theta[pairs[:, 1]]
        self.p_low = (1 - cell.flip) * bt.sigmoid(d) + cell.flip * bt.sigmoid(-d)   # P(lower index wins)
        self.key = [seed, cell.n, round(cell.sigma * 1000)]
        self.uniforms: dict[int, np.ndarray] = {}

    def low_wins(self, u: int, m: int) -> bool:
        """The answer to the m-th question on pair u (0-based m)."""
        block, offset = divmod(m, BLOCK)
        draws = self.uniforms.get(u * 1_000_000 + block)
        if draws is None:
            draws = np.random.default_rng(self.key + [u, block]).random(BLOCK)
            self.uniforms[u * 1_000_000 + block] = draws
        return bool(draws[offset] < self.p_low[u])


def top_sets(theta: np.ndarray, wins: np.ndarray, losses: np.ndarray, k: int) -> list[frozenset]:
    """Top k per seed with `rank`'s order: rounded score desc, wins desc, losses asc, id asc."""
    scores = np.round(bt.MEAN_SCORE + bt.ELO_SCALE * (theta - theta.mean(axis=1, keepdims=True)), bt.SCORE_DECIMALS)
    ids = np.arange(1, theta.shape[1] + 1)
    return [frozenset(int(ids[c]) for c in np.lexsort((ids, losses[s], -wins[s], -scores[s]))[:k])
            for s in range(theta.shape[0])]


def boundary_rule(theta: np.ndarray, covariance: np.ndarray, k: int, rng: random.Random) -> tuple[int, int]:
    """The simple reference rule for one seed: the least certain (member, outsider) order."""
    order = np.argsort(-theta, kind="stable")
    members, outsiders = order[:k], order[k:]
    var = np.diag(covariance)
    s2 = var[members][:, None] + var[outsiders][None, :] - 2.0 * covariance[np.ix_(members, outsiders)]
    z = np.abs(theta[members][:, None] - theta[outsiders][None, :]) / np.sqrt(s2)
    tied = np.argwhere(z <= z.min() + 1e-12)
    a, b = tied[rng.randrange(len(tied))]
    return int(members[a]), int(outsiders[b])


def simulate(cell: Cell, method: str) -> dict:
    """One method on one cell: per seed, whether the fitted top K is right after each vote."""
    n, k, horizon = cell.n, cell.top_k, budget(cell.n)
    pairs = np.array(list(itertools.combinations(range(n), 2)), dtype=np.int64)
    column = {(int(a), int(b)): u for u, (a, b) in enumerate(pairs)}
    voters = [Voter(cell, seed, pairs) for seed in range(cell.seed_offset, cell.seed_offset + cell.seeds)]
    count = len(voters)
    data = bt.PairData(n, pairs[:, 0], pairs[:, 1], np.zeros(len(pairs)), np.ones(len(pairs)))
    wins_a = np.zeros((count, len(pairs)))
    total = np.zeros((count, len(pairs)))
    wins = np.zeros((count, n), dtype=np.int64)
    losses = np.zeros((count, n), dtype=np.int64)
    votes: list[list[tuple[int, int]]] = [[] for _ in voters]
    rngs = [random.Random(v.seed) for v in voters]
    rounds: list[list[int]] = [[] for _ in voters]          # random: this round's remaining pairs
    theta, precision = bt.laplace_batch(data, wins_a, total, np.zeros(n))
    right = np.zeros((count, horizon), dtype=bool)
    choosing = 0.0
    checked = 0
    for t in range(horizon):
        with bt.single_threaded_blas():
            covariance = np.linalg.inv(precision)
        for s, voter in enumerate(voters):
            started = time.perf_counter()
            if method == "random":
                if not rounds[s]:
                    rounds[s] = list(range(len(pairs)))
                    rngs[s].shuffle(rounds[s])
                i, j = pairs[rounds[s].pop()]
            elif method == "boundary":
                i, j = boundary_rule(theta[s], covariance[s], k, rngs[s])
            else:
                state = rngs[s].getstate() if t % CHECK_EVERY == s % CHECK_EVERY else None
                index, probability, _ = pairing.select(theta[s], covariance[s], k, pairs,
                                                       exploration=cell.exploration, rng=rngs[s])
                i, j = pairs[index]
                if state is not None:                     # the same choice as choose_pair's own
                    replay = random.Random()
                    replay.setstate(state)
                    ids = list(range(1, n + 1))
                    choice = pairing.choose_pair(ids, votes[s], k, exploration=cell.exploration, rng=replay)
                    if {choice.left_id, choice.right_id} != {i + 1, j + 1} or \
                            not np.isclose(choice.probability, probability, rtol=1e-9, atol=0):
                        raise SystemExit(f"{cell.label} seed {s}, vote {t + 1}: choose_pair picked "
                                         f"{choice} but the simulation's select picked {(i + 1, j + 1)} "
                                         f"with probability {probability}")
                    checked += 1
            choosing += time.perf_counter() - started
            a, b = (int(i), int(j)) if i < j else (int(j), int(i))
            u = column[(a, b)]
            low_wins = voter.low_wins(u, int(total[s, u]))
            winner, loser = (a, b) if low_wins else (b, a)
            votes[s].append((winner + 1, loser + 1))
            total[s, u] += 1.0
            wins_a[s, u] += 1.0 if low_wins else 0.0
            wins[s, winner] += 1
            losses[s, loser] += 1
        theta, precision = bt.laplace_batch(data, wins_a, total, theta)      # warm start from the last vote
        tops = top_sets(theta, wins, losses, k)
        if t % CHECK_EVERY == 0:                                             # the batched fit is `rank`'s fit
            s = (t // CHECK_EVERY) % count
            standings = bt.rank(list(range(1, n + 1)), votes[s], rounds=0)
            if frozenset(x.candidate_id for x in standings[:k]) != tops[s]:
                raise SystemExit(f"{cell.label}: batched fit disagrees with bradley_terry.rank (seed {s}, {t + 1} votes)")
            checked += 1
        right[:, t] = [top == v.true_top for top, v in zip(tops, voters)]
    # Votes until right and staying right: one past the last wrong fit (horizon + 1: not reached).
    wrong = ~right
    last_wrong = np.where(wrong.any(axis=1), horizon - np.argmax(wrong[:, ::-1], axis=1), 0)
    until = np.where(right[:, -1], last_wrong + 1, horizon + 1)
    median = float(np.median(until))
    return {"cell": cell, "method": method, "until": until.tolist(),
            "median": None if median > horizon else median,
            "accuracy": {m: float(right[:, m - 1].mean()) for m in MARKS if m <= horizon},
            "choose_ms": 1000 * choosing / (count * horizon), "checked": checked}


def simulate_cell(cell: Cell) -> list[dict]:
    return [simulate(cell, method) for method in METHODS]


def show(median: float | None) -> str:
    return "-" if median is None else f"{median:g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sigma 1,3, N 20, flips 0,0.2, 20 seeds")
    parser.add_argument("--seeds", type=int, help="seeds per cell (default 40, quick 20)")
    parser.add_argument("--sigmas", help="strength SDs in logits (default 1,2,3,5)")
    parser.add_argument("--sizes", help="candidates per step (default 20,30,60)")
    parser.add_argument("--flips", help="share of answers flipped (default 0,0.1,0.2)")
    parser.add_argument("--cells", help="only these cells, as sigma:N:flip separated by commas (e.g. 3:20:0,5:60:0.1)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--exploration", type=float, default=0.1, help="choose_pair's exploration (0.1)")
    parser.add_argument("--jobs", type=int, default=1, help="cells simulated in parallel processes (1)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="first seed (0, the judged seeds); another offset is for development only")
    args = parser.parse_args()
    floats = lambda text: [float(x) for x in text.split(",")]     # noqa: E731
    sigmas = floats(args.sigmas) if args.sigmas else ([1.0, 3.0] if args.quick else [1.0, 2.0, 3.0, 5.0])
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([20] if args.quick else [20, 30, 60])
    flips = floats(args.flips) if args.flips else ([0.0, 0.2] if args.quick else [0.0, 0.1, 0.2])
    seeds = args.seeds or (20 if args.quick else 40)
    if args.cells:
        if args.quick or args.sigmas or args.sizes or args.flips:
            parser.error("--cells names whole cells: it cannot be combined with --quick, --sigmas, --sizes or --flips")
        try:
            chosen = [(float(sigma), int(n), float(flip)) for sigma, n, flip in
                      (text.split(":") for text in args.cells.split(","))]
        except ValueError:
            parser.error(f"--cells {args.cells!r}: expected sigma:N:flip separated by commas, e.g. 3:20:0,5:60:0.1")
        cells = [Cell(sigma, n, flip, seeds, args.top_k, args.exploration, args.seed_offset) for sigma, n, flip in chosen]
    else:
        cells = [Cell(sigma, n, flip, seeds, args.top_k, args.exploration, args.seed_offset)
                 for n in sizes for sigma in sigmas for flip in flips]
    first = f"seeds {args.seed_offset}..{args.seed_offset + seeds - 1} (development, not the judged seeds)" \
        if args.seed_offset else f"{seeds} seeds per cell"
    print(f"Reviewer effort: true top {args.top_k}; strengths ~ Normal(0, sigma) logits; {first}; "
          f"budget max(435, 10N) votes; {len(cells)} cells")
    print("  median = votes until the fitted top K is right and stays so to the end of the budget "
          "(median over seeds, '-' = not within the budget); acc@v = share of seeds right after v votes")
    started = time.perf_counter()
    head = f"  {'sigma':>5} {'N':>3} {'flip':>4} {'budget':>6} | {'median votes':^23} |" + \
        "".join(f" {'acc@' + str(m) + ' r/b/o':^17} |" for m in MARKS) + " ours ms/pair"
    print(head)
    print("  " + "-" * (len(head) - 2))
    verdicts: dict[str, dict[str, list[str]]] = {"boundary": {}, "random": {}}
    worst: dict[str, tuple] = {}                # reference -> (ratio, cell, reference votes, ours votes)
    by: dict[tuple, dict] = {}
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    done = pool.map(simulate_cell, cells) if pool else map(simulate_cell, cells)     # rows print as cells finish
    for cell, results in zip(cells, done):
        by.update({(cell, x["method"]): x for x in results})
        r, b, o = results
        horizon = budget(cell.n)
        accs = "".join(" " + " / ".join(f"{x['accuracy'].get(m, float('nan')):4.0%}" for x in (r, b, o)) + "  |"
                       for m in MARKS)
        print(f"  {cell.sigma:5g} {cell.n:3d} {cell.flip:4.0%} {horizon:6d} | {show(r['median']):>6} {show(b['median']):>7} "
              f"{show(o['median']):>7} |{accs} {o['choose_ms']:.2f}", flush=True)
        for name, reference, limit in (("boundary", b["median"], 1.0), ("random", r["median"], RANDOM_RATIO)):
            # Not reached within the budget: B + 1 stands in (a lower bound of the true count).
            ref_votes = horizon + 1 if reference is None else reference
            ours = horizon + 1 if o["median"] is None else o["median"]
            if o["median"] is None:
                # Neither reaches it: the budget cannot tell them apart.
                verdict = "undetermined" if reference is None else "missed"
            elif ours <= limit * ref_votes:
                verdict = "met"                    # also when the reference's true count is above B + 1
            else:
                # A reference that did not reach it needs more than B votes, by how much is unknown.
                verdict = "undetermined" if reference is None else "missed"
            verdicts[name].setdefault(verdict, []).append(cell.label)
            ratio = ours / ref_votes
            if verdict != "undetermined" and (name not in worst or ratio > worst[name][0]):
                worst[name] = (ratio, cell, ref_votes, ours)
    if pool:
        pool.shutdown()
    checked = sum(x["checked"] for x in by.values())
    print(f"  ({time.perf_counter() - started:.0f} s; {checked} fits and choices recomputed with rank/choose_pair, all equal)")

    oks = {}
    grid = f"{len(cells)} cells x {seeds} seeds"
    for name, label, target in (("boundary", "simple boundary rule", "ours <= reference"),
                                ("random", "random least-voted pair", f"ours <= {RANDOM_RATIO:g}x reference")):
        v = verdicts[name]
        oks[name] = not v.get("missed")
        print(f"RESULT: median votes, {target} ({label}): met in {len(v.get('met', []))}/{len(cells)} cells"
              + "".join(f"; {kind} in {len(v[kind])}: {', '.join(v[kind])}" for kind in ("missed", "undetermined") if v.get(kind))
              + f": {'PASS' if oks[name] else 'FAIL'}")
        undetermined = len(v.get("undetermined", []))
        note = f"{grid}; met in {len(v.get('met', []))}, missed in {len(v.get('missed', []))}" + \
            (f", undetermined in {undetermined} (neither within the budget)" if undetermined else "")
        if name in worst:
            ratio, cell, reference, ours = worst[name]
            bound = "; B+1 = not reached within the budget" if max(reference, ours) > budget(cell.n) else ""
            record(f"median votes until the top {args.top_k} is right and stays, worst decided cell: {label} vs choose_pair",
                   reference=reference, ours=ours, unit="votes", better="lower", target=f"{target} in every cell",
                   ok=oks[name], note=f"{note}; worst cell {cell.label}{bound}")
        else:
            record(f"median votes until the top {args.top_k} is right and stays: {label} vs choose_pair",
                   reference=None, ours=budget(cells[-1].n) + 1, unit="votes", better="lower", target=f"{target} in every cell",
                   ok=oks[name], note=f"{note}; no cell decided")
    for mark in MARKS:
        rows = [c for c in cells if mark <= budget(c.n)]
        mean = {m: float(np.mean([by[(c, m)]["accuracy"][mark] for c in rows])) for m in METHODS}
        record(f"share of seeds with the right top {args.top_k} after {mark} votes, mean over the grid: random vs choose_pair",
               reference=100 * mean["random"], ours=100 * mean["ours"], unit="%", better="higher",
               note=f"{grid}; simple boundary rule {100 * mean['boundary']:.0f}%")
    return 0 if all(oks.values()) else 1


if __name__ == "__main__":
    code = main()
    emit()
    sys.exit(code)
