"""The ComfyUI backend: a request becomes a graph through its workflow template (filled, the
persona's LoRAs injected, parameters checked: domain/workflows.py) and runs on the ComfyUI servers
through the pool resource (resources/comfyui.py), which uploads the parent and pose images,
schedules, retries and downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from persona_pipeline.domain import workflows as wf
from persona_pipeline.generation.backends import ImageJob, ImageResult, PreparedJob, storing_failed


class ComfyUIBackend:
    name = "comfyui"

    def __init__(self, pool, *, checkpoint: str, log: Callable[[str], None] = print,
                 default_size: int = 512, min_side: int = 256):
        self.pool = pool  # a ComfyUIPool
        self.checkpoint = checkpoint  # the ckpt_name the servers load
        self.log = log
        self.default_size = default_size  # SD1.5's native size
        self.min_side = min_side

    def graph(self, job: ImageJob) -> dict:
        """The filled, LoRA-injected, checked graph of one job (the template itself was checked when loaded)."""
        request = job.request
        values = {
            # An edit step loads its edit model's diffusion model (the step's `checkpoint`), not the persona's.
            "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "checkpoint": request.checkpoint or self.checkpoint, "input_image": request.input_image,
            "filename_prefix": f"persona-pipeline/{job.label}", "seed": request.seed, "steps": request.steps,
            "cfg": request.cfg, "sampler": request.sampler, "scheduler": request.scheduler,
            "width": request.width, "height": request.height, "batch_size": 1, "denoise": request.denoise,
            "parent_image": request.parent_image, "pose_image": request.control_image,
            "controlnet": request.controlnet, "control_strength": request.control_strength,
            "frames": request.frames, "fps": request.fps,
        }
        source = request.template.name
        graph = wf.fill_template(request.template, values)
        graph = wf.inject_loras(graph, [wf.LoraRef(l.comfy_name, l.weight, l.weight) for l in request.loras], source=source)
        wf.validate_params(graph, min_side=self.min_side, source=source)  # the template's own literal values too
        return graph

    def prepare(self, job: ImageJob) -> PreparedJob:
        from persona_pipeline.resources.comfyui import ComfyJob

        graph = self.graph(job)
        local = {job.request.parent_image, job.request.control_image, job.request.input_image} - {None}
        uploads = {node: Path(graph[node]["inputs"]["image"]) for node in wf.load_image_nodes(graph)
                   if graph[node]["inputs"].get("image") in local}
        return PreparedJob(job, ComfyJob(key=job.key, graph=graph, output_dir=job.folder, file_stem=job.stem,
                                         uploads=uploads))

    def run(self, jobs: Sequence[PreparedJob], on_result: Callable[[ImageResult], None]) -> None:
        from persona_pipeline.resources.comfyui import ComfyUIUnavailable

        prepared_by_key = {prepared.job.key: prepared.job for prepared in jobs}
        for prepared in jobs:
            prepared.job.folder.mkdir(parents=True, exist_ok=True)

        def done(result) -> None:
            try:
                if result.ok:
                    for extra in result.images[1:]:  # one candidate per job: a template saving more keeps its first
                        extra.unlink(missing_ok=True)
                    request = prepared_by_key[result.key].request
                    if request.video_model:
                        on_result(_clip_result(result, request.video_model, request.checkpoint))
                        return
                    outcome = ImageResult(result.key, image_path=result.images[0], submitted=result.graph,
                                          fields={"base_model": prepared_by_key[result.key].request.checkpoint or self.checkpoint,
                                                  "prompt_id": result.prompt_id,
                                                  "failed_attempts": result.attempts},
                                          server=result.server, timings=dict(result.timings),
                                          attempts=len(result.attempts) + 1)
                else:
                    outcome = ImageResult(result.key, error=str(result.error), permanent=result.permanent,
                                          retry_later=isinstance(result.error, ComfyUIUnavailable),
                                          attempts=len(result.attempts) or 1)
            except Exception as exc:  # a disk error while storing must still settle the job
                outcome = storing_failed(result.key, exc)
            on_result(outcome)

        self.pool.run_jobs([prepared.payload for prepared in jobs], log=self.log, on_done=done)


def _clip_result(result, video_model: str, checkpoint: str) -> ImageResult:
    """A video job's end: the clip ComfyUI saved, and its first frame stored beside it as the image. A
    server that saved no video (a still, a file FFmpeg cannot read) fails the job, naming the file."""
    from persona_pipeline.domain.media import MediaError
    from persona_pipeline.fileio import atomic_write
    from persona_pipeline.video import clip_facts, clip_poster_png, is_clip

    clip = result.images[0]
    where = f"video step ({video_model}): ComfyUI at {result.server} returned no video"
    if not is_clip(clip):
        clip.unlink(missing_ok=True)
        return ImageResult(result.key, error=f"{where}: it saved {clip.name!r}, not a clip (.mp4, .webm, .mov)",
                           permanent=True, attempts=len(result.attempts) + 1)
    try:
        facts = clip_facts(clip)
        image_path = clip.with_suffix(".png")
        atomic_write(image_path, clip_poster_png(clip))
    except MediaError as exc:
        clip.unlink(missing_ok=True)
        return ImageResult(result.key, error=f"{where}: {exc}", permanent=True, attempts=len(result.attempts) + 1)
    return ImageResult(result.key, image_path=image_path, video_path=clip, video_facts=facts, submitted=result.graph,
                       fields={"base_model": checkpoint, "prompt_id": result.prompt_id,
                               "failed_attempts": result.attempts},
                       server=result.server, timings=dict(result.timings), attempts=len(result.attempts) + 1)


def build(*, comfyui, diffusion, checkpoint: str, log: Callable[[str], None]) -> ComfyUIBackend:
    """This backend on the `candidates` asset's resources (generation/backends/__init__.py)."""
    return ComfyUIBackend(comfyui, checkpoint=checkpoint, log=log)
