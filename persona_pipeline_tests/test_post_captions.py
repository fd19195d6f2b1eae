"""Post captions and hashtags: length bands, repeated phrases, the hashtag size mix, template
captions and Instagram's text limits (docs/rules.md); Gemini's post captions and cluster
labels over real HTTP against the local fake server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from PIL import Image

from persona_pipeline.domain.captions import (
    LENGTH_BANDS, TemplateError, in_band, length_band, repeated_phrases, select_hashtags, size_quotas,
    strip_hashtags, template_caption, tidy_caption, validate_post_text,
)
from persona_pipeline.domain.gemini_prompts import post_caption_instruction
from persona_pipeline.resources.gemini import GeminiClient, GeminiError
from persona_fakes.gemini import FakeGemini, caption_of_length
from persona_pipeline_tests.helpers import LogCapture as Log

# --- length bands -------------------------------------------------------------------------------


def test_length_bands_are_the_documented_character_ranges():
    assert LENGTH_BANDS == {"short": (300, 450), "medium": (450, 700), "long": (700, 1000)}
    assert [in_band("x" * n, "short") for n in (299, 300, 450, 451)] == [False, True, True, False]
    assert [in_band("x" * n, "long") for n in (699, 700, 1000, 1001)] == [False, True, True, False]
    with pytest.raises(ValueError, match="unknown caption length 'huge'; known: short, medium, long"):
        length_band("huge")


# --- repeated phrases ---------------------------------------------------------------------------

RECENT = [
    "Golden hour on the pier again. Feeling so grateful for slow Sundays! #sunset #goldenhour @friend",
    "Golden hour never gets old. So grateful for this city, and for slow Sundays with you.",
    "Rainy day, and the city is so quiet. Feeling so grateful for this city.",
]


def test_repeated_phrases_longest_of_equal_count_most_frequent_first():
    # "so grateful for" is in all three captions; its parts "so grateful" and "grateful for" add
    # nothing. Among phrases in two captions, 4 words before 3 before 2, then alphabetical; a
    # phrase inside a longer one of the same count ("this city", "slow sundays") is dropped.
    assert repeated_phrases(RECENT) == [
        "so grateful for",
        "feeling so grateful for", "grateful for this city", "so grateful for this",
        "for slow sundays",
        "golden hour",
    ]
    assert repeated_phrases(list(reversed(RECENT))) == repeated_phrases(RECENT)  # deterministic
    assert repeated_phrases(RECENT, limit=2) == ["so grateful for", "feeling so grateful for"]
    assert repeated_phrases(RECENT, min_count=3) == ["so grateful for"]
    assert repeated_phrases(RECENT, max_words=2) == ["grateful for", "so grateful", "feeling so", "for slow",
                                                     "golden hour", "slow sundays", "this city"]


def test_repeated_phrases_ignore_hashtags_mentions_links_and_stop_words():
    captions = ["#slow sundays forever @mira is here https://example.com/a b",
                "#Slow Sundays forever! @mira is here https://example.com/a b"]
    # "#slow" and "@mira" are not words, and they break a phrase; "is here" is only stop words.
    assert repeated_phrases(captions) == ["sundays forever"]
    assert repeated_phrases(["and then it was", "and then it was"]) == []
    # Counted once per caption: repeated inside one caption is not repeated across captions.
    assert repeated_phrases(["coffee time, coffee time, coffee time"]) == []
    # Phrases do not run across sentences or line breaks; curly apostrophes are straight ones.
    assert repeated_phrases(["Sun. Rise early", "sun\nrise early", "Don’t stop", "don't stop"]) == ["don't stop",
                                                                                                   "rise early"]
    assert repeated_phrases([]) == []
    with pytest.raises(ValueError, match="min_words"):
        repeated_phrases(RECENT, min_words=3, max_words=2)


# --- hashtags -----------------------------------------------------------------------------------

BROAD = ["travel", "photography", "instagood", "love"]
MEDIUM = ["citybreak", "slowtravel", "europetravel"]
NICHE = ["lisbonstreets", "alfamadiaries", "tramlife", "miradouros"]


def tags(size_mix: str, offset: int = 0, max_per_post: int = 5, avoid=(), broad=BROAD, medium=MEDIUM, niche=NICHE):
    return select_hashtags(broad=list(broad), medium=list(medium), niche=list(niche), avoid=list(avoid),
                           size_mix=size_mix, max_per_post=max_per_post, offset=offset)


def test_size_quotas_split_the_slots_by_the_mix():
    assert size_quotas("balanced", 5) == {"broad": 1, "medium": 2, "niche": 2}
    assert size_quotas("niche_heavy", 5) == {"broad": 1, "medium": 1, "niche": 3}
    assert size_quotas("broad_reach", 5) == {"broad": 3, "medium": 1, "niche": 1}
    assert size_quotas("balanced", 3) == {"broad": 1, "medium": 1, "niche": 1}
    assert size_quotas("niche_heavy", 3) == {"broad": 0, "medium": 1, "niche": 2}
    assert size_quotas("broad_reach", 2) == {"broad": 1, "medium": 1, "niche": 0}
    assert size_quotas("balanced", 30) == {"broad": 10, "medium": 10, "niche": 10}
    assert size_quotas("balanced", 0) == {"broad": 0, "medium": 0, "niche": 0}
    with pytest.raises(ValueError, match="unknown hashtag size_mix 'viral'"):
        size_quotas("viral", 5)


def test_each_mix_picks_the_expected_tags():
    assert tags("balanced") == ["#travel", "#citybreak", "#slowtravel", "#lisbonstreets", "#alfamadiaries"]
    assert tags("niche_heavy") == ["#travel", "#citybreak", "#lisbonstreets", "#alfamadiaries", "#tramlife"]
    assert tags("broad_reach") == ["#travel", "#photography", "#instagood", "#citybreak", "#lisbonstreets"]


def test_consecutive_posts_rotate_and_every_tag_gets_its_turn():
    # Each group's window moves on by its own count: broad by 1, medium and niche by 2.
    assert tags("balanced", offset=1) == ["#photography", "#europetravel", "#citybreak", "#tramlife", "#miradouros"]
    assert tags("balanced", offset=2) == ["#instagood", "#slowtravel", "#europetravel", "#lisbonstreets",
                                          "#alfamadiaries"]
    posts = [tags("balanced", offset=i) for i in range(12)]
    assert all(set(a) != set(b) for a, b in zip(posts, posts[1:]))
    assert {t for post in posts for t in post} == {f"#{t}" for t in BROAD + MEDIUM + NICHE}


def test_avoided_tags_never_appear_case_and_hash_ignored():
    assert tags("niche_heavy", offset=1, avoid=["LOVE", "#TramLife"]) == [
        "#photography", "#slowtravel", "#lisbonstreets", "#alfamadiaries", "#miradouros"]
    for mix in ("balanced", "niche_heavy", "broad_reach"):
        for offset in range(8):
            for limit in range(8):
                picked = tags(mix, offset, limit, avoid=["love", "tramlife", "citybreak"])
                assert len(picked) == min(limit, 8) and len(set(picked)) == len(picked)
                assert not {"#love", "#tramlife", "#citybreak"} & set(picked)


def test_a_short_group_leaves_its_slots_to_the_others():
    # broad_reach wants 3 broad tags; there is one, so niche (last in its priority) fills the two slots.
    assert tags("broad_reach", broad=["travel"], medium=["citybreak"], niche=["a", "b", "c"]) == [
        "#travel", "#citybreak", "#a", "#b", "#c"]
    # Not enough tags in all: every usable tag, no more.
    assert tags("balanced", broad=[], medium=["citybreak"], niche=["a"]) == ["#citybreak", "#a"]
    assert tags("balanced", broad=[], medium=[], niche=[]) == []
    assert tags("balanced", max_per_post=0) == []


def test_hashtags_are_deduplicated_across_groups_case_insensitively():
    assert tags("balanced", broad=["Travel"], medium=["travel", "CityBreak"], niche=["#citybreak", "x"]) == [
        "#Travel", "#CityBreak", "#x"]
    with pytest.raises(ValueError, match="niche hashtag 'two words' must be letters, digits or underscores"):
        tags("balanced", niche=["two words"])


# --- template captions --------------------------------------------------------------------------

VALUES = {"pillar": "travel", "theme": "tram at dawn", "guidelines": "New places, a sense of arrival.",
          "name": "Mira Sol"}
WHAT = "datasets/mira/persona.yaml captions.templates"


def test_template_caption_fills_and_cycles():
    templates = ["{name} on {pillar}: {theme}", "{guidelines}\n\n\n  — {name}  "]
    assert template_caption(templates, VALUES, 0, what=WHAT) == "Mira Sol on travel: tram at dawn"
    assert template_caption(templates, VALUES, 1, what=WHAT) == "New places, a sense of arrival.\n\n— Mira Sol"
    assert template_caption(templates, VALUES, 2, what=WHAT) == "Mira Sol on travel: tram at dawn"


def test_template_caption_errors_name_the_field_and_the_limit():
    # The broken template is not the one chosen: it fails on the first post all the same.
    with pytest.raises(TemplateError, match=r"captions.templates: unknown placeholder\(s\) \{mood\}"):
        template_caption(["{pillar}", "{mood} {pillar}"], VALUES, 0, what=WHAT)
    with pytest.raises(TemplateError, match="no caption templates"):
        template_caption([], VALUES, 0, what=WHAT)
    with pytest.raises(TemplateError, match="fills to an empty caption"):
        template_caption(["{theme}"], {**VALUES, "theme": "  "}, 0, what=WHAT)
    with pytest.raises(TemplateError, match="template 0 fills to 2300 characters; the limit is 2200"):
        template_caption(["{guidelines}"], {**VALUES, "guidelines": "x" * 2300}, 0, what=WHAT)
    assert len(template_caption(["{guidelines}"], {**VALUES, "guidelines": "x" * 2200}, 0, what=WHAT)) == 2200


# --- validation ---------------------------------------------------------------------------------


def test_caption_limit_counts_the_hashtags_and_the_space_before_them():
    assert validate_post_text("x" * 2200, []) == []
    assert validate_post_text("x" * 2201, []) == ["caption with hashtags is 2201 characters; the limit is 2200"]
    assert validate_post_text("x" * 2194, ["#abcd"]) == []  # 2194 + 1 + 5 = 2200
    assert validate_post_text("x" * 2195, ["#abcd"]) == ["caption with hashtags is 2201 characters; the limit is 2200"]


def test_hashtag_limit_defaults_to_five_and_counts_case_insensitively():
    five = [f"#t{i}" for i in range(5)]
    assert validate_post_text("hello", five) == []
    assert validate_post_text("hello", [*five, "#t5"]) == ["6 hashtags; the limit is 5"]
    assert validate_post_text("hello #t6", five) == ["6 hashtags; the limit is 5"]  # typed in the caption too
    # #Travel and #travel are one tag on Instagram; "#1" (digits only) is no tag at all.
    assert validate_post_text("#Travel day, we're #1", ["#travel", "TRAVEL"], 1) == []
    assert validate_post_text("hello", ["#a", "#b", "#c"], 2) == ["3 hashtags; the limit is 2"]


def test_mentions_limit_is_twenty_and_email_addresses_are_not_mentions():
    twenty = " ".join(f"@friend{i}" for i in range(20))
    assert validate_post_text(twenty + " write to hello@example.com", []) == []
    assert validate_post_text(twenty + " @one_more", []) == ["21 mentions; the limit is 20"]


def test_strip_hashtags_and_tidy():
    assert strip_hashtags("Golden #hour at the pier.\n\n#travel #Lisbon") == "Golden at the pier."
    assert strip_hashtags("We're #1!  C# rocks") == "We're #1! C# rocks"
    assert tidy_caption("  a  b \r\n\n\n\n c ") == "a b\n\nc"


# --- Gemini post captions over HTTP -------------------------------------------------------------

# `waits` and `fake` (a local Gemini) come from conftest.py.

SETTINGS = dict(
    persona_name="Mira Sol", pillar="travel", theme="tram at dawn", guidelines="New places, a sense of arrival.",
    tone="playful", voice=["warm", "witty"], topics=["city walks", "coffee"], avoid_topics=["politics"],
    examples=["Lost in Alfama again and not even sorry.", "Tram 28, window seat, zero plans."],
    emoji=True, emoji_density="low", length="medium",
    avoid_phrases=["so grateful for", "golden hour"], max_hashtags=5,
)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "post-000001.jpg"
    Image.new("RGB", (40, 50), "orange").save(path, format="JPEG")
    return path


def client_for(fake: FakeGemini, **overrides) -> GeminiClient:
    values = dict(api_key="test-key", base_url=fake.url, model="gemini-2.5-flash", max_retries=3, backoff_seconds=0.5,
                  timeout_seconds=10)
    values.update(overrides)
    return GeminiClient(**values)


def write(fake: FakeGemini, photo: Path, log: Log | None = None, client: GeminiClient | None = None, **overrides) -> str:
    return (client or client_for(fake)).post_caption(photo, **{**SETTINGS, **overrides}, log=log)


def test_post_caption_request_carries_the_image_every_setting_and_the_band(fake, waits, photo):
    caption = write(fake, photo)

    assert caption == caption_of_length(575) and in_band(caption, "medium")  # the fake answers mid-band
    [request] = fake.requests
    assert request.is_post_caption and request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    [(mime, data)] = request.inline_images()
    assert mime == "image/jpeg" and base64.urlsafe_b64decode(data) == photo.read_bytes()
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert list(request.response_schema["properties"]) == ["caption"] and request.response_schema["required"] == ["caption"]
    [instruction] = request.texts()
    for expected in ("posted by Mira Sol", 'Content pillar: "travel"; its guidelines: New places, a sense of arrival.',
                     "Theme of this post: tram at dawn", "Tone: playful (light, witty and fun).", "Voice: warm, witty.",
                     "Topics the persona talks about: city walks, coffee.", "Never mention or allude to: politics.",
                     "- Lost in Alfama again and not even sorry.\n- Tram 28, window seat, zero plans.",
                     "Use one or two emoji at most.",
                     "Length: between 450 and 700 characters (medium)",
                     "do not use them:\n- so grateful for\n- golden hour",
                     "No hashtags in the caption", "never more than 20"):
        assert expected in instruction
    assert request.band() == (450, 700) and waits == []


def test_instruction_without_emoji_or_optional_settings():
    text = post_caption_instruction(persona_name="Mira Sol", pillar="travel", theme="", tone="edgy", voice=[],
                                    topics=[], avoid_topics=[], examples=[f"example {i}" for i in range(8)],
                                    emoji=False, emoji_density="high", length="short", avoid_phrases=[])
    assert "Use no emoji." in text and "generously" not in text
    assert "between 300 and 450 characters (short)" in text
    assert "Theme" not in text and "Voice" not in text and "do not use them" not in text
    assert "- example 4" in text and "- example 5" not in text  # at most 5 examples


def test_out_of_band_answer_is_asked_for_exactly_once_more(fake, waits, photo):
    log = Log()
    fake.reply_caption(900)

    caption = write(fake, photo, log)

    assert len(caption) == 575
    first, second = fake.caption_requests()
    assert len(fake.requests) == 2
    roles = [c.get("role") for c in second.body["contents"]]
    assert roles == ["user", "model", "user"]
    assert len(second.inline_images()) == 1  # the same conversation, image included
    assert json.loads(second.texts()[1]) == {"caption": caption_of_length(900)}
    assert second.texts()[2].startswith("That caption is 900 characters long; it must be between 450 and 700 "
                                        "characters (medium).")
    assert any(level == "info" and "900 characters, outside the medium band (450-700)" in m for level, m in log.records)


def test_still_out_of_band_is_kept_with_a_warning_naming_the_band(fake, waits, photo):
    log = Log()
    fake.reply_caption(900).reply_caption(120)

    assert write(fake, photo, log) == caption_of_length(120)
    assert len(fake.requests) == 2  # never a third ask
    warnings = [m for level, m in log.records if level == "warning"]
    assert len(warnings) == 1 and "kept a caption of 120 characters, outside the medium band (450-700 characters)" in warnings[0]


def test_over_the_limits_or_empty_is_an_error(fake, waits, photo):
    fake.reply_caption(2300).reply_caption(2201)
    with pytest.raises(GeminiError, match=r"post caption for post-000001.jpg is unusable: caption with hashtags is "
                                          r"2201 characters; the limit is 2200"):
        write(fake, photo)
    mentions = " ".join(f"@friend{i}" for i in range(21))
    fake.reply_caption(text=mentions + " " + caption_of_length(400))
    with pytest.raises(GeminiError, match="21 mentions; the limit is 20"):
        write(fake, photo)
    fake.reply_caption(text="   ")
    with pytest.raises(GeminiError, match=r"returned an empty post caption for post-000001.jpg"):
        write(fake, photo)
    fake.reply_caption(text="#travel #lisbon #tram")  # nothing left once hashtags are stripped
    with pytest.raises(GeminiError, match="returned an empty post caption"):
        write(fake, photo)
    fake.reply_text('{"text": "hello"}')
    with pytest.raises(GeminiError, match="returned no string 'caption' for post caption"):
        write(fake, photo)
    fake.reply_text("{'caption': ")
    with pytest.raises(GeminiError, match="malformed JSON for post caption"):
        write(fake, photo)


def test_hashtags_the_model_adds_are_stripped(fake, waits, photo):
    fake.reply_caption(500, hashtags=("#travel", "#Lisbon"))
    assert write(fake, photo) == caption_of_length(500)
    fake.reply_caption(text="Golden #hour at the tram stop. " + caption_of_length(480))
    caption = write(fake, photo)
    assert caption.startswith("Golden at the tram stop. ") and "#" not in caption
    assert len(fake.requests) == 2  # both in band after stripping: no re-ask


def test_429_and_5xx_are_retried(fake, waits, photo):
    log = Log()
    fake.fail(429, "Resource has been exhausted", retry_after="2").fail(503, "The model is overloaded")

    assert len(write(fake, photo, log)) == 575
    assert len(fake.caption_requests()) == 3
    assert waits[0] == 2.0 and 1.0 <= waits[1] <= 1.25
    warnings = [m for level, m in log.records if level == "warning"]
    assert len(warnings) == 2 and "post caption for post-000001.jpg: HTTP 429" in warnings[0]


def test_a_400_fails_at_once(fake, waits, photo):
    fake.fail(400, "Request contains an invalid argument.")
    with pytest.raises(GeminiError, match=r"Gemini refused post caption for post-000001.jpg: HTTP 400 INVALID_ARGUMENT"):
        write(fake, photo)
    assert len(fake.requests) == 1 and waits == []


def test_no_key_or_unknown_band_fails_before_any_request(fake, photo):
    with pytest.raises(GeminiError, match="GEMINI_API_KEY is not set; use the caption templates"):
        GeminiClient().post_caption(photo, **SETTINGS)
    with pytest.raises(ValueError, match="unknown caption length 'epic'"):
        write(fake, photo, length="epic")
    assert fake.requests == []


# --- Gemini cluster labels over HTTP ------------------------------------------------------------


def test_cluster_label_sends_four_images_and_the_terms(fake, waits, tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"member-{i}.png"
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(path)
        paths.append(path)

    assert client_for(fake).cluster_label(paths, ["beach", "sunset", "sand"]) == "Sunny Street Style"

    [request] = fake.requests
    assert request.is_cluster_label and not request.is_post_caption
    images = request.inline_images()
    assert len(images) == 4 and {m for m, _ in images} == {"image/png"}
    assert [base64.urlsafe_b64decode(d) for _, d in images] == [p.read_bytes() for p in paths[:4]]
    [instruction] = request.texts()
    assert "beach, sunset, sand" in instruction and "1 to 4 words" in instruction
    assert list(request.response_schema["properties"]) == ["label"]


def test_cluster_label_is_cleaned_and_validated(fake, waits, tmp_path):
    client = client_for(fake)
    fake.reply_text(json.dumps({"label": '  "Beach   Sunsets." '}))
    assert client.cluster_label([], ["beach", "sunset"]) == "Beach Sunsets"
    assert fake.requests[-1].inline_images() == []  # terms only: a text request
    fake.reply_text(json.dumps({"label": "Long Walks On Sunny Beaches"}))
    with pytest.raises(GeminiError, match="'Long Walks On Sunny Beaches' is longer than 4 words or 40 characters"):
        client.cluster_label([], ["beach"])
    fake.reply_text(json.dumps({"label": "Supercalifragilisticexpialidocious Mornings"}))
    with pytest.raises(GeminiError, match="longer than 4 words or 40 characters"):
        client.cluster_label([], ["beach"])
    fake.reply_text(json.dumps({"label": " . "}))
    with pytest.raises(GeminiError, match="returned an empty cluster label"):
        client.cluster_label([], ["beach"])
    fake.fail(500).fail(400, "bad")
    with pytest.raises(GeminiError, match="Gemini refused cluster label: HTTP 400"):
        client.cluster_label([], ["beach"])
    with pytest.raises(ValueError, match="at least one image or term"):
        client.cluster_label([], ["  "])
    with pytest.raises(GeminiError, match="GEMINI_API_KEY is not set; use the cluster's top caption terms"):
        GeminiClient().cluster_label([], ["beach"])


def test_fake_answers_each_request_kind(fake, waits, photo):
    client = client_for(fake)
    client.caption_training_photo(photo, trigger_word="m1ra", class_word="woman")
    write(fake, photo, length="long")
    client.cluster_label([photo], ["tram"])
    kinds = [(r.is_post_caption, r.is_cluster_label, r.is_content_prompts) for r in fake.requests]
    assert kinds == [(False, False, False), (True, False, False), (False, True, False)]
    assert fake.requests[1].band() == (700, 1000)
    fake.caption_length = 333
    assert write(fake, photo, length="short") == caption_of_length(333)
