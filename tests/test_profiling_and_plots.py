"""The memory sampler of the benchmarks and the figures a run logs."""

import numpy as np

from contrastive_sc.analysis.plots import cluster_map, contingency_heatmap, loss_curve
from contrastive_sc.benchmarks.profiling import PeakMemory, current_rss_mb


def test_peak_memory_sees_an_allocation_that_is_freed_before_the_end():
    with PeakMemory(interval=0.01) as peak:
        block = np.ones((64, 2**20 // 8 * 4))  # ~256 MB of float64, touched
        block[::512] += 1
        import time

        time.sleep(0.1)
        del block
    assert peak.peak_mb >= current_rss_mb() + 100


def test_figures_are_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.repeat(["a", "b", "c"], 20)
    labels = np.repeat([2, 0, 1], 20)
    coords = rng.normal(size=(60, 2))
    for path in (loss_curve([3.0, 2.5, 2.2], tmp_path / "loss.png"),
                 cluster_map(coords, {"kmeans": labels}, truth, tmp_path / "map.png"),
                 contingency_heatmap(truth, labels, tmp_path / "heat.png")):
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_the_map_is_a_grid_without_a_batch_panel_for_one_batch(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.repeat(["alpha", "beta", "a very long cell type name that would spill over"], 40)
    labels = np.repeat([2, 0, 1], 40)
    coords = rng.normal(size=(120, 2))
    two = cluster_map(coords, {"kmeans": labels}, truth, tmp_path / "two.png", batches=["b1"] * 120)
    four = cluster_map(coords, {"kmeans": labels, "leiden": labels}, truth, tmp_path / "four.png",
                       batches=np.repeat(["b1", "b2"], 60))
    (w2, h2), (w4, h4) = _size(two), _size(four)
    assert w2 == w4 and h4 > 1.8 * h2  # two columns; one batch: no batch panel, so one row instead of two
    assert w4 < 1600  # a 2 x 2 grid, not a strip of four panels


def test_colours_are_distinct_and_rare_types_grey():
    from contrastive_sc.analysis.plots import GREY, _colours

    values = np.array([f"type {i}" for i in range(13) for _ in range(50)] + ["rare"] * 3)
    colours = _colours(values, sorted(set(values)))
    assert colours["rare"] == GREY
    common = [c for v, c in colours.items() if v != "rare"]
    assert len(set(common)) == 13 and GREY not in common


def test_contingency_rows_and_columns_in_diagonal_order():
    import pandas as pd

    from contrastive_sc.analysis.plots import diagonal_order

    truth = np.array(["b"] * 50 + ["a"] * 30 + ["c"] * 20)
    labels = np.array(["7"] * 50 + ["3"] * 25 + ["9"] * 5 + ["0"] * 20)
    rows, columns = diagonal_order(pd.crosstab(truth, labels))
    assert rows == ["b", "a", "c"]  # the largest type first, each cluster under its majority type
    assert columns == ["7", "3", "9", "0"]
