"""training_dataset: one caption per accepted photo, a kohya folder (`<repeats>_<trigger> <class>/`
with images and .txt captions, an optional `reg/` class-image subset) plus dataset.toml, and
the quality checks. The dataset version is the content hash of the images, captions and settings.

Where a caption comes from, first match wins:
1. a sidecar `.txt` next to the photo in the persona folder;
2. a caption a person edited in a built dataset folder (kept in the database, so it survives
   every later materialisation; the newest edit of a photo wins);
3. a generated caption from the database, if the same captioner made it;
4. the captioner: Gemini when GEMINI_API_KEY is set, else open_clip zero-shot (or the persona's
   caption_template when training.captioner is `template`). Each new caption is saved as soon as
   it exists, so a failure halfway loses none of them.

After the photos come the accepted dataset candidates (edits, winners, posts; docs/dataset.md) with
the caption their reviewer accepted, up to the persona's `flywheel.max_generated_share` (applied
here, once: those over it wait, recorded in metadata). metadata.json records every image's origin,
and each included candidate is frozen with the first version that included it.
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import dataset_candidates as dc
from persona_pipeline.db import models
from persona_pipeline.domain.dataset_share import bound_generated
from persona_pipeline.domain.provenance import describe_origin, origin_of
from persona_pipeline.domain.captions import fill, training_caption
from persona_pipeline.domain.training_captions import compose_training_caption
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.identity import FaceModelError, IdentityEmbedder
from persona_pipeline.resources.captioners import ClipCaptioner
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline.resources.evaluation import FaceModel
from persona_pipeline.training.params import LoraTrainingParams, TrainingConfigError
from persona_pipeline.resources.gemini import GeminiClient, GeminiError
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.fileio import atomic_write

if TYPE_CHECKING:
    from persona_pipeline.domain import dataset_quality as quality

CAPTIONS_HAVE_TRIGGER = "captions_start_with_trigger"
IMAGE_COUNT = "image_count_in_range"
IMAGE_QUALITY = "image_quality"
NEAR_DUPLICATES = "near_duplicates"
IDENTITY_OUTLIERS = "identity_outliers"
# What starts the checks (in their descriptions, as the Dagster UI shows them).
RUNS_WITH_DATASET = "Runs with every training_dataset materialisation (photo_set, dataset_version and persona_chain jobs)."
BLOCKS = " Blocking: a failure stops lora_model from training on the dataset."
CHECKS = [
    dg.AssetCheckSpec(CAPTIONS_HAVE_TRIGGER, asset="training_dataset", blocking=True,
                      description="Every training caption starts with the persona's trigger word. " + RUNS_WITH_DATASET + BLOCKS),
    dg.AssetCheckSpec(IMAGE_COUNT, asset="training_dataset", blocking=True,
                      description="The number of training images is within training.min_photos..max_photos. " + RUNS_WITH_DATASET
                      + BLOCKS),
    dg.AssetCheckSpec(IMAGE_QUALITY, asset="training_dataset",
                      description="Sharpness (variance of the Laplacian), exposure and resolution of every image. "
                      + RUNS_WITH_DATASET),
    dg.AssetCheckSpec(NEAR_DUPLICATES, asset="training_dataset",
                      description="No two images closer than training.quality.duplicate_cosine (open_clip). " + RUNS_WITH_DATASET),
    dg.AssetCheckSpec(IDENTITY_OUTLIERS, asset="training_dataset",
                      description="No image far from the persona's open_clip centroid (robust z below "
                      "-training.quality.outlier_z). " + RUNS_WITH_DATASET),
]


def kohya_toml(subsets: list[dict], resolution: int, flip: bool, captions: dict | None = None) -> str:
    """kohya sd-scripts' dataset config: one dataset, a subset per folder (`is_reg` for class images), with
    the caption options our own loop trains with (`caption_options`), so a kohya run sees the same captions."""
    captions = captions or {"shuffle_caption": False, "keep_tokens": 1, "caption_tag_dropout_rate": 0.0}
    lines = ["[general]", 'caption_extension = ".txt"', f"shuffle_caption = {str(captions['shuffle_caption']).lower()}",
             f"keep_tokens = {captions['keep_tokens']}"]
    if captions["caption_tag_dropout_rate"]:
        lines.append(f"caption_tag_dropout_rate = {captions['caption_tag_dropout_rate']}")
    lines += [f"flip_aug = {str(flip).lower()}", "", "[[datasets]]", f"resolution = {resolution}", "batch_size = 1"]
    for subset in subsets:
        lines += ["", "  [[datasets.subsets]]", f"  image_dir = {json.dumps(subset['image_dir'])}",
                  f"  class_tokens = {json.dumps(subset['class_tokens'])}", f"  num_repeats = {subset['repeats']}"]
        if subset.get("is_reg"):
            lines.append("  is_reg = true")
    return "\n".join(lines) + "\n"


@dg.asset(partitions_def=persona_partitions, deps=["source_photos"], group_name="dataset", kinds={"kohya"},
          check_specs=CHECKS)
def training_dataset(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
                     clip: ClipModel, face: FaceModel, gemini: GeminiClient, diffusion: DiffusionBackend,
                     links: UiLinks) -> dg.MaterializeResult:
    """The captioned kohya dataset of the accepted photos, with its quality checks. Started after source_photos
    in the photo_set job (persona_folders sensor) and the persona_chain job, and by the dataset_version job
    (dataset_reviews sensor) after dataset candidates are accepted in the review form."""
    slug = context.partition_key
    with database.session() as session:
        persona, config = persona_for(session, slug)
        persona_id = persona.id
        photos = [(p.original_name, Path(p.path), p.pixel_sha256, p.caption) for p in session.scalars(
            select(models.SourcePhoto).where(models.SourcePhoto.persona_id == persona_id, models.SourcePhoto.status == "accepted")
            .order_by(models.SourcePhoto.original_name))]
        previous = [(d.path, d.id) for d in session.scalars(select(models.Dataset).where(models.Dataset.persona_id == persona_id))]
        names = {sha: name for name, _, sha, _ in photos}
        # Already-built candidates first (a new version keeps what the last one had), then the oldest accepted.
        accepted = sorted(dc.accepted_for(session, persona_id), key=lambda r: r.dataset_version is None)
        extra, left_out, bound_reason = bound_generated(len(photos), accepted, config.flywheel.max_generated_share)
        extra = [(r.id, storage.persona_dir(slug) / r.image_path, r.sha256, training_caption(config.trigger_word, r.caption),
                  origin_of(r, names)) for r in extra]
        left_out = [{"dataset_candidate": r.id, "image": r.image_path, "reason": bound_reason} for r in left_out]
    if not photos:
        raise dg.Failure(f"{slug}: no accepted source photos; materialise source_photos first")
    missing = [str(path) for _, path, *_ in extra if not path.is_file()]
    if missing:
        raise dg.Failure(f"{slug}: accepted dataset candidate image(s) missing: {', '.join(missing)}; nothing was built")
    training = config.training
    try:
        diffusion = diffusion.for_persona(config)  # its regularisation images come from the persona's base model
        identity = face.identity(clip, config.generation.identity_ignores())
    except (TrainingConfigError, FaceModelError) as exc:
        raise dg.Failure(f"{slug}: {exc}") from None

    edits = _collect_edits(context, database, persona_id, [Path(p) for p, _ in previous])
    captions = _captions(context, database, persona_id, config, photos, clip, gemini)
    if bound_reason:
        context.log.warning(f"{slug}: {bound_reason}")
    # One list from here on: (name, file, sha256, caption, caption source, origin) per image.
    entries = [(name, path, sha, c, s, {"kind": "photo", "photo": name, "sha256": sha})
               for (name, path, sha, _), (c, s) in zip(photos, captions)]
    entries += [(f"dataset candidate #{cid}", path, sha, caption, "dataset review", origin)
                for cid, path, sha, caption, origin in extra]
    params = diffusion.training_params(training.param_overrides())
    resolution, caption_options = params.resolution, params.caption_options()
    reg = _regularisation_set(context, storage, diffusion, slug, config, resolution)

    subset_name = f"{training.repeats}_{config.trigger_word} {config.class_word}"
    settings = {"repeats": training.repeats, "trigger": config.trigger_word, "class_word": config.class_word,
                "captioner": training.captioner, "flip_aug": training.flip_augment, "resolution": resolution,
                "regularization": reg["key"] if reg else None, "reg_repeats": training.regularization.repeats if reg else None}
    if caption_options != LoraTrainingParams().caption_options():  # a version per caption options; the defaults keep old versions
        settings["caption_options"] = caption_options
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for _, _, sha, caption, _, _ in entries:
        digest.update(sha.encode() + b"\0" + caption.encode() + b"\0")
    version = digest.hexdigest()

    folder = storage.dataset_dir(slug, version[:16])
    if not (folder / "metadata.json").is_file():  # versions are immutable: build once, in a temp folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subset = partial / subset_name
        subset.mkdir(parents=True)
        for index, (_, path, _, caption, _, _) in enumerate(entries, start=1):
            _copy_png(path, subset / f"{index:04d}.png")
            (subset / f"{index:04d}.txt").write_text(caption + "\n", encoding="utf-8")
        subsets = [{"image_dir": str(folder / subset_name), "class_tokens": f"{config.trigger_word} {config.class_word}",
                    "repeats": training.repeats}]
        if reg:
            reg_dir = partial / "reg" / f"{training.regularization.repeats}_{config.class_word}"
            shutil.copytree(reg["folder"], reg_dir, ignore=shutil.ignore_patterns("*.json"))
            subsets.append({"image_dir": str(folder / reg_dir.relative_to(partial)), "class_tokens": config.class_word,
                            "repeats": training.regularization.repeats, "is_reg": True})
        (partial / "dataset.toml").write_text(kohya_toml(subsets, resolution, training.flip_augment, caption_options))
        atomic_write(partial / "metadata.json", json.dumps({
            "persona": slug, "version": version, "settings": settings, "subset": subset_name,
            "images": [{"file": f"{i:04d}.png", "source": name, "sha256": sha, "caption": c, "caption_source": s,
                        "origin": origin} for i, (name, _, sha, c, s, origin) in enumerate(entries, start=1)],
            "generated_share": {"max": config.flywheel.max_generated_share, "generated": len(extra),
                                "images": len(entries), "left_out": left_out},
            "regularization": {"images": reg["count"], "prompt": reg["prompt"], "folder": str(reg["folder"])} if reg else None,
        }, indent=2).encode())
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    else:
        _restore_captions(context, folder)

    with database.session() as session:
        dataset = session.scalar(select(models.Dataset).where(models.Dataset.persona_id == persona_id, models.Dataset.version == version))
        if dataset is None:
            session.add(models.Dataset(persona_id=persona_id, version=version, path=str(folder),
                                       image_count=len(entries), settings=settings))
        frozen = dc.mark_included(session, [cid for cid, *_ in extra], version)

    images = [folder / subset_name / f"{i:04d}.png" for i in range(1, len(entries) + 1)]
    caption_files = {image.name: (image.with_suffix(".txt").read_text(encoding="utf-8").strip()
                                  if image.with_suffix(".txt").is_file() else "") for image in images}
    sources = [s for _, _, _, _, s, _ in entries]
    storage.push_written()  # object storage: a failed upload fails the step (a teardown failure only logs)
    return dg.MaterializeResult(
        metadata={
            "dataset_version": version,
            "images": len(entries),
            "generated_images": len(extra),
            "candidates_frozen": frozen,
            "generated_share_bound": bound_reason or "within the bound",
            "left_out": table(left_out),
            "caption_sources": json.dumps({s: sources.count(s) for s in sorted(set(sources))}),
            "edits_recorded": edits,
            "flip_augment": training.flip_augment,
            "regularization_images": reg["count"] if reg else 0,
            "path": dg.MetadataValue.path(str(folder)),
            "captions": table([{"image": f"{i:04d}.png", "source_photo": name, "caption": c, "source": s,
                                "origin": describe_origin(origin)}
                               for i, (name, _, _, c, s, origin) in enumerate(entries, start=1)]),
            **sheet_metadata("preview", [(image, image.name) for image in images], storage, links, slug),
        },
        check_results=_quality_checks(clip, identity, config, images, caption_files, resolution),
    )


def _collect_edits(context, database: AppDatabase, persona_id: int, folders: list[Path]) -> int:
    """Record captions a person changed in built dataset folders (file text differs from what the
    folder's metadata.json says was written). Oldest edit first, so the newest one wins."""
    found = []
    for folder in folders:
        meta_path = folder / "metadata.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        subset = folder / meta.get("subset", f"{meta['settings']['repeats']}_{meta['settings']['trigger']} {meta['settings']['class_word']}")
        for image in meta["images"]:
            text_file = (subset / image["file"]).with_suffix(".txt")
            if not text_file.is_file() or image.get("origin", {}).get("kind", "photo") != "photo":
                continue  # a candidate's caption is edited in the review queue, before it is built
            text = text_file.read_text(encoding="utf-8").strip()
            if text and text != image["caption"]:
                found.append((text_file.stat().st_mtime, image["sha256"], text, text_file))
    with database.session() as session:
        for _, pixel_sha, text, text_file in sorted(found):
            row = session.scalar(select(models.PhotoCaption).where(
                models.PhotoCaption.persona_id == persona_id, models.PhotoCaption.pixel_sha256 == pixel_sha,
                models.PhotoCaption.kind == "edited"))
            if row is None:
                row = models.PhotoCaption(persona_id=persona_id, pixel_sha256=pixel_sha, kind="edited", captioner="person", fields={})
                session.add(row)
            if row.caption != text:
                context.log.info(f"caption edited by hand in {text_file}: kept for later versions")
            row.caption = text
            row.fields = {"edited_in": str(text_file)}
    return len(found)


def _captions(context, database: AppDatabase, persona_id: int, config: PersonaConfig, photos: list, clip: ClipModel,
              gemini: GeminiClient) -> list[tuple[str, str]]:
    """(caption, source) per photo, in order; see the module docstring for the order of sources."""
    training = config.training
    choice = training.captioner
    if choice == "gemini" and not gemini.enabled:
        raise dg.Failure("training.captioner is 'gemini' but GEMINI_API_KEY is not set")
    use_gemini = choice == "gemini" or (choice == "auto" and gemini.enabled)
    captioner = gemini if use_gemini else ClipCaptioner(clip)
    with database.session() as session:
        stored = {(r.pixel_sha256, r.kind): (r.caption, r.captioner) for r in session.scalars(
            select(models.PhotoCaption).where(models.PhotoCaption.persona_id == persona_id))}

    values = {"trigger": config.trigger_word, "class_word": config.class_word, "name": config.name}
    out: list[tuple[str, str] | None] = []
    missing = []
    for index, (name, path, pixel_sha, sidecar) in enumerate(photos):
        if sidecar:
            out.append((training_caption(config.trigger_word, sidecar), "sidecar"))
        elif (pixel_sha, "edited") in stored:
            out.append((stored[(pixel_sha, "edited")][0], "edited"))
        elif choice == "template":
            body = fill(training.caption_template, values, what="persona.yaml training.caption_template")
            out.append((training_caption(config.trigger_word, body), "template"))
        elif (pixel_sha, "generated") in stored and stored[(pixel_sha, "generated")][1] == captioner.name:
            out.append((stored[(pixel_sha, "generated")][0], captioner.name))
        else:
            out.append(None)
            missing.append(index)
    if missing:
        context.log.info(f"captioning {len(missing)} photos with {captioner.name}")
    # Gemini one photo at a time, each saved at once; open_clip in one batch.
    batches = [[i] for i in missing] if use_gemini else ([missing] if missing else [])
    for batch in batches:
        try:
            fields = captioner.caption_fields([photos[i][1] for i in batch], trigger_word=config.trigger_word,
                                              class_word=config.class_word)
        except GeminiError as exc:
            raise dg.Failure(f"captioning {photos[batch[0]][0]} failed: {exc}; the captions made so far are saved") from None
        with database.session() as session:
            for i, caption_fields in zip(batch, fields):
                caption = compose_training_caption(config.trigger_word, config.class_word, caption_fields)
                pixel_sha = photos[i][2]
                row = session.scalar(select(models.PhotoCaption).where(
                    models.PhotoCaption.persona_id == persona_id, models.PhotoCaption.pixel_sha256 == pixel_sha,
                    models.PhotoCaption.kind == "generated"))
                if row is None:
                    row = models.PhotoCaption(persona_id=persona_id, pixel_sha256=pixel_sha, kind="generated")
                    session.add(row)
                row.caption, row.captioner, row.fields = caption, captioner.name, caption_fields.to_dict()
                out[i] = (caption, captioner.name)
    return out


def _copy_png(source: Path, target: Path) -> None:
    """Every dataset image is `NNNN.png`: a PNG copied as it is, anything else converted."""
    if source.suffix.lower() == ".png":
        shutil.copyfile(source, target)
    else:
        from PIL import Image

        with Image.open(source) as image:
            image.convert("RGB").save(target, format="PNG")


def _regularisation_set(context, storage: PersonaStorage, diffusion: DiffusionBackend, slug: str, config: PersonaConfig,
                        size: int) -> dict | None:
    """Class images from the base model without a LoRA, generated once per (base model, prompt,
    count, seed, size) and reused while those stay the same."""
    reg = config.training.regularization
    if reg.images == 0:
        return None
    prompt = reg.prompt.format(class_word=config.class_word, trigger=config.trigger_word)
    key = hashlib.sha256(json.dumps({"base": diffusion.base_model, "prompt": prompt, "images": reg.images,
                                     "seed": reg.seed, "size": size}, sort_keys=True).encode()).hexdigest()
    folder = storage.persona_dir(slug) / "regularization" / key[:16]
    if (folder / "done.json").is_file():
        context.log.info(f"reusing {reg.images} regularisation images from {folder}")
    else:
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        context.log.info(f"generating {reg.images} regularisation images of {prompt!r} with {diffusion.base_model}")
        for index in range(reg.images):
            image = diffusion.generate_plain(prompt, [reg.seed + index], size=size)[0]
            image.save(partial / f"reg{index:04d}.png")
            (partial / f"reg{index:04d}.txt").write_text(prompt + "\n", encoding="utf-8")
        atomic_write(partial / "done.json", json.dumps({"prompt": prompt, "images": reg.images, "seed": reg.seed,
                                                        "size": size, "base_model": diffusion.base_model}).encode())
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return {"key": key, "folder": folder, "count": reg.images, "prompt": prompt}


def _restore_captions(context, folder: Path) -> None:
    """A reused version whose caption file was deleted or still holds a superseded edit (an edit
    reverted in a later version leads back to this one) gets it back from metadata.json (the
    version's content is fixed by its hash; the edits were recorded before this runs)."""
    meta = json.loads((folder / "metadata.json").read_text())
    subset = folder / meta["subset"] if "subset" in meta else None
    if subset is None:
        return
    for image in meta["images"]:
        text_file = (subset / image["file"]).with_suffix(".txt")
        current = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else None
        if current != image["caption"]:
            text_file.write_text(image["caption"] + "\n", encoding="utf-8")
            context.log.warning(f"{text_file} {'was missing' if current is None else 'held a superseded edit'}; "
                                "restored the caption recorded for this dataset version")


def _quality_checks(clip: ClipModel, identity: IdentityEmbedder, config: PersonaConfig, images: list[Path],
                    captions: dict[str, str], resolution: int) -> list[dg.AssetCheckResult]:
    from PIL import Image  # PIL and numpy: here, not when the code location loads

    from persona_pipeline.domain import dataset_quality as quality

    training, limits = config.training, config.training.quality
    stats = {}
    for image in images:
        with Image.open(image) as handle:
            stats[image.name] = quality.image_stats(handle)
    names = [image.name for image in images]
    embeddings = clip.embed_images(images)
    groups = {
        CAPTIONS_HAVE_TRIGGER: quality.trigger_findings(captions, config.trigger_word),
        IMAGE_COUNT: quality.count_findings(len(images), training.min_photos, training.max_photos),
        IMAGE_QUALITY: (quality.blur_findings(stats, limits.blur_min_variance) + quality.exposure_findings(stats)
                        + quality.resolution_findings(stats, resolution)),
        NEAR_DUPLICATES: quality.near_duplicate_findings(names, embeddings, limits.duplicate_cosine),
        IDENTITY_OUTLIERS: _identity_findings(identity, images, names, embeddings, limits.outlier_z),
    }
    results = []
    for check, findings in groups.items():
        blocking = check in (CAPTIONS_HAVE_TRIGGER, IMAGE_COUNT)
        worst = "ERROR" if blocking or any(f.severity == "ERROR" for f in findings) else "WARN"
        description = "; ".join(f.message for f in findings[:20])
        if len(findings) > 20:
            description += f"; and {len(findings) - 20} more"
        results.append(dg.AssetCheckResult(
            check_name=check, passed=not findings,
            severity=dg.AssetCheckSeverity.ERROR if worst == "ERROR" else dg.AssetCheckSeverity.WARN,
            description=description or None,
            metadata={"findings": len(findings),
                      **({"identity_method": identity.method} if check == IDENTITY_OUTLIERS else {}),
                      "files": ", ".join(sorted({f.file for f in findings if f.file})) or "-",
                      "details": table([{"file": f.file, "severity": f.severity, "value": "" if f.value is None else f"{f.value:.4g}",
                                         "threshold": "" if f.threshold is None else f"{f.threshold:.4g}", "message": f.message}
                                        for f in findings])},
        ))
    return results


def _identity_findings(identity: IdentityEmbedder, images: list[Path], names: list[str], clip_embeddings,
                       z: float) -> "list[quality.Finding]":
    """Identity outliers in the identity model's space: open_clip's embeddings as they are, or the
    face model's, among the photos with a face, plus a finding for each photo without one."""
    from persona_pipeline.domain import dataset_quality as quality

    if not identity.face:
        return quality.identity_outlier_findings(names, clip_embeddings, z)
    embedded = identity.embed(images)
    kept = [i for i, ok in enumerate(embedded.found) if ok]
    return (quality.faceless_findings(names, embedded.found, identity.method)
            + quality.identity_outlier_findings([names[i] for i in kept], embedded.vectors[kept], z))
