"""The content library's clusters: choice of k, determinism, stable keys across runs, names."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from persona_pipeline.domain import clustering
from persona_pipeline.domain.clustering import (
    RADIUS_FLOOR, ExistingCluster, fit_clusters, label_from_terms, majority_pillar, top_terms,
    update_clusters)


def centres(k: int, dim: int, seed: int = 0) -> np.ndarray:
    c = np.random.default_rng(seed).normal(size=(k, dim))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def near(centre_rows: np.ndarray, noise: float = 0.3, seed: int = 1) -> np.ndarray:
    """Unit vectors around the given centres; `noise` is the total norm of the noise (about)."""
    rng = np.random.default_rng(seed)
    x = centre_rows + rng.normal(0.0, noise / np.sqrt(centre_rows.shape[1]), centre_rows.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(sizes: list[int], dim: int = 32, noise: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = centres(len(sizes), dim, seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return near(c[truth], noise, seed + 1), truth, c


def as_existing(update: clustering.ClusterUpdate) -> list[ExistingCluster]:
    return [ExistingCluster(key, stats.centroid.tolist(), stats.radius, stats.size) for key, stats in update.clusters.items()]


def keys_by_truth(keys, truth) -> dict[int, set]:
    found: dict[int, set] = {}
    for key, t in zip(keys, truth):
        found.setdefault(int(t), set()).add(key)
    return found


# --- fit_clusters -----------------------------------------------------------------------------

def test_silhouette_picks_the_true_k_on_separated_blobs():
    x, truth, _ = blobs([30, 20, 25, 15])
    result = fit_clusters(x)
    assert result.k == 4
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.centroids.shape == (4, 32)
    assert result.silhouette > 0.5
    # Each distance is the item's distance to its own centroid.
    own = np.linalg.norm(x - result.centroids[result.labels], axis=1)
    assert np.allclose(result.distances, own, atol=1e-5)


@pytest.mark.slow
def test_large_inputs_choose_k_on_a_sample_in_a_pca_projection_and_label_every_item():
    # 128 dimensions (> 64: the PCA projection is used) and more items than the sample.
    x, truth, _ = blobs([900, 700, 500, 400, 300], dim=128, noise=0.8, seed=3)
    result = fit_clusters(x, sample_size=600)
    assert result.k == 5
    assert len(result.labels) == len(x)
    assert adjusted_rand_score(truth, result.labels) == 1.0


@pytest.mark.slow
def test_fit_is_deterministic_for_the_same_input_and_seed():
    x, _, _ = blobs([200, 150, 120], dim=96, noise=0.9, seed=5)
    first, second = fit_clusters(x, sample_size=200), fit_clusters(x, sample_size=200)
    assert first.labels == second.labels
    assert np.array_equal(first.centroids, second.centroids)
    assert first.distances == second.distances and first.silhouette == second.silhouette


def test_small_inputs_identical_rows_and_bad_input():
    assert fit_clusters(np.zeros((0, 4))).k == 0
    assert fit_clusters([]).k == 0
    one = fit_clusters(np.array([[0.6, 0.8]]))
    assert (one.k, one.labels, one.silhouette) == (1, [0], None)
    two = fit_clusters(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert two.k == 1 and two.distances == pytest.approx([np.sqrt(0.5)] * 2)
    same = fit_clusters(np.ones((7, 4)))
    assert (same.k, same.labels, same.distances) == (1, [0] * 7, [0.0] * 7)
    # Two distinct rows, each repeated: k is capped by the distinct rows.
    pair = fit_clusters(np.repeat(np.eye(3)[:2], 5, axis=0))
    assert pair.k == 2 and pair.labels[:5] == [pair.labels[0]] * 5 and pair.labels[0] != pair.labels[5]
    assert fit_clusters(blobs([10, 10, 10])[0], max_k=1).k == 1
    bad = np.ones((4, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2 has a non-finite value"):
        fit_clusters(bad)
    with pytest.raises(ValueError, match="2-D array"):
        fit_clusters(np.ones(5))
    assert clustering.cluster_embeddings(blobs([6, 6, 6])[0]).k == 3   # the earlier name still works


@pytest.mark.slow
def test_a_20k_point_library_of_512_d_embeddings_clusters_correctly():
    # Production shape: 512-d unit vectors, noise like real image embeddings (silhouette ~0.27).
    x, truth, _ = blobs([4000, 3000, 2500, 2000, 1500, 3000, 2000, 2000], dim=512, noise=1.0, seed=7)
    result = fit_clusters(x)
    assert result.k == 8
    assert adjusted_rand_score(truth, result.labels) > 0.99


# --- update_clusters --------------------------------------------------------------------------

def test_first_run_clusters_everything_and_numbers_keys_from_one():
    x, truth, _ = blobs([12, 10, 8])
    update = update_clusters([], x, [None] * len(x))
    assert update.reclustered and update.outliers == 0 and update.moved == 0
    assert sorted(update.clusters) == update.new_keys == [1, 2, 3]    # larger clusters first
    assert [update.clusters[key].size for key in (1, 2, 3)] == [12, 10, 8]
    assert all(len(keys) == 1 for keys in keys_by_truth(update.keys, truth).values())
    for key, stats in update.clusters.items():
        members = x[[i for i, k in enumerate(update.keys) if k == key]]
        assert np.allclose(stats.centroid, members.mean(axis=0), atol=1e-6)
        spread = np.linalg.norm(members - stats.centroid, axis=1)
        assert stats.radius == pytest.approx(max(RADIUS_FLOOR, np.percentile(spread, 95)))
    assert update_clusters([], np.zeros((0, 4)), []).clusters == {}


def test_new_items_join_the_nearest_cluster_without_moving_old_items():
    x, truth, c = blobs([12, 10, 8])
    first = update_clusters([], x, [None] * len(x))
    new = near(c[[2, 0, 2]], seed=9)
    update = update_clusters(as_existing(first), np.vstack([x, new]), first.keys + [None] * 3)
    key_of = {int(t): k for t, k in zip(truth, first.keys)}
    assert not update.reclustered and update.moved == 0 and update.outliers == 0
    assert update.keys[:len(x)] == first.keys
    assert update.keys[len(x):] == [key_of[2], key_of[0], key_of[2]]
    assert update.clusters[key_of[2]].size == 10 and update.clusters[key_of[0]].size == 13
    assert update.new_keys == [] and update.retired_keys == []
    assert all(d is not None for d in update.distances)
    # A key that no longer exists counts as none: the item joins by distance.
    again = update_clusters(as_existing(first), x, [99] + first.keys[1:])
    assert again.keys == first.keys and not again.reclustered


def _members(update: clustering.ClusterUpdate) -> dict[int, list[float]]:
    found: dict[int, list[float]] = {key: [] for key in update.clusters}
    for key, distance in zip(update.keys, update.distances):
        if key is not None:
            found[key].append(distance)
    return found


def test_joining_only_the_new_items_decides_as_the_full_update_does():
    x, truth, c = blobs([40, 30, 25])
    first = update_clusters([], x, [None] * len(x))
    far = near(np.repeat(centres(1, 32, seed=42), 8, axis=0), seed=11)
    new = np.vstack([near(c[[2, 0, 2, 1]], seed=9), far[:3]])
    full = update_clusters(as_existing(first), np.vstack([x, new]), first.keys + [None] * len(new))
    joined = clustering.join_new_items(as_existing(first), _members(first), new, total_items=len(x) + len(new))
    assert not full.reclustered and joined is not None
    assert joined.keys == full.keys[len(x):] and joined.outliers == full.outliers == 3
    assert {k: s.size for k, s in joined.clusters.items()} == {k: s.size for k, s in full.clusters.items()}
    for key, stats in joined.clusters.items():  # the running mean is the members' mean
        np.testing.assert_allclose(stats.centroid, full.clusters[key].centroid, atol=1e-6)
        assert stats.radius == pytest.approx(full.clusters[key].radius, rel=0.1)
    # Enough outliers for rule 4: the caller must run the full update (which reclusters).
    many = np.vstack([new, near(np.repeat(centres(1, 32, seed=42), 25, axis=0), seed=12)])  # 28 of 123 items
    assert clustering.join_new_items(as_existing(first), _members(first), many, total_items=len(x) + len(many)) is None
    assert update_clusters(as_existing(first), np.vstack([x, many]), first.keys + [None] * len(many)).reclustered
    # Nothing new: every cluster stays as stored.
    same = clustering.join_new_items(as_existing(first), _members(first), np.zeros((0, 32), np.float32), total_items=len(x))
    assert same.keys == [] and {k: s.size for k, s in same.clusters.items()} == {k: s.size for k, s in first.clusters.items()}
    with pytest.raises(ValueError, match="cluster .* has size"):
        clustering.join_new_items(as_existing(first), {k: [] for k in first.clusters}, new, total_items=len(x))


def test_outliers_wait_then_trigger_a_recluster_that_keeps_keys_and_numbers_a_new_blob():
    x, truth, c = blobs([12, 10, 8])
    first = update_clusters([], x, [None] * len(x))
    far = near(np.repeat(centres(1, 32, seed=42), 8, axis=0), seed=11)
    # 3 outliers: fewer than min_outliers (5), so they wait without a key.
    waiting = update_clusters(as_existing(first), np.vstack([x, far[:3]]), first.keys + [None] * 3)
    assert not waiting.reclustered
    assert waiting.outliers == 3 and waiting.keys[len(x):] == [None] * 3
    assert waiting.distances[len(x):] == [None] * 3 and waiting.keys[:len(x)] == first.keys
    # 8 outliers reach the threshold: everything is reclustered, the old blobs keep their keys
    # and the new blob gets the next key.
    update = update_clusters(as_existing(waiting), np.vstack([x, far]), waiting.keys + [None] * 5)
    assert update.reclustered and update.outliers == 0 and update.moved == 0
    assert update.keys[:len(x)] == first.keys
    assert update.new_keys == [4] and set(update.keys[len(x):]) == {4}
    assert sorted(update.clusters) == [1, 2, 3, 4] and update.retired_keys == []
    assert update.silhouette is not None


def test_a_forced_recluster_of_the_same_blobs_keeps_every_key():
    # Different data order and seed give KMeans a different label order; the keys do not change.
    x, truth, c = blobs([12, 10, 8, 9])
    first = update_clusters([], x, [None] * len(x))
    order = np.random.default_rng(3).permutation(len(x))
    new = near(c[[0, 1, 2, 3]], seed=13)
    update = update_clusters(as_existing(first), np.vstack([x[order], new]),
                             [first.keys[i] for i in order] + [None] * 4,
                             min_outliers=0, recluster_share=0.0, seed=7)
    key_of = {int(t): k for t, k in zip(truth, first.keys)}
    assert update.reclustered and update.moved == 0 and update.new_keys == [] and update.retired_keys == []
    assert update.keys == [first.keys[i] for i in order] + [key_of[t] for t in range(4)]


def test_a_vanished_blob_is_retired_and_fresh_keys_never_reuse_old_ones():
    x, truth, c = blobs([12, 10, 8])
    first = update_clusters([], x, [None] * len(x))
    gone = first.keys[-1]                      # the 8-item blob
    kept = truth != 2
    # Without a recluster: the empty cluster is retired.
    update = update_clusters(as_existing(first), x[kept], [k for k, keep in zip(first.keys, kept) if keep])
    assert not update.reclustered and update.retired_keys == [gone] and gone not in update.clusters
    # With a recluster (a new blob arrives): the vanished key is retired, the new blob is
    # numbered from first_new_key because keys up to 9 were used before.
    far = near(np.repeat(centres(1, 32, seed=42), 8, axis=0), seed=11)
    update = update_clusters(as_existing(first), np.vstack([x[kept], far]),
                             [k for k, keep in zip(first.keys, kept) if keep] + [None] * 8, first_new_key=10)
    assert update.reclustered and update.retired_keys == [gone] and update.new_keys == [10]
    assert update.keys[:int(kept.sum())] == [k for k, keep in zip(first.keys, kept) if keep]


def test_update_is_deterministic_and_validates_its_input():
    x, _, c = blobs([12, 10, 8])
    first = update_clusters([], x, [None] * len(x))
    far = near(np.repeat(centres(1, 32, seed=42), 6, axis=0), seed=11)
    args = (as_existing(first), np.vstack([x, far]), first.keys + [None] * 6)
    a, b = update_clusters(*args), update_clusters(*args)
    assert a.keys == b.keys and a.distances == b.distances and a.new_keys == b.new_keys
    with pytest.raises(ValueError, match="current_keys: 29 keys for 30 embeddings"):
        update_clusters(as_existing(first), x, first.keys[:-1])
    with pytest.raises(ValueError, match="centroids have 32 dimensions, embeddings 16"):
        update_clusters(as_existing(first), x[:, :16], first.keys)
    twice = as_existing(first) + [ExistingCluster(1, c[0], 0.1)]
    with pytest.raises(ValueError, match="cluster key 1 appears more than once"):
        update_clusters(twice, x, first.keys)


# --- names and pillars ------------------------------------------------------------------------

def test_top_terms_pick_distinctive_words():
    texts = [
        ["ohwx woman on a beach at sunset, photo", "ohwx woman surfing the beach waves, photo 8k"],
        ["ohwx woman in a cafe drinking coffee, photo", "ohwx woman reading in a cafe, photo"],
        ["ohwx woman hiking a mountain trail, photo", "ohwx woman at the mountain summit, (woman:1.2)"],
    ]
    terms = top_terms(texts, n=3, stop_words=["OHWX", "photo"])
    assert [t[0] for t in terms] == ["beach", "cafe", "mountain"]
    assert all(len(t) == 3 for t in terms)
    everything = {term for cluster in terms for term in cluster}
    assert not everything & {"ohwx", "photo", "the", "woman"}     # stop words; "woman" is everywhere
    assert "8k" not in everything
    # A term found in every cluster only fills places the distinctive ones leave.
    assert top_terms([["woman beach"], ["woman cafe"]], n=2) == [["beach", "woman"], ["cafe", "woman"]]
    assert top_terms([["red dress", "red hat", "blue hat"]], n=2) == [["hat", "red"]]   # one cluster: frequency
    assert top_terms([["the a of"], []]) == [[], []]
    assert top_terms([]) == []
    assert label_from_terms(["beach", "sunset"]) == "beach, sunset"
    assert label_from_terms([]) == "unnamed" and label_from_terms([], fallback="cluster 3") == "cluster 3"


def test_majority_pillar():
    assert majority_pillar([1, 2, 2, None, None, None]) == 2     # members without a pillar do not vote
    assert majority_pillar([3, 1, 1, 3]) == 1                    # a tie: the smallest id
    assert majority_pillar([None, None]) is None and majority_pillar([]) is None
