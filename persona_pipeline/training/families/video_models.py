"""Image-to-video models: a still (a candidate, a photo) made to move, as a generation step of type
`video`, for a Reel with real motion (docs/generation.md#video-steps).

Each entry says how the model is recognised (its diffusers pipeline class in model_index.json),
which ComfyUI template draws with it, its default weights (a hub id; a local folder or hub id in
the step's `model` replaces it) and ComfyUI file, its tiny local stand-in, the frame rate it was
trained at, and the size it draws when a step sets none (its training resolution, turned to the
input's orientation). No model family we train LoRAs for is a video model, so a video step takes
none of the persona's LoRAs: they are recorded as skipped, as for Qwen-Image-Edit.

Adding a video model is one entry here and one template in workflows/. No Dagster, no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from persona_pipeline.domain.generation_params import WorkflowError
from persona_pipeline.training.families.edit_models import pipeline_class_of


class VideoStepError(WorkflowError):
    """A video step that cannot run: a model that is no image-to-video model, a template that is no video template."""


@dataclass(frozen=True)
class VideoModel:
    name: str  # what manifests and the step's resolved params store
    title: str
    pipeline: str  # diffusers pipeline class (model_index.json `_class_name`)
    template: str  # workflows/<name>.json, the ComfyUI graph
    default_model: str  # hub id of the released weights (the step's `model` overrides it)
    comfyui_file: str  # its diffusion model in ComfyUI's models/diffusion_models
    tiny: str  # the tiny local stand-in's name (DiffusionBackend base_model)
    fps: int  # the frame rate it was trained at: a step's default
    frames: int  # frames per clip by default (Wan: 4k + 1, its VAE packs 4 frames a latent after the first)
    frame_step: int  # frames must be frame_step * k + 1
    size: tuple[int, int]  # (long side, short side) it draws at

    def size_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) at the model's resolution, in the input's orientation."""
        long, short = self.size
        return (long, short) if image_size[0] > image_size[1] else (short, long)


WAN_I2V = VideoModel(name="wan_i2v", title="Wan 2.1 image-to-video 480p", pipeline="WanImageToVideoPipeline",
                     template="wan_i2v", default_model="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                     comfyui_file="wan2.1_i2v_480p_14B_fp16.safetensors", tiny="tiny-wan-i2v", fps=16, frames=81,
                     frame_step=4, size=(832, 480))
VIDEO_MODELS = (WAN_I2V,)
TINY_VIDEO_MODELS = {model.tiny: model for model in VIDEO_MODELS}


def video_model_named(name: str) -> VideoModel:
    for model in VIDEO_MODELS:
        if model.name == name:
            return model
    raise VideoStepError(f"video model {name!r} is not one of {', '.join(m.name for m in VIDEO_MODELS)}")


def video_model_of_pipeline(pipeline_class: str) -> VideoModel | None:
    return next((model for model in VIDEO_MODELS if model.pipeline == pipeline_class), None)


def video_model_of_template(template: str) -> VideoModel | None:
    return next((model for model in VIDEO_MODELS if model.template == template), None)


def resolve_video_model(step_name: str, model: str | None, template: str | None,
                        base_model: str | None) -> tuple[VideoModel, str]:
    """(video model, diffusers weights) of a video step: its `model` (a tiny stand-in, a local folder
    or a hub id) or its template says which, else Wan 2.1 (its tiny stand-in when the persona draws
    with a tiny model). Refuses, naming the step, a model of another kind (an image model, an edit
    model: its model_index.json's pipeline class is named) and a template that is no video template."""
    where = f"video step {step_name!r}"
    by_template = video_model_of_template(template) if template else None
    if template and by_template is None:
        raise VideoStepError(f"{where}: template {template!r} is not a video template; use "
                             f"{' or '.join(m.template for m in VIDEO_MODELS)}")
    if model:
        pipeline = None if model in TINY_VIDEO_MODELS else pipeline_class_of(model)
        declared = TINY_VIDEO_MODELS.get(model) or (video_model_of_pipeline(pipeline) if pipeline else None)
        if pipeline and declared is None:
            raise VideoStepError(f"{where}: model {model!r} is a {pipeline}, not an image-to-video model "
                                 f"({', '.join(f'{m.title}: {m.pipeline}' for m in VIDEO_MODELS)})")
        chosen = declared or by_template or WAN_I2V
        return chosen, model
    chosen = by_template or WAN_I2V
    tiny = base_model is not None and base_model.startswith("tiny")
    return chosen, chosen.tiny if tiny else chosen.default_model
