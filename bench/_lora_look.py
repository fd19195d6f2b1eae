"""Diagnostic (not a benchmark, so run_all skips it): where the persona's look is lost between the base
model and its LoRA, read by the world's attribute classifier, away from the persona probe (the other three
characters, seeds 10-13; add m1ra to --characters to include the persona at its own seeds 0-3).

    python bench/_lora_look.py [--sd DIR] [--characters k4ya,t0bi,r3na] [--overrides JSON]
                               [--scales 1,1.5,2,3] [--unet-targets conv1,conv2] [--no-lora]

For each character, on the base model alone:
- "named, probe form": `photo of woman, <look in words>, <scene>`, the probe's shape with the look
  written out: what a LoRA that taught the trigger word the look could reach on the probe;
- "named, caption form": `woman, half-body shot, waving, <look>, <scene>, soft daylight`, the shape of
  the base's training captions.
Then (unless --no-lora) the `world` preset LoRA (plus --overrides) trained on the character's 18 renders,
its probe (`photo of <trigger> woman, <scene>`) at each checkpoint, and its last checkpoint at each
strength in --scales. --unet-targets adds UNet module names to the LoRA's targets (LoCon-style: the
resnets' conv1/conv2). --sd reads an SD folder (a `world train` snapshot) instead of the committed one.
Figures of docs/world.md, "The look in the prompt's shape". One thread; about 80 s a character.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CAPTION_FORM = "woman, half-body shot, waving, {look}, {scene}, soft daylight"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", type=Path, default=None, help="an SD folder to read (default: the committed world model)")
    parser.add_argument("--characters", default="k4ya,t0bi,r3na")
    parser.add_argument("--overrides", type=json.loads, default={}, help="LoraTrainingParams fields over the world preset")
    parser.add_argument("--scales", default="1")
    parser.add_argument("--unet-targets", default="", help="extra UNet LoRA target modules, comma-separated")
    parser.add_argument("--no-lora", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from diffusers import StableDiffusionPipeline

    from persona_pipeline.resources.diffusion import WORLD_TRAINING, DiffusionBackend
    from persona_pipeline.training.families import stable_diffusion
    from persona_pipeline.world import quality
    from persona_pipeline.world.attributes import DEMO_PERSONA, DEMO_TRIGGER, SCENES
    from persona_pipeline.world.captions import appearance
    from persona_pipeline.world.classifier import load_classifier
    from persona_pipeline.world.quality_run import OTHER_CHARACTERS, PERSONA_SEEDS, lora_loaded, probe
    from persona_pipeline.world.lora_recipe import RECIPE_SEEDS

    if args.unet_targets:
        stable_diffusion.LORA_TARGET_MODULES += args.unet_targets.split(",")
    wanted = args.characters.split(",")
    characters = [(DEMO_TRIGGER, DEMO_PERSONA, PERSONA_SEEDS)] + [(t, c, RECIPE_SEEDS) for t, c in OTHER_CHARACTERS]
    unknown = sorted(set(wanted) - {c[0] for c in characters})
    if unknown:
        parser.error(f"--characters: {', '.join(unknown)} unknown; the world's are {', '.join(c[0] for c in characters)}")
    characters = [c for c in characters if c[0] in wanted]
    classifier = load_classifier()
    with tempfile.TemporaryDirectory(prefix="lora-look-") as folder:
        work = Path(folder)
        diffusion = DiffusionBackend(base_model="world", models_dir=str(work / "models"))
        sd = str(args.sd) if args.sd else diffusion.base_model_path()
        if args.sd:  # train the LoRAs on the same folder the renders read
            diffusion = _on_folder(diffusion, sd)
        pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=True)
        print(f"base: {sd}; LoRA targets {stable_diffusion.LORA_TARGET_MODULES}; overrides {args.overrides}", flush=True)
        for trigger, character, seeds in characters:
            look = quality.look_of(character)
            figures = quality.named_look_figures(pipe, classifier, character, seeds)
            print(f"{trigger} base, named, probe form: {figures.as_dict()}", flush=True)
            pairs = [(CAPTION_FORM.format(look=appearance(character, accessory=False), scene=s), s, seed)
                     for s in SCENES for seed in seeds]
            images = quality.render(pipe, [p for p, _, _ in pairs], [x for _, _, x in pairs])
            figures = quality.look_figures(classifier, images, look, [s for _, s, _ in pairs])
            print(f"{trigger} base, named, caption form: {figures.as_dict()}", flush=True)
            if args.no_lora:
                continue
            dataset = quality.write_persona_dataset(work / f"dataset-{trigger}", character=character, trigger=trigger)
            result = diffusion.train(dataset, work / f"lora-{trigger}", replace(WORLD_TRAINING, **args.overrides),
                                     f"{trigger}.safetensors", log=lambda _: None)
            for step, path in result.checkpoints:
                figures, _ = probe(pipe, classifier, path, trigger, look, seeds=seeds)
                print(f"{trigger} LoRA step {step}: {figures.as_dict()}", flush=True)
            for scale in (float(s) for s in args.scales.split(",")):
                if scale == 1.0:
                    continue
                with lora_loaded(pipe, result.checkpoints[-1][1], "look"):
                    pipe.set_adapters(["look"], [scale])
                    figures, _ = quality.persona_figures(pipe, classifier, seeds=seeds, trigger=trigger, look=look)
                print(f"{trigger} LoRA last checkpoint at strength {scale}: {figures.as_dict()}", flush=True)
    return 0


def _on_folder(diffusion, sd: str):
    """The backend with its base model path pinned to `sd` (a snapshot has no manifest to load it by)."""
    class Pinned(type(diffusion)):
        def base_model_path(self) -> str:
            return sd

    return Pinned(**diffusion.model_dump())


if __name__ == "__main__":
    sys.exit(main())
