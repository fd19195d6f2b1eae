"""The settings of a LoRA training run and the error a wrong one raises.

Every setting is checked here, before any model is loaded, and each error names the setting
(`training.<name>`, as persona.yaml spells it) and what it must be.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from persona_pipeline.domain.generation_params import FLUX_GUIDANCE_RANGE


class TrainingConfigError(ValueError):
    """A training setting, the dataset or the base model is unusable; the message names which."""


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
    # 0 = text encoders frozen (a UNet-only LoRA; caption embeddings cached once). Above 0, a LoRA on
    # each text encoder's attention trains too, at this rate, so the trigger word itself comes to
    # mean the look (kohya's text_encoder_lr; diffusers' --train_text_encoder).
    text_encoder_lr: float = 0.0
    # Caption variety, with kohya sd-scripts' names and meaning (training/kohya_dataset.py `vary_caption`):
    # a caption is comma-separated tags; the first keep_tokens tags stay in place (the trigger word and
    # class), the others are shuffled (shuffle_caption) and each dropped with caption_tag_dropout_rate,
    # afresh every step, so the look binds to the trigger word rather than to the whole caption.
    # Pivotal tuning (diffusers' --train_text_encoder_ti): above 0, the trigger word (the first word of every
    # training caption) becomes a new token whose input embedding trains at this rate with the LoRA; the
    # LoRA file bundles it and generation loads it with the LoRA (training/families/stable_diffusion.py).
    trigger_embedding_lr: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 1
    caption_tag_dropout_rate: float = 0.0
    # FLUX.1 only (training/families/flux.py). guidance: the [dev] guidance input while training (None:
    # 1.0; [schnell] has none and refuses one). timestep_sampling: how noise levels are drawn before
    # the scheduler's shift. max_sequence_length: T5 tokens per caption. quantize_base: the frozen
    # transformer in 8-bit (bitsandbytes) or fp8 (torchao), CUDA only.
    guidance: float | None = None
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform
    max_sequence_length: int = 512
    quantize_base: str = "none"  # none | int8 | fp8
    # Aspect-ratio buckets (training/buckets.py): each photo near its own shape at about resolution² pixels,
    # instead of a centre square. The FLUX.1 loop only.
    aspect_buckets: bool = False

    # Numeric bounds checked before any model is loaded; each error names the field and the bound.
    BOUNDS = {
        "rank": (1, 256), "alpha": (0.01, 512), "steps": (1, 100000), "learning_rate": (1e-7, 1e-2),
        "batch_size": (1, 64), "resolution": (32, 2048), "min_snr_gamma": (0, 20), "noise_offset": (0, 1),
        "prior_loss_weight": (0, 10), "checkpoint_every": (0, 100000), "text_encoder_lr": (0, 1e-2),
        "max_sequence_length": (8, 512), "keep_tokens": (0, 75), "caption_tag_dropout_rate": (0, 1),
        "trigger_embedding_lr": (0, 0.1),
    }
    GUIDANCE = FLUX_GUIDANCE_RANGE  # FLUX.1 [dev]'s distilled guidance, as generation bounds it
    TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")
    QUANTIZATIONS = ("none", "int8", "fp8")
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
        if self.guidance is not None and not self.GUIDANCE[0] <= self.guidance <= self.GUIDANCE[1]:
            raise TrainingConfigError(f"training.guidance={self.guidance} is out of range [{self.GUIDANCE[0]}, {self.GUIDANCE[1]}]")
        if self.timestep_sampling not in self.TIMESTEP_SAMPLINGS:
            raise TrainingConfigError(f"training.timestep_sampling={self.timestep_sampling!r} must be one of "
                                      f"{', '.join(self.TIMESTEP_SAMPLINGS)}")
        if self.quantize_base not in self.QUANTIZATIONS:
            raise TrainingConfigError(f"training.quantize_base={self.quantize_base!r} must be one of {', '.join(self.QUANTIZATIONS)}")
        if device is not None:
            resolve_mixed_precision(self.mixed_precision, device)
            if self.quantize_base != "none" and not device.startswith("cuda"):
                raise TrainingConfigError(f"training.quantize_base={self.quantize_base!r} needs a CUDA device; the device is "
                                          f"{device!r} (8-bit and fp8 kernels are GPU-only): set it to 'none'")

    def caption_options(self) -> dict:
        """The caption options by kohya's names, as a dataset.toml carries them."""
        return {"shuffle_caption": self.shuffle_caption, "keep_tokens": self.keep_tokens,
                "caption_tag_dropout_rate": self.caption_tag_dropout_rate}

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

