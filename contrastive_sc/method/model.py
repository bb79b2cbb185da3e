"""``ContrastiveSC``: the AnnData-facing model. It records where its data is, fits, embeds, annotates, saves."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.annotate import UNASSIGNED, CellTypeAnnotator, held_out_type_detection
from ..analysis.cluster import TrainingClusters
from .config import DEFAULT_PRESET, ContrastiveConfig, get_preset
from .data import Cells, DataSetup
from .encoder import encode
from .gene_search import fit_gene_count
from .preprocess import GeneCoverage, PreprocessState, empty_cells, gene_coverage, transform, transform_in_memory
from .rows import collect
from .saved_model import load_model, save_model
from .train import TrainingHistory

EMBEDDING_KEY = "X_contrastive"
#: ``obs`` columns written by :meth:`ContrastiveSC.annotate` (its default ``key_added``, and ``<key>_confidence``).
CELL_TYPE_KEY = "contrastive_cell_type"
CONFIDENCE_KEY = f"{CELL_TYPE_KEY}_confidence"
#: Use the layer recorded at fit (the default of every method that reads counts).
RECORDED = "recorded"


class ContrastiveSC:
    """Contrastive self-supervised embedding of scRNA-seq cells (Ciortan & Defrance, 2021).

    Parameters
    ----------
    config
        Full configuration; defaults to the ``preset``'s.
    preset
        Named preset used when ``config`` is not given: ``"fused"`` (the default, the best
        clustering) or ``"paper"`` (the published method).
    **overrides
        Flat setting overrides, e.g. ``epochs=10, n_genes=1000``.

    Examples
    --------
    >>> model = ContrastiveSC().fit(adata, layer="counts", label_key="cell_type")  # doctest: +SKIP
    >>> model.embed(new)                 # obsm["X_contrastive"], read from new.layers["counts"]
    >>> model.annotate(new)              # obs["contrastive_cell_type"], obs["contrastive_cell_type_confidence"]
    """

    def __init__(self, config: ContrastiveConfig | None = None, *, preset: str = DEFAULT_PRESET, **overrides) -> None:
        base = config if config is not None else get_preset(preset)
        self.config = base.replace(**overrides) if overrides else base
        self.setup = DataSetup()
        self.state: PreprocessState | None = None
        self.encoder = None
        self.history: TrainingHistory | None = None
        self.training_clusters: TrainingClusters | None = None
        self.annotator: CellTypeAnnotator | None = None
        #: Out-of-fold annotation figures on the reference, from :meth:`fit` (not saved).
        self.annotation_report: dict[str, float] = {}
        self.gene_search: list[dict] = []
        #: The training cells' embedding, computed once by :meth:`fit` (not saved).
        self.training_embedding: np.ndarray | None = None
        self.model_id = uuid.uuid4().hex  # tells a re-save of this model from a save over another one

    # ------------------------------------------------------------------ training
    def check(self, adata, *, layer: str | None = None, label_key: str | None = None,
              batch_key: str | None = None) -> Cells:
        """Read ``adata`` as :meth:`fit` would and refuse, before any training, data it cannot be fitted on.

        Returns the cells read (:class:`~contrastive_sc.method.data.Cells`), for :meth:`fit_cells`.

        Raises
        ------
        KeyError
            When the layer, label or batch column is missing.
        ValueError
            When the counts are not raw counts, or there are too few cells for the clusters,
            the kNN graph or a batch, or too few genes.
        """
        cells = DataSetup(layer, label_key, batch_key).read(adata)
        self.config.check_data_size(*cells.shape)
        return cells

    def fit(self, adata, *, layer: str | None = None, label_key: str | None = None, batch_key: str | None = None,
            clusters: bool = True, progress: bool = False, on_epoch=None) -> ContrastiveSC:
        """Fit preprocessing and train the encoder on the raw counts of ``adata``.

        Parameters
        ----------
        adata
            Cells x genes; a backed AnnData (``anndata.read_h5ad(path, backed="r")``) is read a
            block of cells at a time and never loaded whole.
        layer
            Where the raw counts are when ``X`` holds normalised values: an ``adata.layers`` key,
            or ``"raw"`` for ``adata.raw``. Recorded: later calls read the same place.
        label_key
            ``obs`` column of cell types. Training never reads them; the model also fits a
            :class:`~contrastive_sc.analysis.annotate.CellTypeAnnotator`, so that :meth:`annotate`
            and the served model name new cells by them.
        batch_key
            ``obs`` column of samples or batches (recorded).
        clusters
            Also cluster the training cells (KMeans with ``n_clusters`` when set, else with an
            estimated k) and keep the centroids, so new cells are labelled consistently
            (:meth:`assign_clusters`); benchmarks that only need the embedding switch it off.
        progress, on_epoch
            A progress bar; ``on_epoch(epoch, loss)`` after each epoch.

        With ``n_genes="auto"`` one embedding is fitted per gene count in
        :data:`~contrastive_sc.method.config.AUTO_GENE_COUNTS` and the best separated is kept.
        """
        cells = self.check(adata, layer=layer, label_key=label_key, batch_key=batch_key)
        return self.fit_cells(cells, clusters=clusters, progress=progress, on_epoch=on_epoch)

    def fit_cells(self, cells: Cells, *, clusters: bool = True, progress: bool = False,
                  on_epoch=None) -> ContrastiveSC:
        """:meth:`fit` on cells already read by :meth:`check` (a tracked run starts between the two)."""
        labelled = cells.labels is not None  # the annotator is fitted on the encoder's input: keep it
        fitted, self.gene_search = fit_gene_count(cells.counts, cells.genes, self.config, progress=progress,
                                                  on_epoch=on_epoch, keep_inputs=labelled)
        self.setup, self.model_id = cells.setup, uuid.uuid4().hex  # a new fit is a new model
        self.state = replace(fitted.state, model_id=self.model_id)
        self.encoder, self.history = fitted.encoder, fitted.history
        self.training_embedding = embedding = fitted.embedding
        cluster, seed = self.config.cluster, self.config.train.seed
        self.training_clusters = (TrainingClusters.fit(embedding, n_clusters=cluster.n_clusters,
                                                       n_neighbors=cluster.n_neighbors, seed=seed)
                                  if clusters else None)
        self.annotator, self.annotation_report = None, {}
        if labelled:  # names from the model's own input and embedding (analysis/annotate.py)
            pre = fitted.inputs
            self.annotator = CellTypeAnnotator(label_key=cells.setup.label_key or "").fit(
                pre, cells.labels, gene_mean=self.state.mean, gene_std=self.state.std,
                target_sum=self.state.target_sum, embedding=embedding, seed=seed)
            self.annotation_report = self.annotator.report | held_out_type_detection(self.annotator, pre, cells.labels,
                                                                                      seed=seed)
        return self

    # ------------------------------------------------------------------ inference
    def _counts(self, adata, layer: str | None):
        if self.state is None or self.encoder is None:
            msg = "this model is not trained yet; call fit(adata) or ContrastiveSC.load(path) first"
            raise RuntimeError(msg)
        setup = self.setup if layer == RECORDED else replace(self.setup, layer=layer)
        return setup.counts(adata)

    def coverage(self, adata, *, layer: str | None = RECORDED) -> GeneCoverage:
        """How many of the model's genes ``adata`` provides."""
        return gene_coverage(self._counts(adata, layer)[1], self.state)

    def preprocess(self, adata, *, layer: str | None = RECORDED) -> np.ndarray:
        """Raw counts -> the encoder's input ``(cells, genes)`` float32, with the frozen training state.

        ``layer`` defaults to where the counts were at fit; pass another (``None`` for ``X``) to override.
        """
        counts, genes = self._counts(adata, layer)
        return transform_in_memory(counts, genes, self.state)

    def transform(self, adata, *, layer: str | None = RECORDED) -> np.ndarray:
        """Embedding of every cell, ``(cells, embedding_dim)`` float32, counts read a block at a time."""
        counts, genes = self._counts(adata, layer)
        return collect(lambda block: encode(self.encoder, transform(block, genes, self.state)), counts,
                       self.encoder.n_outputs)

    def embed(self, adata, *, layer: str | None = RECORDED, key_added: str = EMBEDDING_KEY, copy: bool = False):
        """Write the embedding to ``adata.obsm[key_added]`` (scanpy style).

        The gene coverage and the settings used go to ``uns[key_added]``. Returns the AnnData
        when ``copy=True``, else ``None``.
        """
        adata = adata.copy() if copy else adata
        coverage = self.coverage(adata, layer=layer)
        adata.obsm[key_added] = self.transform(adata, layer=layer)
        used = self.setup.layer if layer == RECORDED else layer
        adata.uns[key_added] = {"params": self.config.to_params() | {"layer": used or "X"},
                                "coverage": coverage.as_dict()}
        return adata if copy else None

    def assign_clusters(self, embedding: np.ndarray) -> np.ndarray:
        """The training cluster (nearest centroid) of each embedded cell."""
        if self.training_clusters is None:
            msg = "this model has no training clusters; fit it with clusters=True"
            raise RuntimeError(msg)
        return self.training_clusters.assign(embedding)

    def annotate(self, adata, *, min_confidence: float | None = None, layer: str | None = RECORDED,
                 key_added: str = CELL_TYPE_KEY, copy: bool = False):
        """Name each cell by the training labels: ``obs[key_added]`` and ``obs[key_added + "_confidence"]``.

        The calls use all of ``adata``'s cells together (the unseen-type rule compares them): pass
        one sample at a time. Cells of a type the reference lacks, and calls whose confidence is
        below ``min_confidence`` (default: the model's, 0), are ``"unassigned"``. The embedding
        goes to ``obsm["X_contrastive"]``, the settings used to ``uns[key_added]["params"]``.
        Returns the AnnData when ``copy=True``, else ``None``.
        """
        if self.annotator is None:
            msg = "this model was trained without labels; fit it with label_key=... to annotate"
            raise RuntimeError(msg)
        adata = adata.copy() if copy else adata
        counts, genes = self._counts(adata, layer)
        pre = transform_in_memory(counts, genes, self.state)
        embedding = encode(self.encoder, pre)
        # a cell without counts on the model's genes carries no signal: no type, no confidence, and
        # no part in the calls of the others (the unseen-type rule compares the cells)
        empty = collect(lambda block: empty_cells(block, genes, self.state)[:, None], counts, 1)[:, 0]
        types = np.full(len(pre), UNASSIGNED, dtype=object)
        confidence = np.zeros(len(pre))
        if not empty.all():
            types[~empty], confidence[~empty] = self.annotator.annotate(pre[~empty], embedding[~empty], min_confidence)
        adata.obsm[EMBEDDING_KEY] = embedding
        adata.obs[key_added] = pd.Categorical(np.asarray(types, dtype=str))
        adata.obs[f"{key_added}_confidence"] = confidence
        used = self.setup.layer if layer == RECORDED else layer
        threshold = self.annotator.min_confidence if min_confidence is None else min_confidence
        adata.uns[key_added] = {"params": {"min_confidence": float(threshold), "layer": used or "X",
                                           "label_key": self.setup.label_key or ""}}
        return adata if copy else None

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save the model to a folder (see :func:`~contrastive_sc.method.saved_model.save_model`).

        Saving again to the folder of the same model replaces its files; a folder holding another
        model is refused unless ``overwrite=True``, which first removes that model's files.
        """
        if self.state is None or self.encoder is None:
            msg = "this model is not trained yet; call fit(adata) before save"
            raise RuntimeError(msg)
        return save_model(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, *, check_files: bool = True) -> ContrastiveSC:
        """Load a model written by :meth:`save`, its files checked against its manifest.

        ``check_files=False`` skips that check, for a folder saved before manifests existed.
        A folder whose files were changed, swapped for another model's, removed or added is
        refused with a ``ValueError`` naming the file.
        """
        parts = load_model(path, check_files=check_files)
        model = cls(parts.pop("config"))
        for name, value in parts.items():
            setattr(model, name, value)
        return model
