"""Reviewer decisions on posts: approve, edit, reject, move, retry and abandon. Like the decisions
on candidates (db/review.py), each one goes through its checks here and leaves one `ReviewEvent`."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.db.review import NotFound, ReviewError, record_event
from persona_pipeline.domain import post_states
from persona_pipeline.domain.captions import validate_post_text
from persona_pipeline.domain.slots import in_window, next_free_slot
from persona_pipeline.domain.strategy import weekly_cap_refusal
from persona_pipeline.personas import PersonaConfig


def set_post_status(session: Session, post: models.Post, new_status: str, reason: str | None = None) -> None:
    post_states.check_transition(post.status, new_status)
    post.status = new_status
    if new_status == post_states.FAILED:
        post.failure_reason = reason
        post.retry_count += 1


def _post(session: Session, post_id: int) -> models.Post:
    post = session.scalar(select(models.Post).where(models.Post.id == post_id).with_for_update())
    if post is None:
        raise NotFound(f"post {post_id} does not exist")
    return post


def _post_config(session: Session, post: models.Post) -> PersonaConfig:
    return PersonaConfig.model_validate(session.get(models.Persona, post.persona_id).settings)


def _taken_slots(session: Session, post: models.Post) -> list[datetime]:
    return list(session.scalars(select(models.Post.scheduled_at).where(
        models.Post.account == post.account, models.Post.id != post.id,
        models.Post.status.in_(post_states.HOLDS_IMAGE - {post_states.PUBLISHED}))))


def _feed_times(session: Session, post: models.Post) -> list[datetime]:
    """When the account's other posts are (or were) in the feed: the weekly cap counts these, as
    the planner's history does (published, planned, waiting or failed)."""
    rows = session.execute(select(models.Post.published_at, models.Post.scheduled_at).where(
        models.Post.account == post.account, models.Post.id != post.id,
        models.Post.status.in_(post_states.HOLDS_IMAGE)))
    return [(published or planned).astimezone(timezone.utc) for published, planned in rows]


def _transition(post: models.Post, new_status: str) -> None:
    try:
        post_states.check_transition(post.status, new_status)
    except post_states.IllegalTransition as exc:
        raise ReviewError(f"post {post.id}: {exc}") from None


# A failed post can be edited and moved too: a caption over the limits is fixed, then retried.
EDITABLE = (post_states.DRAFT, post_states.AWAITING_APPROVAL, post_states.SCHEDULED, post_states.FAILED)
_HASHTAG = re.compile(r"^#?(\w+)$")


def approve_post(session: Session, post_id: int, reviewer: str, now: datetime | None = None) -> models.Post:
    """Approve a post: it becomes `scheduled`. A slot that passed while it waited moves to the next
    free one inside the persona's posting windows (the event records both)."""
    post = _post(session, post_id)
    _transition(post, post_states.SCHEDULED)
    now = now or datetime.now(timezone.utc)
    config = _post_config(session, post)
    planned = post.scheduled_at
    if planned < now or not in_window(planned, config.windows(), config.timezone):
        post.scheduled_at = next_free_slot(max(now, planned), config.windows(), config.timezone, _taken_slots(session, post),
                                           timedelta(minutes=config.min_minutes_between_posts))
    post.status = post_states.SCHEDULED  # checked by _transition above
    record_event(session, post.persona_id, "approve_post", "post", post.id, reviewer,
                 {"scheduled_at": post.scheduled_at.isoformat(), "planned_at": planned.isoformat()})
    session.flush()
    return post


class StaleEdit(ReviewError):
    """The post changed after the reviewer's page showed it (another reviewer, the publisher)."""

    status_code = 409


def unchanged_post(session: Session, post_id: int, seen_updated_at: str) -> models.Post:
    """The post, locked, when it is as the reviewer's page showed it (its `updated_at` then)."""
    post = _post(session, post_id)
    if post.updated_at.isoformat() != seen_updated_at:
        raise StaleEdit(f"post {post_id} changed after your page showed it (it is {post.status} now); nothing was saved")
    return post


def check_editable(post: models.Post) -> None:
    if post.status not in EDITABLE:
        raise ReviewError(f"post {post.id} is {post.status}; only a post not yet publishing can be edited")


def edit_post(session: Session, post_id: int, caption: str, hashtags: list[str], reviewer: str) -> models.Post:
    """Change a post's caption and hashtags, validated as the posting step validates them."""
    post = _post(session, post_id)
    check_editable(post)
    tags = []
    for raw in hashtags:
        match = _HASHTAG.match(raw.strip())
        if not match:
            raise ReviewError(f"hashtag {raw!r} is not a single word of letters, digits or _")
        tags.append("#" + match.group(1))
    tags = list(dict.fromkeys(tags))
    caption = caption.strip()
    if not caption:
        raise ReviewError("the caption is empty")
    problems = validate_post_text(caption, tags, _post_config(session, post).hashtags.max_per_post)
    if problems:
        raise ReviewError(f"post {post_id}: " + "; ".join(problems))
    before = {"caption": post.caption, "hashtags": list(post.hashtags)}
    post.caption, post.hashtags = caption, tags
    record_event(session, post.persona_id, "edit_post", "post", post.id, reviewer,
                 {"before": before, "after": {"caption": caption, "hashtags": tags}})
    session.flush()
    return post


def _give_up_post(session: Session, post_id: int, new_status: str, reviewer: str, reason: str, *,
                  kind: str, done: str) -> models.Post:
    """Reject (cancel) or abandon a post with the reviewer's reason; its image goes back to the
    library. The event of a post that had failed also records that failure."""
    post = _post(session, post_id)
    _transition(post, new_status)
    details: dict[str, Any] = {"reason": reason}
    if post.status == post_states.FAILED:
        details["failure_reason"] = post.failure_reason
    post.status = new_status  # checked by _transition above
    post.review_note = f"{done} by {reviewer}" + (f": {reason}" if reason else "")
    record_event(session, post.persona_id, kind, "post", post.id, reviewer, details)
    session.flush()
    return post


def reject_post(session: Session, post_id: int, reviewer: str, reason: str = "") -> models.Post:
    """Cancel a post; its image goes back to the library for another post."""
    return _give_up_post(session, post_id, post_states.CANCELLED, reviewer, reason, kind="reject_post", done="rejected")


def abandon_post(session: Session, post_id: int, reviewer: str, reason: str = "") -> models.Post:
    """Give up on a failed post; its image goes back to the library for another post."""
    return _give_up_post(session, post_id, post_states.ABANDONED, reviewer, reason, kind="abandon_post", done="abandoned")


def retry_post(session: Session, post_id: int, reviewer: str, now: datetime | None = None) -> models.Post:
    """Send a failed post again (a person's decision, e.g. after a spam block or a fixed token):
    it becomes `scheduled` at once, or at its slot if that is still ahead."""
    post = _post(session, post_id)
    _transition(post, post_states.SCHEDULED)
    now = now or datetime.now(timezone.utc)
    reason = post.failure_reason
    post.status, post.retryable, post.next_attempt_at = post_states.SCHEDULED, True, None
    post.review_note = f"retried by {reviewer} after: {reason}"
    record_event(session, post.persona_id, "retry_post", "post", post.id, reviewer,
                 {"failure_reason": reason, "retry_count": post.retry_count,
                  "due": max(post.scheduled_at, now).isoformat()})
    session.flush()
    return post


def move_post(session: Session, post_id: int, new_time: datetime, reviewer: str, now: datetime | None = None) -> models.Post:
    """Move a post to another slot: in the future, inside a posting window (persona's timezone),
    at least the persona's minimum gap from the account's other posts, and within the weekly cap.
    Every way a reviewer moves a post (the posts page, the calendar's drag and its edit form) comes here."""
    post = _post(session, post_id)
    if post.status not in EDITABLE:
        raise ReviewError(f"post {post_id} is {post.status}; only a post not yet publishing can be moved")
    if new_time.tzinfo is None:
        raise ReviewError(f"slot {new_time.isoformat()} has no timezone")
    new_time = new_time.astimezone(timezone.utc).replace(microsecond=0)
    now = now or datetime.now(timezone.utc)
    config = _post_config(session, post)
    zone = ZoneInfo(config.timezone)

    def local(moment: datetime) -> str:
        return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M")

    slot = f"slot {local(new_time)} ({config.timezone})"
    if new_time <= now:
        raise ReviewError(f"{slot} is in the past")
    if not in_window(new_time, config.windows(), config.timezone):
        raise ReviewError(f"{slot} is outside the posting windows {', '.join(config.posting_windows)}")
    gap = timedelta(minutes=config.min_minutes_between_posts)
    clash = [t for t in _taken_slots(session, post) if abs(t - new_time) < gap]
    if clash:
        raise ReviewError(f"{slot} is within {config.min_minutes_between_posts} minutes of another post of "
                          f"{config.account_name(post.account)} at {local(clash[0])}")
    over_cap = weekly_cap_refusal(_feed_times(session, post), new_time, config.strategy.weekly_cap)
    if over_cap:
        raise ReviewError(f"{slot}: {over_cap}")
    before = post.scheduled_at
    post.scheduled_at = new_time
    post.review_note = f"moved by {reviewer} from {before.isoformat()}"
    record_event(session, post.persona_id, "move_post", "post", post.id, reviewer,
                 {"from": before.isoformat(), "to": new_time.isoformat()})
    session.flush()
    return post
