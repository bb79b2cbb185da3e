import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from contrastive_sc.cluster import METHODS, NEEDS_K, cluster, cluster_labels


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

    cluster_module = importlib.import_module("contrastive_sc.cluster")  # the package exports a function of that name

    converged = cluster_labels(blobs[0], "leiden", resolution=0.3, seed=0)
    monkeypatch.setattr(cluster_module, "LEIDEN_CONVERGE_CELLS", 100)
    capped = cluster_labels(blobs[0], "leiden", resolution=0.3, seed=0)
    assert adjusted_rand_score(blobs[1], capped) > 0.9
    assert adjusted_rand_score(converged, capped) > 0.9


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
