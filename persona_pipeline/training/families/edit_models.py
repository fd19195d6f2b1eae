"""Image-edit models: an input image plus an instruction, as a generation step of type `edit`.

Each entry says how the model is recognised (its diffusers pipeline class in model_index.json),
which ComfyUI template draws with it, which family's LoRAs it takes (FLUX.1 Kontext's transformer
is FLUX.1's, so FLUX LoRAs load onto it; Qwen-Image-Edit takes none of the families we train), its
default weights (a hub id; a local folder or hub id in the step's `model` replaces it) and ComfyUI
file, its tiny local stand-in, and the size it draws when a step sets none (the size the model was
trained at, for the input's aspect ratio, as ComfyUI's own nodes pick it).

A family names its edit model (`ModelFamily.edit_model`); adding an edit model is one entry here,
one template in workflows/ and, for the diffusers backend, its call arguments
(resources/diffusion_batches.py `edit_arguments`). No Dagster, no torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from persona_pipeline.domain.generation_params import WorkflowError

# FLUX.1 Kontext's training resolutions (width, height), as ComfyUI's FluxKontextImageScale and
# diffusers' FluxKontextPipeline both pick from them by the input's aspect ratio.
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))


class EditStepError(WorkflowError):
    """An edit step that cannot run: no input image, no edit model for the family, a model that is not one."""


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The Kontext resolution nearest the input's aspect ratio (FluxKontextImageScale's rule)."""
    ratio = width / height
    return min(KONTEXT_RESOLUTIONS, key=lambda size: abs(ratio - size[0] / size[1]))


def one_megapixel_size(width: int, height: int) -> tuple[int, int]:
    """About 1024x1024 pixels at the input's aspect ratio, sides multiples of 32 (Qwen-Image-Edit's
    `calculate_dimensions`, which diffusers and ComfyUI's TextEncodeQwenImageEdit both apply)."""
    ratio = width / height
    side_w = math.sqrt(1024 * 1024 * ratio)
    return int(round(side_w / 32) * 32), int(round(side_w / ratio / 32) * 32)


@dataclass(frozen=True)
class EditModel:
    name: str  # what manifests and the step's resolved params store: kontext | qwen_image_edit
    title: str
    pipeline: str  # diffusers pipeline class (model_index.json `_class_name`)
    template: str  # workflows/<name>.json, the ComfyUI graph
    lora_family: str | None  # the family whose LoRAs it takes; None: it takes none of ours
    default_model: str  # hub id of the released weights (the step's `model` overrides it)
    comfyui_file: str  # its diffusion model in ComfyUI's models/diffusion_models
    tiny: str  # the tiny local stand-in's name (DiffusionBackend base_model)
    guidance: str  # "distilled" (FLUX's guidance input, FluxGuidance) | "true_cfg" (a negative prompt pass)
    preferred_size: object  # (width, height) of the input -> the size drawn when the step sets none

    def size_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self.preferred_size(*image_size)


KONTEXT = EditModel(name="kontext", title="FLUX.1 Kontext [dev]", pipeline="FluxKontextPipeline",
                    template="flux_kontext_edit", lora_family="flux", default_model="black-forest-labs/FLUX.1-Kontext-dev",
                    comfyui_file="flux1-dev-kontext_fp8_scaled.safetensors", tiny="tiny-kontext", guidance="distilled",
                    preferred_size=kontext_size)
QWEN_IMAGE_EDIT = EditModel(name="qwen_image_edit", title="Qwen-Image-Edit", pipeline="QwenImageEditPipeline",
                            template="qwen_image_edit", lora_family=None, default_model="Qwen/Qwen-Image-Edit",
                            comfyui_file="qwen_image_edit_fp8_e4m3fn.safetensors", tiny="tiny-qwen-edit",
                            guidance="true_cfg", preferred_size=one_megapixel_size)
EDIT_MODELS = (KONTEXT, QWEN_IMAGE_EDIT)
TINY_EDIT_MODELS = {model.tiny: model for model in EDIT_MODELS}


def edit_model_named(name: str) -> EditModel:
    for model in EDIT_MODELS:
        if model.name == name:
            return model
    raise EditStepError(f"edit model {name!r} is not one of {', '.join(m.name for m in EDIT_MODELS)}")


def edit_model_of_pipeline(pipeline_class: str) -> EditModel | None:
    return next((model for model in EDIT_MODELS if model.pipeline == pipeline_class), None)


def edit_model_of_template(template: str) -> EditModel | None:
    return next((model for model in EDIT_MODELS if model.template == template), None)


def pipeline_class_of(model: str) -> str | None:
    """The pipeline class a local diffusers folder declares; None for a hub id (nothing is downloaded
    to find out: the pipeline itself refuses a wrong one when it loads)."""
    index = Path(model) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_edit_model(step_name: str, model: str | None, template: str | None, family: str | None,
                       base_model: str | None) -> tuple[EditModel, str]:
    """(edit model, diffusers weights) of an edit step: its `model` (a tiny stand-in, a local folder
    or a hub id) or its template says which; else the persona family's own edit model, its tiny
    stand-in when the persona draws with a tiny model. Refuses, naming the step, a family without
    an edit model, a model that is no edit model, and a model and template that disagree."""
    from persona_pipeline.training.families import family_named

    where = f"edit step {step_name!r}"
    chosen = by_template = edit_model_of_template(template) if template else None
    if template and by_template is None:
        raise EditStepError(f"{where}: template {template!r} is not an edit template; use "
                            f"{' or '.join(m.template for m in EDIT_MODELS)}")
    if model:
        pipeline = None if model in TINY_EDIT_MODELS else pipeline_class_of(model)
        declared = TINY_EDIT_MODELS.get(model) or (edit_model_of_pipeline(pipeline) if pipeline else None)
        if pipeline and declared is None:
            raise EditStepError(f"{where}: model {model!r} is a {pipeline}, not an edit model "
                                f"({', '.join(f'{m.title}: {m.pipeline}' for m in EDIT_MODELS)})")
        if declared and by_template and declared is not by_template:
            raise EditStepError(f"{where}: model {model!r} is {declared.title} but template {template!r} draws "
                                f"with {by_template.title}")
        chosen = declared or by_template
        if chosen is None:
            raise EditStepError(f"{where}: model {model!r} is a hub id whose kind cannot be told offline; "
                                f"set the step's template ({' or '.join(m.template for m in EDIT_MODELS)})")
        return chosen, model
    if chosen is None:
        if family is None:
            raise EditStepError(f"{where}: no edit model: set the step's model or template")
        name = family_named(family).edit_model
        if name is None:
            raise EditStepError(f"{where}: the persona's family {family!r} ({family_named(family).title}) has no edit "
                                f"model; name one in the step (model: or template:): "
                                f"{', '.join(f'{m.title} ({m.template})' for m in EDIT_MODELS)}")
        chosen = edit_model_named(name)
    tiny = base_model is not None and base_model.startswith("tiny")
    return chosen, chosen.tiny if tiny else chosen.default_model
