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
"""

from __future__ import annotations

import io
import json
import random
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import dagster as dg

from persona_pipeline.domain.content_prompts import DEFAULT_NEGATIVE_PROMPT, ContentPrompt, check_prompt, has_trigger
from persona_pipeline.domain.training_captions import FIELD_NAMES, CaptionFields, CaptionFieldsError, strip_identity

# Indirection so tests can record the waits instead of sleeping through them.
sleep = time.sleep

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
                               avoid: Sequence[str] = ()) -> str:
    """The text-only request for a run's prompts: the pillars with their guidelines, the recent
    themes to avoid, and one numbered slot per prompt (pillar names JSON-quoted)."""
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
    if recent:
        lines.append("Avoid these themes and ideas, used recently:")
        lines.extend(f"- {a}" for a in recent)
    lines.append("Each item has: " + "; ".join(f"{k}: {v}" for k, v in _CONTENT_FIELD_HELP.items()) + ".")
    lines.append(f"Answer with a JSON array of exactly {len(allocation)} items, one per slot, in this order:")
    lines.extend(f"{i}. {json.dumps(p, ensure_ascii=False)}" for i, p in enumerate(allocation, 1))
    return "\n".join(lines)


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
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:  # the other form RFC 9110 allows: an HTTP date
                return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
            except (TypeError, ValueError):
                pass  # unparseable: our own backoff decides
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
    """Gemini captioner and content-prompt writer. `api_key` empty = disabled: the offline
    open_clip captioner and the template prompts are used instead."""

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
                wait = self.backoff_seconds * 2 ** attempt
                wait += random.uniform(0, 0.25 * wait)  # jitter, so parallel workers do not retry in step
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
                        avoid: Sequence[str] = (), log: Any = None) -> list[ContentPrompt]:
        """One prompt per allocation slot, in allocation order, from a single structured request.

        `guidelines_by_pillar` must cover every pillar of `allocation`; `avoid` lists recent themes
        or prompts not to repeat; `log` (e.g. `context.log`) hears of retries and repairs. The
        answer is validated: items are matched to the slots by pillar (case and spaces ignored),
        surplus items are dropped, too few for a pillar or an unknown pillar is a `GeminiError`. A
        prompt without the trigger word gets "photo of <trigger> <class_word>, " in front. Without
        a key this raises `GeminiError`; callers check `enabled` and use `template_prompts`.
        """
        from google.genai import types

        if not trigger.strip() or not class_word.strip():
            raise ValueError(f"trigger word {trigger!r} and class word {class_word!r} must not be empty")
        missing = [p for p in dict.fromkeys(allocation) if p not in guidelines_by_pillar]
        if missing:
            raise ValueError(f"no guidelines given for pillar(s) {missing}; known: {sorted(guidelines_by_pillar)}")
        if not allocation:
            return []
        instruction = content_prompt_instruction(persona_name=persona_name, trigger=trigger, class_word=class_word,
                                                 guidelines_by_pillar=guidelines_by_pillar, allocation=allocation,
                                                 avoid=avoid)
        contents = [types.Content(role="user", parts=[types.Part.from_text(text=instruction)])]
        # Warmer than captions: these should be varied ideas, not one faithful description.
        config = types.GenerateContentConfig(response_mime_type="application/json",
                                             response_schema=_content_prompts_schema(allocation), temperature=0.9)
        with self._client("the template prompts (template_prompts)") as client:
            response = self._generate_with_retries(client, contents, config, "content prompts", log)
        return self._parse_content_prompts(response, trigger=trigger, class_word=class_word,
                                           allocation=allocation, log=log)

    def _parse_content_prompts(self, response: Any, *, trigger: str, class_word: str, allocation: Sequence[str],
                               log: Any = None) -> list[ContentPrompt]:
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
        taken = {p: 0 for p in queues}
        for pillar in allocation:
            index, fields = queues[pillar][taken[pillar]]
            taken[pillar] += 1
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
            theme = " ".join(fields["theme"].split()) or pillar
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
