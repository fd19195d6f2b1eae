"""The lora_model asset's last part: render the new LoRA version and the current primary on the
persona's evaluation set, store both evaluations, apply the promotion rule once per version, and
show the result side by side (a contact sheet of prompts × versions and a table)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from persona_pipeline.assets.common import sheet_metadata, table
from persona_pipeline.db import models, promotion, registry
from persona_pipeline.domain.promotion import EvalScores, decide
from persona_pipeline.identity import IdentityReference
from persona_pipeline.training.evaluation import eval_key, eval_prompts, evaluate


def evaluate_and_decide(context: dg.AssetExecutionContext, *, database, storage, links, diffusion, clip,
                        identity: IdentityReference, rules, persona_id: int, slug: str, config,
                        lora_id: int) -> dict[str, dg.MetadataValue]:
    prompts, seeds = eval_prompts(config)
    key = eval_key(prompts, seeds, diffusion.base_model, identity.method, identity.digest)
    evaluations = storage.persona_dir(slug) / "evaluations"
    with database.session() as session:
        new = session.get(models.LoraModel, lora_id)
        current = registry.primary_lora(session, persona_id)
        current_id = current.lora_id if current is not None else None
        rival = current.lora if current_id is not None and current_id != lora_id else None
        rival_id = rival.id if rival is not None else None
        earlier = promotion.decisions(session, persona_id, lora_id)
        known = {lid: promotion.evaluation(session, lid, key) for lid in [lora_id] + ([rival_id] if rival else [])}
        versions = {row.id: (row.version, Path(row.path), row.family) for row in [new] + ([rival] if rival else [])}
    not_comparable = None
    if rival_id is not None and known[rival_id] is None:
        not_comparable = _why_not_comparable(versions[rival_id], versions[lora_id][2])

    todo = [lid for lid, row in known.items() if row is None and not (lid != lora_id and not_comparable)]
    if todo:
        runs = evaluate(diffusion, clip, identity, [versions[lid][1] for lid in todo], prompts, seeds, config.trigger_word,
                        lambda n, p, seed: evaluations / f"lora-{todo[n]}-{key[:12]}" / f"p{p}-s{seed}.png")
        with database.session() as session:
            for lid, run in zip(todo, runs):
                promotion.store_evaluation(session, persona_id, lid, key, identity.method, run.scores,
                                           [str(p) for p in run.renders])
    with database.session() as session:
        rows = {lid: promotion.evaluation(session, lid, key) for lid in known}
        scored = {lid: (promotion.scores_of(row), list(row.renders)) for lid, row in rows.items() if row is not None}
        if earlier:
            outcome, reason = earlier[-1].kind, f"decided before by {earlier[-1].reviewer}: {earlier[-1].payload.get('reason')}"
        elif current_id == lora_id:  # made primary before promotion had events
            outcome, reason = "primary", "already the primary; nothing to decide"
        else:
            outcome, reason = _decide(session, persona_id, lora_id, rival_id, not_comparable, scored, rules)
        primary_now = registry.primary_lora(session, persona_id)
        primary_now_id = primary_now.lora_id if primary_now else None
    context.log.info(f"{slug}: LoRA {lora_id} {outcome}: {reason}")

    order = ([rival_id] if rival_id in scored else []) + [lora_id]
    labels = {lid: f"v{versions[lid][0]}{' (primary)' if lid == primary_now_id else ''}" for lid in order}
    sheet = [(Path(scored[lid][1][p * len(seeds) + s]), f"{labels[lid]} p{p} s{seeds[s]}")
             for p in range(len(prompts)) for lid in order for s in range(len(seeds))]
    return {
        "promotion": outcome,
        "promotion_reason": reason,
        "identity_method": identity.method,
        **({"identity_warning": identity.warning()} if identity.warning() else {}),
        "evaluation": table([{"lora": lid, "version": labels[lid], "role": "new" if lid == lora_id else "incumbent",
                              **scored[lid][0].as_dict()} for lid in order]),
        # One row per prompt; per row, each version's seeds side by side (the incumbent primary first).
        **sheet_metadata("evaluation_sheet", sheet, storage, links, slug, columns=len(order) * len(seeds)),
    }


def _decide(session, persona_id: int, lora_id: int, rival_id: int | None, not_comparable: str | None,
            scored: dict[int, tuple[EvalScores, list[str]]], rules) -> tuple[str, str]:
    """Apply the rule once for a new version; the event records who (the asset) and why."""
    new_scores = scored[lora_id][0]
    payload = {"scores": new_scores.as_dict()}
    if rival_id is not None and not_comparable:
        why = f"the primary LoRA {rival_id} cannot be compared: {not_comparable}; promote by hand if it should replace it"
        promotion.hold(session, persona_id, lora_id, why, payload)
        return promotion.HOLD, why
    primary_scores = scored[rival_id][0] if rival_id is not None else None
    if primary_scores is not None:
        payload["primary_scores"] = primary_scores.as_dict()
    decision = decide(new_scores, primary_scores, rules.identity_tolerance, rules.alignment_tolerance)
    if decision.promote:
        promotion.promote(session, persona_id, lora_id, promotion.AUTOMATIC, decision.reason, payload=payload)
        return promotion.PROMOTE, decision.reason
    promotion.hold(session, persona_id, lora_id, decision.reason, payload)
    return promotion.HOLD, decision.reason


def _why_not_comparable(primary: tuple, family: str | None) -> str | None:
    """Why the primary cannot be rendered on the new version's base model (None: it can)."""
    _, path, primary_family = primary
    if not path.is_file():
        return f"its file {path} is missing"
    if primary_family and family and primary_family != family:
        return f"it is a {primary_family} LoRA and the new one is {family}"
    return None
