"""The ``contrastive-sc`` command line: parse and validate flags, then call the package.

Every parameter is validated here (MLflow does not check MLproject types), and a bad value
ends with a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from .analysis.cluster import METHODS as CLUSTER_METHODS
from .benchmarks.annotation_benchmark import METHODS as ANNOTATION_METHODS
from .benchmarks.annotation_benchmark import SPLITS as ANNOTATION_SPLITS
from .benchmarks.benchmark import available_methods
from .benchmarks.experiments import EXPERIMENT_NAMES
from .method.config import DEFAULT_PRESET, PRESETS, cli_settings, settings
from .mlops.signals import stop_on_signals, stop_with_mlflow_run
from .mlops.store import remove_encoded_twin, storage_failure
from .mlops.tracking import quiet_mlflow
from .serve.inference import METHODS as PREDICT_METHODS


class _SettingType(click.ParamType):
    """A configuration setting typed and checked by its entry in the parameter table
    (:class:`~contrastive_sc.method.config.Setting`): the same rule as the configuration's own check."""

    def __init__(self, field_name: str) -> None:
        self.field_name = field_name
        self.spec = settings()[field_name]
        self.name = {"int": "INTEGER", "float": "FLOAT", "int_list": "N,N,...", "n_genes": "N|auto|all",
                     "choice": "|".join(map(str, self.spec.choices)), "bool": "BOOLEAN"}.get(self.spec.kind, "TEXT")

    def convert(self, value, param, ctx):
        try:
            return self.spec.parse(self.field_name, value) if isinstance(value, str) else self.spec.check(
                self.field_name, value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class _PresetType(click.ParamType):
    """A preset name; ``--help`` names the two documented ones (``contrastive-sc presets`` lists every one)."""

    name = "fused|paper"

    def convert(self, value, param, ctx):
        if value not in PRESETS:
            self.fail(f"unknown preset {value!r}; expected fused or paper (`contrastive-sc presets` lists the "
                      "research presets too)", param, ctx)
        return value


class _PresetDefault(click.ParamType):
    """Wraps a type so that ``""`` or ``"preset"`` mean "keep the preset's value" (``None``).

    MLproject parameters always pass a value; these sentinels let an entry point leave a
    setting to the chosen preset.
    """

    def __init__(self, inner):
        self.inner = inner if isinstance(inner, click.ParamType) else click.types.convert_type(inner)
        self.name = self.inner.name

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip() in ("", "preset")):
            return None
        return self.inner.convert(value, param, ctx)


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


def _none_if_empty(ctx, param, value):
    return value or None


def _layer_option(func):
    return click.option(
        "--layer", default=None, callback=_none_if_empty,
        help="Read the raw counts from this layer of an .h5ad, or 'raw' for adata.raw [default: X].",
    )(func)


def _scvi_python_option(func):
    return click.option(
        "--scvi-python", default=None, callback=_none_if_empty,
        help="Python of an environment with scvi-tools, for the scvi-kmeans / scvi-leiden baselines "
             "(scvi-tools is not a dependency of contrastive-sc) [default: none; asking for them is an error].",
    )(func)


def _overwrite_option(func):
    # A plain flag for people; MLproject entry points pass `--overwrite-if true|false` (hidden),
    # since an MLflow parameter always has a value. Either one set means overwrite.
    def merge(ctx, param, value):
        given = bool(ctx.params.pop("overwrite_if", False))
        return bool(value) or given

    func = click.option("--overwrite", is_flag=True, callback=merge,
                        help="Replace --out even when it is not an earlier output of this command.")(func)
    return click.option("--overwrite-if", "overwrite_if", type=click.BOOL, default=False, hidden=True,
                        is_eager=True)(func)


class UserError(click.ClickException):
    """A problem with what the user asked for: printed as one ``Error: ...`` line, exit code 2."""

    exit_code = 2


#: Exceptions that report a bad input or a missing resource rather than a bug. MLflow's own
#: ``MlflowException`` (unknown model, run or alias) is matched by name so that the CLI does not
#: import MLflow before it is needed.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError)


def _friendly_errors(func):
    """Turn the package's and MLflow's validation errors into one line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as error:
            # A read-only or full store first: MLflow's message for it holds the SQL statement.
            storage = storage_failure(error)
            if storage is not None:
                raise UserError(" ".join(storage.split())) from None
            if not isinstance(error, _USER_ERRORS) and "MlflowException" not in {c.__name__ for c in type(error).__mro__}:
                raise
            if isinstance(error, OSError) and error.strerror:  # its args[0] is the errno
                message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
            else:
                message = getattr(error, "message", None) or (error.args[0] if error.args else str(error))
            raise UserError(" ".join(str(message).split())) from None

    return wrapper


class _OneLineErrors(click.Group):
    """A group whose usage errors (bad option values too) print as a single ``Error:`` line.

    Click's default shows the usage text and a hint above the error; scripts and MLflow's run
    logs are easier to read with one line.
    """

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as error:
            click.echo(f"Error: {' '.join(error.format_message().split())}", err=True)
            sys.exit(error.exit_code)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Log progress at INFO level.")
@click.option(
    "--workdir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Resolve relative paths (data, out, ./mlflow.db) against this folder. The MLproject passes the folder "
    "`mlflow run` was started from, since MLflow runs entry points inside the project.",
)
def main(verbose: bool, workdir: str | None) -> None:
    """Contrastive self-supervised clustering of scRNA-seq data (Ciortan & Defrance, 2021)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    quiet_mlflow(verbose)
    # SIGTERM (kill, a scheduler's timeout) ends the command like Ctrl-C does: runs in progress
    # are closed as KILLED instead of being left RUNNING by a process that just vanished.
    # ... and so does stopping the `mlflow run` that started this entry point, which does not pass the signal on
    stop_on_signals()
    stop_with_mlflow_run()
    if workdir:
        os.chdir(workdir)
    # `mlflow run` opened its default store through a percent-encoded URI, and MLflow made that
    # URI's folder undecoded: remove it while empty, before any option of the command can fail.
    remove_encoded_twin(os.environ.get("MLFLOW_TRACKING_URI", ""))


@main.command()
@click.option("--data", "data", required=True, type=click.Path(exists=True), help="Labelled dataset (more may follow).")
@click.argument("more_data", nargs=-1, type=click.Path(exists=True))
@click.option(
    "--label-key", default=None, callback=_none_if_empty, help="obs column with labels (default: 'label' when present)."
)
@click.option(
    "--methods",
    default="fused-kmeans,paper-kmeans,pca50-kmeans",
    help="Comma-separated methods.",
    type=_CsvList(available_methods()),
)
@click.option("--seeds", default=3, type=click.IntRange(min=1), help="Seeds 0..N-1.")
@click.option("--n-genes", default=None, type=_PresetDefault(_SettingType("n_genes")),
              help="Override the presets' gene count.")
@click.option("--epochs", default=None, type=_PresetDefault(_SettingType("epochs")), help="Override the presets' epochs.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV with one row per run.")
@_scvi_python_option
@_overwrite_option
@_friendly_errors
def benchmark(data, more_data, label_key, methods, seeds, n_genes, epochs, out, scvi_python, overwrite) -> None:
    """Score methods on labelled datasets; write a CSV and print a mean ± sd table.

    Usage: contrastive-sc benchmark --data A.h5 B.h5ad --methods paper-kmeans,pca50-kmeans --seeds 3 --out r.csv
    """
    from .benchmarks.benchmark import run_benchmark, summarise
    from .mlops.outputs import check_output

    check_output(out, "csv", overwrite=overwrite)

    def show(row):
        click.echo(
            f"{row['dataset']:<32} {row['method']:<24} seed={row['seed']} ari={row.get('ari', float('nan')):.3f} "
            f"k={row['n_clusters']} {row['seconds']:.1f}s",
            err=True,
        )

    overrides = {"n_genes": n_genes, "epochs": epochs}
    results = run_benchmark([data, *more_data], methods, range(seeds), label_key=label_key, overrides=overrides,
                            on_row=show, interpreters={"scvi": scvi_python})
    for source, tool in results.attrs.get("tools", {}).items():
        click.echo(f"{source}: {tool}", err=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(out, index=False)
    click.echo(summarise(results).to_markdown(index=False) if _has_tabulate() else summarise(results).to_string())
    click.echo(f"\nwrote {len(results)} rows to {out}")


@main.command()
@click.option("--data", "data", required=True, type=click.Path(exists=True), help="Labelled dataset (more may follow).")
@click.argument("more_data", nargs=-1, type=click.Path(exists=True))
@click.option(
    "--label-key", default=None, callback=_none_if_empty, help="obs column with labels (default: 'label' when present)."
)
@click.option("--candidates", required=True, type=_CsvList(available_methods()),
              help="Comma-separated methods to choose among (e.g. paper-kmeans,fused-kmeans).")
@click.option("--baselines", default="pca50-kmeans,scanpy-kmeans", type=_CsvList(available_methods()),
              help="Comma-separated methods shown beside the choice.")
@click.option("--seeds", default=3, type=click.IntRange(min=1), help="Seeds 0..N-1.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="CSV cache, one row per dataset x method x seed; appended to, and read back on the next call.")
@click.option("--any-code", is_flag=True,
              help="Reuse cached rows run by other versions of this package (default: rerun them).")
@_scvi_python_option
@_friendly_errors
def select(data, more_data, label_key, candidates, baselines, seeds, out, any_code, scvi_python) -> None:
    """Leave-one-dataset-out choice among candidate methods: per dataset, the candidate best on the others.

    Usage: contrastive-sc select --data A.h5 B.h5ad C.h5 --candidates paper-kmeans,fused-kmeans --seeds 3 --out lodo.csv
    """
    from .benchmarks.selection import report, run_missing

    paths = [data, *more_data]
    if len(paths) < 2:
        raise click.UsageError(f"leave-one-dataset-out needs at least 2 datasets, got {len(paths)}")

    def show(row):
        click.echo(f"{row['dataset']:<32} {row['method']:<24} seed={row['seed']} ari={row['ari']:.3f} "
                   f"k={row['n_clusters']} {row['seconds']:.1f}s", err=True)

    methods = list(dict.fromkeys([*candidates, *baselines]))
    results = run_missing(paths, methods, range(seeds), out, label_key=label_key, on_row=show, any_code=any_code,
                          interpreters={"scvi": scvi_python}, on_message=lambda text: click.echo(text, err=True))
    table, lines = report(results, candidates, baselines)
    click.echo(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    click.echo("\n" + "\n".join(lines))
    click.echo(f"\n{len(results)} runs in {out}")


# ---------------------------------------------------------------------------- MLflow commands
def _tracking_options(func):
    func = click.option(
        "--tracking-uri",
        default=None,
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI [default: sqlite:///<cwd>/mlflow.db].",
    )(func)
    return func


def _use_store(tracking_uri: str | None, *, must_exist: bool = True) -> str:
    """Point MLflow at the store; with ``must_exist``, refuse a SQLite file that is not there.

    Commands that read a store (register, promote, rollback, export-onnx, embed, speed-benchmark
    with a model) must not create an empty one from a typo or the wrong folder.
    """
    from click.core import ParameterSource

    from .mlops import tracking

    source = click.get_current_context().get_parameter_source("tracking_uri")
    origin = {ParameterSource.COMMANDLINE: "given by --tracking-uri",
              ParameterSource.ENVIRONMENT: "from MLFLOW_TRACKING_URI"}.get(
        source, f"the default ./mlflow.db in {Path.cwd()}")
    return tracking.setup(tracking_uri, must_exist=must_exist, origin=origin)


def _reads_store(model_uri: str) -> bool:
    """Whether loading ``model_uri`` reads the tracking store (a registry or run URI, not a folder)."""
    return model_uri.startswith(("models:/", "runs:/"))


def _experiment_option(func):
    return click.option("--experiment", default="contrastive-sc", help="MLflow experiment name.")(func)


class _CellCounts(click.ParamType):
    """Comma-separated numbers of cells (``_`` allowed as a digit separator)."""

    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list | tuple):
            return tuple(value)
        try:
            sizes = tuple(int(v) for v in str(value).replace("_", "").split(",") if v.strip())
        except ValueError:
            self.fail(f"expected comma-separated numbers of cells such as 10000,100000, got {value!r}", param, ctx)
        if not sizes or min(sizes) < 1:
            self.fail(f"expected positive numbers of cells, got {value!r}", param, ctx)
        return sizes


def _hyperparameter_options(func):
    """``--preset`` and every setting of the parameter table offered on the command line, as an
    optional override (``None``, ``""`` or ``preset`` keep the preset's value)."""
    options = [click.option("--preset", default=DEFAULT_PRESET, type=_PresetType(),
                            help="Named preset to start from (`contrastive-sc presets` lists them all).")]
    for name, spec in cli_settings().items():
        options.append(click.option(f"--{name.replace('_', '-')}", default=None,
                                    type=_PresetDefault(_SettingType(name)), help=spec.help))
    for option in reversed(options):
        func = option(func)
    return func


def _build_config(preset: str, values: dict):
    from .method.config import get_preset

    return get_preset(preset).replace(**{k: values.get(k) for k in cli_settings()})


@main.command()
@click.option("--data", required=True, help="Counts file or 10x folder, or 'simulated' for the built-in dataset.")
@click.option("--label-key", default=None, callback=_none_if_empty,
              help="obs column with cell types: ARI/NMI are scored and the model names new cells by them.")
@click.option("--batch-key", default=None, callback=_none_if_empty,
              help="obs column with the sample or batch: recorded, drawn on the map and scored (batch_mixing).")
@_layer_option
@click.option(
    "--cluster", "methods", default="kmeans,leiden", type=_CsvList(CLUSTER_METHODS), help="Clustering methods to score."
)
@_hyperparameter_options
@_experiment_option
@click.option("--run-name", default=None, help="MLflow run name.")
@click.option("--no-map", is_flag=True, help="Skip the UMAP map artifact.")
@_tracking_options
@_friendly_errors
def train(data, label_key, batch_key, layer, methods, preset, experiment, run_name, no_map, tracking_uri,
          **values) -> None:
    """Train one model and log it (params, loss, metrics, artifacts, pyfunc model) to MLflow."""
    from .method.io import default_label_key, open_dataset
    from .mlops import tracking

    config = _build_config(preset, values)
    # the layer is the model's data setup, recorded at fit; the model checks the counts it reads
    adata = open_dataset(data, label_key)
    label_key = label_key or default_label_key(adata)
    uri = tracking.setup(tracking_uri, experiment)
    result = tracking.train_run(
        adata,
        config,
        layer=layer,
        label_key=label_key,
        batch_key=batch_key,
        methods=methods,
        run_name=run_name,
        map_plot=not no_map,
        progress=sys.stderr.isatty(),
    )
    scores = ", ".join(f"{k}={v:.3f}" for k, v in result["metrics"].items() if k.endswith(("_ari", "_silhouette")))
    click.echo(f"run {result['run_id']} logged to {uri}: {scores}")
    click.echo(f"register it: contrastive-sc register --name NAME --run-id {result['run_id']} "
               "(then serve models:/NAME@champion after `promote`)")


@main.command()
@click.option("--data", required=True, help="Counts file or 'simulated'.")
@click.option("--label-key", default=None, callback=_none_if_empty, help="obs column with labels.")
@click.option("--grid", default="", help="Semicolon-separated NAME=V1,V2 lists, e.g. 'lr=0.1,0.4;n_genes=500,1000'.")
@click.option("--seeds", default=1, type=click.IntRange(min=1), help="Seeds 0..N-1 per grid point.")
@click.option("--cluster", "methods", default="kmeans,leiden", type=_CsvList(CLUSTER_METHODS))
@click.option("--preset", default=DEFAULT_PRESET, type=_PresetType())
@click.option("--epochs", default=None, type=_PresetDefault(_SettingType("epochs")), help="Epochs for every grid point.")
@_experiment_option
@_tracking_options
@_friendly_errors
def sweep(data, label_key, grid, seeds, methods, preset, epochs, experiment, tracking_uri) -> None:
    """Train a grid of settings x seeds as nested runs under one parent run with a summary table."""
    from .benchmarks.experiments import parse_grid, run_sweep
    from .method.io import default_label_key, load
    from .mlops import tracking

    adata = load(data, label_key)
    label_key = label_key or default_label_key(adata)
    tracking.setup(tracking_uri, experiment)
    base = _build_config(preset, {"epochs": epochs})
    summary = run_sweep(adata, base, parse_grid(grid), range(seeds), label_key=label_key, methods=methods)
    click.echo(summary.to_string(index=False))


@main.command()
@click.option("--name", required=True, help="Registered model name.")
@click.option(
    "--metric",
    default=None,
    callback=_none_if_empty,
    help="Selection metric [default: kmeans_ari with labels, else silhouette].",
)
@click.option("--run-id", default=None, callback=_none_if_empty, help="Register this run instead of the best one.")
@_experiment_option
@_tracking_options
@_friendly_errors
def register(name, metric, run_id, experiment, tracking_uri) -> None:
    """Register the best run's model of an experiment (or --run-id's) and alias it @challenger."""
    from .mlops import registry

    _use_store(tracking_uri)
    if run_id:
        result = registry.register_run(run_id, name, metric)
    else:
        result = registry.register_best(experiment, name, metric)
    state = "registered as" if result["new"] else "already registered as"
    click.echo(
        f"run {result['run_id']} ({result['metric']}={result['value']:.4f}) {state} {name} "
        f"version {result['version']} @challenger"
    )


@main.command()
@click.option("--name", required=True, help="Registered model name.")
@click.option("--version", default=None, callback=_none_if_empty, help="Version to promote [default: @challenger].")
@click.option(
    "--eval-data",
    default=None,
    callback=_none_if_empty,
    help="Labelled dataset on which champion and candidate are both scored (ARI of KMeans at the true k) "
    "[default: compare their registered metrics, refused when they were trained on different data].",
)
@click.option("--label-key", default=None, callback=_none_if_empty, help="Label column of --eval-data [default: label].")
@_tracking_options
@_friendly_errors
def promote(name, version, eval_data, label_key, tracking_uri) -> None:
    """Move @champion to a version only if it beats the current champion on its metric.

    Concurrent promotions of one registry are serialised by a lock file (beside a SQLite
    database); a refusal is a normal outcome and exits 0.
    """
    from .mlops import registry

    if label_key and not eval_data:
        raise click.UsageError("--label-key applies to --eval-data; pass --eval-data FILE too")
    _use_store(tracking_uri)
    click.echo(registry.promote(name, version, eval_data=eval_data, label_key=label_key).message)


@main.command()
@click.option("--name", required=True, help="Registered model name.")
@_tracking_options
@_friendly_errors
def rollback(name, tracking_uri) -> None:
    """Give @champion back to the version the last promotion replaced."""
    from .mlops import registry

    _use_store(tracking_uri)
    click.echo(registry.rollback(name).message)


@main.command("export-onnx")
@click.option("--model-uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .onnx file.")
@click.option(
    "--data", default=None, callback=_none_if_empty, help="Optional counts file: parity is also checked on its cells."
)
@click.option("--provider", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), help="onnxruntime provider.")
@_overwrite_option
@_tracking_options
@_friendly_errors
def export_onnx(model_uri, out, data, provider, overwrite, tracking_uri) -> None:
    """Export a registered model's encoder to ONNX, check parity with torch, report the provider."""
    from .mlops.exporting import export_registered
    from .mlops.outputs import check_output

    check_output(out, "onnx", overwrite=overwrite)

    _use_store(tracking_uri)
    report = export_registered(model_uri, out, data=data, provider=provider)
    click.echo(
        f"wrote {report['path']}: max |onnxruntime - torch| = {report['max_abs_diff']:.2e} "
        f"on {report['rows_checked']} rows; providers in use: {report['providers']}"
    )


@main.command()
@click.option("--model-uri", required=True, help="models:/NAME@ALIAS of an embed-then-cluster model.")
@click.option("--data", required=True, help="Counts file to embed.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .h5ad.")
@click.option("--method", default="trained", type=click.Choice(list(PREDICT_METHODS)),
              help="trained: nearest training cluster; kmeans: needs --n-clusters; auto: k estimated; leiden.")
@click.option("--n-clusters", default=None, type=_PresetDefault(_SettingType("n_clusters")), help="k for kmeans.")
@click.option("--resolution", default=None, type=_PresetDefault(_SettingType("resolution")),
              help="Leiden resolution [default, or 'preset': the one the model was trained with].")
@click.option("--label-key", default=None, callback=_none_if_empty, help="obs column with labels: ARI/NMI are printed.")
@_layer_option
@_overwrite_option
@_tracking_options
@_friendly_errors
def embed(model_uri, data, out, method, n_clusters, resolution, label_key, layer, overwrite, tracking_uri) -> None:
    """Embed and cluster a dataset with a registered model; write an .h5ad with a UMAP and marker genes."""
    from .mlops.exporting import embed_with_registered
    from .mlops.outputs import check_output

    check_output(out, "h5ad", overwrite=overwrite)

    _use_store(tracking_uri, must_exist=_reads_store(model_uri))
    params = {"method": method, "n_clusters": n_clusters, "resolution": resolution}
    summary = embed_with_registered(model_uri, data, out, params, label_key=label_key, layer=layer)
    click.echo(", ".join(f"{k}={v}" for k, v in summary.items()))


@main.command()
@click.option("--model-uri", required=True,
              help="A model trained with labels: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a folder.")
@click.option("--data", required=True, help="Counts file of one sample (its cells are compared with each other).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .h5ad or .csv.")
@click.option("--min-confidence", default=None, type=click.FloatRange(0, 1),
              help="Call cells under this confidence 'unassigned' [default: the model's, 0].")
@_layer_option
@_overwrite_option
@_tracking_options
@_friendly_errors
def annotate(model_uri, data, out, min_confidence, layer, overwrite, tracking_uri) -> None:
    """Name the cells of a sample with a model trained with labels; print the cells per type."""
    from .mlops import tracking
    from .mlops.exporting import annotate_with_registered
    from .mlops.outputs import check_output

    suffix = Path(out).suffix.lower()
    if suffix not in (".h5ad", ".csv"):
        raise click.UsageError(f"--out must end in .h5ad or .csv, got {out!r}")
    check_output(out, "h5ad" if suffix == ".h5ad" else "cell-types-csv", overwrite=overwrite)
    tracking.setup(tracking_uri)
    summary = annotate_with_registered(model_uri, data, out, layer=layer, min_confidence=min_confidence)
    width = max(map(len, summary["counts"]), default=0)
    for name, count in summary["counts"].items():
        click.echo(f"{name:<{width}}  {count:>7}  {count / summary['cells']:6.1%}")
    click.echo(f"{summary['cells']} cells; unassigned {summary['unassigned']:.1%}; wrote {summary['out']}")


@main.command()
@click.option("--name", "name", required=True, type=click.Choice(list(EXPERIMENT_NAMES)), help="Which experiment.")
@click.option(
    "--data",
    "data",
    default=None,
    callback=_none_if_empty,
    help="Labelled dataset (more may follow) [default: the files in ../shared/data].",
)
@click.argument("more_data", nargs=-1, type=click.Path(exists=True))
@click.option("--seeds", default=1, type=click.IntRange(min=1), help="Seeds 0..N-1 per setting.")
@click.option("--epochs", default=None, type=_PresetDefault(_SettingType("epochs")), help="Override the epochs.")
@click.option("--n-genes", default=None, type=_PresetDefault(_SettingType("n_genes")), help="Override the gene count.")
@_experiment_option
@_tracking_options
@_friendly_errors
def experiment(name, data, more_data, seeds, epochs, n_genes, experiment, tracking_uri) -> None:
    """Run one of the paper's experiments as a parent run with nested runs, a table and a figure."""
    from .benchmarks.experiments import run_experiment
    from .mlops import tracking

    tracking.setup(tracking_uri, experiment)
    paths = [p for p in (data, *more_data) if p]
    overrides = {k: v for k, v in {"epochs": epochs, "n_genes": n_genes}.items() if v is not None}
    summary = run_experiment(name, paths or None, seeds=range(seeds), overrides=overrides)
    click.echo(summary.to_markdown(index=False, floatfmt=".3f"))


class _SplitList(_CsvList):
    """``all`` or a comma-separated list of split names."""

    name = "all|NAME,NAME"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip() == "all":
            return list(self.choices)
        return super().convert(value, param, ctx)


@main.command("annotation-benchmark")
@click.option("--splits", default="all", type=_SplitList(ANNOTATION_SPLITS),
              help=f"Reference -> query splits: all, or some of {', '.join(ANNOTATION_SPLITS)}.")
@click.option("--seeds", default=2, type=click.IntRange(min=1), help="Seeds 0..N-1 (PBMC 3k: also the split's).")
@click.option("--methods", default=",".join(ANNOTATION_METHODS), type=_CsvList(ANNOTATION_METHODS),
              help="Comma-separated methods.")
@click.option("--data-dir", default="../shared/data", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the splits' .h5ad files; a missing file skips its splits.")
@click.option("--celltypist-python", default=None, callback=_none_if_empty,
              help="Python of an environment with CellTypist and scikit-learn < 1.8 [default: skip celltypist].")
@click.option("--ingest-python", default=None, callback=_none_if_empty,
              help="Python of an environment with scanpy and pynndescent 0.5 [default: skip ingest].")
@click.option("--scanvi-python", default=None, callback=_none_if_empty,
              help="Python of an environment with scvi-tools [default: skip scanvi].")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="CSV with one row per split, method and seed (written as rows finish).")
@_overwrite_option
@_friendly_errors
def annotation_benchmark(splits, seeds, methods, data_dir, celltypist_python, ingest_python, scanvi_python, out,
                         overwrite) -> None:
    """Name the cells of a query from a reference without one type: every split, seed and method, one table.

    Prints macro F1 per split and every metric's mean over splits per method; a method that
    cannot run, and a tool whose calls fail the sanity check, are listed with the reason.
    """
    from .benchmarks.annotation_benchmark import SPLITS, format_tables, run_annotation_benchmark
    from .mlops.outputs import check_output

    path = check_output(out, "csv", overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = run_annotation_benchmark(
        [SPLITS[name] for name in splits], data_dir=data_dir, seeds=range(seeds), methods=methods,
        interpreters={"celltypist": celltypist_python, "ingest": ingest_python, "scanvi": scanvi_python}, out=path,
        on_message=lambda text: click.echo(text, err=True))
    click.echo(format_tables(results))


_CELL_COUNTS = _CellCounts()


@main.command("scale-benchmark")
@click.option("--cells", default="10000,100000,1000000", type=_CELL_COUNTS, help="Dataset sizes (cells), in order.")
@click.option("--genes", default=2000, type=click.IntRange(min=10), help="Genes simulated per cell.")
@click.option("--n-genes-kept", default=500, type=click.IntRange(min=2), help="Genes the model keeps.")
@click.option("--epochs", default=30, type=click.IntRange(min=1), help="Training epochs (paper preset otherwise).")
@click.option("--groups", default=8, type=click.IntRange(min=2), help="Simulated groups (k for KMeans).")
@click.option("--seed", default=0, type=_SettingType("seed"), help="Simulation and training seed.")
@click.option("--skip-scanpy", is_flag=True, help="Skip scanpy's PCA -> neighbors -> Leiden baseline.")
@click.option("--skip-leiden", is_flag=True, help="Skip Leiden on the contrastive embedding.")
@click.option("--workdir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Folder for the temporary .h5ad and preprocessed matrix [default: the system temp folder].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV; one row appended per size.")
@_friendly_errors
def scale_benchmark(cells, genes, n_genes_kept, epochs, groups, seed, skip_scanpy, skip_leiden, workdir, out) -> None:
    """Time and memory of out-of-core training, ONNX embedding and clustering on simulated data of growing size.

    Each size is written to a backed .h5ad in blocks, then preprocessed, trained on and embedded
    without loading it whole; scanpy's PCA -> neighbors -> Leiden runs beside it. Ctrl-C ends the
    current size gracefully (its partial row is written).
    """
    from .benchmarks.scale import markdown_table, run_scale_benchmark

    def show(row):
        click.echo(f"{row['n_cells']} cells: train {row.get('train_seconds', float('nan'))} s, "
                   f"peak {row.get('peak_mb', float('nan'))} MB ({row['status']})", err=True)

    rows = run_scale_benchmark(cells, out, n_genes=genes, n_genes_kept=n_genes_kept, epochs=epochs, n_groups=groups,
                               seed=seed, scanpy=not skip_scanpy, leiden=not skip_leiden, workdir=workdir, on_row=show)
    click.echo(markdown_table(rows))
    click.echo(f"\nappended {len(rows)} row(s) to {out}")


def _leiden_cells(ctx, param, value):
    if str(value).strip() in ("", "0"):
        return ()
    return _CELL_COUNTS.convert(value, param, ctx)


@main.command("speed-benchmark")
@click.option("--data", required=True, help="Counts file (cells are taken from its start) or 'simulated'.")
@click.option("--model-uri", default=None, callback=_none_if_empty,
              help="A logged model (models:/, runs:/ or a folder) [default: train one on --data].")
@click.option("--cells", "n_cells", default=4000, type=click.IntRange(min=1), help="Cells timed.")
@click.option("--request-cells", default=500, type=click.IntRange(min=1), help="Cells per HTTP request.")
@click.option("--clients", default=8, type=click.IntRange(min=1), help="Concurrent clients of the load test.")
@click.option("--requests-per-client", default=4, type=click.IntRange(min=1))
@click.option("--workers", default=1, type=click.IntRange(min=1), help="Server worker processes.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="onnxruntime threads per worker [default: cores // workers].")
@click.option("--epochs", default=2, type=click.IntRange(min=1), help="Epochs of the trained model.")
@click.option("--n-genes", default=2000, type=click.IntRange(min=2), help="Genes of the trained model.")
@click.option("--leiden-cells", default="10000,100000", callback=_leiden_cells,
              help="Sizes of the Leiden rows (igraph against leidenalg on the model's embedding extended to "
                   "these many cells); 0 or '' skips them.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV with one row per path.")
@_overwrite_option
@_tracking_options
@_friendly_errors
def speed_benchmark(data, model_uri, n_cells, request_cells, clients, requests_per_client, workers, threads, epochs,
                    n_genes, leiden_cells, out, overwrite, tracking_uri) -> None:
    """Cells/s of the bare ONNX encoder, in-process predict and a real served model (JSON, CSV, parquet, N clients).

    The server (`mlflow models serve` on 127.0.0.1) is started and stopped by the command; without
    --model-uri a model is trained into a temporary MLflow store. Quote the ratios: every path is
    timed in the same run, on the same cells. Leiden follows, after the server has stopped: igraph
    (now) against leidenalg (before) on the model's embedding extended to --leiden-cells cells.
    """
    from .benchmarks.speed import markdown, run_speed_benchmark
    from .mlops.outputs import check_output

    out = check_output(out, "csv", overwrite=overwrite)
    if model_uri is not None:
        _use_store(tracking_uri, must_exist=_reads_store(model_uri))
    table = run_speed_benchmark(data, model_uri=model_uri, n_cells=n_cells, request_cells=request_cells,
                                clients=clients, requests_per_client=requests_per_client, workers=workers,
                                threads=threads, epochs=epochs, n_genes=n_genes, leiden_cells=leiden_cells,
                                on_row=lambda row: click.echo(f"timed {row['path']}", err=True))
    click.echo(markdown(table))
    click.echo(f"server {table.attrs['server']} stopped", err=True)
    # Led by the columns of the other benchmark CSVs, so that a rerun may replace it (`--out`).
    rows = table.rename(columns={"path": "method"})
    rows.insert(0, "dataset", Path(data).stem if data != "simulated" else data)
    rows.insert(2, "seed", 0)
    rows.to_csv(out, index=False)
    click.echo(f"\nwrote {out}")


@main.command("load-benchmark")
@click.option("--data", required=True, help="Counts file (the slow requests' cells are drawn from it) or 'simulated'.")
@click.option("--model-uri", default=None, callback=_none_if_empty,
              help="A logged model (models:/, runs:/ or a folder) [default: train one on --data].")
@click.option("--slow-cells", default=5_000, type=click.IntRange(min=3),
              help="Cells of each slow request (5,000 x 2,000 genes is the largest JSON body the defaults accept).")
@click.option("--slow-neighbors", default=None, type=click.IntRange(min=2),
              help="n_neighbors of each slow leiden request [default: the most the default budget allows].")
@click.option("--request-cells", default=500, type=click.IntRange(min=1), help="Cells per throughput request.")
@click.option("--requests-per-client", default=4, type=click.IntRange(min=1))
@click.option("--workers", default="1,2", help="Server worker counts, one server each (comma-separated).")
@click.option("--epochs", default=2, type=click.IntRange(min=1), help="Epochs of the trained model.")
@click.option("--n-genes", default=2000, type=click.IntRange(min=2), help="Genes of the trained model.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the measurements as JSON.")
@_overwrite_option
@_tracking_options
@_friendly_errors
def load_benchmark(data, model_uri, slow_cells, slow_neighbors, request_cells, requests_per_client, workers, epochs,
                   n_genes, out, overwrite, tracking_uri) -> None:
    """A served model under 8 slow requests: quick-request latency, slow-request answers, memory, throughput.

    Starts the model with serving/serve.sh and its documented defaults (127.0.0.1, stopped again),
    sends 8 slow leiden requests at once and a stream of 2-cell requests meanwhile, then 8
    clients of 500-cell requests; once per --workers count.
    """
    from .benchmarks.load import markdown, run_load_benchmark

    try:
        counts = tuple(int(w) for w in str(workers).split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected comma-separated worker counts >= 1, got {workers!r}", param_hint="--workers")
    if out is not None and Path(out).exists() and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
    if model_uri is not None:
        from .mlops import tracking

        tracking.setup(tracking_uri)
    result = run_load_benchmark(data, model_uri=model_uri, slow_cells=slow_cells, slow_neighbors=slow_neighbors,
                                request_cells=request_cells, requests_per_client=requests_per_client, workers=counts,
                                epochs=epochs, n_genes=n_genes, on_step=lambda text: click.echo(text, err=True))
    click.echo(markdown(result))
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1, default=float))
        click.echo(f"\nwrote {out}")


@main.command()
def presets() -> None:
    """List every preset: the two documented ones (fused, the default, and paper) and the research presets."""
    from .method.config import PRESET_NOTES

    width = max(map(len, PRESETS))
    for name in PRESETS:
        click.echo(f"{name:<{width}}  {PRESET_NOTES[name]}")


@main.command("write-mlproject")
@click.option("--check", is_flag=True, help="Exit 1 if MLproject differs from what the parameter table generates.")
@_friendly_errors
def write_mlproject(check) -> None:
    """Write MLproject (its `train` entry from the parameter table), or check that it is current."""
    from .mlops.mlproject import MLPROJECT_PATH, render

    text = render()
    if check:
        if MLPROJECT_PATH.read_text() != text:
            raise click.ClickException(f"{MLPROJECT_PATH} is out of date; run `contrastive-sc write-mlproject`")
        click.echo(f"{MLPROJECT_PATH} is current")
        return
    MLPROJECT_PATH.write_text(text)
    click.echo(f"wrote {MLPROJECT_PATH}")


@main.command("training-speed")
@click.option("--data", required=True, help="Raw counts to train on (docs/results.md measures worm neuron).")
@click.option("--repeats", default=3, type=click.IntRange(min=1), help="Fits per preset; the best is kept.")
@_friendly_errors
def training_speed(data, repeats) -> None:
    """Training seconds of the paper and default presets against the dense FLOP floor of the paper's training."""
    from .benchmarks.training_speed import format_rows, training_floor
    from .method.io import read

    click.echo(format_rows(training_floor(read(data), repeats=repeats, verbose=False)))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
