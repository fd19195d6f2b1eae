"""The insights schedule and job: read every published post's insights when a read is due (+1 h,
+24 h, +72 h, +7 d, then frozen) and each account's daily numbers (resources/insights_collector.py)."""

from datetime import datetime, timezone

import dagster as dg

from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.insights_collector import InsightsCollector

__all__ = ["collect_insights", "insights_job", "insights_schedule"]


@dg.op(description="Read the due insights of every published post (Graph API, or the simulated audience for the "
                   "outbox) and each account's daily followers and reach.")
def collect_insights(context: dg.OpExecutionContext, database: AppDatabase, insights: InsightsCollector) -> dict:
    report = insights.collect(database.url, datetime.now(timezone.utc), context.log)
    stopped = report.pop("stopped")
    metadata = {**report, "stopped_accounts": dg.MetadataValue.json(stopped)}
    if report["simulated_accounts"]:
        metadata["note"] = "outbox accounts' insights are simulated (a seeded audience, not Instagram)"
    context.add_output_metadata(metadata)
    return report


@dg.job(description="Read due post insights and daily account insights for every persona. Started by "
                    "insights_schedule (PERSONA_INSIGHTS_CRON).")
def insights_job() -> None:
    collect_insights()


def insights_schedule(cron: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(name="insights_schedule", job=insights_job, cron_schedule=cron,
                                 default_status=dg.DefaultScheduleStatus.RUNNING,
                                 description=f"At `{cron}` (UTC, PERSONA_INSIGHTS_CRON): an insights_job run that reads "
                                             "every due post insight (+1 h, +24 h, +72 h, +7 d) and daily account insights.")
