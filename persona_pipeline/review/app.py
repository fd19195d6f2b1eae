"""The review form: Starlette + Jinja2, served by uvicorn (`persona-pipeline review`).

Every decision goes through `persona_pipeline.db.review` and `persona_pipeline.db.review_posts`
with the logged-in reviewer's name, so each one is a `ReviewEvent`; the pages only read
(db/review_views.py and the audit query). Endpoints are async only to read the request body;
database work runs in Starlette's threadpool, one `session_scope` per request, and hands plain dicts
to the templates (no lazy loads after the session closes).

This module builds the app: the routes of each area (login, queue, voting, gallery, posts, calendar,
audit, media) and the middleware.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from persona_pipeline.db import review
from persona_pipeline.review import auth
from persona_pipeline.review.audit import audit_page
from persona_pipeline.review.performance import performance_page
from persona_pipeline.review.calendar import api_move, calendar_page, calendar_post_edit, calendar_post_page
from persona_pipeline.review.config import ReviewConfig
from persona_pipeline.review.dataset import api_decide, api_queue, api_undo, dataset_page, decide_form
from persona_pipeline.review.gallery import (approve_step, compare_page, gallery_page, kill_candidate, pick_winner,
                                             restore_candidate)
from persona_pipeline.review.login import login, login_form, logout
from persona_pipeline.review.loras import loras_page, promote_lora, rollback_lora
from persona_pipeline.review.media import media, sprite
from persona_pipeline.review.middleware import BodyLimitMiddleware, SecurityHeadersMiddleware
from persona_pipeline.review.posts import post_action, posts_page
from persona_pipeline.review.queue import queue_page
from persona_pipeline.review.voting import (api_counts, api_kill, api_pair, api_restore, api_shown, api_skip,
                                            api_undo_skip, api_undo_vote, api_vote, vote_page)
from persona_pipeline.review.web import HERE, error_page_body, http_error, review_error, server_error

__all__ = ["ReviewConfig", "create_app"]


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
        Route("/steps/{step_id:int}/compare", compare_page, methods=["GET"]),
        Route("/steps/{step_id:int}/approve", approve_step, methods=["POST"]),
        Route("/runs/{run_id:int}/winner", pick_winner, methods=["POST"]),
        Route("/candidates/{candidate_id:int}/kill", kill_candidate, methods=["POST"]),
        Route("/candidates/{candidate_id:int}/restore", restore_candidate, methods=["POST"]),
        Route("/posts", posts_page, methods=["GET"]),
        Route("/posts/{post_id:int}/{action:str}", post_action, methods=["POST"]),
        Route("/calendar", calendar_page, methods=["GET"]),
        Route("/calendar/sprites/{name:str}.jpg", sprite, methods=["GET"]),
        Route("/calendar/posts/{post_id:int}", calendar_post_page, methods=["GET"]),
        Route("/calendar/posts/{post_id:int}/edit", calendar_post_edit, methods=["POST"]),
        Route("/loras", loras_page, methods=["GET"]),
        Route("/loras/rollback", rollback_lora, methods=["POST"]),
        Route("/loras/{lora_id:int}/promote", promote_lora, methods=["POST"]),
        Route("/dataset/{slug:str}", dataset_page, methods=["GET"]),
        Route("/dataset/candidates/{candidate_id:int}/decide", decide_form, methods=["POST"]),
        Route("/audit", audit_page, methods=["GET"]),
        Route("/performance", performance_page, methods=["GET"]),
        Route("/media/{path:path}", media, methods=["GET"]),
        Route("/api/steps/{step_id:int}/pair", api_pair, methods=["GET"]),
        Route("/api/steps/{step_id:int}/counts", api_counts, methods=["GET"]),
        Route("/api/votes", api_vote, methods=["POST"]),
        Route("/api/votes/{vote_id:int}/undo", api_undo_vote, methods=["POST"]),
        Route("/api/offers/{offer_id:int}/shown", api_shown, methods=["POST"]),
        Route("/api/offers/{offer_id:int}/skip", api_skip, methods=["POST"]),
        Route("/api/offers/{offer_id:int}/undo-skip", api_undo_skip, methods=["POST"]),
        Route("/api/candidates/{candidate_id:int}/kill", api_kill, methods=["POST"]),
        Route("/api/candidates/{candidate_id:int}/restore", api_restore, methods=["POST"]),
        Route("/api/dataset/{slug:str}/queue", api_queue, methods=["GET"]),
        Route("/api/dataset/candidates/{candidate_id:int}/decide", api_decide, methods=["POST"]),
        Route("/api/dataset/candidates/{candidate_id:int}/undo", api_undo, methods=["POST"]),
        Route("/api/calendar/posts/{post_id:int}/move", api_move, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeadersMiddleware),
        Middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, error_page=error_page_body),
        Middleware(SessionMiddleware, secret_key=config.secret_key, session_cookie="review_session",
                   max_age=7 * 24 * 3600, same_site="lax", https_only=config.https_only),
    ]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_error, review.ReviewError: review_error,
                                        Exception: server_error})
    app.state.config = config
    app.state.login_throttle = auth.LoginThrottle(config.login_max_failures, config.login_window_s)
    app.state.home = Path(config.home).resolve()
    return app
