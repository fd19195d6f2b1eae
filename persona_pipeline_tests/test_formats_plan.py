"""Carousels, stories and reels planned and made by scheduled_posts from one run's top candidates,
then published to the outbox, on SQLite and PostgreSQL (docs/posting.md#formats)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from persona_pipeline.assets.content_library import content_library
from persona_pipeline.assets.scheduled_posts import scheduled_posts
from persona_pipeline.automation.publishing import publish_due
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import post_formats
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.publisher import OutboxPublisher
from persona_pipeline.video import probe
from persona_pipeline_tests.helpers import LogCapture
from persona_pipeline_tests.test_library import SLUG, Library, _image, _metadata, _posting, _table

pytestmark = pytest.mark.slow

MIX = {"carousel": 50, "story": 25, "reel": 25}
FORMATS = {"mix": MIX, "carousel": {"items": 3, "aspect": "4:5"},
           "reel": {"stills": 2, "seconds_per_still": 1.5, "fps": 24, "crossfade_s": 0.5}}


@pytest.fixture(autouse=True)
def _no_gemini_key(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)


def add_run_candidates(lib: Library, winner_id: int, looks: list[str], scores: list[float],
                       status: str = "active") -> list[int]:
    """More candidates in the winner's run (the stills a carousel or reel draws on)."""
    ids = []
    with session_scope(lib.url) as session:
        winner = session.get(models.Candidate, winner_id)
        for look, score in zip(looks, scores):
            lib.seeds += 1
            image = Path(winner.image_path).with_name(f"cand-{lib.seeds}.png")
            row = models.Candidate(run_id=winner.run_id, step_id=winner.step_id, seed=lib.seeds, status=status,
                                   image_path=str(image), image_sha256=_image(image, look, lib.seeds),
                                   manifest_path=str(image.with_suffix(".json")), bt_score=score)
            session.add(row)
            session.flush()
            ids.append(row.id)
    return ids


def post_items(lib: Library, post_id: int) -> list[models.PostItem]:
    with session_scope(lib.url) as session:
        rows = list(session.scalars(select(models.PostItem).where(models.PostItem.post_id == post_id)
                                    .order_by(models.PostItem.position)))
        session.expunge_all()
        return rows


def test_the_format_mix_plans_a_carousel_a_story_and_a_reel_from_run_stills_then_the_outbox_writes_each(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_posting(formats=FORMATS))
    city = lib.winner("red", "city", "photo of t3st woman on a rooftop", "rooftop", 5.0)
    beach = lib.winner("blue", "beach", "photo of t3st woman surfing", "surf", 3.0)
    sunset = lib.winner("yellow", "beach", "photo of t3st woman at sunset", "sunset", 1.0)
    extra = {c: add_run_candidates(lib, c, ["green", "blue", "red"], [0.5, 2.0, -1.0]) for c in (city, beach, sunset)}
    add_run_candidates(lib, city, ["green"], [9.0], status="killed")  # never shown: a person killed it
    lib.materialise(content_library)

    meta = _metadata(lib.materialise(scheduled_posts), "scheduled_posts")
    posts = [p for p in lib.posts() if p.library_item_id is not None]
    assert meta["new_posts"] == 3
    # carousel first (the largest weight, nothing posted yet), then story and reel (tied, in order)
    assert [p.format for p in posts] == ["carousel", "story", "reel"]
    assert [r["format"] for r in _table(meta["posts"])] == ["carousel", "story", "reel"]
    assert all(f"format {p.format}" in p.strategy_note for p in posts)
    carousel, story, reel = posts

    # Carousel: the lead then the run's best usable candidates (BT score order), each cropped to 4:5.
    items = post_items(lib, carousel.id)
    lead = lib.items()[[i.id for i in lib.items()].index(carousel.library_item_id)].candidate_id
    run_extra = extra[lead]
    assert [i.candidate_id for i in items] == [lead, run_extra[1], run_extra[0]]  # 2.0 before 0.5; -1.0 left out
    assert [i.position for i in items] == [1, 2, 3] and items[0].library_item_id == carousel.library_item_id
    for item in items:
        with Image.open(item.media_path) as image:
            assert image.size == post_formats.CAROUSEL_ASPECTS["4:5"] and image.format == "JPEG"
        assert item.crop == {"x": 0.5, "y": 0.4}
    assert carousel.format_options == {"aspect": "4:5"} and carousel.media_path == items[0].media_path
    # Provenance: each item's candidate belongs to the lead's run (-> its LoRA -> its dataset).
    with session_scope(lib.url) as session:
        runs = {session.get(models.Candidate, i.candidate_id).run_id for i in items}
    assert len(runs) == 1

    # Story: one 9:16 JPEG with the picture between the safe bands.
    with Image.open(story.media_path) as image:
        assert image.size == post_formats.VERTICAL_SIZE
    assert [i.candidate_id for i in post_items(lib, story.id)] == [lib.item_of(c).candidate_id for c in (beach, sunset, city)
                                                                    if lib.item_of(c).id == story.library_item_id]

    # Reel: 2 stills x 1.5 s at 24 fps, H.264 at 1080x1920, a cover, within the API's limits.
    facts = probe(Path(reel.format_options["video_path"]))
    assert (facts.width, facts.height, facts.fps, facts.video_codec) == (1080, 1920, 24.0, "h264")
    assert facts.duration_s == pytest.approx(3.0, abs=0.05)
    assert post_formats.video_problems("reel", "reel", facts) == []
    assert reel.format_options["share_to_feed"] is True and reel.format_options["cover"] is True
    with Image.open(reel.media_path) as cover:
        assert cover.size == post_formats.VERTICAL_SIZE
    assert len(post_items(lib, reel.id)) == 2

    # No candidate shows in two live posts.
    shown = [i.candidate_id for p in posts for i in post_items(lib, p.id)]
    assert len(shown) == len(set(shown))

    # The outbox writes each format's files and a JSON record, once.
    home = Path(lib.home)
    publisher = OutboxPublisher(home=str(home))
    later = datetime.now(timezone.utc) + timedelta(days=8)
    counts = publish_due(AppDatabase(url=lib.url), publisher, later, LogCapture())
    assert counts["published"] == 3 and counts["failed"] == 0
    outbox = home / "outbox" / SLUG
    record = json.loads((outbox / f"post-{carousel.id:06d}.json").read_text())
    assert record["format"] == "carousel"
    assert [f["file"] for f in record["files"]] == [f"post-{carousel.id:06d}-{n:02d}.jpg" for n in (1, 2, 3)]
    assert [i["candidate_id"] for i in record["items"]] == [i.candidate_id for i in items]
    assert all((outbox / f["file"]).read_bytes() == Path(items[n].media_path).read_bytes()
               for n, f in enumerate(record["files"]))
    record = json.loads((outbox / f"post-{reel.id:06d}.json").read_text())
    assert record["format"] == "reel" and record["share_to_feed"] is True and record["duration_s"] == pytest.approx(3.0, abs=0.05)
    assert [f["file"] for f in record["files"]] == [f"post-{reel.id:06d}.mp4", f"post-{reel.id:06d}-cover.jpg"]
    assert probe(outbox / f"post-{reel.id:06d}.mp4").duration_s == pytest.approx(3.0, abs=0.05)
    record = json.loads((outbox / f"post-{story.id:06d}.json").read_text())
    assert record["format"] == "story" and record["files"][0]["file"] == f"post-{story.id:06d}.jpg"
    assert publish_due(AppDatabase(url=lib.url), publisher, later, LogCapture())["published"] == 0


def test_a_run_with_one_usable_still_falls_back_and_says_why(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_posting(formats={"mix": {"carousel": 100, "feed": 1}}))
    lonely = lib.winner("red", "city", "photo of t3st woman on a rooftop", "rooftop", 5.0)
    add_run_candidates(lib, lonely, ["green"], [3.0], status="culled")
    lib.materialise(content_library)
    lib.materialise(scheduled_posts)
    (post,) = [p for p in lib.posts() if p.library_item_id is not None]
    assert post.format == "feed" and post_items(lib, post.id) == []
    assert (f"carousel passed over: too few usable stills in the run of library item {post.library_item_id}"
            in post.strategy_note)
    with Image.open(post.media_path) as image:
        assert image.format == "JPEG"


def test_the_mix_is_honoured_over_many_plans_and_the_weekly_cap_is_never_relaxed(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_posting(
        formats={"mix": {"feed": 50, "carousel": 50}, "carousel": {"items": 2}},
        strategy={"posts_per_week": 7, "plan_ahead_days": 7, "weekly_cap": 4, "theme_spacing_days": 0,
                  "theme_max_per_week": 7}))
    for n in range(8):
        winner = lib.winner(["red", "blue", "green", "yellow"][n % 4], "city" if n % 2 else "beach",
                            f"photo of t3st woman, scene {n}", f"scene {n}", 5.0 - n / 10)
        add_run_candidates(lib, winner, ["green"], [1.0])
    lib.materialise(content_library)
    lib.materialise(scheduled_posts)
    posts = [p for p in lib.posts() if p.library_item_id is not None]
    assert len(posts) == 4  # the weekly cap (4) holds whatever the formats
    assert Counter(p.format for p in posts) == {"feed": 2, "carousel": 2}


def test_a_carousel_from_one_cluster_takes_its_best_items_across_runs_when_the_persona_says_so(tmp_path, db_url):
    from persona_pipeline.assets.clusters import clusters
    from persona_pipeline_tests.test_library import ROOFTOP, SURF

    formats = {"mix": {"carousel": 100}, "carousel": {"items": 3, "aspect": "1:1", "source": "cluster"}}
    lib = Library(tmp_path, db_url, **_posting(formats=formats, strategy={
        "posts_per_week": 1, "plan_ahead_days": 7, "weekly_cap": 5, "theme_spacing_days": 3, "theme_max_per_week": 2}))
    # Four red winners of four runs (one cluster) and two blue ones; each run has a better still of its own.
    red = [lib.winner("red", "city", ROOFTOP, "rooftop", score) for score in (5.0, 1.0, 3.0, 2.0)]
    blue = [lib.winner("blue", "beach", SURF, "surf", score) for score in (4.0, 0.5)]
    for winner in red + blue:
        add_run_candidates(lib, winner, ["green"], [9.0])
    lib.materialise(content_library, clusters)
    items = {i.candidate_id: i for i in lib.items()}
    assert len({items[c].cluster_id for c in red}) == 1 and items[red[0]].cluster_id != items[blue[0]].cluster_id

    lib.materialise(scheduled_posts)
    (post,) = [p for p in lib.posts() if p.library_item_id is not None]
    assert post.format == "carousel"
    lead = next(c for c, i in items.items() if i.id == post.library_item_id)
    shown = [i.candidate_id for i in post_items(lib, post.id)]
    # The lead, then the best other items of its cluster (BT score), never a run's own other stills or blue ones.
    others = sorted((c for c in red if c != lead), key=lambda c: -items[c].score)
    assert lead in red and shown == [lead, *others[:2]]
    assert [i.library_item_id for i in post_items(lib, post.id)] == [items[c].id for c in shown]
    assert post.format_options == {"aspect": "1:1", "cluster_id": items[lead].cluster_id}
    for item in post_items(lib, post.id):
        with Image.open(item.media_path) as image:
            assert image.size == post_formats.CAROUSEL_ASPECTS["1:1"]
    # A reviewer's Replace offers the cluster's remaining item (not a run's own still), and the item then
    # names that library item.
    from persona_pipeline.db.review_items import replace_item, replacement_options

    with session_scope(lib.url) as session:
        options = [c.id for c in replacement_options(session, session.get(models.Post, post.id))]
        assert options == [others[2]]
        replace_item(session, post.id, 3, others[2], "tester", lib.home)
    assert post_items(lib, post.id)[2].library_item_id == items[others[2]].id
    later = datetime.now(timezone.utc) + timedelta(days=8)
    assert publish_due(AppDatabase(url=lib.url), OutboxPublisher(home=str(lib.home)), later, LogCapture())["published"] == 1


def test_a_cluster_carousel_of_a_lone_item_falls_back_and_says_why(tmp_path, db_url):
    from persona_pipeline.assets.clusters import clusters
    from persona_pipeline_tests.test_library import ROOFTOP

    lib = Library(tmp_path, db_url, **_posting(formats={"mix": {"carousel": 100, "feed": 1},
                                                        "carousel": {"source": "cluster"}}))
    lonely = lib.winner("red", "city", ROOFTOP, "rooftop", 5.0)
    add_run_candidates(lib, lonely, ["red", "red"], [3.0, 2.0])  # its run has stills, its cluster has no other item
    lib.materialise(content_library, clusters)
    lib.materialise(scheduled_posts)
    (post,) = [p for p in lib.posts() if p.library_item_id is not None]
    assert post.format == "feed" and post_items(lib, post.id) == []
    assert (f"carousel passed over: too few usable stills in the cluster of library item {post.library_item_id}"
            in post.strategy_note)


def test_a_carousel_source_that_is_neither_run_nor_cluster_is_refused(tmp_path):
    from persona_pipeline.personas import PersonaFileError, load_persona
    from persona_pipeline_tests.conftest import write_persona

    folder = write_persona(tmp_path, photos=0, formats={"carousel": {"source": "pillar"}})
    with pytest.raises(PersonaFileError, match=r"formats.carousel.source"):
        load_persona(folder)
