"""Promotion of LoRA versions: evaluations stored per LoRA, and every change of primary as a
`ReviewEvent` (who and why): `promote_lora` and `rollback_lora` change the primary, `demote_lora`
leaves the persona with none, `hold_lora` records why a new version stayed a candidate. The lora_model asset, the CLI and the review form
all go through here."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.db import models, registry
from persona_pipeline.db.review import record_event
from persona_pipeline.domain.promotion import EvalScores

PROMOTE, ROLLBACK, HOLD, DEMOTE = "promote_lora", "rollback_lora", "hold_lora", "demote_lora"
KINDS = (PROMOTE, ROLLBACK, HOLD, DEMOTE)
AUTOMATIC = "lora_model (automatic)"


class PromotionError(ValueError):
    """A promotion or rollback that cannot be done; the message says why."""


def evaluation(session: Session, lora_id: int, eval_key: str) -> models.LoraEvaluation | None:
    return session.scalar(select(models.LoraEvaluation).where(models.LoraEvaluation.lora_id == lora_id,
                                                             models.LoraEvaluation.eval_key == eval_key))


def store_evaluation(session: Session, persona_id: int, lora_id: int, eval_key: str, method: str, scores: EvalScores,
                     renders: list[str]) -> models.LoraEvaluation:
    row = evaluation(session, lora_id, eval_key) or models.LoraEvaluation(persona_id=persona_id, lora_id=lora_id,
                                                                         eval_key=eval_key)
    row.identity_method, row.renders = method, renders
    row.identity_mean, row.identity_std = scores.identity_mean, scores.identity_std
    row.alignment, row.diversity, row.no_face = scores.alignment, scores.diversity, scores.no_face
    session.add(row)
    session.flush()
    return row


def scores_of(row: models.LoraEvaluation) -> EvalScores:
    return EvalScores(row.identity_mean, row.identity_std, row.alignment, row.diversity, row.no_face)


def decisions(session: Session, persona_id: int, lora_id: int | None = None) -> list[models.ReviewEvent]:
    """The persona's promotion events, oldest first (one LoRA's when `lora_id` is given)."""
    query = select(models.ReviewEvent).where(models.ReviewEvent.persona_id == persona_id,
                                             models.ReviewEvent.kind.in_(KINDS))
    if lora_id is not None:
        query = query.where(models.ReviewEvent.subject_type == "lora", models.ReviewEvent.subject_id == lora_id)
    return list(session.scalars(query.order_by(models.ReviewEvent.id)))


def promote(session: Session, persona_id: int, lora_id: int, who: str, why: str, *, kind: str = PROMOTE,
            payload: dict[str, Any] | None = None) -> models.ReviewEvent:
    """Make `lora_id` the persona's primary, recording who and why and which primary it replaced."""
    _check_reason(why)
    mapping = _mapping(session, persona_id, lora_id)
    previous = registry.primary_lora(session, persona_id)
    if previous is not None and previous.lora_id == lora_id:
        raise PromotionError(f"LoRA {lora_id} is already the primary")
    if not mapping.lora.path or mapping.lora.sha256 is None:
        raise PromotionError(f"LoRA {lora_id} has no file")
    registry.set_lora_mapping(session, persona_id, lora_id, primary=True)
    return record_event(session, persona_id, kind, "lora", lora_id, who, {
        "reason": why, "previous_primary": previous.lora_id if previous else None, **(payload or {})})


def hold(session: Session, persona_id: int, lora_id: int, why: str, payload: dict[str, Any] | None = None) -> models.ReviewEvent:
    """A new version that stays a candidate, with the reason."""
    _mapping(session, persona_id, lora_id)
    return record_event(session, persona_id, HOLD, "lora", lora_id, AUTOMATIC, {"reason": why, **(payload or {})})


def rollback(session: Session, persona_id: int, who: str, why: str, to: int | None = None) -> models.ReviewEvent:
    """Make the primary before the current one primary again (or `to`), as an event."""
    current = registry.primary_lora(session, persona_id)
    if to is None:
        if current is None:
            raise PromotionError("the persona has no primary LoRA to roll back from")
        last = next((e for e in reversed(decisions(session, persona_id, current.lora_id))
                     if e.kind in (PROMOTE, ROLLBACK)), None)
        to = (last.payload or {}).get("previous_primary") if last else None
        if to is None:
            raise PromotionError(f"LoRA {current.lora_id} replaced no earlier primary; name one with --to")
    return promote(session, persona_id, to, who, why, kind=ROLLBACK)


def demote(session: Session, persona_id: int, lora_id: int, who: str, why: str) -> models.ReviewEvent:
    """Take the primary flag from `lora_id`, the persona's primary, leaving it none, as an event:
    generation then runs without a persona LoRA until one is promoted."""
    _check_reason(why)
    _mapping(session, persona_id, lora_id)
    current = registry.primary_lora(session, persona_id)
    if current is None or current.lora_id != lora_id:
        raise PromotionError(f"LoRA {lora_id} is not the primary")
    registry.set_lora_mapping(session, persona_id, lora_id, primary=False)
    return record_event(session, persona_id, DEMOTE, "lora", lora_id, who, {"reason": why, "previous_primary": lora_id})


def _mapping(session: Session, persona_id: int, lora_id: int) -> models.PersonaLora:
    mapping = session.scalar(select(models.PersonaLora).where(models.PersonaLora.persona_id == persona_id,
                                                               models.PersonaLora.lora_id == lora_id))
    if mapping is None:
        raise PromotionError(f"LoRA {lora_id} is not in this persona's library")
    return mapping


def _check_reason(why: str) -> None:
    if not why or not why.strip():
        raise PromotionError("a promotion needs a reason")
