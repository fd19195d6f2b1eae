"""Per-persona schedules: each persona.yaml's `schedules:` crons, in the persona's timezone, turned
into partitioned run requests.

Dagster's own cron runs one schedule per kind every minute in UTC; each tick reads the persona
folders again and asks, for every persona, whether its cron for that kind fired in the minute
that just ended (domain/cron.py, with its DST rules: a time in the spring-forward gap fires once
at the gap's end, a repeated time once at its first occurrence). So editing persona.yaml changes
the schedule at the next minute, without a code change or a reload; a removed folder is simply
not found any more, so its schedules stop, while its dynamic partition stays for history.

The run key `<kind>:<slug>:<fire instant UTC>` makes a tick evaluated twice ask for the same run,
which Dagster then drops.

A generation run needs the persona's primary LoRA (`candidates` fails without one), so the generation
schedule leaves out a persona that has none yet (a new persona whose `photo_set` run is still
training) with a warning, instead of starting a run that can only fail and raise an alert every day.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from functools import lru_cache

import dagster as dg

from sqlalchemy import select

from persona_pipeline.automation.jobs import content_planning_job, generation_runs_job, library_job, weekly_report_job
from persona_pipeline.domain.cron import CronSpec, fire_times, next_fire_times, parse_cron, zone
from persona_pipeline.db import models
from persona_pipeline.domain.ui_pages import schedule_description
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.personas import Persona
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.storage import PersonaFolders

# kind (the field under persona.yaml `schedules:`) → the job its runs start
SCHEDULE_KINDS = {
    "planning": content_planning_job,
    "generation": generation_runs_job,
    "posting": library_job,
    "report": weekly_report_job,
}
# kinds whose runs need the persona's primary LoRA
NEEDS_LORA = {"generation"}
SCHEDULE_TAG = "persona-pipeline/schedule"
FIRE_TIME_TAG = "persona-pipeline/fire-time"
TICK = timedelta(seconds=60)


@lru_cache(maxsize=1024)
def _spec(expression: str) -> CronSpec:
    """Parsed once per distinct expression: each tick asks for every persona's crons again."""
    return parse_cron(expression)


def tick_window(scheduled: datetime | None) -> tuple[datetime, datetime]:
    """(start, end]: the minute that ends at the tick's scheduled time (or now, floored to the minute)."""
    end = scheduled if scheduled is not None else datetime.now(timezone.utc).replace(second=0, microsecond=0)
    end = end.astimezone(timezone.utc)
    return end - TICK, end


def plan_schedule_runs(kind: str, personas: Iterable[Persona], existing_partitions: set[str],
                       start: datetime, end: datetime) -> tuple[list[dg.RunRequest], dict[str, datetime]]:
    """The run requests of `kind` due in (start, end], and {slug: fire instant} for the personas
    that are due but have no partition yet. Pure apart from Dagster's value types."""
    requests: list[dg.RunRequest] = []
    waiting: dict[str, datetime] = {}
    for persona in personas:
        expression = getattr(persona.config.schedules, kind)
        if expression is None:  # `null` in persona.yaml: this kind is off
            continue
        tz = zone(persona.config.timezone)
        for fire in fire_times(_spec(expression), tz, start, end):
            if persona.slug not in existing_partitions:
                waiting[persona.slug] = fire
                continue
            requests.append(dg.RunRequest(
                run_key=f"{kind}:{persona.slug}:{fire.isoformat()}",
                partition_key=persona.slug,
                tags={"persona": persona.slug, SCHEDULE_TAG: kind, FIRE_TIME_TAG: fire.astimezone(tz).isoformat()},
            ))
    return requests, waiting


def personas_with_primary_lora(database: AppDatabase, slugs: set[str]) -> set[str]:
    """Those of `slugs` that have a primary LoRA in the app database (one query)."""
    if not slugs:
        return set()
    with database.session() as session:
        return set(session.scalars(
            select(models.Persona.slug)
            .join(models.PersonaLora, models.PersonaLora.persona_id == models.Persona.id)
            .where(models.Persona.slug.in_(sorted(slugs)), models.PersonaLora.is_primary.is_(True))))


def _scheduled_time(context: dg.ScheduleEvaluationContext) -> datetime | None:
    try:
        return context.scheduled_execution_time
    except Exception:  # Dagster's CheckError: a context built without one (a manual evaluation)
        return None


def evaluate_persona_schedule(kind: str, context: dg.ScheduleEvaluationContext, persona_folders: PersonaFolders,
                              database: AppDatabase) -> list[dg.RunRequest] | dg.SkipReason:
    """One tick of `persona_<kind>`: the runs of every persona whose `kind` cron fired in the last minute."""
    start, end = tick_window(_scheduled_time(context))
    personas, errors = persona_folders.discover()  # read afresh every tick: file edits apply at once
    for slug, error in sorted(errors.items()):
        context.log.error(f"persona {slug} skipped by the {kind} schedule: {error}")
    existing = set(context.instance.get_dynamic_partitions(persona_partitions.name))
    requests, waiting = plan_schedule_runs(kind, personas, existing, start, end)
    for slug, fire in sorted(waiting.items()):
        context.log.warning(f"persona {slug}: {kind} is due at {fire.isoformat()} but its partition is not added "
                            "yet (the persona_folders sensor adds it within 30 s); not started")
    no_lora: list[str] = []
    if kind in NEEDS_LORA and requests:
        ready = personas_with_primary_lora(database, {r.partition_key for r in requests})
        no_lora = sorted({r.partition_key for r in requests} - ready)
        for slug in no_lora:
            context.log.warning(f"persona {slug}: {kind} is due but it has no primary LoRA yet (its photo_set run "
                                "trains one, or import one into the library); not started")
        requests = [r for r in requests if r.partition_key in ready]
    if requests:
        return requests
    skipped = [f"{slug} (invalid persona.yaml)" for slug in sorted(errors)]
    skipped += [f"{slug} (partition not added yet)" for slug in sorted(waiting)]
    skipped += [f"{slug} (no primary LoRA yet)" for slug in no_lora]
    window = f"({start.isoformat()}, {end.isoformat()}]"
    if skipped:
        return dg.SkipReason(f"no {kind} run requested for {window}; skipped: {', '.join(skipped)}")
    return dg.SkipReason(f"no persona's {kind} schedule fires in {window}")


def _persona_schedule(kind: str, job, description: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"persona_{kind}", job=job, cron_schedule="* * * * *", execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING, description=description,
    )
    def _schedule(context: dg.ScheduleEvaluationContext, persona_folders: PersonaFolders, database: AppDatabase):
        return evaluate_persona_schedule(kind, context, persona_folders, database)

    return _schedule


def persona_schedules(personas: Iterable[Persona] = (), errors: Mapping[str, str] | None = None,
                      now: datetime | None = None) -> list[dg.ScheduleDefinition]:
    """One schedule per kind: persona_planning, persona_generation, persona_posting, persona_report.
    `personas` (as the code location found them on load) only fill the descriptions: the UI shows
    the Dagster cron as "Every minute", so each persona's real cron and timezone is written there."""
    rows = describe_schedules(list(personas), now or datetime.now(timezone.utc))
    return [_persona_schedule(kind, job, schedule_description(kind, job.name, rows, errors or {}))
            for kind, job in SCHEDULE_KINDS.items()]


def describe_schedules(personas: Iterable[Persona], now: datetime, count: int = 3) -> list[dict]:
    """Each persona's schedules with the next `count` fire times (aware, in its timezone); a kind
    that is off has cron None and no times."""
    rows = []
    for persona in personas:
        tz = zone(persona.config.timezone)
        for kind in SCHEDULE_KINDS:
            expression = getattr(persona.config.schedules, kind)
            upcoming = [] if expression is None else next_fire_times(_spec(expression), tz, now, count)
            rows.append({"slug": persona.slug, "kind": kind, "cron": expression, "timezone": persona.config.timezone,
                         "next": [t.astimezone(tz) for t in upcoming]})
    return rows
