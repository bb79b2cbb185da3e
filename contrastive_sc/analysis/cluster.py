"""Clustering of an embedding: KMeans, Leiden, KMeans with an estimated k, and the paper's Table 2 algorithms.

``cluster_labels`` works on arrays; ``cluster`` is its scanpy-style AnnData counterpart
(reads ``obsm[use_rep]``, writes ``obs[key_added]`` and ``uns[key_added]["params"]``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Methods that need the number of clusters.
NEEDS_K = frozenset({"kmeans", "birch", "gmm", "spectral", "ward"})
METHODS = ("kmeans", "leiden", "auto", "birch", "gmm", "meanshift", "spectral", "ward")
#: ``auto`` counts the Leiden communities at this resolution that hold at least this fraction of
#: the cells, and runs KMeans with that many clusters. Chosen on the six benchmark datasets (the
#: same values for all): Leiden at its ARI-best resolution merges small cell types, a finer one
#: also splits large ones, and counting only communities of a useful size undoes the splitting.
AUTO_RESOLUTION = 1.0
AUTO_MIN_FRACTION = 0.02


def cluster_labels(embedding: np.ndarray, method: str = "kmeans", *, n_clusters: int | None = None,
                   resolution: float = 1.0, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """Cluster the rows of ``embedding``.

    Parameters
    ----------
    embedding
        ``(cells, dims)`` array.
    method
        One of :data:`METHODS`; ``"auto"`` is KMeans with ``k`` from :func:`estimate_n_clusters`.
    n_clusters
        Number of clusters, required by the methods in :data:`NEEDS_K`.
    resolution, n_neighbors
        Leiden resolution and the size of the kNN graph it partitions (``auto`` uses
        ``n_neighbors`` and its own resolution, :data:`AUTO_RESOLUTION`).
    seed
        Random seed.

    Returns
    -------
    ``int64`` cluster index per cell.
    """
    if method not in _ALGORITHMS:
        msg = f"unknown clustering method {method!r}; expected one of {list(METHODS)}"
        raise ValueError(msg)
    embedding = np.asarray(embedding, dtype=np.float32)
    n_cells = embedding.shape[0]
    if method in NEEDS_K:
        if n_clusters is None:
            msg = f"method {method!r} needs n_clusters; pass it, or use 'auto' or 'leiden' when k is unknown"
            raise ValueError(msg)
        if not 1 <= int(n_clusters) <= n_cells:
            msg = f"n_clusters must be between 1 and the number of cells ({n_cells}), got {n_clusters}"
            raise ValueError(msg)
    elif n_cells < 2:
        msg = f"{method} needs at least 2 cells, got {n_cells}"
        raise ValueError(msg)
    options = {"n_clusters": n_clusters, "resolution": resolution, "n_neighbors": n_neighbors, "seed": seed}
    return np.asarray(_ALGORITHMS[method](embedding, **options), dtype=np.int64)


def estimate_n_clusters(embedding: np.ndarray, *, n_neighbors: int = 15, resolution: float = AUTO_RESOLUTION,
                        min_fraction: float = AUTO_MIN_FRACTION, seed: int = 0) -> int:
    """Number of clusters in ``embedding``, for when it is not known.

    The Leiden communities of the kNN graph at ``resolution`` that hold at least
    ``min_fraction`` of the cells. When none does (many types, all rarer than the floor),
    every community counts. Below ``1 / min_fraction`` cells (50) the floor is under one cell
    and every community counts too.

    Parameters
    ----------
    embedding
        ``(cells, dims)`` array.
    n_neighbors, resolution, seed
        Graph size, Leiden resolution and seed.
    min_fraction
        Smallest community, as a fraction of the cells, that counts as a cluster.
    """
    if not 0.0 <= min_fraction < 1.0:
        msg = f"min_fraction must be within [0, 1), got {min_fraction}"
        raise ValueError(msg)
    embedding = np.asarray(embedding, dtype=np.float32)
    communities = _leiden(embedding, resolution=resolution, n_neighbors=n_neighbors, seed=seed)
    sizes = np.bincount(communities)
    counted = int((sizes >= min_fraction * len(embedding)).sum())
    return counted or len(sizes)


def nearest_centroid(embedding: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest (Euclidean) centroid for each row, as KMeans assigns cells.

    Parameters
    ----------
    embedding
        ``(cells, dims)`` array.
    centroids
        ``(clusters, dims)`` array.
    """
    embedding = np.asarray(embedding, dtype=np.float32)
    centroids = np.asarray(centroids, dtype=np.float32)
    if embedding.ndim != 2 or centroids.ndim != 2 or embedding.shape[1] != centroids.shape[1]:
        msg = f"expected (cells, d) rows and (clusters, d) centroids, got {embedding.shape} and {centroids.shape}"
        raise ValueError(msg)
    # |e - c|^2 = |e|^2 - 2 e.c + |c|^2, and |e|^2 is the same for every centroid of a row.
    with _one_blas_thread():
        distance = embedding @ centroids.T
    distance *= -2.0
    distance += (centroids**2).sum(axis=1)
    return np.argmin(distance, axis=1).astype(np.int64)


_blas_lock = threading.Lock()


@contextlib.contextmanager
def _one_blas_thread():
    """Run a small matrix product on one BLAS thread.

    OpenBLAS splits even a 4,000 x 60 @ 60 x 8 product over its threads, which sleep between
    calls: on a busy two-core machine waking them took 20-40 ms a call, the product itself 0.2 ms
    on one thread (the served model's ``trained`` path calls this once per request). The lock
    keeps two threads from restoring each other's thread count.
    """
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with _blas_lock, controller.limit(limits=1, user_api="blas"):
        yield


@functools.cache
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController  # a scikit-learn dependency
    except ImportError:
        return None
    return ThreadpoolController()


@dataclass(frozen=True)
class TrainingClusters:
    """The clusters of a model's training cells, kept as centroids to label new cells consistently.

    New cells take the nearest centroid (as KMeans assigns), so every batch a model labels uses
    the same clusters instead of being re-clustered from scratch (the served ``trained`` method).

    Attributes
    ----------
    centroids
        ``(clusters, dims)`` float32 centroids in the embedding.
    """

    centroids: np.ndarray

    @classmethod
    def fit(cls, embedding: np.ndarray, *, n_clusters: int | None = None, n_neighbors: int = 15,
            seed: int = 0) -> TrainingClusters:
        """KMeans on the training embedding: with ``n_clusters`` when set, else with an estimated k (``auto``).

        KMeans (not Leiden) because its clusters are what nearest-centroid labelling assumes:
        compact, one centroid each.
        """
        if n_clusters:
            labels = cluster_labels(embedding, "kmeans", n_clusters=n_clusters, seed=seed)
        else:
            labels = cluster_labels(embedding, "auto", n_neighbors=n_neighbors, seed=seed)
        centroids = np.stack([embedding[labels == c].mean(axis=0) for c in np.unique(labels)])
        return cls(centroids.astype(np.float32))

    def assign(self, embedding: np.ndarray) -> np.ndarray:
        """The nearest centroid of each embedded cell."""
        return nearest_centroid(embedding, self.centroids)


def cluster(adata, method: str = "kmeans", *, use_rep: str = "X_contrastive", key_added: str | None = None,
            copy: bool = False, **params):
    """Cluster ``adata.obsm[use_rep]`` and store labels in ``obs[key_added]``.

    ``key_added`` defaults to ``"contrastive_<method>"``; the parameters are recorded in
    ``uns[key_added]["params"]``. Returns the AnnData when ``copy=True``, else ``None``.
    """
    import pandas as pd

    adata = adata.copy() if copy else adata
    if use_rep not in adata.obsm:
        msg = f"obsm[{use_rep!r}] not found; run model.embed(adata) first or pass use_rep (have {list(adata.obsm)})"
        raise KeyError(msg)
    key = key_added or f"contrastive_{method}"
    labels = cluster_labels(adata.obsm[use_rep], method, **params)
    adata.obs[key] = pd.Categorical(labels.astype(str), categories=[str(c) for c in np.unique(labels)])
    # auto has its own resolution (AUTO_RESOLUTION): a resolution passed with it is not recorded
    used = {k: v for k, v in params.items() if v is not None and not (method == "auto" and k == "resolution")}
    adata.uns[key] = {"params": {"method": method, "use_rep": use_rep, **used}}
    return adata if copy else None


#: Up to this many cells the neighbours are exact (scikit-learn), above it approximate (pynndescent,
#: 97-99 % of the exact neighbours). Once compiled, pynndescent is the faster from about 20,000 cells
#: (110-d embeddings, 15 or 30 neighbours), but its numba compilation costs 1-2 minutes in each new
#: process on a two-core machine, more than exact search takes up to about 50,000 cells.
APPROXIMATE_NEIGHBORS_CELLS = 50_000


def knn_graph(embedding: np.ndarray, n_neighbors: int = 15, *, weighted: bool = False):
    """Symmetric kNN graph as an igraph ``Graph``: an edge wherever one cell is among the other's neighbours.

    Neighbours are exact up to :data:`APPROXIMATE_NEIGHBORS_CELLS` cells, approximate above
    (pynndescent, called directly: scanpy's wrapper crashes on some inputs, see docs/architecture.md).

    Parameters
    ----------
    embedding
        ``(cells, dims)`` array.
    n_neighbors
        Neighbours per cell, the cell itself not counted.
    weighted
        Give the edges scanpy's connectivities as edge attribute ``"weight"``: UMAP's fuzzy
        simplicial set, where a cell's nearest neighbour weighs 1, farther ones less, and an
        edge seen from both ends is the fuzzy union ``a + b - ab`` (every weight in (0, 1]).
        Off for clustering: on the ten benchmark datasets Leiden on this graph found more,
        smaller communities at the same resolution and lost 0.02 ARI (docs/scale.md, Leiden at scale).
    """
    import igraph as ig
    from scipy import sparse

    embedding = np.asarray(embedding, dtype=np.float32)
    n_cells = embedding.shape[0]
    indices, distances = _neighbours(embedding, min(n_neighbors, n_cells - 1))
    if weighted:
        sigmas, rhos = _smooth_knn_dist(distances)
        # Membership strength of each directed edge: 1 up to the nearest neighbour's distance, then decaying.
        strength = np.exp(-np.maximum(distances - rhos[:, None], 0.0) / sigmas[:, None])
    else:
        strength = np.ones(indices.shape)
    rows = np.repeat(np.arange(n_cells), indices.shape[1])
    directed = sparse.csr_matrix((strength.ravel(), (rows, indices.ravel())), shape=(n_cells, n_cells))
    directed.eliminate_zeros()  # exp underflow on a far neighbour: no edge, as in UMAP
    transposed = directed.T.tocsr()
    union = directed + transposed - directed.multiply(transposed)  # 1 + 1 - 1 = 1 when unweighted
    # Each undirected edge once, as (i, j) with i < j in row order.
    upper = sparse.triu(union, k=1).tocoo()
    keep = upper.data > 0
    # igraph reads an (edges, 2) integer array directly; a Python list of pairs costs GBs at 1M cells.
    edges = np.column_stack([upper.row[keep], upper.col[keep]]).astype(np.int64)
    attrs = {"weight": upper.data[keep].astype(np.float64)} if weighted else {}
    return ig.Graph(n=n_cells, edges=edges, directed=False, edge_attrs=attrs)


def _neighbours(embedding: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other cells of each cell: ``(cells, k)`` indices and ascending distances."""
    n_cells = embedding.shape[0]
    if n_cells <= APPROXIMATE_NEIGHBORS_CELLS:
        from sklearn.neighbors import NearestNeighbors

        # kneighbors() without X leaves each cell out of its own neighbour list.
        distances, indices = NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors()
        return indices, distances.astype(np.float64)
    from pynndescent import NNDescent

    index = NNDescent(embedding, n_neighbors=k + 1, random_state=0, n_jobs=-1)
    indices, distances = index.neighbor_graph
    # Drop each cell from its own list; where a duplicate displaced it, drop the farthest instead.
    is_self = indices == np.arange(n_cells)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return indices[keep].reshape(n_cells, k), distances[keep].reshape(n_cells, k).astype(np.float64)


def _smooth_knn_dist(distances: np.ndarray, n_iter: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's ``smooth_knn_dist`` (local_connectivity 1), vectorised over the cells.

    ``distances`` are the ``(cells, k)`` ascending distances to the other neighbours; UMAP's
    own list also holds the cell itself at distance 0, so its target is ``log2(k + 1)``. Numpy
    rather than ``umap.umap_.fuzzy_simplicial_set``: UMAP's import and numba compilation cost
    20 s on this code's two-core machines, longer than the whole graph below a million cells.
    Returns each cell's bandwidth ``sigma`` and its distance to the nearest distinct neighbour ``rho``.
    """
    n_cells, k = distances.shape
    target = np.log2(k + 1)
    positive = distances > 0.0
    has_positive = positive.any(axis=1)
    rhos = np.where(has_positive, distances[np.arange(n_cells), positive.argmax(axis=1)], 0.0)
    beyond = np.maximum(distances - rhos[:, None], 0.0)
    lo, hi, mid = np.zeros(n_cells), np.full(n_cells, np.inf), np.ones(n_cells)
    active = np.arange(n_cells)
    for _ in range(n_iter):  # bisection on sigma until the memberships sum to the target
        psum = np.exp(-beyond[active] / mid[active, None]).sum(axis=1)
        open_ = np.abs(psum - target) >= 1e-5
        active, psum = active[open_], psum[open_]
        if not active.size:
            break
        above = psum > target
        hi[active[above]] = mid[active[above]]
        lo[active[~above]] = mid[active[~above]]
        mid[active] = np.where(np.isinf(hi[active]), mid[active] * 2.0, (lo[active] + hi[active]) / 2.0)
    # UMAP's floor on sigma: a thousandth of the mean distance (the cell's own zero included).
    own_mean = distances.sum(axis=1) / (k + 1)
    floor = np.where(rhos > 0.0, own_mean, distances.sum() / (n_cells * (k + 1))) * 1e-3
    return np.maximum(mid, floor), rhos


def _kmeans(x, *, n_clusters, seed, **_):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=int(n_clusters), n_init=10, random_state=seed).fit_predict(x)


#: Above this many cells Leiden stops after two iterations (scanpy's choice) instead of iterating
#: until no cell moves: at a million cells each further pass costs minutes and changes little.
LEIDEN_CONVERGE_CELLS = 200_000


def _leiden(x, *, resolution, n_neighbors, seed, **_):
    import random

    import igraph as ig

    graph = knn_graph(x, n_neighbors)
    n_iterations = -1 if len(x) <= LEIDEN_CONVERGE_CELLS else 2
    # igraph's own Leiden (C) optimises the same modularity with resolution as leidenalg's
    # RBConfigurationVertexPartition, several times faster. It draws from the RNG igraph is given:
    # a seeded one for this call, then igraph's default (Python's random module) again.
    weights = "weight" if "weight" in graph.es.attributes() else None
    ig.set_random_number_generator(random.Random(int(seed)))
    try:
        partition = graph.community_leiden(objective_function="modularity", weights=weights,
                                           resolution=float(resolution), n_iterations=n_iterations)
    finally:
        ig.set_random_number_generator(random)
    return np.asarray(partition.membership)


def _auto(x, *, n_neighbors, seed, **_):
    return _kmeans(x, n_clusters=estimate_n_clusters(x, n_neighbors=n_neighbors, seed=seed), seed=seed)


def _birch(x, *, n_clusters, **_):
    from sklearn.cluster import Birch

    return Birch(n_clusters=int(n_clusters)).fit_predict(x)


def _gmm(x, *, n_clusters, seed, **_):
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=int(n_clusters), random_state=seed).fit_predict(x)


def _meanshift(x, *, seed, **_):
    from sklearn.cluster import MeanShift, estimate_bandwidth

    bandwidth = estimate_bandwidth(x, quantile=0.2, n_samples=min(len(x), 2000), random_state=seed) or None
    try:
        return MeanShift(bandwidth=bandwidth, bin_seeding=True).fit_predict(x)
    except ValueError:  # no bin seed had a neighbour (a collapsed embedding): seed from every cell
        return MeanShift(bandwidth=bandwidth, bin_seeding=False).fit_predict(x)


def _spectral(x, *, n_clusters, n_neighbors, seed, **_):
    from sklearn.cluster import SpectralClustering

    return SpectralClustering(n_clusters=int(n_clusters), affinity="nearest_neighbors",
                              n_neighbors=min(n_neighbors, len(x) - 1), random_state=seed).fit_predict(x)


def _ward(x, *, n_clusters, **_):
    from sklearn.cluster import AgglomerativeClustering

    return AgglomerativeClustering(n_clusters=int(n_clusters), linkage="ward").fit_predict(x)


_ALGORITHMS: dict[str, Callable[..., np.ndarray]] = {
    "kmeans": _kmeans, "leiden": _leiden, "auto": _auto, "birch": _birch, "gmm": _gmm,
    "meanshift": _meanshift, "spectral": _spectral, "ward": _ward,
}
