"""lora_model: a real LoRA trained with diffusers + peft on the configured base model (the tiny
offline model by default), written as .safetensors + metadata.json and registered in the LoRA
library as the persona's primary LoRA."""

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import persona_for, table
from persona_pipeline.db import models, registry
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline.resources.storage import PersonaStorage, atomic_write

GPU_POOL = "gpu_training"


@dg.asset(partitions_def=persona_partitions, deps=["training_dataset"], group_name="training",
          kinds={"pytorch", "diffusers"}, pool=GPU_POOL)
def lora_model(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
               diffusion: DiffusionBackend) -> dg.MaterializeResult:
    slug = context.partition_key
    with database.session() as session:
        persona, config = persona_for(session, slug)
        dataset = session.scalar(select(models.Dataset).where(models.Dataset.persona_id == persona.id)
                                 .order_by(models.Dataset.id.desc()).limit(1))
    if dataset is None:
        raise dg.Failure(f"{slug}: no training dataset; materialise training_dataset first")
    overrides = config.training.model_dump(include={"rank", "alpha", "steps", "learning_rate", "resolution", "seed"})
    params = diffusion.training_params(overrides)
    base_model = diffusion.base_model_path()
    version = hashlib.sha256(json.dumps({"dataset": dataset.version, "base": diffusion.base_model,
                                         "params": asdict(params)}, sort_keys=True).encode()).hexdigest()
    folder = storage.lora_dir(slug, version[:16])
    weight_name = f"{slug}-{version[:8]}.safetensors"
    metadata_path = folder / "metadata.json"

    if metadata_path.is_file():
        context.log.info(f"{slug}: LoRA {version[:16]} already trained on dataset {dataset.version[:16]}; reusing it")
        metadata = json.loads(metadata_path.read_text())
    else:
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        result = diffusion.train(Path(dataset.path), partial, params, weight_name, log=context.log.info)
        metadata = {
            "persona": slug, "trigger_word": config.trigger_word, "class_word": config.class_word,
            "dataset_id": dataset.id, "dataset_version": dataset.version, "dataset_path": dataset.path,
            "base_model": diffusion.base_model, "base_model_path": base_model, "params": asdict(params),
            "file": weight_name, "sha256": result.sha256, "losses": result.losses, "seconds": result.seconds,
            "images": result.image_count, "dagster_run_id": context.run.run_id,
        }
        atomic_write(partial / "metadata.json", json.dumps(metadata, indent=2).encode())
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)

    with database.session() as session:
        lora = registry.register_lora(
            session, persona.id, name=f"{slug} {version[:8]}", path=folder / weight_name, sha256=metadata["sha256"],
            base_model=diffusion.base_model, trigger_word=config.trigger_word, dataset_id=dataset.id,
            training={"params": metadata["params"], "final_loss": metadata["losses"][-1], "seconds": metadata["seconds"]},
            weight=1.0, primary=True)
        lora_id = lora.id
    losses = metadata["losses"]
    return dg.MaterializeResult(metadata={
        "lora_id": lora_id,
        "path": dg.MetadataValue.path(str(folder / weight_name)),
        "sha256": metadata["sha256"],
        "dataset_version": dataset.version,
        "base_model": diffusion.base_model,
        "steps": len(losses),
        "first_loss": float(losses[0]),
        "final_loss": float(losses[-1]),
        "train_seconds": float(metadata["seconds"]),
        "loss_curve": table([{"step": i + 1, "loss": float(v)} for i, v in enumerate(losses)
                             if i % max(1, len(losses) // 20) == 0 or i == len(losses) - 1]),
    })
