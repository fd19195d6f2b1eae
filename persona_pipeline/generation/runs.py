"""Generation runs in the database: starting runs, planning jobs from the tree's rules
(domain/generation_plan.py), recording results, and moving steps along.

No Dagster here: the `candidates` asset calls these in order, and the review form's decisions
(db/review.py) change the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Collection

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain import generation_plan as plan
from persona_pipeline.domain.generation_request import takes_input_image

PLACE_HOLDING = ("active", "winner", "culled")  # candidate statuses that fill a place under a parent


@dataclass(frozen=True)
class StepSpec:
    """One pipeline step as the run was started with it (persona.yaml `generation.steps`)."""

    name: str
    template: str
    n: int
    keep: int | None
    top_k: int
    backend: str
    params: dict


@dataclass(frozen=True)
class PlannedJob:
    """Everything the executor needs for one job, read while the session was open."""

    job_id: int
    run_id: int
    step_id: int
    step_position: int
    step_name: str
    template: str
    backend: str
    params: dict
    prompt: str
    negative_prompt: str
    parent_id: int | None
    parent_image: str | None
    parent_sha256: str | None
    slot: int
    seed: int
    input_image: str | None = None  # an edit step's image when a candidate: its parent's, or `step:<name>`'s ancestor


def start_run(session: Session, persona_id: int, *, prompt: str, negative_prompt: str, pillar_id: int | None,
              steps: list[StepSpec], prompt_source: str, content_prompt_id: int | None,
              dagster_run_id: str | None) -> models.GenerationRun:
    """A run with its steps: step 1 generating, the later ones pending their predecessor's approval."""
    if not steps:
        raise ValueError("a generation run needs at least one step")
    run = models.GenerationRun(persona_id=persona_id, pillar_id=pillar_id, prompt=prompt, negative_prompt=negative_prompt,
                               backend=steps[0].backend, status="running", dagster_run_id=dagster_run_id,
                               prompt_source=prompt_source, content_prompt_id=content_prompt_id,
                               pipeline={"steps": [s.__dict__ for s in steps]})
    session.add(run)
    session.flush()
    for position, spec in enumerate(steps, start=1):
        session.add(models.RunStep(run_id=run.id, position=position, name=spec.name, workflow=spec.template,
                                   n_candidates=spec.n, keep_best=spec.keep, top_k=None, backend=spec.backend,
                                   params=spec.params, status="generating" if position == 1 else "pending"))
    session.flush()
    return run


def recover_jobs(session: Session, persona_id: int, is_run_alive: Callable[[str | None], bool],
                 adopt: Callable[[models.GenerationJob], bool]) -> tuple[int, int]:
    """Jobs left pending/running by a Dagster run that has ended: `adopt` registers a job whose
    image and manifest reached the disk before the crash (so no image is lost); the rest are
    marked abandoned (not counted as failures: the job never got its chance). Returns
    (adopted, abandoned)."""
    adopted = abandoned = 0
    stale = session.scalars(select(models.GenerationJob).join(models.GenerationRun)
                            .where(models.GenerationRun.persona_id == persona_id,
                                   models.GenerationJob.status.in_(("pending", "running"))))
    for job in list(stale):
        if is_run_alive(job.dagster_run_id):
            continue
        if adopt(job):
            adopted += 1
        else:
            job.status = "abandoned"
            job.error = f"its Dagster run {job.dagster_run_id} ended before the job finished"
            job.finished_at = models.utcnow()
            abandoned += 1
    session.flush()
    return adopted, abandoned


def jobs_in_flight(session: Session, persona_id: int, other_than: str | None) -> dict[str, tuple[int, list[int]]]:
    """Pending or running jobs of the persona owned by Dagster runs other than `other_than`:
    {dagster run id: (jobs, generation run ids)}, so a materialisation that made nothing can say
    who is still making images instead of showing an empty sheet."""
    rows = session.execute(select(models.GenerationJob.dagster_run_id, models.GenerationJob.run_id)
                           .join(models.GenerationRun)
                           .where(models.GenerationRun.persona_id == persona_id,
                                  models.GenerationJob.status.in_(("pending", "running")),
                                  models.GenerationJob.dagster_run_id.is_not(None)))
    found: dict[str, tuple[int, list[int]]] = {}
    for dagster_run_id, run_id in rows:
        if dagster_run_id == other_than:
            continue
        jobs, run_ids = found.get(dagster_run_id, (0, []))
        found[dagster_run_id] = (jobs + 1, run_ids if run_id in run_ids else sorted([*run_ids, run_id]))
    return found


def _group_state(session: Session, step: models.RunStep, parent_id: int | None) -> plan.GroupState:
    parent_key = parent_id or 0
    jobs = session.execute(select(models.GenerationJob.status, func.count(), func.max(models.GenerationJob.slot))
                           .where(models.GenerationJob.step_id == step.id, models.GenerationJob.parent_key == parent_key)
                           .group_by(models.GenerationJob.status)).all()
    counts = {status: n for status, n, _ in jobs}
    next_slot = max((top for _, _, top in jobs), default=-1) + 1
    cand_filter = [models.Candidate.step_id == step.id,
                   models.Candidate.parent_id.is_(None) if parent_id is None else models.Candidate.parent_id == parent_id]
    statuses = dict(session.execute(select(models.Candidate.status, func.count()).where(*cand_filter)
                                    .group_by(models.Candidate.status)).all())
    gate_rejections = session.scalar(select(func.count()).select_from(models.Candidate).where(
        *cand_filter, models.Candidate.status == "rejected", models.Candidate.status_reason.like("identity%"))) or 0
    return plan.GroupState(parent_id=parent_id,
                           filled=sum(statuses.get(s, 0) for s in PLACE_HOLDING),
                           in_flight=counts.get("pending", 0) + counts.get("running", 0),
                           failures=counts.get("failed", 0) + gate_rejections,
                           next_slot=next_slot)


def plan_jobs(session: Session, persona_id: int, dagster_run_id: str | None,
              locate_image: Callable[[models.Candidate], tuple[str, str]]) -> tuple[list[PlannedJob], list[str]]:
    """Create the jobs every generating step needs now, across all of the persona's runs (a run
    waiting for approval has no generating step, so it holds nothing up). Returns the new jobs
    and log lines for parents rejected after three failures."""
    notes: list[str] = []
    new_jobs: list[tuple[models.GenerationJob, models.RunStep, models.Candidate | None]] = []
    steps = session.scalars(select(models.RunStep).join(models.GenerationRun)
                            .where(models.GenerationRun.persona_id == persona_id,
                                   models.GenerationRun.status.in_(("running", "awaiting_review")),
                                   models.RunStep.status == "generating")
                            .order_by(models.RunStep.run_id, models.RunStep.position))
    for step in list(steps):
        parents: list[models.Candidate | None] = [None] if step.position == 1 else [
            session.get(models.Candidate, pid) for pid in step.parent_ids]
        for parent in parents:
            if parent is not None and parent.status not in ("active", "winner"):
                continue  # killed or rejected since the approval: it gets no (more) children
            state = _group_state(session, step, parent.id if parent else None)
            group = plan.plan_group(step.n_candidates, state)
            if group.exhausted:
                if parent is not None and parent.status == "active":
                    parent.status = "rejected"
                    parent.status_reason = f"{plan.MAX_FAILURES_PER_PARENT} failed jobs for its children in step {step.position}"
                    notes.append(f"run {step.run_id} step {step.position}: parent candidate {parent.id} rejected after "
                                 f"{state.failures} failures")
                continue
            for slot in group.slots:
                job = models.GenerationJob(run_id=step.run_id, step_id=step.id, parent_id=parent.id if parent else None,
                                           parent_key=parent.id if parent else 0, slot=slot,
                                           seed=plan.job_seed(step.run_id, step.position, parent.id if parent else None, slot),
                                           status="pending", backend=step.backend or "diffusers", dagster_run_id=dagster_run_id)
                session.add(job)
                new_jobs.append((job, step, parent))
    session.flush()
    planned = []
    for job, step, parent in new_jobs:
        run = step.run
        parent_image, parent_sha = locate_image(parent) if parent is not None else (None, None)
        input_image = _edit_input(session, step, parent, locate_image) if takes_input_image(step.params) else None
        planned.append(PlannedJob(input_image=input_image, job_id=job.id, run_id=run.id, step_id=step.id, step_position=step.position,
                                  step_name=step.name, template=step.workflow, backend=job.backend, params=dict(step.params),
                                  prompt=run.prompt, negative_prompt=run.negative_prompt, parent_id=job.parent_id,
                                  parent_image=parent_image, parent_sha256=parent_sha, slot=job.slot, seed=job.seed))
    return planned, notes


def _edit_input(session: Session, step: models.RunStep, parent: models.Candidate | None,
                locate_image: Callable[[models.Candidate], tuple[str, str]]) -> str | None:
    """The candidate image an edit job changes (or a video job animates): its parent's, or with params.input_image `step:<name>`
    the one its ancestor from that earlier step has (a file in the persona folder is the executor's)."""
    source = step.params.get("input_image")
    if source and not source.startswith("step:"):
        return None
    node = parent
    if source:
        while node is not None and session.get(models.RunStep, node.step_id).name != source[5:]:
            node = session.get(models.Candidate, node.parent_id) if node.parent_id else None
    return locate_image(node)[0] if node is not None else None


def fail_step(session: Session, step_id: int, reason: str) -> None:
    """A broken workflow (or nothing left to vote on): the step fails once, with its reason, and
    its pending jobs are cancelled so nothing resubmits it."""
    step = session.get(models.RunStep, step_id)
    if step.status == "failed":
        return
    step.status = "failed"
    step.failure_reason = reason
    for job in session.scalars(select(models.GenerationJob).where(models.GenerationJob.step_id == step_id,
                                                                  models.GenerationJob.status == "pending")):
        job.status = "failed"
        job.error = f"not submitted: step {step.position} failed ({reason})"
        job.permanent = True
        job.finished_at = models.utcnow()
    step.run.status = "failed"
    step.run.failure_reason = f"step {step.position} ({step.name}): {reason}"
    session.flush()


def finish_steps(session: Session, persona_id: int, hold: Collection[int] = ()) -> list[models.RunStep]:
    """Steps whose jobs are all settled move to voting (the run then awaits review); a step left
    with no image fails. Steps in `hold` (some of their jobs could not reach a server) stay
    generating, so the next run makes their missing images. Returns the steps that just reached voting."""
    reached = []
    steps = session.scalars(select(models.RunStep).join(models.GenerationRun)
                            .where(models.GenerationRun.persona_id == persona_id, models.RunStep.status == "generating"))
    for step in list(steps):
        if step.id in hold:
            continue
        open_jobs = session.scalar(select(func.count()).select_from(models.GenerationJob).where(
            models.GenerationJob.step_id == step.id, models.GenerationJob.status.in_(("pending", "running")))) or 0
        if open_jobs:
            continue
        live = session.scalar(select(func.count()).select_from(models.Candidate).where(
            models.Candidate.step_id == step.id, models.Candidate.status.in_(("active", "winner")))) or 0
        if live == 0:
            last_error = session.scalar(select(models.GenerationJob.error).where(
                models.GenerationJob.step_id == step.id, models.GenerationJob.error.is_not(None))
                .order_by(models.GenerationJob.id.desc()).limit(1))
            fail_step(session, step.id, f"no image survived ({last_error or 'every candidate was rejected'})")
            continue
        step.status = "voting"
        step.run.status = "awaiting_review"
        reached.append(step)
    session.flush()
    return reached
