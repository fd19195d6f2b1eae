"""Enrichment (docs/dataset.md): persona.yaml's `enrichment:` section refused by name when wrong; the
plan seeded; outputs judged (blank, wrong size, identity, near duplicate) with a reason; and the
dataset_enrichment asset end to end on SQLite and PostgreSQL with the tiny Qwen-Image-Edit on the
diffusers backend, writing pending rows and files under the persona's folder only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sqlalchemy import select

from persona_pipeline.db import dataset_candidates as dc
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.enrichment import (EnrichmentError, SourceImage, edit_model_for, judge, output_refusal,
                                         plan_edits)
from persona_pipeline.identity import IdentityEmbeddings, IdentityReference
from persona_pipeline.persona_dataset import EnrichmentSettings
from persona_pipeline.personas import PersonaFileError, load_persona
from persona_pipeline_tests.conftest import make_settings, materialise_persona, write_persona

INSTRUCTIONS = [{"kind": "angle", "text": "turn her head to the left, keep her face"},
                {"kind": "lighting", "text": "golden hour light, keep her face"},
                {"kind": "outfit", "text": "give her a red jacket, keep her face"}]
TINY_EDIT = {"instructions": INSTRUCTIONS[:2], "per_photo": 1, "seed": 5, "model": "tiny-qwen-edit", "steps": 2,
             "cfg": 4.0, "width": 64, "height": 48, "min_identity": -1.0, "duplicate_cosine": 1.0}


def _settings(**values) -> EnrichmentSettings:
    return EnrichmentSettings.model_validate({"instructions": INSTRUCTIONS, **values})


@pytest.mark.parametrize("section, message", [
    ({"instructions": []}, "enrichment.instructions': Value error, the edit instruction list is empty"),
    ({"instructions": INSTRUCTIONS * 11}, "33 edit instructions; at most 32"),
    ({"instructions": [{"kind": "haircut", "text": "short hair"}]}, "enrichment.instructions[0].kind"),
    ({"instructions": INSTRUCTIONS, "width": 64}, "set both width and height"),
    ({"instructions": INSTRUCTIONS, "edit_model": "dalle"}, "enrichment.edit_model"),
])
def test_a_bad_enrichment_section_is_refused_naming_the_field(tmp_path, section, message):
    folder = write_persona(tmp_path, photos=0, enrichment=section)
    with pytest.raises(PersonaFileError, match="persona.yaml") as refused:
        load_persona(folder)
    assert message in str(refused.value)


def test_the_edit_model_is_refused_when_missing_or_of_the_wrong_family(tmp_path):
    sd = tmp_path / "sd-model"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(EnrichmentError, match=r"persona.yaml enrichment: model .*sd-model.* is a StableDiffusionPipeline, "
                                              "not an edit model"):
        edit_model_for(_settings(model=str(sd)), lambda: "sd15", "tiny")
    with pytest.raises(EnrichmentError, match=r"persona.yaml enrichment: the persona's family 'sd15' .* has no edit model"):
        edit_model_for(_settings(), lambda: "sd15", "tiny")
    with pytest.raises(EnrichmentError, match="model 'tiny-kontext' is FLUX.1 Kontext .* Qwen-Image-Edit"):
        edit_model_for(_settings(model="tiny-kontext", edit_model="qwen_image_edit"), lambda: "flux", "tiny-flux")
    assert edit_model_for(_settings(), lambda: "flux", "tiny-flux")[0].name == "kontext"  # the family's own
    edit, weights = edit_model_for(_settings(edit_model="qwen_image_edit"), lambda: "sd15", "tiny")
    assert (edit.name, weights) == ("qwen_image_edit", "tiny-qwen-edit")


def test_the_plan_is_seeded_and_varies_the_instruction_per_photo(tmp_path):
    photos = [SourceImage(tmp_path / f"{i}.png", f"{i:064d}", "t3st woman", f"photos/{i}.png") for i in range(3)]
    plan = plan_edits(photos, _settings(per_photo=3, seed=1))
    assert plan == plan_edits(photos, _settings(per_photo=3, seed=1))
    assert len(plan) == 9 and len({p.seed for p in plan}) == 9
    for photo in photos:
        assert len({p.instruction for p in plan if p.photo == photo}) == 3  # every instruction once per photo
    assert [p.seed for p in plan_edits(photos, _settings(per_photo=3, seed=2))] != [p.seed for p in plan]


def _image(path: Path, size=(64, 48), blank=False, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.full((size[1], size[0], 3), 128, np.uint8) if blank else rng.integers(0, 255, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


class _Embedder:
    """Identity from a fixed vector per file (the judge's arithmetic, not a model's, is under test)."""

    face = False
    method = "test:vectors"

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def embed(self, paths):
        rows = np.stack([self.vectors[Path(p).name] for p in paths])
        return IdentityEmbeddings(rows / np.linalg.norm(rows, axis=1, keepdims=True), np.ones(len(paths), bool), self.method)


def test_outputs_are_dropped_with_their_reason(tmp_path):
    ok = _image(tmp_path / "ok.png", seed=1)
    assert output_refusal(ok, (64, 48)) is None
    assert output_refusal(_image(tmp_path / "blank.png", blank=True), (64, 48)).startswith(
        "blank image (pixel standard deviation 0.00")
    assert output_refusal(_image(tmp_path / "small.png", size=(32, 32)), (64, 48)) == \
        "wrong size: the edit returned 32x32, 64x48 was asked"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert "is not a readable image" in output_refusal(tmp_path / "broken.png", (64, 48))

    vectors = {"photo.png": np.array([1.0, 0.0, 0.0]), "same.png": np.array([1.0, 0.05, 0.0]),
               "far.png": np.array([0.0, 1.0, 0.0]), "fine.png": np.array([0.8, 0.0, 0.6]), "x.png": np.ones(3)}
    for name in vectors:
        _image(tmp_path / name, seed=len(name))
    embedder = _Embedder(vectors)
    reference = IdentityReference(embedder, embedder.embed([tmp_path / "photo.png"]).centroid(), [])
    dataset = [SourceImage(tmp_path / "photo.png", "p" * 64, "t3st woman", "photos/photo.png")]
    paths = [tmp_path / n for n in ("same.png", "far.png", "fine.png", "x.png")]

    def embed(ps):
        return embedder.embed(ps).vectors

    verdicts = judge(paths, [None, None, None, "blank image"], reference, 0.5, embed, dataset, 0.95)
    assert [v.status for v in verdicts] == ["dropped", "dropped", "pending", "dropped"]
    assert verdicts[0].reason.startswith("near duplicate of photos/photo.png (cosine 0.99")
    assert verdicts[1].reason == "identity 0.000 is below 0.5 (test:vectors)"
    assert verdicts[2].identity == pytest.approx(0.8) and verdicts[2].nearest_path == "photos/photo.png"
    assert verdicts[3].reason == "blank image" and verdicts[3].identity is None


@pytest.mark.slow
def test_enrichment_queues_edits_of_the_photos_through_the_edit_backend(tmp_path, db_url):
    from persona_pipeline.assets.dataset_growth import dataset_enrichment
    from persona_pipeline.assets.source_photos import source_photos

    settings = make_settings(tmp_path, db_url, base_model="tiny")
    folder = write_persona(settings.datasets_dir, photos=2, training={"min_photos": 2}, enrichment=TINY_EDIT)
    result, _ = materialise_persona([source_photos, dataset_enrichment], settings, folder)
    assert result.success
    persona_dir = settings.home / "personas" / folder.name
    with session_scope(db_url) as session:
        rows = dc.for_persona(session, session.scalar(select(models.Persona.id)))
        photos = {p.pixel_sha256: p for p in session.scalars(select(models.SourcePhoto))}
        assert len(rows) == 2 and {r.status for r in rows} == {"pending"}
        for row in rows:
            image = persona_dir / row.image_path
            assert image.resolve().is_relative_to(persona_dir.resolve()) and image.is_file()
            assert Image.open(image).size == (64, 48)
            assert row.origin == "edit" and row.source_photo_sha256 in photos
            assert row.instruction in {i["text"] for i in INSTRUCTIONS[:2]}
            assert row.edit_model == "qwen_image_edit:tiny-qwen-edit" and row.seed is not None
            assert row.caption.startswith("t3st") and row.instruction.rstrip(".") in row.caption
            assert row.identity_method.startswith("clip:") and row.identity_score is not None
            assert row.nearest_path.startswith("photos/") and row.nearest_cosine is not None
    again, _ = materialise_persona([dataset_enrichment], settings, folder)  # the same plan: nothing new
    (materialisation,) = again.asset_materializations_for_node("dataset_enrichment")
    assert materialisation.metadata["new_candidates"].value == 0
    with session_scope(db_url) as session:
        assert len(dc.for_persona(session, session.scalar(select(models.Persona.id)))) == 2


def test_enrichment_drops_blank_and_wrong_size_edits_and_fails_on_a_family_without_an_edit_model(tmp_path, monkeypatch):
    """A backend (the generation protocol) that returns a blank image and a small one: both dropped with the reason."""
    from persona_fakes.databases import make_database
    from persona_pipeline.assets import dataset_growth
    from persona_pipeline.assets.dataset_growth import dataset_enrichment
    from persona_pipeline.assets.source_photos import source_photos
    from persona_pipeline.generation.backends import ImageResult, PreparedJob

    class Faulty:
        name, default_size, min_side = "diffusers", 64, 32

        def prepare(self, job):
            return PreparedJob(job, None)

        def run(self, jobs, on_result):
            for n, prepared in enumerate(jobs):
                job = prepared.job
                job.folder.mkdir(parents=True, exist_ok=True)
                path = _image(job.folder / f"{job.stem}.png", blank=n == 0, size=(64, 48) if n == 0 else (32, 32))
                on_result(ImageResult(job.key, image_path=path))

    url, cleanup = make_database("sqlite", tmp_path)
    try:
        monkeypatch.setattr(dataset_growth, "make_backends", lambda **_: {"diffusers": Faulty()})
        settings = make_settings(tmp_path, url, base_model="tiny")
        folder = write_persona(settings.datasets_dir, photos=2, training={"min_photos": 2}, enrichment=TINY_EDIT)
        assert materialise_persona([source_photos, dataset_enrichment], settings, folder)[0].success
        with session_scope(url) as session:
            reasons = sorted(r.reason for r in dc.for_persona(session, session.scalar(select(models.Persona.id))))
        assert [r.split(" (")[0] for r in reasons] == ["blank image", "wrong size: the edit returned 32x32, 64x48 was asked"]

        no_model = {k: v for k, v in TINY_EDIT.items() if k != "model"}
        (folder / "persona.yaml").write_text(yaml.safe_dump({**yaml.safe_load((folder / "persona.yaml").read_text()),
                                                             "enrichment": no_model}))
        result, _ = materialise_persona([dataset_enrichment], settings, folder, raise_on_error=False)
        assert not result.success
        failure = result.failure_data_for_node("dataset_enrichment").error.message
        assert "persona.yaml enrichment: the persona's family 'sd15'" in failure and "has no edit model" in failure
    finally:
        cleanup()
