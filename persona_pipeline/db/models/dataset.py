"""Dataset candidates: images that may join a persona's training dataset (docs/dataset.md). They
come from an image-edit model (`edit`: an edit of one accepted source photo), from approved winners
(`winner`) or from published posts (`post`); each waits `pending` for a person's decision, or is
`dropped` by an automatic check with its reason. `dataset_version` is the first built dataset that
included it; from then on its decision is frozen."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from persona_pipeline.db.models.base import Base, CreatedAt, PersonaFK

ORIGINS = ("edit", "winner", "post")
STATUSES = ("pending", "accepted", "rejected", "dropped")


class DatasetCandidate(Base):
    __tablename__ = "dataset_candidates"
    __table_args__ = (
        UniqueConstraint("persona_id", "sha256"),
        CheckConstraint("origin IN ('edit', 'winner', 'post')", name="origin_kind"),
        CheckConstraint("status IN ('pending', 'accepted', 'rejected', 'dropped')", name="status_kind"),
    )
    persona_id: Mapped[PersonaFK]
    created_at: Mapped[CreatedAt]
    origin: Mapped[str] = mapped_column(String(16))
    # Provenance: the photo edited, the instruction, the edit model and seed (`edit`); the generation
    # candidate (`winner`) or the post (`post`) it came from.
    source_photo_sha256: Mapped[str | None] = mapped_column(String(64))
    instruction: Mapped[str | None] = mapped_column(Text)
    edit_model: Mapped[str | None] = mapped_column(Text)
    seed: Mapped[int | None] = mapped_column(Integer)
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="SET NULL"))
    post_id: Mapped[int | None] = mapped_column(ForeignKey("posts.id", ondelete="SET NULL"))
    image_path: Mapped[str] = mapped_column(Text)  # relative to the persona's folder under PERSONA_HOME
    sha256: Mapped[str] = mapped_column(String(64))
    caption: Mapped[str] = mapped_column(Text, default="")
    identity_score: Mapped[float | None] = mapped_column(Float)
    identity_method: Mapped[str | None] = mapped_column(String(200))
    nearest_sha256: Mapped[str | None] = mapped_column(String(64))
    nearest_path: Mapped[str | None] = mapped_column(Text)
    nearest_cosine: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    decided_by: Mapped[str | None] = mapped_column(String(80))
    decided_at: Mapped[datetime | None]
    dataset_version: Mapped[str | None] = mapped_column(String(64))
