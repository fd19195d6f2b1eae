"""The posts table as one publish run sees it: due posts, claims with a lease, and the writes
that record each outcome.

Claims: every post is claimed with a conditional UPDATE (scheduled → publishing, `claimed_by` =
the run, `claimed_at` = the lease) before anything else, so overlapping runs never take the same
post. Every later write first checks the claim is still ours and renews its lease; a run whose
claim was taken over gets `LostClaim` and leaves that post alone.

Leases: a post left in `publishing` is taken over once its lease (`claimed_at`) is older than
LEASE, whatever Dagster says of the claiming run (a run killed with kill -9 stays STARTED there),
or sooner when Dagster reports the claiming run finished (`is_run_alive`). A live run renews the
lease before every call for a post (`renew`), and the leases of its posts still waiting every
RENEW_EVERY (`renew_waiting`), so only a dead or stuck run loses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Connection, and_, bindparam, insert, or_, select, update

from persona_pipeline.db import models
from persona_pipeline.db.session import batch_engine, session_scope
from persona_pipeline.domain import post_states

# One call (HTTP timeouts and retries included) takes far less than a lease.
LEASE = timedelta(minutes=10)
RENEW_EVERY = LEASE / 5
MAX_RETRY_WAIT = timedelta(hours=6)
LOCAL_CLAIM = "local-"  # claimed_by of a batch run outside Dagster (no run id to ask about)


def post_text(caption: str, hashtags: list[str]) -> str:
    """The text sent to Instagram: the caption, a space, the hashtags (as validate_post_text counts it)."""
    return caption + (" " + " ".join(hashtags) if hashtags else "")


@dataclass(frozen=True)
class DuePost:
    """What a publisher needs of one post, read in a short transaction (never a live ORM object)."""

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
    format: str = "feed"  # domain/post_formats.py
    format_options: dict | None = None
    media_url: str | None = None  # the URL Instagram fetched, or a resumable upload's rupload uri

    @property
    def text(self) -> str:
        return post_text(self.caption, list(self.hashtags))


# DuePost's fields as columns: read as plain rows (no ORM objects), the persona's with them.
_POST_COLUMNS = (models.Post.id, models.Post.status, models.Post.persona_id, models.Persona.slug,
                 models.Persona.folder, models.Persona.settings, models.Post.account, models.Post.caption,
                 models.Post.hashtags, models.Post.media_path, models.Post.scheduled_at, models.Post.retry_count,
                 models.Post.container_id, models.Post.container_created_at, models.Post.library_item_id,
                 models.Post.candidate_id, models.Post.claimed_by, models.Post.claimed_at, models.Post.updated_at,
                 models.Post.format, models.Post.format_options, models.Post.media_url)


def _read_due(connection: Connection, where) -> list[DuePost]:
    """The DuePosts matching `where`, in slot order. A persona's settings are read into one dict
    that all its posts share (a batch of 10,000 posts has a few hundred personas)."""
    rows = connection.execute(select(*_POST_COLUMNS).join(models.Persona, models.Persona.id == models.Post.persona_id)
                              .where(where).order_by(models.Post.scheduled_at, models.Post.id)).all()
    settings: dict[int, dict] = {}
    posts = []
    for row in rows:
        shared = settings.setdefault(row.persona_id, dict(row.settings or {}))
        posts.append(DuePost(*row[:5], shared, row.account, row.caption, list(row.hashtags or []), *row[9:19],
                             row.format or "feed", dict(row.format_options or {}), row.media_url))
    return posts


@dataclass(frozen=True)
class DueItem:
    """One still of a carousel, story or reel post, as the publisher needs it."""

    position: int
    candidate_id: int | None
    source_path: str
    media_path: str | None
    container_id: str | None

    @property
    def label(self) -> str:
        return f"item {self.position}" + (f" (candidate {self.candidate_id})" if self.candidate_id else "")


class LostClaim(Exception):
    """Another run took the post over (our lease ran out): leave it to that run."""


def retry_wait(retry_wait_s: float, retries: int) -> timedelta:
    """The wait before a failed post's next attempt: retry_wait_s × 2^(retries − 1), at most 6 h."""
    return min(MAX_RETRY_WAIT, timedelta(seconds=retry_wait_s * 2 ** (retries - 1)))


def due_media_paths(url: str, now: datetime) -> list[Path]:
    """The media files of the posts a batch at `now` may publish (scheduled, publishing or failed,
    slot passed): each post's image, its items' exports and its video."""
    due = and_(models.Post.status.in_((post_states.SCHEDULED, post_states.PUBLISHING, post_states.FAILED)),
               models.Post.scheduled_at <= now)
    with session_scope(url) as session:
        paths = [Path(p) for p in session.scalars(select(models.Post.media_path).where(
            due, models.Post.media_path.is_not(None)))]
        paths += [Path(p) for p in session.scalars(select(models.PostItem.media_path).join(
            models.Post, models.Post.id == models.PostItem.post_id).where(due, models.PostItem.media_path.is_not(None)))]
        paths += [Path(o["video_path"]) for o in session.scalars(select(models.Post.format_options).where(
            due, models.Post.format != "feed")) if isinstance(o, dict) and o.get("video_path")]
    return paths


@lru_cache(maxsize=64)
def _update_ours(columns: frozenset[str]):
    """UPDATE posts SET <columns> of one post while this run's claim holds (binds `_post`, `_token`
    and one per column), built once per set of columns: building the statement anew cost more CPU
    than running it, at four writes per post."""
    return update(models.Post).where(
        models.Post.id == bindparam("_post"), models.Post.status == post_states.PUBLISHING,
        models.Post.claimed_by == bindparam("_token")).values({name: bindparam(name) for name in sorted(columns)})


@lru_cache(maxsize=1)
def _statements():
    """The other per-post statements, built once (see `_update_ours`)."""
    item = dict(status="used", used_by_post_id=bindparam("_post"), used_at=bindparam("_at"))
    return dict(
        attempt=insert(models.PostAttempt),
        item_by_id=update(models.LibraryItem).where(models.LibraryItem.id == bindparam("_item")).values(**item),
        item_by_candidate=update(models.LibraryItem).where(
            models.LibraryItem.candidate_id == bindparam("_candidate")).values(**item),
        permalink=update(models.Post).where(models.Post.id == bindparam("_post")).values(
            permalink=bindparam("permalink")))


@dataclass(frozen=True)
class PostClaims:
    """One run's claims on the posts table (`token` is its claimed_by). `clock` tells the time as
    the run goes on (claims and leases are stamped with it); `now` is the batch's start, which
    decides what is due. `publisher` names the attempt rows; a failed post waits `retry_wait`
    of `retry_wait_s`. Each method is one short transaction."""

    url: str
    token: str
    now: datetime
    publisher: str
    retry_wait_s: float
    clock: Callable[[], datetime]
    # post id -> the lease this run last wrote for it (claim or renewal), to skip a renewal that proves nothing new
    leases: dict[int, datetime] = field(default_factory=dict, compare=False, repr=False)

    # --- finding and claiming -------------------------------------------------------------------

    def _transaction(self):
        """One short transaction on a pooled connection (Core: no ORM session to set up per write; the
        batch engine, which pings a connection only after it sat idle)."""
        return batch_engine(self.url).begin()

    def sweep(self, max_retries: int) -> list[tuple[int, str, int]]:
        """failed + retryable → scheduled while retries are left, else abandoned. Conditional
        updates, so an overlapping run cannot move a post twice. (post id, new status, retries) of each moved."""
        moved_posts = []
        with session_scope(self.url) as session:
            rows = session.execute(select(models.Post.id, models.Post.retry_count).where(
                models.Post.status == post_states.FAILED, models.Post.retryable.is_(True))).all()
            for post_id, retries in rows:
                new = post_states.SCHEDULED if retries < max_retries else post_states.ABANDONED
                post_states.check_transition(post_states.FAILED, new)
                moved = session.connection().execute(update(models.Post).where(
                    models.Post.id == post_id, models.Post.status == post_states.FAILED).values(status=new)).rowcount
                if moved:
                    moved_posts.append((post_id, new, retries))
        return moved_posts

    def due(self, is_run_alive: Callable[[str], bool] | None = None,
            warn: Callable[[str], None] = lambda _msg: None) -> list[DuePost]:
        """Due posts (scheduled, slot passed, `next_attempt_at` passed or unset) and reclaimable
        ones (publishing, see `reclaimable`), in slot order."""
        due = or_(
            and_(models.Post.status == post_states.SCHEDULED, models.Post.scheduled_at <= self.now,
                 or_(models.Post.next_attempt_at.is_(None), models.Post.next_attempt_at <= self.now)),
            models.Post.status == post_states.PUBLISHING)
        with self._transaction() as connection:
            posts = _read_due(connection, due)
        alive: dict[str, bool | None] = {}
        return [post for post in posts
                if post.status != post_states.PUBLISHING or self.reclaimable(post, is_run_alive, alive, warn)]

    def reclaimable(self, post: DuePost, is_run_alive: Callable[[str], bool] | None,
                    cache: dict[str, bool | None], warn: Callable[[str], None]) -> bool:
        """An expired lease frees the post whatever Dagster says (a killed run can stay STARTED
        there for ever); within its lease, only a claiming run that Dagster reports finished gives it up early."""
        if post.claimed_by == self.token:
            return False
        lease = post.claimed_at or post.updated_at  # claimed_at is the lease; older rows may lack it
        if lease is None or lease < self.clock() - LEASE:
            return True
        # A claim made outside Dagster (no run id) cannot be asked about: only the lease frees it.
        if not post.claimed_by or post.claimed_by.startswith(LOCAL_CLAIM) or is_run_alive is None:
            return False
        if post.claimed_by not in cache:
            try:
                cache[post.claimed_by] = bool(is_run_alive(post.claimed_by))
            except Exception as exc:  # noqa: BLE001 - the lease still frees it
                warn(f"could not ask whether run {post.claimed_by} is alive ({exc}); waiting for its {LEASE} lease")
                cache[post.claimed_by] = None
        return cache[post.claimed_by] is False

    def claim(self, posts: list[DuePost]) -> list[DuePost]:
        """Claim `posts` (one transaction: one conditional UPDATE for the scheduled ones, one per
        claim taken over); the ones won, in the order given, re-read after the claim (a person may
        have edited the caption just before)."""
        if not posts:
            return []
        stamp = self.clock()
        claimed = dict(status=post_states.PUBLISHING, claimed_by=self.token, claimed_at=stamp, updated_at=stamp)
        scheduled = [p.id for p in posts if p.status == post_states.SCHEDULED]
        with self._transaction() as connection:
            won: list[int] = []
            if scheduled:
                post_states.check_transition(post_states.SCHEDULED, post_states.PUBLISHING)
                won += connection.scalars(update(models.Post).where(
                    models.Post.id.in_(scheduled), models.Post.status == post_states.SCHEDULED,
                    models.Post.scheduled_at <= self.now).values(**claimed).returning(models.Post.id)).all()
            for post in posts:
                if post.status == post_states.SCHEDULED:
                    continue
                # Taking over an expired claim: only if nobody took it over or renewed it since we looked.
                owner = (models.Post.claimed_by.is_(None) if post.claimed_by is None
                         else models.Post.claimed_by == post.claimed_by)
                lease = (models.Post.claimed_at.is_(None) if post.claimed_at is None
                         else models.Post.claimed_at == post.claimed_at)
                if connection.execute(update(models.Post).where(
                        models.Post.id == post.id, models.Post.status == post_states.PUBLISHING, owner, lease)
                        .values(**claimed)).rowcount:
                    won.append(post.id)
            fresh = {p.id: p for p in _read_due(connection, models.Post.id.in_(won))} if won else {}
        self.leases.update(dict.fromkeys(fresh, stamp))
        return [fresh[p.id] for p in posts if p.id in fresh]

    def _update(self, connection: Connection, post_id: int, values: dict[str, Any]) -> int:
        """Update one post while our claim holds; the rows changed (0: the claim is lost)."""
        changed = connection.execute(_update_ours(frozenset(values)), {**values, "_post": post_id,
                                                                       "_token": self.token}).rowcount
        if changed and "claimed_at" in values:
            self.leases[post_id] = values["claimed_at"]
        return changed

    def renew(self, post: DuePost) -> None:
        """Before a call for `post`: prove the claim is still ours and renew its lease; LostClaim
        if another run took it over (our lease ran out while we were stuck), which then owns it alone."""
        stamp = self.clock()
        with self._transaction() as connection:
            renewed = self._update(connection, post.id, {"claimed_at": stamp})
        if not renewed:
            raise LostClaim(f"post {post.id} is no longer claimed by this run")

    def renew_unless_fresh(self, post: DuePost) -> None:
        """Before a container is made: `renew`, unless this run claimed or renewed the post less
        than RENEW_EVERY ago (no other run may take a lease over before LEASE). A container needs
        no more: its id is written only while the claim holds (`write`), an unused one expires by
        itself, and the publish call always renews first. Saves a transaction on most posts."""
        held = self.leases.get(post.id)
        if held is None or self.clock() - held >= RENEW_EVERY:
            self.renew(post)

    def renew_waiting(self, post_ids: list[int], since: datetime) -> datetime:
        """Posts claimed up front wait their turn without a call of their own: once RENEW_EVERY
        has passed `since` (the last renewal), renew the leases of those still ours, so a long
        batch keeps them. Returns the time of the last renewal."""
        stamp = self.clock()
        if stamp - since < RENEW_EVERY or not post_ids:
            return since
        with self._transaction() as connection:
            renewed = connection.scalars(update(models.Post).where(
                models.Post.id.in_(post_ids), models.Post.status == post_states.PUBLISHING,
                models.Post.claimed_by == self.token).values(claimed_at=stamp).returning(models.Post.id)).all()
        self.leases.update(dict.fromkeys(renewed, stamp))
        return stamp

    def in_flight_elsewhere(self, posts: list[DuePost]) -> int:
        """Posts of these personas another run is publishing now (not among `posts`): they may still use quota."""
        ours = {p.id for p in posts}
        with session_scope(self.url) as session:
            ids = session.scalars(select(models.Post.id).where(
                models.Post.persona_id.in_({p.persona_id for p in posts}), models.Post.status == post_states.PUBLISHING,
                or_(models.Post.claimed_by.is_(None), models.Post.claimed_by != self.token))).all()
        return sum(1 for post_id in ids if post_id not in ours)

    # --- writes ---------------------------------------------------------------------------------

    def attempt(self, post_id: int, step: str, outcome: str, *, container_id: str | None = None,
                external_id: str | None = None, error: Exception | None = None, detail: str | None = None) -> dict:
        """A post_attempts row (inserted with the next write of that post). `error` may carry
        `http_status`, `code` and `subcode` (a GraphError does); its text must hold no secret."""
        return dict(post_id=post_id, publisher=self.publisher, step=step, outcome=outcome, external_id=external_id,
                    container_id=container_id, http_status=getattr(error, "http_status", None),
                    error_code=getattr(error, "code", None), error_subcode=getattr(error, "subcode", None),
                    detail=detail if detail is not None else (str(error) if error else None),
                    created_at=datetime.now(timezone.utc))

    def write(self, post: DuePost, values: dict[str, Any], attempts: list[dict], library: bool = False) -> None:
        """One transaction: the post's row (only while our claim holds; a post that stays
        `publishing` has its lease renewed), its attempts, and with `library` its library item marked used."""
        stamp = self.clock()
        lease = {} if "status" in values else {"claimed_at": stamp}
        statements = _statements()
        with self._transaction() as connection:
            if not self._update(connection, post.id, dict(updated_at=stamp, **lease, **values)):
                raise LostClaim(f"post {post.id} is no longer claimed by this run")
            if attempts:
                connection.execute(statements["attempt"], attempts)
            if library:
                used = {"_post": post.id, "_at": datetime.now(timezone.utc)}
                if post.library_item_id is not None:
                    connection.execute(statements["item_by_id"], {**used, "_item": post.library_item_id})
                elif post.candidate_id is not None:
                    connection.execute(statements["item_by_candidate"], {**used, "_candidate": post.candidate_id})

    def mark_published(self, post: DuePost, *, external_id: str | None, permalink: str | None, already: bool,
                       step: str, container_id: str | None = None, detail: str | None = None,
                       attempts: list[dict] = ()) -> str:
        """publishing → published, the library item used, in one transaction. Returns the outcome
        ("published", or "already_published" when it had gone out before)."""
        post_states.check_transition(post_states.PUBLISHING, post_states.PUBLISHED)
        outcome = "already_published" if already else "published"
        # An earlier failed attempt's reason and wait stay in post_attempts, not on a published post.
        values = dict(status=post_states.PUBLISHED, external_id=external_id, published_at=datetime.now(timezone.utc),
                      failure_reason=None, next_attempt_at=None)
        if permalink:
            values["permalink"] = permalink
        self.write(post, values, [*attempts, self.attempt(post.id, step, outcome, container_id=container_id,
                                                          external_id=external_id, detail=detail)], library=True)
        return outcome

    def mark_failed(self, post: DuePost, reason: str, *, retryable: bool, step: str, error: Exception | None = None,
                    container_id: str | None = None, clear_container: bool = False, attempts: list[dict] = ()) -> None:
        """publishing → failed. Retryable: the sweep reschedules it after `retry_wait`. Not
        retryable: it stays failed until a person reschedules it. Its library item stays available."""
        post_states.check_transition(post_states.PUBLISHING, post_states.FAILED)
        retries = post.retry_count + 1
        values: dict[str, Any] = dict(status=post_states.FAILED, failure_reason=reason, retry_count=retries,
                                      retryable=retryable,
                                      next_attempt_at=self.now + retry_wait(self.retry_wait_s, retries) if retryable else None)
        if clear_container:
            values.update(container_id=None, container_created_at=None)
        self.write(post, values, [*attempts, self.attempt(post.id, step, "failed", container_id=container_id,
                                                          error=error, detail=reason)])

    def give_back(self, post: DuePost, outcome: str, detail: str, *, step: str, error: Exception | None = None,
                  attempts: list[dict] = ()) -> None:
        """Give the claim back untouched (no retry counted): publishing → failed → scheduled in
        one transaction (the status model has no direct edge). A container it has is kept: the
        next attempt asks its status first."""
        post_states.check_transition(post_states.PUBLISHING, post_states.FAILED)
        post_states.check_transition(post_states.FAILED, post_states.SCHEDULED)
        self.write(post, dict(status=post_states.SCHEDULED),
                   [*attempts, self.attempt(post.id, step, outcome, container_id=post.container_id, error=error,
                                            detail=detail)])

    def unlinked(self, accounts: list[str], since: datetime, limit: int = 50) -> list[tuple[int, str]]:
        """(post id, media id) of the posts of `accounts` published since `since` whose permalink was never
        asked for: a run killed after a publish and before its batch's permalink lookup. The next run
        reads them (a read that failed is recorded and not asked again)."""
        post, tried = models.Post, models.PostAttempt
        asked = select(tried.id).where(tried.post_id == post.id, tried.step == "permalink").exists()
        with self._transaction() as connection:
            rows = connection.execute(select(post.id, post.external_id).where(
                post.account.in_(accounts), post.status == "published", post.external_id.is_not(None),
                post.permalink.is_(None), post.published_at >= since, ~asked)
                .order_by(post.published_at, post.id).limit(limit)).all()
        return [(post_id, media_id) for post_id, media_id in rows]

    def record_permalinks(self, links: list[tuple[int, str, str | None, Exception | None]]) -> None:
        """(post id, media id, permalink or None, error) of published posts, in one transaction:
        the permalinks found, and an attempt row for each."""
        if not links:
            return
        statements = _statements()
        with self._transaction() as connection:
            for post_id, _media_id, link, _error in links:
                if link:
                    connection.execute(statements["permalink"], {"_post": post_id, "permalink": link})
            connection.execute(statements["attempt"], [
                self.attempt(post_id, "permalink", "ok" if link else "failed", external_id=media_id, error=error,
                             detail=link)
                for post_id, media_id, link, error in links])

    def items(self, post_id: int) -> list[DueItem]:
        """The post's stills in order (a carousel's item containers among them)."""
        with session_scope(self.url) as session:
            rows = session.scalars(select(models.PostItem).where(models.PostItem.post_id == post_id)
                                   .order_by(models.PostItem.position)).all()
            return [DueItem(r.position, r.candidate_id, r.source_path, r.media_path, r.container_id) for r in rows]

    def write_item(self, post: DuePost, position: int, values: dict[str, Any], attempts: list[dict]) -> None:
        """One transaction: item `position` of `post` (only while our claim holds, whose lease is
        renewed) and its attempts. An item container id is committed here before the next call."""
        stamp = self.clock()
        with self._transaction() as connection:
            if not self._update(connection, post.id, {"claimed_at": stamp}):
                raise LostClaim(f"post {post.id} is no longer claimed by this run")
            connection.execute(update(models.PostItem).where(models.PostItem.post_id == post.id,
                                                             models.PostItem.position == position).values(**values))
            if attempts:
                connection.execute(_statements()["attempt"], attempts)

    def container_caption_digest(self, post_id: int, container_id: str) -> str | None:
        """The caption digest a container was made with (`text_sha256=` in its attempt row), None if unknown."""
        with session_scope(self.url) as session:
            detail = session.scalar(select(models.PostAttempt.detail).where(
                models.PostAttempt.post_id == post_id, models.PostAttempt.step == "container",
                models.PostAttempt.outcome == "created", models.PostAttempt.container_id == container_id)
                .order_by(models.PostAttempt.id.desc()).limit(1))
        for part in (detail or "").split():
            if part.startswith("text_sha256="):
                return part.split("=", 1)[1]
        return None
