"""Auto-review: until the review form exists, votes, winners and post approvals can be cast from
open_clip scores, through the same database calls the form uses (db/review.py)."""

from __future__ import annotations

import itertools

import dagster as dg
from sqlalchemy.orm import Session

from persona_pipeline.db import models, review
from persona_pipeline.domain import elo


class AutoReviewer(dg.ConfigurableResource):
    """PERSONA_AUTO_REVIEW; off by default outside the demo."""

    enabled: bool = False
    reviewer: str = "auto-review"

    def vote_step(self, session: Session, candidates: list[models.Candidate]) -> int:
        """Vote every pair once: the higher open_clip score wins, the lower id on a tie."""
        if not self.enabled:
            return 0
        cast = 0
        for a, b in itertools.combinations(sorted(candidates, key=lambda c: c.id), 2):
            winner, loser = (a, b) if (a.clip_score or 0.0) >= (b.clip_score or 0.0) else (b, a)
            review.cast_vote(session, winner.id, loser.id, self.reviewer)
            cast += 1
        return cast

    def approve_step(self, session: Session, step: models.RunStep, top_k: int) -> bool:
        """Approve a voted step with its configured K (capped by the live candidates)."""
        if not self.enabled:
            return False
        live = len(review.step_ranking(session, step.id))
        if live == 0:
            return False
        review.approve_step(session, step.id, min(top_k, live), self.reviewer)
        return True

    def pick_winner(self, session: Session, run: models.GenerationRun, standings: dict[int, elo.Standing]) -> int | None:
        if not self.enabled or run.winner_candidate_id is not None or not standings:
            return None
        best = elo.rank(standings)[0].candidate_id
        review.pick_winner(session, run.id, best, self.reviewer)
        return best

    def approve_post(self, session: Session, post: models.Post) -> bool:
        if not self.enabled:
            return False
        review.approve_post(session, post.id, self.reviewer)
        return True
