"""The review form's Posts page with every format, over HTTP on SQLite and PostgreSQL: a carousel
swipes (its items in order), a reel plays (its MP4 served), a story shows its safe bands; a
reviewer reorders a carousel's or a reel's stills or replaces one, and the media is made again."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageChops
from sqlalchemy import select, update
from starlette.testclient import TestClient

from persona_pipeline.assets.content_library import content_library
from persona_pipeline.assets.scheduled_posts import scheduled_posts
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import media, post_formats
from persona_pipeline.review.app import ReviewConfig, create_app
from persona_pipeline.video import probe
from persona_pipeline_tests.test_formats_plan import FORMATS, add_run_candidates, post_items
from persona_pipeline_tests.test_library import Library, _posting
from persona_pipeline_tests.test_review_form import Form, csrf_of

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_gemini_key(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)


@pytest.fixture
def studio(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_posting(formats=FORMATS))
    for look, pillar, theme, score in (("red", "city", "rooftop", 5.0), ("blue", "beach", "surf", 3.0),
                                       ("yellow", "beach", "sunset", 1.0)):
        winner = lib.winner(look, pillar, f"photo of t3st woman, {theme}", theme, score)
        add_run_candidates(lib, winner, ["green", "blue", "red", "yellow"], [0.5, 2.0, -1.0, -2.0])
    lib.materialise(content_library)
    lib.materialise(scheduled_posts)
    with session_scope(lib.url) as session:  # waiting for a person, as without auto-review
        session.execute(update(models.Post).where(models.Post.library_item_id.is_not(None))
                        .values(status="awaiting_approval"))
    app = create_app(ReviewConfig(database_url=lib.url, home=lib.home, tokens={"alice-token-123": "alice"},
                                  secret_key="test-secret-key-0123456789abcdef", max_body_bytes=4096))
    form = Form(TestClient(app), lib.url, lib.home, None)
    posts = {p.format: p for p in lib.posts() if p.library_item_id is not None}
    return lib, form, form.login(), posts


def same_picture(a: bytes, b: bytes) -> bool:
    import io

    with Image.open(io.BytesIO(a)) as x, Image.open(io.BytesIO(b)) as y:
        return ImageChops.difference(x.convert("RGB"), y.convert("RGB")).getbbox() is None


def test_the_posts_page_previews_each_format(studio):
    lib, form, _csrf, posts = studio
    page = form.client.get("/posts")
    assert page.status_code == 200
    html = page.text
    carousel, story, reel = posts["carousel"], posts["story"], posts["reel"]
    assert f'aria-label="carousel of post {carousel.id}: swipe for the next item"' in html
    for item in post_items(lib, carousel.id):
        assert f'alt="post {carousel.id} item {item.position}" data-position="{item.position}"' in html
    assert f'alt="story of post {story.id}"' in html and 'class="safe-top"' in html and 'class="safe-bottom"' in html
    assert f'aria-label="reel of post {reel.id}"' in html
    video_url = html.split('<video class="reel"')[1].split('src="')[1].split('"')[0]
    served = form.client.get(video_url)
    assert served.status_code == 200 and served.headers["content-type"] == "video/mp4"
    assert served.content == Path(reel.format_options["video_path"]).read_bytes()
    assert "style=" not in html.split("<main")[-1]  # the CSP allows no inline style
    css = form.client.get("/static/review.css").text
    top, bottom = (100 * px / post_formats.VERTICAL_SIZE[1] for px in (post_formats.STORY_SAFE_TOP,
                                                                       post_formats.STORY_SAFE_BOTTOM))
    assert f"top: 0; height: {top:.2f}%" in css and f"bottom: 0; height: {bottom:.2f}%" in css


def test_a_reviewer_reorders_and_replaces_carousel_items_and_the_media_is_made_again(studio):
    lib, form, csrf, posts = studio
    carousel = posts["carousel"]
    before = post_items(lib, carousel.id)
    first_bytes = Path(before[0].media_path).read_bytes()
    done = form.client.post(f"/posts/{carousel.id}/reorder", data={"csrf_token": csrf, "order": "3, 1, 2"},
                            follow_redirects=False)
    assert done.status_code == 303, done.text
    after = post_items(lib, carousel.id)
    assert [i.candidate_id for i in after] == [before[2].candidate_id, before[0].candidate_id, before[1].candidate_id]
    assert same_picture(Path(after[1].media_path).read_bytes(), first_bytes)  # the old first is second now
    assert same_picture(Path(after[0].media_path).read_bytes(),
                        media.export_item_jpeg(Path(before[2].source_path), (1080, 1350), (0.5, 0.4)))
    with session_scope(lib.url) as session:
        kinds = [e.kind for e in session.scalars(select(models.ReviewEvent).where(
            models.ReviewEvent.subject_id == carousel.id))]
    assert "reorder_items" in kinds

    refused = form.client.post(f"/posts/{carousel.id}/reorder", data={"csrf_token": csrf, "order": "1, 1, 2"})
    assert refused.status_code == 400
    assert f"post {carousel.id}: the new order [1, 1, 2] must list each of the positions [1, 2, 3] once" in refused.text
    bad = form.client.post(f"/posts/{carousel.id}/reorder", data={"csrf_token": csrf, "order": "one, two"})
    assert bad.status_code == 400 and "is not a list of numbers" in bad.text

    page = form.client.get("/posts").text
    option = int(page.split(f'action="/posts/{carousel.id}/replace"')[1].split('name="candidate" value="')[1].split('"')[0])
    shown = {i.candidate_id for p in posts.values() for i in post_items(lib, p.id)}
    assert option not in shown
    done = form.client.post(f"/posts/{carousel.id}/replace", data={"csrf_token": csrf, "position": "3",
                                                                   "candidate": str(option)}, follow_redirects=False)
    assert done.status_code == 303, done.text
    replaced = post_items(lib, carousel.id)
    assert replaced[2].candidate_id == option and replaced[2].container_id is None
    with session_scope(lib.url) as session:
        still = session.get(models.Candidate, option).image_path
    assert same_picture(Path(replaced[2].media_path).read_bytes(),
                        media.export_item_jpeg(Path(still), (1080, 1350), (0.5, 0.4)))
    lead = next(i.position for i in replaced if i.library_item_id == carousel.library_item_id)
    refused = form.client.post(f"/posts/{carousel.id}/replace", data={"csrf_token": csrf, "position": str(lead),
                                                                      "candidate": str(option)})
    assert refused.status_code == 400 and "own library image; reorder the items instead" in refused.text
    taken = posts["story"]
    taken_candidate = post_items(lib, taken.id)[0].candidate_id
    refused = form.client.post(f"/posts/{carousel.id}/replace", data={"csrf_token": csrf, "position": "1",
                                                                      "candidate": str(taken_candidate)})
    assert refused.status_code == 400 and "another post shows it" in refused.text


def test_reordering_a_reels_stills_makes_the_video_again(studio):
    lib, form, csrf, posts = studio
    reel = posts["reel"]
    video = Path(reel.format_options["video_path"])
    old = video.read_bytes()
    before = post_items(lib, reel.id)
    done = form.client.post(f"/posts/{reel.id}/reorder", data={"csrf_token": csrf, "order": "2, 1"},
                            follow_redirects=False)
    assert done.status_code == 303, done.text
    assert [i.candidate_id for i in post_items(lib, reel.id)] == [before[1].candidate_id, before[0].candidate_id]
    assert video.read_bytes() != old and probe(video).duration_s == pytest.approx(3.0, abs=0.05)
    feed_refused = form.client.post(f"/posts/{reel.id}/reorder", data={"csrf_token": csrf, "order": "1, 2, 3"})
    assert feed_refused.status_code == 400
