"""Security, measured: secrets never reach logs, run records, the app database or files; the review
form's login, session cookie and CSRF hold against every route; /media never serves a file from
outside PERSONA_HOME or a non-image inside it. All on PostgreSQL, over real HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, quote_plus

import dagster as dg
import itsdangerous
import pytest
import requests
import sqlalchemy as sa
from dagster._serdes import serialize_value
from sqlalchemy import func, select

from persona_pipeline.assets.source_photos import source_photos
from persona_pipeline.assets.training_dataset import training_dataset
from persona_pipeline.automation.alerts import run_failure_alerts
from persona_pipeline.automation.publishing import publish_job
from persona_pipeline.cli import review_secret
from persona_pipeline.db import alerts as alert_outbox
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import get_engine, session_scope
from persona_pipeline.definitions import build_resources
from persona_pipeline.personas import load_persona
from persona_pipeline.resources import instagram
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.review.app import ReviewConfig, create_app
from persona_pipeline.settings import Settings
from persona_pipeline_tests.conftest import make_database, write_persona
from persona_fakes.gemini import FakeGemini
from persona_fakes.graph import Fault, FakeGraphAPI, MediaServer
from persona_fakes.webhook import SECRET_PATH, FakeWebhook
from persona_pipeline_tests.review_fixtures import ReviewSeed, seed_review, serve_app
from persona_pipeline_tests.test_publishing import Log, World
from persona_pipeline_tests.test_publishing import posts as due_posts
from persona_pipeline_tests.test_review_form import csrf_of

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# --------------------------------------------------------------------------- secrets

GEMINI_KEY = "AIzaSyCensus-gemini-key-Qx7Rt2Lm9"
IG_ENV, IG_TOKEN = "SECTEST_IG_TOKEN_ANNA", "EAAGsecret-anna-token-Wd83hZk21"
IG_ENV_REVOKED, IG_TOKEN_REVOKED = "SECTEST_IG_TOKEN_BEA", "EAAGsecret-bea-revoked-token-Ty5"
USER_ANNA, USER_BEA = "17841400000000071", "17841400000000072"
REVIEW_TOKEN = "review-secret-token-Hq83LmZp"
REVIEW_KEY = "cookie-signing-secret-Vb62Np0qXs"
DB_PASSWORD = "PGpass+Secret/9zK"  # '+' and '/' so that its URL-encoded form differs


def _variants(secret: str) -> set[str]:
    """The secret as it is and as it looks URL-encoded (query strings, SQLAlchemy URLs)."""
    return {secret, quote(secret, safe=""), quote_plus(secret)}


@dataclass
class Scan:
    """Where a secret could end up, scanned: bytes and records looked at, and every hit."""

    secrets: dict[str, str]
    bytes_scanned: int = 0
    records: int = 0
    hits: list[str] = None

    def __post_init__(self) -> None:
        self.hits = []
        self._needles = [(name, v.encode()) for name, secret in self.secrets.items() for v in _variants(secret)]

    def text(self, where: str, value: str | bytes) -> None:
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        self.bytes_scanned += len(data)
        self.records += 1
        for name, needle in self._needles:
            at = data.find(needle)
            if at >= 0:  # the hit with its surroundings, so that a failure shows where it came from
                context = data[max(0, at - 120): at + len(needle) + 40].decode("utf-8", "replace")
                self.hits.append(f"{name} in {where}: ...{context}...")

    def files(self, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                self.text(str(path), path.read_bytes())


def _scan_instance(scan: Scan, instance: dg.DagsterInstance) -> int:
    """Every run (config, tags) and every event log record of the instance, serialised."""
    runs = instance.get_runs()
    for run in runs:
        scan.text(f"run {run.run_id}", serialize_value(run))
        for record in instance.all_logs(run.run_id):
            scan.text(f"event of run {run.run_id}", serialize_value(record))
    return len(runs)


def _scan_database(scan: Scan, url: str) -> int:
    """Every value of every column of every table of the application database, as text."""
    engine = get_engine(url)
    metadata = sa.MetaData()
    metadata.reflect(engine)
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                scan.text(f"table {table.name}", "\x1f".join("" if v is None else str(v) for v in row))
    return len(metadata.sorted_tables)


@pytest.fixture
def secret_world(tmp_path, monkeypatch):
    """Every secret setting set to a distinctive value, the fakes running, a file-backed Dagster
    instance, PostgreSQL for the app (its URL with a password: the local server trusts it)."""
    plain_url, drop = make_database("postgresql", tmp_path)
    url = sa.engine.make_url(plain_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    public = tmp_path / "public"
    public.mkdir()
    monkeypatch.setattr(instagram, "sleep", lambda s: None)  # the Graph client's backoffs
    from persona_pipeline.resources import gemini as gemini_module
    monkeypatch.setattr(gemini_module, "sleep", lambda s: None)  # Gemini's backoffs
    with FakeGemini(api_key=GEMINI_KEY) as gemini, FakeGraphAPI(accounts={USER_ANNA: IG_TOKEN}) as graph, \
            MediaServer(public) as media, FakeWebhook() as hook:
        env = {
            "PERSONA_HOME": str(tmp_path / "home"), "PERSONA_DATASETS_DIR": str(tmp_path / "datasets"),
            "DAGSTER_HOME": str(dagster_home), "PERSONA_DATABASE_URL": url,
            "GEMINI_API_KEY": GEMINI_KEY, "GEMINI_BASE_URL": gemini.url,
            "PERSONA_PUBLISHER": "instagram", "INSTAGRAM_GRAPH_URL": graph.url, "MEDIA_PUBLIC_BASE_URL": media.url,
            "MEDIA_PUBLIC_DIR": str(public), "ALERT_WEBHOOK_URL": hook.url,
            "REVIEW_TOKENS": f"alice:{REVIEW_TOKEN}", "REVIEW_SECRET_KEY": REVIEW_KEY,
            IG_ENV: IG_TOKEN, IG_ENV_REVOKED: IG_TOKEN_REVOKED,
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        (tmp_path / "datasets").mkdir()
        try:
            yield dict(tmp=tmp_path, url=url, dagster_home=dagster_home, public=public, gemini=gemini, graph=graph,
                       media=media, hook=hook)
        finally:
            get_engine(url).dispose()
            drop()


def _failed_run_context(instance: dg.DagsterInstance, run_id: str, resources: dict):
    run = instance.get_run_by_id(run_id)
    event = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0].dagster_event
    return dg.build_run_status_sensor_context(sensor_name="run_failure_alerts", dagster_instance=instance, dagster_run=run,
                                              dagster_event=event, resources=resources).for_run_failure()


def test_secrets_never_reach_logs_runs_database_or_files(secret_world, caplog, capfd, figure) -> None:
    caplog.set_level(logging.DEBUG)
    w = secret_world
    settings = Settings.from_env()
    resources = build_resources(settings)
    instance = dg.DagsterInstance.from_config(str(w["dagster_home"]))
    failed_runs: list[str] = []

    # A persona whose photos Gemini captions (no sidecars), posting to Instagram.
    anna = write_persona(settings.datasets_dir, "anna", photos=10, instagram={"user_id": USER_ANNA, "token_env": IG_ENV},
                         training={"captioner": "gemini", "min_photos": 10})
    for sidecar in (anna / "photos").glob("*.txt"):
        sidecar.unlink()
    bea = write_persona(settings.datasets_dir, "bea", photos=0, instagram={"user_id": USER_BEA, "token_env": IG_ENV_REVOKED})
    with session_scope(w["url"]) as session:
        anna_id = registry.sync_persona(session, load_persona(anna)).id
        bea_id = registry.sync_persona(session, load_persona(bea)).id
    instance.add_dynamic_partitions("personas", ["anna", "bea"])

    # 1. Captioning: Gemini refuses the first photo (400), the run fails naming it.
    w["gemini"].fail(400, "API key not valid. Please pass a valid API key.")
    first = dg.materialize([source_photos, training_dataset], partition_key="anna", instance=instance,
                           resources=resources, raise_on_error=False)
    assert not first.success
    failed_runs.append(first.run_id)
    # 2. Again, through a 503 and a dropped answer (retried), to the end.
    w["gemini"].fail(503)
    second = dg.materialize([source_photos, training_dataset], partition_key="anna", instance=instance,
                            resources=resources, raise_on_error=False)
    assert second.success
    assert sum(1 for r in w["gemini"].requests if r.headers.get("x-goog-api-key") == GEMINI_KEY) >= 10

    # 3. Publishing through transient Graph failures: a 500 on create, a dropped status poll
    #    (its URL holds the token), a Graph error whose message echoes the token.
    world = World(w["url"], w["tmp"], w["graph"], w["media"], w["public"], Log())
    due_posts(world, anna_id, "anna", USER_ANNA, 2)
    w["graph"].inject("create", Fault.http(500))
    w["graph"].inject("status", Fault.drop())
    w["graph"].inject("publish", Fault.graph(2, transient=True, status=500,
                                             message=f"Service temporarily unavailable for access_token={IG_TOKEN}"))
    published = publish_job.execute_in_process(instance=instance, resources=resources, raise_on_error=False)
    assert published.success and w["graph"].publish_count(USER_ANNA) == 2
    # 4. An account whose token Instagram does not know (190): the run fails.
    due_posts(world, bea_id, "bea", USER_BEA, 1)
    refused = publish_job.execute_in_process(instance=instance, resources=resources, raise_on_error=False)
    assert not refused.success
    failed_runs.append(refused.run_id)

    # 5. Alerts for the failed runs: the webhook down (connection refused), then a 500 echoing
    #    its path, then delivered.
    alert_resources = {"database": resources["database"], "alerts": resources["alerts"]}
    w["hook"].stop()
    run_failure_alerts(_failed_run_context(instance, failed_runs[0], alert_resources))
    w["hook"].start()
    w["hook"].respond(500, body=f"upstream error for POST {SECRET_PATH}")
    run_failure_alerts(_failed_run_context(instance, failed_runs[1], alert_resources))
    later = datetime.now(timezone.utc) + timedelta(days=1)
    with dg.build_resources({"alerts": resources["alerts"]}) as built:  # ALERT_WEBHOOK_URL resolved, as in a sensor
        counts = alert_outbox.deliver_due(AppDatabase(url=w["url"]), built.alerts, now=later)
    assert counts["sent"] == 2 and len(w["hook"].delivered) == 2

    # 6. The review form as `persona-pipeline review` builds it: a wrong token, then a login.
    config = ReviewConfig(database_url=w["url"], home=settings.home, tokens=settings.reviewer_tokens(),
                          secret_key=review_secret(settings))
    from starlette.testclient import TestClient
    client = TestClient(create_app(config))
    page = client.get("/login")
    assert client.post("/login", data={"csrf_token": csrf_of(page.text), "token": REVIEW_TOKEN[::-1]}).status_code == 401
    page = client.get("/login")
    assert client.post("/login", data={"csrf_token": csrf_of(page.text), "token": REVIEW_TOKEN}, follow_redirects=False).status_code == 303
    assert client.get("/").status_code == 200

    # The scan.
    secrets = {"GEMINI_API_KEY": GEMINI_KEY, IG_ENV: IG_TOKEN, IG_ENV_REVOKED: IG_TOKEN_REVOKED, "REVIEW_TOKENS": REVIEW_TOKEN,
               "REVIEW_SECRET_KEY": REVIEW_KEY, "ALERT_WEBHOOK_URL": SECRET_PATH, "PERSONA_DATABASE_URL password": DB_PASSWORD}
    scan = Scan(secrets)
    runs = _scan_instance(scan, instance)
    scan.files(w["dagster_home"])  # run and event storage, compute logs
    scan.files(settings.home)  # photos, datasets, quarantine, outbox, reports...
    scan.files(w["public"])
    tables = _scan_database(scan, w["url"])
    # Python logging at INFO and above (what a deployment runs at); DEBUG records are scanned
    # apart, because urllib3 logs each request line there, query string included.
    debug = Scan(secrets)
    for record in caplog.records:
        text = logging.Formatter().format(record)
        (scan if record.levelno >= logging.INFO else debug).text(f"python logging {record.name} {record.levelname}", text)
    captured = capfd.readouterr()
    scan.text("stdout", captured.out)
    scan.text("stderr", captured.err)
    instance.dispose()

    assert runs >= 4 and tables >= 10 and scan.records > 100  # the scan looked where the secrets would be
    # The failures did happen: the 500 and two deliveries reached the webhook, Gemini answered
    # 400 and 503 before the captions, the Graph API refused bea's token.
    assert len(w["hook"].received) == 3
    assert w["graph"].publish_count(USER_BEA) == 0
    debug_secrets = sorted({hit.split(" in ", 1)[0] for hit in debug.hits})
    figure("security", "secrets in logs, run records, app DB and files after failing Gemini, Graph and webhook calls",
           f"{len(secrets)} secrets, {scan.records} records / {scan.bytes_scanned} bytes scanned, {len(scan.hits)} hits; "
           f"DEBUG-level logging (urllib3 request lines): {len(debug.hits)} hits of {', '.join(debug_secrets) or 'no secret'}",
           secrets=len(secrets), runs=runs, tables=tables, records_scanned=scan.records,
           bytes_scanned=scan.bytes_scanned, hits=len(scan.hits), debug_records=debug.records,
           debug_hits=len(debug.hits))
    assert scan.hits == []


# --------------------------------------------------------------------------- the review form over uvicorn

TOKENS = {"alice-security-token-0123": "alice", "bob-security-token-45678": "bob"}
SECRET_KEY = "security-test-signing-key-0123456789"
OUTSIDE_MARK = b"OUTSIDE-HOME-SECRET-7c1f"
KEY_MARK = b"REVIEW-KEY-FILE-SECRET-91ab"
DB_MARK = b"SQLITE-FILE-SECRET-e4d2"


@dataclass
class Served:
    base: str
    port: int
    url: str
    home: Path
    outside: Path
    seed: ReviewSeed


LOGIN_MAX_FAILURES = 10
LOGIN_WINDOW_S = 3.0


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """The review form under real uvicorn on a free port, on PostgreSQL, with files outside
    PERSONA_HOME and secrets inside it to be refused."""
    folder = tmp_path_factory.mktemp("security")
    url, drop = make_database("postgresql", folder)
    home = folder / "home"
    home.mkdir()
    outside = folder / "outside"
    outside.mkdir()
    try:
        seed = seed_review(url, home, candidates=4, steps=2, posts=1)
        from PIL import Image

        Image.new("RGB", (32, 32), (1, 2, 3)).save(outside / "secret.png")
        with (outside / "secret.png").open("ab") as handle:
            handle.write(OUTSIDE_MARK)  # a valid PNG carrying a marker we can look for
        (outside / "secret.txt").write_bytes(OUTSIDE_MARK)
        (home / "review_secret.key").write_bytes(KEY_MARK)
        (home / "persona.db").write_bytes(DB_MARK)
        (home / "escape.png").symlink_to(outside / "secret.png")  # inside home, pointing outside
        (home / "key.png").symlink_to(home / "review_secret.key")  # an image name for a non-image
        # the login throttle as configured by default but with a short window, so the test can wait it out
        app = create_app(ReviewConfig(database_url=url, home=home, tokens=TOKENS, secret_key=SECRET_KEY,
                                      login_max_failures=LOGIN_MAX_FAILURES, login_window_s=LOGIN_WINDOW_S))
        with serve_app(app) as (base, port):
            yield Served(base, port, url, home, outside, seed)
    finally:
        drop()


def _login(served: Served, token: str = "alice-security-token-0123") -> tuple[requests.Session, str]:
    """A logged-in session and its CSRF token."""
    session = requests.Session()
    page = session.get(f"{served.base}/login")
    response = session.post(f"{served.base}/login", data={"csrf_token": csrf_of(page.text), "token": token, "next": "/"},
                            allow_redirects=False)
    assert response.status_code == 303, response.text
    home = session.get(f"{served.base}/")
    assert home.status_code == 200
    return session, csrf_of(home.text)


def _state(url: str) -> tuple:
    with session_scope(url) as session:
        return tuple(session.scalar(select(func.count()).select_from(model))
                     for model in (models.Vote, models.ReviewEvent, models.PairOffer)) + tuple(
            (s.status, s.top_k) for s in session.scalars(select(models.RunStep).order_by(models.RunStep.id))) + tuple(
            (p.status, p.caption) for p in session.scalars(select(models.Post).order_by(models.Post.id))) + tuple(
            c.status for c in session.scalars(select(models.Candidate).order_by(models.Candidate.id))) + tuple(
            (o.outcome, o.shown_at) for o in session.scalars(select(models.PairOffer).order_by(models.PairOffer.id)))


def _routes(served: Served) -> list[tuple[str, str, dict]]:
    """(method, path, form/json body) for every route of the app but /login and /static."""
    s = served.seed
    image = "/media/" + quote(str(Path(_candidate_path(served, s.candidate_ids[0])).relative_to(served.home)))
    return [
        ("GET", "/", {}), ("GET", f"/steps/{s.step_ids[0]}/vote", {}), ("GET", f"/steps/{s.step_ids[0]}", {}),
        ("GET", "/posts", {}), ("GET", "/audit", {}), ("GET", image, {}), ("GET", f"/api/steps/{s.step_ids[0]}/pair", {}),
        ("POST", "/logout", {}), ("POST", f"/steps/{s.step_ids[0]}/approve", {"top_k": "2"}),
        ("POST", f"/runs/{s.run_id}/winner", {"candidate_id": str(s.candidate_ids[0]), "step_id": str(s.step_ids[0])}),
        ("POST", f"/candidates/{s.candidate_ids[1]}/kill", {"reason": "x"}),
        ("POST", f"/posts/{s.post_ids[0]}/approve", {}), ("POST", f"/posts/{s.post_ids[0]}/edit", {"caption": "pwned", "hashtags": ""}),
        ("POST", f"/posts/{s.post_ids[0]}/reject", {"reason": "x"}),
        ("POST", "/api/votes", {"offer_id": 1, "winner_id": s.candidate_ids[0], "loser_id": s.candidate_ids[1]}),
        ("POST", "/api/offers/1/shown", {}), ("POST", "/api/offers/1/skip", {}),
        ("POST", f"/api/candidates/{s.candidate_ids[2]}/kill", {}),
    ]


def _candidate_path(served: Served, candidate_id: int) -> str:
    with session_scope(served.url) as session:
        return session.get(models.Candidate, candidate_id).image_path


def _send(session: requests.Session, served: Served, method: str, path: str, body: dict, headers: dict | None = None,
          csrf: str | None = None) -> requests.Response:
    url = served.base + path
    if method == "GET":
        return session.get(url, headers=headers, allow_redirects=False)
    if path.startswith("/api/"):
        return session.post(url, json=body, headers={**(headers or {}), **({"X-CSRF-Token": csrf} if csrf else {})},
                            allow_redirects=False)
    data = {**body, **({"csrf_token": csrf} if csrf else {})}
    return session.post(url, data=data, headers=headers, allow_redirects=False)


def _accepted(response: requests.Response) -> bool:
    """The request did what it asked: a 2xx, or a redirect anywhere but the login page."""
    if 200 <= response.status_code < 300:
        return True
    return 300 <= response.status_code < 400 and "/login" not in response.headers.get("location", "")


def _signed_cookie(key: str, data: dict) -> str:
    """A session cookie as Starlette's SessionMiddleware makes it, signed with `key`."""
    payload = base64.b64encode(json.dumps(data).encode())
    return itsdangerous.TimestampSigner(key).sign(payload).decode()


def test_review_auth_holds_on_every_route(served: Served, figure) -> None:
    routes = _routes(served)
    before = _state(served.url)
    _, good_csrf = _login(served)  # a real session's CSRF token, to be replayed by attackers
    alice, alice_csrf = _login(served)
    valid_cookie = alice.cookies.get("review_session")
    forged_csrf = "A" * 43

    def anonymous() -> requests.Session:
        return requests.Session()

    def with_cookie(value: str) -> requests.Session:
        session = requests.Session()
        session.cookies.set("review_session", value, domain="127.0.0.1", path="/")
        return session

    def wrong_token() -> requests.Session:
        session = requests.Session()
        page = session.get(f"{served.base}/login")
        response = session.post(f"{served.base}/login", data={"csrf_token": csrf_of(page.text), "token": "alice-security-token-0124"},
                                allow_redirects=False)
        assert response.status_code in (401, 429)  # refused; 429 once the login throttle holds the address back
        return session

    payload, _, signature = valid_cookie.partition(".")
    tampered_payload = base64.b64encode(json.dumps({"reviewer": "bob", "csrf": forged_csrf}).encode()).decode()
    attackers = {
        "no session": (anonymous, forged_csrf),
        "wrong token": (wrong_token, forged_csrf),
        "unsigned cookie": (lambda: with_cookie(base64.b64encode(json.dumps({"reviewer": "alice", "csrf": forged_csrf}).encode()).decode()),
                            forged_csrf),
        "tampered cookie": (lambda: with_cookie(tampered_payload + "." + signature), forged_csrf),
        "truncated signature": (lambda: with_cookie(valid_cookie[:-4]), alice_csrf),
        "cookie signed with another key": (lambda: with_cookie(_signed_cookie("another-key-0123456789abcdef",
                                                                              {"reviewer": "alice", "csrf": forged_csrf})), forged_csrf),
        "reviewer not in REVIEW_TOKENS": (lambda: with_cookie(_signed_cookie(SECRET_KEY, {"reviewer": "mallory", "csrf": forged_csrf})),
                                          forged_csrf),
    }
    tried = accepted = 0
    accepted_list = []
    for name, (make, csrf) in attackers.items():
        for method, path, body in routes:
            response = _send(make(), served, method, path, body, csrf=csrf)
            tried += 1
            if _accepted(response):
                accepted += 1
                accepted_list.append(f"{name}: {method} {path} -> {response.status_code}")
    # CSRF: a logged-in reviewer's POSTs without the token, with a wrong one, with another session's.
    csrf_tried = 0
    for label, csrf in (("missing", None), ("wrong", forged_csrf), ("another session's", good_csrf)):
        for method, path, body in routes:
            if method != "POST":
                continue
            response = _send(alice, served, method, path, body, csrf=csrf)
            tried += 1
            csrf_tried += 1
            accepted += _accepted(response)
            if response.status_code != 403:  # refused for the CSRF token, not for something else
                accepted_list.append(f"CSRF {label}: {method} {path} -> {response.status_code}")
    # Methods the routes do not allow.
    method_tried = 0
    for method, path in (("DELETE", "/"), ("PUT", f"/posts/{served.seed.post_ids[0]}/approve"), ("GET", "/api/votes"),
                         ("PATCH", f"/steps/{served.seed.step_ids[0]}"), ("GET", "/logout"), ("DELETE", "/api/votes")):
        response = alice.request(method, served.base + path, headers={"X-CSRF-Token": alice_csrf}, allow_redirects=False)
        tried += 1
        method_tried += 1
        if response.status_code != 405:
            accepted_list.append(f"{method} {path} -> {response.status_code}")
            accepted += 1
    assert accepted_list == [] and accepted == 0
    assert _state(served.url) == before  # nothing any attacker sent changed a row
    # The control: the logged-in reviewer with the right CSRF token does get in.
    pair = alice.get(f"{served.base}/api/steps/{served.seed.step_ids[0]}/pair")
    assert pair.status_code == 200 and alice.get(served.base + pair.json()["left"]["url"]).status_code == 200

    # Login brute force: wrong tokens as fast as one client can send them.
    brute = requests.Session()
    page = brute.get(f"{served.base}/login")
    csrf = csrf_of(page.text)
    statuses: list[int] = []
    retry_afters: list[int] = []
    started = time.perf_counter()
    for i in range(60):
        answer = brute.post(f"{served.base}/login", data={"csrf_token": csrf, "token": f"guess-{i:04d}-xxxxxxxxxxxx"},
                            allow_redirects=False)
        statuses.append(answer.status_code)
        if answer.status_code == 429:
            retry_afters.append(int(answer.headers["Retry-After"]))
    elapsed = time.perf_counter() - started
    limited = sum(1 for s in statuses if s == 429)
    guessed = sum(1 for s in statuses if s == 303)
    evaluated = statuses.count(401)  # guesses actually checked against the tokens
    assert guessed == 0 and set(statuses) <= {401, 429}
    # at most LOGIN_MAX_FAILURES guesses per window are even checked; the rest wait
    assert evaluated <= LOGIN_MAX_FAILURES and limited >= len(statuses) - LOGIN_MAX_FAILURES
    assert retry_afters and all(1 <= wait <= LOGIN_WINDOW_S + 1 for wait in retry_afters), retry_afters
    # While the address is held back, even the right token waits; after Retry-After it logs in.
    held = brute.post(f"{served.base}/login", data={"csrf_token": csrf, "token": "bob-security-token-45678"}, allow_redirects=False)
    assert held.status_code == 429
    time.sleep(int(held.headers["Retry-After"]) + 0.2)
    ok = brute.post(f"{served.base}/login", data={"csrf_token": csrf, "token": "bob-security-token-45678"}, allow_redirects=False)
    assert ok.status_code == 303
    rate = len(statuses) / elapsed
    figure("security", "review form: no session, wrong token, forged/tampered/foreign-key cookies, bad CSRF, wrong methods",
           f"{accepted} of {tried} attacks accepted across {len(routes)} routes; login brute force "
           f"{'rate limited' if limited else 'NOT rate limited'} ({evaluated} of {len(statuses)} guesses checked, {limited} answered "
           f"429 with Retry-After <= {max(retry_afters)} s; the right token got in after the wait)",
           routes=len(routes), attackers=len(attackers), attacks_tried=tried, attacks_accepted=accepted,
           csrf_attacks=csrf_tried, method_attacks=method_tried, brute_force_attempts=len(statuses),
           brute_force_429=limited, guesses_checked=evaluated, attempts_per_s=round(rate, 1))


def _raw_get(served: Served, target: str, cookie: str) -> tuple[int, bytes]:
    """GET with the request target sent byte for byte (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.putheader("Cookie", f"review_session={cookie}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_media_never_serves_outside_home_or_non_images(served: Served, figure) -> None:
    alice, _ = _login(served)
    cookie = alice.cookies.get("review_session")
    home, outside = served.home, served.outside
    rel_out = Path("..") / outside.name / "secret.png"
    # A candidate row whose image_path points outside home: its URL must not be offered.
    with session_scope(served.url) as session:
        candidate = session.get(models.Candidate, served.seed.candidate_ids[3])
        saved_path = candidate.image_path
        candidate.image_path = str(outside / "secret.png")
    try:
        gallery = alice.get(f"{served.base}/steps/{served.seed.step_ids[0]}")
        assert gallery.status_code == 200
        offered_outside = int("secret.png" in gallery.text or str(outside) in gallery.text)
        pair_urls: dict[int, str | None] = {}
        exclude: list[int] = []
        for _ in range(6):  # the pairs of the step, as the vote page preloads them
            query = f"?exclude={','.join(map(str, exclude))}" if exclude else ""
            pair = alice.get(f"{served.base}/api/steps/{served.seed.step_ids[0]}/pair{query}").json()
            if "left" not in pair:
                break
            exclude.append(pair["offer_id"])
            pair_urls.update({pair[side]["id"]: pair[side]["url"] for side in ("left", "right")})
        assert served.seed.candidate_ids[3] in pair_urls  # the moved candidate was offered...
        offered_outside += sum(1 for u in pair_urls.values() if u and "secret" in u)
        offered_outside += pair_urls[served.seed.candidate_ids[3]] is not None  # ...without a URL
    finally:
        with session_scope(served.url) as session:
            session.get(models.Candidate, served.seed.candidate_ids[3]).image_path = saved_path

    absolute = str(outside / "secret.png")
    targets = [
        f"/media/{rel_out.as_posix()}", f"/media/personas/../../{outside.name}/secret.png",
        f"/media/..%2F{outside.name}%2Fsecret.png", f"/media/%2e%2e/{outside.name}/secret.png",
        f"/media/%2E%2E%2F{outside.name}%2Fsecret.png", f"/media/%252e%252e%252f{outside.name}%252fsecret.png",
        f"/media/..%252F{outside.name}%252Fsecret.png", f"/media/{absolute}", f"/media/{quote(absolute, safe='')}",
        f"/media///{absolute.lstrip('/')}", f"/media/..\\{outside.name}\\secret.png", f"/media/%5C..%5C{outside.name}%5Csecret.png",
        f"/media/personas/tester/../../../{outside.name}/secret.png", f"/media/personas%2F..%2F..%2F..%2F{outside.name}%2Fsecret.png",
        "/media/escape.png", "/media/./escape.png", f"/media/..%00/{outside.name}/secret.png", "/media/secret.png%00.png",
        f"/media/{outside.name}/secret.txt", "/media/../../../../etc/passwd", "/media/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/media/review_secret.key", "/media/persona.db", "/media/key.png", "/media/review_secret.key%00.png",
        "/media/persona.db%3F.png", "/static/../persona.db", "/static/%2e%2e/%2e%2e/%2e%2e/persona.db",
    ]
    marks = (OUTSIDE_MARK, KEY_MARK, DB_MARK, b"root:x:0:0")
    leaked = []
    statuses: list[int] = []
    assert len(set(targets)) == len(targets)
    for target in targets:
        status, body = _raw_get(served, target, cookie)
        statuses.append(status)
        if any(mark in body for mark in marks):
            leaked.append(f"{target} -> {status}")
    # The control: an image inside home is served over the same raw path.
    good = Path(_candidate_path(served, served.seed.candidate_ids[0])).relative_to(home).as_posix()
    good_status, good_body = _raw_get(served, f"/media/{quote(good)}", cookie)
    assert good_status == 200 and good_body.startswith(b"\x89PNG")
    assert leaked == [] and offered_outside == 0
    assert all(status in (400, 404) for status in statuses), list(zip(targets, statuses))
    figure("security", "/media and /static with ../, encoded and double-encoded traversal, absolute paths, symlinks, "
           "NUL, a DB row pointing outside home, non-image files in home",
           f"{len(targets)} attempts, {len(leaked)} files leaked, {offered_outside} outside URLs offered",
           attempts=len(targets), files_leaked=len(leaked), outside_urls_offered=offered_outside,
           refused_404=statuses.count(404), refused_400=statuses.count(400))
