"""Edit steps (`type: edit`): an input image plus an instruction on FLUX.1 Kontext and Qwen-Image-Edit.

End to end through `content_plan` + `candidates` on SQLite and PostgreSQL, with the diffusers backend on
the tiny local edit models (pixels reproduced from the manifest) and against the fake ComfyUI (real
HTTP + WebSocket, validating the edit nodes as ComfyUI does); then the bad inputs, each refused by
name: an edit step with no input image, an input through a link or outside the persona folder, a
guidance out of range, an SD LoRA on Kontext, an edit step on a family with no edit model, a
model that is no edit model, a template of the other edit model.
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
from persona_pipeline.domain.generation_request import LoraInUse, build_request
from persona_pipeline.domain.workflows import TemplateError, fill_template, load_template
from persona_pipeline.fileio import sha256_file
from persona_pipeline.settings import REPO_WORKFLOWS
from persona_pipeline.training.families.edit_models import EditStepError, kontext_size, one_megapixel_size, resolve_edit_model
from persona_pipeline_tests.conftest import make_settings, write_persona
from persona_pipeline_tests.test_generation import materialise

EDIT_STEPS = [
    {"name": "base", "template": "flux_txt2img_lora", "n": 2, "top_k": 1,
     "params": {"steps": 2, "cfg": 3.5, "sampler": "euler", "scheduler": "simple"}},
    # Kontext (the flux family's edit model) edits its parent, with the persona's FLUX LoRA.
    {"name": "scarf", "type": "edit", "n": 2, "top_k": 1,
     "params": {"instruction": "give her a red scarf, keep her face", "steps": 2, "cfg": 2.5, "sampler": "euler",
                "scheduler": "simple"}},
    # Qwen-Image-Edit edits the image its ancestor from step `base` has (not its parent), without LoRAs.
    {"name": "dusk", "type": "edit", "template": "qwen_image_edit", "n": 1,
     "params": {"input_image": "step:base", "instruction": "make it dusk", "steps": 2, "cfg": 4.0, "sampler": "euler",
                "scheduler": "simple"}},
]


def _sized(steps, base: tuple[int, int], edit: tuple[int, int], qwen: tuple[int, int]):
    sizes = [base, edit, qwen]
    return [{**step, "params": {**step["params"], "width": size[0], "height": size[1]}} for step, size in zip(steps, sizes)]


def _rows(session):
    run = session.scalars(select(models.GenerationRun)).one()
    by_step = [list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == step.id)
                                    .order_by(models.Candidate.id))) for step in run.steps]
    return run, by_step


@pytest.mark.slow
def test_edit_steps_run_on_both_edit_models_with_diffusers_and_reproduce(tmp_path, db_url):
    from persona_pipeline.resources.diffusion import DiffusionBackend
    from persona_pipeline_tests.test_flux_generation import random_flux_lora

    settings = make_settings(tmp_path, db_url, base_model="tiny")
    folder = write_persona(settings.datasets_dir, photos=0, base_model="tiny-flux", family="flux",
                           generation={"prompts_per_plan": 1, "steps": _sized(EDIT_STEPS, (64, 64), (64, 64), (64, 48))})
    flux = DiffusionBackend(base_model="tiny-flux", models_dir=str(settings.home / "models"))
    lora_path = random_flux_lora(flux.base_model_path(), tmp_path / "loras" / "t3st-flux.safetensors", seed=4)
    from persona_pipeline.personas import load_persona

    with session_scope(settings.database_url) as session:
        persona = registry.sync_persona(session, load_persona(folder))
        lora_id = registry.register_lora(session, persona.id, name="t3st flux", path=lora_path, sha256=sha256_file(lora_path),
                                         base_model="tiny-flux", trigger_word="t3st", dataset_id=None, training={},
                                         weight=0.9, family="flux", key_format="diffusers").id
    assert materialise(settings, folder).success
    with session_scope(settings.database_url) as session:
        run, (base, scarf, dusk) = _rows(session)
        assert [s.status for s in run.steps] == ["approved", "approved", "voting"]
        assert len(base) == 2 and len(scarf) == 2 and len(dusk) == 1
        parent = session.get(models.Candidate, scarf[0].parent_id)
        kontext = json.loads(Path(scarf[0].manifest_path).read_text())
        assert kontext["edit_model"] == "kontext" and kontext["base_model"] == "tiny-kontext"
        assert kontext["input_image"] == parent.image_path and kontext["prompt"] == "give her a red scarf, keep her face"
        assert kontext["diffusers"]["edit_image_sha256"] == parent.image_sha256 == kontext["parent_sha256"]
        assert [l["id"] for l in kontext["loras"]] == [lora_id] and kontext["loras_skipped"] == []
        assert kontext["template"] == "flux_kontext_edit" and kontext["comfyui_file"] == "flux1-dev-kontext_fp8_scaled.safetensors"
        # dusk's parent is a scarf candidate, but it edits that candidate's own parent: the `base` image
        qwen = json.loads(Path(dusk[0].manifest_path).read_text())
        scarf_parent = session.get(models.Candidate, dusk[0].parent_id)
        assert scarf_parent.step_id == run.steps[1].id
        assert qwen["input_image"] == session.get(models.Candidate, scarf_parent.parent_id).image_path
        assert qwen["edit_model"] == "qwen_image_edit" and qwen["base_model"] == "tiny-qwen-edit"
        assert qwen["loras"] == [] and qwen["loras_skipped"] == [lora_id]  # it takes no FLUX LoRA
        stored = [(scarf[0].image_path, kontext, "tiny-kontext"), (dusk[0].image_path, qwen, "tiny-qwen-edit")]
    with Image.open(stored[1][0]) as image:
        assert image.size == (64, 48)
    for path, manifest, model in stored:
        again = DiffusionBackend(base_model=model, models_dir=str(settings.home / "models")).reproduce(
            manifest["diffusers"], log=lambda _: None)
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(image.convert("RGB")))


@pytest.mark.slow
def test_edit_steps_against_the_fake_comfyui(tmp_path, db_url):
    lora_name = "persona-pipeline/tester/t3st-flux.safetensors"
    with FakeComfyUI(job_time_s=0.01, loras=[lora_name]) as server:
        settings = make_settings(tmp_path, db_url, comfyui_urls=server.url, generation_backend="comfyui")
        steps = _sized(EDIT_STEPS, (256, 256), (256, 320), (320, 256))
        folder = write_persona(settings.datasets_dir, photos=0, base_model="tiny-flux", family="flux",
                               generation={"prompts_per_plan": 1, "steps": steps, "checkpoint": "flux1-dev.safetensors"})
        path = tmp_path / "loras" / "t3st-flux.safetensors"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"a flux lora")
        from persona_pipeline.personas import load_persona

        with session_scope(settings.database_url) as session:
            persona = registry.sync_persona(session, load_persona(folder))
            lora_id = registry.register_lora(session, persona.id, name="t3st-flux.safetensors", path=path,
                                             sha256=sha256_file(path), base_model="flux1-dev", trigger_word="t3st",
                                             dataset_id=None, training={}, weight=0.8, family="flux").id
        assert materialise(settings, folder).success
        stats = server.stats()
    with session_scope(settings.database_url) as session:
        run, (base, scarf, dusk) = _rows(session)
        assert [s.status for s in run.steps] == ["approved", "approved", "voting"] and len(scarf) == 2 and len(dusk) == 1
        kontext = json.loads(Path(scarf[0].manifest_path).read_text())
        graph = json.loads((Path(scarf[0].manifest_path).parent / kontext["workflow"]).read_text())
        classes = {node["class_type"] for node in graph.values()}
        assert {"ReferenceLatent", "FluxGuidance", "ConditioningZeroOut", "LoraLoaderModelOnly"} <= classes
        assert kontext["base_model"] == "flux1-dev-kontext_fp8_scaled.safetensors" and kontext["loras"][0]["id"] == lora_id
        load = next(node for node in graph.values() if node["class_type"] == "LoadImage")
        assert load["inputs"]["image"] != kontext["input_image"]  # the server-side upload name was submitted
        assert kontext["input_image"] == session.get(models.Candidate, scarf[0].parent_id).image_path
        qwen = json.loads(Path(dusk[0].manifest_path).read_text())
        qwen_graph = json.loads((Path(dusk[0].manifest_path).parent / qwen["workflow"]).read_text())
        assert {"TextEncodeQwenImageEdit", "CLIPLoader", "ModelSamplingAuraFlow"} <= {n["class_type"] for n in qwen_graph.values()}
        assert not any(n["class_type"].startswith("LoraLoader") for n in qwen_graph.values()) and qwen["loras_skipped"] == [lora_id]
        paths = [c.image_path for c in (scarf[0], dusk[0])]
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
    assert sizes == [(256, 320), (320, 256)]  # the fake draws what ImageScale -> VAEEncode hands the sampler
    assert stats["submitted"] == 2 + 2 + 1 and stats["uploads"] == 2  # the base image once per edit model


def test_an_edit_model_file_no_server_has_fails_its_step_naming_it(tmp_path, db_url):
    """Jobs go only to servers whose /object_info lists the graph's model files, UNETLoader's included:
    with no server holding the Kontext file, the edit step fails once, naming it; the base step is kept."""
    with FakeComfyUI(job_time_s=0.01, loras=["persona-pipeline/tester/l.safetensors"], unets=("flux1-dev.safetensors",)) as server:
        settings = make_settings(tmp_path, db_url, comfyui_urls=server.url, generation_backend="comfyui")
        folder = write_persona(settings.datasets_dir, photos=0, base_model="tiny-flux", family="flux",
                               generation={"prompts_per_plan": 1, "steps": _sized(EDIT_STEPS[:2], (256, 256), (256, 256), (0, 0)),
                                           "checkpoint": "flux1-dev.safetensors"})
        from persona_pipeline.personas import load_persona

        with session_scope(settings.database_url) as session:
            persona = registry.sync_persona(session, load_persona(folder))
            path = tmp_path / "l.safetensors"
            path.write_bytes(b"x")
            registry.register_lora(session, persona.id, name="l", path=path, sha256=sha256_file(path), base_model="flux1-dev",
                                   trigger_word="t3st", dataset_id=None, training={}, family="flux")
        materialise(settings, folder)
        stats = server.stats()
    with session_scope(settings.database_url) as session:
        run, (base, scarf) = _rows(session)
        assert len(base) == 2 and run.steps[0].status == "approved" and not scarf
        assert run.steps[1].status == "failed", run.steps[1].failure_reason
        assert "flux1-dev-kontext_fp8_scaled.safetensors" in run.steps[1].failure_reason
    assert stats["submitted"] == 2  # the edit jobs were never sent


# ---------------------------------------------------------------- bad input, refused by name


def _config(steps, **extra):
    from persona_pipeline.personas import PersonaConfig

    base = {"name": "T", "trigger_word": "t3st", "class_word": "woman", "pillars": [{"name": "city", "weight": 1}]}
    return PersonaConfig.model_validate({**base, **extra, "generation": {"steps": steps}})


@pytest.mark.parametrize("steps, words", [
    ([{"name": "edit", "type": "edit"}], ["step 'edit' is an edit step with no input image", "params.input_image"]),
    ([{"name": "base", "template": "txt2img_lora"}, {"name": "e", "type": "edit", "params": {"input_image": "step:later"}}],
     ["params.input_image 'step:later' names no earlier step", "base"]),
    ([{"name": "base", "template": "txt2img_lora", "params": {"instruction": "make it red"}}],
     ["params.instruction apply to edit steps only"]),
])
def test_edit_step_settings_are_checked_when_the_persona_loads(steps, words):
    with pytest.raises(ValueError) as error:
        _config(steps)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_the_edit_model_is_resolved_or_refused_naming_the_step(tmp_path):
    from persona_pipeline.training.tiny_models import build_tiny_sd

    assert resolve_edit_model("e", None, None, "flux", "tiny-flux")[1] == "tiny-kontext"
    assert resolve_edit_model("e", None, None, "flux", "/models/FLUX.1-dev")[1] == "black-forest-labs/FLUX.1-Kontext-dev"
    assert resolve_edit_model("e", None, "qwen_image_edit", "sd15", "tiny")[0].name == "qwen_image_edit"
    with pytest.raises(EditStepError, match=r"edit step 'e': the persona's family 'sd15' \(Stable Diffusion 1.x/2.x\) "
                                            r"has no edit model; name one in the step"):
        resolve_edit_model("e", None, None, "sd15", "tiny")
    sd = build_tiny_sd(tmp_path / "tiny-sd")
    with pytest.raises(EditStepError, match=r"model '.*tiny-sd' is a StableDiffusionPipeline, not an edit model"):
        resolve_edit_model("e", str(sd), None, "flux", "tiny-flux")
    with pytest.raises(EditStepError, match=r"model 'tiny-qwen-edit' is Qwen-Image-Edit but template 'flux_kontext_edit'"):
        resolve_edit_model("e", "tiny-qwen-edit", "flux_kontext_edit", "flux", "tiny-flux")
    with pytest.raises(EditStepError, match="template 'txt2img_lora' is not an edit template"):
        resolve_edit_model("e", None, "txt2img_lora", "flux", "tiny-flux")


EDIT_PARAMS = {"steps": 4, "cfg": 2.5, "sampler": "euler", "scheduler": "simple", "denoise": 1.0, "control_strength": 0.65,
               "edit_model": "kontext", "model": "tiny-kontext", "width": None, "height": None}


def _edit_request(params=None, loras=(), input_image="in.png", input_size=(600, 800), template="flux_kontext_edit"):
    return build_request(load_template(REPO_WORKFLOWS / f"{template}.json"), {**EDIT_PARAMS, **(params or {})},
                         prompt="photo of t3st woman", negative_prompt="", seed=1, parent_image=None, pose_image=None,
                         loras=loras, default_size=512, min_side=256, step_position=2, input_image=input_image,
                         input_size=input_size)


def test_edit_requests_take_the_models_size_and_refuse_bad_values():
    request = _edit_request()
    assert (request.width, request.height) == kontext_size(600, 800) == (880, 1184)  # FluxKontextImageScale's pick
    assert request.checkpoint == "flux1-dev-kontext_fp8_scaled.safetensors" and request.prompt == "photo of t3st woman"
    qwen = _edit_request({"edit_model": "qwen_image_edit"}, template="qwen_image_edit")
    assert (qwen.width, qwen.height) == one_megapixel_size(600, 800) == (896, 1184)
    graph = fill_template(request.template, {"input_image": "x.png", "prompt": "p", "checkpoint": request.checkpoint,
                                             "filename_prefix": "f", "seed": 1, "steps": 4, "cfg": 2.5, "sampler": "euler",
                                             "scheduler": "simple", "width": 880, "height": 1184})
    assert graph["14"]["inputs"]["width"] == 880
    with pytest.raises(TemplateError, match=r"edit step \(FLUX.1 Kontext \[dev\]\) has no input image"):
        _edit_request(input_image=None, input_size=None)
    with pytest.raises(ParamError, match=r"cfg \(the kontext edit model's guidance\) = 12.0 is out of range: allowed 1.0 to 10.0"):
        _edit_request({"cfg": 12.0})
    with pytest.raises(ParamError, match="width = 264 must be a multiple of 16 for an edit model"):
        _edit_request({"width": 264, "height": 256})
    sd_lora = LoraInUse(lora_id=7, path="x", sha256="0" * 64, weight=1.0, comfy_name="p/x.safetensors", family="sd15")
    with pytest.raises(ParamError, match=r"LoRA 7 \(p/x.safetensors\) is a sd15 LoRA; FLUX.1 Kontext \[dev\] takes flux"):
        _edit_request(loras=[sd_lora])
    with pytest.raises(TemplateError, match="edits an input image .* use it in a step of type: edit"):
        _edit_request({"edit_model": None})


@pytest.mark.parametrize("source, problem", [
    ("photos/link.png", "photos/link.png is a symbolic link"),
    ("../outside.png", "'..'"),
    ("photos/missing.png", "not found"),
])
def test_an_input_image_through_a_link_outside_the_persona_folder_or_missing_is_refused(tmp_path, source, problem):
    from persona_pipeline.generation.backends.comfyui import ComfyUIBackend
    from persona_pipeline.generation.executor import GenerationContext, GenerationExecutor
    from persona_pipeline.generation.runs import PlannedJob
    from persona_pipeline.resources.storage import PersonaStorage

    folder = tmp_path / "datasets" / "tester"
    (folder / "photos").mkdir(parents=True)
    outside = tmp_path / "datasets" / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    (folder / "photos" / "link.png").symlink_to(outside)
    ctx = GenerationContext(slug="tester", persona_folder=folder, templates_dir=REPO_WORKFLOWS, loras=[],
                            dagster_run_id=None, log=lambda _: None)
    executor = GenerationExecutor(ctx, PersonaStorage(home=str(tmp_path / "home")),
                                  {"comfyui": ComfyUIBackend(None, checkpoint="flux1-dev.safetensors", log=lambda _: None)})
    job = PlannedJob(job_id=1, run_id=1, step_id=1, step_position=1, step_name="edit", template="flux_kontext_edit",
                     backend="comfyui", params={**EDIT_PARAMS, "input_image": source}, prompt="p", negative_prompt="",
                     parent_id=None, parent_image=None, parent_sha256=None, slot=0, seed=1)
    with pytest.raises(TemplateError) as refused:
        executor.build(job)
    assert f"params.input_image {source!r}" in str(refused.value) and problem in str(refused.value)
    (folder / "photos" / "ok.png").write_bytes(b"not an image")
    with pytest.raises(TemplateError, match="ok.png of edit step 'edit' is not a readable image"):
        executor.build(job.__class__(**{**job.__dict__, "params": {**job.params, "input_image": "photos/ok.png"}}))


def test_the_fake_comfyui_validates_the_edit_nodes_as_comfyui_does():
    defs = node_definitions([], [], [], ["in.png"], unets=["k.safetensors"], text_encoders=["q.safetensors"], vaes=["v.safetensors"])
    values = {"checkpoint": "k.safetensors", "input_image": "in.png", "prompt": "p", "negative_prompt": "",
              "filename_prefix": "f", "seed": 1, "steps": 4, "cfg": 4.0, "sampler": "euler", "scheduler": "simple",
              "width": 256, "height": 256}
    filled = fill_template(load_template(REPO_WORKFLOWS / "qwen_image_edit.json"), values)
    filled["2"]["inputs"].update(clip_name="q.safetensors")
    filled["10"]["inputs"].update(vae_name="v.safetensors")
    assert validate_prompt(filled, defs) == (None, ["9"])
    filled["2"]["inputs"]["type"] = "qwen"
    filled["6"]["inputs"]["image"] = ["13", 0]  # a LATENT where TextEncodeQwenImageEdit takes an IMAGE
    body, _ = validate_prompt(filled, defs)
    errors = {node: [e["type"] for e in entry["errors"]] for node, entry in body["node_errors"].items()}
    assert errors == {"2": ["value_not_in_list"], "6": ["return_type_mismatch"]}
    assert "received_type(LATENT) mismatch input_type(IMAGE)" in body["node_errors"]["6"]["errors"][0]["details"]
    kontext = fill_template(load_template(REPO_WORKFLOWS / "flux_kontext_edit.json"), values)
    kontext["15"]["inputs"] = {}  # ReferenceLatent's latent is optional; its conditioning is not
    body, _ = validate_prompt(kontext, node_definitions([], [], [], ["in.png"], unets=["k.safetensors"],
                                                        text_encoders=["clip_l.safetensors", "t5xxl_fp16.safetensors"],
                                                        vaes=["ae.safetensors"]))
    assert [e["details"] for e in body["node_errors"]["15"]["errors"]] == ["conditioning"]


def test_a_source_photo_as_input_image_is_read_from_the_persona_folder(tmp_path):
    from persona_pipeline.generation.backends.comfyui import ComfyUIBackend
    from persona_pipeline.generation.executor import GenerationContext, GenerationExecutor
    from persona_pipeline.generation.runs import PlannedJob
    from persona_pipeline.resources.storage import PersonaStorage

    folder = tmp_path / "datasets" / "tester"
    (folder / "photos").mkdir(parents=True)
    Image.new("RGB", (300, 400)).save(folder / "photos" / "003.jpg")
    ctx = GenerationContext(slug="tester", persona_folder=folder, templates_dir=REPO_WORKFLOWS, loras=[],
                            dagster_run_id=None, log=lambda _: None)
    executor = GenerationExecutor(ctx, PersonaStorage(home=str(tmp_path / "home")),
                                  {"comfyui": ComfyUIBackend(None, checkpoint="flux1-dev.safetensors", log=lambda _: None)})
    job = PlannedJob(job_id=1, run_id=1, step_id=1, step_position=1, step_name="edit", template="qwen_image_edit",
                     backend="comfyui", params={**EDIT_PARAMS, "edit_model": "qwen_image_edit", "input_image": "photos/003.jpg",
                                                "instruction": "make it dusk"},
                     prompt="photo of t3st woman", negative_prompt="", parent_id=None, parent_image=None, parent_sha256=None,
                     slot=0, seed=1)
    built = executor.build(job)
    request = built.prepared.job.request
    assert request.input_image == str((folder / "photos" / "003.jpg").resolve()) and request.prompt == "make it dusk"
    assert (request.width, request.height) == (896, 1184)  # ~1 megapixel at the photo's 3:4
    graph = built.prepared.payload.graph
    assert graph["12"]["inputs"]["image"] == request.input_image and graph["1"]["inputs"]["unet_name"] == request.checkpoint
    assert built.prepared.payload.uploads == {"12": Path(request.input_image)}
    assert built.manifest["edit_model"] == "qwen_image_edit" and built.manifest["input_image"] == request.input_image
