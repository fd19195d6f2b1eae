"""candidates: one generation run per pillar prompt; N images from local diffusers with the
persona's primary LoRA loaded. Each image is stored with a JSON manifest (prompt, negative prompt,
seed, steps, cfg, sampler/scheduler, size, base model, LoRA id, weight and sha256) and scored
with open_clip against its prompt."""


import hashlib
import io
import json
from pathlib import Path

import dagster as dg

from persona_pipeline.assets.common import contact_sheet_md, persona_for, table
from persona_pipeline.db import models, registry
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline.resources.review_policy import AutoReviewer
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.fileio import atomic_write

NEGATIVE_PROMPT = "blurry, low quality, deformed, extra limbs, watermark, text"
WORKFLOW = "txt2img_lora"


class GenerationSettings(dg.Config):
    """Per-run generation settings (editable in the launchpad)."""

    n_candidates: int | None = None  # default: PERSONA_CANDIDATES_PER_RUN (the diffusion resource)
    steps: int = 12
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    size: int | None = None  # default: the base model's native size


def candidate_seed(run_id: int, index: int) -> int:
    """Deterministic per run and slot, so a manifest's seed reproduces its image."""
    return int.from_bytes(hashlib.sha256(f"{run_id}:{index}".encode()).digest()[:4], "big") & 0x7FFFFFFF


@dg.asset(partitions_def=persona_partitions, deps=["lora_model"], group_name="generation", kinds={"diffusers"})
def candidates(context: dg.AssetExecutionContext, config: GenerationSettings, database: AppDatabase,
               storage: PersonaStorage, diffusion: DiffusionBackend, clip: ClipModel, auto_review: AutoReviewer) -> dg.MaterializeResult:
    slug = context.partition_key
    n = config.n_candidates or diffusion.candidates_per_run
    size = config.size or diffusion.default_size()
    if not 2 <= n <= 64:
        raise dg.Failure(f"n_candidates={n} is out of range 2..64")
    with database.session() as session:
        persona, persona_config = persona_for(session, slug)
        mapping = registry.primary_lora(session, persona.id)
        if mapping is None:
            raise dg.Failure(f"{slug}: no primary LoRA in the library; materialise lora_model first")
        lora = mapping.lora
        lora_weight = mapping.weight
        dataset_version = lora.dataset.version if lora.dataset else None
        pillars = [(p.id, p.name, p.prompt) for p in registry.active_pillars(session, persona.id)]

    made: list[tuple[models.Candidate, str]] = []
    for pillar_id, pillar_name, prompt in pillars:
        with database.session() as session:
            run = models.GenerationRun(persona_id=persona.id, pillar_id=pillar_id, prompt=prompt, negative_prompt=NEGATIVE_PROMPT,
                                       backend="diffusers", status="running", dagster_run_id=context.run.run_id)
            session.add(run)
            session.flush()
            step = models.RunStep(run_id=run.id, position=1, name="base", workflow=WORKFLOW, n_candidates=n, status="generating")
            session.add(step)
            session.flush()
            run_id, step_id = run.id, step.id
        seeds = [candidate_seed(run_id, i) for i in range(n)]
        try:
            images = diffusion.generate(prompt=prompt, negative_prompt=NEGATIVE_PROMPT, seeds=seeds, steps=config.steps,
                                        cfg=config.cfg, sampler=config.sampler, scheduler=config.scheduler,
                                        width=size, height=size, lora_path=Path(lora.path), lora_weight=lora_weight)
        except Exception as exc:
            with database.session() as session:
                session.get(models.GenerationRun, run_id).status = "failed"
            raise dg.Failure(f"{slug}: generation for pillar {pillar_name!r} (run {run_id}) failed: {exc}") from exc

        folder = storage.run_dir(slug, run_id, 1)
        paths = []
        with database.session() as session:
            rows = []
            for index, (seed, image) in enumerate(zip(seeds, images)):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                image_path = folder / f"{index:03d}-{seed}.png"
                sha = atomic_write(image_path, buffer.getvalue())
                manifest = {
                    "persona": slug, "run_id": run_id, "step": 1, "pillar": pillar_name, "index": index,
                    "prompt": prompt, "negative_prompt": NEGATIVE_PROMPT, "seed": seed, "steps": config.steps,
                    "cfg": config.cfg, "sampler": config.sampler, "scheduler": config.scheduler,
                    "width": image.width, "height": image.height, "backend": "diffusers", "workflow": WORKFLOW,
                    "base_model": diffusion.base_model, "lora_id": lora.id, "lora_sha256": lora.sha256,
                    "lora_weight": lora_weight, "dataset_version": dataset_version, "sha256": sha,
                    "image": image_path.name, "dagster_run_id": context.run.run_id,
                }
                manifest_path = image_path.with_suffix(".json")
                atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())
                row = models.Candidate(run_id=run_id, step_id=step_id, seed=seed, lora_id=lora.id, image_path=str(image_path),
                                       image_sha256=sha, manifest_path=str(manifest_path))
                session.add(row)
                rows.append(row)
                paths.append(image_path)
            for row, score in zip(rows, clip.prompt_scores(paths, prompt)):
                row.clip_score = round(score, 6)
            session.flush()
            votes = auto_review.vote_step(session, rows)
            session.get(models.RunStep, step_id).status = "voting"
            session.get(models.GenerationRun, run_id).status = "awaiting_review"
            made.extend((row, pillar_name) for row in rows)
        context.log.info(f"{slug}: run {run_id} ({pillar_name}) made {len(rows)} candidates; auto-review cast {votes} votes")

    return dg.MaterializeResult(metadata={
        "runs": len(pillars),
        "candidates": len(made),
        "lora_id": lora.id,
        "preview": dg.MetadataValue.md(contact_sheet_md([Path(c.image_path) for c, _ in made],
                                                         [f"#{c.id} {p}" for c, p in made])),
        "table": table([{"candidate": c.id, "run": c.run_id, "pillar": p, "seed": c.seed,
                         "clip_score": float(c.clip_score or 0.0), "manifest": c.manifest_path} for c, p in made]),
    })
