"""The rankings refresh refits only the steps whose inputs changed, and leaves exactly what a full
refit leaves (db/rankings.py), on both databases."""

import random

from sqlalchemy import select

from persona_pipeline.db import models, rankings, registry, review
from persona_pipeline.db.session import session_scope
from persona_pipeline.personas import load_persona
from persona_pipeline_tests.conftest import write_persona


def no_pick(session, run, ranking):
    return None


def _persona_with_steps(url, tmp_path, runs=3, n=5):
    with session_scope(url) as session:
        persona = registry.sync_persona(session, load_persona(write_persona(tmp_path, "ranked", photos=0)))
        steps = []
        for r in range(runs):
            run = models.GenerationRun(persona_id=persona.id, prompt=f"p{r}", backend="diffusers",
                                       pipeline={"steps": [{"name": "base", "template": "t", "n": n, "top_k": 2}]})
            session.add(run)
            session.flush()
            step = models.RunStep(run_id=run.id, position=1, name="base", workflow="w", n_candidates=n, status="voting")
            session.add(step)
            session.flush()
            cands = [models.Candidate(run_id=run.id, step_id=step.id, seed=i, image_path=f"/x/{r}-{i}.png",
                                      image_sha256=f"{r:02d}{i:062d}", manifest_path=f"/x/{r}-{i}.json") for i in range(n)]
            session.add_all(cands)
            session.flush()
            steps.append((step.id, [c.id for c in cands]))
        return persona.id, steps


def _vote(url, cands, count, rng, reviewer="ana"):
    ids = []
    with session_scope(url) as session:
        for _ in range(count):
            a, b = rng.sample(cands, 2)
            ids.append(review.cast_vote(session, a, b, reviewer).id)
    return ids


def _refresh(url, persona_id, **kwargs):
    with session_scope(url) as session:
        return rankings.refresh_rankings(session, persona_id, no_pick, **kwargs)


def _stored(url):
    with session_scope(url) as session:
        return {c.id: (c.bt_score, c.bt_ci_low, c.bt_ci_high, c.elo, c.status)
                for c in session.scalars(select(models.Candidate).order_by(models.Candidate.id))}


def test_only_changed_steps_are_refit_and_the_result_is_a_full_refit(db_url, tmp_path):
    rng = random.Random(7)
    persona_id, steps = _persona_with_steps(db_url, tmp_path)
    for _, cands in steps:
        _vote(db_url, cands, 8, rng)
    first = _refresh(db_url, persona_id)
    assert first.refit_step_ids == [s for s, _ in steps] and first.unchanged_steps == 0
    assert len(first.rows) == 15 and len(first.open_steps) == 3
    again = _refresh(db_url, persona_id)
    assert again.refit_step_ids == [] and again.unchanged_steps == 3 and again.rows == []
    assert len(again.open_steps) == 3  # the to-review list still names every open step

    # A burst of votes on one step: that step alone is refit, and the stored results are a full refit's.
    (middle, middle_cands) = steps[1]
    vote_ids = _vote(db_url, middle_cands, 5, rng)
    burst = _refresh(db_url, persona_id)
    assert burst.refit_step_ids == [middle] and burst.unchanged_steps == 2
    incremental = _stored(db_url)
    full = _refresh(db_url, persona_id, full=True)
    assert full.refit_step_ids == [s for s, _ in steps] and full.elo_corrections == 0
    assert _stored(db_url) == incremental

    # An undone vote, a kill and a restore change the inputs too.
    with session_scope(db_url) as session:
        review.undo_vote(session, vote_ids[-1], "ana")
    assert _refresh(db_url, persona_id).refit_step_ids == [middle]
    last_step, last_cands = steps[2]
    with session_scope(db_url) as session:
        review.kill_candidate(session, last_cands[0], "ana")
    assert _refresh(db_url, persona_id).refit_step_ids == [last_step]
    with session_scope(db_url) as session:
        review.restore_candidate(session, last_cands[0], "ana")
    assert _refresh(db_url, persona_id).refit_step_ids == [last_step]
    incremental = _stored(db_url)
    _refresh(db_url, persona_id, full=True)
    assert _stored(db_url) == incremental

    # A step the caller names is refit even when nothing changed (the review sensor names the voted steps).
    assert _refresh(db_url, persona_id, step_ids=[steps[0][0], 10**9]).refit_step_ids == [steps[0][0]]


def test_elo_changed_outside_a_vote_is_corrected_by_a_full_refit_only(db_url, tmp_path):
    persona_id, steps = _persona_with_steps(db_url, tmp_path, runs=2)
    _vote(db_url, steps[0][1], 4, random.Random(1))
    _refresh(db_url, persona_id)
    with session_scope(db_url) as session:
        session.get(models.Candidate, steps[0][1][0]).elo += 7
    assert _refresh(db_url, persona_id).elo_corrections == 0  # no vote, no candidate, no status changed
    assert _refresh(db_url, persona_id, full=True).elo_corrections == 1
