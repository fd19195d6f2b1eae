"""The posts waiting for a reviewer, and what can be done to one: approve, edit, reject, move,
retry, abandon."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from persona_pipeline.db import models, review, review_items, review_posts, review_views
from persona_pipeline.domain import post_formats
from persona_pipeline.review.inputs import BadInput, form_text, format_time, local_zone, parse_local_slot, path_id, split_hashtags
from persona_pipeline.review.media import media_url
from persona_pipeline.review.web import flash, home_of, in_db, page, render


def _posts(session: Session, slug: str | None, home: Path) -> list[dict[str, Any]]:
    result = []
    personas: dict[int, models.Persona] = {}
    for post in review_views.posts_to_review(session, slug):
        persona = personas.get(post.persona_id) or session.get(models.Persona, post.persona_id)
        personas[post.persona_id] = persona
        zone = local_zone(persona.timezone)
        result.append({
            "id": post.id, "persona_slug": persona.slug, "timezone": persona.timezone, "status": post.status,
            "caption": post.caption, "hashtags": list(post.hashtags or []), "account": post.account,
            "url": media_url(home, post.media_path) or (media_url(home, post.candidate.image_path) if post.candidate else None),
            "slot_local": format_time(post.scheduled_at, zone), "slot_utc": format_time(post.scheduled_at),
            "slot_input": post.scheduled_at.astimezone(zone).strftime("%Y-%m-%dT%H:%M"),
            "candidate_id": post.candidate_id,
            "failure_reason": post.failure_reason, "retry_count": post.retry_count, "retryable": post.retryable,
            **_format_view(session, post, home),
        })
    return result


def _versioned(home: Path, path: str | None, sha: str | None) -> str | None:
    """The file's /media URL with its content hash, so a remade item never shows from the browser's cache."""
    url = media_url(home, path)
    return f"{url}?v={sha[:12]}" if url and sha else url


def _format_view(session: Session, post: models.Post, home: Path) -> dict[str, Any]:
    """What the page shows of a post's format: a carousel's items (they swipe), a reel's video (it
    plays), a story's safe bands; and the candidates an item may be replaced with."""
    view: dict[str, Any] = {"format": post.format or "feed", "items": [], "video_url": None, "options": []}
    if post.format in (None, post_formats.FEED):
        return view
    options = post.format_options or {}
    view["items"] = [{"position": i.position, "candidate_id": i.candidate_id,
                      "url": _versioned(home, i.media_path or i.source_path, i.media_sha256) or media_url(home, i.source_path)}
                     for i in review_items.items_of(session, post.id)]
    if options.get("video_path"):
        view["video_url"] = media_url(home, options["video_path"])
        view["url"] = _versioned(home, post.media_path, post.media_sha256)
    elif post.format == post_formats.CAROUSEL:
        view["url"] = None  # the strip shows every item
    if post.format == post_formats.STORY and not options.get("video"):
        view["safe"] = True  # review.css draws the bands (STORY_SAFE_TOP/BOTTOM of the 1920 px frame)
        view["url"] = _versioned(home, post.media_path, post.media_sha256)
    view["options"] = [{"id": c.id, "url": media_url(home, c.image_path)}
                       for c in review_items.replacement_options(session, post)[:12]]
    return view


async def _render_posts(request: Request, slug: str | None, *, errors: dict[int, dict[str, str]] | None = None,
                        status: int = 200) -> Response:
    posts = await in_db(request, _posts, slug, home_of(request))
    for post in posts:  # after a refused change, show what the reviewer typed, not the stored text
        post["form"] = (errors or {}).get(post["id"], {})
    shown = {p["id"] for p in posts}
    # A refused change to a post the list no longer shows (e.g. already abandoned) is said at the top.
    page_errors = [f"Post {post_id}: {typed['error']}" for post_id, typed in (errors or {}).items()
                   if post_id not in shown and typed.get("error")]
    return render(request, "posts.html", {"posts": posts, "persona": slug, "title": "Posts to approve",
                                          "page_errors": page_errors}, status)


def _positions(text: str) -> list[int]:
    """"3, 1, 2" -> [3, 1, 2]; anything else is a BadInput naming the value."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise BadInput(f"{text!r} is not a list of numbers (e.g. 2, 1, 3)")
    return [int(p) for p in parts]


def slug_param(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise HTTPException(404, f"persona {value[:64]!r} does not exist")
    return value


@page
async def posts_page(request: Request, reviewer: str) -> Response:
    return await _render_posts(request, slug_param(request.query_params.get("persona")))


def _posts_back(slug: str | None) -> str:
    return "/posts" + (f"?persona={quote(slug)}" if slug else "")


def post_timezone(session: Session, post_id: int) -> str:
    post = session.get(models.Post, post_id)
    if post is None:
        raise review.NotFound(f"post {post_id} does not exist")
    return session.get(models.Persona, post.persona_id).timezone


@page
async def post_action(request: Request, reviewer: str, form: FormData) -> Response:
    """approve | edit | reject | move | retry | abandon | reorder | replace one post (the action is the
    last path segment)."""
    post_id = path_id(request, "post_id")
    action = request.path_params["action"]
    slug = slug_param(form_text(form, "persona", 64) or None)
    typed: dict[str, str] = {"action": action}
    try:
        if action == "approve":
            await in_db(request, review_posts.approve_post, post_id, reviewer)
            message = f"Post {post_id} approved and scheduled."
        elif action == "edit":
            typed.update(caption=form_text(form, "caption", 10_000), hashtags=form_text(form, "hashtags", 5000))
            await in_db(request, review_posts.edit_post, post_id, typed["caption"], split_hashtags(typed["hashtags"]), reviewer)
            message = f"Post {post_id} edited."
        elif action == "reject":
            typed.update(reason=form_text(form, "reason", 500))
            await in_db(request, lambda s: review_posts.reject_post(s, post_id, reviewer, reason=typed["reason"]))
            message = f"Post {post_id} rejected."
        elif action == "move":
            typed.update(new_time=form_text(form, "new_time", 40))
            tz_name = await in_db(request, post_timezone, post_id)
            new_time = parse_local_slot(typed["new_time"], tz_name)
            await in_db(request, review_posts.move_post, post_id, new_time, reviewer)
            message = f"Post {post_id} moved to {typed['new_time'].replace('T', ' ')} ({tz_name})."
        elif action == "retry":
            await in_db(request, review_posts.retry_post, post_id, reviewer)
            message = f"Post {post_id} will be published again."
        elif action == "reorder":
            typed.update(order=form_text(form, "order", 100))
            order = _positions(typed["order"])
            await in_db(request, review_items.reorder_items, post_id, order, reviewer, home_of(request))
            message = f"Post {post_id}: items in the order {', '.join(map(str, order))}; its media was made again."
        elif action == "replace":
            typed.update(position=form_text(form, "position", 4), candidate=form_text(form, "candidate", 12))
            position, candidate = _positions(typed["position"])[0], _positions(typed["candidate"])[0]
            await in_db(request, review_items.replace_item, post_id, position, candidate, reviewer, home_of(request))
            message = f"Post {post_id}: item {position} is now candidate {candidate}; its media was made again."
        elif action == "abandon":
            typed.update(reason=form_text(form, "reason", 500))
            await in_db(request, lambda s: review_posts.abandon_post(s, post_id, reviewer, reason=typed["reason"]))
            message = f"Post {post_id} abandoned; its image is back in the library."
        else:
            raise HTTPException(404, f"unknown post action {action!r}")
    except (review.ReviewError, BadInput) as exc:
        status = getattr(exc, "status_code", 400)
        if status == 404:
            raise
        typed["error"] = getattr(exc, "detail", None) or str(exc)
        return await _render_posts(request, slug, errors={post_id: typed}, status=status)
    flash(request, message)
    return RedirectResponse(_posts_back(slug), status_code=303)
