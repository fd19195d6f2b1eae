"""FLUX.1 on tiny local models: the model-family registry, the tiny FLUX pipelines, LoRA training
(loss, resume, NaN stop, caches), LoRA files that diffusers loads and ComfyUI's FLUX key map
names, and the bad inputs of issue 22 refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from persona_pipeline.training.families import detect_family, families, family_named, flux
from persona_pipeline.training.lora import LoraTrainingParams, TrainingConfigError, TrainingDiverged, train_lora
from persona_pipeline.training.lora_files import LoraFileError, base_model_family, inspect_lora_file
from persona_pipeline.training.tiny_models import (FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR, build_tiny_flux,
                                                   build_tiny_sd, build_tiny_sdxl)
from persona_pipeline_tests.test_training import make_dataset

# Short T5 sequences keep the tiny runs fast; everything else is the loop as it runs at full size.
FAST = dict(max_sequence_length=32, batch_size=2, resolution=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {"flux": str(build_tiny_flux(root / "tiny-flux")),
            "schnell": str(build_tiny_flux(root / "tiny-flux-schnell", guidance=False)),
            "sd15": str(build_tiny_sd(root / "tiny-sd")), "sdxl": str(build_tiny_sdxl(root / "tiny-sdxl"))}


def quiet(message: str) -> None:
    pass


def _image(pipe, prompt: str = "t3st woman"):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images[0]


# -- registry and tiny models --------------------------------------------------------------------

@pytest.mark.slow  # builds the tiny models (module fixture)
def test_registry_detects_each_family_from_model_index(models):
    assert [detect_family(models[name]).name for name in ("sd15", "sdxl", "flux", "schnell")] == ["sd15", "sdxl", "flux", "flux"]
    assert {f.name for f in families()} == {"sd15", "sdxl", "flux"}
    assert family_named("flux").objective == "flow_matching" and family_named("sd15").objective == "noise"
    assert family_named("flux").text_encoders == ("text_encoder", "text_encoder_2")
    with pytest.raises(TrainingConfigError, match="model family 'qwen' is not one of sdxl, sd15, flux"):
        family_named("qwen")
    workflows = Path(__file__).resolve().parents[1] / "workflows"
    for family in families():  # every ComfyUI template a family names is shipped
        assert all((workflows / f"{name}.json").is_file() for name in family.comfyui_templates), family.name


def test_unsupported_pipeline_is_refused_naming_it(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(TrainingConfigError, match=r"is a QwenImagePipeline; supported families: .*FLUX\.1"):
        detect_family(str(tmp_path))


@pytest.mark.slow
def test_tiny_flux_builds_deterministically_and_loads_in_flux_pipeline(models, tmp_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(models["flux"])
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR)
    assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
    assert type(pipe.tokenizer_2).__name__.startswith("T5Tokenizer")
    assert pipe.tokenizer_2("a b").input_ids[-1] == pipe.tokenizer_2.eos_token_id == 1
    assert _image(pipe).shape == (3, 64, 64)
    schnell = FluxPipeline.from_pretrained(models["schnell"])
    assert not schnell.transformer.config.guidance_embeds
    again = build_tiny_flux(tmp_path / "again")
    for part in ("transformer", "vae", "text_encoder_2"):
        first = load_file(next((Path(models["flux"]) / part).glob("*.safetensors")))
        second = load_file(next((again / part).glob("*.safetensors")))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# -- training ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_loss_falls_and_the_lora_loads_in_diffusers_under_comfyui_flux_names(models, tmp_path):
    from diffusers import FluxPipeline

    dataset = make_dataset(tmp_path / "ds", n=1)
    params = LoraTrainingParams(steps=60, rank=4, alpha=2.0, learning_rate=1e-2, checkpoint_every=30,
                                **{**FAST, "batch_size": 4})
    result = train_lora(models["flux"], dataset, tmp_path / "out", params, weight_name="p.safetensors", log=quiet)
    assert result.family == "flux" and [s for s, _ in result.checkpoints] == [30, 60]
    first, last = sum(result.losses[:15]) / 15, sum(result.losses[-15:]) / 15
    assert last < 0.95 * first, (first, last)

    saved = load_file(str(result.lora_path))
    pipe = FluxPipeline.from_pretrained(models["flux"])
    # ComfyUI (comfy/lora.py model_lora_keys_unet, Flux branch): "transformer." + a diffusers module
    # name from flux_to_diffusers; load_lora reads .lora_A/.lora_B and .alpha under it.
    modules = {"transformer." + name for name, _ in pipe.transformer.named_modules()}
    assert {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in saved} <= modules
    assert flux.unknown_lora_key(list(saved)) is None
    assert any(".single_transformer_blocks." in k for k in saved) and any(k.startswith("transformer.transformer_blocks.") for k in saved)
    with safe_open(str(result.lora_path), "pt") as handle:
        assert handle.metadata()["flux_variant"] == "dev" and handle.metadata()["guidance"] == "1.0"

    before = _image(pipe)
    pipe.load_lora_weights(str(result.lora_path))
    assert float(pipe.transformer.transformer_blocks[0].attn.to_q.scaling["default_0"]) == pytest.approx(0.5)  # alpha / rank
    assert (before - _image(pipe)).abs().max() > 1e-4  # the LoRA changes what is drawn
    info = inspect_lora_file(result.lora_path, base_model_family(models["flux"]), base_model=models["flux"])
    assert (info.family, info.key_format, info.rank) == ("flux", "diffusers", 4)


@pytest.mark.slow
def test_schnell_trains_without_guidance(models, tmp_path):
    dataset = make_dataset(tmp_path / "ds", n=2, flip=True)
    result = train_lora(models["schnell"], dataset, tmp_path / "out", LoraTrainingParams(steps=3, **FAST), log=quiet)
    with safe_open(str(result.lora_path), "pt") as handle:
        assert handle.metadata()["flux_variant"] == "schnell" and handle.metadata()["guidance"] == "none"
    assert all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_result(models, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "ds", n=2, flip=True)
    params = LoraTrainingParams(steps=6, checkpoint_every=3, **FAST)
    whole = train_lora(models["flux"], dataset, tmp_path / "whole", params, log=quiet)

    calls = {"n": 0}
    real = flux.predict_velocity

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as a kill between two checkpoints
        return real(*args, **kwargs)

    monkeypatch.setattr(flux, "predict_velocity", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_lora(models["flux"], dataset, tmp_path / "cut", params, log=quiet)
    monkeypatch.setattr(flux, "predict_velocity", real)
    lines: list[str] = []
    resumed = train_lora(models["flux"], dataset, tmp_path / "cut", params, log=lines.append)
    assert resumed.resumed_from == 3 and any("resuming from step 3/6" in line for line in lines)
    assert resumed.losses == whole.losses
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nan_loss_stops_before_the_update_and_keeps_checkpoints(models, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "ds", n=2)
    calls = {"n": 0}
    real = flux.predict_velocity

    def nan_at_step_5(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(flux, "predict_velocity", nan_at_step_5)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5/8.*step000004") as error:
        train_lora(models["flux"], dataset, tmp_path / "out", LoraTrainingParams(steps=8, checkpoint_every=2, **FAST),
                   weight_name="p.safetensors", log=quiet)
    assert error.value.last_checkpoint.name == "p-step000004.safetensors"
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["p-step000002.safetensors",
                                                                                    "p-step000004.safetensors"]


@pytest.mark.slow
def test_text_embeddings_are_cached_once_and_another_tokenizers_cache_is_refused(models, tmp_path):
    dataset = make_dataset(tmp_path / "ds", n=2)
    lines: list[str] = []
    train_lora(models["flux"], dataset, tmp_path / "a", LoraTrainingParams(steps=1, **FAST), log=lines.append)
    train_lora(models["flux"], dataset, tmp_path / "b", LoraTrainingParams(steps=1, **FAST), log=lines.append)
    assert sum("cached text embeddings for 2 captions" in line for line in lines) == 1
    assert sum("using cached text embeddings" in line for line in lines) == 1
    assert sum("using cached latents" in line for line in lines) == 1

    [text_cache] = (dataset / "cache").glob("flux-text-*.safetensors")
    tensors = load_file(str(text_cache))
    save_file(tensors, str(text_cache), metadata={"t5_tokenizer": "google/t5-v1_1-xxl#0123456789abcdef"})
    kept = text_cache.read_bytes()
    with pytest.raises(TrainingConfigError, match=r"flux-text-.*tokenizer 'google/t5-v1_1-xxl#0123456789abcdef'.*tokenizes with"):
        train_lora(models["flux"], dataset, tmp_path / "c", LoraTrainingParams(steps=1, **FAST), log=quiet)
    assert text_cache.read_bytes() == kept  # refused, not overwritten


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.slow  # builds the tiny models (module fixture)
def test_guidance_and_quantisation_settings_are_checked_by_name(models, tmp_path):
    with pytest.raises(TrainingConfigError, match=r"training.guidance=12.0 is out of range \[1.0, 10.0\]"):
        LoraTrainingParams(guidance=12.0).validate("cpu")
    with pytest.raises(TrainingConfigError, match=r"training.quantize_base='int8' needs a CUDA device; the device is 'cpu'"):
        LoraTrainingParams(quantize_base="int8").validate("cpu")
    with pytest.raises(TrainingConfigError, match=r"training.quantize_base='int4' must be one of none, int8, fp8"):
        LoraTrainingParams(quantize_base="int4").validate("cpu")
    dataset = make_dataset(tmp_path / "ds", n=2)
    with pytest.raises(TrainingConfigError, match=r"training.guidance=3.5: FLUX.1 \[schnell\] has no guidance input"):
        train_lora(models["schnell"], dataset, tmp_path / "out", LoraTrainingParams(guidance=3.5, **FAST), log=quiet)
    with pytest.raises(TrainingConfigError, match=r"training.quantize_base='fp8' needs a CUDA device"):
        train_lora(models["flux"], dataset, tmp_path / "out", LoraTrainingParams(quantize_base="fp8", **FAST), log=quiet)
    with pytest.raises(TrainingConfigError, match=r"apply to FLUX.1 only; the base model .* is sd15"):
        train_lora(models["sd15"], dataset, tmp_path / "out", LoraTrainingParams(guidance=3.5), log=quiet)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _flux_lora(path: Path, extra_key: str | None = None) -> Path:
    tensors = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
               "transformer.single_transformer_blocks.0.attn.to_q.alpha": torch.tensor(4.0)}
    if extra_key:
        tensors[extra_key] = torch.zeros(4, 32)
    save_file(tensors, str(path))
    return path


@pytest.mark.slow  # builds the tiny models (module fixture)
def test_lora_of_the_other_family_is_refused_naming_both(models, tmp_path):
    flux_lora = _flux_lora(tmp_path / "face.safetensors")
    assert base_model_family(models["flux"]) == "flux"
    with pytest.raises(LoraFileError, match=r"^face.safetensors: LoRA is for flux \(its keys name FLUX.1 transformer blocks\) "
                                            r"but the base model .* is sdxl$"):
        inspect_lora_file(flux_lora, "sdxl", base_model=models["sdxl"])
    sd_tensors = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
                  "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)}
    save_file(sd_tensors, str(tmp_path / "xl.safetensors"))
    with pytest.raises(LoraFileError, match=r"^xl.safetensors: LoRA is for sdxl \(cross-attention dim 2048\) but the base model .* is flux$"):
        inspect_lora_file(tmp_path / "xl.safetensors", "flux", base_model=models["flux"])


def test_flux_lora_with_an_unknown_key_is_refused_naming_it(tmp_path):
    odd = _flux_lora(tmp_path / "odd.safetensors", "transformer.single_transformer_blocks.0.attn.to_gate.lora_A.weight")
    with pytest.raises(LoraFileError, match=r"^odd.safetensors: FLUX.1 LoRA key "
                                            r"'transformer.single_transformer_blocks.0.attn.to_gate.lora_A.weight' names no"):
        inspect_lora_file(odd, None)
    assert inspect_lora_file(_flux_lora(tmp_path / "ok.safetensors"), None).family == "flux"


def test_a_quantised_base_names_the_library_it_needs_when_missing():
    import importlib.util

    import torch as _torch

    for quantize, library in (("int8", "bitsandbytes"), ("fp8", "torchao")):
        if importlib.util.find_spec(library):
            continue  # installed here: the CUDA path itself is bench/gpu_flux.py's to measure
        with pytest.raises(TrainingConfigError, match=rf"training.quantize_base='{quantize}' needs {library} \(pip install {library}\)"):
            flux._quantization_config(quantize, _torch.bfloat16)
    assert flux._quantization_config("none", _torch.bfloat16) is None
    for family in families():  # every family's preset is a valid setting on its own
        family.preset.validate()
