"""The start page: what each persona needs from a reviewer now."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response

from persona_pipeline.db import models, review_views
from persona_pipeline.review.web import in_db, page, render


def _queue(session: Session) -> list[dict[str, Any]]:
    result = []
    # Waiting candidates are work; dropped ones are not, but the start page is the only way in to override
    # a drop when nothing is waiting, so both counts are read (one statement).
    dataset: dict[str, dict[str, int]] = {}
    for slug, status, count in session.execute(
            select(models.Persona.slug, models.DatasetCandidate.status, func.count())
            .join(models.DatasetCandidate, models.DatasetCandidate.persona_id == models.Persona.id)
            .where(models.DatasetCandidate.status.in_(("pending", "dropped")))
            .group_by(models.Persona.slug, models.DatasetCandidate.status)):
        dataset.setdefault(slug, {})[status] = count
    for queue in review_views.review_queue(session):
        final_steps = {}
        for run_id in queue.runs_to_pick:
            final_steps[run_id] = session.scalar(select(models.RunStep.id).where(models.RunStep.run_id == run_id)
                                                 .order_by(models.RunStep.position.desc()).limit(1))
        result.append({"slug": queue.slug, "name": queue.name, "pairs_to_vote": queue.pairs_to_vote,
                       "steps_to_vote": list(queue.steps_to_vote), "steps_to_approve": list(queue.steps_to_approve),
                       "runs_to_pick": [(run_id, final_steps[run_id]) for run_id in queue.runs_to_pick],
                       "posts_to_approve": queue.posts_to_approve,
                       "dataset_pending": dataset.get(queue.slug, {}).get("pending", 0),
                       "dataset_dropped": dataset.get(queue.slug, {}).get("dropped", 0),
                       "total": queue.total + dataset.get(queue.slug, {}).get("pending", 0)})
    return result


@page
async def queue_page(request: Request, reviewer: str) -> Response:
    queues = await in_db(request, _queue)
    return render(request, "queue.html", {"queues": queues, "title": "Review queue"})
