"""LoRA training for a Stable Diffusion (SD1.5-layout) base model, in one readable loop, after
diffusers' train_text_to_image_lora.py: frozen VAE/text encoder/UNet, a peft LoRA adapter on the
UNet attention projections, AdamW on the noise-prediction MSE, accelerate for device placement.

Latents and text embeddings are computed once up front (as the faster trainers do); each step
then only runs the UNet.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class TrainingConfigError(ValueError):
    pass


@dataclass(frozen=True)
class LoraTrainingParams:
    rank: int = 4
    alpha: float = 4.0
    steps: int = 30
    learning_rate: float = 1e-3
    batch_size: int = 2
    resolution: int = 64
    seed: int = 0

    # Bounds checked before any model is loaded; each error names the field and the bound.
    BOUNDS = {
        "rank": (1, 256), "alpha": (0.01, 512), "steps": (1, 20000),
        "learning_rate": (1e-7, 1e-2), "batch_size": (1, 64), "resolution": (32, 2048),
    }

    def validate(self) -> None:
        for name, (low, high) in self.BOUNDS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise TrainingConfigError(f"training.{name}={value} is out of range [{low}, {high}]")
        if self.resolution % 8:
            raise TrainingConfigError(f"training.resolution={self.resolution} must be a multiple of 8")


@dataclass
class TrainingResult:
    lora_path: Path
    sha256: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    image_count: int = 0


def read_kohya_dataset(dataset_dir: Path) -> list[tuple[Path, str, int]]:
    """(image, caption, repeats) for every image in `<repeats>_<trigger> <class>/` folders."""
    items = []
    for sub in sorted(p for p in Path(dataset_dir).iterdir() if p.is_dir()):
        repeats_text, _, _ = sub.name.partition("_")
        if not repeats_text.isdigit():
            continue
        for image in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = image.with_suffix(".txt")
            if not caption_file.is_file():
                raise TrainingConfigError(f"{image}: caption file {caption_file.name} is missing")
            items.append((image, caption_file.read_text(encoding="utf-8").strip(), int(repeats_text)))
    if not items:
        raise TrainingConfigError(f"{dataset_dir}: no `<repeats>_<trigger> <class>/` folder with images")
    return items


def load_frozen_sd_with_lora(base_model: str, rank: int, alpha: float):
    """Tokenizer, text encoder, VAE and UNet of an SD1.5-layout model, all frozen, with a trainable
    LoRA adapter on the UNet's attention projections; plus the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler")
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def train_lora(
    base_model: str,
    dataset_dir: Path,
    output_dir: Path,
    params: LoraTrainingParams,
    *,
    device: str = "cpu",
    weight_name: str = "lora.safetensors",
    log: Callable[[str], None] = print,
) -> TrainingResult:
    params.validate()
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    started = time.perf_counter()
    items = read_kohya_dataset(dataset_dir)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no")
    torch.manual_seed(params.seed)

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_frozen_sd_with_lora(base_model, params.rank, params.alpha)
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters, lr=params.learning_rate)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)

    # Cache latents and text embeddings once: the frozen parts never change during training.
    latents, embeddings, weights = [], [], []
    with torch.no_grad():
        for image_path, caption, repeats in items:
            pixels = _load_pixels(image_path, params.resolution).to(accelerator.device)
            latents.append(vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor)
            ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(accelerator.device)
            embeddings.append(text_encoder(ids)[0])
            weights.append(repeats)
    latents_t, embeddings_t = torch.cat(latents), torch.cat(embeddings)
    sampling = np.asarray(weights, dtype=np.float64) / sum(weights)  # kohya repeats as sampling weight
    rng = np.random.default_rng(params.seed)

    losses: list[float] = []
    unet.train()
    log_every = max(1, params.steps // 10)
    for step in range(1, params.steps + 1):
        index = torch.as_tensor(rng.choice(len(items), size=params.batch_size, p=sampling))
        batch_latents, batch_embeddings = latents_t[index], embeddings_t[index]
        noise = torch.randn_like(batch_latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_latents.shape[0],),
                                  device=batch_latents.device).long()
        noisy = noise_scheduler.add_noise(batch_latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(batch_latents, noise, timesteps)
        else:
            target = noise
        prediction = unet(noisy, timesteps, batch_embeddings, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower training.learning_rate")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 6))
        if step % log_every == 0 or step == params.steps:
            log(f"lora step {step}/{params.steps} loss {losses[-1]:.4f}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    unet = accelerator.unwrap_model(unet)
    StableDiffusionPipeline.save_lora_weights(
        output_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        weight_name=weight_name, safe_serialization=True,
    )
    lora_path = output_dir / weight_name
    return TrainingResult(lora_path=lora_path, sha256=hashlib.sha256(lora_path.read_bytes()).hexdigest(),
                          losses=losses, seconds=round(time.perf_counter() - started, 2), image_count=len(items))


def _load_pixels(path: Path, resolution: int):
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1], NCHW."""
    import numpy as np
    import torch

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
