"""persona.yaml `generation:`: how a persona's candidates are made, step by step
(docs/generation.md). Split from personas.py, which holds the rest of the file's schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _known_backend(value: str | None) -> str | None:
    """A generation backend is a module of generation/backends/: its name, or None for the default."""
    from persona_pipeline.generation.backends import backend_names

    if value is not None and value not in backend_names():
        raise ValueError(f"backend {value!r} is not one of: {', '.join(backend_names())}")
    return value



class StepParams(_Strict):
    """Sampling settings of one pipeline step. Ranges are checked again on the filled graph
    (domain/workflows.py), so a template's own literal values are held to the same bounds."""

    steps: int = Field(default=12, ge=1, le=150)
    cfg: float = Field(default=7.0, ge=1, le=30)
    sampler: str = "euler"  # ComfyUI spelling: euler, euler_ancestral, dpmpp_2m, ...
    scheduler: str = "normal"
    # None: the base model's size (an edit step's: its edit model's for the input's aspect ratio). 32 is the
    # smallest any model draws (the tiny ones); the backend's own minimum is checked on the request.
    width: int | None = Field(default=None, ge=32, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=32, le=2048, multiple_of=8)
    denoise: float = Field(default=1.0, ge=0, le=1)
    control_strength: float = Field(default=0.65, ge=0.4, le=0.9)
    pose_image: str | None = None  # a pose reference, relative to the persona folder
    controlnet: str | None = None  # the ControlNet model name on the ComfyUI servers
    # Edit steps only (docs/generation.md#edit-steps): the image to edit (unset: the parent candidate;
    # `step:<name>`: the ancestor an earlier step made; else a file relative to the persona folder,
    # e.g. a source photo) and the instruction (unset: the run's prompt).
    input_image: str | None = Field(default=None, min_length=1)
    instruction: str | None = Field(default=None, min_length=1, max_length=2000)
    # Video steps only (docs/generation.md#video-steps): frames per clip (unset: the video model's; Wan
    # takes 4k + 1) and their rate (unset: the model's own, 16 for Wan). input_image as for edit steps.
    frames: int | None = Field(default=None, ge=5, le=161)
    fps: int | None = Field(default=None, ge=8, le=30)

    @field_validator("sampler", "scheduler")
    @classmethod
    def _comfy_name(cls, value: str, info) -> str:
        """The same rule, message and hints as every generation request (domain/generation_params)."""
        from persona_pipeline.domain.generation_params import COMFY_SAMPLERS, COMFY_SCHEDULERS, check_choice

        check_choice(value, info.field_name, COMFY_SAMPLERS if info.field_name == "sampler" else COMFY_SCHEDULERS)
        return value


class PipelineStep(_Strict):
    """One step of a generation run: step 1 makes `n` roots; each later step makes `n` children
    for each of the previous step's top-K, once a reviewer approves that step."""

    name: str = Field(min_length=1, max_length=80, pattern=r"^[\w-]+$")
    # `generate` draws from the prompt (txt2img, img2img, pose); `edit` changes an input image by an
    # instruction with an image-edit model (FLUX.1 Kontext, Qwen-Image-Edit: training/families/edit_models.py);
    # `video` makes an input image move (Wan 2.1 image-to-video: training/families/video_models.py).
    type: Literal["generate", "edit", "video"] = "generate"
    template: str | None = Field(default=None, min_length=1)  # workflows/<name>.json; an edit step's default: its model's
    # Edit steps: the edit model's weights for the diffusers backend (tiny-kontext, tiny-qwen-edit, a local
    # folder or hub id; unset: the persona family's edit model) and its file on ComfyUI (unset: the model's usual file).
    model: str | None = Field(default=None, min_length=1)
    checkpoint: str | None = Field(default=None, min_length=1)
    n: int = Field(default=4, ge=1, le=64)
    keep: int | None = Field(default=None, ge=1, le=64)  # generate n, keep the best `keep` (open_clip curation)
    top_k: int = Field(default=2, ge=1, le=64)  # the K a reviewer approves by default (and auto-review uses)
    backend: str | None = None  # a module of generation/backends/; None: the persona's backend
    _backend = field_validator("backend")(classmethod(lambda cls, value: _known_backend(value)))
    params: StepParams = StepParams()

    @model_validator(mode="after")
    def _keep(self) -> "PipelineStep":
        if self.keep is not None and self.keep > self.n:
            raise ValueError(f"keep {self.keep} is more than n {self.n}")
        if self.type == "generate":
            if self.template is None:
                raise ValueError(f"step {self.name!r}: a generate step needs a template")
            extra = [name for name in ("model", "checkpoint") if getattr(self, name)] + [
                f"params.{name}" for name in ("input_image", "instruction") if getattr(self.params, name)]
            if extra:
                raise ValueError(f"step {self.name!r}: {', '.join(extra)} apply to edit steps only (type: edit)")
        if self.type != "video":
            extra = [f"params.{name}" for name in ("frames", "fps") if getattr(self.params, name) is not None]
            if extra:
                raise ValueError(f"step {self.name!r}: {', '.join(extra)} apply to video steps only (type: video)")
        return self


def _check_input_image(step: "PipelineStep", earlier: list[str]) -> None:
    """Where an edit or video step's input image comes from (the file itself is checked when a job is
    built, inside the persona folder: generation/executor.py)."""
    source = step.params.input_image
    if source is None:
        if not earlier:
            raise ValueError(f"step {step.name!r} is an {step.type} step with no input image: as the first step it "
                             f"has no parent to {'edit' if step.type == 'edit' else 'animate'}; set params.input_image "
                             "to a photo in the persona folder (e.g. photos/001.jpg)")
    elif source.startswith("step:"):
        if source[5:] not in earlier:
            raise ValueError(f"step {step.name!r}: params.input_image {source!r} names no earlier step; earlier "
                             f"steps: {', '.join(earlier) or 'none'}")


class GenerationSettings(_Strict):
    """How a persona's candidates are made (docs/generation.md)."""

    backend: str | None = None  # a module of generation/backends/; None: PERSONA_GENERATION_BACKEND
    _backend = field_validator("backend")(classmethod(lambda cls, value: _known_backend(value)))
    checkpoint: str | None = None  # ComfyUI ckpt_name; None: COMFYUI_CHECKPOINT
    negative_prompt: str = "blurry, low quality, deformed, extra limbs, watermark, text"
    prompts_per_plan: int = Field(default=3, ge=1, le=50)  # content prompts (= runs) per content_plan
    themes: dict[str, list[str]] = {}  # pillar name -> themes for prompt variety
    # Candidates whose identity similarity to the source photos is below this never reach a
    # reviewer. None = no gate (the tiny offline CLIP scores noise).
    identity_threshold: float | None = Field(default=None, ge=-1, le=1)
    # With open_clip identity (no face model): take the themes' text directions out of the image
    # embeddings before any identity score (gate, curation, checkpoint scoring, dataset growth), so a
    # candidate is not rated like her photos for sharing their setting (docs/world.md).
    identity_without_themes: bool = False
    steps: list[PipelineStep] = Field(default=[], max_length=8)  # []: one txt2img step of PERSONA_CANDIDATES_PER_RUN

    def identity_ignores(self) -> list[str]:
        """The texts identity leaves out: every theme once when identity_without_themes is on, else none."""
        if not self.identity_without_themes:
            return []
        return list(dict.fromkeys(theme for themes in self.themes.values() for theme in themes))

    @model_validator(mode="after")
    def _unique_steps(self) -> "GenerationSettings":
        names = [s.name for s in self.steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"step names must be unique; repeated: {', '.join(dupes)}")
        for position, step in enumerate(self.steps):
            if step.type in ("edit", "video"):
                _check_input_image(step, names[:position])
        return self
