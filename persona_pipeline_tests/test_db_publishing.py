"""The publish run's claims on the posts table (persona_pipeline/db/publishing.py), directly on
SQLite and PostgreSQL: what is due, claims and leases, renewals, and the writes of each outcome."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from persona_pipeline.db import models, registry
from persona_pipeline.db.publishing import (LEASE, LOCAL_CLAIM, MAX_RETRY_WAIT, RENEW_EVERY, LostClaim, PostClaims,
                                            due_media_paths, post_text, retry_wait)
from persona_pipeline.db.session import session_scope
from persona_pipeline.personas import load_persona
from persona_pipeline_tests.conftest import write_persona

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def claims(url: str, token: str, clock: Clock | None = None, retry_wait_s: float = 60.0) -> PostClaims:
    return PostClaims(url, token, NOW, publisher="outbox", retry_wait_s=retry_wait_s, clock=clock or Clock(NOW))


@pytest.fixture
def persona_id(db_url, tmp_path) -> int:
    folder = write_persona(tmp_path / "datasets", "anna", photos=0)
    with session_scope(db_url) as session:
        return registry.sync_persona(session, load_persona(folder)).id


def add_post(url: str, persona_id: int, minutes: int, **values) -> int:
    """A post whose slot is `minutes` after NOW (negative: due), with its own library item."""
    with session_scope(url) as session:
        item = models.LibraryItem(persona_id=persona_id, kind="winner", image_path=f"/media/{minutes}.jpg",
                                  image_sha256=f"{minutes + 1000:064d}")
        session.add(item)
        session.flush()
        values = {"status": "scheduled", **values}
        post = models.Post(persona_id=persona_id, account="outbox:anna", caption=f"post {minutes}",
                           hashtags=["#a", "#b"], media_path=f"/media/{minutes}.jpg",
                           scheduled_at=NOW + timedelta(minutes=minutes), library_item_id=item.id, **values)
        session.add(post)
        session.flush()
        return post.id


def row(url: str, post_id: int) -> models.Post:
    with session_scope(url) as session:
        return session.get(models.Post, post_id)


def attempts(url: str, post_id: int) -> list[tuple[str, str, str | None]]:
    with session_scope(url) as session:
        return [(a.step, a.outcome, a.container_id) for a in session.scalars(
            select(models.PostAttempt).where(models.PostAttempt.post_id == post_id).order_by(models.PostAttempt.id))]


def test_post_text_and_the_retry_wait():
    assert post_text("hello", ["#a", "#b"]) == "hello #a #b" and post_text("hello", []) == "hello"
    assert retry_wait(60, 1) == timedelta(seconds=60) and retry_wait(60, 3) == timedelta(seconds=240)
    assert retry_wait(300, 20) == MAX_RETRY_WAIT


def test_due_posts_in_slot_order_and_a_claim_is_won_once(db_url, persona_id):
    late, early, future = (add_post(db_url, persona_id, m) for m in (-5, -10, 30))
    waiting = add_post(db_url, persona_id, -20, next_attempt_at=NOW + timedelta(minutes=1))
    first, second = claims(db_url, "run-1"), claims(db_url, "run-2")
    due = first.due()
    assert [p.id for p in due] == [early, late] and future not in [p.id for p in due] and waiting not in [p.id for p in due]
    assert due[0].text == "post -10 #a #b" and due[0].slug == "anna"
    won = first.claim(due)
    assert [p.id for p in won] == [early, late] and all(p.status == "publishing" for p in won)
    assert second.claim(due) == []  # the same snapshot, claimed already
    post = row(db_url, early)
    assert (post.status, post.claimed_by, post.claimed_at) == ("publishing", "run-1", NOW)
    assert second.due() == []  # a fresh lease of another run: not reclaimable


def test_a_claim_is_taken_over_when_its_lease_expires_or_its_run_finished(db_url, persona_id):
    post_id = add_post(db_url, persona_id, -5)
    clock = Clock(NOW)
    old = claims(db_url, "run-old", clock)
    (mine,) = old.claim(old.due())
    new = claims(db_url, "run-new", clock)
    asked: list[str] = []
    assert new.due(lambda run: asked.append(run) or True) == [] and asked == ["run-old"]  # alive, within its lease
    assert [p.id for p in new.due(lambda run: False)] == [post_id]  # Dagster says it finished
    warnings: list[str] = []
    assert new.due(lambda run: 1 / 0, warnings.append) == [] and "waiting for its" in warnings[0]
    clock.at = NOW + LEASE + timedelta(seconds=1)
    (stale,) = new.due()
    (taken,) = new.claim([stale])
    assert taken.claimed_by == "run-new" and new.claim([stale]) == []  # the lease it saw has changed since
    with pytest.raises(LostClaim):
        old.renew(mine)
    with pytest.raises(LostClaim):
        old.mark_published(mine, external_id="x", permalink=None, already=False, step="outbox")
    assert row(db_url, post_id).claimed_by == "run-new"


def test_a_local_claim_is_freed_by_its_lease_only(db_url, persona_id):
    add_post(db_url, persona_id, -5)
    clock = Clock(NOW)
    local = claims(db_url, f"{LOCAL_CLAIM}abc", clock)
    local.claim(local.due())
    other = claims(db_url, "run-2", clock)
    assert other.due(lambda run: False) == []  # no run to ask about
    clock.at = NOW + LEASE + timedelta(seconds=1)
    assert len(other.due(lambda run: True)) == 1


def test_renewals_move_the_lease_of_posts_still_ours(db_url, persona_id):
    ids = [add_post(db_url, persona_id, m) for m in (-3, -2, -1)]
    clock = Clock(NOW)
    run = claims(db_url, "run-1", clock)
    claimed = run.claim(run.due())
    clock.at = NOW + timedelta(seconds=30)
    run.renew(claimed[0])
    assert row(db_url, ids[0]).claimed_at == clock.at and row(db_url, ids[1]).claimed_at == NOW
    assert run.renew_waiting(ids[1:], NOW) == NOW  # RENEW_EVERY has not passed: nothing written
    assert row(db_url, ids[1]).claimed_at == NOW
    clock.at = NOW + RENEW_EVERY
    assert run.renew_waiting(ids[1:], NOW) == clock.at
    assert [row(db_url, i).claimed_at for i in ids[1:]] == [clock.at, clock.at]


def test_published_marks_the_library_item_used_in_the_same_write(db_url, persona_id):
    post_id = add_post(db_url, persona_id, -5)
    run = claims(db_url, "run-1")
    (post,) = run.claim(run.due())
    early = run.attempt(post.id, "status", "finished", container_id="c1")
    assert run.mark_published(post, external_id="m1", permalink="https://p/1", already=False, step="publish",
                              container_id="c1", attempts=[early]) == "published"
    done = row(db_url, post_id)
    assert (done.status, done.external_id, done.permalink, done.failure_reason) == ("published", "m1", "https://p/1", None)
    with session_scope(db_url) as session:
        item = session.get(models.LibraryItem, done.library_item_id)
        assert (item.status, item.used_by_post_id) == ("used", post_id)
    assert attempts(db_url, post_id) == [("status", "finished", "c1"), ("publish", "published", "c1")]


def test_failed_waits_longer_each_time_and_the_sweep_retries_or_abandons(db_url, persona_id):
    post_id = add_post(db_url, persona_id, -5, container_id="c1")
    run = claims(db_url, "run-1", retry_wait_s=60)

    class Refusal(Exception):
        http_status, code, subcode = 400, 100, 33

    (post,) = run.claim(run.due())
    run.mark_failed(post, "refused", retryable=True, step="publish", error=Refusal("no"), container_id="c1",
                    clear_container=True)
    failed = row(db_url, post_id)
    assert (failed.status, failed.retry_count, failed.retryable, failed.container_id) == ("failed", 1, True, None)
    assert failed.next_attempt_at == NOW + timedelta(seconds=60)
    with session_scope(db_url) as session:
        attempt = session.scalars(select(models.PostAttempt).where(models.PostAttempt.post_id == post_id)).one()
        assert (attempt.http_status, attempt.error_code, attempt.error_subcode, attempt.detail) == (400, 100, 33, "refused")
    assert run.sweep(max_retries=2) == [(post_id, "scheduled", 1)]  # 1 of 2 retries used
    assert row(db_url, post_id).status == "scheduled" and run.sweep(max_retries=2) == []
    with session_scope(db_url) as session:
        session.get(models.Post, post_id).status = "failed"
    assert run.sweep(max_retries=1) == [(post_id, "abandoned", 1)]  # none left
    assert row(db_url, post_id).status == "abandoned"
    not_retried = add_post(db_url, persona_id, -4, status="failed", retryable=False)
    assert run.sweep(max_retries=3) == [] and row(db_url, not_retried).status == "failed"


def test_give_back_keeps_the_container_and_counts_no_retry(db_url, persona_id):
    post_id = add_post(db_url, persona_id, -5, container_id="c9")
    run = claims(db_url, "run-1")
    (post,) = run.claim(run.due())
    run.give_back(post, "window", "daily limit", step="publish")
    back = row(db_url, post_id)
    assert (back.status, back.retry_count, back.container_id) == ("scheduled", 0, "c9")
    assert attempts(db_url, post_id) == [("publish", "window", "c9")]


def test_container_digest_permalinks_quota_in_flight_and_media_paths(db_url, persona_id):
    ours, theirs = add_post(db_url, persona_id, -5), add_post(db_url, persona_id, -4)
    run, other = claims(db_url, "run-1"), claims(db_url, "run-2")
    (post,) = run.claim([p for p in run.due() if p.id == ours])
    (their_post,) = other.claim([p for p in other.due() if p.id == theirs])
    assert run.in_flight_elsewhere([post]) == 1 and other.in_flight_elsewhere([their_post, post]) == 0
    run.write(post, dict(container_id="c1"), [run.attempt(post.id, "container", "created", container_id="c1",
                                                          detail="text_sha256=abcd media=http://x")])
    assert run.container_caption_digest(post.id, "c1") == "abcd" and run.container_caption_digest(post.id, "c2") is None
    run.mark_published(post, external_id="m1", permalink=None, already=False, step="publish", container_id="c1")
    run.record_permalinks([(post.id, "m1", "https://www.instagram.com/p/x/", None)])
    assert row(db_url, ours).permalink == "https://www.instagram.com/p/x/"
    assert attempts(db_url, ours)[-1] == ("permalink", "ok", None)
    add_post(db_url, persona_id, 60)  # not due yet
    assert [str(p) for p in due_media_paths(db_url, NOW)] == ["/media/-4.jpg"]  # the published one is not due


def test_a_fresh_claim_skips_the_renewal_before_a_container_a_stale_one_is_checked(db_url, persona_id):
    """renew_unless_fresh writes nothing within RENEW_EVERY of the lease this run wrote; past it,
    it renews like renew, and a claim taken over meanwhile is LostClaim."""
    ids = [add_post(db_url, persona_id, m) for m in (-2, -1)]
    clock = Clock(NOW)
    run = claims(db_url, "run-1", clock)
    first, second = run.claim(run.due())  # one bulk claim, both won
    assert [row(db_url, i).claimed_by for i in ids] == ["run-1", "run-1"]
    clock.at = NOW + RENEW_EVERY - timedelta(seconds=1)
    run.renew_unless_fresh(first)
    assert row(db_url, ids[0]).claimed_at == NOW  # fresh: no write
    clock.at = NOW + RENEW_EVERY
    run.renew_unless_fresh(first)
    assert row(db_url, ids[0]).claimed_at == clock.at  # stale: renewed, and remembered
    clock.at += timedelta(seconds=30)
    run.renew_unless_fresh(first)
    assert row(db_url, ids[0]).claimed_at == clock.at - timedelta(seconds=30)
    # The second post's lease runs out and another run takes it over: the stale check finds out.
    rival_clock = Clock(NOW + LEASE + timedelta(seconds=1))
    rival = claims(db_url, "run-2", rival_clock)
    assert [p.id for p in rival.claim([p for p in rival.due() if p.id == ids[1]])] == [ids[1]]
    clock.at = rival_clock.at
    with pytest.raises(LostClaim):
        run.renew_unless_fresh(second)
    assert row(db_url, ids[1]).claimed_by == "run-2"
