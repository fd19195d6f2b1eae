"""Learning from the audience: cumulative interactions over 180 simulated days, three strategies.

    python bench/audience_learning.py [--quick] [--seeds S] [--seed-offset K] [--days D] [--shift N] [--ablation] [--png PATH]

The audience (persona_pipeline/domain/audience.py, defaults documented in docs/insights.md) has
hidden per-pillar engagement rates (base 3.5 %, spread lognormal sd 0.3 between pillars, drawn per
seed), a daily hour cycle (amplitude 0.2 on the log-rate, peak hour drawn per seed: the operator
does not know it), a slow drift (random walk, sd 0.02 a day on the log-rate), per-post quality
noise (sd 0.3), noisy reach (sd 0.4) with elasticity 0.5 to the post's engagement, and follower
growth. None of these was changed to meet the targets.

The persona: the demo's pillars and weights (everyday 40, travel 35, outdoors 25), the default
posting windows (05:00-08:00 and 10:00-15:00, Europe/Lisbon), 3 posts a week, weekly cap 5. Every
7 days each strategy plans the next 7 days with the real planner (domain/slots.spaced_slots,
domain/strategy.plan_posts) over a library with images of every pillar:
1. static: the configured weights and the slots as spaced (today's behaviour);
2. learning: domain/learning.py: Thompson sampling over pillar shares (±N points, default 15) and
   hours inside the windows, from the insights it has read by then (+1 h/+24 h/+72 h/+7 d reads);
3. oracle: knows the hidden rates on the planning day; the best shares within the same bounds and
   the best hour inside the windows.
The n-th post of every strategy gets the same noise draws (common random numbers), so the
comparison is paired. The ratio targets are judged over 40 or more seeds only; --quick (10 seeds)
prints the figures without a verdict. Figures: per-seed ratios of cumulative interactions, median and mean over
seeds; the pillar shares: every learned target within bounds, and every pillar's realised share of
each run's posts within them too (the planner holds the bounds over its last 90 days for the
learning strategy and the oracle alike: domain/strategy.py, share_bounds).
A PNG of the mean regret (oracle − strategy cumulative interactions) over days is written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time as clock
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from persona_pipeline.domain import learning, strategy  # noqa: E402
from persona_pipeline.domain.audience import AudienceParams, SimulatedAudience  # noqa: E402
from persona_pipeline.domain.insight_reads import READ_AGES_H  # noqa: E402
from persona_pipeline.domain.slots import spaced_slots  # noqa: E402
from persona_pipeline.insight_plots import lines_png  # noqa: E402

from _report import emit, record  # noqa: E402

PILLARS = {"everyday": 40, "travel": 35, "outdoors": 25}
WINDOWS = [(time(5), time(8)), (time(10), time(15))]
TZ = "Europe/Lisbon"
POSTS_PER_WEEK = 3
TARGET_STATIC, TARGET_ORACLE = 1.15, 0.85
JUDGED_SEEDS = 40


def _latest_read(age_h: float) -> float | None:
    """The age of the newest read a collector has made of a post `age_h` hours old."""
    done = [a for a in READ_AGES_H if a <= age_h]
    return done[-1] if done else None


def simulate(seed: int, days: int, shift: float, kind: str) -> dict:
    """One strategy's run: daily cumulative interactions, targets and realised pillar counts."""
    audience = SimulatedAudience(AudienceParams(seed=seed, peak_hour=None), list(PILLARS), date(2026, 1, 1))
    zone = ZoneInfo(TZ)
    start = datetime(2026, 1, 1, tzinfo=zone).astimezone(timezone.utc)
    ids = {name: i + 1 for i, name in enumerate(PILLARS)}
    names = {i: name for name, i in ids.items()}
    pillars = [strategy.StrategyPillar(ids[n], n, w, p + 1) for p, (n, w) in enumerate(PILLARS.items())]
    settings = learning.LearningSettings(enabled=True, max_share_shift=shift, seed=seed)
    bounds = learning.share_bounds(PILLARS, settings)
    bounds_by_id = {ids[n]: b for n, b in bounds.items()}  # held by the planner for learning and oracle alike
    rules = strategy.StrategyRules(theme_spacing=timedelta(0), weekly_cap=5)
    posts: list[dict] = []  # at, pillar, final insight
    followers = float(audience.params.start_followers)
    daily = np.zeros(days)
    out_of_bounds = 0
    item = 0
    by_day: dict[int, list[dict]] = {}
    for day in range(days):
        now = start + timedelta(days=day)
        if day % 7 == 0:
            options = []
            for name in PILLARS:
                for _ in range(6):
                    item += 1
                    options.append(strategy.LibraryOption(item, ids[name], "", None))
            slots = spaced_slots(now, POSTS_PER_WEEK, timedelta(days=7 / POSTS_PER_WEEK), WINDOWS, TZ,
                                 [p["at"] for p in posts], timedelta(hours=2), now + timedelta(days=7))
            shares = held = None
            if kind.startswith("learning"):
                seen = []
                for p in posts:
                    age = _latest_read((now - p["at"]).total_seconds() / 3600)
                    if age is not None:
                        read = audience.at_age(p["insight"], age)
                        seen.append(learning.Observation(p["pillar"], p["at"].astimezone(zone).hour, read.reach,
                                                         read.total_interactions, p["at"]))
                learned = learning.learn_shares(PILLARS, seen, settings, now)
                out_of_bounds += sum(not bounds[n][0] <= s <= bounds[n][1] for n, s in learned.shares.items())
                if kind != "learning_hours":  # the ablations: shares alone, hours alone
                    shares = {ids[n]: s for n, s in learned.shares.items()}
                    held = bounds_by_id
                if kind != "learning_shares":
                    slots = [s for s, _ in learning.pick_hours(learned.posterior, slots, WINDOWS, TZ, settings)]
            elif kind == "oracle":
                today = (now.astimezone(zone)).date()
                truth = {n: audience.rate(n, 12, today) for n in PILLARS}
                shares = {ids[n]: s for n, s in learning.bounded_best(truth, bounds).items()}
                held = bounds_by_id
                slots = [max(learning.window_moments(s.astimezone(zone).date(), WINDOWS, TZ),
                             key=lambda m: audience.hour_factor(m.hour + m.minute / 60)).astimezone(timezone.utc)
                         for s in slots]
            plan = strategy.plan_posts(slots=slots, pillars=pillars, options=options,
                                       history=[strategy.PastPost(ids[p["pillar"]], "", p["at"]) for p in posts],
                                       rules=rules, tz=TZ, target_shares=shares, share_bounds=held)
            for planned in plan.posts:
                by_day.setdefault((planned.slot - start).days, []).append(
                    {"at": planned.slot, "pillar": names[planned.pillar_id]})
        for entry in sorted(by_day.pop(day, []), key=lambda e: e["at"]):
            local = entry["at"].astimezone(zone)
            # Keyed by the post's ordinal: the n-th post of every strategy shares its noise draws.
            entry["insight"] = audience.post(f"n{len(posts)}", pillar=entry["pillar"],
                                             hour=local.hour + local.minute / 60, day=local.date(), followers=followers)
            posts.append(entry)
            daily[day] += entry["insight"].total_interactions
        followers = audience.follower_step(followers, int(daily[day]))
    counts = {n: sum(1 for p in posts if p["pillar"] == n) for n in PILLARS}
    return {"cumulative": np.cumsum(daily), "counts": counts, "out_of_bounds": out_of_bounds, "posts": len(posts),
            "bounds": bounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 seeds instead of 40")
    parser.add_argument("--seeds", type=int, help="seeds (default 40, quick 10)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="first seed (default 0: the judged seeds 0..39); develop on another range, e.g. 1000")
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--shift", type=float, default=15.0, help="± points each pillar's share may move (15)")
    parser.add_argument("--ablation", action="store_true",
                        help="also run learning with the shares alone and with the hours alone (where the gain comes from)")
    parser.add_argument("--png", help="regret curve (default docs/images/audience_regret.png; with --quick a "
                                      "file in the temporary folder, so a quick or development run never replaces the docs' figure)")
    args = parser.parse_args()
    seeds = args.seeds or (10 if args.quick else 40)
    if args.png is None:
        args.png = (str(Path(tempfile.gettempdir()) / "audience_regret_quick.png") if args.quick or args.seed_offset
                    else str(REPO / "docs" / "images" / "audience_regret.png"))
    started = clock.perf_counter()
    kinds = ("static", "learning", "oracle") + (("learning_shares", "learning_hours") if args.ablation else ())
    runs = {kind: [simulate(seed, args.days, args.shift, kind) for seed in range(args.seed_offset, args.seed_offset + seeds)] for kind in kinds}
    elapsed = clock.perf_counter() - started
    totals = {kind: np.array([r["cumulative"][-1] for r in rs]) for kind, rs in runs.items()}
    vs_static = totals["learning"] / totals["static"]
    vs_oracle = totals["learning"] / totals["oracle"]
    oracle_static = totals["oracle"] / totals["static"]
    print(f"Audience learning: {seeds} seeds ({args.seed_offset}..{args.seed_offset + seeds - 1}) × {args.days} days, {POSTS_PER_WEEK} posts/week, bounds ±{args.shift:g} "
          f"points, pillars {PILLARS}; {elapsed:.1f} s")
    print(f"{'strategy':<16} {'median interactions':>20} {'mean':>12} {'posts':>7}")
    for kind, values in totals.items():
        posts = statistics.mean(r["posts"] for r in runs[kind])
        print(f"{kind:<16} {statistics.median(values):>20,.0f} {values.mean():>12,.0f} {posts:>7.1f}")
    print(f"learning / static  per seed: median {np.median(vs_static):.3f}, mean {vs_static.mean():.3f}, "
          f"min {vs_static.min():.3f}, max {vs_static.max():.3f}")
    print(f"learning / oracle  per seed: median {np.median(vs_oracle):.3f}, mean {vs_oracle.mean():.3f}, "
          f"min {vs_oracle.min():.3f}")
    print(f"oracle / static    per seed: median {np.median(oracle_static):.3f} (the most any strategy could gain)")
    for kind in kinds[3:]:
        print(f"{kind} / static per seed: median {np.median(totals[kind] / totals['static']):.3f}")
    out = sum(r["out_of_bounds"] for r in runs["learning"])
    excursion = 0.0
    for r in runs["learning"]:
        total = sum(r["counts"].values())
        for name, count in r["counts"].items():
            low, high = r["bounds"][name]
            share = count / total
            excursion = max(excursion, float(low) - share, share - float(high))
    print(f"learned targets outside their bounds: {out}; realised run shares: largest excursion beyond a bound "
          f"{max(0.0, excursion) * 100:.1f} points")
    _plot(runs, args.png, args.days)
    print(f"regret curve: {args.png}")
    ok_static = bool(np.median(vs_static) >= TARGET_STATIC)
    ok_oracle = bool(np.median(vs_oracle) >= TARGET_ORACLE)
    # The targets are set over 40+ seeds; fewer (--quick) give the figures but no verdict on them.
    # A development range (--seed-offset) is never judged either: choices are made there, the
    # verdict only on the judged seeds 0..39.
    judged = seeds >= JUDGED_SEEDS and args.seed_offset == 0
    verdict = ((lambda ok: "PASS" if ok else "FAIL") if judged else
               (lambda ok: f"not judged ({seeds} seeds from {args.seed_offset}; judged: {JUDGED_SEEDS}+ from 0)"))
    print(f"RESULT learning/static {np.median(vs_static):.3f} (target >= {TARGET_STATIC}): {verdict(ok_static)}")
    print(f"RESULT learning/oracle {np.median(vs_oracle):.3f} (target >= {TARGET_ORACLE}): {verdict(ok_oracle)}")
    print(f"RESULT pillar targets out of bounds {out} (target 0): {'PASS' if out == 0 else 'FAIL'}")
    print(f"RESULT realised run shares beyond a bound {max(0.0, excursion) * 100:.1f} points (target 0): "
          f"{'PASS' if excursion <= 0 else 'FAIL'}")
    # Ratios per seed (paired runs), their median: reference 1.0 is the other side's own total.
    record("cumulative interactions per seed, learning / static (median of paired ratios)", reference=1.0,
           ours=float(np.median(vs_static)), unit="x static", better="higher",
           target=f">= {TARGET_STATIC}x over {JUDGED_SEEDS}+ seeds", ok=ok_static if judged else None,
           note=f"{seeds} seeds, {args.days} days; medians: static {np.median(totals['static']):,.0f}, "
                f"learning {np.median(totals['learning']):,.0f} interactions")
    record("cumulative interactions per seed, learning / oracle (median of paired ratios)", reference=1.0,
           ours=float(np.median(vs_oracle)), unit="x oracle", better="higher",
           target=f">= {TARGET_ORACLE}x over {JUDGED_SEEDS}+ seeds", ok=ok_oracle if judged else None,
           note=f"oracle / static {np.median(oracle_static):.3f}: the most any strategy could gain")
    record("learned pillar targets outside the operator's bounds", reference=None, ours=out, unit="targets",
           better="lower", target="0", ok=out == 0)
    record("realised pillar share over a run beyond the operator's bounds, worst run", reference=None,
           ours=round(max(0.0, excursion) * 100, 2), unit="points", better="lower", target="0", ok=excursion <= 0)
    emit()
    return 0 if out == 0 and excursion <= 0 and (not judged or (ok_static and ok_oracle)) else 1


def _plot(runs: dict, path: str, days: int) -> None:
    oracle = np.mean([r["cumulative"] for r in runs["oracle"]], axis=0)
    series = {kind: list(oracle - np.mean([r["cumulative"] for r in runs[kind]], axis=0)) for kind in ("static", "learning")}
    png = lines_png(series, "Regret: oracle - strategy, cumulative interactions (simulated, mean over seeds)", "day")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


if __name__ == "__main__":
    raise SystemExit(main())
