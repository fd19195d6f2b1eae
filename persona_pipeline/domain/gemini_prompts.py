"""What we ask Gemini: the instruction texts and the response schemas of its four requests.

Pure: the texts are built from the caller's inputs only, and each schema is a plain dict in the
form Gemini's structured output takes (an OpenAPI subset: upper-case `type`, `properties`,
`required`, `property_ordering`, `min_items`/`max_items`), so it can be read and tested without
the SDK; the resource turns it into the SDK's `Schema`. The four requests:

- training-photo captions: the five `CaptionFields` of one photo, never the identity;
- content prompts: one request per generation run, a JSON array with one item per slot;
- post captions: the caption of one post, within the persona's length band, no hashtags;
- cluster labels: a 1-4 word name for a content-library cluster.

How answers are checked is in `domain.gemini_answers`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from persona_pipeline.domain.captions import MAX_MENTIONS, length_band
from persona_pipeline.domain.training_captions import FIELD_NAMES

Schema = dict[str, Any]

# --- training-photo captions ----------------------------------------------------------------------

CAPTION_FIELD_HELP = {
    "framing": "shot type and camera angle, e.g. 'close-up portrait', 'full-body shot from below'",
    "pose": "pose, action and expression, e.g. 'sitting on a bench, smiling at the camera'",
    "clothing": "visible clothing and accessories, starting with 'wearing', e.g. 'wearing a yellow jacket and jeans'",
    "background": "setting and background, e.g. 'city street', 'beach at sunset'",
    "lighting": "light quality and source, e.g. 'soft daylight', 'neon light at night'",
}


def caption_instruction(trigger_word: str, class_word: str) -> str:
    """The instruction sent with each training photo."""
    fields = "\n".join(f"- {name}: {CAPTION_FIELD_HELP[name]}" for name in FIELD_NAMES)
    return (
        f"This photo is part of a LoRA training set for the character '{trigger_word}' ({class_word}). "
        "Write the caption fields for it as short lowercase phrases without a trailing period:\n"
        f"{fields}\n"
        "Describe only what varies from photo to photo: framing, pose/action, clothing, background, lighting. "
        "Never describe the person's identity: no face or face shape, eye colour, hair colour or style, "
        "skin tone, ethnicity, age, body type or build, and no names or resemblance to anyone. "
        "Those belong to the trigger word. Use an empty string for a field you cannot see."
    )


def caption_fields_schema() -> Schema:
    """An object with exactly the five caption fields, all required, in `FIELD_NAMES` order."""
    return {
        "type": "OBJECT",
        "properties": {name: {"type": "STRING", "description": CAPTION_FIELD_HELP[name]} for name in FIELD_NAMES},
        "required": list(FIELD_NAMES),
        "property_ordering": list(FIELD_NAMES),
    }


# --- content prompts ------------------------------------------------------------------------------

CONTENT_PROMPT_FIELDS: tuple[str, ...] = ("pillar", "prompt", "negative_prompt", "theme")
MAX_AVOID_ITEMS = 50  # the avoid list is cut to its first 50 entries of 200 characters at most
CONTENT_FIELD_HELP = {
    "pillar": "the content pillar of this slot, exactly as named",
    "prompt": "the text-to-image prompt, starting with the given prefix",
    "negative_prompt": "a short comma-separated list of defects to avoid",
    "theme": "a 2-5 word label of the prompt's idea",
}


def one_line(text: Any, limit: int = 200) -> str:
    """`text` with its whitespace collapsed, cut to `limit` characters: one line of an instruction."""
    return " ".join(str(text).split())[:limit]


def check_content_prompt_request(*, trigger: str, class_word: str, guidelines_by_pillar: Mapping[str, str],
                                 allocation: Sequence[str], themes: Sequence[str] | None) -> list[str] | None:
    """The slot themes with their whitespace collapsed (None stays None); ValueError when the trigger
    or class word is empty, a pillar of `allocation` has no guidelines, or `themes` does not give one
    non-empty theme per slot."""
    if not trigger.strip() or not class_word.strip():
        raise ValueError(f"trigger word {trigger!r} and class word {class_word!r} must not be empty")
    missing = [p for p in dict.fromkeys(allocation) if p not in guidelines_by_pillar]
    if missing:
        raise ValueError(f"no guidelines given for pillar(s) {missing}; known: {sorted(guidelines_by_pillar)}")
    if themes is None:
        return None
    clean = [" ".join(str(t).split()) for t in themes]
    if len(clean) != len(allocation) or not all(clean):
        raise ValueError(f"themes must give one non-empty theme per slot: {len(clean)} theme(s) "
                         f"{clean} for {len(allocation)} slot(s)")
    return clean


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
    recent = [one_line(a) for a in avoid if str(a).strip()][:MAX_AVOID_ITEMS]
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
    lines.append("Each item has: " + "; ".join(f"{k}: {v}" for k, v in CONTENT_FIELD_HELP.items()) + ".")
    lines.append(f"Answer with a JSON array of exactly {len(allocation)} items, one per slot, in this order:")
    for i, p in enumerate(allocation, 1):
        slot = f"{i}. {json.dumps(p, ensure_ascii=False)}"
        lines.append(slot if themes is None else f"{slot}, theme {json.dumps(themes[i - 1], ensure_ascii=False)}")
    return "\n".join(lines)


def content_prompts_schema(allocation: Sequence[str]) -> Schema:
    """An array of exactly one item per slot; each item has the four `CONTENT_PROMPT_FIELDS`, its
    pillar restricted to the allocation's pillars."""
    text: dict[str, Schema] = {name: {"type": "STRING", "description": CONTENT_FIELD_HELP[name]}
                               for name in CONTENT_PROMPT_FIELDS}
    text["pillar"] = {"type": "STRING", "format": "enum", "enum": list(dict.fromkeys(allocation)),
                      "description": CONTENT_FIELD_HELP["pillar"]}
    item = {"type": "OBJECT", "properties": text, "required": list(CONTENT_PROMPT_FIELDS),
            "property_ordering": list(CONTENT_PROMPT_FIELDS)}
    return {"type": "ARRAY", "items": item, "min_items": len(allocation), "max_items": len(allocation)}


# --- post captions --------------------------------------------------------------------------------

MAX_CAPTION_EXAMPLES = 5  # example captions sent, each cut to 600 characters
TONE_HELP = {
    "casual": "relaxed and conversational, like talking to a friend",
    "professional": "polished, clear and informative",
    "playful": "light, witty and fun",
    "inspirational": "uplifting and encouraging, without clichés",
    "edgy": "bold and direct, never offensive",
}
EMOJI_HELP = {
    "none": "Use no emoji.",
    "low": "Use one or two emoji at most.",
    "medium": "Use a few emoji, about three to five.",
    "high": "Use emoji generously, six or more, woven through the text.",
}


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
                 + (f"; its guidelines: {one_line(guidelines, 600)}" if guidelines.strip() else ""))
    if theme.strip():
        lines.append(f"Theme of this post: {one_line(theme)}")
    lines.append(f"Tone: {tone} ({TONE_HELP.get(tone, tone)}).")
    if voice:
        lines.append("Voice: " + ", ".join(one_line(v) for v in voice) + ".")
    if topics:
        lines.append("Topics the persona talks about: " + ", ".join(one_line(t) for t in topics) + ".")
    if avoid_topics:
        lines.append("Never mention or allude to: " + ", ".join(one_line(t) for t in avoid_topics) + ".")
    shown = [one_line(e, 600) for e in examples if str(e).strip()][:MAX_CAPTION_EXAMPLES]
    if shown:
        lines.append("Example captions in the persona's voice (match the voice; do not copy them):")
        lines.extend(f"- {e}" for e in shown)
    lines.append(EMOJI_HELP.get(emoji_density, EMOJI_HELP["low"]) if emoji else EMOJI_HELP["none"])
    lines.append(f"Length: between {low} and {high} characters ({length}), counting spaces and line breaks.")
    phrases = [one_line(p) for p in avoid_phrases if str(p).strip()][:MAX_AVOID_ITEMS]
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


def post_caption_schema() -> Schema:
    """An object with one required string, `caption`."""
    return {"type": "OBJECT", "properties": {"caption": {"type": "STRING", "description": "the post caption"}},
            "required": ["caption"]}


# --- cluster labels -------------------------------------------------------------------------------

MAX_LABEL_IMAGES = 4
MAX_LABEL_TERMS = 12
MAX_LABEL_CHARS = 40
MAX_LABEL_WORDS = 4


def cluster_label_terms(terms: Sequence[str]) -> list[str]:
    """The caption terms sent: each on one line and cut to 60 characters, empty ones dropped, at
    most MAX_LABEL_TERMS."""
    return [t for t in (one_line(t, 60) for t in terms) if t][:MAX_LABEL_TERMS]


def cluster_label_instruction(terms: Sequence[str], images: int) -> str:
    """The instruction sent after a cluster's `images` member photos (or alone when there are none)."""
    lines = [f"The {images} photo(s) above belong to one cluster of similar images in a persona's content library."
             if images else "These terms describe one cluster of similar images in a persona's content library."]
    if terms:
        lines.append("The most frequent terms in the cluster's captions: " + ", ".join(terms) + ".")
    lines.append(f"Name the cluster in 1 to {MAX_LABEL_WORDS} words (at most {MAX_LABEL_CHARS} characters) that "
                 "say what its images have in common: setting, activity or style, e.g. 'Beach Sunsets', "
                 "'Cafe Mornings'. Never describe the person's identity.")
    lines.append('Answer with JSON: {"label": "<the name>"}.')
    return "\n".join(lines)


def cluster_label_schema() -> Schema:
    """An object with one required string, `label`."""
    return {"type": "OBJECT", "properties": {"label": {"type": "STRING", "description": "the cluster's name"}},
            "required": ["label"]}
