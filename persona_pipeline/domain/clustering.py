"""The content library's clusters: k-means over image embeddings, k chosen by silhouette
(scikit-learn), kept stable from one run to the next. Pure: numpy, scikit-learn and scipy; no I/O.

fit_clusters — one clustering of all items
    k runs over 2..min(max_k, n - 1, distinct rows); the k with the best silhouette wins, the
    smaller k on a tie (within 1e-9). Fewer than 3 items, or all rows identical: one cluster.
    The rows searched are all items up to `sample_size` (default 4,000), above that a
    deterministic sample of `sample_size` items (numpy Generator(seed)). For each k, KMeans
    (10 starts, seed) runs on the searched rows projected on their first 64 principal components
    (see _search_space for why), and the partition is scored by the silhouette in the full space
    (scikit-learn, on every searched row). The best partition's centres then start Lloyd
    iterations (KMeans, full space) on all items, which give the final labels and centroids; the
    reported silhouette is the searched rows'. Same input, same seed -> same result: the work
    runs on one BLAS/OpenMP thread, so no summation order depends on the machine's thread count.
    100,000 x 512 takes 7-8 s on 2 busy cores (bench/clustering.py).

update_clusters — the incremental, stable update a run performs (rules):
    1. An item that already has the key of an existing cluster keeps it, unless rule 4 reclusters.
       A key that no longer exists counts as no key.
    2. An item without a key joins the nearest existing centroid when its distance is at most
       JOIN_TOLERANCE (1.1) x that cluster's radius; otherwise it is an outlier and keeps no key.
       (The radius covers 95 % of the members, so 1.1 x lets in what looks like a member.)
    3. Without a recluster, each cluster's centroid, radius and size are recomputed from its
       members after the joins; a cluster left with no members is retired. Nothing moves.
    4. Recluster everything with fit_clusters when there are items but no clusters yet, or when
       the outliers reach max(min_outliers, recluster_share x n). The new clusters are matched
       to the old ones with the Hungarian method (scipy linear_sum_assignment) on the distance
       between centroids; a pair counts only when the new centroid lies within the old
       cluster's radius (MATCH_TOLERANCE 1.0 x radius). A matched cluster keeps its old key,
       and with it its name and pillar; unmatched new clusters get fresh keys counting up from
       max(first_new_key, largest old key + 1), larger clusters first; unmatched old keys are
       retired. `moved` counts the items whose key changed.
    join_new_items runs rules 1-4 on the items without a key alone, for a library whose clusters
    still hold exactly their stored members: the same decisions, with the centroid as a running
    mean and the members' stored distances in the radius (its docstring says how that differs).
    Radius: the 95th percentile of the members' distances to their centroid, at least
    RADIUS_FLOOR (0.05; embeddings are unit vectors, so distances lie in 0..2), which lets a
    one-member cluster take in near-duplicates.

top_terms / label_from_terms — a readable name from the members' captions (TF-IDF with the
clusters as documents); majority_pillar — the pillar a cluster maps to.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# scikit-learn and scipy are imported inside the functions that use them: the code location imports
# this module, and loading them costs seconds of CPU on every UI reload and sensor process start.

SEED = 42
SAMPLE_SIZE = 4000          # above this many items, k is chosen on a sample of this size
PCA_DIMS = 64               # k-means runs for the choice of k use this many principal components
N_INIT = 10                 # k-means starts per k
REFINE_ITERATIONS = 30      # Lloyd iterations in the full space on all items
TIE = 1e-9                  # silhouettes closer than this are a tie (the smaller k wins)
RADIUS_PERCENTILE = 95.0
RADIUS_FLOOR = 0.05
JOIN_TOLERANCE = 1.1
MATCH_TOLERANCE = 1.0
_CHUNK_ROWS = 8192          # rows per block when measuring distances, to bound temporary memory

@functools.cache
def _thread_controller():
    """The thread-pool controller, made once scikit-learn's and scipy's libraries are loaded (it
    only sees the BLAS and OpenMP copies loaded when it is made)."""
    import scipy.sparse  # noqa: F401
    import sklearn.cluster  # noqa: F401
    try:  # shipped with scikit-learn, which we depend on
        import threadpoolctl
    except ImportError:  # pragma: no cover - without it we merely run with the default threads
        return None
    return threadpoolctl.ThreadpoolController()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One BLAS and one OpenMP thread: deterministic results and, on 2 shared cores, no slower."""
    controller = _thread_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1):
        yield


@dataclass(frozen=True)
class Clustering:
    k: int
    labels: list[int]
    centroids: np.ndarray
    distances: list[float]  # each item's distance to its centroid
    silhouette: float | None


@dataclass(frozen=True)
class ExistingCluster:
    """A cluster as stored after the previous run."""
    key: int
    centroid: Sequence[float] | np.ndarray
    radius: float
    size: int = 0  # informational: sizes are recomputed from the members


class ClusterStats(NamedTuple):
    centroid: np.ndarray
    radius: float
    size: int


@dataclass(frozen=True)
class ClusterUpdate:
    keys: list[int | None]          # per item; None = outlier waiting for a recluster
    distances: list[float | None]   # per item, to its cluster's (new) centroid
    clusters: dict[int, ClusterStats]
    reclustered: bool
    moved: int                      # items whose previous key changed (only on a recluster)
    new_keys: list[int]
    retired_keys: list[int]
    outliers: int
    silhouette: float | None        # of the recluster; None without one


def _as_matrix(embeddings: np.ndarray | Sequence[Sequence[float]], what: str = "embeddings") -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim == 1 and x.size == 0:
        return x.reshape(0, 0)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (items x dimensions), got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise ValueError(f"{what}: row {int(bad[0])} has a non-finite value ({len(bad)} such rows)")
    return np.ascontiguousarray(x)


def _distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's distance to its own centroid, computed in blocks (100k x 512 would need 400 MB)."""
    out = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), _CHUNK_ROWS):
        block = slice(start, start + _CHUNK_ROWS)
        out[block] = np.linalg.norm(x[block] - centroids[labels[block]], axis=1)
    return out


def _one_cluster(x: np.ndarray) -> Clustering:
    centroid = x.astype(np.float64).mean(axis=0, keepdims=True)
    distances = _distances(x, centroid, np.zeros(len(x), dtype=np.intp))
    return Clustering(1, [0] * len(x), centroid, distances.tolist(), None)


def _search_space(x: np.ndarray) -> np.ndarray:
    """The rows projected on their first PCA_DIMS principal components (when they have more).
    In 512 dimensions the noise of each embedding is spread over hundreds of directions while the
    differences between clusters live in a few dozen; k-means++ in the full space often seeds two
    centres in one cluster and 10 starts do not always recover (measured on the bench's blobs).
    The projection keeps the cluster structure, drops most of the noise, and makes each k-means
    run 8x cheaper."""
    from sklearn.decomposition import PCA

    if x.shape[1] <= PCA_DIMS or len(x) <= PCA_DIMS:
        return x
    return PCA(n_components=PCA_DIMS, svd_solver="full").fit_transform(x).astype(np.float32)


def _choose_k(x: np.ndarray, max_k: int, seed: int) -> tuple[np.ndarray | None, float | None]:
    """Labels 0..k-1 of the rows for the k with the best silhouette, with that silhouette;
    (None, None) when the rows form one cluster."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import pairwise_distances, silhouette_score

    upper = min(max_k, len(x) - 1)
    if upper >= 2:
        upper = min(upper, len(np.unique(x, axis=0)))
    if upper < 2:
        return None, None
    space = _search_space(x)
    # The silhouette is measured in the full space; one distance matrix serves every k.
    distances = pairwise_distances(x)
    np.fill_diagonal(distances, 0.0)
    best: tuple[float, np.ndarray] | None = None
    for k in range(2, upper + 1):
        labels = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(space).labels_
        if len(np.unique(labels)) < 2:
            continue
        score = float(silhouette_score(distances, labels, metric="precomputed"))
        if best is None or score > best[0] + TIE:
            best = (score, labels)
    if best is None:  # near-identical rows: no k splits them
        return None, None
    return np.unique(best[1], return_inverse=True)[1].astype(np.intp), best[0]


def fit_clusters(embeddings: np.ndarray | Sequence[Sequence[float]], max_k: int = 20, seed: int = SEED,
                 sample_size: int = SAMPLE_SIZE) -> Clustering:
    """k-means with k chosen by silhouette; see the module docstring for the rules."""
    from sklearn.cluster import KMeans

    if max_k < 1:
        raise ValueError(f"max_k: must be at least 1, got {max_k}")
    if sample_size < 3:
        raise ValueError(f"sample_size: must be at least 3, got {sample_size}")
    x = _as_matrix(embeddings)
    n = len(x)
    if n == 0:
        return Clustering(0, [], np.zeros((0, x.shape[1])), [], None)
    with _one_thread():
        if n < 3:
            return _one_cluster(x)
        rows = np.arange(n)
        if n > sample_size:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))
        searched = x[rows]
        labels, score = _choose_k(searched, max_k, seed)
        if labels is None:
            return _one_cluster(x)
        k = int(labels.max()) + 1
        start = np.stack([searched[labels == c].mean(axis=0) for c in range(k)])
        # Lloyd iterations in the full space on every item, from the chosen partition's centres.
        model = KMeans(n_clusters=k, init=start, n_init=1, max_iter=REFINE_ITERATIONS, random_state=seed).fit(x)
        labels = model.labels_.astype(np.intp)
        centroids = model.cluster_centers_.astype(np.float64)
        distances = _distances(x, centroids, labels)
    return Clustering(k, labels.tolist(), centroids, distances.tolist(), score)


def cluster_embeddings(embeddings: np.ndarray, max_k: int = 20) -> Clustering:
    """The earlier name of fit_clusters (default seed and sample)."""
    return fit_clusters(embeddings, max_k=max_k)


def _member_stats(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(centroids k x d, radii k, sizes k, distances n) from the members; label -1 = no cluster,
    distance NaN. A cluster without members gets a NaN centroid and size 0."""
    import scipy.sparse

    n = len(x)
    member = np.flatnonzero(labels >= 0)
    sizes = np.bincount(labels[member], minlength=k)
    # Sum each cluster's rows with a sparse one-hot product, block by block in float64 (a float64
    # copy of 100k x 512 at once costs 400 MB and more time than the sums).
    sums = np.zeros((k, x.shape[1]))
    for start in range(0, n, _CHUNK_ROWS):
        block = labels[start:start + _CHUNK_ROWS]
        rows = np.flatnonzero(block >= 0)
        onehot = scipy.sparse.csr_matrix((np.ones(len(rows)), (block[rows], rows)), shape=(k, len(block)))
        sums += onehot @ x[start:start + _CHUNK_ROWS].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = sums / sizes[:, None]
    # Label -1 picks the appended NaN row, so items without a cluster get a NaN distance.
    distances = _distances(x, np.vstack([centroids, np.full(x.shape[1], np.nan)]), labels)
    radii = np.full(k, RADIUS_FLOOR)
    order = member[np.argsort(labels[member], kind="stable")]
    start = 0
    for cluster, size in enumerate(sizes):
        if size:
            spread = float(np.percentile(distances[order[start:start + size]], RADIUS_PERCENTILE))
            radii[cluster] = max(RADIUS_FLOOR, spread)
        start += size
    return centroids, radii, sizes, distances


def update_clusters(existing: Sequence[ExistingCluster], embeddings: np.ndarray | Sequence[Sequence[float]],
                    current_keys: Sequence[int | None], *, max_k: int = 20, seed: int = SEED,
                    recluster_share: float = 0.2, min_outliers: int = 5, first_new_key: int = 1,
                    sample_size: int = SAMPLE_SIZE) -> ClusterUpdate:
    """Assign every library item (`embeddings`, one row each, with its `current_keys`) to a stable
    cluster key; the rules are in the module docstring. Pass as `first_new_key` one more than the
    largest key ever used (retired ones included) so that no retired key is handed out again."""
    from sklearn.metrics import pairwise_distances_argmin_min

    x = _as_matrix(embeddings)
    n = len(x)
    if len(current_keys) != n:
        raise ValueError(f"current_keys: {len(current_keys)} keys for {n} embeddings")
    old_keys = sorted(c.key for c in existing)
    if len(set(old_keys)) != len(old_keys):
        duplicate = next(key for key, count in Counter(old_keys).items() if count > 1)
        raise ValueError(f"existing: cluster key {duplicate} appears more than once")
    by_key = {c.key: c for c in existing}
    m = len(old_keys)
    if m:
        old_centroids = _as_matrix([np.asarray(by_key[key].centroid, dtype=np.float32) for key in old_keys],
                                   "existing centroids").astype(np.float64)
        if n and old_centroids.shape[1] != x.shape[1]:
            raise ValueError(f"existing: centroids have {old_centroids.shape[1]} dimensions, "
                             f"embeddings {x.shape[1]} (was the embedding model changed?)")
        old_radii = np.array([max(float(by_key[key].radius), RADIUS_FLOOR) for key in old_keys])
    else:
        old_centroids, old_radii = np.zeros((0, x.shape[1])), np.zeros(0)
    index_of = {key: i for i, key in enumerate(old_keys)}
    previous = np.array([index_of.get(key, -1) if key is not None else -1 for key in current_keys], dtype=np.intp)

    with _one_thread():
        labels = previous.copy()
        unkeyed = np.flatnonzero(labels < 0)
        if m and len(unkeyed):
            nearest, distance = pairwise_distances_argmin_min(x[unkeyed], old_centroids.astype(np.float32))
            joins = distance <= JOIN_TOLERANCE * old_radii[nearest]
            labels[unkeyed[joins]] = nearest[joins]
        outliers = int(np.count_nonzero(labels < 0))
        if n and (m == 0 or outliers >= max(min_outliers, recluster_share * n)):
            return _recluster(x, previous, old_keys, old_centroids, old_radii, max_k, seed, first_new_key, sample_size)
        centroids, radii, sizes, distances = _member_stats(x, labels, m)

    clusters = {key: ClusterStats(centroids[i], float(radii[i]), int(sizes[i]))
                for i, key in enumerate(old_keys) if sizes[i]}
    return ClusterUpdate(
        keys=[old_keys[label] if label >= 0 else None for label in labels],
        distances=[None if np.isnan(d) else float(d) for d in distances],
        clusters=clusters, reclustered=False, moved=0, new_keys=[],
        retired_keys=[key for i, key in enumerate(old_keys) if not sizes[i]],
        outliers=outliers, silhouette=None)


@dataclass(frozen=True)
class ClusterJoin:
    """The incremental pass of update_clusters for the items without a key only (see join_new_items)."""
    keys: list[int | None]          # per new item; None = outlier
    distances: list[float | None]   # per new item, to its cluster's new centroid
    clusters: dict[int, ClusterStats]  # every existing cluster that still has members
    retired_keys: list[int]
    outliers: int


def join_new_items(existing: Sequence[ExistingCluster], member_distances: dict[int, Sequence[float]],
                   embeddings: np.ndarray | Sequence[Sequence[float]], *, total_items: int,
                   recluster_share: float = 0.2, min_outliers: int = 5) -> ClusterJoin | None:
    """update_clusters without the embeddings of the items that keep their key: the library asks
    for it when every cluster still has exactly its stored members (`member_distances[key]`: their
    stored distances; `existing[i].size` must equal their number) and passes only the items without
    a key. Rules 1, 2 and 4 decide exactly as update_clusters does; None = rule 4 reclusters (call
    update_clusters with every item). Rule 3 differs in one way: a cluster's centroid moves to the
    mean of its members as a running mean of the stored centroid and the joiners, and its radius is
    the percentile of the members' stored distances (measured when each was placed) and the
    joiners' distances to the new centroid; the next recluster measures every distance again."""
    from sklearn.metrics import pairwise_distances_argmin_min

    old_keys = sorted(c.key for c in existing)
    if not old_keys:
        return None
    by_key = {c.key: c for c in existing}
    for key in old_keys:
        if by_key[key].size != len(member_distances.get(key, ())):
            raise ValueError(f"existing: cluster {key} has size {by_key[key].size} but "
                             f"{len(member_distances.get(key, ()))} member distances")
    x = _as_matrix(embeddings) if len(embeddings) else np.zeros((0, len(by_key[old_keys[0]].centroid)), np.float32)
    old_centroids = _as_matrix([np.asarray(by_key[key].centroid, dtype=np.float32) for key in old_keys],
                               "existing centroids").astype(np.float64)
    if old_centroids.shape[1] != x.shape[1]:
        raise ValueError(f"existing: centroids have {old_centroids.shape[1]} dimensions, "
                         f"embeddings {x.shape[1]} (was the embedding model changed?)")
    old_radii = np.array([max(float(by_key[key].radius), RADIUS_FLOOR) for key in old_keys])
    labels = np.full(len(x), -1, dtype=np.intp)
    with _one_thread():
        if len(x):
            nearest, distance = pairwise_distances_argmin_min(x, old_centroids.astype(np.float32))
            joins = distance <= JOIN_TOLERANCE * old_radii[nearest]
            labels[joins] = nearest[joins]
    outliers = int(np.count_nonzero(labels < 0))
    if outliers >= max(min_outliers, recluster_share * total_items):
        return None
    clusters: dict[int, ClusterStats] = {}
    distances = np.full(len(x), np.nan)
    for index, key in enumerate(old_keys):
        joined = np.flatnonzero(labels == index)
        size = by_key[key].size + len(joined)
        if size == 0:
            continue
        if not len(joined):
            clusters[key] = ClusterStats(np.asarray(by_key[key].centroid, dtype=np.float64), float(old_radii[index]), size)
            continue
        total = old_centroids[index] * by_key[key].size + x[joined].astype(np.float64).sum(axis=0)
        centroid = total / size
        distances[joined] = np.linalg.norm(x[joined].astype(np.float64) - centroid, axis=1)
        spread = np.concatenate([np.asarray(member_distances.get(key, ()), dtype=np.float64), distances[joined]])
        clusters[key] = ClusterStats(centroid, max(RADIUS_FLOOR, float(np.percentile(spread, RADIUS_PERCENTILE))), size)
    return ClusterJoin(keys=[old_keys[label] if label >= 0 else None for label in labels],
                       distances=[None if np.isnan(d) else float(d) for d in distances], clusters=clusters,
                       retired_keys=[key for key in old_keys if key not in clusters], outliers=outliers)


def _recluster(x: np.ndarray, previous: np.ndarray, old_keys: list[int], old_centroids: np.ndarray,
               old_radii: np.ndarray, max_k: int, seed: int, first_new_key: int, sample_size: int) -> ClusterUpdate:
    from scipy.optimize import linear_sum_assignment

    fit = fit_clusters(x, max_k=max_k, seed=seed, sample_size=sample_size)
    labels = np.asarray(fit.labels, dtype=np.intp)
    centroids, radii, sizes, distances = _member_stats(x, labels, fit.k)
    found = np.flatnonzero(sizes)  # KMeans leaves no cluster empty; this guards the matching anyway
    key_of: dict[int, int] = {}
    if old_keys:
        gap = np.linalg.norm(centroids[found, None, :] - old_centroids[None, :, :], axis=2)
        allowed = gap <= MATCH_TOLERANCE * old_radii[None, :]
        # A forbidden pair costs more than all allowed pairs together, so the assignment first
        # makes as many allowed matches as it can and then minimises their total distance.
        rows, cols = linear_sum_assignment(np.where(allowed, gap, gap.sum() + 1.0))
        key_of = {int(found[r]): old_keys[c] for r, c in zip(rows, cols) if allowed[r, c]}
    fresh = max([first_new_key] + [key + 1 for key in old_keys])
    new_keys = []
    for cluster in sorted(found.tolist(), key=lambda c: (-int(sizes[c]), c)):
        if cluster not in key_of:
            key_of[cluster] = fresh
            new_keys.append(fresh)
            fresh += 1
    keys = [key_of[int(label)] for label in labels]
    moved = sum(1 for before, key in zip(previous, keys) if before >= 0 and old_keys[before] != key)
    kept = set(key_of.values())
    return ClusterUpdate(
        keys=keys, distances=[float(d) for d in distances],
        clusters={key_of[c]: ClusterStats(centroids[c], float(radii[c]), int(sizes[c]))
                  for c in sorted(key_of, key=key_of.get)},
        reclustered=True, moved=moved, new_keys=new_keys,
        retired_keys=[key for key in old_keys if key not in kept], outliers=0, silhouette=fit.silhouette)


def top_terms(texts: Sequence[Sequence[str]], n: int = 3, stop_words: Sequence[str] = ()) -> list[list[str]]:
    """Per cluster (`texts[c]` = its members' captions), the `n` most distinctive terms: TF-IDF
    with each cluster's captions as one document (sublinear tf), English stop words and the
    caller's (e.g. the trigger word, "photo") left out. Words of 3+ letters only (no "8k", no
    weights like "1.2"). A term found in every cluster says nothing about any of them, so it
    only fills places after the others. Ties go alphabetically."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

    documents = ["\n".join(captions) for captions in texts]
    if not documents:
        return []
    vectorizer = TfidfVectorizer(stop_words=sorted(ENGLISH_STOP_WORDS | {w.lower() for w in stop_words}),
                                 token_pattern=r"(?u)\b[^\W\d_]{3,}\b", sublinear_tf=True)
    try:
        weights = vectorizer.fit_transform(documents).toarray()
    except ValueError:  # no usable word in any caption
        return [[] for _ in documents]
    vocabulary = vectorizer.get_feature_names_out()
    everywhere = (weights > 0).sum(axis=0) == len(documents) if len(documents) > 1 else np.zeros(len(vocabulary), bool)
    result = []
    for row in weights:
        present = np.flatnonzero(row > 0)
        ranked = sorted(present, key=lambda t: (bool(everywhere[t]), -round(float(row[t]), 12), vocabulary[t]))
        result.append([str(vocabulary[t]) for t in ranked[:n]])
    return result


def label_from_terms(terms: Sequence[str], fallback: str = "unnamed") -> str:
    """'beach, sunset, surf' — or the fallback when there are no terms."""
    return ", ".join(terms) if terms else fallback


def majority_pillar(pillar_ids: Sequence[int | None]) -> int | None:
    """The pillar most members belong to; members without one do not vote; a tie goes to the
    smallest id; None when no member has a pillar."""
    votes = Counter(p for p in pillar_ids if p is not None)
    if not votes:
        return None
    top = max(votes.values())
    return min(p for p, count in votes.items() if count == top)
