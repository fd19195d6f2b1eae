"""Quality figures of world-trained models, read from images by the attribute classifier and judged
against the world's own labels (what was prompted), never by a CLIP model grading itself.

- prompt following: a base model drawing held-out world captions shows the captioned scene, hair,
  jacket and scarf;
- the persona's look: images prompted with the trigger word show teal bob, yellow jacket and red
  scarf together (all four read right is what counts as "correct");
- scene kept: the same images show the scene their prompt named.

No Dagster here; `bench/quality.py` and the tests call these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from persona_pipeline.world.attributes import CLASS_WORD, DEMO_PERSONA, DEMO_TRIGGER, SCENES, Character, Shot
from persona_pipeline.world.captions import world_caption
from persona_pipeline.world.dataset import world_shot

LOOK = ("hair_colour", "hair_style", "jacket_colour", "scarf_colour")
PROMPTED = (*LOOK, "scene")
SAMPLING_STEPS, GUIDANCE = 20, 5.0


def look_of(character: Character = DEMO_PERSONA) -> dict[str, str]:
    return {name: getattr(character, name) for name in LOOK}


def persona_prompts(trigger: str = DEMO_TRIGGER, scenes: Sequence[str] = SCENES) -> list[str]:
    """`photo of m1ra woman, <scene>` for every scene: the issue's persona probe."""
    return [f"photo of {trigger} {CLASS_WORD}, {scene}" for scene in scenes]


def heldout_shots(n: int, seed: int = 0, start: int = 10_000) -> list[Shot]:
    """World shots no model trained on (the held-out split, past what training evaluated on)."""
    return [world_shot(seed, start + index, "heldout")[0] for index in range(n)]


def render(pipe, prompts: Sequence[str], seeds: Sequence[int], size: int = 64, steps: int = SAMPLING_STEPS,
           guidance: float = GUIDANCE, batch_size: int = 32) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order, with DPM-Solver++ (what the backend samples with).
    Each image's noise depends on its own seed alone, so batching does not change it."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
        images += pipe(list(prompts[chunk]), num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
                       generator=generators).images
    return images


@dataclass(frozen=True)
class LookFigures:
    """How often images show a look: all four attributes together, and each one."""
    all_correct: float
    per_attribute: dict[str, float]
    scene_kept: float | None  # the prompted scene, where scenes were prompted
    count: int

    def as_dict(self) -> dict:
        return {"look_correct": self.all_correct, **{f"look_{k}": v for k, v in self.per_attribute.items()},
                "scene_kept": self.scene_kept, "images": self.count}


def look_figures(classifier, images: Sequence[Image.Image], look: dict[str, str],
                 scenes: Sequence[str] | None = None) -> LookFigures:
    read = classifier.predict(list(images))
    per = {name: sum(r[name] == look[name] for r in read) / len(read) for name in look}
    together = sum(all(r[name] == look[name] for name in look) for r in read) / len(read)
    kept = None if scenes is None else sum(r["scene"] == s for r, s in zip(read, scenes)) / len(read)
    return LookFigures(together, per, kept, len(read))


def prompt_following(classifier, images: Sequence[Image.Image], shots: Sequence[Shot]) -> dict[str, float]:
    """Per prompted attribute, the share of images the classifier reads as the caption said."""
    read = classifier.predict(list(images))
    labels = [shot.labels() for shot in shots]
    return {name: sum(r[name] == l[name] for r, l in zip(read, labels)) / len(read) for name in PROMPTED}


def base_prompt_following(pipe, classifier, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Held-out world captions drawn once each (seed = index): per-attribute prompt following."""
    shots = heldout_shots(n, seed)
    images = render(pipe, [world_caption(shot) for shot in shots], list(range(n)))
    return prompt_following(classifier, images, shots)


def persona_figures(pipe, classifier, seeds: Sequence[int] = (0, 1, 2, 3), trigger: str = DEMO_TRIGGER,
                    look: dict[str, str] | None = None) -> tuple[LookFigures, list[Image.Image]]:
    """The persona probe: every scene x every seed, read for the look and the scene."""
    prompts = persona_prompts(trigger)
    pairs = [(prompt, scene, seed) for prompt, scene in zip(prompts, SCENES) for seed in seeds]
    images = render(pipe, [p for p, _, _ in pairs], [s for _, _, s in pairs])
    return look_figures(classifier, images, look or look_of(), [scene for _, scene, _ in pairs]), images


def named_look_figures(pipe, classifier, character: Character = DEMO_PERSONA,
                       seeds: Sequence[int] = (0, 1, 2, 3)) -> LookFigures:
    """The probe's form with the look written out instead of a trigger word (`photo of woman, teal bob,
    yellow jacket, red scarf, <scene>`), on the base model alone: how often the base draws the look in
    a prompt of this shape when told it in words, so what a LoRA that taught the trigger word the look
    could reach on the probe."""
    from persona_pipeline.world.captions import appearance

    look = appearance(character, accessory=False)
    pairs = [(f"photo of {CLASS_WORD}, {look}, {scene}", scene, seed) for scene in SCENES for seed in seeds]
    images = render(pipe, [p for p, _, _ in pairs], [s for _, _, s in pairs])
    return look_figures(classifier, images, look_of(character), [scene for _, scene, _ in pairs])


def write_persona_dataset(folder, character: Character = DEMO_PERSONA, trigger: str = DEMO_TRIGGER, count: int = 18,
                          size: int = 64, seed: int = 7, repeats: int = 10):
    """A kohya dataset of `character` (`<repeats>_<trigger> woman/NNN.png` + caption) drawn by the
    world's renderer in the demo photos' shots, captioned as a persona (look left out)."""
    import random
    from dataclasses import replace
    from pathlib import Path

    from persona_pipeline.demo_photos import demo_shots
    from persona_pipeline.world.render import render_shot

    subset = Path(folder) / f"{repeats}_{trigger} {CLASS_WORD}"
    subset.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index, shot in enumerate(demo_shots(count)):
        shot = replace(shot, character=character)
        render_shot(shot, size, rng.getrandbits(32)).save(subset / f"{index:03d}.png")
        (subset / f"{index:03d}.txt").write_text(world_caption(shot, trigger) + "\n", encoding="utf-8")
    return Path(folder)
