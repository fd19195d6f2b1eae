"""The posting schedule and job: publish every due post through the configured publisher.

One batch (`run_batch`, or `publish_due` for its counts):

1. Retry sweep: a failed, retryable post with retries left goes back to `scheduled` (its
   `next_attempt_at` keeps it waiting); one without retries left is `abandoned`.
2. Due posts: `scheduled`, slot passed, `next_attempt_at` passed or unset; plus posts left in
   `publishing` whose claim expired: its lease (`claimed_at`) is older than LEASE, whatever Dagster
   says of the claiming run (a run killed with kill -9 stays STARTED there), or, sooner, Dagster
   reports the claiming run finished (`is_run_alive`). A live run renews the lease of the posts it
   holds as it goes (`_renew`), so only a dead or stuck run loses them.
3. Accounts run in parallel (`workers` threads); one account's posts go out in slot order.
4. Every post is claimed with a conditional UPDATE (scheduled → publishing, claimed_by = the run)
   before anything else, so overlapping runs never take the same post; every later write, and
   every Graph call, first checks the claim is still ours (and renews its lease): a run whose
   claim was taken over leaves that post alone.

Instagram (REFERENCES.md §3), per account: the token's expiry is checked and the quota read once;
at most `total − usage` posts are claimed, and a unit is reserved before each media_publish call
(given back when the call is known not to have published). Per post: the caption is validated, the
JPEG is put at MEDIA_PUBLIC_BASE_URL/<slug>/<post>-<sha12>.jpg and its URL checked, the container
is created and its id COMMITTED before anything else, then waited for and published; the media
id, the library item becoming used and the post becoming published are one transaction; the
permalink follows. Up to `prepare_ahead` containers per account are prepared while the previous
post is being published; the publish calls themselves stay one at a time, in slot order.

Crash safety: a claimed post that already has a container asks the container first. PUBLISHED →
never published again: the media is found by caption (`find_media`) and the post recorded as
already published. FINISHED → published. IN_PROGRESS → waited for. EXPIRED → a new container (the
old one is recorded). ERROR → failed, retryable.

Error policy (GraphError.kind): transient (the client already retried) → failed, retryable, with a
growing wait; window (daily limit) → back to `scheduled` untouched, the account stops for this
batch; auth → back to `scheduled`, the account stops, and the op fails at the end so a person
sees it; spam → failed for good and the account stops; media / permanent → failed for good (a
person reschedules it). A persona without `instagram:`, an unset token variable, or a caption over
the limits fail the post for good before any call for it.

The outbox publisher goes through the same claims, sweep and library bookkeeping.
"""

import hashlib
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import dagster as dg
from pydantic import ValidationError
from sqlalchemy import and_, insert, or_, select, update

from persona_pipeline.db import models
from persona_pipeline.domain import post_states
from persona_pipeline.domain.captions import validate_post_text
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.instagram import GraphError
from persona_pipeline.resources.publisher import InstagramPublisher, MediaProblem, OutboxPublisher, Publisher
from persona_pipeline.resources.storage import PersonaStorage

# A post in `publishing` whose lease (`claimed_at`) is older than this is taken over, whatever
# Dagster says of the claiming run. A live run renews it before every call for a post, and the
# leases of its posts still waiting every RENEW_EVERY; one call (HTTP timeouts and retries) takes far less.
LEASE = timedelta(minutes=10)
RENEW_EVERY = LEASE / 5
MAX_RETRY_WAIT = timedelta(hours=6)
LOCAL_CLAIM = "local-"  # claimed_by of a batch run outside Dagster (publish_due without run_id)
# Test hook: PERSONA_TEST_CRASH_AT=after_container (container id committed, publish not called) or
# after_publish (media_publish answered, nothing recorded yet) kills the process right there
# (os._exit(137), as a kill -9 would), so tests can restart after a crash. Never set in production.
CRASH_ENV = "PERSONA_TEST_CRASH_AT"
COUNT_KEYS = ("published", "already_published", "failed", "retried", "abandoned", "deferred", "reclaimed")


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


def post_text(caption: str, hashtags: list[str]) -> str:
    """The text sent to Instagram: the caption, a space, the hashtags (as validate_post_text counts it)."""
    return caption + (" " + " ".join(hashtags) if hashtags else "")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class BatchReport:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    quotas: dict[str, dict[str, Any]] = field(default_factory=dict)  # account -> usage before/after, total
    token_warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # problems a person must fix (the op fails on them)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n


@dataclass(frozen=True)
class _Post:
    """What a worker needs of one post, read in a short transaction (never a live ORM object)."""

    id: int
    status: str
    persona_id: int
    slug: str
    folder: str
    settings: dict
    account: str
    caption: str
    hashtags: list[str]
    media_path: str | None
    scheduled_at: datetime
    retry_count: int
    container_id: str | None
    container_created_at: datetime | None
    library_item_id: int | None
    candidate_id: int | None
    claimed_by: str | None
    claimed_at: datetime | None
    updated_at: datetime | None

    @property
    def text(self) -> str:
        return post_text(self.caption, list(self.hashtags))


class _LostClaim(Exception):
    """Another run took the post over (our lease ran out): leave it to that run."""


@dataclass
class _Batch:
    database: AppDatabase
    publisher: Publisher
    now: datetime
    log: Any
    token: str  # claimed_by of this run
    report: BatchReport
    started: float = field(default_factory=time.monotonic)
    timer: Callable[[], datetime] | None = None  # an injected clock (tests); None: `now` + monotonic time

    def clock(self) -> datetime:
        """`now` moved on by the time the batch has run: claims are stamped on the batch's clock."""
        if self.timer is not None:
            return self.timer()
        return self.now + timedelta(seconds=time.monotonic() - self.started)

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warn(self, msg: str) -> None:
        getattr(self.log, "warning", self.log.info)(msg)

    def error(self, msg: str) -> None:
        self.log.error(msg)


# --- the batch ------------------------------------------------------------------------------------

def publish_due(database: AppDatabase, publisher: Publisher, now: datetime, log, *, run_id: str | None = None,
                is_run_alive: Callable[[str], bool] | None = None, workers: int | None = None,
                clock: Callable[[], datetime] | None = None) -> dict[str, int]:
    """Publish every due post; the counts per outcome (see `run_batch` for the whole report)."""
    return run_batch(database, publisher, now, log, run_id=run_id, is_run_alive=is_run_alive, workers=workers,
                     clock=clock).counts


def run_batch(database: AppDatabase, publisher: Publisher, now: datetime, log, *, run_id: str | None = None,
              is_run_alive: Callable[[str], bool] | None = None, workers: int | None = None,
              clock: Callable[[], datetime] | None = None) -> BatchReport:
    """One batch. `clock` tells the time as the batch goes on (claims and leases are stamped with
    it); by default `now` moved on by the monotonic time the batch has run."""
    batch = _Batch(database, publisher, now, log, run_id or f"{LOCAL_CLAIM}{uuid.uuid4().hex[:16]}", BatchReport(),
                   timer=clock)
    _sweep(batch)
    groups = _due_groups(batch, is_run_alive)
    if not groups:
        return batch.report
    runner = _instagram_account if isinstance(publisher, InstagramPublisher) else _outbox_account
    with ThreadPoolExecutor(max_workers=max(1, min(workers or publisher.workers, len(groups))),
                            thread_name_prefix="publish-account") as pool:
        futures = {pool.submit(runner, batch, key, posts): key for key, posts in groups.items()}
        for future, key in futures.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - one account's bug must not hide the others' results
                # Its claimed posts stay `publishing`; the next run takes them over (this run is over by then).
                batch.report.errors.append(f"account {key}: {type(exc).__name__}: {exc}")
                batch.error(f"account {key}: publishing stopped: {type(exc).__name__}: {exc}")
    return batch.report


def _sweep(batch: _Batch) -> None:
    """failed + retryable → scheduled while retries are left, else abandoned. Conditional updates,
    so an overlapping run cannot move a post twice."""
    limit = batch.publisher.max_retries
    with batch.database.session() as session:
        rows = session.execute(select(models.Post.id, models.Post.retry_count).where(
            models.Post.status == post_states.FAILED, models.Post.retryable.is_(True))).all()
        for post_id, retries in rows:
            new = post_states.SCHEDULED if retries < limit else post_states.ABANDONED
            post_states.check_transition(post_states.FAILED, new)
            moved = session.connection().execute(update(models.Post).where(
                models.Post.id == post_id, models.Post.status == post_states.FAILED).values(status=new)).rowcount
            if moved:
                batch.report.add("retried" if new == post_states.SCHEDULED else "abandoned")
                if new == post_states.ABANDONED:
                    batch.warn(f"post {post_id} abandoned after {retries} failed attempts")


def _snapshot(post: models.Post, persona: models.Persona) -> _Post:
    return _Post(post.id, post.status, post.persona_id, persona.slug, persona.folder, dict(persona.settings or {}),
                 post.account, post.caption, list(post.hashtags or []), post.media_path, post.scheduled_at,
                 post.retry_count, post.container_id, post.container_created_at, post.library_item_id,
                 post.candidate_id, post.claimed_by, post.claimed_at, post.updated_at)


def _due_groups(batch: _Batch, is_run_alive: Callable[[str], bool] | None) -> dict[str, list[_Post]]:
    """Due and reclaimable posts by account, each account's in slot order."""
    now = batch.now
    due = or_(
        and_(models.Post.status == post_states.SCHEDULED, models.Post.scheduled_at <= now,
             or_(models.Post.next_attempt_at.is_(None), models.Post.next_attempt_at <= now)),
        models.Post.status == post_states.PUBLISHING)
    with batch.database.session() as session:
        rows = session.execute(select(models.Post, models.Persona).join(models.Persona, models.Persona.id == models.Post.persona_id)
                               .where(due).order_by(models.Post.scheduled_at, models.Post.id)).all()
        posts = [_snapshot(post, persona) for post, persona in rows]
    alive: dict[str, bool] = {}
    groups: dict[str, list[_Post]] = {}
    for post in posts:
        if post.status == post_states.PUBLISHING and not _reclaimable(batch, post, is_run_alive, alive):
            continue
        groups.setdefault(_account_key(batch.publisher, post), []).append(post)
    return groups


def _reclaimable(batch: _Batch, post: _Post, is_run_alive, cache: dict[str, bool | None]) -> bool:
    """An expired lease frees the post whatever Dagster says (a killed run can stay STARTED there for
    ever); within its lease, only a claiming run that Dagster reports finished gives it up early."""
    if post.claimed_by == batch.token:
        return False
    lease = post.claimed_at or post.updated_at  # claimed_at is the lease; older rows may lack it
    if lease is None or lease < batch.clock() - LEASE:
        return True
    # A claim made outside Dagster (no run id) cannot be asked about: only the lease frees it.
    if not post.claimed_by or post.claimed_by.startswith(LOCAL_CLAIM) or is_run_alive is None:
        return False
    if post.claimed_by not in cache:
        try:
            cache[post.claimed_by] = bool(is_run_alive(post.claimed_by))
        except Exception as exc:  # noqa: BLE001 - the lease still frees it
            batch.warn(f"could not ask whether run {post.claimed_by} is alive ({exc}); waiting for its {LEASE} lease")
            cache[post.claimed_by] = None
    return cache[post.claimed_by] is False


def _account_key(publisher: Publisher, post: _Post) -> str:
    if isinstance(publisher, InstagramPublisher):
        instagram = (post.settings or {}).get("instagram") or {}
        return str(instagram.get("user_id")) if instagram.get("user_id") else f"no-instagram:{post.slug}"
    return post.account


# --- claims and the writes that change a post's status -------------------------------------------

def _claim(batch: _Batch, posts: list[_Post]) -> list[_Post]:
    """Claim `posts` (one transaction, one conditional UPDATE each); the ones won, re-read after
    the claim (a person may have edited the caption just before)."""
    if not posts:
        return []
    won: list[int] = []
    stamp = batch.clock()
    with batch.database.session() as session:
        for post in posts:
            if post.status == post_states.SCHEDULED:
                post_states.check_transition(post_states.SCHEDULED, post_states.PUBLISHING)
                condition = and_(models.Post.status == post_states.SCHEDULED, models.Post.scheduled_at <= batch.now)
            else:  # taking over an expired claim: only if nobody took it over or renewed it since we looked
                owner = models.Post.claimed_by.is_(None) if post.claimed_by is None else models.Post.claimed_by == post.claimed_by
                lease = models.Post.claimed_at.is_(None) if post.claimed_at is None else models.Post.claimed_at == post.claimed_at
                condition = and_(models.Post.status == post_states.PUBLISHING, owner, lease)
            claimed = session.connection().execute(update(models.Post).where(models.Post.id == post.id, condition).values(
                status=post_states.PUBLISHING, claimed_by=batch.token, claimed_at=stamp, updated_at=stamp)).rowcount
            if claimed:
                won.append(post.id)
        rows = session.execute(select(models.Post, models.Persona).join(models.Persona, models.Persona.id == models.Post.persona_id)
                               .where(models.Post.id.in_(won))).all() if won else []
        fresh = {post.id: _snapshot(post, persona) for post, persona in rows}
    taken_over = sum(1 for p in posts if p.id in fresh and p.status == post_states.PUBLISHING)
    if taken_over:
        batch.report.add("reclaimed", taken_over)
        batch.info(f"took over {taken_over} post(s) left in publishing by a run that ended")
    return [fresh[p.id] for p in posts if p.id in fresh]


def _attempt(batch: _Batch, post_id: int, step: str, outcome: str, *, container_id: str | None = None,
             external_id: str | None = None, error: GraphError | None = None, detail: str | None = None) -> dict:
    """A post_attempts row (inserted with the next write of that post). Never holds the token:
    GraphError texts are scrubbed by the client."""
    return dict(post_id=post_id, publisher=batch.publisher.name, step=step, outcome=outcome, external_id=external_id,
                container_id=container_id, http_status=error.http_status if error else None,
                error_code=error.code if error else None, error_subcode=error.subcode if error else None,
                detail=detail if detail is not None else (str(error) if error else None),
                created_at=datetime.now(timezone.utc))


def _ours(batch: _Batch, post_id: int):
    return and_(models.Post.id == post_id, models.Post.status == post_states.PUBLISHING,
                models.Post.claimed_by == batch.token)


def _renew(batch: _Batch, post: _Post) -> None:
    """Before a call for `post`: prove the claim is still ours and renew its lease; _LostClaim if
    another run took it over (our lease ran out while we were stuck), which then owns it alone."""
    stamp = batch.clock()
    with batch.database.session() as session:
        renewed = session.connection().execute(update(models.Post).where(_ours(batch, post.id)).values(
            claimed_at=stamp)).rowcount
    if not renewed:
        raise _LostClaim(f"post {post.id} is no longer claimed by this run")


def _renew_waiting(batch: _Batch, post_ids: list[int], since: datetime) -> datetime:
    """Posts claimed up front wait their turn without a call of their own: once RENEW_EVERY has
    passed `since` (the last renewal), renew the leases of those still ours, so a long batch keeps
    them. Returns the time of the last renewal."""
    stamp = batch.clock()
    if stamp - since < RENEW_EVERY or not post_ids:
        return since
    with batch.database.session() as session:
        session.connection().execute(update(models.Post).where(
            models.Post.id.in_(post_ids), models.Post.status == post_states.PUBLISHING,
            models.Post.claimed_by == batch.token).values(claimed_at=stamp))
    return stamp


def _write(batch: _Batch, post: _Post, values: dict[str, Any], attempts: list[dict],
           library: bool = False) -> None:
    """One transaction: the post's row (only while our claim holds; a post that stays
    `publishing` has its lease renewed), its attempts, and with `library` its library item marked used."""
    stamp = batch.clock()
    lease = {} if "status" in values else {"claimed_at": stamp}
    with batch.database.session() as session:
        # Core statements on the session's connection: the ORM's bulk-update bookkeeping is not needed here.
        connection = session.connection()
        changed = connection.execute(update(models.Post).where(_ours(batch, post.id)).values(
            updated_at=stamp, **lease, **values)).rowcount
        if not changed:
            raise _LostClaim(f"post {post.id} is no longer claimed by this run")
        if attempts:
            connection.execute(insert(models.PostAttempt), attempts)
        if library:
            item = (models.LibraryItem.id == post.library_item_id if post.library_item_id is not None
                    else models.LibraryItem.candidate_id == post.candidate_id if post.candidate_id is not None else None)
            if item is not None:
                connection.execute(update(models.LibraryItem).where(item).values(
                    status="used", used_by_post_id=post.id, used_at=datetime.now(timezone.utc)))


def _published(batch: _Batch, post: _Post, *, external_id: str | None, permalink: str | None, already: bool,
               step: str, container_id: str | None = None, detail: str | None = None,
               attempts: list[dict] = ()) -> None:
    post_states.check_transition(post_states.PUBLISHING, post_states.PUBLISHED)
    outcome = "already_published" if already else "published"
    # An earlier failed attempt's reason and wait stay in post_attempts, not on a published post.
    values = dict(status=post_states.PUBLISHED, external_id=external_id, published_at=datetime.now(timezone.utc),
                  failure_reason=None, next_attempt_at=None)
    if permalink:
        values["permalink"] = permalink
    _write(batch, post, values, [*attempts, _attempt(batch, post.id, step, outcome, container_id=container_id,
                                                      external_id=external_id, detail=detail)], library=True)
    batch.report.add(outcome)
    batch.info(f"post {post.id} ({post.slug}) {outcome.replace('_', ' ')}: {detail or external_id}")


def _failed(batch: _Batch, post: _Post, reason: str, *, retryable: bool, step: str, error: GraphError | None = None,
            container_id: str | None = None, clear_container: bool = False,
            attempts: list[dict] = ()) -> None:
    """publishing → failed. Retryable: the sweep reschedules it after a growing wait. Not
    retryable: it stays failed until a person reschedules it. Its library item stays available."""
    post_states.check_transition(post_states.PUBLISHING, post_states.FAILED)
    retries = post.retry_count + 1
    wait = min(MAX_RETRY_WAIT, timedelta(seconds=batch.publisher.retry_wait_s * 2 ** (retries - 1)))
    values: dict[str, Any] = dict(status=post_states.FAILED, failure_reason=reason, retry_count=retries,
                                  retryable=retryable, next_attempt_at=batch.now + wait if retryable else None)
    if clear_container:
        values.update(container_id=None, container_created_at=None)
    _write(batch, post, values, [*attempts, _attempt(batch, post.id, step, "failed", container_id=container_id,
                                                      error=error, detail=reason)])
    batch.report.add("failed")
    batch.error(f"post {post.id} ({post.slug}) failed{'' if retryable else ' (not retried: a person must reschedule it)'}: {reason}")


def _back_to_scheduled(batch: _Batch, post: _Post, outcome: str, detail: str, *, step: str,
                       error: GraphError | None = None, attempts: list[dict] = ()) -> None:
    """Give the claim back untouched (no retry counted): publishing → failed → scheduled in one
    transaction (the status model has no direct edge). A container it has is kept: the next
    attempt asks its status first."""
    post_states.check_transition(post_states.PUBLISHING, post_states.FAILED)
    post_states.check_transition(post_states.FAILED, post_states.SCHEDULED)
    _write(batch, post, dict(status=post_states.SCHEDULED),
           [*attempts, _attempt(batch, post.id, step, outcome, container_id=post.container_id, error=error, detail=detail)])
    batch.report.add("deferred")


# --- outbox ----------------------------------------------------------------------------------------

def _outbox_account(batch: _Batch, key: str, posts: list[_Post]) -> None:
    publisher: OutboxPublisher = batch.publisher  # type: ignore[assignment]
    claimed = _claim(batch, posts)
    renewed = batch.clock()
    for index, post in enumerate(claimed):
        try:
            renewed = _renew_waiting(batch, [p.id for p in claimed[index + 1:]], renewed)
            _renew(batch, post)
            try:
                outcome = publisher.publish(post_id=post.id, persona_slug=post.slug, account=post.account,
                                            media_path=Path(post.media_path or ""), caption=post.caption,
                                            hashtags=list(post.hashtags), scheduled_at=post.scheduled_at)
            except Exception as exc:  # noqa: BLE001 - recorded on the post, never lost
                _failed(batch, post, f"{type(exc).__name__}: {exc}", retryable=True, step="outbox")
                continue
            _published(batch, post, external_id=outcome.external_id, permalink=None, already=outcome.already_published,
                       step="outbox", detail=outcome.location)
        except _LostClaim as exc:
            batch.warn(str(exc))


# --- Instagram -------------------------------------------------------------------------------------

class _Quota:
    """This run's share of an account's 24 h quota: a unit is reserved before each publish call."""

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        with self._lock:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            return True

    def release(self) -> None:
        with self._lock:
            self.remaining += 1


@dataclass
class _Account:
    batch: _Batch
    key: str
    user_id: str
    token: str = field(repr=False)
    publisher: InstagramPublisher = field(repr=False)
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""

    @property
    def graph(self):
        return self.publisher.graph

    def halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()
            self.batch.warn(f"account {self.user_id}: stopped for this batch: {reason}")


@dataclass
class _Ready:
    """The outcome of preparing a post: `container_id` FINISHED and ready to publish, or `done`
    (failed, published or given back already)."""

    post: _Post
    container_id: str | None = None
    done: bool = False
    attempts: list = field(default_factory=list)  # attempt rows not yet written, go with the next write


def _instagram_account(batch: _Batch, key: str, posts: list[_Post]) -> None:
    publisher: InstagramPublisher = batch.publisher  # type: ignore[assignment]
    first = posts[0]
    yaml_path = f"{first.folder}/persona.yaml"
    try:
        instagram = PersonaConfig.model_validate(first.settings).instagram
    except ValidationError as exc:
        instagram, problem = None, f"{yaml_path} is invalid ({exc.error_count()} problem(s)); fix it and reschedule"
    else:
        problem = None if instagram else (f"{yaml_path} has no `instagram` field (user_id and token_env): "
                                          f"the instagram publisher has no account to post persona {first.slug} to")
    if instagram and not problem and publisher.token(instagram.token_env) is None:
        problem = (f"environment variable {instagram.token_env} (named by {yaml_path} field instagram.token_env) "
                   "is unset or empty")
    if problem:
        for post in _claim(batch, posts):
            _safely(batch, post, lambda p=post: _failed(batch, p, problem, retryable=False, step="container"))
        return
    if not publisher.media_public_base_url:
        # A setting, not a post's fault: nothing is claimed, and the op fails so a person sees it.
        message = "MEDIA_PUBLIC_BASE_URL is not set: Instagram needs a public URL to fetch each image from"
        if message not in batch.report.errors:
            batch.report.errors.append(message)
        batch.error(f"account {key}: {message}; its due posts stay scheduled")
        batch.report.add("deferred", len(posts))
        return
    account = _Account(batch, key, instagram.user_id, publisher.token(instagram.token_env), publisher)
    if not _token_ok(account):
        batch.report.add("deferred", len(posts))
        return
    try:
        quota = account.graph.quota(account.user_id, account.token)
    except GraphError as exc:
        _account_call_failed(account, "quota", exc)
        batch.report.add("deferred", len(posts))
        return
    in_flight = _in_flight_elsewhere(batch, posts)
    remaining = max(0, quota.total - quota.usage - in_flight)
    stats = {"usage_before": quota.usage, "total": quota.total, "in_flight_elsewhere": in_flight, "published": 0}
    with batch.report._lock:
        batch.report.quotas[account.user_id] = stats

    # Bad captions fail before any call for them, and take no quota.
    valid: list[_Post] = []
    bad: dict[int, str] = {}
    for post in posts:
        max_tags = PersonaConfig.model_validate(post.settings).hashtags.max_per_post
        problems = validate_post_text(post.caption, list(post.hashtags), max_tags)
        if problems and not post.container_id:  # one with a container was sent already: it is asked first
            bad[post.id] = (f"caption over Instagram's limits: {'; '.join(problems)} "
                            f"(hashtags.max_per_post is {max_tags} in {post.folder}/persona.yaml)")
        else:
            valid.append(post)
    for post in _claim(batch, [p for p in posts if p.id in bad]):
        _safely(batch, post, lambda p=post: _failed(batch, p, bad[p.id], retryable=False, step="container"))

    # Posts a dead run left in `publishing` first (they may be out already), then the due ones.
    reclaim = [p for p in valid if p.status == post_states.PUBLISHING]
    fresh = [p for p in valid if p.status == post_states.SCHEDULED]
    take = fresh[:max(0, remaining - len(reclaim))]
    if len(take) < len(fresh):
        batch.report.add("deferred", len(fresh) - len(take))
        batch.info(f"account {account.user_id}: quota {quota.usage}/{quota.total} (+{in_flight} in flight elsewhere): "
                   f"{len(fresh) - len(take)} due post(s) wait for the next batch")
    claimed = sorted(_claim(batch, reclaim + take), key=lambda p: (p.scheduled_at, p.id))
    budget = _Quota(remaining)
    _pipeline(account, claimed, budget, stats)

    try:
        after = account.graph.quota(account.user_id, account.token)
        stats["usage_after"] = after.usage
    except GraphError as exc:
        stats["usage_after"] = f"unknown ({exc.kind}); {quota.usage} + {stats['published']} published here"


def _safely(batch: _Batch, post: _Post, write: Callable[[], None]) -> None:
    try:
        write()
    except _LostClaim as exc:
        batch.warn(str(exc))


def _token_ok(account: _Account) -> bool:
    """Once per account per batch: a rejected token stops the account (its posts stay
    scheduled, the op fails so a person sees it); one expiring soon is a warning."""
    batch = account.batch
    try:
        info = account.graph.token_info(account.token)
    except GraphError as exc:
        if exc.kind == "auth":
            _account_call_failed(account, "debug_token", exc)
            return False
        batch.warn(f"account {account.user_id}: token expiry unknown ({exc})")
        return True
    if not info.valid:
        message = f"account {account.user_id}: Instagram rejects the access token; renew it (nothing was published)"
        batch.report.errors.append(message)
        batch.error(message)
        return False
    if info.expires_at is not None:
        left = info.expires_at - datetime.now(timezone.utc)
        if left <= timedelta(days=account.publisher.token_warn_days):
            warning = (f"account {account.user_id}: access token expires {info.expires_at.isoformat(timespec='minutes')} "
                       f"(in {max(0, left.days)} day(s)); renew it")
            batch.report.token_warnings.append(warning)
            batch.warn(warning)
    return True


def _account_call_failed(account: _Account, what: str, exc: GraphError) -> None:
    batch = account.batch
    message = f"account {account.user_id}: {what} failed ({exc}); its due posts stay scheduled"
    if exc.kind == "auth":
        batch.report.errors.append(message)
        batch.error(message)
    else:
        batch.warn(message)


def _in_flight_elsewhere(batch: _Batch, posts: list[_Post]) -> int:
    """Posts of these personas another live run is publishing now: they may still use quota."""
    ours = {p.id for p in posts}
    with batch.database.session() as session:
        ids = session.scalars(select(models.Post.id).where(
            models.Post.persona_id.in_({p.persona_id for p in posts}), models.Post.status == post_states.PUBLISHING,
            or_(models.Post.claimed_by.is_(None), models.Post.claimed_by != batch.token))).all()
    return sum(1 for post_id in ids if post_id not in ours)


def _pipeline(account: _Account, posts: list[_Post], budget: _Quota, stats: dict) -> None:
    """Prepare containers ahead on a small pool; publish in slot order on this thread."""
    depth = account.publisher.prepare_ahead
    pool = ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix=f"publish-{account.user_id}") if depth else None
    pending = deque(posts)
    inflight: deque[tuple[_Post, Future | None]] = deque()
    after: list[Future] = []

    def fill() -> None:
        while pending and not account.stop.is_set() and len(inflight) < max(1, depth):
            post = pending.popleft()
            inflight.append((post, pool.submit(_prepare, account, post) if pool else None))

    renewed = account.batch.clock()  # when the claims were made
    try:
        fill()
        while inflight:
            renewed = _renew_waiting(account.batch, [p.id for p, _ in inflight] + [p.id for p in pending], renewed)
            post, future = inflight.popleft()
            ready = future.result() if future else _prepare(account, post)
            fill()
            if ready.done:
                continue
            try:
                _publish(account, ready, budget, stats, after, pool)
            except _LostClaim as exc:
                account.batch.warn(str(exc))
            except Exception as exc:  # noqa: BLE001 - fail this post, go on with the next
                # Its container is kept: if the publish went out, the next attempt finds it PUBLISHED.
                reason = f"{type(exc).__name__}: {exc}"
                _safely(account.batch, ready.post, lambda: _failed(account.batch, ready.post, reason, retryable=True,
                                                                   step="publish"))
        for post in pending:  # the account stopped before these were started
            _safely(account.batch, post, lambda p=post: _back_to_scheduled(
                account.batch, p, "deferred", account.stop_reason, step="publish"))
    finally:
        links = [future.result() for future in after]
        if pool:
            pool.shutdown(wait=True)
        _record_permalinks(account.batch, links)


def _guarded(function):
    """Any unexpected error while handling one post fails that post (retryable), never the batch."""
    def wrapper(account: _Account, post: _Post, *args):
        try:
            return function(account, post, *args)
        except _LostClaim as exc:
            account.batch.warn(str(exc))
        except Exception as exc:  # noqa: BLE001
            reason = f"{type(exc).__name__}: {exc}"
            _safely(account.batch, post, lambda: _failed(account.batch, post, reason, retryable=True, step="container"))
        return _Ready(post, done=True)
    return wrapper


@_guarded
def _prepare(account: _Account, post: _Post) -> _Ready:
    """Make `post` ready to publish: a FINISHED container whose id is committed on the post."""
    batch = account.batch
    if account.stop.is_set():
        _back_to_scheduled(batch, post, "deferred", account.stop_reason, step="publish")
        return _Ready(post, done=True)
    if post.container_id:
        return _resume(account, post)
    return _new_container(account, post, [])


def _resume(account: _Account, post: _Post) -> _Ready:
    """A claimed post that has a container already (a crash, or a batch that stopped): ask first."""
    batch, cid = account.batch, post.container_id
    _renew(batch, post)
    try:
        status = account.graph.container_status(cid, account.token)
    except GraphError as exc:
        return _container_error(account, post, exc, cid, "status", [])
    seen = [_attempt(batch, post.id, "status", status.lower(), container_id=cid)]
    if status == "PUBLISHED":
        _reconcile(account, post, cid, seen)
        return _Ready(post, done=True)
    if status == "IN_PROGRESS":
        try:
            status = account.graph.wait_for_container(cid, account.token)
        except GraphError as exc:
            return _container_error(account, post, exc, cid, "status", seen)
        seen.append(_attempt(batch, post.id, "status", status.lower(), container_id=cid))
    if status == "FINISHED":
        if _container_text(batch, post.id, cid) not in (None, _digest(post.text)):
            seen.append(_attempt(batch, post.id, "container", "replaced", container_id=cid,
                                 detail="the caption changed since this container was made; a new one replaces it"))
            return _new_container(account, post, seen)
        return _Ready(post, cid, attempts=seen)
    return _unusable_container(account, post, cid, status, seen)


def _unusable_container(account: _Account, post: _Post, cid: str, status: str, seen: list) -> _Ready:
    batch = account.batch
    if status == "EXPIRED":
        seen.append(_attempt(batch, post.id, "container", "replaced", container_id=cid,
                             detail="container EXPIRED (not published within 24 h); a new one replaces it"))
        return _new_container(account, post, seen)
    if status == "PUBLISHED":  # it went out while we were waiting on it (another client?)
        _reconcile(account, post, cid, seen)
        return _Ready(post, done=True)
    _failed(batch, post, f"Instagram could not process container {cid} (status {status}); a new one is made next time",
            retryable=True, step="status", container_id=cid, clear_container=True, attempts=seen)
    return _Ready(post, done=True)


def _container_text(batch: _Batch, post_id: int, cid: str) -> str | None:
    """The caption digest a container was made with (from its attempt row), None if unknown."""
    with batch.database.session() as session:
        detail = session.scalar(select(models.PostAttempt.detail).where(
            models.PostAttempt.post_id == post_id, models.PostAttempt.step == "container",
            models.PostAttempt.outcome == "created", models.PostAttempt.container_id == cid)
            .order_by(models.PostAttempt.id.desc()).limit(1))
    for part in (detail or "").split():
        if part.startswith("text_sha256="):
            return part.split("=", 1)[1]
    return None


def _new_container(account: _Account, post: _Post, seen: list, recreated: int = 0) -> _Ready:
    batch, publisher = account.batch, account.publisher
    if not post.media_path:
        _failed(batch, post, f"post {post.id} has no media file", retryable=False, step="container", attempts=seen)
        return _Ready(post, done=True)
    try:
        staged = publisher.stage_media(post.slug, post.id, Path(post.media_path))
    except MediaProblem as exc:
        _failed(batch, post, str(exc), retryable=False, step="container", attempts=seen)
        return _Ready(post, done=True)
    problem = publisher.check_media_url(staged.url)
    if problem:
        _failed(batch, post, f"{problem}; no container was created (is the web server behind MEDIA_PUBLIC_BASE_URL up?)",
                retryable=True, step="container", attempts=[*seen, _attempt(batch, post.id, "container", "media_unreachable",
                                                                         detail=problem)])
        return _Ready(post, done=True)
    text = post.text
    _renew(batch, post)  # staging may have taken a while: never make a container for a post lost meanwhile
    try:
        cid = account.graph.create_container(account.user_id, account.token, staged.url, text)
    except GraphError as exc:
        return _container_error(account, post, exc, None, "container", seen)
    created = datetime.now(timezone.utc)
    # The container id is committed before anything else: a crash from here on is recovered by asking it.
    _write(batch, post, dict(container_id=cid, container_created_at=created, media_url=staged.url,
                             media_sha256=staged.sha256),
           [*seen, _attempt(batch, post.id, "container", "created", container_id=cid,
                            detail=f"text_sha256={_digest(text)} media={staged.url}"
                                   + (" (exported)" if staged.exported else ""))])
    _crash_point("after_container")
    post = _with(post, container_id=cid, container_created_at=created)
    try:
        status = account.graph.wait_for_container(cid, account.token)
    except GraphError as exc:
        return _container_error(account, post, exc, cid, "status", [])
    seen = [_attempt(batch, post.id, "status", status.lower(), container_id=cid)]
    if status == "FINISHED":
        return _Ready(post, cid, attempts=seen)
    if status == "EXPIRED" and recreated:
        seen.append(_attempt(batch, post.id, "container", "replaced", container_id=cid, detail="EXPIRED again"))
        _failed(batch, post, f"container {cid} expired right after it was made", retryable=True, step="status",
                container_id=cid, clear_container=True, attempts=seen)
        return _Ready(post, done=True)
    if status == "EXPIRED":
        seen.append(_attempt(batch, post.id, "container", "replaced", container_id=cid,
                             detail="container EXPIRED; a new one replaces it"))
        return _new_container(account, post, seen, recreated + 1)
    return _unusable_container(account, post, cid, status, seen)


def _with(post: _Post, **changes) -> _Post:
    from dataclasses import replace

    return replace(post, **changes)


def _container_error(account: _Account, post: _Post, exc: GraphError, cid: str | None, step: str, seen: list) -> _Ready:
    """A failed container create or status call, by the error's kind."""
    batch = account.batch
    if exc.kind == "recreate" and cid and step == "status":
        seen = [*seen, _attempt(batch, post.id, "container", "replaced", container_id=cid, error=exc)]
        return _new_container(account, post, seen)
    if exc.kind in ("window", "auth"):
        _stop_for(account, post, exc, step, seen)
        return _Ready(post, done=True)
    if exc.kind == "spam":
        account.halt(f"spam block ({exc})")
    retryable = exc.kind in ("transient", "recreate")
    _failed(batch, post, str(exc), retryable=retryable, step=step, error=exc, container_id=cid, attempts=seen)
    return _Ready(post, done=True)


def _stop_for(account: _Account, post: _Post, exc: GraphError, step: str, seen: list) -> None:
    """window / auth: the post goes back to scheduled untouched and the account stops."""
    batch = account.batch
    if exc.kind == "auth":
        message = f"account {account.user_id}: the access token was rejected ({exc}); renew it"
        with batch.report._lock:
            if message not in batch.report.errors:
                batch.report.errors.append(message)
        batch.error(message)
    account.halt(f"{'daily publishing limit reached' if exc.kind == 'window' else 'token rejected'} ({exc.call})")
    _back_to_scheduled(batch, post, exc.kind, str(exc), step=step, error=exc, attempts=seen)


def _publish(account: _Account, ready: _Ready, budget: _Quota, stats: dict, after: list, pool) -> None:
    """The publish call for one ready post, in slot order, with a quota unit reserved first."""
    batch, post, cid = account.batch, ready.post, ready.container_id
    for _round in range(2):  # a container that expires at the publish call is replaced once
        if account.stop.is_set():
            _back_to_scheduled(batch, post, "deferred", account.stop_reason, step="publish", attempts=ready.attempts)
            return
        # The post may have waited its turn since it was prepared: publish only while it is still ours.
        _renew(batch, post)
        if not budget.reserve():
            _back_to_scheduled(batch, post, "quota", "this run's share of the account's 24 h quota is used up",
                               step="quota", attempts=ready.attempts)
            return
        try:
            media_id = account.graph.publish_container(account.user_id, account.token, cid)
        except GraphError as exc:
            if exc.container_status == "PUBLISHED":  # it went out; its answer was lost
                _reconcile(account, post, cid, [*ready.attempts, _attempt(batch, post.id, "publish", "answer_lost",
                                                                          container_id=cid, error=exc)])
                stats["published"] += 1
                return
            if exc.code is not None and (exc.http_status or 0) < 500:
                budget.release()  # a definite refusal: nothing was published
            if exc.kind == "recreate" and _round == 0:
                replaced = _attempt(batch, post.id, "publish", "expired", container_id=cid, error=exc)
                ready = _new_container(account, post, [*ready.attempts, replaced])
                if ready.done:
                    return
                post, cid = ready.post, ready.container_id
                continue
            if exc.kind in ("window", "auth"):
                _stop_for(account, post, exc, "publish", ready.attempts)
                return
            if exc.kind == "spam":
                account.halt(f"spam block ({exc})")
            retryable = exc.kind in ("transient", "recreate")
            # Unless the container is known unusable, it is kept: the next attempt asks its status first.
            _failed(batch, post, str(exc), retryable=retryable, step="publish", error=exc, container_id=cid,
                    clear_container=exc.container_status in ("EXPIRED", "ERROR"), attempts=ready.attempts)
            return
        _crash_point("after_publish")
        _published(batch, post, external_id=media_id, permalink=None, already=False, step="publish",
                   container_id=cid, detail=f"media {media_id}", attempts=ready.attempts)
        stats["published"] += 1
        task = lambda: _permalink(account, post, media_id)  # noqa: E731
        after.append(pool.submit(task) if pool else _done(task()))
        return


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _permalink(account: _Account, post: _Post, media_id: str) -> tuple[int, str, str | None, GraphError | None]:
    """After the post is recorded as published: its permalink (a failure only leaves it empty)."""
    try:
        return post.id, media_id, account.graph.permalink(media_id, account.token), None
    except GraphError as exc:
        account.batch.warn(f"post {post.id}: published as media {media_id}, but its permalink could not be read ({exc})")
        return post.id, media_id, None, exc


def _record_permalinks(batch: _Batch, links: list[tuple[int, str, str | None, GraphError | None]]) -> None:
    """The account's permalinks in one transaction (the media ids are committed already)."""
    if not links:
        return
    with batch.database.session() as session:
        connection = session.connection()
        for post_id, media_id, link, error in links:
            if link:
                connection.execute(update(models.Post).where(models.Post.id == post_id).values(permalink=link))
        connection.execute(insert(models.PostAttempt), [
            _attempt(batch, post_id, "permalink", "ok" if link else "failed", external_id=media_id, error=error, detail=link)
            for post_id, media_id, link, error in links])


def _reconcile(account: _Account, post: _Post, cid: str, seen: list) -> None:
    """The container is PUBLISHED but its media id was lost: never publish again; find the media by
    its caption among the account's posts since the container was made."""
    batch = account.batch
    since = (post.container_created_at or batch.now) - timedelta(minutes=5)  # clocks differ a little
    try:
        found = account.graph.find_media(account.user_id, account.token, post.text, since)
        problem = None if found else "no post with this caption since the container was made"
    except GraphError as exc:
        found, problem = None, str(exc)
    media_id, link = found or (None, None)
    detail = (f"container {cid} was already PUBLISHED; media {media_id}" if found else
              f"container {cid} was already PUBLISHED; its media id could not be found ({problem}): look it up on the account")
    _published(batch, post, external_id=media_id, permalink=link, already=True, step="reconcile", container_id=cid,
               detail=detail, attempts=seen)


# --- Dagster ---------------------------------------------------------------------------------------

@dg.op(description="Publish every due post through the configured publisher (outbox or Instagram).")
def publish_due_posts(context: dg.OpExecutionContext, database: AppDatabase, publisher: Publisher,
                      storage: PersonaStorage) -> dict:
    instance = context.instance
    now = datetime.now(timezone.utc)
    if storage.mirror is not None:  # object storage: a fresh machine's cache lacks the due posts' JPEGs
        with database.session() as session:
            media = [Path(p) for p in session.scalars(select(models.Post.media_path).where(
                models.Post.status.in_((post_states.SCHEDULED, post_states.PUBLISHING, post_states.FAILED)),
                models.Post.scheduled_at <= now, models.Post.media_path.is_not(None)))]
        storage.ensure_local(media)

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


# dagster.yaml limits runs with this tag to one at a time (quota reads must not overlap).
PUBLISH_TAG = {"persona-pipeline/publish": "batch"}


@dg.job(description="Publish every scheduled post whose slot has come, through the configured publisher.",
        tags=PUBLISH_TAG)
def publish_job() -> None:
    publish_due_posts()


def publish_schedule(cron: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(name="publish_due_posts_schedule", job=publish_job, cron_schedule=cron,
                                 default_status=dg.DefaultScheduleStatus.RUNNING)
