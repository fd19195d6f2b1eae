"""The persona sensor through build_sensor_context, against a real instance and database."""

import json
import shutil

import dagster as dg
import pytest
from sqlalchemy import select

from persona_pipeline.automation.persona_sensor import persona_sensor
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_resources
from persona_pipeline.personas import load_persona
from persona_pipeline_tests.conftest import make_settings, write_persona


def _tick(instance, resources, cursor=None):
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
        result = persona_sensor(context)
    for request in result.dynamic_partitions_requests:  # what the daemon does before the run requests
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def test_sensor_adds_partitions_syncs_settings_and_requests_ingestion(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "alpha", photos=3)
    write_persona(settings.datasets_dir, "beta", photos=0)
    instance = dg.DagsterInstance.ephemeral()
    resources = build_resources(settings)

    first = _tick(instance, resources)
    assert sorted(instance.get_dynamic_partitions("personas")) == ["alpha", "beta"]
    photos_hash = load_persona(folder).photo_set_hash()
    assert [(r.partition_key, r.run_key) for r in first.run_requests] == [("alpha", f"alpha:{photos_hash}")]
    with session_scope(db_url) as session:
        alpha = session.scalar(select(models.Persona).where(models.Persona.slug == "alpha"))
        assert alpha.trigger_word == "t3st" and alpha.active
        assert [p.name for p in alpha.pillars] == ["city", "beach"]

    second = _tick(instance, resources, first.cursor)
    assert second.run_requests == [] and second.dynamic_partitions_requests == []

    shutil.copy(folder / "photos" / "mira_01.jpg", folder / "photos" / "new.jpg")
    third = _tick(instance, resources, second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["alpha"]
    assert third.run_requests[0].run_key != first.run_requests[0].run_key
    assert json.loads(third.cursor)["alpha"] == load_persona(folder).photo_set_hash()


def test_a_changed_photo_set_starts_ingestion_dataset_and_lora_in_one_training_run(tmp_path):
    """A new photo set means a new dataset version and a new LoRA: the sensor's runs are `photo_set`
    runs (source_photos → training_dataset → lora_model), tagged for the one-training-run-per-GPU limit."""
    from persona_pipeline.automation.jobs import GPU_TAG
    from persona_pipeline.definitions import build_definitions

    defs = build_definitions(make_settings(tmp_path, f"sqlite:///{tmp_path / 'a.db'}"))
    assert defs.resolve_sensor_def("persona_folders").job_name == "photo_set"
    job = defs.resolve_job_def("photo_set")
    assert set(job.graph.node_names()) == {"source_photos", "training_dataset", "lora_model"}
    assert job.tags[GPU_TAG] == "training" and job.partitions_def.name == "personas"


def test_settings_change_is_synced_and_removed_folder_keeps_its_partition(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "gamma", photos=1)
    instance = dg.DagsterInstance.ephemeral()
    resources = build_resources(settings)
    cursor = _tick(instance, resources).cursor

    text = (folder / "persona.yaml").read_text().replace("weight: 60", "weight: 70")
    (folder / "persona.yaml").write_text(text)
    cursor = _tick(instance, resources, cursor).cursor
    with session_scope(db_url) as session:
        city = session.scalar(select(models.ContentPillar).where(models.ContentPillar.name == "city"))
        assert city.weight == 70

    shutil.rmtree(folder)
    result = _tick(instance, resources, cursor)
    assert result.run_requests == []
    assert "gamma" in instance.get_dynamic_partitions("personas")  # history stays
    assert "gamma" not in json.loads(result.cursor)
    with session_scope(db_url) as session:
        assert not session.scalar(select(models.Persona).where(models.Persona.slug == "gamma")).active


def test_a_bad_persona_file_does_not_stop_the_others(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    write_persona(settings.datasets_dir, "good", photos=1)
    bad = write_persona(settings.datasets_dir, "bad", photos=1)
    (bad / "persona.yaml").write_text("name: x\ntimezone: Nowhere/City\n")
    instance = dg.DagsterInstance.ephemeral()
    result = _tick(instance, build_resources(settings))
    assert instance.get_dynamic_partitions("personas") == ["good"]
    assert [r.partition_key for r in result.run_requests] == ["good"]


def test_sensor_refuses_an_unmigrated_database(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(Exception, match="persona-pipeline db upgrade"):
        _tick(dg.DagsterInstance.ephemeral(), build_resources(settings))


def test_the_photo_set_hash_never_reads_through_a_link(tmp_path, db_url):
    """link.jpg -> a file outside the persona folder: the sensor hashed the target's bytes (reading
    /etc/passwd, say) and started an ingestion whenever that outside file changed. It hashes the
    link's name and text only: the target changing starts nothing, the link changing starts one."""
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "delta", photos=2)
    outside = tmp_path / "outside.txt"
    outside.write_text("first version of a file outside the persona folder\n")
    (folder / "photos" / "link.jpg").symlink_to(outside)
    instance = dg.DagsterInstance.ephemeral()
    resources = build_resources(settings)
    first = _tick(instance, resources)
    assert [r.partition_key for r in first.run_requests] == ["delta"]

    outside.write_text("second version: the sensor must not notice, it never reads this file\n")
    second = _tick(instance, resources, first.cursor)
    assert second.run_requests == []

    (folder / "photos" / "link.jpg").unlink()
    (folder / "photos" / "link.jpg").symlink_to("/etc/passwd")
    third = _tick(instance, resources, second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["delta"]
