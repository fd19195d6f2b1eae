"""The dataset review queue over HTTP (Starlette's TestClient), on SQLite and PostgreSQL: the page
and its JSON API show each candidate's image, identity score, nearest dataset image and origin;
accept (with a caption edit) and reject are `decide` calls, one review event each; a decision on an
image already in a built version, or decided already, is refused with 409 (JSON for the API, the
styled error page for the form post); the login, CSRF and path checks are the form's. The
`dataset_reviews` sensor turns acceptances into one `dataset_version` run once reviewing pauses."""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from persona_pipeline.automation.dataset_sensor import DATASET_QUIET, DatasetCursor, plan_dataset_runs
from persona_pipeline.db import dataset_candidates, models
from persona_pipeline.db.session import session_scope
from persona_pipeline_tests.test_review_form import Form, csrf_of, events, make_form


@dataclass(frozen=True)
class DatasetSeed:
    slug: str
    persona_id: int
    edit_id: int
    winner_id: int
    post_id: int
    winner_candidate: int
    winner_step: int
    post: int


def _png(path: Path, colour: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 80), colour).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_dataset(url: str, home: Path, slug: str, persona_id: int, candidate_id: int, step_id: int, post_id: int,
                 extra: int = 0) -> DatasetSeed:
    """Three pending dataset candidates of the persona, oldest first: an edit of a source photo, an
    approved winner and a published post (then `extra` more edits), with real PNGs under the
    persona's folder and a nearest dataset image for the edit."""
    folder = home / "personas" / slug
    source_sha = _png(folder / "photos" / "face-01.png", (10, 20, 30))
    nearest_sha = _png(folder / "datasets" / "abc123" / "face-01.png", (10, 20, 30))
    with session_scope(url) as session:
        session.add(models.SourcePhoto(persona_id=persona_id, original_name="face-01.jpg", sha256="f" * 64,
                                       pixel_sha256=source_sha,
                                       status="accepted", path=str(folder / "photos" / "face-01.png")))
        rows = []
        specs = [dict(origin="edit", source_photo_sha256=source_sha, instruction="turn her head to the left",
                      edit_model="qwen-image-edit", seed=7, identity_score=0.8125, identity_method="clip",
                      nearest_sha256=nearest_sha, nearest_path="datasets/abc123/face-01.png", nearest_cosine=0.9031),
                 dict(origin="winner", candidate_id=candidate_id, identity_score=0.74, identity_method="face"),
                 dict(origin="post", post_id=post_id, identity_score=None, identity_method=None)]
        specs += [dict(origin="edit", source_photo_sha256=source_sha, instruction=f"lighting {i}", edit_model="flux-kontext",
                       seed=100 + i, identity_score=0.7, identity_method="clip") for i in range(extra)]
        for i, spec in enumerate(specs):
            relative = f"dataset_candidates/cand-{i}.png"
            sha = _png(folder / relative, ((i * 53) % 256, (i * 97 + 60) % 256, 200))
            rows.append(dataset_candidates.add_candidate(session, persona_id, image_path=relative, sha256=sha,
                                                         caption=f"t3st woman, candidate {i}", **spec))
            session.flush()
        ids = [row.id for row in rows]
    return DatasetSeed(slug, persona_id, ids[0], ids[1], ids[2], candidate_id, step_id, post_id)


DROP_REASONS = ("near duplicate of photos/face-01.png (cosine 0.981 >= 0.97)",
                "identity 0.412 is below 0.6 (clip)", "no face found (face:arcface)")


def seed_dropped(url: str, home: Path, slug: str, persona_id: int, count: int = 2) -> list[int]:
    """`count` candidates the automatic checks dropped (edits with real PNGs), each with its reason,
    oldest first."""
    folder = home / "personas" / slug
    ids = []
    with session_scope(url) as session:
        for i in range(count):
            relative = f"dataset_candidates/dropped-{i}.png"
            sha = _png(folder / relative, (200, (i * 71 + 30) % 256, (i * 29) % 256))
            row = dataset_candidates.add_candidate(
                session, persona_id, origin="edit", image_path=relative, sha256=sha, caption=f"t3st woman, dropped {i}",
                instruction=f"expression {i}", edit_model="flux-kontext", seed=50 + i, identity_score=0.41 + i / 100,
                identity_method="clip", status="dropped", reason=DROP_REASONS[i % len(DROP_REASONS)],
                # the near duplicate shows its twin (seed_dataset's dataset image), as enrichment records it
                **(dict(nearest_path="datasets/abc123/face-01.png", nearest_cosine=0.981) if i % len(DROP_REASONS) == 0 else {}))
            session.flush()
            ids.append(row.id)
    return ids


@pytest.fixture
def form(db_url, tmp_path) -> tuple[Form, DatasetSeed]:
    form = make_form(db_url, tmp_path, candidates=3, steps=1, posts=1)
    seed = form.seed
    return form, seed_dataset(db_url, form.home, seed.slug, seed.persona_id, seed.candidate_ids[0], seed.step_ids[0],
                              seed.post_ids[0])


def row(url: str, candidate_id: int) -> dict:
    with session_scope(url) as session:
        r = session.get(models.DatasetCandidate, candidate_id)
        return {"status": r.status, "caption": r.caption, "decided_by": r.decided_by, "dataset_version": r.dataset_version}


def decide(form: Form, candidate_id: int, headers: dict, **body):
    return form.client.post(f"/api/dataset/candidates/{candidate_id}/decide", json=body, headers=headers)


def test_queue_shows_identity_nearest_image_and_origin(form) -> None:
    form, ds = form
    form.login()
    # The start page links the persona's queue with its count.
    assert re.search(r'href="/dataset/tester" data-dataset-pending="3">Review 3 dataset candidates', form.client.get("/").text)
    page = form.client.get("/dataset/tester")
    assert page.status_code == 200 and "/static/dataset.js" in page.text
    assert "3 candidates waiting." in page.text  # the first candidate is rendered for a browser without JavaScript
    assert f'action="/dataset/candidates/{ds.edit_id}/decide"' in page.text and "t3st woman, candidate 0" in page.text

    data = form.client.get("/api/dataset/tester/queue").json()
    assert data["remaining"] == 3 and [i["id"] for i in data["items"]] == [ds.edit_id, ds.winner_id, ds.post_id]
    edit, winner, post = data["items"]
    assert edit["identity"] == 0.8125 and edit["identity_method"] == "clip" and edit["identity_text"] == "0.812 (clip)"
    assert edit["origin"]["text"] == (f"Edit of photo face-01.jpg with instruction 'turn her head to the left' by model "
                                      f"qwen-image-edit seed 7 (dataset candidate #{ds.edit_id})")
    assert edit["nearest"] == {"url": "/media/personas/tester/datasets/abc123/face-01.png",
                               "sha256": edit["nearest"]["sha256"], "cosine": 0.9031,
                               "text": "Nearest in the dataset: cosine 0.903"}
    assert winner["origin"] == {"kind": "winner", "text": f"Winner candidate #{ds.winner_candidate} (dataset candidate #{ds.winner_id})",
                                "link": f"/steps/{ds.winner_step}"}
    assert post["origin"] == {"kind": "post", "text": f"Post #{ds.post} (dataset candidate #{ds.post_id})",
                              "link": f"/posts?persona=tester#post-{ds.post}"}
    assert post["identity"] is None and post["identity_text"] == "not scored" and post["nearest"] is None
    # The images the page shows are served (inside PERSONA_HOME).
    for url in (edit["url"], edit["nearest"]["url"], post["url"]):
        assert form.client.get(url).status_code == 200, url
    # A nearest path that leads out of PERSONA_HOME is never linked.
    with session_scope(form.url) as session:
        session.get(models.DatasetCandidate, ds.edit_id).nearest_path = "../../../outside.png"
    nearest = form.client.get("/api/dataset/tester/queue").json()["items"][0]["nearest"]
    assert nearest["url"] is None and "not under PERSONA_HOME" in nearest["text"]
    # `exclude` holds back what the page already has.
    assert [i["id"] for i in form.client.get(f"/api/dataset/tester/queue?exclude={ds.edit_id},{ds.winner_id}").json()["items"]] == [ds.post_id]


def test_accept_with_a_caption_edit_and_reject_are_review_events(form) -> None:
    form, ds = form
    csrf = form.login()
    headers = {"X-CSRF-Token": csrf}
    accepted = decide(form, ds.edit_id, headers, decision="accept", caption="  t3st woman, head turned left ")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "accepted" and accepted.json()["remaining"] == 2
    assert row(form.url, ds.edit_id) == {"status": "accepted", "caption": "t3st woman, head turned left",
                                         "decided_by": "alice", "dataset_version": None}
    [event] = events(form.url, "dataset_accept")
    assert (event.subject_id, event.reviewer, event.persona_id) == (ds.edit_id, "alice", ds.persona_id)

    # Without JavaScript: the page's form, CSRF field and all, back to the queue with a flash.
    page = form.client.get("/dataset/tester")
    response = form.client.post(f"/dataset/candidates/{ds.winner_id}/decide",
                                data={"csrf_token": csrf_of(page.text), "decision": "reject", "caption": ""},
                                follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/dataset/tester"
    assert f"Candidate #{ds.winner_id} rejected." in form.client.get("/dataset/tester").text
    assert row(form.url, ds.winner_id)["status"] == "rejected" and row(form.url, ds.winner_id)["caption"] == "t3st woman, candidate 1"
    assert [e.subject_id for e in events(form.url, "dataset_reject")] == [ds.winner_id]
    assert [i["id"] for i in form.client.get("/api/dataset/tester/queue").json()["items"]] == [ds.post_id]
    audit = form.client.get("/audit").text  # the audit trail lists both, with the caption edit
    assert 'data-kind="dataset_accept"' in audit and 'data-kind="dataset_reject"' in audit
    assert "caption=t3st woman, head turned left" in audit


def test_a_decided_or_frozen_image_is_refused_clearly(form) -> None:
    form, ds = form
    csrf = form.login()
    headers = {"X-CSRF-Token": csrf}
    assert decide(form, ds.edit_id, headers, decision="accept").status_code == 200
    # Decided already: JSON for the API, the styled page for the form; nothing changes.
    again = decide(form, ds.edit_id, headers, decision="reject")
    assert again.status_code == 409 and str(ds.edit_id) in again.json()["error"]
    page = form.client.post(f"/dataset/candidates/{ds.edit_id}/decide", data={"csrf_token": csrf, "decision": "reject"})
    assert page.status_code == 409 and 'id="error-page"' in page.text and 'data-status="409"' in page.text
    assert row(form.url, ds.edit_id)["status"] == "accepted" and len(events(form.url, "dataset_reject")) == 0

    # In a built dataset version: frozen, and the refusal names the image and the version.
    with session_scope(form.url) as session:
        session.get(models.DatasetCandidate, ds.edit_id).dataset_version = "f00dfeed12345678"
    frozen = decide(form, ds.edit_id, headers, decision="reject")
    assert frozen.status_code == 409
    message = frozen.json()["error"]
    assert "f00dfeed" in message and ("cand-0.png" in message or str(ds.edit_id) in message), message
    page = form.client.post(f"/dataset/candidates/{ds.edit_id}/decide", data={"csrf_token": csrf, "decision": "reject"})
    assert page.status_code == 409 and "f00dfeed" in page.text and 'id="error-back"' in page.text
    assert row(form.url, ds.edit_id) == {"status": "accepted", "caption": "t3st woman, candidate 0", "decided_by": "alice",
                                         "dataset_version": "f00dfeed12345678"}


def test_login_csrf_and_input_checks(form) -> None:
    form, ds = form
    # Not logged in: the API answers 401 JSON, the page sends to the login page.
    assert decide(form, ds.edit_id, {}, decision="accept").status_code == 401
    assert form.client.get("/api/dataset/tester/queue").status_code == 401
    assert form.client.get("/dataset/tester", follow_redirects=False).headers["location"] == "/login?next=/dataset/tester"
    csrf = form.login()
    headers = {"X-CSRF-Token": csrf}
    assert decide(form, ds.edit_id, {}, decision="accept").status_code == 403
    assert decide(form, ds.edit_id, {"X-CSRF-Token": "wrong"}, decision="accept").status_code == 403
    assert form.client.post(f"/dataset/candidates/{ds.edit_id}/decide", data={"decision": "accept"}).status_code == 403
    bad = decide(form, ds.edit_id, headers, decision="maybe")
    assert bad.status_code == 400 and "decision must be accept or reject" in bad.json()["error"]
    long = decide(form, ds.edit_id, headers, decision="accept", caption="x" * 2001)  # decide's rule, under the body limit
    assert long.status_code == 409 and "is 2001 characters" in long.json()["error"]
    assert "is empty" in decide(form, ds.edit_id, headers, decision="accept", caption="   ").json()["error"]
    assert decide(form, ds.edit_id, headers, decision="accept", caption=["x"]).status_code == 400
    assert decide(form, 99999, headers, decision="accept").status_code == 404
    assert form.client.post("/api/dataset/candidates/0/decide", json={"decision": "accept"}, headers=headers).status_code == 404
    assert form.client.get("/dataset/no..such").status_code == 404
    assert form.client.get("/dataset/nobody").status_code == 404
    assert form.client.get("/api/dataset/nobody/queue").status_code == 404
    assert form.client.get("/api/dataset/tester/queue?exclude=1,x").status_code == 400
    assert form.client.get("/api/dataset/tester/queue?exclude=" + ",".join(["1"] * 101)).status_code == 400
    assert row(form.url, ds.edit_id)["status"] == "pending" and not events(form.url, "dataset_accept")


def test_the_sensor_starts_one_dataset_version_once_reviewing_pauses(form) -> None:
    form, ds = form
    headers = {"X-CSRF-Token": form.login()}
    with session_scope(form.url) as session:
        start = DatasetCursor(session.scalar(select(models.ReviewEvent.id).order_by(models.ReviewEvent.id.desc()).limit(1)) or 0)
    assert decide(form, ds.edit_id, headers, decision="accept").status_code == 200
    assert decide(form, ds.winner_id, headers, decision="reject").status_code == 200
    assert decide(form, ds.post_id, headers, decision="accept", caption="t3st woman at the beach").status_code == 200
    last = events(form.url, "dataset_accept")[-1]
    with session_scope(form.url) as session:
        # Still reviewing: nothing yet, the decisions wait in the cursor.
        requests, cursor, _ = plan_dataset_runs(session, start, last.created_at + timedelta(seconds=5))
        assert requests == [] and cursor.waiting["tester"]["changes"] == 2 and cursor.waiting["tester"]["others"] == 1
        # Quiet: one run for the persona, keyed by the last decision; the cursor survives a reload.
        requests, after, _ = plan_dataset_runs(session, DatasetCursor.load(cursor.dump()), last.created_at + DATASET_QUIET)
        [request] = requests
        assert (request.job_name, request.partition_key, request.run_key) == ("dataset_version", "tester",
                                                                              f"dataset_version:tester:{last.id}")
        assert request.tags["dataset_changes"] == "2" and after.waiting == {} and after.last_id == last.id
        # Evaluated twice from the old cursor: the same run key (Dagster drops the repeat).
        again, _, _ = plan_dataset_runs(session, start, last.created_at + DATASET_QUIET)
        assert [r.run_key for r in again] == [request.run_key]
    # Rejections alone leave the dataset as it was: nothing starts.
    with session_scope(form.url) as session:
        extra = dataset_candidates.add_candidate(session, ds.persona_id, origin="edit", image_path="dataset_candidates/x.png",
                                                 sha256="e" * 64, caption="t3st woman", identity_score=0.7,
                                                 identity_method="clip")
        session.flush()
        extra_id = extra.id
    assert decide(form, extra_id, headers, decision="reject").status_code == 200
    with session_scope(form.url) as session:
        requests, cursor, notes = plan_dataset_runs(session, after, models.utcnow() + DATASET_QUIET)
    assert requests == [] and cursor.waiting == {} and "no acceptance" in notes[0]


def test_undo_takes_back_your_own_recent_decision_until_a_version_holds_it(form) -> None:
    form, ds = form
    headers = {"X-CSRF-Token": form.login()}
    assert decide(form, ds.edit_id, headers, decision="accept", caption="t3st woman, head turned").status_code == 200
    undo = form.client.post(f"/api/dataset/candidates/{ds.edit_id}/undo", json={}, headers=headers)
    assert undo.status_code == 200, undo.text
    data = undo.json()
    # Back in the queue as it was before the decision: the caption too; the reply carries it to decide again.
    assert data["remaining"] == 3 and data["candidate"]["id"] == ds.edit_id and data["candidate"]["caption"] == "t3st woman, candidate 0"
    assert row(form.url, ds.edit_id) == {"status": "pending", "caption": "t3st woman, candidate 0", "decided_by": None,
                                         "dataset_version": None}
    [accept] = events(form.url, "dataset_accept")
    [undone] = events(form.url, "dataset_undo")
    assert undone.reviewer == "alice" and undone.payload["undone"] == "accepted" and undone.payload["event_id"] == accept.id
    assert undone.payload["undone_caption"] == "t3st woman, head turned"
    again = form.client.post(f"/api/dataset/candidates/{ds.edit_id}/undo", json={}, headers=headers)
    assert again.status_code == 409 and "no decision to undo" in again.json()["error"]
    # The sensor counts an undone acceptance as a change of the dataset.
    with session_scope(form.url) as session:
        requests, _, _ = plan_dataset_runs(session, DatasetCursor(accept.id), undone.created_at + DATASET_QUIET)
    assert [r.tags["dataset_changes"] for r in requests] == ["1"]

    # Someone else's decision, one too old, and one a built version holds: refused, nothing changes.
    assert decide(form, ds.winner_id, headers, decision="reject").status_code == 200
    bob = {"X-CSRF-Token": form.login("bob-token-4567")}
    theirs = form.client.post(f"/api/dataset/candidates/{ds.winner_id}/undo", json={}, headers=bob)
    assert theirs.status_code == 409 and "decided by alice" in theirs.json()["error"]
    assert decide(form, ds.post_id, bob, decision="accept").status_code == 200
    with session_scope(form.url) as session:
        session.get(models.DatasetCandidate, ds.post_id).decided_at = models.utcnow() - timedelta(minutes=6)
    old = form.client.post(f"/api/dataset/candidates/{ds.post_id}/undo", json={}, headers=bob)
    assert old.status_code == 409 and "more than 5 minutes ago" in old.json()["error"]
    with session_scope(form.url) as session:
        session.get(models.DatasetCandidate, ds.post_id).decided_at = models.utcnow()
        dataset_candidates.mark_included(session, [ds.post_id], "0123abcd")
    frozen = form.client.post(f"/api/dataset/candidates/{ds.post_id}/undo", json={}, headers=bob)
    assert frozen.status_code == 409 and "0123abcd" in frozen.json()["error"] and "cand-2.png" in frozen.json()["error"]
    assert row(form.url, ds.winner_id)["status"] == "rejected" and row(form.url, ds.post_id)["status"] == "accepted"
    assert len(events(form.url, "dataset_undo")) == 1
    assert form.client.post("/api/dataset/candidates/99999/undo", json={}, headers=bob).status_code == 404
    assert form.client.post(f"/api/dataset/candidates/{ds.post_id}/undo", json={}).status_code == 403


def test_a_dropped_candidate_is_listed_with_its_reason_and_a_reviewer_may_override_the_drop(form) -> None:
    form, ds = form
    twin, low = seed_dropped(form.url, form.home, ds.slug, ds.persona_id)
    headers = {"X-CSRF-Token": form.login()}
    # The queue lists only the pending ones; the dropped view lists the dropped, with the reason; both counts on each.
    queue = form.client.get("/api/dataset/tester/queue").json()
    assert [i["id"] for i in queue["items"]] == [ds.edit_id, ds.winner_id, ds.post_id]
    assert (queue["remaining"], queue["dropped"]) == (3, 2)
    dropped = form.client.get("/api/dataset/tester/queue?view=dropped").json()
    assert dropped["view"] == "dropped" and [i["id"] for i in dropped["items"]] == [twin, low]
    assert [(i["status"], i["reason"]) for i in dropped["items"]] == [("dropped", DROP_REASONS[0]), ("dropped", DROP_REASONS[1])]
    page = form.client.get("/dataset/tester?view=dropped")
    assert page.status_code == 200 and "2 dropped by the checks." in page.text and html.escape(DROP_REASONS[0]) in page.text
    assert 'name="override_drop" value="1"' in page.text and f'action="/dataset/candidates/{twin}/decide"' in page.text
    assert re.search(r'id="view-dropped" href="/dataset/tester\?view=dropped" aria-current="page">Dropped by the checks '
                     r'\(<span data-count="dropped">2</span>\)', page.text)
    assert 'name="override_drop"' not in form.client.get("/dataset/tester").text
    assert form.client.get("/api/dataset/tester/queue?view=accepted").status_code == 400
    assert "view must be one of pending, dropped" in form.client.get("/dataset/tester?view=x").text

    # A plain decision on a dropped one is refused (409, the reason and the way to override named) ...
    plain = decide(form, twin, headers, decision="accept")
    assert plain.status_code == 409 and "is already dropped: near duplicate" in plain.json()["error"]
    assert "override the drop" in plain.json()["error"]
    assert decide(form, twin, headers, decision="accept", override_drop="yes").status_code == 400
    # ... an override on a pending one too; the override itself is a dataset_accept event saying so.
    assert decide(form, ds.edit_id, headers, decision="accept", override_drop=True).status_code == 409
    accepted = decide(form, twin, headers, decision="accept", override_drop=True, caption="t3st woman, the same smile")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["overrode_drop"] is True and (accepted.json()["remaining"], accepted.json()["dropped"]) == (3, 1)
    assert row(form.url, twin) == {"status": "accepted", "caption": "t3st woman, the same smile", "decided_by": "alice",
                                   "dataset_version": None}
    [event] = events(form.url, "dataset_accept")
    assert (event.subject_id, event.reviewer, event.payload["overrides_drop"]) == (twin, "alice", DROP_REASONS[0])
    assert "overrides_drop=" + html.escape(DROP_REASONS[0]) in form.client.get("/audit").text
    # Undone: dropped again, in the dropped view, with its reason and caption.
    undone = form.client.post(f"/api/dataset/candidates/{twin}/undo", json={}, headers=headers).json()
    assert (undone["candidate"]["status"], undone["candidate"]["reason"], undone["dropped"]) == ("dropped", DROP_REASONS[0], 2)
    assert undone["candidate"]["caption"] == "t3st woman, dropped 0"
    # Without JavaScript: the dropped view's form (its hidden override_drop) rejects one for good, back to the view.
    page = form.client.get("/dataset/tester?view=dropped")
    response = form.client.post(f"/dataset/candidates/{low}/decide", follow_redirects=False,
                                data={"csrf_token": csrf_of(page.text), "decision": "reject", "override_drop": "1"})
    assert response.status_code == 303 and response.headers["location"] == "/dataset/tester?view=dropped"
    assert f"Candidate #{low} rejected over the drop." in form.client.get("/dataset/tester?view=dropped").text
    assert row(form.url, low)["status"] == "rejected"
    assert events(form.url, "dataset_reject")[-1].payload["overrides_drop"] == DROP_REASONS[1]
    bad = form.client.post(f"/dataset/candidates/{twin}/decide", data={"csrf_token": csrf_of(page.text),
                                                                      "decision": "accept", "override_drop": "yes"})
    assert bad.status_code == 400 and row(form.url, twin)["status"] == "dropped"


    # The sensor counts an accepted override as a change of the dataset; once built in, it is frozen.
    assert decide(form, twin, headers, decision="accept", override_drop=True).status_code == 200
    last = events(form.url, "dataset_accept")[-1]
    with session_scope(form.url) as session:
        requests, _, _ = plan_dataset_runs(session, DatasetCursor(last.id - 1), last.created_at + DATASET_QUIET)
        assert [r.tags["dataset_changes"] for r in requests] == ["1"]
        dataset_candidates.mark_included(session, [twin], "cafe0123beef")
    for path, body in ((f"/api/dataset/candidates/{twin}/decide", {"decision": "reject", "override_drop": True}),
                       (f"/api/dataset/candidates/{twin}/undo", {})):
        frozen = form.client.post(path, json=body, headers=headers)
        assert frozen.status_code == 409 and "cafe0123beef" in frozen.json()["error"] and "dropped-0.png" in frozen.json()["error"]
    assert row(form.url, twin)["status"] == "accepted"


def test_the_start_page_links_what_the_checks_dropped_even_when_nothing_waits(form) -> None:
    form, ds = form
    twin, low = seed_dropped(form.url, form.home, ds.slug, ds.persona_id)
    headers = {"X-CSRF-Token": form.login()}
    dropped_link = r'href="/dataset/tester\?view=dropped" data-dataset-dropped="2">See 2 dataset images the checks dropped<'
    start = form.client.get("/").text
    assert 'data-dataset-pending="3">Review 3 dataset candidates<' in start and re.search(dropped_link, start)
    for candidate_id in (ds.edit_id, ds.winner_id, ds.post_id):
        assert decide(form, candidate_id, headers, decision="reject").status_code == 200
    # Nothing waits now, and the dropped view (the only place to override a drop) is still one click away.
    start = form.client.get("/").text
    assert "data-dataset-pending" not in start and re.search(dropped_link, start)
    assert decide(form, low, headers, decision="reject", override_drop=True).status_code == 200
    assert 'data-dataset-dropped="1">See 1 dataset image the checks dropped<' in form.client.get("/").text
    assert decide(form, twin, headers, decision="reject", override_drop=True).status_code == 200
    assert "data-dataset-dropped" not in form.client.get("/").text
