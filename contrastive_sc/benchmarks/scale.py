"""The scale benchmark: simulated datasets of growing size, trained and embedded out of core.

For each size a Splat dataset is written to a backed ``.h5ad`` in blocks, then measured stage by
stage (seconds and peak resident memory from :class:`~contrastive_sc.benchmarks.profiling.PeakMemory`):
chunked preprocessing to an on-disk matrix, training (the paper preset), ONNX embedding,
KMeans and Leiden on the embedding; beside it, the same counts through scanpy's sparse
normalise -> log1p -> PCA(50) -> neighbors -> Leiden. Each size's row is appended to the CSV as
soon as it is done, so an interrupted run keeps the sizes it finished (and a row for the
interrupted size, with the stages it completed).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .profiling import PeakMemory

log = logging.getLogger(__name__)

#: Columns of the CSV, in order.
COLUMNS = (
    "n_cells", "n_genes", "n_genes_kept", "epochs", "nnz", "h5ad_mb", "write_seconds",
    "preprocess_seconds", "preprocess_peak_mb",
    "train_seconds", "train_cells_per_s", "train_peak_mb",
    "embed_seconds", "embed_cells_per_s", "embed_peak_mb",
    "kmeans_seconds", "kmeans_peak_mb", "kmeans_ari",
    "leiden_seconds", "leiden_peak_mb", "leiden_ari",
    "peak_mb",
    "scanpy_seconds", "scanpy_peak_mb", "scanpy_ari",
    "status",
)
#: Cells simulated per block when writing a dataset.
SIMULATION_BLOCK = 50_000
#: Log-mean library size of the simulated cells: about 1,500 counts over 2,000 genes, 13 %
#: non-zero, like the highly variable genes of a droplet library (Splat's default, 11, gives
#: 60,000 counts and a 67 % dense matrix, which no droplet dataset looks like).
LIB_LOC = 7.5
#: Differential expression of the groups (fraction of DE genes, spread of their log-factor):
#: at this depth PCA(50) + KMeans recovers the 8 groups with ARI 0.90 at 10,000 cells, a task
#: neither trivial nor hopeless (Splat's defaults, 0.1 and 0.4, give 0.10).
DE_PROB, DE_FAC_SCALE = 0.2, 0.6


def write_simulated_h5ad(path: str | Path, n_cells: int, n_genes: int, *, n_groups: int = 8, seed: int = 0,
                         lib_loc: float = LIB_LOC, block_cells: int = SIMULATION_BLOCK) -> Path:
    """Simulate a Splat dataset a block at a time into an ``.h5ad`` with CSR ``X`` (float32 counts).

    The groups (``obs["label"]``) share one set of gene parameters across blocks
    (:func:`~contrastive_sc.method.simulate.simulate_splat_blocks`); memory is one dense block.
    """
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    from ..method.simulate import SplatParams, simulate_splat_blocks

    params = SplatParams(n_cells=n_cells, n_genes=n_genes, group_prob=(1.0 / n_groups,) * n_groups,
                         de_prob=DE_PROB, de_fac_scale=DE_FAC_SCALE, lib_loc=lib_loc, seed=seed)
    path = Path(path)
    groups = []
    with h5py.File(path, "w") as handle:
        matrix = None
        for counts, block_groups in simulate_splat_blocks(params, block_cells):
            if matrix is None:
                write_elem(handle, "X", counts)
                matrix = sparse_dataset(handle["X"])
            else:
                matrix.append(counts)
            groups.append(block_groups)
        labels = np.concatenate(groups)
        obs = pd.DataFrame({"label": labels}, index=pd.Index([f"Cell{i + 1}" for i in range(n_cells)]))
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", pd.DataFrame(index=pd.Index([f"Gene{j + 1}" for j in range(n_genes)])))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(handle, key, {})
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"
    return path


class _Stage:
    """Seconds and peak RSS of one block of code, written into a result row under ``name``."""

    def __init__(self, row: dict, name: str) -> None:
        self.row, self.name = row, name

    @contextmanager
    def measure(self):
        started = time.perf_counter()
        with PeakMemory() as memory:
            yield
        self.seconds = time.perf_counter() - started
        self.row[f"{self.name}_seconds"] = round(self.seconds, 3)
        self.row[f"{self.name}_peak_mb"] = round(memory.peak_mb, 1)
        log.info("%s: %.1f s, peak %.0f MB", self.name, self.row[f"{self.name}_seconds"], memory.peak_mb)


def run_size(data_path: str | Path, n_cells: int, n_genes: int, *, n_genes_kept: int = 500, epochs: int = 30,
             n_groups: int = 8, seed: int = 0, leiden: bool = True) -> dict:
    """Write one simulated dataset to ``data_path`` and measure the contrastive stages on it.

    Returns the CSV row. One-time costs (torch start-up, numba compilation) are paid by a
    warm-up before the measured stages. A ``KeyboardInterrupt`` ends the size gracefully: the
    row keeps the stages done and its ``status`` names the stage interrupted.
    """
    import anndata as ad

    from ..analysis.cluster import cluster_labels
    from ..analysis.evaluation import cluster_and_score
    from ..method.config import get_preset
    from ..method.preprocess import fit_preprocess, transform_rows
    from ..method.rows import as_rows
    from ..method.train import fit_encoder
    from ..serve.onnx_io import OnnxEncoder, export_onnx

    data_path = Path(data_path)
    workdir = data_path.parent
    row: dict = {"n_cells": n_cells, "n_genes": n_genes, "n_genes_kept": n_genes_kept, "epochs": epochs,
                 "status": "ok"}
    config = get_preset("paper").replace(n_genes=n_genes_kept, epochs=epochs, seed=seed)
    stage = "write"
    try:
        started = time.perf_counter()
        write_simulated_h5ad(data_path, n_cells, n_genes, n_groups=n_groups, seed=seed)
        row["write_seconds"] = round(time.perf_counter() - started, 3)
        row["h5ad_mb"] = round(data_path.stat().st_size / 2**20, 1)
        adata = ad.read_h5ad(data_path, backed="r")
        row["nnz"] = int(adata.X.group["data"].shape[0])
        truth = adata.obs["label"].to_numpy()
        pre = config.preprocess
        _warm_up(config, n_genes_kept, leiden=leiden and n_cells > 50_000)

        stage = "preprocess"
        with _Stage(row, stage).measure():
            state = fit_preprocess(as_rows(adata.X), adata.var_names, n_genes=pre.n_genes, min_cells=pre.min_cells)
            x = transform_rows(as_rows(adata.X), adata.var_names, state, directory=workdir)
        row["n_genes_kept"] = state.n_genes
        with x:
            stage = "train"
            with _Stage(row, stage).measure():
                encoder, history = fit_encoder(x, config.encoder, config.train)
            row["train_cells_per_s"] = round(history.cells_per_second, 1)

            stage = "embed"
            onnx_path = export_onnx(encoder, workdir / "encoder.onnx")
            session = OnnxEncoder(onnx_path, provider="cpu")
            timer = _Stage(row, stage)
            with timer.measure():  # reading the preprocessed rows from disk (a batch at a time) included
                embedding = session(x)
            row["embed_cells_per_s"] = round(n_cells / timer.seconds, 1)

        def measured(method: str) -> np.ndarray:  # each clustering is a stage of its own (seconds, peak memory)
            with _Stage(row, method).measure():
                return cluster_labels(embedding, method, n_clusters=n_groups, resolution=config.cluster.resolution,
                                      n_neighbors=config.cluster.n_neighbors, seed=seed)

        for stage in ("kmeans", "leiden") if leiden else ("kmeans",):
            (clustering,) = cluster_and_score(embedding, [stage], truth, seed=seed, clusterer=measured)
            row[f"{stage}_ari"] = round(clustering.scores["ari"], 4)
            if stage == "kmeans":
                row["peak_mb"] = max(row[f"{s}_peak_mb"] for s in ("preprocess", "train", "embed", "kmeans"))
        adata.file.close()
    except KeyboardInterrupt:
        row["status"] = f"interrupted at {stage}"
    return row


def run_scanpy(data_path: str | Path, *, seed: int = 0) -> dict:
    """Seconds, peak memory and ARI of :func:`scanpy_baseline` on a written dataset (after a warm-up)."""
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score

    row: dict = {}
    try:
        truth = ad.read_h5ad(data_path, backed="r").obs["label"].to_numpy()
        # numba compiles scanpy's and pynndescent's kernels on first use (tens of seconds):
        # pay that on a small copy of the pipeline, not in the measured run.
        _scanpy_warm_up(Path(data_path).parent, seed)
        with _Stage(row, "scanpy").measure():
            labels = scanpy_baseline(data_path, seed=seed)
        row["scanpy_ari"] = round(adjusted_rand_score(truth, labels), 4)
    except KeyboardInterrupt:
        row["status"] = "interrupted at scanpy"
    return row


def _warm_up(config, n_genes: int, *, leiden: bool) -> None:
    from ..analysis.cluster import cluster_labels
    from ..method.train import fit_encoder

    x = np.random.default_rng(0).normal(size=(1024, n_genes)).astype(np.float32)
    fit_encoder(x, config.encoder, dataclasses.replace(config.train, epochs=1))
    if leiden:  # pynndescent (and its numba compilation) is used above 50,000 cells
        from pynndescent import NNDescent

        NNDescent(x[:, :60], n_neighbors=15, random_state=0)
    cluster_labels(x[:, :60], "kmeans", n_clusters=4)


def _scanpy_warm_up(directory: Path, seed: int) -> None:
    path = write_simulated_h5ad(directory / "scanpy_warm_up.h5ad", 5000, 200, n_groups=4, seed=seed)
    try:
        scanpy_baseline(path, n_pcs=10, seed=seed)
    finally:
        path.unlink(missing_ok=True)


def scanpy_baseline(path: str | Path, *, n_pcs: int = 50, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """scanpy's standard clustering of the counts in ``path``: Leiden labels per cell.

    ``normalize_total`` -> ``log1p`` -> ``pca(50)`` stay sparse (scanpy's PCA of a sparse matrix
    centres implicitly), then ``neighbors`` with an approximate kNN (pynndescent through
    :class:`NNDescentTransformer`, since scanpy 1.11's own pynndescent path crashes on some data
    and its exact ``"sklearn"`` one is too slow at a million cells) and igraph Leiden.
    """
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(path)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=n_pcs, random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X_pca",
                    transformer=NNDescentTransformer(n_neighbors=n_neighbors, random_state=seed))
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, random_state=seed)
    return adata.obs["leiden"].astype(int).to_numpy()


class NNDescentTransformer:
    """A kNN transformer for ``scanpy.pp.neighbors(transformer=...)`` built on pynndescent.

    ``fit_transform(X)`` returns the ``(cells, cells)`` distance graph as a ``csr_matrix``, each
    cell first among its own neighbours (distance 0), as scikit-learn's ``KNeighborsTransformer``
    does. pynndescent's own transformer returns a ``csr_array``, which scanpy 1.11 cannot use
    (``'csr_array' object has no attribute 'getnnz'``).
    """

    def __init__(self, n_neighbors: int = 15, random_state: int = 0) -> None:
        self.n_neighbors = n_neighbors
        self.random_state = random_state

    def fit_transform(self, x, y=None):
        import scipy.sparse as sp
        from pynndescent import NNDescent

        x = np.asarray(x, dtype=np.float32)
        n_cells = x.shape[0]
        k = min(self.n_neighbors, n_cells)
        index = NNDescent(x, n_neighbors=k, random_state=self.random_state, n_jobs=-1)
        neighbours, distances = index.neighbor_graph
        indptr = np.arange(0, n_cells * k + 1, k)
        return sp.csr_matrix((distances.ravel().astype(np.float32), neighbours.ravel(), indptr), shape=(n_cells, n_cells))

    def get_params(self, deep: bool = True) -> dict:
        return {"n_neighbors": self.n_neighbors, "random_state": self.random_state}


def append_row(path: str | Path, row: dict) -> None:
    """Append ``row`` to the CSV at ``path`` (header first when the file is new or empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({key: row.get(key, "") for key in COLUMNS})


def run_scale_benchmark(sizes: Iterable[int], out: str | Path, *, n_genes: int = 2000, n_genes_kept: int = 500,
                        epochs: int = 30, n_groups: int = 8, seed: int = 0, scanpy: bool = True, leiden: bool = True,
                        workdir: str | Path | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Measure each size and append its row to ``out`` as soon as it is done.

    Each size's contrastive stages, and then scanpy's, run in a fresh process, so a peak memory
    is that of its own stage and not what an earlier size or method left allocated. Stops after
    a size interrupted by Ctrl-C or failed (its partial row is written). Returns the rows.
    """
    sizes = [int(s) for s in sizes]
    smallest = max(2 * n_groups, 1024)
    bad = [s for s in sizes if s < smallest]
    if not sizes or bad:
        msg = f"expected cell counts of at least {smallest}, got {sizes}"
        raise ValueError(msg)
    if n_genes_kept > n_genes:
        msg = f"cannot keep {n_genes_kept} genes out of {n_genes}; pass --n-genes-kept <= --genes"
        raise ValueError(msg)
    rows = []
    with tempfile.TemporaryDirectory(prefix="contrastive_sc_scale_", dir=workdir) as tmp:
        for n_cells in sizes:
            log.info("scale benchmark: %d cells x %d genes", n_cells, n_genes)
            data_path = Path(tmp) / f"scale_{n_cells}x{n_genes}.h5ad"
            try:
                row = _in_fresh_process(run_size, data_path, n_cells, n_genes, n_genes_kept=n_genes_kept, epochs=epochs,
                                        n_groups=n_groups, seed=seed, leiden=leiden)
                if scanpy and row["status"] == "ok":
                    row.update(_in_fresh_process(run_scanpy, data_path, seed=seed))
            finally:
                data_path.unlink(missing_ok=True)  # up to several GB per size
            append_row(out, row)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if row["status"] != "ok":
                break
    return rows


def _child(results, func, args, kwargs) -> None:
    _end_with_parent()
    logging.basicConfig(level=logging.getLogger().level or logging.WARNING)
    results.put(func(*args, **kwargs))


def _end_with_parent() -> None:
    """Make this worker end when the benchmark process is killed (not left running on its own).

    Linux delivers SIGTERM to the worker when its parent dies (``prctl(PR_SET_PDEATHSIG)``,
    effective even inside C code such as leidenalg); elsewhere a thread watches the parent id.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM)) == 0:  # 1 = PR_SET_PDEATHSIG
                return
        except (OSError, AttributeError):
            pass
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _in_fresh_process(func, *args, **kwargs) -> dict:
    # A spawned process starts from a clean heap; its result comes back through a queue. Ctrl-C
    # reaches the child too (same process group): the child returns its partial row, which is
    # waited for here.
    import multiprocessing
    import queue

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(results, func, args, kwargs))
    process.start()
    try:
        while True:
            try:
                return results.get(timeout=1.0)
            except KeyboardInterrupt:
                continue  # the child is ending its stage; its row follows
            except queue.Empty:
                if not process.is_alive():
                    try:
                        return results.get(timeout=1.0)
                    except queue.Empty:
                        return {"status": f"failed: worker exited with code {process.exitcode}"}
    finally:
        process.join(timeout=60)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table of the main columns."""
    import pandas as pd

    shown = ["n_cells", "preprocess_seconds", "train_seconds", "train_cells_per_s", "embed_seconds",
             "embed_cells_per_s", "kmeans_seconds", "leiden_seconds", "peak_mb", "scanpy_seconds", "scanpy_peak_mb",
             "kmeans_ari", "leiden_ari", "scanpy_ari", "status"]
    frame = pd.DataFrame(rows).reindex(columns=shown)
    return frame.dropna(axis=1, how="all").to_markdown(index=False)
