"""Curation of new candidates: open_clip prompt alignment, identity similarity (a face model or
open_clip), the identity gate, and "generate N, keep the best M"."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain import generation_plan as plan
from persona_pipeline.identity import NO_FACE, IdentityReference


def score(session: Session, clip, candidate_ids: list[int], identity: IdentityReference,
          identity_threshold: float | None) -> dict[str, int]:
    """Score the candidates (alignment by open_clip, identity by `identity.embedder`),
    reject those under the identity threshold or, under a face model, without a face (before any
    reviewer sees them), then apply keep-best to every finished group. Returns counts for the log."""
    rows = [session.get(models.Candidate, cid) for cid in candidate_ids]
    rows = [r for r in rows if r is not None]
    counts = {"scored": 0, "gate_rejected": 0, "culled": 0, "no_face": 0}
    if rows:
        paths = [Path(r.image_path) for r in rows]
        images = clip.embed_images(paths)
        similarities, found = identity.score(paths)
        by_prompt: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(rows):
            by_prompt[row.run.prompt].append(index)
        for prompt, indices in by_prompt.items():
            text = clip.embed_texts([prompt])[0]
            for index in indices:
                rows[index].clip_score = round(float(images[index] @ text), 6)
        for index, row in enumerate(rows):
            value = similarities[index]
            row.identity_score = None if value is None else round(value, 6)
            counts["scored"] += 1
            no_face = not found[index]
            counts["no_face"] += int(no_face)
            if not plan.passes_identity_gate(row.identity_score, identity_threshold):
                row.status = "rejected"
                row.status_reason = (f"{NO_FACE} by the face model {identity.method}" if no_face
                                     else f"identity {row.identity_score} is below the gate {identity_threshold}")
                counts["gate_rejected"] += 1
            elif no_face:
                row.status_reason = f"{NO_FACE} by the face model {identity.method}; no identity score"
        session.flush()
    for step_id in sorted({r.step_id for r in rows}):
        counts["culled"] += apply_keep_best(session, step_id)
    return counts


def apply_keep_best(session: Session, step_id: int) -> int:
    """In each group of the step whose jobs are all settled, keep the best `keep_best` active
    candidates and cull the rest (they stay on disk and in the tree, out of voting)."""
    step = session.get(models.RunStep, step_id)
    if not step.keep_best:
        return 0
    open_parents = set(session.scalars(select(models.GenerationJob.parent_key).where(
        models.GenerationJob.step_id == step_id, models.GenerationJob.status.in_(("pending", "running")))))
    active = list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == step_id,
                                                                 models.Candidate.status == "active")))
    groups: dict[int, list[models.Candidate]] = defaultdict(list)
    for row in active:
        groups[row.parent_id or 0].append(row)
    culled = 0
    for parent_key, members in groups.items():
        if parent_key in open_parents or len(members) <= step.keep_best:
            continue
        _, losers = plan.keep_best([(m.id, plan.curation_score(m.clip_score, m.identity_score)) for m in members],
                                   step.keep_best)
        for row in members:
            if row.id in losers:
                row.status = "culled"
                row.status_reason = f"not in the best {step.keep_best} of its group by open_clip curation"
                culled += 1
    session.flush()
    return culled
