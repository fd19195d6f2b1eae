"""The gallery and the error pages as a person meets them: Debian's Chromium driven by playwright
against the form under real uvicorn, at desktop (1400x900) and phone (390x844, touch) sizes. Each
test saves screenshots (under the test's output, and $PERSONA_TEST_ARTIFACTS when set) and checks
what the page shows and what the database holds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import func, select

from persona_pipeline.db import models, review
from persona_pipeline.db.session import session_scope
from persona_pipeline.review import queue
from persona_pipeline_tests.browser_fixtures import (SIZES, TOKEN, Served, Shots, chromium, fits, log_in,  # noqa: F401
                                                     open_page, serve_form, size)
from persona_pipeline_tests.review_fixtures import seed_review

pytestmark = pytest.mark.browser

LIMIT = 4096  # a small body limit, so an oversized caption is easy to type


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serve_form(tmp_path_factory.mktemp("review_gallery_browser"), max_body_bytes=LIMIT) as form:
        yield form


def events(url: str, kind: str, subject_id: int) -> list[models.ReviewEvent]:
    with session_scope(url) as session:
        return list(session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == kind,
                                                                     models.ReviewEvent.subject_id == subject_id)))


def status_of(url: str, candidate_id: int) -> str:
    with session_scope(url) as session:
        return session.get(models.Candidate, candidate_id).status


def error_shown(page, status: int, heading: str) -> dict:
    """The styled error page is on screen: its card, heading, message and way back."""
    page.wait_for_selector("#error-page")
    assert page.locator("#error-page").get_attribute("data-status") == str(status)
    assert page.locator("h1").inner_text() == heading
    card = page.evaluate("""() => { const s = getComputedStyle(document.getElementById('error-page'));
        return {bg: s.backgroundColor, radius: s.borderRadius}; }""")
    assert card == {"bg": "rgb(255, 255, 255)", "radius": "10px"}  # review.css is applied: a card, not bare text
    assert "Traceback" not in page.content()
    return {"message": page.locator("#error-message").inner_text(),
            "back": page.locator("#error-back").get_attribute("href"), "label": page.locator("#error-back").inner_text()}


def test_error_pages_say_what_happened_and_lead_back(served: Served, chromium, size: str, tmp_path: Path, monkeypatch) -> None:
    shots = Shots(tmp_path / f"errors-{size}")
    seed = seed_review(served.url, served.home, slug=f"err{size[0]}", candidates=3, steps=1, posts=1)
    step_id, post_id = seed.step_ids[0], seed.post_ids[0]
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    base = served.base
    log_in(page, base)

    # 404: a link to a step that does not exist, followed from the gallery; the way back is the gallery.
    page.goto(f"{base}/steps/{step_id}")
    page.evaluate("(href) => { const a = document.createElement('a'); a.href = href; a.id = 'dead';"
                  " a.textContent = 'dead link'; document.querySelector('main').prepend(a); }", "/steps/999999")
    page.click("#dead")
    shown = error_shown(page, 404, "That was not found")
    assert shown == {"message": "run step 999999 does not exist", "back": f"/steps/{step_id}", "label": "Back to the gallery"}
    fits(page, size)
    shots(page, "404")
    page.click("#error-back")
    page.wait_for_url(f"{base}/steps/{step_id}")

    # 400: compare with one image ticked (the button waits for two; the URL is typed by hand).
    page.goto(f"{base}/steps/{step_id}/compare?c={seed.candidate_ids[0]}", referer=f"{base}/steps/{step_id}")
    shown = error_shown(page, 400, "That was refused")
    assert shown["message"] == "choose exactly two images to compare (got 1)" and shown["back"] == f"/steps/{step_id}"
    shots(page, "400")

    # 413: a caption over the body limit, typed on the posts page.
    page.goto(f"{base}/posts?persona={seed.slug}")
    card = page.locator(f"#post-{post_id}")
    card.locator("summary:has-text('Edit caption')").click()
    card.locator("textarea").fill("A very long caption. " * 250)
    card.locator("button:has-text('Save')").click()
    shown = error_shown(page, 413, "That was too large to send")
    assert shown["message"] == f"The request body is over the limit of {LIMIT} bytes."
    assert "Shorten what you typed" in page.locator("#error-hint").inner_text()
    assert (shown["back"], shown["label"]) == (f"/posts?persona={seed.slug}", "Back to the posts")
    fits(page, size)
    shots(page, "413")
    page.click("#error-back")
    page.wait_for_url(f"{base}/posts?persona={seed.slug}")
    with session_scope(served.url) as session:
        assert session.get(models.Post, post_id).caption == "A day in the city."

    # 403: a form whose CSRF token is stale (as after logging in again in another tab).
    page.goto(f"{base}/steps/{step_id}")
    page.evaluate("() => document.querySelectorAll('input[name=csrf_token]').forEach(i => { i.value = 'stale'; })")
    first = page.locator("#ranking > li").first
    doomed = int(first.get_attribute("data-candidate-id"))
    first.locator("summary:has-text('Kill')").click()
    first.locator(f"button:has-text('Yes, kill #{doomed}')").click()
    shown = error_shown(page, 403, "That is not allowed")
    assert "CSRF token" in shown["message"] and shown["back"] == f"/steps/{step_id}"
    assert status_of(served.url, doomed) == "active"
    shots(page, "403")

    # 500: the queue breaks; the page says so with a reference, never the exception's text.
    def broken(*args):
        raise RuntimeError("password=hunter2 in postgresql://app:hunter2@db/app")

    monkeypatch.setattr(queue, "_queue", broken)
    page.goto(f"{base}/steps/{step_id}")
    page.click("a.brand")
    shown = error_shown(page, 500, "Something went wrong on our side")
    assert shown["message"] == "The server failed while answering GET /." and shown["back"] == f"/steps/{step_id}"
    assert re.fullmatch(r"Reference [0-9a-f]{8} \(give it to whoever runs the form\)\.", page.locator("#error-reference").inner_text())
    assert "hunter2" not in page.content()
    shots(page, "500")
    monkeypatch.undo()

    # 401: the session ends while a post is on screen; approving it says so, and logging in comes back.
    page.goto(f"{base}/posts?persona={seed.slug}")
    context.clear_cookies()
    page.locator(f"#post-{post_id}").locator("button:has-text('Approve')").click()
    shown = error_shown(page, 401, "You are not logged in")
    assert "not saved" in shown["message"]
    assert page.locator("#error-login").get_attribute("href") == f"/login?next=/posts%3Fpersona%3D{seed.slug}"
    fits(page, size)
    shots(page, "401")
    page.click("#error-login")
    page.wait_for_url(re.compile(r".*/login\?next=.*"))
    page.fill("#token", TOKEN)
    page.click("button:has-text('Log in')")
    page.wait_for_url(f"{base}/posts?persona={seed.slug}")
    with session_scope(served.url) as session:
        assert session.get(models.Post, post_id).status == "awaiting_approval"  # the refused post changed nothing

    # The JSON API still answers JSON, also from the browser.
    api = page.evaluate("async () => { const r = await fetch('/api/steps/999999/pair');"
                        " return {status: r.status, type: r.headers.get('content-type'), body: await r.json()}; }")
    assert api == {"status": 404, "type": "application/json", "body": {"error": "run step 999999 does not exist"}}
    context.close()
    assert problems == []
    assert len(shots.taken) == 6 and all(p.stat().st_size > 5000 for p in shots.taken)


def test_gallery_compares_two_and_kills_and_restores_with_confirmation(served: Served, chromium, size: str,
                                                                       tmp_path: Path) -> None:
    shots = Shots(tmp_path / f"gallery-{size}")
    seed = seed_review(served.url, served.home, slug=f"gal{size[0]}", candidates=6, steps=1, posts=0)
    ids, step_id = seed.candidate_ids, seed.step_ids[0]
    with session_scope(served.url) as session:
        for i, cid in enumerate(ids):
            cand = session.get(models.Candidate, cid)
            cand.identity_score, cand.clip_score = 0.802 - i / 50, 0.281 + i / 100
        for winner, loser in ((ids[0], ids[1]), (ids[0], ids[1]), (ids[1], ids[0]), (ids[3], ids[4])):
            review.cast_vote(session, winner, loser, "alice")
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    base = served.base
    log_in(page, base)
    page.goto(f"{base}/steps/{step_id}")
    page.wait_for_function("() => [...document.querySelectorAll('#ranking img')].every(i => i.complete && i.naturalWidth)")

    # Whole images at a useful size: never cropped; 200 px+ on a desktop, two columns on a phone.
    cards = page.locator("#ranking > li")
    assert cards.count() == 6
    boxes = [cards.nth(i).locator("img").bounding_box() for i in range(6)]
    fit = page.evaluate("getComputedStyle(document.querySelector('#ranking img')).objectFit")
    assert fit == "contain"
    if size == "desktop":
        assert min(b["width"] for b in boxes) >= 200
        assert boxes[0]["y"] == boxes[1]["y"] == boxes[2]["y"]  # several to a row
    else:
        assert boxes[0]["y"] == boxes[1]["y"] and boxes[2]["y"] > boxes[0]["y"]  # two columns
        assert boxes[0]["x"] < boxes[1]["x"] and min(b["width"] for b in boxes) >= 150
    fits(page, size)
    first = page.locator(f'#ranking > li[data-candidate-id="{ids[0]}"]')
    assert first.locator('[data-score="identity"]').inner_text() == "0.80"
    assert first.locator('[data-score="alignment"]').inner_text() == "0.28"
    assert first.locator('[data-score="votes"]').inner_text() == "2–1 · 3 votes"
    assert re.fullmatch(r"\d+ \[\d+, \d+\]", first.locator(".scores dd").first.inner_text())
    shots(page, "gallery")

    # Compare: tick two (a third unticks the oldest), then see them side by side. The bar stays at
    # the foot of the screen while the images scroll past.
    bar = page.locator("#compare-form").bounding_box()
    assert bar["y"] + bar["height"] <= SIZES[size]["viewport"]["height"] + 1
    go = page.locator("#compare-go")
    assert go.is_disabled()
    for cid in (ids[2], ids[0], ids[1]):
        page.locator(f'input[name=c][value="{cid}"]').check()
    assert not page.locator(f'input[name=c][value="{ids[2]}"]').is_checked()
    assert page.locator("#compare-note").inner_text() == f"Compare #{ids[0]} and #{ids[1]}."
    assert go.is_enabled()
    go.click()
    page.wait_for_url(f"{base}/steps/{step_id}/compare?c={ids[0]}&c={ids[1]}")
    page.wait_for_function("() => [...document.querySelectorAll('#compare img')].every(i => i.complete && i.naturalWidth)")
    left, right = (page.locator(f'#compare figure[data-candidate-id="{cid}"] img').bounding_box() for cid in ids[:2])
    assert left["y"] == right["y"] and left["x"] + left["width"] <= right["x"]  # side by side
    assert min(left["width"], right["width"]) >= (400 if size == "desktop" else 150)
    head = page.locator("#head-to-head").inner_text()
    assert f"#{ids[0]} won 2, #{ids[1]} won 1." in head and re.search(r"a \d+% chance of being preferred", head)
    assert page.locator(f'#compare figure[data-candidate-id="{ids[1]}"] [data-score="identity"]').inner_text() == "0.78"
    fits(page, size)
    shots(page, "compare")
    page.click("#back-to-gallery")
    page.wait_for_url(f"{base}/steps/{step_id}")

    # Kill asks first: Cancel leaves the image alone.
    doomed = ids[3]
    card = page.locator(f'#ranking > li[data-candidate-id="{doomed}"]')
    card.locator("summary:has-text('Kill')").click()
    confirm = card.locator(".confirm-box")
    assert confirm.is_visible() and f"Kill #{doomed}?" in confirm.inner_text()
    fits(page, size)
    shots(page, "kill-confirm")
    confirm.locator("button:has-text('Cancel')").click()
    assert not confirm.is_visible()
    assert status_of(served.url, doomed) == "active" and events(served.url, "kill", doomed) == []

    # Confirmed, with a reason: out of the ranking, into "Killed", a kill event.
    card.locator("summary:has-text('Kill')").click()
    confirm.locator("input[name=reason]").fill("extra finger")
    confirm.locator(f"button:has-text('Yes, kill #{doomed}')").click()
    page.wait_for_selector(f'#killed > li[data-candidate-id="{doomed}"]')
    assert f"Candidate {doomed} killed." in page.locator(".flash").inner_text()
    assert page.locator("#ranking > li").count() == 5
    killed = page.locator(f'#killed > li[data-candidate-id="{doomed}"]')
    assert "killed by alice: extra finger" in killed.inner_text()
    assert killed.locator('[data-score="votes"]').inner_text() == "1–0 · 1 vote"
    assert status_of(served.url, doomed) == "killed"
    (kill,) = events(served.url, "kill", doomed)
    assert (kill.reviewer, kill.payload["reason"]) == ("alice", "extra finger")
    fits(page, size)
    shots(page, "killed")

    # Restore asks first too, then puts it back into the ranking with its votes.
    killed.locator("summary:has-text('Restore')").click()
    assert f"Restore #{doomed}?" in killed.locator(".confirm-box").inner_text()
    shots(page, "restore-confirm")
    killed.locator(f"button:has-text('Yes, restore #{doomed}')").click()
    page.wait_for_selector(f'#ranking > li[data-candidate-id="{doomed}"]')
    assert f"Candidate {doomed} restored" in page.locator(".flash").inner_text()
    assert page.locator("#ranking > li").count() == 6 and page.locator("#killed").count() == 0
    back = page.locator(f'#ranking > li[data-candidate-id="{doomed}"]')
    assert back.locator('[data-score="votes"]').inner_text() == "1–0 · 1 vote"
    assert status_of(served.url, doomed) == "active"
    (restore,) = events(served.url, "restore", doomed)
    assert (restore.reviewer, restore.payload["kill_event_id"]) == ("alice", kill.id)
    with session_scope(served.url) as session:
        live = session.scalar(select(func.count()).select_from(models.Candidate).where(
            models.Candidate.step_id == step_id, models.Candidate.status.in_(review.LIVE)))
        assert live == 6 and [r.candidate_id for r in review.step_ranking(session, step_id)].count(doomed) == 1
    fits(page, size)
    shots(page, "restored")
    context.close()
    assert problems == []
    assert len(shots.taken) == 6 and all(p.stat().st_size > 5000 for p in shots.taken)
