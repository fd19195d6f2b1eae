"""Choosing the world LoRA recipe away from the persona probe: train a LoRA with the `world` preset plus
`overrides` for each of the other characters (quality_run.OTHER_CHARACTERS) and read its last checkpoint
on the probe's form, "photo of <trigger> woman, <scene>", at seeds other than the persona's.

    python -m persona_pipeline.world.lora_recipe '{"caption_tag_dropout_rate": 0.5}' [k4ya,t0bi,r3na] [--world-models DIR]

Prints one line per character (the look all four right, each attribute, the scene kept) and the mean.
`--world-models DIR` trains and reads the LoRAs on another world-models folder (a retrained base, checked
against its manifest) instead of the committed one, so a new base is judged away from the persona too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

RECIPE_SEEDS = (10, 11, 12, 13)  # never the persona's (quality_run.PERSONA_SEEDS)


def recipe_figures(overrides: dict, triggers: list[str] | None = None, seeds=RECIPE_SEEDS, log=print,
                   world_models: Path | None = None) -> dict[str, dict]:
    from diffusers import StableDiffusionPipeline

    from persona_pipeline.resources.diffusion import WORLD_TRAINING, DiffusionBackend
    from persona_pipeline.world import quality
    from persona_pipeline.world.classifier import load_classifier
    from persona_pipeline.world.quality_run import OTHER_CHARACTERS, probe

    params = replace(WORLD_TRAINING, **overrides)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lora-recipe-") as folder:
        work = Path(folder)
        diffusion = DiffusionBackend(base_model="world", models_dir=str(work / "models"),
                                     world_models_dir=str(world_models or ""))
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


def _overrides(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"overrides {text!r} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"overrides {text!r} is not a JSON object of training settings")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m persona_pipeline.world.lora_recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="?", type=_overrides, default={},
                        help="LoraTrainingParams fields over the world preset, as JSON")
    parser.add_argument("characters", nargs="?", type=lambda text: text.split(","), default=None,
                        help="comma-separated triggers (default: all of quality_run.OTHER_CHARACTERS)")
    parser.add_argument("--world-models", type=Path, default=None, metavar="DIR",
                        help="a world-models folder to train on (default: the committed one)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    args = parse_args()
    recipe_figures(args.overrides, args.characters, world_models=args.world_models)
