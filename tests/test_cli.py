"""The CLI validates every parameter and answers with a message, never a traceback."""

import pytest
from click.testing import CliRunner

from contrastive_sc.cli import main


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "0"], "0 is not in the range"),
        (["--epochs", "ten"], "'ten' is not a valid integer"),
        (["--lr", "-1"], "-1.0 is not in the range"),
        (["--input-dropout", "1"], "1.0 is not in the range"),
        (["--layers", "200,x"], "expected comma-separated whole numbers"),
        (["--n-genes", "1"], "expected at least 2 genes"),
        (["--cluster", "kmeans,dbscan"], "expected a comma-separated list"),
        (["--preset", "fancy"], "Invalid value for '--preset': 'fancy'"),
        (["--device", "tpu"], "'tpu' is not one of"),
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
    result = CliRunner().invoke(main, ["--help"])
    for command in ("train", "sweep", "register", "promote", "rollback", "export-onnx", "embed", "benchmark"):
        assert command in result.output
