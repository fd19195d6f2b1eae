"""The flywheel and the dataset it feeds (docs/dataset.md), on SQLite and PostgreSQL: approved winners
and published posts become dataset candidates with their provenance (a copy of a photo is dropped as
a near duplicate); training_dataset includes the accepted ones with their reviewed captions up to
`flywheel.max_generated_share` (the rest wait, with the reason), records every image's origin in
metadata.json, freezes what it included; and `trace` follows a post back to those origins."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from persona_pipeline.assets.dataset_growth import dataset_flywheel
from persona_pipeline.assets.source_photos import source_photos
from persona_pipeline.assets.training_dataset import training_dataset
from persona_pipeline.db import dataset_candidates as dc
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain.dataset_share import bound_generated, generated_allowance
from persona_pipeline.fileio import sha256_file
from persona_pipeline.trace import dataset_images
from persona_pipeline_tests.conftest import DEMO, make_settings, materialise_persona, write_persona

NOW = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)


def test_the_generated_share_bound():
    assert [generated_allowance(6, share) for share in (0.0, 0.25, 0.5, 0.6)] == [0, 2, 6, 9]
    kept, left, reason = bound_generated(3, ["a", "b", "c", "d"], 0.5)
    assert kept == ["a", "b", "c"] and left == ["d"]
    assert reason.startswith("generated share bound: 3 uploaded photo(s) allow at most 3 generated image(s) "
                             "(flywheel.max_generated_share 0.5); 1 accepted candidate(s) wait")
    assert bound_generated(3, ["a"], 0.5) == (["a"], [], None)
    with pytest.raises(ValueError, match="max_generated_share 1 must be at least 0 and below 1"):
        generated_allowance(3, 1)


def _winner(session, persona_id: int, image: Path, prompt: str) -> int:
    run = models.GenerationRun(persona_id=persona_id, prompt=prompt, backend="diffusers")
    session.add(run)
    session.flush()
    step = models.RunStep(run_id=run.id, position=1, name="base", workflow="w", n_candidates=1, status="approved")
    session.add(step)
    session.flush()
    candidate = models.Candidate(run_id=run.id, step_id=step.id, seed=1, image_path=str(image), status="winner",
                                 image_sha256=sha256_file(image), manifest_path=str(image.with_suffix(".json")))
    session.add(candidate)
    session.flush()
    return candidate.id


def test_winners_and_posts_become_candidates_and_accepted_ones_join_the_dataset_within_the_bound(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, base_model="tiny")
    folder = write_persona(settings.datasets_dir, photos=3, training={"min_photos": 2, "captioner": "template"},
                           flywheel={"min_identity": -1.0, "max_generated_share": 0.4})
    assert materialise_persona([source_photos], settings, folder)[0].success
    persona_dir = settings.home / "personas" / folder.name
    runs = persona_dir / "runs"
    runs.mkdir(parents=True)
    extra = sorted((DEMO / "photos").glob("*.jpg"))[3:6]
    for path in extra:
        shutil.copy(path, runs / path.name)
    with session_scope(db_url) as session:
        persona_id = session.scalar(select(models.Persona.id))
        photo = session.scalars(select(models.SourcePhoto).order_by(models.SourcePhoto.original_name)).first()
        copy_of_photo = runs / "copy.png"
        shutil.copy(photo.path, copy_of_photo)
        winner = _winner(session, persona_id, runs / extra[0].name, "photo of t3st woman, on a rooftop at dusk")
        duplicate = _winner(session, persona_id, copy_of_photo, "photo of t3st woman, the same again")
        post_winner = _winner(session, persona_id, runs / extra[2].name, "photo of t3st woman, at the beach")
        post = models.Post(persona_id=persona_id, account="outbox:tester", status="published", caption="beach day",
                           media_path=str(runs / extra[1].name), scheduled_at=NOW, published_at=NOW,
                           candidate_id=post_winner)
        session.add(post)
        session.flush()
        post_id = post.id
        session.get(models.Candidate, post_winner).status = "active"  # only published, never a winner here

    result, _ = materialise_persona([dataset_flywheel], settings, folder)
    assert result.success
    with session_scope(db_url) as session:
        rows = {(r.origin, r.candidate_id, r.post_id): r for r in dc.for_persona(session, persona_id)}
        assert set(rows) == {("winner", winner, None), ("winner", duplicate, None), ("post", post_winner, post_id)}
        dropped = rows[("winner", duplicate, None)]
        assert dropped.status == "dropped" and dropped.reason.startswith("near duplicate of photos/")
        kept = rows[("winner", winner, None)]
        assert kept.status == "pending" and kept.caption == "t3st woman, on a rooftop at dusk"
        assert kept.image_path.startswith("dataset_candidates/winner/") and (persona_dir / kept.image_path).is_file()
        assert rows[("post", post_winner, post_id)].caption == "t3st woman, at the beach"
        ids = {"winner": kept.id, "post": rows[("post", post_winner, post_id)].id}
    again, _ = materialise_persona([dataset_flywheel], settings, folder)
    assert again.asset_materializations_for_node("dataset_flywheel")[0].metadata["new_candidates"].value == 0

    with session_scope(db_url) as session:
        dc.decide(session, ids["winner"], "accept", "ana", caption="t3st woman on a rooftop, dusk", now=NOW)
        dc.decide(session, ids["post"], "accept", "ana", now=NOW)
    result, _ = materialise_persona([training_dataset], settings, folder)
    assert result.success
    (materialisation,) = result.asset_materializations_for_node("training_dataset")
    meta = {k: v.value for k, v in materialisation.metadata.items()}
    # 3 photos at a 0.4 share allow 2 generated images: both accepted ones are in.
    assert meta["images"] == 5 and meta["generated_images"] == 2 and meta["candidates_frozen"] == 2
    dataset = Path(meta["path"])
    manifest = json.loads((dataset / "metadata.json").read_text())
    origins = [image["origin"] for image in manifest["images"]]
    assert [o["kind"] for o in origins] == ["photo", "photo", "photo", "winner", "post"]
    assert origins[3]["candidate"] == winner and origins[4]["post"] == post_id
    traced = [image["origin"] for image in dataset_images(manifest)]  # what `persona-pipeline trace` prints
    assert traced[0].startswith("uploaded photo ") and traced[3] == f"winner candidate #{winner} (dataset candidate #{ids['winner']})"
    assert traced[4] == f"post #{post_id} (dataset candidate #{ids['post']})"
    subset = dataset / manifest["subset"]
    assert (subset / "0004.txt").read_text().strip() == "t3st woman on a rooftop, dusk"
    with session_scope(db_url) as session:
        version = session.scalar(select(models.Dataset.version))
        assert {r.dataset_version for r in dc.accepted_for(session, persona_id)} == {version}
        with pytest.raises(dc.DatasetDecisionError, match=f"is in dataset version {version}; its decision is frozen"):
            dc.decide(session, ids["winner"], "reject", "ana")

    # A third accepted image is over the bound: left out with the reason, kept accepted for later.
    with session_scope(db_url) as session:
        third = dc.add_candidate(session, persona_id, origin="winner", image_path=kept.image_path.replace("winner/", "winner/x"),
                                 sha256="f" * 64, caption="t3st woman", status="accepted")
        shutil.copy(persona_dir / kept.image_path, persona_dir / third.image_path)
        third_id = third.id
    result, _ = materialise_persona([training_dataset], settings, folder)
    meta = {k: v.value for k, v in result.asset_materializations_for_node("training_dataset")[0].metadata.items()}
    assert meta["generated_images"] == 2 and meta["generated_share_bound"].startswith(
        "generated share bound: 3 uploaded photo(s) allow at most 2 generated image(s)")
    assert [r.data["dataset_candidate"] for r in meta["left_out"].records] == [third_id]
    with session_scope(db_url) as session:
        row = session.get(models.DatasetCandidate, third_id)
        assert (row.status, row.dataset_version) == ("accepted", None)


def test_an_edit_origin_names_photo_instruction_model_and_seed():
    from persona_pipeline.domain.provenance import describe_origin, origin_of

    class Row:
        id, origin, sha256, image_path, identity_score, decided_by = 4, "edit", "e" * 64, "dataset_candidates/edits/x.png", 0.8, "ana"
        source_photo_sha256, instruction, edit_model, seed, candidate_id, post_id = "a" * 64, "turn left", "kontext:tiny-kontext", 9, None, None

    origin = origin_of(Row(), {"a" * 64: "mira_01.jpg"})
    assert describe_origin(origin) == ("edit of photo mira_01.jpg with instruction 'turn left' by model "
                                       "kontext:tiny-kontext seed 9 (dataset candidate #4)")
    assert describe_origin({"kind": "photo", "photo": "mira_02.jpg"}) == "uploaded photo mira_02.jpg"
    # An edit whose source photo was not recorded (add_candidate does not require it) still describes
    # itself: training_dataset's captions table and the review page both call this.
    Row.source_photo_sha256 = None
    assert describe_origin(origin_of(Row(), {})).startswith("edit of photo ? with instruction 'turn left'")
