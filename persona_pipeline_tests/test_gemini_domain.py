"""What we ask Gemini and what we accept from it, tested directly (no server, no SDK): the
instructions built from their inputs, the response schemas, and the parsing of good and bad
answers (domain/gemini_prompts.py, domain/gemini_answers.py). The same requests over real HTTP
are tested against the fake server in test_captioners, test_content_prompts and test_post_captions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from persona_pipeline.domain.content_prompts import DEFAULT_NEGATIVE_PROMPT, ContentPrompt
from persona_pipeline.domain.gemini_answers import (
    Answer, GeminiError, json_answer, parse_caption_fields, parse_cluster_label, parse_content_prompts,
    parse_post_caption,
)
from persona_pipeline.domain.gemini_prompts import (
    CONTENT_PROMPT_FIELDS, MAX_AVOID_ITEMS, MAX_CAPTION_EXAMPLES, MAX_LABEL_TERMS, caption_fields_schema,
    caption_instruction, caption_length_reask, check_content_prompt_request, cluster_label_instruction,
    cluster_label_schema, cluster_label_terms, content_prompt_instruction, content_prompts_schema,
    post_caption_instruction, post_caption_schema,
)
from persona_pipeline.domain.training_captions import FIELD_NAMES, CaptionFields

WHO = "Gemini (gemini-test)"
GUIDELINES = {"travel": "Beaches and\n  rooftops.", "café \"life\"": ""}


def answer(data) -> Answer:
    return Answer(json.dumps(data))


def recording_log(lines: list[tuple[str, str]]) -> SimpleNamespace:
    """A `log` argument (anything with .warning and .info) that appends (level, message) to `lines`."""
    return SimpleNamespace(warning=lambda m: lines.append(("warning", m)), info=lambda m: lines.append(("info", m)))


# --- instructions and schemas ---------------------------------------------------------------------


def test_caption_instruction_names_the_trigger_every_field_and_the_identity_rule():
    text = caption_instruction("m1ra", "woman")
    assert "'m1ra' (woman)" in text
    for name in FIELD_NAMES:
        assert f"\n- {name}: " in text
    assert "Never describe the person's identity" in text and "empty string for a field you cannot see" in text


def test_caption_schema_is_the_five_fields_required_in_order():
    schema = caption_fields_schema()
    assert schema["type"] == "OBJECT"
    assert list(schema["properties"]) == list(FIELD_NAMES) == schema["required"] == schema["property_ordering"]
    assert all(p["type"] == "STRING" and p["description"] for p in schema["properties"].values())


def test_content_prompt_instruction_lists_pillars_once_and_one_numbered_slot_each():
    text = content_prompt_instruction(persona_name="Mira", trigger="m1ra", class_word="woman",
                                      guidelines_by_pillar=GUIDELINES, allocation=["travel", 'café "life"', "travel"])
    lines = text.splitlines()
    assert lines[0].startswith("Write 3 text-to-image prompts for new photos of Mira")
    assert 'Start every prompt with exactly "photo of m1ra woman, "' in text
    # Guidelines on one line; pillar names JSON-quoted (not ASCII-escaped); no guidelines said so.
    assert '- "travel": Beaches and rooftops.' in lines
    assert '- "café \\"life\\"": (no guidelines)' in lines
    assert lines[-4:] == ["Answer with a JSON array of exactly 3 items, one per slot, in this order:",
                          '1. "travel"', '2. "café \\"life\\""', '3. "travel"']
    assert "Avoid these themes" not in text and "theme \"" not in text


def test_content_prompt_instruction_cuts_the_avoid_list():
    avoid = ["  ", "x" * 300] + [f"idea {i}" for i in range(60)]
    text = content_prompt_instruction(persona_name="Mira", trigger="m1ra", class_word="woman",
                                      guidelines_by_pillar=GUIDELINES, allocation=["travel"], avoid=avoid)
    listed = [line for line in text.splitlines() if line.startswith("- ") and not line.startswith('- "')]
    assert len(listed) == MAX_AVOID_ITEMS
    assert listed[0] == "- " + "x" * 200 and listed[-1] == f"- idea {MAX_AVOID_ITEMS - 2}"
    assert "Avoid these themes and ideas, used recently:" in text


def test_content_prompt_instruction_with_themes_names_each_slots_theme():
    text = content_prompt_instruction(persona_name="Mira", trigger="m1ra", class_word="woman",
                                      guidelines_by_pillar=GUIDELINES, allocation=["travel", "travel"],
                                      avoid=["an old prompt"], themes=["rooftop bar", "night \"market\""])
    assert text.splitlines()[-2:] == ['1. "travel", theme "rooftop bar"', '2. "travel", theme "night \\"market\\""']
    assert "Do not repeat these recent prompts:\n- an old prompt" in text
    assert "Avoid these themes" not in text


def test_content_prompts_schema_is_an_array_of_exactly_one_item_per_slot():
    schema = content_prompts_schema(["travel", "food", "travel"])
    assert (schema["type"], schema["min_items"], schema["max_items"]) == ("ARRAY", 3, 3)
    item = schema["items"]
    assert list(item["properties"]) == list(CONTENT_PROMPT_FIELDS) == item["required"] == item["property_ordering"]
    assert item["properties"]["pillar"]["enum"] == ["travel", "food"]


def test_content_prompt_request_is_checked_before_anything_is_sent():
    kw = dict(guidelines_by_pillar=GUIDELINES, allocation=["travel", "travel"])
    assert check_content_prompt_request(trigger="m1ra", class_word="woman", themes=None, **kw) is None
    assert check_content_prompt_request(trigger="m1ra", class_word="woman", themes=[" a  b ", "c"], **kw) == ["a b", "c"]
    with pytest.raises(ValueError, match="trigger word ' ' and class word 'woman' must not be empty"):
        check_content_prompt_request(trigger=" ", class_word="woman", themes=None, **kw)
    with pytest.raises(ValueError, match=r"no guidelines given for pillar\(s\) \['food'\]"):
        check_content_prompt_request(trigger="m1ra", class_word="woman", themes=None,
                                     guidelines_by_pillar=GUIDELINES, allocation=["food"])
    for themes in (["a"], ["a", " "]):
        with pytest.raises(ValueError, match="one non-empty theme per slot"):
            check_content_prompt_request(trigger="m1ra", class_word="woman", themes=themes, **kw)


def test_post_caption_instruction_carries_every_setting_and_cuts_the_examples():
    examples = [" ", "e" * 700] + [f"example {i}" for i in range(10)]
    text = post_caption_instruction(persona_name="Mira", pillar="travel", theme="rooftop  bar", tone="playful",
                                    voice=["warm"], topics=["cities"], avoid_topics=["politics"], examples=examples,
                                    emoji=True, emoji_density="medium", length="short", avoid_phrases=["so blessed"],
                                    guidelines="be\nkind")
    for expected in ('Content pillar: "travel"; its guidelines: be kind', "Theme of this post: rooftop bar",
                     "Tone: playful (light, witty and fun).", "Voice: warm.", "Topics the persona talks about: cities.",
                     "Never mention or allude to: politics.", "about three to five",
                     "between 300 and 450 characters (short)", "- so blessed", "No hashtags",
                     'Answer with JSON: {"caption": "<the caption>"}.'):
        assert expected in text
    shown = [line for line in text.splitlines() if line.startswith(("- e", "- example"))]
    assert len(shown) == MAX_CAPTION_EXAMPLES and shown[0] == "- " + "e" * 600


def test_caption_length_reask_names_the_measured_length_and_band():
    assert caption_length_reask(120, "medium").startswith(
        "That caption is 120 characters long; it must be between 450 and 700 characters (medium).")
    with pytest.raises(ValueError, match="unknown caption length"):
        caption_length_reask(120, "huge")


def test_one_field_schemas():
    assert post_caption_schema() == {"type": "OBJECT", "required": ["caption"],
                                     "properties": {"caption": {"type": "STRING", "description": "the post caption"}}}
    assert cluster_label_schema()["required"] == ["label"] and list(cluster_label_schema()["properties"]) == ["label"]


def test_cluster_label_terms_and_instruction():
    terms = cluster_label_terms([" beach ", "", "sun\nset", "x" * 100] + [f"t{i}" for i in range(20)])
    assert terms[:3] == ["beach", "sun set", "x" * 60] and len(terms) == MAX_LABEL_TERMS
    with_images = cluster_label_instruction(["beach"], 2)
    assert with_images.startswith("The 2 photo(s) above") and "captions: beach." in with_images
    alone = cluster_label_instruction([], 0)
    assert alone.startswith("These terms describe") and "most frequent terms" not in alone


# --- answers --------------------------------------------------------------------------------------


def test_a_missing_or_malformed_answer_names_the_model_and_the_request():
    with pytest.raises(GeminiError, match=r"Gemini \(gemini-test\) returned no content prompts \(finish reason SAFETY"):
        json_answer(Answer(None, "finish reason SAFETY, prompt feedback None"), WHO, "content prompts")
    with pytest.raises(GeminiError, match="returned malformed JSON for content prompts: .*text '{nope'"):
        json_answer(Answer("{nope"), WHO, "content prompts")


def test_caption_fields_are_parsed_and_identity_is_stripped():
    good = {"framing": "close-up", "pose": "smiling with blue eyes", "clothing": "wearing a coat",
            "background": "street", "lighting": "daylight", "extra": "ignored"}
    assert parse_caption_fields(answer(good), "a.jpg") == CaptionFields("close-up", "smiling", "wearing a coat",
                                                                        "street", "daylight")


@pytest.mark.parametrize("data, message", [
    ({"framing": "a", "clothing": "", "background": "", "lighting": ""}, "caption field 'pose' is missing"),
    ({"framing": "a", "pose": 3, "clothing": "", "background": "", "lighting": ""},
     "caption field 'pose' must be a string, got int"),
    (["a"], "must be a JSON object, got list"),
])
def test_bad_caption_fields_name_the_photo_and_the_field(data, message):
    with pytest.raises(GeminiError, match=f"Gemini's caption for a.jpg is invalid: .*{message}"):
        parse_caption_fields(answer(data), "a.jpg")


def items(*pillars: str, **fields) -> list[dict[str, str]]:
    return [{"pillar": p, "prompt": f"photo of m1ra woman, scene {i}", "negative_prompt": "blurry",
             "theme": f"idea {i}", **fields} for i, p in enumerate(pillars)]


def parse(data, allocation=("travel", "food", "travel"), themes=None, log=None) -> list[ContentPrompt]:
    return parse_content_prompts(answer(data), who=WHO, source="gemini:gemini-test", trigger="m1ra",
                                 class_word="woman", allocation=list(allocation), themes=themes, log=log)


def test_content_prompts_are_matched_to_the_slots_by_pillar_in_answer_order():
    result = parse(items("food", " TRAVEL ", "travel"))
    assert [(p.pillar, p.prompt, p.theme) for p in result] == [
        ("travel", "photo of m1ra woman, scene 1", "idea 1"), ("food", "photo of m1ra woman, scene 0", "idea 0"),
        ("travel", "photo of m1ra woman, scene 2", "idea 2")]
    assert {(p.negative_prompt, p.source) for p in result} == {("blurry", "gemini:gemini-test")}


def test_with_themes_an_item_lands_on_the_slot_whose_theme_it_echoes():
    data = items("travel", "travel")
    data[0]["theme"], data[1]["theme"] = "Night  Market", "something else"
    result = parse(data, allocation=["travel", "travel"], themes=["rooftop bar", "night market"])
    assert [(p.prompt, p.theme) for p in result] == [("photo of m1ra woman, scene 1", "rooftop bar"),
                                                     ("photo of m1ra woman, scene 0", "night market")]


def test_content_prompt_repairs_and_defaults_are_logged():
    data = items("travel", "travel", negative_prompt=" ", theme="")
    data[0]["prompt"] = "on a  rooftop"
    lines: list[tuple[str, str]] = []
    result = parse(data, allocation=["travel"], log=recording_log(lines))
    assert result == [ContentPrompt("travel", "photo of m1ra woman, on a rooftop", DEFAULT_NEGATIVE_PROMPT, "travel",
                                    "gemini:gemini-test")]
    assert lines == [
        ("warning", f"{WHO} returned 2 content prompts for 1 slots; dropped 1 extra"),
        ("info", f"{WHO} content prompt 0 (pillar 'travel') lacked the trigger word 'm1ra'; prefixed it")]


@pytest.mark.parametrize("data, message", [
    ({"a": 1}, "returned a JSON dict for content prompts, expected an array of 3 items"),
    ([1], "content prompt 0 is a JSON int, expected an object with pillar, prompt, negative_prompt, theme"),
    ([{"pillar": "travel"}], "content prompt 0 lacks the field 'prompt'"),
    ([{"pillar": "travel", "prompt": "x", "theme": 2}], "content prompt 0: field 'theme' must be a string, got int"),
    (items("travel", "beach"), "content prompt 1 is for pillar 'beach', which was not asked for"),
    (items("travel"), r"returned too few content prompts: asked 2 for 'travel', got 1; 1 for 'food', got 0 \(1 items for 3 slots\)"),
    (items("travel", "food", "travel", prompt=" "), r"content prompt 0 \(pillar 'travel'\) is empty"),
    (items("travel", "food", "travel", negative_prompt="n" * 1001),
     r"content prompt 0 \(pillar 'travel'\) has a negative prompt of 1001 characters, more than 1000"),
    (items("travel", "food", "travel", prompt="m1ra " + "x" * 1000), r"content prompt 0 \(pillar 'travel'\) is unusable"),
])
def test_bad_content_prompts_name_the_item_and_the_field(data, message):
    with pytest.raises(GeminiError, match=rf"^Gemini \(gemini-test\) {message}"):
        parse(data)


def test_post_caption_loses_its_hashtags_and_an_empty_one_is_refused():
    assert parse_post_caption(answer({"caption": "Sunny day.\n\n#travel #sun"}), WHO, "post caption for a.jpg") \
        == "Sunny day."
    with pytest.raises(GeminiError, match=r"returned an empty post caption for a.jpg"):
        parse_post_caption(answer({"caption": "#only"}), WHO, "post caption for a.jpg")
    with pytest.raises(GeminiError, match=r"returned no string 'caption' for post caption for a.jpg; text '{\"x\": 1}'"):
        parse_post_caption(answer({"x": 1}), WHO, "post caption for a.jpg")


def test_cluster_label_is_trimmed_and_its_length_checked():
    assert parse_cluster_label(answer({"label": ' "Beach  Sunsets." '}), WHO) == "Beach Sunsets"
    with pytest.raises(GeminiError, match="returned an empty cluster label"):
        parse_cluster_label(answer({"label": " .. "}), WHO)
    with pytest.raises(GeminiError, match="cluster label 'one two three four five' is longer than 4 words"):
        parse_cluster_label(answer({"label": "one two three four five"}), WHO)
    with pytest.raises(GeminiError, match="longer than 4 words or 40 characters"):
        parse_cluster_label(answer({"label": "x" * 41}), WHO)
    with pytest.raises(GeminiError, match="returned no string 'label'"):
        parse_cluster_label(answer({"label": 3}), WHO)
