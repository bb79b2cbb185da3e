"""Write example request bodies for a served model from a few cells of a dataset.

    python serving/make_examples.py --model-uri models:/contrastive-sc@champion --data simulated --out-dir serving/examples

Writes ``dataframe_split.json`` and ``dataframe_records.json`` (raw counts with gene names,
params choosing the clustering) and ``tensor_inputs.json`` (counts of the model's genes in the
model's order, for callers who already hold them that way).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--data", default="simulated")
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--out-dir", default="serving/examples")
    args = parser.parse_args()

    from contrastive_sc.method.io import load
    from contrastive_sc.mlops.registry import load_served_model

    served = load_served_model(args.model_uri)
    counts = load(args.data)[: args.cells].to_df().astype(int)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = {"dataframe_split": {"index": list(counts.index), "columns": list(counts.columns),
                                 "data": counts.to_numpy().tolist()},
             "params": {"method": "trained", "return_embedding": False}}
    records = {"dataframe_records": counts.to_dict(orient="records"),
               "params": {"method": "kmeans", "n_clusters": 2, "return_embedding": False}}
    tensor = {"inputs": counts.reindex(columns=list(served.state.genes), fill_value=0).to_numpy().tolist(),
              "params": {"method": "trained"}}
    for name, body in {"dataframe_split": split, "dataframe_records": records, "tensor_inputs": tensor}.items():
        (out / f"{name}.json").write_text(json.dumps(body))
    print(f"wrote 3 example requests for {args.cells} cells to {out}")


if __name__ == "__main__":
    main()
