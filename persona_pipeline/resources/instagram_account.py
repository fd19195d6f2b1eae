"""One Instagram account's part of a publish batch (the Graph API facts: docs/rules.md, "Graph
API").

Per account: the persona's `instagram:` settings and token are checked, the token's expiry is
checked and the quota read once; at most `total − usage` posts are claimed (less those another
run is publishing now), and a unit is reserved before each media_publish call (given back when the
call is known not to have published). Captions over Instagram's limits fail before any call. The
posts then go through `InstagramPipeline` (containers prepared ahead, publish calls in slot order).

Error policy (GraphError.kind): transient (the client already retried) → failed, retryable, with a
growing wait; window (daily limit) → back to `scheduled` untouched, the account stops for this
batch; auth → back to `scheduled`, the account stops, and the op fails at the end so a person
sees it; spam → failed for good and the account stops; media / permanent → failed for good (a
person reschedules it). A persona without `instagram:`, an unset token variable, or a caption over
the limits fail the post for good before any call for it.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from pydantic import ValidationError

from persona_pipeline.db.publishing import DuePost
from persona_pipeline.domain import post_states
from persona_pipeline.domain.captions import validate_post_text
from persona_pipeline.personas import InstagramAccount
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.resources.instagram import GraphError
from persona_pipeline.resources.instagram_pipeline import InstagramPipeline, QuotaShare
from persona_pipeline.resources.publish_batch import PublishBatch

if TYPE_CHECKING:
    from persona_pipeline.resources.publisher import InstagramPublisher


class AccountBatch:
    """One Instagram account's part of a batch: its user id and token, and whether it stopped for this batch
    (a daily limit, a rejected token or a spam block stops it; its remaining posts are given back)."""

    def __init__(self, publisher: InstagramPublisher, batch: PublishBatch, user_id: str, token: str) -> None:
        self.publisher = publisher
        self.graph = publisher.graph
        self.batch = batch
        self.user_id = user_id
        self.token = token
        self.stop = threading.Event()
        self.stop_reason = ""

    def __repr__(self) -> str:  # never the token
        return f"AccountBatch({self.user_id})"

    def halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()
            self.batch.warn(f"account {self.user_id}: stopped for this batch: {reason}")

    def stop_for(self, post: DuePost, exc: GraphError, step: str, seen: list[dict]) -> None:
        """window / auth: the post goes back to scheduled untouched and the account stops."""
        if exc.kind == "auth":
            message = f"account {self.user_id}: the access token was rejected ({exc}); renew it"
            self.batch.problem(message)
        self.halt(f"{'daily publishing limit reached' if exc.kind == 'window' else 'token rejected'} ({exc.call})")
        self.batch.give_back(post, exc.kind, str(exc), step=step, error=exc, attempts=seen)

    def call_failed(self, what: str, exc: GraphError) -> None:
        """An account-level call (token check, quota) failed: its due posts stay scheduled."""
        message = f"account {self.user_id}: {what} failed ({exc}); its due posts stay scheduled"
        if exc.kind == "auth":
            self.batch.problem(message)
        else:
            self.batch.warn(message)

    def token_ok(self) -> bool:
        """Once per account per batch: a rejected token stops the account (its posts stay
        scheduled, the op fails so a person sees it); one expiring soon is a warning."""
        batch = self.batch
        try:
            info = self.graph.token_info(self.token)
        except GraphError as exc:
            if exc.kind == "auth":
                self.call_failed("debug_token", exc)
                return False
            batch.warn(f"account {self.user_id}: token expiry unknown ({exc})")
            return True
        if not info.valid:
            message = f"account {self.user_id}: Instagram rejects the access token; renew it (nothing was published)"
            batch.problem(message)
            return False
        if info.expires_at is not None:
            left = info.expires_at - datetime.now(timezone.utc)
            if left <= timedelta(days=self.publisher.token_warn_days):
                warning = (f"account {self.user_id}: access token expires {info.expires_at.isoformat(timespec='minutes')} "
                           f"(in {max(0, left.days)} day(s)); renew it")
                batch.report.add_token_warning(warning)
                batch.warn(warning)
        return True

    def reconcile(self, post: DuePost, cid: str, seen: list[dict]) -> None:
        """The container is PUBLISHED but its media id was lost: never publish again; find the
        media by its caption among the account's posts since the container was made."""
        batch = self.batch
        since = (post.container_created_at or batch.now) - timedelta(minutes=5)  # clocks differ a little
        try:
            found = self.graph.find_media(self.user_id, self.token, post.text, since)
            problem = None if found else "no post with this caption since the container was made"
        except GraphError as exc:
            found, problem = None, str(exc)
        media_id, link = found or (None, None)
        detail = (f"container {cid} was already PUBLISHED; media {media_id}" if found else
                  f"container {cid} was already PUBLISHED; its media id could not be found ({problem}): "
                  "look it up on the account")
        batch.published(post, external_id=media_id, permalink=link, already=True, step="reconcile", container_id=cid,
                        detail=detail, attempts=seen)


def account_settings(publisher: InstagramPublisher, post: DuePost) -> tuple[InstagramAccount | None, str | None]:
    """The persona's `instagram:` settings, or the problem that leaves its posts no account to go to."""
    yaml_path = f"{post.folder}/persona.yaml"
    try:
        instagram = PersonaConfig.model_validate(post.settings).instagram
    except ValidationError as exc:
        return None, f"{yaml_path} is invalid ({exc.error_count()} problem(s)); fix it and reschedule"
    if not instagram:
        return None, (f"{yaml_path} has no `instagram` field (user_id and token_env): "
                      f"the instagram publisher has no account to post persona {post.slug} to")
    if publisher.token(instagram.token_env) is None:
        return None, (f"environment variable {instagram.token_env} (named by {yaml_path} field instagram.token_env) "
                      "is unset or empty")
    return instagram, None


def caption_problems(posts: list[DuePost]) -> dict[int, str]:
    """Post id → why its caption cannot go out. A post with a container was sent already: it is asked first."""
    bad: dict[int, str] = {}
    limits: dict[int, int] = {}  # per settings dict (a persona's posts share one): validated once, not per post
    for post in posts:
        key = id(post.settings)
        if key not in limits:
            limits[key] = PersonaConfig.model_validate(post.settings).hashtags.max_per_post
        max_tags = limits[key]
        problems = validate_post_text(post.caption, list(post.hashtags), max_tags)
        if problems and not post.container_id:
            bad[post.id] = (f"caption over Instagram's limits: {'; '.join(problems)} "
                            f"(hashtags.max_per_post is {max_tags} in {post.folder}/persona.yaml)")
    return bad


def publish_account(publisher: InstagramPublisher, batch: PublishBatch, posts: list[DuePost]) -> None:
    """Publish one account's due posts (all of one Instagram user id, in slot order)."""
    instagram, problem = account_settings(publisher, posts[0])
    if problem:
        batch.fail_all(posts, problem, step="container")
        return
    if not publisher.media_public_base_url:
        # A setting, not a post's fault: nothing is claimed, and the op fails so a person sees it. A video
        # goes without it by the resumable upload (INSTAGRAM_VIDEO_UPLOAD auto or resumable).
        from persona_pipeline.resources.instagram_formats import is_video

        waiting = [p for p in posts if not (publisher.uploads_videos() and is_video(p))]
        if waiting:
            message = "MEDIA_PUBLIC_BASE_URL is not set: Instagram needs a public URL to fetch each image from"
            batch.report.add_error(message)
            batch.error(f"account {publisher.account_key(posts[0])}: {message}; its {len(waiting)} due image "
                        "post(s) stay scheduled")
            batch.report.add("deferred", len(waiting))
        posts = [p for p in posts if p not in waiting]
        if not posts:
            return
    account = AccountBatch(publisher, batch, instagram.user_id, publisher.token(instagram.token_env))
    if not account.token_ok():
        batch.report.add("deferred", len(posts))
        return
    try:
        quota = account.graph.quota(account.user_id, account.token)
    except GraphError as exc:
        account.call_failed("quota", exc)
        batch.report.add("deferred", len(posts))
        return
    in_flight = batch.claims.in_flight_elsewhere(posts)
    remaining = max(0, quota.total - quota.usage - in_flight)
    stats = {"usage_before": quota.usage, "total": quota.total, "in_flight_elsewhere": in_flight, "published": 0}
    batch.report.set_quota(account.user_id, stats)

    # Bad captions fail before any call for them, and take no quota.
    bad = caption_problems(posts)
    for post in batch.claim([p for p in posts if p.id in bad]):
        batch.safely(post, lambda p=post: batch.failed(p, bad[p.id], retryable=False, step="container"))
    valid = [p for p in posts if p.id not in bad]

    # Posts a dead run left in `publishing` first (they may be out already), then the due ones.
    reclaim = [p for p in valid if p.status == post_states.PUBLISHING]
    fresh = [p for p in valid if p.status == post_states.SCHEDULED]
    take = fresh[:max(0, remaining - len(reclaim))]
    if len(take) < len(fresh):
        batch.report.add("deferred", len(fresh) - len(take))
        batch.info(f"account {account.user_id}: quota {quota.usage}/{quota.total} (+{in_flight} in flight elsewhere): "
                   f"{len(fresh) - len(take)} due post(s) wait for the next batch")
    claimed = sorted(batch.claim(reclaim + take), key=lambda p: (p.scheduled_at, p.id))
    InstagramPipeline(account, QuotaShare(remaining), stats).run(claimed)

    try:
        after = account.graph.quota(account.user_id, account.token)
        stats["usage_after"] = after.usage
    except GraphError as exc:
        stats["usage_after"] = f"unknown ({exc.kind}); {quota.usage} + {stats['published']} published here"
