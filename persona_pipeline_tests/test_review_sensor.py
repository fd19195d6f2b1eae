"""The review sensor turns review events into runs: debounced rankings after votes, advance_runs
after approvals and kills, the library after a winner, the calendar after post decisions. Run keys
are stable per event, so a tick evaluated twice asks for the same runs."""

from datetime import datetime, timedelta, timezone

import dagster as dg
from sqlalchemy import select

from persona_pipeline.automation.review_sensor import VOTE_MAX_WAIT, VOTE_QUIET, ReviewCursor, plan_review_runs, review_sensor
from persona_pipeline.db import models, review, review_posts
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_definitions
from persona_pipeline_tests.conftest import make_settings
from persona_pipeline_tests.review_fixtures import seed_review


def _plan(url, cursor, now):
    with session_scope(url) as session:
        return plan_review_runs(session, cursor, now)


def _last_event(url):
    with session_scope(url) as session:
        return session.scalars(select(models.ReviewEvent).order_by(models.ReviewEvent.id.desc())).first()


def test_votes_are_debounced_into_one_rankings_run(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=4, posts=0)
    a, b, c, _ = seed.candidate_ids
    with session_scope(db_url) as session:
        review.cast_vote(session, a, b, "ana")
        review.cast_vote(session, a, c, "ana")
    last = _last_event(db_url)
    requests, cursor, _ = _plan(db_url, ReviewCursor(), last.created_at + timedelta(seconds=1))
    assert requests == [] and cursor.last_id == last.id and cursor.waiting_votes[seed.slug]["last_id"] == last.id
    # nothing new, but the votes have been quiet long enough
    requests, cursor2, _ = _plan(db_url, cursor, last.created_at + VOTE_QUIET)
    [request] = requests
    assert (request.job_name, request.partition_key, request.run_key) == ("rankings_refresh", seed.slug,
                                                                         f"rankings_refresh:{seed.slug}:{last.id}")
    # the run refits the step the votes were cast on (and any other step whose inputs changed)
    assert request.run_config == {"ops": {"rankings": {"config": {"step_ids": [seed.step_ids[0]]}}}}
    assert cursor2.waiting_votes == {} and cursor2.last_id == last.id
    # the same tick evaluated again from the old cursor asks for the very same run (Dagster drops it)
    again, _, _ = _plan(db_url, cursor, last.created_at + VOTE_QUIET)
    assert [r.run_key for r in again] == [request.run_key]
    # from the new cursor: nothing repeated
    assert _plan(db_url, cursor2, last.created_at + timedelta(hours=1))[0] == []


def test_continuous_voting_still_refreshes_after_the_maximum_wait(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=3, posts=0)
    a, b, c = seed.candidate_ids
    with session_scope(db_url) as session:
        review.cast_vote(session, a, b, "ana")
    first = _last_event(db_url)
    _, cursor, _ = _plan(db_url, ReviewCursor(), first.created_at)
    with session_scope(db_url) as session:
        review.cast_vote(session, a, c, "ana")
        session.flush()
        # the second vote is recent relative to `now` below: quiet has not come, the wait is over
        session.scalars(select(models.ReviewEvent).order_by(models.ReviewEvent.id.desc())).first().created_at = \
            first.created_at + VOTE_MAX_WAIT
    requests, cursor, _ = _plan(db_url, cursor, first.created_at + VOTE_MAX_WAIT + timedelta(seconds=1))
    assert [r.job_name for r in requests] == ["rankings_refresh"] and cursor.waiting_votes == {}


def test_each_decision_starts_its_job(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=3, steps=2, posts=2)
    solo = seed_review(db_url, tmp_path / "home", candidates=2, steps=1, posts=0, slug="solo")
    a, b, c = seed.candidate_ids
    with session_scope(db_url) as session:
        review.cast_vote(session, a, b, "ana")
        review.approve_step(session, seed.step_ids[0], 2, "ana")
        review.pick_winner(session, solo.run_id, solo.candidate_ids[0], "ana")
        review_posts.approve_post(session, seed.post_ids[0], "ana")
        review_posts.reject_post(session, seed.post_ids[1], "ana")
    last = _last_event(db_url)
    requests, cursor, _ = _plan(db_url, ReviewCursor(), last.created_at)
    got = sorted((r.job_name, r.partition_key) for r in requests)
    assert got == [("advance_runs", seed.slug), ("library", "solo"), ("post_calendar_refresh", seed.slug)]
    # advance_runs refreshes rankings itself, so the persona's waiting vote is settled
    assert seed.slug not in cursor.waiting_votes
    with session_scope(db_url) as session:
        ids = {e.kind: e.id for e in session.scalars(select(models.ReviewEvent).order_by(models.ReviewEvent.id))}
    # each run key names the last event it covers: a replay of the tick gives the same keys
    assert {r.job_name: r.run_key for r in requests} == {
        "advance_runs": f"advance_runs:{seed.slug}:{ids['approve_step']}", "library": f"library:solo:{ids['pick_winner']}",
        "post_calendar_refresh": f"post_calendar_refresh:{seed.slug}:{ids['reject_post']}"}


def test_events_of_a_removed_persona_start_nothing(db_url, tmp_path):
    seed = seed_review(db_url, tmp_path / "home", candidates=2, posts=0)
    with session_scope(db_url) as session:
        review.kill_candidate(session, seed.candidate_ids[0], "ana")
        session.get(models.Persona, seed.persona_id).active = False
    requests, cursor, notes = _plan(db_url, ReviewCursor(), datetime.now(timezone.utc))
    assert requests == [] and cursor.last_id == _last_event(db_url).id and "folder is gone" in notes[0]


def test_the_sensor_and_the_rankings_job_it_starts(tmp_path):
    url = f"sqlite:///{tmp_path / 'app.db'}"
    settings = make_settings(tmp_path, url, auto_review=False)
    from persona_pipeline.db.session import upgrade

    upgrade(url)
    seed = seed_review(url, settings.home, candidates=3, steps=1, posts=0)
    a, b, c = seed.candidate_ids
    with session_scope(url) as session:
        for winner, loser in [(c, a), (c, b), (b, a)]:
            review.cast_vote(session, winner, loser, "ana")
        for event in session.scalars(select(models.ReviewEvent)):
            event.created_at -= VOTE_QUIET  # the votes have been quiet long enough
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", [seed.slug])
    with dg.build_sensor_context(instance=instance, resources={"database": defs.resources["database"]}) as context:
        result = review_sensor(context)
    [request] = result.run_requests
    assert request.job_name == "rankings_refresh" and ReviewCursor.load(result.cursor).last_id == _last_event(url).id
    job = defs.resolve_job_def(request.job_name)
    outcome = job.execute_in_process(partition_key=request.partition_key, instance=instance, tags=request.tags,
                                     run_config=request.run_config)
    assert outcome.success
    metadata = outcome.asset_materializations_for_node("rankings")[0].metadata
    assert metadata["steps_refit"].value == 1 and metadata["ranked_candidates"].value == 3
    with session_scope(url) as session:
        scores = {cand.id: cand.bt_score for cand in session.scalars(select(models.Candidate))}
    assert scores[c] > scores[b] > scores[a]
    with dg.build_sensor_context(instance=instance, cursor=result.cursor,
                                 resources={"database": defs.resources["database"]}) as context:
        assert review_sensor(context).run_requests == []
