"""LoRA training for Stable Diffusion 1.5 and SDXL base models, in one readable loop after diffusers'
train_text_to_image_lora(.py|_sdxl.py): frozen VAE, text encoder(s) and UNet; a peft LoRA adapter on
the UNet attention projections; AdamW (or 8-bit AdamW) on the noise-prediction MSE, with optional
Min-SNR weighting, noise offset and prior preservation; accelerate for device and mixed precision.

What it adds to the example loop:
- the VAE latent distributions and the text embeddings are computed once per dataset version and
  model, and cached next to the dataset, so each step only runs the UNet (`training.latent_cache`);
- checkpoints every N steps in kohya's key format (`lora_unet_<module>.lora_down.weight`), which
  ComfyUI and diffusers' `load_lora_weights` both read;
- a resumable state (LoRA weights, optimizer, RNG states, losses) saved with each checkpoint, so a
  killed run carries on from its latest checkpoint with the same numbers it would have produced;
- a non-finite loss stops the run before the bad update, keeping every checkpoint written so far;
- kohya's caption options (shuffled and dropped tags behind the first keep_tokens, drawn from the
  loop's saved generator) and pivotal tuning (the trigger word's own embedding, bundled in the file).

The pieces around the loop have modules of their own: the settings (`training.params`), the kohya
dataset (`training.kohya_dataset`), the model-family registry (`training.families`: detection,
presets, which loop trains a family), and what is particular to the UNet families: loading, LoRA
target modules, conditioning, the UNet call and the checkpoint key format
(`training.families.stable_diffusion`). `train_lora` hands a base model to its family's loop: this
one for SD 1.x/2.x and SDXL, `training.flux_lora` for FLUX.1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from persona_pipeline.fileio import sha256_file, write_via_temp
from persona_pipeline.training.kohya_dataset import (DatasetItem, KohyaDataset, dataset_trigger, load_pixels, read_kohya_dataset,
                                                     vary_caption)
from persona_pipeline.training.latent_cache import cached_inputs
from persona_pipeline.training.params import LoraTrainingParams, TrainingConfigError, resolve_mixed_precision
from persona_pipeline.training.families import detect_family, model_family
from persona_pipeline.training.families.stable_diffusion import (LORA_TARGET_MODULES, FrozenModel, add_trigger_token,
                                                                 kohya_state_dict, load_frozen_model_with_lora, predict_noise,
                                                                 save_checkpoint, text_conditioning, trigger_embedding_tensors)

__all__ = [
    "CHECKPOINT_DIR", "LORA_TARGET_MODULES", "STATE_FILE", "DatasetItem", "FrozenModel", "KohyaDataset",
    "LoraTrainingParams", "TrainingConfigError", "TrainingDiverged", "TrainingResult", "kohya_state_dict",
    "load_frozen_model_with_lora", "load_pixels", "model_family", "predict_noise", "read_kohya_dataset",
    "resolve_mixed_precision", "save_checkpoint", "train_lora", "train_unet_lora",
]

STATE_FILE = "training_state.pt"
CHECKPOINT_DIR = "checkpoints"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; every checkpoint written before it is kept."""

    def __init__(self, message: str, last_checkpoint: Path | None):
        super().__init__(message)
        self.last_checkpoint = last_checkpoint


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


def train_lora(base_model: str, dataset_dir: Path, output_dir: Path, params: LoraTrainingParams, **options) -> TrainingResult:
    """Train (or resume) a LoRA for `base_model` with its family's loop (`train_unet_lora`'s options)."""
    params.validate(options.get("device", "cpu"))
    return detect_family(base_model).train_function()(base_model, dataset_dir, output_dir, params, **options)


def train_unet_lora(
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
    if params.guidance is not None or params.quantize_base != "none" or params.aspect_buckets:
        raise TrainingConfigError(f"training.guidance, quantize_base and aspect_buckets apply to FLUX.1 only; the base model "
                                  f"{base_model} is {model_family(base_model)}: leave them unset")
    import numpy as np
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    output_dir = Path(output_dir)
    dataset, precision, accelerator, weight_dtype = open_run(dataset_dir, params, device, log)
    train_text = params.text_encoder_lr > 0
    model = load_frozen_model_with_lora(base_model, params.rank, params.alpha, weight_dtype=weight_dtype,
                                        text_encoder_lora=train_text)
    unet, scheduler = model.unet, model.noise_scheduler
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": params.learning_rate}]
    if train_text:
        groups.append({"params": [p for e in model.text_encoders for p in e.parameters() if p.requires_grad],
                       "lr": params.text_encoder_lr})

    cache = cached_inputs(model, dataset, params.resolution, Path(cache_dir or Path(dataset_dir) / "cache"),
                          base_model, accelerator.device, weight_dtype, log)
    # The frozen encoders are no longer needed: free them before the UNet's activations arrive.
    del model.vae
    vary = params.shuffle_caption or params.caption_tag_dropout_rate > 0
    pivotal = Pivotal.start(model, dataset, groups, params) if params.trigger_embedding_lr > 0 else None
    step_encoders: list = []  # text encoders run on every batch (a LoRA on them, or the trigger embedding, trains)
    frozen_text: FrozenText | None = None
    if train_text or pivotal:
        step_encoders = [accelerator.prepare(encoder) for encoder in model.text_encoders]
        for encoder in step_encoders:
            encoder.train(train_text)
    elif vary:  # captions change every step: keep the frozen encoders, with a cache per caption string
        frozen_text = FrozenText(model, [encoder.to(accelerator.device) for encoder in model.text_encoders], accelerator.device)
    text_encoders = step_encoders if train_text else []  # those whose LoRA is saved
    del model.text_encoders
    captions = [item.caption for item in dataset.items]
    optimizer = _optimizer(params, groups)
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
        start_step, losses, checkpoints = _resume(state_path, params, [accelerator.unwrap_model(m) for m in (unet, *text_encoders)],
                                                  optimizer, rng, pivotal)
        log(f"resuming from step {start_step}/{params.steps} (checkpoint {checkpoints[-1][1].name if checkpoints else 'none'})")

    every = params.checkpoint_every or params.steps
    unet.train()
    progress = Progress(params.steps, start_step, log, log_interval_s)
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

        batch_captions = [captions[i] for i in index.tolist()]
        if vary:
            batch_captions = [vary_caption(c, rng, shuffle=params.shuffle_caption, keep_tokens=params.keep_tokens,
                                           dropout=params.caption_tag_dropout_rate) for c in batch_captions]
        with accelerator.autocast():
            conditioning, at = cache, index
            if step_encoders or frozen_text:  # this batch's captions, encoded now (the text side trains, or captions vary)
                conditioning = (text_conditioning(model, step_encoders, batch_captions, accelerator.device) if step_encoders
                                else frozen_text.encode(batch_captions))
                if "time_ids" in cache:
                    conditioning["time_ids"] = cache["time_ids"][index]
                at = torch.arange(len(index), device=accelerator.device)
            prediction = predict_noise(unet, noisy.to(weight_dtype), timesteps, conditioning, at, model.family)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if params.min_snr_gamma:
            per_sample = per_sample * _min_snr_weights(scheduler, timesteps, params.min_snr_gamma)
        loss = prior_weighted(per_sample, is_reg[index], params.prior_loss_weight)
        apply_update(loss, step, params, checkpoints, accelerator, optimizer, losses)
        progress.step(step, losses[-1])
        if step % every == 0 or step == params.steps:
            path = checkpoint_dir / f"{stem}-step{step:06d}.safetensors"
            adapted = [accelerator.unwrap_model(m) for m in (unet, *text_encoders)]
            save_checkpoint(adapted[0], params.alpha, path,
                            {"step": str(step), "base_family": model.family, "rank": str(params.rank), "alpha": str(params.alpha),
                             **({"trigger_embedding": pivotal.trigger} if pivotal else {})},
                            text_encoders=adapted[1:], embeddings=pivotal.tensors() if pivotal else None)
            checkpoints = [c for c in checkpoints if c[0] != step] + [(step, path)]
            _save_state(state_path, step, params, adapted, optimizer, rng, losses, checkpoints, pivotal)

    return training_result(checkpoints, losses, started, dataset, start_step, model.family, precision)


class Pivotal:
    """Pivotal tuning's trainable part: the trigger word as a new token of each tokenizer, whose embedding
    row alone learns (the other rows' gradients are masked to zero, and the group has no weight decay, so
    AdamW leaves them exactly as they were)."""

    def __init__(self, trigger: str, weights: list, token_ids: list[int]):
        self.trigger, self.weights, self.token_ids = trigger, weights, token_ids

    @classmethod
    def start(cls, model: FrozenModel, dataset: KohyaDataset, groups: list, params: LoraTrainingParams) -> "Pivotal":
        import torch

        trigger = dataset_trigger(dataset)
        token_ids = add_trigger_token(model.tokenizers, model.text_encoders, trigger)
        weights = []
        for encoder, token_id in zip(model.text_encoders, token_ids):
            weight = encoder.get_input_embeddings().weight
            weight.data = weight.data.float()
            weight.requires_grad_(True)
            mask = torch.zeros(weight.shape[0], 1)
            mask[token_id] = 1.0
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
            weights.append(weight)
        groups.append({"params": weights, "lr": params.trigger_embedding_lr, "weight_decay": 0.0})
        return cls(trigger, weights, token_ids)

    def rows(self) -> list:
        return [weight[token_id].detach().clone() for weight, token_id in zip(self.weights, self.token_ids)]

    def restore(self, rows: list) -> None:
        import torch

        with torch.no_grad():
            for weight, token_id, row in zip(self.weights, self.token_ids, rows):
                weight[token_id] = row.to(weight.device, weight.dtype)

    def tensors(self) -> dict:
        return trigger_embedding_tensors(self.trigger, self.rows())


class FrozenText:
    """The frozen text encoders' conditioning per caption string, each caption encoded once: with
    caption variety a caption changes every step, but the variants of a short caption are few."""

    def __init__(self, model: FrozenModel, encoders: list, device):
        self.model, self.encoders, self.device, self.memo = model, encoders, device, {}

    def encode(self, captions: list[str]) -> dict:
        import torch

        for caption in set(captions) - self.memo.keys():
            with torch.no_grad():
                self.memo[caption] = text_conditioning(self.model, self.encoders, [caption], self.device)
        return {name: torch.cat([self.memo[c][name] for c in captions]) for name in self.memo[captions[0]]}


def open_run(dataset_dir: Path, params: LoraTrainingParams, device: str, log: Callable[[str], None]):
    """What every family's loop starts with: (dataset, precision, accelerator, weight dtype), the torch
    seed set for the LoRA's gaussian init."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

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
    return dataset, precision, accelerator, weight_dtype


def prior_weighted(per_sample, is_reg, prior_loss_weight: float):
    """The batch loss: regularisation images weighted by training.prior_loss_weight (prior preservation)."""
    import torch

    weights = torch.where(is_reg, prior_loss_weight, 1.0)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1e-8)


def apply_update(loss, step: int, params: LoraTrainingParams, checkpoints, accelerator, optimizer, losses: list[float]) -> None:
    """Backward and optimizer step, unless the loss is not finite: then stop before the bad update,
    naming the step and the last good checkpoint (every one written so far is kept)."""
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


class Progress:
    """Progress lines for the run log: the first and last step, and at most one per `interval_s` between."""

    def __init__(self, steps: int, start_step: int, log: Callable[[str], None], interval_s: float):
        self.steps, self.start_step, self.log, self.interval_s = steps, start_step, log, interval_s
        self.last_log, self.started = 0.0, time.perf_counter()

    def step(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        if step == self.start_step + 1 or step == self.steps or now - self.last_log >= self.interval_s:
            rate = (step - self.start_step) / max(now - self.started, 1e-9)
            self.log(f"lora step {step}/{self.steps} loss {loss:.4f} {rate:.2f} it/s ETA {_eta((self.steps - step) / rate)}")
            self.last_log = now


def training_result(checkpoints, losses, started: float, dataset: KohyaDataset, start_step: int, family: str,
                    precision: str) -> TrainingResult:
    final = checkpoints[-1][1]
    return TrainingResult(lora_path=final, sha256=sha256_file(final), checkpoints=checkpoints, losses=losses,
                          seconds=round(time.perf_counter() - started, 2),
                          image_count=sum(1 for item in dataset.items if not item.is_reg), resumed_from=start_step,
                          family=family, mixed_precision=precision)


def _optimizer(params: LoraTrainingParams, parameters):
    """AdamW (or bitsandbytes' 8-bit AdamW) over `parameters`: tensors, or param groups with their own lr."""
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


def _save_state(path: Path, step: int, params: LoraTrainingParams, adapted: list, optimizer, rng, losses: list[float],
                checkpoints: list[tuple[int, Path]], pivotal: Pivotal | None = None) -> None:
    """`adapted`: the UNet, then any text encoders that train."""
    import torch
    from peft.utils import get_peft_model_state_dict

    state = {
        "step": step, "params": params.as_dict(), "lora": get_peft_model_state_dict(adapted[0]),
        "lora_text_encoders": [get_peft_model_state_dict(encoder) for encoder in adapted[1:]],
        "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": rng.bit_generator.state, "losses": losses,
        "checkpoints": [(s, p.name) for s, p in checkpoints], "trigger_embedding": pivotal.rows() if pivotal else None,
    }
    write_via_temp(path, lambda tmp: torch.save(state, tmp))  # a kill mid-save leaves the previous state whole


def _resume(path: Path, params: LoraTrainingParams, adapted: list, optimizer, rng, pivotal: Pivotal | None = None):
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
    set_peft_model_state_dict(adapted[0], state["lora"])
    for encoder, weights in zip(adapted[1:], state.get("lora_text_encoders", [])):
        set_peft_model_state_dict(encoder, weights)
    if pivotal:
        pivotal.restore(state["trigger_embedding"])
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


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

