"""dataset_enrichment and dataset_flywheel: new dataset candidates for the review queue
(docs/dataset.md). Thin: the rules are in persona_pipeline/enrichment.py, the rows in
db/dataset_candidates.py; training_dataset includes what a person accepts."""


from pathlib import Path

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import dataset_candidates as dc
from persona_pipeline.db import models
from persona_pipeline.domain import workflows as wf
from persona_pipeline.domain.captions import training_caption
from persona_pipeline.enrichment import (FOLDER, EnrichmentError, Judged, SourceImage, copy_in, edit_caption,
                                         edit_model_for, edit_request, inside, judge, output_refusal, plan_edits, run_edits)
from persona_pipeline.fileio import sha256_file
from persona_pipeline.generation.backends import ImageJob, make_backends
from persona_pipeline.identity import ClipIdentity, FaceModelError, reference_for
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.comfyui import ComfyUIPool
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline.resources.evaluation import FaceModel
from persona_pipeline.resources.generation import GenerationDefaults
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.training.params import TrainingConfigError


def dataset_images(session, persona_id: int, config: PersonaConfig, persona_dir: Path) -> tuple[list[SourceImage], list[SourceImage]]:
    """(accepted photos, accepted candidates) as they stand: what a new image is compared with. A
    photo's caption: its sidecar, else the caption a person edited, else the generated one, else
    `<trigger> <class>`."""
    stored = {(r.pixel_sha256, r.kind): r.caption for r in session.scalars(
        select(models.PhotoCaption).where(models.PhotoCaption.persona_id == persona_id))}
    photos = []
    for row in session.scalars(select(models.SourcePhoto).where(models.SourcePhoto.persona_id == persona_id,
                                                               models.SourcePhoto.status == "accepted")
                               .order_by(models.SourcePhoto.original_name)):
        caption = (training_caption(config.trigger_word, row.caption) if row.caption else
                   stored.get((row.pixel_sha256, "edited")) or stored.get((row.pixel_sha256, "generated"))
                   or f"{config.trigger_word} {config.class_word}")
        photos.append(SourceImage(Path(row.path), row.pixel_sha256, caption, inside(persona_dir, Path(row.path))))
    accepted = [SourceImage(persona_dir / r.image_path, r.sha256, r.caption, r.image_path)
                for r in dc.accepted_for(session, persona_id)]
    return photos, accepted


def _identity(face: FaceModel, clip: ClipModel, photos: list[SourceImage], slug: str, config: PersonaConfig):
    without = config.generation.identity_ignores()
    try:
        return reference_for(face.identity(clip, without), ClipIdentity(clip, without), [p.path for p in photos])
    except FaceModelError as exc:
        raise dg.Failure(f"{slug}: {exc}") from None


def _store(database: AppDatabase, persona_id: int, rows: list[tuple[dict, Judged]], method: str) -> list[dict]:
    out = []
    with database.session() as session:
        for fields, verdict in rows:
            row = dc.add_candidate(session, persona_id, **fields, identity_score=verdict.identity, identity_method=method,
                                   nearest_sha256=verdict.nearest_sha256, nearest_path=verdict.nearest_path,
                                   nearest_cosine=verdict.nearest_cosine, status=verdict.status, reason=verdict.reason)
            out.append({"id": row.id, "origin": row.origin, "image": row.image_path, "status": row.status,
                        "identity": "" if row.identity_score is None else f"{row.identity_score:.3f}",
                        "nearest": row.nearest_path or "", "reason": row.reason or "",
                        "instruction": row.instruction or ""})
    return out


def _result(rows: list[dict], persona_dir: Path, method: str, storage, links, slug, extra: dict) -> dg.MaterializeResult:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pending", "dropped")}
    return dg.MaterializeResult(metadata={
        "new_candidates": len(rows), "pending": counts["pending"], "dropped": counts["dropped"],
        "identity_method": method, "candidates": table(rows), **extra,
        **sheet_metadata("preview", [(persona_dir / r["image"], f"#{r['id']} {r['status']}") for r in rows],
                         storage, links, slug, empty="_no new candidates_"),
    })


@dg.asset(partitions_def=persona_partitions, deps=["source_photos"], group_name="dataset", kinds={"diffusers", "comfyui"})
def dataset_enrichment(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
                       diffusion: DiffusionBackend, comfyui: ComfyUIPool, generation: GenerationDefaults, clip: ClipModel,
                       face: FaceModel, links: UiLinks) -> dg.MaterializeResult:
    """Edits of the accepted photos by persona.yaml's `enrichment.instructions` (an image-edit model through
    the generation backends), scored and queued as dataset candidates; failures dropped with a reason. Started by hand with the
    dataset_growth job."""
    slug = context.partition_key
    persona_dir = storage.persona_dir(slug)
    with database.session() as session:
        persona, config = persona_for(session, slug)
        persona_id = persona.id
        photos, accepted = dataset_images(session, persona_id, config, persona_dir)
        done = {(r.source_photo_sha256, r.instruction, r.seed) for r in dc.for_persona(session, persona_id)
                if r.origin == "edit"}
    settings = config.enrichment
    if not settings.active:
        return dg.MaterializeResult(metadata={"new_candidates": 0, "skipped": "persona.yaml has no enrichment.instructions"})
    if not photos:
        raise dg.Failure(f"{slug}: no accepted source photos to edit; materialise source_photos first")
    try:
        diffusion = diffusion.for_persona(config)
        edit, weights = edit_model_for(settings, lambda: config.family or diffusion.family_name(), diffusion.base_model)
        backend_name = settings.backend or config.generation.backend or generation.backend
        backend = make_backends(comfyui=comfyui, diffusion=diffusion, log=context.log.info,
                                checkpoint=config.generation.checkpoint or generation.comfyui_checkpoint)[backend_name]
        template = wf.load_template(generation.templates_dir() / f"{edit.template}.json")
        plans = [p for p in plan_edits(photos, settings) if (p.photo.sha256, p.instruction, p.seed) not in done]
        folder = persona_dir / FOLDER / "edits"
        jobs = [ImageJob(key=p.stem, request=edit_request(template, settings, edit, weights, p,
                                                          config.generation.negative_prompt, backend),
                         folder=folder, stem=p.stem, label=f"{slug}/enrichment") for p in plans]
    except (TrainingConfigError, EnrichmentError, wf.WorkflowError) as exc:
        raise dg.Failure(f"{slug}: {exc}") from None
    context.log.info(f"{slug}: {len(jobs)} edit(s) with {edit.title} ({weights}) on {backend_name}")
    results = run_edits(backend, jobs) if jobs else {}
    made, failed = [], []
    for plan, job in zip(plans, jobs):
        result = results.get(job.key)
        if result is None or result.image_path is None:
            failed.append({"photo": plan.photo.relpath, "instruction": plan.instruction, "seed": plan.seed,
                           "error": result.error if result else "the backend reported nothing"})
            continue
        made.append((plan, job, Path(result.image_path)))
    refusals = [output_refusal(path, (job.request.width, job.request.height)) for _, job, path in made]
    identity = _identity(face, clip, photos, slug, config)
    duplicate = settings.duplicate_cosine or config.training.quality.duplicate_cosine
    verdicts = judge([path for *_, path in made], refusals, identity, settings.min_identity, clip.embed_images,
                     photos + accepted, duplicate)
    rows = [(dict(origin="edit", source_photo_sha256=plan.photo.sha256, instruction=plan.instruction,
                  edit_model=f"{edit.name}:{weights}", seed=plan.seed, image_path=inside(persona_dir, path),
                  sha256=sha256_file(path), caption=edit_caption(plan.photo.caption, plan)), verdict)
            for (plan, _, path), verdict in zip(made, verdicts)]
    stored = _store(database, persona_id, rows, identity.method)
    storage.push_written()
    return _result(stored, persona_dir, identity.method, storage, links, slug, {
        "edit_model": f"{edit.title} ({weights})", "backend": backend_name, "failed_edits": len(failed),
        "failures": table(failed), **({"identity_warning": identity.warning()} if identity.warning() else {})})


@dg.asset(partitions_def=persona_partitions, deps=["source_photos", "candidates"], group_name="dataset")
def dataset_flywheel(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage, clip: ClipModel,
                     face: FaceModel, links: UiLinks) -> dg.MaterializeResult:
    """Approved winners and published posts as dataset candidates with their provenance; below
    `flywheel.min_identity`, or a near duplicate of the dataset, dropped with the reason. Started by hand
    with the dataset_growth job."""
    slug = context.partition_key
    persona_dir = storage.persona_dir(slug)
    with database.session() as session:
        persona, config = persona_for(session, slug)
        persona_id = persona.id
        photos, accepted = dataset_images(session, persona_id, config, persona_dir)
        known = dc.for_persona(session, persona_id)
        seen_candidates = {r.candidate_id for r in known if r.candidate_id}
        seen_posts = {r.post_id for r in known if r.post_id}
        settings = config.flywheel
        sources = []  # (fields, image file)
        if settings.winners:
            for cand, prompt in session.execute(
                    select(models.Candidate, models.GenerationRun.prompt).join(
                        models.GenerationRun, models.GenerationRun.id == models.Candidate.run_id)
                    .where(models.GenerationRun.persona_id == persona_id, models.Candidate.status == "winner")
                    .order_by(models.Candidate.id)):
                if cand.id not in seen_candidates:
                    sources.append((dict(origin="winner", candidate_id=cand.id, caption=_prompt_caption(config, prompt)),
                                    Path(cand.image_path)))
        if settings.posts:
            for post in session.scalars(select(models.Post).where(
                    models.Post.persona_id == persona_id, models.Post.status == "published",
                    models.Post.format.in_(("feed", "story")), models.Post.media_path.is_not(None)).order_by(models.Post.id)):
                if post.id not in seen_posts and Path(post.media_path).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                    prompt = post.candidate.run.prompt if post.candidate else ""
                    sources.append((dict(origin="post", post_id=post.id, candidate_id=post.candidate_id,
                                         caption=_prompt_caption(config, prompt)), Path(post.media_path)))
    rows, missing = [], []
    for fields, image in sources:
        if not image.is_file():
            missing.append(f"{fields['origin']} {fields.get('post_id') or fields.get('candidate_id')}: {image} is missing")
            continue
        sha = sha256_file(image)
        rows.append(({**fields, "sha256": sha, "image_path": copy_in(persona_dir, image, fields["origin"], sha)}))
    for note in missing:
        context.log.warning(f"{slug}: {note}")
    identity = _identity(face, clip, photos, slug, config)
    paths = [persona_dir / r["image_path"] for r in rows]
    verdicts = judge(paths, [output_refusal(p, None) for p in paths], identity, settings.min_identity, clip.embed_images,
                     photos + accepted, config.training.quality.duplicate_cosine)
    stored = _store(database, persona_id, list(zip(rows, verdicts)), identity.method)
    storage.push_written()
    return _result(stored, persona_dir, identity.method, storage, links, slug, {"missing_files": len(missing)})


def _prompt_caption(config: PersonaConfig, prompt: str) -> str:
    body = prompt.strip()
    if body.lower().startswith("photo of "):
        body = body[len("photo of "):]
    return training_caption(config.trigger_word, body or config.class_word)
