"""The review form: Starlette + Jinja2, served by uvicorn (`persona-pipeline review`).

Every decision goes through `persona_pipeline.db.review` with the logged-in reviewer's name, so
each one is a `ReviewEvent`; the pages only read (db/review_views.py plus the audit query below).
Endpoints are async only to read the request body; database work runs in Starlette's threadpool,
one `session_scope` per request, and hands plain dicts to the templates (no lazy loads after the
session closes).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from persona_pipeline.db import models, review, review_views
from persona_pipeline.db.session import session_scope
from persona_pipeline.objectstore import ObjectStoreError
from persona_pipeline.review import auth

HERE = Path(__file__).parent
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
MAX_ID = 2**31 - 1  # ids above this are not ours (and would overflow PostgreSQL's integer)
MAX_EXCLUDE = 50
AUDIT_LIMIT = 200


@dataclass
class ReviewConfig:
    """What the review form needs; `persona-pipeline review` builds it from settings."""

    database_url: str
    home: Path  # PERSONA_HOME: images are served only from inside it
    tokens: dict[str, str] = field(default_factory=dict)  # reviewer token -> reviewer name
    secret_key: str = ""
    max_body_bytes: int = 1_000_000
    exploration: float = 0.1
    https_only: bool = False
    # An s3:// PERSONA_HOME: `home` is the local cache and this ArtifactMirror fetches an image the
    # cache lacks (persona_pipeline.objectstore). None: `home` holds everything.
    mirror: Any = None
    # Failed logins allowed per client address per window before logins from it answer 429.
    login_max_failures: int = 10
    login_window_s: float = 60.0


# --------------------------------------------------------------------------- ASGI middleware


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes the limit."""


def _is_api(scope: Scope) -> bool:
    return str(scope.get("path", "")).startswith("/api/")


async def _plain_error(scope: Scope, send: Send, status: int, message: str) -> None:
    if _is_api(scope):
        body, ctype = json.dumps({"error": message}).encode(), b"application/json"
    else:
        body, ctype = message.encode(), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, else while it streams in,
    so nothing ever parses (or buffers) more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body is over the limit of {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _plain_error(scope, send, 400, f"Content-Length {value.decode('latin-1')!r} is not a number")
                    return
                if length > self.max_bytes:
                    await _plain_error(scope, send, 413, too_large)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:  # too late to change the status; the connection just ends
                raise
            await _plain_error(scope, send, 413, too_large)


SECURITY_HEADERS = [
    # Only our own files: no inline script, no framing, forms post only here.
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                 b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, add_headers)


# --------------------------------------------------------------------------- helpers


class BadInput(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(400, detail)


def _config(request: Request) -> ReviewConfig:
    return request.app.state.config


def _home(request: Request) -> Path:
    return request.app.state.home


def _path_id(request: Request, name: str) -> int:
    """A positive id from the path (the `int` converter already refused non-digits)."""
    value = request.path_params[name]
    if not 1 <= value <= MAX_ID:
        raise HTTPException(404, f"{name.replace('_id', '')} {value} does not exist")
    return value


def _int_value(raw: Any, name: str, *, optional: bool = False) -> int | None:
    """A positive id or count from a form or JSON body, else 400 naming the field."""
    if raw is None or raw == "":
        if optional:
            return None
        raise BadInput(f"{name} is missing")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise BadInput(f"{name} must be a positive integer, got {raw!r}")
    if isinstance(raw, str):
        if not raw.strip().isdigit():
            raise BadInput(f"{name} must be a positive integer, got {raw[:40]!r}")
        raw = int(raw.strip())
    if not 1 <= raw <= MAX_ID:
        raise BadInput(f"{name} must be a positive integer, got {raw}")
    return raw


def _form_text(form: FormData, name: str, max_len: int = 5000) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise BadInput(f"{name} must be text")
    if len(value) > max_len:
        raise BadInput(f"{name} is {len(value)} characters; at most {max_len}")
    return value


def media_url(home: Path, image_path: str | None) -> str | None:
    """The /media URL of a file under `home`, or None when it is elsewhere."""
    if not image_path:
        return None
    path = Path(image_path)
    if not path.is_absolute():
        path = home / path
    try:
        relative = path.relative_to(home)
    except ValueError:
        try:
            relative = path.resolve().relative_to(home)
        except (ValueError, OSError):
            return None
    return "/media/" + quote(relative.as_posix())


def media_name_ok(raw: str) -> bool:
    """No `..`, `.` or empty segment, no absolute or drive path, no backslash or NUL, an image suffix."""
    if not raw or "\x00" in raw or "\\" in raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        return False
    if any(part in ("", ".", "..") for part in raw.split("/")):
        return False
    return Path(raw).suffix.lower() in IMAGE_SUFFIXES


def _lands_inside(home: Path, raw: str) -> bool:
    """Whether home/raw, symlinks followed as far as they exist, stays inside `home`."""
    try:
        return (home / raw).resolve().is_relative_to(home)
    except (OSError, RuntimeError):
        return False


def resolve_media(home: Path, raw: str) -> Path | None:
    """The image file `raw` names relative to `home` (already resolved), or None: no `..`, `.` or
    empty segment, no absolute or drive path, no backslash or NUL, an image suffix, and the real
    path (symlinks followed) inside home."""
    if not media_name_ok(raw):
        return None
    try:
        target = (home / raw).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(home) or not target.is_file() or target.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return target


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _fmt(dt: datetime | None, zone: ZoneInfo | None = None) -> str:
    if dt is None:
        return ""
    return dt.astimezone(zone or timezone.utc).strftime("%Y-%m-%d %H:%M")


def parse_local_slot(value: str, tz_name: str) -> datetime:
    """A datetime-local value ("2025-06-01T14:30") read in the persona's timezone, as an aware
    datetime. A wall time that does not exist there (the spring DST gap) is refused."""
    try:
        naive = datetime.strptime(value.strip()[:16], "%Y-%m-%dT%H:%M")
    except ValueError:
        raise BadInput(f"new_time {value[:40]!r} is not a date and time like 2025-06-01T14:30") from None
    zone = _zone(tz_name)
    aware = naive.replace(tzinfo=zone)
    if aware.astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None) != naive:
        raise BadInput(f"new_time {value[:16]} does not exist in {tz_name} (clocks jump over it)")
    return aware


def split_hashtags(raw: str) -> list[str]:
    """Hashtags typed as words separated by spaces or commas; `#` is optional."""
    return [t for t in re.split(r"[\s,]+", raw) if t]


# --------------------------------------------------------------------------- rendering

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every {{ }} is HTML-escaped: captions, reasons, names
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(request: Request, name: str, context: dict[str, Any] | None = None, status: int = 200) -> HTMLResponse:
    values = {"reviewer": auth.current_reviewer(request, _config(request).tokens), "csrf": auth.csrf_token(request),
              "flash": request.session.pop("flash", None), "title": "", "error": None}
    values.update(context or {})
    return HTMLResponse(_templates.get_template(name).render(values), status_code=status,
                        headers={"Cache-Control": "no-store"})


def _flash(request: Request, message: str) -> None:
    request.session["flash"] = message[:300]


async def in_db(request: Request, work: Callable[..., Any], *args: Any) -> Any:
    """Run `work(session, *args)` in the threadpool inside one transaction."""
    url = _config(request).database_url

    def run() -> Any:
        with session_scope(url) as session:
            return work(session, *args)

    return await run_in_threadpool(run)


Handler = Callable[..., Awaitable[Response]]


def page(handler: Handler) -> Handler:
    """An HTML page or form action: logged in (else 303 to /login); a POST also needs the form's
    CSRF token (else 403) and gets the parsed form."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        reviewer = auth.current_reviewer(request, _config(request).tokens)
        if reviewer is None:
            if request.method == "GET":
                return RedirectResponse("/login?next=" + quote(request.url.path), status_code=303)
            raise HTTPException(401, "log in first")
        if request.method == "POST":
            form = await request.form(max_files=0, max_fields=50)
            if not auth.csrf_ok(request, form.get(auth.CSRF_FIELD) or request.headers.get(auth.CSRF_HEADER)):
                raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")
            return await handler(request, reviewer, form)
        return await handler(request, reviewer)

    return wrapper


def api(handler: Handler) -> Handler:
    """A JSON endpoint: logged in (else 401); a POST needs the X-CSRF-Token header (else 403) and
    gets its JSON object body."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        reviewer = auth.current_reviewer(request, _config(request).tokens)
        if reviewer is None:
            raise HTTPException(401, "log in first")
        if request.method == "POST":
            if not auth.csrf_ok(request, request.headers.get(auth.CSRF_HEADER)):
                raise HTTPException(403, "missing or wrong X-CSRF-Token header")
            raw = await request.body()
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                raise BadInput("the body is not JSON") from None
            if not isinstance(body, dict):
                raise BadInput("the body must be a JSON object")
            return await handler(request, reviewer, body)
        return await handler(request, reviewer)

    return wrapper


async def http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or str(exc)
    if request.url.path.startswith("/api/") or request.url.path.startswith("/media/"):
        if request.url.path.startswith("/media/"):
            return Response(detail, status_code=status, media_type="text/plain")
        return JSONResponse({"error": detail}, status_code=status)
    if status == 401 and request.method == "GET":
        return RedirectResponse("/login", status_code=303)
    headers = getattr(exc, "headers", None)
    response = render(request, "error.html", {"status": status, "message": detail, "title": f"Error {status}"}, status)
    if headers:
        response.headers.update(headers)
    return response


async def review_error(request: Request, exc: Exception) -> Response:
    """db/review.py's refusals: ReviewError 400, NotYourOffer 403, NotFound 404, DuplicateVote and
    OfferClosed 409."""
    return await http_error(request, HTTPException(getattr(exc, "status_code", 400), str(exc)))


# --------------------------------------------------------------------------- login


async def login_form(request: Request) -> Response:
    if auth.current_reviewer(request, _config(request).tokens):
        return RedirectResponse("/", status_code=303)
    return render(request, "login.html", {"next": auth.safe_next(request.query_params.get("next")), "title": "Log in"})


async def login(request: Request) -> Response:
    form = await request.form(max_files=0, max_fields=10)
    if not auth.csrf_ok(request, form.get(auth.CSRF_FIELD)):
        raise HTTPException(403, "missing or wrong CSRF token; reload the login page and try again")
    throttle: auth.LoginThrottle = request.app.state.login_throttle
    address = request.client.host if request.client else "unknown"
    target = auth.safe_next(form.get("next") if isinstance(form.get("next"), str) else None)
    wait = throttle.retry_after(address)
    if wait is not None:  # checked before the token, so a guess made now tells nothing
        response = render(request, "login.html", {"next": target, "title": "Log in",
                                                  "error": f"Too many failed logins from your address; try again in {wait} s."},
                          status=429)
        response.headers["Retry-After"] = str(wait)
        return response
    token = form.get("token", "")
    name = auth.reviewer_for_token(_config(request).tokens, token if isinstance(token, str) else "")
    if name is None:
        throttle.failed(address)
        return render(request, "login.html", {"next": target, "title": "Log in",
                                              "error": "That reviewer token is not valid."}, status=401)
    throttle.succeeded(address)
    auth.log_in(request, name)
    return RedirectResponse(target, status_code=303)


@page
async def logout(request: Request, reviewer: str, form: FormData) -> Response:
    auth.log_out(request)
    return RedirectResponse("/login", status_code=303)


# --------------------------------------------------------------------------- queue


def _queue(session: Session) -> list[dict[str, Any]]:
    result = []
    for queue in review_views.review_queue(session):
        final_steps = {}
        for run_id in queue.runs_to_pick:
            final_steps[run_id] = session.scalar(select(models.RunStep.id).where(models.RunStep.run_id == run_id)
                                                 .order_by(models.RunStep.position.desc()).limit(1))
        result.append({"slug": queue.slug, "name": queue.name, "pairs_to_vote": queue.pairs_to_vote,
                       "steps_to_vote": list(queue.steps_to_vote), "steps_to_approve": list(queue.steps_to_approve),
                       "runs_to_pick": [(run_id, final_steps[run_id]) for run_id in queue.runs_to_pick],
                       "posts_to_approve": queue.posts_to_approve, "total": queue.total})
    return result


@page
async def queue_page(request: Request, reviewer: str) -> Response:
    queues = await in_db(request, _queue)
    return render(request, "queue.html", {"queues": queues, "title": "Review queue"})


# --------------------------------------------------------------------------- voting


def _step_header(session: Session, step_id: int) -> dict[str, Any]:
    step = session.get(models.RunStep, step_id)
    if step is None:
        raise review.NotFound(f"run step {step_id} does not exist")
    persona = session.get(models.Persona, step.run.persona_id)
    return {"id": step.id, "name": step.name, "position": step.position, "status": step.status,
            "run_id": step.run_id, "steps": len(step.run.steps), "prompt": step.run.prompt,
            "persona_slug": persona.slug, "persona_name": persona.name}


@page
async def vote_page(request: Request, reviewer: str) -> Response:
    step = await in_db(request, _step_header, _path_id(request, "step_id"))
    return render(request, "vote.html", {"step": step, "title": f"Vote · {step['persona_slug']} run {step['run_id']}"})


def _candidate_json(home: Path, candidate: models.Candidate) -> dict[str, Any]:
    return {"id": candidate.id, "url": media_url(home, candidate.image_path)}


def _next_pair(session: Session, step_id: int, reviewer: str, exclude: list[int], home: Path,
               exploration: float, shown: bool) -> dict[str, Any]:
    offer = review.next_pair(session, step_id, reviewer, exclude_offer_ids=exclude, exploration=exploration, shown=shown)
    remaining = review_views.unvoted_pairs(session, step_id)
    if offer is None:
        return {"offer_id": None, "remaining": remaining}
    left, right = session.get(models.Candidate, offer.left_id), session.get(models.Candidate, offer.right_id)
    return {"offer_id": offer.id, "step_id": step_id, "left": _candidate_json(home, left),
            "right": _candidate_json(home, right), "probability": offer.probability, "strategy": offer.strategy,
            "remaining": remaining}


@api
async def api_pair(request: Request, reviewer: str) -> Response:
    step_id = _path_id(request, "step_id")
    raw = request.query_params.get("exclude", "")
    parts = [p for p in raw.split(",") if p.strip()]
    if len(parts) > MAX_EXCLUDE:
        raise BadInput(f"exclude lists {len(parts)} offers; at most {MAX_EXCLUDE}")
    exclude = [_int_value(p, "exclude") for p in parts]
    # ?preload=1: the page's next pair, held off screen; it can be answered after POST .../shown.
    preload = request.query_params.get("preload", "0")
    if preload not in ("0", "1"):
        raise BadInput(f"preload must be 0 or 1, got {preload[:40]!r}")
    data = await in_db(request, _next_pair, step_id, reviewer, exclude, _home(request), _config(request).exploration,
                       preload == "0")
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


def _shown(session: Session, offer_id: int, reviewer: str) -> dict[str, Any]:
    offer = review.show_offer(session, offer_id, reviewer)
    return {"offer_id": offer.id, "shown_at": offer.shown_at.isoformat()}


@api
async def api_shown(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    return JSONResponse(await in_db(request, _shown, _path_id(request, "offer_id"), reviewer))


def _vote(session: Session, offer_id: int, winner_id: int, loser_id: int, reviewer: str) -> dict[str, Any]:
    vote = review.cast_vote(session, winner_id, loser_id, reviewer, offer_id=offer_id)
    return {"vote_id": vote.id, "offer_id": offer_id, "winner_id": vote.winner_id, "loser_id": vote.loser_id,
            "selection_probability": vote.selection_probability, "elo_delta": vote.elo_delta}


@api
async def api_vote(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    offer_id = _int_value(body.get("offer_id"), "offer_id")
    winner_id = _int_value(body.get("winner_id"), "winner_id")
    loser_id = _int_value(body.get("loser_id"), "loser_id")
    data = await in_db(request, _vote, offer_id, winner_id, loser_id, reviewer)
    return JSONResponse(data, status_code=201)


def _skip(session: Session, offer_id: int, reviewer: str) -> dict[str, Any]:
    offer = review.skip_offer(session, offer_id, reviewer)
    return {"offer_id": offer.id, "outcome": offer.outcome}


@api
async def api_skip(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    return JSONResponse(await in_db(request, _skip, _path_id(request, "offer_id"), reviewer))


def _kill(session: Session, candidate_id: int, reviewer: str, reason: str, offer_id: int | None) -> dict[str, Any]:
    candidate = review.kill_candidate(session, candidate_id, reviewer, reason=reason, offer_id=offer_id)
    return {"candidate_id": candidate.id, "status": candidate.status}


@api
async def api_kill(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    offer_id = _int_value(body.get("offer_id"), "offer_id", optional=True)
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        raise BadInput("reason must be text of at most 500 characters")
    data = await in_db(request, _kill, _path_id(request, "candidate_id"), reviewer, reason, offer_id)
    return JSONResponse(data)


# --------------------------------------------------------------------------- gallery


def _gallery(session: Session, step_id: int, home: Path, top_k: int | None) -> dict[str, Any]:
    header = _step_header(session, step_id)
    view = review_views.step_view(session, step_id)
    k = top_k if top_k is not None else view.k_default
    rows = []
    lows = [r.ci_low for r in view.ranking] or [0.0]
    highs = [r.ci_high for r in view.ranking] or [1.0]
    lo, hi = min(lows), max(highs)
    span = (hi - lo) or 1.0
    for place, r in enumerate(view.ranking, start=1):
        rows.append({"place": place, "id": r.candidate_id, "score": r.score, "ci_low": r.ci_low, "ci_high": r.ci_high,
                     "elo": r.elo, "wins": r.wins, "losses": r.losses, "votes": r.votes, "status": r.status,
                     "url": media_url(home, r.image_path), "low_votes": r.votes < review.LOW_VOTES,
                     # the CI as a bar across the ranking's whole range
                     "bar_left": round(100 * (r.ci_low - lo) / span, 1),
                     "bar_width": max(round(100 * (r.ci_high - r.ci_low) / span, 1), 1.0),
                     "bar_mark": round(100 * (r.score - lo) / span, 1)})
    return {"step": header, "rows": rows, "k": k, "k_default": view.k_default, "warning": view.low_vote_warning(k),
            "can_approve": view.can_approve, "can_pick": view.can_pick, "is_final": view.is_final_step,
            "unvoted_pairs": view.unvoted_pairs, "winner_id": view.run.winner_candidate_id,
            "can_kill": view.step.status in review.OPEN_STEP, "low_votes": review.LOW_VOTES}


async def _render_gallery(request: Request, step_id: int, *, error: str | None = None, status: int = 200,
                          top_k: int | None = None) -> Response:
    data = await in_db(request, _gallery, step_id, _home(request), top_k)
    data.update(error=error, title=f"Step {data['step']['position']} · {data['step']['persona_slug']} run {data['step']['run_id']}")
    return render(request, "gallery.html", data, status)


@page
async def gallery_page(request: Request, reviewer: str) -> Response:
    return await _render_gallery(request, _path_id(request, "step_id"))


async def _decide_on_gallery(request: Request, back: int | None, decide: Callable[..., int], *args: Any,
                             done: str, top_k: int | None = None) -> Response:
    """Run one gallery decision (`decide` returns the step to show next). A refusal shows the
    gallery `back` again with the error and status; an unknown subject, or no gallery to go back
    to, gets the error page."""
    try:
        step_id = await in_db(request, decide, *args)
    except review.ReviewError as exc:
        if exc.status_code == 404 or back is None:
            raise
        return await _render_gallery(request, back, error=str(exc), status=exc.status_code, top_k=top_k)
    _flash(request, done)
    return RedirectResponse(f"/steps/{step_id}", status_code=303)


def _approve_step(session: Session, step_id: int, top_k: int, reviewer: str) -> int:
    return review.approve_step(session, step_id, top_k, reviewer).id


@page
async def approve_step(request: Request, reviewer: str, form: FormData) -> Response:
    step_id = _path_id(request, "step_id")
    top_k = _int_value(form.get("top_k"), "top_k")
    return await _decide_on_gallery(request, step_id, _approve_step, step_id, top_k, reviewer,
                                    done=f"Step {step_id} approved with K={top_k}.", top_k=top_k)


def _pick(session: Session, run_id: int, candidate_id: int, reviewer: str) -> int:
    review.pick_winner(session, run_id, candidate_id, reviewer)
    return session.get(models.Candidate, candidate_id).step_id


@page
async def pick_winner(request: Request, reviewer: str, form: FormData) -> Response:
    run_id = _path_id(request, "run_id")
    candidate_id = _int_value(form.get("candidate_id"), "candidate_id")
    back = _int_value(form.get("step_id"), "step_id", optional=True)
    return await _decide_on_gallery(request, back, _pick, run_id, candidate_id, reviewer,
                                    done=f"Candidate {candidate_id} is the winner of run {run_id}.")


def _kill_form(session: Session, candidate_id: int, reviewer: str, reason: str) -> int:
    return review.kill_candidate(session, candidate_id, reviewer, reason=reason).step_id


@page
async def kill_candidate(request: Request, reviewer: str, form: FormData) -> Response:
    candidate_id = _path_id(request, "candidate_id")
    reason = _form_text(form, "reason", 500)
    back = _int_value(form.get("step_id"), "step_id", optional=True)
    return await _decide_on_gallery(request, back, _kill_form, candidate_id, reviewer, reason,
                                    done=f"Candidate {candidate_id} killed.")


# --------------------------------------------------------------------------- posts


def _posts(session: Session, slug: str | None, home: Path) -> list[dict[str, Any]]:
    result = []
    personas: dict[int, models.Persona] = {}
    for post in review_views.posts_to_review(session, slug):
        persona = personas.get(post.persona_id) or session.get(models.Persona, post.persona_id)
        personas[post.persona_id] = persona
        zone = _zone(persona.timezone)
        result.append({
            "id": post.id, "persona_slug": persona.slug, "timezone": persona.timezone, "status": post.status,
            "caption": post.caption, "hashtags": list(post.hashtags or []), "account": post.account,
            "url": media_url(home, post.media_path) or (media_url(home, post.candidate.image_path) if post.candidate else None),
            "slot_local": _fmt(post.scheduled_at, zone), "slot_utc": _fmt(post.scheduled_at),
            "slot_input": post.scheduled_at.astimezone(zone).strftime("%Y-%m-%dT%H:%M"),
            "candidate_id": post.candidate_id,
            "failure_reason": post.failure_reason, "retry_count": post.retry_count, "retryable": post.retryable,
        })
    return result


async def _render_posts(request: Request, slug: str | None, *, errors: dict[int, dict[str, str]] | None = None,
                        status: int = 200) -> Response:
    posts = await in_db(request, _posts, slug, _home(request))
    for post in posts:  # after a refused change, show what the reviewer typed, not the stored text
        post["form"] = (errors or {}).get(post["id"], {})
    shown = {p["id"] for p in posts}
    # A refused change to a post the list no longer shows (e.g. already abandoned) is said at the top.
    page_errors = [f"Post {post_id}: {typed['error']}" for post_id, typed in (errors or {}).items()
                   if post_id not in shown and typed.get("error")]
    return render(request, "posts.html", {"posts": posts, "persona": slug, "title": "Posts to approve",
                                          "page_errors": page_errors}, status)


def _slug_param(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise HTTPException(404, f"persona {value[:64]!r} does not exist")
    return value


@page
async def posts_page(request: Request, reviewer: str) -> Response:
    return await _render_posts(request, _slug_param(request.query_params.get("persona")))


def _posts_back(slug: str | None) -> str:
    return "/posts" + (f"?persona={quote(slug)}" if slug else "")


def _post_tz(session: Session, post_id: int) -> str:
    post = session.get(models.Post, post_id)
    if post is None:
        raise review.NotFound(f"post {post_id} does not exist")
    return session.get(models.Persona, post.persona_id).timezone


@page
async def post_action(request: Request, reviewer: str, form: FormData) -> Response:
    """approve | edit | reject | move | retry | abandon one post (the action is the last path segment)."""
    post_id = _path_id(request, "post_id")
    action = request.path_params["action"]
    slug = _slug_param(_form_text(form, "persona", 64) or None)
    typed: dict[str, str] = {"action": action}
    try:
        if action == "approve":
            await in_db(request, review.approve_post, post_id, reviewer)
            message = f"Post {post_id} approved and scheduled."
        elif action == "edit":
            typed.update(caption=_form_text(form, "caption", 10_000), hashtags=_form_text(form, "hashtags", 5000))
            await in_db(request, review.edit_post, post_id, typed["caption"], split_hashtags(typed["hashtags"]), reviewer)
            message = f"Post {post_id} edited."
        elif action == "reject":
            typed.update(reason=_form_text(form, "reason", 500))
            await in_db(request, lambda s: review.reject_post(s, post_id, reviewer, reason=typed["reason"]))
            message = f"Post {post_id} rejected."
        elif action == "move":
            typed.update(new_time=_form_text(form, "new_time", 40))
            tz_name = await in_db(request, _post_tz, post_id)
            new_time = parse_local_slot(typed["new_time"], tz_name)
            await in_db(request, review.move_post, post_id, new_time, reviewer)
            message = f"Post {post_id} moved to {typed['new_time'].replace('T', ' ')} ({tz_name})."
        elif action == "retry":
            await in_db(request, review.retry_post, post_id, reviewer)
            message = f"Post {post_id} will be published again."
        elif action == "abandon":
            typed.update(reason=_form_text(form, "reason", 500))
            await in_db(request, lambda s: review.abandon_post(s, post_id, reviewer, reason=typed["reason"]))
            message = f"Post {post_id} abandoned; its image is back in the library."
        else:
            raise HTTPException(404, f"unknown post action {action!r}")
    except (review.ReviewError, BadInput) as exc:
        status = getattr(exc, "status_code", 400)
        if status == 404:
            raise
        typed["error"] = getattr(exc, "detail", None) or str(exc)
        return await _render_posts(request, slug, errors={post_id: typed}, status=status)
    _flash(request, message)
    return RedirectResponse(_posts_back(slug), status_code=303)


# --------------------------------------------------------------------------- audit


def recent_events(session: Session, limit: int = AUDIT_LIMIT) -> list[dict[str, Any]]:
    """The latest review events, newest first (read-only: the audit trail)."""
    rows = session.execute(select(models.ReviewEvent, models.Persona.slug)
                           .join(models.Persona, models.Persona.id == models.ReviewEvent.persona_id)
                           .order_by(models.ReviewEvent.id.desc()).limit(limit)).all()
    return [{"id": e.id, "kind": e.kind, "subject": f"{e.subject_type} {e.subject_id}", "persona": slug,
             "reviewer": e.reviewer, "time": _fmt(e.created_at) + " UTC",
             "details": ", ".join(f"{k}={v}" for k, v in sorted((e.payload or {}).items()))[:300]}
            for e, slug in rows]


@page
async def audit_page(request: Request, reviewer: str) -> Response:
    events = await in_db(request, recent_events)
    return render(request, "audit.html", {"events": events, "title": "Audit trail"})


# --------------------------------------------------------------------------- media


async def media(request: Request) -> Response:
    if auth.current_reviewer(request, _config(request).tokens) is None:
        raise HTTPException(401, "log in first")
    home, raw = _home(request), request.path_params["path"]
    target = resolve_media(home, raw)
    mirror = _config(request).mirror
    # Not in the cache: fetch it from object storage, but only a safe name whose real folder is
    # inside PERSONA_HOME (the same containment check as above, before any request leaves).
    if target is None and mirror is not None and media_name_ok(raw) and _lands_inside(home, raw):
        try:
            await run_in_threadpool(mirror.pull, home / raw)
        except ObjectStoreError:
            raise HTTPException(503, "the image is not cached here and object storage did not answer") from None
        target = resolve_media(home, raw)
    if target is None:
        raise HTTPException(404, "no such image")
    # Candidate images never change under their path: let the browser keep them (privately).
    return FileResponse(target, headers={"Cache-Control": "private, max-age=3600"})


# --------------------------------------------------------------------------- the app


def create_app(config: ReviewConfig) -> Starlette:
    """The review form as an ASGI app (uvicorn serves it)."""
    if not config.secret_key or len(config.secret_key) < 16:
        raise ValueError("ReviewConfig.secret_key must be at least 16 characters (REVIEW_SECRET_KEY)")
    if not config.tokens:
        raise ValueError("ReviewConfig.tokens is empty: set REVIEW_TOKENS=name:token,... so reviewers can log in")
    for token, name in config.tokens.items():
        if len(token) < 8 or not name:
            raise ValueError(f"reviewer token for {name!r} is shorter than 8 characters")
    if config.max_body_bytes < 1024:
        raise ValueError(f"max_body_bytes={config.max_body_bytes} is below 1024")
    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", queue_page, methods=["GET"]),
        Route("/steps/{step_id:int}/vote", vote_page, methods=["GET"]),
        Route("/steps/{step_id:int}", gallery_page, methods=["GET"]),
        Route("/steps/{step_id:int}/approve", approve_step, methods=["POST"]),
        Route("/runs/{run_id:int}/winner", pick_winner, methods=["POST"]),
        Route("/candidates/{candidate_id:int}/kill", kill_candidate, methods=["POST"]),
        Route("/posts", posts_page, methods=["GET"]),
        Route("/posts/{post_id:int}/{action:str}", post_action, methods=["POST"]),
        Route("/audit", audit_page, methods=["GET"]),
        Route("/media/{path:path}", media, methods=["GET"]),
        Route("/api/steps/{step_id:int}/pair", api_pair, methods=["GET"]),
        Route("/api/votes", api_vote, methods=["POST"]),
        Route("/api/offers/{offer_id:int}/shown", api_shown, methods=["POST"]),
        Route("/api/offers/{offer_id:int}/skip", api_skip, methods=["POST"]),
        Route("/api/candidates/{candidate_id:int}/kill", api_kill, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeadersMiddleware),
        Middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes),
        Middleware(SessionMiddleware, secret_key=config.secret_key, session_cookie="review_session",
                   max_age=7 * 24 * 3600, same_site="lax", https_only=config.https_only),
    ]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_error, review.ReviewError: review_error})
    app.state.config = config
    app.state.login_throttle = auth.LoginThrottle(config.login_max_failures, config.login_window_s)
    app.state.home = Path(config.home).resolve()
    return app
