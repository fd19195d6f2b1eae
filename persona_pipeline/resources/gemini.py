"""Gemini captioner for training photos, through google-genai with the image attached.

The model answers in JSON that fills the persona's caption fields (a response schema with exactly
the five `CaptionFields` properties). The prompt tells it never to describe the identity, and
`strip_identity` removes whatever slips through. Retries are ours, not the SDK's: exponential
backoff with a little jitter on 429, 5xx and dropped connections, honouring the server's
Retry-After / RetryInfo; other statuses fail at once with a `GeminiError` naming the file.
"""

from __future__ import annotations

import io
import json
import random
import re
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import dagster as dg

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
    """A caption request that failed for good (after retries where retrying made sense)."""


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
    """Gemini captioner. `api_key` empty = disabled (the offline open_clip captioner is used)."""

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

    def _client(self):
        if not self.enabled:
            raise GeminiError("GEMINI_API_KEY is not set; use the offline open_clip captioner")
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
        response = self._generate_with_retries(client, contents, config, image_path)
        return self._parse(response, image_path)

    def _generate_with_retries(self, client, contents, config, image_path: Path):
        from google.genai import errors

        transient = _transport_errors()
        for attempt in range(self.max_retries + 1):
            try:
                return client.models.generate_content(model=self.model, contents=contents, config=config)
            except errors.APIError as exc:
                last = " ".join(str(p) for p in (f"HTTP {exc.code}", exc.status) if p) + f": {exc.message or exc}"
                if not (exc.code == 429 or (isinstance(exc.code, int) and 500 <= exc.code < 600)):
                    raise GeminiError(f"Gemini refused {image_path.name}: {last}") from exc
                wait = _retry_after_seconds(exc)
            except transient as exc:  # dropped connection, timeout: transient like a 503
                last, wait = f"{type(exc).__name__}: {exc}", None
            if attempt == self.max_retries:
                raise GeminiError(f"Gemini gave up on {image_path.name} after {attempt + 1} attempts; last error: {last}")
            if wait is None:
                wait = self.backoff_seconds * 2 ** attempt
                wait += random.uniform(0, 0.25 * wait)  # jitter, so parallel workers do not retry in step
            sleep(min(wait, MAX_DELAY_SECONDS))
        raise AssertionError("unreachable")

    def _parse(self, response: Any, image_path: Path) -> CaptionFields:
        try:
            text = response.text
        except ValueError:
            text = None
        if not text:
            candidates = getattr(response, "candidates", None) or []
            finish = getattr(candidates[0], "finish_reason", None) if candidates else None
            feedback = getattr(response, "prompt_feedback", None)
            raise GeminiError(f"Gemini returned no caption for {image_path.name} "
                              f"(finish reason {finish}, prompt feedback {feedback})")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GeminiError(f"Gemini returned malformed JSON for {image_path.name}: {exc}; text {text[:200]!r}") from None
        try:
            fields = CaptionFields.from_dict(data)
        except CaptionFieldsError as exc:
            raise GeminiError(f"Gemini's caption for {image_path.name} is invalid: {exc}") from None
        return fields.map(strip_identity)
