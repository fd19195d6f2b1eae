"""Reviewer decisions. The review form and the auto-reviewer call exactly these functions, so
every decision has one code path, one set of checks and one `ReviewEvent` row."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain import bradley_terry, elo, pairing, post_states
from persona_pipeline.domain.captions import validate_post_text
from persona_pipeline.domain.slots import in_window, next_free_slot
from persona_pipeline.personas import PersonaConfig

LIVE = ("active", "winner")
OPEN_STEP = ("generating", "voting")  # a step whose candidates can still be voted on or killed
# An offer nobody answered stops blocking its pair after this long (a reviewer closed the tab).
OFFER_HOLD = timedelta(minutes=10)
# Bootstrap rounds for the ranking that decides top-K and winners (REFERENCES.md §4: about 1000).
BOOTSTRAP_ROUNDS = 1000
LOW_VOTES = 5  # a top-K candidate with fewer votes than this gets a warning before approval


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
    _event(session, persona_id, "vote", "vote", vote.id, reviewer,
           {"winner_id": winner.id, "loser_id": loser.id, "step_id": step.id, "offer_id": vote.offer_id,
            "selection_probability": selection_probability})
    session.flush()
    return vote


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
    _event(session, step.run.persona_id, "skip", "offer", offer.id, reviewer,
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
    _event(session, run.persona_id, "pick_winner", "run", run.id, reviewer, {"candidate_id": candidate.id})
    session.flush()
    return run


@dataclass(frozen=True)
class RankedCandidate(bradley_terry.BTStanding):
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
    standings = bradley_terry.rank(sorted(live), _step_votes(session, step_id), rounds=rounds, seed=step_id)
    return [RankedCandidate(**vars(s), elo=live[s.candidate_id].elo, status=live[s.candidate_id].status,
                            image_path=live[s.candidate_id].image_path) for s in standings]


def low_vote_candidates(ranking: list[RankedCandidate], top_k: int) -> list[int]:
    """Candidates in the top K with fewer than LOW_VOTES votes: approving now is a guess for them."""
    return [r.candidate_id for r in ranking[:top_k] if r.votes < LOW_VOTES]


def kill_candidate(session: Session, candidate_id: int, reviewer: str, reason: str = "",
                   offer_id: int | None = None) -> models.Candidate:
    """Take a candidate out of its step (the generator makes a replacement while the step is open)."""
    if offer_id is not None:
        offer = _offer(session, offer_id, lock=True)
        if candidate_id not in (offer.left_id, offer.right_id):
            raise ReviewError(f"candidate {candidate_id} is not in pair offer {offer_id}")
        offer.outcome = offer.outcome or "killed"
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
    if step.status == "voting" and step.run.status != "done":  # the freed place gets a replacement
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
    _event(session, step.run.persona_id, "approve_step", "step", step.id, reviewer, {"top_k": top_k, "parents": parents, "low_vote_candidates": low_votes,
                                                                        "scores": {str(r.candidate_id): round(r.score, 1) for r in ranking[:top_k]}})
    session.flush()
    return step


def set_post_status(session: Session, post: models.Post, new_status: str, reason: str | None = None) -> None:
    post_states.check_transition(post.status, new_status)
    post.status = new_status
    if new_status == post_states.FAILED:
        post.failure_reason = reason
        post.retry_count += 1


def _post(session: Session, post_id: int) -> models.Post:
    post = session.scalar(select(models.Post).where(models.Post.id == post_id).with_for_update())
    if post is None:
        raise NotFound(f"post {post_id} does not exist")
    return post


def _post_config(session: Session, post: models.Post) -> PersonaConfig:
    return PersonaConfig.model_validate(session.get(models.Persona, post.persona_id).settings)


def _taken_slots(session: Session, post: models.Post) -> list[datetime]:
    return list(session.scalars(select(models.Post.scheduled_at).where(
        models.Post.account == post.account, models.Post.id != post.id,
        models.Post.status.in_(post_states.HOLDS_IMAGE - {post_states.PUBLISHED}))))


def _transition(post: models.Post, new_status: str) -> None:
    try:
        post_states.check_transition(post.status, new_status)
    except post_states.IllegalTransition as exc:
        raise ReviewError(f"post {post.id}: {exc}") from None


# A failed post can be edited and moved too: a caption over the limits is fixed, then retried.
EDITABLE = (post_states.DRAFT, post_states.AWAITING_APPROVAL, post_states.SCHEDULED, post_states.FAILED)
_HASHTAG = re.compile(r"^#?(\w+)$")


def approve_post(session: Session, post_id: int, reviewer: str, now: datetime | None = None) -> models.Post:
    """Approve a post: it becomes `scheduled`. A slot that passed while it waited moves to the next
    free one inside the persona's posting windows (the event records both)."""
    post = _post(session, post_id)
    _transition(post, post_states.SCHEDULED)
    now = now or datetime.now(timezone.utc)
    config = _post_config(session, post)
    planned = post.scheduled_at
    if planned < now or not in_window(planned, config.windows(), config.timezone):
        post.scheduled_at = next_free_slot(max(now, planned), config.windows(), config.timezone, _taken_slots(session, post),
                                           timedelta(minutes=config.min_minutes_between_posts))
    post.status = post_states.SCHEDULED  # checked by _transition above
    _event(session, post.persona_id, "approve_post", "post", post.id, reviewer,
           {"scheduled_at": post.scheduled_at.isoformat(), "planned_at": planned.isoformat()})
    session.flush()
    return post


def edit_post(session: Session, post_id: int, caption: str, hashtags: list[str], reviewer: str) -> models.Post:
    """Change a post's caption and hashtags, validated as the posting step validates them."""
    post = _post(session, post_id)
    if post.status not in EDITABLE:
        raise ReviewError(f"post {post_id} is {post.status}; only a post not yet publishing can be edited")
    tags = []
    for raw in hashtags:
        match = _HASHTAG.match(raw.strip())
        if not match:
            raise ReviewError(f"hashtag {raw!r} is not a single word of letters, digits or _")
        tags.append("#" + match.group(1))
    tags = list(dict.fromkeys(tags))
    caption = caption.strip()
    if not caption:
        raise ReviewError("the caption is empty")
    problems = validate_post_text(caption, tags, _post_config(session, post).hashtags.max_per_post)
    if problems:
        raise ReviewError(f"post {post_id}: " + "; ".join(problems))
    before = {"caption": post.caption, "hashtags": list(post.hashtags)}
    post.caption, post.hashtags = caption, tags
    _event(session, post.persona_id, "edit_post", "post", post.id, reviewer,
           {"before": before, "after": {"caption": caption, "hashtags": tags}})
    session.flush()
    return post


def reject_post(session: Session, post_id: int, reviewer: str, reason: str = "") -> models.Post:
    """Cancel a post; its image goes back to the library for another post."""
    post = _post(session, post_id)
    _transition(post, post_states.CANCELLED)
    post.status = post_states.CANCELLED  # checked by _transition above
    post.review_note = f"rejected by {reviewer}" + (f": {reason}" if reason else "")
    _event(session, post.persona_id, "reject_post", "post", post.id, reviewer, {"reason": reason})
    session.flush()
    return post


def retry_post(session: Session, post_id: int, reviewer: str, now: datetime | None = None) -> models.Post:
    """Send a failed post again (a person's decision, e.g. after a spam block or a fixed token):
    it becomes `scheduled` at once, or at its slot if that is still ahead."""
    post = _post(session, post_id)
    _transition(post, post_states.SCHEDULED)
    now = now or datetime.now(timezone.utc)
    reason = post.failure_reason
    post.status, post.retryable, post.next_attempt_at = post_states.SCHEDULED, True, None
    post.review_note = f"retried by {reviewer} after: {reason}"
    _event(session, post.persona_id, "retry_post", "post", post.id, reviewer,
           {"failure_reason": reason, "retry_count": post.retry_count,
            "due": max(post.scheduled_at, now).isoformat()})
    session.flush()
    return post


def abandon_post(session: Session, post_id: int, reviewer: str, reason: str = "") -> models.Post:
    """Give up on a failed post; its image goes back to the library for another post."""
    post = _post(session, post_id)
    _transition(post, post_states.ABANDONED)
    post.status = post_states.ABANDONED  # checked by _transition above
    post.review_note = f"abandoned by {reviewer}" + (f": {reason}" if reason else "")
    _event(session, post.persona_id, "abandon_post", "post", post.id, reviewer,
           {"reason": reason, "failure_reason": post.failure_reason})
    session.flush()
    return post


def move_post(session: Session, post_id: int, new_time: datetime, reviewer: str, now: datetime | None = None) -> models.Post:
    """Move a post to another slot: in the future, inside a posting window (persona's timezone),
    and at least the persona's minimum gap from the account's other posts."""
    post = _post(session, post_id)
    if post.status not in EDITABLE:
        raise ReviewError(f"post {post_id} is {post.status}; only a post not yet publishing can be moved")
    if new_time.tzinfo is None:
        raise ReviewError(f"slot {new_time.isoformat()} has no timezone")
    new_time = new_time.astimezone(timezone.utc).replace(microsecond=0)
    now = now or datetime.now(timezone.utc)
    config = _post_config(session, post)
    if new_time <= now:
        raise ReviewError(f"slot {new_time.isoformat()} is in the past")
    if not in_window(new_time, config.windows(), config.timezone):
        raise ReviewError(f"slot {new_time.astimezone(ZoneInfo(config.timezone)).strftime('%Y-%m-%d %H:%M')} "
                          f"({config.timezone}) is outside the posting windows {', '.join(config.posting_windows)}")
    gap = timedelta(minutes=config.min_minutes_between_posts)
    clash = [t for t in _taken_slots(session, post) if abs(t - new_time) < gap]
    if clash:
        raise ReviewError(f"slot {new_time.isoformat()} is within {config.min_minutes_between_posts} minutes of another "
                          f"post of {post.account} at {clash[0].isoformat()}")
    before = post.scheduled_at
    post.scheduled_at = new_time
    post.review_note = f"moved by {reviewer} from {before.isoformat()}"
    _event(session, post.persona_id, "move_post", "post", post.id, reviewer,
           {"from": before.isoformat(), "to": new_time.isoformat()})
    session.flush()
    return post
