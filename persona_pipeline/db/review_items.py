"""A reviewer's changes to a carousel's, story's or reel's stills: reorder them, or replace one with
another usable candidate of the lead's run. Each change is checked here, remakes the post's files
(post_media.remake: the carousel's crops, the reel's video) and leaves one `ReviewEvent`.

A container made from the old stills is dropped (a failed post's carousel container, a replaced
item's container): the next attempt makes new ones from what the reviewer chose."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.db.review import ReviewError, record_event
from persona_pipeline.db.review_posts import _post, check_editable
from persona_pipeline.domain import media, post_formats
from persona_pipeline.persona_formats import FormatSettings
from persona_pipeline.post_media import USABLE, held_candidates, held_items, remake


def items_of(session: Session, post_id: int) -> list[models.PostItem]:
    return list(session.scalars(select(models.PostItem).where(models.PostItem.post_id == post_id)
                                .order_by(models.PostItem.position)))


def replacement_options(session: Session, post: models.Post) -> list[models.Candidate]:
    """Usable candidates of the lead's run that no live post shows, best first; for a carousel of one
    library cluster (`format_options.cluster_id`), the candidates of that cluster's available items."""
    cluster_id = (post.format_options or {}).get("cluster_id")
    if cluster_id is not None:
        held, held_library = held_candidates(session, post.persona_id), held_items(session, post.persona_id)
        rows = session.execute(select(models.Candidate, models.LibraryItem.id).join(
            models.LibraryItem, models.LibraryItem.candidate_id == models.Candidate.id).where(
            models.LibraryItem.cluster_id == cluster_id, models.LibraryItem.status == "available",
            models.Candidate.status.in_(USABLE))
            .order_by(models.LibraryItem.score.desc().nulls_last(), models.LibraryItem.id)).all()
        return [c for c, item_id in rows if c.id not in held and item_id not in held_library]
    items = items_of(session, post.id)
    lead = next((i.candidate_id for i in items if i.candidate_id), post.candidate_id)
    if lead is None:
        return []
    run_id = session.scalar(select(models.Candidate.run_id).where(models.Candidate.id == lead))
    held = held_candidates(session, post.persona_id)
    return [c for c in session.scalars(select(models.Candidate).where(
        models.Candidate.run_id == run_id, models.Candidate.status.in_(USABLE))
        .order_by(models.Candidate.bt_score.desc().nulls_last(), models.Candidate.elo.desc(), models.Candidate.id))
        if c.id not in held]


def _editable_items(session: Session, post_id: int) -> tuple[models.Post, list[models.PostItem]]:
    post = _post(session, post_id)
    check_editable(post)
    items = items_of(session, post.id)
    if post.format == post_formats.FEED or not items:
        raise ReviewError(f"post {post.id} is a {post.format} post without stills to reorder or replace")
    return post, items


def _remake(session: Session, post: models.Post, home: Path) -> None:
    persona = session.get(models.Persona, post.persona_id)
    settings = FormatSettings.model_validate((persona.settings or {}).get("formats") or {})
    post.container_id, post.container_created_at = None, None  # made from the old stills
    session.flush()
    try:
        remake(session, post, settings, Path(home) / "personas" / persona.slug / "media", Path(persona.folder))
    except (media.MediaError, post_formats.FormatError) as exc:
        raise ReviewError(f"post {post.id}: {exc}") from None


def reorder_items(session: Session, post_id: int, order: list[int], reviewer: str, home: Path) -> models.Post:
    """Put the stills in `order` (their current positions, listed in the new order)."""
    post, items = _editable_items(session, post_id)
    positions = [i.position for i in items]
    if sorted(order) != positions:
        raise ReviewError(f"post {post.id}: the new order {order} must list each of the positions {positions} once")
    by_position = {i.position: i for i in items}
    # Two steps: the (post, position) pairs are unique at every moment.
    session.execute(update(models.PostItem).where(models.PostItem.post_id == post.id)
                    .values(position=-models.PostItem.position))
    session.flush()
    for new, old in enumerate(order, 1):
        session.execute(update(models.PostItem).where(models.PostItem.id == by_position[old].id).values(position=new))
    session.expire_all()
    post = _post(session, post_id)
    if order != positions:
        _remake(session, post, home)
    record_event(session, post.persona_id, "reorder_items", "post", post.id, reviewer, {"order": order})
    return post


def replace_item(session: Session, post_id: int, position: int, candidate_id: int, reviewer: str,
                 home: Path) -> models.Post:
    """Show candidate `candidate_id` (a usable one of the lead's run, shown nowhere else) at `position`."""
    post, items = _editable_items(session, post_id)
    item = next((i for i in items if i.position == position), None)
    if item is None:
        raise ReviewError(f"post {post.id} has no item {position} (items 1..{len(items)})")
    if item.library_item_id is not None and item.library_item_id == post.library_item_id:
        raise ReviewError(f"post {post.id}: item {position} is the post's own library image; reorder the items "
                          "instead, or reject the post")
    options = {c.id: c for c in replacement_options(session, post)}
    if candidate_id not in options:
        raise ReviewError(f"post {post.id}: candidate {candidate_id} cannot replace item {position}: it is not a "
                          "usable candidate of this post's run (or cluster), or another post shows it")
    before = item.candidate_id
    library_item = None
    if (post.format_options or {}).get("cluster_id") is not None:  # a cluster's item: the post shows that item
        library_item = session.scalar(select(models.LibraryItem.id).where(models.LibraryItem.candidate_id == candidate_id))
    item.candidate_id, item.library_item_id = candidate_id, library_item
    item.source_path = options[candidate_id].image_path
    item.container_id, item.container_created_at, item.media_path, item.media_sha256 = None, None, None, None
    _remake(session, post, home)
    record_event(session, post.persona_id, "replace_item", "post", post.id, reviewer,
                 {"position": position, "candidate_id": candidate_id, "replaced": before})
    return post
