"""Dataset candidates (models.DatasetCandidate): images that may join a persona's training dataset,
and the decisions on them. Enrichment and the flywheel add them (`add_candidate`), the review queue
lists and decides them (`pending_for`, `decide`), and training_dataset includes the accepted ones
(`accepted_for`) and freezes them with the version it built (`mark_included`). Every decision is a
`ReviewEvent` written in the same transaction (docs/dataset.md).

A candidate the machine dropped (`dropped`, with its reason) is listed too (`queue_for(...,
"dropped")`): a reviewer may accept it anyway, or reject it for good, with `decide(...,
override_drop=True)`; the event's payload names the drop it overrides."""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.db.models.dataset import ORIGINS, STATUSES
from persona_pipeline.db.review import ReviewError, record_event

DECISIONS = {"accept": ("accepted", "dataset_accept"), "reject": ("rejected", "dataset_reject")}
SUBJECT = "dataset_candidate"
MAX_CAPTION = 2000
_FIELDS = {c.name for c in models.DatasetCandidate.__table__.columns} - {"id", "persona_id"}


class DatasetDecisionError(ReviewError):
    """A refused decision on a dataset candidate; the message names the image (and the version that froze it)."""

    status_code = 409


class DatasetCandidateNotFound(DatasetDecisionError):
    status_code = 404


def add_candidate(session: Session, persona_id: int, **fields: Any) -> models.DatasetCandidate:
    """Add one candidate, or return the persona's existing row with the same `sha256` unchanged
    (running enrichment or the flywheel again adds nothing twice)."""
    unknown = set(fields) - _FIELDS
    if unknown:
        raise ValueError(f"unknown dataset candidate field(s): {', '.join(sorted(unknown))}")
    for name in ("origin", "image_path", "sha256"):
        if not fields.get(name):
            raise ValueError(f"a dataset candidate needs {name}")
    if fields["origin"] not in ORIGINS:
        raise ValueError(f"origin {fields['origin']!r} is not one of {', '.join(ORIGINS)}")
    if fields.setdefault("status", "pending") not in STATUSES:
        raise ValueError(f"status {fields['status']!r} is not one of {', '.join(STATUSES)}")
    path = PurePosixPath(fields["image_path"])
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"image_path {fields['image_path']!r} must be relative to the persona's folder, inside it")
    existing = _by_sha(session, persona_id, fields["sha256"])
    if existing is not None:
        return existing
    row = models.DatasetCandidate(persona_id=persona_id, **{"caption": "", **fields})
    try:
        with session.begin_nested():  # a concurrent writer of the same image wins; return its row
            session.add(row)
    except IntegrityError:
        existing = _by_sha(session, persona_id, fields["sha256"])
        if existing is None:
            raise
        return existing
    return row


QUEUES = ("pending", "dropped")  # what the review page lists: the queue, and what the checks dropped


def queue_for(session: Session, persona_slug: str, status: str = "pending", limit: int = 50) -> list[models.DatasetCandidate]:
    """The persona's candidates with `status` (pending: the review queue; dropped: what the automatic
    checks dropped, for a reviewer to overrule), oldest first."""
    if status not in QUEUES:
        raise ValueError(f"queue {status!r} is not one of {', '.join(QUEUES)}")
    query = (select(models.DatasetCandidate).join(models.Persona, models.Persona.id == models.DatasetCandidate.persona_id)
             .where(models.Persona.slug == persona_slug, models.DatasetCandidate.status == status)
             .order_by(models.DatasetCandidate.created_at, models.DatasetCandidate.id).limit(limit))
    return list(session.scalars(query))


def pending_for(session: Session, persona_slug: str, limit: int = 50) -> list[models.DatasetCandidate]:
    """The persona's review queue: pending candidates, oldest first."""
    return queue_for(session, persona_slug, "pending", limit)


def unfrozen_for_update(session: Session, candidate_id: int) -> models.DatasetCandidate:
    """The candidate, locked for this transaction, while no built dataset version includes it: the
    one check that freezes a decision (decide and undo both go through it)."""
    row = session.scalar(select(models.DatasetCandidate).where(models.DatasetCandidate.id == candidate_id)
                         .with_for_update())
    if row is None:
        raise DatasetCandidateNotFound(f"dataset candidate {candidate_id} does not exist")
    if row.dataset_version is not None:
        raise DatasetDecisionError(f"{row.image_path} (dataset candidate {row.id}) is in dataset version "
                                   f"{row.dataset_version}; its decision is frozen")
    return row


def decide(session: Session, candidate_id: int, decision: str, by: str, caption: str | None = None,
           now: datetime | None = None, override_drop: bool = False) -> models.DatasetCandidate:
    """Accept or reject one pending candidate (optionally with an edited caption), as a ReviewEvent in
    the same transaction. With `override_drop` the candidate must be one the automatic checks
    dropped: the reviewer overrules the machine (accept it anyway, or reject it for good) and the
    event's payload says so, with the drop's reason (the row keeps it, so an undo restores the drop).
    Refused: an unknown decision, a candidate already decided, a dropped one without
    `override_drop` (and a not-dropped one with it), and one a built dataset version already
    includes (its decision is frozen)."""
    if decision not in DECISIONS:
        raise DatasetDecisionError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
    row = unfrozen_for_update(session, candidate_id)
    name = f"{row.image_path} (dataset candidate {row.id})"
    why = f": {row.reason}" if row.reason else ""
    if override_drop and row.status != "dropped":
        raise DatasetDecisionError(f"{name} is {row.status}, not dropped; there is no drop to override")
    if not override_drop and row.status != "pending":
        hint = "; a reviewer may override the drop from the dropped list" if row.status == "dropped" else ""
        raise DatasetDecisionError(f"{name} is already {row.status}{why}{hint}")
    payload: dict[str, Any] = {"image_path": row.image_path, "sha256": row.sha256, "origin": row.origin}
    if override_drop:
        payload["overrides_drop"] = row.reason or "dropped"
    if caption is not None:
        caption = caption.strip()
        if not caption:
            raise DatasetDecisionError(f"the caption of {row.image_path} is empty")
        if len(caption) > MAX_CAPTION:
            raise DatasetDecisionError(f"the caption of {row.image_path} is {len(caption)} characters "
                                       f"(at most {MAX_CAPTION})")
        if caption != row.caption:
            payload.update(caption=caption, previous_caption=row.caption)
            row.caption = caption
    status, kind = DECISIONS[decision]
    record_event(session, row.persona_id, kind, SUBJECT, row.id, by, payload)
    row.status, row.decided_by, row.decided_at = status, by, now or models.utcnow()
    session.flush()
    return row


def accepted_for(session: Session, persona_id: int) -> list[models.DatasetCandidate]:
    """The accepted candidates the persona's next training_dataset build includes, oldest first."""
    return list(session.scalars(select(models.DatasetCandidate).where(
        models.DatasetCandidate.persona_id == persona_id, models.DatasetCandidate.status == "accepted")
        .order_by(models.DatasetCandidate.created_at, models.DatasetCandidate.id)))


def mark_included(session: Session, ids: Iterable[int], version: str) -> int:
    """Record `version` as the first dataset that included these candidates (rows that already have a
    version keep theirs); returns how many were marked. Their decisions are frozen from now on."""
    ids = list(ids)
    if not ids:
        return 0
    rows = session.scalars(select(models.DatasetCandidate).where(models.DatasetCandidate.id.in_(ids),
                                                                 models.DatasetCandidate.dataset_version.is_(None)))
    marked = 0
    for row in rows:
        row.dataset_version = version
        marked += 1
    session.flush()
    return marked


def for_persona(session: Session, persona_id: int, statuses: Iterable[str] | None = None) -> list[models.DatasetCandidate]:
    """The persona's candidates (with the given statuses), oldest first."""
    query = select(models.DatasetCandidate).where(models.DatasetCandidate.persona_id == persona_id)
    if statuses is not None:
        query = query.where(models.DatasetCandidate.status.in_(list(statuses)))
    return list(session.scalars(query.order_by(models.DatasetCandidate.created_at, models.DatasetCandidate.id)))


def _by_sha(session: Session, persona_id: int, sha256: str) -> models.DatasetCandidate | None:
    return session.scalar(select(models.DatasetCandidate).where(models.DatasetCandidate.persona_id == persona_id,
                                                                models.DatasetCandidate.sha256 == sha256))
