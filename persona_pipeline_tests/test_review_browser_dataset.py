"""The dataset review queue as a person meets it: Debian's Chromium driven by playwright against the
form under real uvicorn, at desktop (1400x900, keyboard) and phone (390x844, touch) sizes. Accepts
by key (desktop) and by tap (phone), rejects, undoes, edits a caption, and meets the refusal for an image a
built dataset version already holds; then, in the dropped view, sees what the automatic checks dropped
with the reason and overrides a drop (accepts one anyway, undoes it, rejects one for good). The
database is checked after each, and the count shown is the server's. Screenshots are saved (under the
test's output, and $PERSONA_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import func, select

from persona_pipeline.db import dataset_candidates, models
from persona_pipeline.db.session import session_scope
from persona_pipeline_tests.browser_fixtures import (PAGE_WAIT_MS, SIZES, Served, Shots, chromium, fits, log_in,  # noqa: F401
                                                     open_page, serve_form, size)
from persona_pipeline_tests.review_fixtures import seed_review
from persona_pipeline_tests.test_review_dataset import DROP_REASONS, seed_dataset, seed_dropped

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serve_form(tmp_path_factory.mktemp("review_dataset_browser")) as form:
        yield form


class ScreenShots(Shots):
    """What is on the screen (a full-page capture drops the phone's touch emulation while it runs)."""

    def __init__(self, folder: Path, size: str) -> None:
        super().__init__(folder)
        self.size = size

    def __call__(self, page, name: str) -> None:
        path = self.folder / f"{len(self.taken) + 1:02d}-dataset-{self.size}-{name}.png"
        page.screenshot(path=str(path))
        self.taken.append(path)
        if self.stable:
            self.stable.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.stable / path.name)


def row(url: str, candidate_id: int) -> models.DatasetCandidate:
    with session_scope(url) as session:
        found = session.get(models.DatasetCandidate, candidate_id)
        session.expunge(found)
        return found


def pending(url: str, persona_id: int) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(models.DatasetCandidate).where(
            models.DatasetCandidate.persona_id == persona_id, models.DatasetCandidate.status == "pending"))


def ready(page) -> int:
    """A candidate on screen that takes input; its id."""
    page.wait_for_function("() => { const d = document.getElementById('dataset');"
                           " return d.dataset.candidateId && d.dataset.inputReady === '1'; }", timeout=PAGE_WAIT_MS)
    return int(page.locator("#dataset").get_attribute("data-candidate-id"))


def settled(page, decided: int) -> None:
    page.wait_for_function("(n) => { const d = document.getElementById('dataset');"
                           " return d.dataset.decided === String(n) && d.dataset.countsSettled === '1'; }",
                           arg=decided, timeout=PAGE_WAIT_MS)


def shown_count(page) -> int:
    text = page.locator("#remaining").inner_text()
    assert text.endswith(" waiting."), text
    return int(text.split()[0])


def press(page, phone: bool, key: str, button: str) -> None:
    """A key on the desktop, a tap on the phone."""
    if phone:
        page.locator(f".ds-actions button[data-action='{button}']").tap()
    else:
        page.keyboard.press(key)


def test_accept_reject_edit_and_a_frozen_refusal(served: Served, chromium, size: str, tmp_path: Path) -> None:
    phone = size == "phone"
    slug = f"ds{size[0]}"
    shots = ScreenShots(tmp_path / f"dataset-{size}", size)
    review = seed_review(served.url, served.home, slug=slug, candidates=2, steps=1, posts=1)
    ds = seed_dataset(served.url, served.home, slug, review.persona_id, review.candidate_ids[0], review.step_ids[0],
                      review.post_ids[0], extra=2)
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    log_in(page, served.base)
    page.locator(f"a[href='/dataset/{slug}']").click()  # from the queue
    page.wait_for_url(f"{served.base}/dataset/{slug}")
    assert ready(page) == ds.edit_id
    viewport = SIZES[size]["viewport"]

    # What to judge by: the image, its identity score, the nearest dataset image, where it came from.
    assert page.locator("#ds-identity").inner_text() == "0.812 (clip)"
    assert page.locator("#ds-origin").inner_text() == (f"Edit of photo face-01.jpg with instruction 'turn her head to the left' "
                                                       f"by model qwen-image-edit seed 7 (dataset candidate #{ds.edit_id})")
    assert page.locator("#ds-nearest-text").inner_text() == "Nearest in the dataset: cosine 0.903"
    assert page.evaluate("() => ['ds-img', 'ds-nearest-img'].every(id => { const i = document.getElementById(id);"
                         " return i.complete && i.naturalWidth > 0; })")
    assert page.locator("#ds-caption").input_value() == "t3st woman, candidate 0"
    assert shown_count(page) == 5 == pending(served.url, ds.persona_id)
    main = page.locator("#ds-img").bounding_box()
    if phone:
        assert main["width"] >= 360 and main["height"] >= 200
    else:
        assert main["width"] >= 700 and main["height"] >= 550
    # The buttons: big, in view without scrolling, covering no image; keyboard hints only with a keyboard.
    for action in ("accept", "reject", "edit", "undo"):
        box = page.locator(f".ds-actions button[data-action='{action}']").bounding_box()
        assert box["height"] >= 44 and box["y"] + box["height"] <= viewport["height"], (action, box)
        assert box["y"] >= main["y"] + main["height"] or box["x"] >= main["x"] + main["width"], (action, box, main)
    assert page.locator("#keys-hint").is_visible() is not phone
    assert page.locator("kbd.keyhint").first.is_visible() is not phone
    assert page.locator("#touch-hint").is_visible() is phone
    fits(page, size)
    shots(page, "queue")

    # Accept: A on the desktop, a tap on the phone.
    press(page, phone, "a", "accept")
    settled(page, 1)
    accepted = row(served.url, ds.edit_id)
    assert (accepted.status, accepted.decided_by, accepted.caption) == ("accepted", "alice", "t3st woman, candidate 0")
    assert "Accepted #%d." % ds.edit_id in page.locator("#status").inner_text()
    assert shown_count(page) == 4 == pending(served.url, ds.persona_id)

    # Reject: R, or a tap.
    assert ready(page) == ds.winner_id
    assert page.locator("#ds-origin").inner_text() == f"Winner candidate #{ds.winner_candidate} (dataset candidate #{ds.winner_id})"
    press(page, phone, "r", "reject")
    settled(page, 2)
    assert row(served.url, ds.winner_id).status == "rejected"
    assert shown_count(page) == 3 == pending(served.url, ds.persona_id)

    # Undo it (U, or the Undo button): pending again in the database, back on screen; then reject it again.
    assert ready(page) == ds.post_id
    press(page, phone, "u", "undo")
    page.wait_for_function("() => document.getElementById('dataset').dataset.undone === '1'", timeout=PAGE_WAIT_MS)
    settled(page, 1)
    assert ready(page) == ds.winner_id and "is undone: decide again." in page.locator("#status").inner_text()
    undone = row(served.url, ds.winner_id)
    assert (undone.status, undone.decided_by) == ("pending", None)
    with session_scope(served.url) as session:
        assert session.scalars(select(models.ReviewEvent.reviewer).where(
            models.ReviewEvent.kind == "dataset_undo", models.ReviewEvent.subject_id == ds.winner_id)).all() == ["alice"]
    assert shown_count(page) == 4 == pending(served.url, ds.persona_id)
    shots(page, "undone")
    press(page, phone, "r", "reject")
    settled(page, 2)
    assert row(served.url, ds.winner_id).status == "rejected" and shown_count(page) == 3

    # Edit the caption, then accept with it: E and Ctrl+Enter, or taps and the phone's keyboard.
    assert ready(page) == ds.post_id
    assert page.locator("#ds-origin").inner_text() == f"Post #{ds.post} (dataset candidate #{ds.post_id})" and page.locator("#ds-identity").inner_text() == "not scored"
    assert page.locator("#ds-nearest").is_hidden()
    caption = page.locator("#ds-caption")
    assert caption.get_attribute("readonly") is not None
    if phone:
        page.locator("#ds-edit").tap()
    else:
        page.keyboard.press("e")
    page.wait_for_function("() => document.getElementById('dataset').dataset.editing === '1'")
    caption.fill("")
    page.keyboard.type("t3st woman on a beach at sunset")
    page.keyboard.press("a")  # typed into the caption, not a decision
    assert row(served.url, ds.post_id).status == "pending"
    page.keyboard.press("Backspace")
    shots(page, "editing")
    if phone:
        page.locator(".ds-actions button[data-action='accept']").tap()
    else:
        page.keyboard.press("Control+Enter")
    settled(page, 3)
    edited = row(served.url, ds.post_id)
    assert (edited.status, edited.caption) == ("accepted", "t3st woman on a beach at sunset")
    with session_scope(served.url) as session:
        event = session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == "dataset_accept",
                                                                 models.ReviewEvent.subject_id == ds.post_id)).one()
        assert event.payload["caption"] == "t3st woman on a beach at sunset" and event.reviewer == "alice"
    assert "with your caption" in page.locator("#status").inner_text()

    # Frozen: while it is on screen, bob accepts it and a dataset version is built with it. The
    # page's decision is refused, says why, and nothing changes in the database.
    frozen_id = ready(page)
    with session_scope(served.url) as session:
        dataset_candidates.decide(session, frozen_id, "accept", by="bob")
        dataset_candidates.mark_included(session, [frozen_id], "beefcafe0123456789")
    press(page, phone, "r", "reject")
    page.wait_for_function("() => document.getElementById('dataset').dataset.lost === '1'", timeout=PAGE_WAIT_MS)
    lost = page.locator("#lost").inner_text()
    assert f"rejection of #{frozen_id} was not recorded" in lost and "refused (409)" in lost and "beefcafe0123456789" in lost
    assert "its decision is frozen" in page.locator("#status").inner_text()
    kept = row(served.url, frozen_id)
    assert (kept.status, kept.decided_by, kept.dataset_version) == ("accepted", "bob", "beefcafe0123456789")
    page.wait_for_function("() => document.getElementById('remaining').textContent.startsWith('1 ')", timeout=PAGE_WAIT_MS)
    assert shown_count(page) == 1 == pending(served.url, ds.persona_id)
    fits(page, size)
    shots(page, "refused")

    # The last one, then the queue is empty.
    assert ready(page) == frozen_id + 1
    press(page, phone, "a", "accept")
    page.wait_for_function("() => document.getElementById('dataset').dataset.done === '1'", timeout=PAGE_WAIT_MS)
    settled(page, 4)
    assert pending(served.url, ds.persona_id) == 0 and shown_count(page) == 0
    assert page.locator("#done").is_visible()
    shots(page, "done")
    context.close()
    assert problems == []
    assert len(shots.taken) == 5 and all(p.stat().st_size > 5000 for p in shots.taken)


def dropped_count(page) -> int:
    text = page.locator("#remaining").inner_text()
    assert text.endswith(" dropped by the checks."), text
    assert page.locator("#view-dropped [data-count='dropped']").inner_text() == text.split()[0]  # the tab agrees
    return int(text.split()[0])


def dropped(url: str, persona_id: int) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(models.DatasetCandidate).where(
            models.DatasetCandidate.persona_id == persona_id, models.DatasetCandidate.status == "dropped"))


def test_a_reviewer_sees_what_the_checks_dropped_and_overrides_a_drop(served: Served, chromium, size: str,
                                                                     tmp_path: Path) -> None:
    phone = size == "phone"
    slug = f"dd{size[0]}"
    shots = ScreenShots(tmp_path / f"dropped-{size}", size)
    review = seed_review(served.url, served.home, slug=slug, candidates=2, steps=1, posts=1)
    ds = seed_dataset(served.url, served.home, slug, review.persona_id, review.candidate_ids[0], review.step_ids[0],
                      review.post_ids[0])
    twin, low, faceless = seed_dropped(served.url, served.home, slug, review.persona_id, count=3)
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    log_in(page, served.base)
    page.goto(f"{served.base}/dataset/{slug}")
    assert ready(page) == ds.edit_id and page.locator("#ds-reason-row").is_hidden()
    # The view of what the checks dropped is one tap (or Tab and Enter) away, with its count.
    tab = page.locator("#view-dropped")
    assert tab.inner_text() == "Dropped by the checks (3)" and tab.bounding_box()["height"] >= 44
    if phone:
        tab.tap()
    else:
        tab.focus()
        page.keyboard.press("Enter")
    page.wait_for_url(f"{served.base}/dataset/{slug}?view=dropped")
    assert ready(page) == twin
    assert page.locator("#view-dropped").get_attribute("aria-current") == "page"
    assert page.locator("#ds-reason-row").is_visible() and page.locator("#ds-reason").inner_text() == DROP_REASONS[0]
    assert page.locator("#ds-identity").inner_text() == "0.410 (clip)"
    assert dropped_count(page) == 3 == dropped(served.url, ds.persona_id)
    viewport = SIZES[size]["viewport"]
    for action in ("accept", "reject", "undo"):
        box = page.locator(f".ds-actions button[data-action='{action}']").bounding_box()
        assert box["height"] >= 44 and box["y"] + box["height"] <= viewport["height"], (action, box)
    fits(page, size)
    shots(page, "dropped")

    # Accept it anyway (a near duplicate the reviewer wants weighted): an acceptance saying it overrides the drop.
    press(page, phone, "a", "accept")
    settled(page, 1)
    accepted = row(served.url, twin)
    assert (accepted.status, accepted.decided_by, accepted.reason) == ("accepted", "alice", DROP_REASONS[0])
    with session_scope(served.url) as session:
        event = session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == "dataset_accept",
                                                                 models.ReviewEvent.subject_id == twin)).one()
        assert (event.reviewer, event.payload["overrides_drop"]) == ("alice", DROP_REASONS[0])
    assert f"Accepted #{twin} over the drop." in page.locator("#status").inner_text()
    assert dropped_count(page) == 2 == dropped(served.url, ds.persona_id)
    assert page.locator("#view-pending [data-count='remaining']").inner_text() == "3"  # the queue is untouched

    # Undo: dropped again, with its reason, back on screen; then reject it for good.
    assert ready(page) == low and page.locator("#ds-reason").inner_text() == DROP_REASONS[1]
    press(page, phone, "u", "undo")
    page.wait_for_function("() => document.getElementById('dataset').dataset.undone === '1'", timeout=PAGE_WAIT_MS)
    assert ready(page) == twin and page.locator("#ds-reason").inner_text() == DROP_REASONS[0]
    assert "(dropped again: near duplicate" in page.locator("#status").inner_text()
    assert (row(served.url, twin).status, row(served.url, twin).decided_by) == ("dropped", None)
    page.wait_for_function("() => document.getElementById('remaining').textContent.startsWith('3 ')", timeout=PAGE_WAIT_MS)
    assert dropped_count(page) == 3
    press(page, phone, "r", "reject")
    settled(page, 1)
    assert row(served.url, twin).status == "rejected" and f"Rejected #{twin} over the drop." in page.locator("#status").inner_text()

    # The next one, accepted anyway; the last is frozen under the page (bob overrode it, a version holds it): refused.
    assert ready(page) == low
    press(page, phone, "a", "accept")
    settled(page, 2)
    assert row(served.url, low).status == "accepted"
    assert ready(page) == faceless and page.locator("#ds-reason").inner_text() == DROP_REASONS[2]
    with session_scope(served.url) as session:
        dataset_candidates.decide(session, faceless, "accept", by="bob", override_drop=True)
        dataset_candidates.mark_included(session, [faceless], "0ddba11cafe")
    press(page, phone, "r", "reject")
    page.wait_for_function("() => document.getElementById('dataset').dataset.lost === '1'", timeout=PAGE_WAIT_MS)
    assert "0ddba11cafe" in page.locator("#lost").inner_text() and "its decision is frozen" in page.locator("#status").inner_text()
    assert (row(served.url, faceless).status, row(served.url, faceless).decided_by) == ("accepted", "bob")
    page.wait_for_function("() => document.getElementById('dataset').dataset.done === '1'", timeout=PAGE_WAIT_MS)
    assert page.locator("#done h2").inner_text() == "No dropped candidate left to look at"
    assert dropped_count(page) == 0 == dropped(served.url, ds.persona_id)
    fits(page, size)
    shots(page, "dropped-done")
    context.close()
    assert problems == []
    assert len(shots.taken) == 2 and all(p.stat().st_size > 5000 for p in shots.taken)
