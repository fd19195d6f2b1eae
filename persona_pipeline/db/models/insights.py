"""What the audience did: post insights as a time series, the account's daily insights, and each
published post's reading state (docs/insights.md)."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Boolean, Date, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from persona_pipeline.db.models.base import Base, CreatedAt, UpdatedAt


class PostInsight(Base):
    """One metric of one post read at one scheduled age (1, 24, 72 or 168 hours). The unique key
    makes a rerun overwrite its own reading instead of adding a second one: nothing is counted twice."""

    __tablename__ = "post_insights"
    __table_args__ = (UniqueConstraint("post_id", "metric", "age_hours"),)
    post_id: Mapped[int] = mapped_column(ForeignKey("posts.id", ondelete="CASCADE"), index=True)
    metric: Mapped[str] = mapped_column(String(40))  # reach | views | likes | comments | saved | shares | total_interactions
    age_hours: Mapped[int] = mapped_column(Integer)  # the scheduled read this value belongs to
    value: Mapped[int] = mapped_column(Integer)
    read_at: Mapped[datetime] = mapped_column()
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)  # from the simulated audience (outbox)


class InsightPoll(Base):
    """Where a published post's insight reads stand: `collecting` until the last age is read, then
    `frozen`; `deleted` when Instagram no longer has the media (its history is kept); `error` keeps
    the last named problem (an unsupported metric, another account's media) while reads go on."""

    __tablename__ = "insight_polls"
    post_id: Mapped[int] = mapped_column(ForeignKey("posts.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="collecting", index=True)
    last_age_hours: Mapped[int | None] = mapped_column(Integer)  # the latest age read
    note: Mapped[str | None] = mapped_column(Text)  # why it stopped, or metrics that were refused
    followers_at_publish: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[UpdatedAt]


class AccountInsight(Base):
    """An account's daily numbers (followers, reach), one row per account, day and metric."""

    __tablename__ = "account_insights"
    __table_args__ = (UniqueConstraint("account", "day", "metric"),)
    account: Mapped[str] = mapped_column(String(120), index=True)
    day: Mapped[date] = mapped_column(Date)
    metric: Mapped[str] = mapped_column(String(40))
    value: Mapped[float] = mapped_column(Float)
    read_at: Mapped[datetime] = mapped_column()
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
