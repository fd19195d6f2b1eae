"""candidates: start a generation run for every planned content prompt and move every run of the
persona along its step tree. Each pass plans the jobs that generating steps need, runs them all at
once (ComfyUI servers and local diffusers), stores each image with its manifest and submitted graph,
scores it with open_clip (identity gate, keep-best), and moves finished steps to voting. A run
waiting for approval has nothing to generate, so it never holds up the others."""


import json
import threading
from collections import Counter
from pathlib import Path
from typing import Callable

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import models, review
from persona_pipeline.domain import workflows as wf
from persona_pipeline.domain.ui_pages import WorkInFlight, still_running_note
from persona_pipeline.generation import curation, runs
from persona_pipeline.fileio import sha256_file
from persona_pipeline.generation.backends import make_backends
from persona_pipeline.generation.executor import GenerationContext, GenerationExecutor, JobOutcome, job_stem
from persona_pipeline.generation.lora_chain import LoraChainError, loras_in_use
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.persona_generation import PipelineStep
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.identity import ClipIdentity, FaceModelError, reference_for
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.evaluation import FaceModel
from persona_pipeline.resources.comfyui import ComfyUIPool
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline.training.families.edit_models import EditStepError, resolve_edit_model
from persona_pipeline.training.families.video_models import VideoStepError, resolve_video_model
from persona_pipeline.training.params import TrainingConfigError
from persona_pipeline.resources.generation import GenerationDefaults
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.review_policy import AutoReviewer
from persona_pipeline.resources.storage import PersonaStorage

MAX_PASSES = 32  # plan → run → curate → review rounds per materialisation; each pass must make progress


class CandidatesConfig(dg.Config):
    """Launchpad settings of one `candidates` materialisation."""

    start_runs: bool = True  # turn the persona's planned content prompts into new runs
    retry_failed_steps: bool = False  # give steps that failed (e.g. a broken template, since fixed) another go


def pipeline_steps(config: PersonaConfig, default_backend: str, default_n: int, family: Callable[[], str] | None = None,
                   base_model: str | None = None) -> list[runs.StepSpec]:
    """persona.yaml `generation.steps`, or one txt2img step of PERSONA_CANDIDATES_PER_RUN images. An edit or
    video step's model and template are resolved here (`family` is asked only when the step names neither),
    and stored with its params, so a run keeps the model it started with."""
    steps = config.generation.steps or [PipelineStep(name="base", template="txt2img_lora", n=default_n)]
    backend = config.generation.backend or default_backend
    specs = []
    for s in steps:
        template, params = s.template, s.params.model_dump()
        if s.type == "edit":
            asked = config.family or (family() if family and not (s.model or s.template) else None)
            edit, weights = resolve_edit_model(s.name, s.model, s.template, asked, base_model)
            template = s.template or edit.template
            params.update(edit_model=edit.name, model=weights, checkpoint=s.checkpoint or edit.comfyui_file)
        elif s.type == "video":
            video, weights = resolve_video_model(s.name, s.model, s.template, base_model)
            template = s.template or video.template
            params.update(video_model=video.name, model=weights, checkpoint=s.checkpoint or video.comfyui_file,
                          frames=params["frames"] or video.frames, fps=params["fps"] or video.fps)
        specs.append(runs.StepSpec(name=s.name, template=template, n=s.n, keep=s.keep, top_k=s.top_k,
                                   backend=s.backend or backend, params=params))
    return specs


@dg.asset(partitions_def=persona_partitions, deps=["lora_model", "content_plan"], group_name="generation",
          kinds={"diffusers", "comfyui"})
def candidates(context: dg.AssetExecutionContext, config: CandidatesConfig, database: AppDatabase, storage: PersonaStorage,
               diffusion: DiffusionBackend, comfyui: ComfyUIPool, generation: GenerationDefaults, clip: ClipModel,
               face: FaceModel, auto_review: AutoReviewer, links: UiLinks) -> dg.MaterializeResult:
    """Starts a generation run per planned prompt and moves every open run along its steps (images, manifests,
    open_clip scores). Started by the persona_generation schedule (job generation_runs), the review_events
    sensor after a step approval or kill (job advance_runs), the generation job or persona_chain."""
    slug = context.partition_key
    dagster_run_id = context.run.run_id
    log = context.log.info
    with database.session() as session:
        persona, persona_config = persona_for(session, slug)
        persona_id, folder = persona.id, Path(persona.folder)
        try:
            diffusion = diffusion.for_persona(persona_config)
        except TrainingConfigError as exc:
            raise dg.Failure(f"{slug}: {exc}") from None
        try:
            loras = loras_in_use(session, persona_id, slug, generation)
        except LoraChainError as exc:
            raise dg.Failure(str(exc)) from None
        try:
            steps = pipeline_steps(persona_config, generation.backend, diffusion.candidates_per_run,
                                   family=diffusion.family_name, base_model=diffusion.base_model)
        except (EditStepError, VideoStepError) as exc:
            raise dg.Failure(f"{slug}: persona.yaml generation.steps: {exc}") from None
        if any(s.backend == "comfyui" for s in steps) and not comfyui.server_urls():
            raise dg.Failure(f"{slug}: a step uses the comfyui backend but COMFYUI_URLS is empty")
        photo_paths = [Path(p) for p in session.scalars(select(models.SourcePhoto.path).where(
            models.SourcePhoto.persona_id == persona_id, models.SourcePhoto.status == "accepted"))]

        def alive(run_id: str | None) -> bool:
            if run_id == dagster_run_id:
                return True
            other = context.instance.get_run_by_id(run_id) if run_id else None
            return other is not None and not other.is_finished

        adopted, abandoned = runs.recover_jobs(session, persona_id, alive, lambda job: _adopt(session, job, storage, slug))
        if adopted or abandoned:
            context.log.warning(f"{slug}: {adopted} image(s) from an interrupted run adopted, {abandoned} job(s) abandoned")
        if config.retry_failed_steps:
            for step in session.scalars(select(models.RunStep).join(models.GenerationRun).where(
                    models.GenerationRun.persona_id == persona_id, models.RunStep.status == "failed")):
                step.status, step.failure_reason, step.run.status, step.run.failure_reason = "generating", None, "running", None
        started = _start_runs(session, persona_id, steps, dagster_run_id) if config.start_runs else []
    if started:
        log(f"{slug}: started run(s) {', '.join(map(str, started))}")

    ctx = GenerationContext(slug=slug, persona_folder=folder, templates_dir=generation.templates_dir(), loras=loras,
                            dagster_run_id=dagster_run_id, log=log)
    backends = make_backends(comfyui=comfyui, diffusion=diffusion, log=log,
                             checkpoint=persona_config.generation.checkpoint or generation.comfyui_checkpoint)
    executor = GenerationExecutor(ctx, storage, backends)
    try:
        without = persona_config.generation.identity_ignores()
        identity = reference_for(face.identity(clip, without), ClipIdentity(clip, without), photo_paths)
    except FaceModelError as exc:
        raise dg.Failure(f"{slug}: {exc}") from None
    threshold = persona_config.generation.identity_threshold
    made: list[int] = []
    tally: Counter = Counter()
    unreachable: dict[int, str] = {}  # step id -> the error of a job to make again later (server down, disk full)
    for _ in range(MAX_PASSES):
        with database.session() as session:
            planned, notes = runs.plan_jobs(session, persona_id, dagster_run_id, _locate_image)
        for note in notes:
            context.log.warning(f"{slug}: {note}")
        built, broken = [], {}
        for job in planned:
            if job.step_id in broken:
                continue
            try:
                built.append(executor.build(job))
            except wf.WorkflowError as exc:
                broken[job.step_id] = str(exc)
        with database.session() as session:
            for step_id, reason in broken.items():
                runs.fail_step(session, step_id, reason)
                context.log.error(f"{slug}: step {step_id} failed and will not be resubmitted: {reason}")
            for b in built:
                session.get(models.GenerationJob, b.planned.job_id).status = "running"
        built = [b for b in built if b.planned.step_id not in broken]
        tally["steps_failed"] += len(broken)

        new_ids = _execute(executor, built, database, slug, context, tally, unreachable)
        made.extend(new_ids)
        with database.session() as session:
            counts = curation.score(session, clip, new_ids, identity, threshold)
            tally.update(counts)
            reached = runs.finish_steps(session, persona_id, hold=unreachable)
            approved = 0
            for step in reached:
                votes = auto_review.vote_step(session, _live(session, step.id))
                tally["auto_votes"] += votes
                last = step.position == len(step.run.steps)
                if not last and auto_review.approve_step(session, step, review.default_top_k(step)):
                    approved += 1
        if unreachable or (not built and not broken and not approved):
            break  # with no server up or no disk space, another pass would only fail the same way

    with database.session() as session:
        rows = [session.get(models.Candidate, cid) for cid in made]
        preview = [(Path(r.image_path), f"#{r.id} s{_position(session, r)} {r.status} "
                    f"id={_fmt(r.identity_score)} clip={_fmt(r.clip_score)}") for r in rows]
        records = [{"candidate": r.id, "run": r.run_id, "step": _position(session, r), "parent": r.parent_id or 0,
                    "status": r.status, "seed": r.seed, "clip_score": float(r.clip_score or 0.0),
                    "identity_score": float(r.identity_score or 0.0),
                    "gallery": links.links.review_step_url(r.step_id), "manifest": Path(r.manifest_path).name}
                   for r in rows]
        run_rows = [{"run": run.id, "status": run.status, "prompt": run.prompt[:80], "source": run.prompt_source or "",
                     "steps": " → ".join(f"{s.name}:{s.status}" for s in run.steps), "failure": run.failure_reason or ""}
                    for run in session.scalars(select(models.GenerationRun).where(
                        models.GenerationRun.persona_id == persona_id,
                        models.GenerationRun.status.in_(("running", "awaiting_review", "failed")))
                        .order_by(models.GenerationRun.id.desc()).limit(50))]
        in_flight = [WorkInFlight(run_id, jobs, run_ids) for run_id, (jobs, run_ids)
                     in sorted(runs.jobs_in_flight(session, persona_id, dagster_run_id).items()) if alive(run_id)]
    running_note = still_running_note(len(made), in_flight, links.links.run_url)
    log(f"{slug}: {len(made)} candidate(s) made; {dict(tally)}")
    storage.push_written()  # object storage: a failed upload fails the step (a teardown failure only logs)
    if unreachable:
        # A batch cut short by an outage (no server, a full disk) is not a finished batch: the run fails (and alerts),
        # the images already made stay registered, and the next run makes only the missing ones.
        raise dg.Failure(
            f"{slug}: {tally['jobs_left_for_next_run']} job(s) in {len(unreachable)} step(s) could not be completed: "
            f"{next(iter(unreachable.values()))}. {len(made)} image(s) made before that are kept; the steps stay "
            "generating, so materialise candidates again once that is fixed (a ComfyUI server back, disk space freed) "
            "and only the missing images are made.",
            metadata={"candidates": len(made), "jobs_left_for_next_run": tally["jobs_left_for_next_run"],
                      "steps_waiting": ", ".join(map(str, sorted(unreachable)))})
    return dg.MaterializeResult(metadata={
        "runs_started": len(started),
        "candidates": len(made),
        "jobs_failed": tally["jobs_failed"],
        "steps_failed": tally["steps_failed"],
        "gate_rejected": tally["gate_rejected"],
        "culled": tally["culled"],
        "identity_method": identity.method,
        **({"identity_warning": identity.warning()} if identity.warning() else {}),
        "auto_votes": tally["auto_votes"],
        "loras": ", ".join(f"#{l.lora_id}×{l.weight:g}" for l in loras),
        **sheet_metadata("contact_sheet", preview, storage, links, slug,
                         empty=running_note or "_no images: this materialisation made none and no other run is making any_"),
        **({"still_running": dg.MetadataValue.md(running_note)} if running_note else {}),
        **{f"generating_in_{w.dagster_run_id[:8]}": dg.MetadataValue.dagster_run(w.dagster_run_id) for w in in_flight},
        "candidates_table": table(records),
        "open_runs": table(run_rows),
    })


def _start_runs(session, persona_id: int, steps: list[runs.StepSpec], dagster_run_id: str) -> list[int]:
    prompts = list(session.scalars(select(models.ContentPrompt).where(
        models.ContentPrompt.persona_id == persona_id, models.ContentPrompt.status == "planned")
        .order_by(models.ContentPrompt.id).with_for_update()))
    started = []
    for prompt in prompts:
        run = runs.start_run(session, persona_id, prompt=prompt.prompt, negative_prompt=prompt.negative_prompt,
                             pillar_id=prompt.pillar_id, steps=steps, prompt_source=prompt.source,
                             content_prompt_id=prompt.id, dagster_run_id=dagster_run_id)
        prompt.status = "used"
        started.append(run.id)
    return started


def _execute(executor: GenerationExecutor, built, database: AppDatabase, slug: str, context, tally: Counter,
             unreachable: dict[int, str]) -> list[int]:
    """Run the batch; record each outcome in its own transaction as it arrives. A job no server could
    take, or whose image could not be stored, is abandoned (not failed: it is not the job's fault) and
    its step noted in `unreachable`."""
    lock = threading.Lock()
    new_ids: list[int] = []

    def record(outcome: JobOutcome) -> None:
        with lock, database.session() as session:
            job = session.get(models.GenerationJob, outcome.planned.job_id)
            job.attempts = outcome.attempts
            job.server = outcome.server
            job.finished_at = models.utcnow()
            if outcome.retry_later:
                job.status, job.error = "abandoned", outcome.error
                tally["jobs_left_for_next_run"] += 1  # left for the next run
                unreachable.setdefault(job.step_id, outcome.error)
                context.log.error(f"{slug}: job {job.id} (run {job.run_id}, step {outcome.planned.step_position}) "
                                  f"not run: {outcome.error}")
                return
            if outcome.error:
                job.status, job.error, job.permanent = "failed", outcome.error, outcome.permanent
                tally["jobs_failed"] += 1
                context.log.error(f"{slug}: job {job.id} (run {job.run_id}, step {outcome.planned.step_position}) failed"
                                  f"{' permanently' if outcome.permanent else ''}: {outcome.error}")
                if outcome.permanent:
                    runs.fail_step(session, job.step_id, outcome.error)
                return
            new_ids.append(_add_candidate(session, job, outcome.image_path, outcome.sha256, outcome.manifest_path))

    executor.run(built, record)
    return new_ids


def _add_candidate(session, job: models.GenerationJob, image_path: Path, sha256: str, manifest_path: Path) -> int:
    manifest = json.loads(manifest_path.read_text())
    lora_ids = [l["id"] for l in manifest.get("loras", [])]
    video = manifest.get("video")  # a video step's clip, beside its first frame (the image)
    row = models.Candidate(run_id=job.run_id, step_id=job.step_id, parent_id=job.parent_id, job_id=job.id, seed=job.seed,
                           lora_id=lora_ids[0] if lora_ids else None, image_path=str(image_path), image_sha256=sha256,
                           manifest_path=str(manifest_path),
                           video_path=str(manifest_path.with_name(video)) if video else None,
                           video_sha256=manifest.get("video_sha256") if video else None)
    session.add(row)
    job.status = "done"
    session.flush()
    return row.id


def _adopt(session, job: models.GenerationJob, storage: PersonaStorage, slug: str) -> bool:
    """A job whose manifest (written last, after the image) reached the disk before its Dagster
    run died: register its candidate instead of losing the image."""
    step = session.get(models.RunStep, job.step_id)
    manifest_path = storage.run_dir(slug, job.run_id, step.position) / f"{job_stem(job)}.json"
    if not manifest_path.is_file():
        return False
    image_path = manifest_path.with_name(json.loads(manifest_path.read_text())["image"])
    if not image_path.is_file():
        return False
    job.finished_at = models.utcnow()
    _add_candidate(session, job, image_path, sha256_file(image_path), manifest_path)
    return True


def _locate_image(candidate: models.Candidate) -> tuple[str, str]:
    return candidate.image_path, candidate.image_sha256


def _live(session, step_id: int) -> list[models.Candidate]:
    return list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == step_id,
                                                               models.Candidate.status == "active")))


def _position(session, row: models.Candidate) -> int:
    return session.get(models.RunStep, row.step_id).position


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
