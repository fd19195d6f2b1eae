"""The LoRA trainer on the tiny SD1.5 and SDXL models: settings errors, checkpoints that diffusers
loads back (and whose keys follow ComfyUI's naming rule), resume after kill -9, NaN stop, the
latents cache, bounded progress logs and every training option."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persona_pipeline.training import lora
from persona_pipeline.training.lora import (LoraTrainingParams, TrainingConfigError, TrainingDiverged, read_kohya_dataset,
                                            train_lora)
from persona_pipeline.training.tiny_models import build_tiny_sd, build_tiny_sdxl
from persona_pipeline_tests.conftest import DEMO, REPO
from persona_pipeline_tests.helpers import wait_until

pytestmark = pytest.mark.slow

PHOTOS = sorted((DEMO / "photos").glob("*.jpg"))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


def make_dataset(folder: Path, n: int = 4, flip: bool = False, reg: int = 0) -> Path:
    subset = folder / "5_t3st woman"
    subset.mkdir(parents=True)
    for index, photo in enumerate(PHOTOS[:n]):
        (subset / f"{index:04d}.jpg").write_bytes(photo.read_bytes())
        (subset / f"{index:04d}.txt").write_text(f"t3st woman, photo {index}")
    subsets = [f'[[datasets.subsets]]\nimage_dir = "{subset}"\nnum_repeats = 5\n']
    if reg:
        reg_dir = folder / "reg" / "1_woman"
        reg_dir.mkdir(parents=True)
        for index, photo in enumerate(PHOTOS[-reg:]):
            (reg_dir / f"reg{index}.jpg").write_bytes(photo.read_bytes())
            (reg_dir / f"reg{index}.txt").write_text("photo of a woman")
        subsets.append(f'[[datasets.subsets]]\nimage_dir = "{reg_dir}"\nnum_repeats = 1\nis_reg = true\n')
    (folder / "dataset.toml").write_text(f"[general]\nflip_aug = {str(flip).lower()}\n[[datasets]]\nresolution = 64\n" + "".join(subsets))
    return folder


# -- settings and inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ({"rank": 0}, ["training.rank=0", "[1, 256]"]),
    ({"resolution": 60}, ["training.resolution=60", "multiple of 8"]),
    ({"learning_rate": 0.5}, ["training.learning_rate=0.5", "0.01]"]),
    ({"batch_size": 0}, ["training.batch_size=0", "[1, 64]"]),
    ({"noise_offset": 2.0}, ["training.noise_offset=2.0", "[0, 1]"]),
    ({"min_snr_gamma": -1.0}, ["training.min_snr_gamma=-1.0", "[0, 20]"]),
    ({"optimizer": "sgd"}, ["training.optimizer='sgd'", "adamw"]),
    ({"optimizer": "adamw8bit"}, ["bitsandbytes"]),
    ({"mixed_precision": "fp16"}, ["training.mixed_precision='fp16'", "CUDA"]),
    ({"mixed_precision": "fp8"}, ["training.mixed_precision='fp8'", "bf16"]),
    ({"text_encoder_lr": 0.5}, ["training.text_encoder_lr=0.5", "[0, 0.01]"]),
])
def test_bad_settings_are_refused_naming_field_and_bound(override, words):
    import importlib.util

    if override.get("optimizer") == "adamw8bit" and importlib.util.find_spec("bitsandbytes"):
        pytest.fail("bitsandbytes is installed here; this case checks the error when it is not")
    with pytest.raises(TrainingConfigError) as error:
        LoraTrainingParams(**override).validate("cpu")
    for word in words:
        assert word in str(error.value)


def test_mixed_precision_auto_is_none_on_cpu_and_bf16_is_allowed():
    assert lora.resolve_mixed_precision("auto", "cpu") == "no"
    assert lora.resolve_mixed_precision("bf16", "cpu") == "bf16"


def test_dataset_errors_name_the_file(tmp_path, tiny_sd):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingConfigError, match="no training images"):
        read_kohya_dataset(empty)
    dataset = make_dataset(tmp_path / "ds", n=2)
    (dataset / "5_t3st woman" / "0001.txt").unlink()
    with pytest.raises(TrainingConfigError, match=r"0001\.jpg: caption file 0001\.txt is missing"):
        train_lora(tiny_sd, dataset, tmp_path / "out", LoraTrainingParams(steps=1), log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_wrong_base_model_path_is_a_clear_error(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n=2)
    with pytest.raises(TrainingConfigError, match=r"/no/such/model.*no such folder"):
        train_lora("/no/such/model", dataset, tmp_path / "out", LoraTrainingParams(steps=1), log=lambda m: None)
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    with pytest.raises(TrainingConfigError, match="no model_index.json"):
        train_lora(str(not_a_model), dataset, tmp_path / "out", LoraTrainingParams(steps=1), log=lambda m: None)


# -- checkpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_checkpoints_load_back_with_diffusers_and_follow_comfyui_names(family, tmp_path, tiny_sd, tiny_sdxl):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    base = tiny_sd if family == "sd15" else tiny_sdxl
    dataset = make_dataset(tmp_path / "ds", n=3)
    result = train_lora(base, dataset, tmp_path / "out", LoraTrainingParams(steps=6, checkpoint_every=3),
                        weight_name="p.safetensors", log=lambda m: None)
    assert result.family == family
    assert [step for step, _ in result.checkpoints] == [3, 6]
    assert [p.name for _, p in result.checkpoints] == ["p-step000003.safetensors", "p-step000006.safetensors"]
    saved = load_file(str(result.lora_path))

    pipe = DiffusionPipeline.from_pretrained(base)
    # ComfyUI's rule (comfy/lora.py model_lora_keys_unet): "lora_unet_" + the diffusers module
    # path with dots as underscores, then .lora_down.weight / .lora_up.weight / .alpha.
    modules = {"lora_unet_" + name.replace(".", "_") for name, _ in pipe.unet.named_modules()}
    bases = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in saved}
    assert bases <= modules
    assert {key.split(".", 1)[1] for key in saved} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(float(saved[f"{b}.alpha"]) == 4.0 for b in bases)

    def render():
        return pipe("t3st woman", num_inference_steps=2, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = render()
    pipe.load_lora_weights(str(result.lora_path), adapter_name="persona")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="persona")
    assert len(loaded) == 2 * len(bases)
    for key, tensor in loaded.items():  # every trained matrix arrives unchanged
        module, _, kind = key.rpartition(".lora_")
        ours = saved[f"lora_unet_{module.replace('.', '_')}.lora_{'down' if kind.startswith('A') else 'up'}.weight"]
        assert torch.allclose(tensor.float(), ours)
    assert abs(render() - before).max() > 1e-4  # and it changes what the model draws


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text_encoder_lora_is_saved_in_kohya_names_and_loads_into_diffusers_text_encoders(family, tmp_path, tiny_sd, tiny_sdxl):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from persona_pipeline.training.lora_files import base_model_family, inspect_lora_file

    base = tiny_sd if family == "sd15" else tiny_sdxl
    result = train_lora(base, make_dataset(tmp_path / "ds", n=3), tmp_path / "out",
                        LoraTrainingParams(steps=4, checkpoint_every=2, text_encoder_lr=1e-3),
                        weight_name="p.safetensors", log=lambda m: None)
    saved = load_file(str(result.lora_path))
    pipe = DiffusionPipeline.from_pretrained(base)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    prefixes = ["lora_te_"] if family == "sd15" else ["lora_te1_", "lora_te2_"]
    for prefix, encoder in zip(prefixes, encoders):
        # ComfyUI's rule for CLIP: the prefix + the transformers module path with dots as underscores.
        modules = {prefix + name.replace(".", "_") for name, _ in encoder.named_modules()}
        bases = {key.rsplit(".", 2)[0] for key in saved if key.startswith(prefix) and key.endswith(".weight")}
        assert bases and bases <= modules
        assert all(b.endswith(("_q_proj", "_k_proj", "_v_proj", "_out_proj")) for b in bases)
    assert any(key.startswith("lora_unet_") for key in saved)
    # the import check still tells the base family from the UNet keys alone
    assert inspect_lora_file(result.lora_path, base_model_family(base)).family == base_model_family(base)

    def encode(encoder, tokenizer):
        ids = tokenizer("t3st woman", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids)[0]

    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    before = [encode(e, t) for e, t in zip(encoders, tokenizers)]
    pipe.load_lora_weights(str(result.lora_path), adapter_name="persona")
    for prefix, encoder, tokenizer, was in zip(prefixes, encoders, tokenizers, before):
        loaded = get_peft_model_state_dict(encoder, adapter_name="persona")
        assert len(loaded) == sum(1 for k in saved if k.startswith(prefix) and k.endswith(".weight"))
        for key, tensor in loaded.items():  # every trained text-encoder matrix arrives unchanged
            module, _, kind = key.rpartition(".lora_")
            ours = saved[f"{prefix}{module.replace('.', '_')}.lora_{'down' if kind.startswith('A') else 'up'}.weight"]
            assert torch.allclose(tensor.float(), ours)
        assert (encode(encoder, tokenizer) - was).abs().max() > 1e-5  # the trigger word now reads differently


def test_text_encoder_lora_resumes_to_the_uninterrupted_result(tmp_path, tiny_sd, monkeypatch):
    params = LoraTrainingParams(steps=6, checkpoint_every=3, seed=3, text_encoder_lr=1e-3)
    dataset = make_dataset(tmp_path / "ds", n=3, flip=True)
    reference = train_lora(tiny_sd, dataset, tmp_path / "reference", params, log=lambda m: None)

    calls = {"n": 0}
    original = lora.predict_noise

    def crash_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(lora, "predict_noise", crash_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train_lora(tiny_sd, dataset, tmp_path / "crashed", params, log=lambda m: None)
    monkeypatch.setattr(lora, "predict_noise", original)
    resumed = train_lora(tiny_sd, dataset, tmp_path / "crashed", params, log=lambda m: None)
    assert resumed.resumed_from == 3
    assert resumed.losses == reference.losses  # the text encoders' LoRA and optimiser state came back too
    ours, theirs = load_file(str(resumed.lora_path)), load_file(str(reference.lora_path))
    assert ours.keys() == theirs.keys() and any(k.startswith("lora_te_") for k in ours)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


def test_caption_options_vary_the_captions_each_step_and_resume_to_the_uninterrupted_result(tmp_path, tiny_sd, monkeypatch):
    seen: list[str] = []
    original = lora.text_conditioning

    def recording(model, encoders, captions, device):
        seen.extend(captions)
        return original(model, encoders, captions, device)

    monkeypatch.setattr(lora, "text_conditioning", recording)
    params = LoraTrainingParams(steps=6, checkpoint_every=3, seed=3, shuffle_caption=True, caption_tag_dropout_rate=0.5)
    dataset = make_dataset(tmp_path / "ds", n=3)  # captions "t3st woman, photo N"
    reference = train_lora(tiny_sd, dataset, tmp_path / "reference", params, log=lambda m: None)
    # The frozen encoder ran on this run's captions: the trigger tag kept, the other sometimes dropped,
    # each caption string encoded once.
    assert "t3st woman" in seen and any(c.startswith("t3st woman, photo ") for c in seen)
    assert all(c.startswith("t3st woman") for c in seen) and len(seen) == len(set(seen))
    seen.clear()
    plain = train_lora(tiny_sd, dataset, tmp_path / "plain", LoraTrainingParams(steps=6, checkpoint_every=3, seed=3),
                       log=lambda m: None)
    assert seen == [] and plain.losses != reference.losses  # without options: the cached embeddings, as before

    calls = {"n": 0}
    predict = lora.predict_noise

    def crash_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")
        return predict(*args, **kwargs)

    monkeypatch.setattr(lora, "predict_noise", crash_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train_lora(tiny_sd, dataset, tmp_path / "crashed", params, log=lambda m: None)
    monkeypatch.setattr(lora, "predict_noise", predict)
    resumed = train_lora(tiny_sd, dataset, tmp_path / "crashed", params, log=lambda m: None)
    assert resumed.resumed_from == 3 and resumed.losses == reference.losses  # the caption draws came back with the RNG


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pivotal_tuning_trains_the_trigger_embedding_alone_bundles_it_and_resumes(family, tmp_path, tiny_sd, tiny_sdxl, monkeypatch):
    from transformers import CLIPTextModel, CLIPTokenizer

    base = tiny_sd if family == "sd15" else tiny_sdxl
    params = LoraTrainingParams(steps=6, checkpoint_every=3, seed=3, trigger_embedding_lr=1e-2)
    dataset = make_dataset(tmp_path / "ds", n=3)
    reference = train_lora(base, dataset, tmp_path / "reference", params, log=lambda m: None)
    saved = load_file(str(reference.lora_path))
    names = ["string_to_param.*"] if family == "sd15" else ["clip_l", "clip_g"]
    assert {k for k in saved if k.startswith("bundle_emb.")} == {f"bundle_emb.t3st.{n}" for n in names}
    assert any(k.startswith("lora_unet_") for k in saved) and not any(k.startswith("lora_te") for k in saved)
    for name, sub in zip(names, ["", "_2"]):
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder=f"tokenizer{sub}")
        encoder = CLIPTextModel.from_pretrained(base, subfolder=f"text_encoder{sub}")
        pieces = tokenizer("t3st", add_special_tokens=False).input_ids
        start = encoder.get_input_embeddings().weight[pieces].mean(dim=0)
        row = saved[f"bundle_emb.t3st.{name}"]
        assert row.shape == (1, start.shape[0]) and (row[0] - start).abs().max() > 1e-3  # it moved from its start

    calls = {"n": 0}
    predict = lora.predict_noise

    def crash_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")
        return predict(*args, **kwargs)

    monkeypatch.setattr(lora, "predict_noise", crash_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train_lora(base, dataset, tmp_path / "crashed", params, log=lambda m: None)
    monkeypatch.setattr(lora, "predict_noise", predict)
    resumed = train_lora(base, dataset, tmp_path / "crashed", params, log=lambda m: None)
    assert resumed.resumed_from == 3 and resumed.losses == reference.losses
    ours = load_file(str(resumed.lora_path))
    assert ours.keys() == saved.keys() and all(torch.allclose(ours[k], saved[k], atol=1e-6) for k in ours)


def test_the_generation_runtime_loads_a_bundled_trigger_embedding_with_its_lora_and_drops_it_after(tmp_path, tiny_sd):
    from persona_pipeline.resources.diffusion_runtime import _adapter_name, cached_sha256, shared_runtime

    result = train_lora(tiny_sd, make_dataset(tmp_path / "ds", n=3), tmp_path / "out",
                        LoraTrainingParams(steps=2, trigger_embedding_lr=1e-2), log=lambda m: None)
    row = load_file(str(result.lora_path))["bundle_emb.t3st.string_to_param.*"][0]
    runtime = shared_runtime(tiny_sd, "cpu")
    pipe = runtime.pipe
    size, before = len(pipe.tokenizer), pipe.tokenizer.tokenize("t3st woman")
    with runtime.lock:
        runtime.load_adapters([str(result.lora_path)], tiny_sd)
        runtime.activate([_adapter_name(cached_sha256(str(result.lora_path)))], [1.0])
        assert pipe.tokenizer.tokenize("t3st woman")[0] == "t3st"  # one token, with the trained row
        token = pipe.tokenizer.convert_tokens_to_ids("t3st")
        assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[token], row)
        runtime.activate([], [])  # no LoRA: the trigger word reads as plain text again
        assert len(pipe.tokenizer) == size and pipe.tokenizer.tokenize("t3st woman") == before
        assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == size


def _losses_of(tmp_path, base, name, **kwargs):
    params = LoraTrainingParams(steps=8, checkpoint_every=4, seed=3, **kwargs)
    return train_lora(base, make_dataset(tmp_path / f"ds-{name}", n=3, flip=True), tmp_path / name, params, log=lambda m: None)


def test_kill_minus_9_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_sd):
    reference = _losses_of(tmp_path, tiny_sd, "reference")

    dataset = make_dataset(tmp_path / "ds-killed", n=3, flip=True)
    out = tmp_path / "killed"
    # A child process trains slowly (a sleep per step, through the log hook) and is killed with
    # SIGKILL as soon as its step-4 state is on disk.
    script = textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(REPO)!r})
        from persona_pipeline.training.lora import LoraTrainingParams, train_lora
        import persona_pipeline.training.lora as lora
        original = lora.predict_noise
        def slow(*args, **kwargs):
            time.sleep(0.3)
            return original(*args, **kwargs)
        lora.predict_noise = slow
        train_lora({tiny_sd!r}, {str(dataset)!r}, {str(out)!r}, LoraTrainingParams(steps=8, checkpoint_every=4, seed=3),
                   log=lambda m: print(m, flush=True))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def step_4_written() -> bool:
        assert child.poll() is None, child.stdout.read()
        return (out / "training_state.pt").is_file()

    wait_until(step_4_written, "the child's step-4 state", timeout_s=240)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "lora-step000004.safetensors").is_file()
    assert not (out / "checkpoints" / "lora-step000008.safetensors").exists()

    messages = []
    resumed = train_lora(tiny_sd, dataset, out, LoraTrainingParams(steps=8, checkpoint_every=4, seed=3), log=messages.append)
    assert resumed.resumed_from == 4
    assert any("resuming from step 4/8" in m for m in messages)
    assert any("using cached latents" in m for m in messages)  # the encoders did not run again
    assert resumed.losses == reference.losses
    assert load_file(str(resumed.lora_path)).keys() == load_file(str(reference.lora_path)).keys()
    for key, tensor in load_file(str(resumed.lora_path)).items():
        assert torch.allclose(tensor, load_file(str(reference.lora_path))[key], atol=1e-6), key


def test_resume_with_changed_settings_is_refused(tmp_path, tiny_sd):
    dataset = make_dataset(tmp_path / "ds", n=2)
    train_lora(tiny_sd, dataset, tmp_path / "out", LoraTrainingParams(steps=2, checkpoint_every=1), log=lambda m: None)
    with pytest.raises(TrainingConfigError, match=r"different settings \(rank\)"):
        train_lora(tiny_sd, dataset, tmp_path / "out", LoraTrainingParams(steps=2, rank=8, checkpoint_every=1), log=lambda m: None)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_sd, monkeypatch):
    original = lora.predict_noise
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        prediction = original(*args, **kwargs)
        return prediction * float("nan") if calls["n"] == 7 else prediction

    monkeypatch.setattr(lora, "predict_noise", poisoned)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged) as error:
        train_lora(tiny_sd, make_dataset(tmp_path / "ds", n=2), out, LoraTrainingParams(steps=20, checkpoint_every=3),
                   log=lambda m: None)
    message = str(error.value)
    assert "nan at step 7/20" in message and "lora-step000006.safetensors" in message
    assert error.value.last_checkpoint == out / "checkpoints" / "lora-step000006.safetensors"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["lora-step000003.safetensors", "lora-step000006.safetensors"]
    assert all(torch.isfinite(t).all() for t in load_file(str(error.value.last_checkpoint)).values())


# -- speed features, logs and options --------------------------------------------------------------

def test_latents_are_cached_once_per_dataset_version(tmp_path, tiny_sd, monkeypatch):
    dataset = make_dataset(tmp_path / "ds", n=3, flip=True)
    first: list[str] = []
    train_lora(tiny_sd, dataset, tmp_path / "a", LoraTrainingParams(steps=2), log=first.append)
    cache_files = list((dataset / "cache").glob("latents-*.safetensors"))
    assert len(cache_files) == 1
    cached = load_file(str(cache_files[0]))
    assert cached["mean"].shape[0] == 3 and cached["mean_flipped"].shape == cached["mean"].shape
    assert not torch.allclose(cached["mean"], cached["mean_flipped"])  # the mirrored images were encoded too

    from diffusers import AutoencoderKL

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE ran although the cache was valid")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    second: list[str] = []
    train_lora(tiny_sd, dataset, tmp_path / "b", LoraTrainingParams(steps=2, rank=8), log=second.append)
    assert any("using cached latents" in m for m in second)


def test_caching_pass_encodes_the_captions_in_batches(tmp_path, tiny_sd, monkeypatch):
    """One text-encoder call for the dataset's captions, not one per caption (issue 25: per-caption calls
    made our caching pass slower than the kohya-style loop's), with each item's conditioning unchanged."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from persona_pipeline.training.families.stable_diffusion import load_frozen_model_with_lora, text_conditioning

    batches: list[int] = []
    forward = CLIPTextModel.forward
    monkeypatch.setattr(CLIPTextModel, "forward", lambda self, ids, *a, **k: batches.append(len(ids)) or forward(self, ids, *a, **k))
    dataset = make_dataset(tmp_path / "ds", n=3)
    train_lora(tiny_sd, dataset, tmp_path / "out", LoraTrainingParams(steps=1), log=lambda m: None)
    assert batches == [3]
    cached = load_file(str(next((dataset / "cache").glob("latents-*.safetensors"))))
    model = load_frozen_model_with_lora(tiny_sd, rank=4, alpha=4.0)
    with torch.no_grad():
        one_by_one = torch.cat([text_conditioning(model, model.text_encoders, [f"t3st woman, photo {i}"], "cpu")["hidden"]
                                for i in range(3)])
    assert torch.allclose(cached["hidden"], one_by_one, atol=1e-5)


def test_caption_conditioning_per_family(tiny_sd, tiny_sdxl):
    """SD1.5 is conditioned on the text encoder's hidden state alone; SDXL also on the second
    encoder's pooled projection and the image's original size, crop and target size."""
    from persona_pipeline.training.families.stable_diffusion import caption_conditioning, load_frozen_model_with_lora

    for base, names in ((tiny_sd, ["hidden"]), (tiny_sdxl, ["hidden", "pooled", "time_ids"])):
        model = load_frozen_model_with_lora(base, rank=4, alpha=4.0)
        with torch.no_grad():
            conditioning = caption_conditioning(model, model.text_encoders, "t3st woman", "cpu",
                                                original_size=(96, 80), crop=(16, 0), resolution=64)
        assert list(conditioning) == names
        assert conditioning["hidden"].shape[-1] == model.unet.config.cross_attention_dim
    assert conditioning["time_ids"].tolist() == [[96, 80, 16, 0, 64, 64]]
    assert conditioning["pooled"].shape[0] == 1


def test_progress_lines_are_bounded_and_carry_rate_and_eta(tmp_path, tiny_sd):
    messages: list[str] = []
    train_lora(tiny_sd, make_dataset(tmp_path / "ds", n=2), tmp_path / "out", LoraTrainingParams(steps=25),
               log=messages.append, log_interval_s=3600)
    progress = [m for m in messages if m.startswith("lora step")]
    assert [m.split()[2] for m in progress] == ["1/25", "25/25"]  # first and last only, at this interval
    assert all(" loss " in m and " it/s " in m and " ETA " in m for m in progress)


def test_every_option_together_trains_finitely(tmp_path, tiny_sd):
    params = LoraTrainingParams(steps=4, batch_size=2, mixed_precision="bf16", gradient_checkpointing=True,
                                min_snr_gamma=5.0, noise_offset=0.1, prior_loss_weight=0.5, checkpoint_every=2)
    result = train_lora(tiny_sd, make_dataset(tmp_path / "ds", n=3, flip=True, reg=2), tmp_path / "out", params, log=lambda m: None)
    assert result.mixed_precision == "bf16"
    assert result.image_count == 3  # the class images are not counted as training images
    assert len(result.losses) == 4 and all(loss == loss and loss < 1e3 for loss in result.losses)
    assert [s for s, _ in result.checkpoints] == [2, 4]
    dataset = read_kohya_dataset(tmp_path / "ds")
    assert dataset.flip and sum(item.is_reg for item in dataset.items) == 2
