"""Insight collection (db/insights.py, resources/insight_sources.py, resources/insights_collector.py)
against the fake Graph API with insights (persona_fakes/graph_insights.py) and the simulated
audience, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from persona_fakes.graph_insights import FakeInsightsGraphAPI
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import insight_reads as rules
from persona_pipeline.personas import load_persona
from persona_pipeline.resources import instagram
from persona_pipeline.resources.insight_sources import DueRead, GraphInsightSource
from persona_pipeline.resources.insights_collector import InsightsCollector
from persona_pipeline.resources.instagram import InstagramGraphClient
from persona_pipeline_tests.conftest import write_persona
from persona_pipeline_tests.helpers import LogCapture

UTC = timezone.utc
USER, OTHER = "17841400000000001", "17841400000000002"
TOKEN, OTHER_TOKEN = "tok-insights-secret-123456", "tok-other-secret-654321"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def graph():
    with FakeInsightsGraphAPI({USER: TOKEN, OTHER: OTHER_TOKEN}) as fake:
        yield fake


@pytest.fixture
def no_sleep(monkeypatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(instagram, "sleep", waits.append)
    return waits


def client(fake) -> InstagramGraphClient:
    return InstagramGraphClient(base_url=fake.url, max_retries=1, backoff_s=0.01)


def persona(url, tmp_path, slug="anna", instagram_account=True) -> int:
    extra = {"instagram": {"user_id": USER, "token_env": "ANNA_TOKEN"}} if instagram_account else {}
    folder = write_persona(tmp_path / "datasets", slug, photos=0, **extra)
    with session_scope(url) as session:
        return registry.sync_persona(session, load_persona(folder)).id


def published(url, persona_id, media_id, hours_ago, account=USER, pillar="city") -> int:
    with session_scope(url) as session:
        pillar_id = session.scalar(select(models.ContentPillar.id).where(models.ContentPillar.persona_id == persona_id,
                                                                        models.ContentPillar.name == pillar))
        at = NOW - timedelta(hours=hours_ago)
        post = models.Post(persona_id=persona_id, pillar_id=pillar_id, account=account, status="published",
                           caption=f"post {media_id}", hashtags=["one"], scheduled_at=at, published_at=at,
                           external_id=media_id)
        session.add(post)
        session.flush()
        return post.id


def series(url, post_id):
    with session_scope(url) as session:
        return sorted((r.metric, r.age_hours, r.value, r.simulated) for r in session.scalars(
            select(models.PostInsight).where(models.PostInsight.post_id == post_id)))


def poll(url, post_id):
    with session_scope(url) as session:
        return session.scalar(select(models.InsightPoll).where(models.InsightPoll.post_id == post_id))


# --- the rules -----------------------------------------------------------------------------------

def test_due_ages_usage_and_metric_names():
    at = datetime(2026, 6, 1, tzinfo=UTC)
    assert rules.due_age(at, at + timedelta(minutes=30), None) is None
    assert rules.due_age(at, at + timedelta(hours=1, minutes=5), None) == 1
    assert rules.due_age(at, at + timedelta(hours=30), None) == 24  # late: the 1 h read is skipped, not mislabelled
    assert rules.due_age(at, at + timedelta(hours=30), 24) is None
    assert rules.due_age(at, at + timedelta(days=9), 72) == 168 and rules.is_final(168)
    usage = rules.parse_usage({"X-App-Usage": '{"call_count": 12, "total_cputime": 3, "total_time": 5}',
                               "X-Business-Use-Case-Usage": '{"1": [{"type": "instagram", "call_count": 80, '
                                                            '"total_cputime": 2, "total_time": 9, '
                                                            '"estimated_time_to_regain_access": 0}]}'})
    assert usage == rules.Usage(80.0, 0.0)
    assert rules.pace(rules.Usage(50), 30) == 0 and rules.pace(usage, 20) == pytest.approx(4.0)
    assert rules.pace(rules.Usage(100), 30) is None and rules.pace(rules.Usage(10, 120), 30) is None
    assert rules.parse_usage({"X-App-Usage": "not json"}) == rules.Usage()
    assert rules.refused_metric("(#100) metric[1] must be one of", ("reach", "impressions")) == "impressions"
    assert rules.refused_metric("the views metric is no longer supported", ("reach", "views")) == "views"


# --- the Graph source on its own --------------------------------------------------------------------

def read(fake, reads, token=TOKEN, account=USER, in_flight=1):
    return GraphInsightSource(client(fake), max_pause_s=0.5, in_flight=in_flight).read(account, token, reads, NOW.date())


def due(post_id, media_id, account=USER, age=24):
    return DueRead(post_id, media_id, account, NOW - timedelta(hours=age), age)


def test_reads_v23_metrics_and_usage(graph, no_sleep):
    media = graph.add_media(USER)
    graph.set_insights(media, {"reach": 1200, "views": 1500, "likes": 50, "comments": 4, "saved": 6, "shares": 2,
                               "total_interactions": 62})
    graph.followers[USER] = 4321
    graph.account_limit = 100
    result = read(graph, [due(1, media)])
    assert result.values[1] == {"reach": 1200, "views": 1500, "likes": 50, "comments": 4, "saved": 6, "shares": 2,
                                "total_interactions": 62}
    assert result.account_day == {"followers": 4321.0, "reach": 1200.0}
    assert result.stopped is None and result.max_usage > 0
    asked = graph.requests_to("media_insights")[0]
    assert asked.params["metric"] == ",".join(rules.MEDIA_METRICS) and "access_token" not in asked.params


def test_a_deprecated_metric_is_a_named_error_and_the_rest_are_read(graph, no_sleep):
    media = graph.add_media(USER)
    graph.set_insights(media, {"reach": 900, "likes": 30, "total_interactions": 30})
    graph.deprecate("views")
    result = read(graph, [due(1, media)])
    assert "views" not in result.values[1] and result.values[1]["reach"] == 900
    assert "unsupported in Graph API v23.0" in result.refused[1]["views"] and "views" in result.refused[1]["views"]


def test_deleted_media_foreign_media_and_an_expired_token(graph, no_sleep):
    gone, theirs, mine, later = graph.add_media(USER), graph.add_media(OTHER), graph.add_media(USER), graph.add_media(USER)
    graph.delete_media(gone)
    result = read(graph, [due(1, gone), due(2, theirs), due(3, theirs, account=OTHER), due(4, mine)])
    assert "no longer exists on Instagram" in result.deleted[1]
    assert "not this account's media" in result.foreign[2]  # Meta's code 10 for another account's media
    assert "belongs to account" in result.foreign[3]  # known from the database: no call made
    assert 4 in result.values
    assert len(graph.requests_to("media_insights")) == 3
    # The token expires after the first read of a batch: the account stops, naming why.
    original = graph._media_insights

    def expiring(media_id, params):
        answer = original(media_id, params)
        graph.set_token_expiry(USER, 1)
        return answer

    graph._more_routes = lambda method, parts, _orig=graph._more_routes: (
        ("media_insights", USER, lambda params: expiring(parts[0], params))
        if len(parts) == 2 and parts[1] == "insights" and parts[0] in graph.media else _orig(method, parts))
    result = read(graph, [due(5, mine), due(6, later)])
    assert 5 in result.values and 6 not in result.values
    assert "token rejected (code 190/463)" in result.stopped and TOKEN not in result.stopped


def test_throttling_backs_off_by_the_headers_and_stops_the_account(no_sleep):
    with FakeInsightsGraphAPI({USER: TOKEN}, account_limit=10) as fake:
        reads = [due(i, fake.add_media(USER)) for i in range(12)]
        result = read(fake, reads)
        assert no_sleep and all(0 < w <= 0.5 for w in no_sleep[:-1])  # slowed down from 75 %
        assert result.stopped and "usage at 100%" in result.stopped
        assert len(result.values) < 12 and fake.throttled == 0  # it stopped before Meta had to refuse


# --- collection into the database --------------------------------------------------------------------

def collector(fake) -> InsightsCollector:
    return InsightsCollector(graph=client(fake), workers=4, max_pause_s=0.1)


def test_collection_stores_a_time_series_freezes_and_never_double_counts(db_url, tmp_path, graph, no_sleep,
                                                                          monkeypatch):
    monkeypatch.setenv("ANNA_TOKEN", TOKEN)
    pid = persona(db_url, tmp_path)
    fresh, old, gone = graph.add_media(USER), graph.add_media(USER), graph.add_media(USER)
    graph.set_insights(old, {"reach": 2000, "views": 2600, "likes": 80, "comments": 5, "saved": 9, "shares": 1,
                             "total_interactions": 95})
    p_fresh, p_old, p_gone = (published(db_url, pid, fresh, 2), published(db_url, pid, old, 200),
                              published(db_url, pid, gone, 2.5))
    log = LogCapture()
    report = collector(graph).collect(db_url, NOW, log)
    assert report["read"] == 3 and report["frozen"] == 1
    assert ("reach", 168, 2000, False) in series(db_url, p_old) and poll(db_url, p_old).status == "frozen"
    assert {age for _, age, _, _ in series(db_url, p_fresh)} == {1}
    again = collector(graph).collect(db_url, NOW, log)  # a rerun: nothing is due, nothing added
    assert again["read"] == 0 and len(series(db_url, p_fresh)) == len(rules.MEDIA_METRICS)
    # Rerun of the same read after a crash before the poll state was saved: replaced, not added.
    with session_scope(db_url) as session:
        session.scalar(select(models.InsightPoll).where(models.InsightPoll.post_id == p_fresh)).last_age_hours = None
    collector(graph).collect(db_url, NOW, log)
    assert len(series(db_url, p_fresh)) == len(rules.MEDIA_METRICS)
    # A day later: the deleted media stops polling and keeps its 1-hour history.
    graph.delete_media(gone)
    later = collector(graph).collect(db_url, NOW + timedelta(hours=23), log)
    assert later["deleted"] == 1 and poll(db_url, p_gone).status == "deleted"
    assert {age for _, age, _, _ in series(db_url, p_gone)} == {1}
    assert {age for _, age, _, _ in series(db_url, p_fresh)} == {1, 24}
    with session_scope(db_url) as session:
        days = session.scalars(select(models.AccountInsight.metric).where(models.AccountInsight.account == USER)).all()
    assert set(days) == {"followers", "reach"}
    assert TOKEN not in " ".join(log.lines) and TOKEN not in repr(report)


def test_a_post_of_an_earlier_account_is_refused_and_kept(db_url, tmp_path, graph, no_sleep, monkeypatch):
    monkeypatch.setenv("ANNA_TOKEN", TOKEN)
    pid = persona(db_url, tmp_path)
    theirs = published(db_url, pid, graph.add_media(OTHER), 2, account=OTHER)
    report = collector(graph).collect(db_url, NOW, LogCapture())
    assert report["foreign"] == 1 and "belongs to account" in poll(db_url, theirs).note
    assert series(db_url, theirs) == [] and not graph.requests_to("media_insights")


def test_outbox_posts_get_simulated_insights(db_url, tmp_path, graph, no_sleep):
    pid = persona(db_url, tmp_path, instagram_account=False)
    posts = [published(db_url, pid, f"outbox-anna-{i}", 30 + i, account="outbox:anna", pillar=("city", "beach")[i % 2])
             for i in range(4)]
    report = collector(graph).collect(db_url, NOW, LogCapture())
    assert report["read"] == 4 and report["simulated_accounts"] == 1
    first = series(db_url, posts[0])
    assert first and all(simulated for *_, simulated in first)
    values = {metric: value for metric, _, value, _ in first}
    assert values["total_interactions"] == values["likes"] + values["comments"] + values["saved"] + values["shares"]
    with session_scope(db_url) as session:
        followers = session.scalar(select(models.AccountInsight).where(models.AccountInsight.account == "outbox:anna",
                                                                      models.AccountInsight.metric == "followers"))
        assert followers.simulated and followers.value >= 10_000 * 0.99
        assert session.scalar(select(func.count()).select_from(models.PostInsight)) == 4 * len(rules.MEDIA_METRICS)
    # The same seed gives the same numbers on another database: the audience is deterministic.
    assert series(db_url, posts[0]) == first


def test_several_reads_of_one_account_in_flight_read_each_media_once(graph, no_sleep):
    media = [graph.add_media(USER) for _ in range(9)]
    result = read(graph, [due(i, m) for i, m in enumerate(media)], in_flight=4)
    assert sorted(result.values) == list(range(9)) and result.calls == 9 + 2 and result.stopped is None
    assert sorted(r.path.split("/")[-2] for r in graph.requests_to("media_insights")) == sorted(media)


def test_account_numbers_are_read_once_a_day_without_due_posts(db_url, tmp_path, graph, no_sleep, monkeypatch):
    monkeypatch.setenv("ANNA_TOKEN", TOKEN)
    persona(db_url, tmp_path)
    graph.followers[USER] = 777
    first = collector(graph).collect(db_url, NOW, LogCapture())
    assert first["accounts"] == 1 and first["read"] == 0 and first["calls"] == 2
    with session_scope(db_url) as session:
        rows = {r.metric: r.value for r in session.scalars(select(models.AccountInsight))}
    assert rows == {"followers": 777.0, "reach": 0.0}
    later = max(NOW, min(NOW + timedelta(minutes=30), NOW.replace(hour=23, minute=59, second=59)))  # the same day
    assert collector(graph).collect(db_url, later, LogCapture())["accounts"] == 0  # once a day
