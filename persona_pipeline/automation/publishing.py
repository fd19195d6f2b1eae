"""The posting schedule and job: publish every due post through the configured publisher.

Each post is claimed with a conditional UPDATE (scheduled → publishing) before the publisher is
called, and the publisher is idempotent per post id, so two overlapping runs or a rerun after a
crash never post twice. A post left in `publishing` by a crash is reclaimed after STALE_AFTER."""

from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
from sqlalchemy import or_, select, update

from persona_pipeline.db import models
from persona_pipeline.domain import post_states
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.publisher import OutboxPublisher

STALE_AFTER = timedelta(minutes=10)
MAX_RETRIES = 3


def publish_due(database: AppDatabase, publisher: OutboxPublisher, now: datetime, log) -> dict[str, int]:
    counts = {"published": 0, "already_published": 0, "failed": 0, "retried": 0, "abandoned": 0}
    with database.session() as session:
        for post in session.scalars(select(models.Post).where(models.Post.status == post_states.FAILED)):
            new = post_states.SCHEDULED if post.retry_count < MAX_RETRIES else post_states.ABANDONED
            post_states.check_transition(post.status, new)
            post.status = new
            counts["retried" if new == post_states.SCHEDULED else "abandoned"] += 1
        due = list(session.scalars(select(models.Post.id).where(
            or_(models.Post.status == post_states.SCHEDULED, models.Post.status == post_states.PUBLISHING),
            models.Post.scheduled_at <= now).order_by(models.Post.scheduled_at, models.Post.id)))

    for post_id in due:
        with database.session() as session:
            claimed = session.execute(
                update(models.Post).where(models.Post.id == post_id, or_(
                    models.Post.status == post_states.SCHEDULED,
                    (models.Post.status == post_states.PUBLISHING) & (models.Post.updated_at < now - STALE_AFTER)))
                .values(status=post_states.PUBLISHING, updated_at=now)).rowcount
        if not claimed:
            continue  # another run holds it, or it is not stale yet
        with database.session() as session:
            post = session.get(models.Post, post_id)
            slug = session.get(models.Persona, post.persona_id).slug
            try:
                outcome = publisher.publish(post_id=post.id, persona_slug=slug, account=post.account,
                                            media_path=Path(post.media_path or ""), caption=post.caption,
                                            hashtags=list(post.hashtags), scheduled_at=post.scheduled_at)
            except Exception as exc:  # recorded on the post, never lost
                post_states.check_transition(post.status, post_states.FAILED)
                post.status, post.failure_reason, post.retry_count = post_states.FAILED, f"{type(exc).__name__}: {exc}", post.retry_count + 1
                session.add(models.PostAttempt(post_id=post.id, publisher=publisher.name, outcome="failed", detail=str(exc)))
                counts["failed"] += 1
                log.error(f"post {post.id} ({slug}) failed: {exc}")
                continue
            post_states.check_transition(post.status, post_states.PUBLISHED)
            post.status, post.external_id, post.published_at = post_states.PUBLISHED, outcome.external_id, datetime.now(timezone.utc)
            kind = "already_published" if outcome.already_published else "published"
            session.add(models.PostAttempt(post_id=post.id, publisher=publisher.name, outcome=kind,
                                           external_id=outcome.external_id, detail=outcome.location))
            counts[kind] += 1
            log.info(f"post {post.id} ({slug}) {kind.replace('_', ' ')}: {outcome.location}")
    return counts


@dg.op
def publish_due_posts(context: dg.OpExecutionContext, database: AppDatabase, publisher: OutboxPublisher) -> dict:
    counts = publish_due(database, publisher, datetime.now(timezone.utc), context.log)
    context.add_output_metadata(counts)
    return counts


@dg.job(description="Publish every scheduled post whose slot has come, through the configured publisher.")
def publish_job() -> None:
    publish_due_posts()


def publish_schedule(cron: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(name="publish_due_posts_schedule", job=publish_job, cron_schedule=cron,
                                 default_status=dg.DefaultScheduleStatus.RUNNING)
