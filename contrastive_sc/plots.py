"""Figures logged with each run: the loss curve and a 2-D map of the embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: t-SNE is quadratic-ish in cells; larger embeddings are mapped on a fixed random sample.
MAP_SAMPLE = 3000


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


def embedding_map(embedding: np.ndarray, labels_by_method: dict[str, np.ndarray], truth, path: str | Path,
                  seed: int = 0) -> Path:
    """t-SNE map of the embedding, one panel per clustering and one for the labels."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    n = embedding.shape[0]
    rows = np.sort(rng.choice(n, MAP_SAMPLE, replace=False)) if n > MAP_SAMPLE else np.arange(n)
    coords = TSNE(n_components=2, perplexity=min(30, max(2, len(rows) // 4)), random_state=seed,
                  init="pca").fit_transform(embedding[rows])
    panels = {f"{method} clusters": labels for method, labels in labels_by_method.items()}
    if truth is not None:
        panels["labels"] = truth
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (title, labels) in zip(axes[0], panels.items()):
        codes = np.unique(np.asarray(labels)[rows], return_inverse=True)[1]
        ax.scatter(coords[:, 0], coords[:, 1], c=codes, cmap="tab20", s=4, linewidths=0)
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
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
