"""The persisted topic rotation (domain/rotation.py): one `topic_rotation` row per persona and
pillar with its credit, themes round and the themes used in that round.

Both functions work in the caller's session: content_plan saves the new rotation state in the
same transaction as the prompts it planned from it, so either both are committed or neither
(a crash in between cannot leave the rotation moved on without the prompts, or the reverse), and
the next plan — in this process or after a restart — starts from exactly where the last one ended.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain.rotation import RotationState


def load_states(session: Session, persona_id: int,
                pillars: Sequence[models.ContentPillar]) -> dict[str, RotationState]:
    """{pillar name: its rotation state} for `pillars` (the persona's active ones); a pillar
    without a row yet starts fresh (credit 0, round 0, nothing used)."""
    rows = _rows(session, persona_id, pillars)
    states: dict[str, RotationState] = {}
    for pillar in pillars:
        row = rows.get(pillar.id)
        states[pillar.name] = RotationState() if row is None else RotationState(
            credit=float(row.credit or 0.0), round=int(row.round or 0),
            used=[str(t) for t in (row.used_themes or [])])
    return states


def save_states(session: Session, persona_id: int, pillars: Sequence[models.ContentPillar],
                states: Mapping[str, RotationState]) -> None:
    """Write the states of `pillars` that `states` holds: update their rows, insert missing ones.
    Flushed, not committed: the caller's transaction decides."""
    rows = _rows(session, persona_id, pillars)
    for pillar in pillars:
        state = states.get(pillar.name)
        if state is None:
            continue
        row = rows.get(pillar.id)
        if row is None:
            row = models.TopicRotation(persona_id=persona_id, pillar_id=pillar.id)
            session.add(row)
        row.credit, row.round = float(state.credit), int(state.round)
        row.used_themes = list(state.used)  # a new list, so the JSON column sees the change
    session.flush()


def _rows(session: Session, persona_id: int,
          pillars: Sequence[models.ContentPillar]) -> dict[int, models.TopicRotation]:
    ids = [p.id for p in pillars]
    if not ids:
        return {}
    return {row.pillar_id: row for row in session.scalars(select(models.TopicRotation).where(
        models.TopicRotation.persona_id == persona_id, models.TopicRotation.pillar_id.in_(ids)))}
