"""Configuration as data: one frozen dataclass per concern, and named presets.

The same flat dictionary (:meth:`ContrastiveConfig.to_params`) is logged to MLflow as
parameters and saved next to the weights, so a run can always be rebuilt from its record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Gene counts tried when ``n_genes="auto"`` (the paper's Fig. 5 grid).
AUTO_GENE_COUNTS = (500, 1000, 1500, 3000, 5000)
#: What the encoder reads: the genes, or the PCA block's components of them, fixed or trained.
INPUT_PROJECTIONS = ("none", "pca-frozen", "pca-init")
#: What a trained encoder hands on as its embedding (:data:`~contrastive_sc.method.encoder.READOUTS`).
READOUTS = ("output", "unnormalised", "hidden")
#: Clustering methods (:data:`~contrastive_sc.analysis.cluster.METHODS`).
CLUSTER_METHODS = ("kmeans", "leiden", "auto", "birch", "gmm", "meanshift", "spectral", "ward")
#: Largest seed: numpy, igraph and torch all take 32-bit seeds.
MAX_SEED = 2**32 - 1


# ---------------------------------------------------------------------------- the parameter table
@dataclass(frozen=True)
class Setting:
    """How one configuration field is described, typed and bounded: the one source of the CLI options,
    the MLproject ``train`` parameters, the configuration's checks and the served model's checks.

    ``kind`` is ``"int"``, ``"float"``, ``"bool"``, ``"choice"``, ``"choice_list"``, ``"int_list"``
    (positive sizes) or ``"n_genes"`` (a number, ``"auto"`` or ``"all"``). Numbers lie within ``[low, high]``, an end
    excluded where ``low_open`` / ``high_open``; floats must be finite. ``optional``: ``None`` is a
    value. ``on_cli``: offered by ``contrastive-sc train`` and the MLproject (else preset-only).
    """

    help: str
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    on_cli: bool = True

    def describe(self) -> str:
        """What the value must be, in words (for error messages and help)."""
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "choice_list":
            return "a non-empty list of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "bool":
            return "true or false"
        low, high = (str(int(v)) if float(v).is_integer() else f"{v:g}" for v in (self.low, self.high))
        bounds = f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        noun = {"int": "a whole number", "float": "a finite number", "int_list": "comma-separated whole numbers",
                "n_genes": "'auto', 'all' or a whole number"}[self.kind]
        text = f"{noun} within {bounds}" if self.kind != "int_list" else f"{noun}, each within {bounds}"
        return text + (" or none" if self.optional else "")

    def check(self, name: str, value):
        """``value`` if it satisfies this setting (as the field's type), else ``ValueError`` naming ``name``."""
        import math
        import numbers

        def refuse():
            msg = f"{name} must be {self.describe()}, got {value!r}"
            raise ValueError(msg)

        if value is None:
            return None if self.optional else refuse()
        if self.kind == "choice":
            return value if isinstance(value, str) and value in self.choices else refuse()
        if self.kind == "choice_list":
            items = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
            return items if items and all(i in self.choices for i in items) else refuse()
        if self.kind == "bool":
            return bool(value) if isinstance(value, bool) or type(value).__name__ == "bool_" else refuse()
        if self.kind == "n_genes" and isinstance(value, str):
            return value if value in ("auto", "all") else refuse()
        values = tuple(value) if self.kind == "int_list" and isinstance(value, list | tuple) else (value,)
        if self.kind == "int_list" and not values:
            refuse()
        checked = []
        for item in values:
            if isinstance(item, bool) or not isinstance(item, numbers.Real):
                refuse()
            if self.kind != "float" and not isinstance(item, numbers.Integral):
                refuse()
            number = float(item)
            if not math.isfinite(number):
                refuse()
            below = number <= self.low if self.low_open else number < self.low
            above = number >= self.high if self.high_open else number > self.high
            if below or above:
                refuse()
            checked.append(number if self.kind == "float" else int(item))
        return tuple(checked) if self.kind == "int_list" else checked[0]

    def parse(self, name: str, text: str):
        """The value written ``text`` (a command-line or MLproject string), checked."""
        text = str(text).strip()
        if self.optional and text.lower() in ("none", "null"):
            return None
        if self.kind in ("choice", "choice_list") or (self.kind == "n_genes" and text in ("auto", "all")):
            return self.check(name, text)
        if self.kind == "bool":
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
        try:
            if self.kind == "int_list":
                value = tuple(int(v.replace("_", "")) for v in text.replace("/", ",").split(",") if v.strip())
            elif self.kind == "float":
                value = float(text)
            else:
                value = int(text.replace("_", ""))
        except ValueError:
            msg = f"{name} must be {self.describe()}, got {text!r}"
            raise ValueError(msg) from None
        return self.check(name, value)


def setting(default, help: str, kind: str, **options):
    """A dataclass field described by a :class:`Setting`."""
    return field(default=default, metadata={"setting": Setting(help, kind, **options)})


def _check_fields(section) -> None:
    # Every field against its Setting; checked values replace the given ones (a list becomes a tuple).
    for spec in dataclasses.fields(section):
        value = spec.metadata["setting"].check(spec.name, getattr(section, spec.name))
        object.__setattr__(section, spec.name, value)


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw counts become the encoder's input (the paper's preprocessing)."""

    n_genes: int | str = setting(500, "Genes kept: a number of dispersion-ranked genes, 'auto' (chosen by the "
                                      "silhouette of the clustering) or 'all'.", "n_genes", low=2, high=1_000_000)
    min_cells: int = setting(2, "Drop genes detected in fewer cells.", "int", low=0, high=10**9)
    hvg_flavor: str = setting("seurat", "scanpy highly_variable_genes flavor (the paper: seurat).", "choice",
                              choices=("seurat", "cell_ranger"), on_cli=False)
    clip: float | None = setting(None, "Clip scaled values to [-clip, clip] (the paper: none).", "float",
                                 low=0, high=1e6, low_open=True, optional=True)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class EncoderConfig:
    """The MLP encoder, and an optional PCA block embedded beside it (the ``fused`` preset)."""

    layers: tuple[int, ...] = setting((200, 40, 60), "Encoder sizes, hidden then output, e.g. 200,40,60.",
                                      "int_list", low=1, high=100_000)
    batch_norm: bool = setting(True, "BatchNorm before each hidden ReLU.", "bool", on_cli=False)
    pca_components: int = setting(0, "Principal components embedded beside the encoder's output, each block "
                                     "scaled to the same weight (0: none) [fused: 50].", "int", low=0, high=10_000)
    pca_genes: int = setting(500, "Genes the PCA block reads (the first of the same dispersion ranking).", "int",
                             low=2, high=1_000_000)
    encoder_weight: float = setting(1.0, "RMS norm of the encoder block relative to the PCA block's.", "float",
                                    low=0, high=100, low_open=True, on_cli=False)
    readout: str = setting("output", "What the encoder hands on: the L2-normalised output (the paper), the output "
                                     "before normalisation, or the first hidden layer.", "choice", choices=READOUTS,
                           on_cli=False)
    input_projection: str = setting("none", "What the encoder reads: the genes, or the PCA block's components of "
                                            "them, fixed or trained from there.", "choice",
                                    choices=INPUT_PROJECTIONS, on_cli=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.readout == "hidden" and len(self.layers) < 2:
            msg = f"readout 'hidden' needs at least one hidden layer; layers are {list(self.layers)}"
            raise ValueError(msg)
        if self.input_projection != "none" and self.pca_components < 1:
            msg = (f"input_projection {self.input_projection!r} projects on the PCA block's components: it needs "
                   f"pca_components >= 1, got {self.pca_components}")
            raise ValueError(msg)


@dataclass(frozen=True)
class TrainConfig:
    """Contrastive training: augmentation, loss and optimiser settings."""

    input_dropout: float = setting(0.9, "Fraction of genes masked in each view (0.9 keeps 10 %).", "float",
                                   low=0, high=1, high_open=True)
    noise_std: float = setting(0.0, "Gaussian noise added to the views.", "float", low=0, high=100)
    temperature: float = setting(0.07, "NT-Xent temperature.", "float", low=0, high=100, low_open=True)
    lr: float = setting(0.4, "Adam learning rate.", "float", low=0, high=10, low_open=True)
    lr_schedule: str = setting("cosine", "Learning-rate schedule.", "choice", choices=("cosine", "constant"))
    lr_cosine_epochs: int | None = setting(None, "Half period of the cosine schedule in epochs (none: the epochs) "
                                                 "[paper: 500, as the authors' code].", "int", low=1, high=10**6,
                                           optional=True)
    epochs: int = setting(30, "Training epochs.", "int", low=1, high=10**6)
    batch_size: int = setting(200, "Cells per batch (BatchNorm needs two).", "int", low=2, high=10**7)
    seed: int = setting(0, "Random seed (training, PCA, clustering).", "int", low=0, high=MAX_SEED)
    device: str = setting("auto", "Training device (auto: CUDA when available).", "choice",
                          choices=("auto", "cpu", "cuda"))
    positive_neighbours: int = setting(0, "Positives drawn among each cell's nearest neighbours (0: the cell's "
                                          "own other view).", "int", low=0, high=1000, on_cli=False)
    cluster_head: int = setting(0, "Clusters of the cluster-level loss (0: off, else >= 2).", "int", low=0,
                                high=10_000, on_cli=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.cluster_head == 1:
            msg = "cluster_head must be 0 (off) or >= 2 clusters, got 1"
            raise ValueError(msg)


@dataclass(frozen=True)
class ClusterConfig:
    """Which clusterings a run scores, and their settings (also the served model's defaults and bounds)."""

    methods: tuple[str, ...] = setting(("kmeans", "leiden"), "Clustering methods scored by a run.", "choice_list",
                                       choices=CLUSTER_METHODS, on_cli=False)
    n_clusters: int | None = setting(None, "k for KMeans [default: the number of cell types with --label-key].",
                                     "int", low=1, high=100_000, optional=True)
    resolution: float = setting(1.0, "Leiden resolution.", "float", low=0, high=1000, low_open=True)
    n_neighbors: int = setting(15, "Neighbours per cell in the kNN graph of Leiden and auto.", "int", low=2,
                               high=1000)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class ContrastiveConfig:
    """Everything that defines a model, grouped by concern."""

    preset: str = "paper"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_params(self) -> dict[str, Any]:
        """Flat ``{name: value}`` of every setting (names are unique across concerns)."""
        params: dict[str, Any] = {"preset": self.preset}
        for section in (self.preprocess, self.encoder, self.train, self.cluster):
            for key, value in dataclasses.asdict(section).items():
                params[key] = list(value) if isinstance(value, tuple) else value
        return params

    def replace(self, **overrides: Any) -> ContrastiveConfig:
        """Return a copy with flat overrides applied (``None`` values are ignored)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        sections = {}
        for name in ("preprocess", "encoder", "train", "cluster"):
            section = getattr(self, name)
            own = {f.name for f in dataclasses.fields(section)}
            changes = {k: _as_field_value(v) for k, v in overrides.items() if k in own}
            sections[name] = dataclasses.replace(section, **changes)
        known = set(self.to_params())
        unknown = sorted(set(overrides) - known)
        if unknown:
            msg = f"unknown setting(s) {unknown}; expected some of {sorted(known)}"
            raise ValueError(msg)
        return ContrastiveConfig(preset=overrides.get("preset", self.preset), **sections)

    def check_data_size(self, n_cells: int, n_genes: int) -> None:
        """Refuse, before any training, data too small for these settings (clusters, kNN graph, genes)."""
        cluster = self.cluster
        problems = [
            (n_cells < 3, f"training needs at least 3 cells, got {n_cells}"),
            (cluster.n_clusters is not None and cluster.n_clusters > n_cells,
             f"n_clusters={cluster.n_clusters} but the data has only {n_cells} cells; ask for at most {n_cells}"),
            (cluster.n_neighbors >= n_cells,
             f"n_neighbors={cluster.n_neighbors} needs more cells than neighbours; the data has {n_cells}"),
            (n_genes < 2, f"the data has {n_genes} gene(s); at least 2 are needed"),
        ]
        for failed, msg in problems:
            if failed:
                raise ValueError(msg)

    def to_json(self) -> str:
        return json.dumps(self.to_params(), indent=2, sort_keys=True)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ContrastiveConfig:
        """Inverse of :meth:`to_params`."""
        return cls().replace(**params)


def _as_field_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _paper() -> ContrastiveConfig:
    # Ciortan & Defrance 2021, Methods: 500 genes, [200, 40, 60], NN dropout 0.9, NT-Xent
    # at temperature 0.07, Adam lr 0.4 with a cosine schedule, 30 epochs, batches of 200.
    # The authors' code sets the cosine period to 500 epochs whatever the number trained
    # (train.adjust_learning_rate), so over 30 epochs the rate stays near 0.4; a 30-epoch
    # period loses ~0.1 ARI on worm neuron with 5000 genes (0.39 against 0.50, seeds 0-2).
    return ContrastiveConfig(preset="paper", train=TrainConfig(lr_cosine_epochs=500))


def _fused() -> ContrastiveConfig:
    # The recommended default. Two changes to the paper, chosen on the benchmark's six datasets
    # with the same settings for all (docs/results.md):
    # - the encoder reads 2000 genes and trains gently (lr 1e-3, temperature 0.5): with more
    #   genes each 10 % view still carries enough signal, and the softer loss keeps rare types
    #   apart instead of spreading every cell evenly over the sphere;
    # - its 60-d output is clustered side by side with 50 principal components of the paper's
    #   500-gene input, each block scaled to the same weight. The two disagree where each fails
    #   (PCA on sparse worm neurons, the encoder on bladder's small classes), so together they
    #   beat both. Leiden then works best on a coarser graph (resolution 0.5, 30 neighbours).
    paper = _paper()
    return ContrastiveConfig(
        preset="fused",
        preprocess=dataclasses.replace(paper.preprocess, n_genes=2000),
        encoder=dataclasses.replace(paper.encoder, pca_components=50, pca_genes=500),
        train=dataclasses.replace(paper.train, lr=1e-3, temperature=0.5),
        cluster=dataclasses.replace(paper.cluster, resolution=0.5, n_neighbors=30),
    )


def _pcres() -> ContrastiveConfig:
    # Research preset (docs/results.md): scanpy's PCA baseline with the contrastive output
    # as a second block beside it. The PCA block reads all 2000 input genes (not 500), and scaled
    # values are clipped at 10 as scanpy's scale(max_value=10) does, for the encoder too.
    fused = _fused()
    return ContrastiveConfig(
        preset="pcres",
        preprocess=dataclasses.replace(fused.preprocess, clip=10.0),
        encoder=dataclasses.replace(fused.encoder, pca_genes=2000),
        train=fused.train,
        cluster=fused.cluster,
    )


def _pcres_variant(name: str, **train) -> Callable[[], ContrastiveConfig]:
    # A research preset: ``pcres`` with other training settings.
    def build() -> ContrastiveConfig:
        base = _pcres()
        return dataclasses.replace(base, preset=name, train=dataclasses.replace(base.train, **train))

    return build


def _with_readout(name: str, readout: str) -> ContrastiveConfig:
    base = _pcres_variant(name, cluster_head=20)()
    return dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, readout=readout))


def _with_projection(name: str, projection: str) -> ContrastiveConfig:
    base = _pcres_variant(name, cluster_head=20)()
    return dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, input_projection=projection))


PRESETS = {
    "fused": _fused,
    "paper": _paper,
    # research presets, scored by leave-one-dataset-out selection (docs/results.md)
    "pcres": _pcres,
    "pcres-soft": _pcres_variant("pcres-soft", temperature=1.0),  # weaker uniformity
    "pcres-nn": _pcres_variant("pcres-nn", positive_neighbours=10),  # neighbour positives
    "pcres-cc": _pcres_variant("pcres-cc", cluster_head=20),  # cluster-level loss
    "pcres-nncc": _pcres_variant("pcres-nncc", positive_neighbours=10, cluster_head=20),  # both
    "pcres-half": lambda: dataclasses.replace(  # the encoder block at half the PCA block's weight
        _pcres_variant("pcres-half")(), encoder=dataclasses.replace(_pcres().encoder, encoder_weight=0.5)),
    "pcres-5k": lambda: dataclasses.replace(  # the encoder reads 5000 genes; PCA still the top 2000
        _pcres_variant("pcres-5k")(), preprocess=dataclasses.replace(_pcres().preprocess, n_genes=5000)),
    # pcres-cc read out before the output's L2 normalisation, or at the first hidden layer
    "pcres-cc-unnorm": lambda: _with_readout("pcres-cc-unnorm", "unnormalised"),
    "pcres-cc-hidden": lambda: _with_readout("pcres-cc-hidden", "hidden"),
    # pcres-cc trained on a PCA projection: each masked view (gene masking as in the paper) goes
    # through a linear first layer holding the PCA block's 50 components of the 2000 genes, fixed
    # (the encoder sees only principal components) or initialised there and trained
    "pcres-cc-pcfrozen": lambda: _with_projection("pcres-cc-pcfrozen", "pca-frozen"),
    "pcres-cc-pcinit": lambda: _with_projection("pcres-cc-pcinit", "pca-init"),
}
#: One line per preset, for ``contrastive-sc presets``.
PRESET_NOTES = {
    "fused": "the default: 2,000 genes, gentle training, the encoder beside 50 principal components",
    "paper": "the published method (Ciortan & Defrance 2021): 500 genes, lr 0.4, temperature 0.07",
    "pcres": "research: scanpy's PCA block (2,000 genes, clipped at 10) beside the encoder",
    "pcres-soft": "research: pcres at temperature 1.0",
    "pcres-nn": "research: pcres with positives among 10 nearest neighbours",
    "pcres-cc": "research: pcres with a 20-cluster cluster-level loss",
    "pcres-nncc": "research: pcres with neighbour positives and the cluster-level loss",
    "pcres-half": "research: pcres with the encoder block at half the PCA block's weight",
    "pcres-5k": "research: pcres with the encoder reading 5,000 genes",
    "pcres-cc-unnorm": "research: pcres-cc read out before the L2 normalisation",
    "pcres-cc-hidden": "research: pcres-cc read out at the first hidden layer",
    "pcres-cc-pcfrozen": "research: pcres-cc reading a frozen PCA projection of its input",
    "pcres-cc-pcinit": "research: pcres-cc with its first layer initialised as that PCA projection",
}
#: The preset used when none is named.
DEFAULT_PRESET = "fused"


def get_preset(name: str) -> ContrastiveConfig:
    """Return the named preset's configuration.

    Raises
    ------
    ValueError
        If ``name`` is not a known preset.
    """
    try:
        return PRESETS[name]()
    except KeyError:
        msg = f"unknown preset {name!r}; expected one of {sorted(PRESETS)}"
        raise ValueError(msg) from None


def settings() -> dict[str, Setting]:
    """Every setting of :class:`ContrastiveConfig`, by field name, in field order (names are unique)."""
    return {spec.name: spec.metadata["setting"] for section in (PreprocessConfig, EncoderConfig, TrainConfig,
                                                                ClusterConfig) for spec in dataclasses.fields(section)}


def cli_settings() -> dict[str, Setting]:
    """The settings ``contrastive-sc train`` and the MLproject ``train`` entry offer, in field order."""
    return {name: spec for name, spec in settings().items() if spec.on_cli}
