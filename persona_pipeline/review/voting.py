"""The vote page and its JSON API: the next pair to show, a vote on it, a skip, a kill."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from persona_pipeline.db import models, review, review_views
from persona_pipeline.review.inputs import BadInput, int_value, path_id
from persona_pipeline.review.media import media_url
from persona_pipeline.review.web import api, config_of, home_of, in_db, page, render

MAX_EXCLUDE = 50  # offers one pair request may hold back (the page holds one or two)


def step_header(session: Session, step_id: int) -> dict[str, Any]:
    """The step, its run and persona, as the vote page and the gallery head them."""
    step = session.get(models.RunStep, step_id)
    if step is None:
        raise review.NotFound(f"run step {step_id} does not exist")
    persona = session.get(models.Persona, step.run.persona_id)
    return {"id": step.id, "name": step.name, "position": step.position, "status": step.status,
            "run_id": step.run_id, "steps": len(step.run.steps), "prompt": step.run.prompt,
            "persona_slug": persona.slug, "persona_name": persona.name}


@page
async def vote_page(request: Request, reviewer: str) -> Response:
    step = await in_db(request, step_header, path_id(request, "step_id"))
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
    step_id = path_id(request, "step_id")
    raw = request.query_params.get("exclude", "")
    parts = [p for p in raw.split(",") if p.strip()]
    if len(parts) > MAX_EXCLUDE:
        raise BadInput(f"exclude lists {len(parts)} offers; at most {MAX_EXCLUDE}")
    exclude = [int_value(p, "exclude") for p in parts]
    # ?preload=1: the page's next pair, held off screen; it can be answered after POST .../shown.
    preload = request.query_params.get("preload", "0")
    if preload not in ("0", "1"):
        raise BadInput(f"preload must be 0 or 1, got {preload[:40]!r}")
    data = await in_db(request, _next_pair, step_id, reviewer, exclude, home_of(request), config_of(request).exploration,
                       preload == "0")
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


def _shown(session: Session, offer_id: int, reviewer: str) -> dict[str, Any]:
    offer = review.show_offer(session, offer_id, reviewer)
    return {"offer_id": offer.id, "shown_at": offer.shown_at.isoformat()}


@api
async def api_shown(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    return JSONResponse(await in_db(request, _shown, path_id(request, "offer_id"), reviewer))


def _vote(session: Session, offer_id: int, winner_id: int, loser_id: int, reviewer: str) -> dict[str, Any]:
    vote = review.cast_vote(session, winner_id, loser_id, reviewer, offer_id=offer_id)
    return {"vote_id": vote.id, "offer_id": offer_id, "winner_id": vote.winner_id, "loser_id": vote.loser_id,
            "selection_probability": vote.selection_probability, "elo_delta": vote.elo_delta}


@api
async def api_vote(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    offer_id = int_value(body.get("offer_id"), "offer_id")
    winner_id = int_value(body.get("winner_id"), "winner_id")
    loser_id = int_value(body.get("loser_id"), "loser_id")
    data = await in_db(request, _vote, offer_id, winner_id, loser_id, reviewer)
    return JSONResponse(data, status_code=201)


def _skip(session: Session, offer_id: int, reviewer: str) -> dict[str, Any]:
    offer = review.skip_offer(session, offer_id, reviewer)
    return {"offer_id": offer.id, "outcome": offer.outcome}


@api
async def api_skip(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    return JSONResponse(await in_db(request, _skip, path_id(request, "offer_id"), reviewer))


def _kill(session: Session, candidate_id: int, reviewer: str, reason: str, offer_id: int | None) -> dict[str, Any]:
    candidate = review.kill_candidate(session, candidate_id, reviewer, reason=reason, offer_id=offer_id)
    return {"candidate_id": candidate.id, "status": candidate.status}


@api
async def api_kill(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    offer_id = int_value(body.get("offer_id"), "offer_id", optional=True)
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        raise BadInput("reason must be text of at most 500 characters")
    data = await in_db(request, _kill, path_id(request, "candidate_id"), reviewer, reason, offer_id)
    return JSONResponse(data)
