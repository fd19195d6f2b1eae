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

from persona_pipeline.domain.training_captions import CaptionFields, compose_training_caption
from persona_pipeline.world.attributes import CLASS_WORD, HAIR_STYLES, NO_SCARF, Character, Shot


def appearance(character: Character) -> str:
    """The character's look as caption segments: hair, jacket, scarf, accessory."""
    parts = [f"{character.hair_colour} {HAIR_STYLES[character.hair_style]}", f"{character.jacket_colour} jacket"]
    if character.scarf_colour != NO_SCARF:
        parts.append(f"{character.scarf_colour} scarf")
    if character.accessory != "none":
        parts.append(character.accessory)
    return ", ".join(parts)


def world_caption(shot: Shot, trigger: str | None = None) -> str:
    """The base caption (no trigger, look named), or with `trigger` the persona caption (look left out)."""
    fields = CaptionFields(framing=shot.framing, pose=shot.pose, clothing="" if trigger else appearance(shot.character),
                           background=shot.scene, lighting=shot.lighting)
    return compose_training_caption(trigger or "", CLASS_WORD, fields)
