"""Reels from a video step's clips (real motion, not pan and zoom over stills): planned by scheduled_posts
from a library item that is a video candidate, made at 1080x1920 from the clip's own frames, written to
the outbox, and published to the fake Graph API, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from persona_pipeline.assets.content_library import content_library
from persona_pipeline.assets.scheduled_posts import scheduled_posts
from persona_pipeline.automation.publishing import publish_due
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import post_formats
from persona_pipeline.fileio import sha256_file
from persona_pipeline.post_media import make_video, reel_plan
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.publisher import OutboxPublisher
from persona_pipeline.video import clip_facts, probe, write_clip
from persona_pipeline_tests.helpers import LogCapture
from persona_pipeline_tests.test_formats_publishing import SETTINGS, USER, created, world  # noqa: F401 (fixture)
from persona_pipeline_tests.test_library import SLUG, Library, _posting

pytestmark = pytest.mark.slow


def moving_clip(path: Path, frames: int = 49, fps: int = 16, size=(96, 160), colour=(200, 80, 40)) -> Path:
    """A clip whose bright bar moves across: consecutive frames differ, as a video step's do."""
    pictures = []
    for k in range(frames):
        image = Image.new("RGB", size, colour)
        left = k * size[0] // frames
        image.paste((250, 250, 250), (left, 0, left + 12, size[1]))
        pictures.append(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_clip(pictures, path, fps)
    return path


def video_winner(lib: Library, clip_frames: int = 49) -> int:
    """A run winner that is a video step's candidate: its clip, and its first frame as its image."""
    winner = lib.winner("red", "city", "photo of t3st woman turning on a rooftop", "rooftop", 5.0)
    with session_scope(lib.url) as session:
        row = session.get(models.Candidate, winner)
        clip = moving_clip(Path(row.image_path).with_suffix(".mp4"), frames=clip_frames)
        row.video_path, row.video_sha256 = str(clip), sha256_file(clip)
    return winner


def test_a_reel_planned_from_a_video_candidate_plays_its_clip_and_the_outbox_writes_it(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_posting(formats={"mix": {"reel": 100}, "reel": {"fps": 30}}))
    winner = video_winner(lib)
    lib.materialise(content_library)
    lib.materialise(scheduled_posts)
    (post,) = [p for p in lib.posts() if p.library_item_id is not None]
    assert post.format == "reel" and "format reel" in post.strategy_note
    with session_scope(lib.url) as session:
        items = list(session.scalars(select(models.PostItem).where(models.PostItem.post_id == post.id)))
        clip = session.get(models.Candidate, winner).video_path
    assert [(i.candidate_id, i.source_path) for i in items] == [(winner, clip)]  # provenance: the clip's candidate
    facts = probe(Path(post.format_options["video_path"]))
    assert (facts.width, facts.height, facts.fps, facts.video_codec) == (1080, 1920, 30.0, "h264")
    assert facts.duration_s == pytest.approx(clip_facts(Path(clip))["duration_s"], abs=0.05)  # 49 frames at 16 fps
    assert post_formats.video_problems("reel", "reel", facts) == []
    # Real motion: the bar has moved between the first and the last second (no pan and zoom of one still).
    import av

    with av.open(post.format_options["video_path"]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == round(facts.duration_s * 30)
    bright = [int(np.argmax(frame[960, :, 1])) for frame in (frames[2], frames[-3])]
    assert bright[1] - bright[0] > 500
    with Image.open(post.media_path) as cover:
        assert cover.size == post_formats.VERTICAL_SIZE

    home = Path(lib.home)
    later = datetime.now(timezone.utc) + timedelta(days=8)
    counts = publish_due(AppDatabase(url=lib.url), OutboxPublisher(home=str(home)), later, LogCapture())
    assert counts["published"] == 1 and counts["failed"] == 0
    outbox = home / "outbox" / SLUG
    record = json.loads((outbox / f"post-{post.id:06d}.json").read_text())
    assert record["format"] == "reel" and record["items"][0]["candidate_id"] == winner
    assert probe(outbox / f"post-{post.id:06d}.mp4").duration_s == pytest.approx(facts.duration_s, abs=0.01)


def test_a_clip_too_short_for_a_reel_falls_back_and_says_why(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_posting(formats={"mix": {"reel": 100, "feed": 1}}))
    video_winner(lib, clip_frames=17)  # about 1 s: under the reel's 3 s
    lib.materialise(content_library)
    lib.materialise(scheduled_posts)
    (post,) = [p for p in lib.posts() if p.library_item_id is not None]
    assert post.format == "feed" and f"reel passed over" in post.strategy_note


def test_a_reel_of_a_clip_goes_out_once_to_the_fake_graph_api(world, tmp_path):  # noqa: F811
    clip = moving_clip(tmp_path / "clips" / "p0-s01-7.mp4")
    with session_scope(world.url) as session:
        post = models.Post(persona_id=world.persona_id, account=USER, status="scheduled", format="reel",
                           format_options={"video": True, "share_to_feed": True, "thumb_offset_ms": None},
                           hashtags=["#one"], caption="She turns on the rooftop.",
                           scheduled_at=datetime.now(timezone.utc) - timedelta(hours=1))
        session.add(post)
        session.flush()
        items = [models.PostItem(post_id=post.id, position=1, source_path=str(clip), crop={"x": 0.5, "y": 0.5})]
        session.add_all(items)
        session.flush()
        make_video(post, items, reel_plan(SETTINGS), tmp_path / "media", audio=None, cover=True)
        post_id = post.id
    counts = world.publish()
    assert counts["published"] == 1 and counts["failed"] == 0, world.post(post_id).failure_reason
    (fields,) = created(world, "REELS")
    assert fields["video_url"].endswith(".mp4") and fields["share_to_feed"] == "true"
    assert world.fake.double_publishes() == [] and world.post(post_id).status == "published"


def test_a_reel_of_stills_and_clips_mixed_is_refused_by_name(tmp_path):
    from persona_pipeline_tests.test_formats_publishing import still

    clip = moving_clip(tmp_path / "c.mp4")
    picture = still(tmp_path / "s.jpg")
    post = models.Post(id=41, format="reel", format_options={"video": True})
    items = [models.PostItem(position=1, source_path=str(clip), crop={"x": 0.5, "y": 0.5}),
             models.PostItem(position=2, source_path=str(picture), crop={"x": 0.5, "y": 0.5})]
    with pytest.raises(post_formats.FormatError, match=r"post 41: a reel is made of stills or of clips, not both"):
        make_video(post, items, reel_plan(SETTINGS), tmp_path / "media", audio=None, cover=False)
