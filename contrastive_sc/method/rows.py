"""Rows of a cells x genes matrix, read a block or a selection at a time wherever they are held.

Every step after the reader — the preprocessing fit, training, the PCA block, embedding — reads
cells through one small interface, :class:`Rows`: ``shape``, ``blocks(size)``, ``take(indices)``
and ``to_memory()``, plus ``store(blocks)``, which keeps new rows (the preprocessed input) where
such rows belong (in memory for cells in memory, in a temporary file for cells on disk).
:func:`as_rows` wraps what holds the cells:

* :class:`InMemoryRows`: a numpy array or a scipy sparse matrix;
* :class:`BackedRows`: the ``X`` of a backed AnnData (``anndata.read_h5ad(path, backed="r")``),
  read from disk a block at a time and never loaded whole;
* :class:`DiskMatrix`: a float32 matrix in a raw file (the preprocessed rows of a backed
  AnnData), memory-mapped and released after each read.

No other module asks which of these it has: a rule that must depend on the data (the PCA sample,
whether training keeps the whole input on the device) depends on the number of cells, never on
the container. Memory grows with the block size; what grows with the cells is a few numbers
per cell and the embedding itself.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

#: Cells read per block (a CSR block of 10k cells x 2k genes is ~100 MB).
DEFAULT_BLOCK_SIZE = 10_000


@runtime_checkable
class Rows(Protocol):
    """What every holder of cells offers: its shape, its rows a block at a time, and any rows by index."""

    shape: tuple[int, int]

    def blocks(self, size: int = DEFAULT_BLOCK_SIZE) -> Iterator[tuple[int, int, object]]:
        """Yield ``(start, stop, block)``: a CSR matrix for sparse data, else an ndarray."""

    def take(self, indices: np.ndarray):
        """Rows ``indices`` in the order given (a CSR matrix for sparse data, else an ndarray)."""

    def to_memory(self):
        """Every row as one in-memory matrix: the matrix itself when it is held in memory, else read once."""

    def store(self, blocks: Iterable[tuple[int, int, np.ndarray]], n_cols: int, *,
              directory: str | Path | None = None) -> Rows:
        """New rows of the same kind holding ``blocks`` (float32 ``(start, stop, rows x n_cols)``, in order).

        The kind follows the cells: in memory for rows held in memory, else a temporary file (in
        ``directory``). Use the result as a context manager: a temporary file is deleted on exit.
        """


def as_rows(matrix) -> Rows:
    """Wrap an array, a sparse matrix or a backed AnnData's ``X`` as :class:`Rows` (rows are returned as they are)."""
    if isinstance(matrix, InMemoryRows | BackedRows | DiskMatrix):
        return matrix
    if isinstance(matrix, np.ndarray) or sp.issparse(matrix):
        return InMemoryRows(matrix)
    if hasattr(matrix, "shape") and hasattr(matrix, "__getitem__") and len(matrix.shape) == 2:
        return BackedRows(matrix)
    return InMemoryRows(np.asarray(matrix))


def collect(fn: Callable[[object], np.ndarray], rows: Rows, n_cols: int, *,
            size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
    """The one loop over rows whose result is held in memory: ``fn`` on every block, concatenated.

    Embeddings are built this way (a few dozen floats per cell), by torch and by onnxruntime
    alike, so only one block of input is in memory at a time.
    """
    parts = [fn(block) for _, _, block in rows.blocks(size)]
    return np.concatenate(parts) if parts else np.zeros((0, n_cols), dtype=np.float32)


def _check_size(size: int) -> None:
    if size < 1:
        msg = f"the block size must be a positive number of cells, got {size}"
        raise ValueError(msg)


class _NoCleanup:
    # In-memory rows need nothing closed: `with rows.store(...) as x` works on every kind.
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def close(self) -> None:
        return None


class InMemoryRows(_NoCleanup):
    """Rows of a numpy array or a scipy sparse matrix (a sparse one is read as CSR)."""

    def __init__(self, matrix) -> None:
        if matrix.ndim != 2:
            msg = f"expected a (cells, genes) matrix, got shape {matrix.shape}"
            raise ValueError(msg)
        self.matrix = sp.csr_matrix(matrix) if sp.issparse(matrix) and not sp.isspmatrix_csr(matrix) else matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))

    def blocks(self, size: int = DEFAULT_BLOCK_SIZE) -> Iterator[tuple[int, int, object]]:
        _check_size(size)
        for start in range(0, self.shape[0], size):
            stop = min(start + size, self.shape[0])
            yield start, stop, self.matrix[start:stop]

    def take(self, indices: np.ndarray):
        return self.matrix[np.asarray(indices)]

    def to_memory(self):
        return self.matrix

    def store(self, blocks, n_cols: int, *, directory=None) -> InMemoryRows:
        out = np.empty((self.shape[0], n_cols), dtype=np.float32)
        for start, stop, block in blocks:
            out[start:stop] = block
        return InMemoryRows(out)


class BackedRows(_NoCleanup):
    """Rows of a backed AnnData's ``X`` (an HDF5 dataset or anndata's backed sparse matrix), read from disk."""

    def __init__(self, matrix) -> None:
        self.matrix = matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))

    def _read(self, rows):
        block = self.matrix[rows]
        return sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)

    def blocks(self, size: int = DEFAULT_BLOCK_SIZE) -> Iterator[tuple[int, int, object]]:
        _check_size(size)
        for start in range(0, self.shape[0], size):
            stop = min(start + size, self.shape[0])
            yield start, stop, self._read(slice(start, stop))

    def take(self, indices: np.ndarray):
        # HDF5 reads indices in increasing order: read sorted and unique, then put them in the order asked.
        indices = np.asarray(indices, dtype=np.int64)
        unique, position = np.unique(indices, return_inverse=True)
        return self._read(unique)[position]

    def to_memory(self):
        return self._read(slice(0, self.shape[0]))

    def store(self, blocks, n_cols: int, *, directory=None) -> DiskMatrix:
        return DiskMatrix.write(blocks, (self.shape[0], n_cols), directory=directory)


class DiskMatrix:
    """A float32 ``(rows, cols)`` matrix in a raw file, read by blocks or gathered rows.

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

    @classmethod
    def write(cls, blocks: Iterable[tuple[int, int, object]], shape: tuple[int, int], *,
              path: str | Path | None = None, directory: str | Path | None = None) -> DiskMatrix:
        """Write the blocks (``(start, stop, rows)`` in order) to a file, and open it.

        Without ``path`` the file is temporary (in ``directory``) and deleted when the matrix is closed.
        """
        delete = path is None
        if path is None:
            handle, name = tempfile.mkstemp(prefix="contrastive_sc_", suffix=".f32", dir=directory)
            os.close(handle)
            path = name
        path = Path(path)
        try:
            with path.open("wb") as out:
                for _, _, block in blocks:
                    out.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        except BaseException:
            if delete:
                path.unlink(missing_ok=True)
            raise
        return cls(path, shape, delete=delete)

    def __len__(self) -> int:
        return self.shape[0]

    def blocks(self, size: int = DEFAULT_BLOCK_SIZE) -> Iterator[tuple[int, int, np.ndarray]]:
        _check_size(size)
        for start in range(0, self.shape[0], size):
            stop = min(start + size, self.shape[0])
            out = np.array(self._array[start:stop])
            self._release()
            yield start, stop, out

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` in the order given, read in one sorted pass."""
        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), self.shape[1]), dtype=self.dtype)
        out[order] = self._array[indices[order]]
        self._release()
        return out

    def to_memory(self) -> np.ndarray:
        out = np.array(self._array)
        self._release()
        return out

    def store(self, blocks, n_cols: int, *, directory=None) -> DiskMatrix:
        return DiskMatrix.write(blocks, (self.shape[0], n_cols), directory=directory)

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
