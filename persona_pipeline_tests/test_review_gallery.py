"""The gallery over HTTP (Starlette's TestClient), on SQLite and PostgreSQL: each image's scores,
the side-by-side comparison of any two, and kill / restore, each a `review_events` row whose effect
the ranking takes back (a restored candidate is ranked again on all of its votes)."""

from __future__ import annotations

import html
import re
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from persona_pipeline.automation.jobs import advance_runs_job
from persona_pipeline.automation.review_sensor import ReviewCursor, plan_review_runs
from persona_pipeline.db import models, review
from persona_pipeline.db.session import session_scope
from persona_pipeline.generation import runs
from persona_pipeline_tests.review_fixtures import seed_review
from persona_pipeline_tests.test_review_form import Form, events, make_form


@pytest.fixture
def form(db_url, tmp_path) -> Form:
    return make_form(db_url, tmp_path)


def cards(page: str, list_id: str) -> dict[int, str]:
    """candidate id → its card's HTML, in the <ol id=list_id>."""
    match = re.search(rf'<ol class="ranking[^"]*" id="{list_id}">(.*?)</ol>', page, re.S)
    if match is None:
        return {}
    return {int(cid): body for cid, body in re.findall(r'<li class="cand[^"]*" data-candidate-id="(\d+)".*?>(.*?)</li>',
                                                      match.group(1), re.S)}


def score(card: str, name: str) -> str:
    return html.unescape(re.search(rf'data-score="{name}">(.*?)</dd>', card, re.S).group(1)).strip()


def vote(url: str, winner: int, loser: int) -> None:
    with session_scope(url) as session:
        review.cast_vote(session, winner, loser, "alice")


def test_every_image_shows_its_scores_and_any_two_compare_side_by_side(form: Form) -> None:
    csrf = form.login()
    ids = form.seed.candidate_ids
    with session_scope(form.url) as session:
        for i, cid in enumerate(ids[:4]):  # two images never measured: they show a dash
            cand = session.get(models.Candidate, cid)
            cand.identity_score, cand.clip_score = 0.712 + i / 100, 0.312 + i / 100
    for winner, loser in ((ids[0], ids[1]), (ids[0], ids[1]), (ids[1], ids[0]), (ids[2], ids[3])):
        vote(form.url, winner, loser)
    step_id = form.seed.step_ids[0]
    page = form.client.get(f"/steps/{step_id}")
    assert page.status_code == 200 and csrf
    ranked = cards(page.text, "ranking")
    assert sorted(ranked) == sorted(ids)
    assert score(ranked[ids[0]], "identity") == "0.71" and score(ranked[ids[0]], "alignment") == "0.31"
    assert score(ranked[ids[3]], "identity") == "0.74" and score(ranked[ids[3]], "alignment") == "0.34"
    assert score(ranked[ids[5]], "identity") == "–" and score(ranked[ids[5]], "alignment") == "–"
    assert score(ranked[ids[0]], "votes").startswith("2–1 · ") and "3 votes" in score(ranked[ids[0]], "votes")
    with session_scope(form.url) as session:
        assert score(ranked[ids[0]], "elo") == str(session.get(models.Candidate, ids[0]).elo)
    assert all(f'name="c" value="{cid}" form="compare-form"' in ranked[cid] for cid in ids)
    assert '<form id="compare-form" class="compare-bar" method="get" action="/steps/%d/compare">' % step_id in page.text
    assert "Killed" not in page.text  # nothing killed yet

    compare = form.client.get(f"/steps/{step_id}/compare?c={ids[0]}&c={ids[1]}")
    assert compare.status_code == 200
    sides = re.findall(r'<figure class="compare-side[^"]*" data-candidate-id="(\d+)">', compare.text)
    assert sides == [str(ids[0]), str(ids[1])]
    head = html.unescape(re.sub(r"\s+", " ", re.search(r'id="head-to-head"[^>]*>(.*?)</p>', compare.text, re.S).group(1)))
    assert f"#{ids[0]} won 2, #{ids[1]} won 1." in head
    chance = int(re.search(r"a (\d+)% chance", head).group(1))
    assert 50 < chance < 100  # 2–1 up: the ranking prefers the first, not surely
    for cid in ids[:2]:
        assert f'src="/media/personas/tester/runs/run-{form.seed.run_id}/step-1/' in compare.text
        assert f"Yes, kill #{cid}" in compare.text
    swapped = form.client.get(f"/steps/{step_id}/compare?c={ids[1]}&c={ids[0]}")
    assert re.findall(r'data-candidate-id="(\d+)">', swapped.text)[:2] == [str(ids[1]), str(ids[0])]
    assert abs(int(re.search(r"a (\d+)% chance", swapped.text).group(1)) - (100 - chance)) <= 1  # rounding

    for query, status, text in ((f"c={ids[0]}", 400, "choose exactly two images"),
                                (f"c={ids[0]}&c={ids[1]}&c={ids[2]}", 400, "choose exactly two images"),
                                (f"c={ids[0]}&c={ids[0]}", 400, "two different images"),
                                (f"c={ids[0]}&c=abc", 400, "c must be a positive integer")):
        refused = form.client.get(f"/steps/{step_id}/compare?{query}")
        assert refused.status_code == status and text in html.unescape(refused.text), query
        assert 'id="error-page"' in refused.text
    other = seed_review(form.url, form.home, slug="other", candidates=2, steps=1, posts=0)
    foreign = form.client.get(f"/steps/{step_id}/compare?c={ids[0]}&c={other.candidate_ids[0]}")
    assert foreign.status_code == 404 and f"is not an image of step {step_id}" in foreign.text


def test_kill_and_restore_are_review_events_and_the_ranking_takes_the_image_back(form: Form) -> None:
    csrf = form.login("bob-token-4567")
    ids = form.seed.candidate_ids
    step_id = form.seed.step_ids[0]
    for winner, loser in ((ids[2], ids[0]), (ids[2], ids[1]), (ids[3], ids[2]), (ids[2], ids[4])):
        vote(form.url, winner, loser)
    with session_scope(form.url) as session:
        before = {r.candidate_id: r for r in review.step_ranking(session, step_id)}
    gallery = form.client.get(f"/steps/{step_id}").text
    assert f'action="/candidates/{ids[2]}/kill"' in gallery and f"Kill #{ids[2]}?" in gallery  # behind a confirmation

    killed = form.client.post(f"/candidates/{ids[2]}/kill", data={"csrf_token": csrf, "step_id": str(step_id),
                                                                    "reason": "hands <wrong>"}, follow_redirects=False)
    assert killed.status_code == 303 and killed.headers["location"] == f"/steps/{step_id}"
    page = form.client.get(killed.headers["location"]).text
    assert f"Candidate {ids[2]} killed." in html.unescape(page)
    assert ids[2] not in cards(page, "ranking") and len(cards(page, "ranking")) == 5
    gone = cards(page, "killed")
    assert list(gone) == [ids[2]]
    assert "killed by bob: hands &lt;wrong&gt;" in gone[ids[2]]
    assert score(gone[ids[2]], "votes").startswith("3–1")  # its record is kept while it is out
    assert f'action="/candidates/{ids[2]}/restore"' in gone[ids[2]] and f"Restore #{ids[2]}?" in gone[ids[2]]
    with session_scope(form.url) as session:
        assert session.get(models.Candidate, ids[2]).status == "killed"
        assert session.get(models.RunStep, step_id).status == "generating"  # the kill asked for a replacement
    (kill_event,) = events(form.url, "kill")
    assert kill_event.payload["previous_status"] == "active" and kill_event.reviewer == "bob"

    restored = form.client.post(f"/candidates/{ids[2]}/restore", data={"csrf_token": csrf, "step_id": str(step_id),
                                                                        "reason": "fine after all"}, follow_redirects=False)
    assert restored.status_code == 303 and restored.headers["location"] == f"/steps/{step_id}"
    page = form.client.get(restored.headers["location"]).text
    assert f"Candidate {ids[2]} restored" in page
    assert sorted(cards(page, "ranking")) == sorted(ids) and cards(page, "killed") == {}
    (event,) = events(form.url, "restore")
    assert (event.reviewer, event.subject_type, event.subject_id) == ("bob", "candidate", ids[2])
    assert event.payload == {"step_id": step_id, "reason": "fine after all", "status": "active", "kill_event_id": kill_event.id}
    with session_scope(form.url) as session:
        cand = session.get(models.Candidate, ids[2])
        assert (cand.status, cand.status_reason) == ("active", "restored by bob: fine after all")
        after = {r.candidate_id: r for r in review.step_ranking(session, step_id)}
        # The same votes, the same live candidates: the ranking is exactly what it was before the kill.
        assert {c: (r.score, r.wins, r.losses) for c, r in after.items()} == {c: (r.score, r.wins, r.losses)
                                                                            for c, r in before.items()}
        # The sensor starts advance_runs for it, which finds nothing to make and puts the step back to voting.
        requests, _, _ = plan_review_runs(session, ReviewCursor(last_id=kill_event.id), datetime.now(timezone.utc))
        assert [(r.job_name, r.partition_key) for r in requests] == [(advance_runs_job.name, "tester")]
        assert [s.id for s in runs.finish_steps(session, form.seed.persona_id)] == [step_id]

    again = form.client.post(f"/candidates/{ids[2]}/restore", data={"csrf_token": csrf, "step_id": str(step_id)})
    assert again.status_code == 400 and "is active, not killed" in again.text and 'id="ranking"' in again.text
    unknown = form.client.post("/candidates/999999/restore", data={"csrf_token": csrf, "step_id": str(step_id)})
    assert unknown.status_code == 404 and 'id="error-page"' in unknown.text
    no_csrf = form.client.post(f"/candidates/{ids[0]}/kill", data={"step_id": str(step_id)})
    assert no_csrf.status_code == 403 and len(events(form.url, "kill")) == 1

    # Once the step is approved its killed images stay out: restore is refused and not offered.
    form.client.post(f"/candidates/{ids[5]}/kill", data={"csrf_token": csrf, "step_id": str(step_id)})
    with session_scope(form.url) as session:
        runs.finish_steps(session, form.seed.persona_id)
    approved = form.client.post(f"/steps/{step_id}/approve", data={"csrf_token": csrf, "top_k": "2"}, follow_redirects=False)
    assert approved.status_code == 303
    page = form.client.get(f"/steps/{step_id}").text
    assert list(cards(page, "killed")) == [ids[5]] and "/restore" not in page and "Kill…" not in page
    late = form.client.post(f"/candidates/{ids[5]}/restore", data={"csrf_token": csrf, "step_id": str(step_id)})
    assert late.status_code == 400 and "can no longer be restored" in late.text
    assert len(events(form.url, "restore")) == 1


def test_a_restored_image_gets_back_the_status_it_had(db_url, tmp_path) -> None:
    """A culled image (kept out by keep-best) that was killed comes back culled, not active."""
    form = make_form(db_url, tmp_path, candidates=3, posts=0)
    cid = form.seed.candidate_ids[1]
    with session_scope(db_url) as session:
        session.get(models.Candidate, cid).status = "culled"
    with session_scope(db_url) as session:
        review.kill_candidate(session, cid, "alice")
    with session_scope(db_url) as session:
        assert review.restore_candidate(session, cid, "alice").status == "culled"
        statuses = session.scalars(select(models.Candidate.status).where(models.Candidate.step_id == form.seed.step_ids[0]))
        assert sorted(statuses) == ["active", "active", "culled"]
