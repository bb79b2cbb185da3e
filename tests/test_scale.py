"""The scale benchmark on tiny sizes: the CSV has every column, one row per size, positive values."""

import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from contrastive_sc.benchmarks.scale import COLUMNS, NNDescentTransformer, write_simulated_h5ad
from contrastive_sc.cli import main

pytestmark = pytest.mark.slow


def test_written_h5ad_is_backed_csr_with_consistent_groups(tmp_path):
    path = write_simulated_h5ad(tmp_path / "sim.h5ad", 900, 120, n_groups=3, block_cells=400)
    adata = ad.read_h5ad(path, backed="r")
    assert adata.shape == (900, 120) and adata.isbacked
    block = adata.X[850:900]
    assert block.dtype == np.float32 and block.nnz > 0
    # droplet-like depth (LIB_LOC = 7.5): about e^7.5 = 1,800 counts per cell, not Splat's 60,000
    assert 800 < adata.X[:400].sum(axis=1).mean() < 4000
    assert set(adata.obs["label"].unique()) == {0, 1, 2}
    # one set of gene parameters for all blocks: a group's mean profile is alike in the first and last block
    memory = ad.read_h5ad(path)
    x = memory.X.toarray()
    labels = memory.obs["label"].to_numpy()
    early = np.stack([x[:400][labels[:400] == g].mean(axis=0) for g in range(3)])
    late = np.stack([x[800:][labels[800:] == g].mean(axis=0) for g in range(3)])
    same = [np.corrcoef(np.log1p(early[g]), np.log1p(late[g]))[0, 1] for g in range(3)]
    assert min(same) > 0.9
    adata.file.close()


def test_nndescent_transformer_lists_each_cell_first(rng):
    x = rng.normal(size=(200, 5)).astype(np.float32)
    graph = NNDescentTransformer(n_neighbors=6).fit_transform(x)
    assert graph.shape == (200, 200) and graph.getnnz(axis=1).tolist() == [6] * 200
    assert (graph.indices.reshape(200, 6)[:, 0] == np.arange(200)).all()


def test_scale_benchmark_command_appends_rows(tmp_path):
    out = tmp_path / "scale.csv"
    # 30 epochs (the paper's) on 1,500 cells take about a second and separate the 4 groups: ARIs
    # about 0.95 for KMeans, Leiden and scanpy, so a stage that mixes cells up shows.
    common = ["scale-benchmark", "--genes", "300", "--n-genes-kept", "200", "--epochs", "30", "--groups", "4",
              "--workdir", str(tmp_path), "--out", str(out)]
    runner = CliRunner()
    result = runner.invoke(main, [*common, "--cells", "1500"])
    assert result.exit_code == 0, result.output
    assert "train_cells_per_s" in result.output and "appended 1 row(s)" in result.output
    # A second run appends to the same CSV; skipped stages leave their columns empty.
    result = runner.invoke(main, [*common, "--cells", "2000", "--skip-scanpy", "--skip-leiden"])
    assert result.exit_code == 0, result.output

    table = pd.read_csv(out)
    assert list(table.columns) == list(COLUMNS)
    assert table["n_cells"].tolist() == [1500, 2000] and (table["status"] == "ok").all()
    measured = [c for c in COLUMNS if c.endswith(("_seconds", "_peak_mb", "_cells_per_s", "_mb"))] + ["nnz"]
    first = table.iloc[0]
    assert (first[measured] > 0).all(), first[measured]
    assert table[["kmeans_ari", "leiden_ari", "scanpy_ari"]].iloc[0].between(0.8, 1).all(), first
    second = table.iloc[1]
    assert second[["leiden_seconds", "scanpy_seconds"]].isna().all() and second["train_seconds"] > 0
    assert 0.8 < second["kmeans_ari"] <= 1, second
    # The derived columns agree with the measured ones.
    for _, row in table.iterrows():
        assert row["n_genes_kept"] == 200 and 0 < row["nnz"] <= row["n_cells"] * row["n_genes"]
        assert row["peak_mb"] == max(row[f"{s}_peak_mb"] for s in ("preprocess", "train", "embed", "kmeans"))
        assert abs(row["n_cells"] / row["embed_cells_per_s"] - row["embed_seconds"]) < 1e-3  # seconds are rounded
    assert not list(tmp_path.glob("contrastive_sc_scale_*"))  # temporary data removed


def test_scale_benchmark_validates_flags(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["scale-benchmark", "--cells", "1000,x", "--out", str(tmp_path / "s.csv")])
    assert bad.exit_code == 2 and "comma-separated numbers of cells" in bad.output
    bad = runner.invoke(main, ["scale-benchmark", "--cells", "2000", "--genes", "50", "--n-genes-kept", "100",
                               "--out", str(tmp_path / "s.csv")])
    assert bad.exit_code == 2 and "--n-genes-kept <= --genes" in bad.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_ends_when_the_benchmark_process_is_killed():
    # Each size runs in a spawned worker; killing the benchmark must not leave it running.
    code = "import time\nfrom contrastive_sc.benchmarks.scale import _in_fresh_process\n_in_fresh_process(time.sleep, 120)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    children_file = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while time.monotonic() < deadline and not workers:
        time.sleep(0.5)
        workers = [int(pid) for pid in children_file.read_text().split()]
    assert workers, "the worker process never started"
    time.sleep(2.0)  # let the worker reach its sleep
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.5)
    assert not any(_running(pid) for pid in workers)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended, only not been reaped
