"""clusters: the content library grouped by look. New items join existing clusters; a recluster
(k by silhouette) happens only when enough items fit none, and then keeps each cluster's key,
name and pillar where its centroid stays (domain/clustering.py has the rules).

Each cluster maps to a pillar: the pillar most of its winners were made for, or, for a cluster
of source photos only, the pillar whose name and guidelines open_clip finds nearest its centroid.
New clusters are named by Gemini when GEMINI_API_KEY is set, else from their captions' top terms."""

from pathlib import Path

import dagster as dg
import numpy as np
from sqlalchemy import func, select

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import library, models
from persona_pipeline.domain import clustering
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.gemini import GeminiClient, GeminiError
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage

LABEL_IMAGES = 4  # members nearest the centroid shown to Gemini when naming a cluster


def _pillar_by_text(clip: ClipModel, centroid: np.ndarray, pillars: list[models.ContentPillar]) -> int | None:
    """The pillar whose text open_clip puts nearest the cluster centroid (zero-shot)."""
    if not pillars:
        return None
    texts = [f"{p.name}. {p.guidelines}".strip() for p in pillars]
    scores = clip.embed_texts(texts) @ (centroid / max(np.linalg.norm(centroid), 1e-12))
    return pillars[int(np.argmax(scores))].id


@dg.asset(partitions_def=persona_partitions, deps=["content_library"], group_name="library", kinds={"scikit-learn"})
def clusters(context: dg.AssetExecutionContext, database: AppDatabase, clip: ClipModel,
             gemini: GeminiClient, storage: PersonaStorage, links: UiLinks) -> dg.MaterializeResult:
    """Groups the library by look, each cluster named and mapped to a pillar. Started after content_library in
    the library job (persona_posting schedule, review_events sensor) and the persona_chain job."""
    slug = context.partition_key
    model_id = clip.model_id
    version = context.run_id  # the run that last changed a cluster
    with database.session() as session:
        persona, config = persona_for(session, slug)
        items = [i for i in session.scalars(select(models.LibraryItem).where(
            models.LibraryItem.persona_id == persona.id, models.LibraryItem.status != "removed")
            .order_by(models.LibraryItem.id)) if i.embedding is not None and i.embedding_model == model_id]
        rows = {c.key: c for c in session.scalars(select(models.Cluster).where(models.Cluster.persona_id == persona.id))}
        active = [c for c in rows.values() if c.active]
        dims = {len(c.centroid) for c in active}
        if items and dims and dims != {len(library.embedding_of(items[0]))}:
            context.log.warning(f"{slug}: the embedding model changed ({model_id}); every cluster is rebuilt")
            active = []
        by_id = {c.id: c.key for c in active}
        if not items:
            context.log.warning(f"{slug}: the library is empty (no approved winner yet); no clusters")
            return dg.MaterializeResult(metadata={"items": 0, "clusters": 0})
        embeddings = np.stack([library.embedding_of(i) for i in items])
        update = clustering.update_clusters(
            [clustering.ExistingCluster(c.key, c.centroid, c.radius, c.size) for c in active], embeddings,
            [by_id.get(i.cluster_id) for i in items], max_k=config.library.max_clusters,
            first_new_key=(session.scalar(select(func.max(models.Cluster.key)).where(
                models.Cluster.persona_id == persona.id)) or 0) + 1)

        for key in update.retired_keys:
            rows[key].active, rows[key].size = False, 0
        for key in set(rows) - set(update.clusters) - set(update.retired_keys):
            rows[key].active = False  # left behind by an embedding model change
        members: dict[int, list[int]] = {}
        for index, key in enumerate(update.keys):
            if key is not None:
                members.setdefault(key, []).append(index)
        pillars = [p for p in session.scalars(select(models.ContentPillar).where(
            models.ContentPillar.persona_id == persona.id, models.ContentPillar.active.is_(True))
            .order_by(models.ContentPillar.id))]
        pillar_names = {p.id: p.name for p in pillars}
        named, summary, previews = [], [], []
        for key, stats in sorted(update.clusters.items()):
            row = rows.get(key)
            if row is None:
                row = models.Cluster(persona_id=persona.id, key=key, label="", label_source="terms")
                session.add(row)
                rows[key] = row
            row.centroid = [round(float(x), 6) for x in stats.centroid]
            row.radius, row.size, row.active, row.version = float(stats.radius), int(stats.size), True, version
            member_items = [items[i] for i in members.get(key, [])]
            known = [i.pillar_id for i in member_items if i.kind == "winner"]
            row.pillar_id = (clustering.majority_pillar(known) if any(p is not None for p in known)
                             else row.pillar_id or _pillar_by_text(clip, np.asarray(stats.centroid), pillars))
            if not row.label:
                named.append((row, member_items, stats))
        session.flush()

        if named:
            terms = clustering.top_terms([[i.caption for i in m] for _, m, _ in named],
                                         stop_words=[persona.trigger_word, persona.class_word, "photo"])
            for (row, member_items, stats), words in zip(named, terms):
                row.label, row.label_source = clustering.label_from_terms(words, f"cluster {row.key}"), "terms"
                if gemini.enabled:
                    nearest = sorted(member_items, key=lambda i: float(np.linalg.norm(
                        library.embedding_of(i) - np.asarray(stats.centroid))))[:LABEL_IMAGES]
                    try:
                        row.label = gemini.cluster_label([Path(i.image_path) for i in nearest], words, log=context.log)
                        row.label_source = gemini.name
                    except GeminiError as exc:
                        context.log.warning(f"{slug}: Gemini could not name cluster {row.key} ({exc}); "
                                            f"using its top terms {row.label!r}")

        for index, item in enumerate(items):
            key = update.keys[index]
            item.cluster_id = rows[key].id if key is not None else None
            item.cluster_distance = update.distances[index]
            if item.kind == "source_photo" and key is not None:
                # A photo has no run: its cluster gives it a pillar and a theme for the strategy.
                item.pillar_id, item.theme = rows[key].pillar_id, rows[key].label
        for key, stats in sorted(update.clusters.items()):
            row = rows[key]
            member_items = [items[i] for i in members.get(key, [])]
            summary.append({"key": key, "label": row.label, "named_by": row.label_source,
                            "pillar": pillar_names.get(row.pillar_id, ""), "size": row.size,
                            "available": sum(1 for i in member_items if i.status == "available"),
                            "radius": round(row.radius, 4), "new": key in update.new_keys})
            if member_items:
                nearest = min(member_items, key=lambda i: i.cluster_distance or 0.0)
                previews.append((Path(nearest.image_path), f"{key}: {row.label}"))
    context.log.info(f"{slug}: {len(update.clusters)} cluster(s) over {len(items)} item(s); "
                     f"{'reclustered' if update.reclustered else 'incremental'}, {len(update.new_keys)} new, "
                     f"{len(update.retired_keys)} retired, {update.moved} item(s) moved, {update.outliers} outlier(s)")
    return dg.MaterializeResult(metadata={
        "items": len(items),
        "clusters": len(update.clusters),
        "reclustered": update.reclustered,
        "new_clusters": len(update.new_keys),
        "retired_clusters": len(update.retired_keys),
        "moved_items": update.moved,
        "outliers": update.outliers,
        "silhouette": float(update.silhouette) if update.silhouette is not None else float("nan"),
        "table": table(summary),
        **sheet_metadata("preview", previews, storage, links, slug),
    })
