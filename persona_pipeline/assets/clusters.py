"""clusters: the content library grouped by look. New items join existing clusters; a recluster
(k by silhouette) happens only when enough items fit none, and then keeps each cluster's key,
name and pillar where its centroid stays (domain/clustering.py has the rules).

Each cluster maps to a pillar: the pillar most of its winners were made for, or, for a cluster
of source photos only, the pillar whose name and guidelines open_clip finds nearest its centroid.
New clusters are named by Gemini when GEMINI_API_KEY is set, else from their captions' top terms.

Only the items without a cluster (new ones and waiting outliers) are read with their embeddings
while every cluster still has exactly its stored members (clustering.join_new_items); a recluster,
a removed member or a new embedding model reads them all (db/library.py `placed_items`)."""

from pathlib import Path
from typing import NamedTuple

import dagster as dg
from sqlalchemy import func, select
from sqlalchemy import update as sql_update

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import library, models
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.gemini import GeminiClient, GeminiError
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage

LABEL_IMAGES = 4  # members nearest the centroid shown to Gemini when naming a cluster


def _pillar_by_text(clip: ClipModel, centroid, pillars: list[models.ContentPillar]) -> int | None:
    """The pillar whose text open_clip puts nearest the cluster centroid (an array; zero-shot)."""
    import numpy as np

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
    import numpy as np  # numpy and scikit-learn: here, not when the code location loads

    from persona_pipeline.domain import clustering

    slug = context.partition_key
    model_id = clip.model_id
    version = context.run_id  # the run that last changed a cluster
    with database.session() as session:
        persona, config = persona_for(session, slug)
        items = library.placed_items(session, persona.id, model_id)  # no embedding read yet
        rows = {c.key: c for c in session.scalars(select(models.Cluster).where(models.Cluster.persona_id == persona.id))}
        active = [c for c in rows.values() if c.active]
        if not items:
            context.log.warning(f"{slug}: the library is empty (no approved winner yet); no clusters")
            return dg.MaterializeResult(metadata={"items": 0, "clusters": 0})
        dims = {len(c.centroid) for c in active}
        if dims and dims != {library.embedding_dims(session, items[0].id)}:
            context.log.warning(f"{slug}: the embedding model changed ({model_id}); every cluster is rebuilt")
            active = []
        by_id = {c.id: c.key for c in active}
        current = [by_id.get(i.cluster_id) for i in items]
        update = _incremental(session, items, current, active) if active else None
        if update is None:  # a recluster, or members left: the full pass, every embedding read
            embeddings = library.embeddings(session, [i.id for i in items])
            update = clustering.update_clusters(
                [clustering.ExistingCluster(c.key, c.centroid, c.radius, c.size) for c in active], embeddings,
                current, max_k=config.library.max_clusters,
                first_new_key=(session.scalar(select(func.max(models.Cluster.key)).where(
                    models.Cluster.persona_id == persona.id)) or 0) + 1)
            embedding_of, read = dict(zip((i.id for i in items), embeddings)), len(items)
        else:
            embedding_of, read = {}, update.read

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
                        embedding_of[i.id] - np.asarray(stats.centroid))))[:LABEL_IMAGES]
                    try:
                        row.label = gemini.cluster_label([Path(i.image_path) for i in nearest], words, log=context.log)
                        row.label_source = gemini.name
                    except GeminiError as exc:
                        context.log.warning(f"{slug}: Gemini could not name cluster {row.key} ({exc}); "
                                            f"using its top terms {row.label!r}")

        changes = []
        for index, item in enumerate(items):
            key = update.keys[index]
            change = {"cluster_id": rows[key].id if key is not None else None, "cluster_distance": update.distances[index]}
            if item.kind == "source_photo" and key is not None:
                # A photo has no run: its cluster gives it a pillar and a theme for the strategy.
                change.update(pillar_id=rows[key].pillar_id, theme=rows[key].label)
            if any(getattr(item, field) != value for field, value in change.items()):
                changes.append({"id": item.id, **change})
                items[index] = item._replace(**change)
        if changes:
            session.execute(update_items, changes)
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
                     f"{len(update.retired_keys)} retired, {update.moved} item(s) moved, {update.outliers} outlier(s), "
                     f"{read} embedding(s) read")
    return dg.MaterializeResult(metadata={
        "items": len(items),
        "clusters": len(update.clusters),
        "reclustered": update.reclustered,
        "new_clusters": len(update.new_keys),
        "retired_clusters": len(update.retired_keys),
        "moved_items": update.moved,
        "outliers": update.outliers,
        "embeddings_read": read,
        "silhouette": float(update.silhouette) if update.silhouette is not None else float("nan"),
        "table": table(summary),
        **sheet_metadata("preview", previews, storage, links, slug),
    })


update_items = sql_update(models.LibraryItem)  # bulk UPDATE by primary key, one row per dict


def _incremental(session, items: list, current: list[int | None], active: list[models.Cluster]):
    """The pass that reads only the embeddings of the items without a key, when every active
    cluster still has exactly its stored members; None when the full pass is needed."""
    from persona_pipeline.domain import clustering

    member_distances: dict[int, list[float]] = {c.key: [] for c in active}
    for item, key in zip(items, current):
        if key is not None:
            if item.cluster_distance is None:
                return None
            member_distances[key].append(item.cluster_distance)
    if any(len(member_distances[c.key]) != c.size for c in active):
        return None  # members were removed since the last pass: their centroid must be measured again
    unkeyed = [index for index, key in enumerate(current) if key is None]
    embeddings = library.embeddings(session, [items[i].id for i in unkeyed])
    joined = clustering.join_new_items(
        [clustering.ExistingCluster(c.key, c.centroid, c.radius, c.size) for c in active], member_distances,
        embeddings, total_items=len(items))
    if joined is None:
        return None
    keys, distances = list(current), [item.cluster_distance for item in items]
    for index, key, distance in zip(unkeyed, joined.keys, joined.distances):
        keys[index], distances[index] = key, distance
    return IncrementalUpdate(keys, distances, joined.clusters, joined.retired_keys, joined.outliers, len(unkeyed))


class IncrementalUpdate(NamedTuple):
    """What update_clusters returns, for the incremental pass (no recluster: nothing moves, nothing new)."""
    keys: list
    distances: list
    clusters: dict
    retired_keys: list
    outliers: int
    read: int
    reclustered: bool = False
    moved: int = 0
    new_keys: tuple = ()
    silhouette: None = None
