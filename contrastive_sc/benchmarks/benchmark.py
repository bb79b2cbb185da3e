"""Benchmark: our presets against the baselines a user would otherwise pick, on labelled data.

Methods are named ``<preset>-kmeans`` / ``<preset>-auto`` / ``<preset>-leiden`` for every preset
(``auto``: KMeans with an estimated number of clusters), plus
``pca2-kmeans`` (the paper's naive baseline), ``pca50-kmeans`` (50 principal components of the
paper's 500-gene input), ``scanpy-kmeans`` and ``scanpy-leiden`` (scanpy's standard recipe,
:func:`scanpy_pcs`, then KMeans, or neighbors -> Leiden at the default resolution) and
``original-loop-kmeans`` (the paper's method trained with the original, straightforward
PyTorch loop, for the speed comparison). KMeans methods are given the true number of classes.

``scvi-kmeans`` and ``scvi-leiden`` cluster scVI's latent (the anchor of the clustering research)
the same two ways. scvi-tools is not a dependency of the package: its latent is computed by the
interpreter of another environment (``interpreters={"scvi": PYTHON}``, the CLI's
``--scvi-python``) running :mod:`external_baselines`; without one, asking for these methods is an
error naming the option.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..analysis.evaluation import cluster_and_score, mean_sd_text
from ..method.config import PRESETS, get_preset
from ..method.io import default_label_key, read

COLUMNS = ["dataset", "method", "seed", "ari", "nmi", "silhouette", "calinski_harabasz", "n_clusters",
           "seconds", "train_seconds"]
BASELINES = ("pca2-kmeans", "pca50-kmeans", "scanpy-kmeans", "scanpy-leiden", "original-loop-kmeans", "scvi-kmeans",
             "scvi-leiden")
#: Representations computed in another environment: source -> (name, CLI option giving its interpreter, why apart).
EXTERNAL = {"scvi": ("scVI", "--scvi-python", "scvi-tools is not a dependency of contrastive-sc")}
#: The methods clustered with scanpy's neighbours + Leiden (:func:`_scanpy_leiden`).
SCANPY_LEIDEN = ("scanpy-leiden", "scvi-leiden")
#: scanpy's standard recipe: genes kept (seurat dispersion on log data), clip of scaled values, components.
SCANPY_GENES, SCANPY_CLIP, SCANPY_COMPONENTS = 2000, 10.0, 50


def available_methods() -> list[str]:
    """Every method name the benchmark accepts."""
    return [f"{p}-{c}" for p in PRESETS for c in ("kmeans", "auto", "leiden")] + list(BASELINES)


@dataclass
class _Embedded:
    embedding: np.ndarray
    seconds: float
    train_seconds: float


def run_benchmark(paths: Iterable[str | Path], methods: Iterable[str], seeds: Iterable[int], *,
                  label_key: str | None = None, overrides: dict | None = None,
                  on_row: Callable[[dict], None] | None = None,
                  interpreters: Mapping[str, str | None] | None = None) -> pd.DataFrame:
    """Run every method on every dataset for every seed.

    Parameters
    ----------
    paths
        Labelled datasets (any format :func:`contrastive_sc.method.io.read` accepts).
    methods
        Names from :func:`available_methods`.
    seeds
        Seeds; each method is run once per seed.
    label_key
        ``obs`` column with the labels (default: ``"label"`` when present).
    overrides
        Flat config overrides applied to every preset (e.g. ``{"n_genes": 5000}``).
    on_row
        Called with each result row as it is produced (progress reporting).
    interpreters
        Source -> Python interpreter of its environment (:data:`EXTERNAL`), e.g. ``{"scvi": PYTHON}``.

    Returns
    -------
    One row per dataset x method x seed, columns :data:`COLUMNS`; ``attrs["tools"]``: each
    external tool's package versions and interpreter.

    Raises
    ------
    ValueError
        If an external method has no interpreter, or its interpreter cannot run the tool.
    """
    methods = list(methods)
    versions = check_external(methods, interpreters)
    _warm_up(methods)
    rows = []
    for path in paths:
        adata = read(path, label_key)
        rows += benchmark_adata(adata, methods, seeds, label_key=label_key, overrides=overrides, on_row=on_row,
                                interpreters=interpreters)
    results = pd.DataFrame(rows, columns=COLUMNS)
    results.attrs["tools"] = {source: f"{_versions_text(v)} ({interpreters[source]})" for source, v in versions.items()}
    return results


def external_sources(methods: Iterable[str]) -> list[str]:
    """The sources among ``methods`` computed in another environment (:data:`EXTERNAL`)."""
    return list(dict.fromkeys(m.rsplit("-", 1)[0] for m in methods if m.rsplit("-", 1)[0] in EXTERNAL))


def check_external(methods: Iterable[str], interpreters: Mapping[str, str | None] | None) -> dict[str, dict[str, str]]:
    """Source -> package versions of every external tool ``methods`` need, checked in its environment.

    Raises
    ------
    ValueError
        Naming the option when a tool has no interpreter, or why its interpreter cannot run it.
    """
    from .annotation_benchmark import ToolUnavailable, tool_versions

    methods = list(methods)
    _require_interpreters(methods, interpreters)
    versions = {}
    for source in external_sources(methods):
        try:
            versions[source] = tool_versions(source, interpreters[source], EXTERNAL)
        except ToolUnavailable as error:
            raise ValueError(str(error)) from None
    return versions


def _require_interpreters(methods: list[str], interpreters: Mapping[str, str | None] | None) -> None:
    for source in external_sources(methods):
        if not (interpreters or {}).get(source):
            name, option, why = EXTERNAL[source]
            asked = ", ".join(m for m in methods if m.startswith(f"{source}-"))
            msg = f"{asked} need(s) {name} from another environment; pass {option} PYTHON, an interpreter with it ({why})"
            raise ValueError(msg)


def _versions_text(versions: Mapping[str, str]) -> str:
    return ", ".join(f"{package} {v}" for package, v in versions.items())


def benchmark_adata(adata, methods: Iterable[str], seeds: Iterable[int], *, label_key: str | None = None,
                    overrides: dict | None = None, on_row: Callable[[dict], None] | None = None,
                    interpreters: Mapping[str, str | None] | None = None) -> list[dict]:
    """Benchmark rows for one labelled AnnData (see :func:`run_benchmark`; the external tools are not checked here)."""
    methods = list(methods)
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        msg = f"unknown method(s) {unknown}; expected some of {available_methods()}"
        raise ValueError(msg)
    _require_interpreters(methods, interpreters)
    name = adata.uns.get("dataset", {}).get("name", "anndata")
    key = label_key or default_label_key(adata)
    if key is None:
        msg = f"{name} has no labels; pass --label-key naming the obs column with cell types"
        raise ValueError(msg)
    truth = np.asarray(adata.obs[key])
    n_classes = len(np.unique(truth))
    rows = []
    for seed in seeds:
        cache: dict[str, _Embedded] = {}
        for method in methods:
            embedded = _embedding(adata, method, seed, overrides or {}, cache, interpreters or {})
            # The embedding is timed once, inside _embed; cluster_and_score times only this method's
            # clustering, so a method's seconds are its own embedding plus its clustering whether or
            # not another method of the same source computed that embedding first.
            (clustering,) = cluster_and_score(embedded.embedding, [method], truth, seed=seed,
                                              clusterer=partial(_cluster, embedded, seed=seed, n_classes=n_classes))
            scores = clustering.scores
            row = {"dataset": name, "method": method, "seed": seed, **scores,
                   "seconds": embedded.seconds + scores["seconds"], "train_seconds": embedded.train_seconds}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _warm_up(methods: list[str]) -> None:
    """Run each method once on tiny data so imports and JIT compilation stay out of the timings.

    An external tool is not run (its seconds are its own, timed in its process after its imports,
    and a training on tiny data would cost as much as a real one): a method of the same
    clustering warms that clustering up instead.
    """
    from ..method.simulate import simulate_splat

    stand_in = {"kmeans": "pca2-kmeans", "leiden": "scanpy-leiden"}
    methods = [stand_in[m.rsplit("-", 1)[1]] if m.rsplit("-", 1)[0] in EXTERNAL else m for m in methods]
    tiny = simulate_splat(n_cells=120, n_genes=200, group_prob=(0.5, 0.5), seed=0).to_anndata()
    benchmark_adata(tiny, list(dict.fromkeys(methods)), [0], overrides={"epochs": 1, "n_genes": 50})


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean +- sd over seeds of every score, per dataset and method."""
    scores = ["ari", "nmi", "silhouette", "n_clusters", "seconds", "train_seconds"]
    digits = {col: 1 if col in ("n_clusters", "seconds", "train_seconds") else 3 for col in scores}
    return mean_sd_text(results, ["dataset", "method"], digits)


def _embedding(adata, method: str, seed: int, overrides: dict, cache: dict[str, _Embedded],
               interpreters: Mapping[str, str | None]) -> _Embedded:
    """The embedding ``method`` clusters, computed once per source and seed."""
    source = method.rsplit("-", 1)[0]
    if source not in cache:
        if source in EXTERNAL:
            cache[source] = _embed_external(adata, source, seed, interpreters[source])
        else:
            cache[source] = _embed(adata, source, seed, overrides)
    return cache[source]


def _embed_external(adata, source: str, seed: int, python: str) -> _Embedded:
    """A representation computed by an external tool from the raw counts; its seconds are the tool's own."""
    from .annotation_benchmark import ToolFailed, embed_with_tool

    try:
        result = embed_with_tool(source, python, adata, seed)
    except ToolFailed as error:
        raise RuntimeError(f"{EXTERNAL[source][0]} failed: {error}") from None
    return _Embedded(np.asarray(result["latent"], dtype=np.float32), float(result["seconds"]),
                     float(result["train_seconds"]))


def _cluster(embedded: _Embedded, method: str, seed: int, n_classes: int) -> np.ndarray:
    from ..analysis.cluster import cluster_labels

    source, algorithm = method.rsplit("-", 1)
    if method in SCANPY_LEIDEN:
        return _scanpy_leiden(embedded.embedding, seed)
    # A preset's Leiden runs with the preset's own graph settings; the baselines use the defaults.
    graph = get_preset(source).cluster if source in PRESETS else get_preset("paper").cluster
    return cluster_labels(embedded.embedding, algorithm, n_clusters=n_classes, seed=seed,
                          resolution=graph.resolution, n_neighbors=graph.n_neighbors)


def _embed(adata, source: str, seed: int, overrides: dict) -> _Embedded:
    from ..method.model import ContrastiveSC
    from ..method.preprocess import fit_preprocess, transform
    from ..method.rows import as_rows

    started = time.perf_counter()
    if source in PRESETS:
        model = ContrastiveSC(get_preset(source).replace(**overrides), seed=seed).fit(adata, clusters=False)
        return _Embedded(model.training_embedding, time.perf_counter() - started, model.history.seconds)

    if source == "scanpy":
        embedding = scanpy_pcs(adata, seed=seed)
        return _Embedded(embedding, time.perf_counter() - started, 0.0)
    config = get_preset("paper").replace(**overrides).preprocess
    state = fit_preprocess(as_rows(adata.X), adata.var_names, n_genes=config.n_genes, min_cells=config.min_cells)
    x = transform(adata.X, adata.var_names, state)
    if source == "original-loop":
        import torch

        from .original_loop import train_reference

        cfg = get_preset("paper").replace(**overrides)
        encoder, train_seconds = train_reference(
            x, layers=cfg.encoder.layers, input_dropout=cfg.train.input_dropout, temperature=cfg.train.temperature,
            lr=cfg.train.lr, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, seed=seed,
            lr_cosine_epochs=cfg.train.lr_cosine_epochs)
        with torch.no_grad():
            embedding = encoder(torch.as_tensor(x)).numpy()
        return _Embedded(embedding, time.perf_counter() - started, train_seconds)
    from sklearn.decomposition import PCA

    n_components = {"pca2": 2, "pca50": 50}[source]
    n_components = min(n_components, min(x.shape) - 1)
    embedding = PCA(n_components=n_components, random_state=seed).fit_transform(x)
    return _Embedded(embedding.astype(np.float32), time.perf_counter() - started, 0.0)


def scanpy_pcs(adata, *, seed: int = 0, n_genes: int = SCANPY_GENES, clip: float = SCANPY_CLIP,
               n_components: int = SCANPY_COMPONENTS) -> np.ndarray:
    """Principal components by scanpy's standard recipe, the baseline a scanpy user would run.

    ``filter_genes(min_cells=3)`` (the tutorial's gene filter; no cell is dropped), ``normalize_total``,
    ``log1p``, ``highly_variable_genes(flavor="seurat", n_top_genes=n_genes)`` on the log data,
    ``scale(max_value=clip)`` and ``pca(n_components)``.

    Returns
    -------
    ``(cells, n_components)`` float32 (fewer components when the data has fewer genes or cells).
    """
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32))
    tmp.var_names = np.asarray(adata.var_names, dtype=str)
    sc.pp.filter_genes(tmp, min_cells=3)
    sc.pp.normalize_total(tmp)
    sc.pp.log1p(tmp)
    sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=min(n_genes, tmp.n_vars))
    tmp = tmp[:, tmp.var["highly_variable"].to_numpy()].copy()
    sc.pp.scale(tmp, max_value=clip)
    n_components = min(n_components, min(tmp.shape) - 1)
    sc.pp.pca(tmp, n_comps=n_components, random_state=seed)
    return np.asarray(tmp.obsm["X_pca"], dtype=np.float32)


def _scanpy_leiden(pcs: np.ndarray, seed: int) -> np.ndarray:
    """scanpy's standard graph clustering: neighbours on ``pcs`` (50 PCs, or scVI's latent), Leiden at resolution 1."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(X=np.zeros((pcs.shape[0], 1), dtype=np.float32))
    tmp.obsm["X_pca"] = pcs
    # transformer="sklearn": scanpy's default approximate-kNN path crashed on real data here.
    sc.pp.neighbors(tmp, use_rep="X_pca", random_state=seed, transformer="sklearn")
    sc.tl.leiden(tmp, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return tmp.obs["leiden"].astype(int).to_numpy()
