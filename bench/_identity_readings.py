"""Development runs for issue 21's identity gate: ways of reading identity from world CLIP embeddings,
compared on the same images (docs/world.md, "The 4 x 128 model through world train", says what they
measured). A diagnostic: run_all does not run it, and nothing here changes the product's reading.

    python bench/_identity_readings.py                       # the committed world CLIP model
    python bench/_identity_readings.py --clip /tmp/wclip     # another world-models folder's clip/

Images, all at 64 px: her 18 dataset photos (the reference, drawn as bench/quality.py draws them),
64 renders of her and of each other character in random shots (exact looks), and her and k4ya's
LoRA images (the `world` preset, the probe's 8 scenes x 4 seeds, on the committed SD model), which
take about 2 minutes to train and draw. For each reading the threshold is the leave-one-out floor of
her photos under that reading (as bench/quality.py sets the gate), then the share of her images
passing and of the others' refused. Readings:
- centroid: cosine to the centroid of her photos (what the product does);
- nearest k: the mean of the k highest cosines to her photos (k = 1 is a face gallery's match);
- scene taken out: every embedding projected off the span of the 8 scene names' text embeddings and
  normalised again, then the centroid.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def centroid_reading(x: np.ndarray, photos: np.ndarray) -> np.ndarray:
    centre = photos.mean(axis=0)
    return x @ (centre / np.linalg.norm(centre))


def nearest_reading(k: int):
    def read(x: np.ndarray, photos: np.ndarray) -> np.ndarray:
        return np.sort(x @ photos.T, axis=1)[:, -min(k, len(photos)):].mean(axis=1)
    return read


def floor(photos: np.ndarray, read) -> float:
    """The lowest reading of any photo against the others."""
    return min(float(read(photos[i:i + 1], np.delete(photos, i, axis=0))[0]) for i in range(len(photos)))


def lora_images(work: Path) -> dict[str, list]:
    from diffusers import StableDiffusionPipeline

    from persona_pipeline.resources.diffusion import DiffusionBackend
    from persona_pipeline.world import quality
    from persona_pipeline.world.attributes import DEMO_PERSONA, DEMO_TRIGGER
    from persona_pipeline.world.classifier import load_classifier
    from persona_pipeline.world.quality_run import OTHER_CHARACTERS, probe, train_character_lora

    diffusion = DiffusionBackend(base_model="world", models_dir=str(work / "models"))
    pipe = StableDiffusionPipeline.from_pretrained(diffusion.base_model_path(), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    classifier = load_classifier()
    images = {}
    for trigger, character in [(DEMO_TRIGGER, DEMO_PERSONA), OTHER_CHARACTERS[0]]:
        lora = train_character_lora(diffusion, work, trigger, character, log=lambda _: None).checkpoints[-1][1]
        images[trigger] = probe(pipe, classifier, lora, trigger, quality.look_of(character))[1]
    return images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, default=None, metavar="DIR",
                        help="a world-models folder whose clip/ to read with (default: the committed one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import _clip_variants as variants

    from persona_pipeline.demo_photos import demo_shots
    from persona_pipeline.identity import project_off
    from persona_pipeline.world.attributes import DEMO_PERSONA, DEMO_TRIGGER, SCENES
    from persona_pipeline.world.model_manifest import COMMITTED_WORLD_MODELS
    from persona_pipeline.world.quality_run import OTHER_CHARACTERS
    from persona_pipeline.world.render import render_shot
    from persona_pipeline.world.world_models import load_world_clip

    model, _, tokenizer = load_world_clip(args.clip or COMMITTED_WORLD_MODELS)
    model.eval()
    rng = random.Random(7)  # her dataset photos, as quality.write_persona_dataset draws them
    photos = variants.embed(model, [render_shot(replace(shot, character=DEMO_PERSONA), 64, rng.getrandbits(32))
                                    for shot in demo_shots(18)])
    sets = {"her renders": variants.embed(model, variants.renders_of(DEMO_PERSONA, 64, "own")[1])}
    sets.update({f"{trigger} renders": variants.embed(model, variants.renders_of(character, 64, "other:" + trigger)[1])
                 for trigger, character in OTHER_CHARACTERS})
    with tempfile.TemporaryDirectory(prefix="identity-readings-") as folder:
        for trigger, images in lora_images(Path(folder)).items():
            sets["her LoRA" if trigger == DEMO_TRIGGER else f"{trigger}'s LoRA"] = variants.embed(model, images)
    with torch.no_grad():
        scene_texts = F.normalize(model.encode_text(tokenizer(list(SCENES))), dim=-1).numpy()
    def scene_out(x: np.ndarray) -> np.ndarray:  # what ClipIdentity(clip, SCENES) reads
        return project_off(x, scene_texts)
    readings = [("centroid", lambda x: x, centroid_reading)]
    readings += [(f"nearest {k}", lambda x: x, nearest_reading(k)) for k in (1, 3, 5)]
    readings += [("scene taken out, centroid", scene_out, centroid_reading)]
    print(f"{'reading':28s} {'threshold':>9s}  " + "  ".join(f"{name:>14s}" for name in sets))
    for name, transform, read in readings:
        reference = transform(photos)
        threshold = floor(reference, read)
        shares = []
        for set_name, x in sets.items():
            passing = read(transform(x), reference) >= threshold
            shares.append(np.mean(passing) if set_name.startswith("her ") else np.mean(~passing))
        print(f"{name:28s} {threshold:9.3f}  " + "  ".join(f"{share:14.1%}" for share in shares))
    print("(her sets: share passing; the others: share refused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
