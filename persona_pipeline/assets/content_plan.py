"""content_plan: prompts that fill the pillar gaps of the latest `pillar_gaps` report
(REFERENCES.md §1): through Gemini with structured JSON output when GEMINI_API_KEY is set, else
from templates. Each prompt is stored as a `content_prompts` row; `candidates` starts one run per prompt."""


import dagster as dg
from sqlalchemy import func, select

from persona_pipeline.assets.common import persona_for, table
from persona_pipeline.db import library, models, registry
from persona_pipeline.domain import content_prompts as cp
from persona_pipeline.domain import gaps as gap_rules
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.gemini import GeminiClient, GeminiError


class ContentPlanConfig(dg.Config):
    n_prompts: int | None = None  # default: persona.yaml generation.prompts_per_plan


@dg.asset(partitions_def=persona_partitions, deps=["source_photos"], group_name="generation", kinds={"gemini"})
def content_plan(context: dg.AssetExecutionContext, config: ContentPlanConfig, database: AppDatabase,
                 gemini: GeminiClient) -> dg.MaterializeResult:
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
        allocation = cp.allocate_prompts(gaps, n)
        recent = list(session.scalars(select(models.ContentPrompt.theme).where(
            models.ContentPrompt.persona_id == persona.id, models.ContentPrompt.theme != "")
            .order_by(models.ContentPrompt.id.desc()).limit(20)))
        planned_before = session.scalar(select(func.count()).select_from(models.ContentPrompt).where(
            models.ContentPrompt.persona_id == persona.id)) or 0
        by_name = {p.name: p for p in pillars}
        trigger, class_word = persona.trigger_word, persona.class_word

    if gemini.enabled:
        try:
            prompts = gemini.content_prompts(persona_name=persona_config.name, trigger=trigger, class_word=class_word,
                                             guidelines_by_pillar={p: by_name[p].guidelines for p in set(allocation)},
                                             allocation=allocation, avoid=recent, log=context.log)
        except GeminiError as exc:
            raise dg.Failure(f"{slug}: Gemini could not plan prompts: {exc}") from None
    else:
        prompts = cp.template_prompts(trigger=trigger, class_word=class_word,
                                      pillars={p: (by_name[p].prompt, by_name[p].guidelines) for p in set(allocation)},
                                      allocation=allocation, themes=persona_config.generation.themes, seed=planned_before)
    negative = persona_config.generation.negative_prompt
    gap_table = [{"pillar": g.name, "weight": g.weight, "needed": g.needed, "available": g.available, "gap": g.gap,
                  "status": g.status} for g in gaps]
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
                                                                            "pillars": gap_table},
                                       status="planned")
            session.add(row)
            rows.append(row)
        session.flush()
        prompt_table = [{"id": r.id, "pillar": p.pillar, "theme": r.theme, "source": r.source, "prompt": r.prompt}
                        for r, p in zip(rows, prompts)]
    context.log.info(f"{slug}: planned {len(prompts)} prompt(s) ({prompts[0].source if prompts else '-'}); "
                     f"{len(stale)} unused earlier prompt(s) superseded")
    return dg.MaterializeResult(metadata={
        "prompts": len(prompts),
        "source": prompts[0].source if prompts else "",
        "superseded": len(stale),
        "gap_report_id": report_id,
        "gaps": table(gap_table),
        "planned_prompts": table(prompt_table),
    })
