"""The PCA block of a fused embedding: principal components of the most dispersed genes beside the encoder.

The ``fused`` preset clusters the encoder's output side by side with ``pca_components`` principal
components of the ``pca_genes`` first genes of the dispersion ranking that chose the encoder's
genes (so their columns are already in the preprocessed input), each block centred and scaled to
the same root-mean-square norm. The same PCA can also be the encoder's first layer (an input
projection, :class:`~contrastive_sc.method.config.EncoderConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rows import Rows

#: Cells the PCA block is fitted on, at most (a random sample of larger data).
PCA_SAMPLE_CELLS = 50_000


@dataclass(frozen=True)
class PCABlock:
    """A PCA fitted on some columns of the preprocessed input.

    Attributes
    ----------
    index
        ``(g,)`` input columns the PCA reads.
    pca
        The fitted scikit-learn ``PCA`` (``mean_`` ``(g,)``, ``components_`` ``(k, g)``).
    """

    index: np.ndarray
    pca: object

    @property
    def mean(self) -> np.ndarray:
        return self.pca.mean_

    @property
    def components(self) -> np.ndarray:
        return self.pca.components_

    def transform(self, x: np.ndarray) -> np.ndarray:
        """The principal components of the rows ``x`` of the preprocessed input."""
        return self.pca.transform(x[:, self.index])


def pca_sample(x: Rows, seed: int) -> np.ndarray:
    """The rows a PCA block is fitted on: all of them, or :data:`PCA_SAMPLE_CELLS` random ones (sorted)."""
    n_cells = x.shape[0]
    if n_cells > PCA_SAMPLE_CELLS:  # the rule depends on the number of cells, never on the container
        rng = np.random.default_rng(seed)
        return x.take(np.sort(rng.choice(n_cells, PCA_SAMPLE_CELLS, replace=False)))
    return np.asarray(x.to_memory())


def fit_pca_block(input_genes, pca_genes, sample: np.ndarray, n_components: int, seed: int) -> PCABlock:
    """PCA of the columns of ``sample`` (rows of the input, whose columns are ``input_genes``) named ``pca_genes``."""
    from sklearn.decomposition import PCA

    column_of = {g: i for i, g in enumerate(input_genes)}
    index = np.array([column_of[g] for g in pca_genes if g in column_of], dtype=np.int64)
    n_components = min(n_components, len(index), sample.shape[0] - 1)
    return PCABlock(index, PCA(n_components=n_components, random_state=seed).fit(sample[:, index]))
