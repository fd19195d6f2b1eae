"""What we accept from Gemini: parsing and checking the answers to the requests of
`domain.gemini_prompts`.

Pure: each parser takes the answer's text (`Answer`, which the resource reads off the SDK's
response) and returns the value the pipeline uses, or raises `GeminiError` naming the model, what
was asked for and the field at fault. Repairs that are not worth a failed run are made here too:
identity phrases are stripped from training captions, a content prompt that forgot the trigger
word gets the prefix, hashtags are stripped from post captions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persona_pipeline.domain.captions import strip_hashtags
from persona_pipeline.domain.content_prompts import DEFAULT_NEGATIVE_PROMPT, ContentPrompt, check_prompt, has_trigger
from persona_pipeline.domain.gemini_prompts import CONTENT_PROMPT_FIELDS, MAX_LABEL_CHARS, MAX_LABEL_WORDS
from persona_pipeline.domain.training_captions import CaptionFields, CaptionFieldsError, strip_identity

MAX_NEGATIVE_PROMPT_CHARS = 1000


class GeminiError(RuntimeError):
    """A request that failed for good (after retries where retrying made sense), or an answer
    that could not be used."""


@dataclass(frozen=True)
class Answer:
    """A model's answer: its text, None or empty when there is none; then `why_empty` says why
    (the finish reason and prompt feedback)."""

    text: str | None
    why_empty: str = ""


def json_answer(answer: Answer, who: str, what: str) -> tuple[Any, str]:
    """The JSON of a structured answer and its text; a missing or malformed one is a GeminiError
    naming the model (`who`) and what was asked for."""
    text = answer.text
    if not text:
        raise GeminiError(f"{who} returned no {what} ({answer.why_empty})")
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise GeminiError(f"{who} returned malformed JSON for {what}: {exc}; text {text[:200]!r}") from None


def string_field(answer: Answer, name: str, who: str, what: str) -> str:
    """Field `name` of a one-field JSON object answer; anything else is a GeminiError."""
    data, text = json_answer(answer, who, what)
    value = data.get(name) if isinstance(data, dict) else None
    if not isinstance(value, str):
        raise GeminiError(f"{who} returned no string {name!r} for {what}; text {text[:200]!r}")
    return value


# --- training-photo captions ----------------------------------------------------------------------

def parse_caption_fields(answer: Answer, image_name: str) -> CaptionFields:
    """The caption fields of training photo `image_name`, identity phrases removed."""
    data, _ = json_answer(answer, "Gemini", f"caption for {image_name}")
    try:
        fields = CaptionFields.from_dict(data)
    except CaptionFieldsError as exc:
        raise GeminiError(f"Gemini's caption for {image_name} is invalid: {exc}") from None
    return fields.map(strip_identity)


# --- content prompts ------------------------------------------------------------------------------

def parse_content_prompts(answer: Answer, *, who: str, source: str, trigger: str, class_word: str,
                          allocation: Sequence[str], themes: Sequence[str] | None = None,
                          log: Any = None) -> list[ContentPrompt]:
    """One `ContentPrompt` per allocation slot, in allocation order, from a JSON array answer.

    Items are matched to the slots by pillar (case and spaces ignored) and, with `themes`, within a
    pillar by the theme they echo first and their order after that; surplus items are dropped
    (`log`, anything with .warning and .info, hears of it). Too few items for a pillar, an unknown
    pillar, an empty prompt or a negative prompt over 1000 characters is a GeminiError. A prompt
    without the trigger word gets "photo of <trigger> <class_word>, " in front. With themes, each
    prompt's theme is its slot's whatever the model wrote, so the rotation's record stays true.
    `source` is the name the prompts are recorded under ("gemini:<model>").
    """
    data, text = json_answer(answer, who, "content prompts")
    if not isinstance(data, list):
        raise GeminiError(f"{who} returned a JSON {type(data).__name__} for content prompts, "
                          f"expected an array of {len(allocation)} items; text {text[:200]!r}")
    canonical = {" ".join(p.split()).casefold(): p for p in allocation}
    queues: dict[str, list[tuple[int, dict[str, str]]]] = {p: [] for p in canonical.values()}
    for index, item in enumerate(data):
        fields = content_item(item, index, who)
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
    for slot, (pillar, (index, fields)) in enumerate(zip(allocation, match_slots(allocation, queues, themes))):
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
        if len(negative) > MAX_NEGATIVE_PROMPT_CHARS:
            raise GeminiError(f"{who} content prompt {index} (pillar {pillar!r}) has a negative prompt of "
                              f"{len(negative)} characters, more than {MAX_NEGATIVE_PROMPT_CHARS}")
        theme = themes[slot] if themes is not None else (" ".join(fields["theme"].split()) or pillar)
        out.append(ContentPrompt(pillar, prompt, negative, theme, source))
    return out


def content_item(item: Any, index: int, who: str) -> dict[str, str]:
    """The four fields of answer item `index`; pillar and prompt are required, the other two
    default to empty (then the default negative prompt and the pillar name)."""
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


def match_slots(allocation: Sequence[str], queues: dict[str, list[tuple[int, dict[str, str]]]],
                themes: Sequence[str] | None) -> list[tuple[int, dict[str, str]]]:
    """The answer item of each slot: per pillar, items in answer order; with `themes`, an item
    that echoes a slot's theme (case and spaces ignored) goes to that slot first, so a model that
    reorders a pillar's items still has each prompt land on the theme it is about. Each queue must
    hold at least as many items as its pillar has slots."""
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


# --- post captions and cluster labels -------------------------------------------------------------

def parse_post_caption(answer: Answer, who: str, what: str) -> str:
    """The caption of a {"caption": str} answer with its hashtags stripped; empty is a GeminiError."""
    caption = strip_hashtags(string_field(answer, "caption", who, what))
    if not caption:
        raise GeminiError(f"{who} returned an empty {what}")
    return caption


def parse_cluster_label(answer: Answer, who: str) -> str:
    """The name of a {"label": str} answer, whitespace collapsed and stray punctuation trimmed; an
    empty name, or one over MAX_LABEL_WORDS words or MAX_LABEL_CHARS characters, is a GeminiError."""
    what = "cluster label"
    label = " ".join(string_field(answer, "label", who, what).split()).strip(" .,;:!\"'`")
    if not label:
        raise GeminiError(f"{who} returned an empty {what}")
    if len(label) > MAX_LABEL_CHARS or len(label.split()) > MAX_LABEL_WORDS:
        raise GeminiError(f"{who} {what} {label!r} is longer than {MAX_LABEL_WORDS} words or "
                          f"{MAX_LABEL_CHARS} characters")
    return label
