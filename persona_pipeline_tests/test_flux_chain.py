"""The whole chain on the tiny FLUX.1 model, chosen in persona.yaml (`base_model: tiny-flux`, `family: flux`)
while PERSONA_BASE_MODEL is an SD model, on SQLite and PostgreSQL: dataset -> FLUX LoRA (trained,
checkpoints rendered and scored) -> candidates drawn with it -> post; and a persona whose family and
base model disagree refused, naming both."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from safetensors import safe_open
from sqlalchemy import select

from persona_pipeline.automation.publishing import publish_due
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import ASSETS
from persona_pipeline.trace import trace_post
from persona_pipeline_tests.conftest import make_database, make_settings, materialise_persona, write_persona
from persona_pipeline_tests.helpers import LogCapture

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_tiny_flux_chain_from_dataset_to_post(backend, tmp_path):
    url, cleanup = make_database(backend, tmp_path)
    try:
        settings = make_settings(tmp_path, url, base_model="tiny")
        folder = write_persona(settings.datasets_dir, "tester", photos=12, base_model="tiny-flux", family="flux")
        result, resources = materialise_persona(ASSETS, settings, folder)
        assert result.success
        with session_scope(settings.database_url) as session:
            lora = session.scalars(select(models.LoraModel)).one()
            assert (lora.family, lora.key_format, lora.base_model) == ("flux", "diffusers", "tiny-flux")
            with safe_open(lora.path, "pt") as handle:
                assert all(key.startswith("transformer.") for key in handle.keys())
                assert handle.metadata()["flux_variant"] == "dev"
            candidates = session.scalars(select(models.Candidate)).all()
            assert candidates
            for candidate in candidates:
                manifest = json.loads(Path(candidate.manifest_path).read_text())
                assert manifest["base_model"] == "tiny-flux" and manifest["loras"][0]["id"] == lora.id
                assert manifest["sha256"] == candidate.image_sha256
        first = publish_due(resources["database"], resources["publisher"], datetime.now(timezone.utc) + timedelta(seconds=5),
                            LogCapture())
        assert first["published"] == 1
        with session_scope(settings.database_url) as session:
            post = session.scalar(select(models.Post).where(models.Post.status == "published"))
            trace = trace_post(session, post.id)
            assert trace["lora"]["id"] == lora.id and trace["lora"]["base_model"] == "tiny-flux"
            assert trace["candidate"]["id"] == post.candidate_id
    finally:
        cleanup()


def test_persona_family_and_base_model_must_agree(tmp_path):
    from persona_pipeline.personas import PersonaConfig, load_persona
    from persona_pipeline.resources.diffusion import DiffusionBackend
    from persona_pipeline.training.params import TrainingConfigError

    backend = DiffusionBackend(base_model="tiny", models_dir=str(tmp_path / "models"))
    config = load_persona(write_persona(tmp_path / "datasets", "mira", family="flux")).config
    with pytest.raises(TrainingConfigError, match=r"persona.yaml family='flux', but its base model 'tiny' is 'sd15'"):
        backend.for_persona(config)
    chosen = backend.for_persona(config.model_copy(update={"base_model": "tiny-flux"}))
    assert (chosen.base_model, chosen.family_name(), chosen.models_dir) == ("tiny-flux", "flux", backend.models_dir)
    assert backend.for_persona(config.model_copy(update={"family": None})) is backend  # nothing chosen: the default
    with pytest.raises(ValueError, match="unknown model family 'qwen'; one of sdxl, sd15, flux"):
        PersonaConfig.model_validate({**config.model_dump(), "family": "qwen"})
