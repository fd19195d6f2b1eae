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

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence, TYPE_CHECKING

import dagster as dg

from persona_pipeline.domain.generation_params import CONTROL_STRENGTH_DEFAULT
from persona_pipeline.resources.diffusion_batches import DiffusersJob, call_arguments, check_job, describe_mode, plan_batches
from persona_pipeline.resources.diffusion_runtime import (GenerationInputError, PipelineRuntime, cached_sha256,
                                                          shared_runtime, torch_threads)
from persona_pipeline.resources.diffusion_samplers import GenerationParamError, check_generation_params, make_scheduler
from persona_pipeline.training.families import families, model_family
from persona_pipeline.training.lora import LoraTrainingParams, TrainingConfigError, TrainingResult, train_lora
from persona_pipeline.world.model_manifest import COMMITTED_WORLD_MODELS
from persona_pipeline.world.world_models import world_models_id, world_sd_path
from persona_pipeline.training.families.edit_models import KONTEXT, QWEN_IMAGE_EDIT, edit_model_of_pipeline, pipeline_class_of
from persona_pipeline.training.families.video_models import WAN_I2V, video_model_of_pipeline
from persona_pipeline.training.tiny_models import (TINY_CONTROLNET_NAME, TINY_FLUX_NAME, TINY_RESOLUTION, TINY_SD_NAME,
                                                   build_tiny_controlnet, build_tiny_flux, build_tiny_sd)

if TYPE_CHECKING:  # annotations only: imported where used, not when the code location loads
    from PIL import Image

WORLD_BASE_MODEL = "world"
TINY_FLUX = "tiny-flux"  # a FLUX.1 [dev] layout with random weights, built under models_dir (shapes alone)
# The edit models' tiny stand-ins (tiny-kontext shares tiny-flux's weights, so its LoRAs load on it).
TINY_KONTEXT, TINY_QWEN_EDIT = KONTEXT.tiny, QWEN_IMAGE_EDIT.tiny
TINY_WAN_I2V = WAN_I2V.tiny  # the image-to-video model's stand-in (training/tiny_video_models.py)
TINY_MODELS = ("tiny", TINY_FLUX, TINY_KONTEXT, TINY_QWEN_EDIT, TINY_WAN_I2V)

# Importers reach the job type, its batching and the errors through this module.
__all__ = ["DiffusersJob", "DiffusionBackend", "GenerationInputError", "GenerationParamError", "ReproductionError",
           "check_generation_params", "plan_batches"]

# Rank 8 at 3e-3; caption tags dropped at 0.5 and shuffled behind the trigger, with a text-encoder LoRA at
# 1e-3, for 400 steps: chosen on the other characters at other seeds (persona_pipeline/world/lora_recipe.py),
# the best of the recipes measured there (docs/world.md#the-lora-recipe). The demo must stay under 90 s.
WORLD_TRAINING = LoraTrainingParams(rank=8, alpha=8.0, steps=400, learning_rate=3e-3, batch_size=4, resolution=64,
                                    checkpoint_every=100, text_encoder_lr=1e-3, shuffle_caption=True, keep_tokens=1,
                                    caption_tag_dropout_rate=0.5)
# Training presets: the two built-in base models, then each model family's own (training/families/);
# persona.yaml overrides any field.
TRAINING_PRESETS = {
    "tiny": LoraTrainingParams(rank=4, alpha=4.0, steps=30, learning_rate=1e-3, batch_size=2, resolution=TINY_RESOLUTION,
                               checkpoint_every=10),
    # The world model (world/, 64 px, 16x16 latents): measured in docs/world.md.
    "world": WORLD_TRAINING,
    TINY_FLUX: LoraTrainingParams(rank=4, alpha=4.0, steps=30, learning_rate=1e-3, batch_size=2, resolution=TINY_RESOLUTION,
                                  checkpoint_every=10, max_sequence_length=32),
    **{family.name: family.preset for family in families()},
}
TINY_TRAINING, SD15_TRAINING = TRAINING_PRESETS["tiny"], TRAINING_PRESETS["sd15"]
# Validation renders per preset: (size, sampling steps).
VALIDATION_RENDER = {"tiny": (TINY_RESOLUTION, 4), "world": (64, 12), TINY_FLUX: (TINY_RESOLUTION, 4),
                     TINY_KONTEXT: (TINY_RESOLUTION, 4), TINY_QWEN_EDIT: (TINY_RESOLUTION, 4),
                     QWEN_IMAGE_EDIT.name: (1024, 28), TINY_WAN_I2V: (TINY_RESOLUTION, 4), WAN_I2V.name: (WAN_I2V.size[1], 30),
                     **{family.name: family.validation_render for family in families()}}
FLOW_MATCHING_PRESETS = (TINY_FLUX, "flux", TINY_KONTEXT, TINY_QWEN_EDIT, QWEN_IMAGE_EDIT.name, TINY_WAN_I2V, WAN_I2V.name)


class ReproductionError(ValueError):
    """A manifest that cannot be reproduced exactly here (changed file, other base model, missing key)."""


class DiffusionBackend(dg.ConfigurableResource):
    """PERSONA_BASE_MODEL / PERSONA_DEVICE: `world` (the committed world-trained model, docs/world.md),
    `tiny` (random weights, for shapes alone; built under `models_dir` once), `tiny-flux` (the same for
    FLUX.1 [dev]), or a local folder / hub id of any registered family (training/families/)."""

    base_model: str = "tiny"
    device: str = "cpu"
    models_dir: str
    candidates_per_run: int = 4
    controlnet_model: str = "tiny"  # "tiny" (built locally, random weights) or a local folder / hub id of an OpenPose ControlNet
    batch_size: int = 4  # images per pipeline call
    # base_model="world" reads this world-models folder (sd/, clip/, manifest.json) instead of the committed
    # one, checked against its manifest the same way: to measure a retrained world before committing it.
    world_models_dir: str = ""

    @property
    def is_tiny(self) -> bool:
        return self.base_model == "tiny"

    @property
    def is_world(self) -> bool:
        return self.base_model == WORLD_BASE_MODEL

    def for_persona(self, config) -> "DiffusionBackend":
        """This backend on the persona's own base model (persona.yaml `base_model`, else this one's),
        after checking it is of the family the persona asks for (`family`), naming both if not."""
        chosen = self if not config.base_model else self.for_model(config.base_model)
        if config.family and chosen.family_name() != config.family:
            raise TrainingConfigError(f"persona.yaml family={config.family!r}, but its base model {chosen.base_model!r} is "
                                      f"{chosen.family_name()!r}; set base_model to a {config.family} model or change family")
        return chosen

    def for_model(self, base_model: str) -> "DiffusionBackend":
        """This backend on another model (a persona's own, an edit step's edit model), same device and folders."""
        if base_model == self.base_model:
            return self
        return DiffusionBackend(base_model=base_model, device=self.device, models_dir=self.models_dir,
                                candidates_per_run=self.candidates_per_run, controlnet_model=self.controlnet_model,
                                batch_size=self.batch_size, world_models_dir=self.world_models_dir)

    def family_name(self) -> str:
        """The registered family (sd15, sdxl, flux) of the base model, from its model_index.json."""
        return model_family(self.base_model_path())

    @property
    def is_flow_matching(self) -> bool:
        """A FLUX.1 base model: Euler on its flow schedule, cfg as distilled guidance, no ControlNet here."""
        return self.preset_name() in FLOW_MATCHING_PRESETS

    def base_model_path(self) -> str:
        if self.is_tiny:
            return str(build_tiny_sd(Path(self.models_dir) / TINY_SD_NAME))
        if self.base_model == TINY_FLUX:
            return str(build_tiny_flux(Path(self.models_dir) / TINY_FLUX_NAME))
        if self.base_model == TINY_KONTEXT:
            return str(build_tiny_flux(Path(self.models_dir) / TINY_KONTEXT, kontext=True))
        if self.base_model == TINY_QWEN_EDIT:
            from persona_pipeline.training.tiny_edit_models import build_tiny_qwen_edit

            return str(build_tiny_qwen_edit(Path(self.models_dir) / TINY_QWEN_EDIT))
        if self.base_model == TINY_WAN_I2V:
            from persona_pipeline.training.tiny_video_models import build_tiny_wan_i2v

            return str(build_tiny_wan_i2v(Path(self.models_dir) / TINY_WAN_I2V))
        if self.is_world:
            return str(world_sd_path(self.world_models()))  # checked against its manifest first
        return self.base_model  # a local folder or a hub id; from_pretrained resolves either

    def world_models(self) -> Path:
        """The world-models folder `world` means: `world_models_dir`, else the committed one."""
        return Path(self.world_models_dir) if self.world_models_dir else COMMITTED_WORLD_MODELS

    def controlnet_path(self) -> str:
        if self.controlnet_model != "tiny":
            return self.controlnet_model
        if not (self.is_tiny or self.is_world):
            raise GenerationParamError(f"controlnet_model='tiny' only fits base_model='tiny' or 'world'; base_model="
                                       f"{self.base_model!r} needs an OpenPose ControlNet for its family (a local folder or a hub id)")
        name = TINY_CONTROLNET_NAME if self.is_tiny else f"world-controlnet-{world_models_id(self.world_models())}"
        return str(build_tiny_controlnet(Path(self.models_dir) / name, Path(self.base_model_path())))

    def preset_name(self) -> str:
        """The training and render preset: `tiny`, `world`, `tiny-flux`, or the model family's (`sd15`, `sdxl`,
        `flux`: from the model's model_index.json)."""
        if self.is_world or self.base_model in TINY_MODELS:
            return self.base_model
        if edit_model_of_pipeline(pipeline_class_of(self.base_model) or "") is QWEN_IMAGE_EDIT:
            return QWEN_IMAGE_EDIT.name  # an edit model of no family we train (training/families/edit_models.py)
        if video_model_of_pipeline(pipeline_class_of(self.base_model) or "") is WAN_I2V:
            return WAN_I2V.name  # an image-to-video model (training/families/video_models.py)
        return model_family(self.base_model)

    def training_defaults(self) -> LoraTrainingParams:
        return TRAINING_PRESETS[self.preset_name()]

    def training_params(self, overrides: dict) -> LoraTrainingParams:
        params = replace(self.training_defaults(), **{k: v for k, v in overrides.items() if v is not None})
        params.validate(self.device)
        return params

    def default_size(self) -> int:
        return VALIDATION_RENDER[self.preset_name()][0]

    def min_side(self) -> int:
        """The smallest image side this model is asked for (the tiny model draws 32 px images, the
        world model 64 px ones)."""
        return 32 if self.base_model in TINY_MODELS else 64 if self.is_world else 256

    def train(self, dataset_dir: Path, output_dir: Path, params: LoraTrainingParams, weight_name: str,
              log: Callable[[str], None]) -> TrainingResult:
        return train_lora(self.base_model_path(), dataset_dir, output_dir, params, device=self.device,
                          weight_name=weight_name, log=log)

    def render_checkpoints(self, checkpoints: list[Path], prompts: list[str], seeds: list[int]) -> list[list[Image.Image]]:
        """Images of every checkpoint on the same prompts and seeds (prompt-major, then seed), from
        one loaded base pipeline: each LoRA is loaded, used and unloaded in turn."""
        import torch

        size, steps = VALIDATION_RENDER[self.preset_name()]
        runtime = shared_runtime(self.base_model_path(), self.device)
        pipe = runtime.pipe
        out = []
        with runtime.lock:
            for index, checkpoint in enumerate(checkpoints):
                adapter = f"checkpoint_{index}"
                runtime.load_checkpoint_adapter(checkpoint, adapter)
                images = []
                try:
                    runtime.activate([adapter], [1.0])  # only this one, whatever generation left loaded
                    for prompt in prompts:
                        for seed in seeds:
                            generator = torch.Generator(device="cpu").manual_seed(seed)
                            images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, width=size, height=size,
                                               generator=generator).images[0])
                finally:
                    runtime.delete_checkpoint_adapter(adapter)
                out.append(images)
        return out

    def generate_plain(self, prompt: str, seeds: list[int], size: int | None = None) -> list[Image.Image]:
        """Images from the base model with no LoRA (regularisation / class images)."""
        import torch

        size = size or self.default_size()
        _, steps = VALIDATION_RENDER[self.preset_name()]
        runtime = shared_runtime(self.base_model_path(), self.device)
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
        hashes = {path: cached_sha256(path) for job in jobs
                  for path in [p for p, _ in job.loras] + [p for p in (job.init_image, job.control_image, job.edit_image) if p]}
        batches = plan_batches(jobs, self.batch_size)
        runtime = shared_runtime(self.base_model_path(), self.device)
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
                log(f"diffusers batch {number}/{len(batches)}: {len(seeds)} image(s), {describe_mode(job)}, "
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
        files = [p for p, _ in job.loras] + [p for p in (job.init_image, job.control_image, job.edit_image) if p]
        return self._manifest(job, seeds, index, {path: cached_sha256(path) for path in files})

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
            "edit_image": job.edit_image, "edit_image_sha256": hashes[job.edit_image] if job.edit_image else None,
            **({"frames": job.frames, "fps": job.fps} if job.frames else {}),
            "loras": [{"path": path, "sha256": hashes[path], "weight": weight} for path, weight in job.loras],
            "batch_seeds": list(seeds), "batch_index": index,
            "device": self.device, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
        }

    def reproduce(self, manifest: dict, log: Callable[[str], None] = print) -> Image.Image:
        """Regenerate the image (a video job's frames) of a manifest written from `manifest_fields`: re-runs its whole batch
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
            actual = cached_sha256(path)
            if sha != actual:
                raise ReproductionError(f"LoRA file {path} has sha256 {actual}, the manifest recorded {sha}: "
                                        "the file changed since the image was made")
            loras.append((path, float(lora["weight"])))
        for key in ("init_image", "control_image", "edit_image"):
            path, sha = manifest.get(key), manifest.get(f"{key}_sha256")
            if path and sha:
                if not Path(path).is_file():
                    raise ReproductionError(f"{key} {path}: file not found")
                if cached_sha256(path) != sha:
                    raise ReproductionError(f"{key} {path} has sha256 {cached_sha256(path)}, the manifest recorded {sha}")
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
            control_image=manifest.get("control_image"), control_strength=float(manifest.get("control_strength", CONTROL_STRENGTH_DEFAULT)),
            loras=tuple(loras), edit_image=manifest.get("edit_image"), frames=manifest.get("frames"),
            fps=manifest.get("fps"))
        seeds = [int(seed) for seed in manifest.get("batch_seeds") or [job.seed]]
        index = int(manifest.get("batch_index", 0))
        if not 0 <= index < len(seeds) or seeds[index] != job.seed:
            raise ReproductionError(f"manifest batch_index={index} does not point at seed {job.seed} in batch_seeds={seeds}")
        self._check_job(job, "manifest")
        runtime = shared_runtime(self.base_model_path(), self.device)
        with runtime.lock, torch_threads(manifest.get("torch_threads")):
            runtime.load_adapters([path for path, _ in job.loras], self.base_model)
            return self._run_batch(runtime, job, seeds)[index]

    # -- internals --------------------------------------------------------------------------

    def _check_job(self, job: DiffusersJob, where: str) -> None:
        check_job(job, where, minimum_side=self.min_side(), flow_matching=self.is_flow_matching)

    def _run_batch(self, runtime: PipelineRuntime, job: DiffusersJob, seeds: list[int]) -> list[Image.Image]:
        """One pipeline call: `job` with each of `seeds`, one generator per image."""
        controlnet = runtime.controlnet(self.controlnet_path()) if job.control_image else None
        pipe = runtime.variant(img2img=job.init_image is not None, controlnet=controlnet)
        runtime.activate(*runtime.adapter_weights(job.loras))
        edit = edit_model_of_pipeline(type(runtime.pipe).__name__)
        arguments = call_arguments(job, seeds, runtime.scheduler_config["num_train_timesteps"], runtime.flow_matching,
                                   edit_model=edit.name if edit else None)
        original = pipe.scheduler
        # A fresh scheduler per call: no state carries over from one call into the next.
        pipe.scheduler = make_scheduler(job.sampler, job.scheduler, runtime.scheduler_config)
        try:
            output = pipe(**arguments)
            return output.frames if job.frames else output.images  # a video job: each seed's list of frames
        finally:
            pipe.scheduler = original  # generate_plain and render_checkpoints keep the model's own scheduler

