"""A generation run and everything reviewing it writes: the planned prompt, the run's steps, one
job per image, the candidates, pair offers, votes, and the `ReviewEvent` row of every decision
(the one table the review sensor reads)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from sqlalchemy import JSON, Boolean, CheckConstraint, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from persona_pipeline.db.models.base import Base, CreatedAt, PersonaFK, PillarFK
from persona_pipeline.db.models.personas import LoraModel

# The run and the step most of these rows belong to (deleting a run deletes them).
RunFK = Annotated[int, mapped_column(ForeignKey("generation_runs.id", ondelete="CASCADE"), index=True)]
StepFK = Annotated[int, mapped_column(ForeignKey("run_steps.id", ondelete="CASCADE"), index=True)]


class ContentPrompt(Base):
    """A planned prompt for one generation run: from the pillar gaps and guidelines, written by
    Gemini or a template. `planned` until a run uses it."""

    __tablename__ = "content_prompts"
    persona_id: Mapped[PersonaFK]
    pillar_id: Mapped[PillarFK]
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    theme: Mapped[str] = mapped_column(String(200), default="")
    source: Mapped[str] = mapped_column(String(120))  # template | gemini:<model>
    gaps: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the gap analysis it was planned from
    status: Mapped[str] = mapped_column(String(16), default="planned")  # planned | used | cancelled
    created_at: Mapped[CreatedAt]


class GenerationRun(Base):
    __tablename__ = "generation_runs"
    persona_id: Mapped[PersonaFK]
    pillar_id: Mapped[PillarFK]
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    backend: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(24), default="running", index=True)  # running | awaiting_review | done | failed
    dagster_run_id: Mapped[str | None] = mapped_column(String(64))
    content_prompt_id: Mapped[int | None] = mapped_column(ForeignKey("content_prompts.id", ondelete="SET NULL"))
    prompt_source: Mapped[str | None] = mapped_column(String(120))  # template | gemini:<model> | persona.yaml
    pipeline: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the step settings the run was started with
    failure_reason: Mapped[str | None] = mapped_column(Text)
    winner_candidate_id: Mapped[int | None] = mapped_column(
        ForeignKey("candidates.id", ondelete="SET NULL", use_alter=True)
    )
    created_at: Mapped[CreatedAt]

    steps: Mapped[list["RunStep"]] = relationship(back_populates="run", order_by="RunStep.position")


class RunStep(Base):
    __tablename__ = "run_steps"
    __table_args__ = (UniqueConstraint("run_id", "position"),)
    run_id: Mapped[RunFK]
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
    # The inputs of the step's last ranking fit (db/rankings.py): a refresh refits it only when they changed.
    ranked_signature: Mapped[str | None] = mapped_column(String(40))

    run: Mapped[GenerationRun] = relationship(back_populates="steps")


class GenerationJob(Base):
    """One image to make: a slot under a parent (or a root slot) of a step. A failed job keeps its
    row and reason; its slot is not reused, so three failures under one parent are countable."""

    __tablename__ = "generation_jobs"
    __table_args__ = (UniqueConstraint("step_id", "parent_key", "slot"),)
    run_id: Mapped[RunFK]
    step_id: Mapped[StepFK]
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
    created_at: Mapped[CreatedAt]
    finished_at: Mapped[datetime | None] = mapped_column()


class Candidate(Base):
    __tablename__ = "candidates"
    run_id: Mapped[RunFK]
    step_id: Mapped[StepFK]
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
    # A video step's clip (MP4); image_path is then its first frame, which review and scoring show.
    video_path: Mapped[str | None] = mapped_column(Text)
    video_sha256: Mapped[str | None] = mapped_column(String(64))
    elo: Mapped[int] = mapped_column(Integer, default=1000)
    bt_score: Mapped[float | None] = mapped_column(Float)
    bt_ci_low: Mapped[float | None] = mapped_column(Float)
    bt_ci_high: Mapped[float | None] = mapped_column(Float)
    clip_score: Mapped[float | None] = mapped_column(Float)  # prompt alignment (open_clip cosine)
    identity_score: Mapped[float | None] = mapped_column(Float)  # cosine to the source photos' centroid
    created_at: Mapped[CreatedAt]

    parent: Mapped["Candidate | None"] = relationship(remote_side="Candidate.id")
    run: Mapped[GenerationRun] = relationship(foreign_keys="Candidate.run_id")
    lora: Mapped[LoraModel | None] = relationship()


class Vote(Base):
    """One pairwise vote. The pair is stored low id first; a pair may have several votes (a close
    pair at the top-K boundary is asked again), one per offer."""

    __tablename__ = "votes"
    __table_args__ = (
        Index(None, "pair_low_id", "pair_high_id"),
        CheckConstraint("winner_id <> loser_id", name="not_self"),
    )
    step_id: Mapped[StepFK]
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
    created_at: Mapped[CreatedAt]


class PairOffer(Base):
    """A pair shown to a reviewer, with the probability it had of being chosen (active selection
    mixes greedy and uniform picks, so later analysis can weight votes by 1/probability)."""

    __tablename__ = "pair_offers"
    step_id: Mapped[StepFK]
    left_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    right_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    probability: Mapped[float] = mapped_column(Float)
    strategy: Mapped[str] = mapped_column(String(16))  # active | explore | again (offered again after an undo)
    reviewer: Mapped[str] = mapped_column(String(80))
    # NULL (open) | voted | skipped | killed | undone (the vote or skip was taken back: db/review.py undo_vote, undo_skip)
    outcome: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[CreatedAt]
    # When the page put the pair on screen; NULL while it is only the preloaded next pair, which
    # cannot be answered yet.
    shown_at: Mapped[datetime | None] = mapped_column()


class ReviewEvent(Base):
    """Every human decision: who, when, what, on which subject."""

    __tablename__ = "review_events"
    persona_id: Mapped[PersonaFK]
    kind: Mapped[str] = mapped_column(String(32))  # vote | kill | approve_step | pick_winner | approve_post | ...
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[int] = mapped_column(Integer)
    reviewer: Mapped[str] = mapped_column(String(80))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[CreatedAt]
