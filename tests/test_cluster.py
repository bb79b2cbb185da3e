import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from contrastive_sc.analysis.cluster import METHODS, NEEDS_K, cluster, cluster_labels, estimate_n_clusters


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(n_samples=300, centers=3, n_features=8, cluster_std=0.5, random_state=0)
    return x.astype(np.float32), y


@pytest.mark.parametrize("method", METHODS)
def test_every_method_recovers_clear_blobs(blobs, method):
    x, y = blobs
    labels = cluster_labels(x, method, n_clusters=3, seed=0, resolution=0.3)
    assert labels.shape == (300,) and labels.dtype == np.int64
    assert adjusted_rand_score(y, labels) > 0.9


def test_k_required(blobs):
    for method in NEEDS_K:
        with pytest.raises(ValueError, match="needs n_clusters"):
            cluster_labels(blobs[0], method)


def test_unknown_method_and_bad_k(blobs):
    with pytest.raises(ValueError, match="unknown clustering method 'dbscan'"):
        cluster_labels(blobs[0], "dbscan")
    with pytest.raises(ValueError, match="between 1 and the number of cells"):
        cluster_labels(blobs[0], "kmeans", n_clusters=1000)


def test_leiden_resolution_changes_granularity(blobs):
    coarse = cluster_labels(blobs[0], "leiden", resolution=0.1)
    fine = cluster_labels(blobs[0], "leiden", resolution=3.0)
    assert len(np.unique(fine)) > len(np.unique(coarse))


def test_large_graph_path_stops_after_two_iterations_and_still_recovers_blobs(blobs, monkeypatch):
    # Above LEIDEN_CONVERGE_CELLS Leiden runs two iterations; pretend 100 cells is "large".
    import importlib

    # the package exports a function of that name
    cluster_module = importlib.import_module("contrastive_sc.analysis.cluster")

    converged = cluster_labels(blobs[0], "leiden", resolution=0.3, seed=0)
    monkeypatch.setattr(cluster_module, "LEIDEN_CONVERGE_CELLS", 100)
    capped = cluster_labels(blobs[0], "leiden", resolution=0.3, seed=0)
    assert adjusted_rand_score(blobs[1], capped) > 0.9
    assert adjusted_rand_score(converged, capped) > 0.9


def test_estimated_k_counts_the_groups_of_a_useful_size():
    # five groups of 400 cells and one of 35 (1.7 % of the cells: below the 2 % floor)
    sizes = [400] * 5 + [35]
    x, y = make_blobs(n_samples=sizes, n_features=10, cluster_std=0.6, random_state=1)
    x = x.astype(np.float32)
    assert estimate_n_clusters(x, n_neighbors=15) == 5
    assert estimate_n_clusters(x, n_neighbors=15, min_fraction=0.0) >= 6  # every community counts
    labels = cluster_labels(x, "auto", n_neighbors=15, seed=0)
    assert len(np.unique(labels)) == 5
    big = y < 5
    assert adjusted_rand_score(y[big], labels[big]) > 0.95
    with pytest.raises(ValueError, match="min_fraction must be within"):
        estimate_n_clusters(x, min_fraction=1.5)


def test_estimated_k_counts_every_community_when_all_are_rarer_than_the_floor():
    # 60 separated groups of 1.7 % each: none reaches 2 %, so all count (not k = 1)
    x, _ = make_blobs(n_samples=[50] * 60, n_features=20, cluster_std=0.3, center_box=(-50, 50), random_state=2)
    assert estimate_n_clusters(x.astype(np.float32), n_neighbors=10) >= 50


def test_anndata_interface(blobs):
    import anndata as ad

    adata = ad.AnnData(X=np.zeros((300, 2), dtype=np.float32))
    adata.obsm["X_contrastive"] = blobs[0]
    assert cluster(adata, "kmeans", n_clusters=3) is None
    assert adata.obs["contrastive_kmeans"].dtype == "category"
    assert adata.uns["contrastive_kmeans"]["params"] == {"method": "kmeans", "use_rep": "X_contrastive", "n_clusters": 3}
    copy = cluster(adata, "leiden", key_added="my_leiden", copy=True, resolution=0.5)
    assert "my_leiden" in copy.obs and "my_leiden" not in adata.obs
    with pytest.raises(KeyError, match="obsm\\['X_missing'\\] not found"):
        cluster(adata, use_rep="X_missing", n_clusters=3)


def _leidenalg_labels(x, resolution, n_neighbors=15, seed=0):
    """The previous implementation: leidenalg's modularity with resolution on the same graph."""
    from contrastive_sc.benchmarks.speed import leidenalg_labels

    return leidenalg_labels(x, resolution=resolution, n_neighbors=n_neighbors, seed=seed)


def test_igraph_leiden_agrees_with_leidenalg():
    x, y = make_blobs(n_samples=[150, 200, 250, 100], n_features=10, cluster_std=1.0, random_state=3)
    x = x.astype(np.float32)
    for resolution in (0.3, 1.0):
        labels = cluster_labels(x, "leiden", resolution=resolution, seed=0)
        assert adjusted_rand_score(_leidenalg_labels(x, resolution), labels) >= 0.95
    assert adjusted_rand_score(y, cluster_labels(x, "leiden", resolution=0.3, seed=0)) > 0.95


def test_leiden_is_reproducible_for_a_seed(blobs):
    first = cluster_labels(blobs[0], "leiden", resolution=2.0, seed=4)
    assert np.array_equal(first, cluster_labels(blobs[0], "leiden", resolution=2.0, seed=4))


def test_weighted_graph_is_the_fuzzy_union_of_the_unweighted_one(blobs):
    from contrastive_sc.analysis.cluster import knn_graph

    x = blobs[0]
    plain, weighted = knn_graph(x, 10), knn_graph(x, 10, weighted=True)
    assert plain.es.attributes() == [] and not weighted.is_directed()
    assert sorted(plain.get_edgelist()) == sorted(weighted.get_edgelist())  # same edges, now weighted
    adjacency = weighted.get_adjacency_sparse(attribute="weight")
    assert (adjacency != adjacency.T).nnz == 0
    assert adjacency.data.min() > 0 and adjacency.data.max() <= 1.0
    # the nearest neighbour of every cell is at weight 1 (UMAP's local connectivity of 1)
    assert np.allclose(adjacency.max(axis=1).toarray().ravel(), 1.0)


@pytest.mark.slow
def test_weighted_graph_matches_umap():
    # compiles UMAP's numba kernels (about 20 s)
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors
    from umap.umap_ import fuzzy_simplicial_set

    from contrastive_sc.analysis.cluster import knn_graph

    x, _ = make_blobs(n_samples=400, centers=4, n_features=12, random_state=5)
    adjacency = knn_graph(x, 12, weighted=True).get_adjacency_sparse(attribute="weight")
    distances, indices = NearestNeighbors(n_neighbors=13).fit(x).kneighbors(x)
    distances[:, 0] = 0.0  # scanpy lists each cell first at distance 0; floating point may leave 1e-7
    expected, _, _ = fuzzy_simplicial_set(sparse.coo_matrix((400, 1)), 13, None, None, knn_indices=indices,
                                          knn_dists=distances)
    assert abs(adjacency - expected.tocsr()).max() < 1e-5


@pytest.mark.slow
def test_approximate_neighbours_path(blobs, monkeypatch):
    # pynndescent instead of exact neighbours, from 100 cells instead of the usual threshold
    # (its numba compilation costs a minute on a busy two-core machine)
    import importlib

    cluster_module = importlib.import_module("contrastive_sc.analysis.cluster")
    x = np.concatenate([blobs[0], blobs[0][:5]])  # duplicates may push a cell out of its own list
    exact = cluster_module.knn_graph(x, 15)
    monkeypatch.setattr(cluster_module, "APPROXIMATE_NEIGHBORS_CELLS", 100)
    approximate = cluster_module.knn_graph(x, 15)
    shared = set(exact.get_edgelist()) & set(approximate.get_edgelist())
    assert len(shared) >= 0.95 * exact.ecount()
    assert not any(approximate.is_loop())
    labels = cluster_labels(x, "leiden", resolution=0.3, seed=0)
    assert adjusted_rand_score(np.concatenate([blobs[1], blobs[1][:5]]), labels) > 0.9
