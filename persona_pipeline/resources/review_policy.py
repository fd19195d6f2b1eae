"""Auto-review (the demo, and a studio with no reviewer on shift): votes, step approvals, winners and
post approvals cast from open_clip scores, through the same database calls the review form uses
(db/review.py, db/review_posts.py), so each is a review event like a person's."""

from __future__ import annotations

import itertools

import dagster as dg
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from persona_pipeline.db import models, review, review_posts


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
        live = session.scalar(select(func.count()).where(models.Candidate.step_id == step.id,
                                                         models.Candidate.status.in_(review.LIVE)))
        if live == 0:
            return False
        review.approve_step(session, step.id, min(top_k, live), self.reviewer)
        return True

    def pick_winner(self, session: Session, run: models.GenerationRun, ranking: list[review.RankedCandidate]) -> int | None:
        """Pick the best of the final step's Bradley–Terry ranking."""
        if not self.enabled or run.winner_candidate_id is not None or not ranking:
            return None
        best = ranking[0].candidate_id
        review.pick_winner(session, run.id, best, self.reviewer)
        return best

    def approve_post(self, session: Session, post: models.Post) -> bool:
        if not self.enabled:
            return False
        review_posts.approve_post(session, post.id, self.reviewer)
        return True
