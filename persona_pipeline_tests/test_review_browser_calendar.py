"""The post calendar as a person meets it: Debian's Chromium driven by playwright against the form
under real uvicorn, at desktop (1400x900, mouse) and phone (390x844, touch) sizes. A drag moves a
post to another day, a drag onto a day that breaks the minimum gap is refused with the reason and
the post stays, and the post page's preview and edit form change caption, hashtags and time. Each
test saves screenshots and checks what the page shows and what the database holds."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from persona_fakes.review import CalendarPost, seed_calendar
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline_tests.browser_fixtures import (PAGE_WAIT_MS, Served, Shots, chromium, fits, log_in,  # noqa: F401
                                                     open_page, serve_form, size)

pytestmark = pytest.mark.browser

LISBON = ZoneInfo("Europe/Lisbon")
RULES = {"timezone": "Europe/Lisbon", "posting_windows": ["10:00-15:00"], "min_minutes_between_posts": 120,
         "strategy": {"weekly_cap": 3}, "name": "Mira Test"}
USER_ID = "178414000000"  # + the persona's slug: each test's persona posts to its own account


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serve_form(tmp_path_factory.mktemp("review_calendar_browser")) as form:
        yield form


def month_ahead() -> date:
    """The 1st of a month that starts at least 30 days from now: every day of it is in the future."""
    return ((datetime.now(LISBON) + timedelta(days=31)).date().replace(day=1))


def at(month: date, day: int, hour: int) -> datetime:
    return datetime(month.year, month.month, day, hour, tzinfo=LISBON)


def seed(served: Served, slug: str) -> tuple[date, list[int]]:
    """In a future month: A on the 10th 12:00, B on the 12th 12:00 (awaiting approval), C on the
    14th 14:00, and a published post (with a permalink) of this month's past, all of one account."""
    month = month_ahead()
    ids = seed_calendar(served.url, served.home, [
        CalendarPost("scheduled", at(month, 10, 12)),
        CalendarPost("awaiting_approval", at(month, 12, 12), caption="Rooftop garden at noon. " * 7),
        CalendarPost("scheduled", at(month, 14, 14)),
        CalendarPost("published", at(month, 3, 11), permalink="https://www.instagram.com/p/CalTest1/")],
        slug=slug, **RULES, instagram={"user_id": USER_ID + slug, "token_env": "MIRA_TOKEN", "username": "mira.test"})
    return month, ids


def slot_of(url: str, post_id: int) -> datetime:
    with session_scope(url) as session:
        return session.get(models.Post, post_id).scheduled_at


def moves(url: str, post_id: int) -> list[dict]:
    with session_scope(url) as session:
        return [e.payload for e in session.scalars(select(models.ReviewEvent).where(
            models.ReviewEvent.kind == "move_post", models.ReviewEvent.subject_id == post_id).order_by(models.ReviewEvent.id))]


def day_of(page, post_id: int) -> str:
    return page.locator(f"#cal-post-{post_id}").evaluate("card => card.closest('.cal-day').dataset.day")


# Post thumbnails drawn: an <img class="cal-thumb"> loaded with a width, or a sprite tile (a card's
# .cal-tile showing the loaded sprite #cal-sprite as its background, with a size on the page).
THUMBS_SETTLED = "() => [...document.querySelectorAll('img.cal-thumb, img.cal-sprite')].every(i => i.complete)"
THUMBS_DRAWN = """() => {
  const sprite = document.getElementById('cal-sprite');
  const ready = sprite && sprite.complete && sprite.naturalWidth > 0;
  const tiles = ready ? [...document.querySelectorAll('.cal-tile')].filter((t) => t.offsetWidth > 0
    && getComputedStyle(t).backgroundImage.includes(sprite.src) && t.style.backgroundPosition !== '') : [];
  return tiles.length + [...document.querySelectorAll('img.cal-thumb')].filter((i) => i.naturalWidth > 0).length;
}"""


def thumbnails_shown(page) -> int:
    """How many post thumbnails are drawn (THUMBS_DRAWN), after all images have settled."""
    page.wait_for_function(THUMBS_SETTLED)
    return page.evaluate(THUMBS_DRAWN)


def drag(page, size: str, post_id: int, day: date) -> None:
    """Drag a post onto a day's cell: with the mouse on the desktop, by its ⠿ handle with a finger on
    the phone (CDP touch events, which Chromium turns into touch pointer events)."""
    target = page.locator(f'.cal-day[data-day="{day.isoformat()}"]')
    target.scroll_into_view_if_needed()
    source = page.locator(f"#cal-post-{post_id}" + (" .cal-handle" if size == "phone" else " .cal-time"))
    start, end = source.bounding_box(), target.bounding_box()
    x0, y0 = start["x"] + start["width"] / 2, start["y"] + start["height"] / 2
    x1, y1 = end["x"] + end["width"] / 2, end["y"] + min(end["height"] - 4, 14)
    if size == "phone":
        cdp = page.context.new_cdp_session(page)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x0, "y": y0}]})
        for i in range(1, 13):
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove",
                                                  "touchPoints": [{"x": x0 + (x1 - x0) * i / 12, "y": y0 + (y1 - y0) * i / 12}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        cdp.detach()
    else:
        page.mouse.move(x0, y0)
        page.mouse.down()
        for i in range(1, 13):
            page.mouse.move(x0 + (x1 - x0) * i / 12, y0 + (y1 - y0) * i / 12)
        page.mouse.up()


def test_drag_moves_a_post_and_a_drag_that_breaks_the_gap_is_refused(served: Served, chromium, size: str, tmp_path: Path) -> None:
    shots = Shots(tmp_path / f"calendar-{size}")
    slug = f"cal{size[0]}"
    month, (a, b, c, published) = seed(served, slug)
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    log_in(page, served.base)
    page.goto(f"{served.base}/calendar?view=month&date={month:%Y-%m}&persona={slug}")
    assert page.locator("#cal-title").inner_text() == f"{month:%B %Y} @{slug}"
    assert thumbnails_shown(page) == 4
    assert [day_of(page, p) for p in (a, b, c, published)] == [f"{month:%Y-%m}-{d:02d}" for d in (10, 12, 14, 3)]
    card = page.locator(f"#cal-post-{b}").inner_text()
    assert "12:00" in card and "@mira.test" in card and "awaiting approval" in card and USER_ID not in page.content()
    assert page.locator(f"#cal-post-{published}[data-movable]").count() == 0  # a published post does not drag
    if size == "phone":  # a list of the days that have posts, one column
        assert page.locator(".cal-day:visible").count() == 4 and page.locator(".cal-weekdays").is_hidden()
    fits(page, size)
    shots(page, "month")

    # B (12th) onto the 14th: the same 12:00 there, exactly the 120 minute gap before C's 14:00.
    drag(page, size, b, month.replace(day=14))
    page.wait_for_selector(f'.cal-day[data-day="{month:%Y-%m}-14"] #cal-post-{b}')
    assert page.locator(".flash").inner_text() == f"Post {b} moved to {month:%Y-%m}-14 12:00 (Europe/Lisbon)."
    assert slot_of(served.url, b) == at(month, 14, 12)
    assert [m["to"] for m in moves(served.url, b)] == [at(month, 14, 12).astimezone(timezone.utc).isoformat()]
    shots(page, "moved")

    # B onto the 10th, where A posts at 12:00: refused, with the reason; B stays on the 14th.
    drag(page, size, b, month.replace(day=10))
    error = page.locator("#cal-error")
    error.wait_for(state="visible")
    assert error.inner_text() == (f"Post {b} was not moved: slot {month:%Y-%m}-10 12:00 (Europe/Lisbon) is within 120 "
                                  f"minutes of another post of @mira.test at {month:%Y-%m}-10 12:00")
    assert page.locator(".flash").count() == 0  # the earlier move's note is gone: only the refusal is on screen
    assert day_of(page, b) == f"{month:%Y-%m}-14" and slot_of(served.url, b) == at(month, 14, 12)
    assert len(moves(served.url, b)) == 1
    fits(page, size)
    shots(page, "refused")
    context.close()
    assert problems == []
    assert len(shots.taken) == 3 and all(p.stat().st_size > 5000 for p in shots.taken)


def test_edit_caption_hashtags_and_time_from_the_preview_page(served: Served, chromium, size: str, tmp_path: Path) -> None:
    shots = Shots(tmp_path / f"calendar-edit-{size}")
    slug = f"ced{size[0]}"
    month, (a, b, c, published) = seed(served, slug)
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    log_in(page, served.base)
    page.goto(f"{served.base}/calendar?view=month&date={month:%Y-%m}&persona={slug}")
    page.locator(f"#cal-post-{b} .cal-time").click()  # a click, not a drag, opens the post
    page.wait_for_url(f"{served.base}/calendar/posts/{b}?view=month&persona={slug}")

    # The preview: the account's name, the exported image in its frame, the caption cut at "more".
    assert page.locator("#preview-account").inner_text() == "@mira.test"
    frame = page.locator("#preview-image").evaluate("i => ({w: i.naturalWidth, h: i.naturalHeight, box: i.parentElement.getBoundingClientRect().width / i.parentElement.getBoundingClientRect().height})")
    assert (frame["w"], frame["h"]) == (64, 80) and abs(frame["box"] - 0.8) < 0.01
    shown = page.locator("#preview-shown").inner_text()
    assert len(shown) <= 125 and shown.startswith("Rooftop garden at noon.") and page.locator("#preview-rest").is_hidden()
    shots(page, "preview")
    page.click("#preview-more")
    assert page.locator("#preview-rest").is_visible() and page.locator("#preview-rest").inner_text().endswith("#one")

    # Edit: caption, hashtags and the time (the touch-friendly way to move a post).
    page.fill("#edit-caption", "Sunset from the pier.")
    page.fill("#edit-hashtags", "sun #pier")
    page.fill("#edit-time", f"{month:%Y-%m}-20T13:30")
    page.click("#edit-form button[type=submit]")
    page.wait_for_selector(".flash")
    assert page.locator(".flash").inner_text() == f"Post {b}: caption and hashtags and time saved."
    assert page.locator("#preview-shown").inner_text() == "Sunset from the pier. #sun #pier"
    assert page.locator("#post-when").inner_text().startswith(f"{month:%Y-%m}-20 13:30")
    with session_scope(served.url) as session:
        post = session.get(models.Post, b)
        assert (post.caption, post.hashtags, post.scheduled_at) == ("Sunset from the pier.", ["#sun", "#pier"], at(month, 20, 13).replace(minute=30))
        kinds = sorted(session.scalars(select(models.ReviewEvent.kind).where(models.ReviewEvent.subject_id == b)))
    assert kinds == ["edit_post", "move_post"]
    fits(page, size)
    shots(page, "edited")

    # A time outside the posting windows: refused with the reason, what was typed stays, nothing saved.
    page.fill("#edit-caption", "Not saved.")
    page.fill("#edit-time", f"{month:%Y-%m}-21T18:00")
    page.click("#edit-form button[type=submit]")
    page.wait_for_selector("#form-error")
    assert page.locator("#form-error").inner_text() == (f"slot {month:%Y-%m}-21 18:00 (Europe/Lisbon) is outside the posting "
                                                        f"windows 10:00-15:00")
    assert page.locator("#edit-caption").input_value() == "Not saved."
    assert slot_of(served.url, b) == at(month, 20, 13).replace(minute=30)
    shots(page, "edit-refused")

    # A published post: its permalink, and no form.
    page.goto(f"{served.base}/calendar/posts/{published}?view=month&persona={slug}")
    assert page.locator("#permalink").get_attribute("href") == "https://www.instagram.com/p/CalTest1/"
    assert page.locator("#edit-form").count() == 0 and "can no longer be changed" in page.locator("#not-editable").inner_text()
    page.click("#back-to-calendar")
    page.wait_for_selector(f'.cal-day[data-day="{month:%Y-%m}-20"] #cal-post-{b}')
    context.close()
    assert problems == []
    assert len(shots.taken) == 3 and all(p.stat().st_size > 5000 for p in shots.taken)
