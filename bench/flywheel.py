"""The dataset flywheel on the world models (issue 23): does a persona's LoRA get better as its dataset grows?

    python bench/flywheel.py [--quick] [--probe-seeds N] [--threads N]

Start: 6 photos of the demo persona (the world renderer draws them; m1ra: teal bob, yellow jacket,
red scarf). Three datasets, each trained into a LoRA on the world base model with the world preset:
A. the 6 photos alone;
B. A + one enrichment round: every photo edited by the persona's instructions through the pipeline's
   enrichment (persona_pipeline/enrichment.py: plan, edit requests on the diffusers backend's edit
   model, the output checks, the identity and near-duplicate judge), auto-reviewed by identity (an
   edit is accepted when the judge keeps it: identity at or above the photos' leave-one-out floor,
   not a near duplicate); the edit model is the tiny Qwen-Image-Edit, random weights (no world edit
   model exists offline), so this round measures what the loop does with an edit model that cannot edit;
C. B + one flywheel round: winners made as the pipeline makes them. B's LoRA renders 4 candidates of
   the persona per scene (seeds unlike the probe's), the generation plan's keep-best keeps 2 by its
   curation score (prompt alignment and identity), and the best-scored kept one stands in for the
   reviewers' pick; the same judge then keeps the winners at or above the floor, and the generated
   share is bounded as training_dataset bounds it (domain/dataset_share.py, 0.5).

Each LoRA is probed on "photo of m1ra woman, <scene>" (8 scenes x seeds) and scored:
- attribute accuracy: share of images whose four look attributes all read right (world classifier);
- identity consistency: mean world-CLIP cosine of the images to the 6 photos' centroid (and spread);
- prompt alignment: share of images showing the prompted scene (world classifier).
Targets (issue 23): each round no worse than the one before on identity consistency, and C above A
on identity consistency; each margin is printed with a 95% paired bootstrap interval over the probe
images. --identity-without-scenes reads identity everywhere with the scenes' text directions taken
out (generation.identity_without_themes). Exit 1 when a target is missed. Nothing here is tuned to
the targets. --quick: 2 probe seeds, one edit per photo, half the training steps.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import emit, record  # noqa: E402
from _torch_bench import quiet_torch  # noqa: E402
from persona_pipeline.world.commands import positive_int  # noqa: E402

INSTRUCTIONS = [
    {"kind": "angle", "text": "turn her slightly to the left, keep her face, hair and clothes"},
    {"kind": "expression", "text": "make her smile, keep her face, hair and clothes"},
    {"kind": "lighting", "text": "golden hour light, keep her face, hair and clothes"},
    {"kind": "background", "text": "put her on a beach, keep her face, hair and clothes"},
]
PHOTOS, SHARE = 6, 0.5


def _dataset(folder: Path, items: list[tuple[Path, str]], trigger: str) -> Path:
    """A kohya folder (`10_<trigger> woman/NNN.png` + caption) of (image, caption) pairs."""
    subset = folder / f"10_{trigger} woman"
    subset.mkdir(parents=True)
    for index, (image, caption) in enumerate(items):
        shutil.copyfile(image, subset / f"{index:03d}.png")
        (subset / f"{index:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def measure(quick: bool, work: Path, log, probe_seeds: int | None = None, without_scenes: bool = False) -> dict:
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from persona_pipeline.domain.captions import training_caption
    from persona_pipeline.domain.dataset_share import bound_generated
    from persona_pipeline.domain.workflows import load_template
    from persona_pipeline.enrichment import (SourceImage, edit_caption, edit_model_for, edit_request, judge,
                                             output_refusal, plan_edits, run_edits)
    from persona_pipeline.generation.backends import ImageJob
    from persona_pipeline.generation.backends.diffusers import DiffusersBackend
    from persona_pipeline.identity import ClipIdentity, reference_for
    from persona_pipeline.persona_dataset import EnrichmentSettings
    from persona_pipeline.resources.clip import ClipModel
    from persona_pipeline.resources.diffusion import WORLD_TRAINING, DiffusionBackend
    from persona_pipeline.settings import REPO_WORKFLOWS
    from persona_pipeline.world import quality
    from persona_pipeline.world.attributes import CLASS_WORD, DEMO_PERSONA, DEMO_TRIGGER, SCENES
    from persona_pipeline.world.classifier import load_classifier
    from persona_pipeline.world.quality_run import (GROUP_SIZE, KEEP, embed, identity_reading, keep_best_by_prompt,
                                                       leave_one_out_floor, leave_one_out_similarities)

    trigger = DEMO_TRIGGER
    params = replace(WORLD_TRAINING, steps=WORLD_TRAINING.steps // 2 if quick else WORLD_TRAINING.steps)
    seeds = tuple(range(probe_seeds or (2 if quick else 4)))
    classifier = load_classifier()
    diffusion = DiffusionBackend(base_model="world", models_dir=str(work / "models"))
    clip = ClipModel(model_name="world")
    pipe = StableDiffusionPipeline.from_pretrained(diffusion.base_model_path(), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)

    # The 6 photos, as the persona's accepted source photos.
    start = quality.write_persona_dataset(work / "photos", character=DEMO_PERSONA, trigger=trigger, count=PHOTOS)
    photo_files = sorted(start.rglob("*.png"))
    photos = [SourceImage(p, f"{i:064d}", p.with_suffix(".txt").read_text().strip(), f"photos/{p.name}")
              for i, p in enumerate(photo_files)]
    # Identity as the persona setting generation.identity_without_themes reads it when asked: the scenes'
    # text directions out, in the judge, keep-best and the probe's identity consistency alike.
    without = tuple(SCENES) if without_scenes else ()
    as_identity = identity_reading(clip, without)
    identity = reference_for(ClipIdentity(clip, without), ClipIdentity(clip, without), photo_files)
    centroid = identity.centroid
    floor = leave_one_out_floor(as_identity(clip.embed_images(photo_files)))
    log(f"6 photos; identity floor (leave-one-out) {floor:.4f}; each photo against the others' centroid: "
        f"{', '.join(f'{x:.4f}' for x in leave_one_out_similarities(as_identity(clip.embed_images(photo_files))))}"
        f"{'; identity without the scenes' if without else ''}")

    def train_and_probe(name: str, items: list[tuple[Path, str]]) -> dict:
        started = time.perf_counter()
        folder = _dataset(work / f"dataset-{name}", items, trigger)
        lora = diffusion.train(folder, work / f"lora-{name}", params, f"{name}.safetensors", log=lambda _: None).checkpoints[-1][1]
        pipe.load_lora_weights(str(lora), adapter_name=name)
        pipe.set_adapters([name], [1.0])
        try:
            figures, images = quality.persona_figures(pipe, classifier, seeds=seeds, trigger=trigger,
                                                      look=quality.look_of(DEMO_PERSONA))
        finally:
            pipe.delete_adapters(name)
        similarity = as_identity(embed(clip, images, work / f"probe-{name}")) @ centroid
        out = {"images": len(items), "accuracy": figures.all_correct, "identity": float(np.mean(similarity)), "similarity": similarity,
               "identity_std": float(np.std(similarity)), "alignment": figures.scene_kept, "lora": lora}
        log(f"dataset {name}: {len(items)} images, accuracy {out['accuracy']:.3f}, identity {out['identity']:.4f} "
            f"(sd {out['identity_std']:.4f}), alignment {out['alignment']:.3f} ({time.perf_counter() - started:.0f} s)")
        return out

    base_items = [(p.path, p.caption) for p in photos]
    a = train_and_probe("A-photos", base_items)

    # Enrichment round: the pipeline's plan, edit requests and backend, then the judge.
    settings = EnrichmentSettings.model_validate({"instructions": INSTRUCTIONS, "per_photo": 1 if quick else 2, "seed": 0,
                                                  "model": "tiny-qwen-edit", "steps": 4, "cfg": 4.0, "width": 64,
                                                  "height": 64, "min_identity": floor})
    edit, weights = edit_model_for(settings, lambda: "sd15", diffusion.base_model)
    backend = DiffusersBackend(diffusion, log=lambda _: None)
    template = load_template(REPO_WORKFLOWS / f"{edit.template}.json")
    plans = plan_edits(photos, settings)
    jobs = [ImageJob(key=p.stem, request=edit_request(template, settings, edit, weights, p, "", backend),
                     folder=work / "edits", stem=p.stem, label="bench/enrichment") for p in plans]
    started = time.perf_counter()
    results = run_edits(backend, jobs)
    made = [(plan, job, results[job.key].image_path) for plan, job in zip(plans, jobs) if results[job.key].image_path]
    verdicts = judge([Path(m[2]) for m in made], [output_refusal(Path(m[2]), (64, 64)) for m in made], identity, floor,
                     clip.embed_images, photos, 0.98)
    accepted_edits = [(Path(path), edit_caption(plan.photo.caption, plan))
                      for (plan, _, path), verdict in zip(made, verdicts) if verdict.status == "pending"]
    reasons = Counter("identity below the floor" if " is below " in (v.reason or "") else (v.reason or "").split(" (")[0]
                      for v in verdicts if v.status == "dropped")
    log(f"enrichment: {len(jobs)} edits with {edit.title} ({weights}) in {time.perf_counter() - started:.0f} s, "
        f"{len(made)} made, {len(accepted_edits)} accepted by identity; dropped: {dict(reasons) or 'none'}, "
        f"best identity {max((v.identity for v in verdicts if v.identity is not None), default=float('nan')):.3f}")
    kept, _, note = bound_generated(PHOTOS, accepted_edits, SHARE)
    b = train_and_probe("B-enriched", base_items + kept)

    # Flywheel round: winners made the way the pipeline makes them. B's LoRA renders GROUP_SIZE candidates per scene,
    # the generation plan's keep-best (curation score: prompt alignment and identity) keeps KEEP, and the
    # reviewers' pick is stood in for by the pipeline's own order (the best-scored one kept); then the same judge
    # and the generated-share bound as for enrichment.
    pipe.load_lora_weights(str(b["lora"]), adapter_name="winners")
    pipe.set_adapters(["winners"], [1.0])
    prompts = quality.persona_prompts(trigger)
    renders = quality.render(pipe, [p for p in prompts for _ in range(GROUP_SIZE)], [100 + i for i in range(len(prompts) * GROUP_SIZE)])
    pipe.delete_adapters("winners")
    render_files = []
    for index, image in enumerate(renders):
        path = work / "renders" / f"r{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        render_files.append(path)
    embedded = clip.embed_images(render_files)
    texts = clip.embed_texts([p.replace(f"{trigger} ", "") for p in prompts])
    winner_files = [render_files[kept_ids[0]] for kept_ids, _ in keep_best_by_prompt(embedded, texts, centroid,
                                                                                            identity_embedded=as_identity(embedded))]
    look = quality.look_of(DEMO_PERSONA)
    read = dict(zip(render_files, classifier.predict(renders)))
    look_right = {p: all(read[p][k] == v for k, v in look.items()) for p in render_files}
    log(f"flywheel renders: {len(renders)} ({GROUP_SIZE} a scene), the look right in {np.mean(list(look_right.values())):.3f}; "
        f"the winners (best kept by keep-best {KEEP} of {GROUP_SIZE}): {np.mean([look_right[p] for p in winner_files]):.3f}")
    dataset_b = photos + [SourceImage(p, f"e{i:063d}", c, f"edits/{p.name}") for i, (p, c) in enumerate(kept)]
    verdicts = judge(winner_files, [output_refusal(p, (64, 64)) for p in winner_files], identity, floor,
                     clip.embed_images, dataset_b, 0.98)
    for path, scene, verdict in zip(winner_files, SCENES, verdicts):
        log(f"  winner {path.name} ({scene}): identity {verdict.identity:.4f}, look {'right' if look_right[path] else 'wrong'}"
            f", {'kept' if verdict.status == 'pending' else 'dropped'}")
    winners = [(p, training_caption(trigger, f"{CLASS_WORD}, {scene}")) for p, scene, v in zip(winner_files, SCENES, verdicts)
               if v.status == "pending"]
    kept_c, left, note = bound_generated(PHOTOS, kept + winners, SHARE)
    log(f"flywheel: {len(winner_files)} winners, {len(winners)} kept by identity, {len(kept_c)} in the dataset"
        f"{'; ' + note if note else ''}")
    c = train_and_probe("C-flywheel", base_items + kept_c)
    return {"A": a, "B": b, "C": c, "edits": len(jobs), "edits_accepted": len(accepted_edits), "winners": len(winners),
            "winners_in": len(kept_c) - len(kept), "floor": floor}


def paired_interval(before, after, rounds: int = 10_000) -> tuple[float, float]:
    """95% bootstrap interval of mean(after - before) over the probe images. Both LoRAs render the same
    prompts and seeds, so the images pair up; resampling the pairs says how far the margin could move
    with another set of probe seeds."""
    import numpy as np

    differences = np.asarray(after) - np.asarray(before)
    rng = np.random.default_rng(0)
    means = differences[rng.integers(0, len(differences), (rounds, len(differences)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def report(figures: dict) -> bool:
    ok_all = True
    print(f"\n{'dataset':<14} {'images':>6} {'attr acc':>9} {'identity':>9} {'id sd':>7} {'align':>7}")
    for key in ("A", "B", "C"):
        f = figures[key]
        print(f"{key:<14} {f['images']:>6} {f['accuracy']:>9.3f} {f['identity']:>9.4f} {f['identity_std']:>7.4f} "
              f"{f['alignment']:>7.3f}")
    a, b, c = figures["A"], figures["B"], figures["C"]
    print(f"\nenrichment: {figures['edits_accepted']} of {figures['edits']} edits accepted; flywheel: "
          f"{figures['winners']} winners kept, {figures['winners_in']} in dataset C (share bound {SHARE})")
    for name, before, after in (("enrichment round (B vs A)", a, b), ("flywheel round (C vs B)", b, c)):
        ok = after["identity"] >= before["identity"]
        ok_all &= ok
        low, high = paired_interval(before["similarity"], after["similarity"])
        print(f"{name}: identity {after['identity'] - before['identity']:+.4f} (95% interval {low:+.4f} to {high:+.4f}), accuracy "
              f"{after['accuracy'] - before['accuracy']:+.3f}, alignment {after['alignment'] - before['alignment']:+.3f}"
              f"  no worse on identity: {'PASS' if ok else 'FAIL'}")
        record(f"{name}: identity consistency", reference=before["identity"], ours=after["identity"], unit="cosine",
               better="higher", target="no worse", ok=ok)
    margin = c["identity"] - a["identity"]
    ok = margin > 0
    ok_all &= ok
    low, high = paired_interval(a["similarity"], c["similarity"])
    print(f"final vs 6 photos: identity margin {margin:+.4f} (C {c['identity']:.4f} vs A {a['identity']:.4f}; 95% interval "
          f"{low:+.4f} to {high:+.4f}) {'PASS' if ok else 'FAIL'}")
    record("final (C) vs 6-photo (A) LoRA: identity consistency", reference=a["identity"], ours=c["identity"],
           unit="cosine", better="higher", target="C > A", ok=ok, note=f"margin {margin:+.4f}")
    for key, label in (("accuracy", "attribute accuracy"), ("alignment", "prompt alignment (scene kept)")):
        record(f"final (C) vs 6-photo (A) LoRA: {label}", reference=a[key], ours=c[key], unit="share", better="higher")
    return ok_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 probe seeds, one edit per photo, half the training steps")
    parser.add_argument("--probe-seeds", type=positive_int, default=None, metavar="N",
                        help="probe each LoRA with seeds 0..N-1 per scene (default 4, --quick 2); more seeds narrow the intervals")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads (default 1: with another job on a 2-core machine, two threads ran about 10x slower)")
    parser.add_argument("--identity-without-scenes", action="store_true",
                        help="read identity with the scenes' text directions taken out (generation.identity_without_themes)")
    args = parser.parse_args()
    quiet_torch(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-flywheel-") as folder:
        figures = measure(args.quick, Path(folder), lambda line: print(f"  {line}", flush=True), args.probe_seeds,
                          args.identity_without_scenes)
    ok = report(figures)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    emit()
    sys.exit(code)
