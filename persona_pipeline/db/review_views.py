"""Read-only views the review form shows: what needs a person now, one step's ranking, the posts
waiting for approval. Writes go through db/review.py and db/review_posts.py only."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Row, and_, func, or_, select
from sqlalchemy.orm import Session, selectinload

from persona_pipeline.db import models
from persona_pipeline.db.review import LIVE, OPEN_STEP, NotFound, RankedCandidate, default_top_k, low_vote_candidates, step_ranking
from persona_pipeline.domain import post_states


@dataclass
class PersonaQueue:
    """What one persona needs from a reviewer now, with counts."""

    slug: str
    name: str
    pairs_to_vote: int = 0
    steps_to_vote: list[int] = field(default_factory=list)
    steps_to_approve: list[int] = field(default_factory=list)
    runs_to_pick: list[int] = field(default_factory=list)
    posts_to_approve: int = 0

    @property
    def total(self) -> int:
        return self.pairs_to_vote + len(self.steps_to_approve) + len(self.runs_to_pick) + self.posts_to_approve


def unvoted_pairs(session: Session, step_id: int) -> int:
    """Pairs of the step's live candidates nobody has voted on yet: the one count of "pairs not
    voted yet" that the queue, the gallery and the vote page all show (the vote page gets it with
    every answer, never estimates it). A pair asked again after a vote, a skip, or a vote cast
    while another reviewer's vote on the same pair lands, does not lower it; an undone vote or a
    restored candidate raises it again."""
    return unvoted_pairs_of(session, [step_id])[step_id]


def unvoted_pairs_of(session: Session, step_ids: list[int]) -> dict[int, int]:
    """`unvoted_pairs` of several steps, in two queries whatever their number (the review queue)."""
    if not step_ids:
        return {}
    live: dict[int, set[int]] = {step_id: set() for step_id in step_ids}
    for step_id, cand_id in session.execute(select(models.Candidate.step_id, models.Candidate.id).where(
            models.Candidate.step_id.in_(step_ids), models.Candidate.status.in_(LIVE))):
        live[step_id].add(cand_id)
    # Distinct pairs (a close pair may have several votes), of two live candidates.
    voted = dict.fromkeys(step_ids, 0)
    for step_id, low, high in session.execute(select(models.Vote.step_id, models.Vote.pair_low_id, models.Vote.pair_high_id)
                                              .where(models.Vote.step_id.in_(step_ids)).distinct()):
        if low in live[step_id] and high in live[step_id]:
            voted[step_id] += 1
    return {step_id: len(live[step_id]) * (len(live[step_id]) - 1) // 2 - voted[step_id] for step_id in step_ids}


def review_queue(session: Session) -> list[PersonaQueue]:
    """Every active persona's open work, busiest first (then by slug)."""
    queues = {p.id: PersonaQueue(p.slug, p.name) for p in session.scalars(
        select(models.Persona).where(models.Persona.active.is_(True)))}
    runs = list(session.scalars(select(models.GenerationRun).where(
        models.GenerationRun.persona_id.in_(queues), models.GenerationRun.status.in_(("running", "awaiting_review")))
        .options(selectinload(models.GenerationRun.steps)).order_by(models.GenerationRun.id)))
    # One query for the open steps of every open run (not two per step): the queue lists the whole studio.
    unvoted_of = unvoted_pairs_of(session, [s.id for run in runs for s in run.steps if s.status in OPEN_STEP])
    for run in runs:
        queue = queues[run.persona_id]
        final = len(run.steps)
        for step in run.steps:
            if step.status in OPEN_STEP:
                unvoted = unvoted_of[step.id]
                if unvoted > 0:
                    queue.pairs_to_vote += unvoted
                    queue.steps_to_vote.append(step.id)
            if step.status == "voting" and step.position < final:
                queue.steps_to_approve.append(step.id)
        if run.winner_candidate_id is None and run.steps and run.steps[-1].status in ("voting", "approved"):
            queue.runs_to_pick.append(run.id)
    waiting = session.execute(select(models.Post.persona_id, func.count()).where(
        models.Post.persona_id.in_(queues), models.Post.status == post_states.AWAITING_APPROVAL)
        .group_by(models.Post.persona_id)).all()
    for persona_id, count in waiting:
        queues[persona_id].posts_to_approve = count
    return sorted(queues.values(), key=lambda q: (-q.total, q.slug))


@dataclass
class StepView:
    step: models.RunStep
    run: models.GenerationRun
    persona_slug: str
    ranking: list[RankedCandidate]
    k_default: int
    is_final_step: bool
    unvoted_pairs: int

    @property
    def can_approve(self) -> bool:
        """A step that is not the last is approved with K once all its images are made."""
        return self.step.status == "voting" and not self.is_final_step and bool(self.ranking)

    @property
    def can_pick(self) -> bool:
        """The final step's candidates can win once all its images are made."""
        return self.is_final_step and self.step.status in ("voting", "approved") and self.run.status != "failed"

    def low_vote_warning(self, top_k: int | None = None) -> list[int]:
        return low_vote_candidates(self.ranking, top_k or self.k_default)


def step_view(session: Session, step_id: int) -> StepView:
    step = session.get(models.RunStep, step_id)
    if step is None:
        raise NotFound(f"run step {step_id} does not exist")
    run = step.run
    ranking = step_ranking(session, step_id)
    k_default = min(step.top_k or default_top_k(step), max(len(ranking), 1))
    slug = session.get(models.Persona, run.persona_id).slug
    return StepView(step, run, slug, ranking, k_default, step.position == len(run.steps), unvoted_pairs(session, step_id))


def posts_to_review(session: Session, slug: str | None = None) -> list[models.Post]:
    """Posts awaiting approval, and failed posts that wait for a person (retry or abandon), soonest
    slot first (optionally of one persona)."""
    query = select(models.Post).where(models.Post.status.in_((post_states.AWAITING_APPROVAL, post_states.FAILED)))
    if slug:
        query = query.where(models.Post.persona_id == persona_by_slug(session, slug).id)
    return list(session.scalars(query.order_by(models.Post.scheduled_at, models.Post.id)))


def persona_by_slug(session: Session, slug: str) -> models.Persona:
    persona = session.scalar(select(models.Persona).where(models.Persona.slug == slug))
    if persona is None:
        raise NotFound(f"persona {slug!r} does not exist")
    return persona


def calendar_posts(session: Session, statuses: tuple[str, ...], start: datetime, end: datetime,
                   slug: str | None = None) -> list[Row]:
    """Posts in `statuses` that are (or were) in the feed in [start, end): placed at their
    publication time when published, else at their slot; soonest first (optionally of one persona).
    Rows of what a calendar card shows (a month of a busy studio is thousands of posts: ORM objects
    cost three times as much), `candidate_image` for a post without its own media."""
    post = models.Post
    moment = func.coalesce(post.published_at, post.scheduled_at)
    # The range on each column (the same rows as on `moment`), so their indexes find a month's posts.
    in_range = or_(and_(post.published_at.is_not(None), post.published_at >= start, post.published_at < end),
                   and_(post.published_at.is_(None), post.scheduled_at >= start, post.scheduled_at < end))
    query = (select(post.id, post.persona_id, post.account, post.status, post.caption, post.media_path,
                    post.scheduled_at, post.published_at, models.Candidate.image_path.label("candidate_image"))
             .outerjoin(models.Candidate, models.Candidate.id == post.candidate_id)
             .where(post.status.in_(statuses), in_range))
    if slug:
        query = query.where(post.persona_id == persona_by_slug(session, slug).id)
    return list(session.execute(query.order_by(moment, post.id)))
