"""Serving speed, measured side by side in one run: the bare ONNX encoder, in-process predict, HTTP.

:func:`run_speed_benchmark` trains a small model (or takes one by URI), starts a real
``mlflow models serve`` on 127.0.0.1 that it stops again, and times the same cells through each
path. The machine may be shared, so the numbers that matter are the ratios between paths timed in
the same run (:data:`IN_PROCESS_TARGET`, :data:`HTTP_TARGET`, :data:`CONCURRENCY_TARGET`), not
the absolute cells/s. Leiden is timed there too, as it runs now (igraph) and as it ran before
(leidenalg), on the model's embedding extended to :data:`LEIDEN_CELLS` (:func:`time_leiden`).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

#: The in-process target: predict on all cells at least this share of the bare encoder's cells/s.
IN_PROCESS_TARGET = 0.30
#: The HTTP target: 1-client requests at least this share of in-process calls of the same size.
HTTP_TARGET = 0.25
#: The concurrency target: p95 latency of the concurrent clients under this multiple of one request's.
CONCURRENCY_TARGET = 2.0
#: The Leiden target: igraph's ``community_leiden`` in at most this share of leidenalg's seconds (issue 16).
LEIDEN_TARGET = 1 / 3
#: Cells of the Leiden rows: the model's embedding of the timed cells, extended to these sizes.
LEIDEN_CELLS = (10_000, 100_000)
#: Seconds after which a Leiden implementation is not timed again (the best of the runs is kept).
LEIDEN_REPEAT_SECONDS = 30.0
#: Request formats timed: wide (one column per gene) and long (``cell, gene, count`` rows of non-zero counts).
FORMATS = ("json", "csv", "parquet", "json-long", "csv-long", "parquet-long")
#: Content types of the request bodies MLflow's scoring server reads (CSV and parquet carry no params).
CONTENT_TYPES = {"json": "application/json", "csv": "text/csv", "parquet": "application/vnd.apache.parquet"}
#: Seconds a started server has to answer ``/ping`` before the benchmark gives up.
SERVER_START_TIMEOUT = 180
#: Seconds one request may take before the benchmark gives up on it.
REQUEST_TIMEOUT = 300
#: The documented way to serve a model (its defaults are the documented serving settings).
SERVE_SCRIPT = Path(__file__).resolve().parents[2] / "serving" / "serve.sh"


def long_form(frame: pd.DataFrame) -> pd.DataFrame:
    """Cells x genes counts as ``cell, gene, count`` rows, one per non-zero count, cells in order.

    Every cell and every gene gets at least one row (of count 0 if need be): a gene named in no
    row would be read as missing rather than zero, and a cell without rows would not be sent.
    Cell names must be unique (the server groups rows by name).
    """
    import scipy.sparse as sp

    if not frame.index.astype(str).is_unique:
        msg = "the long form needs unique cell names; rename the rows (e.g. frame.reset_index(drop=True))"
        raise ValueError(msg)
    if not frame.columns.astype(str).is_unique:
        msg = "the long form needs unique gene names; each gene must be one column"
        raise ValueError(msg)
    matrix = sp.coo_matrix(frame.to_numpy())
    rows, cols, values = matrix.row, matrix.col, matrix.data
    empty_cells = np.setdiff1d(np.arange(frame.shape[0]), rows)
    empty_genes = np.setdiff1d(np.arange(frame.shape[1]), cols)
    if len(empty_cells) or len(empty_genes):
        rows = np.concatenate([rows, empty_cells, np.zeros(len(empty_genes), dtype=rows.dtype)])
        cols = np.concatenate([cols, np.zeros(len(empty_cells), dtype=cols.dtype), empty_genes])
        values = np.concatenate([values, np.zeros(len(empty_cells) + len(empty_genes), dtype=values.dtype)])
        # A cell that is empty and the first cell may now hold (0, 0) twice: keep one.
        keep = ~pd.DataFrame({"r": rows, "c": cols}).duplicated().to_numpy()
        rows, cols, values = rows[keep], cols[keep], values[keep]
    order = np.lexsort((cols, rows))
    # Names as categoricals: parquet stores them dictionary-encoded and the server reads integer
    # codes instead of ~100,000 strings a request (the same values in CSV and JSON).
    cells = pd.Categorical.from_codes(rows[order], categories=frame.index.astype(str))
    genes = pd.Categorical.from_codes(cols[order], categories=frame.columns.astype(str))
    return pd.DataFrame({"cell": cells, "gene": genes, "count": values[order]})


def request_body(frame: pd.DataFrame, fmt: str, params: dict | None = None) -> bytes:
    """Serialise cells x genes counts as a scoring-server request body.

    ``fmt`` is ``json``, ``csv`` or ``parquet``, with ``-long`` for the long form
    (:func:`long_form`). ``params`` travel in JSON only; CSV and parquet get the model's defaults.
    """
    base = fmt.removesuffix("-long")
    if base not in CONTENT_TYPES:
        msg = f"unknown request format {fmt!r}; expected one of {list(FORMATS)}"
        raise ValueError(msg)
    if fmt.endswith("-long"):
        frame = long_form(frame)
    if base == "json":
        body = {"dataframe_split": {"index": [str(i) for i in frame.index], "columns": [str(c) for c in frame.columns],
                                    "data": frame.to_numpy().tolist()}}
        if params:
            body["params"] = params
        return json.dumps(body).encode()
    if params:
        msg = f"{base} requests cannot carry params (got {sorted(params)}); send JSON for non-default params"
        raise ValueError(msg)
    if base == "csv":
        return frame.to_csv(index=False).encode()
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def post(url: str, body: bytes, fmt: str, timeout: float = REQUEST_TIMEOUT) -> dict:
    """POST one body to ``<url>/invocations``; raise with the server's message on an error status."""
    content_type = CONTENT_TYPES[fmt.split(",")[0].removesuffix("-long")]
    request = urllib.request.Request(f"{url.rstrip('/')}/invocations", data=body,
                                     headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        msg = f"server answered {error.code}: {detail}"
        raise RuntimeError(msg) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``mlflow models serve`` of a local model folder on 127.0.0.1, stopped on exit (a context manager).

    Parameters
    ----------
    model_path
        A local MLflow model folder.
    workers, threads
        ``-w`` worker processes and onnxruntime threads per worker (``None``: cores // workers).
    log_path
        File receiving the server's output.
    script
        Start it with ``serving/serve.sh`` and its documented defaults (the serving settings of
        this environment are left out, ``settings`` put in) instead of a bare ``mlflow models serve``.
    settings
        Environment variables of the server (``CONTRASTIVE_SC_...``).
    """

    def __init__(self, model_path: str | Path, *, workers: int = 1, threads: int | None = None,
                 log_path: str | Path, port: int | None = None, script: bool = False,
                 settings: dict | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = str(Path(sys.executable).parent)
        env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("CONTRASTIVE_SC_ONNX_THREADS", None)
        if script:
            for name in [n for n in env if n.startswith("CONTRASTIVE_SC_") and n != "CONTRASTIVE_SC_ONNX_PROVIDER"]:
                env.pop(name)
            env.pop("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", None)
        env["CONTRASTIVE_SC_WORKERS"] = str(workers)
        if threads is not None:
            env["CONTRASTIVE_SC_ONNX_THREADS"] = str(threads)
        env |= {k: str(v) for k, v in (settings or {}).items()}
        if script:
            self.command = ["bash", str(SERVE_SCRIPT), str(model_path), str(self.port)]
        else:
            mlflow_bin = shutil.which("mlflow", path=env["PATH"]) or "mlflow"
            self.command = [mlflow_bin, "models", "serve", "-m", str(model_path), "--env-manager", "local",
                            "-h", "127.0.0.1", "-p", str(self.port), "-w", str(workers), "-t", str(REQUEST_TIMEOUT)]
        self.env, self.log_path, self.process = env, Path(log_path), None

    def __enter__(self) -> Server:
        self._log = self.log_path.open("w")
        # Its own process group: stopping it also stops the uvicorn workers it forks.
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.__exit__(None, None, None)
                tail = self.log_path.read_text()[-800:]
                msg = f"the model server exited with code {self.process.returncode} before answering: {tail}"
                raise RuntimeError(msg)
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        msg = f"the model server did not answer /ping within {SERVER_START_TIMEOUT} s (log: {self.log_path})"
        raise RuntimeError(msg)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.process is not None:
            self._wait_until_port_closed()
        self._log.close()

    def _wait_until_port_closed(self, timeout: float = 15.0) -> None:
        # The group leader (the mlflow CLI) can exit before its uvicorn child has let go of the
        # port: wait for the port to refuse connections, and kill what is left of the group if not.
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                return
            time.sleep(0.2)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _best_seconds(func, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return min(times)


def _chunks(frame: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [frame.iloc[start:start + size] for start in range(0, len(frame), size)]


def _train_model(adata, folder: Path, *, epochs: int, n_genes: int, seed: int) -> str:
    from ..method.config import get_preset
    from ..mlops import tracking

    tracking.setup(f"sqlite:///{folder / 'mlflow.db'}", "speed-benchmark")
    config = get_preset("paper").replace(epochs=epochs, n_genes=n_genes, seed=seed)
    return tracking.train_run(adata, config, methods=(), map_plot=False)["model_uri"]


def _time_in_process(local_model: str, counts: pd.DataFrame, chunks: list[pd.DataFrame], repeats: int) -> list[dict]:
    """The bare encoder on the preprocessed cells, then the loaded pyfunc on all cells and on chunks."""
    import mlflow

    from ..method.preprocess import transform

    pyfunc = mlflow.pyfunc.load_model(local_model)
    inner = pyfunc.unwrap_python_model().model  # the EmbedThenCluster the server runs
    n = len(counts)
    x = transform(counts.to_numpy(), counts.columns, inner.state)
    inner.encoder(x[: len(chunks[0])])  # warm-up
    rows = [{"path": "onnxruntime encoder", "cells": n, "requests": 1,
             "seconds": _best_seconds(lambda: inner.encoder(x), repeats)}]
    params = {"method": "trained"}
    pyfunc.predict(chunks[0], params=params)
    rows.append({"path": "in-process predict", "cells": n, "requests": 1,
                 "seconds": _best_seconds(lambda: pyfunc.predict(counts, params=params), repeats)})
    rows.append({"path": "in-process predict, 500-cell calls", "cells": n, "requests": len(chunks),
                 "seconds": _best_seconds(lambda: [pyfunc.predict(c, params=params) for c in chunks], repeats)})
    return rows


def embedding_at_size(embedding: np.ndarray, n_cells: int, *, n_neighbors: int = 10, seed: int = 0) -> np.ndarray:
    """``n_cells`` rows in the space of ``embedding``: its own rows, then points drawn uniformly on
    the segment between a random row and one of that row's ``n_neighbors`` nearest rows.

    Stands in for the embedding of more cells of the same kinds (the speed benchmark embeds a
    few thousand): the new points lie where the real cells are, so the kNN graph and its
    communities look like a larger sample's rather than like noise.
    """
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(embedding, dtype=np.float32)
    if n_cells <= len(x):
        return x[:n_cells].copy()
    if len(x) < 2:
        msg = f"extending an embedding needs at least 2 rows, got {len(x)}"
        raise ValueError(msg)
    k = min(n_neighbors, len(x) - 1)
    neighbours = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)
    rng = np.random.default_rng(seed)
    extra = n_cells - len(x)
    source = rng.integers(len(x), size=extra)
    target = neighbours[source, rng.integers(k, size=extra)]
    along = rng.random(extra, dtype=np.float32)[:, None]
    return np.concatenate([x, x[source] + along * (x[target] - x[source])])


def leidenalg_labels(embedding: np.ndarray, *, resolution: float = 1.0, n_neighbors: int = 15,
                     seed: int = 0) -> np.ndarray:
    """Leiden as :func:`~contrastive_sc.analysis.cluster.cluster_labels` ran it before igraph's ``community_leiden``.

    leidenalg's ``RBConfigurationVertexPartition`` (modularity with a resolution) on the same kNN
    graph, until no cell moves up to :data:`~contrastive_sc.analysis.cluster.LEIDEN_CONVERGE_CELLS` cells and
    two iterations above: the benchmark's "before" and the tests' reference.
    """
    import leidenalg

    from ..analysis.cluster import LEIDEN_CONVERGE_CELLS, knn_graph

    embedding = np.asarray(embedding, dtype=np.float32)
    n_iterations = -1 if len(embedding) <= LEIDEN_CONVERGE_CELLS else 2
    partition = leidenalg.find_partition(knn_graph(embedding, n_neighbors), leidenalg.RBConfigurationVertexPartition,
                                         resolution_parameter=float(resolution), seed=int(seed),
                                         n_iterations=n_iterations)
    return np.asarray(partition.membership, dtype=np.int64)


def time_leiden(embedding: np.ndarray, sizes=LEIDEN_CELLS, *, resolution: float = 1.0, n_neighbors: int = 15,
                seed: int = 0, repeats: int = 3, on_row=None) -> list[dict]:
    """Leiden now (igraph) and before (leidenalg) on the same cells, alternately.

    ``embedding`` is extended to each size by :func:`embedding_at_size`. Each implementation is
    timed up to ``repeats`` times, but not again once it has taken :data:`LEIDEN_REPEAT_SECONDS`
    (so once at 100,000 cells). Each row's ``seconds`` are the best whole call (kNN graph
    included), ``graph_seconds`` the graph alone (built once more,
    beforehand, which also compiles pynndescent above 50,000 cells), ``clusters`` the communities
    found and ``leiden_ari`` the adjusted Rand index between the two labelings of that size.
    """
    rows = []
    for n_cells in sizes:
        x = embedding_at_size(embedding, int(n_cells), seed=seed)
        for row in _time_leiden_once(x, resolution=resolution, n_neighbors=n_neighbors, seed=seed, repeats=repeats):
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _time_leiden_once(x: np.ndarray, *, resolution: float, n_neighbors: int, seed: int, repeats: int) -> list[dict]:
    from sklearn.metrics import adjusted_rand_score

    from ..analysis.cluster import APPROXIMATE_NEIGHBORS_CELLS, cluster_labels, knn_graph

    knn_graph(x[:2048], n_neighbors)  # imports
    if len(x) > APPROXIMATE_NEIGHBORS_CELLS:  # pynndescent's numba compilation, 1-2 minutes in a new process
        from pynndescent import NNDescent

        NNDescent(x[:2048], n_neighbors=n_neighbors + 1, random_state=0, n_jobs=-1)
    graph_seconds = _best_seconds(lambda: knn_graph(x, n_neighbors), 1)
    options = {"resolution": resolution, "n_neighbors": n_neighbors, "seed": seed}
    implementations = {"igraph": lambda: cluster_labels(x, "leiden", **options),
                       "leidenalg": lambda: leidenalg_labels(x, **options)}
    labels, best, spent = {}, dict.fromkeys(implementations, np.inf), dict.fromkeys(implementations, 0.0)
    # Alternated, so that a change in the machine's load falls on both; a repeat (the best kept)
    # only while an implementation has taken under LEIDEN_REPEAT_SECONDS in all.
    for attempt in range(max(1, repeats)):
        for name, func in implementations.items():
            if attempt and spent[name] >= LEIDEN_REPEAT_SECONDS:
                continue
            started = time.perf_counter()
            labels[name] = func()
            seconds = time.perf_counter() - started
            best[name], spent[name] = min(best[name], seconds), spent[name] + seconds
    ari = float(adjusted_rand_score(labels["leidenalg"], labels["igraph"]))
    return [{"path": _leiden_path(name, len(x)), "cells": len(x), "requests": 1, "seconds": best[name],
             "graph_seconds": graph_seconds, "clusters": len(np.unique(labels[name])), "leiden_ari": ari}
            for name in implementations]


def _leiden_path(implementation: str, n_cells: int) -> str:
    return f"Leiden {implementation}, {n_cells:,} cells"


def _embedding(local_model: str, counts: pd.DataFrame) -> np.ndarray:
    """The served model's embedding of ``counts`` (what its ``leiden`` method would cluster)."""
    import mlflow

    from ..method.preprocess import transform

    inner = mlflow.pyfunc.load_model(local_model).unwrap_python_model().model
    return inner.encoder(transform(counts.to_numpy(), counts.columns, inner.state))


def run_speed_benchmark(data: str, *, model_uri: str | None = None, n_cells: int = 4000, request_cells: int = 500,
                        clients: int = 8, requests_per_client: int = 4, workers: int = 1, threads: int | None = None,
                        epochs: int = 2, n_genes: int = 2000, repeats: int = 3, seed: int = 0,
                        formats=FORMATS, concurrent_format: str | None = None, leiden_cells=LEIDEN_CELLS,
                        on_row=None) -> pd.DataFrame:
    """Time one model's cells through every serving path; one row per path.

    Parameters
    ----------
    data
        Counts file (any format :func:`~contrastive_sc.method.io.load` reads) or ``"simulated"``.
    model_uri
        A logged embed-then-cluster model; ``None`` trains one on ``data`` (``epochs``,
        ``n_genes``) into a temporary MLflow store.
    n_cells
        Cells timed (the first ``n_cells`` of ``data``).
    request_cells
        Cells per HTTP request and per in-process ``500-cell`` call.
    clients, requests_per_client
        The concurrency test: ``clients`` threads each sending ``requests_per_client`` requests
        back to back.
    workers, threads
        Server worker processes and onnxruntime threads per worker (``None``: cores // workers).
    repeats
        Timings of the in-process paths and of each 1-client HTTP pass; the best is kept.
    concurrent_format
        Body format of the concurrency test; ``None``: the fastest 1-client format.
    leiden_cells
        Sizes of the Leiden rows (:func:`time_leiden`, after the server is stopped); empty: none.

    Returns
    -------
    Columns ``path, cells, requests, seconds, cells_per_s, p50_ms, p95_ms`` (the Leiden rows add
    ``graph_seconds, clusters, leiden_ari``) and, in ``attrs``,
    ``ratios`` (the target ratios, see :func:`ratios`), ``load`` and ``settings``.
    """
    import mlflow

    from ..method.io import load

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    started_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    adata = load(data)
    adata = adata[: min(n_cells, adata.n_obs)].copy()
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    with tempfile.TemporaryDirectory(prefix="contrastive-sc-speed-") as tmp:
        tmp = Path(tmp)
        if model_uri is None:
            model_uri = _train_model(adata, tmp, epochs=epochs, n_genes=min(n_genes, adata.n_vars), seed=seed)
        local_model = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp / "model"))
        from ..method.preprocess import PreprocessState

        state = PreprocessState.from_json(Path(local_model) / "artifacts" / "preprocess_state.json")
        genes = [g for g in state.genes if g in set(map(str, adata.var_names))]
        counts = adata[:, genes].to_df()
        if np.array_equal(counts.to_numpy(), np.round(counts.to_numpy())):
            counts = counts.astype(np.int64)  # counts sent as integers, as a client would
        counts.index = counts.index.astype(str)
        n = len(counts)
        chunks = _chunks(counts, request_cells)

        for row in _time_in_process(local_model, counts, chunks, repeats):
            add(row)

        params = {"method": "trained"}
        bodies = {fmt: [request_body(c, fmt, params if fmt == "json" else None) for c in chunks] for fmt in formats}
        if "json" in formats:
            # The same cells without the embedding in the answer: what the answer's size costs.
            bodies["json, no embedding"] = [request_body(c, "json", params | {"return_embedding": False})
                                            for c in chunks]
        latencies: dict[str, list[float]] = {}
        with Server(local_model, workers=workers, threads=threads, log_path=tmp / "server.log") as server:
            for fmt in bodies:
                post(server.url, bodies[fmt][0], fmt)  # warm-up, and a check that the format is answered
                best = None
                for _ in range(repeats):
                    times = []
                    for body in bodies[fmt]:
                        t0 = time.perf_counter()
                        post(server.url, body, fmt)
                        times.append(time.perf_counter() - t0)
                    if best is None or sum(times) < sum(best):
                        best = times
                latencies[fmt] = best
                add({"path": f"HTTP {fmt}", "cells": n, "requests": len(best), "seconds": sum(best),
                     "p50_ms": 1000 * float(np.median(best)), "p95_ms": 1000 * float(np.percentile(best, 95))})
            fmt = concurrent_format or min(formats, key=lambda f: sum(latencies[f]))
            jobs = [bodies[fmt][(c + r) % len(chunks)] for c in range(clients) for r in range(requests_per_client)]

            def client(index: int) -> list[float]:
                times = []
                for body in jobs[index * requests_per_client:(index + 1) * requests_per_client]:
                    t0 = time.perf_counter()
                    post(server.url, body, fmt)
                    times.append(time.perf_counter() - t0)
                return times

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                times = [t for part in pool.map(client, range(clients)) for t in part]
            wall = time.perf_counter() - t0
            sizes = [len(chunks[(c + r) % len(chunks)]) for c in range(clients) for r in range(requests_per_client)]
            add({"path": f"HTTP {fmt}, {clients} clients", "cells": int(sum(sizes)), "requests": len(times),
                 "seconds": wall, "p50_ms": 1000 * float(np.median(times)),
                 "p95_ms": 1000 * float(np.percentile(times, 95))})

        if leiden_cells:
            time_leiden(_embedding(local_model, counts), leiden_cells, seed=seed, repeats=repeats, on_row=add)

    table = pd.DataFrame(rows)
    table["cells_per_s"] = table["cells"] / table["seconds"]
    table.attrs["ratios"] = ratios(table, fmt, clients)
    table.attrs["load"] = started_load
    table.attrs["server"] = server.url
    table.attrs["settings"] = {"workers": workers, "threads": threads, "request_cells": request_cells,
                               "clients": clients, "cores": len(os.sched_getaffinity(0))
                               if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    return table


def ratios(table: pd.DataFrame, concurrent_format: str, clients: int) -> pd.DataFrame:
    """The target ratios of ``table``: in-process over encoder, each 1-client HTTP path over in-process
    500-cell calls (cells/s), the concurrent p95 latency over the single-request p50, and at each
    Leiden size igraph's seconds over leidenalg's (with the two labelings' ARI, which has no target)."""
    speed = dict(zip(table["path"], table["cells_per_s"]))
    out = []
    encoder, whole, chunked = "onnxruntime encoder", "in-process predict", "in-process predict, 500-cell calls"
    if encoder in speed and whole in speed:
        value = speed[whole] / speed[encoder]
        out.append({"ratio": "in-process predict / encoder", "value": value, "target": f">= {IN_PROCESS_TARGET:g}",
                    "met": value >= IN_PROCESS_TARGET})
    many = f"HTTP {concurrent_format}, {clients} clients"
    for path in table["path"]:
        if path.startswith("HTTP ") and path != many and chunked in speed:
            value = speed[path] / speed[chunked]
            out.append({"ratio": f"{path} / in-process 500", "value": value, "target": f">= {HTTP_TARGET:g}",
                        "met": value >= HTTP_TARGET})
    for row in table.to_dict("records"):
        if not str(row["path"]).startswith("Leiden igraph, "):
            continue
        before = table[table["path"] == _leiden_path("leidenalg", row["cells"])]
        if len(before):
            value = row["seconds"] / float(before["seconds"].iloc[0])
            out.append({"ratio": f"Leiden igraph / leidenalg seconds, {row['cells']:,} cells", "value": value,
                        "target": f"<= {LEIDEN_TARGET:.2f}", "met": value <= LEIDEN_TARGET})
        if not pd.isna(row.get("leiden_ari", np.nan)):  # agreement, reported without a target
            out.append({"ratio": f"Leiden ARI igraph vs leidenalg, {row['cells']:,} cells",
                        "value": row["leiden_ari"], "target": "", "met": None})
    by_path = table.set_index("path")
    single = f"HTTP {concurrent_format}"
    if single in by_path.index and many in by_path.index:
        value = by_path.loc[many, "p95_ms"] / by_path.loc[single, "p50_ms"]
        out.append({"ratio": f"{clients}-client p95 / single-request p50 latency", "value": value,
                    "target": f"< {CONCURRENCY_TARGET:g}", "met": value < CONCURRENCY_TARGET})
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame) -> str:
    """The timings and the ratios as two markdown tables."""
    records = table.to_dict("records")
    leiden = [row for row in records if str(row["path"]).startswith("Leiden ")]
    lines = ["| path | cells | requests | cells/s | p50 ms | p95 ms |", "|---|---:|---:|---:|---:|---:|"]
    for row in records:
        if str(row["path"]).startswith("Leiden "):
            continue
        p50, p95 = row.get("p50_ms"), row.get("p95_ms")
        lines.append(f"| {row['path']} | {row['cells']} | {row['requests']} | {row['cells_per_s']:,.0f} | "
                     f"{'' if p50 is None or pd.isna(p50) else f'{p50:.0f}'} | "
                     f"{'' if p95 is None or pd.isna(p95) else f'{p95:.0f}'} |")
    if leiden:
        lines += ["", "| Leiden | cells | seconds | kNN graph s | cells/s | clusters |", "|---|---:|---:|---:|---:|---:|"]
        for row in leiden:
            lines.append(f"| {row['path'].split(',')[0]} | {row['cells']:,} | {row['seconds']:.2f} | "
                         f"{row['graph_seconds']:.2f} | {row['cells_per_s']:,.0f} | {int(row['clusters'])} |")
    lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
    for row in table.attrs.get("ratios", pd.DataFrame()).to_dict("records"):
        met = "" if row["met"] is None or pd.isna(row["met"]) else "yes" if row["met"] else "no"
        lines.append(f"| {row['ratio']} | {row['value']:.3f} | {row['target']} | {met} |")
    settings = table.attrs.get("settings", {})
    lines += ["", f"load average at start {table.attrs.get('load', float('nan')):.2f} on {settings.get('cores')} "
              f"core(s); server workers {settings.get('workers')}, onnxruntime threads per worker "
              f"{settings.get('threads') or 'cores // workers'}"]
    return "\n".join(lines)
