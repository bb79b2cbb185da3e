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


def batch_mixing(embedding: np.ndarray, batches, *, n_neighbors: int = 30) -> float:
    """How well batches mix in the embedding: the normalised mean iLISI, in [0, 1].

    For each cell, the inverse Simpson index of the batch labels among its ``n_neighbors``
    nearest cells (iLISI, Korsunsky et al. 2019, as in scib) is the effective number of batches
    around it; ``(iLISI - 1) / (batches - 1)`` maps it to 0 (neighbours all from the cell's own
    batch: clusters follow samples) through 1 (neighbours drawn evenly from every batch). Plain
    neighbour counts, not the perplexity-weighted neighbourhoods of scib's LISI.

    Returns NaN with a single batch.
    """
    from sklearn.neighbors import NearestNeighbors

    batches = np.asarray(batches)
    if batches.shape[0] != embedding.shape[0]:
        msg = f"{batches.shape[0]} batch labels for {embedding.shape[0]} cells"
        raise ValueError(msg)
    names, codes = np.unique(batches.astype(str), return_inverse=True)
    if len(names) < 2:
        return float("nan")
    k = min(n_neighbors, embedding.shape[0] - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding, return_distance=False)[:, 1:]
    counts = np.zeros((embedding.shape[0], len(names)))
    np.add.at(counts, (np.repeat(np.arange(embedding.shape[0]), k), codes[neighbours].ravel()), 1.0)
    shares = counts / k
    ilisi = 1.0 / (shares**2).sum(axis=1)
    return float(np.mean((ilisi - 1.0) / (len(names) - 1)))
