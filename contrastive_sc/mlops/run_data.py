"""What data a training run read: its content digest, its source, and the run's dataset entry.

The digest also ties a registered version to the data it was judged on
(:mod:`~contrastive_sc.mlops.registry`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def dataset_digest(adata) -> str:
    """Short content hash of a count matrix (shape, gene names and values)."""
    import scipy.sparse as sp

    digest = hashlib.sha256()
    digest.update(str(adata.shape).encode())
    digest.update("\n".join(map(str, adata.var_names)).encode())
    x = adata.X
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        for part in (x.data, x.indices, x.indptr):
            digest.update(np.ascontiguousarray(part).tobytes())
    else:
        digest.update(np.ascontiguousarray(x).tobytes())
    return digest.hexdigest()[:16]


def log_dataset(counts, name: str, setup) -> None:
    """Record in the active run what it was trained on: an MLflow dataset input and ``data.*`` params.

    Parameters
    ----------
    counts
        The counts the model read (``Cells.view``).
    name
        The dataset's name.
    setup
        The model's data setup (``layer``, ``label_key``, ``batch_key``).
    """
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    path = counts.uns.get("dataset", {}).get("path")
    dataset = MetaDataset(source=_dataset_source(path), name=name, digest=dataset_digest(counts))
    mlflow.log_input(dataset, context="training")
    mlflow.log_params({"data.name": name, "data.n_cells": counts.n_obs, "data.n_genes": counts.n_vars,
                       "data.digest": dataset.digest, "data.label_key": setup.label_key or "",
                       "data.batch_key": setup.batch_key or "",
                       "data.layer": setup.layer or counts.uns.get("dataset", {}).get("layer") or ""})


def _dataset_source(path: str | None):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if not path:
        return CodeDatasetSource(tags={"origin": "in-memory AnnData"})
    # A local file is referenced, not copied: datasets can be large and belong to the user.
    return resolve_dataset_source(str(Path(path).resolve()))
