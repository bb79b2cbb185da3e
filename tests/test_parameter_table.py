"""One parameter table: the CLI options, the MLproject `train` entry, the configuration's checks and the
served model's checks all come from the settings of contrastive_sc/method/config.py.

Fast (no training, no MLflow run).
"""

from pathlib import Path

import click
import click.testing
import pytest
import yaml

from contrastive_sc import cli
from contrastive_sc.method.config import ContrastiveConfig, cli_settings, settings

REPO = Path(__file__).resolve().parents[1]
MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
#: MLproject defaults that differ from the CLI's on purpose: a sweep from `mlflow run` needs a grid.
MLPROJECT_OWN_DEFAULTS = {("sweep", "grid")}
CONFIG_FIELDS = set(ContrastiveConfig().to_params()) - {"preset"}


def _options(command: click.Command) -> dict[str, click.Option]:
    """A command's options by their parameter name (``label_key`` for ``--label-key``)."""
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


def test_mlproject_is_generated_from_the_table():
    from contrastive_sc.mlops.mlproject import render

    assert (REPO / "MLproject").read_text() == render(), "MLproject is stale: run `contrastive-sc write-mlproject`"
    result = click.testing.CliRunner().invoke(cli.main, ["write-mlproject", "--check"])
    assert result.exit_code == 0, result.output


def test_every_config_field_has_a_setting_with_help():
    table = settings()
    assert set(table) == CONFIG_FIELDS
    for name, spec in table.items():
        assert spec.help.endswith((".", "]")), name
        assert spec.kind in ("int", "float", "bool", "choice", "choice_list", "int_list", "n_genes"), name


def test_train_has_one_option_per_cli_setting_typed_by_the_table():
    options = _options(cli.train)
    for name, spec in cli_settings().items():
        option = options[name]
        assert option.opts == [f"--{name.replace('_', '-')}"]
        assert option.default is None  # None: keep the preset's value
        assert option.type.convert("preset", option, None) is None
        assert option.type.inner.spec is spec and option.help == spec.help
    off_cli = {name for name, spec in settings().items() if not spec.on_cli}
    assert not off_cli & set(options) - {"methods"}
    assert "methods" in options and options["methods"].opts == ["--cluster"]


@pytest.mark.parametrize("name,text", [("temperature", "inf"), ("lr", "nan"), ("clip", "-inf"), ("seed", str(2**63)),
                                       ("epochs", "0"), ("layers", "8,0"), ("n_genes", "1"), ("resolution", "0"),
                                       ("n_neighbors", "1001"), ("input_dropout", "1")])
def test_the_cli_and_the_configuration_refuse_the_same_values(name, text):
    spec = settings()[name]
    with pytest.raises(ValueError, match=f"{name} must be") as parsed:
        spec.parse(name, text)
    value = (8, 0) if name == "layers" else float(text) if spec.kind == "float" else int(text)
    with pytest.raises(ValueError, match=f"{name} must be") as configured:
        ContrastiveConfig().replace(**{name: value})
    assert str(parsed.value).split(", got")[0] == str(configured.value).split(", got")[0]


def test_the_served_model_checks_clustering_params_with_the_table():
    from contrastive_sc.serve.inference import _PARAM_SETTINGS

    for name in ("n_clusters", "resolution", "n_neighbors", "seed"):
        assert _PARAM_SETTINGS[name] is settings()[name]


def test_cluster_config_is_validated():
    from contrastive_sc.method.config import ClusterConfig

    for bad in ({"resolution": float("nan")}, {"n_neighbors": 1}, {"n_clusters": 0}, {"methods": ("kmeans", "dbscan")}):
        with pytest.raises(ValueError, match="must be"):
            ClusterConfig(**bad)


def test_build_config_reads_every_hyperparameter():
    values = {"epochs": 7, "lr": 0.2, "layers": (8, 4), "n_neighbors": 5, "min_cells": 0}
    config = cli._build_config("paper", values).to_params()
    assert set(values) <= set(cli_settings())
    assert {k: config[k] for k in values} == {"epochs": 7, "lr": 0.2, "layers": [8, 4], "n_neighbors": 5, "min_cells": 0}


@pytest.mark.parametrize("entry", ["train", "sweep"])
def test_mlproject_hyperparameters_are_config_fields_with_cli_options(entry):
    parameters = MLPROJECT[entry]["parameters"]
    hyper = {name for name, spec in parameters.items() if spec.get("default") == "preset"}
    assert hyper <= CONFIG_FIELDS, f"{entry}: 'preset' parameters that are no config field: {sorted(hyper - CONFIG_FIELDS)}"
    if entry == "train":
        assert hyper == set(cli_settings()), sorted(hyper ^ set(cli_settings()))


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
        flag = {"cluster": "--cluster", "overwrite": "--overwrite-if"}.get(name, f"--{name.replace('_', '-')}")
        assert f"{flag} {{{name}}}" in command, f"{entry}: {name} is not passed as {flag} {{{name}}}"
        option = by_flag.get(flag) or next(p for p in _cli_command(entry).params if flag in p.opts)
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


def test_the_serving_page_lists_predict_params_with_their_defaults():
    from dataclasses import fields

    from contrastive_sc.serve.inference import PredictParams

    text = (REPO / "docs" / "serving.md").read_text()
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
    for name in ("method", "resolution"):
        assert options[name].default == declared[name], name
    assert options["n_clusters"].default is None and declared["n_clusters"] == 0  # both: no k given
    assert list(options["method"].type.choices) == list(METHODS)
