"""Leave-one-dataset-out (LODO) selection: how well a way of choosing settings does on data it never saw.

Every candidate setting (a benchmark method such as ``fused-kmeans``) runs once per dataset and
seed; the runs are cached in a CSV, one row per (dataset, method, seed), so a second call with
more candidates runs only the new ones. Then, for each dataset, the candidate with the best
mean score over the *other* datasets is chosen and its score on the held-out dataset reported.
That held-out figure is what a user with a new dataset can expect from the selection; the
in-sample figure (the candidate best over all datasets, the held-out one included) is printed
beside it to show how much choosing on the test data flatters a result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..method.config import PRESETS, ContrastiveConfig, get_preset
from .benchmark import (
    COLUMNS,
    EXTERNAL,
    SCANPY_CLIP,
    SCANPY_COMPONENTS,
    SCANPY_GENES,
    available_methods,
    benchmark_adata,
    check_external,
)

#: The cache's columns: the benchmark's, the number of true classes, what the setting was and
#: which code ran it (:func:`code_id`).
CACHE_COLUMNS = [*COLUMNS, "n_classes", "setting", "code"]
#: A cluster count within this fraction of the true number of classes counts as right.
COUNT_TOLERANCE = 0.30


def setting_id(method: str, versions: dict[str, str] | None = None) -> str:
    """Fingerprint of what ``method`` runs, so cached rows of an edited preset are not reused.

    A preset's fingerprint hashes its settings that differ from the configuration defaults, so a
    new setting added later with a default that keeps old behaviour leaves it unchanged; a
    baseline's names its fixed recipe. An external tool's (``scvi``) also names the tool's
    version (``versions``: package -> version, from :func:`~.benchmark.check_external`), since its
    recipe is the package's code but its training is the tool's.
    """
    source = method.rsplit("-", 1)[0]
    if source in EXTERNAL:
        package, version = next(iter(versions.items())) if versions else ("?", "?")  # the tool itself comes first
        return f"{source}:{package} {version}"
    if source in PRESETS:
        defaults = ContrastiveConfig().to_params()
        params = {k: v for k, v in get_preset(source).to_params().items() if k not in defaults or v != defaults[k]}
        text = json.dumps(params, sort_keys=True)
        return "preset:" + hashlib.sha1(text.encode()).hexdigest()[:12]
    if source == "scanpy":
        return f"scanpy:{SCANPY_GENES}-{SCANPY_CLIP:g}-{SCANPY_COMPONENTS}"
    return f"baseline:{source}"


def code_id() -> str:
    """Fingerprint of the package's source, so that rows run by other code are not taken for today's.

    Settings alone are not enough: a change to preprocessing or training with the same settings
    moves a preset's scores by more than the differences between candidates (measured: one
    preset's ARI on one file and seed, 0.558 before a float32 preprocessing change, 0.539 after).
    """
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return "code:" + digest.hexdigest()[:12]


def read_cache(path: str | Path) -> pd.DataFrame:
    """The cached runs in ``path`` (an empty table when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=CACHE_COLUMNS)
    frame = pd.read_csv(path)
    if "code" not in frame.columns and "setting" in frame.columns:  # a cache written before rows named their code
        frame["code"] = "code:unknown"
    missing = [c for c in CACHE_COLUMNS if c not in frame.columns]
    if missing:
        msg = f"{path} is not a selection cache: it lacks column(s) {missing}; expected {CACHE_COLUMNS}"
        raise ValueError(msg)
    return frame[CACHE_COLUMNS]


def run_missing(paths: Iterable[str | Path], methods: Sequence[str], seeds: Iterable[int], cache: str | Path, *,
                label_key: str | None = None, on_row: Callable[[dict], None] | None = None,
                any_code: bool = False, interpreters: dict[str, str | None] | None = None,
                on_message: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Run what ``cache`` lacks of datasets x methods x seeds, append it, return all the requested rows.

    A cached row counts only when its ``setting`` matches :func:`setting_id` today and its
    ``code`` matches :func:`code_id` (or ``any_code``: rows of any code version count, the later
    one of a repeated run winning); other rows are left in the file but ignored (and rerun). Each
    new row is appended as soon as it is produced, so an interrupted run loses at most one run.
    External methods (``scvi-*``) need their interpreter in ``interpreters`` (checked first, even
    when every row is cached: its tool's version is part of their setting); ``on_message`` gets
    each tool's versions.
    """
    from ..method.io import default_label_key, read
    from .benchmark import _warm_up

    methods = list(methods)
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        msg = f"unknown method(s) {unknown}; expected some of {available_methods()}"
        raise ValueError(msg)
    seeds = list(seeds)
    versions = check_external(methods, interpreters)
    for source, found in versions.items():
        if on_message is not None:
            on_message(f"{source}: {', '.join(f'{p} {v}' for p, v in found.items())} ({interpreters[source]})")
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    settings = {m: setting_id(m, versions.get(m.rsplit("-", 1)[0])) for m in methods}
    code = code_id()
    cached = read_cache(cache)
    if cache.exists() and "code" not in pd.read_csv(cache, nrows=0).columns:
        cached.to_csv(cache, index=False)  # an older cache gains the column before rows are appended
    usable = cached["setting"] == cached["method"].map(settings)
    if not any_code:
        usable &= cached["code"] == code
    done = {(d, m, int(s)) for d, m, s in cached.loc[usable, ["dataset", "method", "seed"]].itertuples(index=False)}
    names, warmed = [], False
    for path in paths:
        adata = read(path, label_key)
        name = adata.uns.get("dataset", {}).get("name", Path(path).stem)
        names.append(name)
        key = label_key or default_label_key(adata)
        n_classes = len(np.unique(np.asarray(adata.obs[key]))) if key is not None else np.nan
        for seed in seeds:
            todo = [m for m in methods if (name, m, seed) not in done]
            if not todo:
                continue
            if not warmed:  # imports and JIT compilation stay out of the first run's seconds
                _warm_up(methods)
                warmed = True

            def append(row, n_classes=n_classes):
                row = {**row, "n_classes": n_classes, "setting": settings[row["method"]], "code": code}
                pd.DataFrame([row], columns=CACHE_COLUMNS).to_csv(cache, mode="a", index=False,
                                                                  header=not cache.exists() or cache.stat().st_size == 0)
                if on_row is not None:
                    on_row(row)

            benchmark_adata(adata, todo, [seed], label_key=label_key, on_row=append, interpreters=interpreters)
    frame = read_cache(cache)
    keep = (frame["dataset"].isin(names) & frame["method"].isin(methods) & frame["seed"].isin(seeds)
            & (frame["setting"] == frame["method"].map(settings)))
    if not any_code:
        keep &= frame["code"] == code
    # a run repeated by two processes sharing the cache counts once (the later row)
    return frame[keep].drop_duplicates(["dataset", "method", "seed"], keep="last").reset_index(drop=True)


def per_dataset_means(results: pd.DataFrame, methods: Sequence[str], metric: str = "ari") -> pd.DataFrame:
    """Datasets x methods table of the mean ``metric`` over seeds (datasets in order of appearance).

    Raises
    ------
    ValueError
        If some method has no run on some dataset (a LODO choice needs every cell filled).
    """
    rows = results[results["method"].isin(methods)]
    table = rows.groupby(["dataset", "method"], sort=False)[metric].mean().unstack("method")
    datasets = list(dict.fromkeys(results["dataset"]))
    table = table.reindex(index=datasets, columns=list(methods))
    if table.isna().any().any():
        holes = [f"{d}/{m}" for d in table.index for m in table.columns if pd.isna(table.loc[d, m])]
        msg = f"no {metric} for {holes[:5]}{' ...' if len(holes) > 5 else ''}; expected every method on every dataset"
        raise ValueError(msg)
    return table


def lodo(results: pd.DataFrame, candidates: Sequence[str], metric: str = "ari") -> pd.DataFrame:
    """Leave-one-dataset-out choice among ``candidates``, one row per held-out dataset.

    For each dataset the candidate with the highest mean (over the other datasets, each weighted
    the same) of its per-dataset mean ``metric`` is chosen; ties go to the first in ``candidates``.

    Returns
    -------
    Columns ``dataset``, ``chosen``, ``heldout`` (the chosen candidate's score on the dataset),
    ``insample_choice`` and ``insample`` (the same for the candidate best over all datasets),
    ``oracle_choice`` and ``oracle`` (the best candidate on that dataset alone).
    """
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        msg = "expected at least one candidate method, got none"
        raise ValueError(msg)
    table = per_dataset_means(results, candidates, metric)
    if len(table) < 2:
        msg = f"leave-one-dataset-out needs at least 2 datasets, got {len(table)}"
        raise ValueError(msg)
    insample_choice = table.mean(axis=0).idxmax()  # idxmax keeps the first of equal maxima
    rows = []
    for dataset in table.index:
        chosen = table.drop(index=dataset).mean(axis=0).idxmax()
        rows.append({"dataset": dataset, "chosen": chosen, "heldout": table.loc[dataset, chosen],
                     "insample_choice": insample_choice, "insample": table.loc[dataset, insample_choice],
                     "oracle_choice": table.loc[dataset].idxmax(), "oracle": table.loc[dataset].max()})
    return pd.DataFrame(rows)


def within_tolerance(n_clusters: float, n_classes: float, tolerance: float = COUNT_TOLERANCE) -> bool:
    """Whether a (mean) cluster count is within ``tolerance`` of the true number of classes."""
    return bool(abs(n_clusters - n_classes) <= tolerance * n_classes)


def report(results: pd.DataFrame, candidates: Sequence[str], baselines: Sequence[str],
           metric: str = "ari") -> tuple[pd.DataFrame, list[str]]:
    """The LODO table with the baselines beside it, and summary lines.

    Per dataset: the chosen candidate, its held-out score, the in-sample choice's score and each
    baseline's score; methods that estimate the number of clusters (not ``-kmeans``) show their
    mean count in brackets. The summary gives the means, how often the held-out choice beats the
    strongest baseline (highest mean), and how many counts fall within :data:`COUNT_TOLERANCE`.
    """
    baselines = list(dict.fromkeys(baselines))
    choice = lodo(results, candidates, metric)
    base = per_dataset_means(results, baselines, metric) if baselines else pd.DataFrame(index=choice["dataset"])
    counts = results.groupby(["dataset", "method"], sort=False)["n_clusters"].mean()
    classes = results.groupby("dataset", sort=False)["n_classes"].first()

    def cell(dataset, method, value):
        text = f"{value:.3f}"
        return text if method.endswith("-kmeans") else f"{text} ({counts[dataset, method]:.1f})"

    rows = []
    for r in choice.itertuples(index=False):
        row = {"dataset (classes)": f"{r.dataset} ({classes[r.dataset]:.0f})", "LODO choice": r.chosen,
               f"LODO {metric}": cell(r.dataset, r.chosen, r.heldout),
               f"in-sample {metric}": cell(r.dataset, r.insample_choice, r.insample)}
        for b in baselines:
            row[b] = cell(r.dataset, b, base.loc[r.dataset, b])
        rows.append(row)
    table = pd.DataFrame(rows)
    n = len(choice)
    mean_row = {"dataset (classes)": "mean", "LODO choice": "", f"LODO {metric}": f"{choice['heldout'].mean():.3f}",
                f"in-sample {metric}": f"{choice['insample'].mean():.3f}"}
    mean_row.update({b: f"{base[b].mean():.3f}" for b in baselines})
    table = pd.concat([table, pd.DataFrame([mean_row])], ignore_index=True)

    cand_means = per_dataset_means(results, candidates, metric).mean(axis=0).sort_values(ascending=False)
    lines = [f"LODO mean {metric} {choice['heldout'].mean():.3f}; in-sample best ({choice['insample_choice'].iloc[0]}) "
             f"{choice['insample'].mean():.3f}; per-dataset oracle {choice['oracle'].mean():.3f}",
             "candidates' means: " + ", ".join(f"{m} {v:.3f}" for m, v in cand_means.items())]
    codes = results["code"].unique() if "code" in results else []
    if len(codes) > 1:
        lines.append(f"rows from {len(codes)} code versions ({', '.join(sorted(map(str, codes)))}): differences "
                     "between methods run by different code mix code changes with method changes")
    if baselines:
        strongest = base.mean(axis=0).idxmax()
        wins = int((choice["heldout"].to_numpy() > base[strongest].to_numpy()).sum())
        lines.append(f"LODO choice beats the strongest baseline ({strongest}, mean {base[strongest].mean():.3f}) "
                     f"on {wins} of {n}")
    for method in [*dict.fromkeys(candidates), *baselines]:
        if method.endswith("-kmeans"):
            continue
        ok = sum(within_tolerance(counts[d, method], classes[d]) for d in choice["dataset"])
        lines.append(f"{method}: cluster count within {COUNT_TOLERANCE:.0%} of the classes on {ok} of {n}")
    chosen_counts = [within_tolerance(counts[r.dataset, r.chosen], classes[r.dataset])
                     for r in choice.itertuples(index=False) if not r.chosen.endswith("-kmeans")]
    if chosen_counts:
        lines.append(f"LODO choice's count within {COUNT_TOLERANCE:.0%} on {sum(chosen_counts)} of {len(chosen_counts)}")
    return table, lines
