"""Choosing the world LoRA recipe away from the persona probe: train a LoRA with the `world` preset plus
`overrides` for each of the other characters (quality_run.OTHER_CHARACTERS) and read its last checkpoint
on the probe's form, "photo of <trigger> woman, <scene>", at seeds other than the persona's.

    python -m persona_pipeline.world.lora_recipe '{"caption_tag_dropout_rate": 0.5}' [k4ya,t0bi,r3na]

Prints one line per character (the look all four right, each attribute, the scene kept) and the mean.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

RECIPE_SEEDS = (10, 11, 12, 13)  # never the persona's (quality_run.PERSONA_SEEDS)


def recipe_figures(overrides: dict, triggers: list[str] | None = None, seeds=RECIPE_SEEDS, log=print) -> dict[str, dict]:
    from diffusers import StableDiffusionPipeline

    from persona_pipeline.resources.diffusion import WORLD_TRAINING, DiffusionBackend
    from persona_pipeline.world import quality
    from persona_pipeline.world.classifier import load_classifier
    from persona_pipeline.world.quality_run import OTHER_CHARACTERS, probe

    params = replace(WORLD_TRAINING, **overrides)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lora-recipe-") as folder:
        work = Path(folder)
        diffusion = DiffusionBackend(base_model="world", models_dir=str(work / "models"))
        classifier = load_classifier()
        pipe = StableDiffusionPipeline.from_pretrained(diffusion.base_model_path(), safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        for trigger, character in OTHER_CHARACTERS:
            if triggers and trigger not in triggers:
                continue
            dataset = quality.write_persona_dataset(work / f"dataset-{trigger}", character=character, trigger=trigger)
            result = diffusion.train(dataset, work / f"lora-{trigger}", params, f"{trigger}.safetensors", log=lambda _: None)
            figures, _ = probe(pipe, classifier, result.lora_path, trigger, quality.look_of(character), seeds=seeds)
            out[trigger] = figures.as_dict()
            log(f"{trigger}: {out[trigger]}")
    log(f"mean look all four right: {sum(f['look_correct'] for f in out.values()) / len(out):.3f}")
    return out


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    recipe_figures(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {},
                   sys.argv[2].split(",") if len(sys.argv) > 2 else None)
