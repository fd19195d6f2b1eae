"""The review form as a person uses it: headless Chromium (Debian's `chromium`) driven by
playwright against the app under real uvicorn. Logs in, votes with the keyboard, kills and skips,
approves a step, picks a winner and approves a post, on a desktop and a phone-sized screen.
Screenshots go to the test's output folder (and to $PERSONA_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import http.client
import re
import shutil
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import func, select

from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.review.app import ReviewConfig, create_app
from persona_pipeline_tests.conftest import make_database
from persona_pipeline_tests.browser_fixtures import (PAGE_WAIT_MS, SECRET, TOKEN, Shots, chromium,  # noqa: F401
                                                     log_in)
from persona_pipeline_tests.helpers import wait_until
from persona_pipeline_tests.review_fixtures import ReviewSeed, seed_review, serve_app

pytestmark = pytest.mark.browser


@dataclass
class Served:
    base: str
    url: str
    home: Path
    outside: Path
    voting: ReviewSeed  # 2 steps: keyboard votes, skip, approve with K, a post
    final: ReviewSeed   # 1 step: pick the winner; a post left waiting
    killing: ReviewSeed  # 1 step: K kills the left image


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("review_browser")
    url, cleanup = make_database("sqlite", folder)
    home = folder / "home"
    home.mkdir()
    voting = seed_review(url, home, slug="ava", candidates=6, steps=2, posts=1,
                         caption="Golden hour on the <b>river</b> walk.")
    final = seed_review(url, home, slug="bea", candidates=3, steps=1, posts=1)  # its post stays for the phone
    killing = seed_review(url, home, slug="cyd", candidates=4, steps=1, posts=0)
    outside = folder / "outside.png"
    shutil.copy(voting_image(url, voting), outside)
    app = create_app(ReviewConfig(database_url=url, home=home, tokens={TOKEN: "alice"}, secret_key=SECRET))
    try:
        with serve_app(app, start_timeout_s=15) as (base, _):
            yield Served(base, url, home, outside, voting, final, killing)
    finally:
        cleanup()


def voting_image(url: str, seed: ReviewSeed) -> Path:
    with session_scope(url) as session:
        return Path(session.get(models.Candidate, seed.candidate_ids[0]).image_path)


def count(url: str, model, *where) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def queue_count(page, slug: str, name: str) -> int:
    return int(page.locator(f'section[data-slug="{slug}"] [data-count="{name}"]').inner_text())


def current_pair(page) -> dict:
    return page.evaluate("""() => ({
        offer: document.getElementById('vote').dataset.offerId,
        left: document.getElementById('id-left').textContent, right: document.getElementById('id-right').textContent,
        leftSrc: document.getElementById('img-left').getAttribute('src'),
        rightSrc: document.getElementById('img-right').getAttribute('src')})""")


def wait_next_ready(page) -> None:
    """A pair on screen that takes input (it has been shown for a moment) and the next one preloaded."""
    page.wait_for_function("() => { const v = document.getElementById('vote');"
                           " return v.dataset.nextReady === '1' && v.dataset.offerId && v.dataset.inputReady !== '0'; }",
                           timeout=PAGE_WAIT_MS)


def open_vote_page(chromium, served: Served, slug: str):
    """A fresh one-step run for `slug` and a logged-in page on its vote page, ready for input."""
    seed = seed_review(served.url, served.home, slug=slug, candidates=5, steps=1, posts=0)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    log_in(page, served.base)
    page.goto(f"{served.base}/steps/{seed.step_ids[0]}/vote")
    wait_next_ready(page)
    return seed, context, page


def vote_requests(page) -> tuple[list, list]:
    """(vote POSTs the page sent, those that got an answer), filled as the page works."""
    sent, answered = [], []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/api/votes") else None)
    page.on("requestfinished", lambda r: answered.append(r) if r.url.endswith("/api/votes") else None)
    page.on("requestfailed", lambda r: answered.append(r) if r.url.endswith("/api/votes") else None)
    return sent, answered


def settled_after(page, offer_id: str) -> None:
    """Wait until a pair other than `offer_id` (or the done state) is on screen and takes input."""
    page.wait_for_function("(old) => { const v = document.getElementById('vote'); return v.dataset.done === '1' ||"
                           " (v.dataset.offerId && v.dataset.offerId !== old && v.dataset.inputReady !== '0'); }",
                           arg=offer_id, timeout=PAGE_WAIT_MS)


def test_a_reviewer_works_through_the_form(served: Served, chromium, tmp_path: Path) -> None:
    shots = Shots(tmp_path / "screenshots")
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    base, url = served.base, served.url

    # Log in: the queue shows what needs a person, per persona.
    page.goto(base + "/")
    shots(page, "login")
    log_in(page, base)
    assert page.locator("h1").inner_text() == "Review queue"
    assert queue_count(page, "ava", "pairs_to_vote") == 15
    assert queue_count(page, "ava", "steps_to_approve") == 1
    assert queue_count(page, "bea", "runs_to_pick") == 1
    assert queue_count(page, "ava", "posts_to_approve") == 1
    shots(page, "queue")

    # Vote with the keyboard. The vote POSTs are held back on the way to the server: the page must
    # still show the next (preloaded) pair the moment a key is pressed.
    step_id = served.voting.step_ids[0]
    page.click(f'a[href="/steps/{step_id}/vote"]')
    page.wait_for_url(f"{base}/steps/{step_id}/vote")
    assert page.locator("h1").inner_text() == "Which is better?"
    held = []
    page.route("**/api/votes", lambda route: held.append(route))
    pressed = []
    for key in ("ArrowLeft", "ArrowRight", "ArrowLeft", "ArrowRight"):
        wait_next_ready(page)
        before = current_pair(page)
        page.keyboard.press(key)
        after = current_pair(page)  # read at once: no waiting on the server
        assert after["offer"] != before["offer"]
        assert (after["leftSrc"], after["rightSrc"]) != (before["leftSrc"], before["rightSrc"])
        assert after["leftSrc"].startswith("/media/") and after["rightSrc"].startswith("/media/")
        pressed.append((key, before))
    deadline = time.monotonic() + 5
    while len(held) < 4 and time.monotonic() < deadline:  # a vote is sent once its pair's "shown" is answered
        page.wait_for_timeout(20)
    assert count(url, models.Vote) == 0 and len(held) == 4  # every vote was still in flight
    for route in held:
        route.continue_()
    page.unroute("**/api/votes")
    wait_until(lambda: page.evaluate("document.getElementById('vote').dataset.votes") == "4", "4 votes to land", 5)
    with session_scope(url) as session:
        votes = {v.offer_id: v for v in session.scalars(select(models.Vote))}
        assert len(votes) == 4
        for key, shown in pressed:
            vote = votes[int(shown["offer"])]
            left, right = int(shown["left"]), int(shown["right"])
            assert (vote.winner_id, vote.loser_id) == ((left, right) if key == "ArrowLeft" else (right, left))
            assert vote.reviewer == "alice" and 0 < vote.selection_probability <= 1
    assert count(url, models.ReviewEvent, models.ReviewEvent.kind == "vote", models.ReviewEvent.reviewer == "alice") == 4
    assert page.locator("#status").inner_text().startswith("Voted #")
    assert page.locator("#remaining").inner_text() == "11 pairs not voted yet."  # 15 less the 4 votes
    shots(page, "vote")

    # S skips the pair on screen.
    wait_next_ready(page)
    skipped = current_pair(page)
    page.keyboard.press("s")
    assert current_pair(page)["offer"] != skipped["offer"]
    wait_until(lambda: count(url, models.PairOffer, models.PairOffer.id == int(skipped["offer"]),
                             models.PairOffer.outcome == "skipped"), "the skip", 5)
    assert count(url, models.ReviewEvent, models.ReviewEvent.kind == "skip") == 1

    # K kills the left image (on another run: a kill sends its step back to generating).
    kill_step = served.killing.step_ids[0]
    page.goto(f"{base}/steps/{kill_step}/vote")
    wait_next_ready(page)
    before_kill = current_pair(page)
    doomed = int(before_kill["left"])
    page.keyboard.press("K")
    wait_until(lambda: count(url, models.Candidate, models.Candidate.id == doomed, models.Candidate.status == "killed"),
               "the kill", 5)
    page.wait_for_function(f"() => document.getElementById('status').textContent.includes('Killed #{doomed}')")
    # When the preloaded pair held the doomed image too, the page waits (busy) for a fresh pair asked
    # for after the kill landed: wait until a pair other than the one killed from is on screen.
    page.wait_for_function("(old) => { const v = document.getElementById('vote');"
                           " return v.dataset.done === '1' || (!v.classList.contains('busy') && v.dataset.offerId !== old); }",
                           arg=before_kill["offer"], timeout=PAGE_WAIT_MS)
    assert doomed not in (int(current_pair(page)["left"] or 0), int(current_pair(page)["right"] or 0))
    assert count(url, models.ReviewEvent, models.ReviewEvent.kind == "kill", models.ReviewEvent.subject_id == doomed) == 1
    shots(page, "vote-after-kill")

    # The gallery: the ranking with its intervals, the low-vote warning, approve with K.
    page.goto(f"{base}/steps/{step_id}")
    assert page.locator("h1").inner_text() == "Step 1/2 · run %d" % served.voting.run_id
    assert page.locator("#ranking > li").count() == 6
    assert re.fullmatch(r"\[-?\d+, -?\d+\]", page.locator("#ranking > li .ci").first.inner_text())
    warning = page.locator("#low-vote-warning")
    assert warning.is_visible() and "fewer than 5 votes" in warning.inner_text()
    assert page.locator("#top_k").input_value() == "2"
    page.fill("#top_k", "6")  # every candidate in the top K: each has under 5 votes, so all are listed
    assert len(page.locator("#low-vote-list").inner_text().split(",")) == 6
    page.fill("#top_k", "2")
    shots(page, "gallery")
    page.click("button:has-text('Approve with K')")
    page.wait_for_url(f"{base}/steps/{step_id}")
    assert "approved with K=2" in page.locator(".flash").inner_text()
    assert page.locator("#step-status").inner_text() == "approved"
    with session_scope(url) as session:
        step = session.get(models.RunStep, step_id)
        assert (step.status, step.top_k) == ("approved", 2)
    shots(page, "gallery-approved")

    # Pick the winner on a final step.
    final_step = served.final.step_ids[0]
    page.goto(f"{base}/steps/{final_step}")
    assert "final step" in page.locator("#pick-info").inner_text()
    top = int(page.locator("#ranking > li").first.get_attribute("data-candidate-id"))
    page.locator("#ranking > li").first.locator("button:has-text('Pick the winner')").click()
    page.wait_for_url(f"{base}/steps/{final_step}")
    assert f"Candidate {top} is the winner" in page.locator(".flash").inner_text()
    assert "winner" in page.locator(f'#ranking > li[data-candidate-id="{top}"]').inner_text()
    with session_scope(url) as session:
        assert session.get(models.GenerationRun, served.final.run_id).winner_candidate_id == top
    shots(page, "winner")

    # Approve a post.
    page.goto(f"{base}/posts?persona=ava")
    post_id = served.voting.post_ids[0]
    card = page.locator(f"#post-{post_id}")
    assert page.locator("h1").inner_text() == "Posts to approve or retry @ava"
    assert card.locator(".caption").inner_text() == "Golden hour on the <b>river</b> walk."  # shown as text
    assert "Europe/Lisbon" in card.locator(".slot").inner_text() and "UTC" in card.locator(".slot").inner_text()
    shots(page, "posts")
    card.locator("button:has-text('Approve')").click()
    page.wait_for_url(f"{base}/posts?persona=ava")
    assert f"Post {post_id} approved" in page.locator(".flash").inner_text()
    assert page.locator("#no-posts").is_visible()
    with session_scope(url) as session:
        assert session.get(models.Post, post_id).status == "scheduled"
    shots(page, "posts-approved")

    page.goto(f"{base}/audit")
    kinds = page.locator("tr[data-kind]").evaluate_all("rows => rows.map(r => r.dataset.kind)")
    assert sorted(set(kinds)) == ["approve_post", "approve_step", "kill", "pick_winner", "skip", "vote"]
    shots(page, "audit")
    page.goto(f"{base}/")
    assert queue_count(page, "ava", "posts_to_approve") == 0 and queue_count(page, "bea", "runs_to_pick") == 0
    assert queue_count(page, "ava", "steps_to_approve") == 0
    context.close()

    # The same pages on a phone: one column, nothing wider than the screen, big tap targets.
    phone = chromium.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = phone.new_page()
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    log_in(page, base)
    for path, name in ((f"/steps/{served.killing.step_ids[0]}/vote", "phone-vote"), (f"/steps/{step_id}", "phone-gallery"),
                       ("/posts", "phone-posts"), ("/", "phone-queue")):
        page.goto(base + path)
        if name == "phone-vote":
            wait_next_ready(page)
            height = page.locator("button[data-action='skip']").bounding_box()["height"]
            assert height >= 44
        if name == "phone-posts":
            post = page.locator(f"#post-{served.final.post_ids[0]}")
            post.locator("summary:has-text('Edit caption')").click()
            assert post.locator("textarea").is_visible()
            assert post.locator("img").bounding_box()["width"] <= 390
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, name
        shots(page, name)
    phone.close()
    assert problems == []
    assert len(shots.taken) == 14 and all(p.stat().st_size > 1000 for p in shots.taken)


def _raw_get(base: str, path: str, cookie: str = "") -> int:
    """GET `path` exactly as written (http.client does not normalise `..` away like httpx)."""
    host = urllib.parse.urlsplit(base).netloc
    conn = http.client.HTTPConnection(host, timeout=5)
    conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    status = conn.getresponse().status
    conn.close()
    return status


def test_raw_dot_dot_paths_are_404_under_uvicorn(served: Served) -> None:
    host = urllib.parse.urlsplit(served.base).netloc
    conn = http.client.HTTPConnection(host, timeout=5)
    conn.request("GET", "/login")
    response = conn.getresponse()
    cookie = response.getheader("set-cookie").split(";", 1)[0]
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', response.read().decode()).group(1)
    conn.request("POST", "/login", body=urllib.parse.urlencode({"csrf_token": csrf, "token": TOKEN}),
                 headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    response.read()
    assert response.status == 303
    cookie = response.getheader("set-cookie").split(";", 1)[0]
    conn.close()

    image = voting_image(served.url, served.voting).relative_to(served.home).as_posix()
    assert _raw_get(served.base, f"/media/{image}", cookie) == 200
    depth = "../" * len(Path(image).parts)
    for path in (f"/media/{depth}outside.png", "/media/personas/../../outside.png", "/media/../outside.png",
                 f"/media/{image.replace('personas/', 'personas/./')}", "/media/%2e%2e/outside.png",
                 f"/media/{served.outside}", f"/media/%2F{str(served.outside).lstrip('/')}"):
        assert _raw_get(served.base, path, cookie) == 404, path
    assert _raw_get(served.base, f"/media/{image}") == 401  # and never without a session


LEFT_WINS = ".actions button[data-action='left']"


def test_a_double_click_casts_one_vote_on_the_pair_on_screen(served: Served, chromium) -> None:
    """Double-clicking "Left wins" used to store two votes 22 ms apart, the second on the preloaded
    pair, on screen for about 20 ms. The page now ignores input until a new pair has been on screen
    for a moment: one vote, on the pair that was shown; a click after that moment counts again."""
    seed, context, page = open_vote_page(chromium, served, "dee")
    sent, answered = vote_requests(page)
    shown = current_pair(page)
    page.dblclick(LEFT_WINS)
    settled_after(page, shown["offer"])
    page.wait_for_function("() => document.getElementById('vote').dataset.votes !== '0'", timeout=PAGE_WAIT_MS)
    while len(answered) < len(sent):  # every vote POST the page made has its answer
        page.wait_for_timeout(20)
    assert len(sent) == 1, [r.post_data for r in sent]
    with session_scope(served.url) as session:
        votes = session.scalars(select(models.Vote).where(models.Vote.step_id == seed.step_ids[0])).all()
        assert [(v.offer_id, v.winner_id, v.loser_id) for v in votes] == [
            (int(shown["offer"]), int(shown["left"]), int(shown["right"]))]
    after = current_pair(page)
    page.click(LEFT_WINS)  # the next pair has been on screen for a moment: this click is a vote
    wait_until(lambda: count(served.url, models.Vote, models.Vote.offer_id == int(after["offer"]),
                             models.Vote.winner_id == int(after["left"])), "the vote on the second pair", 5)
    context.close()


def test_an_expired_session_names_the_pair_whose_vote_was_lost(served: Served, chromium) -> None:
    """A vote the server refuses is not passed over: the page names the pair it was cast on (and,
    with the session gone, takes no more votes, which could only be lost too)."""
    seed, context, page = open_vote_page(chromium, served, "eve")
    sent, answered = vote_requests(page)
    shown = current_pair(page)
    context.clear_cookies()  # the session ends while the pair is on screen
    page.click(LEFT_WINS)
    page.wait_for_function("() => document.getElementById('status').classList.contains('is-error')", timeout=PAGE_WAIT_MS)
    status = page.locator("#status").inner_text()
    assert f"#{shown['left']} / #{shown['right']}" in status and "not recorded" in status and "log in again" in status, status
    assert f"#{shown['left']} / #{shown['right']}" in page.locator("#lost").inner_text()
    settled_after(page, shown["offer"])  # the next pair takes input again: a click now would count if it could
    assert page.locator(LEFT_WINS).is_disabled()
    page.click(LEFT_WINS, force=True)
    page.keyboard.press("ArrowRight")
    assert len(sent) == 1 and count(served.url, models.Vote, models.Vote.step_id == seed.step_ids[0]) == 0
    context.close()
