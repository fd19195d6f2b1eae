"""One Instagram account's claimed posts, in slot order: up to `prepare_ahead` containers are
prepared on a small pool while the previous post is being published; the publish calls
themselves go out one at a time on the account's thread, each with a quota unit reserved first.
The media id, the library item becoming used and the post becoming published are one
transaction. The permalinks follow in batches of PERMALINK_BATCH posts (one multi-id lookup and
one transaction each, off the account's thread) and at the end of the account's posts. A run
killed mid-batch leaves up to PERMALINK_BATCH - 1 published posts without their permalink for a
while (published, with their media id: a permalink is a link, never what decides a publish); the
account's next run reads them first (`PostClaims.unlinked`)."""

from __future__ import annotations

import threading
from collections import deque
from datetime import timedelta
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from persona_pipeline.db.publishing import DuePost, LostClaim
from persona_pipeline.resources.instagram import GraphError
from persona_pipeline.resources.instagram_containers import Containers, Ready
from persona_pipeline.resources.publish_batch import crash_point

if TYPE_CHECKING:
    from persona_pipeline.resources.instagram_account import AccountBatch

PERMALINK_BATCH = 10  # published posts whose permalinks are read in one request and written in one transaction
UNLINKED_SINCE = timedelta(days=7)  # how far back a run looks for permalinks a killed run never read


class QuotaShare:
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


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class InstagramPipeline:
    """Prepare containers ahead on a small pool; publish in slot order on this thread."""

    def __init__(self, account: AccountBatch, budget: QuotaShare, stats: dict[str, Any]) -> None:
        self.account = account
        self.batch = account.batch
        self.claims = account.batch.claims
        self.containers = Containers(account)
        self.budget = budget
        self.stats = stats  # the account's entry in the batch report's quotas: `published` counts here
        self.unlinked: list[tuple[int, str]] = []  # published, permalink not read yet: (post id, media id)

    def run(self, posts: list[DuePost]) -> None:
        account, batch = self.account, self.batch
        depth = account.publisher.prepare_ahead
        pool = (ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix=f"publish-{account.user_id}")
                if depth else None)
        pending = deque(posts)
        inflight: deque[tuple[DuePost, Future | None]] = deque()
        after: list[Future] = []

        def fill() -> None:
            while pending and not account.stop.is_set() and len(inflight) < max(1, depth):
                post = pending.popleft()
                inflight.append((post, pool.submit(self.containers.prepare, post) if pool else None))

        renewed = batch.clock()  # when the claims were made
        try:
            # Permalinks a killed run published but never read come first (one lookup with the next ones).
            self.unlinked = self.claims.unlinked(sorted({p.account for p in posts}), renewed - UNLINKED_SINCE)
            fill()
            while inflight:
                renewed = self.claims.renew_waiting([p.id for p, _ in inflight] + [p.id for p in pending], renewed)
                post, future = inflight.popleft()
                ready = future.result() if future else self.containers.prepare(post)
                fill()
                if ready.done:
                    continue
                try:
                    self._publish(ready, after, pool)
                except LostClaim as exc:
                    batch.warn(str(exc))
                except Exception as exc:  # noqa: BLE001 - fail this post, go on with the next
                    # Its container is kept: if the publish went out, the next attempt finds it PUBLISHED.
                    reason = f"{type(exc).__name__}: {exc}"
                    batch.safely(ready.post, lambda: batch.failed(ready.post, reason, retryable=True, step="publish"))
            for post in pending:  # the account stopped before these were started
                batch.safely(post, lambda p=post: batch.give_back(p, "deferred", account.stop_reason, step="publish"))
        finally:
            self._read_permalinks(after, pool)  # the last ones
            for future in after:  # each batch of permalinks is recorded by its own task; wait for the last ones
                future.result()
            if pool:
                pool.shutdown(wait=True)

    def _publish(self, ready: Ready, after: list[Future], pool: ThreadPoolExecutor | None) -> None:
        """The publish call for one ready post, in slot order, with a quota unit reserved first."""
        account, batch, claims = self.account, self.batch, self.claims
        post, cid = ready.post, ready.container_id
        for _round in range(2):  # a container that expires at the publish call is replaced once
            if account.stop.is_set():
                batch.give_back(post, "deferred", account.stop_reason, step="publish", attempts=ready.attempts)
                return
            # The post may have waited its turn since it was prepared: publish only while it is still ours.
            claims.renew(post)
            if not self.budget.reserve():
                batch.give_back(post, "quota", "this run's share of the account's 24 h quota is used up",
                                step="quota", attempts=ready.attempts)
                return
            try:
                media_id = account.graph.publish_container(account.user_id, account.token, cid)
            except GraphError as exc:
                if exc.container_status == "PUBLISHED":  # it went out; its answer was lost
                    account.reconcile(post, cid, [*ready.attempts, claims.attempt(
                        post.id, "publish", "answer_lost", container_id=cid, error=exc)])
                    self.stats["published"] += 1
                    return
                if exc.code is not None and (exc.http_status or 0) < 500:
                    self.budget.release()  # a definite refusal: nothing was published
                if exc.kind == "recreate" and _round == 0:
                    replaced = claims.attempt(post.id, "publish", "expired", container_id=cid, error=exc)
                    ready = self.containers.new_container(post, [*ready.attempts, replaced])
                    if ready.done:
                        return
                    post, cid = ready.post, ready.container_id
                    continue
                self._refused(post, cid, exc, ready.attempts)
                return
            crash_point("after_publish")
            batch.published(post, external_id=media_id, permalink=None, already=False, step="publish",
                            container_id=cid, detail=f"media {media_id}", attempts=ready.attempts)
            self.stats["published"] += 1
            self.unlinked.append((post.id, media_id))
            if len(self.unlinked) >= PERMALINK_BATCH:
                self._read_permalinks(after, pool)
            return

    def _refused(self, post: DuePost, cid: str, exc: GraphError, attempts: list[dict]) -> None:
        """A publish call that failed for good, by the error's kind."""
        if exc.kind in ("window", "auth"):
            self.account.stop_for(post, exc, "publish", attempts)
            return
        if exc.kind == "spam":
            self.account.halt(f"spam block ({exc})")
        retryable = exc.kind in ("transient", "recreate")
        # Unless the container is known unusable, it is kept: the next attempt asks its status first.
        self.batch.failed(post, str(exc), retryable=retryable, step="publish", error=exc, container_id=cid,
                          clear_container=exc.container_status in ("EXPIRED", "ERROR"), attempts=attempts)

    def _read_permalinks(self, after: list[Future], pool: ThreadPoolExecutor | None) -> None:
        """Read and record the permalinks of the posts published since the last call (on the pool when there is one)."""
        unlinked, self.unlinked = self.unlinked, []
        if unlinked:
            task: Callable = lambda: self.claims.record_permalinks(self._permalinks(unlinked))  # noqa: E731
            after.append(pool.submit(task) if pool else _done(task()))

    def _permalinks(self, published: list[tuple[int, str]]) -> list[tuple[int, str, str | None, GraphError | None]]:
        """After the posts are recorded as published: their permalinks, in one lookup; when it fails,
        one by one, so that one post's failure leaves only its own permalink empty."""
        account = self.account
        try:
            links = account.graph.permalinks([media_id for _, media_id in published], account.token)
            return [(post_id, media_id, links[media_id], None) for post_id, media_id in published]
        except GraphError:
            pass
        read = []
        for post_id, media_id in published:
            try:
                read.append((post_id, media_id, account.graph.permalink(media_id, account.token), None))
            except GraphError as exc:
                self.batch.warn(f"post {post_id}: published as media {media_id}, but its permalink could not be read ({exc})")
                read.append((post_id, media_id, None, exc))
        return read
