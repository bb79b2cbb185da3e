"""What the model reads from an AnnData: where the raw counts are, and which columns hold labels and batches.

A :class:`DataSetup` is recorded when a model is fitted (scvi-tools' ``setup_anndata``) and applied
and checked on every later call, so that a layer given to ``fit`` is never forgotten by ``embed``:
the counts are read from the same layer (or ``adata.raw``), and they must be raw counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .rows import Rows, as_rows
from .validation import validate_counts

#: ``layer`` value that means ``adata.raw``.
RAW_LAYER = "raw"
#: Cells whose counts are checked on each call (the first ones; enough to tell counts from
#: normalised values, and the same rule whatever holds the cells).
CHECKED_CELLS = 20_000


@dataclass(frozen=True)
class DataSetup:
    """Where a model finds its inputs in an AnnData.

    Parameters
    ----------
    layer
        ``adata.layers`` key holding the raw counts, ``"raw"`` for ``adata.raw``, or ``None``
        for ``adata.X``.
    label_key
        ``obs`` column with cell types (the model then names new cells by them).
    batch_key
        ``obs`` column with the sample or batch of each cell.
    """

    layer: str | None = None
    label_key: str | None = None
    batch_key: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> DataSetup:
        return cls(**{k: v for k, v in (values or {}).items() if k in ("layer", "label_key", "batch_key")})

    def read(self, adata) -> Cells:
        """Everything a fit reads from ``adata``: raw counts (checked), genes, labels and batches.

        Raises
        ------
        KeyError
            When the layer, the label column or the batch column is missing.
        ValueError
            When the values are not raw counts.
        """
        labels, batches = self.labels(adata), self.batches(adata)
        view = counts_view(adata, self.layer)
        counts, genes = self._checked(view)
        return Cells(self, counts, genes, labels, batches, view)

    def counts(self, adata) -> tuple[Rows, np.ndarray]:
        """The raw counts of ``adata`` as rows, and their gene names, checked to be raw counts.

        Raises
        ------
        KeyError
            When the layer is missing; the message lists the layers ``adata`` has.
        ValueError
            When the values are not raw counts (normalised or log-transformed, negative, NaN).
        """
        return self._checked(counts_view(adata, self.layer))

    def _checked(self, counts) -> tuple[Rows, np.ndarray]:
        where = f"layers[{self.layer!r}]" if self.layer not in (None, RAW_LAYER) else (
            "adata.raw" if self.layer == RAW_LAYER else "adata.X")
        try:
            validate_counts(counts[: min(counts.n_obs, CHECKED_CELLS)])
        except ValueError as error:
            hint = "" if self.layer is not None else "; pass layer=... naming the layer with raw counts"
            msg = f"{where}: {error}{hint}"
            raise ValueError(msg) from None
        return as_rows(counts.X), np.asarray(counts.var_names, dtype=str)

    def labels(self, adata) -> np.ndarray | None:
        """The cell type of each cell as text, or ``None`` without ``label_key``."""
        return self._column(adata, self.label_key, "label")

    def batches(self, adata) -> np.ndarray | None:
        """The batch of each cell as text, or ``None`` without ``batch_key``."""
        return self._column(adata, self.batch_key, "batch")

    @staticmethod
    def _column(adata, key: str | None, what: str) -> np.ndarray | None:
        if key is None:
            return None
        if key not in adata.obs:
            msg = f"{what} key {key!r} not found in obs; available columns: {list(adata.obs.columns)}"
            raise KeyError(msg)
        return np.asarray(adata.obs[key].astype(str))


@dataclass(frozen=True)
class Cells:
    """The cells of an AnnData as a fit reads them (:meth:`DataSetup.read`).

    Attributes
    ----------
    setup
        Where they were read from.
    counts
        Raw counts as rows, checked.
    genes
        One name per column of ``counts``.
    labels, batches
        Cell type and batch of each cell as text, or ``None``.
    view
        The AnnData with these counts in ``X`` (for marker genes and the dataset's record).
    """

    setup: DataSetup
    counts: Rows
    genes: np.ndarray
    labels: np.ndarray | None
    batches: np.ndarray | None
    view: object

    @property
    def shape(self) -> tuple[int, int]:
        return self.counts.shape


def counts_view(adata, layer: str | None = None):
    """``adata`` with its raw counts in ``X``: from ``layers[layer]``, ``adata.raw`` (``"raw"``) or ``X``.

    The result shares ``obs`` with ``adata``; with ``"raw"`` the genes are ``adata.raw``'s.

    Raises
    ------
    KeyError
        When the layer (or ``adata.raw``) does not exist; the message lists what does.
    """
    import anndata as ad

    if layer is None:
        return adata
    if getattr(adata, "isbacked", False):
        msg = "layer= is not supported for a backed AnnData; write the counts to X of the .h5ad instead"
        raise ValueError(msg)
    if layer == RAW_LAYER:
        if adata.raw is None:
            msg = f"layer 'raw' asked for, but this AnnData has no .raw; its layers are {list(adata.layers)}"
            raise KeyError(msg)
        view = ad.AnnData(X=adata.raw.X, obs=adata.obs, var=adata.raw.var.copy(), uns=adata.uns)
    elif layer in adata.layers:
        view = ad.AnnData(X=adata.layers[layer], obs=adata.obs, var=adata.var.copy(), uns=adata.uns)
    else:
        has_raw = " and .raw (layer 'raw')" if adata.raw is not None else ""
        msg = f"layer {layer!r} not found; this AnnData has layers {list(adata.layers)}{has_raw}"
        raise KeyError(msg)
    view.obsm.update(adata.obsm)
    return view
