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


def _palette(n: int) -> list:
    plt = _pyplot()
    colours = [plt.get_cmap("tab20")(i) for i in range(20)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    return [colours[i % len(colours)] for i in range(n)]


def _ordered(values) -> list:
    """Distinct values, numbers in numeric order (cluster 2 before 10), names alphabetically."""
    distinct = np.unique(np.asarray(values).astype(str))
    return sorted(distinct, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))


def _matched_colours(labels, truth) -> dict:
    """Colour per cluster: the colour of the label it best matches (one-to-one), so panels compare."""
    from scipy.optimize import linear_sum_assignment

    clusters = _ordered(labels)
    if truth is None:
        return dict(zip(clusters, _palette(len(clusters))))
    names = _ordered(truth)
    table = np.zeros((len(clusters), len(names)))
    row_of, column_of = {c: i for i, c in enumerate(clusters)}, {n: j for j, n in enumerate(names)}
    np.add.at(table, ([row_of[c] for c in labels], [column_of[n] for n in truth]), 1)
    rows, cols = linear_sum_assignment(-table)
    palette = _palette(len(names) + len(clusters))
    # A cluster that shares no cell with its assigned label keeps a colour of its own.
    colours = {clusters[r]: palette[c] for r, c in zip(rows, cols) if table[r, c] > 0}
    spare = iter(palette[len(names):])
    return {c: colours.get(c) or next(spare) for c in clusters}


def cluster_map(coords: np.ndarray, labels_by_method: dict[str, np.ndarray], truth, path: str | Path, *,
                batches=None, title: str = "") -> Path:
    """UMAP panels: one per clustering, the labels and the batches, each with a legend.

    A cluster takes the colour of the cell type it matches best (one-to-one matching on the
    contingency table) and is named ``<cluster> (<majority type>)``, so panels read side by side.
    """
    plt = _pyplot()
    truth = None if truth is None else np.asarray(truth).astype(str)
    panels = []
    for method, labels in labels_by_method.items():
        labels = np.asarray(labels).astype(str)
        colours = _matched_colours(labels, truth)
        names = {}
        for c in colours:
            if truth is not None:
                values, counts = np.unique(truth[labels == c], return_counts=True)
                names[c] = f"{c} ({values[counts.argmax()]})"
            else:
                names[c] = str(c)
        panels.append((f"{method} clusters", labels, colours, names))
    if truth is not None:
        colours = dict(zip(_ordered(truth), _palette(len(_ordered(truth)))))
        panels.append(("cell types (labels)", truth, colours, {c: c for c in colours}))
    if batches is not None:
        batches = np.asarray(batches).astype(str)
        values = _ordered(batches)
        # Saturated colours (the palette's even entries): a light batch would vanish under a dark one.
        colours = dict(zip(values, _palette(2 * len(values))[::2]))
        panels.append(("batches", batches, colours, {c: c for c in colours}))
    width = max(1, len(panels))
    fig, axes = plt.subplots(1, width, figsize=(5.6 * width, 5.0), squeeze=False)
    size = max(1.0, min(12.0, 3e4 / max(1, len(coords))))
    for ax, (panel_title, labels, colours, names) in zip(axes[0], panels):
        for value, colour in colours.items():
            rows = labels == value
            ax.scatter(coords[rows, 0], coords[rows, 1], color=colour, s=size, linewidths=0, label=names[value])
        ax.set(title=panel_title, xlabel="UMAP 1", ylabel="UMAP 2", xticks=[], yticks=[])
        ax.legend(fontsize=6, markerscale=2.0 / np.sqrt(size) * 2, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  frameon=False, ncol=1 if len(colours) <= 20 else 2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def contingency_heatmap(truth, labels, path: str | Path, *, title: str = "") -> Path:
    """Share of each cell type (rows) in each cluster (columns), with the cell counts written in."""
    import pandas as pd

    plt = _pyplot()
    table = pd.crosstab(pd.Series(np.asarray(truth).astype(str), name="cell type"),
                        pd.Series(np.asarray(labels).astype(str), name="cluster"))
    table = table.loc[_ordered(table.index), _ordered(table.columns)]
    shares = table.div(table.sum(axis=1), axis=0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * table.shape[1], 1.2 + 0.35 * table.shape[0]))
    image = ax.imshow(shares.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=7)
    ax.set(xlabel="cluster", ylabel="cell type", title=title or "share of each cell type per cluster")
    for (i, j), count in np.ndenumerate(table.to_numpy()):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=5,
                    color="white" if shares.iat[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the cell type")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
