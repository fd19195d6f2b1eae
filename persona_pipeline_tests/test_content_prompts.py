"""Content prompts for generation runs: pillar gap analysis (docs/rules.md), the allocation of a
run's prompts among pillars, offline template prompts, and Gemini's structured prompts over real
HTTP against the local fake server."""

from __future__ import annotations

import json
import random
from datetime import date, timedelta

import pytest

from persona_pipeline.domain.content_prompts import (
    DEFAULT_NEGATIVE_PROMPT, ContentPrompt, allocate_prompts, check_prompt, guideline_themes, template_prompts,
)
from persona_pipeline.domain.gaps import PillarGap, PillarInput, active_days, analyse_gaps, total_posts
from persona_pipeline.personas import load_persona
from persona_pipeline.resources.gemini import GeminiClient, GeminiError
from persona_pipeline_tests.conftest import DEMO
from persona_fakes.gemini import FakeGemini
from persona_pipeline_tests.helpers import LogCapture as Log

TODAY = date(2025, 3, 1)
GUIDELINES = {
    "everyday": "Small moments of a day in the city, warm and unhurried.",
    "travel": "Beaches, rooftops and new places, always with a sense of arrival.",
    "outdoors": "Forest walks and fresh air.",
}


def pillar(name: str = "p", weight: int = 40, priority: int = 3, available: int = 0, **kw) -> PillarInput:
    return PillarInput(name, weight, priority, available, **kw)


def gap_of(pillar_input: PillarInput, **kw) -> PillarGap:
    [gap] = analyse_gaps([pillar_input], TODAY, **kw)
    return gap


def pg(name: str, gap: int, *, weight: int = 30, priority: int = 3, status: str | None = None) -> PillarGap:
    """A PillarGap as analyse_gaps would make it (available 1, so status follows the gap)."""
    status = status or ("critical" if gap > 5 else "low" if gap > 0 else "ready")
    return PillarGap(name, weight, priority, gap + 1, 1, gap, status)


# --- gap analysis -------------------------------------------------------------------------------


def test_total_posts_is_the_ceiling_of_three_a_week_over_thirty_days():
    assert total_posts() == 13  # 3 × 30 / 7 = 12.86
    assert total_posts(7, 7) == 7 and total_posts(3, 7) == 3 and total_posts(0, 30) == 0
    # Exact decimals: 0.7 × 10 / 7 is 1.0000000000000002 in floats, which would round up to 2.
    assert total_posts(0.7, 10) == 1
    with pytest.raises(ValueError, match="days"):
        total_posts(3, 0)


def test_weights_40_35_25_need_6_5_4():
    gaps = analyse_gaps([pillar("everyday", 40, 1), pillar("travel", 35, 2), pillar("outdoors", 25, 3)], TODAY)
    # ⌈13 × 0.40⌉ = ⌈5.2⌉ = 6, ⌈13 × 0.35⌉ = ⌈4.55⌉ = 5, ⌈13 × 0.25⌉ = ⌈3.25⌉ = 4: 15 in all, the ceilings add up.
    assert [(g.name, g.needed, g.available, g.gap, g.status) for g in gaps] == [
        ("everyday", 6, 0, 6, "exhausted"), ("travel", 5, 0, 5, "exhausted"), ("outdoors", 4, 0, 4, "exhausted")]


@pytest.mark.parametrize("available, gap, status", [
    (0, 13, "exhausted"),  # exhausted before critical, however large the gap
    (7, 6, "critical"),
    (8, 5, "low"),  # critical needs gap > 5
    (12, 1, "low"),
    (13, 0, "ready"),
    (20, -7, "ready"),
])
def test_status_at_each_boundary(available, gap, status):
    result = gap_of(pillar(weight=100, available=available))
    assert (result.needed, result.gap, result.status) == (13, gap, status)


def test_a_pillar_that_needs_nothing_is_ready_even_with_nothing_available():
    assert gap_of(pillar(weight=0)).status == "ready"
    assert gap_of(pillar(weight=50, target_posts_per_week=0)).status == "ready"


def test_sorted_by_status_then_gap_then_priority_then_name():
    gaps = analyse_gaps([
        pillar("ready", 10, 1, available=9),
        pillar("low-b", 40, 2, available=5),   # needs 6, gap 1
        pillar("low-a", 40, 2, available=5),   # same: the name decides
        pillar("low-p1", 40, 1, available=5),  # same gap, priority 1 first
        pillar("low-big", 40, 5, available=2),  # gap 4
        pillar("critical", 100, 5, available=1),  # gap 12
        pillar("exhausted", 10, 5, available=0),  # needs 2
    ], TODAY)
    assert [g.name for g in gaps] == ["exhausted", "critical", "low-big", "low-p1", "low-a", "low-b", "ready"]


def test_date_windows_against_the_thirty_day_horizon():
    last_day = TODAY + timedelta(days=29)
    cases = {
        "ended yesterday": (None, TODAY - timedelta(days=1), 0),
        "starts after the horizon": (TODAY + timedelta(days=30), None, 0),
        "ends today (inclusive)": (None, TODAY, 1),  # ⌈5.2 × 1/30⌉
        "starts on the last day": (last_day, None, 1),
        "half the horizon": (TODAY + timedelta(days=15), None, 3),  # ⌈5.2 × 15/30⌉ = ⌈2.6⌉
        "covers the horizon": (TODAY - timedelta(days=100), TODAY + timedelta(days=100), 6),
    }
    for label, (starts_on, ends_on, needed) in cases.items():
        result = gap_of(pillar(weight=40, available=0, starts_on=starts_on, ends_on=ends_on))
        assert result.needed == needed, label
        assert result.status == ("ready" if needed == 0 else "exhausted"), label
    assert active_days(pillar(starts_on=TODAY + timedelta(days=15)), TODAY, 30) == 15


def test_target_posts_per_week_overrides_the_weight():
    # Weight 25 alone needs ⌈3.25⌉ = 4; a target of 1/week over 30 days needs ⌈30/7⌉ = 5.
    assert gap_of(pillar(weight=25)).needed == 4
    assert gap_of(pillar(weight=25, target_posts_per_week=1)).needed == 5
    assert gap_of(pillar(weight=0, target_posts_per_week=2)).needed == 9  # ⌈60/7⌉, though weight is 0
    # Scaled by the window too: 1/week for 7 active days is 1.
    assert gap_of(pillar(weight=25, target_posts_per_week=1, ends_on=TODAY + timedelta(days=6))).needed == 1
    assert gap_of(pillar(weight=100, target_posts_per_week=3), days=7).needed == 3


def test_gap_analysis_refuses_bad_input_naming_the_pillar():
    with pytest.raises(ValueError, match="'a' appears twice"):
        analyse_gaps([pillar("a"), pillar("a")], TODAY)
    with pytest.raises(ValueError, match="'w'.*weight must be 0-100, got 101"):
        analyse_gaps([pillar("w", weight=101)], TODAY)
    with pytest.raises(ValueError, match="'n'.*available must be >= 0"):
        analyse_gaps([pillar("n", available=-1)], TODAY)
    with pytest.raises(ValueError, match="'d'.*ends_on 2025-01-01 is before starts_on 2025-02-01"):
        analyse_gaps([pillar("d", starts_on=date(2025, 2, 1), ends_on=date(2025, 1, 1))], TODAY)


# --- allocation ---------------------------------------------------------------------------------


def test_allocation_is_proportional_to_the_gap_by_largest_remainder():
    gaps = analyse_gaps([pillar("everyday", 40, 1), pillar("travel", 35, 2), pillar("outdoors", 25, 3)], TODAY)
    # Gaps 6/5/4 of 15: quotas 4, 3.33, 2.67 → floors 4/3/2, the one left goes to the largest remainder.
    assert allocate_prompts(gaps, 10) == ["everyday"] * 4 + ["travel"] * 3 + ["outdoors"] * 3
    assert allocate_prompts(gaps, 15) == ["everyday"] * 6 + ["travel"] * 5 + ["outdoors"] * 4
    assert allocate_prompts(gaps, 0) == []
    for n in range(1, 40):
        allocation = allocate_prompts(gaps, n)
        assert len(allocation) == n
        for g in gaps:  # never more than one away from the exact share
            assert abs(allocation.count(g.name) - n * g.gap / 15) < 1


def test_allocation_skips_pillars_without_a_gap_and_breaks_ties_by_urgency():
    gaps = [pg("c", 1, priority=3), pg("a", 1, priority=2), pg("b", 1, priority=1), pg("full", 0), pg("surplus", -4)]
    # Equal gaps and remainders: the more urgent (priority 1 first) get the odd prompts.
    assert allocate_prompts(gaps, 2) == ["b", "a"]
    assert allocate_prompts(gaps, 4) == ["b", "b", "a", "c"]
    shuffled = list(gaps)
    random.Random(7).shuffle(shuffled)
    assert allocate_prompts(shuffled, 4) == ["b", "b", "a", "c"]  # input order does not matter


def test_allocation_uses_weights_when_every_pillar_is_ready():
    gaps = [pg("everyday", 0, weight=40, priority=1), pg("travel", -2, weight=35, priority=2),
            pg("outdoors", -1, weight=25, priority=3)]
    # 4 × 40/35/25% = 1.6/1.4/1.0 → 1/1/1 and the remainder .6 to everyday.
    # Urgency order among ready pillars is by gap (0, -1, -2), so outdoors comes before travel.
    assert allocate_prompts(gaps, 4) == ["everyday", "everyday", "outdoors", "travel"]
    zero = [pg("x", 0, weight=0), pg("y", 0, weight=0)]
    assert allocate_prompts(zero, 3) == ["x", "x", "y"]


def test_allocation_refuses_bad_input():
    with pytest.raises(ValueError, match="no pillars"):
        allocate_prompts([], 3)
    with pytest.raises(ValueError, match=">= 0, got -1"):
        allocate_prompts([pg("a", 1)], -1)
    with pytest.raises(ValueError, match="repeat"):
        allocate_prompts([pg("a", 1), pg("a", 2)], 1)


# --- template prompts ---------------------------------------------------------------------------

PILLARS = {name: (f"photo of m1ra woman, yellow jacket, {scene}", GUIDELINES[name])
           for name, scene in (("everyday", "city street"), ("travel", "beach"), ("outdoors", "forest trail"))}


def test_template_prompts_are_deterministic_varied_and_start_with_the_trigger():
    allocation = ["everyday"] * 20 + ["travel"] * 3
    first = template_prompts(trigger="m1ra", class_word="woman", pillars=PILLARS, allocation=allocation, seed=5)
    again = template_prompts(trigger="m1ra", class_word="woman", pillars=PILLARS, allocation=allocation, seed=5)
    other = template_prompts(trigger="m1ra", class_word="woman", pillars=PILLARS, allocation=allocation, seed=6)
    assert first == again and first != other
    assert [p.pillar for p in first] == allocation
    assert len({p.prompt for p in first}) == len(first)  # 20 prompts for one pillar, all different
    for p in first:
        assert p.prompt.startswith(PILLARS[p.pillar][0] + ", ")
        assert p.negative_prompt == DEFAULT_NEGATIVE_PROMPT and p.source == "template"
        assert p.theme in p.prompt
        assert check_prompt(p.prompt, "m1ra") == p.prompt
    # Themes come from the guideline phrases, and every one is used before any repeats.
    everyday_themes = [p.theme for p in first if p.pillar == "everyday"]
    assert set(everyday_themes[:2]) == {"small moments of a day in the city", "warm and unhurried"}


def test_template_prompts_use_given_themes_and_repair_a_base_without_the_trigger():
    themes = {"outdoors": ["misty lake", "mountain hut", "autumn leaves"]}
    pillars = {"outdoors": ("forest trail", "")}
    prompts = template_prompts(trigger="m1ra", class_word="woman", pillars=pillars, allocation=["outdoors"] * 3,
                               themes=themes)
    assert {p.theme for p in prompts} == set(themes["outdoors"])
    for p in prompts:
        assert p.prompt.startswith("photo of m1ra woman, forest trail, ")
    # No guidelines and no themes: the pillar name is the theme.
    [bare] = template_prompts(trigger="m1ra", class_word="woman", pillars={"gym": ("photo of m1ra woman", "")},
                              allocation=["gym"])
    assert bare.theme == "gym" and bare.prompt.startswith("photo of m1ra woman, gym, ")


def test_template_prompts_take_the_slot_themes_given():
    allocation = ["travel", "everyday", "travel"]
    slot_themes = ["rooftop bar", "tram  ride", "surf lesson"]
    plain = template_prompts(trigger="m1ra", class_word="woman", pillars=PILLARS, allocation=allocation, seed=3)
    themed = template_prompts(trigger="m1ra", class_word="woman", pillars=PILLARS, allocation=allocation, seed=3,
                              slot_themes=slot_themes)
    assert [p.theme for p in themed] == ["rooftop bar", "tram ride", "surf lesson"]
    for before, after in zip(plain, themed):
        assert after.prompt.startswith(f"{PILLARS[after.pillar][0]}, {after.theme}, ")
        # Only the theme differs: the framing/light pair of the slot is the same.
        assert after.prompt.removeprefix(f"{PILLARS[after.pillar][0]}, {after.theme}") == \
            before.prompt.removeprefix(f"{PILLARS[before.pillar][0]}, {before.theme}")
    with pytest.raises(ValueError, match=r"slot_themes has 2 theme\(s\) for 3 allocation slot\(s\)"):
        template_prompts(trigger="m1ra", class_word="woman", pillars=PILLARS, allocation=allocation,
                         slot_themes=slot_themes[:2])


def test_template_prompts_refuse_an_unknown_pillar():
    with pytest.raises(ValueError, match="'food'.*not among"):
        template_prompts(trigger="m1ra", class_word="woman", pillars=PILLARS, allocation=["food"])


def test_guideline_themes_split_clauses():
    assert guideline_themes("Beaches, rooftops and new places; always with a sense of arrival.\nNYC at night!") == [
        "beaches", "rooftops and new places", "always with a sense of arrival", "NYC at night"]


def test_check_prompt():
    assert check_prompt("  photo of  m1ra\twoman,\n beach ", "m1ra") == "photo of m1ra woman, beach"
    assert check_prompt("Photo of M1RA woman", "m1ra") == "Photo of M1RA woman"  # CLIP lowercases anyway
    with pytest.raises(ValueError, match="empty"):
        check_prompt(" \n ", "m1ra")
    with pytest.raises(ValueError, match="1001 characters, more than 1000"):
        check_prompt("m1ra " + "x" * 996, "m1ra")
    assert len(check_prompt("m1ra " + "x" * 995, "m1ra")) == 1000
    with pytest.raises(ValueError, match="lacks the trigger word 'm1ra'"):
        check_prompt("photo of a woman on a beach", "m1ra")
    with pytest.raises(ValueError, match="lacks the trigger word 'm1ra'"):
        check_prompt("photo of m1rabella", "m1ra")  # a whole word, not a prefix


def test_demo_persona_from_gaps_to_template_prompts():
    config = load_persona(DEMO).config
    inputs = [PillarInput(p.name, p.weight, p.priority, available, p.starts_on, p.ends_on, p.target_posts_per_week)
              for p, available in zip(config.pillars, (2, 0, 4))]
    gaps = analyse_gaps(inputs, TODAY)
    # everyday 6 − 2, travel 5 − 0, outdoors 1/week → 5 − 4.
    assert [(g.name, g.needed, g.gap, g.status) for g in gaps] == [
        ("travel", 5, 5, "exhausted"), ("everyday", 6, 4, "low"), ("outdoors", 5, 1, "low")]
    allocation = allocate_prompts(gaps, 8)
    assert allocation == ["travel"] * 4 + ["everyday"] * 3 + ["outdoors"]  # 4.0 / 3.2 / 0.8
    pillars = {p.name: (config.pillar_prompt(p), p.guidelines) for p in config.pillars}
    prompts = template_prompts(trigger=config.trigger_word, class_word=config.class_word, pillars=pillars,
                               allocation=allocation)
    assert all(p.prompt.startswith("photo of m1ra woman, teal bob") for p in prompts)


# --- Gemini over HTTP ---------------------------------------------------------------------------


# `waits` and `fake` (a local Gemini) come from conftest.py.


ALLOCATION = ["travel", "travel", "everyday", "outdoors"]


def ask(fake: FakeGemini, log: Log | None = None, allocation=ALLOCATION, themes=None,
        **overrides) -> list[ContentPrompt]:
    values = dict(api_key="test-key", base_url=fake.url, model="gemini-2.5-flash", max_retries=3, backoff_seconds=0.5,
                  timeout_seconds=10)
    values.update(overrides)
    return GeminiClient(**values).content_prompts(
        persona_name="Mira Sol", trigger="m1ra", class_word="woman", guidelines_by_pillar=GUIDELINES,
        allocation=allocation, avoid=["sunset selfie on a pier", "coffee shop window"], log=log, themes=themes)


def test_gemini_sends_a_structured_text_only_request(fake, waits):
    prompts = ask(fake)

    [request] = fake.requests
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent" and request.inline_images() == []
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = request.response_schema
    # google-genai sends nested schema fields by their proto names (min_items); Gemini's parser takes both.
    bounds = [schema.get(f"{b}Items", schema.get(f"{b}_items")) for b in ("min", "max")]
    assert schema["type"] == "ARRAY" and [int(b) for b in bounds] == [4, 4]
    item = schema["items"]
    assert item["type"] == "OBJECT" and list(item["properties"]) == ["pillar", "prompt", "negative_prompt", "theme"]
    assert sorted(item["required"]) == sorted(item["properties"])
    assert item["properties"]["pillar"]["enum"] == ["travel", "everyday", "outdoors"]
    [instruction] = request.texts()
    assert 'Start every prompt with exactly "photo of m1ra woman, "' in instruction and "Mira Sol" in instruction
    for name, guidelines in GUIDELINES.items():
        assert f'- "{name}": {guidelines}' in instruction
    assert "- sunset selfie on a pier\n- coffee shop window" in instruction
    assert "Never describe the identity" in instruction and "hair colour" in instruction
    assert request.slots() == ALLOCATION

    assert [p.pillar for p in prompts] == ALLOCATION
    assert all(p.prompt.startswith("photo of m1ra woman, ") and p.source == "gemini:gemini-2.5-flash" for p in prompts)
    assert prompts[0] == ContentPrompt("travel", "photo of m1ra woman, travel scene 1, wearing outfit 1, "
                                       "standing by a window, soft daylight", "blurry, watermark", "travel idea 1",
                                       "gemini:gemini-2.5-flash")
    assert waits == []


def test_gemini_retries_429_with_retry_after_and_500(fake, waits):
    log = Log()
    fake.fail(429, "Resource has been exhausted", retry_after="3").fail(500, "Internal error encountered.")

    assert len(ask(fake, log)) == 4
    assert len(fake.content_requests()) == 3
    assert waits[0] == 3.0 and 1.0 <= waits[1] <= 1.25
    warnings = [m for level, m in log.records if level == "warning"]
    assert len(warnings) == 2 and "content prompts: HTTP 429" in warnings[0] and "retry 1 of 3 in 3.0 s" in warnings[0]


def test_gemini_gives_up_naming_the_request(fake, waits):
    for _ in range(5):
        fake.fail(500, "Internal error encountered.")
    with pytest.raises(GeminiError, match="gave up on content prompts after 2 attempts; last error: HTTP 500"):
        ask(fake, max_retries=1)


def test_gemini_malformed_answers_are_clear_errors(fake, waits):
    fake.reply_text("[{'pillar': travel")
    with pytest.raises(GeminiError, match=r"Gemini \(gemini-2.5-flash\) returned malformed JSON for content prompts"):
        ask(fake)
    fake.reply_prompts(lambda items: {"prompts": items})
    with pytest.raises(GeminiError, match=r"\(gemini-2.5-flash\) returned a JSON dict .* expected an array of 4 items"):
        ask(fake)
    fake.reply_prompts(lambda items: [*items[:3], "a prompt"])
    with pytest.raises(GeminiError, match="content prompt 3 is a JSON str, expected an object"):
        ask(fake)
    fake.reply_prompts(lambda items: [{k: v for k, v in i.items() if k != "prompt"} for i in items])
    with pytest.raises(GeminiError, match="content prompt 0 lacks the field 'prompt'"):
        ask(fake)
    fake.reply_prompts(lambda items: [{**i, "theme": 7} for i in items])
    with pytest.raises(GeminiError, match="content prompt 0: field 'theme' must be a string, got int"):
        ask(fake)
    fake.reply_text("")
    with pytest.raises(GeminiError, match="returned no content prompts"):
        ask(fake)


def test_gemini_forgotten_trigger_is_prefixed(fake, waits):
    log = Log()
    fake.reply_prompts(lambda items: [{**i, "prompt": i["prompt"].removeprefix("photo of m1ra woman, ")} for i in items])

    prompts = ask(fake, log)
    assert prompts[0].prompt == "photo of m1ra woman, travel scene 1, wearing outfit 1, standing by a window, soft daylight"
    assert all(check_prompt(p.prompt, "m1ra") == p.prompt for p in prompts)
    assert any("lacked the trigger word 'm1ra'; prefixed it" in m for _, m in log.records)


def test_gemini_answer_is_put_in_allocation_order(fake, waits):
    fake.reply_prompts(lambda items: [{**i, "pillar": i["pillar"].upper()} for i in reversed(items)])
    prompts = ask(fake)
    assert [p.pillar for p in prompts] == ALLOCATION
    # Within a pillar, the model's order is kept: slot 2 of travel came before slot 1 in the reversed answer.
    assert [p.theme for p in prompts] == ["travel idea 2", "travel idea 1", "everyday idea 3", "outdoors idea 4"]


def test_gemini_wrong_pillars_or_counts(fake, waits):
    log = Log()
    fake.reply_prompts(lambda items: [*items, {**items[0], "theme": "extra"}])
    assert [p.theme for p in ask(fake, log)] == ["travel idea 1", "travel idea 2", "everyday idea 3", "outdoors idea 4"]
    assert any("returned 5 content prompts for 4 slots; dropped 1 extra" in m for _, m in log.records)

    fake.reply_prompts(lambda items: items[1:])
    with pytest.raises(GeminiError, match=r"too few content prompts: asked 2 for 'travel', got 1 \(3 items for 4 slots\)"):
        ask(fake)
    fake.reply_prompts(lambda items: [*items[:3], {**items[3], "pillar": "food"}])
    with pytest.raises(GeminiError, match="content prompt 3 is for pillar 'food', which was not asked for"):
        ask(fake)
    fake.reply_prompts(lambda items: [{**i, "prompt": "m1ra " + "x" * 1200} for i in items])
    with pytest.raises(GeminiError, match=r"content prompt 0 \(pillar 'travel'\) is unusable: prompt is 1205 characters"):
        ask(fake)
    fake.reply_prompts(lambda items: [{**i, "prompt": "  "} for i in items])
    with pytest.raises(GeminiError, match=r"content prompt 0 \(pillar 'travel'\) is empty"):
        ask(fake)


def test_gemini_defaults_for_empty_negative_prompt_and_theme(fake, waits):
    fake.reply_prompts(lambda items: [{**i, "negative_prompt": "", "theme": " "} for i in items])
    prompts = ask(fake)
    assert {p.negative_prompt for p in prompts} == {DEFAULT_NEGATIVE_PROMPT}
    assert [p.theme for p in prompts] == ALLOCATION


SLOT_THEMES = ["rooftop bar", "surf lesson", "tram ride", "forest lake"]


def test_gemini_is_asked_for_one_theme_per_slot_and_keeps_it(fake, waits):
    prompts = ask(fake, themes=SLOT_THEMES)
    [request] = fake.requests
    [instruction] = request.texts()
    assert '1. "travel", theme "rooftop bar"\n2. "travel", theme "surf lesson"' in instruction
    assert "must be about" in instruction and "- sunset selfie on a pier" in instruction
    assert "Avoid these themes" not in instruction  # the rotation decides the themes
    assert request.slots() == ALLOCATION and request.slot_themes() == SLOT_THEMES
    assert [p.theme for p in prompts] == SLOT_THEMES
    assert all(p.prompt.startswith(f"photo of m1ra woman, {p.theme}, ") for p in prompts)

    # The model's own labels do not replace the slot's theme.
    fake.reply_prompts(lambda items: [{**i, "theme": "something else"} for i in items])
    assert [p.theme for p in ask(fake, themes=SLOT_THEMES)] == SLOT_THEMES
    # Items of one pillar swapped: each lands on the slot whose theme it echoes (any case).
    fake.reply_prompts(lambda items: [{**items[1], "theme": "SURF  lesson"}, items[0], *items[2:]])
    prompts = ask(fake, themes=SLOT_THEMES)
    assert [p.theme for p in prompts] == SLOT_THEMES
    assert "rooftop bar" in prompts[0].prompt and "surf lesson" in prompts[1].prompt
    with pytest.raises(ValueError, match=r"one non-empty theme per slot: 3 theme\(s\)"):
        ask(fake, themes=SLOT_THEMES[:3])
    with pytest.raises(ValueError, match="one non-empty theme per slot"):
        ask(fake, themes=["a", "b", " ", "d"])


def test_gemini_content_prompts_edge_cases(fake, waits):
    assert ask(fake, allocation=[]) == [] and fake.requests == []
    with pytest.raises(ValueError, match=r"no guidelines given for pillar\(s\) \['food'\]"):
        ask(fake, allocation=["food"])
    with pytest.raises(GeminiError, match="HTTP 400.*API key not valid"):
        ask(fake, api_key="wrong-key")
    assert len(fake.requests) == 1


def test_without_a_key_the_caller_falls_back_to_templates():
    client = GeminiClient()
    assert not client.enabled
    with pytest.raises(GeminiError, match="GEMINI_API_KEY is not set; use the template prompts"):
        client.content_prompts(persona_name="Mira Sol", trigger="m1ra", class_word="woman",
                               guidelines_by_pillar=GUIDELINES, allocation=["travel"])


def test_fake_still_answers_captions_beside_content_prompts(fake, waits, tmp_path):
    from PIL import Image

    photo = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(photo)
    client = GeminiClient(api_key="test-key", base_url=fake.url, timeout_seconds=10)
    fields = client.caption_training_photo(photo, trigger_word="m1ra", class_word="woman")
    assert fields.framing == "close-up portrait"
    assert len(ask(fake)) == 4
    assert [r.is_content_prompts for r in fake.requests] == [False, True]
    assert json.loads(json.dumps(fake.requests[1].good_prompt_items()))[0]["pillar"] == "travel"
