"""The rankings refresh: refit only the steps whose ranking inputs changed since their last fit.

A step's ranking (Bradley–Terry with bootstrap intervals, Elo replay, the auto-reviewer's winner
pick) depends only on its status and K, its votes and its candidates' statuses. Each fit stores a
signature of those inputs on the step (`run_steps.ranked_signature`); a refresh reads the
signatures of all the persona's steps from three grouped queries (no fit, no blob, no per-step
query) and refits the steps whose signature differs, so its cost grows with the steps that got new
votes, not with the persona's history. Every refit is the full fit of that step, so the stored
results are exactly those of a full refit (`full=True` refits every step, and also corrects Elo
that was changed outside a vote, which no signature sees)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from persona_pipeline.db import models, review
from persona_pipeline.domain import elo
from persona_pipeline.domain.ui_pages import StepToReview

# (session, run, the final step's ranking) -> the candidate picked as winner, or None
PickWinner = Callable[[Session, models.GenerationRun, list[review.RankedCandidate]], "int | None"]


@dataclass
class RankingsRefresh:
    """What one refresh did: the rows of the steps it refit, and the counts the asset reports."""

    rows: list[dict] = field(default_factory=list)
    winners: list[models.Candidate] = field(default_factory=list)
    refit_step_ids: list[int] = field(default_factory=list)
    unchanged_steps: int = 0
    elo_corrections: int = 0
    low_votes: int = 0
    open_steps: list[StepToReview] = field(default_factory=list)
    last_vote_id: int = 0


def _digest(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def step_signatures(session: Session, persona_id: int, step_ids: Iterable[int] | None = None) -> dict[int, str]:
    """step id -> the signature of its ranking inputs, for the persona's steps (or only `step_ids`).
    Votes count by (number, largest id, sum of winner ids, sum of loser ids): an insert raises the
    largest id, a delete lowers the number, and an id SQLite hands out again after a delete changes
    the sums unless the new vote is the same vote."""
    steps = select(models.RunStep.id, models.RunStep.status, models.RunStep.top_k).join(
        models.GenerationRun, models.RunStep.run_id == models.GenerationRun.id).where(
        models.GenerationRun.persona_id == persona_id)
    votes = select(models.Vote.step_id, func.count(), func.max(models.Vote.id), func.sum(models.Vote.winner_id),
                   func.sum(models.Vote.loser_id)).join(models.RunStep, models.Vote.step_id == models.RunStep.id).join(
        models.GenerationRun, models.RunStep.run_id == models.GenerationRun.id).where(
        models.GenerationRun.persona_id == persona_id).group_by(models.Vote.step_id)
    cands = select(models.Candidate.step_id, models.Candidate.id, models.Candidate.status).join(
        models.GenerationRun, models.Candidate.run_id == models.GenerationRun.id).where(
        models.GenerationRun.persona_id == persona_id)
    if step_ids is not None:
        wanted = sorted(set(step_ids))
        steps = steps.where(models.RunStep.id.in_(wanted))
        votes = votes.where(models.Vote.step_id.in_(wanted))
        cands = cands.where(models.Candidate.step_id.in_(wanted))
    vote_sums = {row[0]: tuple(int(v or 0) for v in row[1:]) for row in session.execute(votes)}
    members: dict[int, list[tuple[int, str]]] = {}
    for step_id, cand_id, status in session.execute(cands):
        members.setdefault(step_id, []).append((cand_id, status))
    return {step_id: _digest(status, top_k, vote_sums.get(step_id, (0, 0, 0, 0)), sorted(members.get(step_id, [])))
            for step_id, status, top_k in session.execute(steps)}


def stale_steps(session: Session, persona_id: int) -> list[int]:
    """The persona's steps whose stored signature is not the current one (never fitted included)."""
    current = step_signatures(session, persona_id)
    stored = {step_id: signature for step_id, signature in session.execute(
        select(models.RunStep.id, models.RunStep.ranked_signature).join(
            models.GenerationRun, models.RunStep.run_id == models.GenerationRun.id).where(
            models.GenerationRun.persona_id == persona_id))}
    return sorted(step_id for step_id, signature in current.items() if stored.get(step_id) != signature)


def _refit_step(session: Session, run: models.GenerationRun, step: models.RunStep, pick_winner: PickWinner,
                out: RankingsRefresh) -> None:
    """The full fit of one step, as the rankings asset always did it: Elo checked against the replay,
    Bradley–Terry written to the live candidates, the winner picked on an open final step."""
    cands = {c.id: c for c in session.scalars(select(models.Candidate).where(models.Candidate.step_id == step.id))}
    if not cands:
        return
    # Elo: the replay of the step's votes is the source of truth; count where stored scores differ.
    votes = session.execute(select(models.Vote.winner_id, models.Vote.loser_id)
                            .where(models.Vote.step_id == step.id).order_by(models.Vote.id)).all()
    for cid, standing in elo.replay([c for c in cands if cands[c].status in review.LIVE], votes).items():
        if cid in cands and cands[cid].elo != standing.elo:
            out.elo_corrections += 1
            cands[cid].elo = standing.elo
    ranking = review.step_ranking(session, step.id)
    for ranked in ranking:
        cand = cands[ranked.candidate_id]
        cand.bt_score, cand.bt_ci_low, cand.bt_ci_high = ranked.score, ranked.ci_low, ranked.ci_high
    k = step.top_k or review.default_top_k(step)
    out.low_votes += len(review.low_vote_candidates(ranking, k))
    # Winners come from the final step, once all its images are made.
    if step.position == len(run.steps) and step.status == "voting":
        picked = pick_winner(session, run, ranking)
        if picked:
            out.winners.append(cands[picked])
    for place, ranked in enumerate(ranking, start=1):
        cand = cands[ranked.candidate_id]
        out.rows.append({"run": run.id, "step": step.position, "place": place, "candidate": cand.id,
                         "bt_score": round(ranked.score, 1), "ci_low": round(ranked.ci_low, 1),
                         "ci_high": round(ranked.ci_high, 1), "elo": ranked.elo, "wins": ranked.wins,
                         "losses": ranked.losses, "in_top_k": place <= k, "status": cand.status,
                         "image": Path(cand.image_path).name})


def open_steps(session: Session, persona_id: int) -> list[StepToReview]:
    """The persona's steps open for votes, with their live candidates (the asset's to-review list)."""
    live = func.sum(case((models.Candidate.status.in_(review.LIVE), 1), else_=0))
    rows = session.execute(
        select(models.RunStep.id, models.RunStep.run_id, models.RunStep.position, models.RunStep.name, live)
        .join(models.GenerationRun, models.RunStep.run_id == models.GenerationRun.id)
        .join(models.Candidate, models.Candidate.step_id == models.RunStep.id)  # a step with no image is not listed
        .where(models.GenerationRun.persona_id == persona_id, models.RunStep.status == "voting")
        .group_by(models.RunStep.id, models.RunStep.run_id, models.RunStep.position, models.RunStep.name)
        .order_by(models.RunStep.run_id, models.RunStep.position)).all()
    return [StepToReview(step_id, run_id, position, name, int(n or 0)) for step_id, run_id, position, name, n in rows]


def refresh_rankings(session: Session, persona_id: int, pick_winner: PickWinner, *, step_ids: Iterable[int] = (),
                     full: bool = False) -> RankingsRefresh:
    """Refit the persona's steps whose inputs changed (and `step_ids`, the steps the caller knows got
    votes; all steps with `full`), in run and step order, and store each one's new signature."""
    out = RankingsRefresh()
    all_steps = list(session.execute(select(models.RunStep.id).join(
        models.GenerationRun, models.RunStep.run_id == models.GenerationRun.id).where(
        models.GenerationRun.persona_id == persona_id)).scalars())
    todo = set(all_steps) if full else (set(stale_steps(session, persona_id)) | (set(step_ids) & set(all_steps)))
    # The inputs as they are before the fit: a vote committed while the fit runs leaves the stored
    # signature behind the votes, so the next refresh fits the step again (never the other way round).
    # A winner picked here changes a status, and so also makes the next refresh fit that step once more.
    before = step_signatures(session, persona_id, todo) if todo else {}
    steps = sorted((session.get(models.RunStep, step_id) for step_id in todo), key=lambda s: (s.run_id, s.position))
    for step in steps:
        _refit_step(session, step.run, step, pick_winner, out)
        step.ranked_signature = before[step.id]
    session.flush()
    out.refit_step_ids = [s.id for s in steps]
    out.unchanged_steps = len(all_steps) - len(steps)
    out.open_steps = open_steps(session, persona_id)
    out.last_vote_id = session.scalar(select(func.max(models.Vote.id))) or 0
    return out
