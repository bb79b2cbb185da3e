"""Steps that start from a registered model: ONNX export and embedding a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tracking import TORCH_MODEL_ARTIFACT


def export_registered(model_uri: str, out: str | Path, *, data: str | None = None, provider: str = "auto") -> dict:
    """Re-export the torch encoder logged with ``model_uri``'s run and check it.

    Parity with torch is checked on random rows and, when ``data`` is given, on its cells.

    Returns
    -------
    ``{"path", "max_abs_diff", "rows_checked", "providers"}``.
    """
    from ..method.io import load
    from ..method.model import ContrastiveSC
    from ..serve.onnx_io import OnnxEncoder, export_onnx, parity
    from .registry import download_run_artifacts

    model = ContrastiveSC.load(download_run_artifacts(model_uri, TORCH_MODEL_ARTIFACT))
    rows = np.random.default_rng(0).normal(size=(256, model.state.n_genes)).astype(np.float32)
    if data is not None:
        rows = np.concatenate([rows, model.preprocess(load(data))[:4096]])
    path = export_onnx(model.encoder, out, check=rows)
    session = OnnxEncoder(path, provider=provider)
    return {"path": str(path), "max_abs_diff": parity(model.encoder, path, rows), "rows_checked": len(rows),
            "providers": session.providers}


def embed_with_registered(model_uri: str, data: str, out: str | Path, params: dict,
                          label_key: str | None = None, layer: str | None = None) -> dict:
    """Embed and cluster ``data`` with a logged embed-then-cluster model; write an ``.h5ad``.

    The embedding goes to ``obsm["X_contrastive"]``, its UMAP to ``obsm["X_umap"]``, clusters to
    ``obs["contrastive_<method>"]`` and their marker genes to ``uns["contrastive_markers"]``.
    """
    import pandas as pd

    from ..analysis.describe import MARKERS_KEY, UMAP_KEY, marker_genes, umap_coordinates
    from ..analysis.metrics import score_clustering
    from ..method.io import load
    from ..method.model import CELL_TYPE_KEY, CONFIDENCE_KEY, EMBEDDING_KEY
    from .registry import load_served_model

    served = load_served_model(model_uri)
    adata = load(data, label_key, layer=layer)
    result = served.embed_and_cluster(adata.X, adata.var_names, params)
    labels, embedding, coverage = result.labels, result.embedding, result.coverage
    key = f"contrastive_{params.get('method', 'trained')}"
    adata.obsm[EMBEDDING_KEY] = embedding
    adata.obsm[UMAP_KEY] = umap_coordinates(embedding)
    adata.obs[key] = pd.Categorical(labels.astype(str))
    if result.cell_types is not None:
        adata.obs[CELL_TYPE_KEY] = pd.Categorical(result.cell_types.astype(str))
        adata.obs[CONFIDENCE_KEY] = result.confidence
    # A flat table (h5ad stores DataFrames in uns) that scanpy users can read back as it is.
    adata.uns[MARKERS_KEY] = marker_genes(adata, labels).astype({"cluster": str, "gene": str})
    # None means "the model's value"; h5ad cannot store None on every anndata version.
    adata.uns[key] = {"params": {k: v for k, v in params.items() if v is not None}, "model_uri": model_uri,
                      "coverage": coverage.as_dict()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    truth = adata.obs[label_key].to_numpy() if label_key else None
    scores = score_clustering(embedding, labels, truth)
    return {"cells": adata.n_obs, "gene_coverage": coverage.as_dict()["fraction"], "out": str(out),
            **{k: round(v, 4) for k, v in scores.items()}}


def annotate_with_registered(model_uri: str, data: str, out: str | Path, *, layer: str | None = None,
                             min_confidence: float | None = None) -> dict:
    """Name the cells of ``data`` with a logged model trained with labels; write ``.h5ad`` or ``.csv``.

    The whole file is one sample (the unseen-type rule compares its cells). An ``.h5ad`` gets
    ``obs["contrastive_cell_type"]``, ``obs["contrastive_cell_type_confidence"]`` and the embedding;
    a ``.csv`` one row per cell: ``cell, cell_type, confidence``.

    Returns
    -------
    ``{"cells", "counts" (cells per type, most first), "unassigned" (share), "out"}``.
    """
    import pandas as pd

    from ..method.io import load
    from ..method.model import CELL_TYPE_KEY, CONFIDENCE_KEY, EMBEDDING_KEY
    from .registry import load_served_model

    served = load_served_model(model_uri)
    if served.cell_types is None:
        msg = (f"{model_uri} was trained without labels and names no cell types; train one with "
               "`contrastive-sc train --label-key COLUMN` (or cluster with `contrastive-sc embed`)")
        raise ValueError(msg)
    adata = load(data, layer=layer)
    params = {"method": "trained", "min_confidence": min_confidence}
    result = served.embed_and_cluster(adata.X, adata.var_names, {k: v for k, v in params.items() if v is not None})
    types = pd.Series(result.cell_types.astype(str), index=adata.obs_names)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        pd.DataFrame({"cell": adata.obs_names, "cell_type": types.to_numpy(),
                      "confidence": result.confidence}).to_csv(out, index=False)
    else:
        adata.obs[CELL_TYPE_KEY] = pd.Categorical(types.to_numpy())
        adata.obs[CONFIDENCE_KEY] = result.confidence
        adata.obsm[EMBEDDING_KEY] = result.embedding
        adata.uns[CELL_TYPE_KEY] = {"params": {"model_uri": model_uri, "layer": layer or "X",
                                               "min_confidence": -1.0 if min_confidence is None else min_confidence}}
        adata.write_h5ad(out)
    return {"cells": adata.n_obs, "counts": types.value_counts().to_dict(),
            "unassigned": float((types == "unassigned").mean()), "out": str(out)}
