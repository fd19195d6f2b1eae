"""pillar_gaps: the gap analysis of docs/rules.md#gap-analysis over the persona's content library: per pillar
needed, available, gap and status (exhausted / critical / low / ready). content_plan plans its
prompts from the latest report; the check warns when a pillar has run out."""

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import persona_for, table
from persona_pipeline.db import library, models, registry
from persona_pipeline.domain import gaps as gap_rules
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase


@dg.asset(partitions_def=persona_partitions, deps=["clusters"], group_name="library", kinds={"sqlalchemy"})
def pillar_gaps(context: dg.AssetExecutionContext, database: AppDatabase) -> dg.MaterializeResult:
    """The gap table of the persona's pillars: needed, available and gap per pillar over the horizon.
    Started after clusters in the library job (persona_posting schedule, review_events sensor) and the
    persona_chain job. content_plan (upstream in the chain: an asset graph has no cycles) reads the
    latest report through the database, so the loop library → gaps → prompts → winners → library
    closes there."""
    slug = context.partition_key
    with database.session() as session:
        persona, config = persona_for(session, slug)
        report = library.build_gap_report(session, persona, config)
        rows, today, report_id = report.rows, report.today, report.id
        horizon, rate = report.horizon_days, report.posts_per_week
        unmapped = library.unposted_per_pillar(session, persona.id).get(None, 0)
    urgent = [r["pillar"] for r in rows if r["status"] in ("exhausted", "critical")]
    context.log.info(f"{slug}: gaps over {horizon} days from {today}: "
                     + ", ".join(f"{r['pillar']} {r['status']} ({r['available']}/{r['needed']})" for r in rows))
    return dg.MaterializeResult(metadata={
        "report_id": report_id,
        "today": today.isoformat(),
        "horizon_days": horizon,
        "posts_per_week": rate,
        "total_posts": gap_rules.total_posts(rate, horizon),
        "urgent_pillars": ", ".join(urgent) or "none",
        "unmapped_available": unmapped,
        "gaps": table([{k: v for k, v in r.items() if k != "pillar_id"} for r in rows]),
    })


@dg.asset_check(asset=pillar_gaps, description="Warns when a pillar has nothing left to post (exhausted) or is "
                "short by more than 5 images (critical) over the horizon. Runs with every pillar_gaps materialisation "
                "(library and persona_chain jobs).")
def pillars_stocked(context: dg.AssetCheckExecutionContext, database: AppDatabase) -> dg.AssetCheckResult:
    op_context = context.op_execution_context
    with database.session() as session:
        slugs = ([op_context.partition_key] if op_context.has_partition_key else
                 list(session.scalars(select(models.Persona.slug).where(models.Persona.active.is_(True)))))
        rows, missing = [], []
        for slug in slugs:
            report = library.latest_gap_report(session, registry.get_persona(session, slug).id)
            if report is None:
                missing.append(slug)
            else:
                rows += [{**r, "pillar": f"{slug}/{r['pillar']}" if len(slugs) > 1 else r["pillar"]} for r in report.rows]
    urgent = [r for r in rows if r["status"] in ("exhausted", "critical")]
    return dg.AssetCheckResult(
        passed=not missing and not urgent,
        severity=dg.AssetCheckSeverity.WARN,
        description=(f"no gap report for {', '.join(missing)}" if missing else
                     "; ".join(f"{r['pillar']}: {r['status']}, {r['available']} available of {r['needed']} needed"
                               for r in urgent) or "every pillar is stocked"),
        metadata={"urgent": len(urgent), "pillars": len(rows)},
    )
