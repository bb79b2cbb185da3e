"""Readers for every accepted input format, returning an AnnData of raw counts.

Accepted: ``.h5ad``; 10x Genomics ``.h5``; 10x matrix-market folders; the scDeepCluster /
scDCC benchmark ``.h5`` layout (``X`` cells x genes, ``Y`` labels); CSV / TSV tables of
cells x genes with a header row. Labels, when the file has them, end up in ``obs``.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data import counts_view
from .simulate import simulated_dataset
from .validation import validate_counts

#: ``obs`` column that holds labels read from a benchmark ``.h5`` file.
BENCHMARK_LABEL_KEY = "label"

_TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t"}


#: Data spec that needs no file: the package's Splat simulator, ``simulated[:GROUPS]``.
SIMULATED = "simulated"


def load(spec: str | Path, label_key: str | None = None, *, layer: str | None = None,
         validate: bool = True) -> ad.AnnData:
    """:func:`read` a file, or build the simulated dataset when ``spec`` is ``simulated[:GROUPS]``.

    ``label_key``, ``layer`` and ``validate`` as in :func:`read`.
    """
    return _counts(open_dataset(spec, label_key), layer, validate)


def open_dataset(spec: str | Path, label_key: str | None = None) -> ad.AnnData:
    """The AnnData a file (or ``simulated[:GROUPS]``) holds, with ``label_key`` checked, as it is stored.

    For a caller that hands it to a model: where the counts are (the layer) and whether they are
    raw counts is the model's data setup, read and checked when it is fitted
    (:class:`~contrastive_sc.method.data.DataSetup`).
    """
    return _open(spec, label_key, simulated=str(spec).startswith(SIMULATED))


def read(path: str | Path, label_key: str | None = None, *, layer: str | None = None,
         validate: bool = True) -> ad.AnnData:
    """Read raw counts from ``path`` into an AnnData (cells x genes).

    Parameters
    ----------
    path
        A ``.h5ad`` file, a 10x ``.h5`` file, a benchmark ``.h5`` file, a 10x matrix-market
        folder, or a CSV / TSV table (optionally gzipped) with cells as rows and a header row.
    label_key
        Column holding the ground-truth labels: an ``obs`` column of a ``.h5ad``, or a column
        of a CSV / TSV table (moved from the genes to ``obs``). Benchmark ``.h5`` files put
        their ``Y`` into ``obs["label"]``.
    layer
        Where an ``.h5ad`` keeps its raw counts when ``X`` holds normalised values:
        ``layers[layer]``, or ``"raw"`` for ``adata.raw``. The AnnData returned has them in ``X``.
    validate
        Check that the matrix holds raw counts
        (:func:`~contrastive_sc.method.validation.validate_counts`).

    Returns
    -------
    AnnData with ``uns["dataset"]`` naming the source file (and the layer read).
    """
    return _counts(_open(path, label_key, simulated=False), layer, validate)


def _open(spec, label_key: str | None, *, simulated: bool) -> ad.AnnData:
    adata = _read_file(Path(spec), label_key) if not simulated else simulated_dataset(str(spec))
    if label_key is not None and label_key not in adata.obs:
        source = "the simulated data" if simulated else Path(spec).name
        msg = (f"label key {label_key!r} not found in {source}; available obs columns: {list(adata.obs.columns)}. "
               "Pass one of those, or omit --label-key")
        raise KeyError(msg)
    return adata


def _counts(adata: ad.AnnData, layer: str | None, validate: bool) -> ad.AnnData:
    counts = counts_view(adata, layer)
    if layer:
        counts.uns["dataset"] = counts.uns["dataset"] | {"layer": layer}
    if validate:
        validate_counts(counts)
    return counts


def _read_file(path: Path, label_key: str | None) -> ad.AnnData:
    """The AnnData in ``path`` in whichever format it is, ``uns["dataset"]`` naming it."""
    if not path.exists():
        msg = f"input {str(path)!r} does not exist; expected a .h5ad, .h5, .csv/.tsv file or a 10x folder"
        raise FileNotFoundError(msg)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""

    if path.is_dir():
        adata = _read_10x_mtx(path)
    elif suffix == ".h5ad":
        adata = ad.read_h5ad(path)
    elif suffix == ".h5":
        adata = _read_benchmark_h5(path) if _is_benchmark_h5(path) else _read_10x_h5(path)
    elif suffix in _TABLE_SUFFIXES:
        adata = _read_table(path, _TABLE_SUFFIXES[suffix], label_key)
    else:
        msg = (
            f"unsupported input {path.name!r}; expected .h5ad, .h5 (10x or benchmark X/Y layout), "
            ".csv, .tsv, .txt (optionally .gz) or a 10x matrix-market folder"
        )
        raise ValueError(msg)
    name = path.name
    for suffix in (".gz", ".h5ad", ".h5", ".csv", ".tsv", ".txt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    adata.uns["dataset"] = {"name": name, "path": str(path)}
    return adata


def default_label_key(adata: ad.AnnData) -> str | None:
    """The label column to use when none is given: ``obs["label"]`` if present."""
    return BENCHMARK_LABEL_KEY if BENCHMARK_LABEL_KEY in adata.obs else None


def _is_benchmark_h5(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as handle:
        return "X" in handle and isinstance(handle["X"], h5py.Dataset)


def _read_benchmark_h5(path: Path) -> ad.AnnData:
    import h5py

    with h5py.File(path, "r") as handle:
        counts = np.asarray(handle["X"][...])
        labels = np.asarray(handle["Y"][...]) if "Y" in handle else None
    if counts.ndim != 2:
        msg = f"{path.name}: dataset X must be 2-D (cells x genes), got shape {counts.shape}"
        raise ValueError(msg)
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)))
    adata.var_names = [f"gene_{i}" for i in range(counts.shape[1])]
    adata.obs_names = [f"cell_{i}" for i in range(counts.shape[0])]
    if labels is not None:
        if labels.shape[0] != counts.shape[0]:
            msg = f"{path.name}: Y has {labels.shape[0]} labels but X has {counts.shape[0]} cells"
            raise ValueError(msg)
        adata.obs[BENCHMARK_LABEL_KEY] = labels.astype(np.int64)
    return adata


def _read_10x_h5(path: Path) -> ad.AnnData:
    import scanpy as sc

    adata = sc.read_10x_h5(path)
    adata.var_names_make_unique()
    return adata


def _read_10x_mtx(path: Path) -> ad.AnnData:
    import scanpy as sc

    if not any(path.glob("matrix.mtx*")):
        msg = f"folder {str(path)!r} has no matrix.mtx(.gz); expected a 10x matrix-market folder"
        raise ValueError(msg)
    adata = sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=True)
    return adata


def _read_table(path: Path, sep: str, label_key: str | None) -> ad.AnnData:
    header = pd.read_csv(path, sep=sep, index_col=0, nrows=0).columns
    # pandas renames repeated headers ("A", "A.1"), which would hide duplicated genes.
    raw_header = pd.read_csv(path, sep=sep, header=None, nrows=1).iloc[0, 1:].astype(str)
    if raw_header.duplicated().any() or len(raw_header) != len(header):
        dup = sorted(set(raw_header[raw_header.duplicated()]))
        msg = f"{path.name}: duplicated gene column(s) {dup[:5]}; gene names must be unique"
        raise ValueError(msg)
    table = pd.read_csv(path, sep=sep, index_col=0)
    if table.empty:
        msg = f"empty count matrix in {path.name}: got {table.shape[0]} cells x {table.shape[1]} genes"
        raise ValueError(msg)
    labels = None
    if label_key is not None and label_key in table.columns:
        labels = table.pop(label_key)
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        msg = (
            f"{path.name}: column(s) {non_numeric[:5]} are not numeric; expected cells as rows, "
            "genes as columns of counts. Pass --label-key for a label column"
        )
        raise ValueError(msg)
    adata = ad.AnnData(X=sp.csr_matrix(table.to_numpy(dtype=np.float32)))
    adata.obs_names = table.index.astype(str)
    adata.var_names = table.columns.astype(str)
    if labels is not None:
        adata.obs[label_key] = labels.to_numpy()
    return adata
