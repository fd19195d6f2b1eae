"""The vote page's undo and counts over HTTP (Starlette's TestClient), on SQLite and PostgreSQL.

An undone vote is a recorded operation: its `Vote` row is gone (so nothing that reads votes counts
it: Bradley–Terry, the Elo replay, the unvoted-pair count, the gallery), the whole vote is kept in
an `undo_vote` event, and the pair comes back on screen as a new offer. A kill is undone with the
gallery's `restore_candidate`; a skip is reopened. And every answer carries the one count of pairs
not voted yet that the queue and the gallery show."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from persona_pipeline.automation.review_sensor import ReviewCursor, plan_review_runs
from persona_pipeline.db import models, review, review_views
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import elo
from persona_pipeline_tests.test_review_form import Form, events, make_form, queue_counts


@pytest.fixture
def form(db_url, tmp_path) -> Form:
    return make_form(db_url, tmp_path, candidates=5, steps=1, posts=0)


def vote_on(form: Form, offer: dict, headers: dict, left_wins: bool = True) -> dict:
    winner, loser = (offer["left"], offer["right"]) if left_wins else (offer["right"], offer["left"])
    response = form.client.post("/api/votes", json={"offer_id": offer["offer_id"], "winner_id": winner["id"],
                                                    "loser_id": loser["id"]}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def gallery_unvoted(form: Form, step_id: int) -> int:
    text = form.client.get(f"/steps/{step_id}").text
    return int(re.search(r"· (\d+) pairs? not voted", text).group(1))


def test_an_undone_vote_stops_counting_everywhere_and_is_kept_in_the_audit_trail(form: Form) -> None:
    csrf = form.login()
    headers = {"X-CSRF-Token": csrf}
    step_id = form.seed.step_ids[0]
    first = form.pair()
    assert first["remaining"] == 10  # 5 candidates: 10 pairs
    kept = vote_on(form, first, headers)
    assert kept["remaining"] == 9
    second = form.pair(exclude=[first["offer_id"]])
    cast = vote_on(form, second, headers, left_wins=False)
    assert cast["remaining"] == 8 and cast["as_of"] > kept["as_of"]
    assert gallery_unvoted(form, step_id) == 8 and queue_counts(form)["pairs_to_vote"] == 8

    with session_scope(form.url) as session:
        before_undo = session.scalar(select(func.max(models.ReviewEvent.id)))
    undo = form.client.post(f"/api/votes/{cast['vote_id']}/undo", json={}, headers=headers)
    assert undo.status_code == 200, undo.text
    # The review sensor treats an undone vote like a vote: the rankings are refreshed.
    with session_scope(form.url) as session:
        requests, _, _ = plan_review_runs(session, ReviewCursor(before_undo, {}), models.utcnow() + timedelta(minutes=10))
    assert [r.job_name for r in requests] == ["rankings_refresh"]
    data = undo.json()
    # The count is the same everywhere: the reply, the gallery, the queue and the view function.
    assert data["remaining"] == 9 and gallery_unvoted(form, step_id) == 9 and queue_counts(form)["pairs_to_vote"] == 9
    # The same pair is back on screen as a new offer, which takes a vote at once (it is shown).
    again = data["pair"]
    assert {again["left"]["id"], again["right"]["id"]} == {second["left"]["id"], second["right"]["id"]}
    assert again["offer_id"] != second["offer_id"] and again["strategy"] == "again"
    with session_scope(form.url) as session:
        assert session.get(models.Vote, cast["vote_id"]) is None
        assert [v.id for v in session.scalars(select(models.Vote).where(models.Vote.step_id == step_id))] == [kept["vote_id"]]
        assert session.get(models.PairOffer, second["offer_id"]).outcome == "undone"
        assert session.get(models.PairOffer, again["offer_id"]).shown_at is not None
        assert review_views.unvoted_pairs(session, step_id) == 9
        ranking = {r.candidate_id: r for r in review.step_ranking(session, step_id, rounds=50)}
        assert sum(r.wins for r in ranking.values()) == 1 and sum(r.losses for r in ranking.values()) == 1
        # Elo is the replay of the one vote left, as if the undone vote had never been cast.
        replay = elo.replay(form.seed.candidate_ids, [(kept["winner_id"], kept["loser_id"])])
        for cid in form.seed.candidate_ids:
            assert session.get(models.Candidate, cid).elo == replay[cid].elo
    [event] = events(form.url, "undo_vote")
    assert (event.reviewer, event.subject_type, event.subject_id) == ("alice", "vote", cast["vote_id"])
    assert event.payload["winner_id"] == cast["winner_id"] and event.payload["loser_id"] == cast["loser_id"]
    assert event.payload["offer_id"] == second["offer_id"] and event.payload["elo_delta"] == cast["elo_delta"]
    assert "undo_vote" in form.client.get("/audit").text

    # Undone twice: refused, nothing changes.
    twice = form.client.post(f"/api/votes/{cast['vote_id']}/undo", json={}, headers=headers)
    assert twice.status_code == 409 and "already been undone" in twice.json()["error"]
    # Voting on the pair again counts once.
    recast = vote_on(form, again, headers)
    assert recast["remaining"] == 8


def test_undo_is_only_for_your_own_recent_vote_on_an_open_step(form: Form) -> None:
    csrf = form.login()
    headers = {"X-CSRF-Token": csrf}
    step_id = form.seed.step_ids[0]
    one = vote_on(form, form.pair(), headers)
    two = vote_on(form, form.pair(), headers)
    bob_csrf = form.login("bob-token-4567")
    refused = form.client.post(f"/api/votes/{two['vote_id']}/undo", json={}, headers={"X-CSRF-Token": bob_csrf})
    assert refused.status_code == 403 and "only they can undo it" in refused.json()["error"]
    csrf = form.login()
    headers = {"X-CSRF-Token": csrf}
    with session_scope(form.url) as session:  # the first vote was cast longer ago than the window
        session.get(models.Vote, one["vote_id"]).created_at = models.utcnow() - review.UNDO_WINDOW - timedelta(seconds=5)
    old = form.client.post(f"/api/votes/{one['vote_id']}/undo", json={}, headers=headers)
    assert old.status_code == 400 and "can no longer be undone" in old.json()["error"]
    with session_scope(form.url) as session:
        session.get(models.RunStep, step_id).status = "approved"
    closed = form.client.post(f"/api/votes/{two['vote_id']}/undo", json={}, headers=headers)
    assert closed.status_code == 400 and "approved" in closed.json()["error"]
    assert form.client.post("/api/votes/99999/undo", json={}, headers=headers).status_code == 404
    assert form.client.post(f"/api/votes/{two['vote_id']}/undo", json={}).status_code == 403  # no CSRF header
    with session_scope(form.url) as session:
        assert session.scalar(select(func.count()).select_from(models.Vote)) == 2
    assert events(form.url, "undo_vote") == []


def test_a_kill_and_a_skip_from_the_vote_page_are_undone_and_their_pair_comes_back(form: Form) -> None:
    csrf = form.login()
    headers = {"X-CSRF-Token": csrf}
    offer = form.pair()
    doomed = offer["right"]["id"]
    killed = form.client.post(f"/api/candidates/{doomed}/kill", json={"offer_id": offer["offer_id"]}, headers=headers)
    assert killed.status_code == 200 and killed.json()["remaining"] == 6  # 4 live: 6 pairs
    restored = form.client.post(f"/api/candidates/{doomed}/restore", json={"offer_id": offer["offer_id"]}, headers=headers)
    assert restored.status_code == 200, restored.text
    data = restored.json()
    assert data["status"] == "active" and data["remaining"] == 10
    assert {data["pair"]["left"]["id"], data["pair"]["right"]["id"]} == {offer["left"]["id"], doomed}
    [restore] = events(form.url, "restore")
    assert restore.subject_id == doomed and restore.payload["kill_event_id"] == events(form.url, "kill")[0].id
    # A restore naming an offer the candidate is not in is refused, and restores nothing.
    other = form.pair(exclude=[data["pair"]["offer_id"]])
    stranger = next(c for c in form.seed.candidate_ids if c not in (other["left"]["id"], other["right"]["id"]))
    with session_scope(form.url) as session:
        review.kill_candidate(session, stranger, "alice")
    wrong = form.client.post(f"/api/candidates/{stranger}/restore", json={"offer_id": other["offer_id"]}, headers=headers)
    assert wrong.status_code == 400
    with session_scope(form.url) as session:
        assert session.get(models.Candidate, stranger).status == "killed"

    skip = form.client.post(f"/api/offers/{other['offer_id']}/skip", json={}, headers=headers)
    assert skip.status_code == 200 and skip.json()["remaining"] == 6
    unskip = form.client.post(f"/api/offers/{other['offer_id']}/undo-skip", json={}, headers=headers)
    assert unskip.status_code == 200, unskip.text
    assert {unskip.json()["pair"]["left"]["id"], unskip.json()["pair"]["right"]["id"]} == {other["left"]["id"], other["right"]["id"]}
    [undo_skip] = events(form.url, "undo_skip")
    assert undo_skip.subject_id == other["offer_id"]
    with session_scope(form.url) as session:
        assert session.get(models.PairOffer, other["offer_id"]).outcome == "undone"
    again = form.client.post(f"/api/offers/{other['offer_id']}/undo-skip", json={}, headers=headers)
    assert again.status_code == 400 and "not skipped" in again.json()["error"]


def test_the_vote_page_shows_the_prompt_and_what_to_judge_by_in_reviewer_words(form: Form) -> None:
    form.login()
    step_id = form.seed.step_ids[0]
    with session_scope(form.url) as session:
        run = session.get(models.GenerationRun, form.seed.run_id)
        persona = session.get(models.Persona, run.persona_id)
        pillar = models.ContentPillar(persona_id=persona.id, name="travel", weight=50, prompt="p",
                                      guidelines="Beaches and rooftops, always with a sense of arrival.")
        session.add(pillar)
        session.flush()
        run.pillar_id = pillar.id
        prompt, name = run.prompt, persona.name
    page = form.client.get(f"/steps/{step_id}/vote")
    assert page.status_code == 200
    text = re.sub(r"\s+", " ", page.text)
    assert f'<span id="prompt">{prompt}</span>' in text
    assert f"Identity first: is this clearly {name}" in text
    assert "Then the travel brief: Beaches and rooftops, always with a sense of arrival." in text
    assert "10 pairs not voted yet." in text
    for jargon in ("probability", "explore", "strategy"):
        assert jargon not in text.lower()


@pytest.mark.postgres
def test_a_vote_committed_between_the_counts_reads_never_labels_an_old_count_as_new(tmp_path, monkeypatch) -> None:
    """On PostgreSQL each statement sees what was committed when it began. A vote committed while
    `step_counts` reads must not come back as the old count under the new vote's `as_of`, which the
    page would keep over the right count."""
    from persona_fakes.databases import make_database
    from persona_pipeline.review import voting

    url, drop = make_database("postgresql", tmp_path)
    try:
        form = make_form(url, tmp_path, candidates=4, steps=1, posts=0)
        step_id = form.seed.step_ids[0]
        with session_scope(url) as session:
            persona_id = session.get(models.RunStep, step_id).run.persona_id
        count = review_views.unvoted_pairs
        landed: list[int] = []

        def count_then_a_vote_lands(session, step):
            seen = count(session, step)
            with session_scope(url) as other:  # another reviewer's answer commits now
                event = review.record_event(other, persona_id, "vote", "step", step, "bob", {})
                other.flush()
                landed.append(event.id)
            return seen

        monkeypatch.setattr(review_views, "unvoted_pairs", count_then_a_vote_lands)
        with session_scope(url) as session:
            counts = voting.step_counts(session, step_id)
        assert counts["remaining"] == 6 and counts["as_of"] < landed[0]
    finally:
        drop()
