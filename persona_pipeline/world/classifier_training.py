"""Trains the attribute classifier on rendered world images and writes its weights and manifest.

Deterministic: one torch thread, seeded torch and world, batches drawn by a seeded generator, so the
same command on the same torch build writes the same weights. The training images are the world's
base samples (never the demo persona's combination); each of the persona's values is in them, which
is all a measuring tool needs: it reads attributes one by one, so it reads the persona's look
without ever having seen it whole.

Augmentation is light on purpose: a 3x3 blur on a third of the batch and a little pixel noise, so
that the slightly soft images of a small generative model read like the renderer's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from persona_pipeline.fileio import sha256_file
from persona_pipeline.world.classifier import HEADS, AttributeNet, to_array
from persona_pipeline.world.classifier_config import INPUT_SIZE, MANIFEST_FILE, REBUILD_COMMAND, TRAINING_DEFAULTS, WEIGHTS_FILE
from persona_pipeline.world.dataset import samples_digest, world_samples

DEFAULTS = TRAINING_DEFAULTS
PROBE_COUNT = 64


def _render(count: int, seed: int, split: str, size: int, progress: Callable[[str], None]) -> tuple[torch.Tensor, dict, str]:
    """(uint8 images N x 3 x size x size, label indices per head, sha256 of the rendered samples)."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = {name: np.empty(count, dtype=np.int64) for name in HEADS}

    def collect():
        for index, sample in enumerate(world_samples(count, seed, split)):
            images[index] = to_array(sample.image, size)
            for name, classes in HEADS.items():
                labels[name][index] = classes.index(sample.labels[name])
            if (index + 1) % 5000 == 0:
                progress(f"  rendered {index + 1}/{count} {split} images")
            yield sample

    digest = samples_digest(collect())
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), {k: torch.from_numpy(v) for k, v in labels.items()}, digest


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    blurred = F.avg_pool2d(F.pad(batch, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(batch.shape[0], 1, 1, 1, generator=generator) < 1 / 3).float()
    batch = pick * blurred + (1 - pick) * batch
    noise = torch.randn(batch.shape, generator=generator) * torch.rand(batch.shape[0], 1, 1, 1, generator=generator) * 0.04
    return (batch + noise).clamp_(0, 1)


def evaluate(net: AttributeNet, images: torch.Tensor, labels: dict[str, torch.Tensor], batch_size: int = 500) -> dict[str, float]:
    """Held-out accuracy per head of `net` on uint8 `images`."""
    net.eval()
    correct = {name: 0 for name in HEADS}
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = net(images[start:start + batch_size].float().div(255))
            for name in HEADS:
                correct[name] += int((logits[name].argmax(1) == labels[name][start:start + batch_size]).sum())
    return {name: correct[name] / images.shape[0] for name in HEADS}


def command_line(**params) -> str:
    """The CLI command that rebuilds a classifier with these parameters."""
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in params.items() if key != "out")
    return f"{REBUILD_COMMAND} {flags}"


def train_classifier(out: Path, *, seed: int = DEFAULTS["seed"], steps: int = DEFAULTS["steps"],
                     batch_size: int = DEFAULTS["batch_size"], train_count: int = DEFAULTS["train_count"],
                     heldout_count: int = DEFAULTS["heldout_count"], learning_rate: float = DEFAULTS["learning_rate"],
                     progress: Callable[[str], None] = print) -> dict:
    """Render, train, measure on held-out images, write `classifier.safetensors` + `classifier.json`
    in `out`; returns the manifest (with the per-step losses under `losses`, not written). Runs on
    one torch thread (the caller's thread count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(Path(out), seed=seed, steps=steps, batch_size=batch_size, train_count=train_count,
                      heldout_count=heldout_count, learning_rate=learning_rate, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _train(out: Path, *, seed: int, steps: int, batch_size: int, train_count: int, heldout_count: int,
           learning_rate: float, progress: Callable[[str], None]) -> dict:
    from safetensors.torch import save_file

    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    progress(f"rendering {train_count} training and {heldout_count} held-out world images (seed {seed})")
    train_images, train_labels, data_sha = _render(train_count, seed, "train", INPUT_SIZE, progress)
    held_images, held_labels, held_sha = _render(heldout_count, seed, "heldout", INPUT_SIZE, progress)
    net = AttributeNet()
    optimiser = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=learning_rate, total_steps=steps, pct_start=0.15)
    losses: list[float] = []
    every = min(100, max(1, steps // 10))
    for step in range(1, steps + 1):
        net.train()
        index = torch.randint(0, train_count, (batch_size,), generator=generator)
        logits = net(_augment(train_images[index].float().div(255), generator))
        loss = sum(F.cross_entropy(logits[name], train_labels[name][index]) for name in HEADS)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            recent = losses[-every:]
            progress(f"step {step}/{steps}  loss {sum(recent) / len(recent):.4f}  {time.perf_counter() - started:.0f} s")
    held = evaluate(net, held_images, held_labels)
    progress("held-out accuracy: " + ", ".join(f"{name} {value:.2%}" for name, value in held.items()))
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_file({name: tensor.contiguous() for name, tensor in net.state_dict().items()}, str(weights))
    manifest = {
        "model": "world attribute classifier", "input_size": INPUT_SIZE, "render_size": 96,
        "heads": {name: list(classes) for name, classes in HEADS.items()},
        "seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
        "train_count": train_count, "train_data_sha256": data_sha,
        # the first PROBE_COUNT training samples alone: a test re-renders them to catch a renderer
        # that changed since these weights were trained
        "probe_count": PROBE_COUNT, "probe_sha256": samples_digest(world_samples(PROBE_COUNT, seed, "train")),
        "heldout_count": heldout_count, "heldout_data_sha256": held_sha,
        "heldout_accuracy": {name: round(value, 5) for name, value in held.items()},
        "command": command_line(seed=seed, steps=steps, batch_size=batch_size, train_count=train_count,
                                heldout_count=heldout_count, learning_rate=learning_rate),
        "torch": torch.__version__, "train_seconds": round(time.perf_counter() - started, 1),
        "weights_file": WEIGHTS_FILE, "weights_sha256": sha256_file(weights),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    progress(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {out / MANIFEST_FILE} "
             f"in {manifest['train_seconds']:.0f} s")
    return {**manifest, "losses": losses}
