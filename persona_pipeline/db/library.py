"""The content library: which approved images (and, by a persona setting, source photos) a persona
can post, which pillar and theme each belongs to, and which are used.

An item is *available* until a published post uses it. A post that is waiting, publishing or
failed-and-retrying holds its item so two posts never share an image; a cancelled or abandoned
post lets it go again, so a failed post never uses its image up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from persona_pipeline.db import models, registry
from persona_pipeline.domain import gaps as gap_rules
from persona_pipeline.domain import post_states
from persona_pipeline.personas import PersonaConfig

# Statuses of a post that keep its library item away from other posts (published ones use it up).
HOLDING = tuple(sorted(post_states.HOLDS_IMAGE - {post_states.PUBLISHED}))


@dataclass(frozen=True)
class LibrarySync:
    added: list[int]  # new item ids
    removed: int  # items whose source went away (never used ones only)
    restored: int


def _winner_rows(session: Session, persona_id: int):
    return session.execute(
        select(models.Candidate, models.GenerationRun.pillar_id, models.GenerationRun.prompt, models.ContentPrompt.theme)
        .join(models.GenerationRun, models.Candidate.run_id == models.GenerationRun.id)
        .outerjoin(models.ContentPrompt, models.GenerationRun.content_prompt_id == models.ContentPrompt.id)
        .where(models.GenerationRun.persona_id == persona_id, models.Candidate.status == "winner")
        .order_by(models.Candidate.id)).all()


def _photo_caption(session: Session, photo: models.SourcePhoto) -> str:
    if photo.caption:
        return photo.caption
    generated = session.scalars(select(models.PhotoCaption.caption).where(
        models.PhotoCaption.persona_id == photo.persona_id, models.PhotoCaption.pixel_sha256 == photo.pixel_sha256)
        .order_by(models.PhotoCaption.kind)).first()  # "edited" sorts before "generated"
    return generated or ""


def sync_library(session: Session, persona_id: int, include_source_photos: bool) -> LibrarySync:
    """Add every approved winner (and accepted source photo, when included) that is not in the
    library yet; take out unused items whose source went away; put back ones that returned."""
    items = {i.image_sha256: i for i in session.scalars(select(models.LibraryItem).where(
        models.LibraryItem.persona_id == persona_id).options(defer(models.LibraryItem.embedding)))}  # no blob
    wanted: set[str] = set()
    added: list[models.LibraryItem] = []
    for candidate, pillar_id, prompt, theme in _winner_rows(session, persona_id):
        wanted.add(candidate.image_sha256)
        if candidate.image_sha256 in items:
            item = items[candidate.image_sha256]
            item.score = candidate.bt_score if candidate.bt_score is not None else float(candidate.elo)
            continue
        item = models.LibraryItem(
            persona_id=persona_id, kind="winner", candidate_id=candidate.id, image_path=candidate.image_path,
            image_sha256=candidate.image_sha256, pillar_id=pillar_id, theme=theme or "", caption=prompt or "",
            score=candidate.bt_score if candidate.bt_score is not None else float(candidate.elo), status="available")
        session.add(item)
        items[item.image_sha256] = item
        added.append(item)
    if include_source_photos:
        for photo in session.scalars(select(models.SourcePhoto).where(
                models.SourcePhoto.persona_id == persona_id, models.SourcePhoto.status == "accepted")
                .order_by(models.SourcePhoto.id)):
            sha = photo.pixel_sha256 or photo.sha256
            wanted.add(sha)
            if sha in items:
                continue
            item = models.LibraryItem(
                persona_id=persona_id, kind="source_photo", source_photo_id=photo.id, image_path=photo.path,
                image_sha256=sha, pillar_id=None, theme="", caption=_photo_caption(session, photo), score=None,
                status="available")
            session.add(item)
            items[sha] = item
            added.append(item)
    removed = restored = 0
    for sha, item in items.items():
        if sha not in wanted and item.status == "available":
            item.status, removed = "removed", removed + 1
        elif sha in wanted and item.status == "removed":
            item.status, restored = "available", restored + 1
    session.flush()
    return LibrarySync([i.id for i in added], removed, restored)


def embedding_of(item: models.LibraryItem) -> np.ndarray:
    import numpy as np

    return np.frombuffer(item.embedding, dtype=np.float32)


class PlacedItem(NamedTuple):
    """A library item as clustering reads it first: everything but its embedding."""
    id: int
    kind: str
    status: str
    pillar_id: int | None
    theme: str
    caption: str
    image_path: str
    cluster_id: int | None
    cluster_distance: float | None


def placed_items(session: Session, persona_id: int, model_name: str) -> list[PlacedItem]:
    """The persona's items that clustering places (not removed, embedded by `model_name`), in id
    order, without their embeddings (a blob of 2 KB each; `embeddings` reads the ones needed)."""
    item = models.LibraryItem
    return [PlacedItem(*row) for row in session.execute(
        select(item.id, item.kind, item.status, item.pillar_id, item.theme, item.caption, item.image_path,
               item.cluster_id, item.cluster_distance)
        .where(item.persona_id == persona_id, item.status != "removed", item.embedding.is_not(None),
               item.embedding_model == model_name).order_by(item.id))]


def embedding_dims(session: Session, item_id: int) -> int:
    """The length of one item's embedding, read by the database (the blob is not sent)."""
    import numpy as np

    return int(session.scalar(select(func.length(models.LibraryItem.embedding)).where(
        models.LibraryItem.id == item_id)) or 0) // np.dtype(np.float32).itemsize


def embeddings(session: Session, item_ids: list[int], chunk: int = 5000) -> np.ndarray:
    """The embeddings of `item_ids`, one row each, in that order (all of one length)."""
    import numpy as np

    found: dict[int, bytes] = {}
    for start in range(0, len(item_ids), chunk):
        part = item_ids[start:start + chunk]
        found.update(session.execute(select(models.LibraryItem.id, models.LibraryItem.embedding).where(
            models.LibraryItem.id.in_(part))).tuples().all())
    rows = [np.frombuffer(found[i], dtype=np.float32) for i in item_ids]
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def set_embedding(item: models.LibraryItem, vector: np.ndarray, model_name: str) -> None:
    import numpy as np

    item.embedding = np.asarray(vector, dtype=np.float32).tobytes()
    item.embedding_model = model_name


def held_item_ids(session: Session, persona_id: int, exclude_post_id: int | None = None) -> set[int]:
    """Items a post still holds (waiting, scheduled, publishing, or failed and to be retried)."""
    query = select(models.Post.library_item_id).where(
        models.Post.persona_id == persona_id, models.Post.library_item_id.is_not(None),
        models.Post.status.in_(HOLDING))
    if exclude_post_id is not None:
        query = query.where(models.Post.id != exclude_post_id)
    return set(session.scalars(query))


def available_items(session: Session, persona_id: int) -> list[models.LibraryItem]:
    """Items no post has used or holds, oldest first."""
    held = held_item_ids(session, persona_id)
    return [i for i in session.scalars(select(models.LibraryItem).where(
        models.LibraryItem.persona_id == persona_id, models.LibraryItem.status == "available")
        .order_by(models.LibraryItem.id)) if i.id not in held]


def unposted_per_pillar(session: Session, persona_id: int) -> dict[int | None, int]:
    """Unposted items per pillar id (None: not mapped to a pillar yet). An item a scheduled post
    holds still counts: the gap analysis needs cover every post of the horizon, scheduled ones too."""
    rows = session.execute(select(models.LibraryItem.pillar_id, func.count()).where(
        models.LibraryItem.persona_id == persona_id, models.LibraryItem.status == "available")
        .group_by(models.LibraryItem.pillar_id)).all()
    return {pillar_id: n for pillar_id, n in rows}


def _gap_analysis(session: Session, persona: models.Persona, config: PersonaConfig) -> tuple:
    """(today, horizon, rate, rows): the gap analysis (domain/gaps.py) of the persona's active
    pillars over its library, as a report stores it."""
    pillars = registry.active_pillars(session, persona.id)
    available = unposted_per_pillar(session, persona.id)
    today = datetime.now(ZoneInfo(config.timezone)).date()
    horizon, rate = config.strategy.gap_horizon_days, config.strategy.posts_per_week
    gaps = gap_rules.analyse_gaps([gap_rules.PillarInput(
        name=p.name, weight=p.weight, priority=p.priority, available=available.get(p.id, 0), starts_on=p.starts_on,
        ends_on=p.ends_on, target_posts_per_week=p.target_posts_per_week) for p in pillars], today,
        days=horizon, posts_per_week=rate)
    ids = {p.name: p.id for p in pillars}
    rows = [{"pillar": g.name, "pillar_id": ids[g.name], "weight": g.weight, "priority": g.priority,
             "needed": g.needed, "available": g.available, "gap": g.gap, "status": g.status} for g in gaps]
    return today, horizon, rate, rows


def _store(session: Session, persona: models.Persona, analysis: tuple) -> models.PillarGapReport:
    today, horizon, rate, rows = analysis
    report = models.PillarGapReport(persona_id=persona.id, today=today, horizon_days=horizon, posts_per_week=rate,
                                    rows=rows)
    session.add(report)
    session.flush()
    return report


def build_gap_report(session: Session, persona: models.Persona, config: PersonaConfig) -> models.PillarGapReport:
    """The gap analysis of the persona's active pillars over its library, stored."""
    return _store(session, persona, _gap_analysis(session, persona, config))


def latest_gap_report(session: Session, persona_id: int) -> models.PillarGapReport | None:
    return session.scalars(select(models.PillarGapReport).where(models.PillarGapReport.persona_id == persona_id)
                           .order_by(models.PillarGapReport.id.desc()).limit(1)).first()


def current_gap_report(session: Session, persona: models.Persona, config: PersonaConfig) -> models.PillarGapReport:
    """The latest report while it still says what a new analysis would (same local day, settings,
    pillars and counts); otherwise a new one. content_plan plans from this."""
    analysis = _gap_analysis(session, persona, config)
    report = latest_gap_report(session, persona.id)
    if report is not None and (report.today, report.horizon_days, report.posts_per_week, report.rows) == analysis:
        return report
    return _store(session, persona, analysis)


def mark_used(session: Session, post: models.Post, when: datetime) -> None:
    """The published post's item is used up (in the caller's transaction, with the post's status)."""
    if post.library_item_id is None:
        return
    item = session.get(models.LibraryItem, post.library_item_id)
    if item is not None:
        item.status, item.used_by_post_id, item.used_at = "used", post.id, when


def counts_by_status(session: Session, persona_id: int) -> dict[str, int]:
    rows = session.execute(select(models.LibraryItem.status, func.count()).where(
        models.LibraryItem.persona_id == persona_id).group_by(models.LibraryItem.status)).all()
    return {status: n for status, n in rows}
