"""The weekly report (spec point 5): the week's facts from the database (SQLite and PostgreSQL), the
failed Dagster runs from a real instance, the markdown file with its contact sheets beside it, and
the asset's config errors. Plus pure tests of the window and the rendering.

The data are written directly, inside and outside the window, with small real PNG/JPEG files."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from PIL import Image

from persona_pipeline.assets.content_plan import content_plan
from persona_pipeline.assets.weekly_report import weekly_report
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.db.weekly_report import collect_week
from persona_pipeline.definitions import build_resources
from persona_pipeline.domain import weekly_report as wr
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.personas import load_persona
from persona_pipeline.previews import shown_inline
from persona_pipeline.resources.links import UiLinks
from persona_pipeline_tests.conftest import make_settings, write_persona
from persona_pipeline_tests.helpers import add_finished_run

SLUG = "tester"
TZ = "Europe/Lisbon"
UI = "http://dagster.test:3000"
REVIEW = "https://review.test"
PUBLISHING_RUN = "5e1fc0de-0000-4000-8000-000000000001"
CAPTION = "Sunset | rooftop\nsecond line of the caption"
THEME = "rooftop | neon"


@pytest.fixture(autouse=True)
def _no_gemini_key(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)


def _image(path: Path, index: int, fmt: str = "PNG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((index * 67) % 256, (index * 131 + 40) % 256, (index * 29 + 90) % 256)
    Image.new("RGB", (48, 60), colour).save(path, format=fmt)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _persona(session, datasets: Path, slug: str) -> models.Persona:
    return registry.sync_persona(session, load_persona(write_persona(datasets, slug, photos=0)))


def _resources(settings) -> dict:
    resources = build_resources(settings)
    resources["links"] = UiLinks(dagster_ui_base_url=UI, review_base_url=REVIEW)
    return resources


def _window(now: datetime) -> tuple[str, datetime, datetime]:
    """The report's `end` (tomorrow's local date) and the UTC window it gives, 7 days."""
    end_date = (now.astimezone(ZoneInfo(TZ)) + timedelta(days=1)).date()
    start, end, _ = wr.report_window(end_date.isoformat(), 7, TZ, now)
    return end_date.isoformat(), start, end


def seed_week(url: str, tmp_path: Path, start: datetime, end: datetime) -> dict:
    """One persona's week with something in every section, the same kinds of rows just outside
    the window, and another persona's rows inside it. Returns the ids the tests check."""
    home = tmp_path / "home"
    inside = start + (end - start) / 2  # the middle of the window
    before = start - timedelta(hours=1)
    after = end + timedelta(minutes=5)
    runs_dir = home / "personas" / SLUG / "runs"
    with session_scope(url) as session:
        persona = _persona(session, tmp_path / "datasets", SLUG)
        other = _persona(session, tmp_path / "datasets-other", "other")
        city, beach = registry.active_pillars(session, persona.id)
        old_lora = registry.register_lora(session, persona.id, name="tester-lora", path=home / "old.safetensors",
                                          sha256="b" * 64, base_model="tiny", trigger_word="t3st", dataset_id=None,
                                          training={}, primary=True, origin="imported")
        lora = registry.register_lora(session, persona.id, name="tester-lora", path=home / "new.safetensors",
                                      sha256="a1b2c3d4e5f6" + "0" * 52, base_model="tiny", trigger_word="t3st",
                                      dataset_id=None, training={}, primary=True, weight=0.8)
        prompt = models.ContentPrompt(persona_id=persona.id, pillar_id=city.id, prompt="p", theme=THEME,
                                      source="template", status="used")
        session.add(prompt)
        session.flush()

        def run_with(persona_row, pillar_id, candidates, content_prompt_id=None, prompt_text="photo of t3st woman"):
            run, step = add_finished_run(session, persona_id=persona_row.id, pillar_id=pillar_id, prompt=prompt_text,
                                         n_candidates=4, content_prompt_id=content_prompt_id)
            rows = []
            for i, (lora_id, created) in enumerate(candidates):
                image = runs_dir / f"run-{run.id}" / f"c{i}.png"
                rows.append(models.Candidate(run_id=run.id, step_id=step.id, seed=i, image_path=str(image),
                                             image_sha256=_image(image, run.id * 10 + i), lora_id=lora_id,
                                             manifest_path=str(image.with_suffix(".json")), created_at=created,
                                             bt_score=1500.0 + i * 10))
            session.add_all(rows)
            session.flush()
            return run, step, rows

        # Run 1: candidates this week (3 by the primary, 1 by the old LoRA, 1 by none) and one last week.
        run1, step1, c = run_with(persona, city.id, [(lora.id, inside), (lora.id, inside), (lora.id, inside),
                                                     (old_lora.id, inside), (None, inside), (lora.id, before)],
                                  content_prompt_id=prompt.id, prompt_text="photo of t3st woman on a rooftop\nat dusk")
        # Run 2: its winner was picked last week.  Run 3: picked last week, then picked again this week.
        run2, _, c2 = run_with(persona, beach.id, [(lora.id, before), (lora.id, before)])
        run3, _, c3 = run_with(persona, beach.id, [(lora.id, before), (lora.id, before)])

        def vote(step, winner, loser, reviewer, when):
            low, high = sorted((winner.id, loser.id))
            session.add(models.Vote(step_id=step.id, winner_id=winner.id, loser_id=loser.id, pair_low_id=low,
                                    pair_high_id=high, winner_elo_before=1000, loser_elo_before=1000, elo_delta=16,
                                    reviewer=reviewer, created_at=when))

        def event(persona_row, kind, reviewer, when, subject_type="candidate", subject_id=0, payload=None):
            session.add(models.ReviewEvent(persona_id=persona_row.id, kind=kind, subject_type=subject_type,
                                           subject_id=subject_id, reviewer=reviewer, payload=payload or {},
                                           created_at=when))

        for winner, loser in ((c[0], c[1]), (c[0], c[2]), (c[1], c[2])):
            vote(step1, winner, loser, "alice", inside)
            event(persona, "vote", "alice", inside, "vote")  # cast_vote writes one too: not counted twice
        vote(step1, c[0], c[3], "bob", inside)
        vote(step1, c[1], c[3], "alice", before)  # last week
        vote(step1, c[2], c[3], "bob", after)  # after the window
        event(persona, "approve_step", "alice", inside, "step", step1.id)
        event(persona, "kill", "bob", inside, "candidate", c[4].id)
        event(persona, "pick_winner", "alice", inside, "run", run1.id, {"candidate_id": c[0].id})
        for kind in ("approve_post", "reject_post", "move_post", "move_post", "edit_post"):
            event(persona, kind, "carol", inside, "post", 1)
        event(persona, "approve_post", "dave", before, "post", 1)  # last week: dave is absent
        run1.winner_candidate_id = c[0].id
        c[0].status = "winner"
        run2.winner_candidate_id = c2[0].id
        event(persona, "pick_winner", "alice", before, "run", run2.id, {"candidate_id": c2[0].id})
        run3.winner_candidate_id = c3[1].id
        Path(c3[1].image_path).write_bytes(b"not an image")  # a thumbnail that cannot be read
        event(persona, "pick_winner", "bob", before, "run", run3.id, {"candidate_id": c3[0].id})
        event(persona, "pick_winner", "bob", inside, "run", run3.id, {"candidate_id": c3[1].id})

        # Another persona's week: none of it may show.
        orun, ostep, oc = run_with(other, None, [(None, inside), (None, inside)])
        vote(ostep, oc[0], oc[1], "mallory", inside)
        event(other, "approve_step", "mallory", inside, "step", ostep.id)

        # Posts.
        media = home / "personas" / SLUG / "media"
        slot = end + timedelta(days=30)  # planned slots after the window, whatever today is

        def post(status, n, **values):
            row = models.Post(persona_id=persona.id, pillar_id=city.id, account=f"outbox:{SLUG}", status=status,
                              caption=values.pop("caption", f"post {n}"), hashtags=[],
                              scheduled_at=slot + timedelta(hours=n), **values)
            session.add(row)
            session.flush()
            return row

        jpeg = media / "p1.jpg"
        _image(jpeg, 1, "JPEG")
        p1 = post("published", 1, caption=CAPTION, media_path=str(jpeg), published_at=inside, theme=THEME,
                  permalink="https://www.instagram.com/p/abc123/", candidate_id=c[0].id)
        # Its media file is gone (the thumbnail is skipped) and it has no permalink: the report links to the
        # Dagster run that published it, never to the outbox record (a local path).
        p2 = post("published", 2, media_path=str(media / "gone.jpg"), published_at=inside + timedelta(hours=1),
                  external_id=f"outbox-{SLUG}-2", claimed_by=PUBLISHING_RUN)
        p6 = post("published", 6, published_at=inside + timedelta(hours=2), claimed_by="local-3f2a")  # no run to link
        outbox_record = str(home / "outbox" / SLUG / f"post-{p2.id:06d}.json")
        session.add(models.PostAttempt(post_id=p2.id, publisher="outbox", step="outbox", outcome="published",
                                       detail=outbox_record, created_at=inside))
        p3 = post("published", 3, caption="last week's post", published_at=before)
        p4 = post("failed", 4, failure_reason="media file missing\n(it was deleted)", updated_at=inside)
        session.add(models.PostAttempt(post_id=p4.id, publisher="instagram", step="container", outcome="failed",
                                       detail="rate limited | try later", http_status=400, error_code=4,
                                       created_at=inside))
        session.add(models.PostAttempt(post_id=p4.id, publisher="instagram", step="container", outcome="failed",
                                       detail="old failure", created_at=before))
        p5 = post("abandoned", 5, failure_reason="old", updated_at=before)

        # Gap reports: the one written this week is the latest before the window's end.
        for today, created, needed in ((date(2000, 1, 1), before, 1), (date(2000, 1, 8), inside, 7),
                                       (date(2000, 1, 15), after, 99)):
            session.add(models.PillarGapReport(persona_id=persona.id, today=today, horizon_days=30, posts_per_week=3.0,
                                               created_at=created, rows=[
                {"pillar": "city", "pillar_id": city.id, "weight": 60, "priority": 1, "needed": needed,
                 "available": 2, "gap": needed - 2, "status": "critical"},
                {"pillar": "beach", "pillar_id": beach.id, "weight": 40, "priority": 2, "needed": 4, "available": 4,
                 "gap": 0, "status": "ready"}]))

        # Generation jobs: two with one error, one with another, one last week.
        for slot_n, (error, when) in enumerate((("ComfyUI timed out after 600 s", inside),
                                                ("ComfyUI timed out after 600 s", inside),
                                                ("CUDA out of memory", inside), ("old error", before))):
            session.add(models.GenerationJob(run_id=run1.id, step_id=step1.id, slot=slot_n, seed=slot_n,
                                             status="failed", backend="comfyui", error=error, finished_at=when))

        # Alerts: one sent this week; a pending one, another persona's and last week's are absent.
        for key, slug, status, when in (("a1", SLUG, "sent", inside), ("a2", SLUG, "pending", inside),
                                        ("a3", "other", "sent", inside), ("a4", SLUG, "sent", before)):
            session.add(models.Alert(dedupe_key=key, kind="run_failure", persona_slug=slug, subject=f"job {key}",
                                     text=f"alert {key}", status=status, created_at=when, sent_at=when,
                                     link=f"{UI}/runs/{key}"))
        session.flush()
        return {"persona_id": persona.id, "posts": [p1.id, p2.id, p6.id], "absent_posts": [p3.id, p5.id], "failed_post": p4.id,
                "run1": run1.id, "run2": run2.id, "run3": run3.id, "winner": c[0].id, "outbox_record": outbox_record,
                "lora": lora.id, "old_lora": old_lora.id}


@dg.asset(partitions_def=persona_partitions, group_name="test")
def exploding() -> None:
    raise RuntimeError("the generator caught fire | badly")


@dg.asset(group_name="test")
def exploding_unpartitioned() -> None:
    raise RuntimeError("a job tagged with the persona failed")


def _table_ok(markdown: str) -> None:
    """Every row of every table has as many (unescaped) cells as its header."""
    split = re.compile(r"(?<!\\)\|")
    header = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = len(split.findall(line))
        if header is None:
            header = cells
        assert cells == header, f"table row breaks its table: {line!r}"


def _section(markdown: str, heading: str) -> str:
    return markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_collect_week_counts_and_window(db_url, tmp_path):
    now = datetime.now(timezone.utc)
    _, start, end = _window(now)
    ids = seed_week(db_url, tmp_path, start, end)
    with session_scope(db_url) as session:
        report = collect_week(session, session.get(models.Persona, ids["persona_id"]), start, end)
    assert [p.post_id for p in report.posts] == ids["posts"]
    assert report.posts[0].link == "https://www.instagram.com/p/abc123/"
    assert (report.posts[1].link, report.posts[1].run_id) == ("", PUBLISHING_RUN)
    assert (report.posts[2].link, report.posts[2].run_id) == ("", None)  # published outside Dagster
    assert report.posts[0].pillar == "city" and report.posts[0].theme == THEME
    by_name = {r.reviewer: r for r in report.reviewers}
    assert set(by_name) == {"alice", "bob", "carol"}
    assert (by_name["alice"].votes, by_name["bob"].votes, by_name["carol"].votes) == (3, 1, 0)
    assert by_name["alice"].decisions == {"approve_step": 1, "pick_winner": 1}
    assert by_name["bob"].decisions == {"kill": 1, "pick_winner": 1}
    assert by_name["carol"].decisions == {"approve_post": 1, "reject_post": 1, "move_post": 2, "edit_post": 1}
    assert [(w.run_id, w.candidate_id, w.picked_by) for w in report.winners][0] == (ids["run1"], ids["winner"], "alice")
    assert sorted(w.run_id for w in report.winners) == sorted([ids["run1"], ids["run3"]])  # run2: picked last week
    assert report.winners[0].theme == THEME and report.winners[0].pillar == "city"
    assert report.gaps.today == date(2000, 1, 8) and report.gaps.rows[0].needed == 7
    assert report.primary_lora.lora_id == ids["lora"] and report.primary_lora.weight == 0.8
    usage = {(u.lora.lora_id if u.lora else None): u.candidates for u in report.lora_usage}
    assert usage == {ids["lora"]: 3, ids["old_lora"]: 1, None: 1}  # not last week's, not the other persona's
    assert [(p.post_id, p.status) for p in report.failed_posts] == [(ids["failed_post"], "failed")]
    assert len(report.failed_attempts) == 1 and "HTTP 400" in report.failed_attempts[0].error
    assert [(g.error, g.count) for g in report.failed_jobs] == [("ComfyUI timed out after 600 s", 2),
                                                              ("CUDA out of memory", 1)]
    assert [a.subject for a in report.alerts] == ["job a1"]
    assert report.counts() == {"posts_published": 3, "votes": 4, "reviewers": 3, "winners": 2, "failures": 5}


def _materialise_report(instance, resources, **config):
    return dg.materialize([weekly_report], partition_key=SLUG, instance=instance, resources=resources,
                          run_config={"ops": {"weekly_report": {"config": config}}} if config else None)


def _metadata(result) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("weekly_report")[0].metadata.items()}


def test_weekly_report_asset(db_url, tmp_path):
    settings = make_settings(tmp_path, db_url)
    now = datetime.now(timezone.utc)
    end_text, start, end = _window(now)
    ids = seed_week(db_url, tmp_path, start, end)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", [SLUG, "other", "ghost"])
    resources = _resources(settings)
    # Real failed runs: one of this persona's partition, one tagged persona=tester, and two of others
    # (content_plan for a persona the database does not know; the exploding asset for "other").
    ours = dg.materialize([exploding], partition_key=SLUG, instance=instance, raise_on_error=False)
    tagged = dg.materialize([exploding_unpartitioned], instance=instance, tags={"persona": SLUG}, raise_on_error=False)
    ghost = dg.materialize([content_plan], partition_key="ghost", instance=instance, resources=resources,
                           raise_on_error=False)
    other = dg.materialize([exploding], partition_key="other", instance=instance, raise_on_error=False)
    assert not any(r.success for r in (ours, tagged, ghost, other))

    result = _materialise_report(instance, resources, end=end_text)
    assert result.success
    meta = _metadata(result)
    md = meta["report"]
    assert (meta["posts_published"], meta["votes"], meta["reviewers"], meta["winners"], meta["failures"]) == (3, 4, 3, 2, 7)
    assert meta["window_start"] == start.isoformat() and meta["window_end"] == end.isoformat()
    # Local midnights: of the end date, and of the day seven calendar days before it.
    end_day = date.fromisoformat(end_text)
    assert end == datetime.combine(end_day, datetime.min.time(), tzinfo=ZoneInfo(TZ)).astimezone(timezone.utc)
    assert start == datetime.combine(end_day - timedelta(days=7), datetime.min.time(),
                                     tzinfo=ZoneInfo(TZ)).astimezone(timezone.utc)

    # Sections in order, each once.
    positions = [md.index(f"\n## {s}\n") for s in wr.SECTIONS]
    assert positions == sorted(positions)
    # Votes per reviewer, exactly (columns: votes, steps approved, winners picked, posts approved,
    # rejected, moved, kills, other); dave voted last week and mallory for another persona.
    votes = _section(md, wr.VOTES)
    assert "| alice | 3 | 1 | 1 | 0 | 0 | 0 | 0 | — |" in votes
    assert "| bob | 1 | 0 | 1 | 0 | 0 | 0 | 1 | — |" in votes
    assert "| carol | 0 | 0 | 0 | 1 | 1 | 2 | 0 | edit_post ×1 |" in votes
    assert votes.index("| alice") < votes.index("| bob") < votes.index("| carol")
    assert "dave" not in md and "mallory" not in md
    # Posts: this week's, with the permalink or the run that published it, never a local path; not last week's.
    posts = _section(md, wr.POSTS)
    assert "https://www.instagram.com/p/abc123/" in posts and f"{UI}/runs/{PUBLISHING_RUN}" in posts
    assert str(tmp_path) not in md and ids["outbox_record"] not in md
    assert "Sunset \\| rooftop" in posts and "second line" not in posts and "last week's post" not in md
    _table_ok(md)
    # Winners: run 1 and run 3 (re-picked this week), not run 2.
    winners = _section(md, wr.WINNERS)
    assert f"run {ids['run1']} / candidate {ids['winner']}" in winners and f"run {ids['run3']} /" in winners
    assert f"run {ids['run2']} /" not in winners and "rooftop \\| neon" in winners
    assert "| 1500.0 |" in winners
    # Gaps: the report written this week, not the earlier one nor the one after the window.
    gaps = _section(md, wr.GAPS)
    assert "Latest report: 2000-01-08" in gaps and "| city | 7 | 2 | 5 | critical |" in gaps and "99" not in gaps
    # LoRA: the primary (v2, weight 0.8, sha prefix), and the others with their counts.
    lora = _section(md, wr.LORA)
    assert "**tester-lora v2** (trained, weight 0.8)" in lora and "`a1b2c3d4e5f6`" in lora
    assert "made 3 candidates this week" in lora
    assert "| tester-lora v1 | imported |" in lora and "| (no LoRA) | — | — | — | 1 |" in lora
    # Failures: the two runs of this persona with their links, never the others'.
    failures = _section(md, wr.FAILURES)
    assert f"({UI}/runs/{ours.run_id})" in failures and f"({UI}/runs/{tagged.run_id})" in failures
    for run in (ghost, other, result):
        assert run.run_id not in md
    assert "the generator caught fire \\| badly" in failures
    assert "media file missing<br>(it was deleted)" in failures
    assert "rate limited \\| try later (HTTP 400, code 4)" in failures and "old failure" not in md
    assert "| ComfyUI timed out after 600 s | 2 |" in failures and "| CUDA out of memory | 1 |" in failures
    assert "old error" not in md
    assert "job a1" in failures and not any(f"job {k}" in md for k in ("a2", "a3", "a4"))

    # Thumbnails: PNG files beside the markdown file, which the metadata shows through the review form: in
    # the report, and as a sheet per section short enough to show without a click; base64 copies as a fallback.
    media = f"{REVIEW}/media/reports/{SLUG}"
    for section, suffix in ((wr.POSTS, "posts"), (wr.WINNERS, "winners")):
        sheet = meta[f"{suffix}_sheet"]
        assert re.fullmatch(rf"!\[{section}: [^]]+\]\({re.escape(media)}/weekly-{end_text}-{suffix}\.png\)", sheet)
        assert shown_inline(sheet) and sheet in md
        encoded = re.fullmatch(r"!\[[^]]+\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", meta[f"{suffix}_sheet_embedded"])
        assert Image.open(io.BytesIO(base64.b64decode(encoded.group(1)))).format == "PNG"
    assert "data:image" not in md
    path = Path(meta["path"])
    assert path == settings.home / "reports" / SLUG / f"weekly-{end_text}.md"
    text = path.read_text()
    assert "data:image" not in text
    # Post 2's file is gone: no tile and no label. Run 3's winner is not an image: a blank tile.
    # Each label is drawn under its own tile (none is left as a run-on line under the sheet); the alt text names them.
    assert f"![{wr.POSTS}: post {ids['posts'][0]}](weekly-{end_text}-posts.png)" in text
    assert f"![{wr.WINNERS}: run {ids['run1']}, run {ids['run3']}](weekly-{end_text}-winners.png)" in text
    assert not re.search(r"\.png\)\n\n(post|run) \d", text)
    for suffix in ("posts", "winners"):
        name = f"weekly-{end_text}-{suffix}.png"
        assert f"]({name})" in text
        with Image.open(path.parent / name) as image:
            assert image.format == "PNG"
    # The file says what the metadata says, apart from where the images are.
    assert re.sub(r"\]\([^)]*\.png\)", "](img)", text) == re.sub(r"\]\([^)]*\.png\)", "](img)", md)


def test_weekly_report_of_an_empty_persona(db_url, tmp_path):
    settings = make_settings(tmp_path, db_url)
    with session_scope(db_url) as session:
        _persona(session, tmp_path / "datasets", SLUG)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", [SLUG])
    before = datetime.now(ZoneInfo(TZ)).date().isoformat()
    result = _materialise_report(instance, _resources(settings))  # default window: the 7 days before now
    assert result.success
    meta = _metadata(result)
    md = meta["report"]
    assert [meta[k] for k in ("posts_published", "votes", "reviewers", "winners", "failures")] == [0] * 5
    for section in (wr.POSTS, wr.VOTES, wr.WINNERS, wr.GAPS, wr.LORA):
        assert _section(md, section).strip().startswith(wr.NONE), section
    assert _section(md, wr.FAILURES).count(wr.NONE) == 5
    assert "data:image" not in md
    folder = settings.home / "reports" / SLUG
    today = Path(meta["path"]).name.removeprefix("weekly-").removesuffix(".md")
    assert today in (before, datetime.now(ZoneInfo(TZ)).date().isoformat())  # the local date, midnight or not
    assert Path(meta["path"]) == folder / f"weekly-{today}.md"
    assert sorted(p.name for p in folder.iterdir()) == [f"weekly-{today}.md"]
    end = datetime.fromisoformat(meta["window_end"])
    assert abs((datetime.now(timezone.utc) - end).total_seconds()) < 120


@pytest.mark.parametrize("config, named", [({"days": 0}, "days=0"), ({"days": 32}, "days=32"),
                                            ({"end": "last tuesday"}, "end='last tuesday'"),
                                            ({"end": "2024-02-30"}, "end='2024-02-30'")])
def test_weekly_report_config_errors(db_url, tmp_path, config, named):
    settings = make_settings(tmp_path, db_url)
    with session_scope(db_url) as session:
        _persona(session, tmp_path / "datasets", SLUG)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", [SLUG])
    with pytest.raises(dg.Failure, match=re.escape(named)):
        _materialise_report(instance, _resources(settings), **config)
    assert not (settings.home / "reports").exists()


# --- pure: window and rendering ---------------------------------------------------------------------

UTC = timezone.utc
NOW = datetime(2024, 3, 11, 10, 30, tzinfo=UTC)


def test_report_window_from_a_date_is_local_midnights():
    start, end, end_date = wr.report_window("2024-03-11", 7, TZ, NOW)
    assert (start, end, end_date) == (datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 11, tzinfo=UTC),
                                      date(2024, 3, 11))
    start, end, _ = wr.report_window("2024-07-15", 7, TZ, NOW)  # summer time: local midnight is 23:00 UTC
    assert (start, end) == (datetime(2024, 7, 7, 23, tzinfo=UTC), datetime(2024, 7, 14, 23, tzinfo=UTC))


def test_report_window_across_dst_counts_calendar_days():
    # Lisbon springs forward on 2024-03-31: the week before 2024-04-01 has 167 hours.
    start, end, _ = wr.report_window("2024-04-01", 7, TZ, NOW)
    assert start == datetime(2024, 3, 25, tzinfo=UTC) and end == datetime(2024, 3, 31, 23, tzinfo=UTC)
    assert end - start == timedelta(hours=167)


def test_report_window_datetimes_and_default():
    assert wr.report_window(None, 7, TZ, NOW)[:2] == (NOW - timedelta(days=7), NOW)
    assert wr.report_window("", 1, TZ, NOW)[1] == NOW
    start, end, day = wr.report_window("2024-07-15T09:00", 2, TZ, NOW)  # naive: Lisbon local time
    assert (start, end, day) == (datetime(2024, 7, 13, 8, tzinfo=UTC), datetime(2024, 7, 15, 8, tzinfo=UTC),
                                 date(2024, 7, 15))
    start, end, day = wr.report_window("2024-07-14T23:30:00Z", 1, TZ, NOW)  # aware: the local date names it
    assert end == datetime(2024, 7, 14, 23, 30, tzinfo=UTC) and day == date(2024, 7, 15)


@pytest.mark.parametrize("end, days, named", [(None, 0, "days=0"), (None, 32, "days=32"), (None, True, "days=True"),
                                              ("yesterday", 7, "end='yesterday'"), ("2024-13-01", 7, "end='2024-13-01'")])
def test_report_window_errors_name_the_field(end, days, named):
    with pytest.raises(wr.ReportWindowError, match=re.escape(named)):
        wr.report_window(end, days, TZ, NOW)


def _report(**values) -> wr.WeeklyReport:
    base = dict(slug="tester", name="Test Persona", timezone=TZ, start=datetime(2024, 3, 4, tzinfo=UTC),
                end=datetime(2024, 3, 11, tzinfo=UTC))
    return wr.WeeklyReport(**{**base, **values})


def test_render_empty_report_has_every_section_with_none():
    md = wr.render_markdown(_report(), {wr.POSTS: "![sheet](posts.png)"})
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == list(wr.SECTIONS)
    assert "Mon 2024-03-04 00:00 – Mon 2024-03-11 00:00 (Europe/Lisbon, 7 days) · 0 posts published · 0 votes by " \
           "0 reviewers · 0 winners · 0 failures" in md
    assert md.count(wr.NONE) == 6 + 5  # posts, votes, winners, gaps, audience, LoRA; five kinds of failure
    assert "posts.png" not in md  # no thumbnails under an empty section


def test_render_tables_escape_pipes_and_newlines():
    post = wr.PublishedPost(7, datetime(2024, 3, 5, 18, 15, tzinfo=UTC), "city|life", "a\nb", "first | line\nsecond",
                            "https://example.test/p/7")
    failed = wr.FailedPost(8, "failed", datetime(2024, 3, 6, tzinfo=UTC), "bad | thing\r\nhappened")
    md = wr.render_markdown(_report(posts=[post], failed_posts=[failed]), {wr.POSTS: "![sheet](posts.png)"})
    assert "| Tue 2024-03-05 18:15 | city\\|life | a<br>b | first \\| line | https://example.test/p/7 |" in md
    assert "| 8 | failed | Wed 2024-03-06 00:00 | bad \\| thing<br>happened |" in md
    _table_ok(md)
    assert md.index("https://example.test/p/7") < md.index("![sheet](posts.png)") < md.index("## Votes")
    assert wr.cell("a\\|b") == "a\\\\\\|b"  # a backslash before a pipe cannot unescape it


def test_render_summary_and_lora_lines():
    lora = wr.LoraInfo(3, "mira", 4, "imported", datetime(2024, 2, 1, tzinfo=UTC), "f" * 64, 1.0)
    report = _report(
        reviewers=[wr.ReviewerActivity("ana", 5, {"approve_step": 1, "skip": 2})],
        winners=[wr.Winner(1, 2, datetime(2024, 3, 7, tzinfo=UTC), "ana", "prompt", "", None, None)],
        primary_lora=lora, lora_usage=[wr.LoraUsage(lora, 4)],
        failed_jobs=[wr.JobFailures("timeout", 3, [1, 2], datetime(2024, 3, 8, tzinfo=UTC))])
    md = wr.render_markdown(report, {})
    assert "1 winner · 3 failures" in md and "5 votes by 1 reviewer" in md
    assert "| ana | 5 | 1 | 0 | 0 | 0 | 0 | 0 | skip ×2 |" in md
    assert "**mira v4** (imported, weight 1), created 2024-02-01, sha256 `ffffffffffff`; made 4 candidates this week." in md
    assert "Other LoRAs" not in md
    assert "| timeout | 3 | 1, 2 | Fri 2024-03-08 00:00 |" in md
    assert report.counts() == {"posts_published": 0, "votes": 5, "reviewers": 1, "winners": 1, "failures": 3}
