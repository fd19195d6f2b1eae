"""Carousels, stories and reels published to the fake Graph API (persona_fakes/graph_formats.py,
real HTTP, media served over real HTTP) on SQLite and PostgreSQL: every format's containers, the
quota, each fault of issue 27, and a process killed between any two calls then rerun."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import wave
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from persona_fakes.graph import MediaServer
from persona_fakes.graph_formats import FakeFormatsGraphAPI
from persona_pipeline.automation.publishing import CRASH_ENV, publish_due
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import media, post_formats
from persona_pipeline.personas import load_persona
from persona_pipeline.post_media import audio_path, export_carousel, make_video, reel_plan
from persona_pipeline.persona_formats import FormatSettings
from persona_pipeline.resources import instagram
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.instagram import GraphError, InstagramGraphClient
from persona_pipeline.resources.publisher import InstagramPublisher
from persona_pipeline.video import encode_reel, probe
from persona_pipeline_tests.conftest import REPO, write_persona
from persona_pipeline_tests.helpers import LogCapture

pytestmark = pytest.mark.slow

USER, TOKEN, ENV = "17841400000000077", "EAAG-token-of-the-formats-account-42", "IG_TOKEN_FORMATS"
SETTINGS = FormatSettings.model_validate({"reel": {"stills": 2, "seconds_per_still": 1.5, "fps": 24}})


@dataclass
class World:
    url: str
    tmp: Path
    fake: FakeFormatsGraphAPI
    media: MediaServer
    public: Path
    persona_id: int = 0

    def publisher(self, **graph) -> InstagramPublisher:
        values = dict(base_url=self.fake.url, timeout_s=5, max_retries=1, backoff_s=0.01, poll_interval_s=1,
                      poll_timeout_s=5, video_poll_timeout_s=600)
        values.update(graph)
        return InstagramPublisher(graph=InstagramGraphClient(**values), media_public_base_url=self.media.url,
                                  media_public_dir=str(self.public), retry_wait_s=60, workers=2, max_retries=3)

    def publish(self, now: datetime | None = None, **graph) -> dict[str, int]:
        return publish_due(AppDatabase(url=self.url), self.publisher(**graph), now or datetime.now(timezone.utc),
                           LogCapture())

    def post(self, post_id: int) -> models.Post:
        with session_scope(self.url) as session:
            return session.get(models.Post, post_id)

    def items(self, post_id: int) -> list[models.PostItem]:
        with session_scope(self.url) as session:
            return list(session.scalars(select(models.PostItem).where(models.PostItem.post_id == post_id)
                                        .order_by(models.PostItem.position)))

    def attempts(self, post_id: int) -> list[tuple[str, str]]:
        with session_scope(self.url) as session:
            return [(a.step, a.outcome) for a in session.scalars(select(models.PostAttempt).where(
                models.PostAttempt.post_id == post_id).order_by(models.PostAttempt.id))]


@pytest.fixture
def world(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, TOKEN)
    public = tmp_path / "public"
    public.mkdir()
    with FakeFormatsGraphAPI(accounts={USER: TOKEN}) as fake, MediaServer(public) as server:
        # The client's waits pass on the fake's clock: a video's minutes of processing take no wall time.
        monkeypatch.setattr(instagram, "sleep", fake.advance)
        w = World(db_url, tmp_path, fake, server, public)
        folder = write_persona(tmp_path / "datasets", "fmt", photos=0,
                               instagram={"user_id": USER, "token_env": ENV})
        with session_scope(db_url) as session:
            w.persona_id = registry.sync_persona(session, load_persona(folder)).id
        yield w


def still(path: Path, size=(600, 800), colour=(180, 90, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 40):
        image.paste(tuple(255 - c for c in colour), (x, 0, x + 12, size[1]))
    image.save(path, quality=90)
    return path


_slot = [0]


def new_post(w: World, fmt: str, n_stills: int, make, caption: str | None = None, **options) -> int:
    """A scheduled, due post of `fmt` with `n_stills` stills, its files made by `make(post, items)`."""
    _slot[0] += 1
    stills = [still(w.tmp / "stills" / f"{_slot[0]}-{i}.jpg", colour=(40 * i % 256, 90, 200 - 30 * i))
              for i in range(n_stills)]
    with session_scope(w.url) as session:
        post = models.Post(persona_id=w.persona_id, account=USER, status="scheduled", format=fmt,
                           format_options=dict(options), hashtags=["#one"],
                           caption=caption or f"A {fmt} of the harbour, number {_slot[0]}.",
                           scheduled_at=datetime.now(timezone.utc) - timedelta(hours=1, minutes=-_slot[0]))
        session.add(post)
        session.flush()
        items = [models.PostItem(post_id=post.id, position=i + 1, source_path=str(p), crop={"x": 0.5, "y": 0.5})
                 for i, p in enumerate(stills)]
        session.add_all(items)
        session.flush()
        make(post, items)
        return post.id


def carousel(w: World, n: int = 3, **kw) -> int:
    return new_post(w, "carousel", n, lambda post, items: (
        post.format_options.update(aspect="4:5"), export_carousel(post, items, "4:5", w.tmp / "media")), **kw)


def reel(w: World, fmt: str = "reel", **kw) -> int:
    def make(post, items):
        post.format_options = {"video": True, "share_to_feed": False, "thumb_offset_ms": None}
        make_video(post, items, reel_plan(SETTINGS), w.tmp / "media", audio=None, cover=True)
    return new_post(w, fmt, 2, make, **kw)


def story(w: World) -> int:
    def make(post, items):
        data = media.story_jpeg(Path(items[0].source_path), post_formats.VERTICAL_SIZE,
                                post_formats.STORY_SAFE_TOP, post_formats.STORY_SAFE_BOTTOM)
        path = w.tmp / "media" / f"story-{post.id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        post.media_path, post.format_options = str(path), {"video": False}
    return new_post(w, "story", 1, make)


def created(w: World, media_type: str) -> list[dict]:
    return [w.fake.kinds[c]["fields"] for c in w.fake.kinds if w.fake.kinds[c]["media_type"] == media_type]


def test_every_format_goes_out_once_and_counts_once_against_the_quota(world):
    ids = [carousel(world), story(world), reel(world)]
    counts = world.publish()
    assert counts["published"] == 3 and counts["failed"] == 0, [world.post(i).failure_reason for i in ids]
    assert world.fake.double_publishes() == []
    items = created(world, "CAROUSEL_ITEM")
    assert len(items) == 3 and all(f["is_carousel_item"] == "true" and "caption" not in f for f in items)
    (top,) = created(world, "CAROUSEL")
    assert top["children"].split(",") == [i.container_id for i in world.items(ids[0])]
    assert top["caption"] == world.post(ids[0]).caption + " #one"
    (story_fields,) = created(world, "STORIES")
    assert story_fields["image_url"].endswith(".jpg") and "video_url" not in story_fields
    (reel_fields,) = created(world, "REELS")
    assert reel_fields["video_url"].endswith(".mp4") and reel_fields["share_to_feed"] == "false"
    assert reel_fields["cover_url"].endswith(".jpg")
    # A reel stays IN_PROGRESS for 30 s on the fake clock: it was polled until FINISHED.
    assert ("status", "finished") in world.attempts(ids[2])
    # Each publish is one unit of the 24 h quota, as the API counts it (5 containers, 3 posts).
    client = InstagramGraphClient(base_url=world.fake.url)
    assert client.quota(USER, TOKEN).usage == 3 == world.fake.publish_count(USER)
    for post_id in ids:
        post = world.post(post_id)
        assert post.status == "published" and post.permalink.startswith("https://www.instagram.com/p/")
    assert world.publish()["published"] == 0 and len(world.fake.published) == 3


def _child() -> None:
    """The crash subprocess: one batch with the settings in argv[1] (JSON)."""
    config = json.loads(sys.argv[1])
    publisher = InstagramPublisher(
        graph=InstagramGraphClient(base_url=config["graph"], timeout_s=5, max_retries=1, backoff_s=0.01,
                                   poll_interval_s=0.01, poll_timeout_s=2),
        media_public_base_url=config["media"], media_public_dir=config["public"], prepare_ahead=0)
    publish_due(AppDatabase(url=config["db"]), publisher, datetime.now(timezone.utc), LogCapture(), run_id="dies")
    print("the batch ended without the crash hook firing")


@pytest.mark.parametrize("where", ["after_item_container_1", "after_item_container_2", "after_container",
                                   "after_publish"])
def test_a_carousel_killed_between_any_two_calls_then_rerun_goes_out_once_without_doubled_items(world, where):
    post_id = carousel(world)
    config = {"graph": world.fake.url, "media": world.media.url, "public": str(world.public), "db": world.url}
    code = "from persona_pipeline_tests.test_formats_publishing import _child; _child()"
    child = subprocess.run([sys.executable, "-c", code, json.dumps(config)], cwd=REPO,
                           env={**os.environ, CRASH_ENV: where}, capture_output=True, text=True, timeout=120)
    assert child.returncode == 137, child.stdout + child.stderr
    before = len(world.fake.item_creates())
    counts = publish_due(AppDatabase(url=world.url), world.publisher(), datetime.now(timezone.utc), LogCapture(),
                         run_id="rerun", is_run_alive=lambda run_id: run_id != "dies")
    assert counts["reclaimed"] == 1
    assert world.post(post_id).status == "published"
    assert world.fake.double_publishes() == [] and len(world.fake.published) == 1
    # Three items, three item containers in all: the committed ones were asked and reused.
    assert len(world.fake.item_creates()) == 3
    assert before == {"after_item_container_1": 1, "after_item_container_2": 2}.get(where, 3)
    assert len(created(world, "CAROUSEL")) == 1


def test_a_child_container_that_errors_fails_the_post_naming_the_item_and_only_it_is_made_again(world):
    post_id = carousel(world)
    world.fake.fail_items(1, reason="Item media could not be processed (fake)")
    counts = world.publish()
    post = world.post(post_id)
    assert counts["failed"] == 1 and post.status == "failed" and post.retryable
    assert f"post {post_id}: carousel item 1: item container" in post.failure_reason
    assert "ended ERROR: Item media could not be processed (fake)" in post.failure_reason
    assert world.items(post_id)[0].container_id is None  # cleared: it is made again
    assert world.fake.published == []
    counts = world.publish(now=datetime.now(timezone.utc) + timedelta(hours=1))
    assert counts["published"] == 1 and world.post(post_id).status == "published"
    assert len(world.fake.item_creates()) == 4  # 3 + the one remade, never 6


def test_a_carousel_of_mixed_aspects_or_one_item_is_refused_before_any_call(world):
    mixed = carousel(world)
    square = world.items(mixed)[1]
    Image.open(square.source_path).resize((500, 500)).save(square.media_path)  # item 2 now 1:1
    with pytest.raises(post_formats.FormatError, match=r"post \d+: a carousel has 2 to 10 items; field items has 1"):
        carousel(world, n=1)
    lonely = carousel(world, n=2)
    with session_scope(world.url) as session:  # an item removed since it was made
        session.delete(session.scalars(select(models.PostItem).where(models.PostItem.post_id == lonely,
                                                                     models.PostItem.position == 2)).one())
    counts = world.publish()
    assert counts["failed"] == 2 and world.fake.requests_to("create") == []
    reason = world.post(mixed).failure_reason
    assert f"post {mixed}: item 2: aspect 500x500 = 1.000 differs from item 1's 1080x1350 = 0.800" in reason
    assert not world.post(mixed).retryable
    assert f"post {lonely}: a carousel has 2 to 10 items; field items has 1" in world.post(lonely).failure_reason


def test_the_fake_refuses_an_image_of_the_wrong_aspect_for_its_format(world, tmp_path):
    wide = still(world.public / "fmt" / "wide.jpg", size=(800, 800))
    client = InstagramGraphClient(base_url=world.fake.url, max_retries=0)
    with pytest.raises(GraphError) as caught:
        client.create_media(USER, TOKEN, {"media_type": "STORIES", "image_url": world.media.url_for("fmt/wide.jpg")})
    assert (caught.value.code, caught.value.subcode) == (36003, 2207009) and "story" in str(caught.value)
    tall = still(world.public / "fmt" / "tall.jpg", size=(540, 960))
    with pytest.raises(GraphError) as caught:
        client.create_media(USER, TOKEN, {"is_carousel_item": "true", "image_url": world.media.url_for("fmt/tall.jpg")})
    assert caught.value.subcode == 2207009
    assert wide.is_file() and tall.is_file()


def test_a_video_that_ends_in_error_fails_with_the_apis_reason_and_keeps_the_stills(world):
    post_id = reel(world)
    world.fake.fail_videos(1, reason="ERROR: Video processing failed: the audio track is unsupported")
    counts = world.publish()
    post = world.post(post_id)
    assert counts["failed"] == 1 and post.status == "failed" and not post.retryable
    assert post.failure_reason == (f"post {post_id}: Instagram could not process the reel video (container "
                                   f"{[c for c in world.fake.kinds if world.fake.kinds[c]['media_type'] == 'REELS'][0]} "
                                   "ERROR): ERROR: Video processing failed: the audio track is unsupported")
    assert all(Path(i.source_path).is_file() for i in world.items(post_id))
    assert Path(post.format_options["video_path"]).is_file() and Path(post.media_path).is_file()


def test_a_video_stuck_in_progress_fails_for_now_and_the_next_run_asks_the_same_container(world):
    post_id = reel(world)
    world.fake.stick_videos(1)
    counts = world.publish(video_poll_timeout_s=240)
    post = world.post(post_id)
    assert counts["failed"] == 1 and post.retryable and "still IN_PROGRESS after" in post.failure_reason
    stuck = post.container_id
    assert stuck and world.fake.kinds[stuck]["media_type"] == "REELS"
    world.fake.containers[stuck].ready_at = world.fake.now()  # Meta finishes it at last
    counts = world.publish(now=datetime.now(timezone.utc) + timedelta(hours=1))
    assert counts["published"] == 1 and world.post(post_id).container_id == stuck
    assert len(created(world, "REELS")) == 1


def test_a_video_story_and_a_reel_that_breaks_the_limits(world):
    good = reel(world, fmt="story")
    short = reel(world)
    too_short = world.tmp / "media" / "short.mp4"
    encode_reel([Path(world.items(short)[0].source_path)], too_short,
                reel_plan(FormatSettings.model_validate({"reel": {"seconds_per_still": 2.0, "fps": 24}})))
    with session_scope(world.url) as session:
        row = session.get(models.Post, short)
        row.format_options = {**row.format_options, "video_path": str(too_short)}
    counts = world.publish()
    assert counts["published"] == 1 and counts["failed"] == 1
    (story_fields,) = created(world, "STORIES")
    assert story_fields["video_url"].endswith(".mp4") and "caption" not in story_fields
    reason = world.post(short).failure_reason
    assert f"post {short} video short.mp4: duration 2.00 s is outside the reel's 3..900 s" in reason
    assert reason.endswith("nothing was uploaded") and not world.post(short).retryable
    assert world.post(good).status == "published"


def _wav(path: Path, seconds: float, rate: int = 44100) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * 440 * n / rate)))
                                 for n in range(int(seconds * rate))))
    return path


def test_reel_audio_is_trimmed_and_faded_and_a_file_that_is_not_audio_is_named(world, tmp_path):
    import av
    import numpy as np

    folder = tmp_path / "persona"
    (folder / "audio").mkdir(parents=True)
    _wav(folder / "audio" / "theme.wav", 6.0)
    (folder / "audio" / "notes.mp3").write_text("these are not sounds")
    (folder / "audio" / "link.wav").symlink_to(folder / "audio" / "theme.wav")
    stills = [still(tmp_path / f"s{i}.jpg") for i in range(2)]
    target = tmp_path / "out.mp4"
    facts = encode_reel(stills, target, reel_plan(SETTINGS), audio=audio_path(folder, "audio/theme.wav"))
    assert (facts.audio_codec, facts.audio_rate) == ("aac", 48000) and post_formats.video_problems("r", "reel", facts) == []
    with av.open(str(target)) as container:
        samples = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    assert len(samples) / 48000 == pytest.approx(3.0, abs=0.05)  # trimmed to the video's 3 s
    loud = np.abs(samples[48000:96000]).max()
    assert loud > 0.2 and np.abs(samples[:480]).max() < 0.05 * loud and np.abs(samples[-1200:]).max() < 0.1 * loud
    with pytest.raises(media.MediaError, match=r"notes\.mp3: not an audio file|notes\.mp3: has no audio"):
        encode_reel(stills, tmp_path / "bad.mp4", reel_plan(SETTINGS), audio=folder / "audio" / "notes.mp3")
    assert not (tmp_path / "bad.mp4").exists() and not (tmp_path / ".bad.mp4.partial").exists()
    with pytest.raises(media.MediaError, match="formats.reel.audio: audio/link.wav is a symbolic link"):
        audio_path(folder, "audio/link.wav")
    with pytest.raises(media.MediaError, match=r"formats.reel.audio: \.\./"):
        audio_path(folder, "../outside.wav")
    with session_scope(world.url) as session:  # a reel under 3 s is refused while it is made, naming the post
        post = models.Post(persona_id=world.persona_id, account=USER, status="draft", format="reel", caption="x",
                           hashtags=[], scheduled_at=datetime.now(timezone.utc), format_options={"video": True})
        session.add(post)
        session.flush()
        items = [models.PostItem(post_id=post.id, position=1, source_path=str(stills[0]), crop={"x": 0.5, "y": 0.5})]
        with pytest.raises(post_formats.FormatError, match=rf"post {post.id}: a reel of 1 stills x 1.5 s = 1.5 s "
                                                           r"is outside 3..900 s"):
            make_video(post, items, reel_plan(SETTINGS), tmp_path, audio=None, cover=False)


@pytest.mark.parametrize("where", ["after_container", "after_publish"])
def test_a_reel_killed_between_two_calls_then_rerun_goes_out_once_from_the_same_container(world, where):
    post_id = reel(world)
    config = {"graph": world.fake.url, "media": world.media.url, "public": str(world.public), "db": world.url}
    code = "from persona_pipeline_tests.test_formats_publishing import _child; _child()"
    world.fake.video_ready_after_s = 0.0  # the child polls on the wall clock; processing is tested above
    child = subprocess.run([sys.executable, "-c", code, json.dumps(config)], cwd=REPO,
                           env={**os.environ, CRASH_ENV: where}, capture_output=True, text=True, timeout=120)
    assert child.returncode == 137, child.stdout + child.stderr
    counts = publish_due(AppDatabase(url=world.url), world.publisher(), datetime.now(timezone.utc), LogCapture(),
                         run_id="rerun", is_run_alive=lambda run_id: run_id != "dies")
    assert counts["reclaimed"] == 1 and world.post(post_id).status == "published"
    assert len(created(world, "REELS")) == 1 and len(world.fake.published) == 1
    assert world.fake.double_publishes() == []
    outcome = "already_published" if where == "after_publish" else "published"
    assert outcome in [o for _step, o in world.attempts(post_id)]
