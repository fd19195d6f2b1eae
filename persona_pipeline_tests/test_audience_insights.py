"""The audience loop in Dagster: simulated insights collected for outbox posts, the audience_insights
asset (tables, intervals, plots, labelled simulated) and scheduled_posts planning with the learning
strategy from persona.yaml, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from persona_pipeline.assets.audience_insights import audience_insights
from persona_pipeline.assets.content_library import content_library
from persona_pipeline.assets.scheduled_posts import scheduled_posts
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.personas import load_persona
from persona_pipeline.resources.insights_collector import InsightsCollector
from persona_pipeline.resources.instagram import InstagramGraphClient
from persona_pipeline_tests.helpers import LogCapture
from persona_pipeline_tests.test_library import SLUG, TZ, Library, _metadata, _new_posts, _posting, _table

PAST_POSTS = 16


def _published_history(lib: Library, count: int) -> None:
    """`count` outbox posts published over the last weeks, alternating pillars and hours."""
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    for i in range(count):
        post_id = lib.past_post(("city", "beach")[i % 2], "", f"history {i}", now - timedelta(days=8 + i, hours=i % 5))
        with session_scope(lib.url) as session:
            session.get(models.Post, post_id).external_id = f"outbox-{SLUG}-{post_id}"


def _collect(lib: Library, rates: str = "city=0.02,beach=0.07") -> dict:
    collector = InsightsCollector(graph=InstagramGraphClient(base_url="http://127.0.0.1:9"), audience_pillar_rates=rates)
    return collector.collect(lib.url, datetime.now(timezone.utc), LogCapture())


def _learning(**learning) -> dict:
    posting = _posting()
    posting["strategy"] = {**posting["strategy"], "learning": {"enabled": True, "min_posts": 10, **learning}}
    return posting


@pytest.mark.slow  # about 13 s: the library, scheduled_posts and audience_insights materialised
def test_learning_plans_with_the_audience_within_bounds_and_the_analysis_shows_it(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_learning(max_share_shift=15))
    _published_history(lib, PAST_POSTS)
    report = _collect(lib)
    assert report["read"] == PAST_POSTS and report["frozen"] == PAST_POSTS and report["simulated_accounts"] == 1
    for i in range(6):
        lib.winner(("red", "blue")[i % 2], ("city", "beach")[i % 2], f"photo {i}", f"theme {i}", 1.0)
    lib.materialise(content_library)
    result = lib.materialise(scheduled_posts, audience_insights)
    plan = _metadata(result, "scheduled_posts")
    assert plan["learning"].startswith(f"learned from {PAST_POSTS} posts with insights")
    posts = _new_posts(lib)
    assert posts and all("learned: " in p.strategy_note for p in posts)
    assert any("beach: " in p.strategy_note and "share raised 40 → " in p.strategy_note for p in posts)
    assert all("picked by Thompson sampling (estimated hour effect " in p.strategy_note for p in posts)
    config = load_persona(lib.folder).config
    zone = ZoneInfo(TZ)
    for post in posts:  # the learned hours stay inside the posting windows
        local = post.scheduled_at.astimezone(zone).time()
        assert any(start <= local < (end if end != time.max else time(23, 59, 59)) for start, end in config.windows())

    meta = _metadata(result, "audience_insights")
    assert meta["posts_analysed"] == PAST_POSTS and meta["simulated"] is True
    by_pillar = {row["group"]: row for row in _table(meta["by_pillar"])}
    assert set(by_pillar) == {"city", "beach"} and by_pillar["beach"]["posts"] == PAST_POSTS // 2
    assert float(by_pillar["beach"]["engagement"].rstrip("%")) > float(by_pillar["city"]["engagement"].rstrip("%"))
    assert " .. " in by_pillar["beach"]["engagement_95"]
    top = _table(meta["top_posts"])
    assert len(top) == 10 and all(float(row["reach_per_follower"]) > 0 for row in top)  # simulated followers known
    shares = {row["pillar"]: row for row in _table(meta["learned_shares"])}
    assert shares["beach"]["bounds"] == "25% .. 55%" and float(shares["beach"]["target"].rstrip("%")) > 40
    for key in ("engagement_by_pillar", "hour_weekday_heatmap", "reach_over_time"):
        assert "(simulated)" in meta[key] and meta[f"{key}_embedded"].startswith("![")
    assert {"by_hour", "by_weekday", "by_caption_length", "by_hashtags", "by_theme", "by_cluster", "by_format"} <= set(meta)


def test_learning_on_without_data_falls_back_to_the_weights_saying_so(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_learning())
    for i in range(3):
        lib.winner(("red", "blue")[i % 2], ("city", "beach")[i % 2], f"photo {i}", f"theme {i}", 1.0)
    lib.materialise(content_library)
    plan = _metadata(lib.materialise(scheduled_posts), "scheduled_posts")
    assert plan["learning"] == ("learning on, but only 0 post(s) with insights (needs 10): configured weights")
    posts = _new_posts(lib)
    assert posts and all("configured weights" in p.strategy_note for p in posts)
    assert posts[0].strategy_note.startswith("pillar city: target 60%")  # the configured share, unchanged
    with session_scope(lib.url) as session:
        assert session.scalar(select(models.PostInsight.id)) is None


def test_the_weekly_report_has_the_audience_section(tmp_path, db_url):
    from persona_pipeline.assets.weekly_report import weekly_report

    lib = Library(tmp_path, db_url, **_posting())
    _published_history(lib, 12)
    _collect(lib)
    now = datetime.now(timezone.utc)
    with session_scope(lib.url) as session:  # one post inside the report's week, read at +24 h
        post = models.Post(persona_id=lib.persona_id, pillar_id=lib.pillars["beach"], account=f"outbox:{SLUG}",
                           status="published", caption="this week", hashtags=[], scheduled_at=now - timedelta(days=2),
                           published_at=now - timedelta(days=2), external_id="outbox-this-week")
        session.add(post)
    _collect(lib)
    meta = _metadata(lib.materialise(weekly_report), "weekly_report")
    section = meta["report"].split("## Audience\n", 1)[1].split("\n## ", 1)[0]
    assert "13 posts with insights so far. Learning: off (configured weights). **Simulated**" in section
    assert "| beach | 7 |" in section and "| city | 6 |" in section and " .. " in section
    assert "Best posts of the window:" in section and "| beach | " in section.split("Best posts of the window:")[1]
    assert "(simulated)" in meta["audience_plot"] and meta["audience_plot_embedded"].startswith("![")
    written = (lib.home / "reports" / SLUG).glob("weekly-*-audience.png")
    assert len(list(written)) == 1


def test_the_review_form_has_a_performance_page(tmp_path, db_url):
    import re

    from starlette.testclient import TestClient

    from persona_pipeline.review.app import ReviewConfig, create_app

    lib = Library(tmp_path, db_url, **_learning())
    _published_history(lib, 12)
    _collect(lib)
    app = create_app(ReviewConfig(database_url=db_url, home=lib.home, tokens={"alice-token-123456": "alice"},
                                  secret_key="performance-secret-0123456789"))
    client = TestClient(app)
    assert client.get("/performance", follow_redirects=False).status_code == 303  # login first
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text).group(1)
    client.post("/login", data={"csrf_token": csrf, "token": "alice-token-123456", "next": "/"})
    page = client.get(f"/performance?persona={SLUG}")
    assert page.status_code == 200 and 'id="simulated"' in page.text
    assert "12 published posts with insights" in page.text and "learned from 12 posts" in page.text
    pillars = page.text.split('id="pillars"', 1)[1].split("</table>", 1)[0]
    assert "<td>beach</td><td>6</td>" in pillars and "<td>city</td><td>6</td>" in pillars and " .. " in pillars
    assert "share raised 40 → " in page.text.split('id="shares"', 1)[1]
    assert page.text.count('src="data:image/png;base64,') == 3 and "(simulated)" in page.text
    assert page.text.split('id="top"', 1)[1].count("<tr><td><a href=\"/calendar/posts/") == 10
    assert client.get("/performance?persona=nobody").status_code == 404


def test_content_plan_rotates_towards_the_learned_shares(tmp_path, db_url, monkeypatch):
    from persona_pipeline.assets.content_plan import content_plan

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    lib = Library(tmp_path, db_url, **_learning())
    _published_history(lib, PAST_POSTS)
    _collect(lib)
    lib.materialise(content_plan)
    with session_scope(lib.url) as session:
        record = session.scalars(select(models.ContentPrompt.gaps).where(models.ContentPrompt.status == "planned")).first()
    rotation = record["rotation"]
    assert rotation["learning"].startswith(f"learned from {PAST_POSTS} posts")
    # Configured 60:40; beach engages far more (7 % vs 2 %), so its weight grew relative to city's.
    assert rotation["weights"]["beach"] / rotation["weights"]["city"] > 40 / 60


def test_the_insights_job_reads_due_insights_and_says_they_are_simulated(tmp_path, db_url):
    import dagster as dg

    from persona_pipeline.definitions import build_definitions

    lib = Library(tmp_path, db_url, **_posting())
    _published_history(lib, 3)
    job = build_definitions(lib.settings).resolve_job_def("insights_job")
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    counts = result.output_for_node("collect_insights")
    assert counts["read"] == 3 and counts["frozen"] == 3 and counts["simulated_accounts"] == 1
    (materialised,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = materialised.event_specific_data.metadata
    assert "simulated" in metadata["note"].value and metadata["read"].value == 3
