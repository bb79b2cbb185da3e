"""Fitting an embedding: raw counts -> preprocessing state -> encoder (-> PCA block) -> the training cells' embedding.

The one path of the data through training, whatever holds the cells: the counts are
:class:`~contrastive_sc.method.rows.Rows`, the preprocessed input is rows of the same kind (in
memory, or a temporary file for cells on disk), and the training cells are embedded once, at
the end, for everything that needs their embedding (training clusters, the cell-type
annotator, a run's metrics and figures).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ContrastiveConfig
from .encoder import FusedEmbedder, encode
from .fusion import fit_pca_block, pca_sample
from .preprocess import PreprocessState, fit_preprocess, transform_rows
from .rows import Rows
from .train import TrainingHistory, fit_encoder


@dataclass
class FittedEmbedding:
    """What one fit produced: the preprocessing state, the trained module, its history and the training cells' embedding.

    ``inputs`` is the training cells' preprocessed input (the encoder's input), kept when the
    caller asked for it (the cell-type annotator is fitted on it), else ``None``.
    """

    state: PreprocessState
    encoder: object
    history: TrainingHistory
    embedding: np.ndarray
    inputs: np.ndarray | None = None


def fit_embedding(counts: Rows, genes: np.ndarray, config: ContrastiveConfig, *, progress: bool = False,
                  on_epoch: Callable[[int, float], None] | None = None,
                  directory: str | Path | None = None, keep_inputs: bool = False) -> FittedEmbedding:
    """Fit the preprocessing and the encoder on raw counts, then embed the training cells once.

    Parameters
    ----------
    counts
        Raw counts, cells x genes.
    genes
        One name per column of ``counts``.
    config
        The model's configuration; ``n_genes`` must be a number or ``"all"`` here.
    progress, on_epoch
        Passed to :func:`~contrastive_sc.method.train.fit_encoder`.
    directory
        Folder of the temporary preprocessed file when the counts are on disk.
    keep_inputs
        Also return the preprocessed input as one array (``FittedEmbedding.inputs``): the
        counts are then preprocessed once for training and for what is fitted after it.
    """
    pre, enc, seed = config.preprocess, config.encoder, config.train.seed
    state = fit_preprocess(counts, genes, n_genes=pre.n_genes, min_cells=pre.min_cells, hvg_flavor=pre.hvg_flavor,
                           clip=pre.clip)
    # the PCA block reads the first pca_genes of the same dispersion ranking: its columns are in the input
    pca_genes = (fit_preprocess(counts, genes, n_genes=enc.pca_genes, min_cells=pre.min_cells,
                                hvg_flavor=pre.hvg_flavor).genes if enc.pca_components else ())
    with transform_rows(counts, genes, state, directory=directory) as x:
        sample = pca_sample(x, seed) if enc.pca_components else None
        block = fit_pca_block(state.genes, pca_genes, sample, enc.pca_components, seed) if enc.pca_components else None
        projection = (block.index, block.mean, block.components) if enc.input_projection != "none" else None
        encoder, history = fit_encoder(x, enc, config.train, progress=progress, on_epoch=on_epoch,
                                       projection=projection)
        encoder.readout = enc.readout
        if block is not None:
            encoder = FusedEmbedder.fit(encoder, block, sample, enc.encoder_weight)
        embedding = encode(encoder, x)
        # cells on disk: the temporary file is read back before it is deleted
        inputs = x.to_memory() if keep_inputs else None
    return FittedEmbedding(state, encoder, history, embedding, inputs)
