"""Local diffusers backend: the base model (tiny offline preset, a local folder or a hub id),
LoRA training on it, and generation with the persona's LoRA loaded."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import dagster as dg
from PIL import Image

from persona_pipeline.training.lora import LoraTrainingParams, TrainingResult, model_family, train_lora
from persona_pipeline.training.tiny_models import TINY_RESOLUTION, TINY_SD_NAME, build_tiny_sd

# ComfyUI sampler names (REFERENCES.md §2) → diffusers scheduler classes, so a manifest means
# the same thing whichever backend made the image.
SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "uni_pc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
}
SCHEDULERS = {"normal", "karras"}

# Training presets per base-model family (README "Training presets"); persona.yaml overrides any field.
TRAINING_PRESETS = {
    "tiny": LoraTrainingParams(rank=4, alpha=4.0, steps=30, learning_rate=1e-3, batch_size=2, resolution=TINY_RESOLUTION,
                               checkpoint_every=10),
    "sd15": LoraTrainingParams(rank=16, alpha=16.0, steps=1500, learning_rate=1e-4, batch_size=1, resolution=512,
                               min_snr_gamma=5.0, checkpoint_every=250),
    "sdxl": LoraTrainingParams(rank=16, alpha=16.0, steps=1500, learning_rate=1e-4, batch_size=1, resolution=1024,
                               min_snr_gamma=5.0, gradient_checkpointing=True, checkpoint_every=250),
}
TINY_TRAINING, SD15_TRAINING = TRAINING_PRESETS["tiny"], TRAINING_PRESETS["sd15"]
# Validation renders per family: (size, sampling steps).
VALIDATION_RENDER = {"tiny": (TINY_RESOLUTION, 4), "sd15": (512, 25), "sdxl": (1024, 25)}


class GenerationParamError(ValueError):
    pass


class DiffusionBackend(dg.ConfigurableResource):
    """PERSONA_BASE_MODEL / PERSONA_DEVICE; tiny models are built under `models_dir` once."""

    base_model: str = "tiny"
    device: str = "cpu"
    models_dir: str
    candidates_per_run: int = 4

    @property
    def is_tiny(self) -> bool:
        return self.base_model == "tiny"

    def base_model_path(self) -> str:
        if self.is_tiny:
            return str(build_tiny_sd(Path(self.models_dir) / TINY_SD_NAME))
        return self.base_model  # a local folder or a hub id; from_pretrained resolves either

    def preset_name(self) -> str:
        """The training and render preset: `tiny`, `sd15` or `sdxl` (from the model's model_index.json)."""
        return "tiny" if self.is_tiny else model_family(self.base_model)

    def training_defaults(self) -> LoraTrainingParams:
        return TRAINING_PRESETS[self.preset_name()]

    def training_params(self, overrides: dict) -> LoraTrainingParams:
        params = replace(self.training_defaults(), **{k: v for k, v in overrides.items() if v is not None})
        params.validate(self.device)
        return params

    def default_size(self) -> int:
        return VALIDATION_RENDER[self.preset_name()][0]

    def train(self, dataset_dir: Path, output_dir: Path, params: LoraTrainingParams, weight_name: str,
              log: Callable[[str], None]) -> TrainingResult:
        return train_lora(self.base_model_path(), dataset_dir, output_dir, params, device=self.device,
                          weight_name=weight_name, log=log)

    def render_checkpoints(self, checkpoints: list[Path], prompts: list[str], seeds: list[int]) -> list[list[Image.Image]]:
        """Images of every checkpoint on the same prompts and seeds (prompt-major, then seed), from
        one loaded base pipeline: each LoRA is loaded, used and unloaded in turn."""
        import torch

        size, steps = VALIDATION_RENDER[self.preset_name()]
        pipe = _base_pipeline(self.base_model_path(), self.device)
        out = []
        for index, checkpoint in enumerate(checkpoints):
            adapter = f"checkpoint_{index}"
            pipe.load_lora_weights(str(checkpoint), adapter_name=adapter)
            images = []
            try:
                for prompt in prompts:
                    for seed in seeds:
                        generator = torch.Generator(device="cpu").manual_seed(seed)
                        images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, width=size, height=size,
                                           generator=generator).images[0])
            finally:
                pipe.delete_adapters(adapter)
            out.append(images)
        return out

    def generate_plain(self, prompt: str, seeds: list[int], size: int | None = None) -> list[Image.Image]:
        """Images from the base model with no LoRA (regularisation / class images)."""
        import torch

        size = size or self.default_size()
        _, steps = VALIDATION_RENDER[self.preset_name()]
        pipe = _base_pipeline(self.base_model_path(), self.device)
        return [pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, width=size, height=size,
                     generator=torch.Generator(device="cpu").manual_seed(seed)).images[0] for seed in seeds]

    def generate(self, *, prompt: str, negative_prompt: str, seeds: list[int], steps: int, cfg: float,
                 sampler: str, scheduler: str, width: int, height: int, lora_path: Path | None,
                 lora_weight: float) -> list[Image.Image]:
        check_generation_params(steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, width=width, height=height,
                                minimum_side=32 if self.is_tiny else 256)
        import torch

        pipe = _pipeline(self.base_model_path(), self.device, str(lora_path) if lora_path else None, sampler, scheduler)
        images = []
        for seed in seeds:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            kwargs = {"cross_attention_kwargs": {"scale": lora_weight}} if lora_path else {}
            result = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=cfg,
                          width=width, height=height, generator=generator, **kwargs)
            images.append(result.images[0])
        return images


def check_generation_params(*, steps: int, cfg: float, sampler: str, scheduler: str, width: int, height: int,
                            minimum_side: int = 256) -> None:
    """Refuse out-of-range parameters before any model is loaded, naming the field and bound."""
    for name, value in (("width", width), ("height", height)):
        if value % 8 or not minimum_side <= value <= 2048:
            raise GenerationParamError(f"{name}={value} must be a multiple of 8 from {minimum_side} to 2048")
    if not 1 <= steps <= 150:
        raise GenerationParamError(f"steps={steps} is out of range 1..150")
    if not 1 <= cfg <= 30:
        raise GenerationParamError(f"cfg={cfg} is out of range 1..30")
    if sampler not in SAMPLERS:
        raise GenerationParamError(f"sampler={sampler!r} is not a ComfyUI sampler name; use one of {', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULERS:
        raise GenerationParamError(f"scheduler={scheduler!r} must be one of {', '.join(sorted(SCHEDULERS))}")


@lru_cache(maxsize=1)
def _base_pipeline(base_model: str, device: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@lru_cache(maxsize=4)
def _pipeline(base_model: str, device: str, lora_path: str | None, sampler: str, scheduler: str):
    import diffusers
    from diffusers import DiffusionPipeline

    # DiffusionPipeline picks the SD1.5 or SDXL pipeline class from model_index.json.
    pipe = DiffusionPipeline.from_pretrained(base_model, safety_checker=None, requires_safety_checker=False)
    scheduler_class = getattr(diffusers, SAMPLERS[sampler])
    extra = {"use_karras_sigmas": True} if scheduler == "karras" else {}
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
    if lora_path:
        pipe.load_lora_weights(str(Path(lora_path).parent), weight_name=Path(lora_path).name)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
