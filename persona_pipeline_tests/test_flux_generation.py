"""The diffusers backend on the tiny FLUX.1 model: a chain of weighted FLUX LoRAs, exact reproduction
from the manifest, img2img, the tiny-flux training preset with checkpoint renders, and bad jobs
refused by name before anything is drawn (samplers FLUX has no equivalent of, guidance out of
range, a pose ControlNet, a LoRA of the other family)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from persona_pipeline.resources.diffusion import (DiffusersJob, DiffusionBackend, GenerationInputError, GenerationParamError)
from persona_pipeline.training.families import flux
from persona_pipeline.training.flux_lora import save_flux_checkpoint
from persona_pipeline_tests.conftest import DEMO
from persona_pipeline_tests.test_diffusion_generation import random_kohya_lora
from persona_pipeline_tests.test_training import make_dataset

pytestmark = pytest.mark.slow

JOB = dict(prompt="t3st woman, portrait", negative_prompt="blurry", steps=2, cfg=3.5, sampler="euler", scheduler="simple",
           width=64, height=64)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def random_flux_lora(base_model: str, path: Path, seed: int) -> Path:
    """A FLUX LoRA in the trainer's own key format with seeded random matrices (a fresh adapter's
    B matrices are zero and would change nothing)."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    transformer = FluxTransformer2DModel.from_pretrained(base_model, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=flux.LORA_TARGET_MODULES))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    save_flux_checkpoint(transformer, 4.0, path, {})
    return path


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> DiffusionBackend:
    return DiffusionBackend(base_model="tiny-flux", models_dir=str(tmp_path_factory.mktemp("models")), batch_size=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory, backend) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    parent = folder / "parent.png"
    with Image.open(sorted((DEMO / "photos").glob("*.jpg"))[0]) as photo:
        photo.convert("RGB").resize((64, 64)).save(parent)
    sd_models = DiffusionBackend(models_dir=str(folder / "sd-models"))
    return {"a": str(random_flux_lora(backend.base_model_path(), folder / "a.safetensors", 1)),
            "b": str(random_flux_lora(backend.base_model_path(), folder / "b.safetensors", 2)),
            "sd": str(random_kohya_lora(DiffusionBackend(base_model="tiny", models_dir=str(folder / "sd-models")).base_model_path(),
                                        folder / "sd.safetensors", 3)),
            "parent": str(parent), "sd_models": sd_models.models_dir}


def test_lora_chain_changes_the_image_and_the_manifest_reproduces_it(backend, files):
    assert backend.preset_name() == "tiny-flux" and backend.is_flow_matching
    jobs = [DiffusersJob(**JOB, seed=seed, loras=((files["a"], 0.8), (files["b"], 0.5))) for seed in (1, 2)]
    results = backend.generate_with_manifests(jobs, log=lambda _: None)
    plain = backend.generate_jobs([DiffusersJob(**JOB, seed=1)], log=lambda _: None)[0]
    one_lora = backend.generate_jobs([DiffusersJob(**JOB, seed=1, loras=((files["a"], 0.8),))], log=lambda _: None)[0]
    image, manifest = results[0]
    assert image.size == (64, 64)
    assert np.abs(pixels(image) - pixels(plain)).max() > 0 and np.abs(pixels(image) - pixels(one_lora)).max() > 0
    assert [lora["weight"] for lora in manifest["loras"]] == [0.8, 0.5] and manifest["batch_seeds"] == [1, 2]
    assert np.array_equal(pixels(backend.reproduce(manifest, log=lambda _: None)), pixels(image))


def test_img2img_from_a_parent(backend, files):
    image, manifest = backend.generate_with_manifests([DiffusersJob(**{**JOB, "denoise": 0.6}, seed=3, init_image=files["parent"])],
                                                      log=lambda _: None)[0]
    assert image.size == (64, 64) and manifest["init_image_sha256"]


@pytest.mark.parametrize("changes, words", [
    ({"sampler": "dpmpp_2m"}, ["sampler='dpmpp_2m'", "FLUX.1", "euler"]),
    ({"scheduler": "karras"}, ["scheduler='karras'", "simple or normal"]),
    ({"cfg": 12.0}, ["cfg=12.0", "FluxGuidance", "1 to 10"]),
])
def test_bad_flux_jobs_are_refused_by_name(backend, changes, words):
    with pytest.raises(GenerationParamError) as error:
        backend.generate_jobs([DiffusersJob(**{**JOB, **changes}, seed=1)], log=lambda _: None)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_pose_controlnet_is_refused_on_flux(backend, files):
    with pytest.raises(GenerationParamError, match="control_image: the pose ControlNet is for Stable Diffusion"):
        backend.generate_jobs([DiffusersJob(**JOB, seed=1, control_image=files["parent"])], log=lambda _: None)


def test_lora_of_the_other_family_is_refused_naming_both(backend, files):
    with pytest.raises(GenerationInputError, match=r"sd.safetensors: LoRA is for tiny-sd \(cross-attention dim 32\) "
                                                   r"but the base model tiny-flux is flux"):
        backend.generate_jobs([DiffusersJob(**JOB, seed=1, loras=((files["sd"], 1.0),))], log=lambda _: None)
    sd_backend = DiffusionBackend(base_model="tiny", models_dir=files["sd_models"])
    sd_job = DiffusersJob(**{**JOB, "sampler": "euler", "scheduler": "normal", "width": 32, "height": 32}, seed=1,
                          loras=((files["a"], 1.0),))
    with pytest.raises(GenerationInputError, match=r"a.safetensors: LoRA is for flux \(its keys name FLUX.1 transformer blocks\) "
                                                   r"but the base model tiny is tiny-sd"):
        sd_backend.generate_jobs([sd_job], log=lambda _: None)


def test_tiny_flux_preset_trains_and_renders_its_checkpoints(backend, tmp_path):
    params = backend.training_params({"steps": 4, "checkpoint_every": 2})
    assert (params.max_sequence_length, params.resolution) == (32, 64)
    result = backend.train(make_dataset(tmp_path / "ds", n=2), tmp_path / "out", params, "p.safetensors", log=lambda _: None)
    assert result.family == "flux" and len(result.checkpoints) == 2
    renders = backend.render_checkpoints([path for _, path in result.checkpoints], ["t3st woman"], [5])
    assert [len(images) for images in renders] == [1, 1] and renders[0][0].size == (64, 64)
