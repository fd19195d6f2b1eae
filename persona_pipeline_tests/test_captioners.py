"""Training-photo captioners: Gemini over real HTTP against a local fake server, and the offline
open_clip zero-shot captioner on the tiny random model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from persona_pipeline.domain.training_captions import (
    FIELD_NAMES, VOCABULARIES, CaptionFields, CaptionFieldsError, compose_training_caption, find_identity_terms,
    strip_identity,
)
from persona_pipeline.resources.captioners import ClipCaptioner
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.gemini import GeminiClient, GeminiError
from persona_pipeline_tests.conftest import DEMO
from persona_fakes.gemini import GOOD_FIELDS, FakeGemini

PHOTOS = sorted((DEMO / "photos").glob("*.jpg"))


# `waits` and `fake` (a local Gemini) come from conftest.py.


def client_for(fake: FakeGemini, **overrides) -> GeminiClient:
    values = dict(api_key="test-key", base_url=fake.url, model="gemini-2.5-flash", max_retries=4, backoff_seconds=0.5,
                  timeout_seconds=10)
    values.update(overrides)
    return GeminiClient(**values)


def caption(client: GeminiClient, path: Path = PHOTOS[0]) -> CaptionFields:
    return client.caption_training_photo(path, trigger_word="m1ra", class_word="woman")


# --- Gemini over HTTP ---------------------------------------------------------------------------


def test_gemini_sends_the_image_the_schema_and_the_key(fake, waits):
    fields = caption(client_for(fake))

    assert fields == CaptionFields(**GOOD_FIELDS)
    assert len(fake.requests) == 1 and waits == []
    request = fake.requests[0]
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.headers["x-goog-api-key"] == "test-key"
    [(mime, data)] = request.inline_images()
    assert mime == "image/jpeg"
    assert base64.urlsafe_b64decode(data) == PHOTOS[0].read_bytes()
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = config["responseSchema"]
    assert schema["type"] == "OBJECT" and sorted(schema["required"]) == sorted(FIELD_NAMES)
    assert list(schema["properties"]) == list(FIELD_NAMES)
    assert {p["type"] for p in schema["properties"].values()} == {"STRING"}
    [instruction] = request.texts()
    assert "m1ra" in instruction and "Never describe the person's identity" in instruction
    for word in ("face", "hair", "skin", "age", "ethnicity", "body"):
        assert word in instruction


def test_gemini_retries_429_and_503_then_succeeds(fake, waits):
    fake.fail(429, "Resource has been exhausted", retry_after="3").fail(503, "The model is overloaded")

    assert caption(client_for(fake)) == CaptionFields(**GOOD_FIELDS)
    assert len(fake.requests) == 3
    assert waits[0] == 3.0  # the server's Retry-After wins over our backoff
    assert 1.0 <= waits[1] <= 1.25  # 0.5 * 2**1 plus at most 25% jitter


def test_gemini_honours_a_retry_after_http_date(fake, waits):
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    fake.fail(503, "The model is overloaded", retry_after=format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True))
    caption(client_for(fake))
    assert len(fake.requests) == 2 and 25 <= waits[0] <= 30  # the date's distance, not our 0.5 s backoff


def test_gemini_honours_retry_info_in_the_error_body(fake, waits):
    fake.fail(429, "You exceeded your current quota", retry_delay="37s")
    caption(client_for(fake))
    assert len(fake.requests) == 2 and waits == [37.0]


def test_gemini_retries_a_dropped_connection(fake, waits):
    fake.drop()
    assert caption(client_for(fake)) == CaptionFields(**GOOD_FIELDS)
    assert len(fake.requests) == 2 and len(waits) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_gemini_does_not_retry_client_errors(fake, waits, status):
    fake.fail(status, "Request contains an invalid argument.")

    with pytest.raises(GeminiError) as info:
        caption(client_for(fake))
    message = str(info.value)
    assert PHOTOS[0].name in message and f"HTTP {status}" in message and "invalid argument" in message
    assert len(fake.requests) == 1 and waits == []


def test_gemini_reports_a_bad_key_without_retrying(fake, waits):
    with pytest.raises(GeminiError, match="HTTP 400.*API key not valid"):
        caption(client_for(fake, api_key="wrong-key"))
    assert len(fake.requests) == 1


def test_gemini_gives_up_after_max_retries(fake, waits):
    for _ in range(10):
        fake.fail(500, "Internal error encountered.")

    with pytest.raises(GeminiError) as info:
        caption(client_for(fake, max_retries=2))
    message = str(info.value)
    assert PHOTOS[0].name in message and "after 3 attempts" in message and "HTTP 500" in message
    assert len(fake.requests) == 3
    assert len(waits) == 2 and waits[0] < waits[1]  # exponential


def test_gemini_malformed_json_names_the_file(fake, waits):
    fake.reply_text("{'framing': close-up")
    with pytest.raises(GeminiError, match=rf"malformed JSON for caption for {PHOTOS[0].name}"):
        caption(client_for(fake))
    assert len(fake.requests) == 1


def test_gemini_missing_field_names_the_file_and_the_field(fake, waits):
    fake.missing_field("lighting")
    with pytest.raises(GeminiError) as info:
        caption(client_for(fake))
    assert PHOTOS[0].name in str(info.value) and "'lighting'" in str(info.value)


def test_gemini_empty_answer_names_the_file(fake, waits):
    fake.reply_text("")
    with pytest.raises(GeminiError, match=rf"no caption for {PHOTOS[0].name}"):
        caption(client_for(fake))


def test_gemini_captions_several_photos_in_order(fake, waits):
    fake.fail(503)
    captions = client_for(fake).caption_fields(PHOTOS[:3], trigger_word="m1ra", class_word="woman")
    assert captions == [CaptionFields(**GOOD_FIELDS)] * 3
    assert [base64.urlsafe_b64decode(r.inline_images()[0][1]) for r in fake.requests[1:]] == [p.read_bytes() for p in PHOTOS[:3]]


def test_gemini_non_string_field_is_an_error(fake, waits):
    fake.reply_text(json.dumps({**GOOD_FIELDS, "pose": ["standing"]}))
    with pytest.raises(GeminiError, match="'pose' must be a string"):
        caption(client_for(fake))


def test_gemini_identity_words_are_stripped(waits):
    leaky = {"framing": "close-up portrait of a young woman, shot from below",
             "pose": "smiling with blue eyes and a red scarf",
             "clothing": "wearing a black jacket, long blonde hair",
             "background": "old town square",
             "lighting": "soft daylight on her pale skin"}
    with FakeGemini(api_key="test-key", fields=leaky) as server:
        fields = caption(client_for(server))
    # A segment that offends from its start goes whole; otherwise its clean start stays.
    assert fields == CaptionFields(framing="close-up portrait, shot from below", pose="smiling",
                                   clothing="wearing a black jacket", background="old town square", lighting="soft daylight")
    for name in FIELD_NAMES:
        assert find_identity_terms(getattr(fields, name)) == []


def test_gemini_sends_png_and_converts_other_formats(fake, waits, tmp_path):
    png, bmp = tmp_path / "a.png", tmp_path / "b.bmp"
    Image.new("RGB", (16, 16), "red").save(png)
    Image.new("RGB", (16, 16), "blue").save(bmp)
    client = client_for(fake)
    caption(client, png)
    caption(client, bmp)
    assert [r.inline_images()[0][0] for r in fake.requests] == ["image/png", "image/png"]
    converted = base64.urlsafe_b64decode(fake.requests[1].inline_images()[0][1])
    assert converted.startswith(b"\x89PNG")


def test_gemini_without_a_key_is_disabled():
    client = GeminiClient()
    assert not client.enabled and client.name == "gemini:gemini-2.5-flash"
    with pytest.raises(GeminiError, match="GEMINI_API_KEY"):
        caption(client)


def test_definitions_pass_the_key_as_an_env_var(monkeypatch, tmp_path):
    from persona_pipeline.definitions import build_resources
    from persona_pipeline.settings import Settings

    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("GEMINI_API_KEY", "secret-key")
    monkeypatch.setenv("GEMINI_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PERSONA_GEMINI_MODEL", "gemini-x")
    resource = build_resources(Settings.from_env())["gemini"]
    assert [getattr(resource, name).env_var_name for name in ("api_key", "model", "base_url")] == [
        "GEMINI_API_KEY", "PERSONA_GEMINI_MODEL", "GEMINI_BASE_URL"]
    assert "secret-key" not in repr(resource)
    with dg.build_resources({"gemini": resource}) as built:  # what a run reads
        assert (built.gemini.api_key, built.gemini.model, built.gemini.base_url) == ("secret-key", "gemini-x", "http://127.0.0.1:9")

    monkeypatch.delenv("GEMINI_API_KEY")
    assert build_resources(Settings.from_env())["gemini"].api_key == ""


# --- Caption fields, composition, identity -------------------------------------------------------


def test_compose_training_caption_normalises_fields():
    fields = CaptionFields(framing="Close-up portrait.", pose="  smiling   at the camera ,, ", clothing="Wearing a yellow jacket",
                           background="city street.", lighting="soft daylight")
    assert compose_training_caption("m1ra", "woman", fields) == \
        "m1ra woman, close-up portrait, smiling at the camera, wearing a yellow jacket, city street, soft daylight"


def test_compose_training_caption_skips_empty_fields_and_keeps_acronyms():
    fields = CaptionFields(framing="half-body shot", pose="", clothing=" . ", background="NYC street", lighting="")
    assert compose_training_caption("m1ra", "woman", fields) == "m1ra woman, half-body shot, NYC street"
    assert compose_training_caption("m1ra", "", CaptionFields("", "", "", "", "")) == "m1ra"


def test_caption_fields_round_trip_and_errors_name_the_field():
    fields = CaptionFields(**GOOD_FIELDS)
    assert CaptionFields.from_dict({**fields.to_dict(), "extra": 1}) == fields
    with pytest.raises(CaptionFieldsError, match="'background' is missing"):
        CaptionFields.from_dict({k: v for k, v in GOOD_FIELDS.items() if k != "background"})
    with pytest.raises(CaptionFieldsError, match="'framing' must be a string"):
        CaptionFields.from_dict({**GOOD_FIELDS, "framing": None})
    with pytest.raises(CaptionFieldsError, match="JSON object"):
        CaptionFields.from_dict(["close-up"])


@pytest.mark.parametrize("text, expected", [
    ("blonde woman smiling, arms raised", "arms raised"),
    ("sitting on a bench, freckled cheeks, slim woman", "sitting on a bench"),
    ("walking, in her twenties, 25 years old", "walking"),
    ("asian woman, looking away", "looking away"),
    ("soft light on olive skin, backlit", "soft light, backlit"),
    ("round face, head tilted", "head tilted"),
    ("mira laughing, holding a cup", "holding a cup"),
    ("sitting on a bench with red hair", "sitting on a bench"),
    ("asian woman in a japanese garden", ""),
])
def test_strip_identity_removes_identity_segments(text, expected):
    assert strip_identity(text, names=["Mira"]) == expected


@pytest.mark.parametrize("text", [
    "eyes closed, hand on chin", "wearing a black jacket and a skin-tight dress", "old town square",
    "japanese garden", "wearing a short dress", "tall grass field", "close-up of the face, looking at the camera",
])
def test_strip_identity_keeps_photo_words(text):
    assert strip_identity(text) == text


# --- Offline open_clip captioner -----------------------------------------------------------------


@pytest.mark.slow
def test_clip_captioner_draws_every_field_from_the_vocabularies():
    captioner = ClipCaptioner(ClipModel(model_name="tiny"))
    paths = PHOTOS[:5]

    captions = captioner.caption_fields(paths)

    assert captioner.name == "clip:tiny"
    assert len(captions) == len(paths)
    for fields in captions:
        assert isinstance(fields, CaptionFields) and fields.clothing == ""
        for name, vocab in VOCABULARIES.items():
            assert getattr(fields, name) in vocab
        assert compose_training_caption("m1ra", "woman", fields).startswith("m1ra woman, ")
    assert captioner.caption_fields([]) == []


@pytest.mark.slow
def test_tiny_clip_has_the_same_weights_in_every_process():
    """Captions, dataset checks and checkpoint scores on the tiny model depend on it."""
    import subprocess
    import sys

    script = ("from persona_pipeline.resources.clip import ClipModel; "
              "print(ClipModel(model_name='tiny').embed_texts(['a photo of a person'])[0][:4].round(6).tolist())")
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
               for _ in range(2)}
    assert len(outputs) == 1 and outputs != {""}
