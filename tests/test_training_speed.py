import pytest
import torch

from contrastive_sc.benchmarks.training_speed import floor_rows, format_rows, peak_gflops, training_flops


def test_flops_by_hand():
    # 5 cells in batches of 2: (0, 2), (2, 4); the last batch of one cell is skipped.
    # Each step: 4 rows x 2 x (3 x 2) for the layer, 2 x 4 x 4 x 2 for the similarities = 48 + 64.
    assert training_flops(5, 3, (2,), 2) == 3 * 2 * (48 + 64)
    assert training_flops(5, 3, (2,), 2, epochs=4, backward_factor=1) == 4 * 2 * (48 + 64)


def test_flops_of_the_paper_preset_on_worm_neuron():
    # the figure docs/results.md quotes: 6.75 GFLOP an epoch
    per_epoch = training_flops(4186, 500, (200, 40, 60), 200)
    layers = 2 * 4186 * 2 * (500 * 200 + 200 * 40 + 40 * 60)
    similarities = 20 * 2 * 400**2 * 60 + 2 * 372**2 * 60
    assert per_epoch == 3 * (layers + similarities)
    assert per_epoch / 1e9 == pytest.approx(6.747, abs=1e-3)


def test_rows_and_ratios():
    rows = floor_rows(10e9, 5.0, [4.0, 3.0, 3.5], [7.0, 6.0, 9.0], paper_cpu=[2.5, 2.0], default_cpu=[5.0, 6.0])
    assert [r["row"] for r in rows] == ["dense FLOP floor", "paper training", "default (fused) training"]
    assert rows[0]["seconds"] == pytest.approx(2.0)
    assert rows[1]["ratio"] == pytest.approx(1.5) and rows[2]["ratio"] == pytest.approx(2.0)
    assert rows[1]["cpu_ratio"] == pytest.approx(1.0) and rows[2]["cpu_ratio"] == pytest.approx(2.5)
    table = format_rows(rows)
    assert "| paper training | 3.00 | 1.50 | 2.00 | 1.00 |" in table and "10.0 GFLOP at 5.0 GFLOP/s" in table


def test_peak_measure_restores_threads():
    before = torch.get_num_threads()
    assert peak_gflops(size=64, repeats=2) > 0
    assert torch.get_num_threads() == before


def test_training_seconds_on_tiny_counts(monkeypatch):
    import anndata
    import numpy as np

    from contrastive_sc.benchmarks.training_speed import training_seconds
    from contrastive_sc.method import config

    paper = config.get_preset("paper")
    tiny = paper.replace(epochs=1, n_genes=20)
    monkeypatch.setitem(config.PRESETS, "paper", lambda: tiny)
    counts = np.random.default_rng(0).poisson(1.0, size=(60, 40)).astype(np.float32)
    wall, cpu, n_genes = training_seconds(anndata.AnnData(counts), "paper", repeats=2)
    assert len(wall) == len(cpu) == 2 and min(wall) > 0 and min(cpu) > 0 and n_genes == 20


def test_the_training_speed_command_parses_and_names_a_missing_file(tmp_path):
    from click.testing import CliRunner

    from contrastive_sc.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["training-speed", "--help"]).exit_code == 0
    result = runner.invoke(main, ["training-speed", "--data", str(tmp_path / "nothing.h5"), "--repeats", "1"])
    assert result.exit_code == 2 and "nothing.h5" in result.output
