"""The review form over HTTP (Starlette's TestClient): login, CSRF, the body limit, media paths,
the JSON voting API and the HTML decision forms. The vote and decision flows run on SQLite and
PostgreSQL; the security checks, which do not depend on the backend, on SQLite only."""

from __future__ import annotations

import re
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from persona_pipeline.db import models
from persona_pipeline.db.session import get_engine, session_scope
from persona_pipeline.review.app import ReviewConfig, create_app
from persona_pipeline.review.inputs import parse_local_slot
from persona_pipeline.review.media import resolve_media
from persona_pipeline_tests.conftest import make_database
from persona_pipeline_tests.review_fixtures import ReviewSeed, racing_votes, seed_review, serve_app

TOKENS = {"alice-token-123": "alice", "bob-token-4567": "bob"}
SECRET = "test-secret-key-0123456789abcdef"
LIMIT = 4096


@dataclass
class Form:
    client: TestClient
    url: str
    home: Path
    seed: ReviewSeed

    def login(self, token: str = "alice-token-123") -> str:
        """Log in through the form; returns the session's CSRF token."""
        page = self.client.get("/login")
        assert page.status_code == 200
        response = self.client.post("/login", data={"csrf_token": csrf_of(page.text), "token": token, "next": "/"},
                                    follow_redirects=False)
        assert response.status_code == 303, response.text
        home = self.client.get("/")
        assert home.status_code == 200
        return csrf_of(home.text)

    def pair(self, step_id: int | None = None, exclude: list[int] = ()) -> dict:
        query = f"?exclude={','.join(map(str, exclude))}" if exclude else ""
        response = self.client.get(f"/api/steps/{step_id or self.seed.step_ids[0]}/pair{query}")
        assert response.status_code == 200, response.text
        return response.json()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def make_form(url: str, tmp_path: Path, **seed_args) -> Form:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    seed = seed_review(url, home, **seed_args)
    app = create_app(ReviewConfig(database_url=url, home=home, tokens=TOKENS, secret_key=SECRET, max_body_bytes=LIMIT))
    return Form(TestClient(app), url, home, seed)


@pytest.fixture
def form(db_url, tmp_path) -> Form:
    return make_form(db_url, tmp_path)


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory) -> Path:
    """One migrated SQLite file per module; each test gets a copy (migrating takes a second)."""
    folder = tmp_path_factory.mktemp("review_db")
    url, cleanup = make_database("sqlite", folder)
    cleanup()  # closes the connections, so the WAL is checkpointed into app.db
    return folder / "app.db"


@pytest.fixture
def sqlite_url(sqlite_template, tmp_path) -> str:
    shutil.copy(sqlite_template, tmp_path / "app.db")
    url = f"sqlite:///{tmp_path / 'app.db'}"
    yield url
    get_engine(url).dispose()


@pytest.fixture
def sqlite_form(sqlite_url, tmp_path) -> Form:
    return make_form(sqlite_url, tmp_path)


def events(url: str, kind: str) -> list[models.ReviewEvent]:
    with session_scope(url) as session:
        return list(session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == kind)
                                    .order_by(models.ReviewEvent.id)))


def queue_counts(form: Form, slug: str = "tester") -> dict[str, int]:
    html = form.client.get("/").text
    section = html.split(f'data-slug="{slug}"', 1)[1].split("</section>", 1)[0]
    return {name: int(value) for name, value in re.findall(r'data-count="(\w+)">(\d+)<', section)}


# --------------------------------------------------------------------------- flows (both backends)


def test_vote_flow_records_offers_votes_and_events(form: Form) -> None:
    csrf = form.login()
    assert queue_counts(form) == {"pairs_to_vote": 15, "steps_to_approve": 1, "runs_to_pick": 0, "posts_to_approve": 1}
    vote_page = form.client.get(f"/steps/{form.seed.step_ids[0]}/vote")
    assert vote_page.status_code == 200 and "/static/vote.js" in vote_page.text

    first = form.pair()
    assert first["remaining"] == 15 and 0 < first["probability"] <= 1
    assert {first["left"]["id"], first["right"]["id"]} <= set(form.seed.candidate_ids)
    # The page's preloaded pair: excluding the one on screen gives a different pair.
    second = form.pair(exclude=[first["offer_id"]])
    assert {second["left"]["id"], second["right"]["id"]} != {first["left"]["id"], first["right"]["id"]}
    assert form.client.get(first["left"]["url"]).headers["content-type"] == "image/png"

    headers = {"X-CSRF-Token": csrf}
    body = {"offer_id": first["offer_id"], "winner_id": first["left"]["id"], "loser_id": first["right"]["id"]}
    voted = form.client.post("/api/votes", json=body, headers=headers)
    assert voted.status_code == 201, voted.text
    again = form.client.post("/api/votes", json=body, headers=headers)
    assert again.status_code == 409 and "already been voted" in again.json()["error"]
    reversed_ = form.client.post("/api/votes", json={**body, "winner_id": body["loser_id"], "loser_id": body["winner_id"]},
                                 headers=headers)
    assert reversed_.status_code == 409

    skipped = form.client.post(f"/api/offers/{second['offer_id']}/skip", json={}, headers=headers)
    assert skipped.status_code == 200 and skipped.json()["outcome"] == "skipped"

    with session_scope(form.url) as session:
        vote = session.scalar(select(models.Vote))
        offer = session.get(models.PairOffer, first["offer_id"])
        assert (vote.winner_id, vote.loser_id, vote.reviewer, vote.offer_id) == (body["winner_id"], body["loser_id"], "alice", offer.id)
        assert vote.selection_probability == pytest.approx(first["probability"]) and offer.outcome == "voted"
        assert session.scalar(select(func.count()).select_from(models.Vote)) == 1
    (vote_event,) = events(form.url, "vote")
    (skip_event,) = events(form.url, "skip")
    for event in (vote_event, skip_event):
        assert event.reviewer == "alice" and event.created_at is not None
        assert abs(datetime.now(timezone.utc) - event.created_at) < timedelta(minutes=5)
    assert skip_event.subject_id == second["offer_id"]
    assert queue_counts(form)["pairs_to_vote"] == 14

    # K from the vote page: the left candidate of a shown pair is killed; a second kill is refused.
    third = form.pair()
    killed = form.client.post(f"/api/candidates/{third['left']['id']}/kill", json={"offer_id": third["offer_id"]},
                              headers=headers)
    assert killed.status_code == 200 and killed.json()["status"] == "killed"
    twice = form.client.post(f"/api/candidates/{third['left']['id']}/kill", json={}, headers=headers)
    assert twice.status_code == 400 and "already killed" in twice.json()["error"]
    (kill_event,) = events(form.url, "kill")
    assert kill_event.reviewer == "alice" and kill_event.subject_id == third["left"]["id"]
    with session_scope(form.url) as session:
        assert session.get(models.Candidate, third["left"]["id"]).status == "killed"
    assert queue_counts(form)["pairs_to_vote"] < 14  # 5 live candidates: at most 10 pairs


@pytest.mark.slow
def test_a_vote_counts_once_and_only_on_the_pair_the_page_showed(form: Form) -> None:
    """The page preloads its next pair (?preload=1): a vote on it is refused until the page says it
    is on screen (POST /api/offers/{id}/shown); each offer takes one vote, from its own reviewer."""
    csrf = form.login()
    headers, step = {"X-CSRF-Token": csrf}, form.seed.step_ids[0]
    shown = form.pair()
    response = form.client.get(f"/api/steps/{step}/pair?preload=1&exclude={shown['offer_id']}")
    assert response.status_code == 200, response.text
    preloaded = response.json()

    def body(offer: dict, reverse: bool = False) -> dict:
        left, right = offer["left"]["id"], offer["right"]["id"]
        return {"offer_id": offer["offer_id"], "winner_id": right if reverse else left, "loser_id": left if reverse else right}

    early = form.client.post("/api/votes", json=body(preloaded), headers=headers)
    assert early.status_code == 409 and "not shown yet" in early.json()["error"]
    bob = TestClient(form.client.app)
    bob_csrf = Form(bob, form.url, form.home, form.seed).login("bob-token-4567")
    foreign = bob.post("/api/votes", json=body(shown), headers={"X-CSRF-Token": bob_csrf})
    assert foreign.status_code == 403 and f"offered to alice, not bob" in foreign.json()["error"]
    assert bob.post(f"/api/offers/{preloaded['offer_id']}/shown", json={}, headers={"X-CSRF-Token": bob_csrf}).status_code == 403
    assert form.client.post(f"/api/offers/{preloaded['offer_id']}/shown", json={}).status_code == 403  # CSRF header missing
    assert form.client.get(f"/api/steps/{step}/pair?preload=yes").status_code == 400

    on_screen = form.client.post(f"/api/offers/{preloaded['offer_id']}/shown", json={}, headers=headers)
    assert on_screen.status_code == 200 and on_screen.json()["offer_id"] == preloaded["offer_id"]
    for offer in (preloaded, shown):
        assert form.client.post("/api/votes", json=body(offer), headers=headers).status_code == 201
        for again in (body(offer), body(offer, reverse=True)):
            twice = form.client.post("/api/votes", json=again, headers=headers)
            assert twice.status_code == 409 and f"pair offer {offer['offer_id']} has already been voted on" in twice.json()["error"]
    late = form.client.post(f"/api/offers/{shown['offer_id']}/shown", json={}, headers=headers)
    assert late.status_code == 409
    with session_scope(form.url) as session:
        votes = session.execute(select(models.Vote.offer_id, models.Vote.reviewer).order_by(models.Vote.id)).all()
        assert votes == [(preloaded["offer_id"], "alice"), (shown["offer_id"], "alice")]


def test_two_identical_votes_at_once_answer_201_and_409(db_url, tmp_path: Path) -> None:
    """A double click sent on two connections of one session, under real uvicorn, both requests
    inside the vote at the same moment: one 201, one 409 naming the offer, never a 500."""
    home = tmp_path / "home"
    seed = seed_review(db_url, home, candidates=4, posts=0)
    app = create_app(ReviewConfig(database_url=db_url, home=home, tokens=TOKENS, secret_key=SECRET))
    with serve_app(app) as (base, _), httpx.Client(base_url=base, timeout=60) as first:
        page = first.get("/login")
        first.post("/login", data={"csrf_token": csrf_of(page.text), "token": "alice-token-123", "next": "/"})
        csrf = csrf_of(first.get("/").text)
        offer = first.get(f"/api/steps/{seed.step_ids[0]}/pair").json()
        body = {"offer_id": offer["offer_id"], "winner_id": offer["left"]["id"], "loser_id": offer["right"]["id"]}
        answers: list[httpx.Response] = []
        start = threading.Barrier(2)

        def click(client: httpx.Client) -> None:
            start.wait()
            answers.append(client.post("/api/votes", json=body, headers={"X-CSRF-Token": csrf}))

        with httpx.Client(base_url=base, timeout=60, cookies=first.cookies) as second, racing_votes(db_url):
            threads = [threading.Thread(target=click, args=(client,)) for client in (first, second)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert sorted(a.status_code for a in answers) == [201, 409], [(a.status_code, a.text[:200]) for a in answers]
    refused = next(a for a in answers if a.status_code == 409)
    assert "already been voted on" in refused.json()["error"]
    with session_scope(db_url) as session:
        assert session.scalars(select(models.Vote.offer_id)).all() == [offer["offer_id"]]


def test_gallery_approve_pick_and_posts(form: Form, tmp_path: Path) -> None:
    csrf = form.login("bob-token-4567")
    step_id = form.seed.step_ids[0]
    gallery = form.client.get(f"/steps/{step_id}")
    assert gallery.status_code == 200
    assert "Approve this step" in gallery.text and "fewer than 5 votes" in gallery.text  # nobody has votes yet
    assert len(re.findall(r'data-candidate-id="\d+"', gallery.text)) == 6

    approved = form.client.post(f"/steps/{step_id}/approve", data={"csrf_token": csrf, "top_k": "2"}, follow_redirects=False)
    assert approved.status_code == 303
    after = form.client.get(approved.headers["location"])
    assert "approved with K=2" in after.text and "Approve this step" not in after.text
    with session_scope(form.url) as session:
        step = session.get(models.RunStep, step_id)
        assert (step.status, step.top_k) == ("approved", 2)
    (event,) = events(form.url, "approve_step")
    assert event.reviewer == "bob" and event.payload["top_k"] == 2
    assert queue_counts(form)["steps_to_approve"] == 0

    # A one-step run: its only step is final, so the gallery offers "pick the winner".
    other = seed_review(form.url, form.home, slug="solo", steps=1, candidates=3, posts=0)
    solo = form.client.get(f"/steps/{other.step_ids[0]}")
    assert "Pick the winner" in solo.text and "Approve this step" not in solo.text
    assert queue_counts(form, "solo")["runs_to_pick"] == 1
    pick = other.candidate_ids[1]
    picked = form.client.post(f"/runs/{other.run_id}/winner", data={"csrf_token": csrf, "candidate_id": str(pick),
                                                                     "step_id": str(other.step_ids[0])}, follow_redirects=False)
    assert picked.status_code == 303
    assert f"Candidate {pick} is the winner" in form.client.get(picked.headers["location"]).text
    with session_scope(form.url) as session:
        assert session.get(models.GenerationRun, other.run_id).winner_candidate_id == pick
    (event,) = events(form.url, "pick_winner")
    assert (event.reviewer, event.payload["candidate_id"]) == ("bob", pick)
    assert queue_counts(form, "solo")["runs_to_pick"] == 0

    # Posts: move, edit, then approve.
    post_id = form.seed.post_ids[0]
    page = form.client.get("/posts?persona=tester")
    assert page.status_code == 200 and f'id="post-{post_id}"' in page.text and "Europe/Lisbon" in page.text
    lisbon = ZoneInfo("Europe/Lisbon")
    slot = (datetime.now(lisbon) + timedelta(days=3)).replace(hour=9, minute=30, second=0, microsecond=0)
    moved = form.client.post(f"/posts/{post_id}/move", data={"csrf_token": csrf, "persona": "tester",
                                                             "new_time": slot.strftime("%Y-%m-%dT%H:%M")}, follow_redirects=False)
    assert moved.status_code == 303, moved.text
    edited = form.client.post(f"/posts/{post_id}/edit", data={"csrf_token": csrf, "persona": "tester",
                                                              "caption": "Coffee by the river.", "hashtags": "one #two"},
                              follow_redirects=False)
    assert edited.status_code == 303, edited.text
    with session_scope(form.url) as session:
        post = session.get(models.Post, post_id)
        assert post.scheduled_at == slot.astimezone(timezone.utc)
        assert (post.caption, post.hashtags) == ("Coffee by the river.", ["#one", "#two"])
    assert queue_counts(form)["posts_to_approve"] == 1
    approved_post = form.client.post(f"/posts/{post_id}/approve", data={"csrf_token": csrf, "persona": "tester"},
                                     follow_redirects=False)
    assert approved_post.status_code == 303 and approved_post.headers["location"] == "/posts?persona=tester"
    assert "No post is waiting" in form.client.get("/posts").text
    with session_scope(form.url) as session:
        assert session.get(models.Post, post_id).status == "scheduled"
    assert queue_counts(form)["posts_to_approve"] == 0
    for kind in ("move_post", "edit_post", "approve_post"):
        (event,) = events(form.url, kind)
        assert (event.reviewer, event.subject_id) == ("bob", post_id)

    audit = form.client.get("/audit")
    assert audit.status_code == 200
    assert {"approve_step", "pick_winner", "move_post", "edit_post", "approve_post"} <= set(re.findall(r'data-kind="(\w+)"', audit.text))
    assert audit.text.count("<td>bob</td>") == 5


# --------------------------------------------------------------------------- login and CSRF (SQLite)


def test_unauthenticated_requests_go_to_login_or_get_401(sqlite_form: Form) -> None:
    client, seed = sqlite_form.client, sqlite_form.seed
    for path in ("/", f"/steps/{seed.step_ids[0]}", f"/steps/{seed.step_ids[0]}/vote", "/posts", "/audit"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    api = client.get(f"/api/steps/{seed.step_ids[0]}/pair")
    assert api.status_code == 401 and api.json() == {"error": "log in first"}
    assert client.post("/api/votes", json={}).status_code == 401
    assert client.get("/media/personas/tester/media/post-seed-0.jpg").status_code == 401
    assert client.post(f"/posts/{seed.post_ids[0]}/approve", data={}).status_code == 401


def test_wrong_token_shows_the_login_page_with_401(sqlite_form: Form) -> None:
    client = sqlite_form.client
    page = client.get("/login")
    response = client.post("/login", data={"csrf_token": csrf_of(page.text), "token": "alice-token-12"})
    assert response.status_code == 401
    assert "<h1>Log in</h1>" in response.text and "not valid" in response.text
    assert client.get("/", follow_redirects=False).status_code == 303  # still logged out
    empty = client.post("/login", data={"csrf_token": csrf_of(page.text), "token": ""})
    assert empty.status_code == 401


def test_login_and_logout_need_csrf_and_next_stays_local(sqlite_form: Form) -> None:
    client = sqlite_form.client
    client.get("/login")
    assert client.post("/login", data={"token": "alice-token-123"}).status_code == 403
    assert client.post("/login", data={"token": "alice-token-123", "csrf_token": "forged"}).status_code == 403
    assert client.get("/", follow_redirects=False).status_code == 303
    page = client.get("/login?next=//evil.example/x")
    assert 'value="/"' in page.text
    response = client.post("/login", data={"csrf_token": csrf_of(page.text), "token": "alice-token-123",
                                           "next": "//evil.example/x"}, follow_redirects=False)
    assert response.headers["location"] == "/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    csrf = csrf_of(client.get("/").text)
    assert csrf != csrf_of(page.text)  # a new CSRF token after login
    assert client.post("/logout", data={}).status_code == 403
    assert client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303


@pytest.mark.slow
def test_missing_or_wrong_csrf_is_403_and_changes_nothing(sqlite_form: Form) -> None:
    csrf = sqlite_form.login()
    client, seed = sqlite_form.client, sqlite_form.seed
    offer = sqlite_form.pair()
    vote = {"offer_id": offer["offer_id"], "winner_id": offer["left"]["id"], "loser_id": offer["right"]["id"]}
    assert client.post("/api/votes", json=vote).status_code == 403
    assert client.post("/api/votes", json=vote, headers={"X-CSRF-Token": csrf[:-1] + "x"}).status_code == 403
    assert client.post(f"/api/offers/{offer['offer_id']}/skip", json={}).status_code == 403
    assert client.post(f"/api/candidates/{offer['left']['id']}/kill", json={}).status_code == 403
    assert client.post(f"/posts/{seed.post_ids[0]}/approve", data={}).status_code == 403
    assert client.post(f"/steps/{seed.step_ids[0]}/approve", data={"top_k": "2", "csrf_token": "x"}).status_code == 403
    # A form POST cannot borrow a JSON body either.
    assert client.post(f"/posts/{seed.post_ids[0]}/reject", json={"csrf_token": csrf}).status_code == 403
    with session_scope(sqlite_form.url) as session:
        assert session.scalar(select(func.count()).select_from(models.Vote)) == 0
        assert session.scalar(select(func.count()).select_from(models.ReviewEvent)) == 0
        assert session.get(models.Post, seed.post_ids[0]).status == "awaiting_approval"


def test_a_reviewer_removed_from_the_tokens_is_logged_out(sqlite_form: Form) -> None:
    sqlite_form.login()
    cookies = dict(sqlite_form.client.cookies)
    assert TestClient(sqlite_form.client.app, cookies=cookies).get("/", follow_redirects=False).status_code == 200
    narrowed = create_app(ReviewConfig(database_url=sqlite_form.url, home=sqlite_form.home,
                                       tokens={"bob-token-4567": "bob"}, secret_key=SECRET))
    assert TestClient(narrowed, cookies=cookies).get("/", follow_redirects=False).status_code == 303


# --------------------------------------------------------------------------- bad input (SQLite)


def test_unknown_ids_are_404(sqlite_form: Form) -> None:
    csrf = sqlite_form.login()
    client = sqlite_form.client
    headers = {"X-CSRF-Token": csrf}
    for path in ("/steps/9999", "/steps/9999/vote", "/steps/99999999999999999999", "/posts?persona=nobody", "/nowhere"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "not found" in response.text
    for path in ("/api/steps/9999/pair", "/api/steps/99999999999/pair"):
        response = client.get(path)
        assert response.status_code == 404 and "error" in response.json()
    assert client.post("/api/votes", json={"offer_id": 9999, "winner_id": 1, "loser_id": 2}, headers=headers).status_code == 404
    assert client.post("/api/offers/9999/skip", json={}, headers=headers).status_code == 404
    assert client.post("/api/candidates/9999/kill", json={}, headers=headers).status_code == 404
    for path, data in ((f"/posts/9999/{action}", {}) for action in ("approve", "edit", "reject", "move")):
        response = client.post(path, data={"csrf_token": csrf, "caption": "x", "new_time": "2030-01-01T10:00", **data})
        assert response.status_code == 404, path
    assert client.post("/steps/9999/approve", data={"csrf_token": csrf, "top_k": "1"}).status_code == 404
    assert client.post("/runs/9999/winner", data={"csrf_token": csrf, "candidate_id": "1"}).status_code == 404
    assert client.post("/candidates/9999/kill", data={"csrf_token": csrf}).status_code == 404


def test_votes_outside_the_offered_pair_are_400(sqlite_form: Form, tmp_path: Path) -> None:
    csrf = sqlite_form.login()
    client, seed = sqlite_form.client, sqlite_form.seed
    headers = {"X-CSRF-Token": csrf}
    offer = sqlite_form.pair()
    left, right = offer["left"]["id"], offer["right"]["id"]
    outsider = next(c for c in seed.candidate_ids if c not in (left, right))
    other = seed_review(sqlite_form.url, sqlite_form.home, slug="other", candidates=3, posts=0)

    def vote(winner, loser, offer_id=offer["offer_id"]):
        return client.post("/api/votes", json={"offer_id": offer_id, "winner_id": winner, "loser_id": loser}, headers=headers)

    for winner, loser in ((left, outsider), (outsider, right), (left, other.candidate_ids[0]), (other.candidate_ids[0], other.candidate_ids[1])):
        response = vote(winner, loser)
        assert response.status_code == 400, (winner, loser)
        assert "not the pair of offer" in response.json()["error"]
    self_vote = vote(left, left)
    assert self_vote.status_code == 400 and "against itself" in self_vote.json()["error"]
    # Another run's offer cannot carry this run's candidates either.
    foreign = sqlite_form.pair(other.step_ids[0])
    assert vote(left, right, foreign["offer_id"]).status_code == 400
    for body in ({"offer_id": "1; drop", "winner_id": left, "loser_id": right}, {"offer_id": offer["offer_id"], "winner_id": True,
                 "loser_id": right}, {"offer_id": offer["offer_id"], "winner_id": -3, "loser_id": right}, {"winner_id": left}):
        response = client.post("/api/votes", json=body, headers=headers)
        assert response.status_code == 400
        assert re.search(r"(offer_id|winner_id|loser_id) (must be a positive integer|is missing)", response.json()["error"])
    assert client.post("/api/votes", content=b"{not json", headers={**headers, "content-type": "application/json"}).status_code == 400
    assert client.post("/api/votes", json=[1, 2], headers=headers).status_code == 400
    assert client.get(f"/api/steps/{seed.step_ids[0]}/pair?exclude=1,abc").status_code == 400
    assert vote(left, right).status_code == 201  # the right pair still works after all that
    with session_scope(sqlite_form.url) as session:
        assert session.scalar(select(func.count()).select_from(models.Vote)) == 1


def test_media_serves_only_images_inside_home(sqlite_form: Form, tmp_path: Path) -> None:
    sqlite_form.login()
    client, home = sqlite_form.client, sqlite_form.home
    good = "personas/tester/media/post-seed-0.jpg"
    assert client.get(f"/media/{good}").status_code == 200
    outside = tmp_path / "secret.png"
    outside.write_bytes((home / good).read_bytes())
    (home / "notes.txt").write_text("not an image")
    (home / "escape.png").symlink_to(outside)
    (home / "inside.png").symlink_to(home / good)
    absolute = str(outside).lstrip("/")
    for path in ("/media/..%2Fsecret.png", "/media/%2e%2e/secret.png", "/media/personas/%2E%2E/%2e%2e/%2e%2e/secret.png",
                 f"/media//{absolute}", f"/media/%2F{absolute}", "/media/escape.png", "/media/notes.txt",
                 "/media/personas/tester/media/missing.png", "/media/personas/%2e/tester/media/post-seed-0.jpg",
                 "/media/personas\\tester\\media\\post-seed-0.jpg", "/media/" + good.replace("/", "//")):
        assert client.get(path).status_code == 404, path
    assert client.get("/media/inside.png").status_code == 200  # a symlink that stays inside is fine
    # The raw (not percent-encoded) `..` is checked by the function too: httpx would normalise it
    # away before sending; the browser test sends it raw to uvicorn.
    resolved_home = home.resolve()
    assert resolve_media(resolved_home, "../secret.png") is None
    assert resolve_media(resolved_home, "personas/../../secret.png") is None
    assert resolve_media(resolved_home, str(outside)) is None
    assert resolve_media(resolved_home, good) == (home / good).resolve()


def test_bodies_over_the_limit_are_413(sqlite_form: Form) -> None:
    csrf = sqlite_form.login()
    client, seed = sqlite_form.client, sqlite_form.seed
    big = "x" * (LIMIT + 1)
    response = client.post("/api/votes", content=big.encode(), headers={"X-CSRF-Token": csrf, "content-type": "application/json"})
    assert response.status_code == 413 and "limit of 4096 bytes" in response.json()["error"]
    form = client.post(f"/posts/{seed.post_ids[0]}/edit", data={"csrf_token": csrf, "caption": big, "hashtags": ""})
    assert form.status_code == 413
    login = client.post("/login", data={"token": big})
    assert login.status_code == 413

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(10):
            yield b"y" * 1000

    streamed = client.post("/api/votes", content=chunks(), headers={"X-CSRF-Token": csrf})
    assert streamed.status_code == 413
    with session_scope(sqlite_form.url) as session:
        assert session.get(models.Post, seed.post_ids[0]).caption == "A day in the city."
    assert client.post("/api/votes", json={"offer_id": 1}, headers={"X-CSRF-Token": csrf}).status_code != 413


def test_captions_are_escaped_and_refused_edits_keep_the_typed_text(sqlite_url: str, tmp_path: Path) -> None:
    url = sqlite_url
    form = make_form(url, tmp_path, caption='<script>alert("x")</script> & <b>bold</b>')
    csrf = form.login()
    post_id = form.seed.post_ids[0]
    page = form.client.get("/posts")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page.text
    assert "<script>alert" not in page.text and "<b>bold" not in page.text
    assert "content-security-policy" in page.headers and "script-src" not in page.headers["content-security-policy"]

    typed = "New <i>caption</i> #a #b #c"
    refused = form.client.post(f"/posts/{post_id}/edit", data={"csrf_token": csrf, "caption": typed, "hashtags": "#d #e bad-tag"})
    assert refused.status_code == 400
    assert "bad-tag" in refused.text and "is not a single word" in refused.text
    assert "New &lt;i&gt;caption&lt;/i&gt; #a #b #c</textarea>" in refused.text  # kept, escaped
    too_many = form.client.post(f"/posts/{post_id}/edit", data={"csrf_token": csrf, "caption": typed, "hashtags": "#d #e"})
    assert too_many.status_code == 400 and "hashtags; the limit is" in too_many.text
    bad_time = form.client.post(f"/posts/{post_id}/move", data={"csrf_token": csrf, "new_time": "tomorrow noon"})
    assert bad_time.status_code == 400 and "new_time" in bad_time.text and 'value="tomorrow noon"' in bad_time.text
    past = form.client.post(f"/posts/{post_id}/move", data={"csrf_token": csrf, "new_time": "2001-01-01T10:00"})
    assert past.status_code == 400 and "in the past" in past.text
    with session_scope(url) as session:
        assert session.get(models.Post, post_id).caption.startswith("<script>")
    assert events(url, "edit_post") == [] and events(url, "move_post") == []

    rejected = form.client.post(f"/posts/{post_id}/reject", data={"csrf_token": csrf, "reason": "<off brand>"},
                                follow_redirects=False)
    assert rejected.status_code == 303
    (event,) = events(url, "reject_post")
    assert (event.reviewer, event.payload["reason"]) == ("alice", "<off brand>")
    assert "&lt;off brand&gt;" in form.client.get("/audit").text


def test_approving_with_a_bad_k_shows_the_gallery_with_the_error(sqlite_form: Form) -> None:
    csrf = sqlite_form.login()
    step_id = sqlite_form.seed.step_ids[0]
    for top_k, status, text in (("7", 400, "out of range 1..6"), ("two", 400, "top_k must be a positive integer"), ("", 400, "top_k is missing")):
        response = sqlite_form.client.post(f"/steps/{step_id}/approve", data={"csrf_token": csrf, "top_k": top_k})
        assert response.status_code == status and text in response.text, top_k
    with session_scope(sqlite_form.url) as session:
        assert session.get(models.RunStep, step_id).status == "voting"


def test_slots_are_read_in_the_personas_timezone() -> None:
    summer = parse_local_slot("2030-07-01T09:30", "Europe/Lisbon")
    assert summer.astimezone(timezone.utc) == datetime(2030, 7, 1, 8, 30, tzinfo=timezone.utc)
    with pytest.raises(Exception, match="does not exist in Europe/Lisbon"):
        parse_local_slot("2030-03-31T01:30", "Europe/Lisbon")  # the spring-forward gap


def test_create_app_refuses_weak_configuration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret_key"):
        create_app(ReviewConfig(database_url="sqlite://", home=tmp_path, tokens=TOKENS, secret_key="short"))
    with pytest.raises(ValueError, match="REVIEW_TOKENS"):
        create_app(ReviewConfig(database_url="sqlite://", home=tmp_path, tokens={}, secret_key=SECRET))
    with pytest.raises(ValueError, match="shorter than 8"):
        create_app(ReviewConfig(database_url="sqlite://", home=tmp_path, tokens={"abc": "carol"}, secret_key=SECRET))



def test_failed_posts_are_shown_with_their_reason_and_can_be_retried_or_abandoned(sqlite_url, tmp_path) -> None:
    form = make_form(sqlite_url, tmp_path, posts=2, slug="failing")
    csrf = form.login()
    first, second = form.seed.post_ids
    with session_scope(form.url) as session:
        for post_id in (first, second):
            post = session.get(models.Post, post_id)
            post.status, post.retryable, post.retry_count = "failed", False, 2
            post.failure_reason = "GraphError auth: code 190 token rejected"
    page = form.client.get("/posts?persona=failing")
    assert page.status_code == 200 and "code 190 token rejected" in page.text and "(2 attempts)" in page.text
    assert f'action="/posts/{first}/retry"' in page.text and f'action="/posts/{first}/approve"' not in page.text
    retried = form.client.post(f"/posts/{first}/retry", data={"csrf_token": csrf, "persona": "failing"},
                               follow_redirects=False)
    assert retried.status_code == 303, retried.text
    abandoned = form.client.post(f"/posts/{second}/abandon", data={"csrf_token": csrf, "persona": "failing",
                                                                  "reason": "old news"}, follow_redirects=False)
    assert abandoned.status_code == 303, abandoned.text
    again = form.client.post(f"/posts/{second}/retry", data={"csrf_token": csrf, "persona": "failing"})
    assert again.status_code == 400 and "cannot become" in again.text
    with session_scope(form.url) as session:
        assert [session.get(models.Post, i).status for i in (first, second)] == ["scheduled", "abandoned"]
    assert [e.subject_id for e in events(form.url, "retry_post")] == [first]
    assert [e.payload["reason"] for e in events(form.url, "abandon_post")] == ["old news"]


def test_login_throttle_counts_failures_per_address_in_a_sliding_window() -> None:
    from persona_pipeline.review.auth import LoginThrottle

    now = [100.0]
    throttle = LoginThrottle(max_failures=3, window_s=10, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("1.2.3.4") is None
        throttle.failed("1.2.3.4")
        now[0] += 1
    assert throttle.retry_after("1.2.3.4") == 7  # failures at t=100, 101, 102; the first leaves the window at t=110; now 103
    assert throttle.retry_after("5.6.7.8") is None  # another address is not held back
    now[0] = 110.0
    assert throttle.retry_after("1.2.3.4") is None  # one failure left the window: one more try
    throttle.failed("1.2.3.4")
    assert throttle.retry_after("1.2.3.4") == 1
    throttle.succeeded("1.2.3.4")
    assert throttle.retry_after("1.2.3.4") is None
    with pytest.raises(ValueError, match="max_failures"):
        LoginThrottle(max_failures=0)


def test_too_many_wrong_tokens_from_one_address_answer_429_even_for_the_right_token(sqlite_form: Form) -> None:
    client = sqlite_form.client
    page = client.get("/login")
    csrf = csrf_of(page.text)
    statuses = [client.post("/login", data={"csrf_token": csrf, "token": f"wrong-token-{i:04d}"}).status_code
                for i in range(12)]
    assert statuses == [401] * 10 + [429] * 2  # the default: 10 failures a minute
    held = client.post("/login", data={"csrf_token": csrf, "token": "alice-token-123"}, follow_redirects=False)
    assert held.status_code == 429 and 1 <= int(held.headers["Retry-After"]) <= 60
    assert "Too many failed logins" in held.text
