"""The data layer on SQLite and PostgreSQL: migrations, votes, decisions, post states."""

import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from persona_pipeline.db import models, registry, review, review_posts
from persona_pipeline.db.session import alembic_config, current_revision, get_engine, head_revision, session_scope, upgrade
from persona_pipeline.domain import elo
from persona_pipeline.personas import load_persona
from persona_pipeline_tests.conftest import write_persona


HEAD = "0015"  # the latest migration


def test_migrations_match_the_models(db_url):
    assert current_revision(db_url) == head_revision() == HEAD
    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), models.Base.metadata)
    assert diff == []
    upgrade(db_url)  # applying again is a no-op
    assert current_revision(db_url) == HEAD
    command.downgrade(alembic_config(db_url), "0001")  # 0002 steps back without touching 0001's tables
    assert current_revision(db_url) == "0001"
    command.downgrade(alembic_config(db_url), "base")
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == HEAD


def _seed(session, tmp_path, n=4, runs=1):
    persona = registry.sync_persona(session, load_persona(write_persona(tmp_path, "voter", photos=0)))
    steps = []
    for _ in range(runs):
        run = models.GenerationRun(persona_id=persona.id, prompt="p", backend="diffusers")
        session.add(run)
        session.flush()
        step = models.RunStep(run_id=run.id, position=1, name="base", workflow="w", n_candidates=n, status="voting")
        session.add(step)
        session.flush()
        cands = [models.Candidate(run_id=run.id, step_id=step.id, seed=i, image_path=f"/x/{i}.png", image_sha256="0" * 64,
                                  manifest_path=f"/x/{i}.json") for i in range(n)]
        session.add_all(cands)
        session.flush()
        steps.append((run, step, cands))
    return persona, steps


def test_vote_applies_elo_and_records_a_review_event(db_url, tmp_path):
    with session_scope(db_url) as session:
        _, [(run, _, cands)] = _seed(session, tmp_path)
        ids = [c.id for c in cands]
    with session_scope(db_url) as session:
        review.cast_vote(session, ids[0], ids[1], "ana")
    with session_scope(db_url) as session:
        review.cast_vote(session, ids[2], ids[0], "ana")  # 1000 beats 1016: ±17
    with session_scope(db_url) as session:
        elos = {c.id: c.elo for c in session.scalars(select(models.Candidate))}
        assert elos[ids[0]] == 1016 - 17 and elos[ids[1]] == 984 and elos[ids[2]] == 1017
        events = session.scalars(select(models.ReviewEvent).order_by(models.ReviewEvent.id)).all()
        assert [(e.kind, e.reviewer) for e in events] == [("vote", "ana"), ("vote", "ana")]
        assert events[0].created_at.tzinfo is not None


def test_refused_votes_change_nothing(db_url, tmp_path):
    with session_scope(db_url) as session:
        _, [(_, _, a), (_, _, b)] = _seed(session, tmp_path, n=2, runs=2)
        a_ids, b_ids = [c.id for c in a], [c.id for c in b]
    with session_scope(db_url) as session:
        review.cast_vote(session, a_ids[0], a_ids[1], "ana")
    cases = [
        ((a_ids[0], a_ids[0]), review.ReviewError, 400, "against itself"),
        ((a_ids[0], b_ids[0]), review.ReviewError, 400, "different runs or steps"),
        ((a_ids[0], 999999), review.NotFound, 404, "does not exist"),
    ]
    for (winner, loser), error, code, message in cases:
        with pytest.raises(error, match=message) as caught:
            with session_scope(db_url) as session:
                review.cast_vote(session, winner, loser, "ana")
        assert caught.value.status_code == code
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count(models.Vote.id))) == 1
        assert {c.elo for c in session.scalars(select(models.Candidate).where(models.Candidate.id.in_(a_ids)))} == {1016, 984}


def test_concurrent_votes_on_one_pair_are_each_recorded_once_and_elo_matches_a_replay(db_url, tmp_path):
    # A pair may have several votes (pair selection asks a close pair again): six reviewers voting
    # on it at once are each recorded exactly once or refused, never doubled.
    with session_scope(db_url) as session:
        _, [(_, _, cands)] = _seed(session, tmp_path, n=2)
        x, y = cands[0].id, cands[1].id
    outcomes, barrier = [], threading.Barrier(6)

    def vote(i):
        barrier.wait()
        try:
            with session_scope(db_url) as session:
                review.cast_vote(session, *((x, y) if i % 2 else (y, x)), f"r{i}")
            outcomes.append("ok")
        except Exception as exc:  # SQLite may report the lock; it must still not double-count
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") >= 1, outcomes
    with session_scope(db_url) as session:
        votes = session.execute(select(models.Vote.winner_id, models.Vote.loser_id).order_by(models.Vote.id)).all()
        assert len(votes) == outcomes.count("ok")
        if db_url.startswith("postgresql"):
            # Row locks serialise the Elo updates. SQLite has none: concurrent votes sharing a
            # candidate can overwrite each other's Elo there (as votes on two pairs with a common
            # candidate always could); the votes themselves, which the ranking is fitted on, are kept.
            replay = elo.replay([x, y], [tuple(v) for v in votes])
            assert {c.id: c.elo for c in session.scalars(select(models.Candidate))} == {c: s.elo for c, s in replay.items()}


def test_pick_winner_and_post_approval_go_through_legal_transitions(db_url, tmp_path):
    with session_scope(db_url) as session:
        persona, [(run, _, cands)] = _seed(session, tmp_path, n=2)
        review.pick_winner(session, run.id, cands[1].id, "bo")
        assert cands[1].status == "winner" and run.winner_candidate_id == cands[1].id
        slot = datetime(2026, 12, 1, 10, tzinfo=timezone.utc)
        post = models.Post(persona_id=persona.id, candidate_id=cands[1].id, account="acct", caption="c", hashtags=[],
                           scheduled_at=slot)
        session.add(post)
        session.flush()
        with pytest.raises(review.ReviewError, match="'draft' cannot become 'scheduled'"):
            review_posts.approve_post(session, post.id, "bo")
        review_posts.set_post_status(session, post, "awaiting_approval")
        review_posts.approve_post(session, post.id, "bo", now=slot - timedelta(days=1))  # approved before its slot
        assert post.status == "scheduled"
        kinds = [e.kind for e in session.scalars(select(models.ReviewEvent).order_by(models.ReviewEvent.id))]
        assert kinds == ["pick_winner", "approve_post"]
        post_id, persona_id, cand_id = post.id, persona.id, cands[0].id
    with session_scope(db_url) as session:
        assert session.get(models.Post, post_id).scheduled_at == slot  # tz-aware round trip on both backends
    with pytest.raises(IntegrityError):  # one account, one slot
        with session_scope(db_url) as session:
            session.add(models.Post(persona_id=persona_id, candidate_id=cand_id, account="acct", caption="d",
                                    hashtags=[], scheduled_at=slot))


def test_primary_lora_is_unique_per_persona(db_url, tmp_path):
    with session_scope(db_url) as session:
        persona, _ = _seed(session, tmp_path, n=2)
        for i in range(2):
            registry.register_lora(session, persona.id, name=f"l{i}", path=tmp_path / f"l{i}.safetensors", sha256=str(i) * 64,
                                   base_model="tiny", trigger_word="t", dataset_id=None, training={}, weight=0.8)
        primaries = session.scalars(select(models.PersonaLora).where(models.PersonaLora.is_primary.is_(True))).all()
        assert len(primaries) == 1 and primaries[0].lora.name == "l1"
        assert registry.primary_lora(session, persona.id).weight == 0.8


@pytest.mark.postgres
def test_the_batch_engine_pings_a_connection_only_after_it_sat_idle_and_replaces_a_dead_one(tmp_path, monkeypatch):
    """pool_pre_ping cost a publish batch a SELECT 1 round trip per short transaction (three a
    published post): the batch engine uses a connection checked in a moment ago as it is, pings one
    that sat idle, and replaces one whose server side died meanwhile before the transaction runs on
    it. The app's other engine keeps the ping at every checkout (an outage's errors name the server)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from persona_fakes.databases import make_database
    from persona_pipeline.db import session as db_session

    url, cleanup = make_database("postgresql", tmp_path)
    engine = db_session.batch_engine(url)
    assert engine is not get_engine(url) and engine is db_session.batch_engine(url)
    assert get_engine(url).pool._pre_ping and not engine.pool._pre_ping
    pings = []
    real_ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: pings.append(1) or real_ping(conn), raising=False)
    try:
        pids = set()
        for _ in range(3):  # back to back, as a publish batch's writes go
            with engine.begin() as conn:
                pids.add(conn.execute(text("SELECT pg_backend_pid()")).scalar())
        assert len(pids) == 1 and pings == []

        # The server side of the pooled connection dies while it sits idle (a restart, a killed backend).
        dead = pids.pop()
        with create_engine(url, poolclass=NullPool).begin() as admin:
            assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": dead}).scalar()
        monkeypatch.setattr(db_session, "PING_IDLE_S", 0.0)  # as if it had sat in the pool past the limit
        with engine.begin() as conn:  # a new connection, not an error
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != dead
        assert pings  # the idle one was pinged (and the new one, as the limit is 0 here)
    finally:
        engine.dispose()
        get_engine.cache_clear()
        cleanup()
