"""Lists written in more than one place agree: config fields, CLI options, MLproject parameters.

Fast (no training, no MLflow run): these fail as soon as a setting is added in one place only.
"""

from pathlib import Path

import click
import pytest
import yaml

from contrastive_sc import cli
from contrastive_sc.method.config import ContrastiveConfig

REPO = Path(__file__).resolve().parents[1]
MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
#: MLproject defaults that differ from the CLI's on purpose: a sweep from `mlflow run` needs a grid.
MLPROJECT_OWN_DEFAULTS = {("sweep", "grid")}
CONFIG_FIELDS = set(ContrastiveConfig().to_params()) - {"preset"}


def _options(command: click.Command) -> dict[str, click.Option]:
    """A command's options by their parameter name (``label_key`` for ``--label-key``)."""
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


def test_every_config_field_has_a_cli_option_or_is_listed_as_without_one():
    typed = set(cli._HYPERPARAMETER_TYPES)
    assert typed <= CONFIG_FIELDS, f"CLI options for no config field: {sorted(typed - CONFIG_FIELDS)}"
    assert not typed & cli._NOT_ON_CLI
    missing = CONFIG_FIELDS - typed - cli._NOT_ON_CLI
    assert not missing, f"config fields with no CLI option: {sorted(missing)} (add them to cli._HYPERPARAMETER_TYPES)"
    assert cli._NOT_ON_CLI <= CONFIG_FIELDS
    assert set(cli._HYPERPARAMETERS) == typed


def test_train_has_one_option_per_hyperparameter_defaulting_to_the_preset():
    options = _options(cli.train)
    for name in cli._HYPERPARAMETERS:
        option = options[name]
        assert option.opts == [f"--{name.replace('_', '-')}"]
        assert option.default is None  # None: keep the preset's value
        assert option.type.convert("preset", option, None) is None
    assert "methods" in options and options["methods"].opts == ["--cluster"]


def test_build_config_reads_every_hyperparameter():
    values = {"epochs": 7, "lr": 0.2, "layers": (8, 4), "n_neighbors": 5, "min_cells": 0}
    config = cli._build_config("paper", values).to_params()
    assert {k: config[k] for k in values} == {"epochs": 7, "lr": 0.2, "layers": [8, 4], "n_neighbors": 5, "min_cells": 0}


@pytest.mark.parametrize("entry", ["train", "sweep"])
def test_mlproject_hyperparameters_are_config_fields_with_cli_options(entry):
    parameters = MLPROJECT[entry]["parameters"]
    hyper = {name for name, spec in parameters.items() if spec.get("default") == "preset"}
    assert hyper <= CONFIG_FIELDS, f"{entry}: 'preset' parameters that are no config field: {sorted(hyper - CONFIG_FIELDS)}"
    if entry == "train":
        assert hyper == set(cli._HYPERPARAMETERS), sorted(hyper ^ set(cli._HYPERPARAMETERS))


def _cli_command(entry: str) -> click.Command:
    command = entry.replace("_", "-")
    return cli.main.commands[command]


@pytest.mark.parametrize("entry", sorted(MLPROJECT))
def test_mlproject_parameters_are_passed_to_the_cli_option_of_that_name_with_its_default(entry):
    spec = MLPROJECT[entry]
    options = _options(_cli_command(entry))
    # MLflow joins the folded command with single spaces.
    command = " ".join(spec["command"].split())
    by_flag = {opt: option for option in options.values() for opt in option.opts}
    for name, parameter in spec["parameters"].items():
        if name == "workdir":  # a group option (`contrastive_sc --workdir {workdir} <command>`)
            assert "--workdir {workdir}" in command
            continue
        flag = f"--{name.replace('_', '-')}"
        if name == "cluster":
            flag = "--cluster"
        assert f"{flag} {{{name}}}" in command, f"{entry}: {name} is not passed as {flag} {{{name}}}"
        option = by_flag[flag]
        if "default" not in parameter:
            assert option.required, f"{entry}: {name} has no MLproject default but the CLI does not require it"
        if option.required or "default" not in parameter or (entry, name) in MLPROJECT_OWN_DEFAULTS:
            continue  # the MLproject's default (e.g. an output path) is the only one
        # The MLproject default, parsed as the CLI parses it, is the CLI's own default.
        ctx = click.Context(_cli_command(entry))
        expected = None if option.default is None else option.process_value(ctx, option.default)
        parsed = option.process_value(ctx, str(parameter["default"]))
        assert parsed == expected or (expected in (None, False) and parsed in (None, False)), (
            f"{entry}: MLproject default {parameter['default']!r} of {name} becomes {parsed!r}, the CLI's is {expected!r}")
    passed = {token.strip("{}") for token in command.split() if token.startswith("{")}
    differ = sorted(passed ^ set(spec["parameters"]))
    assert not differ, f"{entry}: command and parameters differ: {differ}"


def test_readme_params_table_lists_predict_params_with_their_defaults():
    from dataclasses import fields

    from contrastive_sc.serve.inference import PredictParams

    text = (REPO / "README.md").read_text()
    table = text[text.index("| param | default | meaning |"):].split("\n\n")[0].splitlines()[2:]
    documented = {}
    for row in table:
        names, default = (cell.strip() for cell in row.strip("|").split("|")[:2])
        for name in names.split(","):
            documented[name.strip().strip("`")] = default.strip("`")
    declared = {f.name: f.default for f in fields(PredictParams)}
    assert set(documented) == set(declared)
    for name, default in declared.items():
        if default is None:
            assert documented[name].startswith("the model's"), name
        else:
            assert documented[name] == (str(default).lower() if isinstance(default, bool) else str(default)), name


def test_embed_options_default_to_predict_params():
    from dataclasses import fields

    from contrastive_sc.serve.inference import METHODS, PredictParams

    declared = {f.name: f.default for f in fields(PredictParams)}
    options = _options(cli.embed)
    for name in ("method", "n_clusters", "resolution"):
        assert options[name].default == declared[name], name
    assert list(options["method"].type.choices) == list(METHODS)
