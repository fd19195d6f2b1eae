"""From planned jobs to images on disk: fill the step's template, inject the persona's LoRAs,
check the graph, run it on ComfyUI or local diffusers, and store each image with its manifest and
the exact graph (`<stem>.workflow.json`) before its candidate row is written.
"""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from persona_pipeline.domain import workflows as wf
from persona_pipeline.fileio import atomic_write, entry_refusal, sha256_file
from persona_pipeline.generation.runs import PlannedJob

DEFAULT_CONTROLNET = "control_v11p_sd15_openpose.pth"
# Errors of the local backend that will happen again on a rerun: a bad file or value, not a hiccup.
PERMANENT_LOCAL_ERRORS = (ValueError, FileNotFoundError, KeyError, wf.WorkflowError)


def job_stem(job) -> str:
    """File stem of a job's image, manifest and graph: its place in the tree and its seed."""
    return f"p{job.parent_id or 0}-s{job.slot:02d}-{job.seed}"


@dataclass(frozen=True)
class LoraInUse:
    """One LoRA of the persona's chain: library row, file, weight, and its name on ComfyUI."""

    lora_id: int
    path: str
    sha256: str
    weight: float
    comfy_name: str


@dataclass
class BuiltJob:
    planned: PlannedJob
    graph: dict
    uploads: dict[str, Path]
    folder: Path
    stem: str
    manifest: dict


@dataclass
class JobOutcome:
    """One job's end: an image (with its manifest written) or an error."""

    planned: PlannedJob
    image_path: Path | None = None
    manifest_path: Path | None = None
    sha256: str | None = None
    server: str | None = None
    error: str | None = None
    permanent: bool = False
    # Not the job's fault: no ComfyUI server could take it, or its image could not be stored (a full
    # disk). It counts against neither its graph nor its parent and is made again once that is fixed.
    retry_later: bool = False
    attempts: int = 1
    timings: dict = field(default_factory=dict)


@dataclass
class GenerationContext:
    """What every job of one persona shares in an asset run."""

    slug: str
    persona_folder: Path
    templates_dir: Path
    checkpoint: str  # ComfyUI ckpt_name
    base_model: str  # what the diffusers backend loads (for the manifest)
    loras: list[LoraInUse]
    default_size: int
    min_side_local: int
    dagster_run_id: str | None
    comfy_default_size: int = 512  # when a step sets no width/height (SD1.5's native size)
    log: Callable[[str], None] = print


class GenerationExecutor:
    """Runs a batch of planned jobs on their backends; `on_outcome` is called as each one ends
    (from worker threads for ComfyUI), so images are recorded as they arrive."""

    def __init__(self, ctx: GenerationContext, storage, diffusion, comfyui):
        self.ctx = ctx
        self.storage = storage
        self.diffusion = diffusion
        self.comfyui = comfyui
        self._templates: dict[str, wf.WorkflowTemplate] = {}

    # ---- building -------------------------------------------------------------------------
    def template(self, name: str) -> wf.WorkflowTemplate:
        if name not in self._templates:
            path = self.ctx.templates_dir / f"{name}.json"
            if not path.is_file():
                raise wf.TemplateError(f"workflow template {name!r} not found: {path}")
            self._templates[name] = wf.load_template(path)
        return self._templates[name]

    def build(self, job: PlannedJob) -> BuiltJob:
        """The filled, LoRA-injected, checked graph and the manifest of one job. Raises
        WorkflowError (a broken template, placeholder or parameter) before anything is sent."""
        params = job.params
        template = self.template(job.template)
        if "parent_image" in template.placeholders and job.parent_image is None:
            raise wf.TemplateError(f"template {template.name!r} refines a parent image (`{{{{parent_image}}}}`); "
                                   f"it cannot be step {job.step_position} of a run, which has no parents")
        size = self.ctx.default_size if job.backend != "comfyui" else self.ctx.comfy_default_size
        width, height = params.get("width") or size, params.get("height") or size
        pose_image = None
        if params.get("pose_image"):
            # Read from the persona folder under the user-folder rule: no link, no `..` (fileio).
            refusal = entry_refusal(self.ctx.persona_folder, Path(params["pose_image"]))
            if refusal:
                raise wf.TemplateError(f"pose_image {params['pose_image']!r} is refused: {refusal}")
            pose_path = (self.ctx.persona_folder / params["pose_image"]).resolve()
            if not pose_path.is_file():
                raise wf.TemplateError(f"pose_image {params['pose_image']!r} not found: {pose_path}")
            pose_image = str(pose_path)
        elif "pose_image" in template.placeholders:
            raise wf.TemplateError(f"template {template.name!r} needs a pose reference: set params.pose_image in persona.yaml")
        folder = self.storage.run_dir(self.ctx.slug, job.run_id, job.step_position)
        stem = job_stem(job)
        values = {
            "prompt": job.prompt, "negative_prompt": job.negative_prompt, "checkpoint": self.ctx.checkpoint,
            "filename_prefix": f"persona-pipeline/{self.ctx.slug}/run{job.run_id}-step{job.step_position}",
            "seed": job.seed, "steps": params["steps"], "cfg": float(params["cfg"]), "sampler": params["sampler"],
            "scheduler": params["scheduler"], "width": width, "height": height, "batch_size": 1,
            "denoise": float(params["denoise"]), "parent_image": job.parent_image, "pose_image": pose_image,
            "controlnet": params.get("controlnet") or DEFAULT_CONTROLNET,
            "control_strength": float(params["control_strength"]),
        }
        graph = wf.fill_template(template, values)
        graph = wf.inject_loras(graph, [wf.LoraRef(l.comfy_name, l.weight, l.weight) for l in self.ctx.loras],
                                source=template.name)
        wf.validate_graph(graph, source=template.name)
        min_side = 256 if job.backend == "comfyui" else self.ctx.min_side_local
        wf.validate_params(graph, min_side=min_side, source=template.name)
        uploads = {node: Path(graph[node]["inputs"]["image"]) for node in wf.load_image_nodes(graph)
                   if graph[node]["inputs"].get("image") in {job.parent_image, pose_image} - {None}}
        manifest = {
            "persona": self.ctx.slug, "run_id": job.run_id, "step": job.step_position, "step_name": job.step_name,
            "job_id": job.job_id, "slot": job.slot, "parent_candidate_id": job.parent_id,
            "parent_image": job.parent_image, "parent_sha256": job.parent_sha256,
            "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
            "sampler": params["sampler"], "scheduler": params["scheduler"], "steps": params["steps"],
            "cfg": float(params["cfg"]), "denoise": float(params["denoise"]),
            "width": width if "width" in template.placeholders else None,
            "height": height if "height" in template.placeholders else None,
            "pose_image": pose_image, "control_strength": float(params["control_strength"]) if pose_image else None,
            "base_model": self.ctx.checkpoint if job.backend == "comfyui" else self.ctx.base_model,
            "loras": [{"id": l.lora_id, "name": l.comfy_name, "path": l.path, "sha256": l.sha256, "weight": l.weight}
                      for l in self.ctx.loras],
            "template": template.name, "template_sha256": template.sha256, "backend": job.backend,
            "dagster_run_id": self.ctx.dagster_run_id,
        }
        return BuiltJob(job, graph, uploads, folder, stem, manifest)

    # ---- running --------------------------------------------------------------------------
    def run(self, built: list[BuiltJob], on_outcome: Callable[[JobOutcome], None]) -> None:
        comfy = [b for b in built if b.planned.backend == "comfyui"]
        local = [b for b in built if b.planned.backend != "comfyui"]
        threads = []
        if comfy:
            # ComfyUI jobs wait on remote servers; local diffusers work runs beside them.
            thread = threading.Thread(target=self._run_comfyui, args=(comfy, on_outcome), name="comfyui-jobs")
            thread.start()
            threads.append(thread)
        if local:
            self._run_diffusers(local, on_outcome)
        for thread in threads:
            thread.join()

    def _finish(self, b: BuiltJob, image_path: Path, graph: dict, server: str | None, timings: dict,
                extra: dict | None = None, attempts: int = 1) -> JobOutcome:
        sha = sha256_file(image_path)
        atomic_write(b.folder / f"{b.stem}.workflow.json", json.dumps(graph, indent=2, sort_keys=True).encode())
        manifest = dict(b.manifest, image=image_path.name, sha256=sha, server=server, timings=timings,
                        workflow=f"{b.stem}.workflow.json", **(extra or {}))
        manifest_path = b.folder / f"{b.stem}.json"
        atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())  # last: its presence means "complete"
        return JobOutcome(b.planned, image_path, manifest_path, sha, server, timings=timings, attempts=attempts)

    def _run_comfyui(self, built: list[BuiltJob], on_outcome: Callable[[JobOutcome], None]) -> None:
        from persona_pipeline.resources.comfyui import ComfyJob, ComfyResult, ComfyUIUnavailable

        by_key = {str(b.planned.job_id): b for b in built}
        jobs = [ComfyJob(key=key, graph=b.graph, output_dir=b.folder, file_stem=b.stem, uploads=b.uploads)
                for key, b in by_key.items()]
        for b in built:
            b.folder.mkdir(parents=True, exist_ok=True)

        def done(result) -> None:
            b = by_key[result.key]
            try:
                if isinstance(result, ComfyResult):
                    for extra in result.images[1:]:  # one candidate per job: a template saving more keeps its first
                        extra.unlink(missing_ok=True)
                    outcome = self._finish(b, result.images[0], result.graph, result.server, dict(result.timings),
                                           {"prompt_id": result.prompt_id, "failed_attempts": result.attempts},
                                           attempts=len(result.attempts) + 1)
                else:
                    outcome = JobOutcome(b.planned, error=str(result.error), permanent=result.permanent,
                                         retry_later=isinstance(result.error, ComfyUIUnavailable),
                                         attempts=len(result.attempts) or 1)
            except Exception as exc:  # a disk error while storing must still settle the job
                outcome = JobOutcome(b.planned, error=f"storing the image failed: {exc}", retry_later=isinstance(exc, OSError))
            on_outcome(outcome)

        self.comfyui.run_jobs(jobs, log=self.ctx.log, on_done=done)

    def _run_diffusers(self, built: list[BuiltJob], on_outcome: Callable[[JobOutcome], None]) -> None:
        from persona_pipeline.resources.diffusion import DiffusersJob

        loras = tuple((l.path, l.weight) for l in self.ctx.loras)
        requests = []
        for b in built:
            m = b.manifest
            requests.append(DiffusersJob(
                prompt=m["prompt"], negative_prompt=m["negative_prompt"], seed=m["seed"], steps=m["steps"], cfg=m["cfg"],
                sampler=m["sampler"], scheduler=m["scheduler"], width=m["width"] or self.ctx.default_size,
                height=m["height"] or self.ctx.default_size, denoise=m["denoise"], init_image=b.planned.parent_image,
                control_image=m["pose_image"], control_strength=m["control_strength"] or wf.CONTROL_STRENGTH_DEFAULT,
                loras=loras))
        # One pipeline call per batch (the backend's grouping: jobs equal but for the seed), and each
        # batch's images stored before the next starts, so a crash loses at most one batch.
        from persona_pipeline.resources.diffusion import plan_batches

        for chunk in plan_batches(requests, max(1, int(self.diffusion.batch_size))):
            started = time.perf_counter()
            try:
                results = self.diffusion.generate_with_manifests([requests[i] for i in chunk], log=self.ctx.log)
            except Exception as exc:
                for i in chunk:
                    on_outcome(JobOutcome(built[i].planned, error=f"{type(exc).__name__}: {exc}",
                                          permanent=isinstance(exc, PERMANENT_LOCAL_ERRORS)))
                continue
            elapsed = time.perf_counter() - started
            for i, (image, fields) in zip(chunk, results):
                b = built[i]
                b.folder.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                image_path = b.folder / f"{b.stem}.png"
                try:
                    atomic_write(image_path, buffer.getvalue())
                    outcome = self._finish(b, image_path, b.graph, None,
                                           {"batch_s": round(elapsed, 4), "batch_size": len(chunk),
                                            "per_image_s": round(elapsed / len(chunk), 4)}, {"diffusers": fields})
                except Exception as exc:
                    outcome = JobOutcome(b.planned, error=f"storing the image failed: {exc}", retry_later=isinstance(exc, OSError))
                on_outcome(outcome)
