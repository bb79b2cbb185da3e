"""Cluster an embedding, score each clustering, and summarise scores over seeds.

The one "cluster then score" loop of the package (training runs, experiments, the benchmark and
the scale benchmark call it) and the one mean / sd summary of their result tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Clustering:
    """One method's clustering of an embedding and its scores.

    ``scores`` holds :func:`~contrastive_sc.analysis.metrics.score_clustering`'s values (``n_clusters``,
    ``ari`` and ``nmi`` with labels, ``silhouette``, ``calinski_harabasz``) and ``seconds``, the
    time the clustering itself took (scoring excluded).
    """

    method: str
    labels: np.ndarray
    scores: dict[str, float]


def cluster_and_score(embedding: np.ndarray, methods: Iterable[str], truth=None, *, n_clusters: int | None = None,
                      resolution: float = 1.0, n_neighbors: int = 15, seed: int = 0,
                      clusterer: Callable[[str], np.ndarray] | None = None) -> list[Clustering]:
    """Cluster ``embedding`` by each method and score it.

    Parameters
    ----------
    embedding
        ``(cells, dims)`` array, clustered and scored in.
    methods
        Clustering methods (:data:`contrastive_sc.analysis.cluster.METHODS` with the default ``clusterer``).
    truth
        Label per cell, or ``None`` (no ARI / NMI).
    n_clusters, resolution, n_neighbors, seed
        Passed to :func:`~contrastive_sc.analysis.cluster.cluster_labels`; ``seed`` also seeds the
        silhouette's subsample.
    clusterer
        ``method -> labels`` replacing :func:`~contrastive_sc.analysis.cluster.cluster_labels` (a
        benchmark's own recipes); the settings above then only seed the scores.

    Returns
    -------
    One :class:`Clustering` per method, in order.
    """
    from .cluster import cluster_labels
    from .metrics import score_clustering

    if clusterer is None:
        def clusterer(method: str) -> np.ndarray:
            return cluster_labels(embedding, method, n_clusters=n_clusters, resolution=resolution,
                                  n_neighbors=n_neighbors, seed=seed)

    out = []
    for method in methods:
        started = time.perf_counter()
        labels = np.asarray(clusterer(method))
        seconds = time.perf_counter() - started
        scores = score_clustering(embedding, labels, truth, seed=seed)
        out.append(Clustering(method, labels, {**scores, "seconds": seconds}))
    return out


def as_metrics(clusterings: Iterable[Clustering]) -> dict[str, float]:
    """``{"<method>_<score>": value}`` over clusterings (MLflow metric names)."""
    return {f"{c.method}_{key}": value for c in clusterings for key, value in c.scores.items()}


def mean_sd(results: pd.DataFrame, keys: list[str], columns: list[str] | None = None) -> pd.DataFrame:
    """Mean and sd (``ddof=0``) over the rows of each ``keys`` group: ``<column>_mean``, ``<column>_sd``.

    ``columns`` defaults to every numeric column that is not a key, ``seed``, ``sample`` or
    ``run_id``. Groups keep their order of first appearance; an empty ``keys`` makes one group.
    """
    if columns is None:
        columns = [c for c in results.columns if c not in (*keys, "seed", "sample", "run_id")
                   and pd.api.types.is_numeric_dtype(results[c])]
    if not keys:
        results = results.assign(_all="all")
        keys = ["_all"]
    grouped = results.groupby(keys, sort=False)[columns]
    return grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_sd")).reset_index()


def mean_sd_text(results: pd.DataFrame, keys: list[str], digits: dict[str, int]) -> pd.DataFrame:
    """``"mean ± sd"`` strings per ``keys`` group, one column per score in ``digits`` (decimals)."""
    summary = mean_sd(results, keys, list(digits))
    table = summary[keys].copy()
    for col, n in digits.items():
        table[col] = [f"{m:.{n}f} ± {s:.{n}f}" for m, s in zip(summary[f"{col}_mean"], summary[f"{col}_sd"].fillna(0))]
    return table
