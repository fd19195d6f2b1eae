"""Logging in with a reviewer token (throttled per client address) and logging out."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from persona_pipeline.review import auth
from persona_pipeline.review.web import config_of, page, render


async def login_form(request: Request) -> Response:
    if auth.current_reviewer(request, config_of(request).tokens):
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
    name = auth.reviewer_for_token(config_of(request).tokens, token if isinstance(token, str) else "")
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
