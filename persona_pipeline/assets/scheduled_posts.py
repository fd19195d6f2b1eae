"""scheduled_posts: the next posts, picked by the strategy (domain/strategy.py) from the content
library. Free slots inside the persona's posting windows are spaced at `strategy.posts_per_week`
over `strategy.plan_ahead_days`; each gets the image the strategy chooses, a caption (Gemini with
the image when GEMINI_API_KEY is set, else the persona's templates), hashtags by the persona's
size mix, and an Instagram-ready JPEG. Posts wait for approval (auto-review approves in the demo)."""

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import insights as insight_store
from persona_pipeline.db import library, models, review_posts
from persona_pipeline.domain import learning, post_states, strategy
from persona_pipeline.domain.captions import repeated_phrases, select_hashtags, template_caption, validate_post_text
from persona_pipeline.domain.media import MediaError
from persona_pipeline.domain.post_formats import FormatError
from persona_pipeline.domain.slots import spaced_slots
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.post_media import MediaMaker
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.gemini import GeminiClient, GeminiError
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.review_policy import AutoReviewer
from persona_pipeline.resources.storage import PersonaStorage

RECENT_CAPTIONS = 30  # captions scanned for repeated phrases to avoid
FORMAT_WINDOW = timedelta(days=30)  # the format mix is measured over this, like the pillars' shares
# Posts that are in the feed or hold a slot: the strategy's history.
IN_PLAY = (post_states.AWAITING_APPROVAL, post_states.SCHEDULED, post_states.PUBLISHING, post_states.PUBLISHED,
           post_states.FAILED, post_states.DRAFT)
WAITING = (post_states.DRAFT, post_states.AWAITING_APPROVAL, post_states.SCHEDULED, post_states.PUBLISHING)


def _caption(gemini: GeminiClient, config, item: models.LibraryItem, pillar: models.ContentPillar | None,
             avoid: list[str], index: int, what: str, log) -> tuple[str, str]:
    """(caption, source): Gemini with the image when enabled, else the persona's templates."""
    settings = config.captions
    pillar_name, guidelines = (pillar.name, pillar.guidelines) if pillar else ("", "")
    if gemini.enabled:
        try:
            text = gemini.post_caption(
                Path(item.image_path), persona_name=config.name, pillar=pillar_name, theme=item.theme, tone=settings.tone,
                voice=settings.voice, topics=settings.topics, avoid_topics=settings.avoid_topics,
                examples=settings.examples, emoji=settings.emoji, emoji_density=settings.emoji_density,
                length=settings.length, avoid_phrases=avoid, max_hashtags=config.hashtags.max_per_post,
                guidelines=guidelines, log=log)
            return text, gemini.name
        except GeminiError as exc:
            raise dg.Failure(f"{what}: Gemini could not write the caption of library item {item.id}: {exc}") from None
    values = {"pillar": pillar_name, "theme": item.theme or pillar_name, "guidelines": guidelines, "name": config.name}
    return template_caption(settings.templates, values, index, what=f"{what} captions.templates"), "template"


@dg.asset(partitions_def=persona_partitions, deps=["clusters"], group_name="posting", kinds={"sqlalchemy"})
def scheduled_posts(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
                    gemini: GeminiClient, auto_review: AutoReviewer, links: UiLinks) -> dg.MaterializeResult:
    """Plans the next posts from the library: slot, image, caption, hashtags and JPEG, waiting for approval.
    Started after clusters in the library job (persona_posting schedule, review_events sensor) and the
    persona_chain job."""
    slug = context.partition_key
    now = datetime.now(timezone.utc)
    with database.session() as session:
        persona, config = persona_for(session, slug)
        what = f"{persona.folder}/persona.yaml"
        plan = config.strategy
        account = config.instagram.user_id if config.instagram else f"outbox:{slug}"
        posts = list(session.scalars(select(models.Post).where(models.Post.persona_id == persona.id)
                                     .order_by(models.Post.id)))
        in_play = [p for p in posts if p.status in IN_PLAY]
        taken = [p.scheduled_at for p in session.scalars(select(models.Post).where(
            models.Post.account == account, models.Post.status.in_(post_states.HOLDS_IMAGE)))]
        until = now + timedelta(days=plan.plan_ahead_days)
        # Posts still on their way out count, overdue ones too (the next publish tick, a retry):
        # they go out inside the plan's days.
        upcoming = [p for p in in_play if p.scheduled_at < until and (p.status in WAITING or (
            p.status == post_states.FAILED and p.retryable))]
        wanted = math.ceil(plan.posts_per_week * plan.plan_ahead_days / 7) - len(upcoming)
        every = timedelta(days=7 / plan.posts_per_week) if plan.posts_per_week else timedelta(days=plan.plan_ahead_days)
        gap = timedelta(minutes=config.min_minutes_between_posts)
        slots = spaced_slots(now, wanted, every, config.windows(), config.timezone, taken, gap, until)
        pillars = list(session.scalars(select(models.ContentPillar).where(models.ContentPillar.persona_id == persona.id,
                                                                          models.ContentPillar.active.is_(True))))
        by_pillar = {p.id: p for p in pillars}
        # persona.yaml strategy.learning: shares and hours from the audience (None: off, today's plan exactly).
        learned = insight_store.learned_targets(session, persona.id, config, now)
        shares = bounds = notes = None
        hour_notes: dict[datetime, str] = {}
        if learned is not None:
            moved = learning.move_slots(learned, slots, config.windows(), config.timezone,
                                        config.strategy.learning.settings(), taken, gap, now, until)
            slots = [slot for slot, _ in moved]
            hour_notes = {slot: why for slot, why in moved if why}
            by_name = {p.name: p.id for p in pillars}
            shares = {by_name[n]: share for n, share in learned.shares.items() if n in by_name}
            bounds = {by_name[n]: (d.low, d.high) for n, d in learned.pillars.items() if n in by_name}
            notes = {by_name[n]: d.note for n, d in learned.pillars.items() if n in by_name}
        options = library.available_items(session, persona.id)
        items = {i.id: i for i in options}
        result = strategy.plan_posts(
            slots=slots,
            pillars=[strategy.StrategyPillar(p.id, p.name, p.weight, p.priority, p.starts_on, p.ends_on) for p in pillars],
            # An image of a pillar dropped from persona.yaml is offered as unassigned, after every pillar.
            options=[strategy.LibraryOption(i.id, i.pillar_id if i.pillar_id in by_pillar else None, i.theme, i.score)
                     for i in options],
            history=[strategy.PastPost(p.pillar_id, p.theme, p.published_at or p.scheduled_at) for p in in_play],
            rules=strategy.StrategyRules(theme_spacing=timedelta(days=plan.theme_spacing_days),
                                         theme_max_per_week=plan.theme_max_per_week, weekly_cap=plan.weekly_cap),
            tz=config.timezone, target_shares=shares, share_bounds=bounds, pillar_notes=notes)
        avoid = repeated_phrases([p.caption for p in posts[-RECENT_CAPTIONS:]])
        created, rows = [], []
        # The format mix is honoured over the last 30 days' posts and the ones planned here.
        formats = [p.format for p in in_play if (p.published_at or p.scheduled_at) >= now - FORMAT_WINDOW]
        maker = MediaMaker(session, persona, config.formats, storage.media_dir(slug), Path(persona.folder))
        for planned in result.posts:
            item = items[planned.item_id]
            pillar = by_pillar.get(planned.pillar_id)
            index = len(posts) + len(created)
            caption, source = _caption(gemini, config, item, pillar, avoid, index, what, context.log)
            hashtags = select_hashtags(broad=config.hashtags.broad, medium=config.hashtags.targets,
                                       niche=config.hashtags.niche, avoid=config.hashtags.avoid,
                                       size_mix=config.hashtags.size_mix, max_per_post=config.hashtags.max_per_post,
                                       offset=index)
            problems = validate_post_text(caption, hashtags, config.hashtags.max_per_post)
            if problems:
                raise dg.Failure(f"{slug}: the post for library item {item.id} ({source} caption) is invalid: "
                                 f"{'; '.join(problems)}")
            post = models.Post(persona_id=persona.id, pillar_id=planned.pillar_id, candidate_id=item.candidate_id,
                               library_item_id=item.id, account=account, status=post_states.DRAFT, caption=caption,
                               hashtags=hashtags, scheduled_at=planned.slot, theme=planned.theme,
                               caption_source=source,
                               strategy_note=planned.reason + (f"; {hour_notes[planned.slot]}"
                                                               if planned.slot in hour_notes else ""))
            session.add(post)
            session.flush()
            fmt, stills, format_note = maker.choose(item, formats)
            try:
                maker.make(post, fmt, stills)
            except (MediaError, FormatError) as exc:
                raise dg.Failure(f"{slug}: post {post.id} ({fmt}) of library item {item.id}: {exc}") from None
            formats.append(fmt)
            post.strategy_note = f"{post.strategy_note}; {format_note}"
            review_posts.set_post_status(session, post, post_states.AWAITING_APPROVAL)
            auto_review.approve_post(session, post)
            created.append(post)
            rows.append({"post": post.id, "format": fmt, "items": len(stills), "slot_utc": post.scheduled_at.isoformat(),
                         "pillar": pillar.name if pillar else "", "theme": post.theme, "item": item.id,
                         "status": post.status, "caption_source": source, "relaxed": ", ".join(planned.relaxed),
                         "why": planned.reason, "caption": caption, "hashtags": " ".join(hashtags)})
        skipped = [{"slot_utc": slot.isoformat(), "why": why} for slot, why in result.skipped]
        previews = [(Path(p.media_path), f"post {p.id}") for p in created]
    for entry in skipped:
        context.log.info(f"{slug}: slot {entry['slot_utc']} left empty: {entry['why']}")
    storage.push_written()  # object storage: a failed upload fails the step (a teardown failure only logs)
    return dg.MaterializeResult(metadata={
        "new_posts": len(created),
        "slots_considered": len(slots),
        "slots_skipped": len(skipped),
        "awaiting_approval": sum(1 for r in rows if r["status"] == post_states.AWAITING_APPROVAL),
        "scheduled": sum(1 for r in rows if r["status"] == post_states.SCHEDULED),
        "library_available": len(options),
        "avoid_phrases": ", ".join(avoid) or "none",
        "learning": learned.summary if learned is not None else "off",
        "posts": table(rows),
        "skipped": table(skipped),
        **sheet_metadata("preview", previews, storage, links, slug),
    })
