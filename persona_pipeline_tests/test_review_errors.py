"""The review form's error pages over HTTP (Starlette's TestClient, SQLite): every error a page
can meet (400, 401 on a post, 403, 404, 405, 409, 413, 500) is the styled page that says what
happened, what to do and the way back (where the reviewer came from when that is a page of this
form, else the queue); the JSON API keeps JSON errors; nothing shows a traceback or a secret."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from persona_pipeline.db import models, review
from persona_pipeline.db.session import get_engine, session_scope
from persona_pipeline.review import gallery, queue, voting
from persona_pipeline_tests.conftest import make_database
from persona_pipeline_tests.test_review_form import LIMIT, Form, make_form

HOST = "http://testserver"


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("errors_db")
    _, cleanup = make_database("sqlite", folder)
    cleanup()
    return folder / "app.db"


@pytest.fixture
def form(template_db, tmp_path) -> Form:
    shutil.copy(template_db, tmp_path / "app.db")
    url = f"sqlite:///{tmp_path / 'app.db'}"
    made = make_form(url, tmp_path)
    made.client.__init__(made.client.app, raise_server_exceptions=False)  # a 500 is an answer, as under uvicorn
    yield made
    get_engine(url).dispose()


def error_page(response, status: int) -> dict[str, str]:
    """What a styled error page says: heading, message, hint, the way back and its label."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("text/html")
    text = response.text
    assert '<link rel="stylesheet" href="/static/review.css">' in text and f'data-status="{status}"' in text
    assert "Traceback" not in text and 'File "' not in text
    back = re.search(r'<a class="button[^"]*" id="error-back" href="([^"]*)">([^<]*)</a>', text)
    found = {name: html.unescape(re.search(rf'id="{name}"[^>]*>(.*?)</p>', text, re.S).group(1)).strip()
             for name in ("error-message", "error-hint") if f'id="{name}"' in text}
    return {"heading": html.unescape(re.search(r"<h1>(.*?)</h1>", text).group(1)), "back": html.unescape(back.group(1)),
            "label": back.group(2), **found}


def test_unknown_pages_and_ids_get_the_styled_404_with_the_way_back(form: Form) -> None:
    form.login()
    step_id = form.seed.step_ids[0]
    nowhere = error_page(form.client.get("/nowhere"), 404)
    assert nowhere["heading"] == "That was not found" and nowhere["error-message"] == "There is no page at /nowhere."
    assert (nowhere["back"], nowhere["label"]) == ("/", "Back to the queue")
    # Came from the gallery: the way back is the gallery.
    from_gallery = error_page(form.client.get("/steps/9999", headers={"Referer": f"{HOST}/steps/{step_id}?x=1"}), 404)
    assert from_gallery["error-message"] == "run step 9999 does not exist"
    assert (from_gallery["back"], from_gallery["label"]) == (f"/steps/{step_id}?x=1", "Back to the gallery")
    voting_back = error_page(form.client.get("/steps/9999/vote", headers={"Referer": f"{HOST}/steps/{step_id}/vote"}), 404)
    assert (voting_back["back"], voting_back["label"]) == (f"/steps/{step_id}/vote", "Back to voting")
    # Never a link off the form, nor back to the page that failed.
    for referer in ("https://evil.example/steps/1", f"{HOST}//evil.example/x", f"{HOST}/nowhere", "not a url", "/steps/1"):
        page = error_page(form.client.get("/nowhere", headers={"Referer": referer}), 404)
        assert page["back"] == "/", referer
    # The API and images keep their machine-readable errors.
    api = form.client.get("/api/nowhere")
    assert api.status_code == 404 and api.json() == {"error": "There is no page at /api/nowhere."}
    assert form.client.get("/api/steps/9999/pair").json() == {"error": "run step 9999 does not exist"}
    image = form.client.get("/media/personas/none.png")
    assert image.status_code == 404 and image.headers["content-type"].startswith("text/plain")
    opened = error_page(form.client.get("/media/personas/none.png", headers={"Accept": "text/html,*/*"}), 404)
    assert opened["error-message"] == "no such image"


def test_400_403_405_and_409_say_what_happened_and_what_to_do(form: Form, monkeypatch) -> None:
    csrf = form.login()
    step_id = form.seed.step_ids[0]
    gallery_url = f"{HOST}/steps/{step_id}"
    bad = error_page(form.client.get(f"/steps/{step_id}/compare?c=1", headers={"Referer": gallery_url}), 400)
    assert bad["heading"] == "That was refused" and "choose exactly two images" in bad["error-message"]
    assert bad["back"] == f"/steps/{step_id}"

    forged = error_page(form.client.post(f"/candidates/{form.seed.candidate_ids[0]}/kill",
                                         data={"csrf_token": "forged", "step_id": str(step_id)}, headers={"Referer": gallery_url}), 403)
    assert forged["heading"] == "That is not allowed" and "CSRF token" in forged["error-message"]
    assert "Reload the page you came from" in forged["error-hint"] and forged["back"] == f"/steps/{step_id}"
    with session_scope(form.url) as session:
        assert session.get(models.Candidate, form.seed.candidate_ids[0]).status == "active"

    wrong_method = error_page(form.client.get(f"/candidates/{form.seed.candidate_ids[0]}/kill"), 405)
    assert wrong_method["error-message"] == f"/candidates/{form.seed.candidate_ids[0]}/kill does not take a GET request."

    def conflict(*args):  # what a decision raises when someone else's decision landed first
        raise review.OfferClosed("pair offer 7 was already answered (voted)")

    monkeypatch.setattr(gallery, "_kill_form", conflict)
    late = error_page(form.client.post(f"/candidates/{form.seed.candidate_ids[0]}/kill", data={"csrf_token": csrf},
                                       headers={"Referer": gallery_url}), 409)
    assert late["heading"] == "That changed before your request arrived"
    assert late["error-message"] == "pair offer 7 was already answered (voted)" and "Reload the page" in late["error-hint"]


def test_a_post_after_the_session_ended_is_a_401_page_that_logs_in_and_returns(form: Form) -> None:
    csrf = form.login()
    post_id = form.seed.post_ids[0]
    form.client.cookies.clear()
    ended = error_page(form.client.post(f"/posts/{post_id}/approve", data={"csrf_token": csrf},
                                        headers={"Referer": f"{HOST}/posts?persona=tester"}), 401)
    assert ended["heading"] == "You are not logged in" and "not saved" in ended["error-message"]
    login = re.search(r'id="error-login" href="([^"]+)"', ended_text := form.client.post(
        f"/posts/{post_id}/approve", data={}, headers={"Referer": f"{HOST}/posts?persona=tester"}).text).group(1)
    assert html.unescape(login) == "/login?next=/posts%3Fpersona%3Dtester" and "Back to the posts" in ended_text
    assert form.client.get(html.unescape(login)).status_code == 200
    with session_scope(form.url) as session:
        assert session.get(models.Post, post_id).status == "awaiting_approval"
    # A GET still goes to the login page, and the JSON API still answers JSON.
    assert form.client.get("/posts", follow_redirects=False).headers["location"] == "/login?next=/posts"
    assert form.client.post("/api/votes", json={}).json() == {"error": "log in first"}


def test_an_oversized_post_gets_the_styled_413_and_the_api_keeps_json(form: Form) -> None:
    csrf = form.login()
    post_id = form.seed.post_ids[0]
    big = "x" * (LIMIT + 1)
    page = error_page(form.client.post(f"/posts/{post_id}/edit", data={"csrf_token": csrf, "caption": big},
                                       headers={"Referer": f"{HOST}/posts"}), 413)
    assert page["heading"] == "That was too large to send"
    assert page["error-message"] == f"The request body is over the limit of {LIMIT} bytes."
    assert "Shorten what you typed" in page["error-hint"] and (page["back"], page["label"]) == ("/posts", "Back to the posts")

    def chunks():  # no Content-Length: refused while it streams in, still styled
        for _ in range(10):
            yield b"caption=" + b"y" * 1000

    streamed = form.client.post(f"/posts/{post_id}/edit", content=chunks(),
                                headers={"X-CSRF-Token": csrf, "content-type": "application/x-www-form-urlencoded"})
    assert error_page(streamed, 413)["heading"] == "That was too large to send"
    api = form.client.post("/api/votes", content=big.encode(), headers={"X-CSRF-Token": csrf, "content-type": "application/json"})
    assert api.status_code == 413 and api.json() == {"error": f"The request body is over the limit of {LIMIT} bytes."}
    with session_scope(form.url) as session:
        assert session.get(models.Post, post_id).caption == "A day in the city."


def test_an_unexpected_exception_is_a_500_page_with_a_reference_and_no_secret(form: Form, monkeypatch, caplog) -> None:
    form.login()
    secret = "postgresql://app:hunter2-SECRET@db.internal/app"

    def broken(*args):
        raise RuntimeError(f"could not connect to {secret}")

    monkeypatch.setattr(queue, "_queue", broken)
    monkeypatch.setattr(voting, "_next_pair", broken)
    response = form.client.get("/", headers={"Referer": f"{HOST}/posts"})
    page = error_page(response, 500)
    assert page["heading"] == "Something went wrong on our side"
    assert page["error-message"] == "The server failed while answering GET /."
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    reference = re.search(r'id="error-reference">Reference ([0-9a-f]{8}) ', response.text).group(1)
    assert page["back"] == "/posts"
    assert response.headers["content-security-policy"].startswith("default-src 'self'")  # the usual headers
    assert response.headers["x-frame-options"] == "DENY"
    logged = [r for r in caplog.records if reference in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the operator finds the traceback by its reference
    api = form.client.get(f"/api/steps/{form.seed.step_ids[0]}/pair")
    assert api.status_code == 500 and re.fullmatch(r"internal error \(reference [0-9a-f]{8}\)", api.json()["error"])
    assert "hunter2" not in api.text
    with session_scope(form.url) as session:  # nothing else broke
        assert session.scalar(select(models.RunStep.status).where(models.RunStep.id == form.seed.step_ids[0])) == "voting"
