"""What a persona posts next: its content library (winners and photos) with their clusters, the
pillar gap reports the plan is made from, and where each pillar stands in the topic rotation."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Date, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from persona_pipeline.db.models.base import Base, CreatedAt, PersonaFK, PillarFK, UpdatedAt


class Cluster(Base):
    """A cluster of a persona's content library. Rows persist across clustering runs: `key` is the
    cluster's stable number within the persona, so its label and pillar survive new items."""

    __tablename__ = "clusters"
    __table_args__ = (UniqueConstraint("persona_id", "key"),)
    persona_id: Mapped[PersonaFK]
    key: Mapped[int] = mapped_column(Integer)
    version: Mapped[str | None] = mapped_column(String(64))  # the clustering run that last changed it
    label: Mapped[str] = mapped_column(String(200))
    label_source: Mapped[str] = mapped_column(String(40), default="terms")  # terms | gemini:<model> | pillar
    pillar_id: Mapped[PillarFK]
    centroid: Mapped[list[Any]] = mapped_column(JSON)
    radius: Mapped[float] = mapped_column(Float, default=0.0)
    size: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[UpdatedAt]


class LibraryItem(Base):
    """One image of a persona's content library: an approved run winner, or (by a persona setting)
    a source photo. `available` until a published post uses it; a failed post does not."""

    __tablename__ = "library_items"
    __table_args__ = (UniqueConstraint("persona_id", "image_sha256"),)
    persona_id: Mapped[PersonaFK]
    kind: Mapped[str] = mapped_column(String(16))  # winner | source_photo
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="SET NULL"), unique=True)
    source_photo_id: Mapped[int | None] = mapped_column(ForeignKey("source_photos.id", ondelete="SET NULL"), unique=True)
    image_path: Mapped[str] = mapped_column(Text)
    image_sha256: Mapped[str] = mapped_column(String(64))
    pillar_id: Mapped[PillarFK]
    theme: Mapped[str] = mapped_column(String(200), default="")
    score: Mapped[float | None] = mapped_column(Float)  # BT score of a winner; None for photos
    caption: Mapped[str] = mapped_column(Text, default="")  # the prompt or photo caption (cluster names)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32, L2-normalised
    embedding_model: Mapped[str | None] = mapped_column(String(200))
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id", ondelete="SET NULL"), index=True)
    cluster_distance: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="available", index=True)  # available | used | removed
    used_by_post_id: Mapped[int | None] = mapped_column(ForeignKey("posts.id", ondelete="SET NULL", use_alter=True))
    used_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[CreatedAt]

    cluster: Mapped[Cluster | None] = relationship()


class PillarGapReport(Base):
    """One gap analysis of a persona's pillars (the gap rules: docs/rules.md), as the pillar_gaps
    asset wrote it. content_plan plans prompts from the latest one."""

    __tablename__ = "pillar_gap_reports"
    persona_id: Mapped[PersonaFK]
    today: Mapped[date] = mapped_column(Date)
    horizon_days: Mapped[int] = mapped_column(Integer)
    posts_per_week: Mapped[float] = mapped_column(Float)
    rows: Mapped[list[Any]] = mapped_column(JSON)  # [{pillar, pillar_id, weight, priority, needed, available, gap, status}]
    created_at: Mapped[CreatedAt]


class TopicRotation(Base):
    """Where a pillar stands in the persona's topic rotation (domain/rotation.py): its smooth
    weighted round-robin credit and the themes already used in the current round. Kept here so a
    restart goes on where the last plan stopped."""

    __tablename__ = "topic_rotation"
    __table_args__ = (UniqueConstraint("persona_id", "pillar_id"),)
    persona_id: Mapped[PersonaFK]
    pillar_id: Mapped[int] = mapped_column(ForeignKey("content_pillars.id", ondelete="CASCADE"))
    credit: Mapped[float] = mapped_column(Float, default=0.0)
    round: Mapped[int] = mapped_column(Integer, default=0)  # full rounds of themes done
    used_themes: Mapped[list[Any]] = mapped_column(JSON, default=list)  # themes used in the current round
    updated_at: Mapped[UpdatedAt]
