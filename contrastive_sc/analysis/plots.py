"""Figures logged with each run: the loss curve, a UMAP map of the clusters and a contingency heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Cells drawn on a run's map (a fixed random sample above this; UMAP's cost grows with cells).
MAP_SAMPLE = 20_000


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def loss_curve(loss: list[float], path: str | Path) -> Path:
    """Plot the per-epoch training loss."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(loss) + 1), loss, marker="o", markersize=3)
    ax.set(xlabel="epoch", ylabel="NT-Xent loss", title="training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


#: Distinct colours: matplotlib's tab10, then ten of Kelly's colours of maximum contrast that tab10
#: lacks. Categories beyond them, and any holding under :data:`RARE_SHARE` of the cells, are grey.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#f3c300", "#875692", "#a1caf1", "#be0032", "#008856", "#0067a5", "#604e97", "#f6a600",
           "#882d17", "#8db600")
RARE_SHARE = 0.01
GREY = "#c8c8c8"
#: Font size of legends and labels (points): readable when the figure is shown at 100 %.
FONT = 9
#: Longest name shown in a legend or on an axis (longer ones are cut with an ellipsis).
MAX_NAME = 28


def _short(name: str) -> str:
    name = str(name)
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "\u2026"


def _ordered(values) -> list:
    """Distinct values, numbers in numeric order (cluster 2 before 10), names alphabetically."""
    distinct = np.unique(np.asarray(values).astype(str))
    return sorted(distinct, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))


def _colours(values: np.ndarray, order: list) -> dict:
    """A distinct colour per category in ``order`` (largest first), grey for rare ones and the overflow."""
    counts = {v: int((values == v).sum()) for v in order}
    common = [v for v in sorted(order, key=lambda v: -counts[v]) if counts[v] >= RARE_SHARE * len(values)]
    colours = dict(zip(common, PALETTE))
    return {v: colours.get(v, GREY) for v in order}


def _matched_names(labels: np.ndarray, truth: np.ndarray | None) -> tuple[dict, dict]:
    """Colour and legend name per cluster: the colour of the cell type it best matches (one to one),
    named ``<cluster> (<majority type>)``, so the panels read side by side."""
    from scipy.optimize import linear_sum_assignment

    clusters = _ordered(labels)
    if truth is None:
        return _colours(labels, clusters), {c: c for c in clusters}
    types = _ordered(truth)
    type_colour = _colours(truth, types)
    row_of, column_of = {c: i for i, c in enumerate(clusters)}, {t: j for j, t in enumerate(types)}
    table = np.zeros((len(clusters), len(types)))
    np.add.at(table, ([row_of[c] for c in labels], [column_of[t] for t in truth]), 1)
    rows, cols = linear_sum_assignment(-table)
    matched = {clusters[r]: types[c] for r, c in zip(rows, cols) if table[r, c] > 0}
    spare = iter([c for c in PALETTE if c not in type_colour.values()] + [GREY] * len(clusters))
    colours = {c: type_colour[matched[c]] if c in matched and type_colour[matched[c]] != GREY else next(spare)
               for c in clusters}
    names = {c: f"{c} ({_short(types[int(table[i].argmax())])})" for i, c in enumerate(clusters)}
    return colours, names


def cluster_map(coords: np.ndarray, labels_by_method: dict[str, np.ndarray], truth, path: str | Path, *,
                batches=None, title: str = "", seed: int = 0) -> Path:
    """UMAP panels in a grid of two columns: one per clustering, the cell types and the batches.

    Points are drawn in a random order (no category hides another), legends sit beside their
    panel at :data:`FONT` points, categories under 1 % of the cells are grey, and a batch panel
    is drawn only when there are two batches or more.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()
    truth = None if truth is None else np.asarray(truth).astype(str)
    panels = []
    for method, labels in labels_by_method.items():
        labels = np.asarray(labels).astype(str)
        colours, names = _matched_names(labels, truth)
        panels.append((f"{method} clusters", labels, colours, names))
    if truth is not None:
        panels.append(("cell types (labels)", truth, _colours(truth, _ordered(truth)),
                       {t: _short(t) for t in _ordered(truth)}))
    if batches is not None and len(np.unique(np.asarray(batches).astype(str))) > 1:
        batches = np.asarray(batches).astype(str)
        panels.append(("batches", batches, _colours(batches, _ordered(batches)),
                       {b: _short(b) for b in _ordered(batches)}))
    n_cols = min(2, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(7.2 * n_cols, 5.0 * n_rows), squeeze=False,
                             layout="constrained")
    size = max(1.5, min(14.0, 4e4 / max(1, len(coords))))
    order = np.random.default_rng(seed).permutation(len(coords))  # shuffled: the last category drawn hides none
    for ax, (panel_title, labels, colours, names) in zip(axes.ravel(), panels):
        ax.scatter(coords[order, 0], coords[order, 1], c=[colours[v] for v in labels[order]], s=size,
                   linewidths=0, rasterized=len(coords) > 5000)
        ax.set_title(panel_title, fontsize=FONT + 2)
        ax.set(xticks=[], yticks=[])
        ax.set_xlabel("UMAP 1", fontsize=FONT)
        ax.set_ylabel("UMAP 2", fontsize=FONT)
        shown = [v for v in colours if colours[v] != GREY]
        handles = [Line2D([], [], marker="o", linestyle="", color=colours[v], markersize=6, label=names[v])
                   for v in shown]
        rare = [v for v in colours if colours[v] == GREY]
        if rare:
            handles.append(Line2D([], [], marker="o", linestyle="", color=GREY, markersize=6,
                                  label=f"{len(rare)} smaller (grey)"))
        ax.legend(handles=handles, fontsize=FONT, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
                  ncol=1 if len(handles) <= 16 else 2, handletextpad=0.2, borderaxespad=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=FONT + 2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def diagonal_order(table) -> tuple[list, list]:
    """Rows (cell types) and columns (clusters) of a contingency table ordered so the large counts sit on the diagonal.

    Each cluster is placed under the cell type holding most of its cells; cell types keep the
    order of their first cluster, and types that lead no cluster come last, largest first.
    """
    shares = table.div(table.sum(axis=0), axis=1)
    leader = shares.idxmax(axis=0)  # the majority cell type of each cluster
    rows = list(dict.fromkeys(leader.loc[table.sum(axis=0).sort_values(ascending=False).index]))
    rows = sorted(rows, key=lambda r: -table.loc[r].sum())
    rows += [r for r in table.sum(axis=1).sort_values(ascending=False).index if r not in rows]
    columns = sorted(table.columns, key=lambda c: (rows.index(leader[c]), -shares.at[leader[c], c]))
    return rows, columns


def contingency_heatmap(truth, labels, path: str | Path, *, title: str = "") -> Path:
    """Share of each cell type (rows, named) in each cluster (columns, named by their majority type), in diagonal order."""
    import pandas as pd

    plt = _pyplot()
    table = pd.crosstab(pd.Series(np.asarray(truth).astype(str), name="cell type"),
                        pd.Series(np.asarray(labels).astype(str), name="cluster"))
    rows, columns = diagonal_order(table)
    table = table.loc[rows, columns]
    shares = table.div(table.sum(axis=1), axis=0)
    leader = table.idxmax(axis=0)
    fig, ax = plt.subplots(figsize=(2.5 + 0.42 * table.shape[1], 2.2 + 0.32 * table.shape[0]), layout="constrained")
    image = ax.imshow(shares.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [f"{c} \u00b7 {_short(leader[c])}" for c in table.columns], rotation=90,
                  fontsize=FONT)
    ax.set_yticks(range(table.shape[0]), [_short(r) for r in table.index], fontsize=FONT)
    ax.set_xlabel("cluster (majority cell type)", fontsize=FONT)
    ax.set_ylabel("cell type", fontsize=FONT)
    ax.set_title(title or "share of each cell type per cluster", fontsize=FONT + 1, wrap=True)
    for (i, j), count in np.ndenumerate(table.to_numpy()):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=max(6, FONT - 2),
                    color="white" if shares.iat[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the cell type")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def experiment_figure(summary, metric: str, path: str | Path, *, title: str = "", kind: str = "line") -> Path:
    """One series per dataset of ``<metric>_mean`` (± sd) against the experiment's setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    datasets = list(dict.fromkeys(summary["dataset"]))
    settings = list(dict.fromkeys(summary["setting"].astype(str)))
    width = 0.8 / max(1, len(datasets))
    for i, dataset in enumerate(datasets):
        part = summary[summary["dataset"] == dataset]
        x = np.array([settings.index(str(s)) for s in part["setting"]])
        y = part[f"{metric}_mean"].to_numpy()
        err = part[f"{metric}_sd"].to_numpy() if f"{metric}_sd" in part else None
        if kind == "bar":
            ax.bar(x + i * width - 0.4 + width / 2, y, width, yerr=err, label=dataset)
        else:
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=dataset)
    ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right")
    ax.set(ylabel=metric, title=title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
