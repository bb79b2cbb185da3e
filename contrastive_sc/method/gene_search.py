"""The embedding at the configured gene count, or with ``n_genes="auto"`` the best separated of several.

No labels are read: each candidate's training cells are clustered (KMeans with the configured
k, else the estimated one) and the silhouette of that clustering in its own embedding decides.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..analysis.cluster import cluster_labels
from ..analysis.metrics import score_clustering
from .config import AUTO_GENE_COUNTS, ContrastiveConfig
from .pipeline import FittedEmbedding, fit_embedding
from .rows import Rows

log = logging.getLogger(__name__)


def fit_gene_count(counts: Rows, genes: np.ndarray, config: ContrastiveConfig, *, progress: bool = False,
                   on_epoch: Callable[[int, float], None] | None = None, keep_inputs: bool = False,
                   ) -> tuple[FittedEmbedding, list[dict]]:
    """:func:`~contrastive_sc.method.pipeline.fit_embedding` at ``n_genes``; for ``"auto"``, at each candidate count.

    The candidates are the counts of :data:`~contrastive_sc.method.config.AUTO_GENE_COUNTS` below
    the genes there are (or all of them).

    Returns
    -------
    The fit (for ``"auto"`` the best by silhouette) and one ``{"n_genes", "silhouette"}`` per
    candidate (empty when the count was given). ``on_epoch`` follows the training live for a
    given count; for ``"auto"`` it replays the chosen fit's losses once it is chosen.
    ``keep_inputs`` as in :func:`~contrastive_sc.method.pipeline.fit_embedding` (every candidate
    keeps its input, the others' are dropped as the search goes).
    """
    auto = config.preprocess.n_genes == "auto"
    candidates = (([n for n in AUTO_GENE_COUNTS if n < counts.shape[1]] or [counts.shape[1]]) if auto
                  else [config.preprocess.n_genes])
    cluster, seed = config.cluster, config.train.seed
    best, search = None, []
    for n_genes in candidates:
        fitted = fit_embedding(counts, genes, config.replace(n_genes=n_genes) if auto else config, progress=progress,
                               on_epoch=None if auto else on_epoch, keep_inputs=keep_inputs)
        if not auto:
            return fitted, []
        method = "kmeans" if cluster.n_clusters else "auto"
        labels = cluster_labels(fitted.embedding, method, n_clusters=cluster.n_clusters,
                                n_neighbors=cluster.n_neighbors, seed=seed)
        silhouette = score_clustering(fitted.embedding, labels)["silhouette"]
        search.append({"n_genes": n_genes, "silhouette": silhouette})
        log.info("n_genes=%d silhouette=%.4f", n_genes, silhouette)
        if best is None or silhouette > best[0]:
            best = (silhouette, fitted)
    chosen = best[1]
    if on_epoch is not None:
        for epoch, loss in enumerate(chosen.history.loss):
            on_epoch(epoch, loss)
    return chosen, search
