"""Alerts and freshness: the run-failure sensor through Dagster's own evaluation of a real failed
run, the freshness sensor and asset checks, the persona-file alerts, and delivery against a local
webhook (persona_fakes/webhook.py) that answers, refuses, stalls and rate-limits."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from sqlalchemy import false, func, select

from persona_pipeline.assets.freshness_checks import calendar_covers_ahead, library_runway
from persona_pipeline.assets.post_calendar import post_calendar
from persona_pipeline.automation import alerts as alert_automation
from persona_pipeline.automation.alerts import alert_sensor, run_failure_alerts
from persona_pipeline.automation.persona_sensor import persona_sensor
from persona_pipeline.db import alerts as outbox
from persona_pipeline.db import models, registry
from persona_pipeline.db.freshness import persona_freshness
from persona_pipeline.db.session import session_scope, upgrade
from persona_pipeline.definitions import build_definitions, build_resources
from persona_pipeline.domain import freshness
from persona_pipeline.personas import PersonaConfig, load_persona
from persona_pipeline.resources.alerts import AlertDeliveryError, AlertWebhook, FreshnessRules, slack_payload
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.settings import Settings
from persona_pipeline_tests.conftest import make_settings, write_persona
from persona_fakes.webhook import SECRET_PATH, FakeWebhook

UI = "http://dagster.test:3000"
TIMEOUT_S = 0.3


@pytest.fixture
def hook():
    with FakeWebhook() as server:
        yield server


def _webhook(hook: FakeWebhook | None, **overrides) -> AlertWebhook:
    values = dict(url=hook.url if hook else "", ui_base_url=UI, timeout_s=TIMEOUT_S, max_attempts=8)
    values.update(overrides)
    return AlertWebhook(**values)


def _resources(db_url: str, webhook: AlertWebhook, min_days: float = 3.0) -> dict:
    return {"database": AppDatabase(url=db_url), "alerts": webhook, "freshness": FreshnessRules(min_days_ahead=min_days)}


def _alerts(db_url: str, **where) -> list[models.Alert]:
    with session_scope(db_url) as session:
        query = select(models.Alert).order_by(models.Alert.id)
        for name, value in where.items():
            query = query.where(getattr(models.Alert, name) == value)
        return list(session.scalars(query))


def _section(message: dict) -> str:
    return message["blocks"][0]["text"]["text"]


def _enqueue(db_url: str, count: int, now: datetime, prefix: str = "a") -> None:
    with session_scope(db_url) as session:
        for i in range(count):
            outbox.enqueue(session, dedupe_key=f"{prefix}:{i}", kind="run_failure", subject=f"job {prefix}{i}",
                           text=f"alert {prefix}{i}", persona_slug="tester", now=now)


# --- the message -----------------------------------------------------------------------------

def test_slack_payload_names_persona_subject_and_links_to_dagster():
    payload = slack_payload(title="Run failed", text="boom <script> & more\nsecond line", persona="mira",
                            subject="generation: content_plan", link=f"{UI}/runs/abc", kind="run_failure")
    assert payload["text"] == "Run failed: mira · generation: content_plan · boom <script> & more"
    section, context = payload["blocks"]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    text = section["text"]["text"]
    assert "*Persona:* mira" in text and "*Job/asset:* generation: content_plan" in text
    assert text.endswith(f"<{UI}/runs/abc|View in Dagster>")
    assert "boom &lt;script&gt; &amp; more" in text  # mrkdwn control characters escaped
    assert context["type"] == "context" and "run_failure" in context["elements"][0]["text"]
    long = slack_payload(title="t", text="x" * 10000, persona=None, subject="s", link=None, kind="freshness")
    assert len(_section(long)) <= 3000 and "*Persona:* all personas" in _section(long)


def test_webhook_links_and_enabled():
    webhook = AlertWebhook(url="", ui_base_url=UI + "/")
    assert not webhook.enabled
    assert webhook.run_url("r-1") == f"{UI}/runs/r-1"
    assert webhook.asset_url("post_calendar", "mira b") == f"{UI}/assets/post_calendar?partition=mira+b"
    with pytest.raises(AlertDeliveryError, match="ALERT_WEBHOOK_URL is not set") as error:
        webhook.post({"text": "x"})
    assert error.value.permanent


# --- the run-failure sensor ------------------------------------------------------------------

@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """A real failed run of the `generation` job: content_plan for a persona the database does
    not hold raises. The run lives on an ephemeral instance; each test's sensor reads its own
    application database."""
    tmp = tmp_path_factory.mktemp("failed_run")
    url = f"sqlite:///{tmp / 'app.db'}"
    upgrade(url)
    (tmp / "datasets").mkdir()
    defs = build_definitions(Settings(home=tmp / "home", database_url=url, datasets_dir=tmp / "datasets"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", ["ghost"])
    result = defs.resolve_job_def("generation").execute_in_process(instance=instance, partition_key="ghost",
                                                               raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    event = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0].dagster_event
    return instance, run, event


def _evaluate_run_failure(failed_run, db_url: str, webhook: AlertWebhook):
    instance, run, event = failed_run
    context = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alerts", dagster_instance=instance, dagster_run=run, dagster_event=event,
        resources=_resources(db_url, webhook)).for_run_failure()
    return run_failure_alerts(context)


def test_a_failed_run_is_alerted_once_naming_persona_job_asset_and_run_link(failed_run, db_url, hook):
    webhook = _webhook(hook)
    run_id = failed_run[1].run_id
    _evaluate_run_failure(failed_run, db_url, webhook)
    assert len(hook.delivered) == 1
    message = hook.delivered[0]
    text = _section(message)
    assert "*Persona:* ghost" in text
    assert "*Job/asset:* generation: content_plan" in text
    assert "persona 'ghost' is not in the database" in text  # the first line of the error
    assert f"<{UI}/runs/{run_id}|View in Dagster>" in text
    assert "ghost" in message["text"] and "generation" in message["text"]
    [alert] = _alerts(db_url)
    assert (alert.status, alert.attempts, alert.kind, alert.run_id) == ("sent", 1, "run_failure", run_id)
    assert alert.dedupe_key == f"run_failure:{run_id}"

    _evaluate_run_failure(failed_run, db_url, webhook)  # the same failure, evaluated again
    assert len(hook.received) == 1 and len(_alerts(db_url)) == 1


def test_webhook_down_the_sensor_returns_quickly_and_the_alert_goes_out_later_once(failed_run, db_url, hook):
    webhook = _webhook(hook)
    hook.stop()  # connection refused
    before = datetime.now(timezone.utc)
    started = time.monotonic()
    _evaluate_run_failure(failed_run, db_url, webhook)
    assert time.monotonic() - started < alert_automation.RUN_FAILURE_BUDGET_S + TIMEOUT_S
    [alert] = _alerts(db_url)
    assert (alert.status, alert.attempts) == ("pending", 1)
    assert alert.next_attempt_at >= before + timedelta(seconds=60)  # 30 s · 2^1 backoff
    assert "ALERT_WEBHOOK_URL could not be reached" in alert.last_error
    assert SECRET_PATH not in alert.last_error and "127.0.0.1" not in alert.last_error  # the URL is a secret

    hook.start()  # back, on the same port
    assert outbox.deliver_due(AppDatabase(url=db_url), webhook) == {"sent": 0, "retrying": 0, "failed": 0, "left": 0}
    assert hook.received == []  # not due yet: the backoff holds
    later = alert.next_attempt_at + timedelta(seconds=1)
    assert outbox.deliver_due(AppDatabase(url=db_url), webhook, now=later)["sent"] == 1
    assert outbox.deliver_due(AppDatabase(url=db_url), webhook, now=later + timedelta(hours=1))["sent"] == 0
    _evaluate_run_failure(failed_run, db_url, webhook)
    assert len(hook.delivered) == 1 and "ghost" in hook.delivered[0]["text"]
    [alert] = _alerts(db_url)
    assert (alert.status, alert.attempts, alert.last_error) == ("sent", 2, None)


@pytest.mark.slow
def test_a_stalled_webhook_costs_one_timeout_per_alert_within_the_budget(db_url, hook):
    now = datetime.now(timezone.utc)
    _enqueue(db_url, 12, now)
    hook.delay_s = 5.0  # answers far later than the client waits
    budget = 1.0
    started = time.monotonic()
    counts = outbox.deliver_due(AppDatabase(url=db_url), _webhook(hook), now=now, budget_s=budget)
    elapsed = time.monotonic() - started
    assert elapsed < budget + TIMEOUT_S + 0.5
    assert counts["sent"] == 0 and counts["retrying"] >= 1 and counts["left"] >= 1
    assert counts["retrying"] + counts["left"] == 12
    alerts = _alerts(db_url)
    tried = [a for a in alerts if a.attempts == 1]
    assert len(tried) == counts["retrying"] and all("did not answer within 0.3 s" in a.last_error for a in tried)
    assert all(a.next_attempt_at > now for a in tried)
    assert all(a.next_attempt_at == now for a in alerts if a.attempts == 0)  # left for the next tick, still due


def test_retry_after_is_honoured_and_stops_the_round(db_url, hook):
    now = datetime.now(timezone.utc)
    _enqueue(db_url, 2, now)
    database, webhook = AppDatabase(url=db_url), _webhook(hook)
    hook.respond(429, {"Retry-After": "600"}, "rate_limited")
    assert outbox.deliver_due(database, webhook, now=now) == {"sent": 0, "retrying": 1, "failed": 0, "left": 1}
    first, second = _alerts(db_url)
    assert first.next_attempt_at >= now + timedelta(seconds=600) and "HTTP 429: rate_limited" in first.last_error
    assert second.attempts == 0  # the server asked for a pause: not tried in the same round

    assert outbox.deliver_due(database, webhook, now=now + timedelta(seconds=300))["sent"] == 1  # only the second
    assert outbox.deliver_due(database, webhook, now=now + timedelta(seconds=601))["sent"] == 1
    assert sorted(_section(m).rsplit("\n", 1)[-1] for m in hook.delivered) == ["alert a0", "alert a1"]
    assert [a.status for a in _alerts(db_url)] == ["sent", "sent"]

    _enqueue(db_url, 1, now, prefix="b")
    hook.respond(503, body="upstream down")  # no Retry-After: our own backoff, 30 s · 2^1 + jitter
    outbox.deliver_due(database, webhook, now=now)
    [alert] = _alerts(db_url, dedupe_key="b:0")
    wait = (alert.next_attempt_at - now).total_seconds()
    assert 60 <= wait <= 75 and alert.status == "pending"


def test_a_permanent_answer_or_too_many_attempts_marks_the_alert_failed(db_url, hook):
    now = datetime.now(timezone.utc)
    database = AppDatabase(url=db_url)
    _enqueue(db_url, 1, now)
    hook.respond(404, body="no_service")
    assert outbox.deliver_due(database, _webhook(hook), now=now)["failed"] == 1
    [alert] = _alerts(db_url)
    assert alert.status == "failed" and "HTTP 404: no_service" in alert.last_error
    assert outbox.deliver_due(database, _webhook(hook), now=now + timedelta(days=1))["sent"] == 0
    assert len(hook.received) == 1

    _enqueue(db_url, 1, now, prefix="c")
    hook.respond(500).respond(500)
    webhook = _webhook(hook, max_attempts=2)
    assert outbox.deliver_due(database, webhook, now=now)["retrying"] == 1
    assert outbox.deliver_due(database, webhook, now=now + timedelta(hours=2))["failed"] == 1
    [alert] = _alerts(db_url, dedupe_key="c:0")
    assert (alert.status, alert.attempts) == ("failed", 2)


def test_two_deliveries_at_once_send_each_alert_once(db_url, hook, monkeypatch):
    now = datetime.now(timezone.utc)
    _enqueue(db_url, 20, now)
    # Both callers read the whole due list before either claims anything: the worst interleaving.
    barrier, seen, original = threading.Barrier(2), set(), outbox._claim

    def claim(*args):
        if threading.get_ident() not in seen:
            seen.add(threading.get_ident())
            barrier.wait(timeout=10)
        return original(*args)

    monkeypatch.setattr(outbox, "_claim", claim)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(
        outbox.deliver_due(AppDatabase(url=db_url), _webhook(hook), now=now, budget_s=30))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2
    assert sum(r["sent"] for r in results) == 20
    texts = [_section(m).rsplit("\n", 1)[-1] for m in hook.delivered]
    assert len(hook.received) == 20 and len(set(texts)) == 20
    assert all(a.status == "sent" and a.attempts == 1 for a in _alerts(db_url))


def test_enqueue_dedupes_without_breaking_the_callers_transaction(db_url, monkeypatch):
    now = datetime.now(timezone.utc)
    with session_scope(db_url) as session:
        assert outbox.enqueue(session, dedupe_key="k", kind="freshness", subject="s", text="t", now=now) is not None
    with session_scope(db_url) as session:
        assert outbox.enqueue(session, dedupe_key="k", kind="freshness", subject="s", text="t", now=now) is None
    # Another sensor inserted "k" between our pre-check and our insert: the pre-check sees nothing,
    # the insert hits the unique key, and only the savepoint is undone (on PostgreSQL an error
    # otherwise aborts the whole transaction and the caller's later statements fail).
    real_select = outbox.select
    monkeypatch.setattr(outbox, "select", lambda *columns: real_select(*columns).where(false()))
    with session_scope(db_url) as session:
        assert outbox.enqueue(session, dedupe_key="k", kind="freshness", subject="s", text="t", now=now) is None
        assert outbox.enqueue(session, dedupe_key="k2", kind="freshness", subject="s", text="t", now=now) is not None
        assert session.scalar(select(func.count(models.Alert.id))) == 2
    assert [a.dedupe_key for a in _alerts(db_url)] == ["k", "k2"]
    with pytest.raises(ValueError, match="kind 'nope'"):
        with session_scope(db_url) as session:
            outbox.enqueue(session, dedupe_key="x", kind="nope", subject="s", text="t")


# --- freshness -------------------------------------------------------------------------------

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


def test_freshness_rules_name_the_numbers():
    result = freshness.evaluate(now=NOW, upcoming=[NOW + timedelta(days=1.4), NOW - timedelta(days=1)],
                                awaiting_approval=2, unposted=1, posts_per_week=3, min_days=3)
    assert not result.calendar_ok and result.scheduled == 1 and result.covered_days == pytest.approx(1.4)
    assert result.calendar_text == "1 scheduled post covers 1.4 days ahead (< 3); 2 more await approval"
    assert result.runway_days == pytest.approx(7 / 3) and not result.library_ok
    assert result.library_text == "1 approved unposted image lasts 2.3 days at 3 posts/week (< 3)"

    none = freshness.evaluate(now=NOW, upcoming=[], awaiting_approval=0, unposted=7, posts_per_week=7, min_days=3)
    assert (none.calendar_ok, none.covered_days, none.library_ok, none.runway_days) == (False, 0.0, True, 7.0)
    assert none.calendar_text == "no posts scheduled ahead (0 days < 3)"

    idle = freshness.evaluate(now=NOW, upcoming=[], awaiting_approval=0, unposted=0, posts_per_week=0, min_days=3)
    assert idle.calendar_ok and idle.library_ok and idle.runway_days == float("inf")

    edge = freshness.evaluate(now=NOW, upcoming=[NOW + timedelta(days=3)], awaiting_approval=0, unposted=3,
                              posts_per_week=7, min_days=3)
    assert edge.calendar_ok and edge.library_ok and "(>= 3)" in edge.calendar_text


def _persona(db_url: str, tmp_path, slug: str = "tester", **overrides) -> int:
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, slug, photos=0, **overrides)
    with session_scope(db_url) as session:
        row = registry.sync_persona(session, load_persona(folder))
        session.flush()
        return row.id


def _post(db_url: str, persona_id: int, at: datetime, status: str = "scheduled") -> None:
    with session_scope(db_url) as session:
        session.add(models.Post(persona_id=persona_id, account=f"outbox:{persona_id}", status=status, caption="c",
                                hashtags=[], scheduled_at=at))


def _items(db_url: str, persona_id: int, count: int, status: str = "available", start: int = 0) -> None:
    with session_scope(db_url) as session:
        for i in range(start, start + count):
            session.add(models.LibraryItem(persona_id=persona_id, kind="winner", image_path=f"/x/{i}.png",
                                           image_sha256=f"{i:064x}", status=status))


def _freshness(db_url: str, slug: str, now: datetime, min_days: float = 3.0) -> freshness.FreshnessResult:
    with session_scope(db_url) as session:
        row = registry.get_persona(session, slug)
        return persona_freshness(session, row, PersonaConfig.model_validate(row.settings), now, min_days)


def test_library_runway_counts_available_items_at_the_posting_rate(db_url, tmp_path):
    persona_id = _persona(db_url, tmp_path, "runner", strategy={"posts_per_week": 7})
    now = datetime.now(timezone.utc)
    _items(db_url, persona_id, 2)
    _items(db_url, persona_id, 5, status="used", start=100)  # posted: no longer runway
    result = _freshness(db_url, "runner", now)
    assert (result.unposted, result.runway_days, result.library_ok) == (2, 2.0, False)
    _items(db_url, persona_id, 1, start=10)
    assert _freshness(db_url, "runner", now).library_ok  # 3 images at 1/day = 3 days
    # live posts ahead count; drafts, awaiting approval and past slots do not
    _post(db_url, persona_id, now + timedelta(days=2))
    _post(db_url, persona_id, now + timedelta(days=9), status="awaiting_approval")
    _post(db_url, persona_id, now - timedelta(days=1), status="publishing")
    result = _freshness(db_url, "runner", now)
    assert result.covered_days == pytest.approx(2.0, abs=0.01) and not result.calendar_ok
    assert result.awaiting_approval == 1 and "1 more await approval" in result.calendar_text
    assert _freshness(db_url, "runner", now, min_days=1.5).calendar_ok


def _tick(db_url: str, webhook: AlertWebhook):
    with dg.build_sensor_context(resources=_resources(db_url, webhook)) as context:
        return alert_sensor(context)


def test_a_stale_persona_is_alerted_once_per_episode_and_its_recovery_once(db_url, tmp_path, hook):
    persona_id = _persona(db_url, tmp_path, "stale", strategy={"posts_per_week": 7})
    webhook = _webhook(hook)
    for _ in range(3):
        result = _tick(db_url, webhook)
    assert "0 new problem(s)" in result.skip_reason.skip_message  # the last of the three ticks
    assert len(hook.delivered) == 2  # calendar and library, once each
    calendar, library = sorted(hook.delivered, key=lambda m: _section(m))
    assert "*Job/asset:* post_calendar/calendar_covers_ahead" in _section(calendar)
    assert "no posts scheduled ahead (0 days < 3)" in calendar["text"]  # the one-liner; blocks escape "<"
    assert "no posts scheduled ahead (0 days &lt; 3)" in _section(calendar)
    assert "0 approved unposted images last 0.0 days at 7 posts/week (< 3)" in library["text"]
    assert f"<{UI}/assets/post_calendar?partition=stale|View in Dagster>" in _section(calendar)
    assert "*Persona:* stale" in _section(calendar)

    now = datetime.now(timezone.utc)
    _post(db_url, persona_id, now + timedelta(days=4))
    for _ in range(2):
        _tick(db_url, webhook)
    resolved = hook.delivered[2:]
    assert len(resolved) == 1 and "passes again" in _section(resolved[0])
    assert "calendar_covers_ahead" in _section(resolved[0]) and "Content back on track" in resolved[0]["text"]
    [episode] = _alerts(db_url, kind="freshness", subject="post_calendar/calendar_covers_ahead")
    assert episode.resolved_at is not None

    _items(db_url, persona_id, 3)  # 3 days at one a day: the library recovers too
    _tick(db_url, webhook)
    assert len(hook.delivered) == 4 and "library_runway passes again" in _section(hook.delivered[3])

    with session_scope(db_url) as session:  # stale again: a new episode, alerted again
        session.execute(models.Post.__table__.delete())
    _tick(db_url, webhook)
    _tick(db_url, webhook)
    assert len(hook.delivered) == 5 and "calendar_covers_ahead failing" in _section(hook.delivered[4])
    assert len(_alerts(db_url, kind="freshness", subject="post_calendar/calendar_covers_ahead")) == 2


def test_a_persona_that_does_not_post_is_fresh_and_inactive_ones_are_skipped(db_url, tmp_path, hook):
    _persona(db_url, tmp_path, "quiet", strategy={"posts_per_week": 0})
    gone_id = _persona(db_url, tmp_path, "gone")
    with session_scope(db_url) as session:
        session.get(models.Persona, gone_id).active = False
    _tick(db_url, _webhook(hook))
    assert hook.received == [] and _alerts(db_url) == []


def test_alerts_off_records_and_sends_nothing(failed_run, db_url, tmp_path, hook):
    _persona(db_url, tmp_path, "stale")
    off = _webhook(None)
    assert _tick(db_url, off).skip_reason.skip_message == "ALERT_WEBHOOK_URL is not set"
    _evaluate_run_failure(failed_run, db_url, off)
    settings = make_settings(tmp_path, db_url)
    (settings.datasets_dir / "stale" / "persona.yaml").write_text("name: x\ntimezone: Nowhere/City\n")
    with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                 resources={**build_resources(settings), "alerts": off}) as context:
        persona_sensor(context)
    assert _alerts(db_url) == [] and hook.received == []
    assert outbox.deliver_due(AppDatabase(url=db_url), off) == {"sent": 0, "retrying": 0, "failed": 0, "left": 0}


# --- the asset checks ------------------------------------------------------------------------

def _checks(tmp_path, db_url: str, slug: str) -> dict[str, dg.AssetCheckEvaluation]:
    settings = make_settings(tmp_path, db_url)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", [slug])
    result = dg.materialize([post_calendar, calendar_covers_ahead, library_runway], partition_key=slug,
                            instance=instance, resources={**build_resources(settings),
                                                          "freshness": FreshnessRules(min_days_ahead=3.0)})
    assert result.success
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_freshness_checks_on_a_materialised_post_calendar(db_url, tmp_path):
    persona_id = _persona(db_url, tmp_path, "cal", strategy={"posts_per_week": 7})
    now = datetime.now(timezone.utc)
    _post(db_url, persona_id, now + timedelta(days=1, hours=12))
    _items(db_url, persona_id, 2)
    checks = _checks(tmp_path, db_url, "cal")
    calendar, library = checks["calendar_covers_ahead"], checks["library_runway"]
    assert not calendar.passed and calendar.severity == dg.AssetCheckSeverity.WARN
    assert calendar.metadata["covered_days"].value == pytest.approx(1.5, abs=0.01)
    assert calendar.metadata["min_days"].value == 3.0 and calendar.metadata["scheduled"].value == 1
    assert "1.5 days ahead (< 3)" in calendar.description
    assert not library.passed and library.metadata["runway_days"].value == 2.0
    assert library.metadata["unposted"].value == 2 and library.metadata["posts_per_week"].value == 7
    assert "2 approved unposted images last 2.0 days at 7 posts/week (< 3)" == library.description

    _post(db_url, persona_id, now + timedelta(days=5))
    _items(db_url, persona_id, 2, start=50)
    checks = _checks(tmp_path, db_url, "cal")
    assert checks["calendar_covers_ahead"].passed and checks["library_runway"].passed
    assert checks["calendar_covers_ahead"].metadata["covered_days"].value == pytest.approx(5.0, abs=0.01)
    assert checks["library_runway"].metadata["runway_days"].value == 4.0


def test_freshness_checks_pass_for_a_persona_that_does_not_post(db_url, tmp_path):
    _persona(db_url, tmp_path, "idle", strategy={"posts_per_week": 0})
    checks = _checks(tmp_path, db_url, "idle")
    assert checks["calendar_covers_ahead"].passed and checks["library_runway"].passed
    assert checks["library_runway"].metadata["runway_days"].value == "unlimited (posts_per_week is 0)"


# --- persona files ---------------------------------------------------------------------------

def test_a_bad_persona_file_is_alerted_once_per_error_and_a_removal_once(db_url, tmp_path, hook):
    settings = make_settings(tmp_path, db_url)
    write_persona(settings.datasets_dir, "good", photos=0)
    bad = write_persona(settings.datasets_dir, "bad", photos=0)
    instance = dg.DagsterInstance.ephemeral()
    resources = {**build_resources(settings), "alerts": _webhook(hook)}

    def tick(cursor=None):
        with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
            result = persona_sensor(context)
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return result.cursor

    cursor = tick()
    assert hook.received == []  # all good: nothing to say
    (bad / "persona.yaml").write_text("name: x\ntimezone: Nowhere/City\n")
    for _ in range(3):
        cursor = tick(cursor)
    assert len(hook.delivered) == 1
    text = _section(hook.delivered[0])
    assert "*Persona:* bad" in text and "persona.yaml" in text and "Nowhere/City" in text

    (bad / "persona.yaml").write_text("name: x\ntimezone: Mars/Base\n")  # a different error: sent again
    cursor = tick(cursor)
    cursor = tick(cursor)
    assert len(hook.delivered) == 2 and "Mars/Base" in _section(hook.delivered[1])

    shutil.rmtree(settings.datasets_dir / "good")
    cursor = tick(cursor)
    cursor = tick(cursor)
    assert len(hook.delivered) == 3
    assert "*Persona:* good" in _section(hook.delivered[2])
    assert "schedules stopped, partition kept for history" in _section(hook.delivered[2])
    assert "good" in instance.get_dynamic_partitions("personas")
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count(models.Alert.id)).where(models.Alert.kind == "persona_file")) == 3
