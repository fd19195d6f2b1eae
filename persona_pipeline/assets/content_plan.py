"""content_plan: prompts that fill the pillar gaps of the latest `pillar_gaps` report
(docs/rules.md#gap-analysis): through Gemini with structured JSON output when GEMINI_API_KEY is set, else
from templates. Each prompt is stored as a `content_prompts` row; `candidates` starts one run per prompt.

Which pillar and theme each prompt is for comes from the topic rotation (domain/rotation.py): the
gap report says *which* pillars need content (those with a positive gap; when none has one, every
pillar with something to post in its date window), the weights say *how often* each is picked,
and each pillar's themes come round in turn. The rotation state is saved with the prompts, in one
transaction, so the next plan — also after a restart — goes on where this one stopped.
"""


from datetime import datetime, timezone

import dagster as dg
from sqlalchemy import func, select

from persona_pipeline.assets.common import persona_for, table
from persona_pipeline.db import insights as insight_store
from persona_pipeline.db import library, models, registry
from persona_pipeline.db import rotation as rotation_store
from persona_pipeline.domain import content_prompts as cp
from persona_pipeline.domain import gaps as gap_rules
from persona_pipeline.domain import learning
from persona_pipeline.domain import rotation
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.gemini import GeminiClient, GeminiError


class ContentPlanConfig(dg.Config):
    n_prompts: int | None = None  # default: persona.yaml generation.prompts_per_plan


@dg.asset(partitions_def=persona_partitions, deps=["source_photos"], group_name="generation", kinds={"gemini"})
def content_plan(context: dg.AssetExecutionContext, config: ContentPlanConfig, database: AppDatabase,
                 gemini: GeminiClient) -> dg.MaterializeResult:
    """Prompts for the pillar gaps (Gemini or templates), one content_prompts row each. Started by the
    persona_planning schedule (job content_planning), the generation job, or the persona_chain job."""
    slug = context.partition_key
    with database.session() as session:
        persona, persona_config = persona_for(session, slug)
        pillars = registry.active_pillars(session, persona.id)
        # The pillar_gaps asset's latest report while it holds, else a new one made the same way.
        report = library.current_gap_report(session, persona, persona_config)
        report_id, today = report.id, report.today
        gaps = [gap_rules.PillarGap(r["pillar"], r["weight"], r["priority"], r["needed"], r["available"], r["gap"],
                                    r["status"]) for r in report.rows]
        n = config.n_prompts or persona_config.generation.prompts_per_plan
        if not 1 <= n <= 50:
            raise dg.Failure(f"n_prompts={n} is out of range 1..50")
        by_name = {p.name: p for p in pillars}
        # The rotation, computed here and saved below with the prompts (not before: a plan that
        # fails, e.g. Gemini down, must not move the rotation on).
        states = rotation_store.load_states(session, persona.id, pillars)
        before = {name: _state_json(state) for name, state in states.items()}
        weights = rotation_weights(gaps, by_name, persona_config.strategy.posts_per_week)
        # Learning on: each pillar's rotation weight scaled by its learned / configured share, so the
        # images the learned plan will want get made (off: exactly the weights above).
        learned = insight_store.learned_targets(session, persona.id, persona_config, datetime.now(timezone.utc))
        scale = learning.rotation_scale(learned)
        weights = {name: w * scale.get(name, 1.0) for name, w in weights.items()}
        urgency = [g.name for g in sorted(gaps, key=gap_rules.urgency_key) if g.name in weights]
        allocation = rotation.rotate_pillars(weights, states, n, order=urgency)
        themes_of = {name: rotation.pillar_themes(persona_config.generation.themes.get(name, []),
                                                  by_name[name].guidelines, name) for name in by_name}
        taken = {name: iter(rotation.take_themes(themes_of[name], states[name], allocation.count(name),
                                                 seed=f"{slug}:{name}")) for name in set(allocation)}
        slot_themes = [next(taken[name]) for name in allocation]
        recent = list(session.scalars(select(models.ContentPrompt.prompt).where(
            models.ContentPrompt.persona_id == persona.id)
            .order_by(models.ContentPrompt.id.desc()).limit(20)))
        planned_before = session.scalar(select(func.count()).select_from(models.ContentPrompt).where(
            models.ContentPrompt.persona_id == persona.id)) or 0
        trigger, class_word = persona.trigger_word, persona.class_word

    if gemini.enabled:
        try:
            prompts = gemini.content_prompts(persona_name=persona_config.name, trigger=trigger, class_word=class_word,
                                             guidelines_by_pillar={p: by_name[p].guidelines for p in set(allocation)},
                                             allocation=allocation, avoid=recent, log=context.log, themes=slot_themes)
        except GeminiError as exc:
            raise dg.Failure(f"{slug}: Gemini could not plan prompts: {exc}") from None
    else:
        prompts = cp.template_prompts(trigger=trigger, class_word=class_word,
                                      pillars={p: (by_name[p].prompt, by_name[p].guidelines) for p in set(allocation)},
                                      allocation=allocation, seed=planned_before, slot_themes=slot_themes)
    negative = persona_config.generation.negative_prompt
    gap_table = [{"pillar": g.name, "weight": g.weight, "needed": g.needed, "available": g.available, "gap": g.gap,
                  "status": g.status} for g in gaps]
    # What the plan was made from, kept with each prompt: the weights it rotated with and the
    # state before and after, so a plan can be explained (and replayed) later.
    rotation_record = {"weights": weights, "learning": learned.summary if learned is not None else "off", "before": before,
                       "after": {name: _state_json(states[name]) for name in weights if name in states}}
    with database.session() as session:
        # A new plan supersedes prompts that no run has used yet.
        stale = list(session.scalars(select(models.ContentPrompt).where(
            models.ContentPrompt.persona_id == persona.id, models.ContentPrompt.status == "planned")))
        for row in stale:
            row.status = "cancelled"
        rows = []
        for prompt in prompts:
            row = models.ContentPrompt(persona_id=persona.id, pillar_id=by_name[prompt.pillar].id, prompt=prompt.prompt,
                                       negative_prompt=negative if prompt.source == "template" else (prompt.negative_prompt or negative), theme=prompt.theme,
                                       source=prompt.source, gaps={"today": today.isoformat(), "report_id": report_id,
                                                                   "pillars": gap_table, "rotation": rotation_record},
                                       status="planned")
            session.add(row)
            rows.append(row)
        # Same transaction as the prompts: both are committed or neither.
        rotation_store.save_states(session, persona.id, pillars, states)
        session.flush()
        prompt_table = [{"id": r.id, "pillar": p.pillar, "theme": r.theme, "source": r.source, "prompt": r.prompt}
                        for r, p in zip(rows, prompts)]
    rotation_table = [{"pillar": name, "weight": round(weights.get(name, 0.0), 2), "picked": allocation.count(name),
                       "credit": round(states[name].credit, 2), "round": states[name].round,
                       "themes_used": f"{len(states[name].used)}/{len(themes_of[name])}"}
                      for name in by_name]
    context.log.info(f"{slug}: planned {len(prompts)} prompt(s) ({prompts[0].source if prompts else '-'}); "
                     f"pillars {allocation}, themes {slot_themes}; {len(stale)} unused earlier prompt(s) superseded")
    return dg.MaterializeResult(metadata={
        "prompts": len(prompts),
        "source": prompts[0].source if prompts else "",
        "superseded": len(stale),
        "gap_report_id": report_id,
        "gaps": table(gap_table),
        "rotation": table(rotation_table),
        "planned_prompts": table(prompt_table),
    })


def rotation_weights(gaps: list[gap_rules.PillarGap], pillars: dict[str, models.ContentPillar],
                     posts_per_week: float) -> dict[str, float]:
    """The pillars this plan rotates over, with their weights (`rotation.rotation_weight`).

    The gaps decide which: the pillars with a positive gap when any has one; else those that need
    posts at all (needed > 0: not out of their date window); else every pillar with a weight.
    Should none of them have a weight (a valid persona.yaml rules that out), they share equally."""
    def weight(name: str) -> float:
        pillar = pillars[name]
        return rotation.rotation_weight(pillar.weight, pillar.target_posts_per_week, posts_per_week)

    known = [g for g in gaps if g.name in pillars]
    eligible = ([g.name for g in known if g.gap > 0] or [g.name for g in known if g.needed > 0]
                or [name for name in pillars if weight(name) > 0] or list(pillars))
    weights = {name: weight(name) for name in eligible}
    if not any(w > 0 for w in weights.values()):
        weights = dict.fromkeys(eligible, 1.0)
    return weights


def _state_json(state: rotation.RotationState) -> dict:
    return {"credit": state.credit, "round": state.round, "used": list(state.used)}
