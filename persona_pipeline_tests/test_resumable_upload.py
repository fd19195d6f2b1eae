"""The resumable upload of a reel or video story with no public URL (the Graph API's rupload flow:
resources/instagram_upload.py) against the fake Graph API, on SQLite and PostgreSQL: the container made
with upload_type=resumable and committed, the bytes POSTed with offset/file_size, an upload interrupted
midway resumed at the offset Instagram reports, in the same run or the next, and a process killed between
any two calls then rerun: one container, one upload of every byte, one post."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from persona_pipeline.automation.publishing import CRASH_ENV, publish_due
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.instagram import InstagramGraphClient
from persona_pipeline.resources.publisher import InstagramPublisher
from persona_pipeline_tests.conftest import REPO
from persona_pipeline_tests.helpers import LogCapture
from persona_pipeline_tests.test_formats_publishing import created, reel, world  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def publisher(w, video_upload: str = "auto", max_retries: int = 1, public_url: str = "", **graph) -> InstagramPublisher:
    values = dict(base_url=w.fake.url, timeout_s=5, max_retries=max_retries, backoff_s=0.01, poll_interval_s=1,
                  poll_timeout_s=5, video_poll_timeout_s=600)
    values.update(graph)
    return InstagramPublisher(graph=InstagramGraphClient(**values), media_public_base_url=public_url,
                              media_public_dir=str(w.public), retry_wait_s=60, workers=2, max_retries=3,
                              video_upload=video_upload)


def publish(w, now: datetime | None = None, **kw) -> dict[str, int]:
    return publish_due(AppDatabase(url=w.url), publisher(w, **kw), now or datetime.now(timezone.utc), LogCapture())


def uploads(w) -> list[tuple[str, str]]:
    return [(r.params["offset"], r.params["file_size"]) for r in w.fake.requests if r.endpoint == "upload"]


def test_a_reel_with_no_public_url_is_uploaded_resumably_and_goes_out_once(world):  # noqa: F811
    post_id = reel(world)
    video = Path(world.post(post_id).format_options["video_path"])
    size = video.stat().st_size
    counts = publish(world)
    assert counts["published"] == 1 and counts["failed"] == 0, world.post(post_id).failure_reason
    (fields,) = created(world, "REELS")
    assert fields["upload_type"] == "resumable" and "video_url" not in fields and "cover_url" not in fields
    assert fields["thumb_offset"] == "0" and fields["caption"] == world.post(post_id).caption + " #one"
    (cid,) = world.fake.uploads
    assert bytes(world.fake.uploads[cid]["data"]) == video.read_bytes()
    assert uploads(world) == [("0", str(size))]
    upload_request = next(r for r in world.fake.requests if r.endpoint == "upload")
    assert upload_request.path == f"/ig-api-upload/v23.0/{cid}" and upload_request.token_in == "header"
    post = world.post(post_id)
    assert post.status == "published" and post.container_id == cid and post.media_url.endswith(f"/{cid}")
    assert ("upload", "uploaded") in world.attempts(post_id)
    assert world.fake.double_publishes() == [] and len(world.fake.published) == 1


def test_an_upload_interrupted_midway_resumes_at_its_offset(world):  # noqa: F811
    post_id = reel(world)
    video = Path(world.post(post_id).format_options["video_path"])
    size = video.stat().st_size
    world.fake.interrupt_uploads(1, after_bytes=5000)
    assert publish(world)["published"] == 1, world.post(post_id).failure_reason
    # The first POST broke after 5000 bytes; the second sent the rest from there, not the whole file again.
    assert uploads(world) == [("0", str(size)), ("5000", str(size))]
    assert bytes(next(iter(world.fake.uploads.values()))["data"]) == video.read_bytes()
    assert len(created(world, "REELS")) == 1 and len(world.fake.published) == 1


def test_an_upload_still_incomplete_fails_for_now_and_the_next_run_resumes_the_same_container(world):  # noqa: F811
    post_id = reel(world)
    video = Path(world.post(post_id).format_options["video_path"])
    size = video.stat().st_size
    world.fake.interrupt_uploads(2, after_bytes=3000)
    counts = publish(world)  # max_retries=1: two POSTs, both cut off
    post = world.post(post_id)
    assert counts["failed"] == 1 and post.retryable, post.status
    assert "is at byte 6000 of" in post.failure_reason and "the next run resumes it there" in post.failure_reason
    kept = post.container_id
    assert kept is not None  # kept: the next run resumes it
    counts = publish(world, now=datetime.now(timezone.utc) + timedelta(hours=1))
    assert counts["published"] == 1, world.post(post_id).failure_reason
    assert uploads(world) == [("0", str(size)), ("3000", str(size)), ("6000", str(size))]
    assert len(created(world, "REELS")) == 1 and world.post(post_id).container_id == kept
    assert bytes(world.fake.uploads[kept]["data"]) == video.read_bytes()


def test_a_video_story_goes_by_the_resumable_upload_when_the_setting_says_so(world):  # noqa: F811
    post_id = reel(world, fmt="story")
    counts = publish(world, video_upload="resumable", public_url=world.media.url)  # a public URL, not used for it
    assert counts["published"] == 1, world.post(post_id).failure_reason
    (fields,) = created(world, "STORIES")
    assert fields["upload_type"] == "resumable" and "video_url" not in fields and "caption" not in fields
    assert len(uploads(world)) == 1


def _child() -> None:
    """The crash subprocess: one batch with no public URL (so the resumable upload), settings in argv[1]."""
    config = json.loads(sys.argv[1])
    graph = InstagramGraphClient(base_url=config["graph"], timeout_s=5, max_retries=1, backoff_s=0.01,
                                 poll_interval_s=0.01, poll_timeout_s=2)
    publish_due(AppDatabase(url=config["db"]),
                InstagramPublisher(graph=graph, media_public_base_url="", media_public_dir=config["public"],
                                   prepare_ahead=0), datetime.now(timezone.utc), LogCapture(), run_id="dies")
    print("the batch ended without the crash hook firing")


@pytest.mark.parametrize("where", ["after_container", "after_upload", "after_publish"])
def test_a_resumable_reel_killed_between_two_calls_then_rerun_goes_out_once(world, where):  # noqa: F811
    post_id = reel(world)
    size = Path(world.post(post_id).format_options["video_path"]).stat().st_size
    world.fake.video_ready_after_s = 0.0  # the child polls on the wall clock
    config = {"graph": world.fake.url, "public": str(world.public), "db": world.url}
    code = "from persona_pipeline_tests.test_resumable_upload import _child; _child()"
    child = subprocess.run([sys.executable, "-c", code, json.dumps(config)], cwd=REPO,
                           env={**os.environ, CRASH_ENV: where}, capture_output=True, text=True, timeout=120)
    assert child.returncode == 137, child.stdout + child.stderr
    counts = publish_due(AppDatabase(url=world.url), publisher(world), datetime.now(timezone.utc), LogCapture(),
                         run_id="rerun", is_run_alive=lambda run_id: run_id != "dies")
    assert counts["reclaimed"] == 1 and world.post(post_id).status == "published"
    assert len(created(world, "REELS")) == 1 and len(world.fake.published) == 1 and world.fake.double_publishes() == []
    # Every byte went once: a kill before the upload uploads on the rerun, a kill after it uploads nothing more.
    assert uploads(world) == [("0", str(size))]
