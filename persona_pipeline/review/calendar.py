"""The post calendar: a week or month grid of posts waiting for approval, scheduled, publishing and
published, of one persona or all; a post's page with an Instagram-like preview and its edit form;
and the move a drag sends. Every change goes through db/review_posts.py (edit_post, move_post), so
the posting windows, the minimum gap and the weekly cap are checked there, once, and each change
is a ReviewEvent; this module only reads and shows."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from PIL import Image
from sqlalchemy import Row, select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from persona_pipeline.db import models, review, review_posts, review_views
from persona_pipeline.db.publishing import post_text
from persona_pipeline.domain import calendar as cal
from persona_pipeline.domain.media import fit_aspect
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.review.inputs import BadInput, form_text, local_zone, parse_local_slot, path_id, split_hashtags
from persona_pipeline.review.media import media_url, thumbnail_sprite
from persona_pipeline.review.posts import post_timezone, slug_param
from persona_pipeline.review.web import api, flash, home_of, in_db, page, render


def _today() -> date:
    return datetime.now(timezone.utc).date()


def _view_args(query: Any) -> tuple[str, date, str | None]:
    """(view, anchor day, persona slug) from the query string or a form; bad values are a 400
    naming the field and the value."""
    try:
        view = cal.parse_view(query.get("view"))
        anchor = cal.parse_day(query.get("date"), _today(), month_ok=view == "month")
    except cal.CalendarInputError as exc:
        raise BadInput(str(exc)) from None
    return view, anchor, slug_param(query.get("persona"))


def calendar_url(view: str, day: date, slug: str | None) -> str:
    params = {"view": view, "date": day.isoformat()}
    if slug:
        params["persona"] = slug
    return "/calendar?" + urlencode(params)


class _Personas:
    """Each persona's row and settings, read once per request."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.rows: dict[int, tuple[models.Persona, PersonaConfig]] = {}

    def __call__(self, persona_id: int) -> tuple[models.Persona, PersonaConfig]:
        if persona_id not in self.rows:
            persona = self.session.get(models.Persona, persona_id)
            self.rows[persona_id] = persona, PersonaConfig.model_validate(persona.settings)
        return self.rows[persona_id]


def _card(post: Row | models.Post, persona: models.Persona, config: PersonaConfig) -> dict[str, Any]:
    """A calendar card (from a `review_views.calendar_posts` row, or the post itself); its "thumb"
    (a tile of the page's sprite, or an image URL) is set by `_grid`."""
    zone = local_zone(persona.timezone)
    local = (post.published_at or post.scheduled_at).astimezone(zone)
    return {"id": post.id, "status": post.status, "persona_slug": persona.slug, "persona_name": persona.name,
            "account": config.account_name(post.account), "day": local.date(), "time": local.strftime("%H:%M"),
            "zone": local.tzname(), "thumb": None, "caption": post.caption,
            "movable": post.status in review_posts.EDITABLE}


def _grid(session: Session, view: str, anchor: date, slug: str | None, home: Path) -> dict[str, Any]:
    span = cal.calendar_range(view, anchor)
    # A day a day wider on each side in UTC: each post is then placed on its persona's local day.
    start = datetime.combine(span.first - timedelta(days=1), time.min, timezone.utc)
    end = datetime.combine(span.last + timedelta(days=2), time.min, timezone.utc)
    personas = _Personas(session)
    by_day: dict[date, list[dict[str, Any]]] = {}
    images: list[str | None] = []
    shown: list[dict[str, Any]] = []
    for post in review_views.calendar_posts(session, cal.STATUSES, start, end, slug):
        card = _card(post, *personas(post.persona_id))
        if span.first <= card["day"] <= span.last:
            by_day.setdefault(card["day"], []).append(card)
            images.append(post.media_path or post.candidate_image)
            shown.append(card)
    # One sprite of the thumbnails for the page: each card shows its tile (calendar.js places it).
    sprite, thumbs = thumbnail_sprite(home, images)
    for card, thumb in zip(shown, thumbs):
        card["thumb" if not isinstance(thumb, int) else "tile"] = thumb
    weeks = [[{"date": day, "posts": by_day.get(day, []), "outside": not span.in_view(day)} for day in week]
             for week in span.weeks]
    choices = [(p.slug, p.name) for p in session.scalars(select(models.Persona).where(models.Persona.active.is_(True))
                                                           .order_by(models.Persona.slug))]
    return {"span": span, "weeks": weeks, "count": len(shown), "personas": choices, "sprite": sprite}


@page
async def calendar_page(request: Request, reviewer: str) -> Response:
    view, anchor, slug = _view_args(request.query_params)
    grid = await in_db(request, _grid, view, anchor, slug, home_of(request))
    span = grid["span"]
    links = {"previous": calendar_url(view, span.previous, slug), "next": calendar_url(view, span.next, slug),
             "today": calendar_url(view, _today(), slug),
             "other": calendar_url("week" if view == "month" else "month", span.first if view == "week" else anchor, slug)}
    return render(request, "calendar.html", {**grid, "view": view, "persona": slug, "links": links, "today": _today(),
                                             "title": f"Calendar · {span.title}"})


def _frame_aspect(path: str | None) -> str:
    """The width/height of what the post publishes: the export's padded aspect (domain/media.py)
    of its image, so a preview shows the same frame even before the export exists."""
    try:
        with Image.open(path) as image:
            width, height = fit_aspect(*image.size)
    except (OSError, ValueError, TypeError):
        return "4 / 5"
    return f"{width} / {height}"


def _post_view(session: Session, post_id: int, home: Path) -> dict[str, Any]:
    post = session.get(models.Post, post_id)
    if post is None:
        raise review.NotFound(f"post {post_id} does not exist")
    persona, config = _Personas(session)(post.persona_id)
    image = post.media_path or (post.candidate.image_path if post.candidate else None)
    card = _card(post, persona, config)
    shown, more = cal.caption_cut(post_text(post.caption, list(post.hashtags or [])))
    zone = local_zone(persona.timezone)
    return {**card, "hashtags": list(post.hashtags or []), "url": media_url(home, image), "aspect": _frame_aspect(image),
            "shown": shown, "more": more, "permalink": post.permalink, "timezone": persona.timezone,
            "slot_input": post.scheduled_at.astimezone(zone).strftime("%Y-%m-%dT%H:%M"),
            "published_at": post.published_at.astimezone(zone).strftime("%Y-%m-%d %H:%M") if post.published_at else None,
            "stamp": post.updated_at.isoformat()}


async def _render_post(request: Request, post_id: int, view: str, slug: str | None, *, typed: dict[str, str] | None = None,
                       error: str | None = None, status: int = 200) -> Response:
    post = await in_db(request, _post_view, post_id, home_of(request))
    return render(request, "calendar_post.html", {
        "p": post, "typed": typed or {}, "form_error": error, "view": view, "persona": slug,
        "back": calendar_url(view, post["day"], slug), "title": f"Post {post_id}"}, status)


@page
async def calendar_post_page(request: Request, reviewer: str) -> Response:
    view, _, slug = _view_args(request.query_params)
    return await _render_post(request, path_id(request, "post_id"), view, slug)


def _save(session: Session, post_id: int, stamp: str, caption: str, hashtags: str, new_time: datetime, reviewer: str) -> list[str]:
    """The edit form's changes in one transaction: nothing is saved unless all of it is."""
    post = review_posts.unchanged_post(session, post_id, stamp)
    changed = []
    if caption.strip() != post.caption or split_hashtags(hashtags) != list(post.hashtags or []):
        review_posts.edit_post(session, post_id, caption, split_hashtags(hashtags), reviewer)
        changed.append("caption and hashtags")
    if new_time.astimezone(timezone.utc) != post.scheduled_at:
        review_posts.move_post(session, post_id, new_time, reviewer)
        changed.append("time")
    if not changed:
        review_posts.check_editable(post)
    return changed


@page
async def calendar_post_edit(request: Request, reviewer: str, form: FormData) -> Response:
    """Save a post's caption, hashtags and time; a refusal shows the form again with what was typed."""
    post_id = path_id(request, "post_id")
    view, _, slug = _view_args(form)
    typed = {name: form_text(form, name, limit) for name, limit in (("caption", 10_000), ("hashtags", 5000), ("new_time", 40))}
    try:
        zone_name = await in_db(request, post_timezone, post_id)
        new_time = parse_local_slot(typed["new_time"], zone_name)
        changed = await in_db(request, _save, post_id, form_text(form, "stamp", 64), typed["caption"], typed["hashtags"],
                              new_time, reviewer)
    except (review.ReviewError, BadInput) as exc:
        status = getattr(exc, "status_code", 400)
        if status != 400:
            raise
        return await _render_post(request, post_id, view, slug, typed=typed, error=getattr(exc, "detail", None) or str(exc),
                                  status=400)
    flash(request, f"Post {post_id}: {' and '.join(changed)} saved." if changed else f"Post {post_id}: nothing changed.")
    return RedirectResponse(f"/calendar/posts/{post_id}?" + urlencode({"view": view, **({"persona": slug} if slug else {})}),
                            status_code=303)


def _drop(session: Session, post_id: int, day: date, reviewer: str) -> tuple[str, str]:
    """Move the post to its wall time on `day` (persona's timezone); (that time, the timezone)."""
    zone_name = post_timezone(session, post_id)
    post = session.get(models.Post, post_id)
    local = cal.same_time_on(post.scheduled_at.astimezone(local_zone(zone_name)), day)
    review_posts.move_post(session, post_id, parse_local_slot(local, zone_name), reviewer)
    return local, zone_name


@api
async def api_move(request: Request, reviewer: str, body: dict) -> Response:
    """A post dropped on another day: the same local time that day, if move_post allows it."""
    post_id = path_id(request, "post_id")
    raw = body.get("day")
    if not isinstance(raw, str) or not raw:
        raise BadInput("day is missing: send the day the post was dropped on, like 2026-03-09")
    try:
        day = cal.parse_day(raw, _today(), field="day")
    except cal.CalendarInputError as exc:
        raise BadInput(str(exc)) from None
    local, zone_name = await in_db(request, _drop, post_id, day, reviewer)
    message = f"Post {post_id} moved to {local.replace('T', ' ')} ({zone_name})."
    flash(request, message)
    return JSONResponse({"post": post_id, "moved_to": local, "timezone": zone_name, "message": message})
