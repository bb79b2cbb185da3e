"""The one place that starts MLflow runs and logs to them (training runs, and the parent and nested
runs of sweeps and experiments).

Tracking defaults to an explicit SQLite store, ``sqlite:///<cwd>/mlflow.db``;
``MLFLOW_TRACKING_URI`` or an explicit URI (a remote tracking server, say) overrides it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from .run_data import log_dataset
from .signals import deferred, keep_killed, raise_if_stopped
from .store import canonical_uri, remove_encoded_twin, require_existing, sqlite_path

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "contrastive-sc"
MODEL_NAME_IN_RUN = "model"
#: Run artifact folder holding the torch checkpoint (for re-export and fine inspection).
TORCH_MODEL_ARTIFACT = "torch_model"
PYFUNC_FILE = Path(__file__).resolve().parents[2] / "models" / "contrastive_sc_model.py"
#: What the served model needs, pinned at log time to the versions installed (see
#: :func:`serving_requirements`). torch stays out (its pin would pull CUDA wheels on serve);
#: Leiden runs on igraph's own implementation (leidenalg is only the tests' reference) and
#: pynndescent builds its kNN graph above 50,000 cells.
SERVING_REQUIREMENTS = ["numpy", "pandas", "scipy", "scikit-learn", "onnxruntime", "igraph", "pynndescent"]


def serving_requirements() -> list[str]:
    """:data:`SERVING_REQUIREMENTS` pinned to the installed versions (``name==version``).

    The GPU build of onnxruntime is one import package with another distribution name: the
    installed one is pinned, so a model logged on a CUDA machine asks for ``onnxruntime-gpu``.
    Unpinned, the served environment would drift with every release of these packages.
    """
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in SERVING_REQUIREMENTS:
        candidates = ["onnxruntime", "onnxruntime-gpu"] if name == "onnxruntime" else [name]
        for candidate in candidates:
            try:
                pinned.append(f"{candidate}=={version(candidate)}")
                break
            except PackageNotFoundError:
                continue
        else:
            msg = f"{name} is not installed; the served model needs it (pip install {name})"
            raise ModuleNotFoundError(msg)
    return pinned


def quiet_mlflow(verbose: bool = False) -> None:
    """Keep MLflow's INFO logs, UserWarnings and download bars out of the command's output."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # A failed write (read-only store, full disk) is logged there with two tracebacks and the SQL
    # statement before MLflow raises it; the command reports it in one line (store.storage_failure).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # MLflow's advice to model authors (type hints, input examples) is not something a user of the
    # command can act on. A filter cannot hide it: MLflow wraps log_model in catch_warnings with
    # simplefilter("once"), which outranks ours. The display hook survives that wrapping.
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and f"{os.sep}mlflow{os.sep}" in str(filename):
            return
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``; a SQLite path made
    plain and absolute (see :mod:`~contrastive_sc.mlops.store`)."""
    return canonical_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}")


def setup(tracking_uri: str | None = None, experiment: str | None = None, *, must_exist: bool = False,
          origin: str | None = None) -> str:
    """Point MLflow at the tracking store and experiment; return the URI in use.

    Parameters
    ----------
    tracking_uri
        The store [default: ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``]. A percent-encoded SQLite
        URI (as ``mlflow run`` passes its default) is decoded, so MLflow, the registry lock and
        messages all see the one file.
    experiment
        Experiment to create if needed and make active (not under ``mlflow run``, whose run exists).
    must_exist
        Refuse a ``sqlite:///`` store whose file does not exist instead of letting MLflow create an
        empty one: for commands that read a store (register, promote, embed, ...).
    origin
        Where the URI came from, for that refusal [default: worked out from the arguments].
    """
    import mlflow

    given = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    uri = resolve_tracking_uri(tracking_uri)
    if must_exist:
        if origin is None:
            origin = ("given as the tracking URI" if tracking_uri else "from MLFLOW_TRACKING_URI" if given
                      else f"the default ./mlflow.db in {Path.cwd()}")
        require_existing(uri, origin)
    remove_encoded_twin(given)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if experiment and not os.environ.get("MLFLOW_RUN_ID"):
        # Under `mlflow run` the run already exists in the experiment the user chose.
        ensure_experiment(experiment, uri)
        mlflow.set_experiment(experiment)
    return uri


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Create experiment ``name`` if needed and return its id.

    With a local SQLite store, artifacts go to ``mlartifacts/`` beside the database file rather
    than MLflow's default of the current directory, so a store and its artifacts move together.
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    database = sqlite_path(uri)
    location = (database.parent / "mlartifacts").as_uri() if database is not None else None
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def train_run(adata, config, *, layer: str | None = None, label_key: str | None = None,
              batch_key: str | None = None, methods=("kmeans", "leiden"), run_name: str | None = None,
              nested: bool = False, log_model: bool = True, map_plot: bool = True, progress: bool = False) -> dict:
    """Train one model and record everything about it in an MLflow run.

    Logs every config value as a param, the loss per epoch, ARI / NMI (with labels),
    silhouette, Calinski-Harabasz and clusters found per clustering method, timings, the
    dataset, tags (preset, package version, git commit), the saved model, a loss curve, a UMAP
    map, marker genes and contingency tables per clustering, and the embed-then-cluster pyfunc
    model. ``layer``, ``label_key`` and ``batch_key`` are the model's data setup
    (:meth:`~contrastive_sc.method.model.ContrastiveSC.fit`); with ``batch_key`` the batches are
    also drawn on the map and scored (``batch_mixing``). The data is checked before the run exists.

    Returns
    -------
    ``{"run_id", "metrics", "model_uri"}``.
    """
    import mlflow

    from ..analysis.evaluation import as_metrics, cluster_and_score
    from ..analysis.metrics import batch_mixing
    from ..analysis.run_report import write_run_report
    from ..method.model import ContrastiveSC

    cells = ContrastiveSC(config).check(adata, layer=layer, label_key=label_key, batch_key=batch_key)  # before a run
    n_clusters = config.cluster.n_clusters or (len(np.unique(cells.labels)) if cells.labels is not None else None)
    model = ContrastiveSC(config.replace(n_clusters=n_clusters))  # k defaults to the number of cell types
    methods = [m for m in methods if m != "kmeans" or n_clusters]
    dataset_name = adata.uns.get("dataset", {}).get("name", "anndata")

    with _training_run(run_name, nested) as run:
        # Effective values under "config.": `mlflow run` has already logged the entry point's
        # raw parameters (e.g. lr=preset) under the plain names, and params cannot change.
        params = {f"config.{k}": v for k, v in model.config.to_params().items()}
        with deferred():  # a stop waits for the end of a store write (signals.py)
            mlflow.log_params(_as_param_strings(params | {"cluster_methods": ",".join(methods)}))
            mlflow.set_tags({"preset": model.config.preset, "contrastive_sc_version": __version__,
                             "git_commit": git_commit(), "dataset": dataset_name})
            log_dataset(cells.view, dataset_name, cells.setup)

        started = time.perf_counter()
        model.fit_cells(cells, progress=progress, on_epoch=_log_epoch_loss)
        fit_seconds = time.perf_counter() - started
        embedding = model.training_embedding
        cluster, seed = model.config.cluster, model.config.train.seed
        clusterings = cluster_and_score(embedding, methods, cells.labels, n_clusters=n_clusters,
                                        resolution=cluster.resolution, n_neighbors=cluster.n_neighbors, seed=seed)
        metrics = {"fit_seconds": fit_seconds, "train_seconds": model.history.seconds,
                   "cells_per_second": model.history.cells_per_second, "n_genes_used": model.state.n_genes,
                   **as_metrics(clusterings)}
        if cells.batches is not None:
            metrics["batch_mixing"] = batch_mixing(embedding, cells.batches)
        # how well a model trained with labels names cells, measured on its reference (out of fold)
        metrics |= {f"annotation_{key}": value for key, value in model.annotation_report.items()}
        if model.annotator is not None and model.annotator.few_cell_types:
            mlflow.set_tag("annotation.few_cell_types", json.dumps(model.annotator.few_cell_types))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            labels_by_method = {c.method: c.labels for c in clusterings}
            report = write_run_report(tmp, cells.view, embedding, labels_by_method, loss=model.history.loss,
                                      truth=cells.labels, batches=cells.batches, map_plot=map_plot, seed=seed,
                                      title=f"{model.config.preset} preset, UMAP of the embedding")
            with deferred():
                model_uri = _log_results(tmp, model, metrics, report, log_model)
        return {"run_id": run.info.run_id, "metrics": metrics, "model_uri": model_uri}


def _log_results(folder: Path, model, metrics: dict, report: list[Path], log_model: bool) -> str | None:
    """Log the metrics, the report's files, the saved model and (``log_model``) the pyfunc; return its URI."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
    for path in report:
        mlflow.log_artifact(str(path))
    mlflow.log_artifacts(str(model.save(folder / TORCH_MODEL_ARTIFACT)), TORCH_MODEL_ARTIFACT)
    model_uri = _log_model(folder / "package", model) if log_model else None
    if model_uri:
        mlflow.set_tag("model_uri", model_uri)
    return model_uri


@contextlib.contextmanager
def parent_run(run_name: str, params: dict, tags: dict | None = None):
    """A run grouping nested ones (a sweep, an experiment), with its tags and params; yields the run.

    Give ``params`` prefixed keys (``sweep.grid``): under ``mlflow run`` the entry point's own
    parameters are already logged under the plain names, and a logged param cannot change.
    """
    import mlflow

    with mlflow.start_run(run_name=run_name) as run:
        if tags:
            mlflow.set_tags(tags)
        mlflow.log_params(params)
        yield run


def log_params(params: dict) -> None:
    """Log params to the active run."""
    import mlflow

    mlflow.log_params(params)


def set_tags(tags: dict) -> None:
    """Set tags on the active run."""
    import mlflow

    mlflow.set_tags(tags)


def log_nested_run(run_name: str, params: dict, metrics: dict) -> None:
    """A finished nested run of the active run: params as strings, the finite metrics."""
    import mlflow

    with mlflow.start_run(run_name=run_name, nested=True):
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})


def log_table(table, name: str) -> None:
    """Log a table to the active run as ``<name>.csv`` and ``<name>.md``."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / f"{name}.csv"
        table.to_csv(csv, index=False)
        md = Path(tmp) / f"{name}.md"
        md.write_text(table.to_markdown(index=False, floatfmt=".4f"))
        mlflow.log_artifact(str(csv))
        mlflow.log_artifact(str(md))


def log_artifact(path: str | Path) -> None:
    """Log a file to the active run."""
    import mlflow

    mlflow.log_artifact(str(path))


@contextlib.contextmanager
def _training_run(run_name: str | None, nested: bool):
    """An MLflow run whose status changes a stop cannot cut in half; KILLED when training is interrupted.

    Interrupted (Ctrl-C, or SIGTERM turned into one) the run ends KILLED: MLflow would mark it
    FAILED, and a process killed by an unhandled SIGTERM would leave it RUNNING forever. A run
    that did not finish never gets its ``model_uri`` tag, so it can never be registered. Its
    start and its end are written inside :func:`~contrastive_sc.mlops.signals.deferred`, so a
    stop that arrives then is raised once the store has the run's status.
    """
    import mlflow

    with deferred(raise_after=False):
        run = mlflow.start_run(run_name=run_name, nested=nested)
    try:
        raise_if_stopped()  # asked for while the run was being created
        yield run
    except (KeyboardInterrupt, SystemExit):
        written = True
        try:
            with deferred(raise_after=False):  # a second Ctrl-C does not cut this write in half
                mlflow.end_run("KILLED")
        except Exception as error:  # e.g. the store is locked: a process writes KILLED once this one has ended
            log.warning("the run could not be marked KILLED now (%s); it will be once this process ends",
                        str(error).splitlines()[0])
            written = False
        # `mlflow run` would mark it FAILED after this process ends
        keep_killed(run.info.run_id, mlflow.get_tracking_uri(), this_process=not written)
        raise
    except BaseException:
        with deferred(raise_after=False):
            mlflow.end_run("FAILED")
        raise
    with deferred():
        mlflow.end_run("FINISHED")


def _as_param_strings(params: dict) -> dict:
    return {k: ",".join(map(str, v)) if isinstance(v, list | tuple) else v for k, v in params.items()}


def _log_model(folder: Path, model) -> str:
    """Log the embed-then-cluster pyfunc with its params/output signature and an input example.

    No input schema: measured with MLflow 3.17, per-gene ``ColSpec`` columns (``double`` or
    ``long``, ``required=False``) refuse integer counts (int64 -> double is "not safe") or
    float ones, empty the tensor (``inputs``) form, and put the whole 2,000-gene schema in every
    error message. The model checks its gene columns itself; the input example lists them.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from ..serve.inference import PredictParams, package_model

    artifacts = package_model(model, folder)
    # PredictParams's fields, typed and defaulted as it declares them; Leiden's settings default
    # to those the model was trained and scored with, min_confidence to the model's own (if any).
    trained = {"resolution": model.config.cluster.resolution, "n_neighbors": model.config.cluster.n_neighbors,
               "min_confidence": model.annotator.min_confidence if model.annotator else None}
    params = ParamSchema([ParamSpec(name, kind, default) for name, kind, default in PredictParams.schema(trained)])
    dims = int(model.encoder.n_outputs)
    annotated = [ColSpec("string", "cell_type"), ColSpec("double", "confidence")] if model.annotator else []
    outputs = Schema([ColSpec("string", "cell"), ColSpec("long", "cluster"), ColSpec("double", "gene_coverage")]
                     + annotated + [ColSpec("float", f"emb_{i}", required=False) for i in range(dims)])
    if not PYFUNC_FILE.exists():
        msg = f"pyfunc definition not found at {PYFUNC_FILE}; run from a checkout of the contrastive-sc repository"
        raise FileNotFoundError(msg)
    # Two cells of integer counts over the model's genes, near the training means: a valid request.
    typical = np.rint(np.expm1(np.asarray(model.state.mean)).clip(0, None)).astype(np.int64)
    example = pd.DataFrame([typical, typical + 1], columns=list(model.state.genes), index=["cell_0", "cell_1"])
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=str(PYFUNC_FILE),
        artifacts=artifacts,
        code_paths=[str(Path(__file__).resolve().parents[1])],  # the whole package
        signature=ModelSignature(inputs=None, outputs=outputs, params=params),
        input_example=(example, {"method": "trained", "return_embedding": False}),
        pip_requirements=serving_requirements(),
    )
    return info.model_uri


def _log_epoch_loss(epoch: int, loss: float) -> None:
    # Live progress: a reader of the same SQLite store (the MLflow UI, a script polling runs) can
    # hold it for a moment; wait for it a few times, and never let a missed point stop the training.
    import mlflow

    raise_if_stopped()  # a stop asked for during the epoch, whose exception a library may have swallowed
    with deferred():  # ... and one asked for during the write is raised after it
        try:
            retry_while_busy(mlflow.log_metric, "loss", loss, step=epoch)
        except Exception as error:  # the run's final metrics are still written when training ends
            log.warning("epoch %d loss not logged (%s); training goes on", epoch, str(error).splitlines()[0])


def retry_while_busy(call, *args, attempts: int = 6, **kwargs):
    """``call(*args, **kwargs)``, retried briefly while another process holds the SQLite store.

    Registry writes (promotions are kept apart by a file lock, but a training run may be writing
    the same store) and a run's per-epoch logging (a reader such as the MLflow UI may hold it).
    """
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if attempt == attempts - 1 or not _is_transient(error):
                raise
            time.sleep(0.1 * 2**attempt * (1 + random.random()))
    return None  # pragma: no cover


def _is_transient(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if not (isinstance(error, MlflowException) or type(error).__module__.startswith("sqlalchemy")):
        return False
    text = str(error).lower()
    return "database is locked" in text or "unique constraint failed" in text or "database is busy" in text
