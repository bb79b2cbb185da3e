"""ONNX export of a trained encoder and onnxruntime inference on the CPU or CUDA.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` are alternative installs of the same import
package; the provider actually used is read back from the session, never assumed.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from ..method.rows import as_rows, collect

log = logging.getLogger(__name__)

INPUT_NAME = "x"
#: Metadata key of the exported graph naming the model it belongs to.
MODEL_ID_KEY = "model_id"
OUTPUT_NAME = "z"
PARITY_ATOL = 1e-5
_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
#: onnxruntime intra-op threads per process; default: the usable cores divided by the serving workers.
THREADS_ENV = "CONTRASTIVE_SC_ONNX_THREADS"
#: Number of server worker processes sharing the machine (``serving/serve.sh`` sets it from ``-w``).
WORKERS_ENV = "CONTRASTIVE_SC_WORKERS"


def export_onnx(encoder, path: str | Path, *, check: np.ndarray | None = None, model_id: str | None = None) -> Path:
    """Export an encoder in eval mode to a single ONNX file with a dynamic batch axis.

    Parameters
    ----------
    encoder
        A trained :class:`~contrastive_sc.method.encoder.ContrastiveEncoder`.
    path
        Output ``.onnx`` file.
    check
        Optional preprocessed input rows: the export is rejected unless onnxruntime reproduces
        torch on them within :data:`PARITY_ATOL` (random rows are always checked).
    model_id
        Written into the graph's metadata (``model_id``), read back as :attr:`OnnxEncoder.model_id`.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = encoder.eval()  # a train-mode export would keep the input masking
    example = (torch.randn(8, encoder.n_inputs),)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    try:
        # The TorchScript exporter takes 0.4 s here against 10 s for the dynamo one, and the
        # graph (Gemm, BatchNormalization, Relu, L2 normalisation) is the same.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, example, str(path), dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **names)
    except Exception as error:  # the legacy exporter is deprecated: fall back to dynamo
        log.info("TorchScript ONNX export failed (%s); using the dynamo exporter", error)
        torch.onnx.export(encoder, example, str(path), dynamic_shapes=({0: torch.export.Dim("batch")},),
                          dynamo=True, external_data=False, **names)
    rows = np.random.default_rng(0).normal(size=(64, encoder.n_inputs)).astype(np.float32)
    if check is not None:
        rows = np.concatenate([rows, np.asarray(check[:1024], dtype=np.float32)])
    if model_id is not None:
        import onnx

        graph = onnx.load(str(path))
        graph.metadata_props.add(key=MODEL_ID_KEY, value=model_id)
        onnx.save(graph, str(path))
    diff = parity(encoder, path, rows)
    if diff > PARITY_ATOL:
        msg = f"ONNX export differs from torch by {diff:.2e} (> {PARITY_ATOL:g}); not using {path}"
        raise RuntimeError(msg)
    return path


def parity(encoder, path: str | Path, rows: np.ndarray) -> float:
    """Largest absolute difference between torch and onnxruntime outputs on ``rows``."""
    import torch

    with torch.no_grad():
        expected = encoder.eval()(torch.as_tensor(rows)).numpy()
    got = OnnxEncoder(path, provider="cpu")(rows)
    return float(np.abs(expected - got).max())


def _positive_int_env(name: str, default: int) -> int:
    import os

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        msg = f"{name} must be a positive integer, got {raw!r}"
        raise ValueError(msg)
    return int(raw)


def intra_op_threads() -> int:
    """Threads of one onnxruntime session: ``CONTRASTIVE_SC_ONNX_THREADS``, else cores // workers.

    Each server worker is a process with its own session; left at onnxruntime's default (all
    cores each), ``-w 4`` on 4 cores would run 16 busy threads fighting for 4 cores.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = _positive_int_env(WORKERS_ENV, 1)
    return _positive_int_env(THREADS_ENV, max(1, cores // workers))


def session_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # quiet: the CUDA-missing warnings are handled below
    options.intra_op_num_threads = intra_op_threads()
    options.inter_op_num_threads = 1  # the encoder is one chain of layers: nothing runs in parallel
    return options


class OnnxEncoder:
    """An onnxruntime session over an exported encoder.

    Parameters
    ----------
    path
        The ``.onnx`` file.
    provider
        ``"auto"`` (CUDA when the installed onnxruntime and the machine offer it, else CPU),
        ``"cpu"`` or ``"cuda"`` (an error if CUDA cannot actually be used).

    Attributes
    ----------
    providers
        The providers the session really uses (``session.get_providers()``).
    """

    def __init__(self, path: str | Path, provider: str = "auto") -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:  # pragma: no cover - depends on the install
            msg = ("onnxruntime is not installed; install the CPU build with `pip install contrastive-sc[cpu]` "
                   "or the CUDA build with `pip install contrastive-sc[gpu]` (not both)")
            raise ImportError(msg) from error
        if provider not in ("auto", "cpu", "cuda"):
            msg = f"provider must be 'auto', 'cpu' or 'cuda', got {provider!r}"
            raise ValueError(msg)
        wanted = provider
        if provider == "auto":
            wanted = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        self.session = ort.InferenceSession(str(path), sess_options=session_options(), providers=_PROVIDERS[wanted])
        # onnxruntime-gpu lists CUDA as available even without a usable GPU and silently falls
        # back to the CPU: what the session reports is the only truth.
        self.providers = list(self.session.get_providers())
        if provider == "cuda" and "CUDAExecutionProvider" not in self.providers:
            msg = f"CUDA was requested but onnxruntime runs on {self.providers}; install onnxruntime-gpu on a CUDA machine"
            raise RuntimeError(msg)
        self.n_inputs = _fixed_width(self.session.get_inputs()[0], path)
        #: The model the graph was exported for (``None`` for a graph exported without one).
        self.model_id = self.session.get_modelmeta().custom_metadata_map.get(MODEL_ID_KEY)
        output = self.session.get_outputs()[0]
        self.n_outputs = (output.shape[1] if len(output.shape) == 2 and isinstance(output.shape[1], int)
                          else int(self(np.zeros((1, self.n_inputs), dtype=np.float32)).shape[1]))
        log.info("onnxruntime providers in use: %s", self.providers)

    @property
    def threads(self) -> int:
        """The intra-op threads the session was created with."""
        return int(self.session.get_session_options().intra_op_num_threads)

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def __call__(self, x, batch_size: int = 65536) -> np.ndarray:
        """Embed preprocessed rows ``(cells, n_inputs)`` -> ``(cells, dims)`` float32.

        ``x`` is an array or :class:`~contrastive_sc.method.rows.Rows` (rows on disk, say): only one
        batch is in memory at a time.
        """
        rows = as_rows(x)
        if rows.shape[1] != self.n_inputs:
            msg = f"expected input of shape (cells, {self.n_inputs}), got {tuple(rows.shape)}"
            raise ValueError(msg)

        def run(block: np.ndarray) -> np.ndarray:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(block, dtype=np.float32)})[0]

        return collect(run, rows, self.n_outputs or 0, size=batch_size)


def _fixed_width(arg, path) -> int:
    if len(arg.shape) != 2 or not isinstance(arg.shape[1], int):
        msg = f"{Path(path).name}: expected a (batch, features) input with a fixed width, got shape {arg.shape}"
        raise ValueError(msg)
    return int(arg.shape[1])
