"""External (ARI, NMI) and internal (silhouette, Calinski-Harabasz) clustering scores."""

from __future__ import annotations

import numpy as np

#: Silhouette is quadratic in cells; above this many it is estimated on a fixed random sample.
SILHOUETTE_SAMPLE = 10_000


def score_clustering(embedding: np.ndarray, predicted, truth=None, *, seed: int = 0) -> dict[str, float]:
    """Score a clustering of ``embedding``.

    Parameters
    ----------
    embedding
        ``(cells, dims)`` space the internal scores are computed in.
    predicted
        Cluster label per cell.
    truth
        Ground-truth label per cell, or ``None``: ARI and NMI are then omitted.
    seed
        Seed of the silhouette subsample on large inputs.

    Returns
    -------
    ``n_clusters``, ``silhouette`` and ``calinski_harabasz`` (NaN when fewer than two clusters),
    plus ``ari`` and ``nmi`` when ``truth`` is given.
    """
    from sklearn import metrics

    predicted = np.asarray(predicted)
    n_clusters = len(np.unique(predicted))
    scores: dict[str, float] = {"n_clusters": n_clusters}
    if truth is not None:
        truth = np.asarray(truth)
        if truth.shape[0] != predicted.shape[0]:
            msg = f"{truth.shape[0]} labels for {predicted.shape[0]} cells"
            raise ValueError(msg)
        scores["ari"] = float(metrics.adjusted_rand_score(truth, predicted))
        scores["nmi"] = float(metrics.normalized_mutual_info_score(truth, predicted))
    if 2 <= n_clusters < len(predicted):
        sample = min(len(predicted), SILHOUETTE_SAMPLE)
        scores["silhouette"] = float(metrics.silhouette_score(embedding, predicted, sample_size=sample, random_state=seed))
        scores["calinski_harabasz"] = float(metrics.calinski_harabasz_score(embedding, predicted))
    else:
        scores["silhouette"] = float("nan")
        scores["calinski_harabasz"] = float("nan")
    return scores
