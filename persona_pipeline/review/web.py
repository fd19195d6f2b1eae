"""What every route of the review form uses: the login and CSRF checks (`page` for HTML pages and
form actions, `api` for JSON), one database transaction per request in the threadpool, the Jinja2
templates, and the error pages."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from persona_pipeline.db.session import session_scope
from persona_pipeline.review import auth
from persona_pipeline.review.config import ReviewConfig
from persona_pipeline.review.inputs import BadInput

HERE = Path(__file__).parent


def config_of(request: Request) -> ReviewConfig:
    """The ReviewConfig `create_app` was given."""
    return request.app.state.config


def home_of(request: Request) -> Path:
    """PERSONA_HOME, resolved once when the app was made."""
    return request.app.state.home


_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every {{ }} is HTML-escaped: captions, reasons, names
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(request: Request, name: str, context: dict[str, Any] | None = None, status: int = 200) -> HTMLResponse:
    values = {"reviewer": auth.current_reviewer(request, config_of(request).tokens), "csrf": auth.csrf_token(request),
              "flash": request.session.pop("flash", None), "title": "", "error": None}
    values.update(context or {})
    return HTMLResponse(_templates.get_template(name).render(values), status_code=status,
                        headers={"Cache-Control": "no-store"})


def flash(request: Request, message: str) -> None:
    request.session["flash"] = message[:300]


async def in_db(request: Request, work: Callable[..., Any], *args: Any) -> Any:
    """Run `work(session, *args)` in the threadpool inside one transaction."""
    url = config_of(request).database_url

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
        reviewer = auth.current_reviewer(request, config_of(request).tokens)
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
        reviewer = auth.current_reviewer(request, config_of(request).tokens)
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
