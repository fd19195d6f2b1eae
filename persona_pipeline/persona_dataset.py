"""persona.yaml `enrichment:` and `flywheel:`: how a persona's dataset grows beyond its photos
(docs/dataset.md). `enrichment` edits each accepted photo with an image-edit model (FLUX.1 Kontext,
Qwen-Image-Edit: training/families/edit_models.py) by the persona's own instructions; `flywheel`
turns approved winners and published posts into dataset candidates and bounds the generated share
of every dataset built with them. Split from personas.py like persona_generation.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from persona_pipeline.persona_generation import _known_backend

INSTRUCTION_KINDS = ("angle", "expression", "outfit", "lighting", "background")
MAX_INSTRUCTIONS = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EditInstruction(_Strict):
    kind: Literal["angle", "expression", "outfit", "lighting", "background"]
    text: str = Field(min_length=3, max_length=500)


class EnrichmentSettings(_Strict):
    """Edits of the accepted photos that become dataset candidates. Off until `instructions` is set."""

    enabled: bool = True
    instructions: list[EditInstruction] | None = None  # unset: no enrichment; an empty list is refused
    per_photo: int = Field(default=2, ge=1, le=8)  # edits made of each photo (each a different instruction)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # Which edit model: kontext | qwen_image_edit (unset: the persona family's), its weights for the
    # diffusers backend (tiny-kontext, tiny-qwen-edit, a local folder, a hub id) and its file on ComfyUI.
    edit_model: Literal["kontext", "qwen_image_edit"] | None = None
    model: str | None = Field(default=None, min_length=1)
    checkpoint: str | None = Field(default=None, min_length=1)
    backend: str | None = None  # a module of generation/backends/; unset: the persona's generation backend
    _backend = field_validator("backend")(classmethod(lambda cls, value: _known_backend(value)))
    steps: int = Field(default=20, ge=1, le=150)
    cfg: float = Field(default=2.5, ge=1, le=10)
    sampler: str = "euler"
    scheduler: str = "simple"
    width: int | None = Field(default=None, ge=32, le=2048, multiple_of=16)  # unset: the edit model's size
    height: int | None = Field(default=None, ge=32, le=2048, multiple_of=16)
    # An edit is dropped (with the reason) below this identity similarity to the photos' centroid,
    # or above this cosine to an image already in the dataset (unset: training.quality.duplicate_cosine).
    min_identity: float = Field(default=0.6, ge=-1, le=1)
    duplicate_cosine: float | None = Field(default=None, gt=0, le=1)

    @field_validator("instructions", mode="before")
    @classmethod
    def _instruction_count(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("the edit instruction list is empty: give at least one "
                                 f"({', '.join(INSTRUCTION_KINDS)}), or remove the enrichment section")
            if len(value) > MAX_INSTRUCTIONS:
                raise ValueError(f"{len(value)} edit instructions; at most {MAX_INSTRUCTIONS}")
        return value

    @field_validator("sampler", "scheduler")
    @classmethod
    def _comfy_name(cls, value: str, info) -> str:
        from persona_pipeline.domain.generation_params import COMFY_SAMPLERS, COMFY_SCHEDULERS, check_choice

        check_choice(value, info.field_name, COMFY_SAMPLERS if info.field_name == "sampler" else COMFY_SCHEDULERS)
        return value

    @model_validator(mode="after")
    def _size_pair(self) -> "EnrichmentSettings":
        if (self.width is None) != (self.height is None):
            raise ValueError("set both width and height, or neither")
        return self

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.instructions)


class FlywheelSettings(_Strict):
    """Approved winners and published posts as dataset candidates, and the bound on generated images."""

    winners: bool = True
    posts: bool = True
    # A winner or post below this identity similarity to the photos' centroid is dropped, with the reason.
    min_identity: float = Field(default=0.7, ge=-1, le=1)
    # At most this share of a dataset's images may be generated (edits, winners, posts), so the LoRA
    # does not drift into its own artefacts; training_dataset leaves the newest extra ones out, recorded.
    max_generated_share: float = Field(default=0.5, ge=0, lt=1)
