"""The paper's preprocessing as a fitted state, applied unchanged at training and serving time.

``fit_preprocess`` learns a :class:`PreprocessState` from raw counts, read a block of cells at a
time: genes detected in fewer than ``min_cells`` cells are dropped, cells are scaled to the median
library size, log1p is applied, the top-N genes by scanpy's seurat dispersion ranking are kept
and each is scaled to zero mean and unit variance. ``transform`` applies exactly that state to
any count matrix whose columns are named by genes, in any order and with any gene set;
``transform_rows`` and ``transform_in_memory`` apply it to every cell of a dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .rows import DEFAULT_BLOCK_SIZE, Rows, collect

STATE_VERSION = 1
#: scanpy's default number of mean bins for the seurat dispersion normalisation.
SEURAT_N_BINS = 20


@dataclass(frozen=True)
class PreprocessState:
    """What ``fit_preprocess`` learned; everything ``transform`` needs.

    Attributes
    ----------
    genes
        The model's input genes, in input order.
    mean, std
        Per-gene mean and standard deviation of log1p-normalised expression (scanpy's
        ``pp.scale`` convention: unbiased std, zero std replaced by 1).
    target_sum
        Library size every cell is scaled to (the training median).
    library_genes, library_share
        Genes whose counts make up a cell's library size, and the share of all training counts
        each carried. A new dataset that lacks some of them has its library sizes rescaled by
        the share of the genes it has, so normalisation matches training.
    clip
        Scaled values are clipped to ``[-clip, clip]`` when set.
    n_cells_fit
        Cells the state was fitted on.
    model_id
        The model this state belongs to (set when a model is fitted; checked against its manifest).
    """

    genes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_sum: float
    library_genes: tuple[str, ...]
    library_share: tuple[float, ...]
    clip: float | None = None
    n_cells_fit: int = 0
    model_id: str = ""
    version: int = STATE_VERSION

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; also write it to ``path`` when given."""
        text = json.dumps(asdict(self))
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_arrays(cls, genes, mean, std, *, target_sum: float, library_genes, library_share,
                    clip: float | None, n_cells_fit: int) -> PreprocessState:
        """Build a state from the fitted arrays; a gene of zero spread is scaled by 1 (as scanpy)."""
        std = np.where(np.asarray(std, dtype=np.float64) == 0, 1.0, std)
        return cls(genes=tuple(np.asarray(genes).tolist()), mean=tuple(np.asarray(mean, dtype=np.float64).tolist()),
                   std=tuple(std.tolist()), target_sum=float(target_sum),
                   library_genes=tuple(np.asarray(library_genes).tolist()),
                   library_share=tuple(np.asarray(library_share, dtype=np.float64).tolist()), clip=clip,
                   n_cells_fit=int(n_cells_fit))

    @classmethod
    def from_json(cls, source: str | Path) -> PreprocessState:
        """Load from a JSON string or a path to a JSON file."""
        text = Path(source).read_text() if _looks_like_path(source) else str(source)
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            msg = f"preprocessing state version {data.get('version')} is not supported; expected {STATE_VERSION}"
            raise ValueError(msg)
        for key in ("genes", "mean", "std", "library_genes", "library_share"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class GeneCoverage:
    """How many of the model's genes a dataset provides."""

    n_model_genes: int
    n_found: int
    missing: tuple[str, ...]
    library_share_found: float

    @property
    def fraction(self) -> float:
        return self.n_found / self.n_model_genes

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n_model_genes": self.n_model_genes,
            "n_found": self.n_found,
            "fraction": round(self.fraction, 4),
            "library_share_found": round(self.library_share_found, 4),
        }


def fit_preprocess(counts: Rows, gene_names, *, n_genes: int | str = 500, min_cells: int = 2,
                   hvg_flavor: str = "seurat", clip: float | None = None,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> PreprocessState:
    """Learn the preprocessing state from raw counts, from statistics accumulated over row blocks.

    Three passes over the blocks of the counts: in how many cells each gene is detected; library
    sizes and each gene's share of all counts; per-gene sums and sums of squares of the normalised
    and log-normalised values. scanpy's seurat dispersion ranking and the scaling statistics
    follow from those sums (scanpy's ``highly_variable_genes`` ranks from ``(mean, var)`` alone),
    so memory is one block whatever the number of cells, and the genes and the encoder input are
    scanpy's to the last bit (checked on the development datasets). Other ``hvg_flavor`` values
    have no block form: their log-normalised matrix is gathered and handed to scanpy.

    Parameters
    ----------
    counts
        Cells x genes raw counts, as :class:`~contrastive_sc.method.rows.Rows` (``as_rows(matrix)``).
    gene_names
        One name per column.
    n_genes
        Number of dispersion-ranked genes to keep, or ``"all"``.
    min_cells
        Genes detected in fewer cells are dropped.
    hvg_flavor
        scanpy ``highly_variable_genes`` flavor (the paper's: ``"seurat"``).
    clip
        Optional clipping of scaled values.
    block_size
        Cells per block; bounds the memory of every pass.
    """
    rows = counts
    gene_names = np.asarray(gene_names, dtype=str)
    n_cells, n_columns = rows.shape
    if n_columns != len(gene_names):
        msg = f"{len(gene_names)} gene names for a matrix of {n_columns} columns"
        raise ValueError(msg)

    # Pass 1: in how many cells each gene is detected.
    detected_in = np.zeros(n_columns, dtype=np.int64)
    for _, _, block in rows.blocks(block_size):
        detected_in += np.asarray((_as_csr32(block) > 0).sum(axis=0)).ravel()
    keep = detected_in >= min_cells
    if keep.sum() < 2:
        msg = (f"only {int(keep.sum())} gene(s) are detected in >= {min_cells} cells; "
               "expected a count matrix with at least two expressed genes")
        raise ValueError(msg)
    library_genes = gene_names[keep]

    # Pass 2: library sizes over the kept genes (one float per cell) and each gene's share.
    totals = np.empty(n_cells, dtype=np.float32)  # float32 like scanpy's sums, for the same median
    gene_totals = np.zeros(int(keep.sum()), dtype=np.float64)
    for start, stop, block in rows.blocks(block_size):
        block = _as_csr32(block)[:, keep]
        totals[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        gene_totals += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
    library_share = gene_totals / gene_totals.sum()
    target_sum = float(np.median(totals[totals > 0]))

    # Pass 3: per-gene sums and sums of squares of the normalised values (seurat dispersions are
    # computed on expm1 of the log data) and of the log-normalised ones (the scaling statistics).
    n_kept = len(library_genes)
    sums = {name: np.zeros(n_kept, dtype=np.float64) for name in ("norm", "norm_sq", "log", "log_sq")}
    gathered = []  # the log-normalised blocks, for a flavor scanpy must rank itself
    for start, stop, block in rows.blocks(block_size):
        lognorm = _log_normalise(_as_csr32(block)[:, keep], totals[start:stop], target_sum)
        norm = np.expm1(lognorm.data)  # float32, as scanpy's expm1 of the float32 log matrix
        _add_column_sums(sums["norm"], sums["norm_sq"], norm, lognorm.indices)
        _add_column_sums(sums["log"], sums["log_sq"], lognorm.data, lognorm.indices)
        if hvg_flavor != "seurat":
            gathered.append(lognorm)

    if n_genes == "all" or int(n_genes) >= n_kept:
        chosen = np.arange(n_kept)
    elif hvg_flavor == "seurat":
        mean, var = _mean_var(sums["norm"], sums["norm_sq"], n_cells)
        chosen = seurat_top_genes(mean, var, int(n_genes))
    else:
        chosen = _scanpy_top_genes(sp.vstack(gathered).tocsr(), library_genes, int(n_genes), hvg_flavor)
    if n_cells > 1:
        mean, var = _mean_var(sums["log"][chosen], sums["log_sq"][chosen], n_cells)
        std = np.sqrt(np.maximum(var, 0.0))
    else:
        mean, std = sums["log"][chosen] / n_cells, np.ones(len(chosen))
    return PreprocessState.from_arrays(library_genes[chosen], mean, std, target_sum=target_sum,
                                       library_genes=library_genes, library_share=library_share, clip=clip,
                                       n_cells_fit=n_cells)


def _as_csr32(block) -> sp.csr_matrix:
    return sp.csr_matrix(block, dtype=np.float32)


def _add_column_sums(total: np.ndarray, total_sq: np.ndarray, values: np.ndarray, columns: np.ndarray) -> None:
    values = values.astype(np.float64)
    total += np.bincount(columns, weights=values, minlength=len(total))
    total_sq += np.bincount(columns, weights=values * values, minlength=len(total))


def _mean_var(total: np.ndarray, total_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    # scanpy's _get_mean_var: E[x^2] - E[x]^2 in float64, then the unbiased (n - 1) correction.
    mean = total / n
    var = total_sq / n - mean**2
    if n > 1:
        var *= n / (n - 1)
    return mean, var


def seurat_top_genes(mean: np.ndarray, var: np.ndarray, n_top: int, n_bins: int = SEURAT_N_BINS) -> np.ndarray:
    """Indices (sorted) of the ``n_top`` genes scanpy's ``highly_variable_genes(flavor="seurat")`` keeps.

    Parameters
    ----------
    mean, var
        Per-gene mean and unbiased variance of the normalised (not log) expression, i.e. of
        ``expm1`` of the log-normalised data, as scanpy computes them.
    n_top
        ``n_top_genes``; with it scanpy ranks by normalised dispersion and ignores mean cut-offs.
    n_bins
        Number of equal-width bins of log mean within which dispersions are z-scored.
    """
    import pandas as pd

    mean = np.array(mean, dtype=np.float64)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.asarray(var, dtype=np.float64) / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    frame = pd.DataFrame({"means": np.log1p(mean), "dispersions": dispersion})
    frame["mean_bin"] = pd.cut(frame["means"], bins=n_bins)
    stats = frame.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    # A bin holding one gene has no std: scanpy gives that gene a normalised dispersion of 1.
    alone = stats["dev"].isnull()
    stats.loc[alone, "dev"] = stats.loc[alone, "avg"]
    stats.loc[alone, "avg"] = 0
    stats = stats.loc[frame["mean_bin"]].set_index(frame.index)
    normalised = ((frame["dispersions"] - stats["avg"]) / stats["dev"]).to_numpy(dtype=np.float64)
    ranked = np.sort(normalised[~np.isnan(normalised)])[::-1]
    cutoff = ranked[min(n_top, ranked.size) - 1]
    return np.flatnonzero(np.nan_to_num(normalised, nan=-np.inf) >= cutoff)


def gene_coverage(gene_names, state: PreprocessState) -> GeneCoverage:
    """Report which of the model's genes ``gene_names`` provides."""
    import pandas as pd

    present = pd.Index(np.asarray(gene_names, dtype=str))
    found = pd.Index(state.genes).isin(present)
    missing = tuple(g for g, ok in zip(state.genes, found) if not ok)
    share = float(np.asarray(state.library_share, dtype=np.float64)[pd.Index(state.library_genes).isin(present)].sum())
    return GeneCoverage(state.n_genes, int(found.sum()), missing, share)


def transform(counts, gene_names, state: PreprocessState) -> np.ndarray:
    """Apply a fitted state to raw counts; the same function runs at training and serving.

    Parameters
    ----------
    counts
        Cells x genes raw counts (dense or scipy sparse, any numeric dtype), columns named by
        ``gene_names`` in any order. Genes unknown to the model are ignored.
    gene_names
        One name per column.
    state
        The fitted preprocessing state.

    Returns
    -------
    Cells x ``state.n_genes`` float32 matrix in the model's gene order. A model gene missing
    from the input is set to 0, its training mean after scaling, so it carries no signal.

    Notes
    -----
    The arithmetic runs in float32 on the model's columns only (a sparse input stays sparse until
    those columns are picked), one array at a time and in place: the encoder takes float32, and
    float32 keeps the result within ~1e-5 of the float64 computation.
    """
    import pandas as pd

    gene_names = np.asarray(gene_names, dtype=str)
    if counts.shape[1] != len(gene_names):
        msg = f"{len(gene_names)} gene names for a matrix of {counts.shape[1]} columns"
        raise ValueError(msg)
    columns = pd.Index(gene_names)
    if not columns.is_unique:
        msg = "gene names must be unique; found duplicates in the input columns"
        raise ValueError(msg)
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    if sp.issparse(counts) and not counts.has_canonical_format:  # the scatter below needs one entry per cell and gene
        counts = counts.copy()
        counts.sum_duplicates()

    lib_at = columns.get_indexer(pd.Index(state.library_genes))
    lib_found = lib_at >= 0
    if not lib_found.any():
        msg = (
            f"none of the {len(gene_names)} input genes is among the model's "
            f"{len(state.library_genes)} genes; check that columns are gene names of the same species/annotation"
        )
        raise ValueError(msg)
    lib_share = float(np.asarray(state.library_share, dtype=np.float64)[lib_found].sum())
    # Library size over the genes the input has, rescaled by the share of training counts
    # they carried, so a partial gene set is normalised as the full one was.
    totals = _row_sums(counts, lib_at[lib_found]) / lib_share
    scale = np.divide(state.target_sum, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)

    model_at = columns.get_indexer(pd.Index(state.genes))
    model_pos = np.flatnonzero(model_at >= 0)
    input_cols = model_at[model_pos]
    out = np.zeros((counts.shape[0], state.n_genes), dtype=np.float32)
    if len(model_pos):
        if sp.issparse(counts):
            # Scale and log the stored values of the model's columns only (log1p(0) = 0) and scatter
            # them into the dense block: selecting the columns of a sparse matrix sorts its entries.
            slot = np.full(counts.shape[1], -1, dtype=np.int64)
            slot[input_cols] = np.arange(len(input_cols))
            at = slot[counts.indices]
            rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
            keep = at >= 0
            values = counts.data[keep].astype(np.float32)
            values *= scale[rows[keep]]
            np.log1p(values, out=values)
            block = np.zeros((counts.shape[0], len(input_cols)), dtype=np.float32)
            block[rows[keep], at[keep]] = values
        else:
            in_order = len(input_cols) == counts.shape[1] and bool((input_cols == np.arange(counts.shape[1])).all())
            block = np.array(counts if in_order else counts[:, input_cols], dtype=np.float32)  # the one copy
            block *= scale[:, None]
            np.log1p(block, out=block)
        block -= np.asarray(state.mean, dtype=np.float32)[model_pos]
        block *= (1.0 / np.asarray(state.std, dtype=np.float64)[model_pos]).astype(np.float32)
        if len(model_pos) == state.n_genes:
            out = block  # the input has every model gene: no scatter into a zero matrix
        else:
            out[:, model_pos] = block
    if state.clip is not None:
        np.clip(out, -state.clip, state.clip, out=out)
    return out


def transform_rows(counts: Rows, gene_names, state: PreprocessState, *,
                   directory: str | Path | None = None) -> Rows:
    """:func:`transform` of every cell, as rows kept where the counts are kept.

    Cells in memory give an array in memory; the cells of a backed AnnData give a
    :class:`~contrastive_sc.method.rows.DiskMatrix` in a temporary file (in ``directory``), deleted
    when the rows are closed: use the result as a context manager.
    """
    transformed = ((start, stop, transform(block, gene_names, state)) for start, stop, block in counts.blocks())
    return counts.store(transformed, state.n_genes, directory=directory)


def transform_in_memory(counts: Rows, gene_names, state: PreprocessState) -> np.ndarray:
    """:func:`transform` of every cell as one array, the counts (rows) read a block at a time."""
    return collect(lambda block: transform(block, gene_names, state), counts, state.n_genes)


def empty_cells(counts, gene_names, state: PreprocessState) -> np.ndarray:
    """Which cells have no count on any gene the model normalises by: they carry no signal.

    :func:`transform` maps such a cell to the training mean of every gene (an "average" cell),
    so callers that name or cluster cells set them apart instead.
    """
    import pandas as pd

    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    at = pd.Index(np.asarray(gene_names, dtype=str)).get_indexer(pd.Index(state.library_genes))
    if not (at >= 0).any():
        return np.ones(counts.shape[0], dtype=bool)
    return _row_sums(counts, at[at >= 0]) == 0


def _row_sums(counts, cols: np.ndarray) -> np.ndarray:
    """Per-row sums over ``cols``, summing whichever of ``cols`` or the other columns is smaller."""
    n_cols = counts.shape[1]
    if len(cols) == n_cols:
        return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    if len(cols) > n_cols // 2:
        others = np.setdiff1d(np.arange(n_cols), cols, assume_unique=True)
        total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        return total - np.asarray(counts[:, others].sum(axis=1), dtype=np.float64).ravel()
    return np.asarray(counts[:, cols].sum(axis=1), dtype=np.float64).ravel()


def _log_normalise(counts: sp.csr_matrix, totals: np.ndarray, target_sum: float) -> sp.csr_matrix:
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = sp.diags(scale.astype(np.float32)) @ counts
    out = sp.csr_matrix(out)
    out.data = np.log1p(out.data)
    return out


def _scanpy_top_genes(lognorm: sp.csr_matrix, names: np.ndarray, n_genes: int, flavor: str) -> np.ndarray:
    """Indices (sorted, input order) of the top ``n_genes`` by scanpy's ranking of ``flavor``."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(X=lognorm)
    tmp.var_names = names
    sc.pp.highly_variable_genes(tmp, n_top_genes=int(n_genes), flavor=flavor,
                                min_mean=0.0125, max_mean=3, min_disp=0.5)
    return np.flatnonzero(tmp.var["highly_variable"].to_numpy())


def _looks_like_path(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    return not str(source).lstrip().startswith("{")
