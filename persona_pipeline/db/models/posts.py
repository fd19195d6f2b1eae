"""Posts and every publishing call made for them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from persona_pipeline.db.models.base import Base, CreatedAt, PersonaFK, PillarFK, UpdatedAt
from persona_pipeline.db.models.generation import Candidate

LIVE_SLOT = "status NOT IN ('cancelled', 'abandoned')"
TO_REVIEW = "status IN ('awaiting_approval', 'failed')"
TO_PUBLISH = "status IN ('scheduled', 'publishing')"


class Post(Base):
    """One post with one status model (see domain/post_states.py for the legal transitions)."""

    __tablename__ = "posts"
    # No two live posts of one account in one slot; a cancelled or abandoned post frees its slot.
    __table_args__ = (Index("uq_posts_account_scheduled_at", "account", "scheduled_at", unique=True,
                            sqlite_where=text(LIVE_SLOT), postgresql_where=text(LIVE_SLOT)),
                      # The review form's posts to review: a few among years of published posts.
                      Index("ix_posts_to_review", "scheduled_at", sqlite_where=text(TO_REVIEW),
                            postgresql_where=text(TO_REVIEW)),
                      # The publish job's due posts (and the ones it is publishing).
                      Index("ix_posts_to_publish", "scheduled_at", sqlite_where=text(TO_PUBLISH),
                            postgresql_where=text(TO_PUBLISH)))
    persona_id: Mapped[PersonaFK]
    pillar_id: Mapped[PillarFK]
    # feed | carousel | story | reel (domain/post_formats.py); a carousel's, story's or reel's stills
    # are its `items`, in order. `media_path` is the feed or story image, or the reel's MP4.
    format: Mapped[str] = mapped_column(String(16), default="feed", server_default="feed")
    # Per-format settings the post was made with: a reel's share_to_feed, cover_path, thumb_offset_ms,
    # audio; a carousel's aspect; a story's video flag.
    format_options: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=dict)
    # A winner's candidate, or None for a post of a source photo (library_item_id says which).
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="RESTRICT"))
    account: Mapped[str] = mapped_column(String(120))  # instagram user id, or outbox:<slug>
    status: Mapped[str] = mapped_column(String(24), default="draft", index=True)
    caption: Mapped[str] = mapped_column(Text)
    hashtags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    media_path: Mapped[str | None] = mapped_column(Text)
    scheduled_at: Mapped[datetime] = mapped_column(index=True)
    external_id: Mapped[str | None] = mapped_column(String(200))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    review_note: Mapped[str | None] = mapped_column(Text)  # why a reviewer rejected or moved it
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    retryable: Mapped[bool] = mapped_column(Boolean, default=True)  # False: a person must reschedule it
    next_attempt_at: Mapped[datetime | None] = mapped_column()  # a retried post waits until then
    published_at: Mapped[datetime | None] = mapped_column(index=True)
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
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[UpdatedAt]

    candidate: Mapped[Candidate | None] = relationship()
    items: Mapped[list["PostItem"]] = relationship(order_by="PostItem.position", cascade="all, delete-orphan",
                                                   passive_deletes=True)


class PostItem(Base):
    """One still of a carousel, story or reel, in order: where it came from (candidate -> LoRA ->
    dataset, or a library item), the crop chosen for it, its exported file and, for a carousel,
    its item container (committed before the next call, so a rerun asks it instead of making another)."""

    __tablename__ = "post_items"
    __table_args__ = (UniqueConstraint("post_id", "position"),)
    post_id: Mapped[int] = mapped_column(ForeignKey("posts.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # 1-based
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="RESTRICT"))
    library_item_id: Mapped[int | None] = mapped_column(ForeignKey("library_items.id", ondelete="SET NULL"))
    source_path: Mapped[str] = mapped_column(Text)  # the still as generated (kept when a video fails)
    crop: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {"x": 0.5, "y": 0.4}: the focus point
    media_path: Mapped[str | None] = mapped_column(Text)  # the exported item (carousel JPEG, story frame)
    media_sha256: Mapped[str | None] = mapped_column(String(64))
    container_id: Mapped[str | None] = mapped_column(String(200))
    container_created_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[CreatedAt]


class PostAttempt(Base):
    """Every publishing call's outcome, so a crash between two calls can be reconciled."""

    __tablename__ = "post_attempts"
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
    created_at: Mapped[CreatedAt]
