"""Generation prompts for the content pillars that need images most.

`allocate_prompts` shares a run's N prompts among the pillars by their gap (domain/gaps.py) in
one go; content_plan instead picks pillars and themes by the persisted topic rotation
(domain/rotation.py). `template_prompts` writes the prompts offline from each pillar's base
prompt (persona.yaml) plus a theme and a framing/light variation; Gemini writes them when a key
is set (resources/gemini.py), and both pass `check_prompt`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from persona_pipeline.domain.gaps import PillarGap, urgency_key

DEFAULT_NEGATIVE_PROMPT = "blurry, low quality, deformed, extra limbs, watermark, text"
MAX_PROMPT_CHARS = 1000

# Offline variation: what varies between photos of one pillar (framing/pose and light), never
# the identity, which belongs to the trigger word. 8 × 8 pairs, so a pillar gets 64 different
# prompts before any repeats.
FRAMINGS: tuple[str, ...] = (
    "close-up portrait", "half-body shot", "full-body shot", "candid shot from the side",
    "walking towards the camera", "sitting, looking away from the camera", "glancing over the shoulder",
    "wide shot showing the surroundings",
)
LIGHTS: tuple[str, ...] = (
    "soft daylight", "golden hour light", "overcast diffuse light", "early morning light",
    "blue hour light", "warm window light", "backlit by the sun", "evening light",
)


@dataclass(frozen=True)
class ContentPrompt:
    pillar: str
    prompt: str
    negative_prompt: str
    theme: str
    source: str  # "template" | "gemini:<model>"


def check_prompt(prompt: str, trigger: str) -> str:
    """The prompt with whitespace collapsed; ValueError when it is empty, longer than
    MAX_PROMPT_CHARS, or lacks the trigger word (as a whole word, any case: CLIP lowercases)."""
    if not trigger.strip():
        raise ValueError("trigger word is empty")
    clean = " ".join(str(prompt).split())
    if not clean:
        raise ValueError("prompt is empty")
    if len(clean) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(clean)} characters, more than {MAX_PROMPT_CHARS}: {clean[:60]!r}...")
    if not has_trigger(clean, trigger):
        raise ValueError(f"prompt lacks the trigger word {trigger.strip()!r}: {clean[:80]!r}")
    return clean


def has_trigger(prompt: str, trigger: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", prompt, re.IGNORECASE) is not None


def allocate_prompts(gaps: Sequence[PillarGap], n: int) -> list[str]:
    """The pillar of each of `n` prompts, grouped most urgent pillar first.

    Shares are proportional to each pillar's positive gap, rounded by largest remainder (ties go
    to the more urgent pillar, `urgency_key`); pillars with gap <= 0 get none. When no pillar has
    a gap, shares follow the weights instead, and equal shares when every weight is 0.
    """
    if n < 0:
        raise ValueError(f"number of prompts must be >= 0, got {n}")
    if n == 0:
        return []
    if not gaps:
        raise ValueError(f"cannot allocate {n} prompts: the persona has no pillars")
    names = [g.name for g in gaps]
    if len(set(names)) != len(names):
        raise ValueError(f"pillar names repeat in the gaps: {names}")
    ordered = sorted(gaps, key=urgency_key)
    shares = [max(g.gap, 0) for g in ordered]
    if not any(shares):
        shares = [g.weight for g in ordered]
    if not any(shares):
        shares = [1] * len(ordered)
    total = sum(shares)
    counts = [n * s // total for s in shares]
    # Largest remainder; the sort is stable, so equal remainders keep the urgency order.
    by_remainder = sorted(range(len(ordered)), key=lambda i: -(n * shares[i] % total))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return [g.name for g, count in zip(ordered, counts) for _ in range(count)]


def guideline_themes(guidelines: str) -> list[str]:
    """Short theme phrases from free-text guidelines: split at sentence and clause punctuation."""
    phrases = []
    for part in re.split(r"[.;,:!?\n]+", guidelines):
        phrase = " ".join(part.split())
        if phrase:
            # Lowercase a capital that only starts the sentence; keep acronyms ("NYC") as they are.
            if len(phrase) > 1 and phrase[0].isupper() and not phrase[1].isupper():
                phrase = phrase[0].lower() + phrase[1:]
            phrases.append(phrase)
    return phrases


def template_prompts(*, trigger: str, class_word: str, pillars: Mapping[str, tuple[str, str]],
                     allocation: Sequence[str], themes: Mapping[str, Sequence[str]] | None = None,
                     seed: int = 0, slot_themes: Sequence[str] | None = None) -> list[ContentPrompt]:
    """One prompt per allocation entry, offline.

    Each is the pillar's base prompt (`pillars[name] = (base prompt, guidelines)`, the base as
    persona.yaml gives it with the trigger filled in) followed by a theme, a framing/pose and a
    light. `slot_themes` (one per allocation entry) gives each prompt's theme outright: content_plan
    passes the topic rotation's themes (domain/rotation.py) so the prompts are about exactly those.
    Without it, themes come from `themes[name]` when given, else from the guideline phrases, else
    the pillar name, and the k-th prompt of a pillar takes theme k of an order shuffled by
    (seed, pillar). Either way the k-th prompt of a pillar takes framing/light pair k of an order
    shuffled by (seed, pillar), so a pillar's prompts differ for at least 64 repeats and the same
    seed gives the same prompts. A base prompt without the trigger word gets
    "photo of <trigger> <class_word>, " in front, so the trigger group always comes first.
    """
    if not class_word.strip():
        raise ValueError("class word is empty")
    if slot_themes is not None and len(slot_themes) != len(allocation):
        raise ValueError(f"slot_themes has {len(slot_themes)} theme(s) for {len(allocation)} allocation slot(s)")
    themes = themes or {}
    pairs = [(f, light) for f in FRAMINGS for light in LIGHTS]
    orders: dict[str, tuple[list[str], list[tuple[str, str]]]] = {}
    seen: dict[str, int] = {}
    out: list[ContentPrompt] = []
    for slot, pillar in enumerate(allocation):
        if pillar not in pillars:
            raise ValueError(f"allocation names pillar {pillar!r}, which is not among {sorted(pillars)}")
        base, guidelines = pillars[pillar]
        if pillar not in orders:
            rng = random.Random(f"{seed}:{pillar}")  # str seeds are stable across processes
            pillar_themes = [" ".join(t.split()) for t in themes.get(pillar, ()) if t.strip()]
            pillar_themes = pillar_themes or guideline_themes(guidelines) or [pillar]
            pillar_pairs = list(pairs)
            rng.shuffle(pillar_themes)
            rng.shuffle(pillar_pairs)
            orders[pillar] = (pillar_themes, pillar_pairs)
        pillar_themes, pillar_pairs = orders[pillar]
        k = seen.get(pillar, 0)
        seen[pillar] = k + 1
        theme = pillar_themes[k % len(pillar_themes)]
        if slot_themes is not None:
            theme = " ".join(str(slot_themes[slot]).split()) or pillar
        framing, light = pillar_pairs[k % len(pillar_pairs)]
        base = " ".join(base.split()).rstrip(",")
        if not has_trigger(base, trigger):
            base = f"photo of {trigger.strip()} {class_word.strip()}, {base}".rstrip(", ")
        parts = [base] + ([] if theme.lower() in base.lower() else [theme]) + [framing, light]
        try:
            prompt = check_prompt(", ".join(parts), trigger)
        except ValueError as exc:
            raise ValueError(f"pillar {pillar!r}: {exc}") from None
        out.append(ContentPrompt(pillar, prompt, DEFAULT_NEGATIVE_PROMPT, theme, "template"))
    return out
