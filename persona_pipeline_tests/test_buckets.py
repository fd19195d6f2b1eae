"""Aspect-ratio buckets for the FLUX.1 loop: the bucket sizes and each photo's bucket, and a tiny FLUX
run on portrait and landscape photos that caches and trains each at its own shape (no centre square)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from persona_pipeline.training.buckets import bucket_sizes, bucket_step, nearest_bucket
from persona_pipeline.training.lora import LoraTrainingParams, TrainingConfigError, train_lora
from persona_pipeline.training.tiny_models import build_tiny_flux, build_tiny_sd
from persona_pipeline_tests.conftest import DEMO


def test_bucket_sizes_keep_the_pixel_count_and_the_ratio_bounds():
    sizes = bucket_sizes(1024)
    assert (1024, 1024) in sizes and (768, 1344) in sizes and (1344, 768) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and 0.5 <= w / h <= 2 for w, h in sizes)
    assert nearest_bucket(600, 800, sizes) == (896, 1152) and nearest_bucket(800, 600, sizes) == (1152, 896)
    assert nearest_bucket(1000, 1000, sizes) == (1024, 1024)
    assert bucket_step(64) == 16 and bucket_sizes(64) == [(48, 80), (64, 64), (80, 48)]


def _shaped_dataset(folder: Path) -> Path:
    """Two portrait (3:5) and two landscape (5:3) crops of the demo photos."""
    subset = folder / "5_t3st woman"
    subset.mkdir(parents=True)
    photos = sorted((DEMO / "photos").glob("*.jpg"))[:4]
    for index, photo in enumerate(photos):
        with Image.open(photo) as image:
            image = image.convert("RGB").resize((300, 300))
            (image.crop((60, 0, 240, 300)) if index < 2 else image.crop((0, 60, 300, 240))).save(subset / f"{index:04d}.png")
        (subset / f"{index:04d}.txt").write_text(f"t3st woman, photo {index}")
    (folder / "dataset.toml").write_text(f'[general]\nflip_aug = true\n[[datasets]]\nresolution = 64\n'
                                         f'[[datasets.subsets]]\nimage_dir = "{subset}"\nnum_repeats = 5\n')
    return folder


@pytest.mark.slow
def test_tiny_flux_trains_each_photo_at_its_own_shape(tmp_path):
    model = str(build_tiny_flux(tmp_path / "tiny-flux"))
    dataset = _shaped_dataset(tmp_path / "ds")
    lines: list[str] = []
    params = LoraTrainingParams(steps=6, checkpoint_every=3, max_sequence_length=32, batch_size=2, resolution=64,
                                aspect_buckets=True)
    result = train_lora(model, dataset, tmp_path / "out", params, weight_name="b.safetensors", log=lines.append)
    assert "aspect buckets: 48x80 (2), 80x48 (2)" in lines and len(result.checkpoints) == 2
    (cache,) = [p for p in (dataset / "cache").glob("flux-latents-*.safetensors")]
    latents = load_file(str(cache))
    assert latents["48x80.mean"].shape == (2, 16, 20, 12) and latents["80x48.mean_flipped"].shape == (2, 16, 12, 20)
    assert not any(re.fullmatch(r"mean|std", key) for key in latents)  # nothing was cut to a square
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(result.checkpoints[-1][1]))
    # The same photos without buckets share one square cache of their own.
    square = train_lora(model, dataset, tmp_path / "square", LoraTrainingParams(**{**params.as_dict(), "aspect_buckets": False}),
                        weight_name="s.safetensors", log=lambda _: None)
    assert len(square.checkpoints) == 2 and len(list((dataset / "cache").glob("flux-latents-*.safetensors"))) == 2


def test_the_sd_loop_refuses_aspect_buckets_by_name(tmp_path):
    model = str(build_tiny_sd(tmp_path / "tiny-sd"))
    with pytest.raises(TrainingConfigError, match=r"aspect_buckets apply to FLUX.1 only; the base model .* is sd15"):
        train_lora(model, tmp_path / "none", tmp_path / "out", LoraTrainingParams(aspect_buckets=True), log=lambda _: None)
