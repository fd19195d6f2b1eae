"""A step's gallery (its Bradley–Terry ranking with intervals, and each image's scores), the
side-by-side comparison of any two of its images, and the decisions made there: approve the step
with K, pick the run's winner, kill a candidate and restore a killed one (each confirmed first)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from persona_pipeline.db import models, review, review_views
from persona_pipeline.review.inputs import BadInput, form_text, int_value, path_id
from persona_pipeline.review.media import media_url
from persona_pipeline.review.voting import step_header
from persona_pipeline.review.web import flash, home_of, in_db, page, render


def _cosine(value: float | None) -> str | None:
    """A cosine score as the gallery shows it (two decimals), None when it was never measured."""
    return None if value is None else f"{value:.2f}"


def _image_facts(home: Path, cand: models.Candidate) -> dict[str, Any]:
    """What every card shows of a candidate, ranked or not."""
    return {"id": cand.id, "status": cand.status, "status_reason": cand.status_reason or "",
            "url": media_url(home, cand.image_path), "identity": _cosine(cand.identity_score),
            "alignment": _cosine(cand.clip_score), "elo": cand.elo}


def _ranked_rows(session: Session, home: Path, ranking: list[review.RankedCandidate]) -> list[dict[str, Any]]:
    cands = {c.id: c for c in session.scalars(select(models.Candidate).where(
        models.Candidate.id.in_([r.candidate_id for r in ranking])))} if ranking else {}
    lows = [r.ci_low for r in ranking] or [0.0]
    highs = [r.ci_high for r in ranking] or [1.0]
    lo, hi = min(lows), max(highs)
    span = (hi - lo) or 1.0
    rows = []
    for place, r in enumerate(ranking, start=1):
        rows.append({**_image_facts(home, cands[r.candidate_id]),
                     "place": place, "score": r.score, "ci_low": r.ci_low, "ci_high": r.ci_high,
                     "elo": r.elo, "wins": r.wins, "losses": r.losses, "votes": r.votes,
                     "low_votes": r.votes < review.LOW_VOTES,
                     # the CI as a bar across the ranking's whole range
                     "bar_left": round(100 * (r.ci_low - lo) / span, 1),
                     "bar_width": max(round(100 * (r.ci_high - r.ci_low) / span, 1), 1.0),
                     "bar_mark": round(100 * (r.score - lo) / span, 1)})
    return rows


def _killed_rows(session: Session, home: Path, step_id: int) -> list[dict[str, Any]]:
    """The step's killed candidates, most recently killed first, with their vote record."""
    killed = list(session.scalars(select(models.Candidate).where(
        models.Candidate.step_id == step_id, models.Candidate.status == "killed").order_by(models.Candidate.id.desc())))
    rows = []
    for cand in killed:
        wins = session.scalar(select(func.count()).select_from(models.Vote).where(models.Vote.winner_id == cand.id)) or 0
        losses = session.scalar(select(func.count()).select_from(models.Vote).where(models.Vote.loser_id == cand.id)) or 0
        rows.append({**_image_facts(home, cand), "wins": wins, "losses": losses, "votes": wins + losses})
    return rows


def _gallery(session: Session, step_id: int, home: Path, top_k: int | None) -> dict[str, Any]:
    header = step_header(session, step_id)
    view = review_views.step_view(session, step_id)
    k = top_k if top_k is not None else view.k_default
    open_step = view.step.status in review.OPEN_STEP
    return {"step": header, "rows": _ranked_rows(session, home, view.ranking), "k": k, "k_default": view.k_default,
            "warning": view.low_vote_warning(k), "killed": _killed_rows(session, home, step_id),
            "can_approve": view.can_approve, "can_pick": view.can_pick, "is_final": view.is_final_step,
            "unvoted_pairs": view.unvoted_pairs, "winner_id": view.run.winner_candidate_id,
            "can_kill": open_step, "can_restore": open_step, "low_votes": review.LOW_VOTES}


def _compare(session: Session, step_id: int, ids: tuple[int, int], home: Path) -> dict[str, Any]:
    header = step_header(session, step_id)
    view = review_views.step_view(session, step_id)
    ranked = {row["id"]: row for row in _ranked_rows(session, home, view.ranking)}
    killed = {row["id"]: row for row in _killed_rows(session, home, step_id)}
    sides = []
    for cid in ids:
        cand = session.get(models.Candidate, cid)
        if cand is None or cand.step_id != step_id:
            raise review.NotFound(f"candidate {cid} is not an image of step {step_id}")
        row = ranked.get(cid) or killed.get(cid)
        if row is None:  # rejected or culled: shown, but it has no place and no decisions
            row = {**_image_facts(home, cand), "wins": None, "losses": None, "votes": None}
        sides.append(row)
    a, b = ids

    def beat(winner: int, loser: int) -> int:
        return session.scalar(select(func.count()).select_from(models.Vote).where(
            models.Vote.step_id == step_id, models.Vote.winner_id == winner, models.Vote.loser_id == loser)) or 0
    chance = None
    if "score" in sides[0] and "score" in sides[1]:
        # The ranking's own model (docs/rules.md#bradley-terry): P(a beats b) = σ(ln10·(r_a − r_b)/400).
        chance = round(100 / (1 + math.exp(-math.log(10) * (sides[0]["score"] - sides[1]["score"]) / 400)))
    open_step = view.step.status in review.OPEN_STEP
    return {"step": header, "sides": sides, "a_beat_b": beat(a, b), "b_beat_a": beat(b, a), "chance": chance,
            "can_kill": open_step, "can_restore": open_step, "can_pick": view.can_pick, "ranked": len(ranked)}


def _two_ids(request: Request) -> tuple[int, int]:
    """The two candidates to compare: `?c=ID&c=ID` (the gallery's checkboxes)."""
    raw = request.query_params.getlist("c")
    if len(raw) != 2:
        raise BadInput(f"choose exactly two images to compare (got {len(raw)})")
    a, b = (int_value(value, "c") for value in raw)
    if a == b:
        raise BadInput("choose two different images to compare")
    return a, b


@page
async def compare_page(request: Request, reviewer: str) -> Response:
    step_id = path_id(request, "step_id")
    ids = _two_ids(request)
    data = await in_db(request, _compare, step_id, ids, home_of(request))
    data["title"] = f"Compare #{ids[0]} and #{ids[1]} · step {data['step']['position']}"
    return render(request, "compare.html", data)


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
                                    done=f"Candidate {candidate_id} killed. While the step is open you can restore it "
                                         "from “Killed” below.")


def _restore_form(session: Session, candidate_id: int, reviewer: str, reason: str) -> int:
    return review.restore_candidate(session, candidate_id, reviewer, reason=reason).step_id


@page
async def restore_candidate(request: Request, reviewer: str, form: FormData) -> Response:
    candidate_id = path_id(request, "candidate_id")
    reason = form_text(form, "reason", 500)
    back = int_value(form.get("step_id"), "step_id", optional=True)
    return await _decide_on_gallery(request, back, _restore_form, candidate_id, reviewer, reason,
                                    done=f"Candidate {candidate_id} restored: it is back in the ranking with its votes.")
