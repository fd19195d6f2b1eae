"""Persona and LoRA library writes: persona.yaml → rows, trained LoRA → library + mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from persona_pipeline import personas as persona_files
from persona_pipeline.db import models
from persona_pipeline.domain.generation_params import MAX_LORAS, check_lora_weight


class UnknownPersona(LookupError):
    pass


def sync_persona(session: Session, persona: persona_files.Persona, photos_hash: str | None = None) -> models.Persona:
    """Create or update the persona row and its pillars from persona.yaml. Pillars dropped from
    the file are kept (posts refer to them) but marked inactive."""
    cfg = persona.config
    row = session.scalar(select(models.Persona).where(models.Persona.slug == persona.slug))
    if row is None:
        row = models.Persona(slug=persona.slug)
        session.add(row)
    row.name = cfg.name
    row.trigger_word = cfg.trigger_word
    row.class_word = cfg.class_word
    row.timezone = cfg.timezone
    row.folder = str(persona.folder)
    row.settings = cfg.model_dump(mode="json")
    row.settings_hash = persona.settings_hash
    row.active = True
    if photos_hash is not None:
        row.photos_hash = photos_hash
    session.flush()

    existing = {p.name: p for p in session.scalars(select(models.ContentPillar).where(models.ContentPillar.persona_id == row.id))}
    for pillar in cfg.pillars:
        pillar_row = existing.pop(pillar.name, None) or models.ContentPillar(persona_id=row.id, name=pillar.name)
        pillar_row.weight = pillar.weight
        pillar_row.priority = pillar.priority
        pillar_row.starts_on = pillar.starts_on
        pillar_row.ends_on = pillar.ends_on
        pillar_row.guidelines = pillar.guidelines
        pillar_row.prompt = cfg.pillar_prompt(pillar)
        pillar_row.target_posts_per_week = pillar.target_posts_per_week
        pillar_row.active = True
        session.add(pillar_row)
    for stale in existing.values():
        stale.active = False
    session.flush()
    return row


def deactivate_missing(session: Session, present_slugs: set[str]) -> list[str]:
    """Mark personas whose folder is gone as inactive (their history stays). Returns their slugs."""
    gone = [p for p in session.scalars(select(models.Persona).where(models.Persona.active.is_(True))) if p.slug not in present_slugs]
    for persona in gone:
        persona.active = False
    return [p.slug for p in gone]


def get_persona(session: Session, slug: str) -> models.Persona:
    row = session.scalar(select(models.Persona).where(models.Persona.slug == slug))
    if row is None:
        raise UnknownPersona(f"persona {slug!r} is not in the database; the persona sensor adds it from datasets/{slug}/persona.yaml")
    return row


def active_pillars(session: Session, persona_id: int) -> list[models.ContentPillar]:
    return list(session.scalars(
        select(models.ContentPillar)
        .where(models.ContentPillar.persona_id == persona_id, models.ContentPillar.active.is_(True))
        .order_by(models.ContentPillar.id)
    ))


def register_lora(
    session: Session,
    persona_id: int,
    *,
    name: str,
    path: Path,
    sha256: str,
    base_model: str,
    trigger_word: str | None,
    dataset_id: int | None,
    training: dict[str, Any],
    weight: float = 1.0,
    primary: bool | None = True,
    origin: str = "trained",
    family: str | None = None,
    key_format: str | None = None,
) -> models.LoraModel:
    """Add a LoRA file to the library (once per sha256: a known file keeps its row and version)
    as the persona's next version, and map it to the persona. `primary=None` leaves the flag as it
    is (a new mapping is not primary): the promotion rule decides (db/promotion.py)."""
    check_lora_weight(weight)
    lora = session.scalar(select(models.LoraModel).where(models.LoraModel.sha256 == sha256))
    if lora is None:
        latest = session.scalar(select(func.max(models.LoraModel.version)).where(models.LoraModel.persona_id == persona_id))
        lora = models.LoraModel(name=name, path=str(path), sha256=sha256, base_model=base_model,
                                trigger_word=trigger_word, dataset_id=dataset_id, training=training,
                                persona_id=persona_id, version=(latest or 0) + 1, origin=origin,
                                family=family, key_format=key_format)
        session.add(lora)
        session.flush()
    mapping = session.scalar(select(models.PersonaLora).where(
        models.PersonaLora.persona_id == persona_id, models.PersonaLora.lora_id == lora.id))
    if mapping is None:
        mapping = models.PersonaLora(persona_id=persona_id, lora_id=lora.id, is_primary=False)
        session.add(mapping)
    mapping.weight = weight
    if primary:
        session.execute(update(models.PersonaLora).where(models.PersonaLora.persona_id == persona_id)
                        .values(is_primary=False))
    if primary is not None:
        mapping.is_primary = primary
    session.flush()
    return lora


def list_loras(session: Session, persona_id: int) -> list[models.PersonaLora]:
    """The persona's LoRA library: its mappings (weight, primary) with `.lora`, oldest version first."""
    return list(session.scalars(
        select(models.PersonaLora).join(models.LoraModel, models.PersonaLora.lora_id == models.LoraModel.id)
        .where(models.PersonaLora.persona_id == persona_id)
        .order_by(models.LoraModel.version.is_(None), models.LoraModel.version, models.LoraModel.id)
    ))


MAX_CHAINED_LORAS = MAX_LORAS  # docs/rules.md#generation-limits; generation refuses more, so the library does too


def set_lora_mapping(session: Session, persona_id: int, lora_id: int, *, weight: float | None = None,
                     primary: bool | None = None, chained: bool | None = None) -> models.PersonaLora:
    """Change a persona's weight for one of its LoRAs, make it (or stop it being) the primary, or
    chain it after the primary in every generation. Making one primary clears the flag on the
    persona's others; no primary at all is allowed; primary + chained stay at most five."""
    mapping = session.scalar(select(models.PersonaLora).where(
        models.PersonaLora.persona_id == persona_id, models.PersonaLora.lora_id == lora_id))
    if mapping is None:
        raise LookupError(f"LoRA {lora_id} is not in persona {persona_id}'s library")
    if weight is not None:
        check_lora_weight(weight)
        mapping.weight = weight
    if primary:
        session.execute(update(models.PersonaLora).where(models.PersonaLora.persona_id == persona_id,
                                                         models.PersonaLora.id != mapping.id).values(is_primary=False))
    if primary is not None:
        mapping.is_primary = primary
    if chained is not None:
        mapping.chained = chained
    in_chain = session.scalar(select(func.count()).select_from(models.PersonaLora).where(
        models.PersonaLora.persona_id == persona_id,
        (models.PersonaLora.is_primary.is_(True)) | (models.PersonaLora.chained.is_(True))))
    if in_chain > MAX_CHAINED_LORAS:
        raise ValueError(f"persona {persona_id} would chain {in_chain} LoRAs; at most {MAX_CHAINED_LORAS}")
    session.flush()
    return mapping


def primary_lora(session: Session, persona_id: int) -> models.PersonaLora | None:
    return session.scalar(select(models.PersonaLora).where(
        models.PersonaLora.persona_id == persona_id, models.PersonaLora.is_primary.is_(True)))
