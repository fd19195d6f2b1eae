"""The review sensor: turns reviewer decisions (`review_events` rows) into Dagster runs.

- votes, and votes undone → refresh `rankings`, debounced: one run per persona once its votes have been quiet for
  VOTE_QUIET, or VOTE_MAX_WAIT after the first waiting vote while voting goes on; the run is told which steps
  got the votes, and refits those (and any other step whose inputs changed), not the persona's history;
- a step approved, or a candidate killed or restored → `advance_runs` (the next step's children,
  replacements; a step a restore left with nothing to make goes back to voting);
- a winner picked → `library` (clusters + planned posts);
- a post approved, moved or rejected → `post_calendar` (the persona's schedule, checked).

The cursor holds the last event id read and the votes still waiting for their rankings run, so a
restart neither loses nor repeats work; each run key names the last event it covers, so a tick
evaluated twice (cursor not saved) asks for the same runs and Dagster drops the repeats."""


import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import dagster as dg
from sqlalchemy import select
from sqlalchemy.orm import Session

from persona_pipeline.automation.jobs import advance_runs_job, library_job, post_calendar_job, rankings_job
from persona_pipeline.db import models
from persona_pipeline.resources.database import AppDatabase

VOTE_QUIET = timedelta(seconds=30)
VOTE_MAX_WAIT = timedelta(minutes=5)
BATCH = 1000  # events read per tick; the rest wait for the next tick

# event kind → the job it starts
JOB_FOR_KIND = {
    "approve_step": advance_runs_job.name,
    "kill": advance_runs_job.name,
    "restore": advance_runs_job.name,
    "pick_winner": library_job.name,
    "approve_post": post_calendar_job.name,
    "move_post": post_calendar_job.name,
    "reject_post": post_calendar_job.name,
    "retry_post": post_calendar_job.name,
    "abandon_post": post_calendar_job.name,
}


@dataclass
class ReviewCursor:
    last_id: int = 0
    # slug → the waiting votes: first/last event id and time, and the steps they were cast on
    waiting_votes: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, raw: str | None) -> "ReviewCursor":
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(int(data.get("last_id", 0)), dict(data.get("waiting_votes", {})))

    def dump(self) -> str:
        return json.dumps({"last_id": self.last_id, "waiting_votes": self.waiting_votes}, sort_keys=True)


def plan_review_runs(session: Session, cursor: ReviewCursor, now: datetime) -> tuple[list[dg.RunRequest], ReviewCursor, list[str]]:
    """The run requests for the events after the cursor (pure apart from reading the database).
    Returns (requests, new cursor, log lines)."""
    rows = session.execute(
        select(models.ReviewEvent.id, models.ReviewEvent.kind, models.ReviewEvent.created_at, models.Persona.slug,
               models.Persona.active, models.ReviewEvent.payload)
        .join(models.Persona, models.ReviewEvent.persona_id == models.Persona.id)
        .where(models.ReviewEvent.id > cursor.last_id).order_by(models.ReviewEvent.id).limit(BATCH)).all()
    waiting = {slug: dict(v) for slug, v in cursor.waiting_votes.items()}
    # (job, slug) → the last event id it covers, and the event ids, for the log
    wanted: dict[tuple[str, str], list[int]] = {}
    notes: list[str] = []
    last_id = cursor.last_id
    for event_id, kind, created_at, slug, active, payload in rows:
        last_id = event_id
        if not active:
            notes.append(f"event {event_id} ({kind}) of {slug}: the persona's folder is gone; nothing started")
            continue
        if kind in ("vote", "undo_vote"):  # an undone vote changes the ranking as much as a vote
            entry = waiting.setdefault(slug, {"first_id": event_id, "first_at": created_at.isoformat()})
            entry.update(last_id=event_id, last_at=created_at.isoformat())
            step_id = (payload or {}).get("step_id")
            if isinstance(step_id, int):
                entry["step_ids"] = sorted(set(entry.get("step_ids", [])) | {step_id})
        elif kind in JOB_FOR_KIND:
            wanted.setdefault((JOB_FOR_KIND[kind], slug), []).append(event_id)
    requests = []
    for (job, slug), ids in sorted(wanted.items()):
        requests.append(dg.RunRequest(job_name=job, partition_key=slug, run_key=f"{job}:{slug}:{ids[-1]}",
                                      tags={"persona": slug, "review_events": ",".join(map(str, ids[-20:]))}))
        if job == advance_runs_job.name:
            waiting.pop(slug, None)  # advance_runs refreshes rankings too
    for slug in sorted(waiting):
        entry = waiting[slug]
        quiet = now - datetime.fromisoformat(entry["last_at"]) >= VOTE_QUIET
        overdue = now - datetime.fromisoformat(entry["first_at"]) >= VOTE_MAX_WAIT
        if quiet or overdue:
            steps = entry.get("step_ids", [])
            requests.append(dg.RunRequest(job_name=rankings_job.name, partition_key=slug,
                                          run_key=f"{rankings_job.name}:{slug}:{entry['last_id']}",
                                          run_config={"ops": {"rankings": {"config": {"step_ids": steps}}}},
                                          tags={"persona": slug, "review_events": f"votes {entry['first_id']}..{entry['last_id']}",
                                                "steps": ",".join(map(str, steps[-20:]))}))
            del waiting[slug]
    return requests, ReviewCursor(last_id, waiting), notes


@dg.sensor(name="review_events", minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
           jobs=[rankings_job, advance_runs_job, library_job, post_calendar_job],
           description="Every 15 s (the Dagster daemon): turns new review form decisions into runs: votes → "
                       "rankings_refresh (once voting pauses), step approvals, kills and restores → advance_runs, winner picks → "
                       "library, post decisions → post_calendar_refresh.")
def review_sensor(context: dg.SensorEvaluationContext, database: AppDatabase) -> dg.SensorResult:
    database.require_schema()
    cursor = ReviewCursor.load(context.cursor)
    with database.session() as session:
        requests, new_cursor, notes = plan_review_runs(session, cursor, datetime.now(timezone.utc))
    for note in notes:
        context.log.warning(note)
    waiting = ", ".join(f"{slug} (votes to {v['last_id']})" for slug, v in sorted(new_cursor.waiting_votes.items()))
    return dg.SensorResult(
        run_requests=requests, cursor=new_cursor.dump(),
        skip_reason=None if requests else (f"votes waiting for a quiet moment: {waiting}" if waiting else "no new review events"))
