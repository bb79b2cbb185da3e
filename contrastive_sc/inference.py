"""Embed-then-cluster inference on raw counts, with onnxruntime and no torch.

This is what the served model runs (``models/contrastive_sc_model.py`` wraps it for MLflow):
raw counts with gene names -> the frozen preprocessing state -> the ONNX encoder -> clusters
chosen per request. Every bad input raises ``ValueError`` with a message naming the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from .preprocess import PreprocessState, gene_coverage, transform
from .validation import check_count_values

#: Artifact names of a packaged model, as logged with the MLflow pyfunc.
ARTIFACTS = {"encoder": "encoder.onnx", "state": "preprocess_state.json",
             "centroids": "reference_centroids.npy", "info": "model_info.json"}
METHODS = ("reference", "kmeans", "auto", "leiden")
#: Environment variable choosing the onnxruntime provider of a served model.
PROVIDER_ENV = "CONTRASTIVE_SC_ONNX_PROVIDER"


@dataclass(frozen=True)
class PredictParams:
    """Per-request clustering options (the served model's ``params``).

    ``method``: ``reference`` labels each cell with the nearest training-cluster centroid (stable
    from batch to batch), ``kmeans`` needs ``n_clusters``, ``auto`` is KMeans with the number of
    clusters estimated from the batch (:func:`~contrastive_sc.cluster.estimate_n_clusters`),
    ``leiden`` uses ``resolution``; ``auto`` and ``leiden`` use ``n_neighbors`` (``None``: the
    values the model was trained with).
    ``min_coverage``: smallest accepted fraction of the model's genes present in the input.
    """

    method: str = "reference"
    n_clusters: int = 0
    resolution: float | None = None
    n_neighbors: int | None = None
    seed: int = 0
    return_embedding: bool = True
    min_coverage: float = 0.5

    @classmethod
    def from_dict(cls, params: dict | None) -> PredictParams:
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            msg = f"unknown parameter(s) {unknown}; expected some of {sorted(known)}"
            raise ValueError(msg)
        out = cls(**{k: v for k, v in params.items() if v is not None})
        if out.method not in METHODS:
            msg = f"unknown method {out.method!r}; expected one of {list(METHODS)}"
            raise ValueError(msg)
        if out.method == "kmeans" and int(out.n_clusters) < 1:
            msg = f"method 'kmeans' needs n_clusters >= 1, got {out.n_clusters}"
            raise ValueError(msg)
        if not 0.0 <= float(out.min_coverage) <= 1.0:
            msg = f"min_coverage must be within [0, 1], got {out.min_coverage}"
            raise ValueError(msg)
        if out.resolution is not None and float(out.resolution) <= 0:
            msg = f"resolution must be > 0, got {out.resolution}"
            raise ValueError(msg)
        return out


class EmbedThenCluster:
    """A packaged model: preprocessing state, ONNX encoder and reference centroids.

    Parameters
    ----------
    artifacts
        Mapping of :data:`ARTIFACTS` keys to file paths (what MLflow hands a pyfunc).
    provider
        onnxruntime provider choice; defaults to the ``CONTRASTIVE_SC_ONNX_PROVIDER``
        environment variable, else ``"auto"``.
    """

    def __init__(self, artifacts: dict[str, str], provider: str | None = None) -> None:
        from .onnx_io import OnnxEncoder

        missing = sorted(set(ARTIFACTS) - set(artifacts))
        if missing:
            msg = f"packaged model lacks artifact(s) {missing}; expected {sorted(ARTIFACTS)}"
            raise ValueError(msg)
        self.state = PreprocessState.from_json(Path(artifacts["state"]))
        self.encoder = OnnxEncoder(artifacts["encoder"], provider or os.environ.get(PROVIDER_ENV, "auto"))
        self.centroids = np.load(artifacts["centroids"])
        self.info = json.loads(Path(artifacts["info"]).read_text())

    @classmethod
    def from_dir(cls, folder: str | Path, provider: str | None = None) -> EmbedThenCluster:
        """Load a folder written by :func:`package_model`."""
        folder = Path(folder)
        return cls({key: str(folder / name) for key, name in ARTIFACTS.items()}, provider)

    def predict(self, data, params: dict | None = None) -> pd.DataFrame:
        """Cluster cells given as raw counts.

        Parameters
        ----------
        data
            A DataFrame of raw counts, cells x genes, columns named by gene (any gene set, any
            order); or a 2-D array whose columns are exactly the model's genes in order.
        params
            :class:`PredictParams` fields.

        Returns
        -------
        One row per cell: ``cell``, ``cluster``, ``gene_coverage`` and, unless
        ``return_embedding`` is false, ``emb_0`` ... ``emb_<d-1>``.
        """
        counts, genes, cells = self._as_counts(data)
        labels, embedding, coverage = self.embed_and_cluster(counts, genes, params)
        out = pd.DataFrame({"cell": cells, "cluster": labels, "gene_coverage": round(coverage.fraction, 4)})
        if PredictParams.from_dict(params).return_embedding:
            emb = pd.DataFrame(embedding, columns=[f"emb_{i}" for i in range(embedding.shape[1])])
            out = pd.concat([out, emb], axis=1)
        return out

    def embed_and_cluster(self, counts, genes, params: dict | None = None):
        """Embed and cluster a (dense or sparse) count matrix with named gene columns.

        Returns
        -------
        ``(labels, embedding, coverage)``.
        """
        options = PredictParams.from_dict(params)
        coverage = gene_coverage(genes, self.state)
        if coverage.fraction < options.min_coverage:
            msg = (f"only {coverage.n_found} of the model's {coverage.n_model_genes} genes are in the input "
                   f"({coverage.fraction:.0%} < min_coverage {options.min_coverage:.0%}); send raw counts with "
                   f"gene names as columns, e.g. {list(self.state.genes[:3])}")
            raise ValueError(msg)
        embedding = self.encoder(transform(counts, genes, self.state))
        return self._cluster(embedding, options), embedding, coverage

    def _as_counts(self, data) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if isinstance(data, dict):
            data = pd.DataFrame(data)
        if isinstance(data, pd.DataFrame):
            if data.shape[0] == 0 or data.shape[1] == 0:
                msg = f"empty input: got {data.shape[0]} cells x {data.shape[1]} genes"
                raise ValueError(msg)
            columns = pd.Index(data.columns.astype(str))
            if columns.duplicated().any():
                dup = sorted(set(columns[columns.duplicated()]))
                msg = f"duplicated gene column(s) {dup[:5]}; each gene must appear once"
                raise ValueError(msg)
            non_numeric = [c for c in data.columns if not pd.api.types.is_numeric_dtype(data[c])]
            if non_numeric:
                msg = f"non-numeric column(s) {[str(c) for c in non_numeric[:5]]}; expected raw counts per gene"
                raise ValueError(msg)
            counts = data.to_numpy(dtype=np.float64)
            genes = columns.to_numpy()
            cells = [str(i) for i in data.index]
        else:
            counts = np.asarray(data)
            if counts.ndim != 2 or counts.shape[1] != self.state.n_genes:
                msg = (f"a tensor input must be (cells, {self.state.n_genes}) raw counts of the model's genes in "
                       f"order, got shape {counts.shape}; send a DataFrame with gene columns otherwise")
                raise ValueError(msg)
            if counts.shape[0] == 0:
                msg = "empty input: got 0 cells"
                raise ValueError(msg)
            if not np.issubdtype(counts.dtype, np.number):
                msg = f"expected numeric raw counts, got dtype {counts.dtype}"
                raise ValueError(msg)
            genes = np.asarray(self.state.genes)
            cells = [str(i) for i in range(counts.shape[0])]
        check_count_values(counts, what="input")
        return counts, genes, cells

    def _cluster(self, embedding: np.ndarray, options: PredictParams) -> np.ndarray:
        from .cluster import cluster_labels, nearest_centroid

        n_cells = embedding.shape[0]
        if options.method == "reference":
            return nearest_centroid(embedding, self.centroids)
        if options.method == "kmeans":
            if int(options.n_clusters) > n_cells:
                msg = f"n_clusters={options.n_clusters} but only {n_cells} cell(s) were sent; send more cells than clusters"
                raise ValueError(msg)
            return cluster_labels(embedding, "kmeans", n_clusters=int(options.n_clusters), seed=int(options.seed))
        if n_cells < 3:
            msg = f"{options.method} needs at least 3 cells, got {n_cells}"
            raise ValueError(msg)
        trained = self.info.get("config", {})
        resolution = options.resolution if options.resolution is not None else trained.get("resolution", 1.0)
        n_neighbors = options.n_neighbors if options.n_neighbors is not None else trained.get("n_neighbors", 15)
        return cluster_labels(embedding, options.method, resolution=float(resolution), n_neighbors=int(n_neighbors),
                              seed=int(options.seed))


def package_model(model, folder: str | Path, *, check_rows: np.ndarray | None = None) -> dict[str, str]:
    """Write a trained :class:`~contrastive_sc.model.ContrastiveSC` as servable artifacts.

    Returns the artifact mapping (key -> file path) expected by :class:`EmbedThenCluster`.
    """
    from .onnx_io import export_onnx

    if model.reference_centroids is None:
        msg = "the model has no reference clusters; train it with fit(adata, reference=True) before packaging"
        raise ValueError(msg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: str(folder / name) for key, name in ARTIFACTS.items()}
    export_onnx(model.encoder, paths["encoder"], check=check_rows)
    model.state.to_json(paths["state"])
    np.save(paths["centroids"], model.reference_centroids)
    info = {"config": model.config.to_params(), "n_genes": model.state.n_genes,
            "embedding_dim": int(model.encoder.n_outputs), "n_reference_clusters": int(len(model.reference_centroids))}
    Path(paths["info"]).write_text(json.dumps(info, indent=2))
    return paths
