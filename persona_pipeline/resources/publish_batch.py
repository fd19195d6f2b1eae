"""One publish batch as a publisher sees it: the run's claims on the posts table, its report and
its log. Every publisher's `publish_account` records each post's outcome through it, so the
counts, the log lines and the writes are the same whichever publisher sent the post."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from persona_pipeline.db.publishing import DuePost, LostClaim, PostClaims
from persona_pipeline.domain import post_states

COUNT_KEYS = ("published", "already_published", "failed", "retried", "abandoned", "deferred", "reclaimed")
# Test hook: PERSONA_TEST_CRASH_AT=after_container (container id committed, publish not called) or
# after_publish (media_publish answered, nothing recorded yet) kills the process right there
# (os._exit(137), as a kill -9 would), so tests can restart after a crash. Never set in production.
CRASH_ENV = "PERSONA_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


@dataclass
class BatchReport:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    quotas: dict[str, dict[str, Any]] = field(default_factory=dict)  # account -> usage before/after, total
    token_warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # problems a person must fix (the op fails on them)
    # One entry per worker process when the batch ran in several (publish_processes.py): pid, accounts,
    # posts, cpu_s, peak_rss_mib. Empty when it ran in this process.
    processes: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def add_error(self, message: str) -> None:
        """Record a problem a person must fix, once."""
        with self._lock:
            if message not in self.errors:
                self.errors.append(message)

    def add_token_warning(self, warning: str) -> None:
        with self._lock:
            self.token_warnings.append(warning)

    def set_quota(self, account: str, stats: dict[str, Any]) -> None:
        with self._lock:
            self.quotas[account] = stats


class PublishBatch:
    """The claims (`claims`), counts (`report`) and log of one batch, shared by the accounts'
    threads. The outcome methods write through the claims, count and log in one place."""

    def __init__(self, claims: PostClaims, report: BatchReport, log) -> None:
        self.claims = claims
        self.report = report
        self.log = log

    @property
    def now(self) -> datetime:
        return self.claims.now

    def clock(self) -> datetime:
        return self.claims.clock()

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warn(self, msg: str) -> None:
        getattr(self.log, "warning", self.log.info)(msg)

    def error(self, msg: str) -> None:
        self.log.error(msg)

    def problem(self, message: str) -> None:
        """A problem a person must fix (the op fails at the end on it), recorded once and logged."""
        self.report.add_error(message)
        self.error(message)

    def claim(self, posts: list[DuePost]) -> list[DuePost]:
        """Claim `posts`; the ones won (see PostClaims.claim), counting those taken over from a run that ended."""
        won = self.claims.claim(posts)
        ids = {p.id for p in won}
        taken_over = sum(1 for p in posts if p.id in ids and p.status == post_states.PUBLISHING)
        if taken_over:
            self.report.add("reclaimed", taken_over)
            self.info(f"took over {taken_over} post(s) left in publishing by a run that ended")
        return won

    def sweep(self, max_retries: int) -> None:
        """Failed, retryable posts back to scheduled, or abandoned without retries left."""
        for post_id, new, retries in self.claims.sweep(max_retries):
            if new == post_states.SCHEDULED:
                self.report.add("retried")
            else:
                self.report.add("abandoned")
                self.warn(f"post {post_id} abandoned after {retries} failed attempts")

    def published(self, post: DuePost, **outcome) -> None:
        """Record `post` as published (PostClaims.mark_published's arguments)."""
        kind = self.claims.mark_published(post, **outcome)
        self.report.add(kind)
        self.info(f"post {post.id} ({post.slug}) {kind.replace('_', ' ')}: "
                  f"{outcome.get('detail') or outcome.get('external_id')}")

    def failed(self, post: DuePost, reason: str, *, retryable: bool, **details) -> None:
        """Record `post` as failed (PostClaims.mark_failed's arguments)."""
        self.claims.mark_failed(post, reason, retryable=retryable, **details)
        self.report.add("failed")
        self.error(f"post {post.id} ({post.slug}) failed"
                   f"{'' if retryable else ' (not retried: a person must reschedule it)'}: {reason}")

    def give_back(self, post: DuePost, outcome: str, detail: str, **details) -> None:
        """Give `post` back to scheduled untouched (PostClaims.give_back's arguments); counted as deferred."""
        self.claims.give_back(post, outcome, detail, **details)
        self.report.add("deferred")

    def safely(self, post: DuePost, write: Callable[[], None]) -> None:
        """Run a write for `post`; a claim lost meanwhile is only logged (the other run owns it)."""
        try:
            write()
        except LostClaim as exc:
            self.warn(str(exc))

    def fail_all(self, posts: list[DuePost], reason: str, *, step: str) -> None:
        """Claim `posts` and fail each for good with `reason` (a problem no call can fix)."""
        for post in self.claim(posts):
            self.safely(post, lambda p=post: self.failed(p, reason, retryable=False, step=step))
