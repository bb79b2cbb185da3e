"""Annotation benchmark: name the cells of a query from a reference that lacks one of its types.

Eight reference -> query splits (:data:`SPLITS`, the protocol of the study behind the annotator,
docs/annotation.md) x seeds x methods, one row each, scored as that study scored them
(:func:`score`): macro F1 over the known types, the share of the held-out type's cells called
``unassigned``, the share of known cells wrongly unassigned, and the AUROC and calibration error
of the confidence.

Methods (:data:`METHODS`): the package's own annotator (``contrastive``), two baselines run in
this process (``lr-hvg``, ``pca-centroid``) and three tools run by the interpreter of their own
environment through :mod:`external_baselines` (``celltypist``, ``ingest``, ``scanvi``). A method
that cannot run is a row with status ``skipped`` or ``failed`` and the reason; a tool's calls
that fail the sanity check (:func:`check_calls`) are ``rejected`` and stay out of the tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.annotate import UNASSIGNED, expected_calibration_error

DEFAULT_DATA_DIR = "../shared/data"
METHODS = ("contrastive", "lr-hvg", "pca-centroid", "celltypist", "ingest", "scanvi")
#: Tools run by another interpreter: method -> (name, CLI option that gives the interpreter, why apart).
EXTERNAL = {
    "celltypist": ("CellTypist", "--celltypist-python",
                   "CellTypist 1.7.1 needs scikit-learn < 1.8, so it runs in its own environment"),
    "ingest": ("scanpy ingest", "--ingest-python",
               "sc.tl.ingest crashes in pynndescent 0.7.0, so it runs in an environment with pynndescent 0.5.13"),
    "scanvi": ("scANVI", "--scanvi-python", "scvi-tools is not a dependency of contrastive-sc"),
}
#: The balanced logistic regression's setting: the one leave-one-split-out selection picked most often
#: (6 of 8 folds, and on all 8 splits at once) among C in {0.01, 0.1, 1, 10}, unscaled or z-scaled.
LR_C, LR_SCALE = 10.0, True
#: A call whose best probability is below this is unassigned (lr-hvg; scANVI; CellTypist's p_thres).
LR_MIN_PROBABILITY = 0.5
SCORES = ["macro_f1", "held_out_unassigned", "known_unassigned", "auroc", "ece", "seconds"]
COLUMNS = ["dataset", "method", "seed", "split", "status", *SCORES, "n_query", "calls", "note"]
#: A known type with at least this many query cells that a method never names is a sanity warning.
NEVER_CALLED_MIN_CELLS = 20


@dataclass(frozen=True)
class Split:
    """A reference -> query split of one labelled ``.h5ad``.

    Parameters
    ----------
    name
        Row key.
    file
        File name, resolved against the data folder.
    held_out
        The cell type removed from the reference (the query keeps it).
    batch_key
        ``obs`` column the split is over; ``None``: a 50/50 split stratified by cell type, its
        seed the run's seed.
    reference, query
        Batches of ``batch_key`` on each side.
    label_key
        ``obs`` column of the cell types.
    """

    name: str
    file: str
    held_out: str
    batch_key: str | None = None
    reference: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    label_key: str = "celltype"

    @property
    def seeded(self) -> bool:
        """Whether the split itself depends on the seed."""
        return self.batch_key is None

    def load(self, data_dir: str | Path, seed: int):
        """``(reference, query)`` AnnData: raw counts in ``X``, ``obs[label_key]`` as text and
        ``obs["batch_key"]`` (the batch each cell comes from)."""
        import anndata as ad

        adata = ad.read_h5ad(Path(data_dir) / self.file)
        for key in (self.label_key, self.batch_key):
            if key is not None and key not in adata.obs:
                msg = f"{self.file}: obs column {key!r} not found; it has {list(adata.obs.columns)}"
                raise KeyError(msg)
        labels = adata.obs[self.label_key].astype(str).to_numpy()
        adata.obs[self.label_key] = labels
        if self.held_out not in set(labels):
            msg = f"{self.file}: held-out type {self.held_out!r} not in obs[{self.label_key!r}]"
            raise ValueError(msg)
        if self.batch_key is None:
            from sklearn.model_selection import train_test_split

            reference_rows, _ = train_test_split(np.arange(adata.n_obs), test_size=0.5, stratify=labels,
                                                 random_state=seed)
            in_reference = np.zeros(adata.n_obs, dtype=bool)
            in_reference[reference_rows] = True
            in_query = ~in_reference
            adata.obs["batch_key"] = "all"
        else:
            batches = adata.obs[self.batch_key].astype(str).to_numpy()
            in_reference, in_query = np.isin(batches, self.reference), np.isin(batches, self.query)
            if not in_reference.any() or not in_query.any():
                msg = (f"{self.file}: batches {self.reference} -> {self.query} not both in obs[{self.batch_key!r}]; "
                       f"it has {sorted(set(batches))}")
                raise ValueError(msg)
            adata.obs["batch_key"] = batches
        return adata[in_reference & (labels != self.held_out)].copy(), adata[in_query].copy()


SPLITS = {s.name: s for s in (
    Split("baron_m1-m2_ductal", "baron_mouse_pancreas.h5ad", "ductal", "batch", ("mouse1",), ("mouse2",)),
    Split("zilionis_h-t_NK", "zilionis_mouse_lung_indrop_cluey.h5ad", "NK cells", "tissue_state", ("healthy",),
          ("tumor",)),
    Split("zilionis_h-t_Neutro", "zilionis_mouse_lung_indrop_cluey.h5ad", "Neutrophils", "tissue_state",
          ("healthy",), ("tumor",)),
    Split("pbmc3k_half_NK", "pbmc3k_seurat_clustifyrdata.h5ad", "NK"),
    Split("pbmc3k_half_B", "pbmc3k_seurat_clustifyrdata.h5ad", "B"),
    Split("symphony_3pv2-rest_NK", "symphony_pbmc_3tech.h5ad", "NK", "batch", ("3pv2",), ("3pv1", "5p")),
    Split("kang_ctrl-stim_B", "muscat_kang_ifnb.h5ad", "B cells", "batch", ("ctrl",), ("stim",)),
    Split("kang_stim-ctrl_B", "muscat_kang_ifnb.h5ad", "B cells", "batch", ("stim",), ("ctrl",)),
)}


# ---------------------------------------------------------------------- scoring
def score(truth, called, confidence, *, held_out: str, known_types: Iterable[str]) -> dict[str, float]:
    """Every metric of one run.

    ``macro_f1``: over the reference types present among the query's known-type cells
    (``unassigned`` is wrong, ``zero_division=0``); ``held_out_unassigned`` and ``known_unassigned``:
    shares called ``unassigned``; ``auroc`` and ``ece`` (10 bins): of the confidence for "the call
    is right" on the known-type cells that were assigned (NaN without a confidence). Query cells
    of a type neither known nor held out enter no metric.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    truth, called = np.asarray(truth).astype(str), np.asarray(called).astype(str)
    known_types = set(map(str, known_types))
    known = np.isin(truth, sorted(known_types))
    held = truth == held_out
    types = sorted(known_types & set(truth[known]))
    out = {"macro_f1": float(f1_score(truth[known], called[known], labels=types, average="macro", zero_division=0)),
           "held_out_unassigned": float((called[held] == UNASSIGNED).mean()) if held.any() else float("nan"),
           "known_unassigned": float((called[known] == UNASSIGNED).mean()) if known.any() else float("nan"),
           "auroc": float("nan"), "ece": float("nan")}
    if confidence is None or not np.isfinite(np.asarray(confidence, dtype=float)).all():
        return out
    confidence = np.asarray(confidence, dtype=float)
    rows = known & (called != UNASSIGNED)
    correct = called[rows] == truth[rows]
    if 0 < correct.sum() < len(correct):
        out["auroc"] = float(roc_auc_score(correct, confidence[rows]))
    if rows.any():
        out["ece"] = expected_calibration_error(correct, confidence[rows])
    return out


def type_counts(called) -> str:
    """``"type:n, ..."``, most frequent first."""
    counts = pd.Series(np.asarray(called).astype(str)).value_counts()
    return ", ".join(f"{name}:{n}" for name, n in counts.items())


def check_calls(called, confidence, truth, known_types: Iterable[str]) -> tuple[str | None, list[str]]:
    """Sanity of a method's output: ``(problem, warnings)``.

    A problem (the row is rejected): a call count other than the query's, a name outside the
    reference's types, every cell unassigned, every assigned cell one type while the query has
    several known types, a confidence outside [0, 1]. A warning: a known type with at least
    :data:`NEVER_CALLED_MIN_CELLS` query cells that is never called.
    """
    called, truth = np.asarray(called).astype(str), np.asarray(truth).astype(str)
    known_types = set(map(str, known_types))
    if called.shape != truth.shape:
        return f"{called.size} calls for {truth.size} query cells", []
    outside = sorted(set(called) - known_types - {UNASSIGNED})
    if outside:
        return f"calls outside the reference's types: {outside[:5]}", []
    assigned = called[called != UNASSIGNED]
    if not len(assigned):
        return f"all {len(called)} cells unassigned", []
    present = known_types & set(truth)
    if len(set(assigned)) == 1 and len(present) > 1:
        return f"one type ({assigned[0]}) for every assigned cell of {len(present)} known types", []
    if confidence is not None:
        values = np.asarray(confidence, dtype=float)
        finite = values[np.isfinite(values)]
        if len(values) != len(called) or (finite < 0).any() or (finite > 1).any():
            return "confidence missing or outside [0, 1]", []
    warnings = [f"{name} ({n} cells) never called" for name, n in pd.Series(truth).value_counts().items()
                if name in known_types and n >= NEVER_CALLED_MIN_CELLS and name not in set(assigned)]
    return None, warnings


# ---------------------------------------------------------------------- methods in this process
def _contrastive(ref, query, seed, split, options):
    from ..method.model import CELL_TYPE_KEY, CONFIDENCE_KEY, ContrastiveSC

    # clusters are not needed to annotate and do not change the calls
    model = ContrastiveSC(seed=seed, **options.get("contrastive", {})).fit(ref, label_key=split.label_key,
                                                                             clusters=False)
    named = model.annotate(query, copy=True)
    return named.obs[CELL_TYPE_KEY].astype(str).to_numpy(), named.obs[CONFIDENCE_KEY].to_numpy(dtype=float)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def _log_normalised_hvgs(ref, query):
    """log1p(CP10k) of the reference's 2,000 seurat HVGs, for both sides: ``(ref AnnData, query values)``."""
    import scanpy as sc

    r, q = ref.copy(), query.copy()
    for adata in (r, q):
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(r, n_top_genes=min(2000, r.n_vars), flavor="seurat")
    genes = r.var_names[r.var["highly_variable"].to_numpy()]
    return r[:, genes].copy(), _dense(q[:, genes].X)


def _lr_hvg(ref, query, seed, split, options):
    """Class-balanced logistic regression on the reference's log-normalised HVGs, z-scaled (clip 10),
    C = :data:`LR_C`; a best probability under 0.5 is unassigned."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    r, xq = _log_normalised_hvgs(ref, query)
    xr = _dense(r.X)
    if LR_SCALE:
        scaler = StandardScaler().fit(xr)
        xr, xq = np.clip(scaler.transform(xr), -10, 10), np.clip(scaler.transform(xq), -10, 10)
    max_iter = 10_000
    lr = LogisticRegression(C=LR_C, class_weight="balanced", max_iter=max_iter).fit(
        xr, r.obs[split.label_key].to_numpy())
    if lr.n_iter_.max() >= max_iter:
        msg = f"the logistic regression did not converge in {max_iter} iterations"
        raise RuntimeError(msg)
    probs = lr.predict_proba(xq)
    confidence = probs.max(axis=1)
    called = lr.classes_[probs.argmax(axis=1)].astype(object)
    called[confidence < LR_MIN_PROBABILITY] = UNASSIGNED
    return called.astype(str), confidence


def _pca_centroid(ref, query, seed, split, options):
    """scanpy's recipe on the reference (HVGs, scale max 10, PCA 50), the query projected with the
    reference's genes, scaling and PCs; nearest centroid with the neighbour-distance rejection."""
    import scanpy as sc

    r, q_values = _log_normalised_hvgs(ref, query)
    sc.pp.scale(r, max_value=10)
    mean, std = r.var["mean"].to_numpy(), r.var["std"].to_numpy()
    xq = np.clip((q_values - mean) / std, -10, 10)
    sc.pp.pca(r, n_comps=min(50, r.n_obs - 1, r.n_vars - 1), random_state=seed)
    return NeighbourDistanceCentroids.fit(r.obsm["X_pca"], r.obs[split.label_key].to_numpy(), seed=seed).annotate(
        (xq @ r.varm["PCs"]).astype(np.float32))


class NeighbourDistanceCentroids:
    """Nearest centroid with rejection by the distance to the ``k`` nearest reference cells.

    The project's annotator before the calibrated heads (the study's baseline B2 runs it on a
    PCA): a cell takes the nearest centroid's type; its confidence is the share of that type's
    reference cells whose mean distance to their ``k`` nearest reference cells is larger than the
    cell's; below ``min_confidence`` it is unassigned (5 % of a type's own cells would be).
    """

    LEVELS = np.linspace(0.0, 1.0, 201)

    def __init__(self, names, centroids, cells, quantiles, n_neighbors: int, min_confidence: float) -> None:
        self.names, self.centroids, self.cells, self.quantiles = names, centroids, cells, quantiles
        self.n_neighbors, self.min_confidence = n_neighbors, min_confidence

    @classmethod
    def fit(cls, x, labels, *, n_neighbors: int = 15, min_confidence: float = 0.05, sample: int = 5000,
            seed: int = 0) -> NeighbourDistanceCentroids:
        x, labels = np.asarray(x, dtype=np.float32), np.asarray(labels).astype(str)
        names = np.unique(labels)
        centroids = np.stack([x[labels == name].mean(axis=0) for name in names])
        keep = (np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False)) if len(x) > sample
                else np.arange(len(x)))
        distance = _mean_neighbour_distance(x, x[keep], n_neighbors, exclude=keep)  # a cell is not its own neighbour
        nearest = _nearest(x, centroids)
        quantiles = np.stack([np.quantile(distance[nearest == t], cls.LEVELS) if (nearest == t).any()
                              else np.full(len(cls.LEVELS), np.inf) for t in range(len(names))])
        return cls(names, centroids.astype(np.float32), x[keep], quantiles.astype(np.float32), n_neighbors,
                   min_confidence)

    def annotate(self, x) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        nearest = _nearest(x, self.centroids)
        distance = _mean_neighbour_distance(x, self.cells, self.n_neighbors)
        confidence = np.empty(len(x))
        for t in np.unique(nearest):
            rows = nearest == t
            confidence[rows] = 1.0 - np.interp(distance[rows], self.quantiles[t], self.LEVELS)
        called = self.names.astype(object)[nearest]
        called[confidence < self.min_confidence] = UNASSIGNED
        return called.astype(str), confidence


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return (-2 * x @ centroids.T + (centroids**2).sum(axis=1)).argmin(axis=1)


def _mean_neighbour_distance(queries, cells, k: int, *, exclude=None, block: int = 2048) -> np.ndarray:
    """Mean Euclidean distance of each query to its ``k`` nearest ``cells`` (``exclude[j] = i``:
    ``cells[j]`` is ``queries[i]``)."""
    out = np.empty(len(queries))
    cell_norms = (cells.astype(np.float64) ** 2).sum(axis=1)
    owner = np.full(len(queries), -1, dtype=np.int64)
    if exclude is not None:
        owner[exclude] = np.arange(len(exclude))
    for start in range(0, len(queries), block):
        part = queries[start:start + block].astype(np.float64)
        squared = (part**2).sum(axis=1, keepdims=True) - 2 * part @ cells.T.astype(np.float64) + cell_norms
        rows = np.nonzero(owner[start:start + block] >= 0)[0]
        squared[rows, owner[start:start + block][rows]] = np.inf
        out[start:start + block] = np.sqrt(np.maximum(np.partition(squared, k - 1, axis=1)[:, :k], 0.0)).mean(axis=1)
    return out


IN_PROCESS: dict[str, Callable] = {"contrastive": _contrastive, "lr-hvg": _lr_hvg, "pca-centroid": _pca_centroid}


# ---------------------------------------------------------------------- tools in their own environments
SCRIPT = Path(__file__).with_name("external_baselines.py")


class ToolUnavailable(Exception):
    """The tool cannot run here (the message says why and how to fix it)."""


class ToolFailed(Exception):
    """The tool's process ended without calls (the message: its last line on stderr)."""


def check_tool(method: str, python: str | None) -> str:
    """The tool's versions as text, or :class:`ToolUnavailable` with the reason."""
    versions = tool_versions(method, python, EXTERNAL)
    return ", ".join(f"{package} {v}" for package, v in versions.items())


def tool_versions(tool: str, python: str | None, external: Mapping[str, tuple[str, str, str]]) -> dict[str, str]:
    """Package -> version of ``tool`` in the environment of ``python``, or :class:`ToolUnavailable`.

    ``external[tool]`` is (name, CLI option that gives the interpreter, why it runs apart), for
    the messages: ``annotation-benchmark``'s :data:`EXTERNAL` or ``benchmark``'s own.
    """
    name, option, why = external[tool]
    if not python:
        msg = f"no interpreter for {name}; pass {option} PYTHON ({why})"
        raise ToolUnavailable(msg)
    try:
        done = subprocess.run([python, str(SCRIPT), "check", tool], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        msg = f"{option} {python} cannot be run: {error}"
        raise ToolUnavailable(msg) from None
    if done.returncode != 0:
        msg = f"{option} {python}: {_last_line(done.stderr) or f'exit code {done.returncode}'}"
        raise ToolUnavailable(msg)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_tool(method: str, python: str, ref, query, seed: int, split: Split) -> tuple[np.ndarray, np.ndarray, float]:
    """Run one tool through temporary files: ``(called, confidence, seconds)``."""
    import anndata as ad

    with tempfile.TemporaryDirectory(prefix="annbench-") as folder:
        paths = {side: os.path.join(folder, f"{side}.h5ad") for side in ("reference", "query")}
        for side, adata in (("reference", ref), ("query", query)):
            obs = pd.DataFrame({"celltype": adata.obs[split.label_key].astype(str).to_numpy(),
                                "batch_key": adata.obs["batch_key"].astype(str).to_numpy()}, index=adata.obs_names)
            ad.AnnData(adata.X, obs=obs, var=pd.DataFrame(index=adata.var_names)).write_h5ad(paths[side])
        out = os.path.join(folder, "calls.npz")
        _run_script(python, ["run", method, "--reference", paths["reference"], "--query", paths["query"],
                             "--seed", str(seed), "--out", out], folder, out)
        with np.load(out) as result:
            return result["called"].astype(str), result["confidence"].astype(float), float(result["seconds"])


def embed_with_tool(tool: str, python: str, adata, seed: int) -> dict[str, np.ndarray]:
    """Run an embedding tool (``scvi``) on the raw counts of ``adata`` through temporary files.

    Returns the tool's output: ``latent``, ``seconds`` (its own time: preprocessing, training
    and the latent, not the interpreter's start and imports), ``train_seconds`` and ``epochs``;
    :class:`ToolFailed` with its last line on stderr when it ends without them.
    """
    import anndata as ad
    import scipy.sparse as sp

    with tempfile.TemporaryDirectory(prefix="scbench-") as folder:
        data, out = os.path.join(folder, "counts.h5ad"), os.path.join(folder, "latent.npz")
        counts = ad.AnnData(sp.csr_matrix(adata.X, dtype=np.float32),
                            var=pd.DataFrame(index=np.asarray(adata.var_names, dtype=str)))
        counts.var_names_make_unique()  # anndata refuses to write duplicated gene names
        counts.write_h5ad(data)
        _run_script(python, ["embed", tool, "--query", data, "--seed", str(seed), "--out", out], folder, out,
                    prefix=f"{tool}: ")
        with np.load(out) as result:
            return {key: result[key] for key in result.files}


def _run_script(python: str, args: list[str], folder: str, out: str, *, prefix: str = "") -> None:
    """Run the external-tool script with ``args`` in another interpreter, its output logged in ``folder``.

    Raises :class:`ToolFailed` with the log's last line and the exit code when it fails or writes no ``out``.
    """
    log_path = os.path.join(folder, "stderr.txt")
    with open(log_path, "w") as log:
        code = subprocess.run([python, str(SCRIPT), *args], stdout=log, stderr=log).returncode
    if code != 0 or not os.path.exists(out):
        with open(log_path) as log:
            last = _last_line(log.read())
        raise ToolFailed(f"{prefix}{last} (exit code {code})" if last else f"{prefix}exit code {code}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------- the benchmark
def run_annotation_benchmark(splits: Iterable[Split] | Mapping[str, Split] | None = None, *,
                             data_dir: str | Path = DEFAULT_DATA_DIR, seeds: Iterable[int] = (0, 1),
                             methods: Iterable[str] = METHODS, interpreters: Mapping[str, str | None] | None = None,
                             options: Mapping | None = None, out: str | Path | None = None,
                             on_row: Callable[[dict], None] | None = None,
                             on_message: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per split, method and seed (columns :data:`COLUMNS`).

    Parameters
    ----------
    splits
        The splits (default: :data:`SPLITS`); a missing file makes its rows ``skipped``.
    data_dir
        Folder the splits' files are resolved against.
    seeds
        Seeds of the model and tools (and of the PBMC 3k split itself).
    methods
        Among :data:`METHODS`.
    interpreters
        Method -> Python interpreter of the tool's environment (:data:`EXTERNAL`); none given: skipped.
    options
        ``{"contrastive": {...}}``: settings of the model, for tests on tiny data.
    out
        CSV rewritten after every row (hours of runs are not lost to a late crash).
    on_row, on_message
        Called with every row, and with progress lines.
    """
    splits = list((SPLITS if splits is None else splits).values() if isinstance(splits, Mapping) or splits is None
                  else splits)
    methods, seeds = list(methods), list(seeds)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        msg = f"unknown method(s) {unknown}; expected some of {list(METHODS)}"
        raise ValueError(msg)
    interpreters, options = dict(interpreters or {}), dict(options or {})
    say = on_message or (lambda text: None)
    rows = []

    def add(split, method, seed, status, note="", **values):
        row = {"dataset": Path(split.file).stem, "method": method, "seed": seed, "split": split.name,
               "status": status, **dict.fromkeys(SCORES, float("nan")), "n_query": 0, "calls": "", "note": note}
        row.update(values)
        rows.append(row)
        if out is not None:
            pd.DataFrame(rows, columns=COLUMNS).to_csv(out, index=False)
        if on_row is not None:
            on_row(row)

    unavailable, versions = {}, {}
    for method in methods:
        if method in EXTERNAL:
            try:
                versions[method] = check_tool(method, interpreters.get(method))
                say(f"{method}: {versions[method]} ({interpreters[method]})")
            except ToolUnavailable as error:
                unavailable[method] = str(error)
                say(f"{method}: skipped: {error}")
    for split in splits:
        path = Path(data_dir) / split.file
        loaded = None
        for seed in seeds:
            if not path.exists():
                for method in methods:
                    add(split, method, seed, "skipped", f"data file {split.file} not found in {data_dir}")
                continue
            if loaded is None or split.seeded:
                loaded = split.load(data_dir, seed)
            ref, query = loaded
            truth = query.obs[split.label_key].astype(str).to_numpy()
            known_types = set(ref.obs[split.label_key].astype(str))
            for method in methods:
                if method in unavailable:
                    add(split, method, seed, "skipped", unavailable[method])
                    continue
                started = time.perf_counter()
                try:
                    if method in EXTERNAL:
                        called, confidence, seconds = run_tool(method, interpreters[method], ref, query, seed, split)
                    else:
                        with warnings.catch_warnings():
                            if method != "contrastive":  # scanpy's notes on small gene sets and sparse input
                                warnings.simplefilter("ignore", UserWarning)
                            called, confidence = IN_PROCESS[method](ref, query, seed, split, options)
                        seconds = time.perf_counter() - started
                except Exception as error:  # a crash of one method is a stated row, never the end of the run
                    text = str(error) if isinstance(error, ToolFailed) else f"{type(error).__name__}: {error}"
                    reason = " ".join(text.split())[:300]
                    add(split, method, seed, "failed", reason, seconds=time.perf_counter() - started)
                    say(f"{split.name} s{seed} {method}: failed: {reason}")
                    continue
                confidence = None if confidence is None or np.isnan(confidence).all() else confidence
                problem, cautions = check_calls(called, confidence, truth, known_types)
                status = "ok" if problem is None else "rejected"
                note = problem or "; ".join(cautions)
                if method in versions:
                    note = "; ".join(filter(None, [note, versions[method]]))
                add(split, method, seed, status, note, n_query=len(truth), calls=type_counts(called), seconds=seconds,
                    **score(truth, called, confidence, held_out=split.held_out, known_types=known_types))
                row = rows[-1]
                say(f"{split.name} s{seed} {method}: {status} F1 {row['macro_f1']:.3f}, held-out unassigned "
                    f"{row['held_out_unassigned']:.2f}, known unassigned {row['known_unassigned']:.3f}, "
                    f"{seconds:.1f} s; calls: {row['calls']}" + (f" [{problem}]" if problem else ""))
    results = pd.DataFrame(rows, columns=COLUMNS)
    if out is not None:
        results.to_csv(out, index=False)
    results.attrs["tools"] = {m: f"{versions[m]} ({interpreters[m]})" for m in versions}
    return results


# ---------------------------------------------------------------------- the printed tables
_LABELS = {"macro_f1": "macro F1", "held_out_unassigned": "held-out unassigned", "known_unassigned":
           "known unassigned", "auroc": "confidence AUROC", "ece": "ECE", "seconds": "seconds"}


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def format_tables(results: pd.DataFrame) -> str:
    """The per-split macro F1 table, the summary of every metric and the skips, as markdown text."""
    methods = list(dict.fromkeys(results["method"]))
    splits = list(dict.fromkeys(results["split"]))
    seeds = sorted(set(results["seed"]))
    ok = results[results["status"] == "ok"]
    seed_text = ", ".join(map(str, seeds))
    lines = [f"Macro F1 on the known types, per split (mean over seeds {seed_text}; - : no run passed, see below)",
             "", "| split | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    per_split = ok.groupby(["split", "method"])["macro_f1"].agg(["mean", "count"])
    partial = False
    for split in splits:
        cells = []
        for method in methods:
            if (split, method) not in per_split.index:
                cells.append("-")
                continue
            mean, count = per_split.loc[(split, method)]
            star = "*" if count < len(seeds) else ""
            partial |= bool(star)
            cells.append(f"{mean:.3f}{star}")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    split_means = ok.groupby(["method", "split"])[SCORES].mean()
    mean_row = [(_fmt(split_means.loc[m, "macro_f1"].mean()) if m in split_means.index.get_level_values(0) else "-")
                for m in methods]
    lines.append("| **mean** | " + " | ".join(mean_row) + " |")
    if partial:
        lines.append("\n\\* not every seed passed (see below)")
    lines += ["", f"Every metric, mean over splits (± sd over seeds {seed_text} of that mean; unassigned = share of "
              "cells called unassigned; AUROC and ECE of the confidence on assigned known cells)", "",
              "| method | splits | " + " | ".join(_LABELS[s] for s in SCORES) + " |", "|---" * (len(SCORES) + 2) + "|"]
    for method in methods:
        rows = ok[ok["method"] == method]
        if rows.empty:
            lines.append(f"| {method} | 0/{len(splits)} | " + " | ".join("-" for _ in SCORES) + " |")
            continue
        per_seed = rows.groupby("seed")[SCORES].mean()  # mean over the splits each seed ran on
        cells = []
        for col in SCORES:
            digits = 1 if col == "seconds" else 3
            values = per_seed[col].dropna()
            if values.empty:
                cells.append("n/a")
            elif len(values) == 1:
                cells.append(_fmt(values.iloc[0], digits))
            else:
                cells.append(f"{values.mean():.{digits}f} ± {values.std(ddof=0):.{digits}f}")
        lines.append(f"| {method} | {rows['split'].nunique()}/{len(splits)} | " + " | ".join(cells) + " |")
    checked = results["status"].isin(["ok", "rejected"])
    lines += ["", f"Sanity check of every run's calls (one per query cell, reference types only, not all unassigned, "
              f"not one type for all, confidence in [0, 1]; per-type counts in the CSV's `calls`): "
              f"{int((results['status'] == 'ok').sum())} of {int(checked.sum())} runs passed. Skipped, failed and "
              "rejected runs, and warnings:"]
    lines += _notes(results) or ["- none"]
    tools = results.attrs.get("tools", {})
    if tools:
        lines += ["", "External tools: " + "; ".join(f"{m}: {text}" for m, text in tools.items())]
    return "\n".join(lines)


def _notes(results: pd.DataFrame) -> list[str]:
    out = []
    missing = results[results["note"].str.startswith("data file")]
    for split, group in missing.groupby("split", sort=False):
        out.append(f"- split {split}: skipped: {group['note'].iloc[0]}")
    rest = results[~results["note"].str.startswith("data file")]
    for method in dict.fromkeys(rest["method"]):
        rows = rest[rest["method"] == method]
        skipped = rows[rows["status"] == "skipped"]
        if len(skipped) == len(rows) and len(rows):
            out.append(f"- {method}: skipped: {skipped['note'].iloc[0]}")
            continue
        for status in ("skipped", "failed", "rejected"):
            for note, group in rows[rows["status"] == status].groupby("note", sort=False):
                where = ", ".join(f"{s} s{seed}" for s, seed in zip(group["split"], group["seed"]))
                out.append(f"- {method}: {status} ({where}): {note}")
        checked = rows[rows["status"].isin(["ok", "rejected"])]
        warned = checked[checked["status"] == "ok"]
        warnings = {}
        for split, seed, note in zip(warned["split"], warned["seed"], warned["note"]):
            for part in note.split("; "):
                if part.endswith("never called"):
                    warnings.setdefault(part, []).append(f"{split} s{seed}")
        for part, where in warnings.items():
            out.append(f"- {method}: warning ({', '.join(where)}): {part}")
    return out
