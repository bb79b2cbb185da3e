"""Send a dataset to a served contrastive-sc model in chunks; write the clusters back.

    python serving/client.py --url http://127.0.0.1:5001 --data cells.h5ad --out clusters.csv \
        --model-uri models:/contrastive-sc@champion
    python serving/client.py --url ... --data cells.h5ad --out clustered.h5ad --genes preprocess_state.json

``trained`` labels every chunk against the training clusters, so chunks can be sent one by
one; ``kmeans``, ``auto`` and ``leiden`` cluster the cells of one request together, so the whole dataset
goes in a single request (up to the server's cell limit, ``CONTRASTIVE_SC_MAX_CELLS``).

Only the model's genes are sent (the others are ignored by the model and only make the body
larger): ``--model-uri`` reads them from the model's ``preprocess_state.json`` through the
registry, ``--genes`` from a local ``preprocess_state.json`` or a text file with one gene per line.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

#: Content types of the request formats MLflow's scoring server reads.
CONTENT_TYPES = {"json": "application/json", "csv": "text/csv", "parquet": "application/vnd.apache.parquet"}
#: Body formats: wide (one column per gene) or long (``cell, gene, count`` rows of non-zero counts).
FORMATS = ("json", "csv", "parquet", "csv-long", "parquet-long")


def post(url: str, payload: dict | bytes, timeout: float = 600, fmt: str = "json") -> dict:
    """POST a JSON payload (or a CSV/parquet body) to ``<url>/invocations``; raise with the server's message on 4xx/5xx."""
    data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    request = urllib.request.Request(f"{url.rstrip('/')}/invocations", data=data,
                                     headers={"Content-Type": CONTENT_TYPES[fmt.removesuffix("-long")]}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        try:
            body = json.loads(body).get("message", body)
        except json.JSONDecodeError:
            pass
        msg = f"server answered {error.code}: {body}"
        raise RuntimeError(msg) from None


def request_format(params: dict, fmt: str = "auto") -> str:
    """The body format of a request: long parquet when ``params`` are the served defaults, else JSON.

    CSV and parquet bodies carry no params (the server applies the model's defaults:
    ``trained`` with the embedding); measured with ``contrastive-sc speed-benchmark``, the long
    parquet form (one row per non-zero count) is the fastest request. Other params need JSON.
    """
    from dataclasses import fields

    from contrastive_sc.serve.inference import PredictParams

    # The defaults a body without params gets; those left to the model (None) are not known here.
    defaults = {f.name: f.default for f in fields(PredictParams) if f.default is not None}
    plain = set(params) <= set(defaults) and all(params.get(k, v) == v for k, v in defaults.items())
    if fmt == "auto":
        return "parquet-long" if plain else "json"
    if fmt != "json" and not plain:
        msg = f"{fmt} requests carry no params; use --format json (or auto) for {params}"
        raise ValueError(msg)
    return fmt


def frame_payload(frame: pd.DataFrame, params: dict, orient: str = "split") -> dict:
    """A ``dataframe_split`` or ``dataframe_records`` request body with ``params``."""
    if orient == "split":
        body = {"dataframe_split": {"index": [str(i) for i in frame.index], "columns": [str(c) for c in frame.columns],
                                    "data": frame.to_numpy().tolist()}}
    else:
        body = {"dataframe_records": frame.to_dict(orient="records")}
    return body | {"params": params}


def cluster_dataset(url: str, counts: pd.DataFrame, params: dict, chunk_size: int = 500,
                    fmt: str = "auto") -> pd.DataFrame:
    """Send ``counts`` (cells x genes) and return the server's rows, one per cell, in order.

    ``fmt``: ``auto`` (see :func:`request_format`), ``json``, ``csv`` or ``parquet``.
    """
    if params.get("method", "trained") != "trained":
        chunk_size = len(counts)  # kmeans/auto/leiden must see all cells at once
    from contrastive_sc.benchmarks.speed import request_body

    fmt = request_format(params, fmt)
    parts = []
    for start in range(0, len(counts), chunk_size):
        chunk = counts.iloc[start:start + chunk_size]
        if fmt == "json":
            answer = post(url, frame_payload(chunk, params))
        else:
            # Positions as cell names: unique whatever the data's names (the long form groups rows by name).
            answer = post(url, request_body(chunk.set_axis([str(i) for i in range(len(chunk))]), fmt), fmt=fmt)
        part = pd.DataFrame(answer["predictions"])
        if fmt != "json":
            part["cell"] = [str(i) for i in chunk.index]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def model_genes(model_uri: str | None = None, genes_file: str | None = None) -> list[str] | None:
    """The model's genes, from the registry (``model_uri``) or a file; ``None`` when neither is given."""
    if genes_file is None and model_uri is None:
        return None
    if genes_file is None:
        from contrastive_sc.mlops.registry import download_run_artifacts

        genes_file = download_run_artifacts(model_uri, "torch_model/preprocess_state.json")
    text = Path(genes_file).read_text()
    if genes_file.endswith(".json"):
        return list(json.loads(text)["genes"])
    return [line.strip() for line in text.splitlines() if line.strip()]


def select_genes(counts: pd.DataFrame, genes: list[str] | None) -> pd.DataFrame:
    """The columns of ``counts`` that are model genes (all columns when ``genes`` is None)."""
    if genes is None:
        return counts
    keep = [g for g in counts.columns if g in set(genes)]
    if not keep:
        msg = f"none of the model's {len(genes)} genes (e.g. {genes[:3]}) is a column of the data"
        raise ValueError(msg)
    return counts[keep]


def summary(result: pd.DataFrame, method: str) -> str:
    """What a run of the client tells its user: cluster sizes, and for an annotated model the cells per type."""
    sizes = result["cluster"].value_counts().sort_index().to_dict()
    lines = [f"{len(result)} cells clustered ({method}); cluster sizes {sizes}"]
    if "cell_type" in result:
        counts = result["cell_type"].value_counts()
        lines.append("cell types: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
        unassigned = float((result["cell_type"] == "unassigned").mean())
        lines.append(f"unassigned: {unassigned:.1%} of the cells (confidence below the model's threshold)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the client; a bad input or a refused request ends with one ``Error:`` line and exit code 2."""
    try:
        return _main(argv)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        message = error.args[0] if error.args else str(error)
        print(f"Error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    from contrastive_sc.mlops.tracking import quiet_mlflow
    from contrastive_sc.serve.inference import METHODS  # the served model's methods, one list

    quiet_mlflow()  # the genes of --model-uri come through the registry: no download bars or INFO lines

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:5001")
    parser.add_argument("--data", required=True, help="counts file (any format contrastive-sc reads) or 'simulated'")
    parser.add_argument("--out", required=True, help="output .csv or .h5ad")
    parser.add_argument("--method", default="trained", choices=list(METHODS))
    parser.add_argument("--n-clusters", type=int, default=0)
    parser.add_argument("--resolution", type=float, default=None, help="Leiden resolution [default: the model's]")
    parser.add_argument("--chunk-size", type=int, default=5000,
                        help="cells per request; a model trained with labels names the cells of one request together, "
                             "so a sample is best sent whole")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                        help="request body: auto = long parquet for default 'trained' requests, JSON otherwise")
    parser.add_argument("--max-cells", type=int, default=None, help="send only the first N cells")
    parser.add_argument("--layer", default=None,
                        help="read the raw counts from this layer of an .h5ad, or 'raw' for adata.raw [default: X]")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="annotated models: call cells under this confidence 'unassigned' [default: the model's]")
    genes = parser.add_mutually_exclusive_group()
    genes.add_argument("--model-uri", default=None, help="send only this model's genes (read through the registry)")
    genes.add_argument("--genes", default=None, help="send only these genes: preprocess_state.json or one per line")
    args = parser.parse_args(argv)

    from contrastive_sc.method.io import load

    adata = load(args.data, layer=args.layer)
    if args.max_cells:
        adata = adata[: args.max_cells].copy()
    counts = select_genes(adata.to_df(), model_genes(args.model_uri, args.genes))
    # The embedding is only kept for .h5ad; a parquet body cannot ask to leave it out, but is fast
    # enough to win anyway (serving/README.md), so default 'trained' requests go as parquet.
    params = {"method": args.method}
    if args.n_clusters:
        params["n_clusters"] = args.n_clusters
    if args.resolution is not None:  # left out: the model's own resolution
        params["resolution"] = args.resolution
    if args.min_confidence is not None:
        params["min_confidence"] = args.min_confidence
    if args.format == "json" and not args.out.endswith(".h5ad"):
        params["return_embedding"] = False
    result = cluster_dataset(args.url, counts, params, args.chunk_size, args.format)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".h5ad":
        emb_cols = [c for c in result.columns if c.startswith("emb_")]
        adata.obsm["X_contrastive"] = result[emb_cols].to_numpy(dtype=np.float32)
        adata.obs[f"contrastive_{args.method}"] = pd.Categorical(result["cluster"].astype(str).to_numpy())
        if "cell_type" in result:
            adata.obs["cell_type"] = pd.Categorical(result["cell_type"].astype(str).to_numpy())
            adata.obs["confidence"] = result["confidence"].to_numpy(dtype=np.float64)
        adata.write_h5ad(out)
    else:
        columns = ["cell", "cluster", "gene_coverage"] + [c for c in ("cell_type", "confidence") if c in result]
        result[columns].to_csv(out, index=False)
    print(f"{summary(result, args.method)}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
