"""One diffusers image job and how jobs share pipeline calls: jobs equal but for the seed run as one
batch (one torch.Generator per image), and everything a job names is checked before any model
loads. Why a manifest records its batch: resources/diffusion.py."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence


from persona_pipeline.domain.generation_params import CONTROL_STRENGTH_DEFAULT, MAX_LORAS
from persona_pipeline.resources.diffusion_runtime import GenerationInputError
from persona_pipeline.resources.diffusion_samplers import GenerationParamError, check_generation_params


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
    denoise: float = 1.0  # < 1 with init_image: img2img strength, with ComfyUI's meaning (see call_arguments)
    init_image: str | None = None  # the parent (img2img); resized to width x height when its size differs
    control_image: str | None = None  # an OpenPose skeleton image for the ControlNet
    control_strength: float = CONTROL_STRENGTH_DEFAULT
    loras: tuple[tuple[str, float], ...] = field(default=())  # (safetensors path, weight), applied in this order
    edit_image: str | None = None  # the image an edit model (Kontext, Qwen-Image-Edit) changes, scaled to width x height
    # A video job (an image-to-video model, Wan): edit_image is the still it animates, made `frames` frames at `fps`.
    frames: int | None = None
    fps: int | None = None

    def __post_init__(self) -> None:
        # Normalised so that jobs compare and hash by value (batch grouping) whatever the caller passed.
        object.__setattr__(self, "loras", tuple((str(path), float(weight)) for path, weight in self.loras))
        for name in ("init_image", "control_image", "edit_image"):
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
    # A video job runs alone: WanImageToVideoPipeline (diffusers 0.42) does not repeat its image embeddings
    # for num_videos_per_prompt > 1, so a batch of clips fails in the transformer.
    sizes = {key: 1 if key.frames else batch_size for key in groups}
    return [members[start:start + sizes[key]] for key, members in groups.items()
            for start in range(0, len(members), sizes[key])]


def check_job(job: DiffusersJob, where: str, minimum_side: int, flow_matching: bool = False) -> None:
    """Refuse a job before any model loads: parameters, then every file it names."""
    try:
        check_generation_params(steps=job.steps, cfg=job.cfg, sampler=job.sampler, scheduler=job.scheduler,
                                width=job.width, height=job.height, minimum_side=minimum_side,
                                denoise=job.denoise, control_strength=job.control_strength if job.control_image else None,
                                flow_matching=flow_matching)
        if flow_matching and job.control_image:
            raise GenerationParamError("control_image: the pose ControlNet is for Stable Diffusion base models; "
                                       "a FLUX.1 base model has none here")
        if job.edit_image and (job.init_image or job.control_image):
            raise GenerationParamError("edit_image: an edit job takes no init_image or control_image")
        if job.denoise < 1 and not job.init_image:
            raise GenerationParamError(f"denoise={job.denoise} needs an init_image (img2img); txt2img runs at denoise=1")
        if len(job.loras) > MAX_LORAS:
            raise GenerationParamError(f"{len(job.loras)} LoRAs given, at most {MAX_LORAS}: "
                                       f"{', '.join(Path(path).name for path, _ in job.loras)}")
    except GenerationParamError as exc:
        raise GenerationParamError(f"{where}: {exc}") from None
    for path, _ in job.loras:
        _check_lora_file(path, where)
    for kind, path in (("init_image", job.init_image), ("control_image", job.control_image), ("edit_image", job.edit_image)):
        if path is not None:
            _check_image_file(path, kind, where)


def call_arguments(job: DiffusersJob, seeds: list[int], train_timesteps: int, flow_matching: bool = False,
                   edit_model: str | None = None) -> dict:
    """The pipeline call for a batch. On FLUX.1, cfg is the distilled guidance input and there is no
    negative prompt (as in ComfyUI's FLUX workflows: FluxGuidance, no true CFG). An edit job's
    arguments are `edit_arguments`'."""
    import torch

    arguments = {
        "prompt": job.prompt, "negative_prompt": None if flow_matching else job.negative_prompt or None, "guidance_scale": job.cfg,
        "num_images_per_prompt": len(seeds), "width": job.width, "height": job.height,
        # CPU generators whatever the device: the starting noise of a seed is the same everywhere.
        "generator": [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
    }
    if job.frames:
        return video_arguments(job, arguments)
    if job.edit_image:
        return edit_arguments(job, arguments, edit_model)
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
    elif job.init_image and not flow_matching:
        # SD's plain img2img pipeline takes its size from the (resized) parent; FLUX's wants it given.
        del arguments["width"], arguments["height"]
    return arguments


def edit_arguments(job: DiffusersJob, arguments: dict, edit_model: str | None) -> dict:
    """An edit model's call, as its ComfyUI template draws it (workflows/): the input scaled to the
    output size and encoded as the reference. Kontext: cfg is FluxGuidance's distilled guidance, no
    negative prompt, and the pipeline keeps the given size (its own Kontext-resolution resize is off:
    the request already chose the size). Qwen-Image-Edit: cfg is a true CFG scale against the negative
    prompt (its text encoder sees the image too, at about 1 megapixel, as TextEncodeQwenImageEdit does)."""
    arguments.update(num_inference_steps=job.steps, image=_load_rgb(job.edit_image, (job.width, job.height)))
    if edit_model == "kontext":
        arguments.update(max_area=job.width * job.height, _auto_resize=False)
    elif edit_model == "qwen_image_edit":
        del arguments["guidance_scale"]
        arguments.update(true_cfg_scale=job.cfg, negative_prompt=job.negative_prompt or " ")
    else:
        raise GenerationParamError("edit_image: the base model is no edit model (FLUX.1 Kontext, Qwen-Image-Edit)")
    return arguments


def video_arguments(job: DiffusersJob, arguments: dict) -> dict:
    """An image-to-video call (WanImageToVideoPipeline), as workflows/wan_i2v.json draws it: the still scaled
    to the clip's size as its first frame, cfg a true CFG scale against the negative prompt, PIL frames out."""
    if not job.edit_image:
        raise GenerationParamError("frames: a video job needs the still it animates (edit_image)")
    arguments["num_videos_per_prompt"] = arguments.pop("num_images_per_prompt")
    arguments.update(num_inference_steps=job.steps, num_frames=job.frames, output_type="pil",
                     negative_prompt=job.negative_prompt or None, image=_load_rgb(job.edit_image, (job.width, job.height)))
    return arguments


def describe_mode(job: DiffusersJob) -> str:
    if job.frames:
        return f"image-to-video, {job.frames} frames"
    if job.edit_image:
        return "edit"
    return ("img2img" if job.init_image else "txt2img") + (" + ControlNet" if job.control_image else "")


def _load_rgb(path: str, size: tuple[int, int] | None) -> Image.Image:
    from PIL import Image

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
    from PIL import Image

    if not Path(path).is_file():
        raise GenerationInputError(f"{where}: {kind} {path} not found")
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # Pillow raises several classes for a bad file
        raise GenerationInputError(f"{where}: {kind} {path} is not a readable image ({exc})") from None

