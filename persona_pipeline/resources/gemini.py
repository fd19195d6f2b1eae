"""Gemini through google-genai: the transport and retries of its four requests (captions for
training photos, content prompts for generation runs, post captions, cluster labels).

What is asked and how each answer is checked are pure and live in `domain.gemini_prompts` (the
instructions and response schemas) and `domain.gemini_answers` (parsing, with `GeminiError`s
naming the field at fault). This module sends them: images inline, structured JSON output on
v1beta, one SDK attempt per call. Retries are ours, not the SDK's: exponential backoff with a
little jitter on 429, 5xx and dropped connections, honouring the server's Retry-After /
RetryInfo; other statuses fail at once with a `GeminiError` naming the request. A caption outside
its length band is asked for once more in the same conversation.
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

from persona_pipeline.domain import gemini_prompts as prompts
from persona_pipeline.domain.captions import in_band, length_band, validate_post_text
from persona_pipeline.domain.content_prompts import ContentPrompt
from persona_pipeline.domain.gemini_answers import (Answer, GeminiError, parse_caption_fields, parse_cluster_label,
                                                    parse_content_prompts, parse_post_caption)
from persona_pipeline.domain.retry import backoff_wait, parse_retry_after
from persona_pipeline.domain.training_captions import CaptionFields

__all__ = ["GeminiClient", "GeminiError"]

# Indirection so tests can record the waits instead of sleeping through them.
sleep = time.sleep
_logger = logging.getLogger(__name__)

MAX_DELAY_SECONDS = 120.0
_MIME_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".heic": "image/heic", ".heif": "image/heif"}


def _json_config(schema: prompts.Schema, temperature: float):
    """Structured JSON output following `schema` (a domain schema dict, in the SDK's own form)."""
    from google.genai import types

    return types.GenerateContentConfig(response_mime_type="application/json",
                                       response_schema=types.Schema.model_validate(schema), temperature=temperature)


def _answer(response: Any) -> Answer:
    """The text of a response; the SDK raises ValueError on `.text` for some blocked answers."""
    try:
        text = response.text
    except ValueError:
        text = None
    if text:
        return Answer(text)
    candidates = getattr(response, "candidates", None) or []
    finish = getattr(candidates[0], "finish_reason", None) if candidates else None
    return Answer(text, f"finish reason {finish}, prompt feedback {getattr(response, 'prompt_feedback', None)}")


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

    @property
    def _who(self) -> str:
        """The model as errors and logs name it."""
        return f"Gemini ({self.model})"

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

        instruction = prompts.caption_instruction(trigger_word, class_word)
        contents = [types.Content(role="user", parts=[_image_part(image_path), types.Part.from_text(text=instruction)])]
        config = _json_config(prompts.caption_fields_schema(), temperature=0.2)
        response = self._generate_with_retries(client, contents, config, image_path.name)
        return parse_caption_fields(_answer(response), image_path.name)

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
                log.warning(f"{self._who} {what}: {last}; retry {attempt + 1} of {self.max_retries} in {wait:.1f} s")
            sleep(wait)
        raise AssertionError("unreachable")

    # --- content prompts for generation runs ---

    def content_prompts(self, *, persona_name: str, trigger: str, class_word: str,
                        guidelines_by_pillar: Mapping[str, str], allocation: Sequence[str],
                        avoid: Sequence[str] = (), log: Any = None,
                        themes: Sequence[str] | None = None) -> list[ContentPrompt]:
        """One prompt per allocation slot, in allocation order, from a single structured request.

        `guidelines_by_pillar` must cover every pillar of `allocation`; `avoid` lists recent themes
        or prompts not to repeat; `log` (e.g. `context.log`) hears of retries and repairs;
        `themes` (one per slot, the topic rotation's) asks for prompt i about theme i. The answer
        is checked by `parse_content_prompts`. Without a key this raises `GeminiError`; callers
        check `enabled` and use `template_prompts`.
        """
        from google.genai import types

        themes = prompts.check_content_prompt_request(trigger=trigger, class_word=class_word, allocation=allocation,
                                                      guidelines_by_pillar=guidelines_by_pillar, themes=themes)
        if not allocation:
            return []
        instruction = prompts.content_prompt_instruction(
            persona_name=persona_name, trigger=trigger, class_word=class_word,
            guidelines_by_pillar=guidelines_by_pillar, allocation=allocation, avoid=avoid, themes=themes)
        contents = [types.Content(role="user", parts=[types.Part.from_text(text=instruction)])]
        # Warmer than captions: these should be varied ideas, not one faithful description.
        config = _json_config(prompts.content_prompts_schema(allocation), temperature=0.9)
        with self._client("the template prompts (template_prompts)") as client:
            response = self._generate_with_retries(client, contents, config, "content prompts", log)
        return parse_content_prompts(_answer(response), who=self._who, source=self.name, trigger=trigger,
                                     class_word=class_word, allocation=allocation, themes=themes, log=log)

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
        instruction = prompts.post_caption_instruction(
            persona_name=persona_name, pillar=pillar, theme=theme, tone=tone, voice=voice, topics=topics,
            avoid_topics=avoid_topics, examples=examples, emoji=emoji, emoji_density=emoji_density, length=length,
            avoid_phrases=avoid_phrases, guidelines=guidelines)
        what, who = f"post caption for {image_path.name}", self._who
        config = _json_config(prompts.post_caption_schema(), temperature=0.8)
        contents = [types.Content(role="user", parts=[_image_part(image_path), types.Part.from_text(text=instruction)])]
        with self._client("the caption templates (template_caption)") as client:
            response = self._generate_with_retries(client, contents, config, what, log)
            caption = parse_post_caption(_answer(response), who, what)
            if not in_band(caption, length):
                if log is not None:
                    log.info(f"{who} {what}: {len(caption)} characters, outside the {length} band "
                             f"({low}-{high}); asking once more")
                contents = [*contents,
                            types.Content(role="model", parts=[types.Part.from_text(
                                text=json.dumps({"caption": caption}, ensure_ascii=False))]),
                            types.Content(role="user", parts=[types.Part.from_text(
                                text=prompts.caption_length_reask(len(caption), length))])]
                response = self._generate_with_retries(client, contents, config, what, log)
                caption = parse_post_caption(_answer(response), who, what)
        problems = validate_post_text(caption, [], max_hashtags)
        if problems:
            raise GeminiError(f"{who} {what} is unusable: {'; '.join(problems)}")
        if not in_band(caption, length):
            (log or _logger).warning(f"{who} {what}: kept a caption of {len(caption)} characters, outside the "
                                     f"{length} band ({low}-{high} characters), after one re-ask")
        return caption

    # --- cluster labels --------------------------------------------------------------------------

    def cluster_label(self, image_paths: Sequence[Path], terms: Sequence[str], log: Any = None) -> str:
        """A 1-4 word name (at most 40 characters) for a content-library cluster, from up to 4 of its
        images and its top caption terms (up to 12 sent). An empty, too long or too wordy name is a
        `GeminiError`; callers then name the cluster from its terms."""
        from google.genai import types

        paths = [Path(p) for p in image_paths][:prompts.MAX_LABEL_IMAGES]
        clean_terms = prompts.cluster_label_terms(terms)
        if not paths and not clean_terms:
            raise ValueError("cluster_label needs at least one image or term")
        parts = [_image_part(p) for p in paths]
        parts.append(types.Part.from_text(text=prompts.cluster_label_instruction(clean_terms, len(paths))))
        config = _json_config(prompts.cluster_label_schema(), temperature=0.2)
        with self._client("the cluster's top caption terms") as client:
            response = self._generate_with_retries(client, [types.Content(role="user", parts=parts)], config,
                                                   "cluster label", log)
        return parse_cluster_label(_answer(response), self._who)
