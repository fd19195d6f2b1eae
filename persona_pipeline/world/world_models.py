"""The world models as one folder: `sd/` (diffusers' Stable Diffusion layout), `clip/` (an open_clip
`local-dir:` folder) and `manifest.json` (seed, steps, data hash, command line, metrics, every file's
sha256). `train_world_models` writes it; the loaders check the manifest before any model library
reads a byte, so a changed weight file is refused (naming both hashes) and a missing or unreadable
one names itself and the command that rebuilds it.
"""

from __future__ import annotations

import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from dataclasses import asdict, replace
from pathlib import Path

from persona_pipeline.fileio import sha256_file
from persona_pipeline.world.model_manifest import (COMMITTED_WORLD_MODELS, WorldWeightsError, data_hash, rebuild_command,
                                                   verify_folder, write_manifest)

SD_DIR, CLIP_DIR = "sd", "clip"


def train_world_models(out: Path, sd_settings, clip_settings, command: str | None = None,
                       progress: Callable[[str], None] = print, resume_from: Path | None = None,
                       clip_only: bool = False) -> dict:
    """Train the SD model and the CLIP model into `out`, then write the manifest; returns it. With
    `resume_from` (a world-models folder), continue its text encoder and UNet for `sd_settings.unet_steps`
    more steps instead, keeping its tokenizer, VAE and CLIP model; with `clip_only` too, keep its whole
    sd/ and train a new CLIP model (the SD model is most of the training time and does not read it)."""
    import diffusers
    import open_clip
    import torch
    import transformers

    from persona_pipeline.world.train_clip import train_clip
    from persona_pipeline.world.train_sd import sample_definitions, train_sd

    out = Path(out)
    previous = None
    if clip_only and resume_from is None:
        raise ValueError("clip_only: keeps the sd/ of a world-models folder, so it needs resume_from")
    if resume_from is not None:
        # Checked first: a resumed run continues exactly the weights its manifest names.
        previous = verify_folder(resume_from)
        if clip_only:  # the SD model as it was trained, settings included
            sd_settings = sd_settings.__class__(**previous["sd_settings"])
        else:
            sd_settings = replace(sd_settings, resume_from=str(Path(resume_from) / SD_DIR),
                                  start_step=previous["steps"]["unet"], vae_steps=previous["steps"]["vae"])
            clip_settings = replace(clip_settings, steps=previous["steps"]["clip"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # a half-written folder must not pass as the old one
    started = time.perf_counter()
    if clip_only:  # the SD model copied as it was, with its figures
        shutil.rmtree(out / SD_DIR, ignore_errors=True)
        shutil.copytree(Path(resume_from) / SD_DIR, out / SD_DIR)
        metrics = {k: v for k, v in previous["metrics"].items() if k.startswith(("unet_", "vae_"))}
    else:
        metrics = train_sd(out / SD_DIR, sd_settings, progress)
    if previous is None or clip_only:
        metrics.update(train_clip(out / CLIP_DIR, clip_settings, progress))
    else:  # the CLIP model is not part of a resumed run: copied as it was, with its figures
        shutil.rmtree(out / CLIP_DIR, ignore_errors=True)
        shutil.copytree(Path(resume_from) / CLIP_DIR, out / CLIP_DIR)
        metrics.update({k: v for k, v in previous["metrics"].items() if k.startswith("clip_") or k.startswith("vae_")})
    count = max(sd_settings.train_count, clip_settings.train_count)
    definitions = sample_definitions(sd_settings.__class__(**{**asdict(sd_settings), "train_count": count}))
    fields = {
        "seed": sd_settings.seed, "resolution": sd_settings.resolution,
        "steps": {"vae": sd_settings.vae_steps, "unet": sd_settings.start_step + sd_settings.unet_steps, "clip": clip_settings.steps},
        "sd_settings": asdict(sd_settings), "clip_settings": asdict(clip_settings),
        "data_hash": data_hash(definitions), "data": f"world_samples(seed={sd_settings.seed}, split='train'), {count} samples",
        "command": command or " ".join(shlex.quote(a) for a in ["persona-pipeline", *sys.argv[1:]]),
        # A resumed run: the run it continued (its command, steps and manifest hash) and so on back.
        "resumed_from": None if previous is None else {
            "command": previous["command"], "steps": previous["steps"], "resumed_from": previous.get("resumed_from"),
            "kept": "sd/" if clip_only else "tokenizer, VAE and clip/",
            "manifest_sha256": sha256_file(Path(resume_from) / "manifest.json")},
        "metrics": {**metrics, "total_seconds": time.perf_counter() - started},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "open_clip": open_clip.__version__},
    }
    write_manifest(out, fields)
    return verify_folder(out)


def _loading(folder: Path, part: str, manifest: dict, load):
    """Run `load`; an unreadable file (it passed the hash check, so it was written broken) is
    reported with the folder and the rebuild command rather than a library's traceback."""
    try:
        return load()
    except Exception as error:  # safetensors, JSON and config errors all mean the same thing here
        raise WorldWeightsError(f"{Path(folder) / part} could not be loaded ({type(error).__name__}: {error}); "
                                f"rebuild it with: {rebuild_command(folder, manifest)}") from error


@lru_cache(maxsize=4)
def world_sd_path(folder: Path = COMMITTED_WORLD_MODELS) -> Path:
    """The verified `sd/` folder, for code that loads it itself (diffusers' from_pretrained, LoRA
    training). Checked once per process: 15 MB of hashing is not repeated on every call."""
    verify_folder(folder, only=SD_DIR)
    return Path(folder) / SD_DIR


def world_models_id(folder: Path = COMMITTED_WORLD_MODELS) -> str:
    """A short id of the trained weights (their manifest's hash), for provenance and embedding ids."""
    return sha256_file(Path(folder) / "manifest.json")[:12]


def load_world_sd(folder: Path):
    """The verified StableDiffusionPipeline (offline: a local folder only)."""
    manifest = verify_folder(folder, only=SD_DIR)

    def load():
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(Path(folder) / SD_DIR, safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=True)
    return _loading(folder, SD_DIR, manifest, load)


def load_world_clip(folder: Path):
    """The verified open_clip (model, eval preprocess, tokenizer)."""
    manifest = verify_folder(folder, only=CLIP_DIR)

    def load():
        import open_clip

        name = f"local-dir:{Path(folder) / CLIP_DIR}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        model.eval()
        return model, preprocess, open_clip.get_tokenizer(name)
    return _loading(folder, CLIP_DIR, manifest, load)
