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
                                                       CONTROL_STRENGTH_RANGE, DENOISE_RANGE,
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
        }


def build_request(template: WorkflowTemplate, params: Mapping, *, prompt: str, negative_prompt: str, seed: int,
                  parent_image: str | None, pose_image: str | None, loras: Sequence[LoraInUse],
                  default_size: int, min_side: int, step_position: int) -> GenerationRequest:
    """The request of one planned job: the step's `params` (persona.yaml), the template's needs,
    and the backend's size defaults. Raises TemplateError when the template needs an input the job
    lacks (a parent, a pose reference), ParamError for a value out of range."""
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
