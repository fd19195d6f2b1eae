"""The LoRA versions page as a person meets it: Debian's Chromium driven by playwright against the
form under real uvicorn, at desktop (1400x900) and phone (390x844, touch) sizes. A persona has three
versions (the primary, a held candidate, one not evaluated); the test reads what the page shows,
makes a candidate primary with a reason, meets two refusals (a blank reason, and promoting the
primary again from a page opened before), rolls back with a reason, and checks the database after
each. Screenshots are saved (under the test's output, and $PERSONA_TEST_ARTIFACTS when set)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from persona_pipeline.db import promotion, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain.promotion import EvalScores
from persona_pipeline_tests.browser_fixtures import (SIZES, Served, Shots, chromium, fits, log_in,  # noqa: F401
                                                     open_page, serve_form, size)
from persona_pipeline_tests.review_fixtures import seed_review

pytestmark = pytest.mark.browser

HOLD_REASON = "identity 0.6100 is worse than the primary's 0.7000 (tolerance 0)"
ERROR_BG, FLASH_BG = "rgb(253, 231, 230)", "rgb(229, 244, 232)"  # review.css: .error and .flash


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serve_form(tmp_path_factory.mktemp("review_loras_browser")) as form:
        yield form


def seed_versions(served: Served, slug: str) -> tuple[int, list[int]]:
    """A persona with v1 (primary, evaluated, chosen automatically), v2 (evaluated, held with the
    rule's reason, two renders) and v3 (not evaluated, no decision yet)."""
    persona_id = seed_review(served.url, served.home, slug=slug, candidates=1, steps=1, posts=0).persona_id
    folder = served.home / "personas" / slug / "loras"
    folder.mkdir(parents=True)
    renders = []
    for i in range(2):
        render = served.home / "personas" / slug / "evaluations" / "v2" / f"p0-s{i}.png"
        render.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 40 + 80 * i, 40)).save(render)
        renders.append(str(render))
    with session_scope(served.url) as session:
        ids = []
        for n in (1, 2, 3):
            path = folder / f"v{n}.safetensors"
            path.write_bytes(f"lora {slug} {n}".encode())
            ids.append(registry.register_lora(session, persona_id, name=f"{slug}-v{n}", path=path,
                                              sha256=f"{slug}{n}".ljust(64, "0"), base_model="world",
                                              trigger_word="t3st", dataset_id=None, training={}, primary=None).id)
        one, two, _ = ids
        promotion.store_evaluation(session, persona_id, one, "k" * 64, "clip:world", EvalScores(0.70, 0.05, 0.30, 0.21), [])
        promotion.promote(session, persona_id, one, promotion.AUTOMATIC, "no primary LoRA to compare with")
        promotion.store_evaluation(session, persona_id, two, "k" * 64, "clip:world", EvalScores(0.61, 0.07, 0.28, 0.19, 1),
                                   renders)
        promotion.hold(session, persona_id, two, HOLD_REASON)
    return persona_id, ids


def state(url: str, persona_id: int) -> tuple[int | None, list[tuple]]:
    """The primary LoRA's id and the persona's promotion events (kind, LoRA, who, why, the primary replaced)."""
    with session_scope(url) as session:
        primary = registry.primary_lora(session, persona_id)
        events = [(e.kind, e.subject_id, e.reviewer, e.payload["reason"], e.payload.get("previous_primary"))
                  for e in promotion.decisions(session, persona_id)]
        return (primary.lora_id if primary else None), events


def badge(page, lora_id: int) -> str:
    return page.locator(f"#lora-{lora_id} .badge").inner_text()


def usable(page, size: str, lora_ids: list[int]) -> None:
    """No sideways scrolling, no card wider than its box, and every button reachable on screen at a
    tappable size (scrolled to, it lies inside the screen's width)."""
    fits(page, size)
    width = SIZES[size]["viewport"]["width"]
    for lora_id in lora_ids:
        card = page.locator(f"#lora-{lora_id}")
        assert card.evaluate("e => e.scrollWidth <= e.clientWidth"), f"LoRA {lora_id}'s card overflows"
        box = card.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (lora_id, box)
    buttons = page.locator("main button:visible")
    for i in range(buttons.count()):
        button = buttons.nth(i)
        button.scroll_into_view_if_needed()
        box = button.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width and box["height"] >= 44, (button.inner_text(), box)


def message(page, kind: str) -> str:
    """The message the last change left, shown as a styled box: green for done, red for refused."""
    shown = page.locator(".flash" if kind == "done" else "#page-error")
    assert shown.count() == 1 and page.locator(".flash, #page-error").count() == 1
    style = shown.evaluate("e => { const s = getComputedStyle(e); return [s.backgroundColor, s.borderRadius]; }")
    assert style == [FLASH_BG if kind == "done" else ERROR_BG, "10px"], style
    if kind == "refused":
        assert shown.get_attribute("role") == "alert"
    assert shown.is_visible() and shown.bounding_box()["y"] < SIZES["phone"]["viewport"]["height"] / 2  # at the top
    return shown.inner_text()


def test_loras_page_shows_versions_and_promotes_refuses_and_rolls_back(served: Served, chromium, size: str,
                                                                       tmp_path: Path) -> None:
    shots = Shots(tmp_path / f"loras-{size}")
    slug = f"lora{size[0]}"
    persona_id, (one, two, three) = seed_versions(served, slug)
    problems: list[str] = []
    context, page = open_page(chromium, size, problems)
    base, url = served.base, f"{served.base}/loras?persona={slug}"
    log_in(page, base)
    page.click("header nav a:has-text('LoRAs')")
    page.wait_for_url(base + "/loras")
    assert page.locator(f"#loras-{slug}").count() == 1
    page.goto(url)

    # What the page shows: newest first, which is primary, the scores, the last decision and why.
    assert [int(c.get_attribute("data-lora-id")) for c in page.locator(f"#loras-{slug} article.lora").all()] == [three, two, one]
    assert (badge(page, one), badge(page, two), badge(page, three)) == ("primary", "candidate", "candidate")
    held = page.locator(f"#lora-{two}")
    assert held.locator("h3").inner_text().startswith(f"v2 · LoRA {two}")
    cells = held.locator(".scores td").all_inner_texts()
    assert cells == ["0.6100 ± 0.0700", "0.2800", "0.1900", "1", "clip:world"]
    assert held.locator(".decision").inner_text() == f"hold_lora by {promotion.AUTOMATIC}: {HOLD_REASON}"
    page.wait_for_function(f"() => [...document.querySelectorAll('#lora-{two} .renders img')]"
                           ".every(i => i.complete && i.naturalWidth)")
    assert held.locator(".renders img").count() == 2
    assert page.locator(f"#lora-{one} .decision").inner_text() == \
        f"promote_lora by {promotion.AUTOMATIC}: no primary LoRA to compare with"
    assert page.locator(f"#lora-{one} .scores td").first.inner_text() == "0.7000 ± 0.0500"
    assert "Not evaluated." in page.locator(f"#lora-{three}").inner_text()
    assert page.locator(f"#lora-{three} .decision").count() == 0
    assert page.locator(f"#lora-{one} button:has-text('Make primary')").count() == 0  # the primary has no button
    usable(page, size, [one, two, three])
    shots(page, "versions")
    before = state(served.url, persona_id)
    assert before == (one, [("promote_lora", one, promotion.AUTOMATIC, "no primary LoRA to compare with", None),
                            ("hold_lora", two, promotion.AUTOMATIC, HOLD_REASON, None)])

    # A page opened now goes stale once v2 is primary (a second tab).
    stale = context.new_page()
    stale.goto(url)

    # A blank reason (spaces pass the browser's `required`) is refused, shown as an error, and changes nothing.
    held.locator(f"#promote-reason-{two}").fill("   ")
    held.locator("button:has-text('Make primary')").click()
    page.wait_for_selector("#page-error")
    assert message(page, "refused") == "Not changed: a promotion needs a reason"
    assert badge(page, two) == "candidate" and state(served.url, persona_id) == before
    usable(page, size, [one, two, three])
    shots(page, "refused-blank-reason")

    # Make primary with a reason: v2 is primary, recorded with who and why and what it replaced.
    page.goto(url)
    page.locator(f"#promote-reason-{two}").fill("the smile is hers")
    page.locator(f"#lora-{two} button:has-text('Make primary')").click()
    page.wait_for_selector(".flash")
    assert message(page, "done") == f"@{slug}: LoRA {two} is the primary now (the smile is hers)."
    assert (badge(page, one), badge(page, two), badge(page, three)) == ("candidate", "primary", "candidate")
    assert page.locator(f"#lora-{two} .decision").inner_text() == "promote_lora by alice: the smile is hers"
    assert page.locator(f"#lora-{two} button:has-text('Make primary')").count() == 0
    assert page.locator(f"#lora-{one} button:has-text('Make primary')").count() == 1
    promoted = state(served.url, persona_id)
    assert promoted == (two, before[1] + [("promote_lora", two, "alice", "the smile is hers", one)])
    usable(page, size, [one, two, three])
    shots(page, "promoted")

    # The stale page still offers v2: promoting the primary again is refused, and changes nothing.
    stale.locator(f"#promote-reason-{two}").fill("again")
    stale.locator(f"#lora-{two} button:has-text('Make primary')").click()
    stale.wait_for_selector("#page-error")
    assert message(stale, "refused") == f"Not changed: LoRA {two} is already the primary"
    assert badge(stale, two) == "primary" and state(served.url, persona_id) == promoted
    usable(stale, size, [one, two, three])
    shots(stale, "refused-already-primary")
    stale.close()

    # Roll back with a reason: v1 is primary again, as a rollback event by alice.
    page.goto(url)
    page.locator(f"#loras-{slug} summary:has-text('Roll back')").click()
    page.locator(f"#rollback-reason-{slug}").fill("too soft")
    usable(page, size, [one, two, three])
    shots(page, "rollback-open")
    page.locator(f"#loras-{slug} button:has-text('Roll back')").click()
    page.wait_for_selector(".flash")
    assert message(page, "done") == f"@{slug}: LoRA {one} is the primary now (too soft)."
    assert (badge(page, one), badge(page, two)) == ("primary", "candidate")
    assert page.locator(f"#lora-{one} .decision").inner_text() == "rollback_lora by alice: too soft"
    assert state(served.url, persona_id) == (one, promoted[1] + [("rollback_lora", one, "alice", "too soft", two)])
    usable(page, size, [one, two, three])
    shots(page, "rolled-back")
    context.close()
    assert problems == []
    assert len(shots.taken) == 6 and all(p.stat().st_size > 5000 for p in shots.taken)
