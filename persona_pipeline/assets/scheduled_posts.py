"""scheduled_posts: for each pillar without an upcoming post, take its best approved image not yet
used, write the post JPEG, caption and hashtags from persona settings, and a slot inside the
persona's posting windows. Posts wait for approval (auto-review approves them in the demo)."""

import io
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
from PIL import Image
from sqlalchemy import select

from persona_pipeline.assets.common import contact_sheet_md, persona_for, table
from persona_pipeline.db import models, review
from persona_pipeline.domain import post_states
from persona_pipeline.domain.captions import fill, hashtags_for_post, validate_post_text
from persona_pipeline.domain.slots import next_free_slot
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.review_policy import AutoReviewer
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.fileio import atomic_write

UPCOMING = {post_states.DRAFT, post_states.AWAITING_APPROVAL, post_states.SCHEDULED, post_states.PUBLISHING, post_states.FAILED}
OCCUPIES_SLOT = post_states.HOLDS_IMAGE


def export_jpeg(source: Path, target: Path) -> str:
    """Instagram takes JPEG only, aspect 4:5..1.91:1; pad to the nearest allowed ratio."""
    with Image.open(source) as image:
        image = image.convert("RGB")
        ratio = image.width / image.height
        if ratio < 0.8 or ratio > 1.91:
            width = max(image.width, round(image.height * 0.8))
            height = max(image.height, round(image.width / 1.91))
            canvas = Image.new("RGB", (width, height), (255, 255, 255))
            canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
            image = canvas
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
    return atomic_write(target, buffer.getvalue())


@dg.asset(partitions_def=persona_partitions, deps=["clusters"], group_name="posting", kinds={"sqlalchemy"})
def scheduled_posts(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
                    auto_review: AutoReviewer) -> dg.MaterializeResult:
    slug = context.partition_key
    now = datetime.now(timezone.utc)
    created = []
    with database.session() as session:
        persona, config = persona_for(session, slug)
        account = config.instagram.user_id if config.instagram else f"outbox:{slug}"
        posts = list(session.scalars(select(models.Post).where(models.Post.persona_id == persona.id)))
        used_candidates = {p.candidate_id for p in posts if p.status in post_states.HOLDS_IMAGE}
        pillars_waiting = {p.pillar_id for p in posts if p.status in UPCOMING}
        taken = list(session.scalars(select(models.Post.scheduled_at).where(
            models.Post.account == account, models.Post.status.in_(OCCUPIES_SLOT))))
        pillars = list(session.scalars(select(models.ContentPillar).where(
            models.ContentPillar.persona_id == persona.id, models.ContentPillar.active.is_(True))
            .order_by(models.ContentPillar.priority, models.ContentPillar.weight.desc(), models.ContentPillar.id)))
        templates = config.captions.templates
        for pillar in pillars:
            if pillar.id in pillars_waiting:
                continue
            best = session.scalar(
                select(models.Candidate).join(models.GenerationRun, models.Candidate.run_id == models.GenerationRun.id)
                .where(models.GenerationRun.pillar_id == pillar.id, models.Candidate.status == "winner",
                       models.Candidate.id.not_in(used_candidates or {-1}))
                .order_by(models.Candidate.elo.desc(), models.Candidate.id).limit(1))
            if best is None:
                context.log.info(f"{slug}: pillar {pillar.name!r} has no unused approved image")
                continue
            count = len(posts) + len(created)
            caption = fill(templates[count % len(templates)],
                           {"pillar": pillar.name, "guidelines": pillar.guidelines, "name": config.name},
                           what=f"{persona.folder}/persona.yaml captions.templates")
            hashtags = hashtags_for_post(config.hashtags.targets, config.hashtags.avoid, config.hashtags.max_per_post, count)
            problems = validate_post_text(caption, hashtags, config.hashtags.max_per_post)
            if problems:
                raise dg.Failure(f"{slug}: post for pillar {pillar.name!r} is invalid: {'; '.join(problems)}")
            slot = next_free_slot(now, config.windows(), config.timezone, taken,
                                  timedelta(minutes=config.min_minutes_between_posts))
            post = models.Post(persona_id=persona.id, pillar_id=pillar.id, candidate_id=best.id, account=account,
                               status=post_states.DRAFT, caption=caption, hashtags=hashtags, scheduled_at=slot)
            session.add(post)
            session.flush()
            media = storage.media_dir(slug) / f"post-{post.id:06d}.jpg"
            export_jpeg(Path(best.image_path), media)
            post.media_path = str(media)
            review.set_post_status(session, post, post_states.AWAITING_APPROVAL)
            auto_review.approve_post(session, post)
            taken.append(slot)
            used_candidates.add(best.id)
            created.append(post)
        session.flush()
        rows = [{"post": p.id, "pillar": next(x.name for x in pillars if x.id == p.pillar_id), "candidate": p.candidate_id,
                 "status": p.status, "slot_utc": p.scheduled_at.isoformat(), "caption": p.caption,
                 "hashtags": " ".join(p.hashtags)} for p in created]
    return dg.MaterializeResult(metadata={
        "new_posts": len(created),
        "awaiting_approval": sum(1 for r in rows if r["status"] == post_states.AWAITING_APPROVAL),
        "scheduled": sum(1 for r in rows if r["status"] == post_states.SCHEDULED),
        "posts": table(rows),
        "preview": dg.MetadataValue.md(contact_sheet_md([Path(p.media_path) for p in created], [f"post {p.id}" for p in created])),
    })
