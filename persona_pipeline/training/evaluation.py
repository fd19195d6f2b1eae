"""Evaluation of LoRA versions on the persona's fixed evaluation set: render prompts × seeds from one
loaded base pipeline, then score identity (mean and spread, by the face model or open_clip),
prompt alignment and diversity with the same models for every version, so the figures compare."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


from persona_pipeline.domain.promotion import EvalScores, diversity
from persona_pipeline.identity import IdentityReference, identity_stats


@dataclass(frozen=True)
class EvalRun:
    scores: EvalScores
    renders: list[Path]  # prompt-major, then seed


def eval_prompts(config) -> tuple[list[str], list[int]]:
    """The persona's evaluation prompts (trigger and class word filled in) and seeds."""
    prompts = [p.format(trigger=config.trigger_word, class_word=config.class_word) for p in config.evaluation.prompts]
    return prompts, list(config.evaluation.seeds)


def eval_key(prompts: list[str], seeds: list[int], base_model: str, identity_method: str, reference: str) -> str:
    """What two evaluations must share to be compared: a change of any of these re-renders the primary.
    `reference` is the identity centroid's digest (IdentityReference.digest): a LoRA shared by two
    personas, or a persona whose photos changed, is scored against the photos it is judged by."""
    return hashlib.sha256(json.dumps({"prompts": prompts, "seeds": seeds, "base_model": base_model,
                                      "identity": identity_method, "reference": reference},
                                     sort_keys=True).encode()).hexdigest()


def evaluate(diffusion, clip, identity: IdentityReference, loras: list[Path], prompts: list[str], seeds: list[int],
             trigger_word: str, file_for: Callable[[int, int, int], Path]) -> list[EvalRun]:
    """Render and score each LoRA in `loras` (checkpoint selection and version evaluation alike);
    `file_for(lora index, prompt index, seed)` is where each render is written."""
    import numpy as np

    rendered = diffusion.render_checkpoints(loras, prompts, seeds)
    texts = clip.embed_texts([strip_trigger(p, trigger_word) for p in prompts])
    runs = []
    for number, images in enumerate(rendered):
        paths = []
        for index, image in enumerate(images):
            target = file_for(number, index // len(seeds), seeds[index % len(seeds)])
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            paths.append(target)
        embedded = clip.embed_images(paths)
        similarities, found = identity.score(paths)
        mean, std = identity_stats(similarities)
        alignment = float(np.mean([embedded[i] @ texts[i // len(seeds)] for i in range(len(paths))]))
        scores = EvalScores(identity_mean=mean, identity_std=std, alignment=alignment,
                            diversity=diversity(embedded, len(prompts), len(seeds)), no_face=int((~found).sum()))
        runs.append(EvalRun(scores, paths))
    return runs


def strip_trigger(prompt: str, trigger_word: str) -> str:
    """The prompt as open_clip should read it: without the trigger word, which means nothing to it."""
    return " ".join(w for w in prompt.split() if w.strip(",") != trigger_word)
