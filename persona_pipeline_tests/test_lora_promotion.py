"""Evaluation and promotion of LoRA versions: the rule (pure), the events (who and why) on SQLite and
PostgreSQL, and the lora_model asset end to end on the world models: a first version becomes
primary, a worse one stays a candidate with its reason, the operator promotes and rolls back from
the CLI, and a rematerialisation does not undo the operator's decision."""

from __future__ import annotations


import getpass
import re

import numpy as np
import pytest
import yaml
from sqlalchemy import select

from persona_pipeline import cli
from persona_pipeline.db import models, promotion, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain.promotion import EvalScores, decide, diversity
from persona_pipeline.personas import load_persona
from persona_pipeline_tests.conftest import make_settings, materialise_persona, write_persona


def _scores(identity: float, alignment: float) -> EvalScores:
    return EvalScores(identity_mean=identity, identity_std=0.05, alignment=alignment, diversity=0.2)


def test_the_rule_promotes_only_when_identity_is_not_worse_and_alignment_within_tolerance():
    primary = _scores(0.80, 0.30)
    assert decide(_scores(0.50, 0.10), None, 0.0, 0.02).promote  # nothing to compare with
    assert decide(_scores(0.80, 0.285), primary, 0.0, 0.02).promote  # equal identity, alignment within 0.02
    worse_identity = decide(_scores(0.79, 0.40), primary, 0.0, 0.02)
    assert not worse_identity.promote
    assert worse_identity.reason == "identity 0.7900 is worse than the primary's 0.8000 (tolerance 0)"
    assert decide(_scores(0.79, 0.40), primary, 0.02, 0.02).promote  # within an identity tolerance
    both = decide(_scores(0.70, 0.20), primary, 0.0, 0.05)
    assert not both.promote and "identity 0.7000" in both.reason and \
        "alignment 0.2000 is worse than the primary's 0.3000 by more than 0.05" in both.reason


def test_diversity_is_zero_for_identical_seeds_and_grows_with_difference():
    same = np.tile(np.array([[1.0, 0.0]]), (4, 1))
    assert diversity(same, prompts=2, seeds=2) == pytest.approx(0.0)
    apart = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert diversity(apart, prompts=2, seeds=2) == pytest.approx(0.5)  # prompt 0: 1 − 0; prompt 1: 0
    assert diversity(apart[:2], prompts=2, seeds=1) == 0.0


def _register(session, persona_id: int, sha: str, tmp_path, primary=None) -> int:
    path = tmp_path / f"{sha}.safetensors"
    path.write_bytes(sha.encode())
    return registry.register_lora(session, persona_id, name=sha, path=path, sha256=sha * 8, base_model="world",
                                  trigger_word="t3st", dataset_id=None, training={}, primary=primary).id


def test_promotion_events_record_who_why_and_the_primary_they_replaced(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    with session_scope(db_url) as session:
        persona = registry.sync_persona(session, load_persona(write_persona(settings.datasets_dir, photos=0)))
        one, two = _register(session, persona.id, "aaaaaaaa", tmp_path), _register(session, persona.id, "bbbbbbbb", tmp_path)
        assert registry.primary_lora(session, persona.id) is None  # primary=None: the rule decides, not the import
        with pytest.raises(promotion.PromotionError, match="no primary LoRA to roll back from"):
            promotion.rollback(session, persona.id, "ana", "undo")
        promotion.promote(session, persona.id, one, "ana", "first version")
        with pytest.raises(promotion.PromotionError, match="replaced no earlier primary; name one with --to"):
            promotion.rollback(session, persona.id, "ana", "undo")
        with pytest.raises(promotion.PromotionError, match="needs a reason"):
            promotion.promote(session, persona.id, two, "ana", "  ")
        with pytest.raises(promotion.PromotionError, match="already the primary"):
            promotion.promote(session, persona.id, one, "ana", "again")
        with pytest.raises(promotion.PromotionError, match="LoRA 999 is not in this persona's library"):
            promotion.promote(session, persona.id, 999, "ana", "why not")
        promotion.promote(session, persona.id, two, "ben", "sharper face")
        promotion.rollback(session, persona.id, "cat", "hands got worse")
        persona_id = persona.id
    with session_scope(db_url) as session:
        assert registry.primary_lora(session, persona_id).lora_id == one
        events = [(e.kind, e.subject_id, e.reviewer, e.payload["reason"], e.payload["previous_primary"])
                  for e in promotion.decisions(session, persona_id)]
        assert events == [("promote_lora", one, "ana", "first version", None),
                          ("promote_lora", two, "ben", "sharper face", one),
                          ("rollback_lora", one, "cat", "hands got worse", two)]


def _use_cli_env(monkeypatch, settings, db_url):
    monkeypatch.setenv("PERSONA_HOME", str(settings.home))
    monkeypatch.setenv("PERSONA_DATABASE_URL", db_url)
    monkeypatch.setenv("PERSONA_DATASETS_DIR", str(settings.datasets_dir))


def test_taking_the_primary_away_is_an_event_and_only_the_primary_can_lose_it(tmp_path, db_url, monkeypatch, capsys):
    settings = make_settings(tmp_path, db_url)
    with session_scope(db_url) as session:
        persona = registry.sync_persona(session, load_persona(write_persona(settings.datasets_dir, photos=0)))
        one, two = _register(session, persona.id, "aaaaaaaa", tmp_path), _register(session, persona.id, "bbbbbbbb", tmp_path)
        promotion.promote(session, persona.id, one, "ana", "first version")
        with pytest.raises(promotion.PromotionError, match=f"LoRA {two} is not the primary"):
            promotion.demote(session, persona.id, two, "ana", "not in use")
        with pytest.raises(promotion.PromotionError, match="needs a reason"):
            promotion.demote(session, persona.id, one, "ana", "")
        persona_id = persona.id
    _use_cli_env(monkeypatch, settings, db_url)
    assert cli.main(["lora", "set", "tester", str(two), "--no-primary"]) == 0  # not the primary: nothing to record
    assert cli.main(["lora", "set", "tester", str(one), "--no-primary"]) == 0
    capsys.readouterr()
    with session_scope(db_url) as session:
        assert registry.primary_lora(session, persona_id) is None
        events = [(e.kind, e.subject_id, e.reviewer, e.payload["reason"]) for e in promotion.decisions(session, persona_id)]
    assert events == [("promote_lora", one, "ana", "first version"),
                      ("demote_lora", one, getpass.getuser(), "lora set --no-primary")]
    assert cli.main(["lora", "history", "tester"]) == 0
    assert "demote_lora" in capsys.readouterr().out


@pytest.mark.slow
def test_new_versions_are_evaluated_against_the_primary_and_promoted_only_when_not_worse(tmp_path, db_url, monkeypatch,
                                                                                          capsys):
    from persona_pipeline.assets.lora_model import lora_model
    from persona_pipeline.assets.source_photos import source_photos
    from persona_pipeline.assets.training_dataset import training_dataset

    settings = make_settings(tmp_path, db_url)
    evaluation = {"prompts": ["photo of {trigger} {class_word}, portrait"], "seeds": [5, 6]}
    folder = write_persona(settings.datasets_dir, photos=10, evaluation=evaluation)
    result, _ = materialise_persona([source_photos, training_dataset, lora_model], settings, folder)
    first = result.asset_materializations_for_node("lora_model")[0].metadata
    v1 = first["lora_id"].value
    assert first["promotion"].value == "promote_lora" and first["promotion_reason"].value == "no primary LoRA to compare with"
    assert first["identity_method"].value.startswith("clip:world")
    rows = first["evaluation"].value.records
    assert len(rows) == 1 and rows[0].data["role"] == "new" and 0 <= rows[0].data["identity_std"] < 1
    assert "evaluation_sheet" in first and "evaluation_sheet_embedded" in first
    with session_scope(db_url) as session:
        stored = session.scalars(select(models.LoraEvaluation)).one()
        assert len(stored.renders) == 2 and all(p.endswith((".png",)) for p in stored.renders)
        # The primary's stored evaluation is reused while the set holds: make it one no version can match.
        stored.identity_mean = 1.0

    # Another version (other training settings, same data): evaluated next to v1, worse on identity, kept as candidate.
    config = yaml.safe_load((folder / "persona.yaml").read_text())
    config["training"]["steps"] = 2
    (folder / "persona.yaml").write_text(yaml.safe_dump(config))
    result, _ = materialise_persona([lora_model], settings, folder)
    second = result.asset_materializations_for_node("lora_model")[0].metadata
    v2 = second["lora_id"].value
    assert v2 != v1 and second["promotion"].value == "hold_lora"
    assert second["promotion_reason"].value.startswith("identity ") and "worse than the primary's 1.0000" in \
        second["promotion_reason"].value
    table = [r.data for r in second["evaluation"].value.records]
    assert [r["lora"] for r in table] == [v1, v2] and [r["role"] for r in table] == ["incumbent", "new"]
    assert "(primary)" in table[0]["version"] and table[0]["identity_mean"] == 1.0
    with session_scope(db_url) as session:
        persona = registry.get_persona(session, "tester")
        assert registry.primary_lora(session, persona.id).lora_id == v1
        hold = promotion.decisions(session, persona.id, v2)[-1]
        assert hold.kind == "hold_lora" and hold.reviewer == promotion.AUTOMATIC
        assert hold.payload["primary_scores"]["identity_mean"] == 1.0

    # The operator promotes v2 and rolls back, from the CLI; each is an event with who and why.
    _use_cli_env(monkeypatch, settings, db_url)
    assert cli.main(["lora", "list", "tester"]) == 0
    assert "hold_lora by lora_model (automatic): identity" in capsys.readouterr().out
    assert cli.main(["lora", "promote", "tester", str(v2), "--by", "alice", "--reason", "the face reads better"]) == 0
    assert f"LoRA {v2} is the primary (promote_lora by alice: the face reads better); it replaced LoRA {v1}" in \
        capsys.readouterr().out
    assert cli.main(["lora", "rollback", "tester", "--by", "bob", "--reason", "hands regressed"]) == 0
    assert f"LoRA {v1} is the primary (rollback_lora by bob: hands regressed)" in capsys.readouterr().out
    assert cli.main(["lora", "promote", "tester", str(v1), "--reason", "again"]) == 2
    assert "already the primary" in capsys.readouterr().err
    assert cli.main(["lora", "history", "tester"]) == 0
    history = capsys.readouterr().out
    assert "identity 1.0000" in history and "promote_lora  LoRA" in history and "by alice: the face reads better" in history
    # `lora set --primary` is a promotion too, and setting the primary again records nothing.
    for _ in range(2):
        assert cli.main(["lora", "set", "tester", str(v2), "--primary"]) == 0
    assert cli.main(["lora", "rollback", "tester", "--by", "bob", "--reason", "back to v1"]) == 0
    capsys.readouterr()
    with session_scope(db_url) as session:
        kinds = [(e.kind, e.subject_id, e.payload["reason"]) for e in promotion.decisions(session, registry.get_persona(
            session, "tester").id)][-2:]
    assert kinds == [("promote_lora", v2, "lora set --primary"), ("rollback_lora", v1, "back to v1")]

    # Materialising v2 again reuses it and leaves the operator's decision alone.
    result, _ = materialise_persona([lora_model], settings, folder)
    again = result.asset_materializations_for_node("lora_model")[0].metadata
    assert again["lora_id"].value == v2 and again["promotion"].value == "promote_lora"
    assert again["promotion_reason"].value == f"decided before by {getpass.getuser()}: lora set --primary"
    with session_scope(db_url) as session:
        persona = registry.get_persona(session, "tester")
        assert registry.primary_lora(session, persona.id).lora_id == v1
        assert session.scalar(select(models.LoraEvaluation).where(models.LoraEvaluation.lora_id == v2)) is not None
        assert len(list(session.scalars(select(models.LoraEvaluation)))) == 2  # nothing rendered twice


def test_an_evaluation_prompt_without_the_trigger_is_refused_naming_it(tmp_path):
    folder = write_persona(tmp_path, photos=0, evaluation={"prompts": ["a portrait of a woman"]})
    with pytest.raises(ValueError, match=r"evaluation prompt 'a portrait of a woman' has no \{trigger\}"):
        load_persona(folder)


@pytest.mark.slow
def test_the_review_form_shows_versions_and_promotes_and_rolls_back_as_the_reviewer(tmp_path, db_url):
    from PIL import Image

    from persona_pipeline.domain.promotion import EvalScores as Scores
    from persona_pipeline_tests.test_review_form import csrf_of, make_form

    form = make_form(db_url, tmp_path)
    render = form.home / "personas" / "tester" / "evaluations" / "lora-x" / "p0-s1.png"
    render.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 40, 40)).save(render)
    with session_scope(db_url) as session:
        one = _register(session, form.seed.persona_id, "11111111", tmp_path)
        two = _register(session, form.seed.persona_id, "22222222", tmp_path)
        promotion.promote(session, form.seed.persona_id, one, promotion.AUTOMATIC, "no primary LoRA to compare with")
        promotion.store_evaluation(session, form.seed.persona_id, two, "k" * 64, "clip:world", Scores(0.61, 0.07, 0.28, 0.19),
                                   [str(render)])
        promotion.hold(session, form.seed.persona_id, two, "identity 0.6100 is worse than the primary's 0.7000 (tolerance 0)")
    form.login()
    page = form.client.get("/loras?persona=tester")
    assert page.status_code == 200
    card = page.text[page.text.index(f'id="lora-{two}"'):]
    assert "0.6100 ± 0.0700" in card and "candidate" in card and "hold_lora by lora_model (automatic): identity 0.6100" in card
    assert form.client.get(re.search(r'<img src="([^"]+)" alt="evaluation render', card).group(1)).status_code == 200
    csrf = csrf_of(page.text)

    assert form.client.post(f"/loras/{two}/promote", data={"persona": "tester", "reason": "x"},
                            follow_redirects=False).status_code == 403  # no CSRF token
    refused = form.client.post(f"/loras/{two}/promote", data={"csrf_token": csrf, "persona": "tester", "reason": " "})
    assert refused.status_code == 400 and 'id="page-error"' in refused.text  # shown as a refusal, not as a done flash
    assert "Not changed: a promotion needs a reason" in refused.text
    done = form.client.post(f"/loras/{two}/promote", data={"csrf_token": csrf, "persona": "tester",
                                                           "reason": "the smile is hers"})
    assert f"LoRA {two} is the primary now (the smile is hers)" in done.text
    back = form.client.post("/loras/rollback", data={"csrf_token": csrf, "persona": "tester", "reason": "too soft"})
    assert f"LoRA {one} is the primary now (too soft)" in back.text
    with session_scope(db_url) as session:
        assert registry.primary_lora(session, form.seed.persona_id).lora_id == one
        events = [(e.kind, e.subject_id, e.reviewer, e.payload["reason"]) for e in promotion.decisions(session, form.seed.persona_id)]
    assert events[-2:] == [("promote_lora", two, "alice", "the smile is hers"), ("rollback_lora", one, "alice", "too soft")]


def test_an_evaluation_is_keyed_by_the_photos_identity_is_judged_against():
    """A stored evaluation is reused only against the same identity centroid: a LoRA mapped to two
    personas (library rows are per sha256), or a persona whose photos changed, is scored again
    against the photos it is now judged by, never compared on another persona's reference."""
    from persona_pipeline.identity import IdentityReference
    from persona_pipeline.training.evaluation import eval_key

    def key(centroid):
        reference = IdentityReference(None, None if centroid is None else np.array(centroid), [])
        return eval_key(["photo of t3st woman"], [1, 2], "world", "clip:world", reference.digest)

    assert key([0.6, 0.8]) == key([0.6 + 1e-9, 0.8])  # the same photos, embedded again
    assert key([0.6, 0.8]) != key([0.8, 0.6]) != key(None)
    assert key([0.0, 1.0]) == key([-0.0, 1.0])
