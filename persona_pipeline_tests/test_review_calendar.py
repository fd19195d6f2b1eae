"""The post calendar: its pure parts (domain/calendar.py), the move rules it relies on
(db/review_posts.move_post with the weekly cap of domain/strategy.py), and its pages and move API
over HTTP (Starlette's TestClient). The browser tests are in test_review_browser_calendar.py."""

from __future__ import annotations

import base64
import html
import io
import os
import re
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from PIL import Image
from sqlalchemy import select
from starlette.testclient import TestClient

from persona_pipeline.db import models, review, review_posts
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import calendar as cal
from persona_pipeline.personas import InstagramAccount, PersonaConfig
from persona_pipeline.review.app import ReviewConfig, create_app
from persona_fakes.review import CalendarPost, seed_calendar

LISBON = ZoneInfo("Europe/Lisbon")
RULES = {"timezone": "Europe/Lisbon", "posting_windows": ["10:00-15:00"], "min_minutes_between_posts": 120,
         "strategy": {"weekly_cap": 2}}
TOKEN = "alice-token-123"


def local(days: int, hour: int = 12) -> datetime:
    """`days` from today at `hour`:00 in Lisbon, as an aware datetime."""
    day = datetime.now(LISBON).date() + timedelta(days=days)
    return datetime(day.year, day.month, day.day, hour, tzinfo=LISBON)


# --- domain/calendar.py ---------------------------------------------------------------------------

def test_a_month_view_shows_the_whole_weeks_of_the_month_monday_first():
    span = cal.calendar_range("month", date(2026, 2, 17))
    assert span.anchor == date(2026, 2, 1) and span.title == "February 2026"
    assert (span.first, span.last) == (date(2026, 1, 26), date(2026, 3, 1))
    assert all(len(week) == 7 and week[0].weekday() == 0 for week in span.weeks) and len(span.weeks) == 5
    assert (span.previous, span.next) == (date(2026, 1, 1), date(2026, 3, 1))
    assert span.in_view(date(2026, 2, 28)) and not span.in_view(date(2026, 1, 31))
    december = cal.calendar_range("month", date(2026, 12, 31))
    assert december.next == date(2027, 1, 1) and december.previous == date(2026, 11, 1)


def test_a_week_view_runs_monday_to_sunday():
    span = cal.calendar_range("week", date(2026, 3, 12))  # a Thursday
    assert span.weeks == [[date(2026, 3, 9) + timedelta(days=i) for i in range(7)]]
    assert (span.previous, span.next, span.title) == (date(2026, 3, 2), date(2026, 3, 16), "Week of 09 Mar 2026")


def test_view_and_date_are_read_strictly_and_refusals_name_the_value():
    today = date(2026, 5, 5)
    assert cal.parse_view(None) == "month" and cal.parse_view("week") == "week"
    assert cal.parse_day("", today) == today and cal.parse_day("2026-03-09", today) == date(2026, 3, 9)
    assert cal.parse_day("2026-03", today, month_ok=True) == date(2026, 3, 1)
    with pytest.raises(cal.CalendarInputError, match="view 'year' is not one of: month, week"):
        cal.parse_view("year")
    with pytest.raises(cal.CalendarInputError, match=r"date '2026-02-30' is not a day like 2026-03-09"):
        cal.parse_day("2026-02-30", today)
    with pytest.raises(cal.CalendarInputError, match=r"date '2026-3-9' is not a day"):
        cal.parse_day("2026-3-9", today)
    with pytest.raises(cal.CalendarInputError, match=r"day '2026-03' is not a day like"):
        cal.parse_day("2026-03", today, field="day")


def test_a_dropped_post_keeps_its_wall_time():
    assert cal.same_time_on(datetime(2026, 3, 9, 14, 30, tzinfo=LISBON), date(2026, 3, 28)) == "2026-03-28T14:30"


def test_the_caption_is_cut_where_instagram_puts_more():
    assert cal.caption_cut("Short one. #sun") == ("Short one. #sun", "")
    words = "word " * 40  # 200 characters
    shown, rest = cal.caption_cut(words.strip())
    assert len(shown) <= cal.CAPTION_CHARS and shown.endswith("word") and shown + " " + rest == words.strip()
    assert cal.caption_cut("line one\nline two\nline three") == ("line one\nline two", "line three")
    assert cal.caption_cut("x" * 130) == ("x" * 125, "x" * 5)  # no space to cut at: mid-word


def test_accounts_are_named_never_by_their_id():
    config = PersonaConfig(name="Mira", trigger_word="m1ra", class_word="woman", pillars=[{"name": "city", "weight": 1}],
                           instagram=InstagramAccount(user_id="17841400000", token_env="MIRA_TOKEN", username="mira.daily"))
    assert config.account_name("17841400000") == "@mira.daily"
    assert config.account_name("outbox:mira") == "Mira (outbox)"
    assert config.account_name("17849999999") == "Mira, an earlier account"
    nameless = config.model_copy(update={"instagram": InstagramAccount(user_id="17841400000", token_env="MIRA_TOKEN")})
    assert nameless.account_name("17841400000") == "Mira on Instagram"


# --- moving: windows, gap and weekly cap, checked in move_post -------------------------------------

def test_a_move_is_checked_against_windows_gap_and_weekly_cap(db_url, tmp_path):
    first, second, done = seed_calendar(db_url, tmp_path / "home", [
        CalendarPost("scheduled", local(2)), CalendarPost("awaiting_approval", local(20)),
        CalendarPost("published", local(-1), permalink="https://www.instagram.com/p/abc/")], **RULES)
    with pytest.raises(review.ReviewError, match=r"\(Europe/Lisbon\) is outside the posting windows 10:00-15:00"), \
            session_scope(db_url) as session:
        review_posts.move_post(session, second, local(10, hour=16), "ana")
    with pytest.raises(review.ReviewError, match="within 120 minutes of another post of Test Persona \\(outbox\\)"), \
            session_scope(db_url) as session:
        review_posts.move_post(session, second, local(2, hour=13), "ana")
    # first (day 2), the published post (day -1) and second at day 4: 3 posts within 7 days
    with pytest.raises(review.ReviewError, match="weekly cap 2 reached: 3 posts would fall within 7 days"), \
            session_scope(db_url) as session:
        review_posts.move_post(session, second, local(4), "ana")
    with pytest.raises(review.ReviewError, match=f"post {done} is published; only a post not yet publishing can be moved"), \
            session_scope(db_url) as session:
        review_posts.move_post(session, done, local(30), "ana")
    with session_scope(db_url) as session:
        assert review_posts.move_post(session, second, local(10), "ana").scheduled_at == local(10)
        events = list(session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == "move_post")))
        assert [(e.subject_id, e.payload["to"]) for e in events] == [(second, local(10).astimezone(timezone.utc).isoformat())]


def test_an_edit_seen_before_another_change_is_refused_as_stale(db_url, tmp_path):
    (post_id,) = seed_calendar(db_url, tmp_path / "home", [CalendarPost("scheduled", local(3))], **RULES)
    with session_scope(db_url) as session:
        seen = session.get(models.Post, post_id).updated_at.isoformat()
        assert review_posts.unchanged_post(session, post_id, seen).id == post_id
    with session_scope(db_url) as session:
        review_posts.edit_post(session, post_id, "Changed by bo", [], "bo")
    with pytest.raises(review_posts.StaleEdit, match=f"post {post_id} changed after your page showed it"), \
            session_scope(db_url) as session:
        review_posts.unchanged_post(session, post_id, seen)


# --- the pages and the move API over HTTP ---------------------------------------------------------

@pytest.fixture
def client(sqlite_url, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    ids = seed_calendar(sqlite_url, home, [
        CalendarPost("scheduled", local(2), caption=("Morning light on the river. " * 8).strip()),
        CalendarPost("awaiting_approval", local(20)),
        CalendarPost("published", local(-1), permalink="https://www.instagram.com/p/abc/"),
        CalendarPost("cancelled", local(5))], **RULES)
    app = create_app(ReviewConfig(database_url=sqlite_url, home=home, tokens={TOKEN: "alice"}, secret_key="calendar-secret-0123456789"))
    client = TestClient(app)
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    assert client.post("/login", data={"csrf_token": csrf, "token": TOKEN, "next": "/"}, follow_redirects=False).status_code == 303
    client.ids, client.url, client.home = ids, sqlite_url, home
    client.csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/calendar").text).group(1)
    return client


@pytest.fixture
def sqlite_url(tmp_path):
    from persona_pipeline_tests.conftest import make_database

    url, cleanup = make_database("sqlite", tmp_path)
    yield url
    cleanup()


def cards(page_html: str) -> dict[int, str]:
    """Post id -> the day cell it sits in."""
    found = {}
    for day, cell in re.findall(r'data-day="([\d-]+)">(.*?)</li>', page_html, re.S):
        for post_id in re.findall(r'data-post-id="(\d+)"', cell):
            found[int(post_id)] = day
    return found


def test_the_month_shows_scheduled_awaiting_and_published_posts_with_thumbnails_and_account_names(client):
    scheduled, awaiting, published, cancelled = client.ids
    months = {local(d).strftime("%Y-%m") for d in (2, -1)}
    shown: dict[int, str] = {}
    for month in sorted(months | {local(20).strftime("%Y-%m")}):
        page = client.get(f"/calendar?view=month&date={month}&persona=tester")
        assert page.status_code == 200
        shown.update(cards(page.text))
        assert "outbox:tester" not in page.text and "Test Persona (outbox)" in page.text
    assert shown == {scheduled: local(2).date().isoformat(), awaiting: local(20).date().isoformat(),
                     published: local(-1).date().isoformat()}  # the cancelled post is not in the feed
    page = client.get(f"/calendar?date={local(2).date().isoformat()}")
    # One sprite of the page's thumbnails (no request per image); each card shows its tile.
    tile = int(re.search(rf'id="cal-post-{scheduled}".*?<span class="cal-thumb cal-tile" data-tile="(\d+)"', page.text, re.S).group(1))
    src, columns, rows = re.search(r'data-sprite-columns="(\d+)" data-sprite-rows="(\d+)">\s*<img class="cal-sprite" '
                                   r'id="cal-sprite" src="(/calendar/sprites/[0-9a-f]{64}\.jpg)"', page.text).group(3, 1, 2)
    tiles = [int(t) for t in re.findall(r'data-tile="(\d+)"', page.text)]
    assert sorted(tiles) == list(range(len(tiles))) and int(columns) * int(rows) >= len(tiles)
    answer = client.get(src)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(answer.content)) as image:
        assert (image.format, image.size) == ("JPEG", (int(columns) * 96, int(rows) * 120))
        x, y = (tile % int(columns)) * 96 + 48, (tile // int(columns)) * 120 + 60
        with session_scope(client.url) as session:
            source = Image.open(session.get(models.Post, scheduled).media_path).convert("RGB").getpixel((32, 40))
        assert all(abs(a - b) < 12 for a, b in zip(image.convert("RGB").getpixel((x, y)), source))  # its own picture
    assert len(list((client.home / ".cache" / "thumbs").rglob("*.jpg"))) == 3  # made once, kept for the next page
    assert len(list((client.home / ".cache" / "sprites").glob("*.jpg"))) >= 1
    again = client.get(f"/calendar?date={local(2).date().isoformat()}")
    assert src in again.text and len(list((client.home / ".cache" / "sprites").glob("*.jpg"))) == len(set(
        re.findall(r"/calendar/sprites/([0-9a-f]{64})\.jpg", again.text + page.text)))  # the same sprite, not another
    assert client.get("/calendar/sprites/" + "0" * 64 + ".jpg").status_code == 404
    assert client.get("/calendar/sprites/..%2Fthumbs.jpg").status_code == 404
    assert re.search(rf'id="cal-post-{published}"[^>]*href', page.text) or local(-1).month != local(2).month
    assert f'id="cal-post-{published}" data-post-id="{published}" data-movable' not in page.text


def test_an_inlined_thumbnail_is_remembered_until_its_image_changes(tmp_path):
    from persona_pipeline.review import media

    home = tmp_path.resolve()
    image = home / "personas" / "p" / "a.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (64, 80), (200, 10, 10)).save(image)
    first = media.thumbnail_src(home, str(image))
    for cached in (home / media.THUMB_CACHE).rglob("*.jpg"):
        cached.unlink()  # a second call must not need the file cache: it is remembered in the process
    assert media.thumbnail_src(home, str(image)) == first
    Image.new("RGB", (64, 80), (10, 10, 200)).save(image)  # a replaced image (new size or mtime) is read again
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = media.thumbnail_src(home, str(image))
    assert second.startswith("data:image/jpeg;base64,") and second != first
    with Image.open(io.BytesIO(base64.b64decode(second.split(",", 1)[1]))) as thumb:
        assert thumb.convert("RGB").getpixel((32, 40))[2] > 150  # the blue replacement, not the red original


def test_a_sprite_holds_each_readable_thumbnail_once_and_is_made_once(tmp_path):
    from persona_pipeline.review import media

    home = tmp_path.resolve()
    folder = home / "personas" / "p"
    folder.mkdir(parents=True)
    red, blue, broken = folder / "red.png", folder / "blue.png", folder / "broken.png"
    Image.new("RGB", (64, 80), (200, 10, 10)).save(red)
    Image.new("RGB", (800, 1000), (10, 10, 200)).save(blue)
    broken.write_bytes(b"not a picture")
    images = [str(red), str(blue), str(broken), str(folder / "missing.png"), str(red)]
    sprite, tiles = media.thumbnail_sprite(home, images)
    assert tiles[2:4] == ["/media/personas/p/broken.png", "/media/personas/p/missing.png"]  # the plain URL, as before
    assert sorted(tiles[:2]) == [0, 1] and tiles[4] == tiles[0]  # one tile per image, shared by its posts
    path = home / media.SPRITE_CACHE / f"{sprite.key}.jpg"
    with Image.open(path) as sheet:
        assert (sprite.columns, sprite.rows, sheet.size) == (2, 1, (192, 120))
        for index, colour in ((tiles[0], (200, 10, 10)), (tiles[1], (10, 10, 200))):
            assert all(abs(a - b) < 12 for a, b in zip(sheet.convert("RGB").getpixel((index * 96 + 48, 60)), colour))
    made = path.stat().st_mtime_ns
    again, moved = media.thumbnail_sprite(home, list(reversed(images)))  # other posts' order: the same sprite
    assert again == sprite and moved == list(reversed(tiles)) and path.stat().st_mtime_ns == made
    assert len(list((home / media.SPRITE_CACHE).glob("*.jpg"))) == 1
    path.unlink()  # an emptied cache is made again
    assert media.thumbnail_sprite(home, images) == (sprite, tiles) and path.is_file()


def test_a_week_view_and_bad_input_get_clear_answers(client):
    week = client.get(f"/calendar?view=week&date={local(2).date().isoformat()}")
    assert week.status_code == 200 and client.ids[0] in cards(week.text) and len(cards(week.text)) <= 2
    bad = client.get("/calendar?view=month&date=2026-13")
    assert bad.status_code == 400 and 'id="error-page"' in bad.text
    assert "date &#39;2026-13&#39; is not a day like 2026-03-09 or a month like 2026-03" in bad.text
    assert client.get("/calendar?view=year").status_code == 400
    missing = client.get("/calendar/posts/999999")
    assert missing.status_code == 404 and "post 999999 does not exist" in missing.text
    assert client.get("/calendar?persona=nobody").status_code == 404


def test_the_post_page_previews_the_feed_and_links_a_published_post(client):
    scheduled, _, published, _ = client.ids
    page = html.unescape(client.get(f"/calendar/posts/{scheduled}").text)
    shown = re.search(r'id="preview-shown">(.*?)</span>', page, re.S).group(1)
    rest = re.search(r'id="preview-rest" hidden>(.*?)</span>', page, re.S).group(1)
    assert len(shown) <= 125 and (shown + " " + rest) == ("Morning light on the river. " * 8).strip() + " #one"
    assert 'data-aspect="64 / 80"' in page and 'id="edit-form"' in page  # the exported image's own frame
    done = client.get(f"/calendar/posts/{published}").text
    assert 'id="permalink" href="https://www.instagram.com/p/abc/"' in done and 'id="edit-form"' not in done


def test_edit_saves_caption_hashtags_and_time_as_review_events(client):
    post_id = client.ids[0]
    page = client.get(f"/calendar/posts/{post_id}").text
    stamp = re.search(r'name="stamp" value="([^"]+)"', page).group(1)
    new_time = local(9, hour=11).strftime("%Y-%m-%dT%H:%M")
    form = {"csrf_token": client.csrf, "stamp": stamp, "view": "month", "persona": "", "caption": "Fresh words.",
            "hashtags": "sun sea", "new_time": new_time}
    saved = client.post(f"/calendar/posts/{post_id}/edit", data=form, follow_redirects=False)
    assert saved.status_code == 303 and saved.headers["location"] == f"/calendar/posts/{post_id}?view=month"
    assert "caption and hashtags and time saved" in client.get(saved.headers["location"]).text
    with session_scope(client.url) as session:
        post = session.get(models.Post, post_id)
        assert (post.caption, post.hashtags, post.scheduled_at) == ("Fresh words.", ["#sun", "#sea"], local(9, hour=11))
        kinds = sorted(session.scalars(select(models.ReviewEvent.kind).where(models.ReviewEvent.subject_id == post_id)))
    assert kinds == ["edit_post", "move_post"]
    # the same form again: its stamp is stale now, so nothing is saved
    stale = client.post(f"/calendar/posts/{post_id}/edit", data={**form, "caption": "Older words."})
    assert stale.status_code == 409 and "changed after your page showed it" in html.unescape(stale.text)
    # a time outside the windows: the form comes back with what was typed and the reason
    fresh = re.search(r'name="stamp" value="([^"]+)"', client.get(f"/calendar/posts/{post_id}").text).group(1)
    refused = client.post(f"/calendar/posts/{post_id}/edit", data={**form, "stamp": fresh, "caption": "Kept?",
                                                                   "new_time": local(9, hour=18).strftime("%Y-%m-%dT%H:%M")})
    text = html.unescape(refused.text)
    assert refused.status_code == 400 and "is outside the posting windows 10:00-15:00" in text and ">Kept?</textarea>" in text
    bad = client.post(f"/calendar/posts/{post_id}/edit", data={**form, "stamp": fresh, "new_time": "tomorrow"})
    assert bad.status_code == 400 and "new_time 'tomorrow' is not a date and time" in html.unescape(bad.text)
    with session_scope(client.url) as session:
        assert session.get(models.Post, post_id).caption == "Fresh words."  # neither refusal saved anything


def test_the_move_api_moves_or_says_why_not_in_json(client):
    scheduled, awaiting, published, _ = client.ids
    headers = {"X-CSRF-Token": client.csrf}
    day = local(11).date().isoformat()
    moved = client.post(f"/api/calendar/posts/{awaiting}/move", json={"day": day}, headers=headers)
    assert moved.status_code == 200 and moved.json()["moved_to"] == f"{day}T12:00"
    refused = client.post(f"/api/calendar/posts/{awaiting}/move", json={"day": local(2).date().isoformat()}, headers=headers)
    assert refused.status_code == 400 and "within 120 minutes of another post of Test Persona (outbox)" in refused.json()["error"]
    frozen = client.post(f"/api/calendar/posts/{published}/move", json={"day": day}, headers=headers)
    assert frozen.status_code == 400 and frozen.json()["error"].endswith("only a post not yet publishing can be moved")
    assert client.post(f"/api/calendar/posts/{awaiting}/move", json={"day": "soon"}, headers=headers).json() == {
        "error": "day 'soon' is not a day like 2026-03-09"}
    assert client.post(f"/api/calendar/posts/{awaiting}/move", json={}, headers=headers).status_code == 400
    assert client.post(f"/api/calendar/posts/{awaiting}/move", json={"day": day}).status_code == 403
    assert client.post("/api/calendar/posts/999999/move", json={"day": day}, headers=headers).status_code == 404
    with session_scope(client.url) as session:
        assert session.get(models.Post, awaiting).scheduled_at == local(11)
