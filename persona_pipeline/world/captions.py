"""A shot's caption, composed by the same function that writes `training_dataset`'s captions
(`compose_training_caption`: subject, framing, pose, clothing, background, lighting), so that the
world's base captions and a persona's LoRA captions differ only where they must:

- base world: `woman, half-body shot, waving, black bob, blue jacket, red scarf, glasses, beach,
  golden hour light`: no trigger word, and the look is named (hair in the clothing slot), so the
  base model learns every attribute word;
- a persona (`trigger` given): `m1ra woman, half-body shot, waving, beach, golden hour light`: the
  look is left out, as the project's caption rules leave out identity, so the LoRA binds the whole
  look (hair, jacket, scarf) to the trigger word.

Skin tone is never written (the caption rules treat it as identity, and nothing prompts for it).
"""

from __future__ import annotations

import random

from persona_pipeline.domain.training_captions import CaptionFields, compose_training_caption
from persona_pipeline.world.attributes import CLASS_WORD, HAIR_STYLES, NO_SCARF, Character, Shot


def appearance(character: Character, accessory: bool = True) -> str:
    """The character's look as caption segments: hair, jacket, scarf, accessory."""
    parts = [f"{character.hair_colour} {HAIR_STYLES[character.hair_style]}", f"{character.jacket_colour} jacket"]
    if character.scarf_colour != NO_SCARF:
        parts.append(f"{character.scarf_colour} scarf")
    if accessory and character.accessory != "none":
        parts.append(character.accessory)
    return ", ".join(parts)


def world_caption(shot: Shot, trigger: str | None = None) -> str:
    """The base caption (no trigger, look named), or with `trigger` the persona caption (look left out)."""
    fields = CaptionFields(framing=shot.framing, pose=shot.pose, clothing="" if trigger else appearance(shot.character),
                           background=shot.scene, lighting=shot.lighting)
    return compose_training_caption(trigger or "", CLASS_WORD, fields)


PHOTO_PREFIX = "photo of "  # how the pipeline's prompts begin (content prompts, validation prompts)


def varied_caption(shot: Shot, rng: random.Random) -> str:
    """The base caption in one of the shapes a prompt takes: framing, pose, lighting and accessory
    each left out half the time, the look (hair, jacket, scarf) a quarter of the time, and
    "photo of " in front half the time; the scene always stays. A model trained on these draws
    `photo of woman, beach` as well as the full caption, and an unnamed look as any look."""
    keep = lambda share: rng.random() >= share  # noqa: E731
    framing, pose, lighting, accessory, look = keep(0.5), keep(0.5), keep(0.5), keep(0.5), keep(0.25)
    fields = CaptionFields(framing=shot.framing if framing else "", pose=shot.pose if pose else "",
                           clothing=appearance(shot.character, accessory) if look else "",
                           background=shot.scene, lighting=shot.lighting if lighting else "")
    caption = compose_training_caption("", CLASS_WORD, fields)
    return PHOTO_PREFIX + caption if rng.random() < 0.5 else caption
