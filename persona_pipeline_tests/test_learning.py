"""Learning from the audience, the pure parts: the simulated audience, the statistics and the
bounded Thompson-sampling strategy (domain/audience.py, insight_stats.py, learning.py)."""

from datetime import date, datetime, time, timedelta, timezone
from fractions import Fraction
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from persona_pipeline.domain import insight_stats as stats
from persona_pipeline.domain import learning
from persona_pipeline.domain.audience import AudienceParams, SimulatedAudience, age_fraction
from persona_pipeline.domain.strategy import LibraryOption, PastPost, StrategyPillar, StrategyRules, plan_posts

UTC = timezone.utc
WEIGHTS = {"everyday": 40, "travel": 35, "outdoors": 25}
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def observations(rates: dict[str, float], per_pillar: int, seed: int = 0, hour: int = 12) -> list[learning.Observation]:
    rng = np.random.default_rng(seed)
    out = []
    for name, rate in rates.items():
        for i in range(per_pillar):
            reach = int(rng.integers(2000, 4000))
            out.append(learning.Observation(name, hour, reach, int(rng.binomial(reach, rate)),
                                            NOW - timedelta(days=i + 1)))
    return out


# --- the simulated audience ----------------------------------------------------------------------

def test_audience_is_deterministic_per_seed_and_post_key():
    a = SimulatedAudience(AudienceParams(seed=3), list(WEIGHTS), date(2026, 1, 1))
    b = SimulatedAudience(AudienceParams(seed=3), list(WEIGHTS), date(2026, 1, 1))
    one = a.post("p1", pillar="travel", hour=12, day=date(2026, 3, 1), followers=10_000)
    assert one == b.post("p1", pillar="travel", hour=12, day=date(2026, 3, 1), followers=10_000)
    assert one != a.post("p2", pillar="travel", hour=12, day=date(2026, 3, 1), followers=10_000)
    other = SimulatedAudience(AudienceParams(seed=4), list(WEIGHTS), date(2026, 1, 1))
    assert other.base != a.base


def test_audience_numbers_are_consistent():
    audience = SimulatedAudience(AudienceParams(seed=1), list(WEIGHTS), date(2026, 1, 1))
    post = audience.post("x", pillar="everyday", hour=19, day=date(2026, 1, 5), followers=20_000)
    assert post.total_interactions == post.likes + post.comments + post.saved + post.shares
    assert post.views >= post.reach > 0
    early = audience.at_age(post, 1)
    assert early.reach < post.reach and audience.at_age(post, 168) == audience.at_age(post, 500)
    assert age_fraction(0) == 0 and age_fraction(24) == pytest.approx(0.8) and age_fraction(1000) == 1


def test_audience_rates_follow_settings_and_peak_hour():
    params = AudienceParams(seed=0, pillar_rates={"travel": 0.05}, peak_hour=19, drift_sd=0.0)
    audience = SimulatedAudience(params, list(WEIGHTS), date(2026, 1, 1))
    assert audience.rate("travel", 19, date(2026, 1, 1)) > audience.rate("travel", 7, date(2026, 1, 1))
    assert audience.rate("travel", 19, date(2026, 1, 1)) / audience.hour_factor(19) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="travel=1.5"):
        AudienceParams(pillar_rates={"travel": 1.5})


def test_audience_rates_drift_slowly():
    audience = SimulatedAudience(AudienceParams(seed=2, drift_sd=0.02), list(WEIGHTS), date(2026, 1, 1))
    day0 = audience.rate("travel", 12, date(2026, 1, 1))
    day1 = audience.rate("travel", 12, date(2026, 1, 2))
    day180 = audience.rate("travel", 12, date(2026, 6, 30))
    assert abs(np.log(day1 / day0)) < 0.1
    assert day180 != day0


# --- statistics ------------------------------------------------------------------------------------

def perf(post_id, pillar, reach, interactions, hour=12, followers=10_000.0):
    return stats.PostPerformance(post_id, pillar, "", "", "image", datetime(2026, 5, 4, hour, tzinfo=UTC), 80,
                                 ("lisbon",), reach, interactions, followers)


def test_group_stats_ratio_of_sums_with_interval_and_n():
    posts = [perf(1, "travel", 1000, 50), perf(2, "travel", 3000, 90), perf(3, "travel", 2000, 70),
             perf(4, "everyday", 1000, 20)]
    by_pillar = {s.key: s for s in stats.group_stats(posts, "pillar")}
    travel = by_pillar["travel"]
    assert travel.n == 3 and travel.engagement_rate == pytest.approx(210 / 6000)
    assert travel.engagement_low <= travel.engagement_rate <= travel.engagement_high
    assert travel.reach_per_follower == pytest.approx(6000 / 30000)
    single = by_pillar["everyday"]
    assert single.n == 1 and single.engagement_low is None  # one post: no interval claimed
    assert stats.group_stats(posts, "pillar") == stats.group_stats(list(reversed(posts)), "pillar")  # order-free
    assert [s.key for s in stats.group_stats(posts, "pillar")] == ["travel", "everyday"]


def test_every_dimension_and_the_heatmap():
    posts = [perf(i, "travel", 1000, 30 + i, hour=8 + i % 3) for i in range(6)]
    result = stats.all_group_stats(posts)
    assert set(result) == set(stats.DIMENSIONS)
    assert {s.key for s in result["hour"]} == {"08:00", "09:00", "10:00"}
    assert result["weekday"][0].key == "Mon" and result["caption_length"][0].key == "medium (60-199)"
    rates, counts = stats.hour_weekday_grid(posts)
    assert counts.sum() == 6 and np.isnan(rates[1, 0]) and rates[0, 8] == pytest.approx((30 + 33) / 2000)
    with pytest.raises(ValueError, match="'colour'"):
        stats.group_stats(posts, "colour")


# --- bounds ------------------------------------------------------------------------------------------

def test_bounds_are_configured_share_plus_minus_shift():
    bounds = learning.share_bounds(WEIGHTS, learning.LearningSettings(max_share_shift=15))
    assert bounds["travel"] == (Fraction(20, 100), Fraction(50, 100))
    assert bounds["outdoors"] == (Fraction(10, 100), Fraction(40, 100))
    zero = learning.share_bounds({"a": 50, "b": 0, "c": 50}, learning.LearningSettings())
    assert zero["b"] == (0, 0)


@pytest.mark.parametrize("settings, field", [
    (learning.LearningSettings(max_share_shift=120), "strategy.learning.max_share_shift"),
    (learning.LearningSettings(pillar_bounds={"travel": (30, 50), "everyday": (60, 70), "outdoors": (20, 30)}),
     "strategy.learning.pillar_bounds"),
    (learning.LearningSettings(pillar_bounds={"travel": (0, 20)}), "strategy.learning.pillar_bounds.travel"),
    (learning.LearningSettings(pillar_bounds={"travel": (40, 30)}), "strategy.learning.pillar_bounds.travel"),
    (learning.LearningSettings(pillar_bounds={"beach": (0, 30)}), "unknown pillars: beach"),
])
def test_bounds_that_cannot_make_a_share_are_refused_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        learning.share_bounds(WEIGHTS, settings)


def test_bounded_best_fills_lows_then_best():
    bounds = learning.share_bounds(WEIGHTS, learning.LearningSettings(max_share_shift=15))
    best = learning.bounded_best({"travel": 3.0, "everyday": 2.0, "outdoors": 1.0}, bounds)
    assert best == {"travel": Fraction(1, 2), "everyday": Fraction(40, 100), "outdoors": Fraction(10, 100)}
    assert sum(best.values()) == 1


# --- learning ----------------------------------------------------------------------------------------

def test_no_data_falls_back_to_configured_weights_saying_so():
    result = learning.learn_shares(WEIGHTS, observations({"travel": 0.05}, 2), learning.LearningSettings(enabled=True), NOW)
    assert not result.learned
    assert result.shares == {"everyday": Fraction(40, 100), "travel": Fraction(35, 100), "outdoors": Fraction(25, 100)}
    assert "only 2 post(s) with insights (needs 3): configured weights" in result.summary
    # Three posts are enough to start: the prior and the bounds keep the first moves small.
    assert learning.learn_shares(WEIGHTS, observations({"travel": 0.05}, 3), learning.LearningSettings(enabled=True),
                                 NOW).learned


def test_learning_moves_shares_towards_the_better_pillar_within_bounds():
    data = observations({"everyday": 0.02, "travel": 0.06, "outdoors": 0.02}, 20)
    settings = learning.LearningSettings(enabled=True, max_share_shift=15)
    result = learning.learn_shares(WEIGHTS, data, settings, NOW)
    bounds = learning.share_bounds(WEIGHTS, settings)
    assert result.learned and sum(result.shares.values()) == 1
    assert result.shares["travel"] > Fraction(45, 100)
    for name, share in result.shares.items():
        assert bounds[name][0] <= share <= bounds[name][1]
    note = result.pillars["travel"].note
    assert note.startswith("travel: 6.") and "engagement over 20 posts, share raised 35 → " in note
    assert "share lowered" in result.pillars["outdoors"].note


def test_learning_is_deterministic_for_a_state_and_seed():
    data = observations({"everyday": 0.03, "travel": 0.035, "outdoors": 0.03}, 12)
    settings = learning.LearningSettings(enabled=True, seed=7)
    first = learning.learn_shares(WEIGHTS, data, settings, NOW)
    assert first.shares == learning.learn_shares(WEIGHTS, list(data), settings, NOW).shares
    other = learning.learn_shares(WEIGHTS, data, learning.LearningSettings(enabled=True, seed=8), NOW)
    assert other.shares != first.shares  # close rates: the draws decide, and another seed draws differently


def test_hours_stay_inside_the_windows_and_move_to_the_better_hour():
    rng = np.random.default_rng(0)
    data = []
    for i in range(60):
        hour = [6, 7, 11, 12, 13, 14][i % 6]
        reach = 3000
        data.append(learning.Observation("travel", hour, reach, int(rng.binomial(reach, 0.06 if hour == 14 else 0.02)),
                                         NOW - timedelta(days=i % 30 + 1)))
    settings = learning.LearningSettings(enabled=True)
    result = learning.learn_shares(WEIGHTS, data, settings, NOW)
    windows = [(time(5), time(8)), (time(10), time(15))]
    slots = [datetime(2026, 6, d, 6, 30, tzinfo=UTC) for d in range(2, 12)]
    moved = learning.pick_hours(result.posterior, slots, windows, "Europe/Lisbon", settings)
    zone = ZoneInfo("Europe/Lisbon")
    for (new, why), old in zip(moved, slots):
        local = new.astimezone(zone)
        assert local.date() == old.astimezone(zone).date()
        assert time(5) <= local.time() < time(8) or time(10) <= local.time() < time(15)
        assert "Thompson" in why
    assert sum(new.astimezone(zone).hour == 14 for new, _ in moved) >= 7
    assert learning.pick_hours(None, slots, windows, "Europe/Lisbon", settings) == [(s, "") for s in slots]


def test_hour_prior_is_a_valid_correlation_on_the_24_hour_day():
    for length in (3.0, 6.0, 12.0):
        corr = learning.hour_correlation(length)
        assert np.allclose(corr, corr.T) and np.allclose(np.diag(corr), 1)
        assert np.linalg.eigvalsh(corr).min() > -1e-9  # positive semi-definite at any length
        assert corr[13, 14] == pytest.approx(np.exp(-1 / (2 * length ** 2)), rel=0.01)  # near hours: squared exp.
        assert corr[23, 0] == pytest.approx(corr[0, 1]) and corr[1, 23] == pytest.approx(corr[0, 2])  # the day wraps
    # A squared exponential of the circular distance, which the prior used before, is not valid beyond ~3 hours.
    gap = np.abs(np.arange(24)[:, None] - np.arange(24)[None, :])
    assert np.linalg.eigvalsh(np.exp(-np.minimum(gap, 24 - gap) ** 2 / (2 * 6.0 ** 2))).min() < -0.1


def test_window_moments_are_window_starts_and_full_hours():
    moments = learning.window_moments(date(2026, 6, 2), [(time(5, 30), time(8)), (time(22), time.max)], "UTC")
    assert [m.strftime("%H:%M") for m in moments] == ["05:30", "06:00", "07:00", "22:00", "23:00"]


# --- the planner with learned targets --------------------------------------------------------------

def test_planner_uses_learned_targets_and_notes_and_is_unchanged_without_them():
    pillars = [StrategyPillar(1, "everyday", 40, 1), StrategyPillar(2, "travel", 35, 2), StrategyPillar(3, "outdoors", 25, 3)]
    options = [LibraryOption(i, 1 + i % 3, "", 1.0) for i in range(30)]
    slots = [datetime(2026, 6, 1, 12, tzinfo=UTC) + timedelta(days=d) for d in range(10)]
    history = [PastPost(1, "", datetime(2026, 5, 30, tzinfo=UTC))]
    rules = StrategyRules(weekly_cap=100)
    plain = plan_posts(slots=slots, pillars=pillars, options=options, history=history, rules=rules, tz="UTC")
    assert plain == plan_posts(slots=slots, pillars=pillars, options=options, history=history, rules=rules, tz="UTC",
                               target_shares=None, pillar_notes=None)
    learned = plan_posts(slots=slots, pillars=pillars, options=options, history=history, rules=rules, tz="UTC",
                         target_shares={1: Fraction(25, 100), 2: Fraction(50, 100), 3: Fraction(25, 100)},
                         pillar_notes={2: "travel: 6.0% ± 1.0 engagement over 20 posts, share raised 35 → 50%"})
    travel = [p for p in learned.posts if p.pillar_id == 2]
    assert len(travel) > sum(p.pillar_id == 2 for p in plain.posts)
    assert "learned: travel: 6.0% ± 1.0 engagement over 20 posts, share raised 35 → 50%" in travel[0].reason


BOUNDS = {1: (Fraction(25, 100), Fraction(55, 100)), 2: (Fraction(20, 100), Fraction(50, 100)),
          3: (Fraction(10, 100), Fraction(40, 100))}  # everyday 40, travel 35, outdoors 25, ±15 points
AT_BOUND = {1: Fraction(25, 100), 2: Fraction(35, 100), 3: Fraction(40, 100)}  # outdoors at its maximum


def _first_post(history_pillars: list[int], bounds):
    """The pillar planned for one slot after `history_pillars` posted 40-80 days before it: outside
    the 30-day share window (so the target alone ranks outdoors first), inside the 90-day bound window."""
    pillars = [StrategyPillar(1, "everyday", 40, 1), StrategyPillar(2, "travel", 35, 2), StrategyPillar(3, "outdoors", 25, 3)]
    slot = datetime(2026, 6, 1, 12, tzinfo=UTC)
    history = [PastPost(p, "", slot - timedelta(days=40 + 3 * i)) for i, p in enumerate(history_pillars)]
    plan = plan_posts(slots=[slot], pillars=pillars, options=[LibraryOption(i, 1 + i % 3, "", 1.0) for i in range(9)],
                      history=history, rules=StrategyRules(weekly_cap=100), tz="UTC",
                      target_shares=AT_BOUND, share_bounds=bounds)
    return plan.posts[0]


def _first_pillar(history_pillars: list[int], bounds) -> int:
    return _first_post(history_pillars, bounds).pillar_id


def test_a_target_at_its_maximum_never_lifts_the_pillar_past_it():
    history = [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]  # outdoors 4 of 10: one more would be 5 of 11, 45 % > 40 %
    assert _first_pillar(history, None) == 3  # the target alone: outdoors has the largest gap
    assert _first_pillar(history, BOUNDS) == 2  # held: travel, the next gap
    assert "outdoors held at its maximum 40% over the last 90 days" in _first_post(history, BOUNDS).reason
    assert "maximum" not in _first_post(history, None).reason


def test_a_pillar_about_to_fall_below_its_minimum_goes_first():
    history = [1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3]  # everyday 2 of 11: without this slot 2 of 12, 16.7 % < 25 %
    assert _first_pillar(history, None) == 3
    assert _first_pillar(history, BOUNDS) == 1
    assert "kept at its minimum 25%" in _first_post(history, BOUNDS).reason


def test_a_long_plan_with_targets_at_the_bounds_keeps_every_realised_share_inside_them():
    pillars = [StrategyPillar(1, "everyday", 40, 1), StrategyPillar(2, "travel", 35, 2), StrategyPillar(3, "outdoors", 25, 3)]
    slots = [datetime(2026, 1, 1, 12, tzinfo=UTC) + timedelta(days=2.3 * d) for d in range(160)]
    plan = plan_posts(slots=slots, pillars=pillars, options=[LibraryOption(i, 1 + i % 3, "", 1.0) for i in range(480)],
                      history=[], rules=StrategyRules(weekly_cap=100), tz="UTC",
                      target_shares=AT_BOUND, share_bounds=BOUNDS)
    assert len(plan.posts) == 160
    for end in range(40, 161):  # every 90-day window from the 40th post on, and the whole run
        window = [p for p in plan.posts[:end] if p.slot > plan.posts[end - 1].slot - timedelta(days=90)]
        for pillar, (low, high) in BOUNDS.items():
            share = Fraction(sum(p.pillar_id == pillar for p in window), len(window))
            assert low <= share <= high, (end, pillar, share)


def test_persona_yaml_bounds_are_checked_on_load(tmp_path):
    import shutil
    from pathlib import Path

    from persona_pipeline.personas import PersonaFileError, load_persona

    folder = tmp_path / "demo"
    shutil.copytree(Path(__file__).resolve().parents[1] / "datasets" / "demo", folder, ignore=shutil.ignore_patterns("photos"))
    text = (folder / "persona.yaml").read_text()
    (folder / "persona.yaml").write_text(text + "\nstrategy:\n  learning:\n    enabled: true\n    max_share_shift: 10\n")
    assert load_persona(folder).config.strategy.learning.settings().max_share_shift == 10
    (folder / "persona.yaml").write_text(text + "\nstrategy:\n  learning:\n    pillar_bounds: {travel: [0, 20]}\n")
    with pytest.raises(PersonaFileError, match=r"persona\.yaml.*strategy\.learning\.pillar_bounds\.travel"):
        load_persona(folder)


def test_plots_are_pngs_of_their_size_with_and_without_data():
    import io

    from PIL import Image

    from persona_pipeline.insight_plots import engagement_bars_png, heatmap_png, lines_png

    posts = [perf(i, ("travel", "everyday")[i % 2], 1000 + i, 30 + i, hour=8 + i) for i in range(6)]
    rates, counts = stats.hour_weekday_grid(posts)
    for png in (engagement_bars_png(stats.group_stats(posts, "pillar"), "t"), heatmap_png(rates, counts, "t"),
                lines_png({"reach": [1.0, 3.0, 2.0]}, "t", "post"),
                engagement_bars_png([], "empty"), heatmap_png(*stats.hour_weekday_grid([]), "empty"),
                lines_png({"reach": []}, "empty", "post")):
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.width >= 300
    bars = Image.open(io.BytesIO(engagement_bars_png(stats.group_stats(posts, "pillar"), "t"))).convert("RGB")
    assert (31, 90, 180) in {bars.getpixel((x, 24 + 11)) for x in range(150, 300)}  # the first bar is drawn


def test_moved_slots_keep_their_spacing_and_the_plan_days():
    data = observations({"everyday": 0.03, "travel": 0.05, "outdoors": 0.03}, 12, hour=14)
    settings = learning.LearningSettings(enabled=True)
    learned = learning.learn_shares(WEIGHTS, data, settings, NOW)
    windows = [(time(10), time(16))]
    slots = [datetime(2026, 6, 2, 10, tzinfo=UTC), datetime(2026, 6, 2, 15, tzinfo=UTC)]
    taken = [datetime(2026, 6, 2, 13, tzinfo=UTC)]
    moved = learning.move_slots(learned, slots, windows, "UTC", settings, taken, timedelta(hours=2), NOW,
                                NOW + timedelta(days=7))
    times = sorted([m for m, _ in moved] + taken)
    assert all(b - a >= timedelta(hours=2) for a, b in zip(times, times[1:]))
    assert all(time(10) <= m.time() < time(16) and m.date() == date(2026, 6, 2) for m, _ in moved)
    # No allowed hour (the plan ends before the day): the slot stays, without a note.
    assert learning.move_slots(learned, slots[:1], windows, "UTC", settings, [], timedelta(hours=2), NOW,
                               NOW + timedelta(hours=1)) == [(slots[0], "")]


def test_rotation_scale_follows_learned_over_configured_shares():
    assert learning.rotation_scale(None) == {}
    fallback = learning.learn_shares(WEIGHTS, [], learning.LearningSettings(enabled=True), NOW)
    assert learning.rotation_scale(fallback) == {}
    data = observations({"everyday": 0.02, "travel": 0.06, "outdoors": 0.02}, 20)
    scale = learning.rotation_scale(learning.learn_shares(WEIGHTS, data, learning.LearningSettings(enabled=True), NOW))
    assert scale["travel"] > 1 > scale["everyday"]
