"""The latents and text embeddings of a dataset, computed once per dataset version and model.

Each training step then runs only the UNet (or FLUX's transformer): the frozen VAE and text encoders see every image and
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
from persona_pipeline.training.families.stable_diffusion import FrozenModel, batched_text_conditioning, caption_conditioning
from persona_pipeline.training.params import TrainingConfigError


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
        encoders = [e.to(device) for e in model.text_encoders]
        # The captions in batches (one encoder call per caption costs more), handed out per item below.
        texts = dict(zip(map(id, dataset.items),
                         batched_text_conditioning(model, encoders, [item.caption for item in dataset.items], device)))

        def conditioning(item, original_size, crop):
            return caption_conditioning(model, encoders, item.caption, device, original_size=original_size, crop=crop,
                                        resolution=resolution, text=texts[id(item)])

        tensors = encode_dataset(model.vae, dataset, resolution, device, conditioning)
        write_via_temp(path, lambda tmp: save_file(tensors, str(tmp)))
        log(f"cached latents and text embeddings for {len(dataset.items)} images in {time.perf_counter() - started:.1f}s")
        tensors = {k: v.to(device) for k, v in tensors.items()}
        model.vae.to("cpu")
    if not dataset.flip:
        tensors["mean_flipped"], tensors["std_flipped"] = tensors["mean"], tensors["std"]
    tensors["scaling_factor"] = float(model.vae.config.scaling_factor)
    return tensors


def _config_digest(model) -> str:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)  # transformers' or diffusers'
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_dataset(vae, dataset: KohyaDataset, resolution: int, device, conditioning=None,
                   sizes: list[tuple[int, int]] | None = None) -> dict:
    """Each item's VAE latent distribution (`mean`, `std`, and `mean_flipped`, `std_flipped` for its
    mirror when flips are on), plus what `conditioning(item, original_size, crop)` returns per item,
    stacked on the CPU in fp32. With `sizes` (each item's aspect bucket, training/buckets.py) the
    latents are stacked per bucket instead, as `<w>x<h>.mean` etc., items in dataset order."""
    import torch

    vae = vae.to(device)
    columns: dict[str, list] = {"mean": [], "std": [], "mean_flipped": [], "std_flipped": []}
    with torch.no_grad():
        for index, item in enumerate(dataset.items):
            size = sizes[index] if sizes else None
            prefix = f"{size[0]}x{size[1]}." if size else ""
            pixels, original_size, crop = load_pixels(item.image, resolution, size)
            variants = [pixels, torch.flip(pixels, dims=[3])] if dataset.flip else [pixels]
            for name, variant in zip(("", "_flipped"), variants):
                dist = vae.encode(variant.to(device, torch.float32)).latent_dist
                columns.setdefault(f"{prefix}mean{name}", []).append(dist.mean)
                columns.setdefault(f"{prefix}std{name}", []).append(dist.std)
            for name, tensor in (conditioning(item, original_size, crop) if conditioning else {}).items():
                columns.setdefault(name, []).append(tensor)
    return {k: torch.cat(v).float().cpu().contiguous() for k, v in columns.items() if v}


def cached_flux_inputs(model, dataset: KohyaDataset, resolution: int, cache_dir: Path, base_model: str, device,
                       max_sequence_length: int, log: Callable[[str], None], aspect_buckets: bool = False) -> dict:
    """FLUX's two caches: the latent distributions (keyed by the images, resolution and VAE, as for
    SD) and the text embeddings (`prompt_embeds`, `pooled`), keyed by the dataset's captions and the
    text encoders, so a [dev] and a [schnell] run on one dataset share them. The T5 embeddings depend
    on the tokenizer too: a text cache written with another one is refused, naming both.

    The latents come back as `buckets`: one per image size, each with its `size` (w, h), `members`
    (dataset indices) and `mean`/`std`/`mean_flipped`/`std_flipped` stacked in member order. Without
    `aspect_buckets` there is one, the `resolution` square."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from persona_pipeline.training.families.flux import text_conditioning, tokenizer_identity

    images = [sha256_file(item.image) for item in dataset.items]
    sizes = _bucket_of_each(dataset, resolution) if aspect_buckets else None
    latent_key = _digest({"base": str(base_model), "family": "flux", "resolution": resolution, "flip": dataset.flip,
                          "vae": _config_digest(model.vae), "items": images, **({"buckets": sizes} if sizes else {})})
    latent_path = cache_dir / f"flux-latents-{latent_key}.safetensors"
    if latent_path.is_file():
        log(f"using cached latents {latent_path.name}")
        latents = load_file(str(latent_path))
    else:
        started = time.perf_counter()
        latents = encode_dataset(model.vae, dataset, resolution, device, sizes=sizes)
        write_via_temp(latent_path, lambda tmp: save_file(latents, str(tmp)))
        log(f"cached latents for {len(dataset.items)} images in {time.perf_counter() - started:.1f}s")
    model.vae.to("cpu")

    pipe = model.text_pipeline
    tokenizer = tokenizer_identity(pipe)
    text_key = _digest({"captions": [item.caption for item in dataset.items], "max_sequence_length": max_sequence_length,
                        "clip": _config_digest(pipe.text_encoder), "t5": _config_digest(pipe.text_encoder_2),
                        "weights": [_weight_files(base_model, sub) for sub in ("text_encoder", "text_encoder_2")]})
    text_path = cache_dir / f"flux-text-{text_key}.safetensors"
    if text_path.is_file():
        with safe_open(str(text_path), "pt") as handle:
            cached_tokenizer = (handle.metadata() or {}).get("t5_tokenizer")
        if cached_tokenizer != tokenizer:
            raise TrainingConfigError(f"{text_path}: T5 embeddings cached with tokenizer {cached_tokenizer!r}, but the base model "
                                      f"{base_model} tokenizes with {tokenizer!r}; delete the file to encode the captions again")
        log(f"using cached text embeddings {text_path.name}")
        text = load_file(str(text_path))
    else:
        started = time.perf_counter()
        pipe.to(device)
        text = text_conditioning(pipe, [item.caption for item in dataset.items], device, max_sequence_length)
        text = {k: v.cpu().contiguous() for k, v in text.items()}
        write_via_temp(text_path, lambda tmp: save_file(text, str(tmp), metadata={"t5_tokenizer": tokenizer}))
        log(f"cached text embeddings for {len(dataset.items)} captions in {time.perf_counter() - started:.1f}s")
    tensors = {k: v.to(device) for k, v in text.items()}
    tensors["buckets"] = _buckets(latents, sizes or [(resolution, resolution)] * len(dataset.items), bool(sizes),
                                  dataset.flip, device)
    return tensors


def _bucket_of_each(dataset: KohyaDataset, resolution: int) -> list[tuple[int, int]]:
    from PIL import Image

    from persona_pipeline.training.buckets import bucket_sizes, nearest_bucket

    options = bucket_sizes(resolution)
    sizes = []
    for item in dataset.items:
        with Image.open(item.image) as image:
            sizes.append(nearest_bucket(image.width, image.height, options))
    return sizes


def _buckets(latents: dict, sizes: list[tuple[int, int]], prefixed: bool, flip: bool, device) -> list[dict]:
    import numpy as np

    out = []
    for size in sorted(set(sizes)):
        prefix = f"{size[0]}x{size[1]}." if prefixed else ""
        bucket = {"size": size, "members": np.asarray([i for i, s in enumerate(sizes) if s == size])}
        for name in ("mean", "std"):
            bucket[name] = latents[prefix + name].to(device)
            bucket[name + "_flipped"] = latents[prefix + name + "_flipped"].to(device) if flip else bucket[name]
        out.append(bucket)
    return out


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def _weight_files(base_model: str, subfolder: str) -> list | str:
    """Names and sizes of a local model's weight files (hashing T5-XXL's 9 GB would cost more than
    encoding the captions); a hub id stands for itself."""
    folder = Path(base_model) / subfolder
    if not folder.is_dir():
        return f"{base_model}/{subfolder}"
    return sorted([f.name, f.stat().st_size] for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
