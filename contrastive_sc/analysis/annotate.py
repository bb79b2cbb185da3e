"""Cell-type annotation from an annotated reference, with confidence and unseen types.

A model trained with labels keeps the centroid of each cell type in the embedding and a sample
of its training cells. A new cell takes the type of the nearest centroid. Whether it looks like
that type at all is judged by its mean distance to its ``k`` nearest reference cells: its
confidence is the share of the type's training cells that lie farther from their own ``k``
nearest neighbours (1: as typical as the densest training cells, 0: farther out than every one).
A cell whose confidence falls below ``min_confidence`` is unlike every reference type and is
called :data:`UNASSIGNED`. The rule is calibrated on the training cells alone: with the default
0.05, 5 % of a known type's own training cells would be unassigned.

The nearest centroid names types better than a kNN vote when some types have only a handful of
training cells (a vote drowns them), and the neighbour distance separates unseen types better
than the distance to the centroid, which large, spread-out types make lenient (measured on the
Baron pancreas donors: docs/annotation.md).

Only numpy here: the served model (onnxruntime, no torch) annotates with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNASSIGNED = "unassigned"
#: Default ``min_confidence``: a cell whose neighbourhood is sparser than that of 95 % of its
#: type's training cells is unassigned.
DEFAULT_MIN_CONFIDENCE = 0.05
#: Reference cells whose distances judge novelty.
DEFAULT_NEIGHBOURS = 15
#: Training cells kept as the neighbour reference (a random sample above this).
REFERENCE_SAMPLE = 5000
#: Resolution of the stored distance distribution of each type (quantiles at 0, 0.5, ..., 100 %).
_LEVELS = np.linspace(0.0, 1.0, 201)
#: Query cells per block of the brute-force neighbour search (bounds the distance matrix).
_BLOCK = 2048


@dataclass(frozen=True)
class CellTypeAnnotator:
    """What a model keeps to name new cells by the labels it was trained with.

    Parameters
    ----------
    names
        Cell-type names, one per centroid.
    centroids
        ``(types, embedding_dim)`` centroids of the training cells of each type.
    cells
        ``(n, embedding_dim)`` embedded training cells (a sample) for the neighbour distance.
    distance_quantiles
        ``(types, levels)`` quantiles of the training cells' mean distance to their ``k`` nearest
        reference cells, per type the cell is assigned to.
    n_neighbors
        ``k``.
    min_confidence
        Default threshold under which a cell is :data:`UNASSIGNED`.
    label_key
        The ``obs`` column the labels came from (recorded for provenance).
    """

    names: tuple[str, ...]
    centroids: np.ndarray
    cells: np.ndarray
    distance_quantiles: np.ndarray
    n_neighbors: int = DEFAULT_NEIGHBOURS
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    label_key: str = ""

    def __post_init__(self) -> None:
        n_types = len(self.names)
        if self.centroids.ndim != 2 or self.centroids.shape[0] != n_types:
            msg = f"expected {n_types} centroids (one per type), got an array of shape {self.centroids.shape}"
            raise ValueError(msg)
        if self.cells.ndim != 2 or self.cells.shape[1] != self.centroids.shape[1]:
            msg = f"reference cells of shape {self.cells.shape} do not match centroids of width {self.centroids.shape[1]}"
            raise ValueError(msg)
        if self.distance_quantiles.shape != (n_types, len(_LEVELS)):
            msg = f"expected distance quantiles of shape {(n_types, len(_LEVELS))}, got {self.distance_quantiles.shape}"
            raise ValueError(msg)
        if not 1 <= int(self.n_neighbors) < len(self.cells):
            msg = f"n_neighbors must be within [1, {len(self.cells) - 1}], got {self.n_neighbors}"
            raise ValueError(msg)
        _check_min_confidence(self.min_confidence)

    @property
    def embedding_dim(self) -> int:
        return int(self.centroids.shape[1])

    @classmethod
    def fit(cls, embedding: np.ndarray, labels, *, n_neighbors: int = DEFAULT_NEIGHBOURS,
            min_confidence: float = DEFAULT_MIN_CONFIDENCE, label_key: str = "", seed: int = 0) -> CellTypeAnnotator:
        """Calibrate on the training cells' embedding and their labels.

        Raises
        ------
        ValueError
            When the shapes disagree, labels are missing, there is a single type, or too few cells.
        """
        embedding = np.asarray(embedding, dtype=np.float32)
        labels = np.asarray(labels)
        if embedding.ndim != 2 or embedding.shape[0] != labels.shape[0]:
            msg = f"expected one label per embedded cell, got {labels.shape[0]} labels for {embedding.shape[0]} cells"
            raise ValueError(msg)
        text = labels.astype(str)
        missing = (text == "nan") | (text == "None") | (text == "")
        if missing.any():
            msg = f"{int(missing.sum())} cell(s) have no label in {label_key or 'the labels'}; drop them or label them"
            raise ValueError(msg)
        names = np.unique(text)
        if len(names) < 2:
            msg = f"an annotated reference needs at least 2 cell types, got {list(names)}"
            raise ValueError(msg)
        if UNASSIGNED in names:
            msg = f"{UNASSIGNED!r} is reserved for cells unlike every type; rename that label"
            raise ValueError(msg)
        if len(embedding) <= n_neighbors:
            msg = f"an annotated reference with n_neighbors={n_neighbors} needs more than {n_neighbors} cells"
            raise ValueError(msg)
        centroids = np.stack([embedding[text == name].mean(axis=0) for name in names])
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(embedding), REFERENCE_SAMPLE, replace=False)) \
            if len(embedding) > REFERENCE_SAMPLE else np.arange(len(embedding))
        cells = embedding[keep]
        # Leave-one-out for the kept cells: a cell is not its own neighbour.
        distance = _mean_neighbour_distance(embedding, cells, n_neighbors, exclude=keep)
        # Calibrate per type the rule will assign (nearest centroid), as new cells will be judged.
        assigned = _nearest(embedding, centroids)
        quantiles = np.stack([
            np.quantile(distance[assigned == t], _LEVELS) if (assigned == t).any() else np.full(len(_LEVELS), np.inf)
            for t in range(len(names))
        ])
        return cls(tuple(names), centroids.astype(np.float32), cells, quantiles.astype(np.float32), int(n_neighbors),
                   float(min_confidence), label_key)

    def annotate(self, embedding: np.ndarray, min_confidence: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cell type (or :data:`UNASSIGNED`) and confidence in [0, 1] of each embedded cell."""
        threshold = self.min_confidence if min_confidence is None else _check_min_confidence(min_confidence)
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.ndim != 2 or embedding.shape[1] != self.embedding_dim:
            msg = f"expected an embedding of width {self.embedding_dim}, got shape {embedding.shape}"
            raise ValueError(msg)
        nearest = _nearest(embedding, self.centroids)
        distance = _mean_neighbour_distance(embedding, self.cells, self.n_neighbors)
        confidence = np.empty(len(nearest), dtype=np.float64)
        for t in np.unique(nearest):
            rows = nearest == t
            confidence[rows] = 1.0 - np.interp(distance[rows], self.distance_quantiles[t], _LEVELS)
        types = np.asarray(self.names, dtype=object)[nearest]
        types[confidence < threshold] = UNASSIGNED
        return types, confidence

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, model_id: str = "") -> Path:
        """Write the reference as one ``.npz`` (read back without pickle, torch or scanpy)."""
        with open(path, "wb") as handle:  # np.savez on a str path would append ".npz"
            np.savez(handle, names=np.asarray(self.names, dtype=str), centroids=self.centroids, cells=self.cells,
                     distance_quantiles=self.distance_quantiles, n_neighbors=self.n_neighbors,
                     min_confidence=self.min_confidence, label_key=self.label_key, model_id=model_id)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CellTypeAnnotator:
        """Read a reference written by :meth:`save`; a malformed file is named in the error."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(tuple(map(str, data["names"])), data["centroids"].astype(np.float32),
                           data["cells"].astype(np.float32), data["distance_quantiles"].astype(np.float32),
                           int(data["n_neighbors"]), float(data["min_confidence"]), str(data["label_key"]))
        except (KeyError, TypeError, ValueError, OSError) as error:
            msg = f"{str(path)!r} is not a valid cell-type reference: {error}"
            raise ValueError(msg) from None


def _nearest(embedding: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    # |a-b|^2 = |a|^2 - 2ab + |b|^2 (|a|^2 is the same for every centroid): one matrix product.
    return (-2 * embedding @ centroids.T + (centroids**2).sum(axis=1)).argmin(axis=1)


def _mean_neighbour_distance(queries: np.ndarray, cells: np.ndarray, k: int, *,
                             exclude: np.ndarray | None = None) -> np.ndarray:
    """Mean Euclidean distance of each query to its ``k`` nearest ``cells``.

    ``exclude[j] = i`` says that ``cells[j]`` is ``queries[i]`` itself (leave-one-out).
    """
    out = np.empty(len(queries), dtype=np.float64)
    cell_norms = (cells.astype(np.float64) ** 2).sum(axis=1)
    owner = np.full(len(queries), -1, dtype=np.int64)
    if exclude is not None:
        owner[exclude] = np.arange(len(exclude))
    for start in range(0, len(queries), _BLOCK):
        block = queries[start:start + _BLOCK].astype(np.float64)
        squared = (block**2).sum(axis=1, keepdims=True) - 2 * block @ cells.T.astype(np.float64) + cell_norms
        rows = np.nonzero(owner[start:start + _BLOCK] >= 0)[0]
        squared[rows, owner[start:start + _BLOCK][rows]] = np.inf
        nearest = np.partition(squared, k - 1, axis=1)[:, :k]
        out[start:start + _BLOCK] = np.sqrt(np.maximum(nearest, 0.0)).mean(axis=1)
    return out


def _check_min_confidence(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not 0.0 <= float(value) <= 1.0:
        msg = f"min_confidence must be a number within [0, 1], got {value!r}"
        raise ValueError(msg)
    return float(value)
