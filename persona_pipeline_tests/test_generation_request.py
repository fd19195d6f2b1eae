"""The generation request (domain/generation_request.py), checked once when it is built, and the
backend protocol the executor dispatches through (generation/backends): a backend is found by
the step's name, prepares each request in its own form, and what it reports ends up in the
manifest beside the request. Pure and file-level tests; no server, no model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from persona_pipeline.domain import generation_params
from persona_pipeline.domain.generation_params import LORA_WEIGHT_RANGE, ParamError, check_lora_weight
from persona_pipeline.domain.generation_request import GenerationRequest, LoraInUse, build_request
from persona_pipeline.domain.workflows import LoraRef, TemplateError, WorkflowError, inject_loras, load_template
from persona_pipeline.generation.backends import ImageResult, PreparedJob
from persona_pipeline.generation.backends.comfyui import ComfyUIBackend
from persona_pipeline.generation.executor import GenerationContext, GenerationExecutor
from persona_pipeline.generation.runs import PlannedJob
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.settings import REPO_WORKFLOWS

TXT2IMG = load_template(REPO_WORKFLOWS / "txt2img_lora.json")
REFINE = load_template(REPO_WORKFLOWS / "img2img_refine.json")
POSE = load_template(REPO_WORKFLOWS / "txt2img_pose.json")
PARAMS = {"steps": 8, "cfg": 6.5, "sampler": "euler", "scheduler": "karras", "denoise": 1.0, "control_strength": 0.65,
          "width": None, "height": None, "pose_image": None, "controlnet": None}
LORA = LoraInUse(lora_id=3, path="/loras/v1.safetensors", sha256="a" * 64, weight=0.8, comfy_name="pp/tester/v1.safetensors")


def request(**changes) -> GenerationRequest:
    fields = dict(prompt="photo of t3st woman", negative_prompt="blurry", width=512, height=512, steps=8, cfg=6.5,
                  sampler="euler", scheduler="karras", seed=7, denoise=1.0, parent_image=None, control_image=None,
                  control_strength=0.65, controlnet="control_v11p_sd15_openpose.pth", loras=(LORA,), template=TXT2IMG)
    return GenerationRequest(**{**fields, **changes})


# ---------------------------------------------------------------- the request checks each field once


@pytest.mark.parametrize("change, message", [
    ({"seed": -1}, "seed = -1 is out of range"),
    ({"steps": 0}, "steps = 0 is out of range: allowed 1 to 150"),
    ({"cfg": 31.0}, "cfg = 31.0 is out of range"),
    ({"sampler": "euler_a"}, "sampler = 'euler_a' is not a name ComfyUI knows (did you mean euler_ancestral?)"),
    ({"scheduler": "fancy"}, "scheduler = 'fancy' is not a name ComfyUI knows"),
    ({"width": 500}, "width = 500 must be a multiple of 8 (from 256 to 2048)"),
    ({"height": 128}, "height = 128 is out of range: allowed 256 to 2048"),
    ({"denoise": 1.5}, "denoise = 1.5 is out of range"),
    ({"control_strength": 0.95}, "control_strength = 0.95 is out of range: allowed 0.4 to 0.9"),
    ({"prompt": None}, "prompt = None must be text"),
    ({"loras": (replace(LORA, weight=2.5),)}, "LoRA pp/tester/v1.safetensors weight = 2.5 is out of range: allowed 0.0 to 2.0"),
    ({"loras": (LORA,) * 6}, "6 LoRAs are chained; at most 5"),
])
def test_each_field_is_refused_naming_the_template_field_and_bound(change, message):
    with pytest.raises(ParamError) as refused:
        request(**change)
    assert str(refused.value).startswith(f"txt2img_lora: {message}")


def test_the_smallest_side_is_the_backends():
    assert request(width=64, height=32, min_side=32).width == 64
    with pytest.raises(ParamError, match="width = 64 is out of range: allowed 256 to 2048"):
        request(width=64, height=32)


def test_a_size_the_template_does_not_set_is_not_checked_and_recorded_as_none():
    built = request(template=REFINE, width=None, height=None, parent_image="/x/parent.png", denoise=0.4)
    record = built.record()
    assert (record["width"], record["height"], record["parent_image"], record["denoise"]) == (None, None, "/x/parent.png", 0.4)


def test_the_record_holds_the_keys_manifests_have_always_had():
    record = request(control_image="/x/pose.png", control_strength=0.7).record()
    assert record == {
        "prompt": "photo of t3st woman", "negative_prompt": "blurry", "seed": 7, "sampler": "euler", "scheduler": "karras",
        "steps": 8, "cfg": 6.5, "denoise": 1.0, "width": 512, "height": 512, "parent_image": None,
        "pose_image": "/x/pose.png", "control_strength": 0.7,
        "loras": [{"id": 3, "name": "pp/tester/v1.safetensors", "path": "/loras/v1.safetensors", "sha256": "a" * 64,
                   "weight": 0.8}],
        "template": "txt2img_lora", "template_sha256": TXT2IMG.sha256,
    }
    assert request().record()["control_strength"] is None  # no pose reference: no strength recorded
    assert json.loads(json.dumps(record)) == record


def _build(template, **changes):
    fields = dict(prompt="p", negative_prompt="n", seed=1, parent_image=None, pose_image=None, loras=[LORA],
                  default_size=512, min_side=256, step_position=1)
    return build_request(template, {**PARAMS, **changes.pop("params", {})}, **{**fields, **changes})


def test_build_request_takes_the_backends_size_when_the_step_sets_none():
    assert (_build(TXT2IMG).width, _build(TXT2IMG).height) == (512, 512)
    assert _build(TXT2IMG, default_size=64, min_side=32).width == 64
    assert _build(TXT2IMG, params={"width": 640}).width == 640
    assert _build(REFINE, parent_image="/x/p.png").width is None  # the template sets no size
    assert _build(POSE, pose_image="/x/pose.png", params={"controlnet": "cn.pth"}).controlnet == "cn.pth"


def test_build_request_refuses_a_template_whose_input_the_job_lacks():
    with pytest.raises(TemplateError, match=r"refines a parent image .* it cannot be step 1 of a run"):
        _build(REFINE)
    with pytest.raises(TemplateError, match="needs a pose reference: set params.pose_image"):
        _build(POSE)


# ---------------------------------------------------------------- one LoRA weight rule


def test_the_lora_weight_rule_is_one_range_used_by_the_request_and_the_graph(monkeypatch):
    low, high = LORA_WEIGHT_RANGE
    check_lora_weight(low)
    check_lora_weight(high)
    for bad in (low - 0.01, high + 0.01, True, "1"):
        with pytest.raises(ParamError):
            check_lora_weight(bad)
    graph = json.loads(json.dumps(TXT2IMG.graph))
    with pytest.raises(ParamError, match="strength_model = 2.5"):
        inject_loras(graph, [LoraRef("a.safetensors", 2.5, 2.5)])
    with pytest.raises(ParamError, match="weight = 2.5"):
        request(loras=(replace(LORA, weight=2.5),))
    # Widening the one range widens it everywhere: nothing else holds a copy of it.
    monkeypatch.setattr(generation_params, "LORA_WEIGHT_RANGE", (0.0, 3.0))
    inject_loras(graph, [LoraRef("a.safetensors", 2.5, 2.5)])
    assert request(loras=(replace(LORA, weight=2.5),)).loras[0].weight == 2.5


# ---------------------------------------------------------------- dispatch through the protocol


class RecordingBackend:
    """A backend that draws a flat image per job: what the protocol asks of FLUX or an edit model."""

    def __init__(self, name: str, default_size: int = 64, min_side: int = 32):
        self.name, self.default_size, self.min_side = name, default_size, min_side
        self.prepared: list = []
        self.ran: list[list[str]] = []

    def prepare(self, job):
        self.prepared.append(job)
        return PreparedJob(job, {"seed": job.request.seed})

    def run(self, jobs, on_result):
        self.ran.append([p.job.key for p in jobs])
        for prepared in jobs:
            job = prepared.job
            job.folder.mkdir(parents=True, exist_ok=True)
            path = job.folder / f"{job.stem}.png"
            Image.new("RGB", (8, 8), (job.request.seed % 256, 0, 0)).save(path)
            on_result(ImageResult(job.key, image_path=path, submitted={"made_by": self.name, **prepared.payload},
                                  fields={"base_model": f"{self.name}-model", "batch_index": 0}, server=f"{self.name}:1",
                                  timings={"s": 0.1}))


class FailingBackend(RecordingBackend):
    def run(self, jobs, on_result):
        for prepared in jobs:
            on_result(ImageResult(prepared.job.key, error="the model fell over", permanent=True))


def planned(job_id: int, backend: str, template: str = "txt2img_lora", seed: int = 11) -> PlannedJob:
    return PlannedJob(job_id=job_id, run_id=4, step_id=1, step_position=1, step_name="base", template=template,
                      backend=backend, params=dict(PARAMS), prompt="photo of t3st woman", negative_prompt="",
                      parent_id=None, parent_image=None, parent_sha256=None, slot=job_id, seed=seed)


def executor(tmp_path: Path, backends) -> GenerationExecutor:
    ctx = GenerationContext(slug="tester", persona_folder=tmp_path / "persona", templates_dir=REPO_WORKFLOWS, loras=[LORA],
                            dagster_run_id="run-1", log=lambda _: None)
    return GenerationExecutor(ctx, PersonaStorage(home=str(tmp_path / "home")), backends)


def test_jobs_go_to_the_backend_their_step_names_and_its_fields_reach_the_manifest(tmp_path):
    first, second, broken = RecordingBackend("first"), RecordingBackend("second", default_size=128), FailingBackend("broken")
    run = executor(tmp_path, {backend.name: backend for backend in (first, second, broken)})
    built = [run.build(planned(1, "first")), run.build(planned(2, "second", seed=12)), run.build(planned(3, "first", seed=13)),
             run.build(planned(4, "broken"))]
    assert [job.request.width for job in first.prepared + second.prepared] == [64, 64, 128]  # each backend's own size
    assert all(job.request.loras == (LORA,) for job in first.prepared)
    outcomes = []
    run.run(built, outcomes.append)

    assert first.ran == [["1", "3"]] and second.ran == [["2"]]  # one run per backend, its jobs together
    by_job = {outcome.planned.job_id: outcome for outcome in outcomes}
    assert sorted(by_job) == [1, 2, 3, 4]
    assert by_job[4].error == "the model fell over" and by_job[4].permanent and by_job[4].image_path is None
    manifest = json.loads(by_job[2].manifest_path.read_text())
    assert manifest["backend"] == "second" and manifest["base_model"] == "second-model" and manifest["server"] == "second:1"
    assert manifest["batch_index"] == 0 and manifest["timings"] == {"s": 0.1} and manifest["seed"] == 12
    assert manifest["loras"][0]["id"] == LORA.lora_id and manifest["template"] == "txt2img_lora"
    assert manifest["job_id"] == 2 and manifest["persona"] == "tester" and manifest["dagster_run_id"] == "run-1"
    assert manifest["sha256"] == by_job[2].sha256 and manifest["image"] == by_job[2].image_path.name
    submitted = json.loads((by_job[2].manifest_path.parent / manifest["workflow"]).read_text())
    assert submitted == {"made_by": "second", "seed": 12}


def test_an_unknown_backend_fails_the_step_before_anything_runs(tmp_path):
    run = executor(tmp_path, {"first": RecordingBackend("first")})
    with pytest.raises(WorkflowError, match="no generation backend 'flux'; known: first"):
        run.build(planned(1, "flux"))


def test_the_comfyui_backend_prepares_a_filled_graph_with_the_loras_and_uploads(tmp_path):
    comfy = ComfyUIBackend(None, checkpoint="tiny.safetensors", log=lambda _: None)
    run = executor(tmp_path, {"comfyui": comfy})
    job = replace(planned(1, "comfyui", template="img2img_refine"), parent_id=9, parent_image=str(tmp_path / "parent.png"),
                  params={**PARAMS, "denoise": 0.4})
    prepared = run.build(job).prepared
    graph = prepared.payload.graph
    loaders = [node["inputs"] for node in graph.values() if node["class_type"] == "LoraLoader"]
    assert loaders and loaders[0]["lora_name"] == LORA.comfy_name and loaders[0]["strength_model"] == LORA.weight
    assert list(prepared.payload.uploads.values()) == [tmp_path / "parent.png"]
    assert prepared.payload.file_stem == "p9-s01-11" and prepared.payload.key == "1"
    sampler = next(node["inputs"] for node in graph.values() if node["class_type"] == "KSampler")
    assert (sampler["seed"], sampler["denoise"], sampler["steps"]) == (11, 0.4, 8)


def test_the_diffusers_backend_turns_a_request_into_a_pipeline_job_without_a_graph(tmp_path):
    from persona_pipeline.generation.backends.diffusers import DiffusersBackend
    from persona_pipeline.resources.diffusion import DiffusersJob, DiffusionBackend

    diffusers = DiffusersBackend(DiffusionBackend(models_dir=str(tmp_path / "models")), log=lambda _: None)
    assert (diffusers.default_size, diffusers.min_side) == (64, 32)  # the tiny model's, read without building it
    run = executor(tmp_path, {"diffusers": diffusers})
    job = replace(planned(1, "diffusers", template="img2img_refine"), parent_id=9, parent_image="/x/parent.png",
                  params={**PARAMS, "denoise": 0.4, "control_strength": 0.8})
    assert run.build(job).prepared.payload == DiffusersJob(
        prompt="photo of t3st woman", negative_prompt="", seed=11, steps=8, cfg=6.5, sampler="euler", scheduler="karras",
        width=64, height=64, denoise=0.4, init_image="/x/parent.png", control_image=None, control_strength=0.65,
        loras=((LORA.path, LORA.weight),))
    assert not (tmp_path / "models").exists()


def test_a_new_backend_is_one_module_in_generation_backends(tmp_path, monkeypatch):
    """Dropping one module into the backends package is all it takes: persona.yaml accepts its name,
    and make_backends builds it beside the others. An unknown name is refused, naming the choices."""
    from persona_pipeline.generation import backends
    from persona_pipeline.persona_generation import GenerationSettings, PipelineStep

    assert backends.backend_names() == ("comfyui", "diffusers")
    with pytest.raises(ValueError, match=r"backend 'echo' is not one of: comfyui, diffusers"):
        GenerationSettings(backend="echo")

    (tmp_path / "echo.py").write_text(
        "class EchoBackend:\n"
        "    name = 'echo'\n"
        "    default_size = 64\n"
        "    min_side = 64\n"
        "    def __init__(self, log):\n"
        "        self.log = log\n"
        "def build(*, comfyui, diffusion, checkpoint, log):\n"
        "    return EchoBackend(log)\n")
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(tmp_path)])
    monkeypatch.delitem(__import__("sys").modules, "persona_pipeline.generation.backends.echo", raising=False)

    assert backends.backend_names() == ("comfyui", "diffusers", "echo")
    assert GenerationSettings(backend="echo").backend == "echo"
    assert PipelineStep(name="base", template="txt2img_lora", backend="echo").backend == "echo"
    from persona_pipeline.resources.diffusion import DiffusionBackend

    built = backends.make_backends(comfyui=None, diffusion=DiffusionBackend(models_dir=str(tmp_path / "models")),
                                   checkpoint="tiny.safetensors", log=print)
    assert sorted(built) == ["comfyui", "diffusers", "echo"] and built["echo"].min_side == 64
