"""The local diffusers backend: a request becomes a DiffusersJob, one pipeline call per batch of
jobs equal but for the seed (resources/diffusion.py), with no graph in between. Each batch's images
are stored before the next batch starts, so a crash loses at most one batch."""

from __future__ import annotations

import io
import time
from typing import Callable, Sequence

from persona_pipeline.domain.generation_params import CONTROL_STRENGTH_DEFAULT, WorkflowError
from persona_pipeline.fileio import atomic_write
from persona_pipeline.generation.backends import ImageJob, ImageResult, PreparedJob, storing_failed
from persona_pipeline.resources.diffusion import DiffusersJob, plan_batches

# Errors that will happen again on a rerun: a bad file or value, not a hiccup.
PERMANENT_ERRORS = (ValueError, FileNotFoundError, KeyError, WorkflowError)


class DiffusersBackend:
    name = "diffusers"

    def __init__(self, diffusion, *, log: Callable[[str], None] = print):
        self.diffusion = diffusion  # a DiffusionBackend resource
        self.log = log
        self.default_size = diffusion.default_size()
        self.min_side = diffusion.min_side()

    def prepare(self, job: ImageJob) -> PreparedJob:
        request = job.request
        return PreparedJob(job, DiffusersJob(
            prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed, steps=request.steps,
            cfg=request.cfg, sampler=request.sampler, scheduler=request.scheduler,
            width=request.width or self.default_size, height=request.height or self.default_size,
            denoise=request.denoise, init_image=request.parent_image, control_image=request.control_image,
            control_strength=request.control_strength if request.control_image else CONTROL_STRENGTH_DEFAULT,
            loras=tuple((lora.path, lora.weight) for lora in request.loras), edit_image=request.input_image,
            frames=request.frames, fps=request.fps))

    def run(self, jobs: Sequence[PreparedJob], on_result: Callable[[ImageResult], None]) -> None:
        """The jobs of each model in turn: the persona's base model, then each edit or video step's model."""
        by_model: dict[str | None, list[PreparedJob]] = {}
        for prepared in jobs:
            by_model.setdefault(prepared.job.request.model, []).append(prepared)
        for model, group in by_model.items():
            self._run_on(self.diffusion if model is None else self.diffusion.for_model(model), group, on_result)

    def _run_on(self, diffusion, jobs: Sequence[PreparedJob], on_result: Callable[[ImageResult], None]) -> None:
        payloads = [prepared.payload for prepared in jobs]
        for chunk in plan_batches(payloads, max(1, int(diffusion.batch_size))):
            started = time.perf_counter()
            try:
                results = diffusion.generate_with_manifests([payloads[i] for i in chunk], log=self.log)
            except Exception as exc:
                for i in chunk:
                    on_result(ImageResult(jobs[i].job.key, error=f"{type(exc).__name__}: {exc}",
                                          permanent=isinstance(exc, PERMANENT_ERRORS)))
                continue
            elapsed = time.perf_counter() - started
            timings = {"batch_s": round(elapsed, 4), "batch_size": len(chunk), "per_image_s": round(elapsed / len(chunk), 4)}
            for i, (image, fields) in zip(chunk, results):
                job = jobs[i].job
                clip, facts = None, {}
                try:
                    job.folder.mkdir(parents=True, exist_ok=True)
                    if isinstance(image, list):  # a video job's frames: the clip, and its first frame as the image
                        from persona_pipeline.video import write_clip

                        clip = job.folder / f"{job.stem}.mp4"
                        facts = write_clip(image, clip, job.request.fps)
                        image = image[0]
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    image_path = job.folder / f"{job.stem}.png"
                    atomic_write(image_path, buffer.getvalue())
                except Exception as exc:
                    on_result(storing_failed(job.key, exc))
                    continue
                # The pipeline call as made (what `reproduce` reads) is both what was submitted and the
                # manifest's `diffusers` record.
                on_result(ImageResult(job.key, image_path=image_path, video_path=clip, video_facts=facts, submitted=fields,
                                      fields={"base_model": diffusion.base_model, "diffusers": fields},
                                      timings=dict(timings)))


def build(*, comfyui, diffusion, checkpoint: str, log: Callable[[str], None]) -> DiffusersBackend:
    """This backend on the `candidates` asset's resources (generation/backends/__init__.py)."""
    return DiffusersBackend(diffusion, log=log)
