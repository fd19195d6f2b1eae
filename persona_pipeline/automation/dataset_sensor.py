"""The dataset review sensor: turns dataset decisions from the review form (`dataset_accept` and
`dataset_reject` review events, written by `db.dataset_candidates.decide`) into a `dataset_version`
run: training_dataset builds a new version with the accepted candidates, and lora_model trains on it
in the same run, as the photo_set job does after a photo change (a new LoRA version becomes primary
only when it is better).

A reviewer decides a queue one image at a time, so the run waits until the persona's decisions have
been quiet for DATASET_QUIET (or DATASET_MAX_WAIT after the first waiting one while reviewing goes
on): one new version for a review session, not one training run per click. Rejections alone leave
the dataset as it was, so they start nothing; an undone acceptance (`dataset_undo`) changes it as
much as an acceptance.

The cursor holds the last event id read and the decisions still waiting, so a restart neither loses
nor repeats work; the run key names the last event it covers, so a tick evaluated twice (cursor not
saved) asks for the same run and Dagster drops the repeat."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import dagster as dg
from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.automation.jobs import dataset_version_job
from persona_pipeline.db import models
from persona_pipeline.db.dataset_undo import UNDO_KIND
from persona_pipeline.resources.database import AppDatabase

DATASET_QUIET = timedelta(minutes=2)
DATASET_MAX_WAIT = timedelta(minutes=30)
BATCH = 1000  # events read per tick; the rest wait for the next tick
KINDS = ("dataset_accept", "dataset_reject", UNDO_KIND)


@dataclass
class DatasetCursor:
    last_id: int = 0
    # slug → its waiting decisions: first/last event id and time, and how many change the dataset
    # (acceptances and undone acceptances: "changes") or not (rejections and undone rejections: "others")
    waiting: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, raw: str | None) -> "DatasetCursor":
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(int(data.get("last_id", 0)), dict(data.get("waiting", {})))

    def dump(self) -> str:
        return json.dumps({"last_id": self.last_id, "waiting": self.waiting}, sort_keys=True)


def plan_dataset_runs(session: Session, cursor: DatasetCursor, now: datetime) -> tuple[list[dg.RunRequest], DatasetCursor, list[str]]:
    """The `dataset_version` run requests for the dataset decisions after the cursor (pure apart
    from reading the database). Returns (requests, new cursor, log lines)."""
    rows = session.execute(
        select(models.ReviewEvent.id, models.ReviewEvent.kind, models.ReviewEvent.created_at, models.Persona.slug,
               models.Persona.active, models.ReviewEvent.payload)
        .join(models.Persona, models.ReviewEvent.persona_id == models.Persona.id)
        .where(models.ReviewEvent.id > cursor.last_id, models.ReviewEvent.kind.in_(KINDS))
        .order_by(models.ReviewEvent.id).limit(BATCH)).all()
    waiting = {slug: dict(entry) for slug, entry in cursor.waiting.items()}
    notes: list[str] = []
    last_id = cursor.last_id
    for event_id, kind, created_at, slug, active, payload in rows:
        last_id = event_id
        if not active:
            notes.append(f"event {event_id} ({kind}) of {slug}: the persona's folder is gone; nothing started")
            continue
        entry = waiting.setdefault(slug, {"first_id": event_id, "first_at": created_at.isoformat(), "changes": 0, "others": 0})
        entry.update(last_id=event_id, last_at=created_at.isoformat())
        # An undone acceptance changes the dataset like an acceptance; an undone rejection does not.
        changes = kind == "dataset_accept" or (kind == UNDO_KIND and (payload or {}).get("undone") == "accepted")
        entry["changes" if changes else "others"] += 1
    requests = []
    for slug in sorted(waiting):
        entry = waiting[slug]
        quiet = now - datetime.fromisoformat(entry["last_at"]) >= DATASET_QUIET
        overdue = now - datetime.fromisoformat(entry["first_at"]) >= DATASET_MAX_WAIT
        if not (quiet or overdue):
            continue
        del waiting[slug]
        if not entry["changes"]:
            notes.append(f"{slug}: {entry['others']} decision(s) up to event {entry['last_id']} and no acceptance: "
                         f"the dataset is unchanged, nothing started")
            continue
        requests.append(dg.RunRequest(
            job_name=dataset_version_job.name, partition_key=slug,
            run_key=f"{dataset_version_job.name}:{slug}:{entry['last_id']}",
            tags={"persona": slug, "review_events": f"dataset {entry['first_id']}..{entry['last_id']}",
                  "dataset_changes": str(entry["changes"]), "other_decisions": str(entry["others"])}))
    return requests, DatasetCursor(last_id, waiting), notes


@dg.sensor(name="dataset_reviews", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           jobs=[dataset_version_job],
           description="Every 30 s (the Dagster daemon): once a persona's dataset decisions in the review form have "
                       "paused (2 min, or 30 min after the first), starts a dataset_version run: a new dataset version "
                       "with the accepted candidates, and a LoRA trained on it. Rejections alone start nothing.")
def dataset_sensor(context: dg.SensorEvaluationContext, database: AppDatabase) -> dg.SensorResult:
    database.require_schema()
    cursor = DatasetCursor.load(context.cursor)
    with database.session() as session:
        requests, new_cursor, notes = plan_dataset_runs(session, cursor, datetime.now(timezone.utc))
    for note in notes:
        context.log.info(note)
    waiting = ", ".join(f"{slug} (decisions to event {v['last_id']})" for slug, v in sorted(new_cursor.waiting.items()))
    return dg.SensorResult(
        run_requests=requests, cursor=new_cursor.dump(),
        skip_reason=None if requests else (f"dataset decisions waiting for a quiet moment: {waiting}" if waiting
                                           else "no new dataset decisions"))
