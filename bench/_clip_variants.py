"""Development runs of world CLIP variants for issue 21's identity gate and clustering figures
(docs/world.md, "The world CLIP model, measured against the gate and the clusters", says what they measured).

    python bench/_clip_variants.py committed
    python bench/_clip_variants.py NAME '{"steps": 1500, "batches": "pairs", "vision": {"layers": 4, "width": 128}}'

`committed` measures the committed world CLIP model; any other NAME trains a variant from scratch
as `persona_pipeline/world/train_clip.py` does (AdamW, warm-up then cosine, symmetric contrastive
loss, one torch thread, seed 0) with the spec's changes: `steps`, `vision` / `text` config keys,
`embed_dim`, and `batches`: "random" (the committed recipe: 64 world samples in order) or "pairs"
(32 world samples, each beside a copy that differs in one attribute drawn at random: hair colour or
style, jacket, scarf, accessory, scene, framing, pose or lighting, so every batch holds negatives
that only that attribute tells apart). Nothing here is written to the repository; the variant's
weights go to $TMPDIR.

Figures, each from the world's own labels, on renders drawn by the world renderer at 64 px:
- zero-shot accuracy on 256 held-out images for scene, hair colour, hair style, jacket and scarf
  (the prompt is the attribute's caption phrase);
- clustering: the library's `fit_clusters` (k by silhouette) and k-means with k = 8 on 160
  held-out world images (many characters, what bench/quality.py clusters) and on 160 renders of the
  demo persona in random shots (one character, as a persona's library is); adjusted Rand index
  against the scenes, and for the persona also against scene x lighting;
- the identity gate on renders: the threshold is the leave-one-out floor of the persona's 18
  dataset renders (as bench/quality.py sets it), then the share of 64 renders of the persona that
  pass and of 64 renders of each other character that are refused.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from persona_pipeline.demo_photos import demo_shots  # noqa: E402
from persona_pipeline.domain.clustering import fit_clusters  # noqa: E402
from persona_pipeline.world import train_clip  # noqa: E402
from persona_pipeline.world.attributes import (ACCESSORIES, DEMO_PERSONA, FRAMINGS, HAIR_COLOURS, HAIR_STYLES,  # noqa: E402
                                               JACKET_COLOURS, LIGHTING, POSES, SCARF_CHOICES, SCARF_COLOURS, SCENES,
                                               is_demo_persona, sample_shot)
from persona_pipeline.world.captions import world_caption  # noqa: E402
from persona_pipeline.world.dataset import world_samples, world_shot  # noqa: E402
from persona_pipeline.world.quality_run import OTHER_CHARACTERS, leave_one_out_floor  # noqa: E402
from persona_pipeline.world.render import render_shot  # noqa: E402

ONE_ATTRIBUTE = {"hair_colour": list(HAIR_COLOURS), "hair_style": list(HAIR_STYLES), "jacket_colour": list(JACKET_COLOURS),
                 "scarf_colour": list(SCARF_CHOICES), "accessory": list(ACCESSORIES), "scene": list(SCENES),
                 "framing": list(FRAMINGS), "pose": list(POSES), "lighting": list(LIGHTING)}
SHOT_FIELDS = ("scene", "framing", "pose", "lighting")


def one_attribute_changed(shot, rng: random.Random):
    """The shot with one attribute set to another value (a world character still: no demo look, no
    scarf the colour of the jacket)."""
    while True:
        key = rng.choice(list(ONE_ATTRIBUTE))
        value = rng.choice([v for v in ONE_ATTRIBUTE[key] if v != shot.labels()[key]])
        changed = (replace(shot, **{key: value}) if key in SHOT_FIELDS
                   else replace(shot, character=replace(shot.character, **{key: value})))
        if changed.character.scarf_colour != changed.character.jacket_colour and not is_demo_persona(changed.character):
            return changed


def batch(step: int, size: int, kind: str, seed: int = 0) -> list[tuple]:
    if kind == "random":  # the committed recipe's batches
        return [(s.image, s.caption) for s in train_clip._batch(train_clip.ClipSettings(seed=seed, batch_size=size), step)]
    rng = random.Random(f"pairs:{seed}:{step}")
    pairs = []
    for index in range(size // 2):
        shot, render_seed = world_shot(seed, (step * (size // 2) + index) % 50_000, "train")
        changed = one_attribute_changed(shot, rng)
        pairs += [(render_shot(shot, 64, render_seed), world_caption(shot)),
                  (render_shot(changed, 64, rng.getrandbits(32)), world_caption(changed))]
    return pairs


def train(config: dict, steps: int, kind: str, log=print):
    torch.manual_seed(0)
    model, tokenizer = train_clip._create(config)
    optimizer, schedule = train_clip.optimizer_for(model, 1e-3, steps)
    started = time.perf_counter()
    for step in range(steps):
        pairs = batch(step, 64, kind)
        loss = train_clip.contrastive_step(model, tokenizer, optimizer, schedule, [p[0] for p in pairs], [p[1] for p in pairs])
        if step % 100 == 0:
            log(f"step {step}: loss {loss:.3f}, {time.perf_counter() - started:.0f} s")
    return model, tokenizer, (time.perf_counter() - started) / steps


def embed(model, images) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([F.normalize(model.encode_image(train_clip._pixels(model, images[i:i + 128])), dim=-1)
                          for i in range(0, len(images), 128)]).numpy()


def renders_of(character, count: int, name: str):
    rng = random.Random(name)
    shots = [sample_shot(rng, character) for _ in range(count)]
    return shots, [render_shot(shot, 64, rng.getrandbits(32)) for shot in shots]


def measure(model, tokenizer) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    model.eval()
    figures = {}
    held = list(world_samples(256, 0, "heldout", 64, start=30_000))
    embedded = embed(model, [s.image for s in held])
    for key, classes, phrase in (("scene", list(SCENES), "{}"), ("hair_colour", list(HAIR_COLOURS), "{} hair"),
                                 ("hair_style", list(HAIR_STYLES), None), ("jacket_colour", list(JACKET_COLOURS), "{} jacket"),
                                 ("scarf_colour", list(SCARF_COLOURS), "{} scarf")):
        prompts = [HAIR_STYLES[c] for c in classes] if phrase is None else [phrase.format(c) for c in classes]
        with torch.no_grad():
            texts = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).numpy()
        predicted = (embedded @ texts.T).argmax(1)
        judged = [(classes[p], s.labels[key]) for p, s in zip(predicted, held) if s.labels[key] in classes]
        figures[f"zero_shot_{key}"] = float(np.mean([a == b for a, b in judged]))

    held = list(world_samples(160, 0, "heldout", 64, start=20_000))
    library = [("heldout", [s.shot for s in held], [s.image for s in held]), ("persona", *renders_of(DEMO_PERSONA, 160, "library"))]
    for name, shots, images in library:
        embedded = embed(model, images)
        scenes = [shot.scene for shot in shots]
        clusters = fit_clusters(embedded)
        figures[f"ari_{name}"] = float(adjusted_rand_score(scenes, clusters.labels))
        figures[f"k_{name}"] = clusters.k
        figures[f"ari_{name}_k8"] = float(adjusted_rand_score(scenes, KMeans(8, n_init=10, random_state=0).fit_predict(embedded)))
        if name == "persona":
            figures["ari_persona_scene_x_lighting"] = float(adjusted_rand_score([f"{s.scene} / {s.lighting}" for s in shots], clusters.labels))

    rng = random.Random(7)
    reference = embed(model, [render_shot(replace(shot, character=DEMO_PERSONA), 64, rng.getrandbits(32)) for shot in demo_shots(18)])
    centroid = reference.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    threshold = leave_one_out_floor(reference)
    figures["gate_threshold"] = threshold
    figures["gate_own_pass"] = float(np.mean(embed(model, renders_of(DEMO_PERSONA, 64, "own")[1]) @ centroid >= threshold))
    for trigger, character in OTHER_CHARACTERS:
        scores = embed(model, renders_of(character, 64, "other:" + trigger)[1]) @ centroid
        figures[f"gate_refused_{trigger}"] = float(np.mean(scores < threshold))
    return figures


def main() -> int:
    torch.set_num_threads(1)
    if len(sys.argv) < 2 or (sys.argv[1] != "committed" and len(sys.argv) != 3):
        print(__doc__.split("\n\n")[1])
        return 2
    name = sys.argv[1]
    if name == "committed":
        from persona_pipeline.world.model_manifest import COMMITTED_WORLD_MODELS
        from persona_pipeline.world.world_models import load_world_clip

        model, _, tokenizer = load_world_clip(COMMITTED_WORLD_MODELS)
        result = {"name": name}
    else:
        spec = json.loads(sys.argv[2])
        config = json.loads(json.dumps(train_clip.CLIP_CONFIG))
        config["vision_cfg"].update(spec.get("vision", {}))
        config["text_cfg"].update(spec.get("text", {}))
        config["embed_dim"] = spec.get("embed_dim", config["embed_dim"])
        model, tokenizer, per_step = train(config, int(spec.get("steps", 1500)), spec.get("batches", "random"))
        result = {"name": name, "spec": spec, "seconds_per_step": round(per_step, 3),
                  "parameters": sum(p.numel() for p in model.parameters())}
        torch.save(model.state_dict(), Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / f"world-clip-{name}.pt")
    result.update({k: round(v, 4) if isinstance(v, float) else v for k, v in measure(model, tokenizer).items()})
    print("RESULT", json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
