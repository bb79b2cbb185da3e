"""What a biologist needs to name clusters: a UMAP of the embedding and marker genes per cluster."""

from __future__ import annotations

import numpy as np
import pandas as pd

UMAP_KEY = "X_umap"
MARKERS_KEY = "contrastive_markers"
#: Marker genes kept per cluster.
N_MARKERS = 10


def umap_coordinates(embedding: np.ndarray, *, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """2-D UMAP of the embedding (umap-learn, scanpy's engine), ``(cells, 2)`` float32."""
    import umap

    n_cells = embedding.shape[0]
    if n_cells < 4:
        return np.zeros((n_cells, 2), dtype=np.float32)
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, n_cells - 1), random_state=seed, n_jobs=1)
    return reducer.fit_transform(np.asarray(embedding, dtype=np.float32)).astype(np.float32)


def marker_genes(adata, clusters, *, n_genes: int = N_MARKERS) -> pd.DataFrame:
    """Top marker genes of each cluster on the log-normalised counts (scanpy ``rank_genes_groups``).

    Parameters
    ----------
    adata
        Raw counts in ``X`` with gene names.
    clusters
        Cluster of each cell.
    n_genes
        Markers per cluster.

    Returns
    -------
    One row per cluster and rank: ``cluster``, ``rank``, ``gene``, ``score``, ``log2_fold_change``,
    ``pval_adj`` (t-test with overestimated variance, scanpy's default).
    """
    import anndata as ad
    import scanpy as sc

    clusters = pd.Categorical(np.asarray(clusters).astype(str))
    if len(clusters.categories) < 2:
        return pd.DataFrame(columns=["cluster", "rank", "gene", "score", "log2_fold_change", "pval_adj"])
    work = ad.AnnData(X=adata.X.copy(), obs=pd.DataFrame({"cluster": clusters}, index=adata.obs_names),
                      var=pd.DataFrame(index=adata.var_names))
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    # Clusters of a single cell have no variance to test; scanpy refuses them.
    sizes = work.obs["cluster"].value_counts()
    groups = [str(c) for c in sizes.index if sizes[c] >= 2]
    if len(groups) < 2:
        return pd.DataFrame(columns=["cluster", "rank", "gene", "score", "log2_fold_change", "pval_adj"])
    sc.tl.rank_genes_groups(work, "cluster", groups=groups, n_genes=n_genes, method="t-test_overestim_var")
    table = sc.get.rank_genes_groups_df(work, group=None)
    table["rank"] = table.groupby("group", observed=True).cumcount() + 1
    table = table.rename(columns={"group": "cluster", "names": "gene", "scores": "score",
                                  "logfoldchanges": "log2_fold_change", "pvals_adj": "pval_adj"})
    return table[["cluster", "rank", "gene", "score", "log2_fold_change", "pval_adj"]].reset_index(drop=True)
