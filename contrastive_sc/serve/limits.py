"""What one served request may cost: the settings, read from the environment, and the budget arithmetic.

A served request is refused (HTTP 400, naming the budget and what would fit) when it could not
finish within the server's time limit; one that fits but clusters more than a little runs in a
killable process (:mod:`contrastive_sc.serve.isolation`), a few at a time per worker. The
defaults were measured on a two-core machine (``docs/serving.md``, Serving under load):

- ``leiden`` on 10,000 cells took 1.6 s at 15 neighbours and 6.5 s at 200, ``auto`` 2.9 s and
  9.7 s: about 3 s (``auto`` 4 s) per million cells x neighbours above a second or two of set-up.
  :data:`DEFAULT_MAX_GRAPH_EDGES` (2 million) keeps the largest ``auto`` under ~10 s alone and
  ~20 s with a second one sharing the cores: a third of :data:`DEFAULT_CLUSTER_TIMEOUT`.
- ``kmeans`` (10 restarts) on 10,000 cells took 1.6 s at 10 clusters and 12.6 s at 100:
  about 13 s per million cells x clusters, hence :data:`DEFAULT_MAX_KMEANS_WORK` (1 million).
- clustering under :data:`DEFAULT_INLINE_WORK` (2,000 cells x 50 neighbours) takes well under a
  second and runs in the request's own thread, without a process to start.
- MLflow parses JSON at about 0.6 us per byte, holding the GIL (60 MB in 37 s, loaded): bodies
  over :data:`DEFAULT_INLINE_BODY_BYTES` are parsed in the killable process too, and bodies over
  :data:`DEFAULT_MAX_BODY_BYTES` are refused before parsing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

#: Environment variable capping the cells of one served request (see :data:`DEFAULT_MAX_CELLS`).
MAX_CELLS_ENV = "CONTRASTIVE_SC_MAX_CELLS"
#: A 2,000-cell x 2,000-gene JSON body is ~20 MB, so 10,000 cells are ~100 MB parsed in one
#: request: larger datasets belong in the batch ``embed`` entry point, not in one REST call.
DEFAULT_MAX_CELLS = 10_000
#: Cells x genes of one request's table (the genes it names, the model's or not).
MAX_INPUT_VALUES_ENV = "CONTRASTIVE_SC_MAX_INPUT_VALUES"
#: 10,000 cells x 2,000 genes: the largest request of the documented shape (the model's genes).
DEFAULT_MAX_INPUT_VALUES = 20_000_000
#: Cells x ``n_neighbors`` of one ``leiden`` or ``auto`` request (the size of its kNN graph).
MAX_GRAPH_EDGES_ENV = "CONTRASTIVE_SC_MAX_GRAPH_EDGES"
DEFAULT_MAX_GRAPH_EDGES = 2_000_000
#: Cells x ``n_clusters`` of one ``kmeans`` request.
MAX_KMEANS_WORK_ENV = "CONTRASTIVE_SC_MAX_KMEANS_WORK"
DEFAULT_MAX_KMEANS_WORK = 1_000_000
#: Clustering work (cells x neighbours or clusters) up to which a request clusters in its own thread.
INLINE_WORK_ENV = "CONTRASTIVE_SC_INLINE_WORK"
DEFAULT_INLINE_WORK = 100_000
#: JSON bodies longer than this many bytes are answered whole in a separate process (parsing included).
INLINE_BODY_BYTES_ENV = "CONTRASTIVE_SC_INLINE_BODY_BYTES"
#: MLflow parses JSON at ~0.6 us per byte holding the GIL (measured: 60 MB, 37 s, loaded 2-core machine;
#: about 4x faster idle). 4 MB keeps the 500-cell chunks serving/client.py sends as JSON (3 MB wide,
#: 3.9 MB long for PBMC's 2,000 genes) in the worker, as before, and another request's wait under a
#: second idle; a process costs a large request ~0.5 s more (fork, loading the model).
DEFAULT_INLINE_BODY_BYTES = 4_000_000
#: Longest body accepted, refused before it is parsed.
MAX_BODY_BYTES_ENV = "CONTRASTIVE_SC_MAX_BODY_BYTES"
#: 10,000 cells x 2,000 genes of counts as JSON is 60 MB and took MLflow 37 s to parse on a loaded
#: two-core machine (0.6 us per byte), too long to be clustered within :data:`DEFAULT_CLUSTER_TIMEOUT`:
#: 32 MB (5,000 such cells) parses in about 20 s there. The same cells as long parquet are ~5 MB.
DEFAULT_MAX_BODY_BYTES = 32_000_000
#: Requests clustering in a separate process at once, per server worker; more are answered 503.
HEAVY_SLOTS_ENV = "CONTRASTIVE_SC_HEAVY_SLOTS"
#: One: on two cores, two slow requests of the largest admitted size at once (8 sent, load ~7) were
#: both stopped at 60 s, where one alone took 16 s (docs/serving.md, Serving under load).
DEFAULT_HEAVY_SLOTS = 1
#: Seconds a request that clusters in a separate process may take, counted from when its body was read.
CLUSTER_TIMEOUT_ENV = "CONTRASTIVE_SC_CLUSTER_TIMEOUT"
DEFAULT_CLUSTER_TIMEOUT = 60.0
#: The scoring server's own limit (``mlflow models serve -t``), which it passes to its workers.
SERVER_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
#: Seconds kept between the model's limit and the server's: time to answer before MLflow's bare 504.
SERVER_TIMEOUT_MARGIN = 5.0

#: Clustering methods whose cost is a kNN graph (cells x neighbours).
GRAPH_METHODS = ("leiden", "auto")


class OverBudget(ValueError):
    """A request that could not finish within the server's time limit (answered 400)."""


class RequestTooLarge(OverBudget):
    """A request with more cells than the served model accepts in one call."""


def _env_number(name: str, default, kind=int, *, low=1):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low:
        if kind is int:
            what = "a positive integer" if low == 1 else f"a whole number >= {low}"
        else:
            what = f"a number of seconds >= {low:g}"
        msg = f"{name} must be {what}, got {raw!r}"
        raise ValueError(msg)
    return value


@dataclass(frozen=True)
class ServingLimits:
    """What one request may cost, per server worker. :meth:`from_env` reads the settings.

    Attributes
    ----------
    max_cells
        Cells of one request (``CONTRASTIVE_SC_MAX_CELLS``).
    max_input_values
        Cells x genes of one request's table (``CONTRASTIVE_SC_MAX_INPUT_VALUES``).
    max_graph_edges
        Cells x ``n_neighbors`` of a ``leiden`` or ``auto`` request (``CONTRASTIVE_SC_MAX_GRAPH_EDGES``).
    max_kmeans_work
        Cells x ``n_clusters`` of a ``kmeans`` request (``CONTRASTIVE_SC_MAX_KMEANS_WORK``).
    inline_work
        Clustering work up to which a request clusters in its own thread (``CONTRASTIVE_SC_INLINE_WORK``);
        above it the clustering runs in a process killed at ``cluster_timeout``.
    inline_body_bytes
        JSON bodies longer than this are answered whole (parsed, embedded, clustered) in a
        killable process too (``CONTRASTIVE_SC_INLINE_BODY_BYTES``).
    max_body_bytes
        Longest body accepted; a longer one is refused before it is parsed (``CONTRASTIVE_SC_MAX_BODY_BYTES``).
    heavy_slots
        Such processes at once per worker (``CONTRASTIVE_SC_HEAVY_SLOTS``); beyond them a request
        is answered 503 at once.
    cluster_timeout
        Seconds such a request may take from when its body was read (``CONTRASTIVE_SC_CLUSTER_TIMEOUT``).
    """

    max_cells: int = DEFAULT_MAX_CELLS
    max_input_values: int = DEFAULT_MAX_INPUT_VALUES
    max_graph_edges: int = DEFAULT_MAX_GRAPH_EDGES
    max_kmeans_work: int = DEFAULT_MAX_KMEANS_WORK
    inline_work: int = DEFAULT_INLINE_WORK
    inline_body_bytes: int = DEFAULT_INLINE_BODY_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    heavy_slots: int = DEFAULT_HEAVY_SLOTS
    cluster_timeout: float = DEFAULT_CLUSTER_TIMEOUT

    @classmethod
    def from_env(cls) -> ServingLimits:
        """The settings from the environment; a bad value raises ``ValueError`` naming the variable.

        ``CONTRASTIVE_SC_CLUSTER_TIMEOUT`` must leave :data:`SERVER_TIMEOUT_MARGIN` seconds under
        the scoring server's own limit (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, which
        ``mlflow models serve -t`` sets), so that the model, not MLflow, answers a slow request;
        left unset, it is :data:`DEFAULT_CLUSTER_TIMEOUT` or half the server's limit if that is less.
        """
        server = _env_number(SERVER_TIMEOUT_ENV, None, float, low=0)
        default_timeout = DEFAULT_CLUSTER_TIMEOUT if server is None else min(DEFAULT_CLUSTER_TIMEOUT, server / 2)
        timeout = _env_number(CLUSTER_TIMEOUT_ENV, default_timeout, float, low=0.1)
        if server is not None and timeout > server - SERVER_TIMEOUT_MARGIN:
            msg = (f"{CLUSTER_TIMEOUT_ENV}={timeout:g} s must be at least {SERVER_TIMEOUT_MARGIN:g} s under the "
                   f"scoring server's limit {SERVER_TIMEOUT_ENV}={server:g} s, so that a slow request is answered by "
                   f"the model; set {CLUSTER_TIMEOUT_ENV} <= {max(server - SERVER_TIMEOUT_MARGIN, 0):g} or raise "
                   "the server's -t")
            raise ValueError(msg)
        return cls(max_cells=_env_number(MAX_CELLS_ENV, DEFAULT_MAX_CELLS),
                   max_input_values=_env_number(MAX_INPUT_VALUES_ENV, DEFAULT_MAX_INPUT_VALUES),
                   max_graph_edges=_env_number(MAX_GRAPH_EDGES_ENV, DEFAULT_MAX_GRAPH_EDGES),
                   max_kmeans_work=_env_number(MAX_KMEANS_WORK_ENV, DEFAULT_MAX_KMEANS_WORK),
                   inline_work=_env_number(INLINE_WORK_ENV, DEFAULT_INLINE_WORK, low=0),
                   inline_body_bytes=_env_number(INLINE_BODY_BYTES_ENV, DEFAULT_INLINE_BODY_BYTES, low=0),
                   max_body_bytes=_env_number(MAX_BODY_BYTES_ENV, DEFAULT_MAX_BODY_BYTES),
                   heavy_slots=_env_number(HEAVY_SLOTS_ENV, DEFAULT_HEAVY_SLOTS),
                   cluster_timeout=float(timeout))

    def check_body(self, n_bytes: int) -> None:
        """Refuse a body longer than :attr:`max_body_bytes`, before it is parsed."""
        if n_bytes > self.max_body_bytes:
            msg = (f"the request body is {n_bytes:,} bytes, over this server's limit of {self.max_body_bytes:,} "
                   f"({MAX_BODY_BYTES_ENV}); send fewer cells per request, only the model's genes, or the long parquet "
                   "form (columns cell, gene, count), ~10x smaller than JSON")
            raise OverBudget(msg)

    def check_input(self, n_cells: int, n_genes: int) -> None:
        """Refuse a table of more cells, or more cells x genes, than one request may hold."""
        if n_cells > self.max_cells:
            msg = (f"the request holds {n_cells} cells, over this server's limit of {self.max_cells} per request "
                   f"({MAX_CELLS_ENV}); send 'trained' requests in chunks, or cluster a large dataset with the batch "
                   "entry point: `python -m contrastive_sc embed --model-uri MODEL_URI --data FILE --out OUT.h5ad` "
                   "(or `mlflow run . -e embed`)")
            raise RequestTooLarge(msg)
        if n_cells * n_genes > self.max_input_values:
            fits = max(1, self.max_input_values // max(n_genes, 1))
            msg = (f"the request holds {n_cells} cells x {n_genes} genes = {n_cells * n_genes:,} values, over this "
                   f"server's budget of {self.max_input_values:,} ({MAX_INPUT_VALUES_ENV}); send only the model's "
                   f"genes (serving/client.py does), or at most {fits:,} cells of {n_genes} genes per request")
            raise OverBudget(msg)

    def clustering_work(self, method: str, n_cells: int, *, n_neighbors: int = 0, n_clusters: int = 0) -> int:
        """Cells x neighbours (``leiden``, ``auto``) or cells x clusters (``kmeans``); 0 for ``trained``."""
        if method in GRAPH_METHODS:
            return n_cells * n_neighbors
        if method == "kmeans":
            return n_cells * n_clusters
        return 0

    def check_clustering(self, method: str, n_cells: int, *, n_neighbors: int = 0, n_clusters: int = 0) -> int:
        """The request's clustering work, or :class:`OverBudget` saying what would fit."""
        work = self.clustering_work(method, n_cells, n_neighbors=n_neighbors, n_clusters=n_clusters)
        if method in GRAPH_METHODS and work > self.max_graph_edges:
            budget, env = self.max_graph_edges, MAX_GRAPH_EDGES_ENV
            msg = (f"method {method!r} on {n_cells} cells with n_neighbors={n_neighbors} builds a graph of "
                   f"{work:,} cells x neighbours, over this server's budget of {budget:,} ({env}), which keeps a request "
                   f"within its {self.cluster_timeout:g} s limit; send n_neighbors <= {max(budget // n_cells, 0)} "
                   f"for {n_cells} cells, or at most {budget // n_neighbors:,} cells with n_neighbors={n_neighbors}, "
                   "or cluster a large dataset with the batch entry point `python -m contrastive_sc embed`")
            raise OverBudget(msg)
        if method == "kmeans" and work > self.max_kmeans_work:
            budget, env = self.max_kmeans_work, MAX_KMEANS_WORK_ENV
            msg = (f"method 'kmeans' on {n_cells} cells with n_clusters={n_clusters} is {work:,} cells x clusters, "
                   f"over this server's budget of {budget:,} ({env}), which keeps a request within its "
                   f"{self.cluster_timeout:g} s limit; send n_clusters <= {max(budget // n_cells, 0)} for {n_cells} "
                   f"cells, or at most {budget // n_clusters:,} cells with n_clusters={n_clusters}")
            raise OverBudget(msg)
        return work

    def runs_inline(self, work: int) -> bool:
        """Whether clustering this much work runs in the request's thread rather than a killable process."""
        return work <= self.inline_work
