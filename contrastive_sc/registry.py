"""Model registry: register the best run, and metric-gated promotion with rollback.

Aliases only (stages are deprecated): ``@challenger`` is the latest registered candidate,
``@champion`` the version in service. Promotion moves ``@champion`` only when the candidate
beats it on the registration metric; the replaced versions are kept in a history (a tag of
the registered model) so that :func:`rollback` can restore them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"
#: Preference order of the selection metric: ARI when labels exist, else silhouette.
METRIC_PREFERENCE = ("kmeans_ari", "leiden_ari", "auto_ari", "kmeans_silhouette", "leiden_silhouette",
                     "auto_silhouette")


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


def choose_metric(runs) -> str:
    """The first metric of :data:`METRIC_PREFERENCE` that the runs report."""
    for metric in METRIC_PREFERENCE:
        if any(metric in run.data.metrics for run in runs):
            return metric
    msg = f"no run reports any of {list(METRIC_PREFERENCE)}; train with `contrastive-sc train` first"
    raise ValueError(msg)


def register_best(experiment: str, name: str, metric: str | None = None) -> dict:
    """Register the model of the experiment's best finished run under ``name``.

    The version is tagged with the run's metrics, dataset and run id, and gets the
    ``@challenger`` alias. Registering a run that already has a version returns that version.

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
    run = client.get_run(run_id)
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
    existing = _version_of_run(client, name, run_id)
    if existing is not None:
        client.set_registered_model_alias(name, CHALLENGER, existing)
        return {"version": existing, "run_id": run_id, "metric": metric, "value": value, "new": False}

    import mlflow

    tags = {
        "run_id": run_id,
        "metric": metric,
        "metric_value": repr(value),
        "dataset": run.data.tags.get("dataset", ""),
        "preset": run.data.tags.get("preset", ""),
    }
    tags |= {f"metric.{k}": repr(v) for k, v in run.data.metrics.items() if k != "loss"}
    version = mlflow.register_model(run.data.tags["model_uri"], name, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return {"version": str(version.version), "run_id": run_id, "metric": metric, "value": value, "new": True}


def promote(name: str, version: str | None = None) -> PromotionResult:
    """Move ``@champion`` to ``version`` (default: ``@challenger``) if it beats the champion.

    The comparison uses the metric the version was registered with. A tie or a loss is
    refused; promoting the current champion changes nothing.
    """
    client = _client()
    candidate = _get_version(client, name, version)
    champion = _alias_version(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(candidate.version):
        return PromotionResult(
            False,
            str(champion.version),
            None,
            f"version {candidate.version} is already @{CHAMPION} of {name}; nothing changed",
        )
    metric = candidate.tags.get("metric")
    value = _metric_value(candidate, metric)
    if champion is not None:
        if champion.tags.get("metric") != metric:
            return PromotionResult(
                False,
                str(champion.version),
                None,
                f"refused: version {candidate.version} was scored on {metric!r} but champion "
                f"{champion.version} on {champion.tags.get('metric')!r}; they cannot be compared",
            )
        incumbent = _metric_value(champion, metric)
        if not value > incumbent:
            verdict = "ties" if value == incumbent else "loses to"
            return PromotionResult(
                False,
                str(champion.version),
                None,
                f"refused: version {candidate.version} ({metric}={value:.4f}) {verdict} "
                f"@{CHAMPION} version {champion.version} ({metric}={incumbent:.4f})",
            )
        _push_history(client, name, str(champion.version))
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    previous = str(champion.version) if champion is not None else None
    detail = f" (was version {previous})" if previous else ""
    return PromotionResult(
        True,
        str(candidate.version),
        previous,
        f"version {candidate.version} ({metric}={value:.4f}) is now @{CHAMPION} of {name}{detail}",
    )


def rollback(name: str) -> PromotionResult:
    """Give ``@champion`` back to the version it replaced last."""
    client = _client()
    history = _history(client, name)
    if not history:
        msg = f"{name} has no earlier champion to roll back to"
        raise ValueError(msg)
    current = _alias_version(client, name, CHAMPION)
    restored = history.pop()
    client.set_registered_model_alias(name, CHAMPION, restored)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    was = str(current.version) if current is not None else None
    return PromotionResult(True, restored, was, f"@{CHAMPION} of {name} rolled back to version {restored} (was {was})")


def champion_version(name: str) -> str | None:
    """The version number behind ``@champion``, or ``None``."""
    version = _alias_version(_client(), name, CHAMPION)
    return str(version.version) if version is not None else None


def run_of(model_uri: str) -> str:
    """The run id that produced a registered ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    client = _client()
    if not model_uri.startswith("models:/"):
        msg = f"expected a registry URI such as models:/NAME@champion, got {model_uri!r}"
        raise ValueError(msg)
    ref = model_uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    return version.run_id


def download_run_artifacts(model_uri: str, artifact_path: str) -> str:
    """Download ``artifact_path`` of the run behind a registry or ``runs:/`` URI; return the local path."""
    import mlflow

    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/") :].split("/", 1)[0]
    else:
        run_id = run_of(model_uri)
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path)


def load_served_model(model_uri: str):
    """The :class:`~contrastive_sc.inference.EmbedThenCluster` behind a logged pyfunc model."""
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


def _push_history(client, name: str, version: str) -> None:
    history = _history(client, name)
    history.append(version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _get_version(client, name: str, version: str | None):
    from mlflow.exceptions import MlflowException

    try:
        if version is None:
            found = _alias_version(client, name, CHALLENGER)
            if found is None:
                msg = f"{name} has no @{CHALLENGER}; register a model first or pass --version"
                raise ValueError(msg)
            return found
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        msg = f"model version {name}/{version} not found: {error.message}"
        raise ValueError(msg) from None


def _metric_value(version, metric: str | None) -> float:
    raw = version.tags.get("metric_value")
    if metric is None or raw is None:
        msg = f"version {version.version} carries no metric tag; register it with `contrastive-sc register`"
        raise ValueError(msg)
    return float(raw)


def _version_of_run(client, name: str, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matching = [v for v in versions if v.run_id == run_id]
    return str(max(int(v.version) for v in matching)) if matching else None


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
