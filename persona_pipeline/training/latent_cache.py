"""The latents and text embeddings of a dataset, computed once per dataset version and model.

Each training step then runs only the UNet: the frozen VAE and text encoders see every image and
caption once, and a re-run or a resume of the same dataset on the same model skips them entirely.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from persona_pipeline.fileio import sha256_file, write_via_temp
from persona_pipeline.training.kohya_dataset import KohyaDataset, load_pixels
from persona_pipeline.training.stable_diffusion import FrozenModel, caption_conditioning


def cached_inputs(model: FrozenModel, dataset: KohyaDataset, resolution: int, cache_dir: Path, base_model: str,
                  device, weight_dtype, log: Callable[[str], None]) -> dict:
    """Latent distributions (mean, std; and of the mirrored image when flips are on) and the
    caption conditioning (`caption_conditioning`) for every item, computed once and kept in
    `cache_dir` under a key of the images, captions, model and resolution, so re-runs and resumes
    skip the encoders entirely. Also `scaling_factor`, the VAE's latent scale."""
    import torch
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps({
        "base": str(base_model), "family": model.family, "resolution": resolution, "flip": dataset.flip,
        "dtype": str(weight_dtype), "unet": _config_digest(model.unet), "vae": _config_digest(model.vae),
        "items": [[sha256_file(item.image), item.caption] for item in dataset.items],
    }, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / f"latents-{key}.safetensors"
    if path.is_file():
        log(f"using cached latents and text embeddings {path.name}")
        tensors = load_file(str(path), device=str(device))
    else:
        started = time.perf_counter()
        vae, encoders = model.vae.to(device), [e.to(device) for e in model.text_encoders]
        columns: dict[str, list] = {"mean": [], "std": [], "mean_flipped": [], "std_flipped": []}
        with torch.no_grad():
            for item in dataset.items:
                pixels, original_size, crop = load_pixels(item.image, resolution)
                variants = [pixels, torch.flip(pixels, dims=[3])] if dataset.flip else [pixels]
                for name, variant in zip(("", "_flipped"), variants):
                    dist = vae.encode(variant.to(device, torch.float32)).latent_dist
                    columns["mean" + name].append(dist.mean)
                    columns["std" + name].append(dist.std)
                conditioning = caption_conditioning(model, encoders, item.caption, device, original_size=original_size,
                                                    crop=crop, resolution=resolution)
                for name, tensor in conditioning.items():
                    columns.setdefault(name, []).append(tensor)
        tensors = {k: torch.cat(v).float().cpu().contiguous() for k, v in columns.items() if v}
        write_via_temp(path, lambda tmp: save_file(tensors, str(tmp)))
        log(f"cached latents and text embeddings for {len(dataset.items)} images in {time.perf_counter() - started:.1f}s")
        tensors = {k: v.to(device) for k, v in tensors.items()}
        model.vae.to("cpu")
    if not dataset.flip:
        tensors["mean_flipped"], tensors["std_flipped"] = tensors["mean"], tensors["std"]
    tensors["scaling_factor"] = float(model.vae.config.scaling_factor)
    return tensors


def _config_digest(model) -> str:
    return hashlib.sha256(json.dumps(dict(model.config), sort_keys=True, default=str).encode()).hexdigest()[:16]
