"""Grids of training runs as nested MLflow runs under a parent that logs the summary table."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.evaluation import as_metrics, cluster_and_score, mean_sd
from ..method.config import ContrastiveConfig


def parse_grid(text: str) -> dict[str, list]:
    """Parse ``"lr=0.1,0.4;n_genes=500,1000"`` into ``{"lr": [0.1, 0.4], "n_genes": [500, 1000]}``.

    Values are read as int, then float, else kept as strings; ``layers`` values are
    ``/``-separated sizes (``layers=200/40/60,64/16``).
    """
    grid: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, values = part.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            msg = f"grid entry {part!r} is not NAME=V1,V2,...; e.g. 'lr=0.1,0.4;n_genes=500,1000'"
            raise ValueError(msg)
        grid[name] = [_parse_value(name, v.strip()) for v in values.split(",") if v.strip()]
    known = set(ContrastiveConfig().to_params())
    unknown = sorted(set(grid) - known)
    if unknown:
        msg = f"unknown grid parameter(s) {unknown}; expected some of {sorted(known)}"
        raise ValueError(msg)
    return grid


def _parse_value(name: str, value: str):
    if name == "layers":
        return tuple(int(v) for v in value.split("/"))
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values (one empty point for an empty grid)."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def run_sweep(adata, base: ContrastiveConfig, grid: dict[str, list], seeds: Iterable[int], *,
              label_key: str | None = None, methods=("kmeans", "leiden"), run_name: str = "sweep") -> pd.DataFrame:
    """Train every grid point x seed as a nested run; log the summary to the parent run.

    Returns the summary: one row per grid point, mean and sd of each score over seeds.
    """
    from ..mlops import tracking

    points = grid_points(grid)
    seeds = list(seeds)
    for point in points:  # fail before training anything if a value is invalid
        base.replace(**point)
    rows = []
    params = {"sweep.grid": repr(grid), "sweep.seeds": ",".join(map(str, seeds)), "sweep.preset": base.preset,
              "sweep.n_points": len(points)}
    with tracking.parent_run(run_name, params) as parent:
        for point in points:
            for seed in seeds:
                config = base.replace(**point, seed=seed)
                name = ",".join(f"{k}={v}" for k, v in point.items()) or "base"
                result = tracking.train_run(adata, config, label_key=label_key, methods=methods,
                                            run_name=f"{name} seed={seed}", nested=True, log_model=False,
                                            map_plot=False)
                rows.append({**{k: str(v) for k, v in point.items()}, "seed": seed, "run_id": result["run_id"],
                             **{k: v for k, v in result["metrics"].items()}})
        results = pd.DataFrame(rows)
        summary = summarise_runs(results, list(grid))
        tracking.log_table(summary, "sweep_summary")
        tracking.log_table(results, "sweep_runs")
        tracking.set_tags({"parent_run_id": parent.info.run_id})
    return summary


def summarise_runs(results: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean and sd over seeds of each numeric metric, per combination of ``keys``."""
    return mean_sd(results, keys)


# ------------------------------------------------------------------------------ the paper's experiments
#: Settings of each one-parameter experiment (the paper's Figs. 5, 6, 10 and 11).
SETTINGS = {
    "genes": ("n_genes", [500, 1000, 1500, 3000, 5000, "all"]),
    "dropout": ("input_dropout", [0.2, 0.4, 0.6, 0.8, 0.9, 0.95]),
    "noise": ("noise_std", [0.0, 0.1, 0.25, 0.5, 1.0]),
    "architecture": ("layers", [(2,), (60,), (200, 60), (200, 40, 60), (512, 128, 60), (200, 100, 40, 60),
                                (1000, 200, 40, 60)]),
    "learning-rate": ("lr", [1e-4, 1e-3, 1e-2, 0.1, 0.4, 1.0, 2.0]),
    "epochs": ("epochs", [5, 10, 30, 50, 100]),
}
ALGORITHMS = ("kmeans", "leiden", "birch", "gmm", "meanshift", "spectral", "ward")
DOWNSAMPLING = (0.25, 0.5, 0.75, 1.0)
SCALE_CELLS = (1_000, 5_000, 10_000, 25_000, 50_000)
SCALE_GENES = (500, 1_000, 2_000, 5_000)
EXPERIMENT_NAMES = (*SETTINGS, "algorithms", "stability", "downsampling", "simulated", "scalability")


def default_datasets() -> list[Path]:
    """The labelled files in ``../shared/data`` beside the repository, when present."""
    folder = Path(__file__).resolve().parents[3] / "shared" / "data"
    return sorted(p for p in folder.glob("*.h5*")) if folder.exists() else []


def run_experiment(name: str, datasets: list | None = None, *, seeds: Iterable[int] = (0,),
                   overrides: dict | None = None, settings: list | None = None, quick: bool = False) -> pd.DataFrame:
    """Run one of :data:`EXPERIMENT_NAMES` as a parent MLflow run with nested runs.

    Parameters
    ----------
    name
        The experiment.
    datasets
        Labelled AnnData objects or paths (default: :func:`default_datasets`); ignored by the
        simulated experiments.
    seeds
        Seeds per setting (``stability`` wants several).
    overrides
        Flat config overrides applied to every run (e.g. ``{"epochs": 5}``).
    settings
        Replace the experiment's default grid (its values, e.g. ``[500, 1000]`` for ``genes``).
    quick
        Small sizes for the simulated experiments (tests).

    Returns
    -------
    The summary table that is also logged (CSV and markdown) with a PNG figure.
    """
    from ..mlops import tracking

    if name not in EXPERIMENT_NAMES:
        msg = f"unknown experiment {name!r}; expected one of {list(EXPERIMENT_NAMES)}"
        raise ValueError(msg)
    seeds = list(seeds)
    overrides = overrides or {}
    params = {"experiment.name": name, "experiment.seeds": ",".join(map(str, seeds)),
              "experiment.overrides": repr(overrides), "experiment.quick": quick}
    with tracking.parent_run(f"experiment:{name}", params, tags={"experiment": name, "kind": "paper-experiment"}):
        if name in ("simulated", "scalability"):
            rows = _SIMULATED[name](seeds, overrides, settings, quick)
        else:
            adatas = _load_all(datasets)
            tracking.log_params({"experiment.datasets": ",".join(_name(a) for a in adatas)})
            rows = _REAL[name](adatas, seeds, overrides, settings)
        results = pd.DataFrame(rows)
        summary = _summarise_experiment(name, results)
        tracking.log_table(results, f"{name}_runs")
        tracking.log_table(summary, f"{name}_summary")
        _log_figure(name, summary)
    return summary


def _load_all(datasets) -> list:
    from ..method.io import read

    datasets = datasets if datasets else default_datasets()
    if not datasets:
        msg = "no datasets given and none found in ../shared/data; pass --data PATH [PATH ...]"
        raise ValueError(msg)
    return [read(d) if isinstance(d, str | Path) else d for d in datasets]


def _name(adata) -> str:
    return adata.uns.get("dataset", {}).get("name", "anndata")


def _truth(adata) -> np.ndarray:
    from ..method.io import default_label_key

    key = default_label_key(adata)
    if key is None:
        msg = f"{_name(adata)} has no obs['label']; experiments need labelled data"
        raise ValueError(msg)
    return np.asarray(adata.obs[key])


def _train_and_score(adata, config, truth, methods=("kmeans",)) -> tuple[dict, dict]:
    """Fit, embed, cluster and score. Returns (metrics, the settings the model was trained with as params)."""
    import time

    from ..method.model import ContrastiveSC

    started = time.perf_counter()
    model = ContrastiveSC(config).fit(adata, clusters=False)
    embedding = model.training_embedding
    metrics = {"train_seconds": model.history.seconds, "fit_seconds": time.perf_counter() - started}
    clusterings = cluster_and_score(embedding, methods, truth, n_clusters=len(np.unique(truth)),
                                    resolution=config.cluster.resolution, n_neighbors=config.cluster.n_neighbors,
                                    seed=config.train.seed)
    used = {f"config.{k}": ",".join(map(str, v)) if isinstance(v, list) else v for k, v in model.config.to_params().items()}
    return metrics | as_metrics(clusterings), used


def _log_nested(run_name: str, params: dict, metrics: dict) -> None:
    from ..mlops.tracking import log_nested_run

    log_nested_run(run_name, params, metrics)


def _one_parameter(name: str):
    def run(adatas, seeds, overrides, settings):
        from ..method.config import get_preset

        parameter, values = SETTINGS[name]
        values = settings or values
        rows = []
        for adata in adatas:
            truth = _truth(adata)
            for value in values:
                for seed in seeds:
                    config = get_preset("paper").replace(**(overrides | {parameter: value, "seed": seed}))
                    metrics, used = _train_and_score(adata, config, truth)
                    setting = "/".join(map(str, value)) if isinstance(value, tuple) else str(value)
                    row = {"dataset": _name(adata), "setting": setting, "seed": seed, **metrics}
                    _log_nested(f"{_name(adata)} {parameter}={setting} seed={seed}",
                                {"dataset": _name(adata), parameter: setting, "seed": seed, **used}, metrics)
                    rows.append(row)
        return rows

    return run


def _per_method(adatas, seeds, overrides, methods) -> list[dict]:
    """One embedding per dataset and seed, clustered by every method: one row per method."""
    from ..method.config import get_preset

    rows = []
    for adata in adatas:
        truth = _truth(adata)
        for seed in seeds:
            config = get_preset("paper").replace(**(overrides | {"seed": seed}))
            metrics, used = _train_and_score(adata, config, truth, methods=tuple(methods))
            _log_nested(f"{_name(adata)} seed={seed}", {"dataset": _name(adata), "seed": seed, **used}, metrics)
            for method in methods:
                scores = {k.removeprefix(f"{method}_"): v for k, v in metrics.items() if k.startswith(f"{method}_")}
                rows.append({"dataset": _name(adata), "setting": method, "seed": seed, **scores})
    return rows


def _algorithms(adatas, seeds, overrides, settings):
    return _per_method(adatas, seeds, overrides, settings or ALGORITHMS)


def _stability(adatas, seeds, overrides, settings):
    return _per_method(adatas, seeds, overrides, settings or ("kmeans", "leiden"))


def _downsampling(adatas, seeds, overrides, settings):
    from sklearn.model_selection import train_test_split

    from ..method.config import get_preset

    rows = []
    for adata in adatas:
        truth = _truth(adata)
        for fraction in settings or DOWNSAMPLING:
            for sample in range(3):
                if fraction < 1:
                    keep, _ = train_test_split(np.arange(adata.n_obs), train_size=fraction, stratify=_stratifiable(truth),
                                               random_state=sample)
                    sub = adata[np.sort(keep)].copy()
                else:
                    sub = adata
                for seed in seeds:
                    config = get_preset("paper").replace(**(overrides | {"seed": seed}))
                    metrics, used = _train_and_score(sub, config, _truth(sub))
                    _log_nested(f"{_name(adata)} {fraction:.0%} sample={sample} seed={seed}",
                                {"dataset": _name(adata), "fraction": fraction, "sample": sample, "seed": seed,
                                 "n_cells": sub.n_obs, **used}, metrics)
                    rows.append({"dataset": _name(adata), "setting": fraction, "seed": seed, "sample": sample, **metrics})
                if fraction == 1:
                    break  # the full data has one "sample"
    return rows


def _stratifiable(truth: np.ndarray) -> np.ndarray | None:
    # Stratification needs at least two cells per class; tiny classes are then sampled freely.
    _, counts = np.unique(truth, return_counts=True)
    return truth if counts.min() >= 2 else None


def _simulated(seeds, overrides, settings, quick):
    from ..method.simulate import balanced_grid, grid_name, imbalanced_grid, simulate_splat
    from .benchmark import benchmark_adata

    methods = settings or ["fused-kmeans", "fused-leiden", "paper-kmeans", "paper-leiden", "pca50-kmeans", "scanpy-leiden"]
    grids = [("balanced", p) for p in balanced_grid()] + [("imbalanced", p) for p in imbalanced_grid()]
    if quick:
        import dataclasses

        grids = [(kind, dataclasses.replace(p, n_cells=min(p.n_cells, 300), n_genes=300))
                 for kind, p in grids if p.n_groups == 4 and p.dropout_mid in (-1.0, 1.5)]
    rows = []
    for kind, params in grids:
        sim = simulate_splat(params)
        adata = sim.to_anndata()
        adata.uns["dataset"] = {"name": grid_name(params)}
        for row in benchmark_adata(adata, methods, seeds, overrides=overrides):
            row |= {"grid": kind, "n_groups": params.n_groups, "dropout_mid": params.dropout_mid,
                    "dropout_rate": sim.dropout_rate, "sparsity": sim.sparsity, "setting": row["method"]}
            _log_nested(f"{row['dataset']} {row['method']} seed={row['seed']}",
                        {"dataset": row["dataset"], "method": row["method"], "seed": row["seed"]},
                        {k: row[k] for k in ("ari", "nmi", "silhouette", "n_clusters", "seconds", "dropout_rate")})
            rows.append(row)
    return rows


def _scalability(seeds, overrides, settings, quick):
    """Time and peak memory against cells (2,000 genes) and against genes kept (5,000 cells)."""
    import time

    from ..analysis.cluster import cluster_labels
    from ..method.model import ContrastiveSC
    from ..method.simulate import simulate_splat
    from .profiling import PeakMemory

    cells, genes = ((500, 1_000), (100, 200)) if quick else (settings or SCALE_CELLS, SCALE_GENES)
    n_genes_total, n_cells_fixed = (300, 500) if quick else (2_000, 5_000)
    trials = [("cells", n, n_genes_total, 500) for n in cells] + [("genes", n_cells_fixed, max(g, n_genes_total), g)
                                                                  for g in genes]
    rows = []
    for axis, n_cells, n_simulated_genes, n_kept in trials:
        adata = simulate_splat(n_cells=n_cells, n_genes=n_simulated_genes, group_prob=(0.25,) * 4, seed=0).to_anndata()
        for seed in seeds:
            config = ContrastiveSC(preset="paper", n_genes=n_kept, seed=seed, **overrides).config
            with PeakMemory() as memory:
                started = time.perf_counter()
                model = ContrastiveSC(config).fit(adata, clusters=False)
                fit_seconds = time.perf_counter() - started
                embedding = model.transform(adata)
                started = time.perf_counter()
                cluster_labels(embedding, "kmeans", n_clusters=4, seed=seed)
                kmeans_seconds = time.perf_counter() - started
                started = time.perf_counter()
                cluster_labels(embedding, "leiden", seed=seed)
                leiden_seconds = time.perf_counter() - started
            metrics = {"fit_seconds": fit_seconds, "train_seconds": model.history.seconds,
                       "preprocess_seconds": fit_seconds - model.history.seconds, "kmeans_seconds": kmeans_seconds,
                       "leiden_seconds": leiden_seconds, "peak_memory_mb": memory.peak_mb}
            _log_nested(f"{n_cells} cells x {n_kept} genes seed={seed}",
                        {"n_cells": n_cells, "n_genes": n_kept, "seed": seed}, metrics)
            rows.append({"dataset": f"simulated, varying {axis}", "setting": n_cells if axis == "cells" else n_kept,
                         "n_cells": n_cells, "n_genes": n_kept, "seed": seed, **metrics})
    return rows


_REAL = {name: _one_parameter(name) for name in SETTINGS} | {
    "algorithms": _algorithms, "stability": _stability, "downsampling": _downsampling}
_SIMULATED = {"simulated": _simulated, "scalability": _scalability}

#: The score each experiment's figure shows.
_FIGURE_METRIC = {"algorithms": "ari", "stability": "ari", "simulated": "ari", "scalability": "fit_seconds"}


def _summarise_experiment(name: str, results: pd.DataFrame) -> pd.DataFrame:
    summary = mean_sd(results, ["dataset", "setting"])
    if name == "stability":
        for score in ("ari", "nmi", "silhouette", "calinski_harabasz"):
            if f"{score}_mean" in summary:
                summary[f"{score}_cv"] = summary[f"{score}_sd"] / summary[f"{score}_mean"].abs()
    return summary


def _log_figure(name: str, summary: pd.DataFrame) -> None:
    from ..analysis.plots import experiment_figure
    from ..mlops import tracking

    metric = _FIGURE_METRIC.get(name, "kmeans_ari")
    if f"{metric}_mean" not in summary:
        return
    kind = "bar" if name in ("algorithms", "stability", "architecture", "simulated") else "line"
    with tempfile.TemporaryDirectory() as tmp:
        path = experiment_figure(summary, metric, Path(tmp) / f"{name}.png", title=name, kind=kind)
        tracking.log_artifact(path)
