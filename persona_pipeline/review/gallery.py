"""A step's gallery (its Bradley–Terry ranking with intervals) and the decisions made on it:
approve the step with K, pick the run's winner, kill a candidate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from persona_pipeline.db import models, review, review_views
from persona_pipeline.review.inputs import form_text, int_value, path_id
from persona_pipeline.review.media import media_url
from persona_pipeline.review.voting import step_header
from persona_pipeline.review.web import flash, home_of, in_db, page, render


def _gallery(session: Session, step_id: int, home: Path, top_k: int | None) -> dict[str, Any]:
    header = step_header(session, step_id)
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
    data = await in_db(request, _gallery, step_id, home_of(request), top_k)
    data.update(error=error, title=f"Step {data['step']['position']} · {data['step']['persona_slug']} run {data['step']['run_id']}")
    return render(request, "gallery.html", data, status)


@page
async def gallery_page(request: Request, reviewer: str) -> Response:
    return await _render_gallery(request, path_id(request, "step_id"))


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
    flash(request, done)
    return RedirectResponse(f"/steps/{step_id}", status_code=303)


def _approve_step(session: Session, step_id: int, top_k: int, reviewer: str) -> int:
    return review.approve_step(session, step_id, top_k, reviewer).id


@page
async def approve_step(request: Request, reviewer: str, form: FormData) -> Response:
    step_id = path_id(request, "step_id")
    top_k = int_value(form.get("top_k"), "top_k")
    return await _decide_on_gallery(request, step_id, _approve_step, step_id, top_k, reviewer,
                                    done=f"Step {step_id} approved with K={top_k}.", top_k=top_k)


def _pick(session: Session, run_id: int, candidate_id: int, reviewer: str) -> int:
    review.pick_winner(session, run_id, candidate_id, reviewer)
    return session.get(models.Candidate, candidate_id).step_id


@page
async def pick_winner(request: Request, reviewer: str, form: FormData) -> Response:
    run_id = path_id(request, "run_id")
    candidate_id = int_value(form.get("candidate_id"), "candidate_id")
    back = int_value(form.get("step_id"), "step_id", optional=True)
    return await _decide_on_gallery(request, back, _pick, run_id, candidate_id, reviewer,
                                    done=f"Candidate {candidate_id} is the winner of run {run_id}.")


def _kill_form(session: Session, candidate_id: int, reviewer: str, reason: str) -> int:
    return review.kill_candidate(session, candidate_id, reviewer, reason=reason).step_id


@page
async def kill_candidate(request: Request, reviewer: str, form: FormData) -> Response:
    candidate_id = path_id(request, "candidate_id")
    reason = form_text(form, "reason", 500)
    back = int_value(form.get("step_id"), "step_id", optional=True)
    return await _decide_on_gallery(request, back, _kill_form, candidate_id, reviewer, reason,
                                    done=f"Candidate {candidate_id} killed.")
