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
