"""The alert outbox: sensors `enqueue` an alert once per dedupe key, and `deliver_due` sends the
ones that are due, with retries and backoff, within a time budget.

Why an outbox: a sensor must never wait on a webhook that is down, and must never send the same
failure twice. The row is the memory of both: its dedupe key stops repeats, its next_attempt_at
holds the backoff across ticks, and a claim (a conditional UPDATE committed before the POST) stops
two sensors delivering at the same moment from sending one alert twice.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain.retry import backoff_wait

BACKOFF_BASE_S = 30.0
BACKOFF_CAP_S = 3600.0
BATCH = 200  # due alerts looked at per call; the rest wait for the next one
KINDS = ("run_failure", "freshness", "freshness_resolved", "persona_file")

_logger = logging.getLogger(__name__)


class Database(Protocol):
    def session(self) -> Any: ...


class Webhook(Protocol):
    enabled: bool
    timeout_s: float
    max_attempts: int

    def post(self, payload: dict) -> None: ...

    def message(self, *, kind: str, text: str, persona: str | None, subject: str, link: str | None) -> dict: ...


def _clip(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def enqueue(session: Session, *, dedupe_key: str, kind: str, subject: str, text: str, persona_slug: str | None = None,
            run_id: str | None = None, link: str | None = None, now: datetime | None = None) -> models.Alert | None:
    """Add a pending alert, due at once. None when an alert with this key exists already (sent,
    pending or failed): the same failure is recorded, and so sent, once."""
    if kind not in KINDS:
        raise ValueError(f"alert kind {kind!r} is not one of {', '.join(KINDS)}")
    if len(dedupe_key) > 300:
        raise ValueError(f"alert dedupe_key is {len(dedupe_key)} characters, at most 300: {dedupe_key[:80]}…")
    if session.scalar(select(models.Alert.id).where(models.Alert.dedupe_key == dedupe_key)) is not None:
        return None
    now = now or models.utcnow()
    alert = models.Alert(dedupe_key=dedupe_key, kind=kind, subject=_clip(subject, 200), text=text,
                         persona_slug=_clip(persona_slug, 64), run_id=run_id, link=link, status="pending", attempts=0,
                         next_attempt_at=now, created_at=now)
    # A savepoint: when another process inserted the same key since the check above, only this
    # insert is undone, not the caller's transaction (PostgreSQL aborts the whole transaction on
    # an error otherwise).
    try:
        with session.begin_nested():
            session.add(alert)
    except IntegrityError:
        return None
    return alert


def _claim(database: Database, alert_id: int, due_at: datetime, lease_until: datetime) -> bool:
    """Take the alert for this delivery: only one of several callers sees its UPDATE match."""
    with database.session() as session:
        result = session.execute(
            update(models.Alert)
            .where(models.Alert.id == alert_id, models.Alert.status == "pending", models.Alert.next_attempt_at == due_at)
            .values(next_attempt_at=lease_until))
        return result.rowcount == 1


def deliver_due(database: Database, webhook: Webhook, *, now: datetime | None = None, budget_s: float = 10.0,
                log: Any = None) -> dict[str, int]:
    """Send the pending alerts due at `now`, oldest first, until `budget_s` is spent (the rest wait
    for the next call). Returns counts: sent, retrying (failed now, tried again later), failed (for
    good: a permanent error, or max_attempts reached) and left (due, not tried this time).

    One call lasts at most about budget_s plus one webhook timeout; a delivery's lease (its
    next_attempt_at pushed ahead while the POST runs) outlasts that, so a crash mid-POST retries
    the alert later instead of losing it."""
    counts = {"sent": 0, "retrying": 0, "failed": 0, "left": 0}
    if not webhook.enabled:
        return counts
    log = log or _logger
    now = now or models.utcnow()
    lease = timedelta(seconds=max(120.0, 10 * webhook.timeout_s))
    deadline = time.monotonic() + budget_s
    with database.session() as session:
        due = session.execute(
            select(models.Alert.id, models.Alert.next_attempt_at)
            .where(models.Alert.status == "pending", models.Alert.next_attempt_at <= now)
            .order_by(models.Alert.next_attempt_at, models.Alert.id).limit(BATCH)).all()
    for index, (alert_id, due_at) in enumerate(due):
        if time.monotonic() >= deadline:
            counts["left"] += len(due) - index
            break
        if not _claim(database, alert_id, due_at, now + lease):
            continue  # another caller is delivering it
        outcome, retry_after = _deliver_one(database, webhook, alert_id, now, log)
        counts[outcome] += 1
        if retry_after:
            # The server asked for a pause (429 + Retry-After): the others wait for a later call.
            counts["left"] += len(due) - index - 1
            break
    return counts


def _deliver_one(database: Database, webhook: Webhook, alert_id: int, now: datetime, log: Any) -> tuple[str, float | None]:
    """POST one claimed alert and record the outcome: ("sent" | "retrying" | "failed", retry_after)."""
    with database.session() as session:
        alert = session.get(models.Alert, alert_id)
        payload = webhook.message(kind=alert.kind, text=alert.text, persona=alert.persona_slug, subject=alert.subject,
                                  link=alert.link)
        label = f"alert {alert.id} ({alert.kind}, {alert.persona_slug or 'all personas'}, {alert.subject})"
    error: Exception | None = None
    try:
        webhook.post(payload)
    except Exception as exc:  # noqa: BLE001 - recorded on the row and retried, never raised into a sensor
        error = exc
    with database.session() as session:
        alert = session.get(models.Alert, alert_id)
        alert.attempts += 1
        if error is None:
            alert.status, alert.sent_at, alert.last_error = "sent", now, None
            return "sent", None
        # AlertDeliveryError (resources/alerts.py) says permanent / retry_after; db/ does not import
        # resources/, so they are read by name, and any other exception counts as retryable.
        permanent = bool(getattr(error, "permanent", False))
        retry_after = getattr(error, "retry_after", None)
        alert.last_error = str(error)[:2000] or type(error).__name__
        if permanent or alert.attempts >= webhook.max_attempts:
            alert.status = "failed"
            why = "cannot be delivered" if permanent else f"gave up after {alert.attempts} attempts"
            log.error(f"{label} {why}: {error}")
            return "failed", None
        wait = max(backoff_wait(BACKOFF_BASE_S, alert.attempts, BACKOFF_CAP_S), retry_after or 0.0)
        alert.next_attempt_at = now + timedelta(seconds=wait)
        log.warning(f"{label}: attempt {alert.attempts} of {webhook.max_attempts} failed ({error}); next try in {wait:.0f} s")
        return "retrying", retry_after
