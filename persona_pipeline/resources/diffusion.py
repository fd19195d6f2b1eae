"""Local diffusers backend: the base model (tiny offline preset, a local folder or a hub id), LoRA
training on it, and generation: txt2img, img2img refinement of a parent image and an OpenPose
ControlNet, with up to five weighted LoRAs, in batches, reproducible from a manifest.

Batching and exact reproduction. Jobs that differ only in their seed share one pipeline call (up to
`batch_size` images) with one torch.Generator per image, so each image's starting noise (and an
ancestral sampler's per-step noise) depends only on its own seed. Measured on CPU with the tiny
model: a batched image is *not* always bit-identical to the same seed rendered alone (the UNet's
matmuls over another batch shape round differently, ~1e-6 in floats; after quantisation 8 of 16
images at 64 px had 1-2 values one level off), while the same batch run twice is, in this process
or another. So a manifest records the batch an image came from (`batch_seeds`, `batch_index`) and
`reproduce` re-runs exactly that batch, with the recorded torch thread count (CPU sums are split
by thread), and returns the image at its index: the same inputs in the same shapes through the
same kernels give the same pixels. That holds on the same device type with the same torch and
diffusers versions (recorded; a difference is logged); on CUDA, cuDNN is put in deterministic mode.

Manifest keys (`manifest_fields`, read back by `reproduce`):
    backend, base_model, prompt, negative_prompt, seed, steps, cfg, sampler, scheduler, width, height,
    denoise, init_image, init_image_sha256, control_image, control_image_sha256, control_strength,
    controlnet_model, loras ([{path, sha256, weight}] in application order), batch_seeds, batch_index,
    device, torch_threads, torch_version, diffusers_version.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import dagster as dg
from PIL import Image

from persona_pipeline.domain.workflows import COMFY_SAMPLERS, COMFY_SCHEDULERS, MAX_LORAS, ParamError, check_params
from persona_pipeline.fileio import sha256_file
from persona_pipeline.training.lora import LoraTrainingParams, TrainingResult, model_family, train_lora
from persona_pipeline.training.tiny_models import (TINY_CONTROLNET_NAME, TINY_RESOLUTION, TINY_SD_NAME,
                                                   build_tiny_controlnet, build_tiny_sd)

# ComfyUI sampler names (REFERENCES.md §2) → diffusers scheduler classes, so a manifest means the
# same thing whichever backend made the image. Extra constructor options in _SAMPLER_OPTIONS.
SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_ancestral": "KDPM2AncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_3m_sde": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "uni_pc": "UniPCMultistepScheduler",
    "uni_pc_bh2": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "lcm": "LCMScheduler",
}
_SAMPLER_OPTIONS = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    "dpmpp_3m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    "uni_pc": {"solver_type": "bh1"},  # ComfyUI's uni_pc is UniPC-bh1; uni_pc_bh2 is diffusers' default
    "uni_pc_bh2": {"solver_type": "bh2"},
}
# ComfyUI scheduler (sigma schedule) names → diffusers scheduler options.
SCHEDULERS = {
    "normal": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}
# LoRA adapters kept loaded on the cached pipeline (least recently used ones beyond this are dropped).
MAX_CACHED_ADAPTERS = 16

# Training presets per base-model family (README "Training presets"); persona.yaml overrides any field.
TRAINING_PRESETS = {
    "tiny": LoraTrainingParams(rank=4, alpha=4.0, steps=30, learning_rate=1e-3, batch_size=2, resolution=TINY_RESOLUTION,
                               checkpoint_every=10),
    "sd15": LoraTrainingParams(rank=16, alpha=16.0, steps=1500, learning_rate=1e-4, batch_size=1, resolution=512,
                               min_snr_gamma=5.0, checkpoint_every=250),
    "sdxl": LoraTrainingParams(rank=16, alpha=16.0, steps=1500, learning_rate=1e-4, batch_size=1, resolution=1024,
                               min_snr_gamma=5.0, gradient_checkpointing=True, checkpoint_every=250),
}
TINY_TRAINING, SD15_TRAINING = TRAINING_PRESETS["tiny"], TRAINING_PRESETS["sd15"]
# Validation renders per family: (size, sampling steps).
VALIDATION_RENDER = {"tiny": (TINY_RESOLUTION, 4), "sd15": (512, 25), "sdxl": (1024, 25)}


class GenerationParamError(ParamError):
    """A generation parameter out of range or without a diffusers equivalent."""


class GenerationInputError(ValueError):
    """A LoRA, parent or pose file that is missing, unreadable or does not load."""


class ReproductionError(ValueError):
    """A manifest that cannot be reproduced exactly here (changed file, other base model, missing key)."""


@dataclass(frozen=True)
class DiffusersJob:
    """One image. Sampler and scheduler are spelled as ComfyUI spells them."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    width: int
    height: int
    denoise: float = 1.0  # < 1 with init_image: img2img strength, with ComfyUI's meaning (see _call_arguments)
    init_image: str | None = None  # the parent (img2img); resized to width x height when its size differs
    control_image: str | None = None  # an OpenPose skeleton image for the ControlNet
    control_strength: float = 0.65
    loras: tuple[tuple[str, float], ...] = field(default=())  # (safetensors path, weight), applied in this order

    def __post_init__(self) -> None:
        # Normalised so that jobs compare and hash by value (batch grouping) whatever the caller passed.
        object.__setattr__(self, "loras", tuple((str(path), float(weight)) for path, weight in self.loras))
        for name in ("init_image", "control_image"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))

    def batch_key(self) -> "DiffusersJob":
        """Everything but the seed: jobs with equal keys can share a pipeline call."""
        return replace(self, seed=0)


def plan_batches(jobs: Sequence[DiffusersJob], batch_size: int) -> list[list[int]]:
    """Indices of `jobs` grouped into pipeline calls: jobs equal but for the seed, in input order,
    at most `batch_size` per call; groups in order of their first job."""
    if batch_size < 1:
        raise GenerationParamError(f"batch_size={batch_size} must be at least 1")
    groups: dict[DiffusersJob, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.batch_key(), []).append(index)
    return [members[start:start + batch_size] for members in groups.values()
            for start in range(0, len(members), batch_size)]


class DiffusionBackend(dg.ConfigurableResource):
    """PERSONA_BASE_MODEL / PERSONA_DEVICE; tiny models are built under `models_dir` once."""

    base_model: str = "tiny"
    device: str = "cpu"
    models_dir: str
    candidates_per_run: int = 4
    controlnet_model: str = "tiny"  # "tiny" (built locally, random weights) or a local folder / hub id of an OpenPose ControlNet
    batch_size: int = 4  # images per pipeline call

    @property
    def is_tiny(self) -> bool:
        return self.base_model == "tiny"

    def base_model_path(self) -> str:
        if self.is_tiny:
            return str(build_tiny_sd(Path(self.models_dir) / TINY_SD_NAME))
        return self.base_model  # a local folder or a hub id; from_pretrained resolves either

    def controlnet_path(self) -> str:
        if self.controlnet_model != "tiny":
            return self.controlnet_model
        if not self.is_tiny:
            raise GenerationParamError(f"controlnet_model='tiny' only fits base_model='tiny'; base_model={self.base_model!r} "
                                       "needs an OpenPose ControlNet for its family (a local folder or a hub id)")
        return str(build_tiny_controlnet(Path(self.models_dir) / TINY_CONTROLNET_NAME, Path(self.base_model_path())))

    def preset_name(self) -> str:
        """The training and render preset: `tiny`, `sd15` or `sdxl` (from the model's model_index.json)."""
        return "tiny" if self.is_tiny else model_family(self.base_model)

    def training_defaults(self) -> LoraTrainingParams:
        return TRAINING_PRESETS[self.preset_name()]

    def training_params(self, overrides: dict) -> LoraTrainingParams:
        params = replace(self.training_defaults(), **{k: v for k, v in overrides.items() if v is not None})
        params.validate(self.device)
        return params

    def default_size(self) -> int:
        return VALIDATION_RENDER[self.preset_name()][0]

    def train(self, dataset_dir: Path, output_dir: Path, params: LoraTrainingParams, weight_name: str,
              log: Callable[[str], None]) -> TrainingResult:
        return train_lora(self.base_model_path(), dataset_dir, output_dir, params, device=self.device,
                          weight_name=weight_name, log=log)

    def render_checkpoints(self, checkpoints: list[Path], prompts: list[str], seeds: list[int]) -> list[list[Image.Image]]:
        """Images of every checkpoint on the same prompts and seeds (prompt-major, then seed), from
        one loaded base pipeline: each LoRA is loaded, used and unloaded in turn."""
        import torch

        size, steps = VALIDATION_RENDER[self.preset_name()]
        runtime = _runtime(self.base_model_path(), self.device)
        pipe = runtime.pipe
        out = []
        with runtime.lock:
            for index, checkpoint in enumerate(checkpoints):
                adapter = f"checkpoint_{index}"
                runtime.forget_activation()
                with _quiet_adapters():
                    pipe.load_lora_weights(str(checkpoint), adapter_name=adapter)
                images = []
                try:
                    runtime.activate([adapter], [1.0])  # only this one, whatever generation left loaded
                    for prompt in prompts:
                        for seed in seeds:
                            generator = torch.Generator(device="cpu").manual_seed(seed)
                            images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, width=size, height=size,
                                               generator=generator).images[0])
                finally:
                    with _quiet_adapters():
                        pipe.delete_adapters(adapter)
                    runtime.forget_activation()
                out.append(images)
        return out

    def generate_plain(self, prompt: str, seeds: list[int], size: int | None = None) -> list[Image.Image]:
        """Images from the base model with no LoRA (regularisation / class images)."""
        import torch

        size = size or self.default_size()
        _, steps = VALIDATION_RENDER[self.preset_name()]
        runtime = _runtime(self.base_model_path(), self.device)
        with runtime.lock:
            runtime.activate([], [])
            return [runtime.pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, width=size, height=size,
                                 generator=torch.Generator(device="cpu").manual_seed(seed)).images[0] for seed in seeds]

    # -- generation ---------------------------------------------------------------------------

    def generate_jobs(self, jobs: Sequence[DiffusersJob], log: Callable[[str], None] = print) -> list[Image.Image]:
        """One image per job, in order (see `generate_with_manifests`)."""
        return [image for image, _ in self.generate_with_manifests(jobs, log)]

    def generate_with_manifests(self, jobs: Sequence[DiffusersJob],
                                log: Callable[[str], None] = print) -> list[tuple[Image.Image, dict]]:
        """One (image, manifest fields) per job, in order. Every job is checked first (parameters,
        sampler/scheduler mapping, LoRA count, each LoRA / parent / pose file readable), so a bad
        job fails the call before any model is loaded or image made. Jobs equal but for the seed
        share pipeline calls of up to `batch_size` images."""
        jobs = list(jobs)
        for index, job in enumerate(jobs):
            self._check_job(job, f"job {index}")
        if not jobs:
            return []
        # Hashed once, before loading: the manifests name the bytes that were loaded even if a file
        # is replaced while the batches run.
        hashes = {path: _cached_sha256(path) for job in jobs
                  for path in [p for p, _ in job.loras] + [p for p in (job.init_image, job.control_image) if p]}
        batches = plan_batches(jobs, self.batch_size)
        runtime = _runtime(self.base_model_path(), self.device)
        results: list[tuple[Image.Image, dict] | None] = [None] * len(jobs)
        with runtime.lock:
            # Every adapter and the ControlNet load before the first image: a LoRA that does not fit
            # the base model fails the call here, not halfway through it.
            runtime.load_adapters(sorted({path for job in jobs for path, _ in job.loras}), self.base_model)
            if any(job.control_image for job in jobs):
                runtime.controlnet(self.controlnet_path())
            for number, members in enumerate(batches, start=1):
                job = jobs[members[0]]
                seeds = [jobs[i].seed for i in members]
                images = self._run_batch(runtime, job, seeds)
                log(f"diffusers batch {number}/{len(batches)}: {len(seeds)} image(s), {_mode(job)}, "
                    f"{len(job.loras)} LoRA(s), {job.width}x{job.height}, {job.steps} steps, seeds {seeds}")
                for position, (index, image) in enumerate(zip(members, images)):
                    results[index] = (image, self._manifest(jobs[index], seeds, position, hashes))
        return results  # type: ignore[return-value]  # every index is filled by exactly one batch

    def manifest_fields(self, job: DiffusersJob, batch_seeds: Sequence[int] | None = None,
                        batch_index: int | None = None) -> dict:
        """The fields `reproduce` needs (module docstring), JSON-ready. `batch_seeds` / `batch_index`:
        the pipeline call the image came from (default: a call of its own). `generate_with_manifests`
        returns these already; this is for callers that batch through `generate_jobs`."""
        seeds = [int(seed) for seed in (batch_seeds if batch_seeds is not None else [job.seed])]
        index = seeds.index(job.seed) if batch_index is None else batch_index
        if not 0 <= index < len(seeds) or seeds[index] != job.seed:
            raise ValueError(f"batch_index={batch_index} does not point at seed {job.seed} in batch_seeds={seeds}")
        files = [p for p, _ in job.loras] + [p for p in (job.init_image, job.control_image) if p]
        return self._manifest(job, seeds, index, {path: _cached_sha256(path) for path in files})

    def _manifest(self, job: DiffusersJob, seeds: list[int], index: int, hashes: dict[str, str]) -> dict:
        import diffusers
        import torch

        return {
            "backend": "diffusers", "base_model": self.base_model,
            "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed, "steps": job.steps,
            "cfg": job.cfg, "sampler": job.sampler, "scheduler": job.scheduler, "width": job.width, "height": job.height,
            "denoise": job.denoise,
            "init_image": job.init_image, "init_image_sha256": hashes[job.init_image] if job.init_image else None,
            "control_image": job.control_image,
            "control_image_sha256": hashes[job.control_image] if job.control_image else None,
            "control_strength": job.control_strength,
            "controlnet_model": self.controlnet_model if job.control_image else None,
            "loras": [{"path": path, "sha256": hashes[path], "weight": weight} for path, weight in job.loras],
            "batch_seeds": list(seeds), "batch_index": index,
            "device": self.device, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
        }

    def reproduce(self, manifest: dict, log: Callable[[str], None] = print) -> Image.Image:
        """Regenerate the image of a manifest written from `manifest_fields`: re-runs its whole batch
        (`batch_seeds`, module docstring) and returns the image at `batch_index`. Refuses, naming
        the file or key, when the base model, the ControlNet or a LoRA / parent / pose file's sha256
        differs from the manifest's."""
        import diffusers
        import torch

        required = ("base_model", "prompt", "negative_prompt", "seed", "steps", "cfg", "sampler", "scheduler",
                    "width", "height", "loras")
        missing = [key for key in required if key not in manifest]
        if missing:
            raise ReproductionError(f"manifest is missing {', '.join(missing)}")
        if manifest["base_model"] != self.base_model:
            raise ReproductionError(f"manifest base_model {manifest['base_model']!r} differs from this backend's "
                                    f"base_model {self.base_model!r}")
        loras = []
        for number, lora in enumerate(manifest["loras"]):
            path, sha = lora["path"], lora.get("sha256")
            if not Path(path).is_file():
                raise ReproductionError(f"LoRA {number + 1} of the manifest, {path}: file not found")
            actual = _cached_sha256(path)
            if sha != actual:
                raise ReproductionError(f"LoRA file {path} has sha256 {actual}, the manifest recorded {sha}: "
                                        "the file changed since the image was made")
            loras.append((path, float(lora["weight"])))
        for key in ("init_image", "control_image"):
            path, sha = manifest.get(key), manifest.get(f"{key}_sha256")
            if path and sha:
                if not Path(path).is_file():
                    raise ReproductionError(f"{key} {path}: file not found")
                if _cached_sha256(path) != sha:
                    raise ReproductionError(f"{key} {path} has sha256 {_cached_sha256(path)}, the manifest recorded {sha}")
        if manifest.get("control_image") and manifest.get("controlnet_model", self.controlnet_model) != self.controlnet_model:
            raise ReproductionError(f"manifest controlnet_model {manifest['controlnet_model']!r} differs from this "
                                    f"backend's {self.controlnet_model!r}")
        # torch_threads is not compared: the run below uses the manifest's thread count.
        recorded = {"device": self.device, "torch_version": torch.__version__, "diffusers_version": diffusers.__version__}
        for key, here in recorded.items():
            if key in manifest and manifest[key] != here:
                log(f"warning: the manifest was made with {key}={manifest[key]!r}, this run has {here!r}: "
                    "pixels may differ slightly")

        job = DiffusersJob(
            prompt=manifest["prompt"], negative_prompt=manifest["negative_prompt"], seed=int(manifest["seed"]),
            steps=int(manifest["steps"]), cfg=float(manifest["cfg"]), sampler=manifest["sampler"],
            scheduler=manifest["scheduler"], width=int(manifest["width"]), height=int(manifest["height"]),
            denoise=float(manifest.get("denoise", 1.0)), init_image=manifest.get("init_image"),
            control_image=manifest.get("control_image"), control_strength=float(manifest.get("control_strength", 0.65)),
            loras=tuple(loras))
        seeds = [int(seed) for seed in manifest.get("batch_seeds") or [job.seed]]
        index = int(manifest.get("batch_index", 0))
        if not 0 <= index < len(seeds) or seeds[index] != job.seed:
            raise ReproductionError(f"manifest batch_index={index} does not point at seed {job.seed} in batch_seeds={seeds}")
        self._check_job(job, "manifest")
        runtime = _runtime(self.base_model_path(), self.device)
        with runtime.lock, _torch_threads(manifest.get("torch_threads")):
            runtime.load_adapters([path for path, _ in job.loras], self.base_model)
            return self._run_batch(runtime, job, seeds)[index]

    # -- internals --------------------------------------------------------------------------

    def _check_job(self, job: DiffusersJob, where: str) -> None:
        """Refuse a job before any model loads: parameters, then every file it names."""
        try:
            check_generation_params(steps=job.steps, cfg=job.cfg, sampler=job.sampler, scheduler=job.scheduler,
                                    width=job.width, height=job.height, minimum_side=32 if self.is_tiny else 256,
                                    denoise=job.denoise, control_strength=job.control_strength if job.control_image else None)
            if job.denoise < 1 and not job.init_image:
                raise GenerationParamError(f"denoise={job.denoise} needs an init_image (img2img); txt2img runs at denoise=1")
            if len(job.loras) > MAX_LORAS:
                raise GenerationParamError(f"{len(job.loras)} LoRAs given, at most {MAX_LORAS}: "
                                           f"{', '.join(Path(path).name for path, _ in job.loras)}")
        except GenerationParamError as exc:
            raise GenerationParamError(f"{where}: {exc}") from None
        for path, _ in job.loras:
            _check_lora_file(path, where)
        for kind, path in (("init_image", job.init_image), ("control_image", job.control_image)):
            if path is not None:
                _check_image_file(path, kind, where)

    def _run_batch(self, runtime: "_Runtime", job: DiffusersJob, seeds: list[int]) -> list[Image.Image]:
        """One pipeline call: `job` with each of `seeds`, one generator per image."""
        controlnet = runtime.controlnet(self.controlnet_path()) if job.control_image else None
        pipe = runtime.variant(img2img=job.init_image is not None, controlnet=controlnet)
        runtime.activate(*runtime.adapter_weights(job.loras))
        arguments = _call_arguments(job, seeds, runtime.scheduler_config["num_train_timesteps"])
        original = pipe.scheduler
        # A fresh scheduler per call: no state carries over from one call into the next.
        pipe.scheduler = make_scheduler(job.sampler, job.scheduler, runtime.scheduler_config)
        try:
            return pipe(**arguments).images
        finally:
            pipe.scheduler = original  # generate_plain and render_checkpoints keep the model's own scheduler


def check_generation_params(*, steps: int, cfg: float, sampler: str, scheduler: str, width: int, height: int,
                            minimum_side: int = 256, denoise: float = 1.0, control_strength: float | None = None) -> None:
    """Refuse out-of-range parameters before any model is loaded, naming the field and bound: the
    ranges the workflow templates are held to, plus what diffusers itself cannot run."""
    try:
        check_params(width=width, height=height, steps=steps, cfg=cfg, denoise=denoise, sampler=sampler,
                     scheduler=scheduler, control_strength=control_strength, min_side=minimum_side)
    except ParamError as exc:
        raise GenerationParamError(str(exc)) from None
    if denoise == 0:
        raise GenerationParamError("denoise = 0 would return the parent unchanged; use a value in (0, 1]")
    scheduler_options(sampler, scheduler)


def scheduler_options(sampler: str, scheduler: str) -> tuple[str, dict]:
    """The diffusers scheduler class name and constructor options for a ComfyUI sampler and
    scheduler; refuses, naming them and listing what is supported, what has no equivalent."""
    import inspect

    import diffusers

    supported = ", ".join(SAMPLERS)
    if sampler not in SAMPLERS:
        if sampler in COMFY_SAMPLERS:
            raise GenerationParamError(f"sampler={sampler!r} has no diffusers equivalent; the diffusers backend supports "
                                       f"{supported}")
        raise GenerationParamError(f"sampler={sampler!r} is not a ComfyUI sampler name; use one of {supported}")
    if scheduler not in SCHEDULERS:
        if scheduler in COMFY_SCHEDULERS:
            raise GenerationParamError(f"scheduler={scheduler!r} has no diffusers equivalent; the diffusers backend "
                                       f"supports {', '.join(SCHEDULERS)}")
        raise GenerationParamError(f"scheduler={scheduler!r} must be one of {', '.join(SCHEDULERS)}")
    class_name = SAMPLERS[sampler]
    accepted = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    if not set(SCHEDULERS[scheduler]) <= set(accepted):
        usable = [name for name, options in SCHEDULERS.items() if set(options) <= set(accepted)]
        raise GenerationParamError(f"scheduler={scheduler!r} has no diffusers equivalent for sampler={sampler!r} "
                                   f"({class_name}); with this sampler use one of {', '.join(usable)}")
    return class_name, {**_SAMPLER_OPTIONS.get(sampler, {}), **SCHEDULERS[scheduler]}


def make_scheduler(sampler: str, scheduler: str, base_config):
    """A fresh diffusers scheduler for the ComfyUI names, on the base model's noise schedule."""
    import diffusers

    class_name, options = scheduler_options(sampler, scheduler)
    return getattr(diffusers, class_name).from_config(base_config, **options)


def _call_arguments(job: DiffusersJob, seeds: list[int], train_timesteps: int) -> dict:
    import torch

    arguments = {
        "prompt": job.prompt, "negative_prompt": job.negative_prompt or None, "guidance_scale": job.cfg,
        "num_images_per_prompt": len(seeds), "width": job.width, "height": job.height,
        # CPU generators whatever the device: the starting noise of a seed is the same everywhere.
        "generator": [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
    }
    if job.init_image:
        # ComfyUI's denoise d runs `steps` steps: the last ones of a steps/d schedule. diffusers'
        # strength s runs int(n * s) of n steps from the same end, so n = steps/d and s is chosen
        # to give exactly `steps` (the 0.5 keeps int() from rounding down).
        total = max(job.steps, min(int(job.steps / job.denoise), train_timesteps))
        arguments.update(num_inference_steps=total, strength=min(1.0, (job.steps + 0.5) / total),
                         image=_load_rgb(job.init_image, (job.width, job.height)))
    else:
        arguments["num_inference_steps"] = job.steps
    if job.control_image:
        control = _load_rgb(job.control_image, None)  # the pipeline resizes it to width x height
        arguments["controlnet_conditioning_scale"] = job.control_strength
        arguments["control_image" if job.init_image else "image"] = control
    elif job.init_image:
        # The plain img2img pipeline takes its size from the (resized) parent.
        del arguments["width"], arguments["height"]
    return arguments


def _mode(job: DiffusersJob) -> str:
    return ("img2img" if job.init_image else "txt2img") + (" + ControlNet" if job.control_image else "")


def _load_rgb(path: str, size: tuple[int, int] | None) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
    if size and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _check_lora_file(path: str, where: str) -> None:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise GenerationInputError(f"{where}: LoRA file {path} not found")
    try:
        with safe_open(path, "pt") as handle:
            if not list(handle.keys()):
                raise ValueError("it holds no tensors")
    except Exception as exc:  # safetensors raises several classes for a bad header
        raise GenerationInputError(f"{where}: LoRA file {path} is not a readable safetensors file ({exc})") from None


def _check_image_file(path: str, kind: str, where: str) -> None:
    if not Path(path).is_file():
        raise GenerationInputError(f"{where}: {kind} {path} not found")
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # Pillow raises several classes for a bad file
        raise GenerationInputError(f"{where}: {kind} {path} is not a readable image ({exc})") from None


_sha_lock = threading.Lock()
_sha_cache: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: str) -> str:
    """sha256 of a file, remembered per (path, size, mtime): a LoRA is hashed once, a changed file again."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    with _sha_lock:
        if key not in _sha_cache:
            _sha_cache[key] = sha256_file(Path(path))
        return _sha_cache[key]


class _Runtime:
    """The loaded base pipeline of one (model, device) and what hangs off it: the img2img and
    ControlNet pipelines built from its components (`from_pipe`, no weights copied), loaded
    ControlNets and LoRA adapters. Its state (active adapters, scheduler) is per call, so every
    use holds `lock`."""

    def __init__(self, pipe, device: str):
        self.pipe = pipe
        self.device = device
        self.lock = threading.RLock()
        self.scheduler_config = pipe.scheduler.config
        self._variants: dict[tuple[bool, int | None], object] = {}
        self._controlnets: dict[str, object] = {}
        self._adapters: OrderedDict[str, str] = OrderedDict()  # sha256 → adapter name, least recently used first
        self._active: tuple | None = None  # the last activate() arguments; None: unknown (an adapter came or went)

    def controlnet(self, path: str):
        if path not in self._controlnets:
            from diffusers import ControlNetModel

            try:
                model = ControlNetModel.from_pretrained(path, torch_dtype=self.pipe.unet.dtype)
            except Exception as exc:  # hub and file errors come in many classes
                raise GenerationInputError(f"ControlNet {path!r} could not be loaded: {exc}") from exc
            self._controlnets[path] = model.to(self.device)
        return self._controlnets[path]

    def variant(self, *, img2img: bool, controlnet):
        """The pipeline for a mode, sharing the base pipeline's modules."""
        if not img2img and controlnet is None:
            return self.pipe
        key = (img2img, id(controlnet) if controlnet is not None else None)
        if key not in self._variants:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

            factory = AutoPipelineForImage2Image if img2img else AutoPipelineForText2Image
            extra = {"controlnet": controlnet} if controlnet is not None else {}
            # torch_dtype: from_pipe otherwise casts the shared modules to fp32.
            variant = factory.from_pipe(self.pipe, torch_dtype=self.pipe.unet.dtype, **extra)
            variant.set_progress_bar_config(disable=True)
            self._variants[key] = variant
        return self._variants[key]

    def load_adapters(self, paths: Sequence[str], base_model: str) -> None:
        """Load each LoRA file once as a named adapter (named by its sha256, so a changed file is a
        new adapter); drop the least recently used beyond MAX_CACHED_ADAPTERS."""
        wanted = {_cached_sha256(path) for path in paths}
        for path in paths:
            sha = _cached_sha256(path)
            if sha in self._adapters:
                self._adapters.move_to_end(sha)
                continue
            name = _adapter_name(sha)
            self._active = None  # a load, even a failed one, may change which adapters are active
            try:
                with _quiet_adapters():
                    self.pipe.load_lora_weights(path, adapter_name=name)
            except Exception as exc:  # diffusers/peft raise many classes for a LoRA that does not fit
                raise GenerationInputError(f"LoRA file {path} could not be loaded onto base model {base_model!r}: {exc}") from exc
            self._adapters[sha] = name
        for sha in [sha for sha in self._adapters if sha not in wanted][:max(0, len(self._adapters) - MAX_CACHED_ADAPTERS)]:
            with _quiet_adapters():
                self.pipe.delete_adapters(self._adapters.pop(sha))
            self._active = None

    @staticmethod
    def adapter_weights(loras: tuple[tuple[str, float], ...]) -> tuple[list[str], list[float]]:
        """Adapter names and weights in order; the same file twice (by content) adds its weights,
        which is exact: a LoRA's delta is linear in its weight."""
        merged: dict[str, float] = {}
        for path, weight in loras:
            name = _adapter_name(_cached_sha256(path))
            merged[name] = merged.get(name, 0.0) + weight
        return list(merged), list(merged.values())

    def activate(self, names: list[str], weights: list[float]) -> None:
        """Make exactly `names` active with `weights`, in that order (the order LoRA deltas are summed).
        Skipped when nothing changed since the last call: it walks every module (~20 ms on the tiny model)."""
        state = (tuple(names), tuple(weights))
        if state == self._active:
            return
        if names:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=weights)
        elif any(self.pipe.get_list_adapters().values()):
            self.pipe.disable_lora()
        self._active = state

    def forget_activation(self) -> None:
        """Adapters were loaded or deleted behind `activate`'s back: set them again next time."""
        self._active = None


@contextmanager
def _torch_threads(count: int | None):
    """Run with `count` torch threads, then restore: CPU kernels split their sums by thread count,
    so a different count can move a pixel by a level (measured: 1 image of 4 at 2 threads vs 1)."""
    import torch

    previous = torch.get_num_threads()
    if not count or count == previous:
        yield
        return
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _quiet_adapters():
    """peft warns whenever a second adapter is added or an active one deleted; with several LoRAs
    on one cached pipeline both are routine (activate() sets the active set before every call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


def _adapter_name(sha: str) -> str:
    # Distinctive: diffusers matches adapter names as substrings of parameter names in its warnings.
    return f"lora_{sha[:20]}"


_runtime_lock = threading.Lock()


def _runtime(base_model: str, device: str) -> _Runtime:
    with _runtime_lock:  # two threads asking at once get one pipeline, loaded once
        return _load_runtime(base_model, device)


@lru_cache(maxsize=1)
def _load_runtime(base_model: str, device: str) -> _Runtime:
    from diffusers import DiffusionPipeline

    if device.startswith("cuda"):
        import torch

        # Exact reproduction on CUDA needs cuDNN to pick the same (deterministic) kernels every run.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    # DiffusionPipeline picks the SD1.5 or SDXL pipeline class from model_index.json.
    pipe = DiffusionPipeline.from_pretrained(base_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return _Runtime(pipe.to(device), device)


def _base_pipeline(base_model: str, device: str):
    """The cached base pipeline (shared with generation; hold `_runtime(...).lock` while using it)."""
    return _runtime(base_model, device).pipe
