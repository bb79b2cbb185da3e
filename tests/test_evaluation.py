"""The one cluster-and-score loop and the one mean / sd summary."""

import numpy as np
import pandas as pd
import pytest

from contrastive_sc.analysis.evaluation import as_metrics, cluster_and_score, mean_sd, mean_sd_text
from contrastive_sc.analysis.metrics import score_clustering


@pytest.fixture
def blobs(rng):
    truth = np.repeat([0, 1, 2], 60)
    centres = np.array([[0.0] * 8, [10.0] * 8, [-10.0] * 8])
    return (centres[truth] + rng.normal(size=(180, 8))).astype(np.float32), truth


def test_each_method_is_clustered_and_scored(blobs):
    embedding, truth = blobs
    results = cluster_and_score(embedding, ["kmeans", "leiden"], truth, n_clusters=3, seed=0)
    assert [c.method for c in results] == ["kmeans", "leiden"]
    for clustering in results:
        expected = score_clustering(embedding, clustering.labels, truth, seed=0)
        assert {k: v for k, v in clustering.scores.items() if k != "seconds"} == expected
        assert clustering.scores["ari"] == 1.0 and clustering.scores["seconds"] > 0
    metrics = as_metrics(results)
    assert metrics["kmeans_ari"] == 1.0 and metrics["leiden_n_clusters"] == 3 and "leiden_seconds" in metrics


def test_a_clusterer_replaces_cluster_labels(blobs):
    embedding, truth = blobs
    (clustering,) = cluster_and_score(embedding, ["halves"], truth, clusterer=lambda method: np.arange(180) // 90)
    assert clustering.method == "halves" and clustering.scores["n_clusters"] == 2 and clustering.scores["ari"] < 1
    (unlabelled,) = cluster_and_score(embedding, ["kmeans"], n_clusters=3)
    assert "ari" not in unlabelled.scores and unlabelled.scores["silhouette"] > 0.5


def test_mean_sd_per_group_in_order_of_appearance():
    results = pd.DataFrame({"dataset": ["b", "b", "a", "a"], "seed": [0, 1, 0, 1], "ari": [0.5, 0.7, 1.0, 1.0],
                            "method": ["x", "x", "x", "x"]})
    summary = mean_sd(results, ["dataset"])
    assert summary["dataset"].tolist() == ["b", "a"] and list(summary.columns) == ["dataset", "ari_mean", "ari_sd"]
    assert summary["ari_mean"].tolist() == pytest.approx([0.6, 1.0])
    assert summary["ari_sd"].tolist() == pytest.approx([0.1, 0.0])
    overall = mean_sd(results, [])
    assert overall["ari_mean"].item() == pytest.approx(0.8)
    text = mean_sd_text(results, ["dataset", "method"], {"ari": 3})
    assert text.to_dict("records") == [{"dataset": "b", "method": "x", "ari": "0.600 ± 0.100"},
                                       {"dataset": "a", "method": "x", "ari": "1.000 ± 0.000"}]
