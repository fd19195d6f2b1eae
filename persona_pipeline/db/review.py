"""Reviewer decisions on candidates: pair offers and votes, kills and restores, step approvals and winners (the
decisions on posts are in db/review_posts.py). The review form and the auto-reviewer call exactly
these functions, so every decision has one code path, one set of checks and one `ReviewEvent` row."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta, timezone
from typing import Any, Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain import elo
from persona_pipeline.domain.standings import BTStanding

LIVE = ("active", "winner")
OPEN_STEP = ("generating", "voting")  # a step whose candidates can still be voted on or killed
# An offer nobody answered stops blocking its pair after this long (a reviewer closed the tab).
OFFER_HOLD = timedelta(minutes=10)
# Bootstrap rounds for the ranking that decides top-K and winners (about 1000; docs/rules.md).
BOOTSTRAP_ROUNDS = 1000
LOW_VOTES = 5  # a top-K candidate with fewer votes than this gets a warning before approval
# A reviewer may take back their own vote for this long after casting it (the vote page's Undo;
# docs/review.md#undo). Long enough to notice a slip, short enough that a ranking someone already
# acted on (an approval, a winner) is not quietly rewritten: the step must also still be open.
UNDO_WINDOW = timedelta(minutes=5)


class ReviewError(ValueError):
    """A refused decision; `status_code` is what the review form answers with."""

    status_code = 400


class NotFound(ReviewError):
    status_code = 404


class DuplicateVote(ReviewError):
    status_code = 409


class OfferClosed(ReviewError):
    """The offer cannot be answered now: it was answered already, or the page has not shown it."""

    status_code = 409


class NotYourOffer(ReviewError):
    status_code = 403


def record_event(session: Session, persona_id: int, kind: str, subject_type: str, subject_id: int, reviewer: str,
                 payload: dict[str, Any] | None = None) -> models.ReviewEvent:
    """The `ReviewEvent` row every decision leaves (who, what, on which subject); the review sensor
    and the audit trail read these."""
    if not reviewer or not reviewer.strip():
        raise ReviewError("a decision needs a reviewer name")
    event = models.ReviewEvent(persona_id=persona_id, kind=kind, subject_type=subject_type, subject_id=subject_id,
                               reviewer=reviewer, payload=payload or {})
    session.add(event)
    return event


def _candidate(session: Session, candidate_id: int, lock: bool = False) -> models.Candidate:
    query = select(models.Candidate).where(models.Candidate.id == candidate_id)
    if lock:
        # FOR NO KEY UPDATE: the Elo update changes no key, and this lock, unlike FOR UPDATE, does not
        # conflict with the FOR KEY SHARE that PostgreSQL's foreign-key checks take when a pair offer
        # or vote naming this candidate is inserted (that conflict deadlocked concurrent votes).
        query = query.with_for_update(key_share=True)
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"candidate {candidate_id} does not exist")
    return row


def _open_step(session: Session, step_id: int) -> models.RunStep:
    step = session.get(models.RunStep, step_id)
    if step is None:
        raise NotFound(f"run step {step_id} does not exist")
    if step.status not in OPEN_STEP:
        raise ReviewError(f"step {step_id} is {step.status}; its candidates can no longer be voted on")
    return step


def _offer(session: Session, offer_id: int, lock: bool = False) -> models.PairOffer:
    query = select(models.PairOffer).where(models.PairOffer.id == offer_id)
    offer = session.scalar(query.with_for_update(key_share=True) if lock else query)
    if offer is None:
        raise NotFound(f"pair offer {offer_id} does not exist")
    return offer


def _open_offer(session: Session, offer_id: int, reviewer: str) -> models.PairOffer:
    """The offer, row-locked, if it was made to `reviewer` and is not answered yet."""
    offer = _offer(session, offer_id, lock=True)
    if offer.reviewer != reviewer:
        raise NotYourOffer(f"pair offer {offer_id} was offered to {offer.reviewer}, not {reviewer}")
    if offer.outcome == "voted":
        raise DuplicateVote(f"pair offer {offer_id} has already been voted on")
    if offer.outcome is not None:
        raise OfferClosed(f"pair offer {offer_id} was already answered ({offer.outcome})")
    return offer


def _answerable_offer(session: Session, offer_id: int, reviewer: str) -> models.PairOffer:
    """The open offer `reviewer` may answer now: the one on their screen. A preloaded next pair
    cannot be answered until the page says it showed it (`show_offer`), so a click meant for the
    pair before it never lands on it."""
    offer = _open_offer(session, offer_id, reviewer)
    if offer.shown_at is None:
        raise OfferClosed(f"pair offer {offer_id} was preloaded but not shown yet; only the pair on screen can be answered")
    return offer


def show_offer(session: Session, offer_id: int, reviewer: str) -> models.PairOffer:
    """The page put this preloaded offer on screen: from now on it can be answered."""
    offer = _open_offer(session, offer_id, reviewer)
    if offer.shown_at is None:
        offer.shown_at = models.utcnow()
        session.flush()
    return offer


def _vote_that_won(session: Session, offer_id: int | None) -> tuple[int, int | None] | None:
    """After a vote's insert broke a unique key: the vote already stored on this offer, read on a
    fresh connection (this transaction is aborted on PostgreSQL). A pair may have several votes
    (pairing asks a close pair again); an offer has one."""
    if offer_id is None:
        return None
    with session.get_bind().connect() as conn:
        row = conn.execute(select(models.Vote.id, models.Vote.offer_id).where(models.Vote.offer_id == offer_id)
                           .limit(1)).first()
    return (row.id, row.offer_id) if row else None


def cast_vote(session: Session, winner_id: int, loser_id: int, reviewer: str,
              selection_probability: float | None = None, offer_id: int | None = None) -> models.Vote:
    """Record one pairwise vote and apply Elo to both candidates in the caller's transaction.

    With `offer_id` (the form), the vote answers that offer: made to this reviewer, shown, not
    answered yet (one vote per offer), on exactly the offered pair; it records the probability the
    pair had of being shown. Any duplicate, also one that commits while this vote is being
    recorded, is a DuplicateVote. A pair may have several votes (each its own offer, or none)."""
    if winner_id == loser_id:
        raise ReviewError(f"candidate {winner_id} cannot be voted against itself")
    offer = None
    if offer_id is not None:
        offer = _answerable_offer(session, offer_id, reviewer)
        if {winner_id, loser_id} != {offer.left_id, offer.right_id}:
            raise ReviewError(f"candidates {winner_id} and {loser_id} are not the pair of offer {offer_id} "
                              f"({offer.left_id} and {offer.right_id})")
        selection_probability = offer.probability
    low, high = sorted((winner_id, loser_id))
    # Lock in id order so two concurrent votes on overlapping pairs cannot deadlock.
    first, second = _candidate(session, low, lock=True), _candidate(session, high, lock=True)
    winner, loser = (first, second) if first.id == winner_id else (second, first)
    if winner.step_id != loser.step_id:
        raise ReviewError(f"candidates {winner_id} and {loser_id} belong to different runs or steps")
    step = _open_step(session, winner.step_id)
    # Read before anything changes: a lazy load after the vote is added would autoflush it outside
    # the try below, and a duplicate would escape as a raw IntegrityError.
    persona_id = step.run.persona_id
    for cand in (winner, loser):
        if cand.status not in LIVE:
            raise ReviewError(f"candidate {cand.id} is {cand.status} and cannot be voted on")

    winner_before, loser_before = winner.elo, loser.elo
    winner_after, loser_after = elo.apply_vote(winner_before, loser_before)
    vote = models.Vote(step_id=step.id, winner_id=winner.id, loser_id=loser.id, pair_low_id=low, pair_high_id=high,
                       winner_elo_before=winner_before, loser_elo_before=loser_before,
                       elo_delta=winner_after - winner_before, selection_probability=selection_probability,
                       reviewer=reviewer, offer_id=offer.id if offer else None)
    try:  # every change, and the one flush that writes them, in here
        winner.elo, loser.elo = winner_after, loser_after
        if offer is not None:
            offer.outcome = "voted"
        session.add(vote)
        session.flush()
    except IntegrityError:
        # SQLite has no row locks: a concurrent identical vote passes the checks above and is
        # refused only here, by the unique key on the offer.
        if _vote_that_won(session, offer_id) is None:
            raise
        raise DuplicateVote(f"pair offer {offer_id} has already been voted on") from None
    record_event(session, persona_id, "vote", "vote", vote.id, reviewer,
                 {"winner_id": winner.id, "loser_id": loser.id, "step_id": step.id, "offer_id": vote.offer_id,
                  "selection_probability": selection_probability})
    session.flush()
    return vote


def replay_step_elo(session: Session, step_id: int) -> None:
    """Set every candidate of the step to the Elo the replay of its (remaining) votes gives, from
    1000, in vote order: after a vote is undone, Elo is as if it had never been cast (the rankings
    asset checks the same replay)."""
    cands = list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == step_id)
                                 .with_for_update(key_share=True).order_by(models.Candidate.id)))
    standings = elo.replay([c.id for c in cands], _step_votes(session, step_id))
    for cand in cands:
        cand.elo = standings[cand.id].elo


def undo_vote(session: Session, vote_id: int, reviewer: str) -> dict[str, Any]:
    """Take back a vote: only the reviewer's own, within UNDO_WINDOW, while its step is open.

    The `Vote` row is deleted, so nothing that reads votes (Bradley–Terry in `step_ranking`, the
    Elo replay, the unvoted-pair count, the gallery's wins and losses, the weekly report) can count
    it again; the whole vote is kept in the `undo_vote` event's payload (the audit trail), next to
    the `vote` event that recorded it. Its offer is marked `undone`, so the pair can be offered
    again. Elo of the step's candidates is replayed without it. Returns the undone vote's fields."""
    vote = session.scalar(select(models.Vote).where(models.Vote.id == vote_id).with_for_update())
    if vote is None:
        if session.scalar(select(models.ReviewEvent.id).where(models.ReviewEvent.kind == "undo_vote",
                                                              models.ReviewEvent.subject_id == vote_id)) is not None:
            raise DuplicateVote(f"vote {vote_id} has already been undone")
        raise NotFound(f"vote {vote_id} does not exist")
    if vote.reviewer != reviewer:
        raise NotYourOffer(f"vote {vote_id} was cast by {vote.reviewer}; only they can undo it")
    created = vote.created_at if vote.created_at.tzinfo else vote.created_at.replace(tzinfo=timezone.utc)
    if models.utcnow() - created > UNDO_WINDOW:
        minutes = int(UNDO_WINDOW.total_seconds() // 60)
        raise ReviewError(f"vote {vote_id} is more than {minutes} minutes old and can no longer be undone")
    step = session.get(models.RunStep, vote.step_id)
    if step.status not in OPEN_STEP:
        raise ReviewError(f"step {step.id} is {step.status}; its votes can no longer be undone")
    undone = {"vote_id": vote.id, "step_id": vote.step_id, "winner_id": vote.winner_id, "loser_id": vote.loser_id,
              "offer_id": vote.offer_id, "elo_delta": vote.elo_delta, "winner_elo_before": vote.winner_elo_before,
              "loser_elo_before": vote.loser_elo_before, "selection_probability": vote.selection_probability,
              "voted_at": created.isoformat()}
    if vote.offer_id is not None:
        offer = _offer(session, vote.offer_id, lock=True)
        offer.outcome = "undone"
    persona_id = step.run.persona_id
    session.delete(vote)
    session.flush()
    replay_step_elo(session, step.id)
    record_event(session, persona_id, "undo_vote", "vote", undone["vote_id"], reviewer, undone)
    session.flush()
    return undone


def undo_skip(session: Session, offer_id: int, reviewer: str) -> models.PairOffer:
    """Take back a skip (the reviewer's own, within UNDO_WINDOW): the offer is marked `undone`, so
    the pair may be put to this reviewer again (`next_pair` holds back only pairs they skipped)."""
    offer = _offer(session, offer_id, lock=True)
    if offer.reviewer != reviewer:
        raise NotYourOffer(f"pair offer {offer_id} was offered to {offer.reviewer}, not {reviewer}")
    if offer.outcome != "skipped":
        raise ReviewError(f"pair offer {offer_id} is {offer.outcome or 'open'}, not skipped; there is no skip to undo")
    skip = session.scalar(select(models.ReviewEvent).where(
        models.ReviewEvent.kind == "skip", models.ReviewEvent.subject_type == "offer",
        models.ReviewEvent.subject_id == offer.id).order_by(models.ReviewEvent.id.desc()).limit(1))
    if skip is not None:
        at = skip.created_at if skip.created_at.tzinfo else skip.created_at.replace(tzinfo=timezone.utc)
        if models.utcnow() - at > UNDO_WINDOW:
            raise ReviewError(f"the skip of pair offer {offer_id} is more than "
                              f"{int(UNDO_WINDOW.total_seconds() // 60)} minutes old and can no longer be undone")
    step = session.get(models.RunStep, offer.step_id)
    offer.outcome = "undone"
    record_event(session, step.run.persona_id, "undo_skip", "offer", offer.id, reviewer,
                 {"step_id": offer.step_id, "left_id": offer.left_id, "right_id": offer.right_id,
                  "skip_event_id": skip.id if skip is not None else None})
    session.flush()
    return offer


def offer_again(session: Session, offer_id: int, reviewer: str) -> models.PairOffer | None:
    """After an undo on the vote page: a new offer of the same pair, on screen at once, so the
    reviewer can answer it again (None when it cannot be: a candidate is no longer live, the step
    closed). Only for the reviewer's own offer whose answer was taken back (a vote or a skip undone,
    or a kill restored). It keeps the first offer's probability; its strategy says it was asked again."""
    old = _offer(session, offer_id)
    if old.reviewer != reviewer:
        raise NotYourOffer(f"pair offer {offer_id} was offered to {old.reviewer}, not {reviewer}")
    if old.outcome not in ("undone", "killed"):
        raise ReviewError(f"pair offer {offer_id} is {old.outcome or 'open'}; only an undone answer is offered again")
    step = session.get(models.RunStep, old.step_id)
    if step.status not in OPEN_STEP:
        return None
    statuses = set(session.scalars(select(models.Candidate.status).where(
        models.Candidate.id.in_((old.left_id, old.right_id)))))
    if not statuses <= set(LIVE):
        return None
    offer = models.PairOffer(step_id=old.step_id, left_id=old.left_id, right_id=old.right_id, probability=old.probability,
                             strategy="again", reviewer=reviewer, shown_at=models.utcnow())
    session.add(offer)
    session.flush()
    return offer


def default_top_k(step: models.RunStep) -> int:
    """The K persona.yaml set for this step when the run started (2 when it set none)."""
    specs = (step.run.pipeline or {}).get("steps", [])
    return int(specs[step.position - 1]["top_k"]) if len(specs) >= step.position else 2


def _step_votes(session: Session, step_id: int) -> list[tuple[int, int]]:
    return [tuple(v) for v in session.execute(select(models.Vote.winner_id, models.Vote.loser_id)
                                              .where(models.Vote.step_id == step_id).order_by(models.Vote.id)).all()]


def next_pair(session: Session, step_id: int, reviewer: str, exclude_offer_ids: Iterable[int] = (),
              exploration: float = 0.1, rng: random.Random | None = None, shown: bool = True) -> models.PairOffer | None:
    """Choose and record the next pair to show on a step (None when no pair can be offered: fewer
    than two live candidates, or every pair held or skipped as below).

    A pair with votes may be offered again (`pairing.choose_pair` asks a close pair at the top-K
    boundary until its order is settled). Pairs of the caller's still-held offers
    (`exclude_offer_ids`, the pair the page has preloaded), pairs this reviewer skipped and pairs
    offered to anyone in the last OFFER_HOLD without an answer are never offered, so two reviewers
    are not shown the same pair at once. `shown=False` is the page
    preloading its next pair: that offer can be answered only after `show_offer`."""
    # One next_pair per step at a time (row lock on the step until commit), so each one sees the
    # offers committed before it; without it, concurrent requests all pick the same greedy pair.
    session.scalar(select(models.RunStep.id).where(models.RunStep.id == step_id).with_for_update(key_share=True))
    step = _open_step(session, step_id)
    live = list(session.scalars(select(models.Candidate.id).where(
        models.Candidate.step_id == step_id, models.Candidate.status.in_(LIVE)).order_by(models.Candidate.id)))
    held = select(models.PairOffer.left_id, models.PairOffer.right_id).where(
        models.PairOffer.step_id == step_id, models.PairOffer.outcome.is_(None))
    exclude_ids = [int(i) for i in exclude_offer_ids]
    recent = held.where(models.PairOffer.created_at >= models.utcnow() - OFFER_HOLD)
    exclude = {frozenset(p) for p in session.execute(recent).all()}
    # A pair this reviewer skipped is not put to them again (another reviewer may still decide it).
    skipped = select(models.PairOffer.left_id, models.PairOffer.right_id).where(
        models.PairOffer.step_id == step_id, models.PairOffer.outcome == "skipped", models.PairOffer.reviewer == reviewer)
    exclude |= {frozenset(p) for p in session.execute(skipped).all()}
    if exclude_ids:
        exclude |= {frozenset(p) for p in session.execute(held.where(models.PairOffer.id.in_(exclude_ids))).all()}
    from persona_pipeline.domain import pairing  # numpy: here, not when the code location loads

    rng = rng or random.Random()
    choice = pairing.choose_pair(live, _step_votes(session, step_id), default_top_k(step) if step.top_k is None else step.top_k,
                                 exclude=frozenset(exclude), exploration=exploration, rng=rng)
    if choice is None:
        return None
    left, right = (choice.left_id, choice.right_id) if rng.random() < 0.5 else (choice.right_id, choice.left_id)
    offer = models.PairOffer(step_id=step_id, left_id=left, right_id=right, probability=choice.probability,
                             strategy=choice.strategy, reviewer=reviewer, shown_at=models.utcnow() if shown else None)
    session.add(offer)
    session.flush()
    return offer


def skip_offer(session: Session, offer_id: int, reviewer: str) -> models.PairOffer:
    """The reviewer could not decide: the pair is closed for this offer and may come back later."""
    offer = _answerable_offer(session, offer_id, reviewer)
    offer.outcome = "skipped"
    step = session.get(models.RunStep, offer.step_id)
    record_event(session, step.run.persona_id, "skip", "offer", offer.id, reviewer,
                 {"step_id": offer.step_id, "left_id": offer.left_id, "right_id": offer.right_id})
    session.flush()
    return offer


def pick_winner(session: Session, run_id: int, candidate_id: int, reviewer: str) -> models.GenerationRun:
    run = session.get(models.GenerationRun, run_id)
    if run is None:
        raise NotFound(f"generation run {run_id} does not exist")
    candidate = _candidate(session, candidate_id)
    if candidate.run_id != run_id:
        raise ReviewError(f"candidate {candidate_id} is not from run {run_id}")
    if candidate.status not in LIVE:
        raise ReviewError(f"candidate {candidate_id} is {candidate.status} and cannot win")
    final = max(step.position for step in run.steps)
    step = session.get(models.RunStep, candidate.step_id)
    if step.position != final:
        raise ReviewError(f"candidate {candidate_id} is from step {step.position}; the winner comes from the final step {final}")
    if step.status not in ("voting", "approved"):
        raise ReviewError(f"step {step.id} is {step.status}; a winner is picked once all its images are made")
    if run.winner_candidate_id is not None and run.winner_candidate_id != candidate_id:
        previous = session.get(models.Candidate, run.winner_candidate_id)
        if previous is not None and previous.status == "winner":
            previous.status = "active"
    run.winner_candidate_id = candidate.id
    run.status = "done"
    candidate.status = "winner"
    record_event(session, run.persona_id, "pick_winner", "run", run.id, reviewer, {"candidate_id": candidate.id})
    session.flush()
    return run


@dataclass(frozen=True)
class RankedCandidate(BTStanding):
    """A step's live candidate as the form shows it: its Bradley–Terry standing (the ranking that
    decides) plus its Elo, status and image."""

    elo: int
    status: str
    image_path: str


def step_ranking(session: Session, step_id: int, rounds: int = BOOTSTRAP_ROUNDS) -> list[RankedCandidate]:
    """The step's live candidates, best first, by a Bradley–Terry fit of its votes with bootstrap
    95% intervals. Ties: see `bradley_terry.rank` (score, more wins, fewer losses, lower id)."""
    live = {c.id: c for c in session.scalars(select(models.Candidate).where(
        models.Candidate.step_id == step_id, models.Candidate.status.in_(LIVE)))}
    from persona_pipeline.domain import bradley_terry  # numpy: here, not when the code location loads

    standings = bradley_terry.rank(sorted(live), _step_votes(session, step_id), rounds=rounds, seed=step_id)
    return [RankedCandidate(**vars(s), elo=live[s.candidate_id].elo, status=live[s.candidate_id].status,
                            image_path=live[s.candidate_id].image_path) for s in standings]


def low_vote_candidates(ranking: list[RankedCandidate], top_k: int) -> list[int]:
    """Candidates in the top K with fewer than LOW_VOTES votes: approving now is a guess for them."""
    return [r.candidate_id for r in ranking[:top_k] if r.votes < LOW_VOTES]


def kill_candidate(session: Session, candidate_id: int, reviewer: str, reason: str = "",
                   offer_id: int | None = None) -> models.Candidate:
    """Take a candidate out of its step (the generator makes a replacement while the step is open).

    With `offer_id` (the vote page), the kill answers that offer under the same rule as a vote: made
    to this reviewer, on screen, not answered yet; so a double click or a preloaded pair cannot kill
    an image the reviewer never saw."""
    if offer_id is not None:
        offer = _answerable_offer(session, offer_id, reviewer)
        if candidate_id not in (offer.left_id, offer.right_id):
            raise ReviewError(f"candidate {candidate_id} is not in pair offer {offer_id}")
        offer.outcome = "killed"
    candidate = _candidate(session, candidate_id, lock=True)
    if candidate.status == "killed":
        raise ReviewError(f"candidate {candidate_id} is already killed")
    if candidate.status not in ("active", "culled"):
        raise ReviewError(f"candidate {candidate_id} is {candidate.status} and cannot be killed")
    step = session.get(models.RunStep, candidate.step_id)
    if step.status == "approved":
        raise ReviewError(f"step {step.id} is already approved; its candidates can no longer be killed")
    previous = candidate.status
    candidate.status = "killed"
    candidate.status_reason = f"killed by {reviewer}" + (f": {reason}" if reason else "")
    if step.status == "voting" and step.run.status != "done":  # the freed place gets a replacement
        step.status = "generating"
        step.run.status = "running"
    # previous_status: what restore_candidate puts back
    record_event(session, candidate.run.persona_id, "kill", "candidate", candidate.id, reviewer,
                 {"step_id": step.id, "reason": reason, "previous_status": previous})
    session.flush()
    return candidate


def restore_candidate(session: Session, candidate_id: int, reviewer: str, reason: str = "") -> models.Candidate:
    """Undo a kill: the candidate is live again in its step, with the status it had before the kill
    (`active`, or `culled`), and its votes count in the ranking again (`step_ranking` ranks the live
    candidates on all of the step's votes, so nothing else needs recomputing). Only while the step is
    open, as for a kill. A replacement the kill already caused stays: the step then holds one image
    more than it asked for. The `restore` event starts advance_runs (review sensor), which moves a step
    the kill sent back to generating on to voting once nothing is missing."""
    candidate = _candidate(session, candidate_id, lock=True)
    if candidate.status != "killed":
        raise ReviewError(f"candidate {candidate_id} is {candidate.status}, not killed; there is nothing to restore")
    step = session.get(models.RunStep, candidate.step_id)
    if step.status not in OPEN_STEP:
        raise ReviewError(f"step {step.id} is {step.status}; its killed candidates can no longer be restored")
    kill = session.scalar(select(models.ReviewEvent).where(
        models.ReviewEvent.kind == "kill", models.ReviewEvent.subject_type == "candidate",
        models.ReviewEvent.subject_id == candidate.id).order_by(models.ReviewEvent.id.desc()).limit(1))
    previous = (kill.payload or {}).get("previous_status") if kill is not None else None
    candidate.status = previous if previous in ("active", "culled") else "active"
    candidate.status_reason = f"restored by {reviewer}" + (f": {reason}" if reason else "")
    record_event(session, candidate.run.persona_id, "restore", "candidate", candidate.id, reviewer,
                 {"step_id": step.id, "reason": reason, "status": candidate.status,
                  "kill_event_id": kill.id if kill is not None else None})
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
    low_votes = low_vote_candidates(ranking, top_k)
    step.status = "approved"
    step.top_k = top_k
    step.approved_at = models.utcnow()
    nxt = session.scalar(select(models.RunStep).where(models.RunStep.run_id == step.run_id,
                                                      models.RunStep.position == step.position + 1))
    if nxt is not None:
        nxt.parent_ids = parents
        nxt.status = "generating"
        step.run.status = "running"
    record_event(session, step.run.persona_id, "approve_step", "step", step.id, reviewer,
                 {"top_k": top_k, "parents": parents, "low_vote_candidates": low_votes,
                  "scores": {str(r.candidate_id): round(r.score, 1) for r in ranking[:top_k]}})
    session.flush()
    return step
