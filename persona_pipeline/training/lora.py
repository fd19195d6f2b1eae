"""LoRA training for Stable Diffusion 1.5 and SDXL base models, in one readable loop after diffusers'
train_text_to_image_lora(.py|_sdxl.py): frozen VAE, text encoder(s) and UNet; a peft LoRA adapter on
the UNet attention projections; AdamW (or 8-bit AdamW) on the noise-prediction MSE, with optional
Min-SNR weighting, noise offset and prior preservation; accelerate for device and mixed precision.

What it adds to the example loop:
- the VAE latent distributions and the text embeddings are computed once per dataset version and
  model, and cached next to the dataset, so each step only runs the UNet;
- checkpoints every N steps in kohya's key format (`lora_unet_<module>.lora_down.weight`), which
  ComfyUI and diffusers' `load_lora_weights` both read;
- a resumable state (LoRA weights, optimizer, RNG states, losses) saved with each checkpoint, so a
  killed run carries on from its latest checkpoint with the same numbers it would have produced;
- a non-finite loss stops the run before the bad update, keeping every checkpoint written so far.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import tomllib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable

from PIL import Image

from persona_pipeline.fileio import sha256_file, write_via_temp

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
STATE_FILE = "training_state.pt"
CHECKPOINT_DIR = "checkpoints"


class TrainingConfigError(ValueError):
    """A training setting, the dataset or the base model is unusable; the message names which."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; every checkpoint written before it is kept."""

    def __init__(self, message: str, last_checkpoint: Path | None):
        super().__init__(message)
        self.last_checkpoint = last_checkpoint


@dataclass(frozen=True)
class LoraTrainingParams:
    rank: int = 4
    alpha: float = 4.0
    steps: int = 30
    learning_rate: float = 1e-3
    batch_size: int = 2
    resolution: int = 64
    seed: int = 0
    optimizer: str = "adamw"  # adamw | adamw8bit (needs bitsandbytes)
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16; auto = bf16 on a GPU that has it, else fp16; no on CPU
    gradient_checkpointing: bool = False
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the paper's value
    noise_offset: float = 0.0  # 0 = off; 0.05-0.1 helps very dark/bright images
    prior_loss_weight: float = 1.0  # weight of the regularisation images' loss (prior preservation)
    checkpoint_every: int = 0  # 0 = one checkpoint, at the end

    # Numeric bounds checked before any model is loaded; each error names the field and the bound.
    BOUNDS = {
        "rank": (1, 256), "alpha": (0.01, 512), "steps": (1, 100000), "learning_rate": (1e-7, 1e-2),
        "batch_size": (1, 64), "resolution": (32, 2048), "min_snr_gamma": (0, 20), "noise_offset": (0, 1),
        "prior_loss_weight": (0, 10), "checkpoint_every": (0, 100000),
    }
    OPTIMIZERS = ("adamw", "adamw8bit")
    PRECISIONS = ("auto", "no", "fp16", "bf16")

    def validate(self, device: str | None = None) -> None:
        for name, (low, high) in self.BOUNDS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise TrainingConfigError(f"training.{name}={value} is out of range [{low}, {high}]")
        if self.resolution % 8:
            raise TrainingConfigError(f"training.resolution={self.resolution} must be a multiple of 8")
        if self.optimizer not in self.OPTIMIZERS:
            raise TrainingConfigError(f"training.optimizer={self.optimizer!r} must be one of {', '.join(self.OPTIMIZERS)}")
        if self.optimizer == "adamw8bit":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise TrainingConfigError("training.optimizer='adamw8bit' needs bitsandbytes (pip install bitsandbytes); "
                                          "use 'adamw' or install it")
        if self.mixed_precision not in self.PRECISIONS:
            raise TrainingConfigError(f"training.mixed_precision={self.mixed_precision!r} must be one of {', '.join(self.PRECISIONS)}")
        if device is not None:
            resolve_mixed_precision(self.mixed_precision, device)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_mixed_precision(choice: str, device: str) -> str:
    """`auto` → bf16 on a GPU that supports it, fp16 on an older GPU, none on a CPU (CPU fp16 has no
    fast kernels). An explicit choice the device cannot run is refused."""
    on_cuda = device.startswith("cuda")
    if choice == "auto":
        if not on_cuda:
            return "no"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp16" and not on_cuda:
        raise TrainingConfigError(f"training.mixed_precision='fp16' needs a CUDA device; the device is {device!r} (use 'no' or 'bf16')")
    if choice == "bf16" and on_cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise TrainingConfigError(f"training.mixed_precision='bf16': {device} does not support bf16; use 'fp16'")
    return choice


@dataclass(frozen=True)
class DatasetItem:
    image: Path
    caption: str
    repeats: int
    is_reg: bool = False


@dataclass(frozen=True)
class KohyaDataset:
    items: list[DatasetItem]
    flip: bool = False


@dataclass
class TrainingResult:
    lora_path: Path  # the last checkpoint
    sha256: str
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    image_count: int = 0
    resumed_from: int = 0
    family: str = "sd15"
    mixed_precision: str = "no"


def read_kohya_dataset(dataset_dir: Path) -> KohyaDataset:
    """The subsets of a kohya dataset: from `dataset.toml` when there is one (image_dir, num_repeats,
    is_reg, flip_aug), else every `<repeats>_<trigger> <class>/` folder. Every image needs a caption."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise TrainingConfigError(f"{dataset_dir}: dataset folder not found")
    toml_path = dataset_dir / "dataset.toml"
    subsets: list[tuple[Path, int, bool]] = []
    flip = False
    if toml_path.is_file():
        try:
            config = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise TrainingConfigError(f"{toml_path}: invalid TOML: {exc}") from None
        flip = bool(config.get("general", {}).get("flip_aug", False))
        for dataset in config.get("datasets", []):
            flip = bool(dataset.get("flip_aug", flip))
            for subset in dataset.get("subsets", []):
                image_dir = Path(subset["image_dir"])
                if not image_dir.is_absolute():
                    image_dir = dataset_dir / image_dir
                subsets.append((image_dir, int(subset.get("num_repeats", 1)), bool(subset.get("is_reg", False))))
    else:
        for sub in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
            repeats_text, _, _ = sub.name.partition("_")
            if repeats_text.isdigit():
                subsets.append((sub, int(repeats_text), False))
    items = []
    for image_dir, repeats, is_reg in subsets:
        if not image_dir.is_dir():
            raise TrainingConfigError(f"{toml_path}: image_dir {image_dir} does not exist")
        for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = image.with_suffix(".txt")
            if not caption_file.is_file():
                raise TrainingConfigError(f"{image}: caption file {caption_file.name} is missing")
            items.append(DatasetItem(image, caption_file.read_text(encoding="utf-8").strip(), repeats, is_reg))
    if not any(not item.is_reg for item in items):
        raise TrainingConfigError(f"{dataset_dir}: the dataset has no training images "
                                  "(no `<repeats>_<trigger> <class>/` folder with images)")
    return KohyaDataset(items=items, flip=flip)


@lru_cache(maxsize=8)
def model_family(base_model: str) -> str:
    """`sdxl` or `sd15` from the pipeline class in model_index.json; a wrong path is a clear error."""
    from diffusers import DiffusionPipeline

    local = Path(base_model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise TrainingConfigError(f"base model {base_model}: not a diffusers model folder (no model_index.json)")
    if not local.exists() and (base_model.startswith((".", "/", "~")) or base_model.count("/") != 1):
        raise TrainingConfigError(f"base model {base_model!r}: no such folder, and not a hub id (owner/name)")
    try:
        config = DiffusionPipeline.load_config(base_model)
    except Exception as exc:  # hub errors come in many classes; the message is what matters
        raise TrainingConfigError(f"base model {base_model!r} could not be opened: {exc}") from None
    name = config.get("_class_name", "")
    if "XL" in name:
        return "sdxl"
    if name.startswith("StableDiffusion"):
        return "sd15"
    raise TrainingConfigError(f"base model {base_model!r} is a {name or 'unknown pipeline'}; only Stable Diffusion 1.x/2.x and SDXL are supported")


@dataclass
class FrozenModel:
    family: str
    tokenizers: list
    text_encoders: list
    vae: object
    unet: object
    noise_scheduler: object


def load_frozen_model_with_lora(base_model: str, rank: int, alpha: float, *, weight_dtype=None) -> FrozenModel:
    """Tokenizer(s), text encoder(s), VAE and UNet, all frozen, plus a trainable LoRA adapter on the
    UNet's attention projections (kept in fp32 even when the frozen weights are half precision)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family = model_family(base_model)
    tokenizers = [CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer")]
    text_encoders = [CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder")]
    if family == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2"))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(base_model, subfolder="text_encoder_2"))
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler")
    for model in (vae, unet, *text_encoders):
        model.requires_grad_(False)
    if weight_dtype is not None and weight_dtype != torch.float32:
        unet.to(dtype=weight_dtype)
        for encoder in text_encoders:
            encoder.to(dtype=weight_dtype)
        # SD1.5's VAE overflows in fp16; keep it in fp32 (as the SDXL example does with its fp16-fix VAE).
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))
    for parameter in unet.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return FrozenModel(family, tokenizers, text_encoders, vae, unet, noise_scheduler)


def kohya_state_dict(unet, alpha: float) -> dict:
    """The UNet's LoRA weights in kohya's format: `lora_unet_<diffusers module path, dots as
    underscores>.lora_down.weight / .lora_up.weight / .alpha`. ComfyUI maps exactly these names
    onto its UNet (comfy/lora.py), and diffusers' load_lora_weights converts them on load."""
    import torch
    from peft.utils import get_peft_model_state_dict

    out = {}
    for key, tensor in get_peft_model_state_dict(unet).items():
        module, _, kind = key.rpartition(".lora_")  # "...to_q", "A.weight"
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.detach().to("cpu", torch.float32).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_checkpoint(unet, alpha: float, path: Path, metadata: dict[str, str]) -> str:
    """Write a .safetensors checkpoint atomically; return its sha256."""
    from safetensors.torch import save_file

    state = kohya_state_dict(unet, alpha)
    write_via_temp(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return sha256_file(path)


def train_lora(
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
    """Train, or resume the run whose state is in `output_dir`. Checkpoints go to
    `output_dir/checkpoints/<stem>-step<N>.safetensors`; the result names the last one."""
    params.validate(device)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    started = time.perf_counter()
    output_dir = Path(output_dir)
    dataset = read_kohya_dataset(dataset_dir)
    if any(item.is_reg for item in dataset.items) and params.prior_loss_weight == 0:
        log("regularisation images present but training.prior_loss_weight is 0: they are ignored")
    precision = resolve_mixed_precision(params.mixed_precision, device)
    # accelerate keeps one process-wide state; a long-lived process (the Dagster daemon's
    # in-process executor, the tests) may train again with another precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)

    torch.manual_seed(params.seed)  # the LoRA's gaussian init draws from it
    model = load_frozen_model_with_lora(base_model, params.rank, params.alpha, weight_dtype=weight_dtype)
    unet, scheduler = model.unet, model.noise_scheduler
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = _optimizer(params, lora_parameters)

    cache = _cached_inputs(model, dataset, params.resolution, Path(cache_dir or Path(dataset_dir) / "cache"),
                           base_model, accelerator.device, weight_dtype, log)
    # The frozen encoders are no longer needed: free them before the UNet's activations arrive.
    del model.vae, model.text_encoders
    unet, optimizer = accelerator.prepare(unet, optimizer)

    sampling = np.asarray([item.repeats for item in dataset.items], dtype=np.float64)
    sampling /= sampling.sum()  # kohya repeats as sampling weight
    is_reg = torch.tensor([item.is_reg for item in dataset.items], device=accelerator.device)
    rng = np.random.default_rng(params.seed)

    stem = Path(weight_name).stem
    checkpoint_dir = output_dir / CHECKPOINT_DIR
    state_path = output_dir / STATE_FILE
    losses: list[float] = []
    checkpoints: list[tuple[int, Path]] = []
    start_step = 0
    if state_path.is_file():
        start_step, losses, checkpoints = _resume(state_path, params, accelerator.unwrap_model(unet), optimizer, rng)
        log(f"resuming from step {start_step}/{params.steps} (checkpoint {checkpoints[-1][1].name if checkpoints else 'none'})")

    every = params.checkpoint_every or params.steps
    unet.train()
    last_log, loop_started, done_before = 0.0, time.perf_counter(), start_step
    for step in range(start_step + 1, params.steps + 1):
        index = torch.as_tensor(rng.choice(len(dataset.items), size=params.batch_size, p=sampling), device=accelerator.device)
        flip = torch.rand(params.batch_size) < 0.5 if dataset.flip else torch.zeros(params.batch_size, dtype=torch.bool)
        mean = torch.where(flip[:, None, None, None].to(accelerator.device), cache["mean_flipped"][index], cache["mean"][index])
        std = torch.where(flip[:, None, None, None].to(accelerator.device), cache["std_flipped"][index], cache["std"][index])
        latents = (mean + std * torch.randn_like(mean)) * cache["scaling_factor"]  # a fresh VAE sample each step
        noise = torch.randn_like(latents)
        if params.noise_offset:
            noise = noise + params.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps) if scheduler.config.prediction_type == "v_prediction" else noise

        with accelerator.autocast():
            prediction = predict_noise(unet, noisy.to(weight_dtype), timesteps, cache, index, model.family)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if params.min_snr_gamma:
            per_sample = per_sample * _min_snr_weights(scheduler, timesteps, params.min_snr_gamma)
        weights = torch.where(is_reg[index], params.prior_loss_weight, 1.0)
        loss = (per_sample * weights).sum() / weights.sum().clamp(min=1e-8)

        if not math.isfinite(loss.item()):
            last = checkpoints[-1][1] if checkpoints else None
            raise TrainingDiverged(
                f"training loss became {loss.item()} at step {step}/{params.steps}; stopped before applying it. "
                f"Last good checkpoint: {last if last else 'none yet (set training.checkpoint_every)'}. "
                f"Lower training.learning_rate (now {params.learning_rate}) or use mixed_precision 'no'.", last)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 6))

        now = time.perf_counter()
        if step == start_step + 1 or step == params.steps or now - last_log >= log_interval_s:
            rate = (step - done_before) / max(now - loop_started, 1e-9)
            log(f"lora step {step}/{params.steps} loss {losses[-1]:.4f} {rate:.2f} it/s ETA {_eta((params.steps - step) / rate)}")
            last_log = now
        if step % every == 0 or step == params.steps:
            path = checkpoint_dir / f"{stem}-step{step:06d}.safetensors"
            save_checkpoint(accelerator.unwrap_model(unet), params.alpha, path,
                            {"step": str(step), "base_family": model.family, "rank": str(params.rank), "alpha": str(params.alpha)})
            checkpoints = [c for c in checkpoints if c[0] != step] + [(step, path)]
            _save_state(state_path, step, params, accelerator.unwrap_model(unet), optimizer, rng, losses, checkpoints)

    final = checkpoints[-1][1]
    return TrainingResult(lora_path=final, sha256=sha256_file(final), checkpoints=checkpoints, losses=losses,
                          seconds=round(time.perf_counter() - started, 2),
                          image_count=sum(1 for item in dataset.items if not item.is_reg), resumed_from=start_step,
                          family=model.family, mixed_precision=precision)


def predict_noise(unet, noisy, timesteps, cache: dict, index, family: str):
    """One UNet call with the cached conditioning (SDXL adds the pooled text embedding and the
    size/crop time ids). A function of its own so a test can make it misbehave."""
    hidden = cache["hidden"][index].to(noisy.dtype)
    if family != "sdxl":
        return unet(noisy, timesteps, hidden, return_dict=False)[0]
    time_ids = cache["time_ids"][index].clone()
    added = {"text_embeds": cache["pooled"][index].to(noisy.dtype), "time_ids": time_ids.to(noisy.dtype)}
    return unet(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]


def _optimizer(params: LoraTrainingParams, parameters):
    if params.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=params.learning_rate)
    import torch

    return torch.optim.AdamW(parameters, lr=params.learning_rate)


def _min_snr_weights(scheduler, timesteps, gamma: float):
    """Min-SNR-γ loss weights (Hang et al. 2023), as in diffusers' training examples."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    return weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr


def _cached_inputs(model: FrozenModel, dataset: KohyaDataset, resolution: int, cache_dir: Path, base_model: str,
                   device, weight_dtype, log: Callable[[str], None]) -> dict:
    """Latent distributions (mean, std; and of the mirrored image when flips are on) and text
    embeddings for every item, computed once and kept in `cache_dir` under a key of the images,
    captions, model and resolution, so re-runs and resumes skip the encoders entirely."""
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
        columns: dict[str, list] = {"mean": [], "std": [], "mean_flipped": [], "std_flipped": [], "hidden": [], "pooled": [], "time_ids": []}
        with torch.no_grad():
            for item in dataset.items:
                pixels, original_size, crop = load_pixels(item.image, resolution)
                variants = [pixels, torch.flip(pixels, dims=[3])] if dataset.flip else [pixels]
                for name, variant in zip(("", "_flipped"), variants):
                    dist = vae.encode(variant.to(device, torch.float32)).latent_dist
                    columns["mean" + name].append(dist.mean)
                    columns["std" + name].append(dist.std)
                hidden, pooled = _encode_caption(model, encoders, item.caption, device)
                columns["hidden"].append(hidden)
                if pooled is not None:
                    columns["pooled"].append(pooled)
                    columns["time_ids"].append(torch.tensor([[*original_size, *crop, resolution, resolution]], dtype=torch.float32))
        tensors = {k: torch.cat(v).float().cpu().contiguous() for k, v in columns.items() if v}
        write_via_temp(path, lambda tmp: save_file(tensors, str(tmp)))
        log(f"cached latents and text embeddings for {len(dataset.items)} images in {time.perf_counter() - started:.1f}s")
        tensors = {k: v.to(device) for k, v in tensors.items()}
        model.vae.to("cpu")
    if not dataset.flip:
        tensors["mean_flipped"], tensors["std_flipped"] = tensors["mean"], tensors["std"]
    tensors["scaling_factor"] = float(model.vae.config.scaling_factor)
    return tensors


def _encode_caption(model: FrozenModel, encoders, caption: str, device):
    """SD1.5: the last hidden state. SDXL: the penultimate hidden states of both encoders,
    concatenated, plus the second encoder's pooled projection (as the SDXL pipeline does)."""
    import torch

    if model.family != "sdxl":
        ids = model.tokenizers[0](caption, padding="max_length", max_length=model.tokenizers[0].model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(device)
        return encoders[0](ids)[0].float(), None
    states, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, encoders):
        ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        pooled = output[0]  # the last encoder's text_embeds
        states.append(output.hidden_states[-2])
    return torch.cat(states, dim=-1).float(), pooled.float()


def _save_state(path: Path, step: int, params: LoraTrainingParams, unet, optimizer, rng, losses: list[float],
                checkpoints: list[tuple[int, Path]]) -> None:
    import torch
    from peft.utils import get_peft_model_state_dict

    state = {
        "step": step, "params": params.as_dict(), "lora": get_peft_model_state_dict(unet),
        "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": rng.bit_generator.state, "losses": losses,
        "checkpoints": [(s, p.name) for s, p in checkpoints],
    }
    write_via_temp(path, lambda tmp: torch.save(state, tmp))  # a kill mid-save leaves the previous state whole


def _resume(path: Path, params: LoraTrainingParams, unet, optimizer, rng):
    import torch
    from peft.utils import set_peft_model_state_dict

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainingConfigError(f"{path}: the saved training state cannot be read ({exc}); delete it to start over") from None
    if state["params"] != params.as_dict():
        changed = sorted(k for k in state["params"] if state["params"][k] != params.as_dict().get(k))
        raise TrainingConfigError(f"{path}: saved with different settings ({', '.join(changed)}); "
                                  "delete the folder to start over with the new ones")
    set_peft_model_state_dict(unet, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    rng.bit_generator.state = state["numpy_rng"]
    checkpoints = [(s, path.parent / CHECKPOINT_DIR / name) for s, name in state["checkpoints"]]
    missing = [str(p) for _, p in checkpoints if not p.is_file()]
    if missing:
        raise TrainingConfigError(f"{path}: checkpoints named in the saved state are missing: {', '.join(missing)}")
    return int(state["step"]), list(state["losses"]), checkpoints


def load_pixels(path: Path, resolution: int):
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1], NCHW. Also returns the
    original (height, width) and the crop's (top, left), which SDXL is conditioned on."""
    import numpy as np
    import torch

    with Image.open(path) as image:
        image = image.convert("RGB")
        original = (image.height, image.width)
        scale = resolution / min(image.size)
        image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0), original, (top, left)


def _config_digest(model) -> str:
    return hashlib.sha256(json.dumps(dict(model.config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

