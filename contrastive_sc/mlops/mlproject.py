"""The MLproject file, written from the parameter table so that its ``train`` entry never drifts.

``contrastive-sc write-mlproject`` writes it; ``--check`` (and a test) compare it with the file.
The ``train`` entry's hyper-parameters are the settings of
:func:`~contrastive_sc.method.config.cli_settings`, each defaulting to ``preset`` (keep the
chosen preset's value) and passed to the CLI option of the same name; the other entry points
are the template below.
"""

from __future__ import annotations

from pathlib import Path

from ..method.config import cli_settings

MLPROJECT_PATH = Path(__file__).resolve().parents[2] / "MLproject"

_HEADER = """\
# contrastive-sc as an MLflow project: one entry point per step, run with
#   mlflow run . -e ENTRY --env-manager local -P name=value ...
# Hyper-parameters default to "preset": the chosen preset's value is kept.
# GENERATED: the `train` entry comes from the parameter table (contrastive_sc/method/config.py);
# edit the table or the other entries' template in contrastive_sc/mlops/mlproject.py, then run
# `contrastive-sc write-mlproject` (a test checks that this file is current).
# MLflow does not check int/float parameter types; the contrastive-sc CLI validates every value.
# MLflow runs each command inside the project folder: `workdir` (a `path` parameter, so MLflow
# makes "." absolute in the caller's folder) tells the CLI where relative data/out paths and the
# default ./mlflow.db live, so `mlflow run <checkout> ...` works from any folder.
# Runs go to the experiment named by `mlflow run --experiment-name NAME` (use contrastive-sc,
# the default the register step reads from).
name: contrastive-sc

conda_env: conda.yaml

entry_points:
"""

#: ``train``'s parameters before and after the hyper-parameters: (name, type, default, CLI option).
_TRAIN_DATA = [("data", "string", "simulated"), ("label_key", "string", '""'), ("batch_key", "string", '""'),
               ("layer", "string", '""'), ("preset", "string", "fused")]
_TRAIN_AFTER = [("cluster", "string", '"kmeans,leiden"')]

_OTHER_ENTRY_POINTS = """\
  sweep:
    parameters:
      workdir: {type: path, default: .}
      data: {type: string, default: simulated}
      label_key: {type: string, default: ""}
      grid: {type: string, default: "lr=0.1,0.4"}
      seeds: {type: int, default: 1}
      cluster: {type: string, default: "kmeans,leiden"}
      preset: {type: string, default: fused}
      epochs: {type: string, default: preset}
    command: >-
      python -m contrastive_sc --workdir {workdir} sweep --data {data} --label-key {label_key} --grid {grid}
      --seeds {seeds} --cluster {cluster} --preset {preset} --epochs {epochs}

  register:
    parameters:
      workdir: {type: path, default: .}
      name: {type: string, default: contrastive-sc}
      metric: {type: string, default: ""}
      run_id: {type: string, default: ""}
      experiment: {type: string, default: contrastive-sc}
    command: >-
      python -m contrastive_sc --workdir {workdir} register --name {name} --metric {metric} --run-id {run_id}
      --experiment {experiment}

  promote:
    parameters:
      workdir: {type: path, default: .}
      name: {type: string, default: contrastive-sc}
      version: {type: string, default: ""}
      eval_data: {type: string, default: ""}
      label_key: {type: string, default: ""}
    command: >-
      python -m contrastive_sc --workdir {workdir} promote --name {name} --version {version} --eval-data {eval_data}
      --label-key {label_key}

  rollback:
    parameters:
      workdir: {type: path, default: .}
      name: {type: string, default: contrastive-sc}
    command: "python -m contrastive_sc --workdir {workdir} rollback --name {name}"

  export_onnx:
    parameters:
      workdir: {type: path, default: .}
      model_uri: {type: string, default: "models:/contrastive-sc@champion"}
      out: {type: string, default: outputs/encoder.onnx}
      data: {type: string, default: ""}
      provider: {type: string, default: auto}
      overwrite: {type: string, default: "false"}
    command: >-
      python -m contrastive_sc --workdir {workdir} export-onnx --model-uri {model_uri} --out {out} --data {data}
      --provider {provider} --overwrite-if {overwrite}

  embed:
    parameters:
      workdir: {type: path, default: .}
      model_uri: {type: string, default: "models:/contrastive-sc@champion"}
      data: {type: string}
      out: {type: string, default: outputs/embedded.h5ad}
      method: {type: string, default: trained}
      n_clusters: {type: string, default: ""}
      resolution: {type: string, default: preset}
      label_key: {type: string, default: ""}
      layer: {type: string, default: ""}
      overwrite: {type: string, default: "false"}
    command: >-
      python -m contrastive_sc --workdir {workdir} embed --model-uri {model_uri} --data {data} --out {out}
      --method {method} --n-clusters {n_clusters} --resolution {resolution} --label-key {label_key}
      --layer {layer} --overwrite-if {overwrite}

  benchmark:
    parameters:
      workdir: {type: path, default: .}
      data: {type: string}
      label_key: {type: string, default: ""}
      methods: {type: string, default: "fused-kmeans,paper-kmeans,pca50-kmeans"}
      seeds: {type: int, default: 3}
      n_genes: {type: string, default: preset}
      out: {type: string, default: outputs/benchmark.csv}
      overwrite: {type: string, default: "false"}
    command: >-
      python -m contrastive_sc --workdir {workdir} benchmark --data {data} --label-key {label_key} --methods {methods}
      --seeds {seeds} --n-genes {n_genes} --out {out} --overwrite-if {overwrite}

  experiment:
    parameters:
      workdir: {type: path, default: .}
      name: {type: string}
      data: {type: string, default: ""}
      seeds: {type: int, default: 1}
      epochs: {type: string, default: preset}
      n_genes: {type: string, default: preset}
    command: >-
      python -m contrastive_sc --workdir {workdir} experiment --name {name} --data {data} --seeds {seeds} --epochs {epochs}
      --n-genes {n_genes}
"""


def render() -> str:
    """The MLproject file's text."""
    names = [name for name, _, _ in _TRAIN_DATA] + list(cli_settings()) + [name for name, _, _ in _TRAIN_AFTER]
    lines = ["  train:", "    parameters:", "      workdir: {type: path, default: .}"]
    for name, kind, default in _TRAIN_DATA:
        lines.append(f"      {name}: {{type: {kind}, default: {default}}}")
    lines += [f"      {name}: {{type: string, default: preset}}" for name in cli_settings()]
    for name, kind, default in _TRAIN_AFTER:
        lines.append(f"      {name}: {{type: {kind}, default: {default}}}")
    options = [f"--{name.replace('_', '-')} {{{name}}}" for name in names]
    command, line = [], "python -m contrastive_sc --workdir {workdir} train"
    for option in options:  # folded lines of at most ~110 characters
        if len(line) + len(option) > 110:
            command.append(line)
            line = option
        else:
            line = f"{line} {option}"
    command.append(line)
    lines.append("    command: >-")
    lines += [f"      {part}" for part in command]
    return _HEADER + "\n".join(lines) + "\n\n" + _OTHER_ENTRY_POINTS
