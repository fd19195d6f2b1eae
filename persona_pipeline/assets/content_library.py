"""content_library: the images a persona can post. Approved run winners (and, with persona.yaml
`library.include_source_photos`, the accepted source photos) become library items with an
open_clip embedding; items already embedded are never embedded again."""

from pathlib import Path

import dagster as dg
from sqlalchemy import or_, select

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import library, models
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage


@dg.asset(partitions_def=persona_partitions, deps=["rankings", "source_photos"], group_name="library",
          kinds={"open_clip"})
def content_library(context: dg.AssetExecutionContext, database: AppDatabase, clip: ClipModel, storage: PersonaStorage,
                    links: UiLinks) -> dg.MaterializeResult:
    """Adds new winners (and, if the persona asks, its source photos) to the library with open_clip embeddings.
    Started by the persona_posting schedule and the review_events sensor after a winner pick (job library),
    or by the persona_chain job."""
    slug = context.partition_key
    model_id = clip.model_id
    with database.session() as session:
        persona, config = persona_for(session, slug)
        sync = library.sync_library(session, persona.id, config.library.include_source_photos)
        model = models.LibraryItem
        # Only the items to embed are read, and without any blob: the library grows by a few a day.
        to_embed = [(i, Path(path)) for i, path in session.execute(select(model.id, model.image_path).where(
            model.persona_id == persona.id, model.status != "removed",
            or_(model.embedding.is_(None), model.embedding_model.is_(None), model.embedding_model != model_id))
            .order_by(model.id))]
    missing = [(item_id, path) for item_id, path in to_embed if not path.is_file()]
    if missing:
        raise dg.Failure(f"{slug}: library image(s) missing on disk: "
                         + ", ".join(f"item {i} ({p})" for i, p in missing[:5]))
    vectors = clip.embed_images([p for _, p in to_embed]) if to_embed else []
    with database.session() as session:
        for (item_id, _), vector in zip(to_embed, vectors):
            library.set_embedding(session.get(models.LibraryItem, item_id), vector, model_id)
        items = session.execute(select(model.id, model.kind, model.status, model.pillar_id, model.image_path).where(
            model.persona_id == persona.id)).all()  # the counts below need no embedding
        pillars = {p.id: p.name for p in session.scalars(select(models.ContentPillar).where(
            models.ContentPillar.persona_id == persona.id))}
        held = library.held_item_ids(session, persona.id)
        added = [i for i in items if i.id in set(sync.added)]
        by_pillar: dict[str, dict[str, int]] = {}
        for item in items:
            row = by_pillar.setdefault(pillars.get(item.pillar_id, "(unassigned)"), {"available": 0, "held": 0, "used": 0})
            if item.status == "used":
                row["used"] += 1
            elif item.status == "available":
                row["held" if item.id in held else "available"] += 1
        status_counts = library.counts_by_status(session, persona.id)
    context.log.info(f"{slug}: library has {len(items)} item(s); {len(sync.added)} new, {len(to_embed)} embedded "
                     f"({model_id}), {sync.removed} taken out, {sync.restored} put back")
    return dg.MaterializeResult(metadata={
        "items": len(items),
        "new_items": len(sync.added),
        "embedded": len(to_embed),
        "removed": sync.removed,
        "available": sum(r["available"] for r in by_pillar.values()),
        "used": status_counts.get("used", 0),
        "source_photos_included": config.library.include_source_photos,
        "embedding_model": model_id,
        "by_pillar": table([{"pillar": name, **row} for name, row in sorted(by_pillar.items())]),
        **sheet_metadata("new_images", [(Path(i.image_path), f"#{i.id} {i.kind}") for i in added], storage, links, slug),
    })
