"""The ``contrastive-sc`` command line: parse and validate flags, then call the package.

Every parameter is validated here (MLflow does not check MLproject types), and a bad value
ends with a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from .benchmark import available_methods
from .config import PRESETS

_PRESET_CHOICE = click.Choice(sorted(PRESETS))


class _NGenes(click.ParamType):
    name = "N|auto|all"

    def convert(self, value, param, ctx):
        if value in (None, "auto", "all") or isinstance(value, int):
            return value
        try:
            number = int(str(value))
        except ValueError:
            self.fail(f"expected a whole number of genes, 'auto' or 'all', got {value!r}", param, ctx)
        if number < 2:
            self.fail(f"expected at least 2 genes, got {number}", param, ctx)
        return number


class _CsvList(click.ParamType):
    """A comma-separated list whose items must come from ``choices``."""

    name = "LIST"

    def __init__(self, choices):
        self.choices = list(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        bad = [v for v in items if v not in self.choices]
        if not items or bad:
            self.fail(f"expected a comma-separated list of {self.choices}, got {value!r}", param, ctx)
        return items


def _friendly_errors(func):
    """Turn the package's validation errors into a clean message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
            message = error.args[0] if error.args else str(error)
            raise click.UsageError(str(message)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Log progress at INFO level.")
def main(verbose: bool) -> None:
    """Contrastive self-supervised clustering of scRNA-seq data (Ciortan & Defrance, 2021)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command()
@click.option("--data", "data", required=True, type=click.Path(exists=True), help="Labelled dataset (more may follow).")
@click.argument("more_data", nargs=-1, type=click.Path(exists=True))
@click.option("--label-key", default=None, help="obs column with labels (default: 'label' when present).")
@click.option("--methods", default="paper-kmeans,pca50-kmeans", help="Comma-separated methods.",
              type=_CsvList(available_methods()))
@click.option("--seeds", default=3, type=click.IntRange(min=1), help="Seeds 0..N-1.")
@click.option("--n-genes", default=None, type=_NGenes(), help="Override the presets' gene count.")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Override the presets' epochs.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV with one row per run.")
@_friendly_errors
def benchmark(data, more_data, label_key, methods, seeds, n_genes, epochs, out) -> None:
    """Score methods on labelled datasets; write a CSV and print a mean ± sd table.

    Usage: contrastive-sc benchmark --data A.h5 B.h5ad --methods paper-kmeans,pca50-kmeans --seeds 3 --out r.csv
    """
    from .benchmark import run_benchmark, summarise

    def show(row):
        click.echo(f"{row['dataset']:<32} {row['method']:<24} seed={row['seed']} ari={row.get('ari', float('nan')):.3f} "
                   f"k={row['n_clusters']} {row['seconds']:.1f}s", err=True)

    overrides = {"n_genes": n_genes, "epochs": epochs}
    results = run_benchmark([data, *more_data], methods, range(seeds), label_key=label_key,
                            overrides=overrides, on_row=show)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(out, index=False)
    click.echo(summarise(results).to_markdown(index=False) if _has_tabulate() else summarise(results).to_string())
    click.echo(f"\nwrote {len(results)} rows to {out}")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
