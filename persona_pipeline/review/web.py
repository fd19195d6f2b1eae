"""What every route of the review form uses: the login and CSRF checks (`page` for HTML pages and
form actions, `api` for JSON), one database transaction per request in the threadpool, the Jinja2
templates, and the error pages (styled HTML with the way back; JSON under /api/)."""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
from http import HTTPStatus
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import Scope

from persona_pipeline.db.session import session_scope
from persona_pipeline.review import auth
from persona_pipeline.review.config import ReviewConfig
from persona_pipeline.review.inputs import BadInput
from persona_pipeline.review.middleware import SECURITY_HEADERS

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
            raise HTTPException(401, "Your session has ended (or you never logged in), so this was not saved.")
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


# What each error page says first; the detail and the way back follow.
ERROR_HEADINGS = {
    400: "That was refused",
    401: "You are not logged in",
    403: "That is not allowed",
    404: "That was not found",
    405: "That cannot be done here",
    409: "That changed before your request arrived",
    413: "That was too large to send",
    429: "Too many tries",
    500: "Something went wrong on our side",
    503: "A service this page needs did not answer",
}
ERROR_HINTS = {
    401: "Log in, then send it again from the page you were on.",
    403: "Nothing was saved. Reload the page you came from, then try again.",
    409: "Nothing was saved. Reload the page to see how things stand now.",
    413: "Nothing was saved. Shorten what you typed, then send it again.",
    500: "The error has been logged. Go back and check whether your change was saved before trying again.",
}
GET_500_HINT = "The error has been logged. Try again in a moment; if it keeps happening, pass on the reference below."
# Pages a way back may name (path pattern, label); any other local page is "the page you came from".
_BACK_LABELS = [
    (re.compile(r"/steps/\d+/vote"), "Back to voting"),
    (re.compile(r"/steps/\d+(/compare)?"), "Back to the gallery"),
    (re.compile(r"/posts"), "Back to the posts"),
    (re.compile(r"/calendar(/posts/\d+)?"), "Back to the calendar"),
    (re.compile(r"/audit"), "Back to the audit trail"),
    (re.compile(r"/login"), "Back to the login page"),
]
log = logging.getLogger(__name__)


def way_back(request: Request) -> tuple[str, str]:
    """(href, label) of the error page's way back: the page the reviewer came from when the Referer
    names a page of this form (same host, a local path, not the page that failed), else the queue.
    The Referer is only sent for pages of this form (Referrer-Policy: same-origin), and nothing
    from another host or scheme-relative path is ever linked."""
    referer = request.headers.get("referer", "")
    try:
        parts = urlsplit(referer)
    except ValueError:
        parts = None
    if parts and parts.netloc and parts.netloc == request.headers.get("host"):
        target = auth.safe_next(parts.path + (f"?{parts.query}" if parts.query else ""))
        failed = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if target not in ("/", failed) and len(target) <= 500:
            label = next((text for pattern, text in _BACK_LABELS if pattern.fullmatch(parts.path)), "Back to the page you came from")
            return target, label
    return "/", "Back to the queue"


def _who(request: Request) -> tuple[str | None, str]:
    """(reviewer, CSRF token) when the session middleware has run for this request, else (None, ""):
    a body refused before the session was read, or an error raised outside it."""
    if "session" not in request.scope:
        return None, ""
    try:
        return auth.current_reviewer(request, config_of(request).tokens), auth.csrf_token(request)
    except Exception:  # an error page must never fail on the session
        return None, ""


def error_page(request: Request, status: int, message: str, *, reference: str | None = None,
               headers: dict[str, str] | None = None) -> HTMLResponse:
    """The styled error page: what happened (`message`, which must never hold a secret or a
    traceback), what to do, and the way back."""
    reviewer, csrf = _who(request)
    back, back_label = way_back(request)
    values = {"reviewer": reviewer, "csrf": csrf, "flash": None, "error": None, "title": f"Error {status}",
              "status": status, "heading": ERROR_HEADINGS.get(status) or HTTPStatus(status).phrase,
              "message": message, "hint": GET_500_HINT if status == 500 and request.method == "GET" else ERROR_HINTS.get(status), "back": back, "back_label": back_label,
              "login_url": "/login?next=" + quote(back) if status == 401 else None, "reference": reference}
    response = HTMLResponse(_templates.get_template("error.html").render(values), status_code=status,
                            headers={"Cache-Control": "no-store"})
    if headers:
        response.headers.update(headers)
    return response


def error_page_body(scope: Scope, status: int, message: str) -> bytes:
    """The styled error page as bytes, for middleware that answers before any route runs (the body
    limit's 413)."""
    return error_page(Request(scope), status, message).body


def _wants_html(request: Request) -> bool:
    """Pages get HTML errors; the JSON API never does, and a media URL only when a person opened it
    (an <img> asks for image/*)."""
    path = request.url.path
    if path.startswith("/api/"):
        return False
    if path.startswith("/media/"):
        return "text/html" in request.headers.get("accept", "")
    return True


def _detail(request: Request, status: int, detail: str | None) -> str:
    if status == 404 and (not detail or detail == HTTPStatus(404).phrase):  # the router's own 404
        return f"There is no page at {request.url.path[:200]}."
    if status == 405 and (not detail or detail == HTTPStatus(405).phrase):
        return f"{request.url.path[:200]} does not take a {request.method} request."
    return detail or HTTPStatus(status).phrase


async def http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = _detail(request, status, getattr(exc, "detail", None))
    headers = getattr(exc, "headers", None)
    if not _wants_html(request):
        if request.url.path.startswith("/media/"):
            return Response(detail, status_code=status, media_type="text/plain", headers=headers)
        return JSONResponse({"error": detail}, status_code=status, headers=headers)
    if status == 401 and request.method == "GET" and not request.url.path.startswith("/media/"):
        return RedirectResponse("/login?next=" + quote(request.url.path), status_code=303)
    return error_page(request, status, detail, headers=headers)


async def review_error(request: Request, exc: Exception) -> Response:
    """db/review.py's refusals: ReviewError 400, NotYourOffer 403, NotFound 404, DuplicateVote and
    OfferClosed 409."""
    return await http_error(request, HTTPException(getattr(exc, "status_code", 400), str(exc)))


async def server_error(request: Request, exc: Exception) -> Response:
    """Any other exception: a 500 that says only that it happened, with a reference to find it in
    the log (the exception's text may hold paths, SQL or secrets, so it is never shown). Starlette's
    ServerErrorMiddleware calls this outside the other middleware, so the security headers are added
    here."""
    reference = secrets.token_hex(4)
    log.error("unexpected error, reference %s, on %s %s", reference, request.method, request.url.path, exc_info=exc)
    headers = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}
    message = f"The server failed while answering {request.method} {request.url.path[:200]}."
    if not _wants_html(request):
        return JSONResponse({"error": f"internal error (reference {reference})"}, status_code=500, headers=headers)
    try:
        return error_page(request, 500, message, reference=reference, headers=headers)
    except Exception:  # the templates themselves failed: still no traceback, still a way back
        log.exception("the error page failed too, reference %s", reference)
        return HTMLResponse(f"<!doctype html><title>Error 500</title><h1>Something went wrong on our side</h1>"
                            f"<p>Reference {reference}.</p><p><a href=\"/\">Back to the queue</a></p>",
                            status_code=500, headers=headers)
