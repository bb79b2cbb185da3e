"""A served model under slow requests: do quick requests still answer, and does memory come back?

:func:`run_load_benchmark` starts the model with ``serving/serve.sh`` and its documented defaults
(a real ``mlflow models serve`` on 127.0.0.1, stopped again), sends :data:`SLOW_REQUESTS` slow
clustering requests at once (JSON, ``leiden`` on many cells with the most neighbours the budget
allows) and, while they are in flight, a stream of 2-cell ``trained`` requests; it samples the
server's memory meanwhile and records every answer. Then :data:`CLIENTS` clients send 500-cell
requests back to back (throughput). The whole is repeated per worker count. The machine may be
shared: compare rows of one run rather than absolute seconds.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from ..serve.limits import DEFAULT_MAX_GRAPH_EDGES
from .speed import Server, _train_model, request_body

#: Slow requests sent at once (issue 24 sent eight).
SLOW_REQUESTS = 8
#: Clients of the throughput test.
CLIENTS = 8
#: The quick requests' target: each answered 200 within this many seconds while the slow ones run.
QUICK_TARGET_SECONDS = 5.0
#: Seconds between two quick requests of the stream.
QUICK_INTERVAL = 0.25


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def group_processes(group: int) -> dict[int, tuple[int, str]]:
    """``{pid: (parent pid, command line)}`` of the live (not zombie) processes of a process group."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != group or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                out[int(entry)] = (int(fields[1]), cmdline.read().replace(b"\0", b" ").decode(errors="replace"))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return out


def server_memory(group: int) -> dict[str, float]:
    """RSS (MB) of a server's process group: ``workers`` (the uvicorn processes: with ``-w 2`` and more,
    the supervisor and the workers it spawned) and ``total`` (with the MLflow launcher, the fork
    servers and the processes they forked; pages shared between forked processes count once per process)."""
    workers = total = 0.0
    for pid, (_, command) in group_processes(group).items():
        rss = _rss_mb(pid)
        total += rss
        if ("uvicorn" in command and "multiprocessing" not in command) or "multiprocessing.spawn" in command:
            workers += rss
    return {"workers": workers, "total": total}


class MemorySampler:
    """Samples :func:`server_memory` every ``interval`` seconds in a thread, keeping the peaks."""

    def __init__(self, group: int, interval: float = 0.2) -> None:
        self.group, self.interval = group, interval
        self.peak = {"workers": 0.0, "total": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = server_memory(self.group)
            self.peak = {key: max(self.peak[key], now[key]) for key in now}
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _post(url: str, body: bytes, content_type: str, timeout: float = 600) -> tuple[int, float, str]:
    """``(status, seconds, message)`` of one request; an error's message is the server's."""
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, time.perf_counter() - started, ""
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            text = json.loads(text).get("message", text)
        except (json.JSONDecodeError, AttributeError):
            pass
        return error.code, time.perf_counter() - started, " ".join(str(text).split())
    except OSError as error:
        return 0, time.perf_counter() - started, f"{type(error).__name__}: {error}"


def cells_at_size(counts: pd.DataFrame, n_cells: int, *, seed: int = 0) -> pd.DataFrame:
    """``n_cells`` cells like those of ``counts``: its rows drawn at random, each count redrawn from a
    Poisson of the drawn count (so no two cells are identical)."""
    rng = np.random.default_rng(seed)
    rows = counts.to_numpy()[rng.integers(len(counts), size=n_cells)]
    return pd.DataFrame(rng.poisson(rows), columns=counts.columns, index=[f"cell{i}" for i in range(n_cells)])


def _split_body(frame: pd.DataFrame, params: dict) -> bytes:
    return json.dumps({"dataframe_split": {"index": list(map(str, frame.index)), "columns": list(map(str, frame.columns)),
                                           "data": frame.to_numpy().tolist()}, "params": params}).encode()


def _slow_phase(url: str, group: int, slow_body: bytes, refused_body: bytes, quick_body: bytes) -> dict:
    """Slow requests at once, a quick stream meanwhile, memory sampled: the answers and the memory."""
    refused = _post(url, refused_body, "application/json")  # alone: the budget answers, not a busy server
    before = server_memory(group)
    slow, quick = [], []
    with MemorySampler(group) as sampler, concurrent.futures.ThreadPoolExecutor(SLOW_REQUESTS) as pool:
        futures = [pool.submit(_post, url, slow_body, "application/json") for _ in range(SLOW_REQUESTS)]
        started = time.perf_counter()
        while not all(f.done() for f in futures) or time.perf_counter() - started < 2:
            quick.append(_post(url, quick_body, "application/json", timeout=120))
            time.sleep(QUICK_INTERVAL)
        slow = [f.result() for f in futures]
        time.sleep(2)  # the killed processes' memory, back to the system
    after = server_memory(group)
    return {"slow": slow, "refused": refused, "quick": quick, "memory": {"before": before, "peak": sampler.peak,
                                                                         "after": after}}


def _throughput(url: str, bodies: list[bytes], content_type: str, requests_per_client: int) -> dict:
    def client(index: int) -> list[tuple[int, float, str]]:
        return [_post(url, bodies[(index + r) % len(bodies)], content_type) for r in range(requests_per_client)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        answers = [a for part in pool.map(client, range(CLIENTS)) for a in part]
    return {"answers": answers, "seconds": time.perf_counter() - started}


def run_load_benchmark(data: str, *, model_uri: str | None = None, slow_cells: int = 5_000,
                       slow_neighbors: int | None = None, refused_cells: int = 10_000, refused_neighbors: int = 1000,
                       request_cells: int = 500,
                       requests_per_client: int = 4, workers=(1, 2), epochs: int = 2, n_genes: int = 2000,
                       seed: int = 0, on_step=None) -> dict:
    """Serve one model with the documented settings and measure it under slow requests; one entry per worker count.

    Parameters
    ----------
    data
        Counts file or ``"simulated"``; the slow requests' cells are drawn from it
        (:func:`cells_at_size`), and without ``model_uri`` a model is trained on it.
    slow_cells, slow_neighbors
        Cells and ``n_neighbors`` of each slow ``leiden`` request (``None``: the most the
        default budget allows, :data:`~contrastive_sc.serve.limits.DEFAULT_MAX_GRAPH_EDGES` // cells).
        5,000 cells of 2,000 genes are the largest JSON body the defaults accept (~30 MB).
    refused_cells, refused_neighbors
        One more ``leiden`` request, issue 24's (10,000 cells, 1,000 neighbours), sent alone
        first: over the budget, it must be refused at once.
    request_cells, requests_per_client
        The throughput test: :data:`CLIENTS` clients each sending ``requests_per_client``
        long-parquet ``trained`` requests of ``request_cells`` cells.
    workers
        Server worker counts, one server each.

    Returns
    -------
    ``{"settings": ..., "runs": [{"workers", "slow", "refused", "quick", "memory", "throughput"}]}``.
    """
    import mlflow

    from ..method.io import load
    from ..method.preprocess import PreprocessState

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    step = on_step or (lambda text: None)
    adata = load(data)
    slow_neighbors = slow_neighbors or max(2, DEFAULT_MAX_GRAPH_EDGES // slow_cells)
    runs = []
    with tempfile.TemporaryDirectory(prefix="contrastive-sc-load-") as tmp:
        tmp = Path(tmp)
        if model_uri is None:
            step("training a model")
            model_uri = _train_model(adata[: min(4000, adata.n_obs)].copy(), tmp, epochs=epochs,
                                     n_genes=min(n_genes, adata.n_vars), seed=seed)
        local_model = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp / "model"))
        state = PreprocessState.from_json(Path(local_model) / "artifacts" / "preprocess_state.json")
        present = set(map(str, adata.var_names))
        counts = adata[:, [g for g in state.genes if g in present]].to_df()
        counts = counts.round().astype(np.int64)
        counts.index = counts.index.astype(str)
        step("building the request bodies")
        many = cells_at_size(counts, slow_cells, seed=seed)
        slow_params = {"method": "leiden", "n_neighbors": slow_neighbors, "return_embedding": False}
        slow_body = _split_body(many, slow_params)
        refused_body = _split_body(cells_at_size(counts, refused_cells, seed=seed + 1),
                                   slow_params | {"n_neighbors": refused_neighbors})
        quick_body = _split_body(counts.iloc[:2], {"return_embedding": False})
        chunks = [counts.iloc[i:i + request_cells] for i in range(0, min(len(counts), 8 * request_cells), request_cells)]
        parquet = [request_body(chunk, "parquet-long") for chunk in chunks]
        for n_workers in workers:
            step(f"serving with {n_workers} worker(s)")
            log = tmp / f"server-{n_workers}.log"
            with Server(local_model, workers=n_workers, log_path=log, script=True) as server:
                time.sleep(5)  # the fork server's imports, started with the model
                _post(server.url, quick_body, "application/json")
                step(f"{SLOW_REQUESTS} slow requests and a quick stream, {n_workers} worker(s)")
                run = {"workers": n_workers} | _slow_phase(server.url, server.process.pid, slow_body, refused_body,
                                                           quick_body)
                step(f"throughput, {CLIENTS} clients, {n_workers} worker(s)")
                run["throughput"] = _throughput(server.url, parquet, "application/vnd.apache.parquet",
                                                requests_per_client)
                run["throughput"]["cells"] = sum(len(chunks[(c + r) % len(chunks)]) for c in range(CLIENTS)
                                                 for r in range(requests_per_client))
            runs.append(run)
    return {"settings": {"slow_cells": slow_cells, "slow_neighbors": slow_neighbors, "genes": counts.shape[1],
                         "slow_body_mb": len(slow_body) / 1e6, "refused_cells": refused_cells,
                         "refused_neighbors": refused_neighbors, "refused_body_mb": len(refused_body) / 1e6,
                         "request_cells": request_cells, "clients": CLIENTS, "requests_per_client": requests_per_client,
                         "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                         "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")},
            "runs": runs}


def _statuses(answers) -> str:
    codes = pd.Series([a[0] for a in answers]).value_counts().sort_index()
    return ", ".join(f"{count} x {code}" for code, count in codes.items())


def markdown(result: dict) -> str:
    """The measurements as markdown tables: quick requests, slow requests, memory, throughput."""
    s = result["settings"]
    lines = [f"slow requests: {SLOW_REQUESTS} x JSON `leiden`, {s['slow_cells']:,} cells x {s['genes']} genes "
             f"({s['slow_body_mb']:.0f} MB), n_neighbors={s['slow_neighbors']}; before them, alone, issue 24's: "
             f"{s['refused_cells']:,} cells ({s['refused_body_mb']:.0f} MB), n_neighbors={s['refused_neighbors']} "
             "(over the budget); quick requests: 2 cells, `trained`, JSON, every "
             f"{QUICK_INTERVAL:g} s while the slow ones run; load average {s['load']:.1f} on {s['cores']} core(s) "
             "at the end", "",
             "| workers | quick requests | statuses | p50 s | p95 s | max s | within 5 s |",
             "|---:|---:|---|---:|---:|---:|---|"]
    for run in result["runs"]:
        seconds = np.array([a[1] for a in run["quick"]])
        ok = all(a[0] == 200 and a[1] <= QUICK_TARGET_SECONDS for a in run["quick"])
        lines.append(f"| {run['workers']} | {len(seconds)} | {_statuses(run['quick'])} | {np.median(seconds):.2f} | "
                     f"{np.percentile(seconds, 95):.2f} | {seconds.max():.2f} | {'yes' if ok else 'no'} |")
    lines += ["", "| workers | slow request | status | seconds | answer |", "|---:|---|---:|---:|---|"]
    for run in result["runs"]:
        for index, (status, seconds, message) in enumerate(sorted(run["slow"], key=lambda a: a[1])):
            lines.append(f"| {run['workers']} | {index + 1} | {status} | {seconds:.1f} | {message[:90]} |")
        status, seconds, message = run["refused"]
        lines.append(f"| {run['workers']} | issue 24's, alone | {status} | {seconds:.1f} | {message[:90]} |")
    lines += ["", "| workers | server RSS before MB | peak MB | after MB | uvicorn processes before | peak | after |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        m = run["memory"]
        lines.append(f"| {run['workers']} | {m['before']['total']:,.0f} | {m['peak']['total']:,.0f} | "
                     f"{m['after']['total']:,.0f} | {m['before']['workers']:,.0f} | {m['peak']['workers']:,.0f} | "
                     f"{m['after']['workers']:,.0f} |")
    lines += ["", f"| workers | clients | requests ({s['request_cells']} cells, long parquet) | statuses | cells/s | "
              "requests/s | p50 ms | p95 ms |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for run in result["runs"]:
        t = run["throughput"]
        seconds = np.array([a[1] for a in t["answers"]])
        lines.append(f"| {run['workers']} | {s['clients']} | {len(seconds)} | {_statuses(t['answers'])} | "
                     f"{t['cells'] / t['seconds']:,.0f} | {len(seconds) / t['seconds']:.1f} | "
                     f"{1000 * np.median(seconds):.0f} | {1000 * np.percentile(seconds, 95):.0f} |")
    return "\n".join(lines)
