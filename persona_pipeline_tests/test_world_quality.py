"""Issue 21's quality thresholds, held on the committed world models (persona_pipeline/world/weights/
world-models). Every figure comes from the attribute classifier reading generated images against what
their prompts asked for; `bench/quality.py` prints the same figures in full."""

from __future__ import annotations

import json
import shutil

import pytest

from persona_pipeline.world.model_manifest import COMMITTED_WORLD_MODELS, WorldWeightsError, verify_folder


def test_the_committed_world_models_match_their_manifest():
    manifest = verify_folder(COMMITTED_WORLD_MODELS)
    assert {"sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
            "clip/open_clip_model.safetensors"} <= set(manifest["files"])
    assert manifest["steps"]["unet"] >= 1000 and manifest["command"].startswith("persona-pipeline world train")
    size = sum(p.stat().st_size for p in COMMITTED_WORLD_MODELS.rglob("*") if p.is_file())
    assert size <= 40 * 1024 * 1024, f"{size / 2**20:.1f} MB: over the 40 MB budget"


def test_a_changed_committed_weight_file_is_refused_naming_both_hashes(tmp_path):
    copy = tmp_path / "world-models"
    shutil.copytree(COMMITTED_WORLD_MODELS, copy)
    unet = copy / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-1] + b"\0")
    recorded = json.loads((copy / "manifest.json").read_text())["files"]["sd/unet/diffusion_pytorch_model.safetensors"]
    with pytest.raises(WorldWeightsError) as error:
        verify_folder(copy)
    assert str(unet) in str(error.value) and recorded in str(error.value) and "persona-pipeline world train" in str(error.value)


def test_the_world_base_model_has_its_own_preset_and_a_controlnet_that_fits_its_latents(tmp_path):
    from diffusers import ControlNetModel

    from persona_pipeline.resources.diffusion import WORLD_TRAINING, DiffusionBackend

    backend = DiffusionBackend(base_model="world", models_dir=str(tmp_path))
    assert backend.preset_name() == "world" and backend.training_defaults() == WORLD_TRAINING
    assert backend.default_size() == 64 and backend.min_side() == 64
    controlnet = ControlNetModel.from_pretrained(backend.controlnet_path())
    # Two stride-2 stages: 64 px control images onto the world VAE's 16x16 latents.
    assert tuple(controlnet.config.conditioning_embedding_out_channels) == (16, 32, 64)


def test_the_world_base_model_can_be_pointed_at_another_world_models_folder(tmp_path):
    """A retrained base is measured (bench/quality.py, lora_recipe --world-models) through the same
    backend, checked against its own manifest, before it replaces the committed one."""
    from persona_pipeline.resources.diffusion import DiffusionBackend

    copy = tmp_path / "retrained"
    shutil.copytree(COMMITTED_WORLD_MODELS, copy)
    backend = DiffusionBackend(base_model="world", models_dir=str(tmp_path / "models"), world_models_dir=str(copy))
    assert backend.base_model_path() == str(copy / "sd") and backend.preset_name() == "world"
    assert backend.for_model("world").base_model_path() == str(copy / "sd")
    assert DiffusionBackend(base_model="world", models_dir=str(tmp_path)).base_model_path() == str(COMMITTED_WORLD_MODELS / "sd")
    damaged = tmp_path / "damaged"  # another folder: a folder's check is done once per process
    shutil.copytree(COMMITTED_WORLD_MODELS, damaged)
    unet = damaged / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-1] + b"\0")
    with pytest.raises(WorldWeightsError, match=str(unet)):
        DiffusionBackend(base_model="world", models_dir=str(tmp_path), world_models_dir=str(damaged)).base_model_path()


def test_the_quality_figures_refuse_a_folder_whose_clip_model_is_not_the_committed_one(tmp_path):
    from persona_pipeline.world.model_manifest import write_manifest
    from persona_pipeline.world.quality_run import same_clip_as_committed

    copy = tmp_path / "retrained"
    shutil.copytree(COMMITTED_WORLD_MODELS, copy)
    same_clip_as_committed(copy)  # a --resume-from run keeps the CLIP model: accepted
    fields = {k: v for k, v in json.loads((copy / "manifest.json").read_text()).items() if k != "files"}
    clip = copy / "clip" / "open_clip_model.safetensors"
    clip.write_bytes(clip.read_bytes()[:-1] + b"\0")
    write_manifest(copy, fields)  # consistent with itself, but another CLIP model
    with pytest.raises(ValueError, match="not the committed world CLIP model"):
        same_clip_as_committed(copy)


def test_the_lora_recipe_command_takes_a_world_models_folder():
    from pathlib import Path

    from persona_pipeline.world.lora_recipe import parse_args

    args = parse_args(['{"steps": 400}', "k4ya,t0bi", "--world-models", "/tmp/base"])
    assert args.overrides == {"steps": 400} and args.characters == ["k4ya", "t0bi"] and args.world_models == Path("/tmp/base")
    assert parse_args([]).overrides == {} and parse_args([]).world_models is None
    with pytest.raises(SystemExit):
        parse_args(["{steps: 400}"])


def test_the_world_clip_model_is_identified_by_its_weights():
    from persona_pipeline.resources.clip import ClipModel

    model_id = ClipModel(model_name="world").model_id
    assert model_id.startswith("world:") and len(model_id) == len("world:") + 12
    with pytest.raises(ValueError, match="PERSONA_CLIP_PRETRAINED"):
        ClipModel(model_name="world", pretrained="/tmp/other.safetensors").embed_texts(["a"])


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    from persona_pipeline.world.quality_run import measure

    return measure(quick=True, log=lambda line: None, work=tmp_path_factory.mktemp("quality"))


@pytest.mark.slow
def test_the_base_model_draws_the_prompted_scene(figures):
    assert figures["base_scene"] >= 0.70, figures


@pytest.mark.slow
def test_the_base_model_alone_does_not_draw_the_persona_and_her_lora_keeps_the_scene(figures):
    # The persona's look is kept out of the base training set: only a LoRA may teach it.
    assert figures["persona_before"] <= 0.25, figures
    assert figures["persona_scene_kept"] >= 0.60, figures


@pytest.mark.slow
def test_keep_best_keeps_the_images_that_show_the_look_better(figures):
    assert figures["keep_best_kept_accuracy"] > figures["keep_best_culled_accuracy"], figures


@pytest.mark.slow
def test_the_identity_gate_passes_the_personas_own_lora(figures):
    # Threshold: the lowest leave-one-out similarity of her own photos (quality_run.leave_one_out_floor).
    assert figures["gate_own_pass"] >= 0.90, figures


# Not yet held, so not asserted here (bench/quality.py prints them, FAIL, with docs/world.md's figures):
# the persona's look all four right >= 0.80 with her LoRA (31.2 % with the world preset), other
# characters' LoRAs refused by the identity gate >= 0.90 (65.6 %), clusters ARI >= 0.6 (the persona's library
# 0.574, held-out world images 0.13), and checkpoint
# selection within 5 points (it chose a 15.6 % checkpoint over a 31.2 % one).


@pytest.mark.slow
def test_the_demo_draws_on_the_world_models_and_writes_the_readme_contact_sheet(tmp_path, monkeypatch, capsys):
    """README's first command, on the defaults, with the sheet the README shows."""
    from PIL import Image

    from persona_pipeline import cli
    from persona_pipeline.settings import SETTINGS

    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))  # the demo points it at its own folder; restored after
    monkeypatch.setenv("PERSONA_AUTO_REVIEW", "1")
    sheet = tmp_path / "sheet.png"
    assert cli.main(["demo", "--contact-sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert f"sheet       {sheet}  (24 candidates)" in out
    with Image.open(sheet) as image:  # 24 candidates, 6 to a row of 128 px tiles, a label under each
        assert image.width == 6 * 128 and image.height > 4 * 128
    lora_meta = next((tmp_path / "home").rglob("metadata.json"))
    assert '"base_model": "world"' in lora_meta.read_text() and '"preset": "world"' in lora_meta.read_text()


def test_the_leave_one_out_floor_is_the_least_typical_photos_similarity_to_the_others():
    import numpy as np

    from persona_pipeline.world.quality_run import leave_one_out_floor, leave_one_out_similarities

    photos = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # The first two each see the centroid of the other two (45 degrees away); the third sees [1, 0].
    assert leave_one_out_similarities(photos) == pytest.approx([2 ** -0.5, 2 ** -0.5, 0.0])
    assert leave_one_out_floor(photos) == pytest.approx(0.0)
