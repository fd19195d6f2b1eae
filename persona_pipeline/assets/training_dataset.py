"""training_dataset: one caption per accepted photo, starting with the trigger word (a sidecar
.txt wins, else the persona's caption template), in a kohya folder with a dataset.toml.
The dataset version is the content hash of images, captions and settings."""

import hashlib
import json
import shutil

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import contact_sheet_md, persona_for, table
from persona_pipeline.db import models
from persona_pipeline.domain.captions import fill, training_caption
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.storage import PersonaStorage, atomic_write


def kohya_toml(image_dir: str, class_tokens: str, repeats: int, resolution: int) -> str:
    return (
        "[general]\ncaption_extension = \".txt\"\nshuffle_caption = false\nkeep_tokens = 1\n\n"
        f"[[datasets]]\nresolution = {resolution}\nbatch_size = 1\n\n"
        f"  [[datasets.subsets]]\n  image_dir = {json.dumps(image_dir)}\n"
        f"  class_tokens = {json.dumps(class_tokens)}\n  num_repeats = {repeats}\n"
    )


@dg.asset(partitions_def=persona_partitions, deps=["source_photos"], group_name="dataset", kinds={"kohya"})
def training_dataset(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage) -> dg.MaterializeResult:
    slug = context.partition_key
    with database.session() as session:
        persona, config = persona_for(session, slug)
        photos = list(session.scalars(select(models.SourcePhoto).where(
            models.SourcePhoto.persona_id == persona.id, models.SourcePhoto.status == "accepted")
            .order_by(models.SourcePhoto.original_name)))
    if not photos:
        raise dg.Failure(f"{slug}: no accepted source photos; materialise source_photos first")
    training = config.training
    values = {"trigger": config.trigger_word, "class_word": config.class_word, "name": config.name}

    items = []  # (photo row, caption, source of caption)
    for photo in photos:
        if photo.caption:
            caption, source = training_caption(config.trigger_word, photo.caption), "sidecar"
        else:
            body = fill(training.caption_template, values, what=f"{persona.folder}/persona.yaml training.caption_template")
            caption, source = training_caption(config.trigger_word, body), "template"
        items.append((photo, caption, source))

    settings = {"repeats": training.repeats, "trigger": config.trigger_word, "class_word": config.class_word,
                "caption_template": training.caption_template}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for photo, caption, _ in items:
        digest.update(photo.pixel_sha256.encode() + b"\0" + caption.encode() + b"\0")
    version = digest.hexdigest()

    folder = storage.dataset_dir(slug, version[:16])
    subset_name = f"{training.repeats}_{config.trigger_word} {config.class_word}"
    if not (folder / "metadata.json").is_file():  # versions are immutable: build once, in a temp folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subset = partial / subset_name
        subset.mkdir(parents=True)
        for index, (photo, caption, _) in enumerate(items, start=1):
            shutil.copyfile(photo.path, subset / f"{index:04d}.png")
            (subset / f"{index:04d}.txt").write_text(caption + "\n", encoding="utf-8")
        (partial / "dataset.toml").write_text(kohya_toml(str(folder / subset_name), f"{config.trigger_word} {config.class_word}",
                                                         training.repeats, training.resolution or 512))
        atomic_write(partial / "metadata.json", json.dumps({
            "persona": slug, "version": version, "settings": settings,
            "images": [{"file": f"{i:04d}.png", "source": p.original_name, "sha256": p.pixel_sha256, "caption": c, "caption_source": s}
                       for i, (p, c, s) in enumerate(items, start=1)],
        }, indent=2).encode())
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)

    with database.session() as session:
        dataset = session.scalar(select(models.Dataset).where(models.Dataset.persona_id == persona.id, models.Dataset.version == version))
        if dataset is None:
            session.add(models.Dataset(persona_id=persona.id, version=version, path=str(folder),
                                       image_count=len(items), settings=settings))
    return dg.MaterializeResult(metadata={
        "dataset_version": version,
        "images": len(items),
        "sidecar_captions": sum(1 for *_, s in items if s == "sidecar"),
        "template_captions": sum(1 for *_, s in items if s == "template"),
        "path": dg.MetadataValue.path(str(folder)),
        "captions": table([{"image": p.original_name, "caption": c, "source": s} for p, c, s in items]),
        "preview": dg.MetadataValue.md(contact_sheet_md([folder / subset_name / f"{i:04d}.png" for i in range(1, len(items) + 1)])),
    })
