"""Model families as one registry: everything the pipeline needs to know about a kind of base model.

A family says how a base model of its kind is recognised (the pipeline class in model_index.json),
which text encoders' outputs are cached for training, the training objective, where the LoRA goes
and how its file is keyed, which diffusers pipelines and ComfyUI templates draw with it, how to
recognise a LoRA file made for it, and its training preset and validation renders.

Adding a family (Qwen-Image, SD3.5) is one module in this package that defines `FAMILY` and is
named in `FAMILY_MODULES`; the training loop it names does the rest (docs/training.md#model-families).
No Dagster here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from persona_pipeline.training.params import LoraTrainingParams, TrainingConfigError

# Detection order: the first family whose `detects` accepts a pipeline class wins (SDXL before SD 1.x/2.x,
# since both class names start with StableDiffusion).
FAMILY_MODULES = ("sdxl", "sd15", "flux")


@dataclass(frozen=True)
class ModelFamily:
    name: str  # as stored in metadata, the LoRA library and persona.yaml: sd15, sdxl, flux
    title: str
    detects: Callable[[str], bool]  # model_index.json `_class_name` -> is this family
    text_encoders: tuple[str, ...]  # subfolders whose outputs are cached once per dataset version
    objective: str  # "noise" (epsilon or v-prediction, from the scheduler config) | "flow_matching"
    lora_target_modules: tuple[str, ...]
    lora_key_format: str  # "kohya" | "diffusers" (the names lora_files.detect_key_format reports)
    lora_key_prefix: str  # what every denoiser key of a saved LoRA starts with
    pipelines: dict[str, str]  # generation mode -> diffusers pipeline class name
    comfyui_templates: tuple[str, ...]  # workflows/<name>.json that draw with this family
    preset: LoraTrainingParams
    validation_render: tuple[int, int]  # (size in px, sampling steps) for checkpoint selection
    trainer: str  # "module:function" of the training loop, imported only when a run starts
    lora_matches: Callable[[list[str]], bool] = field(default=lambda keys: False)  # a LoRA file's keys -> made for this family
    edit_model: str | None = None  # its image-edit model (families/edit_models.py), which takes its LoRAs

    def train_function(self) -> Callable:
        module, _, name = self.trainer.partition(":")
        return getattr(importlib.import_module(module), name)


@lru_cache(maxsize=1)
def families() -> tuple[ModelFamily, ...]:
    return tuple(importlib.import_module(f"{__name__}.{name}").FAMILY for name in FAMILY_MODULES)


def family_named(name: str) -> ModelFamily:
    for family in families():
        if family.name == name:
            return family
    raise TrainingConfigError(f"model family {name!r} is not one of {', '.join(f.name for f in families())}")


@lru_cache(maxsize=8)
def detect_family(base_model: str) -> ModelFamily:
    """The family of a local diffusers folder or a hub id, from model_index.json's pipeline class;
    a wrong path or an unsupported pipeline is a clear error naming it."""
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
    for family in families():
        if family.detects(name):
            return family
    supported = ", ".join(family.title for family in families())
    raise TrainingConfigError(f"base model {base_model!r} is a {name or 'unknown pipeline'}; supported families: {supported}")


def model_family(base_model: str) -> str:
    """The family's name (`sd15`, `sdxl`, `flux`) of a base model; see `detect_family`."""
    return detect_family(base_model).name


def lora_file_family(keys: list[str]) -> str | None:
    """The family a LoRA file's tensor names alone identify (FLUX's transformer blocks), or None when
    the keys do not say (SD LoRAs are told apart by their cross-attention width instead)."""
    for family in families():
        if family.lora_matches(keys):
            return family.name
    return None
