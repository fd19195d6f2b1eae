"""One image to make, as every generation backend receives it: built once from the persona's step
settings and the planned job, and checked once, here, when it is constructed. A backend turns it
into its own form (a ComfyUI graph, a diffusers pipeline call) and may refuse what it cannot run,
but never checks these fields again.

Sampler and scheduler are spelled as ComfyUI spells them whatever the backend
(domain/generation_params.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from persona_pipeline.domain.generation_params import (CFG_RANGE, COMFY_SAMPLERS, COMFY_SCHEDULERS,
                                                       CONTROL_STRENGTH_RANGE, DENOISE_RANGE, FLUX_GUIDANCE_RANGE,
                                                       MAX_LORAS, SEED_MAX, STEPS_RANGE, ParamError, check_choice,
                                                       check_int, check_lora_weight, check_number, check_side)
from persona_pipeline.domain.workflows import TemplateError, WorkflowTemplate

DEFAULT_CONTROLNET = "control_v11p_sd15_openpose.pth"  # the ControlNet a ComfyUI server loads when a step names none


@dataclass(frozen=True)
class LoraInUse:
    """One LoRA of the persona's chain: library row, file, weight, and its name on ComfyUI."""

    lora_id: int
    path: str
    sha256: str
    weight: float
    comfy_name: str
    family: str | None = None  # the library's family of the LoRA (sd15, sdxl, flux); None: not recorded


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides one image. `width`/`height` are None when the template sets no size
    (a refinement keeps its parent's); `min_side` is the smallest side the chosen backend's model
    draws, the one limit that depends on where the image is made."""

    prompt: str
    negative_prompt: str
    width: int | None
    height: int | None
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    seed: int
    denoise: float
    parent_image: str | None  # the image a refinement starts from (img2img)
    control_image: str | None  # a pose reference for the ControlNet
    control_strength: float
    controlnet: str  # the ControlNet model a ComfyUI server loads for it
    loras: tuple[LoraInUse, ...]  # applied in this order
    template: WorkflowTemplate
    min_side: int = 256
    # An edit step (type: edit): the image it changes, the edit model (edit_models.py) with its diffusers
    # weights and ComfyUI file, and the persona LoRAs that model cannot take (Qwen-Image-Edit takes none).
    input_image: str | None = None
    edit_model: str | None = None
    model: str | None = None
    checkpoint: str | None = None
    loras_skipped: tuple[int, ...] = ()
    # A video step (type: video): its image-to-video model (video_models.py), frames per clip and their rate;
    # input_image, model, checkpoint and loras_skipped as for an edit step.
    video_model: str | None = None
    frames: int | None = None
    fps: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple(self.loras))
        try:
            self._check()
        except ParamError as exc:
            raise ParamError(f"{self.template.name}: {exc}") from None

    def _check(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ParamError(f"{name} = {getattr(self, name)!r} must be text")
        check_int(self.seed, "seed", 0, SEED_MAX)
        check_int(self.steps, "steps", *STEPS_RANGE)
        check_number(self.cfg, "cfg", *CFG_RANGE)
        check_choice(self.sampler, "sampler", COMFY_SAMPLERS)
        check_choice(self.scheduler, "scheduler", COMFY_SCHEDULERS)
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                check_side(getattr(self, name), name, self.min_side)
        check_number(self.denoise, "denoise", *DENOISE_RANGE)
        check_number(self.control_strength, "control_strength", *CONTROL_STRENGTH_RANGE)
        if self.edit_model is not None:
            # Kontext's is FLUX's distilled guidance (FluxGuidance); Qwen-Image-Edit's a true CFG scale, drawn at 2.5-5.
            check_number(self.cfg, f"cfg (the {self.edit_model} edit model's guidance)", *FLUX_GUIDANCE_RANGE)
            for name in ("width", "height"):
                if getattr(self, name) % 16:
                    raise ParamError(f"{name} = {getattr(self, name)} must be a multiple of 16 for an edit model "
                                     "(its latents are packed in 2x2 patches)")
        if self.video_model is not None:
            check_int(self.frames, "frames", 5, 161)
            check_int(self.fps, "fps", 8, 30)
            if (self.frames - 1) % 4:
                raise ParamError(f"frames = {self.frames} must be 4k + 1 (5, 9, ... 81) for {self.video_model}: its VAE "
                                 "packs 4 frames into a latent after the first")
            for name in ("width", "height"):
                if getattr(self, name) % 16:
                    raise ParamError(f"{name} = {getattr(self, name)} must be a multiple of 16 for a video model")
        if len(self.loras) > MAX_LORAS:
            raise ParamError(f"{len(self.loras)} LoRAs are chained; at most {MAX_LORAS}")
        for lora in self.loras:
            check_lora_weight(lora.weight, f"LoRA {lora.comfy_name} weight")

    def record(self) -> dict:
        """The request as a manifest stores it (JSON-ready; the keys older manifests had)."""
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
            "sampler": self.sampler, "scheduler": self.scheduler, "steps": self.steps, "cfg": self.cfg,
            "denoise": self.denoise, "width": self.width, "height": self.height, "parent_image": self.parent_image,
            "pose_image": self.control_image,
            "control_strength": self.control_strength if self.control_image else None,
            "loras": [{"id": l.lora_id, "name": l.comfy_name, "path": l.path, "sha256": l.sha256, "weight": l.weight}
                      for l in self.loras],
            "template": self.template.name, "template_sha256": self.template.sha256,
            **({"edit_model": self.edit_model, "input_image": self.input_image, "edit_weights": self.model,
                "comfyui_file": self.checkpoint, "loras_skipped": list(self.loras_skipped)} if self.edit_model else {}),
            **({"video_model": self.video_model, "input_image": self.input_image, "video_weights": self.model,
                "comfyui_file": self.checkpoint, "frames": self.frames, "fps": self.fps,
                "loras_skipped": list(self.loras_skipped)} if self.video_model else {}),
        }


def takes_input_image(params: Mapping) -> bool:
    """An edit or video step's job: it changes (or animates) an input image rather than drawing from noise."""
    return bool(params.get("edit_model") or params.get("video_model"))


def build_request(template: WorkflowTemplate, params: Mapping, *, prompt: str, negative_prompt: str, seed: int,
                  parent_image: str | None, pose_image: str | None, loras: Sequence[LoraInUse],
                  default_size: int, min_side: int, step_position: int, input_image: str | None = None,
                  input_size: tuple[int, int] | None = None) -> GenerationRequest:
    """The request of one planned job: the step's `params` (persona.yaml), the template's needs,
    and the backend's size defaults. Raises TemplateError when the template needs an input the job
    lacks (a parent, a pose reference, an image to edit), ParamError for a value out of range."""
    if params.get("video_model") or "frames" in template.placeholders:
        return _video_request(template, params, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                              loras=loras, min_side=min_side, input_image=input_image, input_size=input_size)
    if params.get("edit_model") or "input_image" in template.placeholders:
        return _edit_request(template, params, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                             loras=loras, min_side=min_side, input_image=input_image, input_size=input_size)
    if "parent_image" in template.placeholders and parent_image is None:
        raise TemplateError(f"template {template.name!r} refines a parent image (`{{{{parent_image}}}}`); "
                            f"it cannot be step {step_position} of a run, which has no parents")
    if "pose_image" in template.placeholders and pose_image is None:
        raise TemplateError(f"template {template.name!r} needs a pose reference: set params.pose_image in persona.yaml")
    sized = {side: (params.get(side) or default_size) if side in template.placeholders else None
             for side in ("width", "height")}
    return GenerationRequest(
        template=template, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=params["steps"],
        cfg=float(params["cfg"]), sampler=params["sampler"], scheduler=params["scheduler"], **sized,
        denoise=float(params["denoise"]), parent_image=parent_image, control_image=pose_image,
        control_strength=float(params["control_strength"]), controlnet=params.get("controlnet") or DEFAULT_CONTROLNET,
        loras=tuple(loras), min_side=min_side)


def _edit_request(template: WorkflowTemplate, params: Mapping, *, prompt: str, negative_prompt: str, seed: int,
                  loras: Sequence[LoraInUse], min_side: int, input_image: str | None,
                  input_size: tuple[int, int] | None) -> GenerationRequest:
    """An edit step's request: the instruction (else the run's prompt) on the input image, at the step's
    size or, unset, the size the edit model draws at for the input's aspect ratio; the persona's LoRAs
    where the model takes them, refused by name where they are of another family."""
    from persona_pipeline.training.families.edit_models import edit_model_named

    if not params.get("edit_model"):
        raise TemplateError(f"template {template.name!r} edits an input image (`{{{{input_image}}}}`): use it in a "
                            "step of type: edit")
    edit = edit_model_named(params["edit_model"])
    if "input_image" not in template.placeholders:
        raise TemplateError(f"edit step template {template.name!r} has no `{{{{input_image}}}}` to put the image to "
                            f"edit in; {edit.title} draws with {edit.template}")
    if input_image is None or input_size is None:
        raise TemplateError(f"edit step ({edit.title}) has no input image: set params.input_image, or make it a later "
                            "step, which edits its parent")
    width, height = (params["width"], params["height"]) if params.get("width") and params.get("height") else \
        edit.size_for(input_size)
    kept, skipped = list(loras), []
    if edit.lora_family is None:
        kept, skipped = [], [lora.lora_id for lora in loras]
    else:
        for lora in loras:
            if lora.family is not None and lora.family != edit.lora_family:
                raise ParamError(f"LoRA {lora.lora_id} ({lora.comfy_name}) is a {lora.family} LoRA; {edit.title} takes "
                                 f"{edit.lora_family} LoRAs only")
    return GenerationRequest(
        template=template, prompt=params.get("instruction") or prompt, negative_prompt=negative_prompt, seed=seed,
        steps=params["steps"], cfg=float(params["cfg"]), sampler=params["sampler"], scheduler=params["scheduler"],
        width=width, height=height, denoise=1.0, parent_image=None, control_image=None,
        control_strength=float(params["control_strength"]), controlnet=params.get("controlnet") or DEFAULT_CONTROLNET,
        loras=tuple(kept), min_side=min_side, input_image=input_image, edit_model=edit.name, model=params.get("model"),
        checkpoint=params.get("checkpoint") or edit.comfyui_file, loras_skipped=tuple(skipped))


def _video_request(template: WorkflowTemplate, params: Mapping, *, prompt: str, negative_prompt: str, seed: int,
                   loras: Sequence[LoraInUse], min_side: int, input_image: str | None,
                   input_size: tuple[int, int] | None) -> GenerationRequest:
    """A video step's request: the input image made to move, by the instruction (else the run's prompt),
    at the step's size or, unset, the video model's resolution in the input's orientation. No model family
    we train LoRAs for is a video model: the persona's LoRAs are recorded as skipped."""
    from persona_pipeline.training.families.video_models import video_model_named

    if not params.get("video_model"):
        raise TemplateError(f"template {template.name!r} makes a video (`{{{{frames}}}}`): use it in a step of "
                            "type: video")
    video = video_model_named(params["video_model"])
    if "frames" not in template.placeholders or "input_image" not in template.placeholders:
        raise TemplateError(f"video step template {template.name!r} has no `{{{{input_image}}}}` and `{{{{frames}}}}` "
                            f"to put the still and the clip length in; {video.title} draws with {video.template}")
    if input_image is None or input_size is None:
        raise TemplateError(f"video step ({video.title}) has no input image: set params.input_image, or make it a "
                            "later step, which animates its parent")
    width, height = (params["width"], params["height"]) if params.get("width") and params.get("height") else \
        video.size_for(input_size)
    return GenerationRequest(
        template=template, prompt=params.get("instruction") or prompt, negative_prompt=negative_prompt, seed=seed,
        steps=params["steps"], cfg=float(params["cfg"]), sampler=params["sampler"], scheduler=params["scheduler"],
        width=width, height=height, denoise=1.0, parent_image=None, control_image=None,
        control_strength=float(params["control_strength"]), controlnet=params.get("controlnet") or DEFAULT_CONTROLNET,
        loras=(), min_side=min_side, input_image=input_image, model=params.get("model"),
        checkpoint=params.get("checkpoint") or video.comfyui_file, loras_skipped=tuple(l.lora_id for l in loras),
        video_model=video.name, frames=params.get("frames") or video.frames, fps=params.get("fps") or video.fps)
