"""The training objective: the paper's NT-Xent, and beside it neighbour positives and a cluster-level loss.

:class:`TrainingObjective` is the loss every batch of stacked views trains on. The two additions
are off in the ``paper`` and ``fused`` presets and switched on by training settings:

- ``positive_neighbours = k > 0`` (NNCLR, CLEAR and scNAME use neighbours as positives): the
  second view of each cell is a masked view of a random one of its ``k`` nearest neighbours
  (itself included) in the 50 principal components of the input, found once before training.
  Cells of one type then pull together instead of each cell only towards its own other view.
- ``cluster_head = K > 0`` (Contrastive Clustering, Li et al. 2021): a linear + softmax head
  maps each view to ``K`` soft cluster memberships; NT-Xent over the ``2K`` membership columns
  (a cluster of view one against the same cluster of view two) is added to the instance loss,
  with the entropy of the mean membership so the head cannot put every cell in one cluster.
  The head is discarded after training: the embedding is the encoder's output as before.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import Partners
from .config import TrainConfig
from .loss import NTXentLoss
from .rows import Rows

#: Principal components the neighbour search runs on, and the temperature of the cluster loss.
NEIGHBOUR_COMPONENTS = 50
CLUSTER_TEMPERATURE = 1.0


def neighbour_table(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``(cells, k)`` indices of each cell's ``k`` nearest neighbours, itself first, in PCA space.

    Parameters
    ----------
    x
        ``(cells, genes)`` preprocessed input.
    k
        Neighbours per cell, counting the cell itself (capped at the number of cells).
    seed
        PCA's random state.
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    if k < 1:
        msg = f"positive_neighbours must be >= 1 to build a neighbour table, got {k}"
        raise ValueError(msg)
    x = np.asarray(x, dtype=np.float32)
    n_components = min(NEIGHBOUR_COMPONENTS, x.shape[0] - 1, x.shape[1])
    pcs = PCA(n_components=n_components, random_state=seed).fit_transform(x) if n_components >= 1 else x
    k = min(int(k), x.shape[0])
    return NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(pcs, return_distance=False).astype(np.int64)


def partner_drawer(x: Rows, cfg: TrainConfig) -> Partners:
    """Neighbour positives for :func:`~contrastive_sc.method.augment.training_batches`, or ``None`` when off.

    The neighbour table is built once, on every row of ``x``; each batch row's partner is then
    drawn from its own random stream (seed + 1), so the views' draws stay those of the paper.
    """
    if not cfg.positive_neighbours:
        return None
    table = neighbour_table(x.to_memory(), cfg.positive_neighbours, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    return lambda rows: draw_partners(table, rows, rng)


def draw_partners(table: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each of ``rows``, one of its neighbours in ``table`` drawn uniformly (possibly itself)."""
    return table[rows, rng.integers(0, table.shape[1], size=len(rows))]


class TrainingObjective(nn.Module):
    """The loss a batch of stacked views trains on: NT-Xent, plus the cluster-level loss when ``cluster_head`` > 0.

    Parameters
    ----------
    n_outputs
        The encoder's output size.
    temperature
        NT-Xent's temperature.
    cluster_head
        ``K`` clusters of a :class:`ClusterHead` trained beside the encoder (0: none); its
        parameters are this module's and are dropped with it after training.
    """

    def __init__(self, n_outputs: int, temperature: float, cluster_head: int = 0) -> None:
        super().__init__()
        self.head = ClusterHead(n_outputs, cluster_head) if cluster_head else None
        self.instance = NTXentLoss(temperature)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        loss = self.instance(z)
        return loss + cluster_loss(self.head(z)) if self.head is not None else loss


class ClusterHead(nn.Module):
    """Linear map of the embedding to ``K`` soft cluster memberships, for :func:`cluster_loss` only."""

    def __init__(self, n_inputs: int, n_clusters: int) -> None:
        super().__init__()
        if n_clusters < 2:
            msg = f"cluster_head must be >= 2 clusters, got {n_clusters}"
            raise ValueError(msg)
        self.linear = nn.Linear(int(n_inputs), int(n_clusters))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.linear(z), dim=1)


def cluster_loss(p: torch.Tensor, temperature: float = CLUSTER_TEMPERATURE) -> torch.Tensor:
    """Contrastive Clustering's cluster-level loss on stacked memberships ``p`` of two views.

    Parameters
    ----------
    p
        ``(2n, K)`` soft memberships, rows ``0..n-1`` view one and ``n..2n-1`` view two.
    temperature
        NT-Xent temperature over the membership columns.

    Returns
    -------
    NT-Xent over the ``2K`` L2-normalised columns, plus ``log K - H(mean membership)`` per view
    (zero when clusters are used evenly, ``log K`` when one takes every cell).
    """
    n = p.shape[0] // 2
    views = (p[:n], p[n:])
    columns = torch.cat([F.normalize(v.t(), dim=1) for v in views])  # (2K, n)
    k = p.shape[1]
    balance = sum(math.log(k) + (m * torch.log(m + 1e-12)).sum() for m in (v.mean(dim=0) for v in views))
    return NTXentLoss(temperature)(columns) + balance
