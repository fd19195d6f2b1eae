"""Getting one post ready to publish on Instagram: a FINISHED container whose id is committed on
the post before anything else.

The JPEG is put at MEDIA_PUBLIC_BASE_URL/<slug>/<post>-<sha12>.jpg and its URL checked, then the
container is created and its id COMMITTED, then waited for. Crash safety: a claimed post that
already has a container asks the container first. PUBLISHED → never published again: the media is
found by caption (`find_media`) and the post recorded as already published. FINISHED → ready
(unless the caption changed since: a new container). IN_PROGRESS → waited for. EXPIRED → a new
container (the old one is recorded). ERROR → failed, retryable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from persona_pipeline.db.publishing import DuePost, LostClaim
from persona_pipeline.domain import post_formats
from persona_pipeline.resources.instagram import GraphError
from persona_pipeline.resources.instagram_formats import FormatContainers, is_video
from persona_pipeline.resources.public_media import MediaProblem
from persona_pipeline.resources.publish_batch import crash_point

if TYPE_CHECKING:
    from persona_pipeline.resources.instagram_account import AccountBatch


def caption_digest(text: str) -> str:
    """What a container's attempt row records of its caption (`text_sha256=`), to tell a changed caption."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Ready:
    """The outcome of preparing a post: `container_id` FINISHED and ready to publish, or `done`
    (failed, published or given back already)."""

    post: DuePost
    container_id: str | None = None
    done: bool = False
    attempts: list = field(default_factory=list)  # attempt rows not yet written, go with the next write


class Containers:
    """The container steps of one account's posts (create, wait, resume after a crash, replace)."""

    def __init__(self, account: AccountBatch) -> None:
        self.account = account
        self.batch = account.batch
        self.claims = account.batch.claims
        self.formats = FormatContainers(self)

    def _wait(self, post: DuePost, cid: str) -> str:
        """The container's status once it leaves IN_PROGRESS; a video may take minutes."""
        account = self.account
        timeout = account.graph.video_poll_timeout_s if is_video(post) else None
        return account.graph.wait_for_container(cid, account.token, timeout)

    def prepare(self, post: DuePost) -> Ready:
        """Make `post` ready to publish. Any unexpected error while handling it fails that post
        (retryable), never the batch."""
        try:
            if self.account.stop.is_set():
                self.batch.give_back(post, "deferred", self.account.stop_reason, step="publish")
                return Ready(post, done=True)
            if post.container_id:
                return self._resume(post)
            return self.new_container(post, [])
        except LostClaim as exc:
            self.batch.warn(str(exc))
        except Exception as exc:  # noqa: BLE001
            reason = f"{type(exc).__name__}: {exc}"
            self.batch.safely(post, lambda: self.batch.failed(post, reason, retryable=True, step="container"))
        return Ready(post, done=True)

    def _resume(self, post: DuePost) -> Ready:
        """A claimed post that has a container already (a crash, or a batch that stopped): ask first."""
        account, cid = self.account, post.container_id
        self.claims.renew(post)
        try:
            status = account.graph.container_status(cid, account.token)
        except GraphError as exc:
            return self._error(post, exc, cid, "status", [])
        seen = [self.claims.attempt(post.id, "status", status.lower(), container_id=cid)]
        if status == "PUBLISHED":
            account.reconcile(post, cid, seen)
            return Ready(post, done=True)
        if status == "IN_PROGRESS":
            uploaded = self._upload_if_resumable(post, cid)  # a kill mid-upload: resumed at Instagram's offset
            if isinstance(uploaded, Ready):
                return uploaded
            seen.extend(uploaded)
            try:
                status = self._wait(post, cid)
            except GraphError as exc:
                return self._error(post, exc, cid, "status", seen)
            seen.append(self.claims.attempt(post.id, "status", status.lower(), container_id=cid))
        if status == "FINISHED":
            if self.claims.container_caption_digest(post.id, cid) not in (None, caption_digest(post.text)):
                seen.append(self.claims.attempt(post.id, "container", "replaced", container_id=cid,
                                                detail="the caption changed since this container was made; "
                                                       "a new one replaces it"))
                return self.new_container(post, seen)
            return Ready(post, cid, attempts=seen)
        return self._unusable(post, cid, status, seen)

    def _upload_if_resumable(self, post: DuePost, cid: str) -> list | Ready:
        """A resumable video container's bytes (instagram_upload.py), before its status is waited for."""
        if not (is_video(post) and self.account.publisher.uploads_videos() and post.media_url
                and "/ig-api-upload/" in post.media_url):
            return []
        return self.formats.upload(post, cid)

    def _unusable(self, post: DuePost, cid: str, status: str, seen: list) -> Ready:
        if status == "EXPIRED":
            seen.append(self.claims.attempt(post.id, "container", "replaced", container_id=cid,
                                            detail="container EXPIRED (not published within 24 h); a new one replaces it"))
            return self.new_container(post, seen)
        if status == "PUBLISHED":  # it went out while we were waiting on it (another client?)
            self.account.reconcile(post, cid, seen)
            return Ready(post, done=True)
        if status == "ERROR" and is_video(post):
            # Processing failed: the same video would fail again. The stills and the file stay for a person.
            try:
                reason = self.account.graph.container_error(cid, self.account.token) or "no reason given"
            except GraphError as exc:
                reason = f"the reason could not be read ({exc})"
            self.batch.failed(post, f"post {post.id}: Instagram could not process the {post.format} video "
                                    f"(container {cid} ERROR): {reason}",
                              retryable=False, step="status", container_id=cid, clear_container=True, attempts=seen)
            return Ready(post, done=True)
        self.batch.failed(post, f"Instagram could not process container {cid} (status {status}); "
                                "a new one is made next time",
                          retryable=True, step="status", container_id=cid, clear_container=True, attempts=seen)
        return Ready(post, done=True)

    def new_container(self, post: DuePost, seen: list, recreated: int = 0) -> Ready:
        """Stage the JPEG, check its URL, create the container (its id committed first), wait for it."""
        account, batch, claims, publisher = self.account, self.batch, self.claims, self.account.publisher
        if post.format != post_formats.FEED:
            made = self.formats.create(post, seen)
            if isinstance(made, Ready):
                return made
            cid, values, detail = made  # `seen` holds the attempts not yet written with an item
        else:
            made = self._feed_container(post, seen)
            if isinstance(made, Ready):
                return made
            cid, values, detail = made
        created = datetime.now(timezone.utc)
        # The container id is committed before anything else: a crash from here on is recovered by asking it.
        claims.write(post, dict(container_id=cid, container_created_at=created, **values),
                     [*seen, claims.attempt(post.id, "container", "created", container_id=cid, detail=detail)])
        crash_point("after_container")
        post = replace(post, container_id=cid, container_created_at=created, media_url=values.get("media_url"))
        uploaded = self._upload_if_resumable(post, cid)
        if isinstance(uploaded, Ready):
            return uploaded
        if uploaded:
            crash_point("after_upload")
        try:
            status = self._wait(post, cid)
        except GraphError as exc:
            return self._error(post, exc, cid, "status", uploaded)
        seen = [*uploaded, claims.attempt(post.id, "status", status.lower(), container_id=cid)]
        if status == "FINISHED":
            return Ready(post, cid, attempts=seen)
        if status == "EXPIRED" and recreated:
            seen.append(claims.attempt(post.id, "container", "replaced", container_id=cid, detail="EXPIRED again"))
            batch.failed(post, f"container {cid} expired right after it was made", retryable=True, step="status",
                         container_id=cid, clear_container=True, attempts=seen)
            return Ready(post, done=True)
        if status == "EXPIRED":
            seen.append(claims.attempt(post.id, "container", "replaced", container_id=cid,
                                       detail="container EXPIRED; a new one replaces it"))
            return self.new_container(post, seen, recreated + 1)
        return self._unusable(post, cid, status, seen)

    def _feed_container(self, post: DuePost, seen: list) -> tuple[str, dict, str] | Ready:
        """Stage the feed JPEG, check its URL, create its container: (id, post values, attempt detail)."""
        account, batch, claims, publisher = self.account, self.batch, self.claims, self.account.publisher
        if not post.media_path:
            batch.failed(post, f"post {post.id} has no media file", retryable=False, step="container", attempts=seen)
            return Ready(post, done=True)
        try:
            staged = publisher.stage_media(post.slug, post.id, Path(post.media_path))
        except MediaProblem as exc:
            batch.failed(post, str(exc), retryable=False, step="container", attempts=seen)
            return Ready(post, done=True)
        problem = publisher.check_media_url(staged.url)
        if problem:
            batch.failed(post, f"{problem}; no container was created (is the web server behind MEDIA_PUBLIC_BASE_URL up?)",
                         retryable=True, step="container",
                         attempts=[*seen, claims.attempt(post.id, "container", "media_unreachable", detail=problem)])
            return Ready(post, done=True)
        text = post.text
        claims.renew_unless_fresh(post)  # staging may have taken a while: no container for a post lost meanwhile
        try:
            cid = account.graph.create_container(account.user_id, account.token, staged.url, text)
        except GraphError as exc:
            return self._error(post, exc, None, "container", seen)
        return cid, dict(media_url=staged.url, media_sha256=staged.sha256), (
            f"text_sha256={caption_digest(text)} media={staged.url}" + (" (exported)" if staged.exported else ""))

    def _error(self, post: DuePost, exc: GraphError, cid: str | None, step: str, seen: list) -> Ready:
        """A failed container create or status call, by the error's kind."""
        if exc.kind == "recreate" and cid and step == "status":
            seen = [*seen, self.claims.attempt(post.id, "container", "replaced", container_id=cid, error=exc)]
            return self.new_container(post, seen)
        if exc.kind in ("window", "auth"):
            self.account.stop_for(post, exc, step, seen)
            return Ready(post, done=True)
        if exc.kind == "spam":
            self.account.halt(f"spam block ({exc})")
        retryable = exc.kind in ("transient", "recreate")
        self.batch.failed(post, str(exc), retryable=retryable, step=step, error=exc, container_id=cid, attempts=seen)
        return Ready(post, done=True)
