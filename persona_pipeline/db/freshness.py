"""Reads what the freshness rules (persona_pipeline.domain.freshness) judge: a persona's live
scheduled posts ahead, the posts awaiting approval, and the approved images not posted yet."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain import freshness, post_states
from persona_pipeline.domain.freshness import FreshnessResult
from persona_pipeline.personas import PersonaConfig

# Posts that will go out on their own: scheduled, or being published right now.
LIVE = (post_states.SCHEDULED, post_states.PUBLISHING)


def persona_freshness(session: Session, persona_row: models.Persona, config: PersonaConfig, now: datetime,
                      min_days: float) -> FreshnessResult:
    upcoming = list(session.scalars(select(models.Post.scheduled_at).where(
        models.Post.persona_id == persona_row.id, models.Post.status.in_(LIVE), models.Post.scheduled_at > now)))
    awaiting = session.scalar(select(func.count(models.Post.id)).where(
        models.Post.persona_id == persona_row.id, models.Post.status == post_states.AWAITING_APPROVAL)) or 0
    # 'available' = approved and not used by a published post, whether or not a waiting post holds it.
    unposted = session.scalar(select(func.count(models.LibraryItem.id)).where(
        models.LibraryItem.persona_id == persona_row.id, models.LibraryItem.status == "available")) or 0
    return freshness.evaluate(now=now, upcoming=upcoming, awaiting_approval=awaiting, unposted=unposted,
                              posts_per_week=config.strategy.posts_per_week, min_days=min_days)
