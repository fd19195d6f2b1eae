"""Alerts to ALERT_WEBHOOK_URL (docs/operations.md#alerts), through the outbox in persona_pipeline.db.alerts.

- `run_failure_alerts`: a run failed → one message naming the persona (the run's partition), the
  job, the failed assets or steps and the first line of the error, with a link to the run.
- `alert_sensor` ("alerts"): each active persona's freshness (scheduled posts ahead, library
  runway) → one message when a check starts failing and one when it passes again; a check that
  keeps failing is not re-sent every tick. It also delivers whatever else is due (retries).

Both only enqueue and then deliver within a small time budget: a webhook that is down costs a tick
a few seconds at most, and its alerts go out with backoff on later ticks. With ALERT_WEBHOOK_URL
unset nothing is recorded and nothing is sent.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import dagster as dg
from sqlalchemy import select

from persona_pipeline.db import alerts as outbox
from persona_pipeline.db import models
from persona_pipeline.db.freshness import persona_freshness
from persona_pipeline.domain.freshness import CALENDAR_CHECK, LIBRARY_CHECK
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.resources.alerts import AlertWebhook, FreshnessRules
from persona_pipeline.resources.database import AppDatabase

RUN_FAILURE_BUDGET_S = 5.0
ALERT_SENSOR_BUDGET_S = 15.0
FRESHNESS_ASSET = "post_calendar"
CHECKS = (CALENDAR_CHECK, LIBRARY_CHECK)


def deliver_quietly(database: AppDatabase, webhook: AlertWebhook, log: Any, budget_s: float,
                    now: datetime | None = None) -> dict[str, int]:
    """deliver_due that never raises: delivery trouble must not fail the sensor that asked."""
    try:
        return outbox.deliver_due(database, webhook, now=now, budget_s=budget_s, log=log)
    except Exception as exc:  # noqa: BLE001 - the alerts stay pending; the next tick tries again
        log.error(f"alert delivery failed, retried on the next tick: {type(exc).__name__}: {exc}")
        return {"sent": 0, "retrying": 0, "failed": 0, "left": 0}


def _error_line(event: dg.DagsterEvent) -> str:
    """The first line of the innermost error of a failure event (the user's exception, not
    Dagster's "Error occurred while executing op" wrapper)."""
    error = getattr(event.event_specific_data, "error", None)
    while error is not None and error.cause is not None:
        error = error.cause
    message = (error.message if error is not None else event.message) or ""
    return message.strip().splitlines()[0] if message.strip() else ""


def run_failure_alert(context: dg.RunFailureSensorContext, webhook: AlertWebhook) -> dict[str, Any]:
    """The enqueue arguments for one failed run."""
    run = context.dagster_run
    persona = run.tags.get("dagster/partition") or run.tags.get("persona")
    step_failures = context.get_step_failure_events()
    steps = list(dict.fromkeys(e.step_key for e in step_failures if e.step_key))
    error = next((line for line in map(_error_line, step_failures) if line), "") or _error_line(context.failure_event)
    failed = ", ".join(steps) or "the run (no step failed)"
    subject = f"{run.job_name}: {failed}"
    # The error first: it is the line a notification shows.
    text = f"{error or 'no error message'}\nJob {run.job_name} failed for persona {persona or 'all personas'}; failed: {failed}."
    return dict(dedupe_key=f"run_failure:{run.run_id}", kind="run_failure", subject=subject, text=text,
                persona_slug=persona, run_id=run.run_id, link=webhook.run_url(run.run_id))


@dg.run_failure_sensor(name="run_failure_alerts", minimum_interval_seconds=30,
                       default_status=dg.DefaultSensorStatus.RUNNING,
                       description="Every 30 s (the Dagster daemon): one alert per failed run to ALERT_WEBHOOK_URL, linking to "
                                   "the run (nothing when it is unset).")
def run_failure_alerts(context: dg.RunFailureSensorContext, database: AppDatabase, alerts: AlertWebhook) -> None:
    if not alerts.enabled:
        return
    # Recording the alert may raise (database down): the run is then seen again on the next tick.
    with database.session() as session:
        added = outbox.enqueue(session, **run_failure_alert(context, alerts))
    counts = deliver_quietly(database, alerts, context.log, RUN_FAILURE_BUDGET_S)
    context.log.info(f"run {context.dagster_run.run_id}: alert {'recorded' if added else 'already recorded'}; "
                     f"delivery {counts}")


def freshness_alerts(database: AppDatabase, webhook: AlertWebhook, min_days: float, now: datetime,
                     log: Any) -> dict[str, int]:
    """Open an alert when a persona's check starts failing, resolve it (and say so) when it passes
    again. An episode is an unresolved `freshness` alert for (persona, check): while it is open,
    nothing new is sent. Returns {"opened": n, "resolved": n}."""
    counts = {"opened": 0, "resolved": 0}
    with database.session() as session:
        personas = list(session.scalars(select(models.Persona).where(models.Persona.active.is_(True))
                                        .order_by(models.Persona.slug)))
        for persona in personas:
            try:
                config = PersonaConfig.model_validate(persona.settings)
            except ValueError as exc:  # stored by an older version: the persona sensor re-syncs it
                log.warning(f"persona {persona.slug}: stored settings do not validate, freshness not checked: {exc}")
                continue
            result = persona_freshness(session, persona, config, now, min_days)
            for check in CHECKS:
                subject = f"{FRESHNESS_ASSET}/{check}"
                open_alert = session.scalars(select(models.Alert).where(
                    models.Alert.kind == "freshness", models.Alert.persona_slug == persona.slug,
                    models.Alert.subject == subject, models.Alert.resolved_at.is_(None))
                    .order_by(models.Alert.id.desc())).first()
                link = webhook.asset_url(FRESHNESS_ASSET, persona.slug)
                if not result.ok(check) and open_alert is None:
                    added = outbox.enqueue(
                        session, dedupe_key=f"freshness:{persona.slug}:{check}:{now.isoformat()}", kind="freshness",
                        subject=subject, persona_slug=persona.slug, link=link, now=now,
                        text=f"{persona.slug} {check} failing: {result.text(check)}")
                    counts["opened"] += added is not None
                elif result.ok(check) and open_alert is not None:
                    open_alert.resolved_at = now
                    added = outbox.enqueue(
                        session, dedupe_key=f"freshness_resolved:{open_alert.id}", kind="freshness_resolved",
                        subject=subject, persona_slug=persona.slug, link=link, now=now,
                        text=f"{persona.slug} {check} passes again: {result.text(check)}")
                    counts["resolved"] += added is not None
    return counts


@dg.sensor(name="alerts", minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Every 60 s (the Dagster daemon): freshness alerts (scheduled posts and library runway per "
                       "persona) and the delivery of pending alerts, with retries, to ALERT_WEBHOOK_URL.")
def alert_sensor(context: dg.SensorEvaluationContext, database: AppDatabase, alerts: AlertWebhook,
                 freshness: FreshnessRules) -> dg.SensorResult:
    if not alerts.enabled:
        return dg.SensorResult(skip_reason="ALERT_WEBHOOK_URL is not set")
    database.require_schema()
    now = datetime.now(timezone.utc)
    found = freshness_alerts(database, alerts, freshness.min_days_ahead, now, context.log)
    sent = deliver_quietly(database, alerts, context.log, ALERT_SENSOR_BUDGET_S, now=now)
    return dg.SensorResult(skip_reason=(
        f"freshness: {found['opened']} new problem(s), {found['resolved']} resolved; alerts sent {sent['sent']}, "
        f"retrying {sent['retrying']}, failed {sent['failed']}, left for the next tick {sent['left']}"))
