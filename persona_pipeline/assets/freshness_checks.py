"""Freshness checks on post_calendar (docs/operations.md#freshness): a persona whose scheduled posts cover
fewer than PERSONA_FRESHNESS_DAYS ahead, or whose approved-but-unposted images would run dry within
that many days at its posting rate, gets a warning. The alert sensor
(persona_pipeline.automation.alerts) evaluates the same rules on its own clock and notifies."""

from datetime import datetime, timezone

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import persona_for
from persona_pipeline.db import models
from persona_pipeline.db.freshness import persona_freshness
from persona_pipeline.domain.freshness import CALENDAR_CHECK, LIBRARY_CHECK, FreshnessResult
from persona_pipeline.resources.alerts import FreshnessRules
from persona_pipeline.resources.database import AppDatabase

# What starts the checks, in their descriptions; the alerts sensor evaluates the same rules every minute.
RUNS_WITH_CALENDAR = ("Runs with every post_calendar materialisation (post_calendar_refresh, library and persona_chain "
                      "jobs); the alerts sensor alerts on the same rule.")


def _results(context: dg.AssetCheckExecutionContext, database: AppDatabase, rules: FreshnessRules) -> dict[str, FreshnessResult]:
    """slug → freshness, for the check's partition, or every active persona when unpartitioned."""
    op_context = context.op_execution_context
    now = datetime.now(timezone.utc)
    with database.session() as session:
        slugs = ([op_context.partition_key] if op_context.has_partition_key else
                 list(session.scalars(select(models.Persona.slug).where(models.Persona.active.is_(True))
                                      .order_by(models.Persona.slug))))
        results = {}
        for slug in slugs:
            row, config = persona_for(session, slug)
            results[slug] = persona_freshness(session, row, config, now, rules.min_days_ahead)
    return results


def _days(value: float) -> float | str:
    # Float metadata must be finite to survive every event-log backend's JSON.
    return round(value, 2) if value != float("inf") else "unlimited (posts_per_week is 0)"


def _check_result(results: dict[str, FreshnessResult], check: str, rules: FreshnessRules) -> dg.AssetCheckResult:
    failing = {slug: r for slug, r in results.items() if not r.ok(check)}
    shown = failing or results
    many = len(results) > 1
    description = "; ".join(f"{slug}: {r.text(check)}" if many else r.text(check) for slug, r in shown.items())
    metadata: dict = {"min_days": rules.min_days_ahead, "personas": len(results), "failing": len(failing)}
    if results:
        # Over several personas (an unpartitioned check) the days are the worst persona's.
        metadata.update(
            covered_days=_days(min(r.covered_days for r in results.values())),
            runway_days=_days(min(r.runway_days for r in results.values())),
            scheduled=sum(r.scheduled for r in results.values()),
            awaiting_approval=sum(r.awaiting_approval for r in results.values()),
            unposted=sum(r.unposted for r in results.values()),
        )
    if len(results) == 1:
        metadata["posts_per_week"] = next(iter(results.values())).posts_per_week
    return dg.AssetCheckResult(passed=not failing, severity=dg.AssetCheckSeverity.WARN,
                               description=description or "no active persona", metadata=metadata)


@dg.asset_check(asset="post_calendar", description="Warns when the persona's scheduled posts cover fewer days "
                "ahead than PERSONA_FRESHNESS_DAYS (a persona with posts_per_week 0 passes). " + RUNS_WITH_CALENDAR)
def calendar_covers_ahead(context: dg.AssetCheckExecutionContext, database: AppDatabase,
                          freshness: FreshnessRules) -> dg.AssetCheckResult:
    return _check_result(_results(context, database, freshness), CALENDAR_CHECK, freshness)


@dg.asset_check(asset="post_calendar", description="Warns when the approved images not posted yet would run out "
                "within PERSONA_FRESHNESS_DAYS at the persona's posts_per_week. " + RUNS_WITH_CALENDAR)
def library_runway(context: dg.AssetCheckExecutionContext, database: AppDatabase,
                   freshness: FreshnessRules) -> dg.AssetCheckResult:
    return _check_result(_results(context, database, freshness), LIBRARY_CHECK, freshness)
