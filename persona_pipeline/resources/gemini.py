"""Gemini through google-genai: captions for training photos (image attached) and content prompts
for generation runs (text only).

Captions: the model answers in JSON that fills the persona's caption fields (a response schema with exactly
the five `CaptionFields` properties). The prompt tells it never to describe the identity, and
`strip_identity` removes whatever slips through. Retries are ours, not the SDK's: exponential
backoff with a little jitter on 429, 5xx and dropped connections, honouring the server's
Retry-After / RetryInfo; other statuses fail at once with a `GeminiError` naming the file.

Content prompts: one request for a whole run, answered as a JSON array (a response schema of
{pillar, prompt, negative_prompt, theme} items, exactly as many as the allocation has slots),
validated and put in allocation order by `content_prompts`. Same retries.

Post captions: one request with the image and the persona's caption settings, answered as
{"caption": str}. Hashtags the model writes anyway are stripped (ours are picked by
`domain.captions.select_hashtags`); a caption outside the length band is asked for once more with
its measured length, and the result must pass `validate_post_text`.

Cluster labels: a 1-4 word name for a content-library cluster from a few member images and the
cluster's top caption terms, answered as {"label": str}.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from persona_pipeline.domain.captions import MAX_MENTIONS, in_band, length_band, strip_hashtags, validate_post_text
from persona_pipeline.domain.content_prompts import DEFAULT_NEGATIVE_PROMPT, ContentPrompt, check_prompt, has_trigger
from persona_pipeline.domain.retry import backoff_wait, parse_retry_after
from persona_pipeline.domain.training_captions import FIELD_NAMES, CaptionFields, CaptionFieldsError, strip_identity

# Indirection so tests can record the waits instead of sleeping through them.
sleep = time.sleep
_logger = logging.getLogger(__name__)

MAX_DELAY_SECONDS = 120.0
_MIME_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".heic": "image/heic", ".heif": "image/heif"}
_FIELD_HELP = {
    "framing": "shot type and camera angle, e.g. 'close-up portrait', 'full-body shot from below'",
    "pose": "pose, action and expression, e.g. 'sitting on a bench, smiling at the camera'",
    "clothing": "visible clothing and accessories, starting with 'wearing', e.g. 'wearing a yellow jacket and jeans'",
    "background": "setting and background, e.g. 'city street', 'beach at sunset'",
    "lighting": "light quality and source, e.g. 'soft daylight', 'neon light at night'",
}


class GeminiError(RuntimeError):
    """A request that failed for good (after retries where retrying made sense), or an answer
    that could not be used."""


def caption_instruction(trigger_word: str, class_word: str) -> str:
    """The instruction sent with each photo."""
    fields = "\n".join(f"- {name}: {_FIELD_HELP[name]}" for name in FIELD_NAMES)
    return (
        f"This photo is part of a LoRA training set for the character '{trigger_word}' ({class_word}). "
        "Write the caption fields for it as short lowercase phrases without a trailing period:\n"
        f"{fields}\n"
        "Describe only what varies from photo to photo: framing, pose/action, clothing, background, lighting. "
        "Never describe the person's identity: no face or face shape, eye colour, hair colour or style, "
        "skin tone, ethnicity, age, body type or build, and no names or resemblance to anyone. "
        "Those belong to the trigger word. Use an empty string for a field you cannot see."
    )


def _response_schema():
    from google.genai import types

    return types.Schema(
        type=types.Type.OBJECT,
        properties={name: types.Schema(type=types.Type.STRING, description=_FIELD_HELP[name]) for name in FIELD_NAMES},
        required=list(FIELD_NAMES),
        property_ordering=list(FIELD_NAMES),
    )


CONTENT_PROMPT_FIELDS: tuple[str, ...] = ("pillar", "prompt", "negative_prompt", "theme")
MAX_AVOID_ITEMS = 50  # the avoid list is cut to its first 50 entries of 200 characters at most
_CONTENT_FIELD_HELP = {
    "pillar": "the content pillar of this slot, exactly as named",
    "prompt": "the text-to-image prompt, starting with the given prefix",
    "negative_prompt": "a short comma-separated list of defects to avoid",
    "theme": "a 2-5 word label of the prompt's idea",
}


def content_prompt_instruction(*, persona_name: str, trigger: str, class_word: str,
                               guidelines_by_pillar: Mapping[str, str], allocation: Sequence[str],
                               avoid: Sequence[str] = (), themes: Sequence[str] | None = None) -> str:
    """The text-only request for a run's prompts: the pillars with their guidelines, the recent
    themes to avoid, and one numbered slot per prompt (pillar names JSON-quoted). With `themes`
    (one per slot, from the topic rotation) each slot line also names its theme, JSON-quoted:
    `1. "travel", theme "rooftop bar"`."""
    prefix = f"photo of {trigger} {class_word}, "
    pillars = list(dict.fromkeys(allocation))
    lines = [
        f"Write {len(allocation)} text-to-image prompts for new photos of {persona_name}, a persona whose likeness "
        f"is a LoRA bound to the trigger word '{trigger}' ({class_word}).",
        f'Start every prompt with exactly "{prefix}" and then describe the scene: setting and background, '
        "clothing, pose and action, framing and camera angle, light. Comma-separated phrases, at most 60 words.",
        "Never describe the identity: no face or face shape, eye colour, hair colour or style, skin tone, "
        "ethnicity, age, body type or build, and no names or resemblance to anyone. The trigger word carries all of that.",
        "Content pillars and their guidelines:",
        *(f"- {json.dumps(p, ensure_ascii=False)}: {' '.join(guidelines_by_pillar[p].split()) or '(no guidelines)'}"
          for p in pillars),
        "Every prompt is a different idea; within one pillar vary the setting, outfit, pose and light.",
    ]
    recent = [" ".join(str(a).split())[:200] for a in avoid if str(a).strip()][:MAX_AVOID_ITEMS]
    if themes is not None:
        # The rotation chose the themes; a theme comes back once the others had their turn, so
        # the model is asked for a fresh take on it rather than told to avoid it.
        lines.append("Each slot names the theme its prompt must be about; set the item's theme to exactly that theme. "
                     "A theme may have been used before: find a new take on it.")
        if recent:
            lines.append("Do not repeat these recent prompts:")
            lines.extend(f"- {a}" for a in recent)
    elif recent:
        lines.append("Avoid these themes and ideas, used recently:")
        lines.extend(f"- {a}" for a in recent)
    lines.append("Each item has: " + "; ".join(f"{k}: {v}" for k, v in _CONTENT_FIELD_HELP.items()) + ".")
    lines.append(f"Answer with a JSON array of exactly {len(allocation)} items, one per slot, in this order:")
    for i, p in enumerate(allocation, 1):
        slot = f"{i}. {json.dumps(p, ensure_ascii=False)}"
        lines.append(slot if themes is None else f"{slot}, theme {json.dumps(themes[i - 1], ensure_ascii=False)}")
    return "\n".join(lines)


def _match_slots(allocation: Sequence[str], queues: Mapping[str, list[tuple[int, dict[str, str]]]],
                 themes: Sequence[str] | None) -> list[tuple[int, dict[str, str]]]:
    """The answer item of each slot: per pillar, items in answer order; with `themes`, an item
    that echoes a slot's theme (case and spaces ignored) goes to that slot first, so a model that
    reorders a pillar's items still has each prompt land on the theme it is about."""
    slots_of: dict[str, list[int]] = {}
    for slot, pillar in enumerate(allocation):
        slots_of.setdefault(pillar, []).append(slot)
    chosen: dict[int, tuple[int, dict[str, str]]] = {}
    for pillar, slots in slots_of.items():
        items = list(queues[pillar])
        if themes is not None:
            for slot in slots:
                wanted = " ".join(themes[slot].split()).casefold()
                match = next((item for item in items if " ".join(item[1]["theme"].split()).casefold() == wanted), None)
                if match is not None:
                    chosen[slot] = match
                    items.remove(match)
        for slot in slots:
            if slot not in chosen:
                chosen[slot] = items.pop(0)
    return [chosen[slot] for slot in range(len(allocation))]


def _content_prompts_schema(allocation: Sequence[str]):
    from google.genai import types

    pillars = list(dict.fromkeys(allocation))
    text = {name: types.Schema(type=types.Type.STRING, description=_CONTENT_FIELD_HELP[name])
            for name in CONTENT_PROMPT_FIELDS}
    text["pillar"] = types.Schema(type=types.Type.STRING, format="enum", enum=pillars,
                                  description=_CONTENT_FIELD_HELP["pillar"])
    item = types.Schema(type=types.Type.OBJECT, properties=text, required=list(CONTENT_PROMPT_FIELDS),
                        property_ordering=list(CONTENT_PROMPT_FIELDS))
    return types.Schema(type=types.Type.ARRAY, items=item, min_items=len(allocation), max_items=len(allocation))


MAX_CAPTION_EXAMPLES = 5  # example captions sent, each cut to 600 characters
_TONE_HELP = {
    "casual": "relaxed and conversational, like talking to a friend",
    "professional": "polished, clear and informative",
    "playful": "light, witty and fun",
    "inspirational": "uplifting and encouraging, without clichés",
    "edgy": "bold and direct, never offensive",
}
_EMOJI_HELP = {
    "none": "Use no emoji.",
    "low": "Use one or two emoji at most.",
    "medium": "Use a few emoji, about three to five.",
    "high": "Use emoji generously, six or more, woven through the text.",
}


def _one_line(text: Any, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def post_caption_instruction(*, persona_name: str, pillar: str, theme: str, tone: str, voice: Sequence[str],
                             topics: Sequence[str], avoid_topics: Sequence[str], examples: Sequence[str],
                             emoji: bool, emoji_density: str, length: str, avoid_phrases: Sequence[str],
                             guidelines: str = "") -> str:
    """The instruction sent with a post's image: every caption setting of persona.yaml, the band,
    the recent phrases to avoid, and the rules on hashtags and mentions."""
    low, high = length_band(length)
    lines = [f"Write the Instagram caption for this photo, posted by {persona_name}, in the first person "
             "as them, about what the photo shows."]
    lines.append(f"Content pillar: {json.dumps(pillar, ensure_ascii=False)}"
                 + (f"; its guidelines: {_one_line(guidelines, 600)}" if guidelines.strip() else ""))
    if theme.strip():
        lines.append(f"Theme of this post: {_one_line(theme)}")
    lines.append(f"Tone: {tone} ({_TONE_HELP.get(tone, tone)}).")
    if voice:
        lines.append("Voice: " + ", ".join(_one_line(v) for v in voice) + ".")
    if topics:
        lines.append("Topics the persona talks about: " + ", ".join(_one_line(t) for t in topics) + ".")
    if avoid_topics:
        lines.append("Never mention or allude to: " + ", ".join(_one_line(t) for t in avoid_topics) + ".")
    shown = [_one_line(e, 600) for e in examples if str(e).strip()][:MAX_CAPTION_EXAMPLES]
    if shown:
        lines.append("Example captions in the persona's voice (match the voice; do not copy them):")
        lines.extend(f"- {e}" for e in shown)
    lines.append(_EMOJI_HELP.get(emoji_density, _EMOJI_HELP["low"]) if emoji else _EMOJI_HELP["none"])
    lines.append(f"Length: between {low} and {high} characters ({length}), counting spaces and line breaks.")
    phrases = [_one_line(p) for p in avoid_phrases if str(p).strip()][:MAX_AVOID_ITEMS]
    if phrases:
        lines.append("These phrases were repeated in recent captions; do not use them:")
        lines.extend(f"- {p}" for p in phrases)
    lines.append("No hashtags in the caption: they are added separately.")
    lines.append(f"Do not @mention accounts unless the guidelines name them, and never more than {MAX_MENTIONS}.")
    lines.append('Answer with JSON: {"caption": "<the caption>"}.')
    return "\n".join(lines)


def caption_length_reask(measured: int, length: str) -> str:
    """The follow-up when a caption missed its band: the measured length and the band."""
    low, high = length_band(length)
    return (f"That caption is {measured} characters long; it must be between {low} and {high} characters "
            f"({length}). Rewrite it to fit, keeping the voice and every rule above.")


def _post_caption_schema():
    from google.genai import types

    return types.Schema(type=types.Type.OBJECT,
                        properties={"caption": types.Schema(type=types.Type.STRING, description="the post caption")},
                        required=["caption"])


MAX_LABEL_IMAGES = 4
MAX_LABEL_TERMS = 12
MAX_LABEL_CHARS = 40
MAX_LABEL_WORDS = 4


def cluster_label_instruction(terms: Sequence[str], images: int) -> str:
    lines = [f"The {images} photo(s) above belong to one cluster of similar images in a persona's content library."
             if images else "These terms describe one cluster of similar images in a persona's content library."]
    if terms:
        lines.append("The most frequent terms in the cluster's captions: " + ", ".join(terms) + ".")
    lines.append(f"Name the cluster in 1 to {MAX_LABEL_WORDS} words (at most {MAX_LABEL_CHARS} characters) that "
                 "say what its images have in common: setting, activity or style, e.g. 'Beach Sunsets', "
                 "'Cafe Mornings'. Never describe the person's identity.")
    lines.append('Answer with JSON: {"label": "<the name>"}.')
    return "\n".join(lines)


def _cluster_label_schema():
    from google.genai import types

    return types.Schema(type=types.Type.OBJECT,
                        properties={"label": types.Schema(type=types.Type.STRING, description="the cluster's name")},
                        required=["label"])


def _string_field(response: Any, name: str, who: str, what: str) -> str:
    """Field `name` of a one-field JSON object answer; anything else is a GeminiError."""
    data, text = _json_answer(response, who, what)
    value = data.get(name) if isinstance(data, dict) else None
    if not isinstance(value, str):
        raise GeminiError(f"{who} returned no string {name!r} for {what}; text {text[:200]!r}")
    return value


def _response_text(response: Any) -> str | None:
    try:
        return response.text
    except ValueError:
        return None


def _no_answer_reason(response: Any) -> str:
    candidates = getattr(response, "candidates", None) or []
    finish = getattr(candidates[0], "finish_reason", None) if candidates else None
    return f"finish reason {finish}, prompt feedback {getattr(response, 'prompt_feedback', None)}"


def _json_answer(response: Any, who: str, what: str) -> tuple[Any, str]:
    """The JSON of a structured answer (and its text); a missing or malformed one is a GeminiError
    naming the model and what was asked for."""
    text = _response_text(response)
    if not text:
        raise GeminiError(f"{who} returned no {what} ({_no_answer_reason(response)})")
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise GeminiError(f"{who} returned malformed JSON for {what}: {exc}; text {text[:200]!r}") from None


def _image_part(image_path: Path):
    """Inline image bytes with their mime type; formats Gemini does not take are sent as PNG."""
    from google.genai import types

    mime = _MIME_TYPES.get(image_path.suffix.lower())
    if mime:
        return types.Part.from_bytes(data=image_path.read_bytes(), mime_type=mime)
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(image_path) as image:
        image.convert("RGB").save(buffer, format="PNG")
    return types.Part.from_bytes(data=buffer.getvalue(), mime_type="image/png")


def _retry_after_seconds(error: Exception) -> float | None:
    """The wait the server asked for: a Retry-After header (seconds) or a google.rpc.RetryInfo."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    wait = parse_retry_after(headers.get("retry-after") if hasattr(headers, "get") else None)
    if wait is not None:
        return wait
    details = getattr(error, "details", None)
    error_body = details.get("error", details) if isinstance(details, dict) else {}
    for item in (error_body.get("details") or []) if isinstance(error_body, dict) else []:
        delay = item.get("retryDelay") if isinstance(item, dict) else None
        match = re.fullmatch(r"\s*([\d.]+)s\s*", str(delay or ""))
        if match:
            return float(match.group(1))
    return None


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection-level errors of the HTTP stack google-genai runs on (httpx, or its fork httpx2,
    whichever is installed; requests for the google-auth path)."""
    import importlib

    found: list[type[Exception]] = []
    for module, attr in (("httpx", "TransportError"), ("httpx2", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


class GeminiClient(dg.ConfigurableResource):
    """Gemini captioner, content-prompt writer, post-caption writer and cluster namer. `api_key`
    empty = disabled: the offline open_clip captioner, the template prompts, the caption templates
    and the top caption terms are used instead."""

    api_key: str = ""
    model: str = "gemini-2.5-flash"
    base_url: str = ""
    max_retries: int = 4
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60

    @property
    def enabled(self) -> bool:
        return bool(self.api_key.strip())

    @property
    def name(self) -> str:
        return f"gemini:{self.model}"

    def _client(self, fallback: str = "the offline open_clip captioner"):
        if not self.enabled:
            raise GeminiError(f"GEMINI_API_KEY is not set; use {fallback}")
        from google import genai
        from google.genai import types

        options = types.HttpOptions(
            base_url=self.base_url or None,
            # Structured output (responseSchema) is documented on v1beta; google-genai 3.x
            # defaults to v1, so pin the version the request format was checked against.
            api_version="v1beta",
            timeout=int(self.timeout_seconds * 1000),
            # One attempt per call inside the SDK: retries are ours, counted and tested here.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        return genai.Client(api_key=self.api_key, http_options=options)

    def caption_training_photo(self, image_path: Path, *, trigger_word: str, class_word: str) -> CaptionFields:
        """The caption fields of one training photo, identity phrases removed."""
        with self._client() as client:
            return self._caption(client, Path(image_path), trigger_word, class_word)

    def caption_fields(self, paths: list[Path], *, trigger_word: str, class_word: str) -> list[CaptionFields]:
        """One `CaptionFields` per photo, in order (one request each, over one HTTP client)."""
        with self._client() as client:
            return [self._caption(client, Path(p), trigger_word, class_word) for p in paths]

    def _caption(self, client, image_path: Path, trigger_word: str, class_word: str) -> CaptionFields:
        from google.genai import types

        contents = [types.Content(role="user", parts=[_image_part(image_path),
                                                      types.Part.from_text(text=caption_instruction(trigger_word, class_word))])]
        config = types.GenerateContentConfig(response_mime_type="application/json", response_schema=_response_schema(),
                                             temperature=0.2)
        response = self._generate_with_retries(client, contents, config, image_path.name)
        return self._parse(response, image_path)

    def _generate_with_retries(self, client, contents, config, what: str, log: Any = None):
        """One generate_content call, retried on 429, 5xx and dropped connections; `what` names the
        request in errors ("photo.jpg", "content prompts"), `log` (anything with .warning) hears of
        each retry."""
        from google.genai import errors

        transient = _transport_errors()
        for attempt in range(self.max_retries + 1):
            try:
                return client.models.generate_content(model=self.model, contents=contents, config=config)
            except errors.APIError as exc:
                last = " ".join(str(p) for p in (f"HTTP {exc.code}", exc.status) if p) + f": {exc.message or exc}"
                if not (exc.code == 429 or (isinstance(exc.code, int) and 500 <= exc.code < 600)):
                    raise GeminiError(f"Gemini refused {what}: {last}") from exc
                wait = _retry_after_seconds(exc)
            except transient as exc:  # dropped connection, timeout: transient like a 503
                last, wait = f"{type(exc).__name__}: {exc}", None
            if attempt == self.max_retries:
                raise GeminiError(f"Gemini gave up on {what} after {attempt + 1} attempts; last error: {last}")
            if wait is None:
                wait = backoff_wait(self.backoff_seconds, attempt, MAX_DELAY_SECONDS)
            wait = min(wait, MAX_DELAY_SECONDS)
            if log is not None:
                log.warning(f"Gemini ({self.model}) {what}: {last}; retry {attempt + 1} of {self.max_retries} in {wait:.1f} s")
            sleep(wait)
        raise AssertionError("unreachable")

    def _parse(self, response: Any, image_path: Path) -> CaptionFields:
        data, text = _json_answer(response, "Gemini", f"caption for {image_path.name}")
        try:
            fields = CaptionFields.from_dict(data)
        except CaptionFieldsError as exc:
            raise GeminiError(f"Gemini's caption for {image_path.name} is invalid: {exc}") from None
        return fields.map(strip_identity)

    # --- content prompts for generation runs ---

    def content_prompts(self, *, persona_name: str, trigger: str, class_word: str,
                        guidelines_by_pillar: Mapping[str, str], allocation: Sequence[str],
                        avoid: Sequence[str] = (), log: Any = None,
                        themes: Sequence[str] | None = None) -> list[ContentPrompt]:
        """One prompt per allocation slot, in allocation order, from a single structured request.

        `guidelines_by_pillar` must cover every pillar of `allocation`; `avoid` lists recent themes
        or prompts not to repeat; `log` (e.g. `context.log`) hears of retries and repairs;
        `themes` (one per slot, the topic rotation's) asks for prompt i about theme i. The answer
        is validated: items are matched to the slots by pillar (case and spaces ignored) and,
        with themes, within a pillar by the theme they echo first and their order after that;
        surplus items are dropped, too few for a pillar or an unknown pillar is a `GeminiError`. A
        prompt without the trigger word gets "photo of <trigger> <class_word>, " in front. With
        themes, each prompt's theme is its slot's whatever the model wrote, so the rotation's record
        stays true. Without a key this raises `GeminiError`; callers check `enabled` and use
        `template_prompts`.
        """
        from google.genai import types

        if not trigger.strip() or not class_word.strip():
            raise ValueError(f"trigger word {trigger!r} and class word {class_word!r} must not be empty")
        missing = [p for p in dict.fromkeys(allocation) if p not in guidelines_by_pillar]
        if missing:
            raise ValueError(f"no guidelines given for pillar(s) {missing}; known: {sorted(guidelines_by_pillar)}")
        if themes is not None:
            themes = [" ".join(str(t).split()) for t in themes]
            if len(themes) != len(allocation) or not all(themes):
                raise ValueError(f"themes must give one non-empty theme per slot: {len(themes)} theme(s) "
                                 f"{themes} for {len(allocation)} slot(s)")
        if not allocation:
            return []
        instruction = content_prompt_instruction(persona_name=persona_name, trigger=trigger, class_word=class_word,
                                                 guidelines_by_pillar=guidelines_by_pillar, allocation=allocation,
                                                 avoid=avoid, themes=themes)
        contents = [types.Content(role="user", parts=[types.Part.from_text(text=instruction)])]
        # Warmer than captions: these should be varied ideas, not one faithful description.
        config = types.GenerateContentConfig(response_mime_type="application/json",
                                             response_schema=_content_prompts_schema(allocation), temperature=0.9)
        with self._client("the template prompts (template_prompts)") as client:
            response = self._generate_with_retries(client, contents, config, "content prompts", log)
        return self._parse_content_prompts(response, trigger=trigger, class_word=class_word,
                                           allocation=allocation, log=log, themes=themes)

    def _parse_content_prompts(self, response: Any, *, trigger: str, class_word: str, allocation: Sequence[str],
                               log: Any = None, themes: Sequence[str] | None = None) -> list[ContentPrompt]:
        who = f"Gemini ({self.model})"
        data, text = _json_answer(response, who, "content prompts")
        if not isinstance(data, list):
            raise GeminiError(f"{who} returned a JSON {type(data).__name__} for content prompts, "
                              f"expected an array of {len(allocation)} items; text {text[:200]!r}")
        canonical = {" ".join(p.split()).casefold(): p for p in allocation}
        queues: dict[str, list[tuple[int, dict[str, str]]]] = {p: [] for p in canonical.values()}
        for index, item in enumerate(data):
            fields = self._content_item(item, index)
            pillar = canonical.get(" ".join(fields["pillar"].split()).casefold())
            if pillar is None:
                raise GeminiError(f"{who} content prompt {index} is for pillar {fields['pillar']!r}, "
                                  f"which was not asked for (asked: {sorted(queues)})")
            queues[pillar].append((index, fields))
        wanted = {p: allocation.count(p) for p in queues}
        short = [f"{wanted[p]} for {p!r}, got {len(q)}" for p, q in queues.items() if len(q) < wanted[p]]
        if short:
            raise GeminiError(f"{who} returned too few content prompts: asked {'; '.join(short)} "
                              f"({len(data)} items for {len(allocation)} slots)")
        surplus = sum(len(q) - wanted[p] for p, q in queues.items())
        if surplus and log is not None:
            log.warning(f"{who} returned {len(data)} content prompts for {len(allocation)} slots; dropped {surplus} extra")
        out: list[ContentPrompt] = []
        for slot, (pillar, (index, fields)) in enumerate(zip(allocation, _match_slots(allocation, queues, themes))):
            prompt = " ".join(fields["prompt"].split())
            if not prompt:
                raise GeminiError(f"{who} content prompt {index} (pillar {pillar!r}) is empty")
            if not has_trigger(prompt, trigger):
                # A forgotten prefix is easy to repair and not worth a failed run.
                if log is not None:
                    log.info(f"{who} content prompt {index} (pillar {pillar!r}) lacked the trigger word {trigger!r}; prefixed it")
                prompt = f"photo of {trigger.strip()} {class_word.strip()}, {prompt}"
            try:
                prompt = check_prompt(prompt, trigger)
            except ValueError as exc:
                raise GeminiError(f"{who} content prompt {index} (pillar {pillar!r}) is unusable: {exc}") from None
            negative = " ".join(fields["negative_prompt"].split()) or DEFAULT_NEGATIVE_PROMPT
            if len(negative) > 1000:
                raise GeminiError(f"{who} content prompt {index} (pillar {pillar!r}) has a negative prompt of "
                                  f"{len(negative)} characters, more than 1000")
            theme = themes[slot] if themes is not None else (" ".join(fields["theme"].split()) or pillar)
            out.append(ContentPrompt(pillar, prompt, negative, theme, self.name))
        return out

    def _content_item(self, item: Any, index: int) -> dict[str, str]:
        """The four fields of answer item `index`; pillar and prompt are required, the other two
        default to empty (then the default negative prompt and the pillar name)."""
        who = f"Gemini ({self.model})"
        if not isinstance(item, dict):
            raise GeminiError(f"{who} content prompt {index} is a JSON {type(item).__name__}, expected an object "
                              f"with {', '.join(CONTENT_PROMPT_FIELDS)}")
        fields = {}
        for name in CONTENT_PROMPT_FIELDS:
            value = item.get(name, "" if name in ("negative_prompt", "theme") else None)
            if value is None:
                raise GeminiError(f"{who} content prompt {index} lacks the field {name!r}")
            if not isinstance(value, str):
                raise GeminiError(f"{who} content prompt {index}: field {name!r} must be a string, got {type(value).__name__}")
            fields[name] = value
        return fields

    # --- post captions -------------------------------------------------------------------------

    def post_caption(self, image_path: Path, *, persona_name: str, pillar: str, theme: str, tone: str,
                     voice: Sequence[str], topics: Sequence[str], avoid_topics: Sequence[str],
                     examples: Sequence[str], emoji: bool, emoji_density: str, length: str,
                     avoid_phrases: Sequence[str], max_hashtags: int, guidelines: str = "", log: Any = None) -> str:
        """The caption of a post (without hashtags) written for its image.

        One structured request with the image and every caption setting; hashtags in the answer are
        removed. A caption outside the `length` band (LENGTH_BANDS) is asked for once more, in the
        same conversation, with its measured length; if it still misses the band it is kept (with a
        warning naming the band) as long as it passes `validate_post_text`. An empty answer, or a
        final caption over 2,200 characters or 20 mentions, is a `GeminiError`. Without a key this
        raises `GeminiError`; callers check `enabled` and use `template_caption`.
        """
        from google.genai import types

        image_path = Path(image_path)
        low, high = length_band(length)
        instruction = post_caption_instruction(
            persona_name=persona_name, pillar=pillar, theme=theme, tone=tone, voice=voice, topics=topics,
            avoid_topics=avoid_topics, examples=examples, emoji=emoji, emoji_density=emoji_density, length=length,
            avoid_phrases=avoid_phrases, guidelines=guidelines)
        what = f"post caption for {image_path.name}"
        who = f"Gemini ({self.model})"
        config = types.GenerateContentConfig(response_mime_type="application/json",
                                             response_schema=_post_caption_schema(), temperature=0.8)
        contents = [types.Content(role="user", parts=[_image_part(image_path), types.Part.from_text(text=instruction)])]
        with self._client("the caption templates (template_caption)") as client:
            caption = self._post_caption_answer(self._generate_with_retries(client, contents, config, what, log), who, what)
            if not in_band(caption, length):
                if log is not None:
                    log.info(f"{who} {what}: {len(caption)} characters, outside the {length} band "
                             f"({low}-{high}); asking once more")
                contents = [*contents,
                            types.Content(role="model", parts=[types.Part.from_text(
                                text=json.dumps({"caption": caption}, ensure_ascii=False))]),
                            types.Content(role="user", parts=[types.Part.from_text(
                                text=caption_length_reask(len(caption), length))])]
                caption = self._post_caption_answer(self._generate_with_retries(client, contents, config, what, log),
                                                    who, what)
        problems = validate_post_text(caption, [], max_hashtags)
        if problems:
            raise GeminiError(f"{who} {what} is unusable: {'; '.join(problems)}")
        if not in_band(caption, length):
            (log or _logger).warning(f"{who} {what}: kept a caption of {len(caption)} characters, outside the "
                                     f"{length} band ({low}-{high} characters), after one re-ask")
        return caption

    @staticmethod
    def _post_caption_answer(response: Any, who: str, what: str) -> str:
        caption = strip_hashtags(_string_field(response, "caption", who, what))
        if not caption:
            raise GeminiError(f"{who} returned an empty {what}")
        return caption

    # --- cluster labels --------------------------------------------------------------------------

    def cluster_label(self, image_paths: Sequence[Path], terms: Sequence[str], log: Any = None) -> str:
        """A 1-4 word name (at most 40 characters) for a content-library cluster, from up to 4 of its
        images and its top caption terms (up to 12 sent). An empty, too long or too wordy name is a
        `GeminiError`; callers then name the cluster from its terms."""
        from google.genai import types

        paths = [Path(p) for p in image_paths][:MAX_LABEL_IMAGES]
        clean_terms = [t for t in (_one_line(t, 60) for t in terms) if t][:MAX_LABEL_TERMS]
        if not paths and not clean_terms:
            raise ValueError("cluster_label needs at least one image or term")
        parts = [_image_part(p) for p in paths]
        parts.append(types.Part.from_text(text=cluster_label_instruction(clean_terms, len(paths))))
        config = types.GenerateContentConfig(response_mime_type="application/json",
                                             response_schema=_cluster_label_schema(), temperature=0.2)
        who, what = f"Gemini ({self.model})", "cluster label"
        with self._client("the cluster's top caption terms") as client:
            response = self._generate_with_retries(client, [types.Content(role="user", parts=parts)], config, what, log)
        label = " ".join(_string_field(response, "label", who, what).split()).strip(" .,;:!\"'`")
        if not label:
            raise GeminiError(f"{who} returned an empty {what}")
        if len(label) > MAX_LABEL_CHARS or len(label.split()) > MAX_LABEL_WORDS:
            raise GeminiError(f"{who} {what} {label!r} is longer than {MAX_LABEL_WORDS} words or "
                              f"{MAX_LABEL_CHARS} characters")
        return label
