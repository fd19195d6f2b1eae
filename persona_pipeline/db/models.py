"""SQLAlchemy 2 models of the application database (one schema for SQLite and PostgreSQL).

Files live under PERSONA_HOME; rows point at them by path + sha256. Every human (or auto-review)
decision is a `ReviewEvent` row, the one table the review sensor will read.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so Alembic migrations are the same on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on both backends (SQLite drops tzinfo; we put it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware UTC times")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class Persona(Base):
    __tablename__ = "personas"
    id: Mapped[int] = mapped_column(primary_key=True)
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
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    pillars: Mapped[list["ContentPillar"]] = relationship(back_populates="persona", cascade="all, delete-orphan")


class ContentPillar(Base):
    __tablename__ = "content_pillars"
    __table_args__ = (
        UniqueConstraint("persona_id", "name"),
        CheckConstraint("weight BETWEEN 0 AND 100", name="weight_range"),
        CheckConstraint("priority BETWEEN 1 AND 5", name="priority_range"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
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
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    original_name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # accepted | quarantined | removed
    reason: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(Text)  # normalised file (accepted) or quarantined copy
    pixel_sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    caption: Mapped[str | None] = mapped_column(Text)  # the sidecar .txt, when there is one
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PhotoCaption(Base):
    """A caption for one training photo (keyed by its pixel hash, so a renamed file keeps it):
    `generated` by a captioner, or `edited` by a person in a dataset folder. Sidecar .txt files
    live on SourcePhoto.caption and always win."""

    __tablename__ = "photo_captions"
    __table_args__ = (UniqueConstraint("persona_id", "pixel_sha256", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    pixel_sha256: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # generated | edited
    caption: Mapped[str] = mapped_column(Text)
    captioner: Mapped[str] = mapped_column(String(120))  # e.g. gemini:gemini-2.5-flash, clip:tiny, person
    fields: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # framing, pose, ... when structured
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("persona_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(64))  # content hash of images, captions and settings
    path: Mapped[str] = mapped_column(Text)
    image_count: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LoraModel(Base):
    __tablename__ = "lora_models"
    __table_args__ = (UniqueConstraint("sha256"),)
    id: Mapped[int] = mapped_column(primary_key=True)
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
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    dataset: Mapped[Dataset | None] = relationship()


class PersonaLora(Base):
    __tablename__ = "persona_loras"
    __table_args__ = (UniqueConstraint("persona_id", "lora_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    lora_id: Mapped[int] = mapped_column(ForeignKey("lora_models.id", ondelete="CASCADE"))
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    is_primary: Mapped[bool] = mapped_column(Boolean, default=False)
    # Chained after the primary in every generation (a style or detail LoRA); at most 5 in all.
    chained: Mapped[bool] = mapped_column(Boolean, default=False)

    lora: Mapped[LoraModel] = relationship()


class ContentPrompt(Base):
    """A planned prompt for one generation run: from the pillar gaps and guidelines, written by
    Gemini or a template. `planned` until a run uses it."""

    __tablename__ = "content_prompts"
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    pillar_id: Mapped[int | None] = mapped_column(ForeignKey("content_pillars.id", ondelete="SET NULL"))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    theme: Mapped[str] = mapped_column(String(200), default="")
    source: Mapped[str] = mapped_column(String(120))  # template | gemini:<model>
    gaps: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the gap analysis it was planned from
    status: Mapped[str] = mapped_column(String(16), default="planned")  # planned | used | cancelled
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GenerationRun(Base):
    __tablename__ = "generation_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    pillar_id: Mapped[int | None] = mapped_column(ForeignKey("content_pillars.id", ondelete="SET NULL"))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    backend: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(24), default="running")  # running | awaiting_review | done | failed
    dagster_run_id: Mapped[str | None] = mapped_column(String(64))
    content_prompt_id: Mapped[int | None] = mapped_column(ForeignKey("content_prompts.id", ondelete="SET NULL"))
    prompt_source: Mapped[str | None] = mapped_column(String(120))  # template | gemini:<model> | persona.yaml
    pipeline: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the step settings the run was started with
    failure_reason: Mapped[str | None] = mapped_column(Text)
    winner_candidate_id: Mapped[int | None] = mapped_column(
        ForeignKey("candidates.id", ondelete="SET NULL", use_alter=True)
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    steps: Mapped[list["RunStep"]] = relationship(back_populates="run", order_by="RunStep.position")


class RunStep(Base):
    __tablename__ = "run_steps"
    __table_args__ = (UniqueConstraint("run_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("generation_runs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # 1-based
    name: Mapped[str] = mapped_column(String(80))
    workflow: Mapped[str] = mapped_column(String(200))
    n_candidates: Mapped[int] = mapped_column(Integer)  # per parent (step 1: roots)
    top_k: Mapped[int | None] = mapped_column(Integer)
    # pending (waiting for the step before) | generating | voting | approved | failed
    status: Mapped[str] = mapped_column(String(24), default="generating", index=True)
    approved_at: Mapped[datetime | None] = mapped_column()
    backend: Mapped[str | None] = mapped_column(String(32))
    template_sha256: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    keep_best: Mapped[int | None] = mapped_column(Integer)
    parent_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)  # the previous step's top-K at approval
    failure_reason: Mapped[str | None] = mapped_column(Text)

    run: Mapped[GenerationRun] = relationship(back_populates="steps")


class GenerationJob(Base):
    """One image to make: a slot under a parent (or a root slot) of a step. A failed job keeps its
    row and reason; its slot is not reused, so three failures under one parent are countable."""

    __tablename__ = "generation_jobs"
    __table_args__ = (UniqueConstraint("step_id", "parent_key", "slot"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("generation_runs.id", ondelete="CASCADE"), index=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("run_steps.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="SET NULL", use_alter=True))
    parent_key: Mapped[int] = mapped_column(Integer, default=0)  # parent_id or 0: NULLs never collide in a unique key
    slot: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    # pending | running | done | failed | abandoned (its Dagster run ended before it finished)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    backend: Mapped[str] = mapped_column(String(32))
    server: Mapped[str | None] = mapped_column(String(300))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    permanent: Mapped[bool] = mapped_column(Boolean, default=False)  # a broken workflow: never resubmitted
    dagster_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Candidate(Base):
    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("generation_runs.id", ondelete="CASCADE"), index=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("run_steps.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="SET NULL"), index=True)
    # active | killed | winner | rejected (identity gate, or a parent whose jobs failed 3 times) | culled (keep-best)
    status: Mapped[str] = mapped_column(String(16), default="active")
    status_reason: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("generation_jobs.id", ondelete="SET NULL"), unique=True)
    lora_id: Mapped[int | None] = mapped_column(ForeignKey("lora_models.id", ondelete="SET NULL"))
    seed: Mapped[int] = mapped_column(Integer)
    image_path: Mapped[str] = mapped_column(Text)
    image_sha256: Mapped[str] = mapped_column(String(64))
    manifest_path: Mapped[str] = mapped_column(Text)
    elo: Mapped[int] = mapped_column(Integer, default=1000)
    bt_score: Mapped[float | None] = mapped_column(Float)
    bt_ci_low: Mapped[float | None] = mapped_column(Float)
    bt_ci_high: Mapped[float | None] = mapped_column(Float)
    clip_score: Mapped[float | None] = mapped_column(Float)  # prompt alignment (open_clip cosine)
    identity_score: Mapped[float | None] = mapped_column(Float)  # cosine to the source photos' centroid
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    parent: Mapped["Candidate | None"] = relationship(remote_side=[id])
    run: Mapped[GenerationRun] = relationship(foreign_keys=[run_id])
    lora: Mapped[LoraModel | None] = relationship()


class Vote(Base):
    """One pairwise vote. The pair is stored low id first; a pair may have several votes (a close
    pair at the top-K boundary is asked again), one per offer."""

    __tablename__ = "votes"
    __table_args__ = (
        Index(None, "pair_low_id", "pair_high_id"),
        CheckConstraint("winner_id <> loser_id", name="not_self"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("run_steps.id", ondelete="CASCADE"), index=True)
    winner_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    loser_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    pair_low_id: Mapped[int] = mapped_column(Integer)
    pair_high_id: Mapped[int] = mapped_column(Integer)
    winner_elo_before: Mapped[int] = mapped_column(Integer)
    loser_elo_before: Mapped[int] = mapped_column(Integer)
    elo_delta: Mapped[int] = mapped_column(Integer)
    selection_probability: Mapped[float | None] = mapped_column(Float)
    reviewer: Mapped[str] = mapped_column(String(80))
    # The pair offer the reviewer answered (NULL for votes cast without the form, e.g. auto-review);
    # unique: one vote per offer, however often its pair is offered.
    offer_id: Mapped[int | None] = mapped_column(ForeignKey("pair_offers.id", ondelete="SET NULL"), index=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PairOffer(Base):
    """A pair shown to a reviewer, with the probability it had of being chosen (active selection
    mixes greedy and uniform picks, so later analysis can weight votes by 1/probability)."""

    __tablename__ = "pair_offers"
    id: Mapped[int] = mapped_column(primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("run_steps.id", ondelete="CASCADE"), index=True)
    left_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    right_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    probability: Mapped[float] = mapped_column(Float)
    strategy: Mapped[str] = mapped_column(String(16))  # active | explore
    reviewer: Mapped[str] = mapped_column(String(80))
    outcome: Mapped[str | None] = mapped_column(String(16))  # NULL (open) | voted | skipped | killed
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the page put the pair on screen; NULL while it is only the preloaded next pair, which
    # cannot be answered yet.
    shown_at: Mapped[datetime | None] = mapped_column()


class ReviewEvent(Base):
    """Every human decision: who, when, what, on which subject."""

    __tablename__ = "review_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # vote | kill | approve_step | pick_winner | approve_post | ...
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[int] = mapped_column(Integer)
    reviewer: Mapped[str] = mapped_column(String(80))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Cluster(Base):
    """A cluster of a persona's content library. Rows persist across clustering runs: `key` is the
    cluster's stable number within the persona, so its label and pillar survive new items."""

    __tablename__ = "clusters"
    __table_args__ = (UniqueConstraint("persona_id", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    key: Mapped[int] = mapped_column(Integer)
    version: Mapped[str | None] = mapped_column(String(64))  # the clustering run that last changed it
    label: Mapped[str] = mapped_column(String(200))
    label_source: Mapped[str] = mapped_column(String(40), default="terms")  # terms | gemini:<model> | pillar
    pillar_id: Mapped[int | None] = mapped_column(ForeignKey("content_pillars.id", ondelete="SET NULL"))
    centroid: Mapped[list[Any]] = mapped_column(JSON)
    radius: Mapped[float] = mapped_column(Float, default=0.0)
    size: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class LibraryItem(Base):
    """One image of a persona's content library: an approved run winner, or (by a persona setting)
    a source photo. `available` until a published post uses it; a failed post does not."""

    __tablename__ = "library_items"
    __table_args__ = (UniqueConstraint("persona_id", "image_sha256"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # winner | source_photo
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="SET NULL"), unique=True)
    source_photo_id: Mapped[int | None] = mapped_column(ForeignKey("source_photos.id", ondelete="SET NULL"), unique=True)
    image_path: Mapped[str] = mapped_column(Text)
    image_sha256: Mapped[str] = mapped_column(String(64))
    pillar_id: Mapped[int | None] = mapped_column(ForeignKey("content_pillars.id", ondelete="SET NULL"))
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
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    cluster: Mapped[Cluster | None] = relationship()


class PillarGapReport(Base):
    """One gap analysis (REFERENCES.md §1) of a persona's pillars, as the pillar_gaps asset wrote it.
    content_plan plans prompts from the latest one."""

    __tablename__ = "pillar_gap_reports"
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    today: Mapped[date] = mapped_column(Date)
    horizon_days: Mapped[int] = mapped_column(Integer)
    posts_per_week: Mapped[float] = mapped_column(Float)
    rows: Mapped[list[Any]] = mapped_column(JSON)  # [{pillar, pillar_id, weight, priority, needed, available, gap, status}]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


LIVE_SLOT = "status NOT IN ('cancelled', 'abandoned')"


class Post(Base):
    """One post with one status model (see domain/post_states.py for the legal transitions)."""

    __tablename__ = "posts"
    # No two live posts of one account in one slot; a cancelled or abandoned post frees its slot.
    __table_args__ = (Index("uq_posts_account_scheduled_at", "account", "scheduled_at", unique=True,
                            sqlite_where=text(LIVE_SLOT), postgresql_where=text(LIVE_SLOT)),)
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    pillar_id: Mapped[int | None] = mapped_column(ForeignKey("content_pillars.id", ondelete="SET NULL"))
    # A winner's candidate, or None for a post of a source photo (library_item_id says which).
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="RESTRICT"))
    account: Mapped[str] = mapped_column(String(120))  # instagram user id, or outbox:<slug>
    status: Mapped[str] = mapped_column(String(24), default="draft", index=True)
    caption: Mapped[str] = mapped_column(Text)
    hashtags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    media_path: Mapped[str | None] = mapped_column(Text)
    scheduled_at: Mapped[datetime] = mapped_column()
    external_id: Mapped[str | None] = mapped_column(String(200))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    review_note: Mapped[str | None] = mapped_column(Text)  # why a reviewer rejected or moved it
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    retryable: Mapped[bool] = mapped_column(Boolean, default=True)  # False: a person must reschedule it
    next_attempt_at: Mapped[datetime | None] = mapped_column()  # a retried post waits until then
    published_at: Mapped[datetime | None] = mapped_column()
    library_item_id: Mapped[int | None] = mapped_column(ForeignKey("library_items.id", ondelete="SET NULL"))
    theme: Mapped[str] = mapped_column(String(200), default="")
    caption_source: Mapped[str | None] = mapped_column(String(120))  # template | gemini:<model> | reviewer
    strategy_note: Mapped[str | None] = mapped_column(Text)  # why the strategy picked it, and what it relaxed
    media_url: Mapped[str | None] = mapped_column(Text)  # the public URL Instagram fetched
    media_sha256: Mapped[str | None] = mapped_column(String(64))
    # Crash safety: the container id is committed before media_publish is called.
    container_id: Mapped[str | None] = mapped_column(String(200))
    container_created_at: Mapped[datetime | None] = mapped_column()
    permalink: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(64))  # the Dagster run publishing it
    claimed_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    candidate: Mapped[Candidate | None] = relationship()


class PostAttempt(Base):
    """Every publishing call's outcome, so a crash between two calls can be reconciled."""

    __tablename__ = "post_attempts"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int] = mapped_column(ForeignKey("posts.id", ondelete="CASCADE"), index=True)
    publisher: Mapped[str] = mapped_column(String(40))
    step: Mapped[str | None] = mapped_column(String(16))  # quota | container | status | publish | reconcile | outbox
    outcome: Mapped[str] = mapped_column(String(24))  # published | already_published | created | failed | ...
    external_id: Mapped[str | None] = mapped_column(String(200))
    container_id: Mapped[str | None] = mapped_column(String(200))
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[int | None] = mapped_column(Integer)
    error_subcode: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TopicRotation(Base):
    """Where a pillar stands in the persona's topic rotation (domain/rotation.py): its smooth
    weighted round-robin credit and the themes already used in the current round. Kept here so a
    restart goes on where the last plan stopped."""

    __tablename__ = "topic_rotation"
    __table_args__ = (UniqueConstraint("persona_id", "pillar_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    pillar_id: Mapped[int] = mapped_column(ForeignKey("content_pillars.id", ondelete="CASCADE"))
    credit: Mapped[float] = mapped_column(Float, default=0.0)
    round: Mapped[int] = mapped_column(Integer, default=0)  # full rounds of themes done
    used_themes: Mapped[list[Any]] = mapped_column(JSON, default=list)  # themes used in the current round
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Alert(Base):
    """A notification for ALERT_WEBHOOK_URL, kept as an outbox row: sensors add it (once per
    `dedupe_key`) and deliver it with retries and backoff, so a webhook that is down never blocks a
    sensor and the same failure is never sent twice."""

    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(primary_key=True)
    dedupe_key: Mapped[str] = mapped_column(String(300), unique=True)
    kind: Mapped[str] = mapped_column(String(32))  # run_failure | freshness | freshness_resolved | persona_file
    persona_slug: Mapped[str | None] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(200))  # the job, asset or check it is about
    run_id: Mapped[str | None] = mapped_column(String(64))
    link: Mapped[str | None] = mapped_column(Text)  # the run or asset in the Dagster UI
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    resolved_at: Mapped[datetime | None] = mapped_column()  # a freshness problem that has cleared
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()
