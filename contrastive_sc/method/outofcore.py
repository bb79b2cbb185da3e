"""Out-of-core training and embedding: counts are read a block of cells at a time.

A backed ``.h5ad`` (``anndata.read_h5ad(path, backed="r")``), or any sparse or dense count
matrix, is never densified as a whole:

* :func:`fit_preprocess_chunked` learns the same :class:`~contrastive_sc.method.preprocess.PreprocessState`
  as :func:`~contrastive_sc.method.preprocess.fit_preprocess` from three passes over row blocks (gene
  detection; library sizes and gene shares; per-gene sums of normalised and log-normalised
  values, from which scanpy's seurat dispersion ranking and the scaling statistics follow);
* :func:`preprocess_to_disk` writes the preprocessed float32 matrix (cells x kept genes) to a
  :class:`DiskMatrix`, from which :func:`~contrastive_sc.method.train.fit_encoder` reads shuffled
  mini-batches a window at a time;
* :func:`embed_chunked` and :func:`write_embedding` embed a block at a time.

It is also the one module that tells a backed AnnData from one in memory (:func:`is_backed`):
:class:`~contrastive_sc.method.model.ContrastiveSC` runs a single fit and embedding pipeline over what
:func:`fit_state`, :func:`preprocessed_rows`, :func:`preprocess_cells` and :func:`embed_cells`
give it for either container.

Memory grows with the block size, the batch size and the genes kept; what grows with the cells
is a few numbers per cell (library sizes, the epoch's permutation) and the embedding itself.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .preprocess import PreprocessState, _log_normalise, transform

log = logging.getLogger(__name__)

#: Cells read per block by the chunked passes (a CSR block of 10k cells x 2k genes is ~100 MB).
DEFAULT_CHUNK_SIZE = 10_000
#: scanpy's default number of mean bins for the seurat dispersion normalisation.
SEURAT_N_BINS = 20


# ---------------------------------------------------------------------------- reading blocks
def iter_row_blocks(counts, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[tuple[int, int, object]]:
    """Yield ``(start, stop, block)`` row blocks of a backed, sparse or dense matrix.

    A sparse block comes back as ``scipy.sparse.csr_matrix``, a dense one as an ndarray. A
    backed AnnData's ``X`` reads only the requested rows from disk.
    """
    if chunk_size < 1:
        msg = f"chunk_size must be a positive number of cells, got {chunk_size}"
        raise ValueError(msg)
    n_cells = counts.shape[0]
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        block = counts[start:stop]
        block = sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
        yield start, stop, block


def _as_csr32(block) -> sp.csr_matrix:
    return sp.csr_matrix(block, dtype=np.float32)


# ---------------------------------------------------------------------------- preprocessing
def fit_preprocess_chunked(counts, gene_names, *, n_genes: int | str = 500, min_cells: int = 2,
                           hvg_flavor: str = "seurat", clip: float | None = None,
                           chunk_size: int = DEFAULT_CHUNK_SIZE) -> PreprocessState:
    """:func:`~contrastive_sc.method.preprocess.fit_preprocess` computed from row blocks.

    Parameters
    ----------
    counts
        Cells x genes raw counts: a backed AnnData's ``X``, a scipy sparse matrix or an array.
    gene_names
        One name per column.
    n_genes, min_cells, clip
        As in ``fit_preprocess``.
    hvg_flavor
        Only ``"seurat"`` (the paper's) is computed from chunked sums.
    chunk_size
        Cells per block; bounds the memory of every pass.

    Returns
    -------
    The same state as ``fit_preprocess`` on the whole matrix, up to float rounding of the sums.
    """
    if hvg_flavor != "seurat":
        msg = (f"the chunked preprocessing computes only the 'seurat' dispersion ranking, got hvg_flavor={hvg_flavor!r}; "
               "load the data in memory for other flavors")
        raise ValueError(msg)
    gene_names = np.asarray(gene_names, dtype=str)
    n_cells, n_columns = counts.shape
    if n_columns != len(gene_names):
        msg = f"{len(gene_names)} gene names for a matrix of {n_columns} columns"
        raise ValueError(msg)

    # Pass 1: in how many cells each gene is detected.
    detected_in = np.zeros(n_columns, dtype=np.int64)
    for _, _, block in iter_row_blocks(counts, chunk_size):
        detected_in += np.asarray((_as_csr32(block) > 0).sum(axis=0)).ravel()
    keep = detected_in >= min_cells
    if keep.sum() < 2:
        msg = (f"only {int(keep.sum())} gene(s) are detected in >= {min_cells} cells; "
               "expected a count matrix with at least two expressed genes")
        raise ValueError(msg)
    library_genes = gene_names[keep]

    # Pass 2: library sizes over the kept genes (one float per cell) and each gene's share.
    totals = np.empty(n_cells, dtype=np.float32)  # float32 like the in-memory sums, for the same median
    gene_totals = np.zeros(int(keep.sum()), dtype=np.float64)
    for start, stop, block in iter_row_blocks(counts, chunk_size):
        block = _as_csr32(block)[:, keep]
        totals[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        gene_totals += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
    library_share = gene_totals / gene_totals.sum()
    target_sum = float(np.median(totals[totals > 0]))

    # Pass 3: per-gene sums and sums of squares of the normalised values (seurat dispersions are
    # computed on expm1 of the log data) and of the log-normalised ones (the scaling statistics).
    n_kept = len(library_genes)
    sums = {name: np.zeros(n_kept, dtype=np.float64) for name in ("norm", "norm_sq", "log", "log_sq")}
    for start, stop, block in iter_row_blocks(counts, chunk_size):
        lognorm = _log_normalise(_as_csr32(block)[:, keep], totals[start:stop], target_sum)
        norm = np.expm1(lognorm.data)  # float32, as scanpy's expm1 of the float32 log matrix
        _add_column_sums(sums["norm"], sums["norm_sq"], norm, lognorm.indices)
        _add_column_sums(sums["log"], sums["log_sq"], lognorm.data, lognorm.indices)

    if n_genes == "all" or int(n_genes) >= n_kept:
        chosen = np.arange(n_kept)
    else:
        mean, var = _mean_var(sums["norm"], sums["norm_sq"], n_cells)
        chosen = seurat_top_genes(mean, var, int(n_genes))
    if n_cells > 1:
        mean, var = _mean_var(sums["log"][chosen], sums["log_sq"][chosen], n_cells)
        std = np.sqrt(np.maximum(var, 0.0))
    else:
        mean, std = sums["log"][chosen] / n_cells, np.ones(len(chosen))
    return PreprocessState.from_arrays(library_genes[chosen], mean, std, target_sum=target_sum,
                                       library_genes=library_genes, library_share=library_share, clip=clip,
                                       n_cells_fit=n_cells)


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


# ---------------------------------------------------------------------------- on-disk matrix
class DiskMatrix:
    """A float32 ``(rows, cols)`` matrix in a raw file, read by row slices or gathered rows.

    Reads go through a read-only memory map whose pages are released after each read, so
    resident memory stays at what one read returns (the file stays in the page cache, which the
    kernel reclaims as needed). Use as a context manager, or call :meth:`close`.

    Parameters
    ----------
    path
        The raw file (C order, float32, no header).
    shape
        ``(rows, cols)``.
    delete
        Remove the file on :meth:`close`.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, path: str | Path, shape: tuple[int, int], *, delete: bool = False) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.delete = delete
        expected = self.shape[0] * self.shape[1] * self.dtype.itemsize
        size = self.path.stat().st_size
        if size != expected:
            msg = f"{self.path} holds {size} bytes; expected {expected} for a float32 matrix of shape {self.shape}"
            raise ValueError(msg)
        self._file = self.path.open("rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if expected else None
        self._array = (np.frombuffer(self._map, dtype=self.dtype).reshape(self.shape) if expected
                       else np.zeros(self.shape, dtype=self.dtype))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            msg = f"a DiskMatrix is read by row slices or take_rows(indices), got {type(rows).__name__}"
            raise TypeError(msg)
        out = np.array(self._array[rows])
        self._release()
        return out

    def take_rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` in the order given, read in one sorted pass."""
        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), self.shape[1]), dtype=self.dtype)
        out[order] = self._array[indices[order]]
        self._release()
        return out

    def _release(self) -> None:
        # Drop this process's mapping of the pages just read: they leave the resident set
        # (the page cache keeps them), so RSS does not grow towards the file size.
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Unmap and close the file (and delete it when ``delete``)."""
        self._array = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if not self._file.closed:
            self._file.close()
        if self.delete:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> DiskMatrix:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def preprocess_to_disk(counts, gene_names, state: PreprocessState, *, path: str | Path | None = None,
                       directory: str | Path | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DiskMatrix:
    """Write :func:`~contrastive_sc.method.preprocess.transform` of ``counts`` to disk, a block at a time.

    Parameters
    ----------
    counts, gene_names, state
        As in ``transform``; ``counts`` may be a backed AnnData's ``X``.
    path
        Output file; by default a temporary file (in ``directory``) deleted when the returned
        matrix is closed.
    directory
        Folder of the temporary file (default: the system's temporary folder).
    chunk_size
        Cells per block.

    Returns
    -------
    A :class:`DiskMatrix` of shape ``(cells, state.n_genes)``.
    """
    delete = path is None
    if path is None:
        handle, name = tempfile.mkstemp(prefix="contrastive_sc_", suffix=".f32", dir=directory)
        os.close(handle)
        path = Path(name)
    path = Path(path)
    try:
        with path.open("wb") as out:
            for _, _, block in iter_row_blocks(counts, chunk_size):
                out.write(transform(block, gene_names, state).tobytes())
    except BaseException:
        if delete:
            path.unlink(missing_ok=True)
        raise
    return DiskMatrix(path, (counts.shape[0], state.n_genes), delete=delete)


# ---------------------------------------------------------------------------- embedding
def embed_in_batches(embed_rows: Callable[[np.ndarray], np.ndarray], x, n_outputs: int,
                     batch_size: int = 65536) -> np.ndarray:
    """The one loop over preprocessed rows: ``embed_rows`` on slices of ``x``, concatenated.

    ``x`` is an array or any matrix with ``shape`` and row slices (a :class:`DiskMatrix`), so
    only one batch of input is in memory at a time; torch (:func:`~contrastive_sc.method.train.encode`)
    and onnxruntime (:class:`~contrastive_sc.serve.onnx_io.OnnxEncoder`) both embed through it.
    """
    parts = [embed_rows(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, n_outputs), dtype=np.float32)


def _embedder(encoder) -> Callable[[np.ndarray], np.ndarray]:
    # A torch ContrastiveEncoder or an onnx_io.OnnxEncoder (which is already a callable on arrays).
    if hasattr(encoder, "session"):
        return encoder
    from .train import encode

    return lambda x: encode(encoder, x)


def embed_chunked(encoder, counts, gene_names, state: PreprocessState, *,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """Embedding ``(cells, dims)`` of raw counts, preprocessed and embedded a block at a time."""
    run = _embedder(encoder)
    parts = [run(transform(block, gene_names, state)) for _, _, block in iter_row_blocks(counts, chunk_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def write_embedding(encoder, counts, gene_names, state: PreprocessState, path: str | Path, *,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> Path:
    """Write the embedding of raw counts to an ``.npy`` file a block at a time (read it with ``np.load``).

    Only one block of counts and of embedding is in memory at any time, whatever the number of cells.
    """
    run = _embedder(encoder)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        header_at = out.tell()
        n_written, dims = 0, None
        for _, _, block in iter_row_blocks(counts, chunk_size):
            z = np.ascontiguousarray(run(transform(block, gene_names, state)), dtype="<f4")
            if dims is None:
                dims = z.shape[1]
                _write_npy_header(out, (counts.shape[0], dims))
            out.write(z.tobytes())
            n_written += len(z)
        if dims is None:  # no cells: an empty (0, 0) array
            out.seek(header_at)
            _write_npy_header(out, (0, 0))
    return path


def _write_npy_header(out, shape: tuple[int, int]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)


# ---------------------------------------------------------------------------- cell sources
# The one place that tells a backed AnnData from one in memory: the model asks these functions
# for a preprocessing fit, the preprocessed rows and the embedding, and runs one pipeline on them.
def is_backed(adata) -> bool:
    """Whether ``adata`` is a backed AnnData whose counts stay on disk."""
    return bool(getattr(adata, "isbacked", False))


def fit_state(adata, *, n_genes: int | str, min_cells: int, hvg_flavor: str,
              clip: float | None = None) -> PreprocessState:
    """The preprocessing state of ``adata``'s counts, from block statistics whatever holds them.

    :func:`fit_preprocess_chunked` picks scanpy's seurat genes and statistics (tests compare it
    with :func:`~contrastive_sc.method.preprocess.fit_preprocess`, which runs scanpy itself; on the
    ten development datasets, for 500 and 2,000 genes, clipped or not, the two give the same genes
    and the same float32 encoder input to the last bit). Other ``hvg_flavor`` values have no
    block-statistics version: they run scanpy, in memory only.
    """
    if is_backed(adata) or hvg_flavor == "seurat":
        return fit_preprocess_chunked(adata.X, adata.var_names, n_genes=n_genes, min_cells=min_cells,
                                      hvg_flavor=hvg_flavor, clip=clip)
    from .preprocess import fit_preprocess

    return fit_preprocess(adata.X, adata.var_names, n_genes=n_genes, min_cells=min_cells, hvg_flavor=hvg_flavor,
                          clip=clip)


@contextmanager
def preprocessed_rows(adata, state: PreprocessState, *, directory: str | Path | None = None) -> Iterator:
    """The encoder's input for every cell, for the time of a fit.

    An array in memory; for a backed AnnData a :class:`DiskMatrix` in a temporary file (in
    ``directory``), deleted afterwards. Both have ``shape``, ``len`` and row slices, which is all
    training, the PCA block and the reference clusters read.
    """
    if not is_backed(adata):
        yield transform(adata.X, adata.var_names, state)
        return
    with preprocess_to_disk(adata.X, adata.var_names, state, directory=directory) as x:
        log.info("preprocessed %d cells x %d genes to %s", x.shape[0], x.shape[1], x.path)
        yield x


def preprocess_cells(adata, state: PreprocessState) -> np.ndarray:
    """The encoder's input ``(cells, genes)`` float32 in memory, a backed file read a block at a time."""
    if not is_backed(adata):
        return transform(adata.X, adata.var_names, state)
    blocks = [transform(block, adata.var_names, state) for _, _, block in iter_row_blocks(adata.X)]
    return np.concatenate(blocks) if blocks else np.zeros((0, state.n_genes), dtype=np.float32)


def embed_cells(encoder, adata, state: PreprocessState) -> np.ndarray:
    """The embedding of every cell; a backed file never holds more than a block of preprocessed rows."""
    if is_backed(adata):
        return embed_chunked(encoder, adata.X, adata.var_names, state)
    return _embedder(encoder)(transform(adata.X, adata.var_names, state))


def first_cells(adata, n_cells: int):
    """``adata``'s first ``n_cells`` cells when backed (enough for a check), else ``adata`` itself."""
    return adata[: min(adata.n_obs, n_cells)] if is_backed(adata) else adata
