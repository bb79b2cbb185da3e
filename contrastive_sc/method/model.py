"""``ContrastiveSC``: the AnnData-facing model that wires preprocessing, encoder and training."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import AUTO_GENE_COUNTS, DEFAULT_PRESET, ContrastiveConfig, get_preset
from .preprocess import GeneCoverage, PreprocessState, gene_coverage
from .train import TrainingHistory, encode, fit_encoder

log = logging.getLogger(__name__)

EMBEDDING_KEY = "X_contrastive"
#: Cells the PCA block of a fused preset is fitted on, at most (a random sample of larger data).
PCA_SAMPLE_CELLS = 50_000
_FILES = {"config": "config.json", "state": "preprocess_state.json", "weights": "encoder.pt",
          "history": "history.json", "reference": "reference_centroids.npy", "cell_types": "cell_types.npz"}
#: Files a model may lack (no reference clusters, no labels): removed on save when absent, so
#: that a folder never mixes one model's weights with another's leftovers.
_OPTIONAL_FILES = ("reference", "cell_types")
#: ``obs`` columns written by :meth:`ContrastiveSC.annotate`.
CELL_TYPE_KEY, CONFIDENCE_KEY = "contrastive_cell_type", "contrastive_confidence"


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
    >>> model = ContrastiveSC().fit(adata)                          # doctest: +SKIP
    >>> model.embed(adata)                                          # obsm["X_contrastive"]
    >>> contrastive_sc.analysis.cluster(adata, "kmeans", n_clusters=8)       # obs["contrastive_kmeans"]
    """

    def __init__(self, config: ContrastiveConfig | None = None, *, preset: str = DEFAULT_PRESET, **overrides) -> None:
        base = config if config is not None else get_preset(preset)
        self.config = base.replace(**overrides) if overrides else base
        self.state: PreprocessState | None = None
        self.encoder = None
        self.history: TrainingHistory | None = None
        self.reference_centroids: np.ndarray | None = None
        self.cell_types = None  # a CellTypeReference when trained with labels
        self.model_id = uuid.uuid4().hex  # tells a re-save of this model from a save over another one
        self.gene_search: list[dict] = []

    # ------------------------------------------------------------------ training
    def fit(self, adata, *, label_key: str | None = None, layer: str | None = None, progress: bool = False,
            on_epoch=None, reference: bool = True) -> ContrastiveSC:
        """Fit preprocessing and train the encoder on raw counts in ``adata.X`` (or ``layer``).

        Training never reads the labels. With ``label_key``, the model also keeps an annotated
        reference (:class:`~contrastive_sc.analysis.annotate.CellTypeReference`) so that
        :meth:`annotate` and the served model name new cells by those labels, and call cells
        unlike every type ``"unassigned"``.

        ``layer``: an ``adata.layers`` key, or ``"raw"`` for ``adata.raw``, holding the raw counts
        when ``X`` holds normalised values.

        ``reference=True`` also clusters the training cells (KMeans, with ``n_clusters`` when
        it is set, else with an estimated k: method ``auto``) and keeps the centroids, so new
        cells can be labelled consistently with :meth:`reference_labels`; benchmarks that only
        need the embedding switch it off.

        A backed AnnData (``anndata.read_h5ad(path, backed="r")``) is never loaded whole: see
        :mod:`contrastive_sc.method.outofcore`.

        With ``n_genes="auto"`` one model is trained per gene count in
        :data:`~contrastive_sc.method.config.AUTO_GENE_COUNTS` and the one whose clustering has the best
        silhouette is kept (no labels are used).
        """
        from .io import counts_view

        labels = _labels(adata, label_key)
        adata = counts_view(adata, layer)
        self.check_data(adata)
        self.model_id = uuid.uuid4().hex  # a new fit is a new model
        self._fit_embedding(adata, progress=progress, on_epoch=on_epoch, reference=reference)
        if labels is not None:
            from ..analysis.annotate import CellTypeReference

            self.cell_types = CellTypeReference.fit(self.transform(adata), labels, label_key=label_key,
                                                    seed=self.config.train.seed)
        return self

    def _fit_embedding(self, adata, *, progress: bool, on_epoch, reference: bool) -> None:
        pre = self.config.preprocess
        if pre.n_genes == "auto":
            self._fit_auto_genes(adata, progress=progress, on_epoch=on_epoch, reference=reference)
            return
        from .outofcore import fit_state, preprocessed_rows

        def fit(n_genes, clip=None):
            return fit_state(adata, n_genes=n_genes, min_cells=pre.min_cells, hvg_flavor=pre.hvg_flavor, clip=clip)

        self.state = fit(pre.n_genes, pre.clip)
        enc = self.config.encoder
        # one pipeline whatever holds the cells: x is an array, or a matrix on disk for a backed file
        with preprocessed_rows(adata, self.state) as x:
            pca_genes = fit(enc.pca_genes).genes if enc.pca_components else None
            # an input projection is the PCA block's own PCA, fitted before training
            pca = self._fit_pca(pca_genes, x) if enc.input_projection != "none" else None
            projection = None if pca is None else (pca[0], pca[1].mean_, pca[1].components_)
            self.encoder, self.history = fit_encoder(x, enc, self.config.train, progress=progress,
                                                     on_epoch=on_epoch, projection=projection)
            self.encoder.readout = enc.readout
            if enc.pca_components:
                self.encoder = self._fuse_with_pca(pca_genes, x, pca)
            if reference:
                self._fit_reference(encode(self.encoder, x))

    def check_data(self, adata) -> None:
        """Refuse, before any training, settings that cannot work on ``adata``'s size.

        Raises
        ------
        ValueError
            When there are too few cells for the clusters, the kNN graph or a batch, or too few
            genes for the gene count asked for.
        """
        n_cells, n_genes = adata.shape
        cluster, pre = self.config.cluster, self.config.preprocess
        if n_cells < 3:
            msg = f"training needs at least 3 cells, got {n_cells}"
            raise ValueError(msg)
        if cluster.n_clusters is not None and cluster.n_clusters > n_cells:
            msg = f"n_clusters={cluster.n_clusters} but the data has only {n_cells} cells; ask for at most {n_cells}"
            raise ValueError(msg)
        if cluster.n_neighbors >= n_cells:
            msg = f"n_neighbors={cluster.n_neighbors} needs more cells than neighbours; the data has {n_cells}"
            raise ValueError(msg)
        if isinstance(pre.n_genes, int) and n_genes < 2:
            msg = f"the data has {n_genes} gene(s); at least 2 are needed"
            raise ValueError(msg)
        from .io import validate_counts
        from .outofcore import first_cells

        # Normalised or log values would train silently and serve nonsense: refuse them here, with
        # the readers' message (a backed matrix is checked on its first block).
        validate_counts(first_cells(adata, 20_000))

    def _fuse_with_pca(self, top_genes, x, pca=None):
        """Put the principal components of the most dispersed input genes beside the encoder.

        ``top_genes`` are the ``pca_genes`` first of the dispersion ranking that chose the
        encoder's genes, so they are among them and their columns are already scaled in ``x``
        (an array or an out-of-core matrix). Above :data:`PCA_SAMPLE_CELLS` cells, the PCA and the
        blocks' scales are fitted on that many random cells, whatever holds them. ``pca``: the
        ``(index, PCA)`` that :meth:`_fit_pca` already fitted (for an input projection), else
        it is fitted here.
        """
        import torch

        from .encoder import FusedEmbedder

        x = self._pca_sample(x)
        index, pca = pca if pca is not None else self._fit_pca(top_genes, x)
        blocks = (encode(self.encoder, x), pca.transform(x[:, index]))
        centers = [b.mean(axis=0) for b in blocks]
        scales = [max(float(np.sqrt(((b - c) ** 2).sum(axis=1).mean())), 1e-12) for b, c in zip(blocks, centers)]
        scales[0] /= self.config.encoder.encoder_weight  # the encoder block's norm relative to the PCA block's
        return FusedEmbedder(self.encoder, torch.from_numpy(index), torch.from_numpy(pca.mean_),
                             torch.from_numpy(pca.components_), tuple(map(torch.from_numpy, centers)), scales).eval()

    def _pca_sample(self, x):
        """The cells a PCA is fitted on: all of them in memory, or :data:`PCA_SAMPLE_CELLS` random ones."""
        if len(x) > PCA_SAMPLE_CELLS:  # the rule depends on the number of cells, never on the container
            rng = np.random.default_rng(self.config.train.seed)
            rows = np.sort(rng.choice(len(x), PCA_SAMPLE_CELLS, replace=False))
            return x.take_rows(rows) if hasattr(x, "take_rows") else x[rows]
        if not isinstance(x, np.ndarray):  # an on-disk matrix this small is read whole
            return x[:]
        return x

    def _fit_pca(self, top_genes, x):
        """``(index, PCA)``: the input columns of ``top_genes`` and ``pca_components`` principal components of them."""
        from sklearn.decomposition import PCA

        column_of = {g: i for i, g in enumerate(self.state.genes)}
        index = np.array([column_of[g] for g in top_genes if g in column_of], dtype=np.int64)
        x = self._pca_sample(x)
        n_components = min(self.config.encoder.pca_components, len(index), x.shape[0] - 1)
        return index, PCA(n_components=n_components, random_state=self.config.train.seed).fit(x[:, index])

    def _fit_auto_genes(self, adata, *, progress: bool, on_epoch, reference: bool) -> ContrastiveSC:
        from ..analysis.metrics import score_clustering

        n_available = adata.shape[1]
        candidates = [n for n in AUTO_GENE_COUNTS if n < n_available] or [n_available]
        best = None
        self.gene_search = []
        for n_genes in candidates:
            trial = ContrastiveSC(self.config.replace(n_genes=n_genes)).fit(adata, progress=progress,
                                                                            reference=reference)
            embedding = trial.transform(adata)
            # the reference clusters when they were fitted (nearest centroid = their labels)
            labels = trial.reference_labels(embedding) if reference else trial._reference_labels(embedding)
            silhouette = score_clustering(embedding, labels)["silhouette"]
            self.gene_search.append({"n_genes": n_genes, "silhouette": silhouette})
            log.info("n_genes=%d silhouette=%.4f", n_genes, silhouette)
            if best is None or silhouette > best[0]:
                best = (silhouette, trial)
        chosen = best[1]
        self.state, self.encoder, self.history = chosen.state, chosen.encoder, chosen.history
        self.reference_centroids = chosen.reference_centroids
        if on_epoch is not None:
            for epoch, loss in enumerate(self.history.loss):
                on_epoch(epoch, loss)
        return self

    def _reference_labels(self, embedding: np.ndarray) -> np.ndarray:
        from ..analysis.cluster import cluster_labels

        cfg = self.config.cluster
        if cfg.n_clusters:
            return cluster_labels(embedding, "kmeans", n_clusters=cfg.n_clusters, seed=self.config.train.seed)
        # k unknown: KMeans with an estimated k, whose clusters are what nearest-centroid
        # labelling assumes (compact, one centroid each), unlike Leiden communities.
        return cluster_labels(embedding, "auto", n_neighbors=cfg.n_neighbors, seed=self.config.train.seed)

    def _fit_reference(self, embedding: np.ndarray) -> None:
        # Centroids of the training clusters let new batches be labelled consistently
        # (nearest centroid, as KMeans assigns) instead of being re-clustered from scratch.
        labels = self._reference_labels(embedding)
        centroids = np.stack([embedding[labels == c].mean(axis=0) for c in np.unique(labels)])
        self.reference_centroids = centroids.astype(np.float32)

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if self.state is None or self.encoder is None:
            msg = "this model is not trained yet; call fit(adata) or ContrastiveSC.load(path) first"
            raise RuntimeError(msg)

    def coverage(self, adata) -> GeneCoverage:
        """How many of the model's genes ``adata`` provides."""
        self._check_fitted()
        return gene_coverage(adata.var_names, self.state)

    def preprocess(self, adata) -> np.ndarray:
        """Raw counts -> the encoder's input ``(cells, genes)`` float32, with the frozen training state.

        A backed AnnData is read a block of cells at a time; the result is in memory either way.
        """
        from .outofcore import preprocess_cells

        self._check_fitted()
        return preprocess_cells(adata, self.state)

    def transform(self, adata) -> np.ndarray:
        """Embedding of every cell, ``(cells, embedding_dim)`` float32 (a backed AnnData is read in blocks)."""
        from .outofcore import embed_cells

        self._check_fitted()
        return embed_cells(self.encoder, adata, self.state)

    def embed(self, adata, *, key_added: str = EMBEDDING_KEY, copy: bool = False):
        """Write the embedding to ``adata.obsm[key_added]`` (scanpy style).

        The gene coverage and the model's settings go to ``uns[key_added]``. Returns the
        AnnData when ``copy=True``, else ``None``.
        """
        adata = adata.copy() if copy else adata
        coverage = self.coverage(adata)
        if coverage.n_found < coverage.n_model_genes:
            log.warning("%d of the model's %d genes are missing from the input; they are set to 0",
                        coverage.n_model_genes - coverage.n_found, coverage.n_model_genes)
        adata.obsm[key_added] = self.transform(adata)
        adata.uns[key_added] = {"params": self.config.to_params(), "coverage": coverage.as_dict()}
        return adata if copy else None

    def reference_labels(self, embedding: np.ndarray) -> np.ndarray:
        """Nearest training-cluster centroid (Euclidean) for each embedded cell."""
        from ..analysis.cluster import nearest_centroid

        self._check_fitted()
        if self.reference_centroids is None:
            msg = "this model has no reference clusters; train it with fit(adata, reference=True)"
            raise RuntimeError(msg)
        return nearest_centroid(embedding, self.reference_centroids)

    def annotate(self, adata, *, min_confidence: float | None = None, layer: str | None = None,
                 copy: bool = False):
        """Name each cell by the training labels: ``obs["contrastive_cell_type"]`` and ``obs["contrastive_confidence"]``.

        Cells unlike every reference type are ``"unassigned"`` (confidence below
        ``min_confidence``, default: the value recorded in the model). The embedding is written
        to ``obsm["X_contrastive"]`` too. Returns the AnnData when ``copy=True``, else ``None``.
        """
        self._check_fitted()
        if self.cell_types is None:
            msg = "this model was trained without labels; train it with fit(adata, label_key=...) to annotate"
            raise RuntimeError(msg)
        from .io import counts_view

        adata = adata.copy() if copy else adata
        embedding = self.transform(counts_view(adata, layer))
        types, confidence = self.cell_types.annotate(embedding, min_confidence)
        adata.obsm[EMBEDDING_KEY] = embedding
        adata.obs[CELL_TYPE_KEY] = _categorical(types)
        adata.obs[CONFIDENCE_KEY] = confidence
        return adata if copy else None

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save config, preprocessing state, weights, history and references to a folder.

        Saving again to the folder of the same model replaces its files. A folder that holds
        another model is refused unless ``overwrite=True``, which first removes that model's
        files, so that a folder never mixes two models.

        Raises
        ------
        FileExistsError
            When ``path`` holds another model and ``overwrite`` is false.
        """
        import torch

        self._check_fitted()
        path = Path(path)
        saved_id = _saved_model_id(path)
        if saved_id is not None and saved_id != self.model_id:
            if not overwrite:
                msg = (f"{str(path)!r} holds another saved model (id {saved_id}, this one is {self.model_id}); "
                       "save elsewhere or pass overwrite=True to replace it")
                raise FileExistsError(msg)
            for name in _FILES.values():
                (path / name).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        (path / _FILES["config"]).write_text(self.config.to_json())
        self.state.to_json(path / _FILES["state"])
        # Self-describing: the architecture travels with the weights, not only in config.json.
        checkpoint = {"n_inputs": self.encoder.n_inputs, "layers": list(self.config.encoder.layers),
                      "batch_norm": bool(self.config.encoder.batch_norm), "readout": self.config.encoder.readout,
                      "state_dict": self.encoder.state_dict()}
        if self.config.encoder.pca_components:
            checkpoint["pca_shape"] = list(self.encoder.pca_components.shape)  # (components, genes read)
        if self.config.encoder.input_projection != "none":  # (features, inputs) of the encoder's first layer
            checkpoint["input_projection"] = self.config.encoder.input_projection
            checkpoint["projection_shape"] = list(_contrastive_encoder(self.encoder).projection.weight.shape)
        torch.save(checkpoint, path / _FILES["weights"])
        history = asdict(self.history) | {"gene_search": self.gene_search, "model_id": self.model_id}
        (path / _FILES["history"]).write_text(json.dumps(history))
        if self.reference_centroids is not None:
            np.save(path / _FILES["reference"], self.reference_centroids)
        if self.cell_types is not None:
            self.cell_types.save(path / _FILES["cell_types"])
        present = {"reference": self.reference_centroids is not None, "cell_types": self.cell_types is not None}
        for key in _OPTIONAL_FILES:
            if not present[key]:
                (path / _FILES[key]).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ContrastiveSC:
        """Load a model written by :meth:`save`."""
        import torch

        from .encoder import ContrastiveEncoder, FusedEmbedder

        path = Path(path)
        missing = [name for key, name in _FILES.items() if key not in _OPTIONAL_FILES and not (path / name).exists()]
        if missing:
            msg = f"{str(path)!r} is not a saved ContrastiveSC model: missing {missing}"
            raise FileNotFoundError(msg)
        config = ContrastiveConfig.from_params(json.loads((path / _FILES["config"]).read_text()))
        model = cls(config)
        model.state = PreprocessState.from_json(path / _FILES["state"])
        checkpoint = torch.load(path / _FILES["weights"], map_location="cpu", weights_only=True)
        layers = tuple(checkpoint.get("layers", config.encoder.layers))
        if layers != tuple(config.encoder.layers):
            msg = (f"{str(path)!r}: {_FILES['weights']} holds layers {list(layers)} but {_FILES['config']} says "
                   f"{list(config.encoder.layers)}; the folder mixes two models")
            raise ValueError(msg)
        readout = checkpoint.get("readout", "output")
        if readout != config.encoder.readout:
            msg = (f"{str(path)!r}: {_FILES['weights']} was saved with readout {readout!r} but {_FILES['config']} "
                   f"says {config.encoder.readout!r}; the folder mixes two models")
            raise ValueError(msg)
        projection = checkpoint.get("input_projection", "none")
        if projection != config.encoder.input_projection:
            msg = (f"{str(path)!r}: {_FILES['weights']} was saved with input_projection {projection!r} but "
                   f"{_FILES['config']} says {config.encoder.input_projection!r}; the folder mixes two models")
            raise ValueError(msg)
        n_projected = checkpoint["projection_shape"][0] if projection != "none" else 0
        encoder = ContrastiveEncoder(checkpoint["n_inputs"], layers, checkpoint.get("batch_norm", config.encoder.batch_norm),
                                     readout, projection=n_projected)
        if n_projected:
            encoder.projection.requires_grad_(projection == "pca-init")
        if "pca_shape" in checkpoint:
            n_components, n_pca_genes = checkpoint["pca_shape"]
            encoder = FusedEmbedder.empty(encoder, n_pca_genes, n_components)
        encoder.load_state_dict(checkpoint["state_dict"])
        model.encoder = encoder.eval()
        history = json.loads((path / _FILES["history"]).read_text())
        model.gene_search = history.pop("gene_search", [])
        model.model_id = history.pop("model_id", model.model_id)
        model.history = TrainingHistory(**history)
        if (path / _FILES["reference"]).exists():
            model.reference_centroids = np.load(path / _FILES["reference"])
        if (path / _FILES["cell_types"]).exists():
            from ..analysis.annotate import CellTypeReference

            model.cell_types = CellTypeReference.load(path / _FILES["cell_types"])
        return model


def _contrastive_encoder(module):
    """The :class:`ContrastiveEncoder` of a model's encoder (itself, or the one a fused embedder wraps)."""
    return getattr(module, "encoder", module)


def _saved_model_id(path: Path) -> str | None:
    """The id of the model saved in ``path``, ``""`` for a model saved without one, ``None`` if none."""
    history = path / _FILES["history"]
    if not history.exists():
        return None
    try:
        return str(json.loads(history.read_text()).get("model_id", ""))
    except (ValueError, AttributeError):
        return ""


def _labels(adata, label_key: str | None):
    if label_key is None:
        return None
    if label_key not in adata.obs:
        msg = f"label key {label_key!r} not found in obs; available columns: {list(adata.obs.columns)}"
        raise KeyError(msg)
    return np.asarray(adata.obs[label_key].astype(str))


def _categorical(values):
    import pandas as pd

    return pd.Categorical(np.asarray(values, dtype=str))
