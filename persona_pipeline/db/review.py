"""Reviewer decisions. The review form and the auto-reviewer call exactly these functions, so
every decision has one code path, one set of checks and one `ReviewEvent` row."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain import elo, post_states


class ReviewError(ValueError):
    """A refused decision; `status_code` is what the review form answers with."""

    status_code = 400


class NotFound(ReviewError):
    status_code = 404


class DuplicateVote(ReviewError):
    status_code = 409


def _event(session: Session, persona_id: int, kind: str, subject_type: str, subject_id: int, reviewer: str,
           payload: dict[str, Any] | None = None) -> models.ReviewEvent:
    if not reviewer or not reviewer.strip():
        raise ReviewError("a decision needs a reviewer name")
    event = models.ReviewEvent(persona_id=persona_id, kind=kind, subject_type=subject_type, subject_id=subject_id,
                               reviewer=reviewer, payload=payload or {})
    session.add(event)
    return event


def _candidate(session: Session, candidate_id: int, lock: bool = False) -> models.Candidate:
    query = select(models.Candidate).where(models.Candidate.id == candidate_id)
    if lock:
        query = query.with_for_update()  # PostgreSQL row lock; SQLite serialises writers anyway
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"candidate {candidate_id} does not exist")
    return row


def cast_vote(session: Session, winner_id: int, loser_id: int, reviewer: str,
              selection_probability: float | None = None) -> models.Vote:
    """Record one pairwise vote and apply Elo to both candidates in the caller's transaction."""
    if winner_id == loser_id:
        raise ReviewError(f"candidate {winner_id} cannot be voted against itself")
    low, high = sorted((winner_id, loser_id))
    # Lock in id order so two concurrent votes on overlapping pairs cannot deadlock.
    first, second = _candidate(session, low, lock=True), _candidate(session, high, lock=True)
    winner, loser = (first, second) if first.id == winner_id else (second, first)
    if winner.step_id != loser.step_id:
        raise ReviewError(f"candidates {winner_id} and {loser_id} belong to different runs or steps")
    for cand in (winner, loser):
        if cand.status == "killed":
            raise ReviewError(f"candidate {cand.id} was killed and cannot be voted on")
    if session.scalar(select(models.Vote.id).where(models.Vote.pair_low_id == low, models.Vote.pair_high_id == high)):
        raise DuplicateVote(f"the pair {low}/{high} has already been voted on")

    winner_before, loser_before = winner.elo, loser.elo
    winner.elo, loser.elo = elo.apply_vote(winner_before, loser_before)
    vote = models.Vote(step_id=winner.step_id, winner_id=winner.id, loser_id=loser.id, pair_low_id=low, pair_high_id=high,
                       winner_elo_before=winner_before, loser_elo_before=loser_before,
                       elo_delta=winner.elo - winner_before, selection_probability=selection_probability, reviewer=reviewer)
    session.add(vote)
    persona_id = winner.run.persona_id
    try:
        session.flush()
    except IntegrityError:
        raise DuplicateVote(f"the pair {low}/{high} has already been voted on") from None
    _event(session, persona_id, "vote", "vote", vote.id, reviewer,
           {"winner_id": winner.id, "loser_id": loser.id, "step_id": winner.step_id})
    session.flush()
    return vote


def pick_winner(session: Session, run_id: int, candidate_id: int, reviewer: str) -> models.GenerationRun:
    run = session.get(models.GenerationRun, run_id)
    if run is None:
        raise NotFound(f"generation run {run_id} does not exist")
    candidate = _candidate(session, candidate_id)
    if candidate.run_id != run_id:
        raise ReviewError(f"candidate {candidate_id} is not from run {run_id}")
    if candidate.status == "killed":
        raise ReviewError(f"candidate {candidate_id} was killed and cannot win")
    if run.winner_candidate_id is not None and run.winner_candidate_id != candidate_id:
        previous = session.get(models.Candidate, run.winner_candidate_id)
        if previous is not None and previous.status == "winner":
            previous.status = "active"
    run.winner_candidate_id = candidate.id
    run.status = "done"
    candidate.status = "winner"
    _event(session, run.persona_id, "pick_winner", "run", run.id, reviewer, {"candidate_id": candidate.id})
    session.flush()
    return run


def step_ranking(session: Session, step_id: int) -> list[elo.Standing]:
    """The step's live candidates ranked by Elo replayed from its votes (ties: more wins, fewer
    losses, older candidate). The ranking that decides top-K until Bradley–Terry replaces it."""
    live = list(session.scalars(select(models.Candidate.id).where(
        models.Candidate.step_id == step_id, models.Candidate.status.in_(("active", "winner")))))
    votes = session.execute(select(models.Vote.winner_id, models.Vote.loser_id)
                            .where(models.Vote.step_id == step_id).order_by(models.Vote.id)).all()
    return elo.rank(elo.replay(live, votes))


def kill_candidate(session: Session, candidate_id: int, reviewer: str, reason: str = "") -> models.Candidate:
    """Take a candidate out of its step (the generator makes a replacement while the step is open)."""
    candidate = _candidate(session, candidate_id, lock=True)
    if candidate.status == "killed":
        raise ReviewError(f"candidate {candidate_id} is already killed")
    if candidate.status not in ("active", "culled"):
        raise ReviewError(f"candidate {candidate_id} is {candidate.status} and cannot be killed")
    step = session.get(models.RunStep, candidate.step_id)
    if step.status == "approved":
        raise ReviewError(f"step {step.id} is already approved; its candidates can no longer be killed")
    candidate.status = "killed"
    candidate.status_reason = f"killed by {reviewer}" + (f": {reason}" if reason else "")
    if step.status == "voting":  # the freed place gets a replacement on the next generation pass
        step.status = "generating"
        step.run.status = "running"
    _event(session, candidate.run.persona_id, "kill", "candidate", candidate.id, reviewer,
           {"step_id": step.id, "reason": reason})
    session.flush()
    return candidate


def approve_step(session: Session, step_id: int, top_k: int, reviewer: str) -> models.RunStep:
    """Approve a step with K: its current top-K become the parents of the next step's children."""
    step = session.scalar(select(models.RunStep).where(models.RunStep.id == step_id).with_for_update())
    if step is None:
        raise NotFound(f"run step {step_id} does not exist")
    if step.status != "voting":
        raise ReviewError(f"step {step_id} is {step.status}; only a step whose images are all made can be approved")
    ranking = step_ranking(session, step_id)
    if not 1 <= top_k <= len(ranking):
        raise ReviewError(f"top_k={top_k} is out of range 1..{len(ranking)} (the step's live candidates)")
    parents = [s.candidate_id for s in ranking[:top_k]]
    step.status = "approved"
    step.top_k = top_k
    step.approved_at = models.utcnow()
    nxt = session.scalar(select(models.RunStep).where(models.RunStep.run_id == step.run_id,
                                                      models.RunStep.position == step.position + 1))
    if nxt is not None:
        nxt.parent_ids = parents
        nxt.status = "generating"
        step.run.status = "running"
    _event(session, step.run.persona_id, "approve_step", "step", step.id, reviewer, {"top_k": top_k, "parents": parents})
    session.flush()
    return step


def set_post_status(session: Session, post: models.Post, new_status: str, reason: str | None = None) -> None:
    post_states.check_transition(post.status, new_status)
    post.status = new_status
    if new_status == post_states.FAILED:
        post.failure_reason = reason
        post.retry_count += 1


def approve_post(session: Session, post_id: int, reviewer: str) -> models.Post:
    post = session.get(models.Post, post_id)
    if post is None:
        raise NotFound(f"post {post_id} does not exist")
    try:
        set_post_status(session, post, post_states.SCHEDULED)
    except post_states.IllegalTransition as exc:
        raise ReviewError(f"post {post_id}: {exc}") from None
    _event(session, post.persona_id, "approve_post", "post", post.id, reviewer,
           {"scheduled_at": post.scheduled_at.isoformat()})
    session.flush()
    return post
