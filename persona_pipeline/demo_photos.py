"""Draws the demo persona's source photos with the world renderer: one consistent character (teal
bob, yellow jacket, red scarf, one gold earring) across the world's scenes, framings, poses and
lighting. Deterministic, so anyone can make the same set again with `persona-pipeline demo-photos`.

Every other photo gets a caption sidecar in the persona's LoRA caption form (`m1ra woman, framing,
pose, scene, lighting`: the look is left out, so the LoRA binds it to the trigger word); the rest
are captioned by the pipeline's captioner, as a real persona's photos would be."""

from __future__ import annotations

import random
from pathlib import Path

from persona_pipeline.world.attributes import DEMO_PERSONA, FRAMINGS, LIGHTING, POSES, SCENES, Shot
from persona_pipeline.world.captions import world_caption
from persona_pipeline.world.render import render_shot

SIZE = 512


def demo_shots(count: int = 18) -> list[Shot]:
    """The persona in every scene in turn; framing, pose and light cycle at other rates, so that the
    photos with a sidecar and those without each see every scene, framing and pose."""
    framings, poses, lights = list(FRAMINGS), list(POSES), list(LIGHTING)
    return [Shot(DEMO_PERSONA, scene=SCENES[(index + index // len(SCENES)) % len(SCENES)],
                 framing=framings[(index // 2) % len(framings)], pose=poses[(index + index // 2) % len(poses)],
                 lighting=lights[(index // 3) % len(lights)])
            for index in range(count)]


def make_demo_photos(folder: Path, count: int = 18, seed: int = 7, trigger: str = "m1ra") -> list[Path]:
    """Write `count` JPEG photos and a caption sidecar for every other one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for index, shot in enumerate(demo_shots(count)):
        image = render_shot(shot, SIZE, rng.getrandbits(32))
        path = folder / f"mira_{index + 1:02d}.jpg"
        image.save(path, format="JPEG", quality=88)
        written.append(path)
        if index % 2 == 0:
            path.with_suffix(".txt").write_text(world_caption(shot, trigger) + "\n")
    return written
