"""Checks that a matrix holds raw counts; shared by the readers and the served model."""

from __future__ import annotations

import numpy as np


def check_count_values(values: np.ndarray, *, what: str) -> None:
    """Raise a ``ValueError`` if ``values`` hold anything but finite non-negative integers."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.number):
        msg = f"{what} must be numeric, got dtype {values.dtype}"
        raise ValueError(msg)
    if values.size == 0:
        return
    bad = ~np.isfinite(values)
    if bad.any():
        msg = f"{what} holds {int(bad.sum())} NaN/inf value(s); expected finite raw counts"
        raise ValueError(msg)
    if (values < 0).any():
        msg = f"{what} holds {int((values < 0).sum())} negative value(s) (min {values.min():g}); expected raw counts >= 0"
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
