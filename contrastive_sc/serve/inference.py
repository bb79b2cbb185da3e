"""Embed-then-cluster inference on raw counts, with onnxruntime and no torch.

This is what the served model runs (``models/contrastive_sc_model.py`` wraps it for MLflow):
raw counts with gene names -> the frozen preprocessing state -> the ONNX encoder -> clusters
chosen per request. Every bad input raises ``ValueError`` with a message naming the problem.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..analysis.annotate import UNASSIGNED
from ..analysis.cluster import cluster_labels, nearest_centroid
from ..method.config import Setting, settings
from ..method.manifest import MANIFEST, check_model_id, verify_manifest, write_manifest
from ..method.preprocess import PreprocessState, empty_cells, gene_coverage, transform
from ..method.validation import MAX_COUNT, check_count_values
from .isolation import HeavySlots, run_killable
from .limits import HEAVY_SLOTS_ENV, OverBudget, RequestTooLarge, ServingLimits  # noqa: F401 (first defined here)

#: Artifact names of a packaged model, as logged with the MLflow pyfunc.
ARTIFACTS = {"encoder": "encoder.onnx", "state": "preprocess_state.json",
             "centroids": "training_clusters.npz", "info": "model_info.json", "manifest": MANIFEST}
#: Artifacts only some models have: the cell-type annotator of a model trained with labels.
OPTIONAL_ARTIFACTS = {"cell_types": "cell_types.npz"}
METHODS = ("trained", "kmeans", "auto", "leiden")
#: Columns of the long (sparse) request form: one row per non-zero count (see :func:`long_counts`).
LONG_COLUMNS = ("cell", "gene", "count")
#: Environment variable choosing the onnxruntime provider of a served model.
PROVIDER_ENV = "CONTRASTIVE_SC_ONNX_PROVIDER"


#: Bounds of the per-request params: the parameter table's for the clustering settings (the same
#: rule as training), the served model's own for the two shares.
_PARAM_SETTINGS = {name: settings()[name] for name in ("n_clusters", "resolution", "n_neighbors", "seed")} | {
    "min_coverage": Setting("Smallest share of the model's genes in the input.", "float", low=0, high=1),
    "min_confidence": Setting("Confidence under which a cell is unassigned.", "float", low=0, high=1),
}


@dataclass(frozen=True)
class PredictParams:
    """Per-request clustering options (the served model's ``params``).

    ``method``: ``trained`` labels each cell with the nearest training-cluster centroid (stable
    from batch to batch), ``kmeans`` needs ``n_clusters``, ``auto`` is KMeans with the number of
    clusters estimated from the batch (:func:`~contrastive_sc.analysis.cluster.estimate_n_clusters`),
    ``leiden`` uses ``resolution``; ``auto`` and ``leiden`` use ``n_neighbors`` (``None``: the
    values the model was trained with).
    ``min_coverage``: smallest accepted fraction of the model's genes present in the input.
    ``min_confidence``: a model trained with labels calls a cell ``unassigned`` below this
    confidence (``None``: the value recorded in the model).

    :meth:`from_dict` checks every value's type and range (the parameter table's settings, as
    training checks them) and refuses unknown names, naming the known ones.
    """

    method: str = "trained"
    n_clusters: int = 0
    resolution: float | None = None
    n_neighbors: int | None = None
    seed: int = 0
    return_embedding: bool = True
    min_coverage: float = 0.5
    min_confidence: float | None = None

    @classmethod
    def known(cls) -> list[str]:
        """The parameter names, sorted."""
        return sorted(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, params: dict | None) -> PredictParams:
        if params is not None and not isinstance(params, dict):
            msg = f"params must be a JSON object mapping names to values, got {type(params).__name__}"
            raise ValueError(msg)
        params = {str(k): v for k, v in (params or {}).items() if v is not None}
        unknown = sorted(set(params) - set(cls.known()))
        if unknown:
            msg = f"unknown parameter(s) {unknown}; the known parameters are {cls.known()}"
            raise ValueError(msg)
        method = params.get("method", cls.method)
        if method == "reference":  # the first releases' name for "trained"
            msg = "method 'reference' is now called 'trained' (the nearest training cluster); send method='trained'"
            raise ValueError(msg)
        if not isinstance(method, str) or method not in METHODS:
            msg = f"unknown method {method!r}; expected one of {list(METHODS)}"
            raise ValueError(msg)
        values = {"method": method}
        for name, spec in _PARAM_SETTINGS.items():
            if name in params and not (name == "n_clusters" and params[name] == 0):  # 0: no k given
                values[name] = spec.check(name, params[name])
        if "return_embedding" in params:
            flag = params["return_embedding"]
            if not isinstance(flag, bool | np.bool_):
                msg = f"return_embedding must be true or false, got {flag!r} ({type(flag).__name__})"
                raise ValueError(msg)
            values["return_embedding"] = bool(flag)
        out = cls(**values)
        if out.method == "kmeans" and out.n_clusters < 1:
            msg = f"method 'kmeans' needs n_clusters >= 1, got {out.n_clusters}"
            raise ValueError(msg)
        return out

    @classmethod
    def schema(cls, trained: dict) -> list[tuple[str, str, object]]:
        """``(name, MLflow type, default)`` per field, in field order: the served model's params schema.

        A field whose default is ``None`` (use the model's own value) takes its default from
        ``trained`` (e.g. the Leiden ``resolution`` the model was trained with), and is left out
        when ``trained`` has none for it either (``min_confidence`` of a model without labels).
        """
        specs = []
        for spec in fields(cls):
            default = spec.default if spec.default is not None else trained.get(spec.name)
            if default is None:
                continue
            # Annotations are strings here (``from __future__ import annotations``): "float | None".
            python_type = str(spec.type).split("|")[0].strip()
            specs.append((spec.name, _MLFLOW_TYPES[python_type], _PYTHON_TYPES[python_type](default)))
        return specs


#: MLflow param types of :class:`PredictParams`'s field types.
_MLFLOW_TYPES = {"str": "string", "int": "long", "float": "double", "bool": "boolean"}
_PYTHON_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _check_column(name, column: pd.Series) -> None:
    """Refuse a gene column that is not raw counts, saying what it holds instead."""
    if pd.api.types.is_bool_dtype(column):
        msg = f"gene column {str(name)!r} holds true/false values; expected raw counts (integers >= 0)"
        raise ValueError(msg)
    if pd.api.types.is_numeric_dtype(column):
        return
    # JSON numbers beyond 64 bits, text and booleans mixed with numbers all arrive as `object`.
    for value in column:
        if isinstance(value, bool | np.bool_):
            msg = f"gene column {str(name)!r} holds a true/false value; expected raw counts (integers >= 0)"
            raise ValueError(msg)
        if isinstance(value, int | np.integer) and not abs(int(value)) <= MAX_COUNT:
            msg = f"gene column {str(name)!r} holds the value {value}, above {MAX_COUNT}: not a count"
            raise ValueError(msg)
        if value is not None and not isinstance(value, int | float | np.integer | np.floating):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            msg = f"gene column {str(name)!r} holds non-numeric value(s) such as {shown}; expected raw counts per gene"
            raise ValueError(msg)


def long_counts(data: pd.DataFrame):
    """Counts given as one ``(cell, gene, count)`` row per non-zero entry -> ``(csr matrix, genes, cells)``.

    The sparse form of a request: scRNA-seq counts are ~90 % zeros, so it is ~10x smaller than
    one column per gene and parses in a fraction of the time (CSV or parquet). The genes named in
    any row are the input's genes (a cell without a row for one of them has count 0 there); a gene
    named in no row is missing, as an absent column is. Cells come out in the order of their first
    row; a cell with no counts needs one row of count 0.
    """
    if len(data) == 0:
        msg = "empty input: got 0 (cell, gene, count) rows"
        raise ValueError(msg)
    cell, gene, count = (data[name] for name in LONG_COLUMNS)
    # factorize marks a null name with code -1 (no separate isna pass on text) and numbers a
    # categorical column by its integer codes, not its strings; cells keep their first-row order.
    cell_codes, cells = pd.factorize(cell, sort=False)
    gene_codes, genes = _gene_codes(gene)
    unnamed = int((cell_codes < 0).sum() + (gene_codes < 0).sum())
    if unnamed:
        msg = f"{unnamed} (cell, gene, count) row(s) lack a cell or gene name; every row must name both"
        raise ValueError(msg)
    if pd.api.types.is_bool_dtype(count) or not pd.api.types.is_numeric_dtype(count):
        shown = repr(count.iloc[0]) if len(repr(count.iloc[0])) <= 40 else repr(count.iloc[0])[:37] + "..."
        msg = (f"the 'count' column holds {count.dtype} values such as {shown}; expected raw counts "
               "(integers >= 0)")
        raise ValueError(msg)
    values = count.to_numpy()
    check_count_values(values, what="the 'count' column")
    matrix = sp.csr_matrix((values, (cell_codes, gene_codes)), shape=(len(cells), len(genes)))
    # Building the matrix adds up repeated (cell, gene) pairs and keeps explicit zeros, so fewer
    # stored entries than rows means a repeated pair: no separate sort of the keys is needed.
    if matrix.nnz != len(values):
        key = pd.Series(cell_codes.astype(np.int64) * len(genes) + gene_codes)
        first = int(np.flatnonzero(key.duplicated())[0])
        msg = (f"cell {cells[cell_codes[first]]!s} has more than one count for gene {genes[gene_codes[first]]!s}; "
               "send one (cell, gene, count) row per cell and gene")
        raise ValueError(msg)
    return matrix, np.asarray([str(g) for g in genes], dtype=str), [str(c) for c in cells]


def _gene_codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the gene column (-1 for a missing name) and the genes they stand for.

    A categorical column (what a parquet body with dictionary-encoded names reads as, and what
    ``long_form`` sends) keeps its categories' order, which for ``long_form`` is the order of the
    rows within each cell: the matrix is then built without a sort.
    """
    if not isinstance(column.dtype, pd.CategoricalDtype):
        return pd.factorize(column, sort=False)
    codes = column.cat.codes.to_numpy().astype(np.int64)
    names = column.cat.categories.to_numpy()
    present = np.bincount(codes[codes >= 0], minlength=len(names)) > 0
    if present.all():
        return codes, names
    # a category named in no row is not an input gene (as a column left out of the wide form)
    renumbered = np.cumsum(present) - 1
    return np.where(codes >= 0, renumbered[codes], -1), names[present]


@dataclass(frozen=True)
class Prediction:
    """What :meth:`EmbedThenCluster.embed_and_cluster` computes for a batch of cells.

    ``labels`` is the cluster of each cell (-1 for a cell without counts on the model's genes);
    ``cell_types`` and ``confidence`` are ``None`` for a model trained without labels.
    """

    labels: np.ndarray
    embedding: np.ndarray
    coverage: object
    cell_types: np.ndarray | None
    confidence: np.ndarray | None


class ArtifactError(ValueError):
    """The files of a packaged model are unreadable or disagree with each other."""


def _load_artifact(artifacts: dict[str, str], key: str, loader):
    name = Path(artifacts[key]).name
    expected = {**ARTIFACTS, **OPTIONAL_ARTIFACTS}[key]  # optional ones too: a missing cell_types.npz is named
    try:
        return loader(artifacts[key])
    except (OSError, ValueError, KeyError, TypeError) as error:
        msg = f"cannot load {name} ({expected}) of the packaged model: {error}"
        raise ArtifactError(msg) from error
    except Exception as error:  # onnxruntime raises its own exception types on a corrupt graph
        msg = f"cannot load {name} ({expected}) of the packaged model: {type(error).__name__}: {error}"
        raise ArtifactError(msg) from error


def check_artifacts(state: PreprocessState, encoder, centroids: np.ndarray, info: dict) -> None:
    """Refuse a packaged model whose files disagree, naming the file at fault.

    A model that loads but cannot answer (a shortened ``mean``, centroids of another width, a
    zero ``std``) would pass a health check and then fail or return NaN on every request:
    better that the server never starts.
    """
    state_file, info_file = ARTIFACTS["state"], ARTIFACTS["info"]
    n_genes = len(state.genes)
    if n_genes == 0:
        msg = f"{state_file}: no genes"
        raise ArtifactError(msg)
    if len(set(state.genes)) != n_genes:
        msg = f"{state_file}: duplicated gene names"
        raise ArtifactError(msg)
    for key in ("mean", "std"):
        values = np.asarray(getattr(state, key), dtype=np.float64)
        if values.shape != (n_genes,):
            msg = f"{state_file}: '{key}' has {values.size} values for {n_genes} genes"
            raise ArtifactError(msg)
        if not np.isfinite(values).all():
            msg = f"{state_file}: '{key}' holds {int((~np.isfinite(values)).sum())} NaN/inf value(s)"
            raise ArtifactError(msg)
    std = np.asarray(state.std, dtype=np.float64)
    if (std <= 0).any():
        msg = f"{state_file}: 'std' holds {int((std <= 0).sum())} zero or negative value(s); every scale must be > 0"
        raise ArtifactError(msg)
    if not (np.isfinite(state.target_sum) and state.target_sum > 0):
        msg = f"{state_file}: 'target_sum' must be a finite number > 0, got {state.target_sum}"
        raise ArtifactError(msg)
    if len(state.library_genes) != len(state.library_share):
        msg = (f"{state_file}: {len(state.library_genes)} 'library_genes' but {len(state.library_share)} "
               "'library_share' values")
        raise ArtifactError(msg)
    if encoder.n_inputs != n_genes:
        msg = f"{ARTIFACTS['encoder']}: the encoder takes {encoder.n_inputs} inputs but {state_file} lists {n_genes} genes"
        raise ArtifactError(msg)
    centroids = np.asarray(centroids)
    if centroids.ndim != 2 or centroids.shape[0] == 0 or not np.issubdtype(centroids.dtype, np.number):
        msg = f"{ARTIFACTS['centroids']}: expected a numeric (clusters, dims) array, got shape {centroids.shape}"
        raise ArtifactError(msg)
    if not np.isfinite(centroids).all():
        msg = f"{ARTIFACTS['centroids']}: holds NaN/inf values"
        raise ArtifactError(msg)
    if encoder.n_outputs != centroids.shape[1]:
        msg = (f"{ARTIFACTS['centroids']}: centroids have {centroids.shape[1]} dimensions but "
               f"{ARTIFACTS['encoder']} embeds into {encoder.n_outputs}")
        raise ArtifactError(msg)
    if not isinstance(info, dict):
        msg = f"{info_file}: expected a JSON object, got {type(info).__name__}"
        raise ArtifactError(msg)
    for key, actual, source in (("embedding_dim", encoder.n_outputs, ARTIFACTS["encoder"]),
                                ("n_genes", n_genes, state_file),
                                ("n_training_clusters", centroids.shape[0], ARTIFACTS["centroids"])):
        if key in info and info[key] != actual:
            msg = f"{info_file}: '{key}' is {info[key]!r} but {source} has {actual}"
            raise ArtifactError(msg)


class EmbedThenCluster:
    """A packaged model: preprocessing state, ONNX encoder and training-cluster centroids.

    Parameters
    ----------
    artifacts
        Mapping of :data:`ARTIFACTS` keys to file paths (what MLflow hands a pyfunc).
    provider
        onnxruntime provider choice; defaults to the ``CONTRASTIVE_SC_ONNX_PROVIDER``
        environment variable, else ``"auto"``.
    isolate
        Cluster requests whose work is above ``limits.inline_work`` in a separate process,
        killed at the request's deadline, at most ``limits.heavy_slots`` at once (what the
        served model does, :mod:`~contrastive_sc.serve.isolation`); otherwise every request
        clusters in the caller's thread.

    Attributes
    ----------
    limits
        What one :meth:`predict` call may cost (:class:`~contrastive_sc.serve.limits.ServingLimits`,
        from the environment).
    """

    def __init__(self, artifacts: dict[str, str], provider: str | None = None, *, isolate: bool = False) -> None:
        from .onnx_io import OnnxEncoder, intra_op_threads

        # Settings first: a bad environment variable is named as such, not blamed on a file.
        self.limits = ServingLimits.from_env()
        self.max_cells = self.limits.max_cells
        self.isolate = isolate
        self.heavy_slots = HeavySlots(self.limits.heavy_slots, busy_message=(
            f"busy: this server worker already clusters {self.limits.heavy_slots} large request(s), its limit "
            f"({HEAVY_SLOTS_ENV}); retry in a few seconds, send fewer cells, or send method='trained'"))
        intra_op_threads()
        missing = sorted(set(ARTIFACTS) - set(artifacts))
        if missing:
            msg = f"packaged model lacks artifact(s) {missing}; expected {sorted(ARTIFACTS)}"
            raise ValueError(msg)
        # Every file against the manifest first: a changed, swapped, removed or added file never loads.
        folder = Path(artifacts["manifest"]).parent
        required = tuple(name for key, name in ARTIFACTS.items() if key != "manifest")
        try:
            self.model_id = verify_manifest(folder, required=required, optional=tuple(OPTIONAL_ARTIFACTS.values()))
        except ValueError as error:
            raise ArtifactError(str(error)) from None
        self.state = _load_artifact(artifacts, "state", lambda path: PreprocessState.from_json(Path(path)))
        self.encoder = _load_artifact(
            artifacts, "encoder", lambda path: OnnxEncoder(path, provider or os.environ.get(PROVIDER_ENV, "auto")))
        clusters = _load_artifact(artifacts, "centroids", _read_npz)
        self.centroids = clusters["centroids"]
        self.info = _load_artifact(artifacts, "info", lambda path: json.loads(Path(path).read_text()))
        ids = [(ARTIFACTS["state"], self.state.model_id), (ARTIFACTS["encoder"], self.encoder.model_id),
               (ARTIFACTS["centroids"], str(clusters.get("model_id", ""))),
               (ARTIFACTS["info"], self.info.get("model_id") if isinstance(self.info, dict) else None)]
        if artifacts.get("cell_types"):
            ids.append((OPTIONAL_ARTIFACTS["cell_types"],
                        str(_load_artifact(artifacts, "cell_types", _read_npz).get("model_id", ""))))
        try:
            for name, found in ids:
                check_model_id(name, found, self.model_id)
        except ValueError as error:
            raise ArtifactError(str(error)) from None
        check_artifacts(self.state, self.encoder, self.centroids, self.info)
        self.cell_types = None
        if artifacts.get("cell_types"):
            from ..analysis.annotate import CellTypeAnnotator

            self.cell_types = _load_artifact(artifacts, "cell_types", CellTypeAnnotator.load)
            dims, n_genes = self.cell_types.embedding_dim, len(self.cell_types.arrays["gene_mean"])
            if dims not in (None, self.encoder.n_outputs) or n_genes != self.state.n_genes:
                msg = (f"{OPTIONAL_ARTIFACTS['cell_types']}: the annotator reads {n_genes} genes and a "
                       f"{dims}-d embedding, but {ARTIFACTS['state']} lists {self.state.n_genes} genes and "
                       f"{ARTIFACTS['encoder']} embeds into {self.encoder.n_outputs}")
                raise ArtifactError(msg)

    @classmethod
    def from_dir(cls, folder: str | Path, provider: str | None = None, *, isolate: bool = False) -> EmbedThenCluster:
        """Load a folder written by :func:`package_model`."""
        folder = Path(folder)
        paths = {key: str(folder / name) for key, name in ARTIFACTS.items()}
        paths |= {key: str(folder / name) for key, name in OPTIONAL_ARTIFACTS.items() if (folder / name).exists()}
        return cls(paths, provider, isolate=isolate)

    def predict(self, data, params: dict | None = None, *, started: float | None = None) -> pd.DataFrame:
        """Cluster cells given as raw counts.

        Parameters
        ----------
        data
            A DataFrame of raw counts, cells x genes, columns named by gene (any gene set, any
            order); or the long form, columns ``cell, gene, count`` with one row per non-zero
            count (:func:`long_counts`); or a 2-D array whose columns are exactly the model's
            genes in order.
        params
            :class:`PredictParams` fields.
        started
            ``time.monotonic()`` at which the request arrived (default: now): with ``isolate``,
            clustering in a separate process is stopped ``limits.cluster_timeout`` seconds after it.

        Returns
        -------
        One row per cell: ``cell``, ``cluster``, ``gene_coverage``; for a model trained with
        labels, ``cell_type`` (``"unassigned"`` when unlike every type) and ``confidence`` in
        [0, 1]; unless ``return_embedding`` is false, ``emb_0`` ... ``emb_<d-1>``.

        Raises
        ------
        RequestTooLarge
            More than ``max_cells`` cells (``CONTRASTIVE_SC_MAX_CELLS``); the batch path
            :meth:`embed_and_cluster` has no such limit.
        OverBudget
            More cells x genes, or more clustering work, than :attr:`limits` allow (a ``ValueError``).
        ~contrastive_sc.serve.isolation.ServerBusy, ~contrastive_sc.serve.isolation.WorkTimedOut
            With ``isolate``: every slot for separate processes taken, or the clustering past its deadline.
        """
        started = time.monotonic() if started is None else started
        options = PredictParams.from_dict(params)  # bad params fail before the counts are read
        counts, genes, cells = self._as_counts(data)
        self.limits.check_input(len(cells), len(genes))
        result = self.embed_and_cluster(counts, genes, options, started=started, isolate=self.isolate)
        out = pd.DataFrame({"cell": cells, "cluster": result.labels, "gene_coverage": round(result.coverage.fraction, 4)})
        if result.cell_types is not None:
            out["cell_type"], out["confidence"] = result.cell_types, result.confidence
        if options.return_embedding:
            embedding = result.embedding
            emb = pd.DataFrame(embedding, columns=[f"emb_{i}" for i in range(embedding.shape[1])])
            out = pd.concat([out, emb], axis=1)
        return out

    def embed_and_cluster(self, counts, genes, params: dict | PredictParams | None = None, *,
                          started: float | None = None, isolate: bool = False) -> Prediction:
        """Embed, cluster and (for a model trained with labels) name a count matrix with named gene columns.

        Cells with no count on the model's genes carry no signal: their cluster is -1, their
        cell type ``"unassigned"`` with confidence 0; a request of such cells only is refused.
        The clustering's budget is checked before the encoder runs; with ``isolate`` clustering
        beyond the inline work runs in a killable process with a deadline from ``started``.
        """
        options = params if isinstance(params, PredictParams) else PredictParams.from_dict(params)
        started = time.monotonic() if started is None else started
        if self.cell_types is None and options.min_confidence is not None:
            msg = "min_confidence applies to models trained with labels (--label-key); this one has none"
            raise ValueError(msg)
        coverage = self._coverage(genes, options)
        empty = empty_cells(counts, genes, self.state)
        if empty.all():
            msg = (f"every one of the {len(empty)} cell(s) has zero counts over the model's genes; send raw counts "
                   f"with gene names as columns, e.g. {list(self.state.genes[:3])}")
            raise ValueError(msg)
        n_cells = int((~empty).sum())
        method, kwargs = self._clustering_call(n_cells, options)  # refused before the encoder runs
        work = self.limits.check_clustering(method, n_cells, n_neighbors=kwargs.get("n_neighbors", 0),
                                            n_clusters=kwargs.get("n_clusters", 0))
        pre = transform(counts, genes, self.state)
        embedding = self.encoder(pre)
        cells = embedding[~empty]
        if method == "trained":
            found = nearest_centroid(cells, self.centroids)
        elif not isolate or self.limits.runs_inline(work):
            found = cluster_labels(cells, method, **kwargs)
        else:
            with self.heavy_slots.hold():
                found = run_killable(cluster_labels, (cells, method), kwargs,
                                     deadline=started + self.limits.cluster_timeout)
        labels = np.full(len(embedding), -1, dtype=np.int64)
        labels[~empty] = found
        types = confidence = None
        if self.cell_types is not None:
            types, confidence = self.cell_types.annotate(pre[~empty], embedding[~empty], options.min_confidence)
            # cells without counts take no part in the calls (the unseen-type rule compares the cells)
            types, confidence = _spread(types, ~empty, UNASSIGNED), _spread(confidence, ~empty, 0.0)
        return Prediction(labels, embedding, coverage, types, confidence)

    def _coverage(self, genes, options: PredictParams):
        """How many model genes the input has; refuses fewer than ``min_coverage``."""
        coverage = gene_coverage(genes, self.state)
        if coverage.fraction < options.min_coverage:
            msg = (f"only {coverage.n_found} of the model's {coverage.n_model_genes} genes are in the input "
                   f"({coverage.fraction:.0%} < min_coverage {options.min_coverage:.0%}); send raw counts with "
                   f"gene names as columns, e.g. {list(self.state.genes[:3])}")
            raise ValueError(msg)
        return coverage

    def _as_counts(self, data) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if isinstance(data, dict):
            data = pd.DataFrame(data)
        if isinstance(data, pd.DataFrame) and tuple(map(str, data.columns)) == LONG_COLUMNS:
            return long_counts(data)
        if isinstance(data, pd.DataFrame):
            if data.shape[0] == 0 or data.shape[1] == 0:
                msg = f"empty input: got {data.shape[0]} cells x {data.shape[1]} genes"
                raise ValueError(msg)
            columns = pd.Index(data.columns.astype(str))
            if columns.duplicated().any():
                dup = sorted(set(columns[columns.duplicated()]))
                msg = f"duplicated gene column(s) {dup[:5]}; each gene must appear once"
                raise ValueError(msg)
            # One look at the dtypes; only the columns that are not plain numpy numbers (text, booleans,
            # nullable or object columns) are inspected one by one, for the messages that name them.
            plain = np.array([isinstance(dtype, np.dtype) and dtype.kind in "iuf" for dtype in data.dtypes])
            for position in np.flatnonzero(~plain):
                _check_column(data.columns[position], data.iloc[:, position])
            cells = data.index.astype(str).tolist()
            # All-integer (JSON counts) or all-float frames keep their dtype: transform reads them as
            # they are, without a float64 copy of the whole request.
            counts = data.to_numpy() if plain.all() else data.to_numpy(dtype=np.float64)
            genes = columns.to_numpy()
        else:
            counts = np.asarray(data)
            if counts.ndim != 2 or counts.shape[1] != self.state.n_genes:
                msg = (f"a tensor input must be (cells, {self.state.n_genes}) raw counts of the model's genes in "
                       f"order, got shape {counts.shape}; send a DataFrame with gene columns otherwise")
                raise ValueError(msg)
            if counts.shape[0] == 0:
                msg = "empty input: got 0 cells"
                raise ValueError(msg)
            if counts.dtype == object:
                for j in range(counts.shape[1]):
                    _check_column(self.state.genes[j], pd.Series(counts[:, j]))
                counts = counts.astype(np.float64)
            genes = np.asarray(self.state.genes)
            cells = [str(i) for i in range(counts.shape[0])]
        check_count_values(counts, what="input", rows=cells, columns=genes)
        return counts, genes, cells

    def _clustering_call(self, n_cells: int, options: PredictParams) -> tuple[str, dict]:
        """``(method, keyword arguments of cluster_labels)`` for ``n_cells`` cells; a request that cannot be
        clustered (more clusters or neighbours than cells) is refused here, before any work."""
        if options.method == "trained":
            return "trained", {}
        if options.method == "kmeans":
            if int(options.n_clusters) > n_cells:
                msg = f"n_clusters={options.n_clusters} but only {n_cells} cell(s) were sent; send more cells than clusters"
                raise ValueError(msg)
            return "kmeans", {"n_clusters": int(options.n_clusters), "seed": int(options.seed)}
        if n_cells < 3:
            msg = f"{options.method} needs at least 3 cells, got {n_cells}"
            raise ValueError(msg)
        trained = self.info.get("config", {})
        resolution = options.resolution if options.resolution is not None else trained.get("resolution", 1.0)
        n_neighbors = options.n_neighbors if options.n_neighbors is not None else trained.get("n_neighbors", 15)
        if options.n_neighbors is not None and options.n_neighbors >= n_cells:  # the model's default is capped
            msg = (f"n_neighbors={n_neighbors} needs more cells than neighbours, and {n_cells} cell(s) were sent; "
                   "send more cells or a smaller n_neighbors")
            raise ValueError(msg)
        # the graph has at most n_cells - 1 neighbours per cell (knn_graph caps the model's default)
        return options.method, {"resolution": float(resolution), "n_neighbors": min(int(n_neighbors), n_cells - 1),
                                "seed": int(options.seed)}


def package_model(model, folder: str | Path, *, check_rows: np.ndarray | None = None) -> dict[str, str]:
    """Write a trained :class:`~contrastive_sc.method.model.ContrastiveSC` as servable artifacts.

    Returns the artifact mapping (key -> file path) expected by :class:`EmbedThenCluster`.
    """
    from dataclasses import replace

    from .onnx_io import export_onnx

    if model.training_clusters is None:
        msg = "the model has no training clusters; fit it with clusters=True before packaging"
        raise ValueError(msg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: str(folder / name) for key, name in ARTIFACTS.items()}
    model_id = model.model_id  # written into every file, and the manifest binds their contents
    export_onnx(model.encoder, paths["encoder"], check=check_rows, model_id=model_id)
    replace(model.state, model_id=model_id).to_json(paths["state"])
    with open(paths["centroids"], "wb") as handle:  # np.savez on a str path would append ".npz"
        np.savez(handle, centroids=model.training_clusters.centroids, model_id=model_id)
    if model.annotator is not None:
        paths["cell_types"] = str(model.annotator.save(folder / OPTIONAL_ARTIFACTS["cell_types"], model_id=model_id))
    info = {"model_id": model_id, "config": model.config.to_params(), "n_genes": model.state.n_genes,
            "embedding_dim": int(model.encoder.n_outputs),
            "n_training_clusters": int(len(model.training_clusters.centroids))}
    Path(paths["info"]).write_text(json.dumps(info, indent=2))
    write_manifest(folder, [Path(p).name for k, p in paths.items() if k != "manifest"], model_id)
    return paths


def _spread(values: np.ndarray, where: np.ndarray, fill):
    """``values`` at the rows ``where`` of a longer array, ``fill`` elsewhere."""
    out = np.full(len(where), fill, dtype=object if isinstance(fill, str) else np.float64)
    out[where] = values
    return out


def _read_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
