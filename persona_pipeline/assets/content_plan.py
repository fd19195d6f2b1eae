"""content_plan: the pillar gaps over the next 30 days (REFERENCES.md §1) and the prompts that
fill them: through Gemini with structured JSON output when GEMINI_API_KEY is set, else from
templates. Each prompt is stored as a `content_prompts` row; `candidates` starts one run per prompt."""


from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg
from sqlalchemy import func, select

from persona_pipeline.assets.common import persona_for, table
from persona_pipeline.db import models, registry
from persona_pipeline.domain import content_prompts as cp
from persona_pipeline.domain import gaps as gap_rules
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.gemini import GeminiClient, GeminiError

# A post that holds its image: the image is no longer available to plan with.
POST_HOLDS_IMAGE = ("draft", "awaiting_approval", "scheduled", "publishing", "published")


class ContentPlanConfig(dg.Config):
    n_prompts: int | None = None  # default: persona.yaml generation.prompts_per_plan


def available_per_pillar(session, persona_id: int) -> dict[int, int]:
    """Approved (winner) images of each pillar that no post holds yet."""
    held = select(models.Post.candidate_id).where(models.Post.status.in_(POST_HOLDS_IMAGE))
    rows = session.execute(
        select(models.GenerationRun.pillar_id, func.count(models.Candidate.id))
        .join(models.Candidate, models.Candidate.run_id == models.GenerationRun.id)
        .where(models.GenerationRun.persona_id == persona_id, models.Candidate.status == "winner",
               models.Candidate.id.not_in(held))
        .group_by(models.GenerationRun.pillar_id)).all()
    return {pillar_id: n for pillar_id, n in rows if pillar_id is not None}


@dg.asset(partitions_def=persona_partitions, deps=["source_photos"], group_name="generation", kinds={"gemini"})
def content_plan(context: dg.AssetExecutionContext, config: ContentPlanConfig, database: AppDatabase,
                 gemini: GeminiClient) -> dg.MaterializeResult:
    slug = context.partition_key
    with database.session() as session:
        persona, persona_config = persona_for(session, slug)
        pillars = registry.active_pillars(session, persona.id)
        available = available_per_pillar(session, persona.id)
        today = datetime.now(ZoneInfo(persona_config.timezone)).date()
        gaps = gap_rules.analyse_gaps([gap_rules.PillarInput(
            name=p.name, weight=p.weight, priority=p.priority, available=available.get(p.id, 0), starts_on=p.starts_on,
            ends_on=p.ends_on, target_posts_per_week=p.target_posts_per_week) for p in pillars], today)
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
                                       source=prompt.source, gaps={"today": today.isoformat(), "pillars": gap_table},
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
        "gaps": table(gap_table),
        "planned_prompts": table(prompt_table),
    })
