"""The CLI validates every parameter and answers with a message, never a traceback."""

import pytest
from click.testing import CliRunner

from contrastive_sc.cli import main


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "0"], "epochs must be a whole number within [1, 1000000], got 0"),
        (["--epochs", "ten"], "epochs must be a whole number within [1, 1000000], got 'ten'"),
        (["--lr", "-1"], "lr must be a finite number within (0, 10], got -1.0"),
        (["--input-dropout", "1"], "input_dropout must be a finite number within [0, 1), got 1.0"),
        (["--layers", "200,x"], "layers must be comma-separated whole numbers, each within [1, 100000], got '200,x'"),
        (["--n-genes", "1"], "n_genes must be 'auto', 'all' or a whole number within [2, 1000000], got 1"),
        (["--cluster", "kmeans,dbscan"], "expected a comma-separated list"),
        (["--preset", "fancy"], "unknown preset 'fancy'; expected fused or paper"),
        (["--device", "tpu"], "device must be one of 'auto', 'cpu', 'cuda', got 'tpu'"),
        # non-finite and out-of-range values never reach a run
        (["--temperature", "inf"], "temperature must be a finite number within (0, 100], got inf"),
        (["--clip", "nan"], "clip must be a finite number within (0, 1000000] or none, got nan"),
        (["--seed", str(2**63)], "seed must be a whole number within [0, 4294967295], got 9223372036854775808"),
        (["--resolution", "-inf"], "resolution must be a finite number within (0, 1000], got -inf"),
    ],
)
def test_train_rejects_bad_values(args, message, tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--data", "simulated", "--tracking-uri", f"sqlite:///{tmp_path}/x.db", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_data_file_is_a_message(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--data", str(tmp_path / "absent.h5ad"), "--tracking-uri", f"sqlite:///{tmp_path}/x.db"]
    )
    assert result.exit_code == 2 and "does not exist" in result.output


def test_preset_sentinel_keeps_preset_values():
    from contrastive_sc.cli import _build_config

    config = _build_config("paper", {"lr": None, "epochs": 7})
    assert config.train.lr == 0.4 and config.train.epochs == 7


def test_promote_unknown_model_is_a_message(tracking_uri):
    result = CliRunner().invoke(main, ["promote", "--name", "ghost", "--tracking-uri", tracking_uri])
    assert result.exit_code == 2 and "ghost" in result.output


def test_help_lists_every_command():
    import re

    result = CliRunner().invoke(main, ["--help"])
    # the commands are the first word of the lines under "Commands:" ("train" inside "training-speed" is not one)
    listed = set(re.findall(r"^  ([a-z][a-z-]*)  ", result.output.split("Commands:")[1], flags=re.MULTILINE))
    assert set(main.commands) == listed
    for command in ("train", "sweep", "register", "promote", "rollback", "export-onnx", "embed", "benchmark",
                    "presets"):
        assert command in listed


def test_research_presets_stay_out_of_help_and_presets_lists_them():
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    assert "fused|paper" in help_text.lower() and "pcres" not in help_text
    listed = CliRunner().invoke(main, ["presets"]).output
    from contrastive_sc.method.config import PRESETS

    assert [line.split()[0] for line in listed.splitlines()] == list(PRESETS)


def test_overwrite_is_a_plain_flag(tmp_path):
    import click

    from contrastive_sc.cli import _overwrite_option

    @click.command()
    @click.argument("rest", nargs=-1)
    @_overwrite_option
    def command(rest, overwrite):
        click.echo(f"{overwrite} {list(rest)}")

    runner = CliRunner()
    assert runner.invoke(command, ["--overwrite", "x.h5ad"]).output == "True ['x.h5ad']\n"  # the flag takes no value
    assert runner.invoke(command, ["x.h5ad"]).output == "False ['x.h5ad']\n"
    assert runner.invoke(command, ["--overwrite-if", "true"]).output == "True []\n"  # what MLproject passes
    assert runner.invoke(command, ["--overwrite-if", "false"]).output == "False []\n"
