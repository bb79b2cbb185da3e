"""Splat count simulator (Zappia et al. 2017), as used for the paper's simulated benchmarks.

A numpy port of splatter's ``splatSimulate(method="groups")`` for a single batch: gamma gene
means with log-normal expression outliers, log-normal library sizes, per-group log-normal DE
factors, a BCV-driven gamma-Poisson mixture and logistic ("experiment") dropout. The grids of
Ciortan & Defrance (2021) are available as :func:`balanced_grid` and :func:`imbalanced_grid`.

Random numbers come from one ``np.random.default_rng(seed)``. The three cells x genes stages
(gamma, Poisson, dropout) each draw from their own child generator spawned from it, so the
result does not depend on the chunk size, and two runs that differ only in ``dropout_mid`` share
their true counts and uniform draws: the entries dropped at a lower ``dropout_mid`` are a subset
of those dropped at a higher one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import anndata

#: Dropout models implemented (splatter's "batch", "group" and "cell" need several batches or
#: per-group parameters, which this single-batch port does not have).
DROPOUT_TYPES = ("none", "experiment")

#: ``dropout_mid`` levels of the paper's grids.
GRID_DROPOUT_MIDS = (-1.0, 0.0, 1.0, 1.5)
#: Group counts of the paper's grids.
GRID_GROUP_COUNTS = (4, 8, 16)
#: Cells per group in the balanced grid.
BALANCED_CELLS_PER_GROUP = 250
#: Cells in every imbalanced dataset.
IMBALANCED_N_CELLS = 3000
#: Genes in every grid dataset.
GRID_N_GENES = 2500
#: DE factor scale used by both grids.
GRID_DE_FAC_SCALE = 0.2
#: Largest and smallest raw proportion of the imbalanced grid (see :func:`imbalanced_group_prob`).
IMBALANCED_PROB_RANGE = (0.6, 0.01)

_DEFAULT_CHUNK_SIZE = 10_000
_GROUP_PROB_TOL = 1e-6


def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass, but True cells is a bug, not a size
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        msg = f"{name}: expected an integer >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _check_float(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    allow_inf: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name}: expected a real number, got {value!r}"
        raise ValueError(msg)
    x = float(value)
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        msg = f"{name}: expected a finite number, got {value!r}"
        raise ValueError(msg)
    if x < low or x > high or (low_open and x == low):
        left = "(" if low_open else "["
        msg = f"{name}: expected a value in {left}{low:g}, {high:g}], got {value!r}"
        raise ValueError(msg)
    return x


@dataclass(frozen=True)
class SplatParams:
    """Parameters of one Splat simulation (splatter names in brackets).

    Parameters
    ----------
    n_cells, n_genes
        Matrix size (``batchCells``, ``nGenes``).
    group_prob
        Probability of each group (``group.prob``); non-negative, sums to 1 within 1e-6.
    mean_shape, mean_rate
        Gamma distribution of the base gene means (``mean.shape``, ``mean.rate``).
    lib_loc, lib_scale
        Log-normal distribution of the expected library sizes (``lib.loc``, ``lib.scale``).
    out_prob, out_fac_loc, out_fac_scale
        Probability that a gene is an expression outlier and the log-normal distribution of
        its factor (``out.prob``, ``out.facLoc``, ``out.facScale``).
    de_prob, de_down_prob, de_fac_loc, de_fac_scale
        Per group: probability that a gene is DE, that a DE gene is down-regulated, and the
        log-normal distribution of the DE factor (``de.prob``, ``de.downProb``, ...).
    bcv_common, bcv_df
        Common biological coefficient of variation and its scaled inverse chi-squared degrees
        of freedom (``bcv.common``, ``bcv.df``); ``bcv_df=inf`` turns the gene-wise noise off.
    dropout_type
        ``"none"`` or ``"experiment"`` (one logistic curve for every cell).
    dropout_mid, dropout_shape
        Midpoint (in log mean) and slope of the logistic dropout curve.
    seed
        Seed of the single ``np.random.default_rng``.
    """

    n_cells: int = 1000
    n_genes: int = 2500
    group_prob: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    mean_shape: float = 0.6
    mean_rate: float = 0.3
    lib_loc: float = 11.0
    lib_scale: float = 0.2
    out_prob: float = 0.05
    out_fac_loc: float = 4.0
    out_fac_scale: float = 0.5
    de_prob: float = 0.1
    de_down_prob: float = 0.5
    de_fac_loc: float = 0.1
    de_fac_scale: float = 0.4
    bcv_common: float = 0.1
    bcv_df: float = 60.0
    dropout_type: str = "experiment"
    dropout_mid: float = 0.0
    dropout_shape: float = -1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Validate (and normalise types) at construction so an invalid SplatParams never
        # exists; dataclasses.replace goes through here too.
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("n_cells", _check_int("n_cells", self.n_cells, 1))
        put("n_genes", _check_int("n_genes", self.n_genes, 1))
        put("seed", _check_int("seed", self.seed, 0))
        put("group_prob", _check_group_prob(self.group_prob))
        put("mean_shape", _check_float("mean_shape", self.mean_shape, low=0.0, low_open=True))
        put("mean_rate", _check_float("mean_rate", self.mean_rate, low=0.0, low_open=True))
        put("lib_loc", _check_float("lib_loc", self.lib_loc))
        put("lib_scale", _check_float("lib_scale", self.lib_scale, low=0.0))
        for name in ("out_prob", "de_prob", "de_down_prob"):
            put(name, _check_float(name, getattr(self, name), low=0.0, high=1.0))
        for name in ("out_fac_loc", "de_fac_loc", "dropout_mid", "dropout_shape"):
            put(name, _check_float(name, getattr(self, name)))
        for name in ("out_fac_scale", "de_fac_scale", "bcv_common"):
            put(name, _check_float(name, getattr(self, name), low=0.0))
        put("bcv_df", _check_float("bcv_df", self.bcv_df, low=0.0, low_open=True, allow_inf=True))
        if self.dropout_type not in DROPOUT_TYPES:
            msg = f"dropout_type: expected one of {DROPOUT_TYPES}, got {self.dropout_type!r}"
            raise ValueError(msg)

    @property
    def n_groups(self) -> int:
        """Number of groups (length of ``group_prob``)."""
        return len(self.group_prob)


def _check_group_prob(value: Any) -> tuple[float, ...]:
    if isinstance(value, str | bytes) or not hasattr(value, "__len__") or len(value) == 0:
        msg = f"group_prob: expected a non-empty sequence of probabilities, got {value!r}"
        raise ValueError(msg)
    probs = tuple(_check_float("group_prob", p, low=0.0, high=1.0) for p in value)
    total = math.fsum(probs)
    if abs(total - 1.0) > _GROUP_PROB_TOL:
        msg = f"group_prob: expected probabilities summing to 1 (tolerance 1e-6), got sum {total!r}"
        raise ValueError(msg)
    return probs


@dataclass
class SimulatedCounts:
    """Result of :func:`simulate_splat`.

    Attributes
    ----------
    counts
        ``int64`` cells x genes observed counts (after dropout).
    groups
        ``int64`` 0-based group of each cell.
    dropout_rate
        Fraction of all entries that had a non-zero true count and were set to zero by the
        dropout step (so ``sparsity`` = true-zero fraction + ``dropout_rate``).
    sparsity
        Fraction of zero entries in ``counts``.
    params
        The parameters that produced the data.
    """

    counts: np.ndarray
    groups: np.ndarray
    dropout_rate: float
    sparsity: float
    params: SplatParams

    def to_anndata(self) -> anndata.AnnData:
        """Return an AnnData with ``float32`` CSR counts and the groups in ``obs``.

        ``obs["label"]`` holds the 0-based group (int), ``obs["group"]`` the categorical
        ``"Group1"``... name, and ``uns["simulation"]`` the parameters plus the realised
        ``dropout_rate`` and ``sparsity``.
        """
        import anndata as ad
        import pandas as pd
        import scipy.sparse as sp

        n_cells, n_genes = self.counts.shape
        names = [f"Group{k + 1}" for k in range(self.params.n_groups)]
        obs = pd.DataFrame(
            {
                "label": self.groups.astype(np.int64),
                "group": pd.Categorical.from_codes(self.groups, categories=names),
            },
            index=pd.Index([f"Cell{i + 1}" for i in range(n_cells)]),
        )
        var = pd.DataFrame(index=pd.Index([f"Gene{j + 1}" for j in range(n_genes)]))
        x = _counts_to_csr(self.counts, sp)
        info = asdict(self.params)
        # h5ad stores lists, not tuples
        info["group_prob"] = list(info["group_prob"])
        info["dropout_rate"] = float(self.dropout_rate)
        info["sparsity"] = float(self.sparsity)
        return ad.AnnData(X=x, obs=obs, var=var, uns={"simulation": info})


def _counts_to_csr(counts: np.ndarray, sp: Any, chunk_size: int = _DEFAULT_CHUNK_SIZE) -> Any:
    """Dense counts -> float32 CSR, built by row blocks.

    ``scipy.sparse.csr_matrix(dense)`` makes int64 row and column arrays for every non-zero at
    once (several GB at 50,000 x 2,000); this keeps the temporaries to one block.
    """
    n_rows, n_cols = counts.shape
    row_nnz = np.count_nonzero(counts, axis=1)
    nnz = int(row_nnz.sum())
    index_dtype = np.int32 if max(nnz, n_cols) < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n_rows + 1, dtype=index_dtype)
    np.cumsum(row_nnz, out=indptr[1:])
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=index_dtype)
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        block = counts[start:stop]
        # np.nonzero walks the block in row-major order, which is CSR order
        rows, cols = np.nonzero(block)
        lo, hi = int(indptr[start]), int(indptr[stop])
        data[lo:hi] = block[rows, cols]
        indices[lo:hi] = cols
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))


def _lognormal_factors(
    rng: np.random.Generator, n: int, sel_prob: float, neg_prob: float, loc: float, scale: float
) -> np.ndarray:
    """Splatter's ``getLNormFactors``: 1 for unselected entries, a log-normal factor otherwise.

    A factor below 1 has its direction reversed, so the up/down split follows ``neg_prob``
    whatever the sign of ``loc``.
    """
    factors = np.ones(n)
    selected = rng.random(n) < sel_prob
    n_sel = int(selected.sum())
    direction = np.where(rng.random(n_sel) < neg_prob, -1.0, 1.0)
    facs = rng.lognormal(loc, scale, n_sel)
    direction[facs < 1] *= -1.0
    factors[selected] = facs**direction
    return factors


def simulate_splat(
    params: SplatParams | None = None, *, chunk_size: int = _DEFAULT_CHUNK_SIZE, **overrides: Any
) -> SimulatedCounts:
    """Simulate a counts matrix with the Splat model (splatter's ``splatSimulate``, groups).

    Parameters
    ----------
    params
        Simulation parameters; defaults to ``SplatParams()``.
    chunk_size
        Cells drawn at a time in the cells x genes stages; bounds the temporary memory
        (about 30 bytes per entry of a chunk) and does not change the result.
    **overrides
        ``SplatParams`` fields replacing those of ``params``.

    Returns
    -------
    SimulatedCounts with ``int64`` counts (cells x genes) and 0-based groups.
    """
    params = params if params is not None else SplatParams()
    if not isinstance(params, SplatParams):
        msg = f"params: expected a SplatParams or None, got {type(params).__name__}"
        raise TypeError(msg)
    if overrides:
        fields = {f.name for f in dataclasses.fields(SplatParams)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            msg = f"overrides: expected SplatParams fields, got unknown {unknown}"
            raise TypeError(msg)
        params = dataclasses.replace(params, **overrides)
    chunk_size = _check_int("chunk_size", chunk_size, 1)

    p = params
    n_cells, n_genes = p.n_cells, p.n_genes
    rng = np.random.default_rng(p.seed)
    gamma_rng, poisson_rng, dropout_rng = rng.spawn(3)

    # Cell-level draws. Renormalise because numpy's choice is stricter than our 1e-6 tolerance.
    group_prob = np.asarray(p.group_prob) / math.fsum(p.group_prob)
    groups = rng.choice(p.n_groups, size=n_cells, p=group_prob).astype(np.int64)
    lib_sizes = rng.lognormal(p.lib_loc, p.lib_scale, n_cells)

    props32, bcv_gene = _gene_model(p, rng)
    counts = np.empty((n_cells, n_genes), dtype=np.int64)
    n_dropped = 0
    n_zero = 0
    for start in range(0, n_cells, chunk_size):
        rows = slice(start, min(start + chunk_size, n_cells))
        block = counts[rows]
        n_dropped += _draw_counts(p, props32[groups[rows]], lib_sizes[rows], bcv_gene, block,
                                  gamma_rng, poisson_rng, dropout_rng)
        n_zero += block.size - int(np.count_nonzero(block))

    n_entries = n_cells * n_genes
    return SimulatedCounts(
        counts=counts,
        groups=groups,
        dropout_rate=n_dropped / n_entries,
        sparsity=n_zero / n_entries,
        params=params,
    )


def _gene_model(p: SplatParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-group expression proportions ``(groups, genes)`` and gene-wise BCV factors, float32."""
    n_genes = p.n_genes
    # Gene means; splatter replaces an outlier's mean by median(base means) * factor.
    base_means = rng.gamma(p.mean_shape, 1.0 / p.mean_rate, n_genes)
    out_facs = _lognormal_factors(rng, n_genes, p.out_prob, 0.0, p.out_fac_loc, p.out_fac_scale)
    gene_means = np.where(out_facs != 1.0, np.median(base_means) * out_facs, base_means)

    # Per-group DE, then each group's expression proportions; with one batch every cell of a
    # group shares them, so the cell means are lib_size * props[group].
    props = np.empty((p.n_groups, n_genes))
    for k in range(p.n_groups):
        de = _lognormal_factors(rng, n_genes, p.de_prob, p.de_down_prob, p.de_fac_loc, p.de_fac_scale)
        group_means = gene_means * de
        props[k] = group_means / group_means.sum()

    # Gene-wise BCV inflation (one chi-squared draw per gene, recycled over cells as in R).
    if math.isinf(p.bcv_df):
        bcv_gene = np.ones(n_genes)
    else:
        bcv_gene = np.sqrt(p.bcv_df / rng.chisquare(p.bcv_df, n_genes))
    return props.astype(np.float32), bcv_gene.astype(np.float32)


def _draw_counts(p: SplatParams, props: np.ndarray, lib_sizes: np.ndarray, bcv_gene: np.ndarray, block: np.ndarray,
                 gamma_rng: np.random.Generator, poisson_rng: np.random.Generator,
                 dropout_rng: np.random.Generator) -> int:
    """Fill ``block`` (cells x genes) with observed counts; return how many entries dropout zeroed.

    ``props`` holds each cell's group proportions (a fresh float32 array: it is overwritten).
    """
    # float32 is ample for means (a Poisson draw is far noisier than 1e-7 relative error)
    # and halves the chunk temporaries.
    base = props
    base *= lib_sizes.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bcv2 = 1.0 / np.sqrt(base)
        bcv2 += np.float32(p.bcv_common)
        bcv2 *= bcv_gene
        np.square(bcv2, out=bcv2)
        # Gamma(shape=1/bcv^2, scale=base*bcv^2) = standard_gamma(1/bcv^2) * base * bcv^2
        trend = gamma_rng.standard_gamma(1.0 / bcv2, dtype=np.float32)
        base *= bcv2
        trend *= base
    del bcv2, base
    # A zero base mean (underflow, or a zero-proportion gene) gives 0 * inf = nan above;
    # its trend mean is 0.
    np.nan_to_num(trend, copy=False, nan=0.0)
    block[...] = poisson_rng.poisson(trend)
    if p.dropout_type != "experiment":
        return 0
    # splatter: P(drop) = logistic(log(trend mean); x0=mid, k=shape), from the
    # BCV-adjusted means ("CellMeans"), not the base means.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        np.log(trend, out=trend)
        trend -= np.float32(p.dropout_mid)
        trend *= np.float32(-p.dropout_shape)
        np.exp(trend, out=trend)
    trend += 1.0
    np.reciprocal(trend, out=trend)  # = drop probability
    drop = dropout_rng.random(trend.shape, dtype=np.float32) < trend
    del trend
    drop &= block > 0
    block[drop] = 0
    return int(np.count_nonzero(drop))


def simulate_splat_blocks(params: SplatParams, block_cells: int = 50_000):
    """Simulate a large Splat dataset a block of cells at a time, as float32 CSR blocks.

    One set of gene parameters (means, outliers, per-group DE, BCV) is drawn from ``params.seed``
    and shared by every block, so the groups are the same populations throughout; each block
    draws its own cells (group, library size, counts) from generators spawned per block. The
    values differ from :func:`simulate_splat` with the same seed (the random streams are laid
    out differently) but follow the same model. Memory is that of one dense block.

    Parameters
    ----------
    params
        Simulation parameters; ``n_cells`` is the total over all blocks.
    block_cells
        Cells per block.

    Yields
    ------
    ``(counts, groups)``: a ``scipy.sparse.csr_matrix`` float32 block and its 0-based groups.
    """
    import scipy.sparse as sp

    block_cells = _check_int("block_cells", block_cells, 1)
    p = params
    rng = np.random.default_rng(p.seed)
    props32, bcv_gene = _gene_model(p, rng)
    group_prob = np.asarray(p.group_prob) / math.fsum(p.group_prob)
    starts = range(0, p.n_cells, block_cells)
    for start, block_rng in zip(starts, rng.spawn(len(starts))):
        n = min(block_cells, p.n_cells - start)
        cell_rng, gamma_rng, poisson_rng, dropout_rng = block_rng.spawn(4)
        groups = cell_rng.choice(p.n_groups, size=n, p=group_prob).astype(np.int64)
        lib_sizes = cell_rng.lognormal(p.lib_loc, p.lib_scale, n)
        block = np.empty((n, p.n_genes), dtype=np.int64)
        _draw_counts(p, props32[groups], lib_sizes, bcv_gene, block, gamma_rng, poisson_rng, dropout_rng)
        yield _counts_to_csr(block, sp), groups


def imbalanced_group_prob(n_groups: int) -> tuple[float, ...]:
    """Decreasing group proportions of the imbalanced grid.

    Rule: a geometric sequence from 0.6 down to 0.01,
    ``raw_i = 0.6 * (0.01 / 0.6) ** (i / (n_groups - 1))`` for ``i = 0 .. n_groups - 1``,
    divided by its sum. The largest group is thus always 60 times the smallest, with a
    constant ratio between neighbours (4 groups: 0.748, 0.191, 0.049, 0.012).

    Parameters
    ----------
    n_groups
        Number of groups, at least 2.

    Returns
    -------
    Proportions summing to 1, largest first.
    """
    n_groups = _check_int("n_groups", n_groups, 2)
    high, low = IMBALANCED_PROB_RANGE
    raw = high * (low / high) ** (np.arange(n_groups) / (n_groups - 1))
    probs = raw / raw.sum()
    return tuple(float(x) for x in probs)


def balanced_grid(seed: int = 0) -> list[SplatParams]:
    """The paper's balanced grid: 250 cells per group, 4/8/16 groups x 4 ``dropout_mid``.

    2500 genes, ``de_fac_scale=0.2``, equal ``group_prob``, splatter defaults otherwise. All 12
    share ``seed``, so the datasets of one group count differ only by their dropout.
    """
    return [
        SplatParams(
            n_cells=BALANCED_CELLS_PER_GROUP * n_groups,
            n_genes=GRID_N_GENES,
            group_prob=(1.0 / n_groups,) * n_groups,
            de_fac_scale=GRID_DE_FAC_SCALE,
            dropout_mid=mid,
            seed=seed,
        )
        for n_groups in GRID_GROUP_COUNTS
        for mid in GRID_DROPOUT_MIDS
    ]


def imbalanced_grid(seed: int = 0) -> list[SplatParams]:
    """The paper's imbalanced grid: 3000 cells, 4/8/16 groups x 4 ``dropout_mid``.

    2500 genes, ``de_fac_scale=0.2``, group proportions from :func:`imbalanced_group_prob`.
    """
    return [
        SplatParams(
            n_cells=IMBALANCED_N_CELLS,
            n_genes=GRID_N_GENES,
            group_prob=imbalanced_group_prob(n_groups),
            de_fac_scale=GRID_DE_FAC_SCALE,
            dropout_mid=mid,
            seed=seed,
        )
        for n_groups in GRID_GROUP_COUNTS
        for mid in GRID_DROPOUT_MIDS
    ]


def grid_name(params: SplatParams) -> str:
    """Stable, filename-safe name such as ``"balanced-g4-dm1.5"`` or ``"imbalanced-g8-dm-1"``.

    "balanced" means all group proportions are equal (to 1e-9); without dropout the suffix is
    ``"nodrop"``. The seed and sizes are not part of the name.
    """
    probs = np.asarray(params.group_prob)
    kind = "balanced" if np.allclose(probs, probs[0], rtol=0.0, atol=1e-9) else "imbalanced"
    if params.dropout_type == "none":
        drop = "nodrop"
    else:
        # repr-like shortest form: -1.0 -> "-1", 1.5 -> "1.5"; never an exponent for grid values
        # + 0.0 turns -0.0 into 0.0
        drop = f"dm{params.dropout_mid + 0.0:g}"
    return f"{kind}-g{params.n_groups}-{drop}"


def simulated_dataset(spec: str = "simulated", seed: int = 0) -> anndata.AnnData:
    """The built-in labelled dataset: 1,200 cells x 2,000 genes from the Splat simulator.

    ``spec`` is ``"simulated"`` (6 groups) or ``"simulated:N"`` (N groups); labels are in
    ``obs["label"]``.
    """
    _, _, groups = spec.partition(":")
    try:
        n_groups = int(groups) if groups else 6
    except ValueError:
        msg = f"expected 'simulated' or 'simulated:N' with N groups, got {spec!r}"
        raise ValueError(msg) from None
    sim = simulate_splat(n_cells=1200, n_genes=2000, group_prob=tuple([1 / n_groups] * n_groups),
                         de_fac_scale=0.5, dropout_mid=0.0, seed=seed)
    adata = sim.to_anndata()
    adata.uns["dataset"] = {"name": f"simulated-splat-{n_groups}groups", "path": None}
    return adata
