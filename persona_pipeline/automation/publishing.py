"""The posting schedule and job: publish every due post through the configured publisher.

One batch (`run_batch`, or `publish_due` for its counts):

1. Retry sweep: a failed, retryable post with retries left goes back to `scheduled` (its
   `next_attempt_at` keeps it waiting); one without retries left is `abandoned`.
2. Due posts: `scheduled`, slot passed, `next_attempt_at` passed or unset; plus posts left in
   `publishing` whose claim expired (db/publishing.py: claims, leases and the writes of outcomes).
3. The posts are grouped by the publisher's `account_key`; accounts run in parallel (`workers`
   threads in all, over `processes` processes: resources/publish_processes.py), and each
   account's posts go to the publisher's `publish_account`, which claims them
   and records each outcome through the batch (resources/publisher.py; the Instagram flow in
   resources/instagram_account.py).
"""

import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import dagster as dg

from persona_pipeline.automation.jobs import PUBLISH_TAG
from persona_pipeline.db.publishing import LEASE, LOCAL_CLAIM, DuePost, PostClaims, due_media_paths
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.publish_batch import CRASH_ENV, BatchReport, PublishBatch
from persona_pipeline.resources.publish_processes import publish_accounts
from persona_pipeline.resources.publisher import Publisher
from persona_pipeline.resources.storage import PersonaStorage

__all__ = ["CRASH_ENV", "LEASE", "PUBLISH_TAG", "BatchReport", "publish_due", "publish_due_posts",
           "publish_job", "publish_schedule", "run_batch"]


def publish_due(database: AppDatabase, publisher: Publisher, now: datetime, log, *, run_id: str | None = None,
                is_run_alive: Callable[[str], bool] | None = None, workers: int | None = None,
                clock: Callable[[], datetime] | None = None, processes: int | None = None) -> dict[str, int]:
    """Publish every due post; the counts per outcome (see `run_batch` for the whole report)."""
    return run_batch(database, publisher, now, log, run_id=run_id, is_run_alive=is_run_alive, workers=workers,
                     clock=clock, processes=processes).counts


def run_batch(database: AppDatabase, publisher: Publisher, now: datetime, log, *, run_id: str | None = None,
              is_run_alive: Callable[[str], bool] | None = None, workers: int | None = None,
              clock: Callable[[], datetime] | None = None, processes: int | None = None) -> BatchReport:
    """One batch. `clock` tells the time as the batch goes on (claims and leases are stamped with
    it); by default `now` moved on by the monotonic time the batch has run. `is_run_alive(run_id)`
    lets a claim of a finished run be taken over before its lease expires. `workers` and
    `processes` default to the publisher's (PERSONA_PUBLISH_WORKERS, PERSONA_PUBLISH_PROCESSES)."""
    claims = PostClaims(database.url, run_id or f"{LOCAL_CLAIM}{uuid.uuid4().hex[:16]}", now,
                        publisher=publisher.name, retry_wait_s=publisher.retry_wait_s, clock=clock or _moving(now))
    batch = PublishBatch(claims, BatchReport(), log)
    batch.sweep(publisher.max_retries)
    groups: dict[str, list[DuePost]] = {}
    for post in claims.due(is_run_alive, batch.warn):
        groups.setdefault(publisher.account_key(post), []).append(post)
    if not groups:
        return batch.report
    publish_accounts(publisher, batch, groups, workers or publisher.workers,
                     processes if processes is not None else publisher.processes)
    return batch.report


def _moving(now: datetime) -> Callable[[], datetime]:
    """`now` moved on by the monotonic time since this call."""
    started = time.monotonic()
    return lambda: now + timedelta(seconds=time.monotonic() - started)


@dg.op(description="Publish every due post through the configured publisher (outbox or Instagram).")
def publish_due_posts(context: dg.OpExecutionContext, database: AppDatabase, publisher: Publisher,
                      storage: PersonaStorage) -> dict:
    instance = context.instance
    now = datetime.now(timezone.utc)
    if storage.mirror is not None:  # object storage: a fresh machine's cache lacks the due posts' JPEGs
        storage.ensure_local(due_media_paths(database.url, now))

    def is_run_alive(run_id: str) -> bool:
        run = instance.get_run_by_id(run_id)
        return run is not None and not run.is_finished

    report = run_batch(database, publisher, now, context.log, run_id=context.run_id, is_run_alive=is_run_alive)
    storage.push_written()  # the outbox records and exported media, with object storage
    metadata: dict[str, Any] = {**report.counts, "publisher": publisher.name,
                                "quotas": dg.MetadataValue.json(report.quotas),
                                "token_warnings": dg.MetadataValue.json(report.token_warnings)}
    if report.errors:
        metadata["errors"] = dg.MetadataValue.json(report.errors)
        # Nothing is lost (the affected posts stay scheduled); failing makes the problem visible.
        raise dg.Failure(description="; ".join(report.errors), metadata=metadata)
    context.add_output_metadata(metadata)
    return report.counts


@dg.job(description="Publish every scheduled post whose slot has come, through the configured publisher. "
                    "Started by publish_due_posts_schedule (PERSONA_PUBLISH_CRON).",
        tags=PUBLISH_TAG)
def publish_job() -> None:
    publish_due_posts()


def publish_schedule(cron: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(name="publish_due_posts_schedule", job=publish_job, cron_schedule=cron,
                                 default_status=dg.DefaultScheduleStatus.RUNNING,
                                 description=f"At `{cron}` (UTC, PERSONA_PUBLISH_CRON): a publish_job run that publishes "
                                             "every scheduled post whose slot has come, for all personas.")
