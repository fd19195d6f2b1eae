"""From the review queue to a new dataset version, on SQLite and PostgreSQL: a candidate accepted in
the form (with its caption edited) is picked up by the `dataset_reviews` sensor, whose
`dataset_version` run builds training_dataset with it; from then on the form refuses a decision or
an undo on it, naming the version. (lora_model, the run's second step, trains as in the photo_set
job; here the run is limited to training_dataset, so no LoRA is trained.)"""

from __future__ import annotations

import shutil

import dagster as dg
from sqlalchemy import select
from starlette.testclient import TestClient

from persona_pipeline.assets.source_photos import source_photos
from persona_pipeline.automation.dataset_sensor import DATASET_QUIET, DatasetCursor, dataset_sensor
from persona_pipeline.db import dataset_candidates, models
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_definitions
from persona_pipeline.fileio import sha256_file
from persona_pipeline.review.app import ReviewConfig, create_app
from persona_pipeline_tests.conftest import DEMO, make_settings, materialise_persona, write_persona
from persona_pipeline_tests.test_review_form import SECRET, TOKENS, Form


def test_an_accepted_candidate_becomes_a_dataset_version_and_is_frozen(tmp_path, db_url) -> None:
    settings = make_settings(tmp_path, db_url, base_model="tiny")
    folder = write_persona(settings.datasets_dir, photos=3, training={"min_photos": 2, "captioner": "template"},
                           flywheel={"max_generated_share": 0.5})
    assert materialise_persona([source_photos], settings, folder)[0].success
    slug, persona_dir = folder.name, settings.home / "personas" / folder.name
    image = persona_dir / "dataset_candidates" / "edit" / "smile.jpg"
    image.parent.mkdir(parents=True)
    shutil.copy(sorted((DEMO / "photos").glob("*.jpg"))[4], image)
    with session_scope(db_url) as session:
        photo = session.scalars(select(models.SourcePhoto).order_by(models.SourcePhoto.original_name)).first()
        row = dataset_candidates.add_candidate(
            session, photo.persona_id, origin="edit", source_photo_sha256=photo.pixel_sha256, instruction="smile",
            edit_model="tiny-edit", seed=3, image_path="dataset_candidates/edit/smile.jpg", sha256=sha256_file(image),
            caption="t3st woman, smile", identity_score=0.91, identity_method="clip")
        session.flush()
        candidate_id, photo_name = row.id, photo.original_name

    form = Form(TestClient(create_app(ReviewConfig(database_url=db_url, home=settings.home, tokens=TOKENS, secret_key=SECRET))),
                db_url, settings.home, None)
    headers = {"X-CSRF-Token": form.login()}
    [item] = form.client.get(f"/api/dataset/{slug}/queue").json()["items"]
    assert item["origin"]["text"].startswith(f"Edit of photo {photo_name} with instruction 'smile' by model tiny-edit seed 3")
    assert form.client.get(item["url"]).status_code == 200
    accepted = form.client.post(f"/api/dataset/candidates/{candidate_id}/decide", headers=headers,
                                json={"decision": "accept", "caption": "t3st woman, smiling at the camera"})
    assert accepted.status_code == 200, accepted.text

    # The sensor, once reviewing has paused, asks for one dataset_version run.
    with session_scope(db_url) as session:
        for event in session.scalars(select(models.ReviewEvent)):
            event.created_at -= DATASET_QUIET
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", [slug])
    with dg.build_sensor_context(instance=instance, resources={"database": defs.resources["database"]}) as context:
        result = dataset_sensor(context)
    [request] = result.run_requests
    assert (request.job_name, request.partition_key) == ("dataset_version", slug)
    assert DatasetCursor.load(result.cursor).waiting == {}
    job = defs.resolve_job_def(request.job_name)
    outcome = job.execute_in_process(partition_key=slug, instance=instance, tags=request.tags,
                                     asset_selection=[dg.AssetKey("training_dataset")])
    assert outcome.success
    meta = {k: v.value for k, v in outcome.asset_materializations_for_node("training_dataset")[0].metadata.items()}
    assert meta["images"] == 4 and meta["generated_images"] == 1 and meta["candidates_frozen"] == 1
    with session_scope(db_url) as session:
        version = session.scalar(select(models.Dataset.version))
        assert session.get(models.DatasetCandidate, candidate_id).dataset_version == version
    captions = [p.read_text().strip() for p in (persona_dir / "datasets").rglob("*.txt")]
    assert "t3st woman, smiling at the camera" in captions, captions

    # Frozen: the form refuses a decision and an undo on it, naming the image and the version.
    for path, body in ((f"/api/dataset/candidates/{candidate_id}/decide", {"decision": "reject"}),
                       (f"/api/dataset/candidates/{candidate_id}/undo", {})):
        refused = form.client.post(path, json=body, headers=headers)
        assert refused.status_code == 409 and version in refused.json()["error"] and "smile.jpg" in refused.json()["error"]
    with dg.build_sensor_context(instance=instance, cursor=result.cursor,
                                 resources={"database": defs.resources["database"]}) as context:
        assert dataset_sensor(context).run_requests == []
    assert form.client.get(f"/api/dataset/{slug}/queue").json()["remaining"] == 0
