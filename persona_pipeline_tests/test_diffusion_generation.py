"""The local diffusers backend on the tiny model: batched generation with several weighted LoRAs,
exact reproduction from a manifest (batch included), img2img from a parent, the OpenPose ControlNet,
LoRA files reloaded when they change, and bad jobs refused, naming the file or value, before any
model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from persona_pipeline.resources import diffusion_runtime
from persona_pipeline.resources.diffusion import (DiffusersJob, DiffusionBackend, GenerationInputError, GenerationParamError,
                                                  ReproductionError, plan_batches)
from persona_pipeline.training.lora import LORA_TARGET_MODULES, save_checkpoint
from persona_pipeline_tests.conftest import DEMO

BASE = dict(prompt="t3st woman, portrait", negative_prompt="blurry", steps=2, cfg=5.0, sampler="euler_ancestral",
            scheduler="normal", width=32, height=32)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(pixels(a), pixels(b))


def random_kohya_lora(base_model: str, path: Path, seed: int) -> Path:
    """A real kohya-format LoRA for the tiny UNet, written by the trainer's own writer, with seeded
    random up and down matrices (a fresh adapter's up matrices are zero and would change nothing)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=LORA_TARGET_MODULES))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    save_checkpoint(unet, 4.0, path, metadata={})
    return path


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> DiffusionBackend:
    return DiffusionBackend(models_dir=str(tmp_path_factory.mktemp("models")), batch_size=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory, backend) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    base_model = backend.base_model_path()
    parent = folder / "parent.png"
    with Image.open(sorted((DEMO / "photos").glob("*.jpg"))[0]) as photo:
        photo.convert("RGB").resize((32, 32)).save(parent)
    out = {"a": str(random_kohya_lora(base_model, folder / "a.safetensors", 1)),
           "b": str(random_kohya_lora(base_model, folder / "b.safetensors", 2)),
           "parent": str(parent)}
    for name, arm in (("pose", (4, 12)), ("pose2", (28, 6))):  # stick figures with the left arm elsewhere
        pose = Image.new("RGB", (32, 32))
        draw = ImageDraw.Draw(pose)
        draw.line([(16, 4), (16, 20)], fill=(255, 0, 0), width=2)
        draw.line([(16, 20), (8, 30), (16, 20), (24, 30)], fill=(0, 255, 0), width=2)
        draw.line([(16, 10), arm, (16, 10), (26, 14)], fill=(0, 0, 255), width=2)
        pose.save(folder / f"{name}.png")
        out[name] = str(folder / f"{name}.png")
    return out


def one(backend: DiffusionBackend, **changes) -> tuple[Image.Image, dict]:
    return backend.generate_with_manifests([DiffusersJob(**{**BASE, "seed": 7, **changes})], log=lambda _: None)[0]


@pytest.mark.slow
def test_batch_with_two_loras_is_reproduced_exactly_from_its_manifests(backend, files):
    loras = ((files["a"], 0.8), (files["b"], 0.5))
    jobs = [DiffusersJob(**BASE, seed=seed, loras=loras) for seed in (11, 12, 13, 14)]
    other = DiffusersJob(**{**BASE, "prompt": "t3st woman, beach"}, seed=11, loras=loras)
    jobs.insert(2, other)  # a job that cannot share the batch, between the others
    logs: list[str] = []
    results = backend.generate_with_manifests(jobs, log=logs.append)

    assert len(logs) == 2 and "4 image(s)" in logs[0] and "1 image(s)" in logs[1]  # two pipeline calls
    manifests = [json.loads(json.dumps(manifest)) for _, manifest in results]  # as stored beside the image
    assert [m["seed"] for m in manifests] == [11, 12, 11, 13, 14]
    assert [m["batch_seeds"] for m in manifests] == [[11, 12, 13, 14]] * 2 + [[11]] + [[11, 12, 13, 14]] * 2
    assert [m["batch_index"] for m in manifests] == [0, 1, 0, 2, 3]
    assert [lora["weight"] for lora in manifests[0]["loras"]] == [0.8, 0.5]
    assert manifests[0]["loras"][0]["sha256"] != manifests[0]["loras"][1]["sha256"]
    assert backend.manifest_fields(jobs[3], [11, 12, 13, 14], 2) == manifests[3]  # for callers batching themselves
    images = [image for image, _ in results]
    assert len({pixels(image).tobytes() for image in images}) == 5  # every seed and prompt draws its own image

    for image, manifest in zip(images, manifests):
        assert same(backend.reproduce(manifest, log=lambda _: None), image)
    # And from a freshly loaded pipeline, the LoRAs read again from their files, in a process now set
    # to another torch thread count (CPU sums split by thread; reproduce uses the recorded count).
    diffusion_runtime._load_runtime.cache_clear()
    threads = torch.get_num_threads()
    assert manifests[3]["torch_threads"] == threads
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        assert same(backend.reproduce(manifests[3], log=lambda _: None), images[3])
        assert torch.get_num_threads() == (2 if threads == 1 else 1)  # restored afterwards
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_lora_weight_is_really_applied_and_other_renders_are_untouched(backend, files):
    diffusion_runtime._load_runtime.cache_clear()  # a pipeline that has never had an adapter
    plain_before = backend.generate_plain("photo of a woman", [5], size=32)[0]
    render_before = backend.render_checkpoints([Path(files["b"])], ["t3st woman"], [3])[0][0]
    without, _ = one(backend)
    off, _ = one(backend, loras=((files["a"], 0.0),))
    on, _ = one(backend, loras=((files["a"], 1.0),))
    both, _ = one(backend, loras=((files["a"], 1.0), (files["b"], 1.0)))
    assert same(off, without)  # weight 0 adds exactly nothing
    assert not same(on, without) and not same(both, on)
    # Generation leaves neither adapters active nor its sampler behind for the base-model renders.
    assert same(backend.generate_plain("photo of a woman", [5], size=32)[0], plain_before)
    assert same(backend.render_checkpoints([Path(files["b"])], ["t3st woman"], [3])[0][0], render_before)
    again, _ = one(backend)
    assert same(again, without)


@pytest.mark.slow
def test_a_changed_lora_file_is_reloaded_and_its_old_manifest_refused(backend, files, tmp_path, monkeypatch):
    monkeypatch.setattr(diffusion_runtime, "MAX_CACHED_ADAPTERS", 1)  # and adapters beyond the cache size are dropped
    path = tmp_path / "persona.safetensors"
    shutil.copyfile(files["a"], path)
    first, manifest = one(backend, loras=((str(path), 1.0),))
    shutil.copyfile(files["b"], path)  # same path, other content
    second, _ = one(backend, loras=((str(path), 1.0),))
    from_b, _ = one(backend, loras=((files["b"], 1.0),))
    assert not same(first, second) and same(second, from_b)
    assert len(diffusion_runtime.shared_runtime(backend.base_model_path(), "cpu").pipe.get_list_adapters()["unet"]) == 1
    assert same(one(backend, loras=((files["a"], 1.0),))[0], first)  # dropped, then loaded again
    with pytest.raises(ReproductionError, match=rf"LoRA file {path} has sha256 \w+, the manifest recorded {manifest['loras'][0]['sha256']}"):
        backend.reproduce(manifest)
    with pytest.raises(ReproductionError, match="manifest base_model 'other/model' differs from this backend's base_model 'tiny'"):
        backend.reproduce({**manifest, "base_model": "other/model", "loras": []})
    with pytest.raises(ReproductionError, match="manifest is missing steps, cfg"):
        backend.reproduce({k: v for k, v in manifest.items() if k not in ("steps", "cfg")})


@pytest.mark.slow
def test_a_lora_that_does_not_fit_the_model_fails_before_any_image(backend, files, tmp_path):
    from safetensors.torch import save_file

    alien = tmp_path / "other-model.safetensors"  # kohya keys for a layer the tiny UNet does not have
    module = "lora_unet_up_blocks_9_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{module}.lora_down.weight": torch.zeros(4, 32), f"{module}.lora_up.weight": torch.zeros(32, 4)}, str(alien))
    jobs = [DiffusersJob(**BASE, seed=1, loras=((files["a"], 1.0),)), DiffusersJob(**BASE, seed=2, loras=((str(alien), 1.0),))]
    logs: list[str] = []
    with pytest.raises(GenerationInputError, match=rf"LoRA file {alien} could not be loaded onto base model 'tiny': Target modules"):
        backend.generate_jobs(jobs, log=logs.append)
    assert logs == []


@pytest.mark.slow
def test_img2img_refines_the_parent(backend, files):
    parent = Image.open(files["parent"])
    txt2img, _ = one(backend, sampler="dpmpp_2m", scheduler="karras")
    light, manifest = one(backend, sampler="dpmpp_2m", scheduler="karras", init_image=files["parent"], denoise=0.5)
    heavy, _ = one(backend, sampler="dpmpp_2m", scheduler="karras", init_image=files["parent"], denoise=0.9)
    assert light.size == parent.size
    assert not same(light, parent) and not same(light, heavy) and not same(light, txt2img)
    assert same(one(backend, sampler="dpmpp_2m", scheduler="karras", init_image=files["parent"], denoise=0.5)[0], light)
    assert manifest["init_image"] == files["parent"] and manifest["denoise"] == 0.5 and manifest["init_image_sha256"]
    assert same(backend.reproduce(manifest, log=lambda _: None), light)
    resized, _ = one(backend, init_image=files["parent"], denoise=0.5, width=40, height=48)
    assert resized.size == (40, 48)


@pytest.mark.slow
def test_openpose_controlnet_follows_the_pose_image(backend, files):
    free, _ = one(backend)
    posed, _ = one(backend, control_image=files["pose"])
    other_pose, _ = one(backend, control_image=files["pose2"])
    strong, _ = one(backend, control_image=files["pose"], control_strength=0.9)
    assert not same(posed, free) and not same(posed, other_pose) and not same(posed, strong)
    # ControlNet on an img2img refinement, batched, reproduced from the second image's manifest.
    jobs = [DiffusersJob(**BASE, seed=seed, control_image=files["pose"], init_image=files["parent"], denoise=0.6,
                         loras=((files["a"], 0.7),)) for seed in (1, 2)]
    results = backend.generate_with_manifests(jobs, log=lambda _: None)
    assert results[1][1]["controlnet_model"] == "tiny" and results[1][1]["batch_seeds"] == [1, 2]
    assert same(backend.reproduce(results[1][1], log=lambda _: None), results[1][0])


@pytest.mark.parametrize("change, error, message", [
    ({"loras": (("{a}", 1.0), ("/no/such/persona.safetensors", 0.8))}, GenerationInputError,
     "job 1: LoRA file /no/such/persona.safetensors not found"),
    ({"loras": (("{garbage}", 1.0),)}, GenerationInputError, r"job 1: LoRA file \S+garbage.safetensors is not a readable safetensors file"),
    ({"init_image": "/no/such/parent.png", "denoise": 0.5}, GenerationInputError, "job 1: init_image /no/such/parent.png not found"),
    ({"control_image": "/no/such/pose.png"}, GenerationInputError, "job 1: control_image /no/such/pose.png not found"),
    ({"sampler": "euler_a"}, GenerationParamError,
     r"job 1: sampler = 'euler_a' is not a name ComfyUI knows \(did you mean euler_ancestral\?\)"),
    ({"sampler": "dpm_fast"}, GenerationParamError, "sampler='dpm_fast' has no diffusers equivalent; the diffusers backend supports euler,"),
    ({"sampler": "ddim", "scheduler": "karras"}, GenerationParamError,
     r"scheduler='karras' has no diffusers equivalent for sampler='ddim' \(DDIMScheduler\); with this sampler use one of normal, sgm_uniform"),
    ({"scheduler": "simple"}, GenerationParamError, "scheduler='simple' has no diffusers equivalent"),
    ({"loras": tuple(("{a}", 0.1) for _ in range(6))}, GenerationParamError, "job 1: 6 LoRAs given, at most 5"),
    ({"denoise": 0.5}, GenerationParamError, r"job 1: denoise=0.5 needs an init_image \(img2img\)"),
    ({"control_image": "{pose}", "control_strength": 1.5}, GenerationParamError, "control_strength = 1.5 is out of range: allowed 0.4 to 0.9"),
    ({"width": 36}, GenerationParamError, r"job 1: width = 36 must be a multiple of 8 \(from 32 to 2048\)"),
])
def test_bad_jobs_are_refused_before_any_model_loads(tmp_path, files, change, error, message):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    names = {**files, "garbage": str(garbage)}

    def fill(value):
        if isinstance(value, str):
            return value.format(**names)
        if isinstance(value, tuple):
            return tuple(fill(item) for item in value)
        return value

    models = tmp_path / "models"
    fresh = DiffusionBackend(models_dir=str(models))
    jobs = [DiffusersJob(**BASE, seed=1), DiffusersJob(**{**BASE, "seed": 2, **{k: fill(v) for k, v in change.items()}})]
    logs: list[str] = []
    with pytest.raises(error, match=message):
        fresh.generate_jobs(jobs, log=logs.append)
    assert logs == [] and not models.exists()  # no image made, no model built or loaded


def test_jobs_equal_but_for_the_seed_share_batches_in_order():
    a = [DiffusersJob(**BASE, seed=seed) for seed in range(5)]
    b = DiffusersJob(**{**BASE, "cfg": 6.0}, seed=0)
    assert plan_batches([a[0], a[1], b, a[2], a[3], a[4]], 2) == [[0, 1], [3, 4], [5], [2]]
    assert plan_batches(a, 8) == [[0, 1, 2, 3, 4]]
    # Paths and lists are normalised, so equal jobs group whatever the caller passed.
    assert DiffusersJob(**BASE, seed=1, loras=[(Path("/x.safetensors"), 1)]).batch_key() == \
        DiffusersJob(**BASE, seed=2, loras=(("/x.safetensors", 1.0),)).batch_key()
    with pytest.raises(GenerationParamError, match="batch_size=0 must be at least 1"):
        plan_batches(a, 0)
