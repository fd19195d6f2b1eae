"""A persona and what it is trained from: its content pillars, source photos and their captions,
datasets, and the LoRA files that belong to it."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, Date, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from persona_pipeline.db.models.base import Base, CreatedAt, PersonaFK, UpdatedAt


class Persona(Base):
    __tablename__ = "personas"
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    trigger_word: Mapped[str] = mapped_column(String(40))
    class_word: Mapped[str] = mapped_column(String(40))
    timezone: Mapped[str] = mapped_column(String(64))
    folder: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    settings_hash: Mapped[str] = mapped_column(String(64))
    photos_hash: Mapped[str | None] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[UpdatedAt]

    pillars: Mapped[list["ContentPillar"]] = relationship(back_populates="persona", cascade="all, delete-orphan")


class ContentPillar(Base):
    __tablename__ = "content_pillars"
    __table_args__ = (
        UniqueConstraint("persona_id", "name"),
        CheckConstraint("weight BETWEEN 0 AND 100", name="weight_range"),
        CheckConstraint("priority BETWEEN 1 AND 5", name="priority_range"),
    )
    persona_id: Mapped[PersonaFK]
    name: Mapped[str] = mapped_column(String(80))
    weight: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=3)
    starts_on: Mapped[date | None] = mapped_column(Date)
    ends_on: Mapped[date | None] = mapped_column(Date)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    prompt: Mapped[str] = mapped_column(Text)
    target_posts_per_week: Mapped[int | None] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    persona: Mapped[Persona] = relationship(back_populates="pillars")


class SourcePhoto(Base):
    """One file of a persona's photos/ folder as last ingested: accepted (normalised) or quarantined."""

    __tablename__ = "source_photos"
    __table_args__ = (UniqueConstraint("persona_id", "original_name"),)
    persona_id: Mapped[PersonaFK]
    original_name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # accepted | quarantined | removed
    reason: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(Text)  # normalised file (accepted) or quarantined copy
    pixel_sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    caption: Mapped[str | None] = mapped_column(Text)  # the sidecar .txt, when there is one
    updated_at: Mapped[UpdatedAt]


class PhotoCaption(Base):
    """A caption for one training photo (keyed by its pixel hash, so a renamed file keeps it):
    `generated` by a captioner, or `edited` by a person in a dataset folder. Sidecar .txt files
    live on SourcePhoto.caption and always win."""

    __tablename__ = "photo_captions"
    __table_args__ = (UniqueConstraint("persona_id", "pixel_sha256", "kind"),)
    persona_id: Mapped[PersonaFK]
    pixel_sha256: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # generated | edited
    caption: Mapped[str] = mapped_column(Text)
    captioner: Mapped[str] = mapped_column(String(120))  # e.g. gemini:gemini-2.5-flash, clip:tiny, person
    fields: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # framing, pose, ... when structured
    updated_at: Mapped[UpdatedAt]


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("persona_id", "version"),)
    persona_id: Mapped[PersonaFK]
    version: Mapped[str] = mapped_column(String(64))  # content hash of images, captions and settings
    path: Mapped[str] = mapped_column(Text)
    image_count: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[CreatedAt]


class LoraModel(Base):
    __tablename__ = "lora_models"
    __table_args__ = (UniqueConstraint("sha256"),)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)  # the .safetensors file
    sha256: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(Text)
    trigger_word: Mapped[str | None] = mapped_column(String(40))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    training: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The library: which persona a file belongs to, its version within that persona, where it came
    # from (trained here or imported from the drop folder) and what its keys say about it.
    persona_id: Mapped[int | None] = mapped_column(ForeignKey("personas.id", ondelete="SET NULL"), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    origin: Mapped[str] = mapped_column(String(16), default="trained")  # trained | imported
    family: Mapped[str | None] = mapped_column(String(32))  # sd15 | sd2 | sdxl | tiny | ...
    key_format: Mapped[str | None] = mapped_column(String(32))  # kohya | diffusers | peft
    created_at: Mapped[CreatedAt]

    dataset: Mapped[Dataset | None] = relationship()


class PersonaLora(Base):
    __tablename__ = "persona_loras"
    __table_args__ = (UniqueConstraint("persona_id", "lora_id"),)
    persona_id: Mapped[PersonaFK]
    lora_id: Mapped[int] = mapped_column(ForeignKey("lora_models.id", ondelete="CASCADE"))
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    is_primary: Mapped[bool] = mapped_column(Boolean, default=False)
    # Chained after the primary in every generation (a style or detail LoRA); at most 5 in all.
    chained: Mapped[bool] = mapped_column(Boolean, default=False)

    lora: Mapped[LoraModel] = relationship()


class LoraEvaluation(Base):
    """One LoRA's scores on the persona's evaluation set (docs/training.md#evaluation-and-promotion).
    `eval_key` hashes what makes two evaluations comparable (prompts, seeds, base model, identity
    model); the primary's row is reused while the key holds, so it is rendered once."""

    __tablename__ = "lora_evaluations"
    __table_args__ = (UniqueConstraint("lora_id", "eval_key"),)
    persona_id: Mapped[PersonaFK]
    lora_id: Mapped[int] = mapped_column(ForeignKey("lora_models.id", ondelete="CASCADE"), index=True)
    eval_key: Mapped[str] = mapped_column(String(64))
    identity_method: Mapped[str] = mapped_column(String(200))
    identity_mean: Mapped[float] = mapped_column(Float)
    identity_std: Mapped[float] = mapped_column(Float)
    alignment: Mapped[float] = mapped_column(Float)
    diversity: Mapped[float] = mapped_column(Float)
    no_face: Mapped[int] = mapped_column(Integer, default=0)
    renders: Mapped[list[Any]] = mapped_column(JSON, default=list)  # paths, prompt-major then seed
    created_at: Mapped[CreatedAt]
