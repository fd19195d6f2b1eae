"""LoRA training: diffusers' reference loop (VAE + text encoder run every step) against ours
(`persona_pipeline.training.lora.train_lora`, latents and text embeddings cached once), on the
same tiny base model and dataset, in one process. Prints median seconds and the ratio.

    python bench/bench_lora_training.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def reference_train(base: str, dataset_dir: Path, steps: int, batch_size: int, resolution: int) -> float:
    """The loop of diffusers' train_text_to_image_lora.py: encode images and captions every step."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from persona_pipeline.training.lora import _load_pixels, load_frozen_sd_with_lora, read_kohya_dataset

    started = time.perf_counter()
    items = read_kohya_dataset(dataset_dir)
    tokenizer, text_encoder, vae, unet, scheduler = load_frozen_sd_with_lora(base, rank=4, alpha=4)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = [items[i] for i in rng.choice(len(items), size=batch_size)]
        pixels = torch.cat([_load_pixels(path, resolution) for path, _, _ in batch])
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer([c for _, c, _ in batch], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            hidden = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    args = parser.parse_args()
    steps, repeats = (20, 3) if args.quick else (100, 5)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from persona_pipeline.training.lora import LoraTrainingParams, train_lora
    from persona_pipeline.training.tiny_models import build_tiny_sd

    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    base = str(build_tiny_sd(work / "tiny-sd"))
    dataset = work / "dataset" / "10_m1ra woman"
    dataset.mkdir(parents=True)
    for index, photo in enumerate(sorted((REPO / "datasets" / "demo" / "photos").glob("*.jpg"))):
        (dataset / f"{index:04d}.jpg").write_bytes(photo.read_bytes())
        (dataset / f"{index:04d}.txt").write_text(f"m1ra woman, photo {index}")
    params = LoraTrainingParams(rank=4, alpha=4, steps=steps, learning_rate=1e-3, batch_size=2, resolution=64)

    reference, ours = [], []
    for repeat in range(repeats):  # interleaved, so machine noise hits both alike
        reference.append(reference_train(base, dataset.parent, steps, 2, 64))
        ours.append(train_lora(base, dataset.parent, work / f"out-{repeat}", params, log=lambda _m: None).seconds)
    ref_median, our_median = statistics.median(reference), statistics.median(ours)
    print(f"lora training, tiny SD, {len(list(dataset.glob('*.jpg')))} images, {steps} steps, batch 2, {repeats} repeats")
    print(f"  reference (encode every step): median {ref_median:.2f}s  runs {[round(x, 2) for x in reference]}")
    print(f"  ours (cached latents + text):  median {our_median:.2f}s  runs {[round(x, 2) for x in ours]}")
    print(f"  ratio reference/ours: {ref_median / our_median:.2f}x")


if __name__ == "__main__":
    main()
