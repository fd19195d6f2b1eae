"""lora_model: train a LoRA on the persona's latest dataset (resuming a killed run from its latest
checkpoint), render every checkpoint on fixed validation prompts and seeds, score identity and
prompt alignment, keep the best checkpoint and register it in the LoRA library as a new version.
The version is then rendered on the persona's evaluation set next to the primary LoRA and becomes
primary only when it is not worse (assets/lora_promotion.py). The folder holds every checkpoint,
the validation images, the loss curve and a metadata.json with the sha256 of each file."""

import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import file_image_metadata, persona_for, sheet_metadata, table
from persona_pipeline.db import models, registry
from persona_pipeline.domain.checkpoint_selection import CheckpointScore, rank_checkpoints
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.identity import ClipIdentity, FaceModelError, IdentityReference, reference_for
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.assets.lora_promotion import evaluate_and_decide
from persona_pipeline.resources.evaluation import FaceModel, PromotionRules
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.fileio import atomic_write, sha256_file
from persona_pipeline.training.lora import TrainingConfigError, TrainingDiverged
from persona_pipeline.training.lora_files import inspect_lora_file
from persona_pipeline.training.evaluation import evaluate
from persona_pipeline.training.loss_curve import loss_curve_png

GPU_POOL = "gpu_training"
# Read only by the scale-out executors (deploy/README.md; deploy/k8s/training_tags.yaml is the same
# value, checked by a test); the default executor ignores them. dagster-k8s's k8s_job_executor runs
# this step in a pod with one GPU and PERSONA_DEVICE=cuda; dagster-celery's celery_executor sends it
# to the workers on the `gpu` queue. No other step asks for a GPU.
TRAINING_OP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}},
                             "env": [{"name": "PERSONA_DEVICE", "value": "cuda"}]},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
    "dagster-celery/queue": "gpu",
}


@dg.asset(partitions_def=persona_partitions, deps=["training_dataset"], group_name="training",
          kinds={"pytorch", "diffusers"}, pool=GPU_POOL, op_tags=TRAINING_OP_TAGS)
def lora_model(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
               diffusion: DiffusionBackend, clip: ClipModel, face: FaceModel, promotion: PromotionRules,
               links: UiLinks) -> dg.MaterializeResult:
    """Trains the persona's LoRA on its latest dataset, keeps the best checkpoint, evaluates it against the
    primary LoRA and makes it primary when it is not worse. Started by the photo_set job (persona_folders sensor), the dataset_version
    job (dataset_reviews sensor), the persona_chain job, or lora_training by hand."""
    slug = context.partition_key
    with database.session() as session:
        persona, config = persona_for(session, slug)
        dataset = session.scalar(select(models.Dataset).where(models.Dataset.persona_id == persona.id)
                                 .order_by(models.Dataset.id.desc()).limit(1))
        source_paths = [Path(p) for p in session.scalars(select(models.SourcePhoto.path).where(
            models.SourcePhoto.persona_id == persona.id, models.SourcePhoto.status == "accepted"))]
    if dataset is None:
        raise dg.Failure(f"{slug}: no training dataset; materialise training_dataset first")
    try:
        without = config.generation.identity_ignores()
        identity = reference_for(face.identity(clip, without), ClipIdentity(clip, without), source_paths)
        diffusion = diffusion.for_persona(config)
        params = diffusion.training_params(config.training.param_overrides())
        preset = diffusion.preset_name()
    except (TrainingConfigError, FaceModelError) as exc:
        raise dg.Failure(f"{slug}: {exc}") from None
    version = hashlib.sha256(json.dumps({"dataset": dataset.version, "base": diffusion.base_model,
                                         "params": params.as_dict()}, sort_keys=True).encode()).hexdigest()
    folder = storage.lora_dir(slug, version[:16])
    weight_name = f"{slug}-{version[:8]}.safetensors"

    if (folder / "metadata.json").is_file():
        context.log.info(f"{slug}: LoRA {version[:16]} already trained on dataset {dataset.version[:16]}; reusing it")
        metadata = json.loads((folder / "metadata.json").read_text())
    else:
        # The work folder is kept across runs: a killed run resumes from its latest checkpoint.
        work = folder.with_name(folder.name + ".partial")
        try:
            result = diffusion.train(Path(dataset.path), work, params, weight_name, log=context.log.info)
        except TrainingDiverged as exc:
            raise dg.Failure(description=f"{slug}: {exc}", metadata={
                "last_good_checkpoint": dg.MetadataValue.path(str(exc.last_checkpoint)) if exc.last_checkpoint else "none"}) from None
        except TrainingConfigError as exc:
            raise dg.Failure(f"{slug}: {exc}") from None
        prompts = [p.format(trigger=config.trigger_word, class_word=config.class_word) for p in config.training.validation_prompts]
        seeds = list(config.training.validation_seeds)
        scores = _score_checkpoints(diffusion, clip, identity, result.checkpoints, prompts, seeds, config.trigger_word, work)
        ranked = rank_checkpoints(scores)
        best = ranked[0]
        shutil.copyfile(work / "checkpoints" / best.file, work / weight_name)
        # Family and key format read off the file, by the same code that checks imported LoRAs, so
        # trained and imported rows of the library describe themselves alike.
        info = inspect_lora_file(work / weight_name, expected_family=None)
        (work / "loss_curve.png").write_bytes(loss_curve_png(result.losses, checkpoints=[s for s, _ in result.checkpoints]))
        metadata = {
            "persona": slug, "trigger_word": config.trigger_word, "class_word": config.class_word,
            "base_model": diffusion.base_model, "base_model_path": diffusion.base_model_path(), "preset": preset,
            "family": info.family, "key_format": info.key_format, "params": params.as_dict(), "mixed_precision_used": result.mixed_precision,
            "dataset_id": dataset.id, "dataset_version": dataset.version, "dataset_path": dataset.path,
            "steps": params.steps, "resumed_from_step": result.resumed_from, "seconds": result.seconds,
            "images": result.image_count, "losses": result.losses,
            "validation": {"prompts": prompts, "seeds": seeds, "identity_method": identity.method,
                           "identity_warning": identity.warning()},
            "checkpoints": [{"step": r.step, "file": r.file, "identity": r.identity, "alignment": r.alignment,
                             "combined": r.combined, "rank": r.rank} for r in sorted(ranked, key=lambda r: r.step)],
            "selected": {"step": best.step, "file": weight_name, "from": best.file},
            "dagster_run_id": context.run.run_id,
        }
        metadata["files"] = {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*"))
                             if p.is_file() and p.name not in {"training_state.pt"}}
        metadata["sha256"] = metadata["files"][weight_name]
        atomic_write(work / "metadata.json", json.dumps(metadata, indent=2).encode())
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)

    with database.session() as session:
        lora = registry.register_lora(
            session, persona.id, name=f"{slug} {version[:8]}", path=folder / weight_name, sha256=metadata["sha256"],
            base_model=diffusion.base_model, trigger_word=config.trigger_word, dataset_id=dataset.id,
            training={"params": metadata["params"], "final_loss": metadata["losses"][-1], "seconds": metadata["seconds"],
                      "selected_step": metadata["selected"]["step"]},
            weight=1.0, primary=None, origin="trained", family=metadata["family"], key_format=metadata["key_format"])
        lora_id, lora_version = lora.id, lora.version
    evaluation = evaluate_and_decide(context, database=database, storage=storage, links=links, diffusion=diffusion,
                                     clip=clip, identity=identity, rules=promotion, persona_id=persona.id, slug=slug,
                                     config=config, lora_id=lora_id)
    rows = metadata["checkpoints"]
    renders = sorted((folder / "validation").glob("*.png"))
    losses = metadata["losses"]
    storage.push_written()  # object storage: a failed upload fails the step (a teardown failure only logs)
    return dg.MaterializeResult(metadata={
        "lora_id": lora_id,
        "library_version": lora_version,
        "path": dg.MetadataValue.path(str(folder / weight_name)),
        "sha256": metadata["sha256"],
        "dataset_version": dataset.version,
        "base_model": diffusion.base_model,
        "family": metadata["family"],
        "selected_step": metadata["selected"]["step"],
        **evaluation,
        "steps": len(losses),
        "resumed_from_step": metadata["resumed_from_step"],
        "final_loss": float(losses[-1]),
        "train_seconds": float(metadata["seconds"]),
        "checkpoints": table([{"step": r["step"], "identity": round(r["identity"], 4), "alignment": round(r["alignment"], 4),
                               "combined": round(r["combined"], 4), "rank": r["rank"]} for r in rows]),
        # One row per checkpoint, one column per (prompt, seed).
        **sheet_metadata("validation_sheet", [(render, render.stem) for render in renders], storage, links, slug,
                         columns=max(1, len(renders) // max(1, len(rows)))),
        **file_image_metadata("loss_curve", folder / "loss_curve.png", "loss curve", storage, links),
    })


def _score_checkpoints(diffusion: DiffusionBackend, clip: ClipModel, identity: IdentityReference,
                       checkpoints: list[tuple[int, Path]], prompts: list[str], seeds: list[int], trigger_word: str,
                       work: Path) -> list[CheckpointScore]:
    """Identity: mean similarity of a checkpoint's renders to the source photos' centroid (face model
    or open_clip; a render without a face counts 0). Alignment: mean open_clip cosine of each render
    to its prompt, trigger word removed (it means nothing to CLIP). Noise on the tiny random model,
    meaningful on real weights."""
    out_dir = work / "validation"
    runs = evaluate(diffusion, clip, identity, [path for _, path in checkpoints], prompts, seeds, trigger_word,
                    lambda n, p, seed: out_dir / f"step{checkpoints[n][0]:06d}-p{p}-s{seed}.png")
    return [CheckpointScore(step=step, file=path.name, identity=run.scores.identity_mean, alignment=run.scores.alignment)
            for (step, path), run in zip(checkpoints, runs)]

