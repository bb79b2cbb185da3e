"""Annotation benchmark: train on one batch with a cell type held out, name the cells of another.

What a reference-mapping user asks of a tool: are the known types named right (macro F1 over the
types present in both batches), is the held-out type called ``unassigned``, and how many known
cells are wrongly left unassigned. The project's annotated model is compared with what users
would otherwise run: a kNN vote on the reference's PCA with the query projected on it (what
scanpy's ``ingest`` does for labels; ``sc.tl.ingest`` itself crashes in pynndescent with the
numpy of this environment), and CellTypist (logistic regression with a probability threshold)
when it is installed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..analysis.annotate import UNASSIGNED

METHODS = ("contrastive", "pca-knn", "celltypist")
COLUMNS = ["dataset", "method", "seed", "macro_f1_known", "held_out_unassigned", "known_unassigned", "seconds"]


def split_by_batch(adata, *, label_key: str, batch_key: str, train_batch: str, test_batch: str,
                   held_out: str | None):
    """Reference (``train_batch`` without ``held_out``) and query (all of ``test_batch``)."""
    for key in (label_key, batch_key):
        if key not in adata.obs:
            msg = f"obs column {key!r} not found; available: {list(adata.obs.columns)}"
            raise KeyError(msg)
    batches = adata.obs[batch_key].astype(str)
    labels = adata.obs[label_key].astype(str)
    for batch in (train_batch, test_batch):
        if batch not in set(batches):
            msg = f"batch {batch!r} not in obs[{batch_key!r}]; it has {sorted(set(batches))}"
            raise ValueError(msg)
    if held_out is not None and held_out not in set(labels):
        msg = f"cell type {held_out!r} not in obs[{label_key!r}]; it has {sorted(set(labels))}"
        raise ValueError(msg)
    train = adata[(batches == train_batch) & (labels != held_out)].copy()
    test = adata[batches == test_batch].copy()
    return train, test


def score_annotation(truth, called, *, held_out: str | None, known_types: Iterable[str]) -> dict[str, float]:
    """Macro F1 over the known types present in the query, and the unassigned shares."""
    from sklearn.metrics import f1_score

    truth, called = np.asarray(truth).astype(str), np.asarray(called).astype(str)
    known = truth != held_out if held_out is not None else np.ones(len(truth), dtype=bool)
    types = sorted(set(known_types) & set(truth[known]))
    return {"macro_f1_known": float(f1_score(truth[known], called[known], labels=types, average="macro",
                                             zero_division=0)),
            "held_out_unassigned": float((called[~known] == UNASSIGNED).mean()) if (~known).any() else float("nan"),
            "known_unassigned": float((called[known] == UNASSIGNED).mean())}


def run_annotation_benchmark(adata, *, label_key: str, batch_key: str, train_batch: str, test_batch: str,
                             held_out: str | None, methods: Iterable[str] = METHODS, seeds: Iterable[int] = (0,),
                             preset: str = "fused", on_row=None) -> pd.DataFrame:
    """One row per method and seed (columns :data:`COLUMNS`)."""
    methods = list(methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        msg = f"unknown method(s) {unknown}; expected some of {list(METHODS)}"
        raise ValueError(msg)
    train, test = split_by_batch(adata, label_key=label_key, batch_key=batch_key, train_batch=train_batch,
                                 test_batch=test_batch, held_out=held_out)
    truth = test.obs[label_key].astype(str).to_numpy()
    known_types = set(train.obs[label_key].astype(str))
    rows = []
    for seed in seeds:
        for method in methods:
            started = time.perf_counter()
            called = _ANNOTATORS[method](train, test, label_key, seed, preset)
            if called is None:  # optional tool not installed
                continue
            row = {"dataset": adata.uns.get("dataset", {}).get("name", "anndata"), "method": method, "seed": seed,
                   **score_annotation(truth, called, held_out=held_out, known_types=known_types),
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _contrastive(train, test, label_key, seed, preset):
    from ..method.model import CELL_TYPE_KEY, ContrastiveSC

    model = ContrastiveSC(preset=preset, seed=seed).fit(train, label_key=label_key, clusters=False)
    annotated = model.annotate(test, copy=True)
    return annotated.obs[CELL_TYPE_KEY].astype(str).to_numpy()


def _log_normalised(adata):
    import scanpy as sc

    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def _reference_pca(train, test, seed):
    """scanpy's recipe fitted on the reference, the query projected with the reference's genes and PCs."""
    import scanpy as sc

    reference = _log_normalised(train)
    sc.pp.highly_variable_genes(reference, n_top_genes=min(2000, reference.n_vars), flavor="seurat")
    genes = reference.var_names[reference.var["highly_variable"]]
    reference = reference[:, genes].copy()
    query = _log_normalised(test)[:, genes].copy()
    sc.pp.scale(reference, max_value=10)
    mean, std = reference.var["mean"].to_numpy(), reference.var["std"].to_numpy()
    x_query = np.clip((np.asarray(query.X.todense() if hasattr(query.X, "todense") else query.X) - mean) / std, -10, 10)
    n_components = min(50, reference.n_obs - 1, reference.n_vars - 1)
    sc.pp.pca(reference, n_comps=n_components, random_state=seed)
    return reference, query, x_query @ reference.varm["PCs"]


def _pca_knn(train, test, label_key, seed, preset):
    from sklearn.neighbors import KNeighborsClassifier

    reference, _, query_pcs = _reference_pca(train, test, seed)
    vote = KNeighborsClassifier(n_neighbors=15).fit(reference.obsm["X_pca"], reference.obs[label_key].astype(str))
    return vote.predict(query_pcs)


def _celltypist(train, test, label_key, seed, preset):
    try:
        import celltypist
    except ImportError:
        return None
    reference, query = _log_normalised(train), _log_normalised(test)
    model = celltypist.train(reference, labels=label_key, feature_selection=True, n_jobs=1, max_iter=200,
                             use_SGD=True, check_expression=False)
    # Its own rejection: cells whose best probability is under 0.5 are "Unassigned".
    result = celltypist.annotate(query, model=model, mode="prob match", p_thres=0.5)
    called = result.predicted_labels["predicted_labels"].astype(str).to_numpy()
    called = np.where(called == "Unassigned", UNASSIGNED, called)
    # "prob match" may join several types with "|": a cell named twice is not named.
    return np.where(np.char.find(called.astype(str), "|") >= 0, UNASSIGNED, called)


_ANNOTATORS = {"contrastive": _contrastive, "pca-knn": _pca_knn, "celltypist": _celltypist}


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds per method."""
    scores = ["macro_f1_known", "held_out_unassigned", "known_unassigned", "seconds"]
    from ..analysis.evaluation import mean_sd_text

    return mean_sd_text(results, ["method"], {col: 1 if col == "seconds" else 3 for col in scores})
