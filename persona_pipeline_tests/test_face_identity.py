"""Identity that means a face: an ArcFace-style embedder behind a face detector, both ONNX models that
the test exports itself with torch.onnx and runs through onnxruntime. The detector finds the red
square (the "face") and the embedder pools its pixels, so two pictures of one face on different
backgrounds are the same identity, and two faces on one background are not (open_clip, seeing the
whole picture, is fooled by the background)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persona_pipeline.identity import (NO_FACE, ClipIdentity, FaceModelError, OnnxFaceIdentity, identity_stats,
                                       reference_for)

onnxruntime = pytest.importorskip("onnxruntime", reason="the `face` extra (in `test`) brings onnxruntime")


def _export_models(folder: Path) -> tuple[Path, Path]:
    import torch

    class Detector(torch.nn.Module):
        """`1×3×32×32` RGB in [0, 1] -> one row (x1, y1, x2, y2, score) around the red pixels."""

        def forward(self, x):
            mask = ((x[:, 0] - (x[:, 1] + x[:, 2]) / 2) > 0.4).float()[0]
            h, w = mask.shape
            ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
            col, row = mask.amax(dim=0), mask.amax(dim=1)
            x1 = (col * xs + (1 - col) * 2).amin() - 0.5 / w
            x2 = (col * xs).amax() + 0.5 / w
            y1 = (row * ys + (1 - row) * 2).amin() - 0.5 / h
            y2 = (row * ys).amax() + 0.5 / h
            return torch.stack([x1, y1, x2, y2, mask.amax()]).reshape(1, 5)

    class Embedder(torch.nn.Module):
        """ArcFace's interface at toy size: `1×3×16×16` normalised face -> `1×48`."""

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    detector, embedder = folder / "detector.onnx", folder / "arcface.onnx"
    torch.onnx.export(Detector(), (torch.zeros(1, 3, 32, 32),), str(detector), input_names=["image"],
                      output_names=["boxes"], dynamo=False)
    torch.onnx.export(Embedder(), (torch.zeros(1, 3, 16, 16),), str(embedder), input_names=["face"],
                      output_names=["embedding"], dynamo=False)
    return embedder, detector


@pytest.fixture(scope="module")
def face_models(tmp_path_factory) -> tuple[Path, Path]:
    return _export_models(tmp_path_factory.mktemp("face_models"))


def _picture(path: Path, background: tuple[int, int, int], face: int | None, box=(20, 16, 44, 48)) -> Path:
    """A 64×64 picture; `face` picks the pattern inside a red square (None: no face at all)."""
    image = Image.new("RGB", (64, 64), background)
    if face is not None:
        pixels = np.array(image)
        x1, y1, x2, y2 = box
        pixels[y1:y2, x1:x2] = (230, 20, 20)
        rng = np.random.default_rng(face)
        pattern = rng.integers(0, 2, size=(4, 4)).repeat((y2 - y1) // 4, 0).repeat((x2 - x1) // 4, 1)
        pixels[y1:y2, x1:x2, 0] = np.where(pattern, 255, 170)  # stays red, so the detector still sees it
        image = Image.fromarray(pixels)
    image.save(path)
    return path


def test_same_face_on_any_background_is_one_identity_and_another_face_is_not(face_models, tmp_path):
    embedder = OnnxFaceIdentity(str(face_models[0]), str(face_models[1]))
    a_grey = _picture(tmp_path / "a_grey.png", (120, 120, 120), face=1)
    a_green = _picture(tmp_path / "a_green.png", (20, 160, 40), face=1, box=(8, 8, 40, 40))  # moved and bigger too
    b_grey = _picture(tmp_path / "b_grey.png", (120, 120, 120), face=2)
    nobody = _picture(tmp_path / "nobody.png", (120, 120, 120), face=None)

    embedded = embedder.embed([a_grey, a_green, b_grey, nobody])
    assert embedded.method == "face:arcface.onnx+detector.onnx"
    assert embedded.found.tolist() == [True, True, True, False]
    assert np.allclose(np.linalg.norm(embedded.vectors[:3], axis=1), 1.0)
    same, other, missing = embedded.similarity(embedded.vectors[0])[1:]
    assert same > 0.99 and other < same - 0.02 and missing is None
    assert embedder.detect(Image.open(a_green)) == pytest.approx((8, 8, 40, 40), abs=2)


def test_reference_from_faces_scores_and_warns_about_a_faceless_image(face_models, tmp_path):
    embedder = OnnxFaceIdentity(str(face_models[0]), str(face_models[1]))
    photos = [_picture(tmp_path / f"p{i}.png", (30 * i, 90, 200), face=1) for i in range(3)]
    reference = reference_for(embedder, ClipIdentity(_NoClip()), photos)
    assert reference.method.startswith("face:") and reference.warning() is None

    scores, found = reference.score([_picture(tmp_path / "c1.png", (0, 0, 0), face=1),
                                     _picture(tmp_path / "c2.png", (0, 0, 0), face=None)])
    assert scores[0] > 0.99 and scores[1] is None and found.tolist() == [True, False]
    assert reference.warning() == f"face model configured, but {NO_FACE} in 1 of 2 image(s); those have no identity score"
    assert identity_stats(scores) == pytest.approx((scores[0] / 2, scores[0] / 2))


def test_no_face_in_any_source_photo_falls_back_to_clip_with_a_warning(face_models, tmp_path):
    embedder = OnnxFaceIdentity(str(face_models[0]), str(face_models[1]))
    photos = [_picture(tmp_path / f"p{i}.png", (120, 120, 120), face=None) for i in range(2)]
    clip = _FixedClip()
    reference = reference_for(embedder, ClipIdentity(clip), photos)
    assert reference.method == "clip:fixed" and reference.centroid is not None
    assert reference.warning() == (f"face model configured, but {NO_FACE} in any of the 2 source photo(s); "
                                   "identity falls back to clip:fixed")


def test_wrong_face_model_paths_are_errors_naming_the_setting_and_path(face_models, tmp_path):
    missing = tmp_path / "nowhere" / "arcface.onnx"
    with pytest.raises(FaceModelError, match=rf"PERSONA_FACE_MODEL={missing}: no such file"):
        OnnxFaceIdentity(str(missing), str(face_models[1]))
    with pytest.raises(FaceModelError, match="PERSONA_FACE_DETECTOR is empty"):
        OnnxFaceIdentity(str(face_models[0]), "")
    garbage = tmp_path / "detector.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(FaceModelError, match=rf"PERSONA_FACE_DETECTOR={garbage}: not a usable ONNX model"):
        OnnxFaceIdentity(str(face_models[0]), str(garbage))


class _NoClip:
    model_id = "unused"

    def embed_images(self, paths):
        raise AssertionError("a face model that finds faces never falls back to open_clip")


class _FixedClip:
    """Stands in for open_clip where only the fallback's plumbing is under test (no protocol crossed)."""

    model_id = "fixed"

    def embed_images(self, paths):
        return np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (len(paths), 1))


@pytest.mark.slow
def test_a_wrong_face_path_stops_the_chain_and_lora_model_names_its_identity_model(face_models, tmp_path, db_url):
    from persona_pipeline.assets.lora_model import lora_model
    from persona_pipeline.assets.source_photos import source_photos
    from persona_pipeline.assets.training_dataset import training_dataset
    from persona_pipeline_tests.conftest import make_settings, materialise_persona, write_persona

    wrong = tmp_path / "models" / "arcfase.onnx"
    settings = make_settings(tmp_path, db_url, face_model=str(wrong), face_detector=str(face_models[1]))
    folder = write_persona(settings.datasets_dir, photos=10)
    result, _ = materialise_persona([source_photos, training_dataset, lora_model], settings, folder, raise_on_error=False)
    # The first step that scores identity (the dataset's identity check) refuses it; nothing trains.
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "training_dataset"
    assert f"PERSONA_FACE_MODEL={wrong}: no such file" in failure.step_failure_data.error.message
    assert not any(settings.home.rglob("*.safetensors"))

    settings = make_settings(tmp_path, db_url, face_model=str(face_models[0]), face_detector=str(face_models[1]))
    result, _ = materialise_persona([training_dataset, lora_model], settings, folder)
    meta = result.asset_materializations_for_node("lora_model")[0].metadata
    # The demo photos have red-enough regions for the toy detector: identity is the face model's.
    assert meta["identity_method"].value == "face:arcface.onnx+detector.onnx"
    # The evaluation renders (default set: 3 prompts × 2 seeds) that have no face are counted and warned about.
    no_face = meta["evaluation"].value.records[-1].data["no_face"]
    assert no_face > 0, "the toy detector should miss the face in some of the world model's renders"
    assert f"face model configured, but {NO_FACE} in {no_face} of 6 image(s); those have no identity score" == \
        meta["identity_warning"].value
    import json
    recorded = json.loads((Path(meta["path"].value).parent / "metadata.json").read_text())["validation"]
    assert recorded["identity_method"] == "face:arcface.onnx+detector.onnx" and recorded["identity_warning"] is None


@pytest.mark.slow
def test_candidates_without_a_face_are_gated_with_the_reason(face_models, tmp_path, db_url):
    """Through the candidates asset on the fake ComfyUI (solid-colour images: mostly no face): every
    image the detector finds no face in is rejected as such; the metadata names the method and warns."""
    from sqlalchemy import select

    from persona_fakes.comfyui import FakeComfyUI
    from persona_pipeline.assets.candidates import candidates
    from persona_pipeline.assets.content_plan import content_plan
    from persona_pipeline.assets.source_photos import source_photos
    from persona_pipeline.db import models, registry
    from persona_pipeline.db.session import session_scope
    from persona_pipeline.personas import load_persona
    from persona_pipeline_tests.conftest import materialise_persona, write_persona
    from persona_pipeline_tests.test_generation import COMFY_STEPS, add_lora, comfy_persona, lora_name

    with FakeComfyUI(job_time_s=0.01, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as server:
        settings, _ = comfy_persona(tmp_path, db_url, server, auto_review=False, face_model=str(face_models[0]),
                                    face_detector=str(face_models[1]))
        folder = write_persona(settings.datasets_dir, photos=12, generation={
            "prompts_per_plan": 1, "steps": [dict(COMFY_STEPS[0], n=6)], "identity_threshold": -1.0,
            "checkpoint": "tiny.safetensors"})
        with session_scope(settings.database_url) as session:
            registry.sync_persona(session, load_persona(folder))
        add_lora(settings, "tester", tmp_path)
        result, _ = materialise_persona([source_photos, content_plan, candidates], settings, folder)
    meta = result.asset_materializations_for_node("candidates")[0].metadata
    assert meta["identity_method"].value == "face:arcface.onnx+detector.onnx"
    embedder = OnnxFaceIdentity(str(face_models[0]), str(face_models[1]))
    with session_scope(settings.database_url) as session:
        rows = list(session.scalars(select(models.Candidate)))
        faceless = [r for r in rows if embedder.detect(Image.open(r.image_path).convert("RGB")) is None]
        assert len(rows) == 6 and faceless, "the fake's solid colours should include images without a face"
        for row in rows:
            if row in faceless:
                assert row.status == "rejected" and row.identity_score is None
                assert row.status_reason == f"{NO_FACE} by the face model face:arcface.onnx+detector.onnx"
            else:
                assert row.status != "rejected" and row.identity_score is not None
    assert meta["identity_warning"].value == (f"face model configured, but {NO_FACE} in {len(faceless)} of 6 image(s); "
                                              "those have no identity score")


@pytest.mark.slow
def test_the_dataset_identity_check_uses_the_face_model_and_names_photos_without_a_face(face_models, tmp_path, db_url):
    from persona_pipeline.assets.source_photos import source_photos
    from persona_pipeline.assets.training_dataset import IDENTITY_OUTLIERS, training_dataset
    from persona_pipeline_tests.conftest import make_settings, materialise_persona, write_persona

    settings = make_settings(tmp_path, db_url, face_model=str(face_models[0]), face_detector=str(face_models[1]))
    folder = write_persona(settings.datasets_dir, photos=10)
    # A grey, textured card big enough to be accepted as a photo, with no face at all.
    noise = np.random.default_rng(3).integers(80, 160, size=(320, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "photos" / "zz_no_face.png")
    result, _ = materialise_persona([source_photos, training_dataset], settings, folder)
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == IDENTITY_OUTLIERS)
    assert check.metadata["identity_method"].value == "face:arcface.onnx+detector.onnx"
    embedder = OnnxFaceIdentity(str(face_models[0]), str(face_models[1]))
    faceless = sorted(p.name for p in (folder / "photos").iterdir() if p.suffix in {".jpg", ".png"}
                      and embedder.detect(Image.open(p).convert("RGB")) is None)
    assert "zz_no_face.png" in faceless
    details = [row.data for row in check.metadata["details"].value.records]
    named = sorted(row["file"] for row in details if row["message"].endswith(f"{NO_FACE} by the face model "
                                                                               "face:arcface.onnx+detector.onnx"))
    assert not check.passed and len(named) == len(faceless)
