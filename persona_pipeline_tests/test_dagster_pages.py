"""What the Dagster UI pages show: contact sheets with each label under its image, sheets short
enough to show without a click, the post calendar, links, and the note of work still running."""

from __future__ import annotations

import base64
import io
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image

from persona_pipeline.domain.links import Links
from persona_pipeline.domain.ui_pages import (CalendarPost, WorkInFlight, account_label, agenda, still_running_note,
                                              week_grid)
from persona_pipeline.previews import (COLUMNS, LABEL_LINES, LINE_HEIGHT, THUMB, contact_sheet_png, image_md,
                                       shown_inline, wrap_label)

LINKS = Links(dagster_ui="https://dagster.example.com", review="https://review.example.com")


def _images(tmp_path: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = tmp_path / f"img{index}.png"
        Image.new("RGB", (64, 80), ((index * 80) % 256, 200, 120)).save(path)
        paths.append(path)
    return paths


def _ink(sheet: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Dark pixels (label text) in `box`."""
    return sum(1 for pixel in sheet.crop(box).convert("L").getdata() if pixel < 110)


def test_each_label_is_drawn_under_its_own_image(tmp_path):
    paths = _images(tmp_path, 8)
    labels = [f"#{i} s1 active" if i != 2 else "" for i in range(8)]
    sheet = Image.open(io.BytesIO(contact_sheet_png(paths, labels)))
    cell_h = THUMB + LINE_HEIGHT * LABEL_LINES + 4
    rows = (8 + COLUMNS - 1) // COLUMNS
    assert sheet.size == (COLUMNS * THUMB, rows * cell_h)  # every row of tiles has its band of labels
    for index in range(8):
        x, y = (index % COLUMNS) * THUMB, (index // COLUMNS) * cell_h
        band = _ink(sheet, (x, y + THUMB, x + THUMB, y + cell_h))
        assert (band > 0) == bool(labels[index]), index  # tile 2 has no label: its band stays blank
        # the tile itself is the image (green), not text
        assert sheet.getpixel((x + THUMB // 2, y + THUMB // 2))[1] == 200
    # No band at all without labels.
    assert Image.open(io.BytesIO(contact_sheet_png(paths[:2]))).size == (2 * THUMB, THUMB)
    assert COLUMNS * THUMB <= 380  # fits the asset page's metadata column at a 1400 px window
    assert contact_sheet_png([]) is None


def test_an_unreadable_image_keeps_its_label_and_never_fails_the_sheet(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    sheet = Image.open(io.BytesIO(contact_sheet_png([broken, *_images(tmp_path, 1)], ["gone", "fine"])))
    assert _ink(sheet, (0, THUMB, THUMB, sheet.height)) > 0


def test_labels_wrap_at_words_within_the_tile_and_end_in_an_ellipsis_when_cut():
    measure = len  # one unit per character
    assert wrap_label("#12 s1 active id=0.53 clip=0.27", 14, measure) == ["#12 s1 active", "id=0.53", "clip=0.27"]
    cut = wrap_label("one two three four five six seven", 9, measure, lines=2)
    assert cut == ["one two", "three…"] and all(len(line) <= 9 for line in cut)
    assert wrap_label("averyveryverylongword", 6, measure) == ["averyv"]
    assert wrap_label("", 10, measure) == []


def test_a_sheet_linked_from_the_review_form_is_shown_without_a_click(tmp_path):
    home = tmp_path / "home"
    url = LINKS.media_url(home, home / "previews" / "mira" / "contact_sheet-0123456789abcdef.png")
    assert url == "https://review.example.com/media/previews/mira/contact_sheet-0123456789abcdef.png"
    assert shown_inline(image_md(url, "contact_sheet: 48 image(s)"))
    noisy = tmp_path / "noisy.png"
    Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3))).save(noisy)
    png = contact_sheet_png([noisy, noisy], ["a", "b"])
    assert not shown_inline(image_md(f"data:image/png;base64,{base64.b64encode(png).decode()}", "x"))
    assert LINKS.media_url(home, tmp_path / "elsewhere.png") is None  # the form serves nothing outside home
    assert image_md("u.png", "a ] b") == "![a ) b](u.png)"


def test_links_go_to_the_review_form_and_dagster_runs():
    assert LINKS.run_url("abc-123") == "https://dagster.example.com/runs/abc-123"
    assert LINKS.review_posts_url("mira b", 7) == "https://review.example.com/posts?persona=mira+b#post-7"
    assert LINKS.review_step_url(4) == "https://review.example.com/steps/4"
    assert LINKS.review_vote_url(4) == "https://review.example.com/steps/4/vote"
    assert Links("http://d/", "http://r/").run_url("x") == "http://d/runs/x"


def _post(post_id: int, slot: datetime, status: str = "scheduled", caption: str = "Golden hour on the roof",
          problems=()) -> CalendarPost:
    return CalendarPost(post_id=post_id, account="Mira (Instagram 17841400000)", status=status, slot=slot,
                        caption=caption, hashtags=["#sunset", "#city"],
                        problems=list(problems), link=LINKS.review_posts_url("mira", post_id))


def test_the_week_grid_puts_each_post_on_its_local_day_and_time():
    # Mon 2026-12-07 23:30 UTC is Tue 00:30 in Berlin: the post belongs to Tuesday there.
    posts = [_post(1, datetime(2026, 12, 7, 23, 30, tzinfo=timezone.utc)),
             _post(2, datetime(2026, 12, 7, 8, 0, tzinfo=timezone.utc), status="awaiting_approval"),
             _post(3, datetime(2026, 12, 16, 17, 0, tzinfo=timezone.utc), status="failed")]
    grid = week_grid(posts, "Europe/Berlin")
    rows = [line for line in grid.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| week | Mo | Tu | We | Th | Fr | Sa | Su |" and "Times in Europe/Berlin." in grid
    week1 = [cell.strip() for cell in rows[1].split("|")[1:-1]]
    assert week1[0] == "07 Dec" and week1[1] == "09:00 ○ 2" and week1[2] == "00:30 ● 1" and week1[3:] == [""] * 5
    week2 = [cell.strip() for cell in rows[2].split("|")[1:-1]]
    assert week2[0] == "14 Dec" and week2[3] == "18:00 ✕ 3"
    assert "● scheduled" in grid and "○ awaiting approval" in grid and "✕ failed" in grid and "publishing" not in grid
    assert shown_inline(grid)  # two weeks of posts show on the asset page without a click
    assert week_grid([], "UTC") == "_no upcoming posts_"


def test_the_agenda_gives_each_post_a_whole_line_with_its_account_caption_link_and_problems():
    posts = [_post(5, datetime(2026, 12, 8, 9, 0, tzinfo=timezone.utc), caption="Line one | with a pipe\nline two",
                   problems=["outside the posting windows 18:00-21:00"]),
             _post(4, datetime(2026, 12, 7, 18, 0, tzinfo=timezone.utc), caption="x" * 300)]
    text = agenda(posts, "UTC")
    lines = text.splitlines()
    assert lines[0] == "**Mon 07 Dec 2026**"
    first = next(line for line in lines if "post 4" in line)
    assert first.startswith("- 18:00 · Mira (Instagram 17841400000) · scheduled · "
                            "[post 4](https://review.example.com/posts?persona=mira#post-4) · ")
    assert "x" * 99 + "…" in first and "\\#sunset \\#city" in first
    assert "**Tue 08 Dec 2026**" in lines
    assert "Line one \\| with a pipe line two" in text
    assert "    - ⚠ outside the posting windows 18:00-21:00" in lines
    assert text.index("post 4") < text.index("post 5")


def test_a_post_is_named_by_its_persona_and_the_account_it_goes_out_on():
    assert account_label("Mira", "17841400000") == "Mira (Instagram 17841400000)"
    assert account_label("Mira", "outbox:mira") == "Mira (outbox)"


def test_the_post_calendar_page_lists_each_post_with_its_time_account_status_and_caption(tmp_path):
    import dagster as dg

    from persona_pipeline.assets.post_calendar import post_calendar
    from persona_pipeline.definitions import build_resources
    from persona_pipeline.personas import load_persona
    from persona_pipeline_tests.conftest import make_database, make_settings
    from persona_pipeline_tests.review_fixtures import seed_review

    url, cleanup = make_database("sqlite", tmp_path)
    try:
        settings = make_settings(tmp_path, url, review_base_url="https://review.example.com")
        caption = "Golden hour on the roof, then " + "a long walk home " * 10
        seed = seed_review(url, settings.home, candidates=2, posts=2, caption=caption)
        name = load_persona(settings.home.parent / f"datasets-{seed.slug}" / seed.slug).config.name
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("personas", [seed.slug])
        result = dg.materialize([post_calendar], partition_key=seed.slug, instance=instance,
                                resources=build_resources(settings))
    finally:
        cleanup()
    metadata = result.asset_materializations_for_node("post_calendar")[0].metadata
    items = [line for line in metadata["agenda"].value.splitlines() if line.startswith("- ")]
    assert len(items) == 2
    for post_id, line in zip(seed.post_ids, items):  # the persona's local time, then the rest
        assert re.match(rf"- \d\d:\d\d · {re.escape(name)} \(outbox\) · awaiting approval · \[post {post_id}\]"
                        rf"\(https://review\.example\.com/posts\?persona={seed.slug}#post-{post_id}\) · Golden hour", line)
        assert "…" in line and len(line) < 300  # the caption shortened, on the one line
    assert f"○ {seed.post_ids[0]}" in metadata["calendar"].value
    assert metadata["preview"].value.startswith("![preview: 2 image(s)](https://review.example.com/media/previews/")


def test_a_materialisation_that_made_nothing_while_another_run_generates_says_so_and_links_it():
    work = [WorkInFlight("f00dfeed-1234", jobs=12, generation_runs=[4, 5])]
    note = still_running_note(0, work, LINKS.run_url)
    assert note.startswith("**Still running:** [run f00dfeed](https://dagster.example.com/runs/f00dfeed-1234) "
                           "has 12 image(s) of generation run(s) 4, 5 in progress.")
    assert "made no images itself" in note
    assert "made 3 image(s) itself" in still_running_note(3, work, LINKS.run_url)
    assert still_running_note(0, [], LINKS.run_url) is None
    assert re.search(r"\]\(https://dagster\.example\.com/runs/", note)


def test_sheet_metadata_writes_the_sheet_once_and_links_it_through_the_review_form(tmp_path):
    from persona_pipeline.assets.common import sheet_metadata
    from persona_pipeline.resources.links import UiLinks
    from persona_pipeline.resources.storage import PersonaStorage

    storage = PersonaStorage(home=str(tmp_path / "home"))
    links = UiLinks(dagster_ui_base_url="https://dagster.example.com", review_base_url="https://review.example.com")
    items = [(path, f"#{i} s1 active") for i, path in enumerate(_images(tmp_path, 30))]
    entries = sheet_metadata("contact_sheet", items, storage, links, "mira")
    shown, embedded = entries["contact_sheet"].value, entries["contact_sheet_embedded"].value
    [written] = list((tmp_path / "home" / "previews" / "mira").glob("contact_sheet-*.png"))
    assert shown == f"![contact_sheet: 30 image(s)](https://review.example.com/media/previews/mira/{written.name})"
    assert shown_inline(shown) and not shown_inline(embedded)
    encoded = re.search(r"base64,([A-Za-z0-9+/=]+)\)", embedded).group(1)
    assert base64.b64decode(encoded) == written.read_bytes()
    assert sheet_metadata("contact_sheet", items, storage, links, "mira") == entries  # the same sheet, the same file
    assert len(list(written.parent.iterdir())) == 1
    empty = sheet_metadata("contact_sheet", [], storage, links, "mira", empty="**Still running:** …")
    assert {k: v.value for k, v in empty.items()} == {"contact_sheet": "**Still running:** …"}


def test_jobs_in_flight_names_the_other_dagster_runs_still_generating(tmp_path):
    from persona_pipeline.db import models, registry
    from persona_pipeline.db.session import session_scope
    from persona_pipeline.generation import runs
    from persona_pipeline.personas import load_persona
    from persona_pipeline_tests.conftest import make_database, write_persona

    url, cleanup = make_database("sqlite", tmp_path)
    try:
        with session_scope(url) as session:
            persona = registry.sync_persona(session, load_persona(write_persona(tmp_path / "datasets", "mira", photos=0)))
            step = runs.StepSpec(name="base", template="txt2img_lora", n=3, keep=None, top_k=2, backend="diffusers",
                                 params={})
            first = runs.start_run(session, persona.id, prompt="a", negative_prompt="", pillar_id=None, steps=[step],
                                   prompt_source="template", content_prompt_id=None, dagster_run_id="run-A")
            planned, _ = runs.plan_jobs(session, persona.id, "run-A", lambda c: (c.image_path, c.image_sha256))
            second = runs.start_run(session, persona.id, prompt="b", negative_prompt="", pillar_id=None, steps=[step],
                                    prompt_source="template", content_prompt_id=None, dagster_run_id="run-B")
            runs.plan_jobs(session, persona.id, "run-B", lambda c: (c.image_path, c.image_sha256))
            session.get(models.GenerationJob, planned[0].job_id).status = "done"
            session.flush()
            assert runs.jobs_in_flight(session, persona.id, "run-B") == {"run-A": (2, [first.id])}
            assert runs.jobs_in_flight(session, persona.id, "run-C") == {"run-A": (2, [first.id]),
                                                                         "run-B": (3, [second.id])}
            assert runs.jobs_in_flight(session, persona.id + 1, "run-C") == {}
    finally:
        cleanup()


def test_steps_open_for_votes_link_to_the_review_form():
    from persona_pipeline.domain.ui_pages import StepToReview, steps_to_review

    text = steps_to_review([StepToReview(9, 4, 2, "refine_face", 6)], LINKS)
    assert text == ("- run 4, step 2 (refine\\_face): 6 candidate(s), [vote](https://review.example.com/steps/9/vote) · "
                    "[gallery](https://review.example.com/steps/9)")
    assert steps_to_review([], LINKS) == "_no step is open for votes_"
