"""Model registry: register the best run, and metric-gated promotion with rollback.

Aliases only (stages are deprecated): ``@challenger`` is the latest registered candidate,
``@champion`` the version in service. Promotion moves ``@champion`` only when the candidate
beats it on the registration metric, measured on the same dataset (or, when told, on one pinned
labelled evaluation set); the replaced versions are kept in a history (a tag of the registered
model) so that :func:`rollback` can restore them.

MLflow's registry has no compare-and-set: two processes promoting at once would both read the
old champion. Every read-compare-write of the aliases and the history therefore runs under a
cross-process file lock (:func:`registry_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .store import describe, sqlite_path, store_key
from .tracking import retry_while_busy

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"
#: Version tags naming the training data (the run's ``dataset`` tag and ``data.digest`` param).
DATASET_TAG, DIGEST_TAG = "dataset", "dataset_digest"
#: Preference order of the selection metric: a model trained with labels names cells, and is ranked
#: on how well it names them (out-of-fold macro F1 on its reference); else ARI with labels, else silhouette.
ANNOTATION_METRIC = "annotation_cv_macro_f1"
METRIC_PREFERENCE = (ANNOTATION_METRIC, "kmeans_ari", "leiden_ari", "auto_ari", "kmeans_silhouette",
                     "leiden_silhouette", "auto_silhouette")
#: Seconds a registry change waits for another one to finish before giving up.
LOCK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class PromotionResult:
    """What :func:`promote` or :func:`rollback` did, in words and versions."""

    changed: bool
    champion: str | None
    previous: str | None
    message: str


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


# ----------------------------------------------------------------------------- locking
def lock_path(registry_uri: str) -> Path:
    """The lock file that serialises registry changes for ``registry_uri``.

    Keyed on the store, not on how its URI is spelled: for ``sqlite:///`` URIs it is
    ``<database>.registry.lock`` beside the database file the URI opens (percent-decoded and
    resolved, so ``mlflow run``'s encoded URI, the CLI's plain path and a relative path share it);
    otherwise it lives in a per-user cache folder, keyed by a hash of the normalised URI, which
    serialises the promotions made from this machine only.
    """
    database = sqlite_path(registry_uri)
    if database is not None:
        return database.with_name(database.name + ".registry.lock")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "contrastive-sc" / "registry-locks"
    return cache / f"{hashlib.sha256(store_key(registry_uri).encode()).hexdigest()[:16]}.lock"


@contextmanager
def registry_lock(registry_uri: str | None = None, timeout: float = LOCK_TIMEOUT_S):
    """Hold the cross-process lock of ``registry_uri`` (default: the active registry URI).

    The lock is an OS file lock: it is released when its holder exits, even by a crash. A caller
    that has to wait says so once on stderr (naming the lock file), then waits up to ``timeout``.
    """
    from filelock import FileLock, Timeout

    uri = registry_uri or _active_registry_uri()
    path = lock_path(uri)
    try:
        if sqlite_path(uri) is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():  # never create folders from a URI: a misspelt one would stay behind
            msg = f"cannot take the registry lock {path}: the store's folder {path.parent} does not exist"
            raise ValueError(msg)
        lock = FileLock(str(path), timeout=timeout)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("waiting for %s: another registry change is in progress", path)
            lock.acquire()
    except Timeout:
        msg = (f"another registry change has held {path} for more than {timeout:.0f} s; "
               "retry once it has finished")
        raise ValueError(msg) from None
    except OSError as error:
        msg = f"cannot take the registry lock {path}: {error.strerror or error}; the folder must be writable"
        raise ValueError(msg) from None
    try:
        yield path
    finally:
        lock.release()


# ----------------------------------------------------------------------------- registration
def choose_metric(runs) -> str:
    """The first metric of :data:`METRIC_PREFERENCE` that the runs report."""
    for metric in METRIC_PREFERENCE:
        if any(metric in run.data.metrics for run in runs):
            return metric
    msg = f"no run reports any of {list(METRIC_PREFERENCE)}; train with `contrastive-sc train` first"
    raise ValueError(msg)


def register_best(experiment: str, name: str, metric: str | None = None) -> dict:
    """Register the model of the experiment's best finished run under ``name``.

    The version is tagged with the run's metrics, dataset (name and digest) and run id, and gets
    the ``@challenger`` alias. Registering a run that already has a version returns that version.

    Returns
    -------
    ``{"version", "run_id", "metric", "value", "new"}``.
    """
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        msg = f"experiment {experiment!r} not found in {_tracking_uri()}; train into it first"
        raise ValueError(msg)
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=5000)
    runs = [r for r in runs if r.data.tags.get("model_uri")]
    if not runs:
        msg = f"experiment {experiment!r} has no finished run with a logged model"
        raise ValueError(msg)
    metric = metric or choose_metric(runs)
    scored = [r for r in runs if metric in r.data.metrics]
    if not scored:
        msg = f"no run of {experiment!r} reports metric {metric!r}; available: {sorted(runs[0].data.metrics)}"
        raise ValueError(msg)
    # search_runs(order_by=...) cannot be trusted to sort missing metrics last: sort here.
    best = max(scored, key=lambda r: (r.data.metrics[metric], r.info.start_time))
    return register_run(best.info.run_id, name, metric)


def register_run(run_id: str, name: str, metric: str | None = None) -> dict:
    """Register one run's model under ``name``, tag it, and alias it ``@challenger``.

    A run that already has a version of ``name`` is not registered twice.
    """
    client = _client()
    run = _get_run(client, run_id)
    if run.info.lifecycle_stage == "deleted" or _experiment_deleted(client, run.info.experiment_id):
        # Deleting an experiment deletes its runs too: name the experiment when it is the cause.
        experiment = run.info.experiment_id
        restore = (f"the experiment ({experiment}) of run {run_id} is deleted; restore it first "
                   f"(`mlflow experiments restore --experiment-id {experiment}`)"
                   if _experiment_deleted(client, experiment) else
                   f"the run {run_id} is deleted; restore it first (`mlflow runs restore --run-id {run_id}`)")
        msg = f"{restore} or register another run"
        raise ValueError(msg)
    if run.info.status != "FINISHED" or not run.data.tags.get("model_uri"):
        has_model = "a" if run.data.tags.get("model_uri") else "no"
        msg = (f"run {run_id} is {run.info.status} and has {has_model} logged model; "
               "only finished runs with a model can be registered")
        raise ValueError(msg)
    metric = metric or choose_metric([run])
    if metric not in run.data.metrics:
        msg = f"run {run_id} does not report {metric!r}; it has {sorted(run.data.metrics)}"
        raise ValueError(msg)
    value = run.data.metrics[metric]
    tags = {
        "run_id": run_id,
        "metric": metric,
        "metric_value": repr(value),
        DATASET_TAG: run.data.tags.get("dataset", ""),
        DIGEST_TAG: run.data.params.get("data.digest", ""),
        "preset": run.data.tags.get("preset", ""),
    }
    tags |= {f"metric.{k}": repr(v) for k, v in run.data.metrics.items() if k != "loss"}
    # Under the lock, so that two registrations of one run cannot both create a version.
    with registry_lock():
        existing = _version_of_run(client, name, run_id)
        new = existing is None
        if new:
            existing = str(_register(run.data.tags["model_uri"], name, tags).version)
        retry_while_busy(client.set_registered_model_alias, name, CHALLENGER, existing)
    return {"version": existing, "run_id": run_id, "metric": metric, "value": value, "new": new}


def _register(model_uri: str, name: str, tags: dict):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        # mlflow.register_model prints "Successfully registered..." straight to stderr; the
        # command prints its own one-line summary, and failures arrive as exceptions.
        with contextlib.redirect_stderr(io.StringIO()):
            return retry_while_busy(mlflow.register_model, model_uri, name, tags=tags)
    except MlflowException as error:
        msg = f"registering {model_uri} as {name!r} failed: {_one_line(error.message)}"
        raise ValueError(msg) from None


# ----------------------------------------------------------------------------- promotion
def promote(name: str, version: str | None = None, *, eval_data: str | None = None,
            label_key: str | None = None) -> PromotionResult:
    """Move ``@champion`` to ``version`` (default: ``@challenger``) if it beats the champion.

    Without ``eval_data`` the comparison uses the metric the versions were registered with, and
    is refused when they were trained on different datasets (different digests). With
    ``eval_data`` (a labelled dataset, ``label_key`` its label column) both versions cluster that
    one dataset with KMeans at the true number of labels and their ARIs are compared; the scores
    are recorded on the versions as ``eval.<digest>.ari`` tags.

    A tie or a loss is refused; promoting the current champion changes nothing. The decision
    and the alias move happen under :func:`registry_lock`, so concurrent promotions end with the
    best version as champion.
    """
    client = _client()
    candidate = _get_version(client, name, version)
    evaluation = _Evaluation(eval_data, label_key) if eval_data else None
    incumbent = _alias_version(client, name, CHAMPION)
    if evaluation is not None and (incumbent is None or str(incumbent.version) != str(candidate.version)):
        # Score before taking the lock (it can take a while); a champion that changes meanwhile is
        # scored under the lock below.
        for contender in (candidate, incumbent):
            if contender is not None:
                evaluation.score(name, contender)
    with registry_lock():
        candidate = _get_version(client, name, str(candidate.version))
        champion = _alias_version(client, name, CHAMPION)
        if champion is not None and str(champion.version) == str(candidate.version):
            return PromotionResult(
                False,
                str(champion.version),
                None,
                f"version {candidate.version} is already @{CHAMPION} of {name}; nothing changed",
            )
        if evaluation is not None:
            refusal, detail = evaluation.compare(client, name, candidate, champion)
        else:
            refusal, detail = _compare_registered(client, candidate, champion)
        if refusal is not None:
            return PromotionResult(False, str(champion.version), None, refusal)
        if champion is not None:
            _push_history(client, name, str(champion.version))
        retry_while_busy(client.set_registered_model_alias, name, CHAMPION, candidate.version)
    previous = str(champion.version) if champion is not None else None
    was = f" (was version {previous})" if previous else ""
    return PromotionResult(
        True,
        str(candidate.version),
        previous,
        f"version {candidate.version} ({detail}) is now @{CHAMPION} of {name}{was}",
    )


def _compare_registered(client, candidate, champion) -> tuple[str | None, str]:
    """``(refusal or None, candidate's score in words)`` on the metric tags of the versions."""
    metric = candidate.tags.get("metric")
    value = _metric_value(candidate, metric)
    detail = f"{metric}={value:.4f}"
    if champion is None:
        return None, detail
    if champion.tags.get("metric") != metric:
        return (f"refused: version {candidate.version} was scored on {metric!r} but champion "
                f"{champion.version} on {champion.tags.get('metric')!r}; they cannot be compared"), detail
    theirs, ours = _dataset_of(client, champion), _dataset_of(client, candidate)
    if theirs[1] is None or ours[1] is None or theirs[1] != ours[1]:
        return (f"refused: version {candidate.version} was trained on {_describe(ours)} but @{CHAMPION} version "
                f"{champion.version} on {_describe(theirs)}; their {metric} values cannot be compared. Pass "
                "--eval-data FILE (a labelled dataset) to score both on it"), detail
    incumbent = _metric_value(champion, metric)
    if not value > incumbent:
        verdict = "ties" if value == incumbent else "loses to"
        return (f"refused: version {candidate.version} ({metric}={value:.4f}) {verdict} "
                f"@{CHAMPION} version {champion.version} ({metric}={incumbent:.4f})"), detail
    return None, detail


class _Evaluation:
    """One pinned labelled dataset on which versions are scored (KMeans at the true k, ARI)."""

    def __init__(self, path: str, label_key: str | None) -> None:
        import numpy as np
        import pandas as pd

        from ..method.io import default_label_key, load
        from .run_data import dataset_digest

        adata = load(path, label_key)
        label_key = label_key or default_label_key(adata)
        if label_key is None:
            msg = (f"evaluation data {path!r} has no 'label' column; pass --label-key with one of "
                   f"{list(adata.obs.columns)}")
            raise ValueError(msg)
        known = pd.notna(adata.obs[label_key]).to_numpy()
        if not known.all():
            adata = adata[known].copy()
        self.truth = np.asarray(adata.obs[label_key]).astype(str)
        self.n_clusters = len(np.unique(self.truth))
        if self.n_clusters < 2:
            msg = f"evaluation data {path!r} has {self.n_clusters} label(s) in {label_key!r}; expected at least 2"
            raise ValueError(msg)
        self.adata = adata
        self.name = adata.uns.get("dataset", {}).get("name", Path(path).name)
        self.digest = dataset_digest(adata)
        self.scores: dict[str, float] = {}

    def score(self, name: str, version) -> float:
        """The version's score on the data: annotation macro F1 for a model with labels, else KMeans ARI.

        Both versions of one comparison must be of the same kind (a version with labels against
        one without is refused: their scores measure different things).
        """
        import numpy as np
        from sklearn.metrics import f1_score

        from ..analysis.metrics import score_clustering

        number = str(version.version)
        if number not in self.scores:
            served = load_served_model(f"models:/{name}/{number}")
            params = {"method": "kmeans", "n_clusters": self.n_clusters}
            result = served.embed_and_cluster(self.adata.X, self.adata.var_names, params)
            if result.cell_types is not None:  # how well it names the cells (types it knows; unassigned = wrong)
                known = set(served.cell_types.names) & set(self.truth)
                if not known:
                    msg = (f"version {number} names {sorted(served.cell_types.names)[:5]}..., none of which is a "
                           f"label of the evaluation data ({sorted(set(self.truth))[:5]}...)")
                    raise ValueError(msg)
                rows = np.isin(self.truth, sorted(known))
                value = f1_score(self.truth[rows], np.asarray(result.cell_types)[rows].astype(str),
                                 labels=sorted(known), average="macro", zero_division=0)
                self.scores[number] = ("annotation macro F1", float(value))
            else:
                self.scores[number] = ("ARI", score_clustering(result.embedding, result.labels, self.truth)["ari"])
        return self.scores[number]

    def compare(self, client, name: str, candidate, champion) -> tuple[str | None, str]:
        where = f"{self.name} [{self.digest}]"
        metric, ours = self.score(name, candidate)
        self._record(client, name, candidate, metric, ours)
        detail = f"{metric}={ours:.4f} on {where}"
        if champion is None:
            return None, detail
        their_metric, theirs = self.score(name, champion)
        if their_metric != metric:
            msg = (f"version {candidate.version} is scored by {metric} but @{CHAMPION} version {champion.version} by "
                   f"{their_metric} (one was trained with labels, the other not): they cannot be compared on {where}")
            raise ValueError(msg)
        self._record(client, name, champion, metric, theirs)
        if not ours > theirs:
            verdict = "ties" if ours == theirs else "loses to"
            return (f"refused: version {candidate.version} ({metric}={ours:.4f}) {verdict} @{CHAMPION} version "
                    f"{champion.version} ({metric}={theirs:.4f}) on {where}"), detail
        return None, f"{detail}; version {champion.version}: {metric}={theirs:.4f}"

    def _record(self, client, name: str, version, metric: str, value: float) -> None:
        key = "ari" if metric == "ARI" else "annotation_macro_f1"
        for tag, text in ((f"eval.{self.digest}.{key}", repr(value)), (f"eval.{self.digest}.data", self.name)):
            retry_while_busy(client.set_model_version_tag, name, str(version.version), tag, text)


def rollback(name: str) -> PromotionResult:
    """Give ``@champion`` back to the version it replaced last.

    Versions deleted since they were champion are skipped and dropped from the history.
    """
    client = _client()
    _registered_model(client, name)
    with registry_lock():
        history = _history(client, name)
        if not history:
            msg = f"{name} has no earlier champion to roll back to"
            raise ValueError(msg)
        current = _alias_version(client, name, CHAMPION)
        deleted = []
        while history and not _version_exists(client, name, history[-1]):
            deleted.append(history.pop())
        if deleted:
            retry_while_busy(client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(history))
        if not history:
            msg = (f"{name} has nothing valid to roll back to: earlier champion version(s) {deleted} were "
                   "deleted; promote a version instead")
            raise ValueError(msg)
        restored = history.pop()
        retry_while_busy(client.set_registered_model_alias, name, CHAMPION, restored)
        retry_while_busy(client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(history))
    was = str(current.version) if current is not None else None
    skipped = f"; skipped deleted version(s) {deleted}" if deleted else ""
    return PromotionResult(
        True, restored, was, f"@{CHAMPION} of {name} rolled back to version {restored} (was {was}){skipped}"
    )


def champion_version(name: str) -> str | None:
    """The version number behind ``@champion``, or ``None``."""
    version = _alias_version(_client(), name, CHAMPION)
    return str(version.version) if version is not None else None


# ----------------------------------------------------------------------------- resolving URIs
def run_of(model_uri: str) -> str:
    """The run id that produced a registered ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    version = _resolve(_client(), model_uri)
    if not version.run_id:
        msg = f"{model_uri} (version {version.version}) was registered without a run; expected one from a training run"
        raise ValueError(msg)
    return version.run_id


def download_run_artifacts(model_uri: str, artifact_path: str) -> str:
    """Download ``artifact_path`` of the run behind a registry or ``runs:/`` URI; return the local path."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/") :].split("/", 1)[0]
        _get_run(client, run_id)
    else:
        run_id = run_of(model_uri)
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path)
    except (MlflowException, OSError) as error:
        try:
            present = sorted(f.path for f in client.list_artifacts(run_id))
        except (MlflowException, OSError):
            present = "unreadable"
        reason = _one_line(getattr(error, "message", None) or str(error))
        msg = (f"cannot download {artifact_path!r} of run {run_id} ({model_uri}): {reason}; "
               f"the run's artifacts: {present}")
        raise ValueError(msg) from None


def load_served_model(model_uri: str):
    """The :class:`~contrastive_sc.serve.inference.EmbedThenCluster` behind a logged pyfunc model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if model_uri.startswith("models:/") and ("@" in model_uri or "/" in model_uri[len("models:/") :]):
        _resolve(_client(), model_uri)  # a clear message for a missing model, version or alias
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        reason = _one_line(getattr(error, "message", None) or str(error))
        msg = f"cannot load model {model_uri}: {reason}"
        raise ValueError(msg) from None
    try:
        return loaded.unwrap_python_model().model
    except (AttributeError, MlflowException):
        msg = f"{model_uri} is not a contrastive-sc embed-then-cluster model (logged by `contrastive-sc train`)"
        raise ValueError(msg) from None


def _resolve(client, model_uri: str):
    """The model version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    ref = model_uri[len("models:/") :] if model_uri.startswith("models:/") else ""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return _version_by_alias(client, name, alias)
    if "/" in ref:
        name, number = ref.rsplit("/", 1)
        if number == "latest":
            numbers = _version_numbers(client, name)
            number = numbers[-1] if numbers else number
        return _get_version(client, name, number)
    msg = f"expected a registry URI such as models:/NAME@champion or models:/NAME/3, got {model_uri!r}"
    raise ValueError(msg)


# ----------------------------------------------------------------------------- lookups
def _push_history(client, name: str, version: str) -> None:
    history = _history(client, name)
    history.append(version)
    retry_while_busy(client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(history))


def _history(client, name: str) -> list[str]:
    tags = _registered_model(client, name).tags
    return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return retry_while_busy(client.get_registered_model, name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            msg = f"reading registered model {name!r} from {_registry_uri()} failed: {_one_line(error.message)}"
            raise ValueError(msg) from None
    msg = (f"registered model {name!r} not found in {_registry_uri()}; registered models: {_model_names(client)}. "
           "Create it with `contrastive-sc register --name NAME`")
    raise ValueError(msg)


def _get_version(client, name: str, version: str | None):
    """The version ``version`` of ``name`` (default: its ``@challenger``), or a ValueError that says what exists."""
    from mlflow.exceptions import MlflowException

    model = _registered_model(client, name)
    if version is None:
        found = _alias_version(client, name, CHALLENGER)
        if found is None:
            msg = f"{name} has no @{CHALLENGER}; register a model first or pass --version"
            raise ValueError(msg)
        return found
    try:
        return retry_while_busy(client.get_model_version, name, str(version))
    except MlflowException:
        msg = (f"model version {name}/{version} not found in {_registry_uri()}; {name} has versions "
               f"{_version_numbers(client, name)} and aliases {_aliases(model)}")
        raise ValueError(msg) from None


def _version_by_alias(client, name: str, alias: str):
    model = _registered_model(client, name)
    found = _alias_version(client, name, alias)
    if found is None:
        msg = f"{name} has no alias @{alias}; its aliases: {_aliases(model)}"
        raise ValueError(msg)
    return found


def _alias_version(client, name: str, alias: str):
    """The version behind ``alias``, or ``None`` when there is none.

    Only "not found" means ``None``: a champion that merely failed to read would let any
    candidate be crowned unopposed.
    """
    from mlflow.exceptions import MlflowException

    try:
        return retry_while_busy(client.get_model_version_by_alias, name, alias)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(error.message).lower():
            return None
        msg = f"reading @{alias} of {name!r} from {_registry_uri()} failed: {_one_line(error.message)}"
        raise ValueError(msg) from None


def _version_exists(client, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        retry_while_busy(client.get_model_version, name, version)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return retry_while_busy(client.get_run, run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            msg = f"reading run {run_id!r} from {_tracking_uri()} failed: {_one_line(error.message)}"
            raise ValueError(msg) from None
    msg = f"run {run_id!r} not found in {_tracking_uri()}; recent runs with a model: {_recent_model_runs(client)}"
    raise ValueError(msg)


def _experiment_deleted(client, experiment_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return retry_while_busy(client.get_experiment, experiment_id).lifecycle_stage == "deleted"
    except MlflowException:
        return False


def _dataset_of(client, version) -> tuple[str, str | None]:
    """``(name, digest)`` of the data a version was trained on; older versions ask their run."""
    from mlflow.exceptions import MlflowException

    name, digest = version.tags.get(DATASET_TAG) or "?", version.tags.get(DIGEST_TAG) or None
    if digest is None and version.run_id:
        try:
            run = client.get_run(version.run_id)
        except MlflowException:
            return name, None
        digest = run.data.params.get("data.digest") or None
        name = version.tags.get(DATASET_TAG) or run.data.tags.get("dataset") or name
    return name, digest


def _describe(dataset: tuple[str, str | None]) -> str:
    name, digest = dataset
    return f"{name!r} (digest {digest})" if digest else f"{name!r} (digest unknown)"


def _metric_value(version, metric: str | None) -> float:
    raw = version.tags.get("metric_value")
    if metric is None or raw is None:
        msg = f"version {version.version} carries no metric tag; register it with `contrastive-sc register`"
        raise ValueError(msg)
    return float(raw)


def _version_of_run(client, name: str, run_id: str) -> str | None:
    # Not _versions(): a failed read must not look like "no version yet" and register the run twice.
    versions = retry_while_busy(client.search_model_versions, _name_filter(name))
    matching = [v for v in versions if v.name == name and v.run_id == run_id]
    return str(max(int(v.version) for v in matching)) if matching else None


def _versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return [v for v in client.search_model_versions(_name_filter(name)) if v.name == name]
    except MlflowException:
        return []


def _name_filter(name: str) -> str:
    """A search filter that matches ``name`` (and maybe more: callers keep the exact name only).

    MLflow's filter strings have no escapes: a name is quoted with the quote it lacks, and a
    name holding both quotes becomes a LIKE pattern with ``_`` (any one character) in place of
    each single quote.
    """
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    return "name LIKE '{}'".format(name.replace("'", "_"))


def _version_numbers(client, name: str) -> list[str]:
    return [str(v) for v in sorted(int(v.version) for v in _versions(client, name))]


def _aliases(model) -> dict[str, str]:
    return {alias: str(number) for alias, number in sorted(model.aliases.items())}


def _model_names(client, limit: int = 20) -> list[str] | str:
    from mlflow.exceptions import MlflowException

    try:
        names = sorted(m.name for m in client.search_registered_models(max_results=limit + 1))
    except MlflowException:
        return "unreadable"
    return names[:limit] + (["..."] if len(names) > limit else [])


def _recent_model_runs(client, limit: int = 5) -> list[str] | str:
    from mlflow.exceptions import MlflowException

    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=200)
    except MlflowException:
        return "unreadable"
    return [r.info.run_id for r in runs if r.data.tags.get("model_uri")][:limit]


def _one_line(text: str) -> str:
    """An MLflow message on one line (some carry a traceback or a SQL statement)."""
    line = " ".join(str(text).split())
    return line if len(line) <= 300 else line[:297] + "..."


def _tracking_uri() -> str:
    """The tracking store for messages (a SQLite file by its plain path)."""
    import mlflow

    return describe(mlflow.get_tracking_uri())


def _registry_uri() -> str:
    """The registry store for messages (a SQLite file by its plain path)."""
    return describe(_active_registry_uri())


def _active_registry_uri() -> str:
    import mlflow

    return mlflow.get_registry_uri()
