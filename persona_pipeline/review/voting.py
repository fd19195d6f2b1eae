"""The vote page and its JSON API: the next pair to show, a vote on it, a skip, a kill, and the
undo of a vote or a kill. Every answer returns the step's count of pairs not voted yet, computed by
`review_views.unvoted_pairs` after the answer (the page shows that number; it never estimates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select
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
    pillar = session.get(models.ContentPillar, step.run.pillar_id) if step.run.pillar_id is not None else None
    return {"id": step.id, "name": step.name, "position": step.position, "status": step.status,
            "run_id": step.run_id, "steps": len(step.run.steps), "prompt": step.run.prompt,
            "persona_slug": persona.slug, "persona_name": persona.name,
            "pillar": pillar.name if pillar else None, "guidelines": (pillar.guidelines or "").strip() if pillar else "",
            "judge_by": judge_by(persona, pillar, step)}


def judge_by(persona: models.Persona, pillar: models.ContentPillar | None, step: models.RunStep) -> list[str]:
    """What a reviewer should judge the pair by, in order: the persona's identity first, then the
    pillar's brief, then the picture itself (the last step is what gets posted)."""
    points = [f"Identity first: is this clearly {persona.name}, the same person as in the source photos "
              f"(face, hair, build)?"]
    if pillar is not None and (pillar.guidelines or "").strip():
        points.append(f"Then the {pillar.name} brief: {pillar.guidelines.strip()}")
    elif pillar is not None:
        points.append(f"Then the {pillar.name} brief: does the picture fit it and the prompt?")
    final = step.position == len(step.run.steps)
    points.append("Then the picture: " + ("this step's winner gets posted, so no broken hands, eyes or text."
                                         if final else "sharp, natural, no broken hands or eyes."))
    return points


def step_counts(session: Session, step_id: int) -> dict[str, int]:
    """The step's count of pairs not voted yet (`unvoted_pairs`, the same count the queue and the
    gallery show) and `as_of`, the newest review event it saw: the page keeps the count with the
    highest `as_of` when answers come back out of order.

    `as_of` is read before the count: on PostgreSQL each statement sees what was committed when it
    began, so a vote committed between the two reads is then at most counted under an older label
    (which any later answer replaces), never an old count labelled with the newer vote's id, which
    the page would have kept."""
    as_of = session.scalar(select(func.max(models.ReviewEvent.id))) or 0
    return {"remaining": review_views.unvoted_pairs(session, step_id), "as_of": as_of}


@page
async def vote_page(request: Request, reviewer: str) -> Response:
    def work(session: Session, step_id: int) -> tuple[dict[str, Any], dict[str, int]]:
        return step_header(session, step_id), step_counts(session, step_id)

    step, counts = await in_db(request, work, path_id(request, "step_id"))
    return render(request, "vote.html", {"step": step, "counts": counts, "undo_minutes": int(review.UNDO_WINDOW.total_seconds() // 60),
                                         "title": f"Vote · {step['persona_slug']} run {step['run_id']}"})


def _candidate_json(home: Path, candidate: models.Candidate) -> dict[str, Any]:
    return {"id": candidate.id, "url": media_url(home, candidate.image_path)}


def _offer_json(session: Session, home: Path, offer: models.PairOffer) -> dict[str, Any]:
    """An offer as the page takes it. `probability` and `strategy` are for the API and analysis;
    the page never shows them to the reviewer."""
    left, right = session.get(models.Candidate, offer.left_id), session.get(models.Candidate, offer.right_id)
    return {"offer_id": offer.id, "step_id": offer.step_id, "left": _candidate_json(home, left),
            "right": _candidate_json(home, right), "probability": offer.probability, "strategy": offer.strategy}


def _next_pair(session: Session, step_id: int, reviewer: str, exclude: list[int], home: Path,
               exploration: float, shown: bool) -> dict[str, Any]:
    offer = review.next_pair(session, step_id, reviewer, exclude_offer_ids=exclude, exploration=exploration, shown=shown)
    counts = step_counts(session, step_id)
    if offer is None:
        return {"offer_id": None, **counts}
    return {**_offer_json(session, home, offer), **counts}


@api
async def api_counts(request: Request, reviewer: str) -> Response:
    """The step's count of pairs not voted yet, as the gallery and the queue count them."""
    def work(session: Session, step_id: int) -> dict[str, int]:
        if session.get(models.RunStep, step_id) is None:
            raise review.NotFound(f"run step {step_id} does not exist")
        return step_counts(session, step_id)

    return JSONResponse(await in_db(request, work, path_id(request, "step_id")), headers={"Cache-Control": "no-store"})


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
            "selection_probability": vote.selection_probability, "elo_delta": vote.elo_delta,
            **step_counts(session, vote.step_id)}


@api
async def api_vote(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    offer_id = int_value(body.get("offer_id"), "offer_id")
    winner_id = int_value(body.get("winner_id"), "winner_id")
    loser_id = int_value(body.get("loser_id"), "loser_id")
    data = await in_db(request, _vote, offer_id, winner_id, loser_id, reviewer)
    return JSONResponse(data, status_code=201)


def _skip(session: Session, offer_id: int, reviewer: str) -> dict[str, Any]:
    offer = review.skip_offer(session, offer_id, reviewer)
    return {"offer_id": offer.id, "outcome": offer.outcome, **step_counts(session, offer.step_id)}


@api
async def api_skip(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    return JSONResponse(await in_db(request, _skip, path_id(request, "offer_id"), reviewer))


def _kill(session: Session, candidate_id: int, reviewer: str, reason: str, offer_id: int | None) -> dict[str, Any]:
    candidate = review.kill_candidate(session, candidate_id, reviewer, reason=reason, offer_id=offer_id)
    return {"candidate_id": candidate.id, "status": candidate.status, **step_counts(session, candidate.step_id)}


@api
async def api_kill(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    offer_id = int_value(body.get("offer_id"), "offer_id", optional=True)
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        raise BadInput("reason must be text of at most 500 characters")
    data = await in_db(request, _kill, path_id(request, "candidate_id"), reviewer, reason, offer_id)
    return JSONResponse(data)


def _again(session: Session, home: Path, offer_id: int | None, reviewer: str) -> dict[str, Any] | None:
    offer = review.offer_again(session, offer_id, reviewer) if offer_id is not None else None
    return _offer_json(session, home, offer) if offer is not None else None


def _undo_vote(session: Session, vote_id: int, reviewer: str, home: Path) -> dict[str, Any]:
    undone = review.undo_vote(session, vote_id, reviewer)
    return {"undone": undone, "pair": _again(session, home, undone["offer_id"], reviewer),
            **step_counts(session, undone["step_id"])}


@api
async def api_undo_vote(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    """Undo one of your votes (within review.UNDO_WINDOW, while its step is open); the answer
    carries the same pair as a new offer on screen, to vote on again."""
    return JSONResponse(await in_db(request, _undo_vote, path_id(request, "vote_id"), reviewer, home_of(request)))


def _undo_skip(session: Session, offer_id: int, reviewer: str, home: Path) -> dict[str, Any]:
    offer = review.undo_skip(session, offer_id, reviewer)
    return {"offer_id": offer.id, "outcome": offer.outcome, "pair": _again(session, home, offer.id, reviewer),
            **step_counts(session, offer.step_id)}


@api
async def api_undo_skip(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    """Undo your skip of a pair (within review.UNDO_WINDOW); the pair comes back on screen."""
    return JSONResponse(await in_db(request, _undo_skip, path_id(request, "offer_id"), reviewer, home_of(request)))


def _restore(session: Session, candidate_id: int, reviewer: str, offer_id: int | None, home: Path) -> dict[str, Any]:
    if offer_id is not None:
        offer = session.get(models.PairOffer, offer_id)
        if offer is None or candidate_id not in (offer.left_id, offer.right_id):
            raise review.ReviewError(f"candidate {candidate_id} is not in pair offer {offer_id}")
    candidate = review.restore_candidate(session, candidate_id, reviewer, reason="kill undone on the vote page")
    return {"candidate_id": candidate.id, "status": candidate.status, "pair": _again(session, home, offer_id, reviewer),
            **step_counts(session, candidate.step_id)}


@api
async def api_restore(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    """Undo a kill from the vote page: `review.restore_candidate` (the gallery's restore, a
    `restore` event); with the `offer_id` the kill answered, the pair comes back on screen."""
    offer_id = int_value(body.get("offer_id"), "offer_id", optional=True)
    return JSONResponse(await in_db(request, _restore, path_id(request, "candidate_id"), reviewer, offer_id, home_of(request)))
