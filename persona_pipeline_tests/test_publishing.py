"""Publishing against the fake Graph API (real HTTP), with the post JPEGs served over real HTTP
from MEDIA_PUBLIC_DIR, on SQLite and PostgreSQL: the happy path, every fault of the issue, the
quota, overlapping runs, and a process killed mid-publish (in a subprocess) then restarted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image
from sqlalchemy import select

from persona_pipeline.automation.publishing import CRASH_ENV, LEASE, publish_due, publish_job, run_batch
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain.media import MAX_MEDIA_BYTES
from persona_pipeline.personas import load_persona
from persona_pipeline.resources import instagram
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.resources.instagram import InstagramGraphClient
from persona_pipeline.db.publishing import PostClaims
from persona_pipeline.resources.publish_batch import BatchReport, PublishBatch
from persona_pipeline.resources.publisher import InstagramPublisher, OutboxPublisher, Publisher
from persona_pipeline_tests.conftest import REPO, write_persona
from persona_fakes.graph import Fault, FakeGraphAPI, MediaServer
from persona_fakes.serving import HTTPFake, free_port
from persona_pipeline_tests.helpers import LogCapture as Log

USER_A, USER_B = "17841400000000001", "17841400000000002"
TOKEN_A, TOKEN_B = "EAAG-token-of-account-a-0123456789", "EAAG-token-of-account-b-9876543210"
ENV_A, ENV_B = "IG_TOKEN_TEST_A", "IG_TOKEN_TEST_B"
RETRY_WAIT_S = 60.0


@dataclass
class World:
    url: str
    tmp: Path
    fake: FakeGraphAPI
    media: MediaServer
    public: Path
    log: Log

    def publisher(self, **overrides) -> InstagramPublisher:
        graph = dict(base_url=self.fake.url, timeout_s=5, max_retries=2, backoff_s=0.01, poll_interval_s=0.01,
                     poll_timeout_s=2)
        graph.update(overrides.pop("graph", {}))
        values = dict(graph=InstagramGraphClient(**graph), media_public_base_url=self.media.url,
                      media_public_dir=str(self.public), retry_wait_s=RETRY_WAIT_S, workers=4, max_retries=3)
        values.update(overrides)
        return InstagramPublisher(**values)

    def publish(self, now: datetime | None = None, publisher=None, **kwargs) -> dict[str, int]:
        return publish_due(AppDatabase(url=self.url), publisher or self.publisher(), now or datetime.now(timezone.utc),
                           self.log, **kwargs)

    def posts(self) -> list[models.Post]:
        with session_scope(self.url) as session:
            return list(session.scalars(select(models.Post).order_by(models.Post.scheduled_at, models.Post.id)))

    def post(self, post_id: int) -> models.Post:
        with session_scope(self.url) as session:
            return session.get(models.Post, post_id)

    def attempts(self, post_id: int) -> list[models.PostAttempt]:
        with session_scope(self.url) as session:
            return list(session.scalars(select(models.PostAttempt).where(models.PostAttempt.post_id == post_id)
                                        .order_by(models.PostAttempt.id)))

    def item(self, post_id: int) -> models.LibraryItem:
        with session_scope(self.url) as session:
            post = session.get(models.Post, post_id)
            return session.get(models.LibraryItem, post.library_item_id)


@pytest.fixture
def world(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_A, TOKEN_A)
    monkeypatch.setenv(ENV_B, TOKEN_B)
    monkeypatch.setattr(instagram, "sleep", lambda s: None)  # the client's backoffs, not slept through
    public = tmp_path / "public"
    public.mkdir()
    with FakeGraphAPI(accounts={USER_A: TOKEN_A, USER_B: TOKEN_B}) as fake, MediaServer(public) as media:
        yield World(db_url, tmp_path, fake, media, public, Log())


def persona(world: World, slug: str = "anna", user_id: str | None = USER_A, token_env: str | None = ENV_A,
            **overrides) -> int:
    if user_id:
        overrides["instagram"] = {"user_id": user_id, "token_env": token_env}
    folder = write_persona(world.tmp / "datasets", slug, photos=0, **overrides)
    with session_scope(world.url) as session:
        return registry.sync_persona(session, load_persona(folder)).id


def image(path: Path, size=(80, 100), colour=(120, 60, 30), fmt="JPEG", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt, **save)
    return path


def posts(world: World, persona_id: int, slug: str, account: str, n: int, *, first: datetime | None = None,
          hashtags=("#one", "#two"), caption: str | None = None, media: Path | None = None) -> list[int]:
    """n due posts, a minute apart in the order they are made, each with its own image and library item."""
    first = first or datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(days=1)

    ids = []
    with session_scope(world.url) as session:
        base = session.query(models.Post).count()
        for i in range(n):
            path = media or image(world.tmp / "media" / slug / f"{base + i}.jpg", colour=((base + i) * 37 % 256, 90, 140))
            item = models.LibraryItem(persona_id=persona_id, kind="winner", image_path=str(path),
                                      image_sha256=hashlib.sha256(path.read_bytes() + str(base + i).encode()).hexdigest())
            session.add(item)
            session.flush()
            post = models.Post(persona_id=persona_id, account=account, status="scheduled",
                               caption=caption or f"Post {base + i} of {slug}: a morning walk by the river.",
                               hashtags=list(hashtags), media_path=str(path), scheduled_at=first + timedelta(minutes=base + i),
                               library_item_id=item.id)
            session.add(post)
            session.flush()
            ids.append(post.id)
    return ids


def assert_published_once(world: World, post_ids: list[int]) -> None:
    assert world.fake.double_publishes() == []
    published_media = {media for _user, _container, media, _caption in world.fake.published}
    for post_id in post_ids:
        post = world.post(post_id)
        assert post.status == "published", (post.status, post.failure_reason)
        assert post.external_id in published_media and post.permalink.startswith("https://www.instagram.com/p/")
        item = world.item(post_id)
        assert item.status == "used" and item.used_by_post_id == post_id and item.used_at is not None
        assert post.failure_reason is None  # an earlier attempt's reason does not outlive the publish


def assert_no_token_leaked(world: World) -> None:
    texts = list(world.log.lines)
    for post in world.posts():
        texts += [post.failure_reason or "", post.media_url or ""]
        texts += [a.detail or "" for a in world.attempts(post.id)]
    for text in texts:
        assert TOKEN_A not in text and TOKEN_B not in text


# --- the happy path -----------------------------------------------------------------------------

def test_happy_path_publishes_in_slot_order_and_uses_the_library_items(world):
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 3)
    counts = world.publish()
    assert counts["published"] == 3 and counts["failed"] == 0
    assert_published_once(world, ids)
    # one account's posts go out in slot order
    captions = [world.post(i).caption for i in ids]
    assert [c.split(" #")[0] for _u, _c, _m, c in world.fake.published] == captions
    for post_id in ids:
        post = world.post(post_id)
        assert post.container_id and post.container_created_at and post.published_at and post.claimed_by
        assert post.media_url == f"{world.media.url}/anna/{post_id}-{post.media_sha256[:12]}.jpg"
        assert (world.public / "anna" / post.media_url.rsplit("/", 1)[1]).is_file()
        steps = [(a.step, a.outcome) for a in world.attempts(post_id)]
        assert steps == [("container", "created"), ("status", "finished"), ("publish", "published"), ("permalink", "ok")]
        assert world.attempts(post_id)[2].external_id == post.external_id
    # the text sent is the caption then the hashtags; the image was served as it was (already valid)
    sent = sorted(r.params["caption"] for r in world.fake.requests_to("create"))
    assert sent == sorted(world.post(i).caption + " #one #two" for i in ids)
    assert (world.public / "anna" / world.post(ids[0]).media_url.rsplit("/", 1)[1]).read_bytes() == \
        Path(world.post(ids[0]).media_path).read_bytes()
    again = world.publish()
    assert again["published"] == 0 and len(world.fake.published) == 3
    assert_no_token_leaked(world)


def test_outbox_publisher_marks_the_library_item_used(world):
    pid = persona(world, "olga", user_id=None)
    (post_id,) = posts(world, pid, "olga", "outbox:olga", 1)
    counts = world.publish(publisher=OutboxPublisher(home=str(world.tmp / "home")))
    assert counts["published"] == 1
    assert world.post(post_id).external_id == f"outbox-olga-{post_id}"
    assert world.item(post_id).status == "used"
    assert [(a.step, a.outcome) for a in world.attempts(post_id)] == [("outbox", "published")]
    assert world.fake.requests == []


def test_images_are_exported_when_they_break_instagrams_rules(world):
    """A 10 MiB JPEG and a panorama (aspect 2.5) are exported (≤ 8 MiB, padded to 1.91) before upload."""
    import numpy as np

    pid = persona(world)
    noise = np.random.default_rng(0).integers(0, 256, (2600, 2200, 3), dtype=np.uint8)
    big = world.tmp / "big.jpg"
    Image.fromarray(noise).save(big, quality=100)
    assert big.stat().st_size > MAX_MEDIA_BYTES
    wide = image(world.tmp / "wide.png", size=(500, 200), fmt="PNG")
    ids = posts(world, pid, "anna", USER_A, 1, media=big) + posts(world, pid, "anna", USER_A, 1, media=wide)
    assert world.publish()["published"] == 2
    assert_published_once(world, ids)
    for post_id in ids:
        served = world.public / "anna" / world.post(post_id).media_url.rsplit("/", 1)[1]
        assert served.stat().st_size <= MAX_MEDIA_BYTES
        with Image.open(served) as img:
            assert img.format == "JPEG" and 0.8 <= img.width / img.height <= 1.91
        assert "(exported)" in world.attempts(post_id)[0].detail


# --- one protocol ---------------------------------------------------------------------------------

def test_both_publishers_publish_an_account_through_the_same_call(world):
    """The op knows one method of a publisher: publish_account(batch, posts). Given the same
    batch, the Instagram and the outbox publisher claim their posts and record the same outcomes."""
    anna, olga = persona(world), persona(world, "olga", user_id=None)
    instagram_ids = posts(world, anna, "anna", USER_A, 2)
    outbox_ids = posts(world, olga, "olga", "outbox:olga", 2)
    claims = PostClaims(world.url, "run-protocol", datetime.now(timezone.utc), publisher="protocol",
                        retry_wait_s=RETRY_WAIT_S, clock=lambda: datetime.now(timezone.utc))
    batch = PublishBatch(claims, BatchReport(), world.log)
    due = claims.due()
    publishers = [(world.publisher(), instagram_ids, USER_A),
                  (OutboxPublisher(home=str(world.tmp / "home")), outbox_ids, "outbox:olga")]
    for publisher, ids, account in publishers:
        theirs = [post for post in due if post.id in ids]
        assert {publisher.account_key(post) for post in theirs} == {account}
        publisher.publish_account(batch, theirs)
    assert batch.report.counts["published"] == 4 and batch.report.counts["failed"] == 0 and not batch.report.errors
    assert batch.report.quotas[USER_A]["published"] == 2
    for post_id in instagram_ids + outbox_ids:
        post = world.post(post_id)
        assert (post.status, post.claimed_by) == ("published", "run-protocol") and world.item(post_id).status == "used"
    assert_published_once(world, instagram_ids)
    assert [world.post(i).external_id for i in outbox_ids] == [f"outbox-olga-{i}" for i in outbox_ids]
    assert len(world.fake.requests_to("publish")) == 2  # the outbox posts never reached the Graph API


RECORDED: list[list[tuple[str, int]]] = []


class RecordingPublisher(Publisher):
    """A publisher the op has never heard of: it records what it was given and publishes it."""

    name: str = "recording"

    def publish_account(self, batch: PublishBatch, posts: list) -> None:
        RECORDED.append([(post.account, post.id) for post in posts])
        for post in batch.claim(posts):
            batch.published(post, external_id=f"recorded-{post.id}", permalink=None, already=False, step="record")


def test_the_batch_runs_any_publisher_one_account_at_a_time_in_slot_order(world):
    RECORDED.clear()
    anna, bea = persona(world), persona(world, "bea", USER_B, ENV_B)
    ids = posts(world, anna, "anna", "account-a", 2) + posts(world, bea, "bea", "account-b", 1) \
        + posts(world, anna, "anna", "account-a", 1)
    counts = world.publish(publisher=RecordingPublisher())
    assert counts["published"] == 4
    assert sorted(RECORDED) == [[("account-a", ids[0]), ("account-a", ids[1]), ("account-a", ids[3])],
                                [("account-b", ids[2])]]
    assert [world.post(i).external_id for i in ids] == [f"recorded-{i}" for i in ids]
    assert [(a.publisher, a.step, a.outcome) for a in world.attempts(ids[0])] == [("recording", "record", "published")]


# --- faults ---------------------------------------------------------------------------------------

def test_http_5xx_is_retried_by_the_client_then_fails_retryable_then_publishes(world):
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 2)
    world.fake.inject("create", Fault.http(502), times=1)  # one 502: the client's retry hides it
    world.fake.inject("create", Fault.http(503), times=3, account=USER_A)  # then 3: more than 2 retries
    now = datetime.now(timezone.utc)
    counts = world.publish(now, publisher=world.publisher(prepare_ahead=0))  # one post at a time: faults in order
    assert counts["published"] == 1 and counts["failed"] == 1
    failed = world.post(ids[0])  # 502, 503, 503: out of retries
    assert failed.retryable and failed.retry_count == 1 and "503" in failed.failure_reason
    assert failed.next_attempt_at == now + timedelta(seconds=RETRY_WAIT_S)
    assert world.item(failed.id).status == "available"  # a failed post does not use its image up
    attempt = world.attempts(failed.id)[-1]
    assert (attempt.step, attempt.outcome, attempt.http_status) == ("container", "failed", 503)
    # swept back to scheduled, but waits for next_attempt_at
    assert world.publish(now + timedelta(seconds=1)) == {**dict.fromkeys(counts, 0), "retried": 1}
    assert world.post(failed.id).status == "scheduled"
    later = world.publish(now + timedelta(seconds=RETRY_WAIT_S + 1))
    assert later["published"] == 1
    assert_published_once(world, ids)
    published = world.post(failed.id)  # the failed attempt stays in post_attempts, not on the post
    assert published.failure_reason is None and published.next_attempt_at is None and published.retry_count == 1


def test_failed_posts_wait_longer_each_time_then_are_abandoned(world):
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    world.fake.inject("create", Fault.http(500), times=100)
    now = datetime.now(timezone.utc)
    waits = []
    for _ in range(3):
        world.publish(now)
        post = world.post(post_id)
        waits.append(post.next_attempt_at - now)
        now = post.next_attempt_at
    assert waits == [timedelta(seconds=RETRY_WAIT_S * f) for f in (1, 2, 4)]
    assert world.publish(now)["abandoned"] == 1
    post = world.post(post_id)
    assert post.status == "abandoned" and post.retry_count == 3 and world.item(post_id).status == "available"


@pytest.mark.parametrize("endpoint,code", [("create", 4), ("publish", 17), ("status", 613), ("publish", 32)])
def test_throttling_codes_are_retried_with_backoff(world, monkeypatch, endpoint, code):
    waits: list[float] = []
    monkeypatch.setattr(instagram, "sleep", waits.append)
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 2)
    world.fake.inject(endpoint, Fault.graph(code, message="Application request limit reached"), times=2)
    assert world.publish()["published"] == 2
    assert_published_once(world, ids)
    assert len([w for w in waits if w >= 0.0075]) >= 2  # two backoffs (0.01 s ± 25 %, then doubled)


def test_throttled_past_the_retries_fails_retryable(world):
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    world.fake.inject("publish", Fault.graph(4, message="Application request limit reached"), times=3)
    counts = world.publish()
    assert counts["failed"] == 1
    post = world.post(post_id)
    assert post.status == "failed" and post.retryable and post.container_id  # the container is kept
    assert world.attempts(post_id)[-1].error_code == 4
    world.publish(post.next_attempt_at)
    assert_published_once(world, [post_id])
    assert len(world.fake.requests_to("create")) == 1  # the kept container was asked, then published


def test_expired_container_is_recreated_and_published_once(world):
    ids = posts(world, persona(world), "anna", USER_A, 1) + posts(world, persona(world, "bea", USER_B, ENV_B), "bea", USER_B, 1)
    # A's container expires while it is polled; B's when it is published
    world.fake.inject("status", Fault.status("EXPIRED"), times=1, account=USER_A)
    world.fake.inject("publish", Fault.graph(-2, 2207020, message="The media has expired"), times=1, account=USER_B)
    counts = world.publish()
    assert counts["published"] == 2
    assert_published_once(world, ids)
    assert len(world.fake.requests_to("create")) == 4  # each post: its first container replaced once
    for post_id in ids:
        replaced = [a for a in world.attempts(post_id) if (a.step, a.outcome) in (("container", "replaced"),
                                                                                   ("publish", "expired"))]
        assert len(replaced) == 1 and replaced[0].container_id != world.post(post_id).container_id


def test_daily_limit_at_publish_keeps_posts_scheduled_and_stops_the_account(world):
    pid = persona(world)
    pid_b = persona(world, "bea", USER_B, ENV_B)
    ids = posts(world, pid, "anna", USER_A, 3)
    ids_b = posts(world, pid_b, "bea", USER_B, 2)
    world.fake.inject("publish", Fault.graph(9, 2207042, message="maximum number of posts"), times=1, account=USER_A)
    counts = world.publish()
    assert counts["published"] == 2 and counts["failed"] == 0  # account B is not held up
    assert_published_once(world, ids_b)
    for post_id in ids:
        post = world.post(post_id)
        assert post.status == "scheduled" and post.retry_count == 0 and world.item(post_id).status == "available"
    assert world.attempts(ids[0])[-1].outcome == "window"
    assert world.fake.publish_count(USER_A) == 0 and len(world.fake.requests_to("publish")) == 3  # A: one refused call
    with session_scope(world.url) as session:  # a person edits one of them while it waits (the form can)
        session.get(models.Post, ids[2]).caption = "Edited while waiting for the window."
    world.publish()
    assert_published_once(world, ids + ids_b)
    # A's unchanged containers from the first batch were reused; the edited post got a new one
    assert len(world.fake.requests_to("create")) == 6
    assert ("Edited while waiting for the window. #one #two" in [c for _u, _c, _m, c in world.fake.published])
    assert [(a.step, a.outcome) for a in world.attempts(ids[2])][-6:] == [
        ("status", "finished"), ("container", "replaced"), ("container", "created"), ("status", "finished"),
        ("publish", "published"), ("permalink", "ok")]


def test_quota_is_never_exceeded(world):
    world.fake.add_account(USER_A, TOKEN_A, quota_total=50, usage=47)
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 5)
    counts = world.publish()
    assert counts["published"] == 3 and counts["deferred"] == 2
    assert len(world.fake.requests_to("publish")) == 3  # never a call the quota would refuse
    assert len(world.fake.requests_to("create")) == 3  # nor a container for a post that cannot go out
    assert [world.post(i).status for i in ids] == ["published"] * 3 + ["scheduled"] * 2  # slot order
    report = run_batch(AppDatabase(url=world.url), world.publisher(), datetime.now(timezone.utc), world.log)
    assert report.quotas[USER_A] == {"usage_before": 50, "total": 50, "in_flight_elsewhere": 0, "published": 0,
                                     "usage_after": 50}
    assert report.counts["deferred"] == 2 and len(world.fake.requests_to("publish")) == 3
    world.fake.advance(86400 + 1)  # the moving window frees the slots
    assert world.publish()["published"] == 2
    assert_published_once(world, ids)


def test_spam_block_fails_for_good_and_stops_the_account(world):
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 3)
    world.fake.inject("publish", Fault.graph(4, 2207051, message="We restrict certain activity"), times=1)
    counts = world.publish()
    first = world.post(ids[0])
    assert first.status == "failed" and not first.retryable and "2207051" in first.failure_reason
    assert world.item(ids[0]).status == "available"
    assert [world.post(i).status for i in ids[1:]] == ["scheduled", "scheduled"]
    assert counts["failed"] == 1 and counts["deferred"] == 2 and world.fake.published == []
    world.publish()  # the sweep leaves a non-retryable failure alone
    assert world.post(ids[0]).status == "failed"
    assert_published_once(world, ids[1:])


class _OversizeHost(BaseHTTPRequestHandler):
    """A media host that answers every image with 9 MiB (a misconfigured CDN, say)."""

    body = b"\xff\xd8" + b"\0" * (9 * 1024 * 1024)

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self):
        self.do_HEAD()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_image_over_8_mib_at_the_url_fails_for_good(world):
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    with HTTPFake(_OversizeHost) as server:
        counts = world.publish(publisher=world.publisher(media_public_base_url=server.origin))
    post = world.post(post_id)
    assert counts["failed"] == 1 and post.status == "failed" and not post.retryable
    assert "2207004" in post.failure_reason and world.attempts(post_id)[-1].error_subcode == 2207004
    assert world.fake.published == [] and world.item(post_id).status == "available"


def test_rejected_token_keeps_posts_scheduled_and_is_reported(world, monkeypatch):
    monkeypatch.setenv(ENV_A, "EAAG-a-token-instagram-no-longer-knows")
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 2)
    report = run_batch(AppDatabase(url=world.url), world.publisher(), datetime.now(timezone.utc), world.log)
    assert report.errors and "rejects the access token" in report.errors[0]
    assert report.counts["deferred"] == 2 and world.fake.requests_to("create") == []
    assert [world.post(i).status for i in ids] == ["scheduled", "scheduled"]
    assert all("no-longer-knows" not in line for line in world.log.lines)


def test_token_rejected_mid_batch_gives_the_post_back(world):
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 2)
    world.fake.inject("create", Fault.graph(190, message="Error validating access token"), times=1)
    report = run_batch(AppDatabase(url=world.url), world.publisher(prepare_ahead=0), datetime.now(timezone.utc), world.log)
    assert report.errors and "token was rejected" in report.errors[0]
    assert [world.post(i).status for i in ids] == ["scheduled", "scheduled"]
    assert [world.post(i).retry_count for i in ids] == [0, 0] and world.fake.published == []
    assert world.attempts(ids[0])[-1].outcome == "auth" and world.attempts(ids[0])[-1].error_code == 190
    world.publish()
    assert_published_once(world, ids)
    assert_no_token_leaked(world)


def test_no_public_media_url_keeps_posts_scheduled_and_is_reported(world):
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 2)
    report = run_batch(AppDatabase(url=world.url), world.publisher(media_public_base_url=""), datetime.now(timezone.utc),
                       world.log)
    assert report.errors == ["MEDIA_PUBLIC_BASE_URL is not set: Instagram needs a public URL to fetch each image from"]
    assert report.counts["deferred"] == 2 and world.fake.requests == []
    assert [world.post(i).status for i in ids] == ["scheduled", "scheduled"]


def test_token_expiring_soon_is_a_warning(world):
    world.fake.set_token_expiry(USER_A, datetime.now(timezone.utc) + timedelta(days=3))
    pid = persona(world)
    posts(world, pid, "anna", USER_A, 1)
    report = run_batch(AppDatabase(url=world.url), world.publisher(token_warn_days=7), datetime.now(timezone.utc), world.log)
    assert report.counts["published"] == 1 and not report.errors
    assert len(report.token_warnings) == 1 and USER_A in report.token_warnings[0] and "day(s)" in report.token_warnings[0]


def test_caption_over_the_limits_fails_before_any_call(world):
    pid = persona(world)
    too_long = posts(world, pid, "anna", USER_A, 1, caption="x" * 2200)
    too_many_tags = posts(world, pid, "anna", USER_A, 1, hashtags=("#one", "#two", "#three"))
    fine = posts(world, pid, "anna", USER_A, 1)
    counts = world.publish()
    assert counts["failed"] == 2 and counts["published"] == 1
    for post_id, words in ((too_long[0], "characters"), (too_many_tags[0], "hashtags.max_per_post is 2")):
        post = world.post(post_id)
        assert post.status == "failed" and not post.retryable and words in post.failure_reason
        assert "anna/persona.yaml" in post.failure_reason
    assert len(world.fake.requests_to("create")) == 1
    assert_published_once(world, fine)


def test_persona_without_instagram_or_token_fails_for_good_naming_the_setting(world, monkeypatch):
    monkeypatch.delenv(ENV_B)
    no_account = persona(world, "nina", user_id=None)
    no_token = persona(world, "bea", USER_B, ENV_B)
    (a,) = posts(world, no_account, "nina", "outbox:nina", 1)
    (b,) = posts(world, no_token, "bea", USER_B, 1)
    counts = world.publish()
    assert counts["failed"] == 2 and world.fake.requests == []
    first, second = world.post(a), world.post(b)
    assert first.status == second.status == "failed" and not first.retryable and not second.retryable
    assert "nina/persona.yaml" in first.failure_reason and "`instagram`" in first.failure_reason
    assert ENV_B in second.failure_reason and "bea/persona.yaml" in second.failure_reason


def test_unreachable_media_url_fails_retryable_without_a_container(world):
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    port = free_port()  # nothing listens there
    counts = world.publish(publisher=world.publisher(media_public_base_url=f"http://127.0.0.1:{port}/media"))
    post = world.post(post_id)
    assert counts["failed"] == 1 and post.status == "failed" and post.retryable
    assert f"http://127.0.0.1:{port}/media/anna/" in post.failure_reason and post.container_id is None
    assert world.fake.requests_to("create") == []
    assert [(a.step, a.outcome) for a in world.attempts(post_id)] == [("container", "media_unreachable"),
                                                                     ("container", "failed")]


def test_container_in_error_fails_retryable_and_is_replaced_next_time(world):
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    world.fake.inject("status", Fault.status("ERROR"), times=1)
    world.publish()
    post = world.post(post_id)
    assert post.status == "failed" and post.retryable and post.container_id is None
    world.publish(post.next_attempt_at)
    assert_published_once(world, [post_id])
    assert len(world.fake.requests_to("create")) == 2


def test_lost_publish_answer_is_reconciled_not_repeated(world):
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    world.fake.inject("publish", Fault.drop(after=True), times=1)  # published, then the socket closes
    counts = world.publish()
    assert counts["already_published"] == 1
    assert_published_once(world, [post_id])
    assert len(world.fake.requests_to("publish")) == 1


# --- concurrency and crashes ------------------------------------------------------------------------

@pytest.mark.slow
def test_overlapping_runs_publish_each_post_once(world):
    world.fake.latency_s = 0.02
    pid, pid_b = persona(world), persona(world, "bea", USER_B, ENV_B)
    ids = posts(world, pid, "anna", USER_A, 6) + posts(world, pid_b, "bea", USER_B, 6)
    results: list[dict] = []
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        barrier.wait()
        results.append(world.publish(run_id=name, is_run_alive=lambda run_id: True))

    threads = [threading.Thread(target=run, args=(name,)) for name in ("run-1", "run-2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r["published"] for r in results) == 12
    assert len(world.fake.published) == 12 and len(world.fake.requests_to("create")) == 12
    assert_published_once(world, ids)


def _child() -> None:
    """Entry point of the crash subprocess: one batch with the settings in argv[1] (JSON)."""
    config = json.loads(sys.argv[1])
    publisher = InstagramPublisher(
        graph=InstagramGraphClient(base_url=config["graph"], timeout_s=5, max_retries=1, backoff_s=0.01,
                                   poll_interval_s=0.01, poll_timeout_s=2),
        media_public_base_url=config["media"], media_public_dir=config["public"], prepare_ahead=0)
    publish_due(AppDatabase(url=config["db"]), publisher, datetime.now(timezone.utc), Log(),
                run_id=config.get("run_id", "run-that-dies"))
    print("the batch ended without the crash hook firing")


def crash_run(world: World, where: str, run_id: str = "run-that-dies") -> subprocess.CompletedProcess:
    config = {"graph": world.fake.url, "media": world.media.url, "public": str(world.public), "db": world.url,
              "run_id": run_id}
    env = {**os.environ, CRASH_ENV: where}
    code = "from persona_pipeline_tests.test_publishing import _child; _child()"
    return subprocess.run([sys.executable, "-c", code, json.dumps(config)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_killed_between_container_and_publish_then_restarted(world):
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 2)
    child = crash_run(world, "after_container")
    assert child.returncode == 137, child.stdout + child.stderr
    post = world.post(ids[0])
    assert post.status == "publishing" and post.claimed_by == "run-that-dies" and post.container_id
    second = world.post(ids[1])  # claimed in the same batch, not started
    assert world.fake.published == [] and second.status == "publishing" and second.container_id is None
    crashed_container = post.container_id
    world.fake.inject("status", Fault.status("IN_PROGRESS"), times=1)  # still processing when asked: waited for
    # the dead run is not alive any more: its posts are taken over at once
    counts = world.publish(run_id="run-2", is_run_alive=lambda run_id: run_id != "run-that-dies")
    assert counts["reclaimed"] == 2 and counts["published"] == 2
    assert_published_once(world, ids)
    assert world.post(ids[0]).container_id == crashed_container  # the committed container was published
    assert [a.outcome for a in world.attempts(ids[0]) if a.step == "status"] == ["in_progress", "finished"]
    assert len(world.fake.requests_to("create")) == 2 and len(world.fake.requests_to("publish")) == 2


@pytest.mark.slow
def test_killed_after_publish_before_recording_reconciles_without_publishing_again(world):
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    child = crash_run(world, "after_publish")
    assert child.returncode == 137, child.stdout + child.stderr
    assert world.post(post_id).status == "publishing" and len(world.fake.published) == 1
    counts = world.publish(run_id="run-2", is_run_alive=lambda run_id: False)
    assert counts["already_published"] == 1 and counts["published"] == 0
    assert len(world.fake.requests_to("publish")) == 1  # never a second publish call
    assert_published_once(world, [post_id])
    post = world.post(post_id)
    assert post.external_id == world.fake.published[0][2]
    assert [(a.step, a.outcome) for a in world.attempts(post_id)][-2:] == [("status", "published"),
                                                                           ("reconcile", "already_published")]


@pytest.mark.slow
def test_without_run_liveness_a_crashed_claim_waits_for_the_lease(world):
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    assert crash_run(world, "after_container").returncode == 137
    now = datetime.now(timezone.utc)
    assert world.publish(now)["reclaimed"] == 0 and world.post(post_id).status == "publishing"
    counts = world.publish(now + LEASE + timedelta(seconds=30))
    assert counts["reclaimed"] == 1 and counts["published"] == 1
    assert_published_once(world, [post_id])


@pytest.mark.slow
def test_a_killed_run_that_dagster_still_calls_started_loses_its_claim_after_the_lease(world):
    """kill -9 leaves the run STARTED in Dagster (nothing marks it failed): its claims must still
    expire on their lease, or its posts stay `publishing` for ever."""
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 2)
    instance = dg.DagsterInstance.ephemeral()
    dead = instance.add_run(dg.DagsterRun(job_name="publish_job", run_id="killed-publish-run",
                                          status=dg.DagsterRunStatus.STARTED))
    assert crash_run(world, "after_container", run_id=dead.run_id).returncode == 137
    assert {p.claimed_by for p in world.posts()} == {dead.run_id}
    resources = {"database": AppDatabase(url=world.url), "publisher": world.publisher(),
                 "storage": PersonaStorage(home=str(world.tmp / "home"))}
    within = publish_job.execute_in_process(resources=resources, instance=instance)
    assert within.output_for_node("publish_due_posts")["reclaimed"] == 0  # its lease still runs: left alone
    assert [p.status for p in world.posts()] == ["publishing", "publishing"]
    # 11 minutes pass (the stamps move back: the op reads the wall clock), and Dagster still says STARTED
    with session_scope(world.url) as session:
        for post in session.scalars(select(models.Post)):
            post.claimed_at -= LEASE + timedelta(minutes=1)
    assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.STARTED
    after = publish_job.execute_in_process(resources=resources, instance=instance)
    counts = after.output_for_node("publish_due_posts")
    assert counts["reclaimed"] == 2 and counts["published"] == 2
    assert_published_once(world, ids)
    assert len(world.fake.requests_to("create")) == 2  # the killed run's committed container was used, not remade


def test_a_live_run_renews_its_lease_so_a_slow_batch_keeps_its_posts(world):
    """A batch slower than the lease (each container costs 6 minutes on its clock) renews the
    claims it holds; a run started mid-batch, more than a lease after the claims were made, takes none."""
    pid = persona(world)
    ids = posts(world, pid, "anna", USER_A, 3)
    start = datetime.now(timezone.utc)
    clock = [start]
    create, rival = world.fake._create, {}

    def slow_create(user_id: str, params: dict) -> dict:
        clock[0] += timedelta(minutes=6)
        if len(world.fake.requests_to("create")) == 2 and not rival:  # the second post's container
            rival["at"] = clock[0]  # set first: the rival's own calls come through here too
            # Graph calls of this rival would move the clock too: it has none to make when it takes nothing.
            rival["counts"] = world.publish(clock[0], run_id="rival-run")  # no Dagster: the lease alone decides
        return create(user_id, params)

    world.fake._create = slow_create
    counts = world.publish(start, publisher=world.publisher(prepare_ahead=0), run_id="slow-run",
                           is_run_alive=lambda run_id: True, clock=lambda: clock[0])
    assert rival["at"] - start > LEASE  # the rival came when the batch had run past one lease
    assert rival["counts"]["reclaimed"] == 0 and rival["counts"]["published"] == 0
    assert counts["published"] == 3 and counts["reclaimed"] == 0
    assert_published_once(world, ids)
    assert len(world.fake.requests_to("publish")) == 3
    assert {world.post(i).claimed_by for i in ids} == {"slow-run"}


def test_a_run_that_lost_its_claim_stops_touching_the_post(world):
    """A run stuck past its lease loses the post to another run; when it wakes up it checks its
    claim before its next call and leaves the post alone (here the new owner hit the daily limit
    and gave the post back: the stuck run must not publish it behind its back)."""
    pid = persona(world)
    (post_id,) = posts(world, pid, "anna", USER_A, 1)
    start = datetime.now(timezone.utc)
    clock = [start]
    status, taken = world.fake._status, {}

    def stuck_status(container_id: str, params: dict) -> dict:
        if not taken:  # the first run is stuck here past its lease; another run takes the post over
            taken["at"] = clock[0] = clock[0] + LEASE + timedelta(minutes=1)
            world.fake.inject("publish", Fault.graph(9, 2207042, message="maximum number of posts"), times=1)
            taken["counts"] = world.publish(clock[0], run_id="new-owner", publisher=world.publisher(prepare_ahead=0))
        return status(container_id, params)

    world.fake._status = stuck_status
    counts = world.publish(start, publisher=world.publisher(prepare_ahead=0), run_id="stuck-run",
                           clock=lambda: clock[0])
    assert taken["counts"]["reclaimed"] == 1 and taken["counts"]["deferred"] == 1
    assert counts["published"] == 0 and counts["failed"] == 0
    assert any("no longer claimed by this run" in line for line in world.log.lines)
    assert world.fake.published == [] and len(world.fake.requests_to("publish")) == 1  # the refused one only
    post = world.post(post_id)
    assert post.status == "scheduled" and post.container_id  # given back with its container, untouched since
    assert world.publish(clock[0])["published"] == 1
    assert_published_once(world, [post_id])
    assert len(world.fake.requests_to("create")) == 1  # the one container went out, once


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_the_dagster_job_reports_quotas_and_fails_on_a_rejected_token(world, monkeypatch, processes):
    """The same output, metadata and log whether the accounts go out from the op's process or
    from two worker processes (PERSONA_PUBLISH_PROCESSES): one account each."""
    pid = persona(world)
    pid_b = persona(world, "bea", USER_B, ENV_B)
    posts(world, pid, "anna", USER_A, 2)
    ids_b = posts(world, pid_b, "bea", USER_B, 1)
    resources = {"database": AppDatabase(url=world.url), "publisher": world.publisher(processes=processes),
                 "storage": PersonaStorage(home=str(world.tmp / "home"))}
    instance = dg.DagsterInstance.ephemeral()
    result = publish_job.execute_in_process(resources=resources, instance=instance)
    assert result.success and result.output_for_node("publish_due_posts")["published"] == 3
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert sum(1 for line in logged if " published: media " in line) == 3, logged
    (output,) = [e for e in result.events_for_node("publish_due_posts") if e.is_successful_output]
    metadata = output.step_output_data.metadata
    assert metadata["published"].value == 3
    assert metadata["quotas"].value[USER_A] == {"usage_before": 0, "total": 50, "in_flight_elsewhere": 0,
                                               "published": 2, "usage_after": 2}
    posts(world, pid_b, "bea", USER_B, 1)
    monkeypatch.setenv(ENV_B, "EAAG-revoked-token-of-account-b")
    failed = publish_job.execute_in_process(resources=resources, instance=dg.DagsterInstance.ephemeral(),
                                            raise_on_error=False)
    assert not failed.success
    assert world.posts()[-1].status == "scheduled" and world.post(ids_b[0]).status == "published"
