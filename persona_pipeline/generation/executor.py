"""From planned jobs to images on disk: build each job's GenerationRequest once (the step's
template and settings, the persona's LoRAs), hand it to the backend its step names
(generation/backends), and store each image with its manifest and what the backend ran
(`<stem>.workflow.json`: the ComfyUI graph, the diffusers call) before its candidate row is written.

A manifest is the job's place in the tree, the request (`GenerationRequest.record`) and what the
backend added (base model, server, prompt id, batch fields, timings).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping


from persona_pipeline.domain import workflows as wf
from persona_pipeline.domain.generation_request import LoraInUse, build_request, takes_input_image
from persona_pipeline.fileio import atomic_write, entry_refusal, sha256_file
from persona_pipeline.generation.backends import GenerationBackend, ImageJob, ImageResult, PreparedJob, storing_failed
from persona_pipeline.generation.runs import PlannedJob

__all__ = ["BuiltJob", "GenerationContext", "GenerationExecutor", "JobOutcome", "job_stem"]


def job_stem(job) -> str:
    """File stem of a job's image, manifest and graph: its place in the tree and its seed."""
    return f"p{job.parent_id or 0}-s{job.slot:02d}-{job.seed}"


@dataclass
class BuiltJob:
    planned: PlannedJob
    backend: GenerationBackend
    prepared: PreparedJob
    manifest: dict  # the job's place in the tree and its request; the backend's fields join when it ends


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
    loras: list[LoraInUse]
    dagster_run_id: str | None
    log: Callable[[str], None] = print


class GenerationExecutor:
    """Runs a batch of planned jobs on their backends; `on_outcome` is called as each one ends
    (from worker threads when several backends run at once), so images are recorded as they arrive."""

    def __init__(self, ctx: GenerationContext, storage, backends: Mapping[str, GenerationBackend]):
        self.ctx = ctx
        self.storage = storage
        self.backends = backends
        self._templates: dict[str, wf.WorkflowTemplate] = {}

    # ---- building -------------------------------------------------------------------------
    def template(self, name: str) -> wf.WorkflowTemplate:
        if name not in self._templates:
            path = self.ctx.templates_dir / f"{name}.json"
            if not path.is_file():
                raise wf.TemplateError(f"workflow template {name!r} not found: {path}")
            self._templates[name] = wf.load_template(path)
        return self._templates[name]

    def backend(self, name: str) -> GenerationBackend:
        if name not in self.backends:
            raise wf.WorkflowError(f"no generation backend {name!r}; known: {', '.join(sorted(self.backends))}")
        return self.backends[name]

    def build(self, job: PlannedJob) -> BuiltJob:
        """The request of one job, prepared by its backend, and its manifest. Raises WorkflowError
        (a broken template, placeholder or parameter) before anything is sent."""
        template = self.template(job.template)
        backend = self.backend(job.backend)
        input_image, input_size = self._input_image(job) if takes_input_image(job.params) else (None, None)
        request = build_request(template, job.params, prompt=job.prompt, negative_prompt=job.negative_prompt,
                                seed=job.seed, parent_image=None if input_image else job.parent_image,
                                pose_image=self._persona_file(job.params, "pose_image"),
                                loras=self.ctx.loras, default_size=backend.default_size, min_side=backend.min_side,
                                step_position=job.step_position, input_image=input_image, input_size=input_size)
        image_job = ImageJob(key=str(job.job_id), request=request,
                             folder=self.storage.run_dir(self.ctx.slug, job.run_id, job.step_position), stem=job_stem(job),
                             label=f"{self.ctx.slug}/run{job.run_id}-step{job.step_position}")
        manifest = {
            "persona": self.ctx.slug, "run_id": job.run_id, "step": job.step_position, "step_name": job.step_name,
            "job_id": job.job_id, "slot": job.slot, "parent_candidate_id": job.parent_id,
            "parent_sha256": job.parent_sha256, **request.record(), "backend": backend.name,
            "dagster_run_id": self.ctx.dagster_run_id,
        }
        return BuiltJob(job, backend, backend.prepare(image_job), manifest)

    def _persona_file(self, params: dict, name: str) -> str | None:
        """params.<name> (a pose reference, an image to edit), read from the persona folder under the
        user-folder rule: no link on the way, nothing outside it (fileio.entry_refusal)."""
        if not params.get(name):
            return None
        refusal = entry_refusal(self.ctx.persona_folder, Path(params[name]))
        if refusal:
            raise wf.TemplateError(f"params.{name} {params[name]!r} is refused: {refusal}")
        path = (self.ctx.persona_folder / params[name]).resolve()
        if not path.is_file():
            raise wf.TemplateError(f"params.{name} {params[name]!r} not found: {path}")
        return str(path)

    def _input_image(self, job: PlannedJob) -> tuple[str | None, tuple[int, int] | None]:
        """An edit or video job's image and its size: a file in the persona folder (params.input_image), else
        the candidate the plan chose (the parent, or the ancestor `step:<name>` names)."""
        from PIL import Image

        source = job.params.get("input_image")
        path = self._persona_file(job.params, "input_image") if source and not source.startswith("step:") else job.input_image
        if path is None:
            return None, None
        try:
            with Image.open(path) as image:
                return path, image.size
        except (OSError, ValueError) as exc:
            kind = "video" if job.params.get("video_model") else "edit"
            raise wf.TemplateError(f"input image {path} of {kind} step {job.step_name!r} is not a readable image "
                                   f"({exc})") from None

    # ---- running --------------------------------------------------------------------------
    def run(self, built: list[BuiltJob], on_outcome: Callable[[JobOutcome], None]) -> None:
        """Every backend's jobs at once: ComfyUI jobs wait on remote servers while local work runs beside them."""
        by_backend: dict[str, list[BuiltJob]] = {}
        for b in built:
            by_backend.setdefault(b.backend.name, []).append(b)
        first, *others = by_backend.values() or [[]]
        threads = [threading.Thread(target=self._run_group, args=(group, on_outcome), name=f"{group[0].backend.name}-jobs")
                   for group in others]
        for thread in threads:
            thread.start()
        if first:
            self._run_group(first, on_outcome)  # in this thread
        for thread in threads:
            thread.join()

    def _run_group(self, group: list[BuiltJob], on_outcome: Callable[[JobOutcome], None]) -> None:
        by_key = {b.prepared.job.key: b for b in group}

        def settle(result: ImageResult) -> None:
            b = by_key[result.key]
            if result.error is not None:
                outcome = JobOutcome(b.planned, error=result.error, permanent=result.permanent,
                                     retry_later=result.retry_later, attempts=result.attempts)
            else:
                try:
                    outcome = self._finish(b, result)
                except Exception as exc:  # a disk error while storing must still settle the job
                    failed = storing_failed(result.key, exc)
                    outcome = JobOutcome(b.planned, error=failed.error, retry_later=failed.retry_later)
            on_outcome(outcome)

        group[0].backend.run([b.prepared for b in group], settle)

    def _finish(self, b: BuiltJob, result: ImageResult) -> JobOutcome:
        job = b.prepared.job
        sha = sha256_file(result.image_path)
        workflow = f"{job.stem}.workflow.json"
        atomic_write(job.folder / workflow, json.dumps(result.submitted, indent=2, sort_keys=True).encode())
        clip = {}
        if result.video_path is not None:  # a video step: the clip beside its first frame, both hashed
            clip = {"video": result.video_path.name, "video_sha256": sha256_file(result.video_path),
                    "video_facts": result.video_facts}
        manifest = dict(b.manifest, **result.fields, image=result.image_path.name, sha256=sha, server=result.server,
                        timings=result.timings, workflow=workflow, **clip)
        manifest_path = job.folder / f"{job.stem}.json"
        atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())  # last: its presence means "complete"
        return JobOutcome(b.planned, result.image_path, manifest_path, sha, result.server, timings=result.timings,
                          attempts=result.attempts)
