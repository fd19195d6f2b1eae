"""Shared by the benchmarks: write a randomly initialised SD1.5-layout pipeline folder atomically."""

from __future__ import annotations

import os
from pathlib import Path


def save_sd_pipeline(folder: Path, *, vae, text_encoder, unet, vocab: dict) -> Path:
    """Assemble the pipeline (DDPM scheduler as SD1.5 ships it, a CLIP tokenizer over `vocab`) and
    save it to `folder` through a temporary sibling, so a killed run leaves no half-written model."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                                   tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder
