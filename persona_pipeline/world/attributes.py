"""The world's vocabulary as data: every attribute a character or a shot can take, with the colour or
number the renderer draws it with, and the samplers that draw from it.

Names are the words the captions use, so a label, a caption phrase and a classifier class are the
same string. The demo persona's combination (teal bob, yellow jacket, red scarf) is never sampled:
only its LoRA may teach it (issue 21); each of its values alone is ordinary world vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

RGB = tuple[int, int, int]

HAIR_COLOURS: dict[str, RGB] = {
    "black": (22, 22, 28), "brown": (96, 52, 20), "blonde": (240, 210, 92), "ginger": (218, 96, 26),
    "teal": (24, 160, 160), "pink": (242, 112, 178), "silver": (206, 210, 222), "purple": (118, 52, 178),
}
# Caption phrase of each style after the colour: "teal bob", "black long hair".
HAIR_STYLES: dict[str, str] = {
    "bob": "bob", "long": "long hair", "ponytail": "ponytail", "short": "short hair", "pigtails": "pigtails",
}
JACKET_COLOURS: dict[str, RGB] = {
    "yellow": (242, 198, 30), "red": (206, 36, 44), "blue": (38, 88, 204), "green": (34, 148, 68),
    "black": (34, 34, 40), "white": (236, 236, 236), "orange": (244, 128, 28), "purple": (132, 58, 172),
}
NO_SCARF = "none"
SCARF_COLOURS: dict[str, RGB] = {
    "red": (214, 24, 36), "blue": (40, 110, 230), "green": (40, 170, 80), "white": (246, 246, 246),
    "black": (20, 20, 24), "pink": (246, 120, 190), "yellow": (250, 220, 40),
}
SCARF_CHOICES: tuple[str, ...] = (*SCARF_COLOURS, NO_SCARF)
# Skin is drawn but never captioned: the project's caption rules treat skin as identity
# (domain/training_captions.py), and no prompt or measurement names it.
SKIN_TONES: dict[str, RGB] = {
    "light": (242, 208, 184), "medium": (224, 172, 140), "tan": (190, 134, 94), "deep": (128, 86, 62),
}
ACCESSORIES: tuple[str, ...] = ("none", "glasses", "sunglasses", "hat", "gold earring")

# Scene names are the captions' background phrases (the offline captioner's words where it has one:
# "cafe", "snowy landscape").
SCENES: tuple[str, ...] = ("city street", "beach", "forest", "rooftop", "cafe", "bedroom", "snowy landscape", "market")
# framing -> (head radius, head top), as fractions of the image height.
FRAMINGS: dict[str, tuple[float, float]] = {
    "close-up portrait": (0.25, 0.07), "half-body shot": (0.145, 0.07), "full-body shot": (0.1, 0.035),
}
# Arm angles (left, right) in degrees: 0 points sideways, 90 up, -90 down.
POSES: dict[str, tuple[int, int]] = {
    "waving": (-70, 55), "arms down": (-80, -80), "arms outstretched": (0, 0), "arms raised": (60, 60),
}
# lighting -> per-channel gain applied to the whole frame.
LIGHTING: dict[str, tuple[float, float, float]] = {
    "soft daylight": (1.0, 1.0, 1.0), "golden hour light": (1.12, 0.98, 0.78), "dim evening light": (0.62, 0.64, 0.8),
}

DEMO_TRIGGER = "m1ra"
CLASS_WORD = "woman"


@dataclass(frozen=True)
class Character:
    hair_colour: str
    hair_style: str
    jacket_colour: str
    scarf_colour: str  # NO_SCARF for none
    skin_tone: str = "medium"
    accessory: str = "none"

    def __post_init__(self) -> None:
        for name, value, allowed in (("hair_colour", self.hair_colour, HAIR_COLOURS), ("hair_style", self.hair_style, HAIR_STYLES),
                                     ("jacket_colour", self.jacket_colour, JACKET_COLOURS),
                                     ("scarf_colour", self.scarf_colour, SCARF_CHOICES), ("skin_tone", self.skin_tone, SKIN_TONES),
                                     ("accessory", self.accessory, ACCESSORIES)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not in the world's vocabulary: {', '.join(allowed)}")


@dataclass(frozen=True)
class Shot:
    character: Character
    scene: str
    framing: str
    pose: str
    lighting: str

    def __post_init__(self) -> None:
        for name, value, allowed in (("scene", self.scene, SCENES), ("framing", self.framing, FRAMINGS),
                                     ("pose", self.pose, POSES), ("lighting", self.lighting, LIGHTING)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not in the world's vocabulary: {', '.join(allowed)}")

    def labels(self) -> dict[str, str]:
        """Every attribute by name: the world's ground truth for this image."""
        return {**asdict(self.character), "scene": self.scene, "framing": self.framing, "pose": self.pose,
                "lighting": self.lighting}


DEMO_PERSONA = Character(hair_colour="teal", hair_style="bob", jacket_colour="yellow", scarf_colour="red",
                         skin_tone="medium", accessory="gold earring")


def is_demo_persona(character: Character) -> bool:
    """The persona's look is the four attributes together; skin and accessory do not rescue it."""
    return (character.hair_colour, character.hair_style, character.jacket_colour, character.scarf_colour) == (
        DEMO_PERSONA.hair_colour, DEMO_PERSONA.hair_style, DEMO_PERSONA.jacket_colour, DEMO_PERSONA.scarf_colour)


def sample_character(rng: random.Random) -> Character:
    """A uniform draw over the vocabulary, rejecting the demo persona and a scarf the colour of its
    jacket (it would vanish into it, and its label could not be read from the image)."""
    while True:
        character = Character(hair_colour=rng.choice(list(HAIR_COLOURS)), hair_style=rng.choice(list(HAIR_STYLES)),
                              jacket_colour=rng.choice(list(JACKET_COLOURS)), scarf_colour=rng.choice(SCARF_CHOICES),
                              skin_tone=rng.choice(list(SKIN_TONES)), accessory=rng.choice(ACCESSORIES))
        if character.scarf_colour != character.jacket_colour and not is_demo_persona(character):
            return character


def sample_shot(rng: random.Random, character: Character | None = None) -> Shot:
    """A shot of `character` (a sampled one if None) in a uniformly drawn scene, framing, pose and light."""
    character = character or sample_character(rng)
    return Shot(character=character, scene=rng.choice(SCENES), framing=rng.choice(list(FRAMINGS)),
                pose=rng.choice(list(POSES)), lighting=rng.choice(list(LIGHTING)))
