"""FLUX.1 LoRA training in one readable loop, after diffusers' train_dreambooth_lora_flux.py: frozen
VAE, CLIP + T5 text encoders and transformer; a peft LoRA on the transformer's attention; AdamW on
the flow-matching loss (the transformer predicts noise - latents at a noise level drawn
logit-normal and shifted as the scheduler shifts, `families.flux.sample_sigmas`).

What it adds to the example loop, as the SD loop (`training.lora`) does:
- latent distributions (and their mirrors) and the CLIP pooled + T5 embeddings are computed once
  per dataset version and cached next to the dataset (`latent_cache.cached_flux_inputs`); the text
  encoders and the VAE are then freed, so a step holds only the transformer;
- a fresh latent sample per step from the cached distribution, kohya repeats as sampling weights,
  prior-preservation weights for regularisation images;
- checkpoints every N steps in the key format ComfyUI and diffusers read (`families.flux`), a
  resumable state with each, a non-finite loss stopping the run before its update.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from persona_pipeline.fileio import sha256_file, write_safetensors
from persona_pipeline.training.families import flux
from persona_pipeline.training.latent_cache import cached_flux_inputs
from persona_pipeline.training.lora import (CHECKPOINT_DIR, STATE_FILE, Progress, TrainingResult, _optimizer, _resume,
                                            _save_state, apply_update, open_run, prior_weighted, training_result)
from persona_pipeline.training.params import LoraTrainingParams, TrainingConfigError


def train_flux_lora(
    base_model: str,
    dataset_dir: Path,
    output_dir: Path,
    params: LoraTrainingParams,
    *,
    device: str = "cpu",
    weight_name: str = "lora.safetensors",
    log: Callable[[str], None] = print,
    log_interval_s: float = 15.0,
    cache_dir: Path | None = None,
) -> TrainingResult:
    """Train, or resume the run whose state is in `output_dir`; checkpoints as `train_unet_lora` writes them."""
    params.validate(device)
    if params.text_encoder_lr > 0 or params.trigger_embedding_lr > 0 or params.min_snr_gamma or params.noise_offset:
        raise TrainingConfigError("training.text_encoder_lr, trigger_embedding_lr, min_snr_gamma and noise_offset are for the SD families; "
                                  f"the base model {base_model} is FLUX.1: leave them at 0")
    if params.shuffle_caption or params.caption_tag_dropout_rate > 0:
        raise TrainingConfigError("training.shuffle_caption and caption_tag_dropout_rate are for the SD families (the "
                                  f"FLUX.1 loop caches its T5 embeddings once); the base model {base_model} is FLUX.1: "
                                  "leave them off")
    guidance = flux.training_guidance(params, flux.variant_of(base_model))  # refused before anything loads
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import FluxPipeline

    started = time.perf_counter()
    output_dir = Path(output_dir)
    dataset, precision, accelerator, weight_dtype = open_run(dataset_dir, params, device, log)
    model = flux.load_frozen_flux(base_model, params.rank, params.alpha, weight_dtype=weight_dtype,
                                  quantize=params.quantize_base)
    transformer = model.transformer
    if params.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = _optimizer(params, [p for p in transformer.parameters() if p.requires_grad])
    cache = cached_flux_inputs(model, dataset, params.resolution, Path(cache_dir or Path(dataset_dir) / "cache"),
                               base_model, accelerator.device, params.max_sequence_length, log, params.aspect_buckets)
    buckets = cache["buckets"]
    if len(buckets) > 1:
        log("aspect buckets: " + ", ".join(f"{b['size'][0]}x{b['size'][1]} ({len(b['members'])})" for b in buckets))
    scaling, shift = float(model.vae.config.scaling_factor), float(model.vae.config.shift_factor or 0.0)
    del model.vae, model.text_pipeline  # the encoders are done: free them before the transformer's activations arrive
    transformer, optimizer = accelerator.prepare(transformer, optimizer)

    sampling = np.asarray([item.repeats for item in dataset.items], dtype=np.float64)
    sampling /= sampling.sum()  # kohya repeats as sampling weight
    # A batch comes from one bucket (one image size): the bucket drawn by its images' total weight, then
    # its images by theirs. One bucket draws exactly as an unbucketed dataset does.
    bucket_p = np.asarray([sampling[b["members"]].sum() for b in buckets])
    member_p = [sampling[b["members"]] / sampling[b["members"]].sum() for b in buckets]
    is_reg = torch.tensor([item.is_reg for item in dataset.items], device=accelerator.device)
    rng = np.random.default_rng(params.seed)
    image_ids = {}  # per latent size, made once

    stem = Path(weight_name).stem
    checkpoint_dir, state_path = output_dir / CHECKPOINT_DIR, output_dir / STATE_FILE
    losses: list[float] = []
    checkpoints: list[tuple[int, Path]] = []
    start_step = 0
    if state_path.is_file():
        start_step, losses, checkpoints = _resume(state_path, params, [accelerator.unwrap_model(transformer)], optimizer, rng)
        log(f"resuming from step {start_step}/{params.steps} (checkpoint {checkpoints[-1][1].name if checkpoints else 'none'})")

    every = params.checkpoint_every or params.steps
    transformer.train()
    progress = Progress(params.steps, start_step, log, log_interval_s)
    for step in range(start_step + 1, params.steps + 1):
        number = int(rng.choice(len(buckets), p=bucket_p)) if len(buckets) > 1 else 0
        bucket = buckets[number]
        rows = rng.choice(len(bucket["members"]), size=params.batch_size, p=member_p[number])
        index = torch.as_tensor(bucket["members"][rows], device=accelerator.device)
        rows = torch.as_tensor(rows, device=accelerator.device)
        flip = (torch.rand(params.batch_size) < 0.5 if dataset.flip else torch.zeros(params.batch_size, dtype=torch.bool))
        flip = flip[:, None, None, None].to(accelerator.device)
        mean = torch.where(flip, bucket["mean_flipped"][rows], bucket["mean"][rows])
        std = torch.where(flip, bucket["std_flipped"][rows], bucket["std"][rows])
        channels, height, width = mean.shape[1:]
        if (height, width) not in image_ids:
            image_ids[height, width] = FluxPipeline._prepare_latent_image_ids(params.batch_size, height // 2, width // 2,
                                                                             accelerator.device, weight_dtype)
        latents = ((mean + std * torch.randn_like(mean)) - shift) * scaling  # a fresh VAE sample each step
        noise = torch.randn_like(latents)
        sigmas = flux.sample_sigmas(params.batch_size, (height // 2) * (width // 2), model.scheduler_config, params.timestep_sampling,
                                    accelerator.device)
        noisy = (1.0 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
        packed = FluxPipeline._pack_latents(noisy.to(weight_dtype), params.batch_size, channels, height, width)

        with accelerator.autocast():
            prediction = flux.predict_velocity(transformer, packed, sigmas, cache, index, image_ids[height, width], guidance)
        # Back to (B, C, H, W): _unpack_latents takes pixel sizes and the VAE factor (8 here: any, it cancels out).
        prediction = FluxPipeline._unpack_latents(prediction, height * 8, width * 8, 8)
        per_sample = F.mse_loss(prediction.float(), (noise - latents).float(), reduction="none").mean(dim=(1, 2, 3))
        loss = prior_weighted(per_sample, is_reg[index], params.prior_loss_weight)
        apply_update(loss, step, params, checkpoints, accelerator, optimizer, losses)
        progress.step(step, losses[-1])
        if step % every == 0 or step == params.steps:
            path = checkpoint_dir / f"{stem}-step{step:06d}.safetensors"
            adapted = accelerator.unwrap_model(transformer)
            save_flux_checkpoint(adapted, params.alpha, path, {
                "step": str(step), "base_family": flux.FAMILY.name, "flux_variant": model.variant, "rank": str(params.rank),
                "alpha": str(params.alpha), "guidance": "none" if guidance is None else str(guidance)})
            checkpoints = [c for c in checkpoints if c[0] != step] + [(step, path)]
            _save_state(state_path, step, params, [adapted], optimizer, rng, losses, checkpoints)

    return training_result(checkpoints, losses, started, dataset, start_step, flux.FAMILY.name, precision)


def save_flux_checkpoint(transformer, alpha: float, path: Path, metadata: dict[str, str]) -> str:
    """Write a FLUX LoRA .safetensors atomically; return its sha256."""
    write_safetensors(path, flux.lora_state_dict(transformer, alpha), metadata)
    return sha256_file(path)
