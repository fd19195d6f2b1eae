"""k-means over embeddings, with k chosen by silhouette (scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

SEED = 42


@dataclass(frozen=True)
class Clustering:
    k: int
    labels: list[int]
    centroids: np.ndarray
    distances: list[float]  # each item's distance to its centroid
    silhouette: float | None


def cluster_embeddings(embeddings: np.ndarray, max_k: int = 20) -> Clustering:
    """Fewer than 3 items form one cluster; otherwise the k in 2..min(max_k, n-1) with the best
    silhouette wins (smaller k on a tie)."""
    n = len(embeddings)
    if n == 0:
        return Clustering(0, [], np.zeros((0, 0)), [], None)
    if n < 3:
        centroid = embeddings.mean(axis=0, keepdims=True)
        return Clustering(1, [0] * n, centroid, [float(d) for d in np.linalg.norm(embeddings - centroid, axis=1)], None)
    distinct = len(np.unique(embeddings, axis=0))
    best: tuple[float, KMeans] | None = None
    for k in range(2, min(max_k, n - 1, distinct) + 1):
        model = KMeans(n_clusters=k, random_state=SEED, n_init=10).fit(embeddings)
        if len(set(model.labels_)) < 2:
            continue
        score = float(silhouette_score(embeddings, model.labels_))
        if best is None or score > best[0] + 1e-12:
            best = (score, model)
    if best is None:  # all points identical (or nearly)
        centroid = embeddings.mean(axis=0, keepdims=True)
        return Clustering(1, [0] * n, centroid, [0.0] * n, None)
    score, model = best
    distances = np.linalg.norm(embeddings - model.cluster_centers_[model.labels_], axis=1)
    return Clustering(model.n_clusters, [int(x) for x in model.labels_], model.cluster_centers_,
                      [float(d) for d in distances], score)
