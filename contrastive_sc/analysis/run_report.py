"""What a training run writes for people to read: the loss curve, the map, marker genes and contingency tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .describe import marker_genes, umap_coordinates
from .plots import MAP_SAMPLE, cluster_map, contingency_heatmap, loss_curve


def write_run_report(folder: Path, counts, embedding: np.ndarray, labels_by_method: dict[str, np.ndarray], *,
                     loss: list[float], truth=None, batches=None, map_plot: bool = True, seed: int = 0,
                     title: str = "") -> list[Path]:
    """Write the run's figures and tables to ``folder``; return the files written.

    Parameters
    ----------
    folder
        Existing folder.
    counts
        AnnData with the raw counts of the training cells in ``X`` (for the marker genes).
    embedding
        The training cells' embedding.
    labels_by_method
        Cluster labels of every cell per clustering method.
    loss
        The per-epoch training loss.
    truth, batches
        The cell type and the batch of every cell, or ``None``.
    map_plot
        Draw the UMAP map (the slowest figure).
    seed
        Seed of UMAP and of the cell sample of a large dataset.
    title
        The map's title.

    Notes
    -----
    Map and markers read a fixed random sample of :data:`~contrastive_sc.analysis.plots.MAP_SAMPLE`
    cells of a large dataset (a backed one is never loaded whole).
    """
    written = [loss_curve(loss, folder / "loss_curve.png")]
    n = embedding.shape[0]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, MAP_SAMPLE, replace=False)) if n > MAP_SAMPLE else np.arange(n)
    if map_plot:
        coords = umap_coordinates(embedding[rows], seed=seed)
        written.append(cluster_map(coords, {m: labels[rows] for m, labels in labels_by_method.items()},
                                   None if truth is None else truth[rows], folder / "embedding_map.png",
                                   batches=None if batches is None else batches[rows],
                                   title=f"{title} ({len(rows):,} of {n:,} cells)" if title else ""))
    sample = counts if len(rows) == n else counts[rows]  # sliced once, not per clustering
    for method, labels in labels_by_method.items():
        path = folder / f"markers_{method}.csv"
        marker_genes(sample, labels[rows]).to_csv(path, index=False)
        written.append(path)
        if truth is not None:
            path = folder / f"contingency_{method}.csv"
            pd.crosstab(pd.Series(truth, name="label"), pd.Series(labels, name=f"{method}_cluster")).to_csv(path)
            written += [path, contingency_heatmap(truth, labels, folder / f"contingency_{method}.png",
                                                  title=f"{method} clusters against the cell types")]
    return written
