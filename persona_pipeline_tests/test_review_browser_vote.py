"""The vote page as a person meets it: Debian's Chromium driven by playwright against the form under
real uvicorn, at desktop (1400x900) and phone (390x844, touch) sizes. Votes by click, key and (on
the touch screen) swipe; undoes a vote and a kill; checks the images fill the screen, the prompt and
what to judge by are shown, keyboard hints only where there is a keyboard, and the count of pairs
not voted yet agrees with the database and the gallery after every answer. Each test saves
screenshots (under the test's output, and $PERSONA_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from persona_pipeline.db import models, review_views
from persona_pipeline.db.session import session_scope
from persona_pipeline_tests.browser_fixtures import (PAGE_WAIT_MS, SIZES, Served, Shots, chromium, fits, log_in,  # noqa: F401
                                                     open_page, serve_form, size)
from persona_pipeline_tests.review_fixtures import seed_review
from persona_pipeline_tests.test_review_browser import current_pair, wait_next_ready

pytestmark = pytest.mark.browser

GUIDELINES = "Beaches, rooftops and new places, always with a sense of arrival."


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serve_form(tmp_path_factory.mktemp("review_vote_browser")) as form:
        yield form


class ScreenShots(Shots):
    """What is on the screen, named by size: a full-page capture in Chromium drops the phone's touch
    emulation while it captures (media queries then see a mouse), so it would show the keyboard hints
    the phone never shows."""

    def __init__(self, folder: Path, size: str) -> None:
        super().__init__(folder)
        self.size = size

    def __call__(self, page, name: str) -> None:
        path = self.folder / f"{len(self.taken) + 1:02d}-vote-{self.size}-{name}.png"
        page.screenshot(path=str(path))
        self.taken.append(path)
        if self.stable:
            self.stable.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.stable / path.name)


def seed_step(served: Served, slug: str) -> tuple[int, list[int], str, str]:
    """A one-step run of 5 candidates on a pillar with a brief: (step id, candidate ids, prompt, persona name)."""
    seed = seed_review(served.url, served.home, slug=slug, candidates=5, steps=1, posts=0)
    with session_scope(served.url) as session:
        run = session.get(models.GenerationRun, seed.run_id)
        persona = session.get(models.Persona, run.persona_id)
        pillar = models.ContentPillar(persona_id=persona.id, name="travel", weight=50, prompt="p", guidelines=GUIDELINES)
        session.add(pillar)
        session.flush()
        run.pillar_id = pillar.id
        return seed.step_ids[0], list(seed.candidate_ids), run.prompt, persona.name


def unvoted(url: str, step_id: int) -> int:
    with session_scope(url) as session:
        return review_views.unvoted_pairs(session, step_id)


def votes_of(url: str, step_id: int) -> dict[int, tuple[int, int]]:
    """offer id → (winner, loser) of the step's votes."""
    with session_scope(url) as session:
        return {v.offer_id: (v.winner_id, v.loser_id)
                for v in session.scalars(select(models.Vote).where(models.Vote.step_id == step_id))}


def events(url: str, kind: str) -> list[models.ReviewEvent]:
    with session_scope(url) as session:
        return list(session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == kind)
                                    .order_by(models.ReviewEvent.id)))


def settled(page) -> None:
    """Every answer has its reply and the count shown is the server's latest."""
    page.wait_for_function("() => { const v = document.getElementById('vote');"
                           " return v.dataset.countsSettled === '1' && !v.dataset.undoing; }", timeout=PAGE_WAIT_MS)


def shown_count(page) -> int:
    text = page.locator("#remaining").inner_text()
    assert text.endswith(" not voted yet."), text
    return int(text.split()[0])


def counts_agree(page, served: Served, step_id: int) -> int:
    settled(page)
    count = unvoted(served.url, step_id)
    assert shown_count(page) == count
    return count


def swipe(page, selector: str, dx: float) -> None:
    """A real touch swipe (CDP touch events: Chromium turns them into touch pointer events)."""
    box = page.locator(selector).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for i in range(1, 9):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x + dx * i / 8, "y": y + 3}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


def vote_landed(page, served: Served, step_id: int, shown: dict, winner_side: str) -> None:
    """The vote on the pair `shown` is in the database, for `winner_side`, and the counts agree."""
    left, right = int(shown["left"]), int(shown["right"])
    page.wait_for_function("(o) => document.getElementById('vote').dataset.offerId !== o", arg=shown["offer"],
                           timeout=PAGE_WAIT_MS)
    settled(page)
    assert votes_of(served.url, step_id)[int(shown["offer"])] == ((left, right) if winner_side == "left" else (right, left))
    counts_agree(page, served, step_id)


def test_voting_by_click_key_and_swipe_and_undoing_a_vote_and_a_kill(served: Served, chromium, size: str,
                                                                     tmp_path: Path) -> None:
    shots = ScreenShots(tmp_path / f"vote-{size}", size)
    step_id, candidates, prompt, name = seed_step(served, f"vote{size[0]}")
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    log_in(page, served.base)
    page.goto(f"{served.base}/steps/{step_id}/vote")
    wait_next_ready(page)
    phone = size == "phone"
    viewport = SIZES[size]["viewport"]

    # What to judge by, in reviewer words: the prompt, the step, identity first, the pillar's brief.
    assert page.locator("#prompt").inner_text() == prompt and page.locator("#prompt").is_visible()
    assert page.locator("#step-name").inner_text() == "step1"
    if phone:  # folded on a phone, a tap away
        page.locator("#judge summary").click()
    judge = page.locator("#judge-by").inner_text()
    assert f"Identity first: is this clearly {name}" in judge and f"Then the travel brief: {GUIDELINES}" in judge
    body = page.locator("body").inner_text().lower()
    assert "probability" not in body and "explore" not in body
    assert shown_count(page) == 10 == unvoted(served.url, step_id)

    # The images fill the screen: side by side on the desktop, stacked on the phone, both in view.
    if phone:
        page.locator("#judge summary").click()  # fold it again
    left, right = page.locator("#img-left").bounding_box(), page.locator("#img-right").bounding_box()
    if phone:
        assert left["width"] >= 360 and left["height"] >= 260 and right["y"] >= left["y"] + left["height"]
    else:
        assert left["width"] >= 600 and left["height"] >= 550 and right["x"] >= left["x"] + left["width"]
        assert abs(left["y"] - right["y"]) < 1
    assert right["y"] + right["height"] <= viewport["height"], (left, right)  # the whole pair without scrolling
    for button in ("left", "right", "skip", "undo"):
        box = page.locator(f".actions button[data-action='{button}']").bounding_box()
        assert box["y"] + box["height"] <= viewport["height"] and box["height"] >= 44
        assert box["y"] >= right["y"] + right["height"], (button, box, right)  # the buttons cover no image
    # Keyboard hints only with a keyboard and mouse; the touch screen gets the touch hint.
    assert page.locator("#keys-hint").is_visible() is not phone
    assert page.locator("kbd.keyhint").first.is_visible() is not phone
    assert page.locator("#touch-hint").is_visible() is phone
    assert " ".join(page.locator(".actions button[data-action='left']").inner_text().split()) == ("Top wins" if phone else "← Left wins")
    fits(page, size)
    shots(page, "pair")

    # A click (tap) on the better image.
    shown = current_pair(page)
    page.locator("button.pick[data-action='left']").click()
    vote_landed(page, served, step_id, shown, "left")
    # A key.
    wait_next_ready(page)
    shown = current_pair(page)
    page.keyboard.press("ArrowRight")
    vote_landed(page, served, step_id, shown, "right")
    # A swipe on the touch screen: the right (bottom) image dragged right wins; the left dragged left loses.
    # A mouse drag on the desktop is not a vote.
    wait_next_ready(page)
    shown = current_pair(page)
    if phone:
        swipe(page, "figure[data-side='right']", 160)
        vote_landed(page, served, step_id, shown, "right")
        wait_next_ready(page)
        shown = current_pair(page)
        swipe(page, "figure[data-side='left']", -160)
        vote_landed(page, served, step_id, shown, "right")
        assert page.locator("#vote").get_attribute("data-swipes") == "2"
    else:
        box = page.locator("#img-left").bounding_box()
        page.mouse.move(box["x"] + 300, box["y"] + 300)
        page.mouse.down()
        page.mouse.move(box["x"] + 500, box["y"] + 305, steps=8)
        page.mouse.up()
        page.wait_for_timeout(400)
        assert current_pair(page)["offer"] == shown["offer"] and int(shown["offer"]) not in votes_of(served.url, step_id)
        page.locator(".actions button[data-action='left']").click()
        vote_landed(page, served, step_id, shown, "left")
    voted = len(votes_of(served.url, step_id))
    assert voted == (4 if phone else 3) and page.locator("#vote").get_attribute("data-votes") == str(voted), (
        votes_of(served.url, step_id), page.locator("#status").inner_text())
    shots(page, "voted")

    # Undo the last vote: it is gone from the database (an undo_vote event keeps it), the pair is
    # back on screen, and the count goes back up in the page and the database alike.
    last_offer = int(shown["offer"])
    before = counts_agree(page, served, step_id)
    wait_next_ready(page)
    if phone:
        page.locator("#undo").click()
    else:
        page.keyboard.press("u")
    page.wait_for_function("() => document.getElementById('vote').dataset.undone === '1'", timeout=PAGE_WAIT_MS)
    settled(page)
    assert last_offer not in votes_of(server_url := served.url, step_id) and len(votes_of(server_url, step_id)) == voted - 1
    [undone] = [e for e in events(served.url, "undo_vote") if e.payload["offer_id"] == last_offer]
    assert undone.reviewer == "alice"
    back = current_pair(page)
    assert {back["left"], back["right"]} == {shown["left"], shown["right"]} and back["offer"] != shown["offer"]
    assert "is undone: choose again." in page.locator("#status").inner_text()
    assert counts_agree(page, served, step_id) in (before, before + 1)  # +1 unless the pair had another vote
    shots(page, "vote-undone")
    # And it is voted on again, by click.
    wait_next_ready(page)
    page.locator("button.pick[data-action='right']").click()
    vote_landed(page, served, step_id, back, "right")

    # Kill the right image, then undo the kill: the candidate is live again (a restore event).
    wait_next_ready(page)
    shown = current_pair(page)
    doomed = int(shown["right"])
    if phone:
        page.locator("#kill-right").click()
    else:
        page.keyboard.press("l")
    page.wait_for_function(f"() => document.getElementById('status').textContent.includes('Killed #{doomed}')",
                           timeout=PAGE_WAIT_MS)
    settled(page)
    with session_scope(served.url) as session:
        assert session.get(models.Candidate, doomed).status == "killed"
    assert counts_agree(page, served, step_id) < 6
    shots(page, "killed")
    page.locator("#undo").click()
    page.wait_for_function("() => document.getElementById('vote').dataset.undone === '2'", timeout=PAGE_WAIT_MS)
    settled(page)
    with session_scope(served.url) as session:
        assert session.get(models.Candidate, doomed).status == "active"
    assert [e.subject_id for e in events(served.url, "restore")][-1] == doomed
    back = current_pair(page)
    assert {int(back["left"]), int(back["right"])} == {int(shown["left"]), doomed}
    counts_agree(page, served, step_id)
    shots(page, "kill-undone")

    # The gallery says the same count as the vote page.
    shown_on_vote_page = shown_count(page)
    page.goto(f"{served.base}/steps/{step_id}")
    assert f"{shown_on_vote_page} pair{'s' if shown_on_vote_page != 1 else ''} not voted" in page.locator("main").inner_text()
    context.close()
    assert problems == []
    assert len(shots.taken) == 5 and all(p.stat().st_size > 5000 for p in shots.taken)


def test_the_count_of_pairs_not_voted_yet_agrees_after_every_vote(served: Served, chromium, size: str, tmp_path: Path) -> None:
    """The issue's counter went 6 → 5 → 3 → 2 on three votes and the gallery then said 3: the page
    estimated the count and subtracted votes in flight twice. Now it shows the server's count."""
    shots = ScreenShots(tmp_path / f"counts-{size}", size)
    step_id, _, _, _ = seed_step(served, f"count{size[0]}")
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    log_in(page, served.base)
    page.goto(f"{served.base}/steps/{step_id}/vote")
    wait_next_ready(page)
    seen = [shown_count(page)]
    for _ in range(6):  # quick votes, one after the other as soon as the next pair takes input
        wait_next_ready(page)
        page.keyboard.press("ArrowLeft")
        seen.append(counts_agree(page, served, step_id))
    assert seen[0] == 10 and all(b <= a for a, b in zip(seen, seen[1:])), seen
    assert len(votes_of(served.url, step_id)) == 6
    shots(page, "after-six-votes")
    page.goto(f"{served.base}/")
    assert f'data-count="pairs_to_vote">{seen[-1]}<' in page.content()
    context.close()
    assert problems == [] and shots.taken[0].stat().st_size > 5000


def lightbox_view(page) -> dict:
    return page.evaluate("""() => ({
        scale: parseFloat(document.getElementById('lightbox').dataset.scale),
        left: document.getElementById('lb-left').style.transform, right: document.getElementById('lb-right').style.transform,
        leftSrc: document.getElementById('lb-left').getAttribute('src'), rightSrc: document.getElementById('lb-right').getAttribute('src'),
        loaded: [document.getElementById('lb-left'), document.getElementById('lb-right')].every(i => i.complete && i.naturalWidth > 0)})""")


def test_the_lightbox_zooms_both_images_together_and_takes_no_vote(served: Served, chromium, size: str, tmp_path: Path) -> None:
    shots = ScreenShots(tmp_path / f"lightbox-{size}", size)
    step_id, _, _, _ = seed_step(served, f"zoom{size[0]}")
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    log_in(page, served.base)
    page.goto(f"{served.base}/steps/{step_id}/vote")
    wait_next_ready(page)
    shown = current_pair(page)
    page.locator("#zoom-right").click()
    page.wait_for_function("() => !document.getElementById('lightbox').hidden")
    view = lightbox_view(page)
    assert (view["leftSrc"], view["rightSrc"]) == (shown["leftSrc"], shown["rightSrc"]) and view["loaded"]
    assert view["scale"] == 1
    panes = [page.locator(f".lb-pane[data-side='{side}']").bounding_box() for side in ("left", "right")]
    viewport = SIZES[size]["viewport"]
    for pane in panes:  # each image gets half the screen
        assert pane["width"] * pane["height"] >= 0.4 * viewport["width"] * viewport["height"], pane
    page.locator("#lb-in").click()
    page.locator("#lb-in").click()
    view = lightbox_view(page)
    assert view["scale"] == pytest.approx(2.25) and view["left"] == view["right"] and "scale(2.25)" in view["left"]
    # Pan one image: the other moves the same way (touch on the phone, the mouse on the desktop).
    box = panes[0]
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    if size == "phone":
        cdp = page.context.new_cdp_session(page)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
        for i in range(1, 6):
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x + 12 * i, "y": y + 6 * i}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        cdp.detach()
    else:
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 60, y + 30, steps=5)
        page.mouse.up()
        page.mouse.wheel(0, -300)  # the wheel zooms in, both images
        page.wait_for_function("() => parseFloat(document.getElementById('lightbox').dataset.scale) > 2.3")
    view = lightbox_view(page)
    assert view["left"] == view["right"] and "translate(0px, 0px)" not in view["left"], view
    shots(page, "lightbox")
    # Keys in the lightbox vote for nothing; Esc (or Close) puts the pair back, unchanged.
    page.keyboard.press("ArrowLeft")
    if size == "phone":
        page.locator("#lb-close").click()
    else:
        page.keyboard.press("Escape")
    page.wait_for_function("() => document.getElementById('lightbox').hidden")
    assert current_pair(page)["offer"] == shown["offer"] and votes_of(served.url, step_id) == {}
    wait_next_ready(page)
    page.keyboard.press("z")  # Z opens it too
    page.wait_for_function("() => !document.getElementById('lightbox').hidden")
    assert lightbox_view(page)["scale"] == 1  # a fresh view each time
    page.locator("#lb-close").click()
    context.close()
    assert problems == []
    assert len(shots.taken) == 1 and shots.taken[0].stat().st_size > 5000
