"""The alert outbox."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from persona_pipeline.db.models.base import Base, CreatedAt, utcnow


class Alert(Base):
    """A notification for ALERT_WEBHOOK_URL, kept as an outbox row: sensors add it (once per
    `dedupe_key`) and deliver it with retries and backoff, so a webhook that is down never blocks a
    sensor and the same failure is never sent twice."""

    __tablename__ = "alerts"
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
    created_at: Mapped[CreatedAt]
    sent_at: Mapped[datetime | None] = mapped_column()
