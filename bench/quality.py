"""Quality of the committed world models (issue 21): base model against the persona's LoRA, side by side.

    python bench/quality.py [--quick]

Every figure is read from images by the world's attribute classifier and judged against what the
prompt asked for (the world's own labels), never by a CLIP model grading itself. The run goes
through the pipeline's own parts (persona_pipeline/world/quality_run.py): the diffusers backend's
`world` preset trains each LoRA, the lora_model asset's scoring ranks its checkpoints, the world
CLIP model scores identity and feeds the library's clustering.

Rows (reference = what a user has without the part being measured):
1. base model, held-out world captions (96; --quick 32): share of images showing the captioned
   scene, hair, jacket and scarf; reference: chance. Target: scene >= 70 %.
2. "photo of m1ra woman, <scene>", 8 scenes x 4 seeds: the persona's look (teal bob, yellow
   jacket, red scarf: all four read right) with the base model alone (reference) and with the
   persona's LoRA (ours). Targets: <= 25 % before, >= 80 % after; the scene kept >= 60 %.
   Printed beside it, no target: the same prompts with the look written out in place of the
   trigger word, base alone: what a LoRA that taught the trigger the look could reach.
3. checkpoint selection: the look accuracy of the checkpoint the asset's ranking picks against the
   best checkpoint's. Target: within 5 points.
4. identity gate (threshold: the lowest leave-one-out similarity of the persona's own photos):
   share of the persona's LoRA images passing (target >= 90 %) and of three other characters'
   LoRA images refused (--quick: one; target >= 90 %).
5. keep-best (4 per scene, best 2 by the plan's curation score): look accuracy of the kept
   against the culled. Target: kept higher.
6. clustering by world CLIP embeddings (the library's fit_clusters), adjusted Rand index against
   the scenes, target >= 0.6, of two sets: the persona's library (her LoRA's 32 probe images, one
   character in 8 prompted scenes, as a persona's library holds) and 400 held-out world images
   (--quick 160; many characters, so their colours split the clusters too).

--identity-without-scenes reads every identity figure with the 8 scenes' text directions taken out
(the persona setting generation.identity_without_themes). Exit 1 when a target is missed. --quick took 112-134 s on one thread here (the other core busy);
the full run trains two more LoRAs and draws three times the base prompts (not timed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import emit, record  # noqa: E402  (bench/, the script's folder, is on sys.path)

CHANCE = {"scene": 1 / 8, "hair_colour": 1 / 8, "hair_style": 1 / 5, "jacket_colour": 1 / 8, "scarf_colour": 1 / 8}


def report(figures: dict) -> bool:
    """Print and record every row; True when every target holds."""
    ok_all = True

    def row(metric, reference, ours, target, ok, note=""):
        nonlocal ok_all
        ok_all = ok_all and (ok is not False)
        verdict = "" if ok is None else (" PASS" if ok else " FAIL")
        ref = "-" if reference is None else f"{reference:.3f}"
        print(f"{metric:<72} {ref:>7} {ours:>7.3f}  {target}{verdict}")
        record(metric, reference=reference, ours=ours, unit="share", better="higher", target=target, ok=ok, note=note)

    print(f"{'figure':<72} {'ref':>7} {'ours':>7}  target")
    for name in ("scene", "hair_colour", "hair_style", "jacket_colour", "scarf_colour"):
        value = figures[f"base_{name}"]
        target, ok = ("scene >= 0.70", value >= 0.70) if name == "scene" else ("", None)
        row(f"base model follows held-out captions: {name} (reference: chance)", CHANCE[name], value, target, ok)
    before, after = figures["persona_before"], figures["persona_after"]
    row("persona look, all four right: base alone (ref) vs the persona's LoRA", before, after,
        "before <= 0.25, after >= 0.80", before <= 0.25 and after >= 0.80)
    for name in ("hair_colour", "hair_style", "jacket_colour", "scarf_colour"):
        row(f"persona look: {name}, base alone (ref) vs LoRA", figures[f"persona_before_{name}"],
            figures[f"persona_after_{name}"], "", None)
    row("persona look, all four right: the look named in words, base alone (what a trigger could reach)", None,
        figures["persona_named_base"], "", None,
        note="photo of woman, teal bob, yellow jacket, red scarf, <scene>; "
             + ", ".join(f"{k} {figures[f'persona_named_base_{k}']:.3f}" for k in ("hair_colour", "hair_style",
                                                                                   "jacket_colour", "scarf_colour")))
    row("prompted scene kept with the persona's LoRA", None, figures["persona_scene_kept"], ">= 0.60",
        figures["persona_scene_kept"] >= 0.60)
    best, chosen = figures["checkpoint_best_accuracy"], figures["checkpoint_chosen_accuracy"]
    row("checkpoint selection: best checkpoint's look accuracy (ref) vs the chosen one's", best, chosen,
        "within 0.05 of the best", chosen >= best - 0.05,
        note=f"chosen step {figures['checkpoint_chosen_step']}, by step {figures['checkpoint_accuracy_by_step']}")
    row("identity gate: the persona's own LoRA images passing", None, figures["gate_own_pass"], ">= 0.90",
        figures["gate_own_pass"] >= 0.90, note=f"threshold {figures['gate_threshold']:.4f}")
    row("identity gate: other characters' LoRA images refused", None, figures["gate_other_refused"], ">= 0.90",
        figures["gate_other_refused"] >= 0.90,
        note=", ".join(f"{k[len('gate_refused_'):]} {v:.2f}" for k, v in figures.items() if k.startswith("gate_refused_")))
    kept, culled = figures["keep_best_kept_accuracy"], figures["keep_best_culled_accuracy"]
    row("keep-best: look accuracy of the culled (ref) vs the kept", culled, kept, "kept > culled", kept > culled)
    row("clustering the persona's library (her LoRA's images): adjusted Rand index against the scenes", None,
        figures["library_clusters_ari"], ">= 0.6", figures["library_clusters_ari"] >= 0.6,
        note=f"k = {figures['library_clusters_k']}, {figures['library_clusters_images']} images")
    row("clustering held-out world images (many characters): adjusted Rand index against the scenes", None,
        figures["clusters_ari"], ">= 0.6", figures["clusters_ari"] >= 0.6, note=f"k = {figures['clusters_k']}")
    return ok_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts, one other character (about 4 minutes)")
    parser.add_argument("--world-models", type=Path, default=None, metavar="DIR",
                        help="measure this world-models folder's SD model (a retrained base) instead of the committed one")
    parser.add_argument("--identity-without-scenes", action="store_true",
                        help="read identity with the 8 scenes' text directions taken out (the persona setting "
                             "generation.identity_without_themes), in every identity figure")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from persona_pipeline.world.quality_run import measure

    started = time.perf_counter()
    from persona_pipeline.world.attributes import SCENES

    figures = measure(quick=args.quick, log=lambda line: print(f"  {line}", flush=True), world_models=args.world_models,
                      identity_without=tuple(SCENES) if args.identity_without_scenes else ())
    ok = report(figures)
    print(f"RESULT: {'PASS' if ok else 'FAIL'} in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    emit()
    sys.exit(code)
