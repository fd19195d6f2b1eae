"""Taking back a dataset decision (the dataset review page's Undo): the reviewer's own accept or
reject, within review.UNDO_WINDOW, while no built dataset version holds the image. The candidate
goes back to `pending` (or to `dropped`, when the decision overrode a drop) with the caption it had
before the decision, and a `dataset_undo` review event (naming the decision event it undoes) keeps
both in the audit trail. The dataset_reviews
sensor counts an undone acceptance as a change of the dataset, like an acceptance."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.db.dataset_candidates import DECISIONS, SUBJECT, DatasetDecisionError, unfrozen_for_update
from persona_pipeline.db.review import UNDO_WINDOW, record_event

UNDO_KIND = "dataset_undo"


def undo_decision(session: Session, candidate_id: int, by: str, now: datetime | None = None) -> models.DatasetCandidate:
    """Put the candidate back as it was before `by`'s decision (in the queue, or dropped again when
    the decision overrode a drop); refused (with the
    image named) when it is frozen in a dataset version, not decided, decided by someone else, or
    decided longer ago than UNDO_WINDOW."""
    now = now or models.utcnow()
    row = unfrozen_for_update(session, candidate_id)
    name = f"{row.image_path} (dataset candidate {row.id})"
    decision = session.scalar(select(models.ReviewEvent).where(
        models.ReviewEvent.subject_type == SUBJECT, models.ReviewEvent.subject_id == row.id,
        models.ReviewEvent.kind.in_([kind for _, kind in DECISIONS.values()])).order_by(models.ReviewEvent.id.desc()).limit(1))
    if row.status not in ("accepted", "rejected") or decision is None:
        raise DatasetDecisionError(f"{name} is {row.status}: there is no decision to undo")
    if row.decided_by != by:
        raise DatasetDecisionError(f"{name} was decided by {row.decided_by}; only they can undo it")
    if row.decided_at is None or now - row.decided_at > UNDO_WINDOW:
        minutes = int(UNDO_WINDOW.total_seconds() // 60)
        raise DatasetDecisionError(f"{name} was decided more than {minutes} minutes ago; it can no longer be undone")
    payload = {"undone": row.status, "event_id": decision.id, "image_path": row.image_path, "sha256": row.sha256}
    previous = (decision.payload or {}).get("previous_caption")
    if "caption" in (decision.payload or {}) and previous is not None:
        payload.update(caption=previous, undone_caption=row.caption)
        row.caption = previous
    back = "dropped" if "overrides_drop" in (decision.payload or {}) else "pending"
    payload["back_to"] = back
    record_event(session, row.persona_id, UNDO_KIND, SUBJECT, row.id, by, payload)
    row.status, row.decided_by, row.decided_at = back, None, None
    session.flush()
    return row
