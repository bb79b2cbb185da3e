"""Checks that a matrix holds raw counts; shared by the readers, the model and the served model."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: Largest count a float64 holds exactly; a larger "count" is corrupt data, not a measurement.
MAX_COUNT = 2**53


def check_count_values(values: np.ndarray, *, what: str, rows=None, columns=None) -> None:
    """Raise a ``ValueError`` if ``values`` hold anything but finite non-negative integers.

    Parameters
    ----------
    values
        A cells x genes matrix.
    what
        How the message names the matrix (``"input"``, a file name).
    rows, columns
        Optional cell and gene names, to point at the first bad entry.
    """
    values = np.asarray(values)
    if values.dtype == np.bool_:
        msg = f"{what} holds true/false values; expected raw counts (integers >= 0)"
        raise ValueError(msg)
    if not np.issubdtype(values.dtype, np.number):
        msg = f"{what} must be numeric, got dtype {values.dtype}"
        raise ValueError(msg)
    if values.size == 0 or _all_counts(values):
        return

    def where(mask) -> str:
        if values.ndim != 2:
            return ""
        i, j = np.argwhere(mask)[0]
        cell = rows[i] if rows is not None else i
        gene = columns[j] if columns is not None else j
        return f" (first at cell {cell!s}, gene {gene!s})"

    missing = np.isnan(values) if np.issubdtype(values.dtype, np.floating) else np.zeros(values.shape, bool)
    if missing.any():
        msg = (f"{what} holds {int(missing.sum())} missing (null/NaN) value(s){where(missing)}; "
               "expected a count in every cell")
        short = _short_rows(missing)
        if short:
            i, n_values = short
            cell = rows[i] if rows is not None else i
            msg += (f"; cell {cell!s} has {n_values} value(s) for {values.shape[1]} columns: every row must have "
                    "one value per column")
        raise ValueError(msg)
    infinite = ~np.isfinite(values)
    if infinite.any():
        msg = f"{what} holds {int(infinite.sum())} infinite value(s){where(infinite)}; expected finite raw counts"
        raise ValueError(msg)
    if (values < 0).any():
        msg = (f"{what} holds {int((values < 0).sum())} negative value(s) (min {values.min():g}){where(values < 0)}; "
               "expected raw counts >= 0")
        raise ValueError(msg)
    huge = values > MAX_COUNT
    if huge.any():
        msg = f"{what} holds {int(huge.sum())} value(s) above {MAX_COUNT} (max {values.max():g}){where(huge)}; not a count"
        raise ValueError(msg)
    if np.issubdtype(values.dtype, np.floating):
        frac = np.abs(values - np.round(values)) > 1e-6
        if frac.any():
            example = values[frac][0]
            msg = (
                f"{what} holds {int(frac.sum())} non-integer value(s) (e.g. {example:g}); expected raw "
                "integer counts, not normalised or log-transformed data. Pass the raw counts "
                "(often in adata.raw or adata.layers['counts'])"
            )
            raise ValueError(msg)


def _all_counts(values: np.ndarray) -> bool:
    """Whether every value is a finite integer in ``[0, MAX_COUNT]``, in a few vectorised passes.

    The happy path of :func:`check_count_values`: the per-problem counts and positions of its
    messages cost several passes each, so they are only computed once this says something is wrong.
    """
    low, high = values.min(), values.max()  # NaN propagates into both, and fails the comparisons
    if not (low >= 0 and high <= MAX_COUNT):
        return False
    if not np.issubdtype(values.dtype, np.floating):
        return True
    return bool((np.trunc(values) == values).all())


def _short_rows(missing: np.ndarray) -> tuple[int, int] | None:
    """``(row, values)`` of the first row whose missing entries are exactly its last columns.

    A JSON ``dataframe_split`` row shorter than its ``columns`` list reaches the model padded
    with NaN at the end; naming it beats a bare "NaN" message.
    """
    if missing.ndim != 2:
        return None
    for i in np.flatnonzero(missing.any(axis=1)):
        n_present = int((~missing[i]).sum())
        if missing[i, n_present:].all():
            return int(i), n_present
    return None


def validate_counts(adata) -> None:
    """Check that ``adata.X`` looks like a raw count matrix with unique gene names.

    Raises
    ------
    ValueError
        For an empty matrix, duplicated gene names, NaN/inf, negative or non-integer values.
    """
    n_cells, n_genes = adata.shape
    if n_cells == 0 or n_genes == 0:
        msg = f"empty count matrix: got {n_cells} cells x {n_genes} genes; expected at least one of each"
        raise ValueError(msg)
    dup = adata.var_names[adata.var_names.duplicated()]
    if len(dup):
        msg = (
            f"{len(dup)} duplicated gene name(s), e.g. {list(dup[:5])}; gene names must be unique. "
            "Fix: adata.var_names_make_unique() or sum the duplicated columns"
        )
        raise ValueError(msg)
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    check_count_values(values, what="count matrix")
