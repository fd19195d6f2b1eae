"""post_calendar: the persona's posting calendar as reviewers left it. Every post still to go out,
with its slot in the persona's timezone and in UTC, and thumbnails. A check confirms that each
scheduled slot lies inside a posting window and keeps the minimum gap to the account's other posts
(approving, moving and rejecting in the review form start this asset through the review sensor)."""


from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.assets.common import persona_for, sheet_metadata
from persona_pipeline.db import models
from persona_pipeline.domain import post_states
from persona_pipeline.domain.slots import in_window
from persona_pipeline.domain.ui_pages import CalendarPost, account_label, agenda, week_grid
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage

UPCOMING = (post_states.AWAITING_APPROVAL, post_states.SCHEDULED, post_states.PUBLISHING, post_states.FAILED)


@dataclass(frozen=True)
class CalendarEntry:
    post: models.Post
    problems: tuple[str, ...]


def calendar(session: Session, slug: str, now: datetime) -> list[CalendarEntry]:
    """The persona's upcoming posts, soonest first, each with what is wrong with its slot."""
    persona, config = persona_for(session, slug)
    posts = list(session.scalars(select(models.Post).where(models.Post.persona_id == persona.id,
                                                           models.Post.status.in_(UPCOMING))
                                 .order_by(models.Post.scheduled_at, models.Post.id)))
    gap = timedelta(minutes=config.min_minutes_between_posts)
    entries = []
    for post in posts:
        problems = []
        if post.status == post_states.SCHEDULED:
            if not in_window(post.scheduled_at, config.windows(), config.timezone):
                problems.append(f"outside the posting windows {', '.join(config.posting_windows)}")
            clash = [o.id for o in posts if o.id != post.id and o.account == post.account
                     and o.status in (post_states.SCHEDULED, post_states.PUBLISHING) and abs(o.scheduled_at - post.scheduled_at) < gap]
            if clash:
                problems.append(f"within {config.min_minutes_between_posts} min of post {clash[0]}")
            if post.scheduled_at < now - timedelta(hours=1):
                problems.append("overdue by more than an hour (is publish_due_posts_schedule running?)")
        entries.append(CalendarEntry(post, tuple(problems)))
    return entries


@dg.asset(partitions_def=persona_partitions, deps=["scheduled_posts"], group_name="posting", kinds={"sqlalchemy"})
def post_calendar(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
                  links: UiLinks) -> dg.MaterializeResult:
    """The persona's posts still to go out, in its timezone: a week grid, and a day-by-day agenda giving each
    post's time, account, status, review-form link and shortened caption, with problems flagged. Started by the review_events sensor after a post is approved, moved or rejected (job
    post_calendar_refresh), and at the end of the library and persona_chain jobs."""
    slug = context.partition_key
    now = datetime.now(timezone.utc)
    with database.session() as session:
        _, config = persona_for(session, slug)
        tz = ZoneInfo(config.timezone)
        entries = calendar(session, slug, now)
        posts = [CalendarPost(post_id=e.post.id, account=account_label(config.name, e.post.account), status=e.post.status,
                              slot=e.post.scheduled_at, caption=e.post.caption,
                              hashtags=list(e.post.hashtags), problems=e.problems,
                              link=links.links.review_posts_url(slug, e.post.id)) for e in entries]
        scheduled = [e.post for e in entries if e.post.status == post_states.SCHEDULED]
        covered_days = max(((p.scheduled_at - now).total_seconds() / 86400 for p in scheduled), default=0.0)
        previews = [(Path(e.post.media_path), f"post {e.post.id} {e.post.status} "
                     f"{e.post.scheduled_at.astimezone(tz):%a %d %b %H:%M}") for e in entries if e.post.media_path]
    for post in posts:
        if post.problems:
            context.log.warning(f"{slug}: post {post.post_id}: {'; '.join(post.problems)}")
    return dg.MaterializeResult(metadata={
        "scheduled": len(scheduled),
        "awaiting_approval": sum(1 for p in posts if p.status == post_states.AWAITING_APPROVAL),
        "days_covered": round(max(covered_days, 0.0), 2),
        "problems": sum(1 for p in posts if p.problems),
        "timezone": config.timezone,
        "calendar": dg.MetadataValue.md(week_grid(posts, config.timezone)),
        "agenda": dg.MetadataValue.md(agenda(posts, config.timezone)),
        "review_form": dg.MetadataValue.url(links.links.review_posts_url(slug)),
        **sheet_metadata("preview", previews, storage, links, slug),
    })


@dg.asset_check(asset=post_calendar, description="Every scheduled slot is inside a posting window and keeps the minimum gap. "
                "Runs with every post_calendar materialisation (post_calendar_refresh, library and persona_chain jobs).")
def calendar_slots_valid(context: dg.AssetCheckExecutionContext, database: AppDatabase) -> dg.AssetCheckResult:
    slug = context.op_execution_context.partition_key if context.op_execution_context.has_partition_key else None
    with database.session() as session:
        slugs = [slug] if slug else list(session.scalars(select(models.Persona.slug).where(models.Persona.active.is_(True))))
        bad = [f"{s}: post {e.post.id}: {'; '.join(e.problems)}" for s in slugs
               for e in calendar(session, s, datetime.now(timezone.utc)) if e.problems]
    return dg.AssetCheckResult(passed=not bad, metadata={"problems": len(bad), "details": "\n".join(bad[:50]) or "none"})
