import math

import numpy as np
import pytest
from sklearn import metrics

from contrastive_sc.analysis.metrics import score_clustering


def test_against_scikit_learn(rng):
    x = rng.normal(size=(200, 5))
    truth = rng.integers(0, 3, 200)
    predicted = rng.integers(0, 4, 200)
    scores = score_clustering(x, predicted, truth)
    assert scores["ari"] == pytest.approx(metrics.adjusted_rand_score(truth, predicted))
    assert scores["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(truth, predicted))
    assert scores["silhouette"] == pytest.approx(metrics.silhouette_score(x, predicted))
    assert scores["calinski_harabasz"] == pytest.approx(metrics.calinski_harabasz_score(x, predicted))
    assert scores["n_clusters"] == 4


def test_without_labels_and_single_cluster(rng):
    x = rng.normal(size=(50, 3))
    scores = score_clustering(x, np.zeros(50, dtype=int))
    assert "ari" not in scores and "nmi" not in scores
    assert scores["n_clusters"] == 1 and math.isnan(scores["silhouette"])


def test_length_mismatch(rng):
    with pytest.raises(ValueError, match="3 labels for 4 cells"):
        score_clustering(rng.normal(size=(4, 2)), [0, 1, 0, 1], [0, 1, 0])
