"""clusters: open_clip embeddings of the approved images (run winners), then k-means. Each
cluster is named after its most common pillar and mapped to it."""

import hashlib
from collections import Counter
from pathlib import Path

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import contact_sheet_md, persona_for, table
from persona_pipeline.db import models
from persona_pipeline.domain.clustering import cluster_embeddings
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.database import AppDatabase


@dg.asset(partitions_def=persona_partitions, deps=["rankings"], group_name="library", kinds={"scikit-learn"})
def clusters(context: dg.AssetExecutionContext, database: AppDatabase, clip: ClipModel) -> dg.MaterializeResult:
    slug = context.partition_key
    with database.session() as session:
        persona, _ = persona_for(session, slug)
        approved = session.execute(
            select(models.Candidate, models.GenerationRun.pillar_id, models.ContentPillar.name)
            .join(models.GenerationRun, models.Candidate.run_id == models.GenerationRun.id)
            .outerjoin(models.ContentPillar, models.GenerationRun.pillar_id == models.ContentPillar.id)
            .where(models.GenerationRun.persona_id == persona.id, models.Candidate.status == "winner")
            .order_by(models.Candidate.id)).all()
    if not approved:
        context.log.warning(f"{slug}: no approved images yet (no run has a winner); the library is empty")
        return dg.MaterializeResult(metadata={"approved_images": 0, "clusters": 0})

    paths = [Path(c.image_path) for c, _, _ in approved]
    result = cluster_embeddings(clip.embed_images(paths))
    version = hashlib.sha256(",".join(str(c.id) for c, _, _ in approved).encode()).hexdigest()[:16]
    summary = []
    with database.session() as session:
        if session.scalar(select(models.Cluster.id).where(models.Cluster.persona_id == persona.id, models.Cluster.version == version)):
            context.log.info(f"{slug}: the approved set is unchanged (clustering {version}); replacing its clusters")
            for old in session.scalars(select(models.Cluster).where(models.Cluster.persona_id == persona.id,
                                                                    models.Cluster.version == version)):
                session.delete(old)
            session.flush()
        for label in range(result.k):
            members = [i for i, lab in enumerate(result.labels) if lab == label]
            pillar_votes = Counter((approved[i][1], approved[i][2]) for i in members)
            (pillar_id, pillar_name), _ = pillar_votes.most_common(1)[0]
            cluster = models.Cluster(persona_id=persona.id, version=version, label=f"{pillar_name or 'unassigned'} {label + 1}",
                                     pillar_id=pillar_id, centroid=[round(float(x), 6) for x in result.centroids[label]],
                                     size=len(members))
            cluster.members = [models.ClusterMember(candidate_id=approved[i][0].id, distance=round(result.distances[i], 6))
                               for i in members]
            session.add(cluster)
            summary.append({"cluster": cluster.label, "pillar": pillar_name or "", "size": len(members),
                            "members": ", ".join(str(approved[i][0].id) for i in members)})
    return dg.MaterializeResult(metadata={
        "approved_images": len(approved),
        "clusters": result.k,
        "silhouette": float(result.silhouette) if result.silhouette is not None else float("nan"),
        "version": version,
        "table": table(summary),
        "preview": dg.MetadataValue.md(contact_sheet_md(paths, [f"#{c.id}" for c, _, _ in approved])),
    })
