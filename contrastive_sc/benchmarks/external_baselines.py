"""External baselines (annotators, one embedding), each run by the interpreter of its own environment.

``annotation-benchmark`` starts this file by path (never as part of the package: it imports
neither contrastive_sc nor torch, only what the one tool needs) with the interpreter given by
``--celltypist-python``, ``--ingest-python`` or ``--scanvi-python``; ``benchmark`` and ``select``
with the one given by ``--scvi-python``::

    PYTHON external_baselines.py check TOOL                      # imports TOOL; prints its versions
    PYTHON external_baselines.py run TOOL --reference R.h5ad --query Q.h5ad --seed S --out OUT.npz
    PYTHON external_baselines.py embed TOOL --query D.h5ad --seed S --out OUT.npz

The two ``.h5ad`` hold raw counts in ``X``, ``obs["celltype"]`` (reference) and
``obs["batch_key"]``; ``OUT.npz`` gets ``called`` (a reference type or ``"unassigned"``),
``confidence`` (NaN when the tool has none) and ``seconds`` (the tool's own time). Each tool is set
up as its documentation shows (docs/annotation.md). A tool that cannot run exits with code 3 and
one line on stderr saying why.

``embed`` (``scvi``): ``D.h5ad`` holds raw counts in ``X``; ``OUT.npz`` gets ``latent`` (cells x
dimensions), ``seconds`` (preprocessing, training and the latent, not the imports), ``train_seconds``
and ``epochs``.
"""

from __future__ import annotations

import os
import sys

# Started by path, Python puts this folder first on sys.path: its modules (load.py, scale.py, ...)
# must not shadow a library's.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

UNASSIGNED = "unassigned"
#: Tool -> the packages whose versions the check reports (the first is the tool).
PACKAGES = {"celltypist": ("celltypist", "scikit-learn", "scanpy"),
            "ingest": ("scanpy", "pynndescent", "umap-learn"),
            "scanvi": ("scvi-tools", "torch", "scanpy"),
            "scvi": ("scvi-tools", "torch", "scanpy")}
CANNOT_RUN = 3


class CannotRun(Exception):
    """The environment cannot run the tool (message: why, and the fix)."""


def check(tool: str) -> dict[str, str]:
    """Import the tool and what it needs; its packages' versions."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if tool == "celltypist":
            import inspect

            import celltypist.train
            from sklearn.linear_model import LogisticRegression

            # CellTypist 1.7.1 passes multi_class=, which scikit-learn 1.8 removed: its training fails.
            if ("multi_class" in inspect.getsource(celltypist.train)
                    and "multi_class" not in inspect.signature(LogisticRegression).parameters):
                msg = (f"CellTypist {version('celltypist')} needs scikit-learn < 1.8 (it passes multi_class=; "
                       f"found {version('scikit-learn')}); give --celltypist-python an environment with "
                       "scikit-learn 1.7")
                raise CannotRun(msg)
        elif tool == "ingest":
            import pynndescent  # noqa: F401
            import scanpy  # noqa: F401
            import umap  # noqa: F401
        elif tool in ("scanvi", "scvi"):
            import scvi  # noqa: F401
        else:
            msg = f"unknown tool {tool!r}; expected one of {sorted(PACKAGES)}"
            raise CannotRun(msg)
    except ImportError as error:
        msg = f"cannot import {error.name or tool}: {error}"
        raise CannotRun(msg) from None
    versions = {}
    for package in PACKAGES[tool]:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "?"
    return versions


def lognorm(adata):
    import scanpy as sc

    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def celltypist_run(ref, query, seed):
    """``celltypist.train`` on the log1p(CP10k) reference (all genes, its logistic-regression path,
    ``feature_selection=True`` as in its docs), ``annotate(mode="prob match", p_thres=0.5)``; a cell
    with no type (``Unassigned``) or several (``a|b``) is unassigned; confidence = its best probability."""
    import celltypist
    import numpy as np

    np.random.seed(seed)
    r, q = lognorm(ref), lognorm(query)
    model = celltypist.train(r, labels="celltype", n_jobs=1, feature_selection=True, check_expression=True)
    result = celltypist.annotate(q, model=model, mode="prob match", p_thres=0.5)
    called = result.predicted_labels["predicted_labels"].astype(str).to_numpy()
    probs = result.probability_matrix.to_numpy()
    called = np.where((called == "Unassigned") | (np.char.find(called.astype(str), "|") >= 0), UNASSIGNED, called)
    return called, probs.max(axis=1)


def ingest_run(ref, query, seed):
    """scanpy's ingest tutorial: log-normalised counts, the reference's 2,000 seurat HVGs (shared with
    the query), ``sc.pp.pca``, ``sc.pp.neighbors``, ``sc.tl.umap`` on the reference, then
    ``sc.tl.ingest(query, ref, obs="celltype")``. Ingest has no rejection and no confidence."""
    import numpy as np
    import scanpy as sc

    r, q = lognorm(ref), lognorm(query)
    sc.pp.highly_variable_genes(r, n_top_genes=min(2000, r.n_vars), flavor="seurat")
    genes = r.var_names[r.var["highly_variable"].to_numpy()]
    var_names = genes.intersection(q.var_names)
    r, q = r[:, var_names].copy(), q[:, var_names].copy()
    sc.pp.pca(r, random_state=seed)
    sc.pp.neighbors(r, random_state=seed)
    sc.tl.umap(r, random_state=seed)
    sc.tl.ingest(q, r, obs="celltype")
    return q.obs["celltype"].astype(str).to_numpy(), np.full(q.n_obs, np.nan)


def scanvi_run(ref, query, seed):
    """scvi-tools' scANVI tutorial on reference + query together: ``filter_genes(min_counts=3)``,
    2,000 seurat_v3 HVGs of the counts with the batches (without them when loess fails on a small
    batch), ``SCVI(n_layers=2, n_latent=30, gene_likelihood="nb")`` with reference and query batches
    kept apart, ``SCANVI.from_scvi_model`` with the query labelled ``Unknown``,
    ``train(max_epochs=20, n_samples_per_label=100)``, soft predictions; a best probability under 0.5
    is unassigned. ``drop_last`` avoids a one-cell last batch, which BatchNorm refuses."""
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    ref, query = ref.copy(), query.copy()
    ref.obs["scanvi_label"] = ref.obs["celltype"].astype(str)
    query.obs["scanvi_label"] = "Unknown"
    ref.obs["batch_scvi"] = "ref_" + ref.obs["batch_key"].astype(str)
    query.obs["batch_scvi"] = "query_" + query.obs["batch_key"].astype(str)
    adata = ad.concat([ref, query], join="inner", label="part", keys=["ref", "query"], index_unique="-")
    sc.pp.filter_genes(adata, min_counts=3)  # the tutorial's filter (loess fails on all-zero genes)
    adata.layers["counts"] = adata.X.copy()
    n_top = min(2000, adata.n_vars - 1)
    try:
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top, layer="counts",
                                    batch_key="batch_scvi", subset=True)
    except ValueError as error:
        print(f"seurat_v3 with batch_key failed ({error}); HVGs without batch_key", file=sys.stderr)
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top, layer="counts", subset=True)
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch_scvi")
    vae = scvi.model.SCVI(adata, n_layers=2, n_latent=30, gene_likelihood="nb")
    vae.train(accelerator="cpu", enable_progress_bar=False, datasplitter_kwargs={"drop_last": True})
    lvae = scvi.model.SCANVI.from_scvi_model(vae, adata=adata, labels_key="scanvi_label", unlabeled_category="Unknown")
    lvae.train(max_epochs=20, n_samples_per_label=100, accelerator="cpu", enable_progress_bar=False,
               datasplitter_kwargs={"drop_last": True})
    soft = lvae.predict(adata[(adata.obs["part"] == "query").to_numpy()], soft=True)
    probs = soft.to_numpy()
    confidence = probs.max(axis=1)
    called = np.asarray(soft.columns.astype(str))[probs.argmax(axis=1)]
    return np.where(confidence < 0.5, UNASSIGNED, called), confidence


RUNNERS = {"celltypist": celltypist_run, "ingest": ingest_run, "scanvi": scanvi_run}


def scvi_latent(adata, seed):
    """scVI's latent as the clustering research that chose it ran it (scvi-tools' quick-start tutorial).

    ``filter_genes(min_counts=3)`` (the tutorial's filter; seurat_v3's loess fails on all-zero
    genes), the counts in ``layers["counts"]``, 2,000 ``seurat_v3`` highly variable genes of the
    counts (all genes when there are fewer), ``SCVI.setup_anndata(layer="counts")``, ``SCVI()``
    with its defaults (n_latent 10), ``train()`` with scvi-tools' own number of epochs
    (min(round(20000 / cells * 400), 400)) on the CPU, seeded, and ``get_latent_representation()``
    (posterior means). Returns the latent and ``{"train_seconds", "epochs"}``.
    """
    import numpy as np
    import scanpy as sc
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    adata = adata.copy()
    sc.pp.filter_genes(adata, min_counts=3)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=min(2000, adata.n_vars), flavor="seurat_v3", layer="counts",
                                subset=True)
    scvi.model.SCVI.setup_anndata(adata, layer="counts")
    model = scvi.model.SCVI(adata)
    started = time.perf_counter()
    model.train(accelerator="cpu", enable_progress_bar=False)
    train_seconds = time.perf_counter() - started
    latent = np.asarray(model.get_latent_representation(), dtype=np.float32)
    if not np.isfinite(latent).all():  # a diverged training must not be scored as a clustering
        msg = "scVI's latent is not finite (the training diverged)"
        raise RuntimeError(msg)
    return latent, {"train_seconds": train_seconds, "epochs": len(model.history["elbo_train"])}


EMBEDDERS = {"scvi": scvi_latent}


def embed(tool: str, data: str, seed: int, out: str) -> None:
    import anndata as ad
    import numpy as np

    if tool not in EMBEDDERS:
        msg = f"{tool} gives no embedding; expected one of {sorted(EMBEDDERS)}"
        raise CannotRun(msg)
    check(tool)
    adata = ad.read_h5ad(data)
    started = time.perf_counter()
    latent, info = EMBEDDERS[tool](adata, seed)
    seconds = time.perf_counter() - started
    with open(out, "wb") as handle:  # np.savez on a str path would append ".npz"
        np.savez(handle, latent=latent, seconds=np.float64(seconds), train_seconds=np.float64(info["train_seconds"]),
                 epochs=np.int64(info["epochs"]))


def run(tool: str, reference: str, query: str, seed: int, out: str) -> None:
    import anndata as ad
    import numpy as np

    if tool not in RUNNERS:
        msg = f"{tool} is not an annotator; expected one of {sorted(RUNNERS)}"
        raise CannotRun(msg)
    check(tool)
    ref, qry = ad.read_h5ad(reference), ad.read_h5ad(query)
    started = time.perf_counter()
    called, confidence = RUNNERS[tool](ref, qry, seed)
    seconds = time.perf_counter() - started
    with open(out, "wb") as handle:  # np.savez on a str path would append ".npz"
        np.savez(handle, called=np.asarray(called, dtype=str), confidence=np.asarray(confidence, dtype=float),
                 seconds=np.float64(seconds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["check", "run", "embed"])
    parser.add_argument("tool", choices=sorted(PACKAGES))
    parser.add_argument("--reference")
    parser.add_argument("--query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        if args.action == "check":
            print(json.dumps(check(args.tool)))
        elif args.action == "embed":
            embed(args.tool, args.query, args.seed, args.out)
        else:
            run(args.tool, args.reference, args.query, args.seed, args.out)
    except CannotRun as error:
        print(error, file=sys.stderr)
        return CANNOT_RUN
    return 0


if __name__ == "__main__":
    sys.exit(main())
