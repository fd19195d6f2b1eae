"""source_photos: decode and check every file in the persona's photos/ folder, quarantine the bad
ones with a reason each, and normalise the good ones (EXIF orientation, RGB, size) to PNG.

A symbolic link in photos/ (or photos/ itself as a link) is quarantined as a link, by name: its
target is never opened, so the quarantine holds no copy of it, only the reason (the link itself
stays where the user put it)."""

import hashlib
import json

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import sheet_metadata, table
from persona_pipeline.db import models, registry
from persona_pipeline.domain.photos import AcceptedPhoto, inspect_photo
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.personas import load_persona
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.fileio import UnsafePath, atomic_write, read_regular

ENOUGH_PHOTOS = "enough_usable_photos"


@dg.asset(
    partitions_def=persona_partitions,
    group_name="dataset",
    kinds={"pillow", "sqlalchemy"},
    check_specs=[dg.AssetCheckSpec(ENOUGH_PHOTOS, asset="source_photos", blocking=True,
                                   description="At least training.min_photos photos survived the checks. Runs with every "
                                               "source_photos materialisation (photo_set and persona_chain jobs); blocking: "
                                               "a failure stops training_dataset and lora_model.")],
)
def source_photos(context: dg.AssetExecutionContext, database: AppDatabase, storage: PersonaStorage,
                  links: UiLinks) -> dg.MaterializeResult:
    """Checks and normalises the persona's photos/ folder (bad files quarantined with a reason each). Started
    by the persona_folders sensor (job photo_set) when a photo set changes, or by the persona_chain job."""
    slug = context.partition_key
    with database.session() as session:
        folder = registry.get_persona(session, slug).folder
    persona = load_persona(folder)  # re-read: the photos and settings may have changed since the sensor ran
    training = persona.config.training
    photos_hash = persona.photo_set_hash()

    accepted: list[tuple[str, AcceptedPhoto, str]] = []  # (name, photo, file sha)
    quarantined: list[dict] = []
    seen_files: dict[str, str] = {}
    seen_pixels: dict[str, str] = {}
    scan = persona.photo_scan()
    regular = set(scan.files)
    for path, reason in scan.refused:  # "data": None = nothing of it is read or copied
        quarantined.append({"file": path.name, "sha256": "", "reason": reason, "data": None})
    for path in persona.photo_files():
        try:
            data = read_regular(path)
        except UnsafePath as exc:  # swapped for a link since the listing
            quarantined.append({"file": path.name, "sha256": "", "reason": str(exc), "data": None})
            continue
        except OSError as exc:
            quarantined.append({"file": path.name, "sha256": "", "reason": f"unreadable: {exc}", "data": b""})
            continue
        file_sha = hashlib.sha256(data).hexdigest()
        if file_sha in seen_files:
            quarantined.append({"file": path.name, "sha256": file_sha, "data": data,
                                "reason": f"duplicate of {seen_files[file_sha]} (same content hash)"})
            continue
        seen_files[file_sha] = path.name
        outcome = inspect_photo(data, min_side=training.min_side, max_side=training.max_side)
        if not isinstance(outcome, AcceptedPhoto):
            quarantined.append({"file": path.name, "sha256": file_sha, "reason": outcome.reason, "data": data})
            continue
        if outcome.pixel_sha256 in seen_pixels:
            quarantined.append({"file": path.name, "sha256": file_sha, "data": data,
                                "reason": f"duplicate of {seen_pixels[outcome.pixel_sha256]} (same pixels)"})
            continue
        seen_pixels[outcome.pixel_sha256] = path.name
        accepted.append((path.name, outcome, file_sha))

    photos_dir, quarantine_dir = storage.photos_dir(slug), storage.quarantine_dir(slug)
    with database.session() as session:
        persona_row = registry.sync_persona(session, persona, photos_hash=photos_hash)
        rows = {r.original_name: r for r in session.scalars(
            select(models.SourcePhoto).where(models.SourcePhoto.persona_id == persona_row.id))}
        for name, photo, file_sha in accepted:
            target = photos_dir / f"{photo.pixel_sha256[:16]}.png"
            if not target.exists():
                atomic_write(target, photo.png)
            sidecar = persona.photos_dir / (name.rsplit(".", 1)[0] + ".txt")
            row = rows.pop(name, None) or models.SourcePhoto(persona_id=persona_row.id, original_name=name)
            row.sha256, row.status, row.reason, row.path = file_sha, "accepted", None, str(target)
            row.pixel_sha256, row.width, row.height = photo.pixel_sha256, photo.width, photo.height
            row.caption = read_regular(sidecar).decode("utf-8").strip() if sidecar in regular else None
            session.add(row)
        for item in quarantined:
            target = quarantine_dir / item["file"]
            if item["data"] is None:
                # A link: no copy. One left under its name by an earlier version held the target's bytes.
                if target.is_symlink() or target.is_file():
                    target.unlink()
            else:
                atomic_write(target, item["data"])
            row = rows.pop(item["file"], None) or models.SourcePhoto(persona_id=persona_row.id, original_name=item["file"])
            row.sha256, row.status, row.reason = item["sha256"], "quarantined", item["reason"]
            row.path = str(target) if item["data"] is not None else None
            row.pixel_sha256 = row.width = row.height = row.caption = None
            session.add(row)
        for gone in rows.values():
            gone.status, gone.reason = "removed", "no longer in the photos folder"
    if quarantined:
        atomic_write(quarantine_dir / "reasons.json",
                     json.dumps({q["file"]: q["reason"] for q in quarantined}, indent=2).encode())
    for item in quarantined:
        context.log.warning(f"{slug}: quarantined {item['file']}: {item['reason']}")

    usable = len(accepted)
    enough = usable >= training.min_photos
    storage.push_written()  # object storage: a failed upload fails the step (a teardown failure only logs)
    return dg.MaterializeResult(
        metadata={
            "usable": usable,
            "quarantined": len(quarantined),
            "photo_set_hash": photos_hash,
            "rotated_from_exif": sum(1 for _, p, _ in accepted if p.rotated),
            **sheet_metadata("preview", [(photos_dir / f"{p.pixel_sha256[:16]}.png", n) for n, p, _ in accepted],
                             storage, links, slug),
            "quarantine": table([{"file": q["file"], "reason": q["reason"]} for q in quarantined]),
            "photos_dir": dg.MetadataValue.path(str(photos_dir)),
        },
        check_results=[dg.AssetCheckResult(
            check_name=ENOUGH_PHOTOS, passed=enough, severity=dg.AssetCheckSeverity.ERROR,
            description=None if enough else f"{usable} usable photos; persona.yaml training.min_photos is {training.min_photos}",
            metadata={"usable": usable, "minimum": training.min_photos},
        )],
    )
