"""Grids of training runs as nested MLflow runs under a parent that logs the summary table."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from .config import ContrastiveConfig


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
    import mlflow

    from .tracking import train_run

    points = grid_points(grid)
    seeds = list(seeds)
    for point in points:  # fail before training anything if a value is invalid
        base.replace(**point)
    rows = []
    with mlflow.start_run(run_name=run_name) as parent:
        mlflow.log_params({"grid": repr(grid), "seeds": len(seeds), "preset": base.preset,
                           "n_points": len(points)})
        for point in points:
            for seed in seeds:
                config = base.replace(**point, seed=seed)
                name = ",".join(f"{k}={v}" for k, v in point.items()) or "base"
                result = train_run(adata, config, label_key=label_key, methods=methods, run_name=f"{name} seed={seed}",
                                   nested=True, log_model=False, map_plot=False)
                rows.append({**{k: str(v) for k, v in point.items()}, "seed": seed, "run_id": result["run_id"],
                             **{k: v for k, v in result["metrics"].items()}})
        results = pd.DataFrame(rows)
        summary = summarise_runs(results, list(grid))
        log_table(summary, "sweep_summary")
        log_table(results, "sweep_runs")
        mlflow.set_tag("parent_run_id", parent.info.run_id)
    return summary


def summarise_runs(results: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean and sd over seeds of each numeric metric, per combination of ``keys``."""
    metric_cols = [c for c in results.columns if c not in (*keys, "seed", "run_id")
                   and pd.api.types.is_numeric_dtype(results[c])]
    if not keys:
        results = results.assign(_all="all")
        keys = ["_all"]
    grouped = results.groupby(keys, sort=False)[metric_cols]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_sd"))
    return summary.reset_index()


def log_table(table: pd.DataFrame, name: str) -> None:
    """Log a table to the active run as CSV and markdown."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / f"{name}.csv"
        table.to_csv(csv, index=False)
        md = Path(tmp) / f"{name}.md"
        md.write_text(table.to_markdown(index=False, floatfmt=".4f"))
        mlflow.log_artifact(str(csv))
        mlflow.log_artifact(str(md))
