"""Train the tiny CLIP-style dual encoder on the world's (image, caption) pairs, in open_clip's format.

The model is the random tiny preset's layout (training/tiny_models.py: a 2-layer ViT and a 2-layer
text transformer, 64 wide, open_clip's own BPE tokenizer that ships with the package), except for
8 px patches instead of 16: at 64 px a 16 px patch is a quarter of the frame, too coarse to tell a
scarf from a jacket. The image tower's depth and width are settings (`world train --clip-tower`): a
4-layer, 128-wide tower tells the persona from characters that share her hair or jacket far better,
and was measured but not committed (docs/world.md, "The world CLIP model"). It is trained with the symmetric contrastive loss (image-to-text and
text-to-image cross-entropy over the batch) and saved as an open_clip `local-dir:` folder:
`open_clip_config.json` (model and preprocess config) and `open_clip_model.safetensors`, which
`open_clip.create_model_and_transforms("local-dir:<folder>")` loads offline.

Measured on held-out world images against the world's own labels: zero-shot scene and hair-colour
accuracy (the prompt is the attribute's caption phrase), and in-batch image-to-caption retrieval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from persona_pipeline.world.attributes import HAIR_COLOURS, SCENES
from persona_pipeline.world.dataset import world_samples
from persona_pipeline.world.loss_log import LossLog, Progress

CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


@dataclass(frozen=True)
class ClipSettings:
    seed: int = 0
    steps: int = 1500  # the loss was 0.06 by step 1200 of 64
    batch_size: int = 64
    train_count: int = 50_000
    learning_rate: float = 1e-3
    log_every: int = 25
    vision_layers: int = CLIP_CONFIG["vision_cfg"]["layers"]  # the image tower's depth and width
    vision_width: int = CLIP_CONFIG["vision_cfg"]["width"]

    def model_config(self) -> dict:
        """CLIP_CONFIG with this run's image tower."""
        return {**CLIP_CONFIG, "vision_cfg": {**CLIP_CONFIG["vision_cfg"], "layers": self.vision_layers, "width": self.vision_width}}


def _create(config: dict):
    """The open_clip model for `config`, built the way `local-dir:` builds it (same class and init)."""
    import open_clip
    from open_clip import factory

    name = "persona-world-clip-training"
    factory._MODEL_CONFIGS[name] = config  # the registry open_clip.add_model_config fills from files
    model = open_clip.create_model(name)
    return model, open_clip.get_tokenizer(name)


def _pixels(model, images) -> torch.Tensor:
    """PIL images at the model's size -> normalised tensors, as open_clip's eval preprocess does."""
    mean = torch.tensor(model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    side = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    array = np.stack([np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32) / 255 for image in images])
    return (torch.from_numpy(array).permute(0, 3, 1, 2) - mean) / std


def _batch(settings: ClipSettings, step: int, split: str = "train", size: int | None = None):
    size = size or settings.batch_size
    start = (step * size) % settings.train_count if split == "train" else 0
    return list(world_samples(size, settings.seed, split=split, size=64, start=start))


def evaluate(model, tokenizer, samples) -> dict:
    """Zero-shot scene and hair-colour accuracy against the labels, and image-to-caption retrieval."""
    model.eval()
    with torch.no_grad():
        images = F.normalize(model.encode_image(_pixels(model, [s.image for s in samples])), dim=-1)
        captions = F.normalize(model.encode_text(tokenizer([s.caption for s in samples])), dim=-1)
        result = {"retrieval_top1": float((images @ captions.T).argmax(1).eq(torch.arange(len(samples))).float().mean())}
        for key, classes, phrase in (("scene", SCENES, "{}"), ("hair_colour", tuple(HAIR_COLOURS), "{} hair")):
            texts = F.normalize(model.encode_text(tokenizer([phrase.format(c) for c in classes])), dim=-1)
            predicted = (images @ texts.T).argmax(1).tolist()
            result[f"zero_shot_{key}"] = float(np.mean([classes[p] == s.labels[key] for p, s in zip(predicted, samples)]))
    model.train()
    return result


def optimizer_for(model, learning_rate: float, steps: int):
    """AdamW with a linear warm-up over a tenth of the run (at most 100 steps), then a cosine decay to 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    return optimizer, schedule


def contrastive_step(model, tokenizer, optimizer, schedule, images, captions: list[str]) -> float:
    """One update on the symmetric contrastive loss (image-to-text and text-to-image cross-entropy over
    the batch, each image's own caption the target); returns the loss."""
    image = F.normalize(model.encode_image(_pixels(model, images)), dim=-1)
    text = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    target = torch.arange(len(captions))
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the temperature
    return loss.item()


def train_clip(out: Path, settings: ClipSettings, progress: Progress = print) -> dict:
    """Train, save the `local-dir:` folder at `out`, return the metrics (held-out, before and after)."""
    from safetensors.torch import save_file

    torch.manual_seed(settings.seed)
    config = settings.model_config()
    model, tokenizer = _create(config)
    progress(f"world clip: {sum(p.numel() for p in model.parameters()):,} parameters, batch {settings.batch_size}")
    heldout = _batch(settings, 0, "heldout", size=256)
    before = evaluate(model, tokenizer, heldout)
    optimizer, schedule = optimizer_for(model, settings.learning_rate, settings.steps)
    log = LossLog(progress, "clip", settings.steps, settings.batch_size, settings.log_every)
    model.train()
    for step in range(settings.steps):
        samples = _batch(settings, step)
        loss = contrastive_step(model, tokenizer, optimizer, schedule, [s.image for s in samples], [s.caption for s in samples])
        log.add(loss)
    seconds = log.seconds
    after = evaluate(model, tokenizer, heldout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": 64, "mean": list(model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)),
                  "std": list(model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2) + "\n")
    # fp16 on disk: the 49408-token embedding is most of the model; fp32 is restored on load.
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    return {"clip_seconds": seconds, "clip_seconds_per_step": seconds / max(1, settings.steps), "clip_loss_history": log.history,
            **{f"clip_{k}_before": v for k, v in before.items()}, **{f"clip_{k}_after": v for k, v in after.items()}}
