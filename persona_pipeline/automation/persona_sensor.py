"""The persona sensor: finds persona folders, adds them as dynamic partitions, syncs their
settings into the database, and starts a `photo_set` run (source_photos → training_dataset →
lora_model, tagged for the one-training-run-per-GPU limit) when a photo set changes: a new photo
set means a new dataset version and a new LoRA, and the persona's generation schedule needs that
LoRA. Content plans, generation and posting stay with the persona's schedules.

Each photo is read and hashed once while its size and mtime stay (`PhotoHashCache`). The cursor
maps slug → photo-set hash; the run key is `<slug>:<hash>`, so a restart, or a lost cursor,
neither loses nor repeats an ingestion.

An invalid persona.yaml, and a removed persona folder, are sent to ALERT_WEBHOOK_URL (when set):
the same error once, a new error again, a removal once."""

import hashlib
import json
from datetime import datetime, timezone

import dagster as dg
from sqlalchemy.orm import Session

from persona_pipeline.automation.alerts import deliver_quietly
from persona_pipeline.automation.jobs import photo_set_job
from persona_pipeline.db import alerts as outbox
from persona_pipeline.db import registry
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.personas import PhotoHashCache
from persona_pipeline.resources.alerts import AlertWebhook
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.storage import PersonaFolders

# Kept by the code server between ticks: a tick reads only the photos whose size or times changed
# (a restarted server reads every photo once).
PHOTO_HASHES = PhotoHashCache()

@dg.sensor(name="persona_folders", job=photo_set_job, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Every 30 s (the Dagster daemon): reads PERSONA_DATASETS_DIR, adds a partition per new persona, "
                       "syncs persona.yaml into the database, alerts on bad persona files, and starts a photo_set run "
                       "when a persona's photo set changes.")
def persona_sensor(context: dg.SensorEvaluationContext, database: AppDatabase, persona_folders: PersonaFolders,
                   alerts: AlertWebhook) -> dg.SensorResult:
    database.require_schema()
    now = datetime.now(timezone.utc)
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    personas, errors = persona_folders.discover()
    for slug, error in errors.items():
        context.log.error(f"persona {slug} skipped: {error}")

    with database.session() as session:
        for persona in personas:
            registry.sync_persona(session, persona)
        # A folder that failed validation still exists: keep it active so a typo does not retire it.
        gone = registry.deactivate_missing(session, {p.slug for p in personas} | set(errors))
        if alerts.enabled:  # in the same transaction as the deactivation: a removal is alerted once
            persona_file_alerts(session, alerts, errors, gone, now)
    for slug in gone:
        context.log.warning(f"persona {slug}: folder removed; its schedules stop and its partition is kept for history")
    if alerts.enabled and (errors or gone):
        deliver_quietly(database, alerts, context.log, budget_s=5.0, now=now)

    existing = set(context.instance.get_dynamic_partitions(persona_partitions.name))
    new_keys = sorted(p.slug for p in personas if p.slug not in existing)
    run_requests, cursor = [], dict(seen)
    for persona in personas:
        photos_hash = persona.photo_set_hash(PHOTO_HASHES)
        cursor[persona.slug] = photos_hash
        # A folder of links only runs too: ingestion quarantines each link by name, where the user sees it.
        if seen.get(persona.slug) != photos_hash and (persona.photo_files() or persona.photo_scan().refused):
            run_requests.append(dg.RunRequest(run_key=f"{persona.slug}:{photos_hash}", partition_key=persona.slug,
                                              tags={"persona": persona.slug}))
    for slug in gone:
        cursor.pop(slug, None)
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[persona_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(cursor, sort_keys=True),
        skip_reason=None if run_requests or new_keys else "no new persona and no changed photo set",
    )


def persona_file_alerts(session: Session, webhook: AlertWebhook, errors: dict[str, str], gone: list[str], now: datetime) -> None:
    """Enqueue an alert per invalid persona.yaml (keyed by the error's text, so an unchanged error
    is sent once and a new one again) and per removed folder (deactivate_missing reports a
    removal once)."""
    for slug, error in sorted(errors.items()):
        digest = hashlib.sha256(error.encode()).hexdigest()
        outbox.enqueue(session, dedupe_key=f"persona_file:{slug}:{digest}", kind="persona_file", subject="persona.yaml",
                       persona_slug=slug, link=webhook.asset_url("source_photos", slug), now=now,
                       text=f"persona {slug} skipped: {error}\nIts last valid settings stay in use until the file is fixed.")
    for slug in gone:
        outbox.enqueue(session, dedupe_key=f"persona_file:{slug}:removed:{now.isoformat()}", kind="persona_file",
                       subject="persona folder", persona_slug=slug, link=webhook.asset_url("source_photos", slug), now=now,
                       text=f"persona {slug}: folder removed; schedules stopped, partition kept for history")
