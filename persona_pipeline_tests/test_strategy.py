"""Strategy: which library image fills which slot (persona_pipeline/domain/strategy.py)."""

import random
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from persona_pipeline.domain.strategy import (
    LibraryOption,
    PastPost,
    StrategyPillar,
    StrategyRules,
    plan_posts,
)

UTC = timezone.utc
T0 = datetime(2024, 6, 10, 9, 0, tzinfo=UTC)  # the first slot in most tests
DAY = timedelta(days=1)
LOOSE = StrategyRules(weekly_cap=100)  # the cap out of the way where a test is about something else


def plan(slots, pillars, options, history=(), rules=LOOSE, tz="UTC"):
    return plan_posts(slots=slots, pillars=pillars, options=options, history=history, rules=rules, tz=tz)


def ids(result):
    return [p.item_id for p in result.posts]


def pillar(pid, name, weight, priority=3, **window):
    return StrategyPillar(pid, name, weight, priority, **window)


def opt(item_id, pillar_id, theme="", score=1000.0):
    return LibraryOption(item_id, pillar_id, theme, score)


# --- pillar choice -------------------------------------------------------------------------------

def test_pillar_furthest_below_its_weight_over_the_last_30_days_wins():
    pillars = [pillar(1, "city", 60), pillar(2, "beach", 40)]
    history = [PastPost(1, "", T0 - 8 * DAY), PastPost(1, "", T0 - 10 * DAY), PastPost(1, "", T0 - 12 * DAY),
               PastPost(2, "", T0 - 14 * DAY)]
    # 31 days back: outside the share window, so these beach posts do not count.
    history += [PastPost(2, "", T0 - 31 * DAY - timedelta(hours=h)) for h in range(5)]
    options = [opt(1, 1, score=1100), opt(2, 1), opt(3, 2, score=1000), opt(4, 2, score=1050)]
    result = plan([T0], pillars, options, history)
    # city: 60% − 3/4; beach: 40% − 1/4 → beach, its best image.
    assert ids(result) == [4]
    post = result.posts[0]
    assert post.pillar_id == 2 and post.relaxed == () and post.slot == T0
    assert post.reason == ("pillar beach: target 40% vs 25% (1 of 4 posts) in the last 30 days; "
                           "best unused image #4 (score 1050)")


def test_share_window_is_half_open_and_counts_posts_without_a_pillar():
    pillars = [pillar(1, "city", 50), pillar(2, "beach", 50)]
    # Exactly 30 days back counts (city); the unassigned post and a post of a removed pillar count in
    # the total only. city 1/3 vs beach 0/3 → beach.
    history = [PastPost(1, "", T0 - 30 * DAY), PastPost(None, "", T0 - 9 * DAY), PastPost(99, "", T0 - 8 * DAY)]
    result = plan([T0], pillars, [opt(1, 1), opt(2, 2)], history)
    assert ids(result) == [2]
    assert "target 50% vs 0% (0 of 3 posts)" in result.posts[0].reason
    # One second past the window the city post no longer counts: both at 0 → tie → priority: city.
    history[0] = PastPost(1, "", T0 - 30 * DAY - timedelta(seconds=1))
    assert ids(plan([T0], [pillar(1, "city", 50, priority=1), pillar(2, "beach", 50)],
                    [opt(1, 1), opt(2, 2)], history)) == [1]


def test_posts_planned_in_this_call_count_and_ties_go_to_priority_then_name():
    pillars = [pillar(1, "alpha", 50, priority=2), pillar(2, "beta", 50, priority=1)]
    options = [opt(i, 1 + i % 2) for i in range(1, 9)]  # odd ids → beta (2), even → alpha (1)
    slots = [T0 + i * DAY for i in range(4)]
    result = plan(slots, pillars, options)
    # tie at 0/0 → beta (priority 1); then alpha is behind; then a tie again → beta; then alpha.
    assert [p.pillar_id for p in result.posts] == [2, 1, 2, 1]
    assert ids(result) == [1, 2, 3, 4]
    # Same priority: name decides.
    same = [pillar(1, "zeta", 50, priority=3), pillar(2, "eta", 50, priority=3)]
    assert plan([T0], same, options).posts[0].pillar_id == 2


def test_a_pillar_without_eligible_options_falls_through_and_unassigned_comes_last():
    pillars = [pillar(1, "city", 70), pillar(2, "beach", 20), pillar(3, "food", 10)]
    options = [opt(5, 3, score=900), opt(6, None, score=2000)]
    result = plan([T0], pillars, options)
    assert ids(result) == [5]  # food, though the unassigned image scores higher
    assert result.posts[0].reason.endswith("nothing eligible in city, beach")
    result = plan([T0], pillars, [opt(6, None, score=2000)])
    assert ids(result) == [6] and result.posts[0].pillar_id is None
    assert result.posts[0].reason == ("unassigned image (no pillar had an eligible option); "
                                      "best unused image #6 (score 2000)")


def test_within_a_pillar_highest_score_first_unscored_last_then_lowest_id():
    pillars = [pillar(1, "city", 100)]
    options = [opt(5, 1, score=None), opt(3, 1, score=1000), opt(2, 1, score=1000), opt(1, 1, score=None),
               opt(4, 1, score=1000.5)]
    result = plan([T0 + i * DAY for i in range(6)], pillars, options)
    assert ids(result) == [4, 2, 3, 1, 5]
    assert "(score 1000.5)" in result.posts[0].reason and "(unscored)" in result.posts[3].reason
    # Each option is used once: the sixth slot has nothing left.
    assert result.skipped == [(T0 + 5 * DAY, "no unused library option left")]


def test_inactive_and_weight_zero_pillars_get_nothing_while_others_can_post():
    pillars = [pillar(1, "city", 50), pillar(2, "xmas", 50, starts_on=date(2024, 12, 1), ends_on=date(2024, 12, 26)),
               pillar(3, "archive", 0)]
    options = [opt(1, 2, score=3000), opt(2, 3, score=2000), opt(3, 1, score=10)]
    result = plan([T0], pillars, options)
    assert ids(result) == [3]
    # The active weights alone make the target: city 50 / 50 = 100%.
    assert result.posts[0].reason.startswith("pillar city: target 100% vs 0%")


# --- themes --------------------------------------------------------------------------------------

def test_theme_spacing_blocks_the_same_theme_within_two_days_either_side():
    pillars = [pillar(1, "city", 100)]
    options = [opt(1, 1, "beach sunset", score=2000), opt(2, 1, "rooftop", score=1000)]
    near = [PastPost(1, "  Beach   SUNSET ", T0 - 2 * DAY + timedelta(minutes=1))]
    assert ids(plan([T0], pillars, options, near)) == [2]
    # An already scheduled post of the theme 1 day later blocks it too.
    later = [PastPost(1, "beach sunset", T0 + DAY)]
    assert ids(plan([T0], pillars, options, later)) == [2]
    # Exactly 2 days apart is allowed.
    exact = [PastPost(1, "beach sunset", T0 - 2 * DAY)]
    assert ids(plan([T0], pillars, options, exact)) == [1]


def test_no_theme_is_never_limited():
    history = [PastPost(1, "", T0 - timedelta(hours=h)) for h in range(1, 6)]
    result = plan([T0], [pillar(1, "city", 100)], [opt(1, 1, "", score=2000), opt(2, 1, "x", score=1)], history)
    assert ids(result) == [1] and result.posts[0].relaxed == ()


def test_theme_at_most_three_times_in_any_seven_days():
    pillars = [pillar(1, "city", 100)]
    options = [opt(1, 1, "gym", score=2000), opt(2, 1, "cafe", score=1000)]
    three = [PastPost(1, "Gym", T0 - d * DAY) for d in (6, 4, 2)]  # 2 days apart: spacing is fine
    assert ids(plan([T0], pillars, options, three)) == [2]
    # The oldest exactly 7 days back is outside the half-open window: 3 in any 7 days, so allowed.
    spread = [PastPost(1, "gym", T0 - d * DAY) for d in (7, 4, 2)]
    assert ids(plan([T0], pillars, options, spread)) == [1]
    # Window after the slot: scheduled posts at +2, +4, +6 days.
    ahead = [PastPost(1, "gym", T0 + d * DAY) for d in (2, 4, 6)]
    assert ids(plan([T0], pillars, options, ahead)) == [2]


def test_theme_rules_apply_to_posts_planned_in_the_same_call():
    pillars = [pillar(1, "city", 100)]
    options = [opt(1, 1, "gym", score=3000), opt(2, 1, "gym", score=2000), opt(3, 1, "cafe", score=1000)]
    result = plan([T0, T0 + DAY, T0 + 2 * DAY], pillars, options)
    assert ids(result) == [1, 3, 2]
    assert [p.relaxed for p in result.posts] == [(), (), ()]


# --- relaxation ----------------------------------------------------------------------------------

def test_theme_spacing_is_relaxed_first_and_recorded():
    pillars = [pillar(1, "city", 100)]
    result = plan([T0], pillars, [opt(1, 1, "gym")], [PastPost(1, "gym", T0 - DAY)])
    assert ids(result) == [1]
    assert result.posts[0].relaxed == ("theme_spacing",)
    assert result.posts[0].reason.endswith("; relaxed theme_spacing")


def test_spacing_is_dropped_before_the_weekly_theme_maximum():
    # city is far behind its weight, but its only image breaks the weekly maximum; beach's only image
    # breaks only the spacing. Dropping spacing first lets beach post; city waits.
    pillars = [pillar(1, "city", 90), pillar(2, "beach", 10)]
    history = [PastPost(2, "gym", T0 - d * DAY) for d in (6, 4, 2)] + [PastPost(2, "surf", T0 - DAY)]
    options = [opt(1, 1, "gym"), opt(2, 2, "surf")]
    result = plan([T0], pillars, options, history)
    assert ids(result) == [2]
    assert result.posts[0].relaxed == ("theme_spacing",)
    assert "nothing eligible in city" in result.posts[0].reason


def test_weekly_theme_maximum_is_dropped_second_and_pillar_order_still_rules():
    pillars = [pillar(1, "city", 90), pillar(2, "beach", 10)]
    history = [PastPost(2, "gym", T0 - d * DAY) for d in (6, 4, 2)] + [PastPost(2, "surf", T0 - d * DAY)
                                                                       for d in (5, 3, 1)]
    # city's image breaks the maximum; beach's breaks both. Both rules dropped now: city ranks first.
    options = [opt(1, 1, "gym"), opt(2, 2, "surf")]
    result = plan([T0], pillars, options, history)
    assert ids(result) == [1]
    assert result.posts[0].relaxed == ("theme_max_per_week",)
    # Only the doubly-breaking image left: both rules are recorded.
    result = plan([T0], pillars, [opt(2, 2, "surf")], history)
    assert result.posts[0].relaxed == ("theme_spacing", "theme_max_per_week")


def test_weight_zero_pillars_come_after_theme_relaxation_and_unassigned_images():
    pillars = [pillar(1, "city", 100), pillar(2, "archive", 0)]
    history = [PastPost(1, "gym", T0 - DAY)]
    # A weighted image that breaks spacing beats a clean weight-0 image.
    result = plan([T0], pillars, [opt(1, 1, "gym"), opt(2, 2, "")], history)
    assert ids(result) == [1] and result.posts[0].relaxed == ("theme_spacing",)
    # So does an unassigned image.
    result = plan([T0], pillars, [opt(3, None, "gym"), opt(2, 2, "")], history)
    assert ids(result) == [3] and result.posts[0].relaxed == ("theme_spacing",)
    # Only the weight-0 pillar has images: it posts, and says so.
    result = plan([T0], pillars, [opt(2, 2, "")], history)
    assert ids(result) == [2]
    assert result.posts[0].relaxed == ("zero_weight_pillar",)
    assert result.posts[0].reason == ("pillar archive: target 0% vs 0% (0 of 1 posts) in the last 30 days; "
                                      "best unused image #2 (score 1000); nothing eligible in city, unassigned; "
                                      "relaxed zero_weight_pillar")
    # With a theme break too, everything it breaks is recorded.
    result = plan([T0], pillars, [opt(2, 2, "gym")], history)
    assert result.posts[0].relaxed == ("theme_spacing", "zero_weight_pillar")


def test_a_pillar_outside_its_date_window_is_never_used():
    pillars = [pillar(1, "city", 100), pillar(2, "xmas", 50, starts_on=date(2024, 12, 1), ends_on=date(2024, 12, 26))]
    result = plan([T0], pillars, [opt(7, 2)])
    assert result.posts == []
    assert result.skipped == [(T0, "no eligible option: the 1 unused option(s) belong to pillars outside their "
                                   "date window on 2024-06-10: xmas")]
    # Its window is inclusive at both ends.
    for day in (date(2024, 12, 1), date(2024, 12, 26)):
        slot = datetime.combine(day, T0.timetz())
        assert ids(plan([slot], pillars, [opt(7, 2)])) == [7]
    assert ids(plan([datetime(2024, 12, 27, 9, tzinfo=UTC)], pillars, [opt(7, 2)])) == []


# --- weekly cap ----------------------------------------------------------------------------------

def test_weekly_cap_counts_history_and_this_calls_posts_and_is_never_relaxed():
    pillars = [pillar(1, "city", 100)]
    options = [opt(i, 1) for i in range(1, 10)]
    rules = StrategyRules(weekly_cap=2)
    slots = [T0, T0 + DAY, T0 + 2 * DAY, T0 + 7 * DAY, T0 + 7 * DAY + timedelta(hours=12)]
    result = plan(slots, pillars, options, rules=rules)
    # T0 and T0+1d fill the cap; T0+7d is exactly 7 days after T0, so {T0, +1d, +7d} fit no window.
    assert [p.slot for p in result.posts] == [T0, T0 + DAY, T0 + 7 * DAY]
    assert [s for s, _ in result.skipped] == [T0 + 2 * DAY, T0 + 7 * DAY + timedelta(hours=12)]
    assert result.skipped[0][1] == ("weekly cap 2 reached: 3 posts would fall within 7 days "
                                    "(2024-06-10 09:00 to 2024-06-12 09:00 UTC)")


def test_weekly_cap_counts_published_and_already_scheduled_posts():
    pillars = [pillar(1, "city", 100)]
    rules = StrategyRules(weekly_cap=2)
    before = [PastPost(1, "", T0 - 3 * DAY), PastPost(None, "", T0 - DAY)]
    assert plan([T0], pillars, [opt(1, 1)], before, rules).skipped[0][0] == T0
    after = [PastPost(1, "", T0 + DAY), PastPost(1, "", T0 + 6 * DAY)]
    assert ids(plan([T0], pillars, [opt(1, 1)], after, rules)) == []
    split = [PastPost(1, "", T0 - 6 * DAY), PastPost(1, "", T0 + 6 * DAY)]  # 12 days apart: room on each side
    assert ids(plan([T0], pillars, [opt(1, 1)], split, rules)) == [1]
    # 3.5 days either side: the three span exactly 7 days, which no half-open 7-day window holds.
    straddle = [PastPost(1, "", T0 - timedelta(days=3.5)), PastPost(1, "", T0 + timedelta(days=3.5))]
    assert ids(plan([T0], pillars, [opt(1, 1)], straddle, rules)) == [1]
    straddle[1] = PastPost(1, "", T0 + timedelta(days=3.5) - timedelta(seconds=1))
    assert ids(plan([T0], pillars, [opt(1, 1)], straddle, rules)) == []
    # An overfull week long ago does not block today.
    old = [PastPost(1, "", T0 - 20 * DAY + timedelta(hours=h)) for h in range(8)]
    assert ids(plan([T0], pillars, [opt(1, 1)], old, rules)) == [1]
    assert plan([T0], pillars, [opt(1, 1)], rules=StrategyRules(weekly_cap=0)).skipped[0][1].startswith(
        "weekly cap 0 reached")


def test_default_rules_are_the_references():
    rules = StrategyRules()
    assert (rules.theme_spacing, rules.theme_max_per_week, rules.weekly_cap, rules.share_days) == (
        timedelta(days=2), 3, 5, 30)


# --- determinism and time ------------------------------------------------------------------------

def test_same_state_gives_the_same_plan_in_any_input_order():
    pillars = [pillar(1, "city", 40, priority=2), pillar(2, "beach", 40, priority=2), pillar(3, "food", 20, priority=1),
               pillar(4, "archive", 0)]
    themes = ["gym", "Gym", "cafe", "", "surf", "sunset"]
    options = [opt(i, [1, 2, 3, None, 4][i % 5], themes[i % 6], score=[1000, 1016, None, 984][i % 4])
               for i in range(1, 30)]
    history = [PastPost([1, 2, 3, None][i % 4], themes[i % 6], T0 - timedelta(hours=19 * i)) for i in range(1, 30)]
    slots = [T0 + timedelta(hours=11 * i) for i in range(40)]
    rules = StrategyRules(weekly_cap=12)
    expected = plan(slots, pillars, options, history, rules)
    # The scenario exercises every rule: strict picks, each relaxation, the cap and running out.
    assert {r for p in expected.posts for r in p.relaxed} == {"theme_spacing", "theme_max_per_week",
                                                               "zero_weight_pillar"}
    assert any(p.relaxed == () for p in expected.posts) and any(p.pillar_id is None for p in expected.posts)
    assert {why.split(":")[0] for _, why in expected.skipped} == {"weekly cap 12 reached",
                                                                  "no unused library option left"}
    rng = random.Random(6)
    for _ in range(20):
        shuffled = [rng.sample(seq, len(seq)) for seq in (slots, pillars, options, history)]
        # The same instants written in another zone are the same slots.
        shuffled[0] = [s.astimezone(ZoneInfo("America/New_York")) for s in shuffled[0]]
        assert plan(*shuffled, rules) == expected
    # Duplicate slots are one slot.
    assert plan(slots + slots[:3], pillars, options, history, rules) == expected


BERLIN = ZoneInfo("Europe/Berlin")  # summer time starts 2024-03-31 02:00 local


def test_spacing_and_windows_are_absolute_time_across_dst():
    pillars = [pillar(1, "city", 100)]
    slot = datetime(2024, 4, 1, 9, 0, tzinfo=BERLIN)  # 07:00 UTC
    # 09:00 local two calendar days earlier is only 47 hours before: too close.
    history = [PastPost(1, "gym", datetime(2024, 3, 30, 9, 0, tzinfo=BERLIN))]
    options = [opt(1, 1, "gym", score=2000), opt(2, 1, "cafe")]
    assert ids(plan([slot], pillars, options, history, tz="Europe/Berlin")) == [2]
    # Weekly cap 1: the same local time a week earlier is 167 hours before, inside one 7-day window.
    week_before = [PastPost(1, "", datetime(2024, 3, 25, 9, 0, tzinfo=BERLIN))]
    rules = StrategyRules(weekly_cap=1)
    assert plan([slot], pillars, options, week_before, rules, "Europe/Berlin").posts == []
    # One local hour later is exactly 168 hours: allowed.
    later = datetime(2024, 4, 1, 10, 0, tzinfo=BERLIN)
    result = plan([later], pillars, options, week_before, rules, "Europe/Berlin")
    assert ids(result) == [1] and result.posts[0].slot == datetime(2024, 4, 1, 8, 0, tzinfo=UTC)


def test_pillar_date_windows_use_the_local_date():
    pillars = [pillar(1, "spring", 100, starts_on=date(2024, 4, 1))]
    just_after = datetime(2024, 3, 31, 22, 30, tzinfo=UTC)  # 00:30 on 1 April in Berlin
    assert ids(plan([just_after], pillars, [opt(1, 1)], tz="Europe/Berlin")) == [1]
    assert ids(plan([just_after], pillars, [opt(1, 1)], tz="UTC")) == []
    just_before = datetime(2024, 3, 31, 21, 30, tzinfo=UTC)  # 23:30 on 31 March in Berlin
    assert ids(plan([just_before], pillars, [opt(1, 1)], tz="Europe/Berlin")) == []


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"slots": [datetime(2024, 6, 10, 9, 0)]},
     "slot must be a timezone-aware datetime, got datetime.datetime(2024, 6, 10, 9, 0)"),
    ({"history": [PastPost(1, "gym", datetime(2024, 6, 1, 9, 0))]},
     "history post ('gym') must be a timezone-aware datetime, got datetime.datetime(2024, 6, 1, 9, 0)"),
    ({"pillars": [pillar(1, "city", -5)]}, "pillar 'city' (id 1): weight must be 0-100, got -5"),
    ({"pillars": [pillar(1, "city", 101)]}, "weight must be 0-100, got 101"),
    ({"pillars": [pillar(1, "city", 50, priority=0)]}, "priority must be 1-5, got 0"),
    ({"pillars": [pillar(1, "city", 50, starts_on=date(2024, 5, 2), ends_on=date(2024, 5, 1))]},
     "ends_on 2024-05-01 is before starts_on 2024-05-02"),
    ({"pillars": [pillar(1, "city", 50), pillar(1, "beach", 50)]}, "pillar id 1 appears twice"),
    ({"pillars": [pillar(1, "city", 50), pillar(2, "city", 50)]}, "pillar name 'city' appears twice"),
    ({"options": [opt(7, 1), opt(7, 1)]}, "library item id 7 appears twice"),
    ({"options": [opt(7, 42)]}, "library item #7: unknown pillar id 42"),
    ({"options": [opt(7, 1, score=float("nan"))]}, "library item #7: score must be finite, got nan"),
    ({"tz": "Mars/Olympus"}, "unknown timezone tz='Mars/Olympus'"),
    ({"rules": StrategyRules(weekly_cap=-1)}, "rules.weekly_cap must be >= 0, got -1"),
    ({"rules": StrategyRules(theme_max_per_week=0)}, "rules.theme_max_per_week must be >= 1, got 0"),
    ({"rules": StrategyRules(share_days=0)}, "rules.share_days must be >= 1, got 0"),
    ({"rules": StrategyRules(theme_spacing=timedelta(hours=-1))}, "rules.theme_spacing must be >= 0"),
])
def test_invalid_input_is_refused_naming_the_value(kwargs, message):
    args = {"slots": [T0], "pillars": [pillar(1, "city", 100)], "options": [opt(1, 1)], "history": [],
            "rules": StrategyRules(), "tz": "UTC"} | kwargs
    with pytest.raises(ValueError) as err:
        plan_posts(**args)
    assert message in str(err.value)
