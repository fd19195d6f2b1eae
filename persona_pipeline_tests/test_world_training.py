"""`persona-pipeline world train` on tiny settings: it learns (held-out losses fall with a fixed
seed), its folder loads with diffusers and open_clip offline, and the manifest refuses changed,
missing or unreadable weights with the file, both hashes and the rebuild command."""

from __future__ import annotations

import json
import shutil

import pytest

from persona_pipeline.fileio import sha256_file
from persona_pipeline.world.model_manifest import WorldWeightsError, verify_folder, write_manifest

TINY_COMMAND = "persona-pipeline world train --out trained --steps 12 --vae-steps 4 --clip-steps 12 --batch-size 8"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the module (about 20 s on the 2-core machine)."""
    import torch

    from persona_pipeline.cli import main

    out = tmp_path_factory.mktemp("world") / "trained"
    threads = torch.get_num_threads()
    try:
        code = main(["world", "train", "--out", str(out), "--steps", "12", "--vae-steps", "4", "--clip-steps", "12",
                     "--batch-size", "8", "--log-every", "4", "--command-line", TINY_COMMAND])
    finally:
        torch.set_num_threads(threads)
    assert code in (0, None)
    return out


@pytest.mark.slow
def test_training_learns_and_records_it(trained, capsys):
    manifest = json.loads((trained / "manifest.json").read_text())
    m = manifest["metrics"]
    # Fixed batch, fixed noise and timesteps: the fall is the model's, not the sampling's.
    assert m["unet_eval_loss_after"] < 0.9 * m["unet_eval_loss_before"]
    assert m["vae_eval_mse_after"] < m["vae_eval_mse_before"]
    assert m["clip_loss_history"][-1][1] < m["clip_loss_history"][0][1]
    assert manifest["seed"] == 0 and manifest["steps"] == {"vae": 4, "unet": 12, "clip": 12}
    assert manifest["command"] == TINY_COMMAND and len(manifest["data_hash"]) == 64
    assert {"sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
            "sd/text_encoder/model.safetensors", "sd/model_index.json", "clip/open_clip_model.safetensors",
            "clip/open_clip_config.json"} <= set(manifest["files"])


@pytest.mark.slow
def test_sd_folder_loads_offline_and_draws_the_requested_size(trained):
    import torch
    from diffusers import StableDiffusionPipeline

    from persona_pipeline.world.world_models import load_world_sd

    pipe = load_world_sd(trained)
    image = pipe("woman, beach", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # The plain diffusers call works too: the folder is an ordinary SD layout.
    plain = StableDiffusionPipeline.from_pretrained(trained / "sd", local_files_only=True)
    # Every world word is one token, so a whole caption fits CLIP's 77 tokens with its scene and light.
    tokens = plain.tokenizer.tokenize("woman, full-body shot, arms raised, ginger pigtails, snowy landscape")
    assert "pigtails</w>" in tokens and "snowy</w>" in tokens and "landscape</w>" in tokens


@pytest.mark.slow
def test_clip_folder_loads_with_open_clip(trained):
    import open_clip
    import torch
    from PIL import Image

    from persona_pipeline.world.world_models import load_world_clip

    model, preprocess, tokenizer = load_world_clip(trained)
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.new("RGB", (64, 64), (200, 30, 30))).unsqueeze(0))
        text = model.encode_text(tokenizer(["woman, beach", "woman, forest"]))
    assert image.shape == (1, 64) and text.shape == (2, 64)
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{trained / 'clip'}")
    assert plain.visual.conv1.weight.shape == model.visual.conv1.weight.shape


@pytest.mark.slow
def test_loader_refuses_a_changed_weight_file_naming_both_hashes(trained, tmp_path):
    from persona_pipeline.world.world_models import load_world_sd

    copy = shutil.copytree(trained, tmp_path / "copy")
    weights = copy / "sd/unet/diffusion_pytorch_model.safetensors"
    recorded = json.loads((copy / "manifest.json").read_text())["files"]["sd/unet/diffusion_pytorch_model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WorldWeightsError) as error:
        load_world_sd(copy)
    assert recorded in str(error.value) and sha256_file(weights) in str(error.value)
    assert TINY_COMMAND in str(error.value)


@pytest.mark.slow
def test_loader_names_a_missing_weight_file_and_the_command(trained, tmp_path):
    from persona_pipeline.world.world_models import load_world_clip

    copy = shutil.copytree(trained, tmp_path / "copy")
    (copy / "clip/open_clip_model.safetensors").unlink()
    with pytest.raises(WorldWeightsError, match="open_clip_model.safetensors is missing") as error:
        load_world_clip(copy)
    assert TINY_COMMAND in str(error.value)


def test_manifest_check_names_both_hashes(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet/weights.safetensors").write_bytes(b"trained")
    write_manifest(tmp_path, {"seed": 0, "command": "persona-pipeline world train --out x"})
    assert verify_folder(tmp_path)["seed"] == 0
    before = sha256_file(tmp_path / "unet/weights.safetensors")
    (tmp_path / "unet/weights.safetensors").write_bytes(b"changed")
    with pytest.raises(WorldWeightsError) as error:
        verify_folder(tmp_path)
    message = str(error.value)
    assert before in message and sha256_file(tmp_path / "unet/weights.safetensors") in message
    assert "persona-pipeline world train --out x" in message


def test_missing_or_corrupt_manifest_names_it_and_the_rebuild_command(tmp_path):
    with pytest.raises(WorldWeightsError, match=r"manifest.json is missing; rebuild .*world train --out"):
        verify_folder(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(WorldWeightsError, match="not a readable world-model manifest"):
        verify_folder(tmp_path)


def test_world_tokenizer_makes_each_world_word_one_token():
    from persona_pipeline.world.world_tokenizer import build_world_tokenizer

    tokenizer = build_world_tokenizer(["woman, half-body shot, teal bob, snowy landscape", "woman, market"])
    assert tokenizer.tokenize("teal bob, snowy landscape") == ["teal</w>", "bob</w>", ",</w>", "snowy</w>", "landscape</w>"]
    assert tokenizer.tokenize("dog") == ["d", "o", "g</w>"]  # unknown words still tokenize, letter by letter


@pytest.mark.slow
def test_a_resumed_run_continues_the_unet_and_records_the_run_it_continued(trained, tmp_path):
    import torch
    from safetensors.torch import load_file

    from persona_pipeline.cli import main

    out = tmp_path / "resumed"
    threads = torch.get_num_threads()
    try:
        code = main(["world", "train", "--out", str(out), "--resume-from", str(trained), "--steps", "3", "--batch-size", "8",
                     "--caption-variety", "0.5"])
    finally:
        torch.set_num_threads(threads)
    assert code in (0, None)
    manifest = verify_folder(out)
    before = json.loads((trained / "manifest.json").read_text())
    assert manifest["steps"] == {"vae": 4, "unet": 15, "clip": 12}
    assert manifest["resumed_from"]["manifest_sha256"] == sha256_file(trained / "manifest.json")
    assert manifest["resumed_from"]["command"] == TINY_COMMAND
    assert manifest["sd_settings"]["caption_variety"] == 0.5
    # The tokenizer, VAE and CLIP model are the ones it continued; the UNet moved on.
    for kept in ("sd/vae/diffusion_pytorch_model.safetensors", "sd/tokenizer/tokenizer.json", "clip/open_clip_model.safetensors"):
        assert manifest["files"][kept] == before["files"][kept], kept
    assert manifest["files"]["sd/unet/diffusion_pytorch_model.safetensors"] != before["files"]["sd/unet/diffusion_pytorch_model.safetensors"]
    old = load_file(str(trained / "sd/unet/diffusion_pytorch_model.safetensors"))
    new = load_file(str(out / "sd/unet/diffusion_pytorch_model.safetensors"))
    assert all(old[k].shape == new[k].shape for k in old) and any(not torch.equal(old[k], new[k]) for k in old)


@pytest.mark.slow
def test_a_clip_only_run_keeps_the_sd_model_and_trains_a_new_clip_model(trained, tmp_path):
    import torch

    from persona_pipeline.cli import main
    from persona_pipeline.world.world_models import load_world_clip

    out = tmp_path / "clip-only"
    threads = torch.get_num_threads()
    try:
        code = main(["world", "train", "--out", str(out), "--resume-from", str(trained), "--clip-only", "--clip-steps", "6",
                     "--clip-tower", "3x96", "--log-every", "2"])
    finally:
        torch.set_num_threads(threads)
    assert code in (0, None)
    manifest = verify_folder(out)
    before = json.loads((trained / "manifest.json").read_text())
    # Every sd/ file and the SD settings and figures are the ones it kept; the CLIP model is new and learned.
    assert {k: v for k, v in manifest["files"].items() if k.startswith("sd/")} == \
        {k: v for k, v in before["files"].items() if k.startswith("sd/")}
    assert manifest["files"]["clip/open_clip_model.safetensors"] != before["files"]["clip/open_clip_model.safetensors"]
    assert manifest["steps"] == {"vae": 4, "unet": 12, "clip": 6} and manifest["sd_settings"] == before["sd_settings"]
    assert manifest["metrics"]["unet_eval_loss_after"] == before["metrics"]["unet_eval_loss_after"]
    assert manifest["metrics"]["clip_loss_history"][-1][1] < manifest["metrics"]["clip_loss_history"][0][1]
    assert manifest["resumed_from"]["kept"] == "sd/" and manifest["resumed_from"]["command"] == TINY_COMMAND
    assert (manifest["clip_settings"]["vision_layers"], manifest["clip_settings"]["vision_width"]) == (3, 96)
    model, _, _ = load_world_clip(out)  # the folder's config carries the tower it was trained with
    assert model.visual.transformer.width == 96 and len(model.visual.transformer.resblocks) == 3


def test_a_clip_only_run_needs_the_folder_it_keeps(tmp_path):
    from persona_pipeline.cli import main

    with pytest.raises(SystemExit, match="--clip-only keeps the sd/ .* --resume-from"):
        main(["world", "train", "--out", str(tmp_path / "x"), "--clip-only"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("tower", ["4", "4x100", "0x64", "ax128"])
def test_a_clip_tower_that_is_not_layers_x_width_is_refused_naming_it(tmp_path, capsys, tower):
    from persona_pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["world", "train", "--out", str(tmp_path / "x"), "--clip-tower", tower])
    assert "--clip-tower" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_caption_variety_outside_0_to_1_is_refused_naming_it(tmp_path, capsys):
    from persona_pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["world", "train", "--out", str(tmp_path / "x"), "--caption-variety", "1.5"])
    assert "--caption-variety" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_resuming_into_its_own_folder_is_refused(tmp_path):
    from persona_pipeline.cli import main

    with pytest.raises(SystemExit, match="is the output folder"):
        main(["world", "train", "--out", str(tmp_path), "--resume-from", str(tmp_path), "--steps", "1"])
