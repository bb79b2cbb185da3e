"""Training time against its floor: an epoch's dense FLOPs over this machine's matmul speed.

The floor is what training would take if every multiply-add of the dense computation ran at
the speed of one large single-threaded float32 matmul (training runs single-threaded on the
CPU: ``train._single_threaded``). Counted are the matmuls of every Linear layer on the two
stacked views and the ``(2b, 2b)`` similarity matrix of each batch's NT-Xent; backward is
taken as twice forward (``backward_factor=3`` for both). BatchNorm, ReLU, the softmax and the
optimizer are left out, so the floor is low; the CPU path's sparse masked views skip ~90 % of
the first layer's products, so it can still beat it.

Run ``python -m contrastive_sc.benchmarks.training_speed --data worm_neuron_cell.h5`` for the table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

#: Multiple of the forward FLOPs that forward + backward take (backward: the input and the
#: weight gradient, each a matmul of the forward's size).
BACKWARD_FACTOR = 3.0


def training_flops(n_cells: int, n_genes: int, layers: Sequence[int], batch_size: int, *, epochs: int = 1,
                   n_views: int = 2, backward_factor: float = BACKWARD_FACTOR) -> float:
    """Dense floating-point operations of ``epochs`` training epochs (forward + backward).

    Parameters
    ----------
    n_cells, n_genes
        Training matrix size.
    layers
        Encoder layer widths after the input, e.g. ``(200, 40, 60)``.
    batch_size
        Cells per batch; each step embeds ``n_views * batch`` rows.
    epochs, n_views, backward_factor
        As in training; ``backward_factor`` multiplies the forward count.

    Returns
    -------
    ``backward_factor * epochs * (layer matmuls + similarity matmuls)``, with a multiply-add
    counted as 2. The batches are those :func:`~contrastive_sc.method.train.fit_encoder` trains on
    (a last batch of one cell is skipped).
    """
    from ..method.augment import _batch_bounds

    sizes = [int(n_genes), *map(int, layers)]
    per_row = sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))
    bounds = _batch_bounds(int(n_cells), min(int(batch_size), int(n_cells)))
    forward = 0
    for start, stop in bounds:
        rows = n_views * (stop - start)
        forward += rows * per_row + 2 * rows * rows * sizes[-1]
    return float(backward_factor * epochs * forward)


def peak_gflops(size: int = 2048, repeats: int = 5, threads: int = 1) -> float:
    """Best GFLOP/s of a ``size x size`` float32 ``torch.mm`` at ``threads`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        out = torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / best / 1e9


def training_seconds(adata, preset: str, repeats: int = 3) -> tuple[list[float], list[float], int]:
    """Time the training ``ContrastiveSC(preset=...).fit(adata)`` runs, ``repeats`` times.

    The input is preprocessed once as the model does, then :func:`~contrastive_sc.method.train.fit_encoder`
    trains on it (the part ``history.seconds`` times).

    Returns
    -------
    Wall seconds (``history.seconds``) and CPU seconds of the training thread, per fit, and the
    number of input genes.
    """
    from ..method.config import get_preset
    from ..method.preprocess import fit_preprocess, transform
    from ..method.rows import as_rows
    from ..method.train import fit_encoder

    cfg = get_preset(preset)
    pre = cfg.preprocess
    state = fit_preprocess(as_rows(adata.X), adata.var_names, n_genes=pre.n_genes, min_cells=pre.min_cells,
                           hvg_flavor=pre.hvg_flavor, clip=pre.clip)
    x = transform(adata.X, adata.var_names, state)
    wall, cpu = [], []
    for _ in range(repeats):
        started = time.thread_time()  # training runs in this thread (single-threaded torch on the CPU)
        _, history = fit_encoder(x, cfg.encoder, cfg.train)
        cpu.append(time.thread_time() - started)
        wall.append(history.seconds)
    return wall, cpu, x.shape[1]


def floor_rows(floor_flops: float, peak: float, paper_seconds: Sequence[float], default_seconds: Sequence[float],
               default_preset: str = "fused", paper_cpu: Sequence[float] = (),
               default_cpu: Sequence[float] = ()) -> list[dict]:
    """The table's rows from the measurements (best of each list; ratios of bests).

    ``ratio`` is against the floor for the paper row and against the paper row for the default
    preset's; ``cpu_*`` are the same for the training thread's CPU seconds (``nan`` if not given).
    """
    floor = floor_flops / (peak * 1e9)
    paper, default = min(paper_seconds), min(default_seconds)
    paper_c = min(paper_cpu, default=float("nan"))
    default_c = min(default_cpu, default=float("nan"))
    return [
        {"row": "dense FLOP floor", "seconds": floor, "ratio": 1.0, "cpu_seconds": floor, "cpu_ratio": 1.0,
         "note": f"{floor_flops / 1e9:.1f} GFLOP at {peak:.1f} GFLOP/s (1 thread)"},
        {"row": "paper training", "seconds": paper, "ratio": paper / floor, "cpu_seconds": paper_c,
         "cpu_ratio": paper_c / floor, "note": f"paper / floor; best of {len(paper_seconds)}"},
        {"row": f"default ({default_preset}) training", "seconds": default, "ratio": default / paper,
         "cpu_seconds": default_c, "cpu_ratio": default_c / paper_c,
         "note": f"{default_preset} / paper; best of {len(default_seconds)}"},
    ]


def format_rows(rows: list[dict]) -> str:
    """A markdown table of :func:`floor_rows`."""
    lines = ["| | wall s | ratio | CPU s | CPU ratio | |", "|:--|--:|--:|--:|--:|:--|"]
    lines += [f"| {r['row']} | {r['seconds']:.2f} | {r['ratio']:.2f} | {r['cpu_seconds']:.2f} | {r['cpu_ratio']:.2f} "
              f"| {r['note']} |" for r in rows]
    return "\n".join(lines)


def training_floor(adata, *, repeats: int = 3, peak: float | None = None, verbose: bool = True) -> list[dict]:
    """Time the ``paper`` and the default preset's training on ``adata`` against the floor.

    Parameters
    ----------
    adata
        Raw counts (e.g. worm neuron).
    repeats
        Fits per preset; the best is kept (timings on a shared machine only get slower).
    peak
        Sustained GFLOP/s; when ``None``, the best :func:`peak_gflops` measured before and after
        the training runs.
    verbose
        Print the table.

    Returns
    -------
    The rows of the table (see :func:`floor_rows`).
    """
    from ..method.config import DEFAULT_PRESET, get_preset

    measured = peak is None
    peak = peak_gflops() if measured else peak
    paper_wall, paper_cpu, n_genes = training_seconds(adata, "paper", repeats)
    default_wall, default_cpu, _ = training_seconds(adata, DEFAULT_PRESET, repeats)
    if measured:  # before and after training: the best is the machine's, the rest is other jobs' load
        peak = max(peak, peak_gflops())
    cfg = get_preset("paper")
    flops = training_flops(adata.n_obs, n_genes, cfg.encoder.layers, cfg.train.batch_size, epochs=cfg.train.epochs)
    rows = floor_rows(flops, peak, paper_wall, default_wall, DEFAULT_PRESET, paper_cpu, default_cpu)
    if verbose:
        print(format_rows(rows))
    return rows
