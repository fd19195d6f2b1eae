"""Video steps (`type: video`): a candidate (or a photo) made to move by an image-to-video model (Wan 2.1).

End to end through `content_plan` + `candidates` on SQLite and PostgreSQL, with the diffusers backend on
the tiny local WanImageToVideoPipeline (frames reproduced from the manifest) and against the fake ComfyUI
(real HTTP + WebSocket, validating Wan's nodes as ComfyUI does, returning an MP4); then the bad inputs,
each refused by name: a video step with no input image, a model of another family, a template that is
no video template, a clip length the VAE cannot pack, and a ComfyUI that saves no video.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from persona_fakes.comfyui import FakeComfyUI
from persona_fakes.comfyui.protocol import node_definitions, validate_prompt
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain.generation_params import ParamError
from persona_pipeline.domain.generation_request import build_request
from persona_pipeline.domain.workflows import TemplateError, fill_template, load_template
from persona_pipeline.fileio import sha256_file
from persona_pipeline.settings import REPO_WORKFLOWS
from persona_pipeline.trace import TraceError, trace_post
from persona_pipeline.training.families.video_models import WAN_I2V, VideoStepError, resolve_video_model
from persona_pipeline.video import clip_facts
from persona_pipeline_tests.conftest import make_settings, write_persona
from persona_pipeline_tests.test_generation import materialise

PARAMS = {"steps": 2, "cfg": 3.5, "sampler": "euler", "scheduler": "simple"}


def video_steps(size: tuple[int, int], clip: tuple[int, int], frames: int = 49, fps: int = 16, n: int = 1) -> list[dict]:
    return [{"name": "base", "template": "flux_txt2img_lora", "n": 2, "top_k": 1,
             "params": {**PARAMS, "width": size[0], "height": size[1]}},
            {"name": "motion", "type": "video", "n": n,
             "params": {**PARAMS, "cfg": 5.0, "instruction": "she turns to the camera and smiles", "frames": frames,
                        "fps": fps, "width": clip[0], "height": clip[1]}}]


def _rows(session):
    run = session.scalars(select(models.GenerationRun)).one()
    return run, [list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == step.id)
                                      .order_by(models.Candidate.id))) for step in run.steps]


def flux_persona_with_lora(settings, tmp_path, steps):
    from persona_pipeline.personas import load_persona
    from persona_pipeline.resources.diffusion import DiffusionBackend
    from persona_pipeline_tests.test_flux_generation import random_flux_lora

    folder = write_persona(settings.datasets_dir, photos=0, base_model="tiny-flux", family="flux",
                           generation={"prompts_per_plan": 1, "steps": steps})
    flux = DiffusionBackend(base_model="tiny-flux", models_dir=str(settings.home / "models"))
    lora_path = random_flux_lora(flux.base_model_path(), tmp_path / "loras" / "t3st-flux.safetensors", seed=4)
    with session_scope(settings.database_url) as session:
        persona = registry.sync_persona(session, load_persona(folder))
        lora_id = registry.register_lora(session, persona.id, name="t3st flux", path=lora_path,
                                         sha256=sha256_file(lora_path), base_model="tiny-flux", trigger_word="t3st",
                                         dataset_id=None, training={}, weight=0.9, family="flux",
                                         key_format="diffusers").id
    return folder, lora_id


@pytest.mark.slow
def test_video_step_with_diffusers_makes_a_clip_and_reproduces(tmp_path, db_url):
    from persona_pipeline.resources.diffusion import DiffusionBackend

    settings = make_settings(tmp_path, db_url, base_model="tiny")
    folder, lora_id = flux_persona_with_lora(settings, tmp_path, video_steps((64, 64), (32, 48), n=2))
    assert materialise(settings, folder).success
    with session_scope(settings.database_url) as session:
        run, (base, motion) = _rows(session)
        # Two clips of one parent: each its own pipeline call (the Wan pipeline makes one video per call)
        assert [s.status for s in run.steps] == ["approved", "voting"] and len(motion) == 2
        assert motion[0].video_sha256 != motion[1].video_sha256
        clip = motion[0]
        parent = session.get(models.Candidate, clip.parent_id)
        manifest = json.loads(Path(clip.manifest_path).read_text())
        assert base[0].video_path is None and clip.video_path.endswith(".mp4")
        assert sha256_file(Path(clip.video_path)) == clip.video_sha256 == manifest["video_sha256"]
        assert manifest["video_model"] == "wan_i2v" and manifest["base_model"] == "tiny-wan-i2v"
        assert manifest["input_image"] == parent.image_path and manifest["diffusers"]["edit_image_sha256"] == parent.image_sha256
        assert manifest["prompt"] == "she turns to the camera and smiles" and manifest["template"] == "wan_i2v"
        assert manifest["loras"] == [] and manifest["loras_skipped"] == [lora_id]  # Wan takes no FLUX LoRA
        assert manifest["frames"] == 49 and manifest["fps"] == 16 and manifest["comfyui_file"] == WAN_I2V.comfyui_file
        facts = clip_facts(Path(clip.video_path))
        assert (facts["frames"], facts["fps"], facts["width"], facts["height"]) == (49, 16.0, 32, 48)
        assert manifest["video_facts"] == facts and facts["duration_s"] >= 3.0
        assert manifest["diffusers"]["batch_seeds"] == [clip.seed]
        image_path, recorded = clip.image_path, manifest["diffusers"]
    frames = DiffusionBackend(base_model="tiny-wan-i2v", models_dir=str(settings.home / "models")).reproduce(
        recorded, log=lambda _: None)
    assert len(frames) == 49
    with Image.open(image_path) as image:  # the candidate's image is the clip's first frame, stored losslessly
        assert image.size == (32, 48)
        assert np.array_equal(np.asarray(frames[0].convert("RGB")), np.asarray(image.convert("RGB")))


def comfy_video_persona(tmp_path, db_url, server):
    settings = make_settings(tmp_path, db_url, comfyui_urls=server.url, generation_backend="comfyui")
    folder = write_persona(settings.datasets_dir, photos=0, base_model="tiny-flux", family="flux",
                           generation={"prompts_per_plan": 1, "steps": video_steps((256, 256), (256, 448), frames=49),
                                       "checkpoint": "flux1-dev.safetensors"})
    path = tmp_path / "loras" / "t3st-flux.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a flux lora")
    from persona_pipeline.personas import load_persona

    with session_scope(settings.database_url) as session:
        persona = registry.sync_persona(session, load_persona(folder))
        lora_id = registry.register_lora(session, persona.id, name="t3st-flux.safetensors", path=path,
                                         sha256=sha256_file(path), base_model="flux1-dev", trigger_word="t3st",
                                         dataset_id=None, training={}, weight=0.8, family="flux").id
    return settings, folder, lora_id


@pytest.mark.slow
def test_video_step_against_the_fake_comfyui(tmp_path, db_url):
    with FakeComfyUI(job_time_s=0.01, loras=["persona-pipeline/tester/t3st-flux.safetensors"]) as server:
        settings, folder, lora_id = comfy_video_persona(tmp_path, db_url, server)
        assert materialise(settings, folder).success
    with session_scope(settings.database_url) as session:
        run, (base, motion) = _rows(session)
        assert [s.status for s in run.steps] == ["approved", "voting"] and len(motion) == 1
        clip = motion[0]
        manifest = json.loads(Path(clip.manifest_path).read_text())
        graph = json.loads((Path(clip.manifest_path).parent / manifest["workflow"]).read_text())
        classes = {node["class_type"] for node in graph.values()}
        assert {"WanImageToVideo", "CLIPVisionEncode", "CreateVideo", "SaveVideo"} <= classes
        assert not any(c.startswith("LoraLoader") for c in classes) and manifest["loras_skipped"] == [lora_id]
        wan = next(node for node in graph.values() if node["class_type"] == "WanImageToVideo")
        assert (wan["inputs"]["width"], wan["inputs"]["height"], wan["inputs"]["length"]) == (256, 448, 49)
        assert manifest["base_model"] == WAN_I2V.comfyui_file
        assert manifest["input_image"] == session.get(models.Candidate, clip.parent_id).image_path
        facts = clip_facts(Path(clip.video_path))
        assert (facts["frames"], facts["width"], facts["height"]) == (49, 256, 448) and facts["fps"] == 16.0
        assert sha256_file(Path(clip.video_path)) == clip.video_sha256
        with Image.open(clip.image_path) as image:
            assert image.size == (256, 448)
        # Provenance: a post of the clip traces to the clip (hash checked), the still it animated, and that
        # still's LoRA (Wan took none) and dataset.
        folder_of_dataset = tmp_path / "dataset"
        folder_of_dataset.mkdir()
        (folder_of_dataset / "metadata.json").write_text(json.dumps({"version": "v1"}))
        dataset = models.Dataset(persona_id=run.persona_id, version="v1", path=str(folder_of_dataset), image_count=12,
                                 settings={})
        session.add(dataset)
        session.flush()
        session.get(models.LoraModel, lora_id).dataset_id = dataset.id
        post = models.Post(persona_id=run.persona_id, account="outbox", status="scheduled", format="reel",
                           candidate_id=clip.id, caption="c", hashtags=[], scheduled_at=models.utcnow())
        session.add(post)
        session.flush()
        trace = trace_post(session, post.id)
        assert trace["candidate"]["video"]["sha256"] == clip.video_sha256
        assert trace["candidate"]["lora_from_ancestor"] == clip.parent_id and trace["lora"]["id"] == lora_id
        assert trace["dataset"]["version"] == "v1" and [p["id"] for p in trace["parents"]] == [clip.parent_id]
        Path(clip.video_path).write_bytes(b"changed")
        with pytest.raises(TraceError, match=f"candidate {clip.id}: clip .* does not match its manifest's sha256"):
            trace_post(session, post.id)


@pytest.mark.slow
def test_a_comfyui_that_saves_no_video_fails_the_step_by_name(tmp_path, db_url):
    with FakeComfyUI(job_time_s=0.01, loras=["persona-pipeline/tester/t3st-flux.safetensors"]) as server:
        server.video_as_image_next = 1
        settings, folder, _ = comfy_video_persona(tmp_path, db_url, server)
        assert materialise(settings, folder).success
    with session_scope(settings.database_url) as session:
        run, (base, motion) = _rows(session)
        assert motion == [] and run.steps[1].status == "failed" and run.status == "failed"
        assert "returned no video" in run.steps[1].failure_reason and ".png" in run.steps[1].failure_reason
        assert len(base) == 2  # the stills stay
        job = session.scalars(select(models.GenerationJob).where(models.GenerationJob.step_id == run.steps[1].id)).one()
        assert job.status == "failed" and job.permanent


def test_wan_template_passes_the_fake_comfyuis_validation():
    template = load_template(REPO_WORKFLOWS / "wan_i2v.json")
    graph = fill_template(template, {"checkpoint": WAN_I2V.comfyui_file, "input_image": "a.png", "prompt": "p",
                                     "negative_prompt": "n", "seed": 1, "steps": 20, "cfg": 5.0, "sampler": "euler",
                                     "scheduler": "simple", "width": 480, "height": 832, "frames": 81, "fps": 16,
                                     "filename_prefix": "x/y"})
    defs = node_definitions([], [], [], ["a.png"], unets=[WAN_I2V.comfyui_file], vaes=["wan_2.1_vae.safetensors"],
                            text_encoders=["umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
                            clip_visions=["clip_vision_h.safetensors"])
    error, outputs = validate_prompt(graph, defs)
    assert error is None and outputs == ["9"]


def _persona_error(tmp_path, steps) -> str:
    from persona_pipeline.personas import PersonaFileError, load_persona

    folder = write_persona(tmp_path, photos=0, generation={"steps": steps})
    with pytest.raises(PersonaFileError) as caught:
        load_persona(folder)
    return str(caught.value)


def test_a_first_video_step_with_no_input_image_is_refused_by_name(tmp_path):
    message = _persona_error(tmp_path, [{"name": "motion", "type": "video", "n": 1}])
    assert "'motion'" in message and "video step with no input image" in message and "params.input_image" in message


def test_frames_on_a_generate_step_are_refused(tmp_path):
    message = _persona_error(tmp_path, [{"name": "base", "template": "txt2img_lora", "params": {"frames": 49}}])
    assert "params.frames" in message and "type: video" in message


def test_a_model_of_another_family_is_refused_by_name(tmp_path):
    folder = tmp_path / "some-flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(VideoStepError, match=r"video step 'motion': model .*some-flux.* is a FluxPipeline, not an "
                                             r"image-to-video model \(Wan 2.1 image-to-video 480p: WanImageToVideoPipeline\)"):
        resolve_video_model("motion", str(folder), None, "tiny-flux")
    with pytest.raises(VideoStepError, match="template 'flux_kontext_edit' is not a video template; use wan_i2v"):
        resolve_video_model("motion", None, "flux_kontext_edit", "tiny-flux")
    assert resolve_video_model("motion", None, None, "tiny") == (WAN_I2V, "tiny-wan-i2v")
    assert resolve_video_model("motion", None, None, "/models/flux") == (WAN_I2V, WAN_I2V.default_model)


def test_video_requests_refuse_bad_lengths_sizes_and_a_missing_input():
    template = load_template(REPO_WORKFLOWS / "wan_i2v.json")
    params = {**PARAMS, "control_strength": 0.65, "denoise": 1.0, "video_model": "wan_i2v", "frames": 48, "fps": 16}
    common = dict(prompt="p", negative_prompt="n", seed=1, parent_image=None, pose_image=None, loras=[],
                  default_size=512, min_side=32, step_position=2)
    with pytest.raises(ParamError, match=r"wan_i2v: frames = 48 must be 4k \+ 1"):
        build_request(template, params, input_image="/x.png", input_size=(64, 64), **common)
    with pytest.raises(TemplateError, match="video step .* has no input image"):
        build_request(template, {**params, "frames": 49}, input_image=None, input_size=None, **common)
    with pytest.raises(ParamError, match="width = 40 must be a multiple of 16"):
        build_request(template, {**params, "frames": 49, "width": 40, "height": 64}, input_image="/x.png",
                      input_size=(64, 64), **common)
    landscape = build_request(template, {**params, "frames": 49}, input_image="/x.png", input_size=(640, 480), **common)
    assert (landscape.width, landscape.height, landscape.frames, landscape.fps) == (832, 480, 49, 16)
    with pytest.raises(TemplateError, match="makes a video .* use it in a step of type: video"):
        build_request(template, {**PARAMS, "control_strength": 0.65, "denoise": 1.0}, input_image=None,
                      input_size=None, **common)
