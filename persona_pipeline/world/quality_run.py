"""The issue-21 quality measurement, run through the pipeline's own parts: the diffusers backend (its
`world` preset trains the LoRAs and renders the checkpoints), the CLIP resource on the world CLIP
model (identity, alignment, clustering), the lora_model asset's checkpoint scoring, the
generation plan's keep-best and identity gate, and the library's clustering. The attribute
classifier judges every image against what its prompt asked for.

`bench/quality.py` prints these figures; `persona_pipeline_tests/test_world_quality.py` holds them
to the issue's thresholds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from persona_pipeline.world import quality
from persona_pipeline.world.attributes import CLASS_WORD, DEMO_PERSONA, DEMO_TRIGGER, SCENES, Character

# Characters whose LoRAs the identity gate must refuse: unlike the persona everywhere, unlike it but
# in hair colour (the hardest), and unlike it but in the jacket.
OTHER_CHARACTERS: tuple[tuple[str, Character], ...] = (
    ("k4ya", Character(hair_colour="ginger", hair_style="ponytail", jacket_colour="blue", scarf_colour="white")),
    ("t0bi", Character(hair_colour="teal", hair_style="long", jacket_colour="green", scarf_colour="yellow")),
    ("r3na", Character(hair_colour="black", hair_style="bob", jacket_colour="yellow", scarf_colour="blue")),
)
PERSONA_SEEDS = (0, 1, 2, 3)
GROUP_SIZE, KEEP = 4, 2  # "generate 4, keep the best 2", the demo persona's first step


@dataclass
class LoraOutcome:
    trigger: str
    checkpoints: list[tuple[int, Path]]
    figures: dict[int, quality.LookFigures] = field(default_factory=dict)  # step -> the persona probe read back
    images: dict[int, list] = field(default_factory=dict)


def embed(clip, images, folder: Path) -> np.ndarray:
    """CLIP embeddings of PIL images, through the resource's file path API (what the pipeline uses)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:04d}.png"
        image.save(path)
        paths.append(path)
    return clip.embed_images(paths)


def identity_reading(clip, without: tuple[str, ...] = ()) -> Callable[[np.ndarray], np.ndarray]:
    """Image embeddings -> the vectors ClipIdentity(clip, without) scores identity with (unchanged when
    `without` is empty)."""
    from persona_pipeline.identity import project_off

    if not without:
        return lambda vectors: vectors
    directions = clip.embed_texts(list(without))
    return lambda vectors: project_off(vectors, directions)


def leave_one_out_similarities(embeddings: np.ndarray) -> list[float]:
    """Each photo's similarity to the centroid of the other photos."""
    scores = []
    for index in range(len(embeddings)):
        others = np.delete(embeddings, index, axis=0).mean(axis=0)
        scores.append(float(embeddings[index] @ (others / np.linalg.norm(others))))
    return scores


def leave_one_out_floor(embeddings: np.ndarray) -> float:
    """The identity gate's threshold from the persona's own photos: the lowest similarity of any photo
    to the centroid of the others, so every real photo of the persona would pass."""
    return min(leave_one_out_similarities(embeddings))


def train_character_lora(diffusion, work: Path, trigger: str, character: Character, log: Callable[[str], None]) -> LoraOutcome:
    from persona_pipeline.resources.diffusion import WORLD_TRAINING

    dataset = quality.write_persona_dataset(work / f"dataset-{trigger}", character=character, trigger=trigger)
    result = diffusion.train(dataset, work / f"lora-{trigger}", WORLD_TRAINING, f"{trigger}.safetensors", log=log)
    return LoraOutcome(trigger, result.checkpoints)


def probe(pipe, classifier, lora: Path | None, trigger: str, look: dict[str, str], seeds=PERSONA_SEEDS):
    """The persona probe (every scene x seeds) with `lora` loaded at full strength (None: the base)."""
    if lora is None:
        return quality.persona_figures(pipe, classifier, seeds=seeds, trigger=trigger, look=look)
    with lora_loaded(pipe, lora, "probe"):
        return quality.persona_figures(pipe, classifier, seeds=seeds, trigger=trigger, look=look)


@contextmanager
def lora_loaded(pipe, lora: Path, name: str):
    """`lora` active at full strength, loaded as generation loads it (a trigger embedding it bundles too),
    then removed, embedding included."""
    from persona_pipeline.training.families.stable_diffusion import load_lora_file, use_trigger_embeddings

    use_trigger_embeddings(pipe, load_lora_file(pipe, lora, name))
    pipe.set_adapters([name], [1.0])
    try:
        yield
    finally:
        pipe.delete_adapters(name)
        use_trigger_embeddings(pipe, {})


def measure(quick: bool = False, log: Callable[[str], None] = print, work: Path | None = None,
            world_models: Path | None = None, identity_without: tuple[str, ...] = ()) -> dict:
    """Every figure of issue 21 on the committed world models (or the SD model of the world-models folder
    `world_models`, whose CLIP model must be the committed one); returns them as a flat dict. Datasets,
    LoRAs and renders go under `work` (a temporary folder, removed after, when none is given).
    `identity_without`: texts whose directions identity leaves out (ClipIdentity's `without`), in every
    identity figure: checkpoint scoring, the gate and keep-best."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="world-quality-") as folder:
            return measure(quick, log, Path(folder), world_models, identity_without)
    from diffusers import StableDiffusionPipeline

    from persona_pipeline.assets.lora_model import _score_checkpoints
    from persona_pipeline.domain import generation_plan as plan
    from persona_pipeline.domain.checkpoint_selection import rank_checkpoints
    from persona_pipeline.domain.clustering import fit_clusters
    from persona_pipeline.identity import ClipIdentity, reference_for
    from persona_pipeline.personas import TrainingOverrides
    from persona_pipeline.resources.clip import ClipModel
    from persona_pipeline.resources.diffusion import DiffusionBackend
    from persona_pipeline.world.classifier import load_classifier
    from persona_pipeline.world.dataset import world_samples
    from sklearn.metrics import adjusted_rand_score

    work = Path(work)
    if world_models is not None:
        same_clip_as_committed(Path(world_models))
    figures: dict = {}
    classifier = load_classifier()
    diffusion = DiffusionBackend(base_model="world", models_dir=str(work / "models"), world_models_dir=str(world_models or ""))
    clip = ClipModel(model_name="world")
    pipe = StableDiffusionPipeline.from_pretrained(diffusion.base_model_path(), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)

    # 1. The base model follows prompts.
    base = quality.base_prompt_following(pipe, classifier, n=32 if quick else 96)
    figures.update({f"base_{name}": value for name, value in base.items()})
    log(f"base prompt following: {base}")

    # 2. The persona's LoRA learns the look; the base alone does not show it.
    look = quality.look_of(DEMO_PERSONA)
    before, _ = probe(pipe, classifier, None, DEMO_TRIGGER, look)
    named = quality.named_look_figures(pipe, classifier, DEMO_PERSONA, PERSONA_SEEDS)
    figures.update({"persona_named_base": named.all_correct,
                    **{f"persona_named_base_{k}": v for k, v in named.per_attribute.items()}})
    log(f"the look named in words, base alone: {named.as_dict()}")
    persona = train_character_lora(diffusion, work, DEMO_TRIGGER, DEMO_PERSONA, log)
    for step, path in persona.checkpoints:
        persona.figures[step], persona.images[step] = probe(pipe, classifier, path, DEMO_TRIGGER, look)
        log(f"persona LoRA step {step}: {persona.figures[step].as_dict()}")
    final_step = persona.checkpoints[-1][0]
    after = persona.figures[final_step]
    figures.update({"persona_before": before.all_correct, "persona_after": after.all_correct,
                    "persona_scene_kept": after.scene_kept,
                    **{f"persona_after_{k}": v for k, v in after.per_attribute.items()},
                    **{f"persona_before_{k}": v for k, v in before.per_attribute.items()}})

    # 3. Checkpoint selection, as the lora_model asset scores and ranks them.
    source_images = sorted((work / f"dataset-{DEMO_TRIGGER}").rglob("*.png"))
    defaults = TrainingOverrides()
    prompts = [p.format(trigger=DEMO_TRIGGER, class_word=CLASS_WORD) for p in defaults.validation_prompts]
    identity = reference_for(ClipIdentity(clip, identity_without), ClipIdentity(clip, identity_without), source_images)
    scores = _score_checkpoints(diffusion, clip, identity, persona.checkpoints, prompts, list(defaults.validation_seeds),
                                DEMO_TRIGGER, work / "checkpoint-scoring")
    chosen = rank_checkpoints(scores)[0]
    by_step = {step: persona.figures[step].all_correct for step, _ in persona.checkpoints}
    figures.update({"checkpoint_chosen_step": chosen.step, "checkpoint_chosen_accuracy": by_step[chosen.step],
                    "checkpoint_best_accuracy": max(by_step.values()), "checkpoint_accuracy_by_step": by_step})
    log(f"checkpoints: accuracy by step {by_step}, chosen step {chosen.step}")

    # 4. The identity gate: threshold from the persona's photos; its own LoRA passes, others' are refused.
    as_identity = identity_reading(clip, identity_without)
    reference = as_identity(embed(clip, [_open(p) for p in source_images], work / "embed-reference"))
    centroid = reference.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    threshold = leave_one_out_floor(reference)
    own_embedded = embed(clip, persona.images[final_step], work / "embed-own")
    own = as_identity(own_embedded) @ centroid
    figures.update({"gate_threshold": threshold, "gate_own_pass": float(np.mean([plan.passes_identity_gate(float(s), threshold)
                                                                                  for s in own]))})
    refused = []
    for trigger, character in OTHER_CHARACTERS[:1] if quick else OTHER_CHARACTERS:
        other = train_character_lora(diffusion, work, trigger, character, log)
        _, images = probe(pipe, classifier, other.checkpoints[-1][1], trigger, quality.look_of(character))
        scores_other = as_identity(embed(clip, images, work / f"embed-{trigger}")) @ centroid
        share = float(np.mean([not plan.passes_identity_gate(float(s), threshold) for s in scores_other]))
        figures[f"gate_refused_{trigger}"] = share
        refused += [share] * len(images)
    figures["gate_other_refused"] = float(np.mean(refused))
    log(f"identity gate: threshold {threshold:.4f}, own pass {figures['gate_own_pass']:.2f}, others refused "
        f"{figures['gate_other_refused']:.2f}")

    # 5. Keep-best: the demo's prompt shape (trigger and look in words) with the persona's LoRA, 4 per
    #    scene, the best 2 kept by the plan's curation score.
    figures.update(keep_best_figures(pipe, classifier, clip, persona.checkpoints[-1][1], centroid, look, work, as_identity))

    # 6. Clustering: the library's k-means on world CLIP embeddings, against the scenes. Of a persona's library
    #    (her LoRA's probe images, one character as a library holds, labelled by the prompted scene, which it
    #    keeps) and of held-out world images (many characters).
    library = fit_clusters(own_embedded)
    scenes = [scene for scene in SCENES for _ in PERSONA_SEEDS]  # persona_figures renders scene by scene
    figures.update({"library_clusters_k": library.k, "library_clusters_images": len(scenes),
                    "library_clusters_ari": float(adjusted_rand_score(scenes, library.labels))})
    held = list(world_samples(160 if quick else 400, seed=0, split="heldout", size=64, start=20_000))
    clusters = fit_clusters(embed(clip, [s.image for s in held], work / "embed-clusters"))
    figures.update({"clusters_k": clusters.k,
                    "clusters_ari": float(adjusted_rand_score([s.labels["scene"] for s in held], clusters.labels))})
    log(f"clustering: her LoRA's {len(scenes)} images k={library.k}, ARI {figures['library_clusters_ari']:.3f}; "
        f"held-out world images k={clusters.k}, ARI {figures['clusters_ari']:.3f}")
    return figures


def same_clip_as_committed(folder: Path) -> None:
    """The identity, alignment and clustering figures use the CLIP resource, which reads the committed world
    CLIP model; another folder's figures are only comparable when its clip/ is that model (a `--resume-from`
    run copies it unchanged). Raises ValueError naming the folder otherwise."""
    from persona_pipeline.world.model_manifest import COMMITTED_WORLD_MODELS, verify_folder

    def clip_files(path: Path) -> dict:
        return {name: digest for name, digest in verify_folder(path).get("files", {}).items() if name.startswith("clip/")}

    if clip_files(folder) != clip_files(COMMITTED_WORLD_MODELS):
        raise ValueError(f"{folder}: its clip/ is not the committed world CLIP model, which the quality figures read "
                         "identity and clusters with; measure only a run that kept it (world train --resume-from)")


def keep_best_figures(pipe, classifier, clip, lora: Path, centroid: np.ndarray, look: dict[str, str], work: Path,
                      as_identity: Callable[[np.ndarray], np.ndarray] = lambda vectors: vectors) -> dict:
    from persona_pipeline.domain import generation_plan as plan

    prompts = [f"photo of {DEMO_TRIGGER} {CLASS_WORD}, teal bob, yellow jacket, red scarf, {scene}" for scene in SCENES]
    with lora_loaded(pipe, lora, "keep"):
        images = quality.render(pipe, [p for p in prompts for _ in range(GROUP_SIZE)],
                                [1000 + i for i in range(len(prompts) * GROUP_SIZE)])
    embedded = embed(clip, images, work / "embed-keep")
    texts = clip.embed_texts([p.replace(f"{DEMO_TRIGGER} ", "") for p in prompts])
    read = classifier.predict(images)
    right = [sum(r[k] == look[k] for k in look) / len(look) for r in read]
    kept, culled = [], []
    for winners, losers in keep_best_by_prompt(embedded, texts, centroid, identity_embedded=as_identity(embedded)):
        kept += [right[i] for i in winners]
        culled += [right[i] for i in losers]
    return {"keep_best_kept_accuracy": float(np.mean(kept)), "keep_best_culled_accuracy": float(np.mean(culled))}


def keep_best_by_prompt(embedded: np.ndarray, texts: np.ndarray, centroid: np.ndarray, group_size: int = GROUP_SIZE,
                        keep: int = KEEP, identity_embedded: np.ndarray | None = None) -> list[tuple[list[int], list[int]]]:
    """The generation plan's "generate `group_size`, keep the best `keep`" on images rendered `group_size`
    per prompt in prompt order: per prompt, (kept, culled) image indices, best first, by the curation
    score of each image's alignment with its prompt's text embedding and its identity against `centroid`
    (read from `identity_embedded` when identity is read from other vectors than alignment)."""
    from persona_pipeline.domain import generation_plan as plan

    identity = embedded if identity_embedded is None else identity_embedded
    return [plan.keep_best([(i, plan.curation_score(float(embedded[i] @ text), float(identity[i] @ centroid)))
                            for i in range(group * group_size, (group + 1) * group_size)], keep)
            for group, text in enumerate(texts)]


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")

