"""The embed-then-cluster MLflow pyfunc, defined from code (nothing is pickled).

Logged by every training run with ``python_model=<this file>``, the package as
``code_paths`` and the artifacts written by ``contrastive_sc.serve.inference.package_model``.
It runs on onnxruntime and never imports torch.

What a caller sees from ``mlflow models serve``:

- a bad request (input, params, too many cells) answers 400 with a one-line message;
- an unknown param answers 400 naming the known ones (see :func:`refuse_unknown_params`);
- an unexpected failure answers 500 with a generic message; the traceback goes to the server log
  only, never to the caller (it would show the server's paths); the same holds for MLflow's own
  errors on a malformed CSV or parquet body (see :func:`hide_parser_tracebacks`);
- answers are written by C JSON encoders rather than MLflow's pure-Python one (see
  :func:`fast_json_responses`).
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

log = logging.getLogger("contrastive_sc.serving")
# MLflow's advice to model authors, printed when this class is defined: nothing a caller can act on.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)


class RequestError(MlflowException):
    """A bad request, answered 400 with the model's one-line message.

    MLflow's scoring server rewrites the message of an ``MlflowException`` raised by ``predict`` as
    ``Failed to predict data '<the whole request table>'. Error: ...``: multi-line, and echoing the
    caller's data back. The message of this exception is set once, when it is raised.
    """

    def __init__(self, message: str, error_code=INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = " ".join(str(value).split())
#: Set by `mlflow models serve` for the uvicorn process that loads the model
#: (``mlflow.pyfunc.scoring_server._SERVER_MODEL_PATH``).
_SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"
#: uvicorn's exit code for a worker that could not start (``uvicorn.config.STARTUP_FAILURE``).
_UVICORN_STARTUP_FAILURE = 3


def refuse_unknown_params() -> bool:
    """Make MLflow refuse, rather than drop, params that are not in this model's params schema.

    MLflow 3.17 passes every request's params through ``_enforce_params_schema``, which drops
    the names missing from the signature's params schema with a log warning (and all params when
    the signature has none): ``{"n_cluster": 8}`` would be answered 200 with other clusters.
    This wraps that function, in the process serving this model only, so that a params dict
    naming anything outside a schema made of :class:`~contrastive_sc.serve.inference.PredictParams`'s
    fields raises the 400 the caller needs; other models' schemas are left to MLflow's rule.

    Returns
    -------
    Whether the check is installed (False when a future MLflow moved the function: requests then
    fall back to MLflow's drop-with-warning, and ``tests/test_serving.py`` fails loudly).
    """
    import mlflow.pyfunc as pyfunc_module

    from contrastive_sc.serve.inference import PredictParams

    original = getattr(pyfunc_module, "_enforce_params_schema", None)
    if original is None:
        log.warning("mlflow.pyfunc._enforce_params_schema not found: unknown params will be dropped, not refused")
        return False
    if getattr(original, "_contrastive_sc_strict", False):
        return True
    known = set(PredictParams.known())

    def strict(params, schema):
        # This model's schema: PredictParams's fields, less min_confidence for a model trained
        # without labels. The names it lists are the ones this model accepts.
        names = {p.name for p in schema.params} if schema is not None else set()
        if isinstance(params, dict) and "method" in names and names <= known:
            unknown = sorted(map(str, set(params) - names))
            if unknown:
                msg = f"unknown parameter(s) {unknown}; the known parameters are {sorted(names)}"
                raise RequestError(msg)
        return original(params, schema)

    strict._contrastive_sc_strict = True
    pyfunc_module._enforce_params_schema = strict
    return True


def hide_parser_tracebacks() -> bool:
    """Keep MLflow's own parse errors from sending the server's traceback to the caller.

    MLflow 3.17's scoring server answers a malformed CSV or parquet body (parsed before the
    model sees it) with a ``stack_trace`` field listing the server's files. This makes that
    helper (``scoring_server._handle_serving_error``) log the traceback instead; the message,
    which names the parse error, still reaches the caller.

    Returns
    -------
    Whether the change is installed.
    """
    from mlflow.pyfunc import scoring_server

    original = getattr(scoring_server, "_handle_serving_error", None)
    if original is None:
        log.warning("mlflow.pyfunc.scoring_server._handle_serving_error not found: parse errors may carry tracebacks")
        return False
    if getattr(original, "_contrastive_sc_quiet", False):
        return True

    def quiet(error_message, error_code, include_traceback=True):
        log.warning("request refused while parsing: %s", error_message, exc_info=True)
        return original(error_message, error_code, include_traceback=False)

    quiet._contrastive_sc_quiet = True
    scoring_server._handle_serving_error = quiet
    return True


def fast_json_responses() -> bool:
    """Write the scoring server's JSON answers with C encoders instead of MLflow's pure-Python one.

    MLflow 3.17 turns the answer into a list of dicts (``DataFrame.to_dict``) and writes it with
    ``json.dump`` into a stream, which runs the pure-Python encoder: measured on 500 cells with
    their 60-dimension embedding, 0.1-0.5 s per request, more than the model's own work. A table
    answer is written by ``DataFrame.to_json`` (the same values: numbers to 15 decimals, far below
    float32's resolution); anything else by ``json.dumps`` with MLflow's encoder class.

    Returns
    -------
    Whether the change is installed.
    """
    import json

    import pandas as pd
    from mlflow.pyfunc import scoring_server

    original = getattr(scoring_server, "predictions_to_json", None)
    encoder = getattr(scoring_server, "NumpyEncoder", None)
    jsonable = getattr(scoring_server, "_get_jsonable_obj", None)
    if original is None or encoder is None or jsonable is None:
        log.warning("mlflow.pyfunc.scoring_server.predictions_to_json not found: answers use MLflow's own encoder")
        return False
    if getattr(original, "_contrastive_sc_fast", False):
        return True

    def fast(raw_predictions, output, metadata=None):
        if metadata:
            return original(raw_predictions, output, metadata)  # MLflow's own layout and checks
        if isinstance(raw_predictions, pd.DataFrame) and raw_predictions.columns.is_unique:
            output.write('{"predictions": ')
            output.write(raw_predictions.to_json(orient="records", double_precision=15))
            output.write("}")
            return None
        output.write(json.dumps({"predictions": jsonable(raw_predictions, pandas_orient="records")}, cls=encoder))
        return None

    fast._contrastive_sc_fast = True
    scoring_server.predictions_to_json = fast
    return True

class EmbedThenClusterModel(PythonModel):
    """Raw counts (gene columns) -> frozen preprocessing -> ONNX encoder -> clusters."""

    def load_context(self, context) -> None:
        from contrastive_sc.serve.inference import EmbedThenCluster

        try:
            self.model = EmbedThenCluster(dict(context.artifacts))
        except ValueError as error:  # files that disagree (ArtifactError) or a bad setting
            if os.environ.get(_SERVER_MODEL_PATH_ENV):
                # Inside `mlflow models serve`: uvicorn restarts a worker that dies with a plain
                # exception forever (with -w 2+), but stops the server on its startup-failure code.
                log.error("refusing to serve this model: %s", error)
                raise SystemExit(_UVICORN_STARTUP_FAILURE) from error
            raise
        refuse_unknown_params()
        hide_parser_tracebacks()
        fast_json_responses()
        log.info("contrastive-sc model loaded: %d genes, %d training clusters, onnxruntime %s with %d thread(s), "
                 "at most %d cells per request", self.model.state.n_genes, len(self.model.centroids),
                 self.model.encoder.providers, self.model.encoder.threads, self.model.max_cells)

    def predict(self, context, model_input, params=None):
        try:
            return self.model.predict(model_input, params)
        except ValueError as error:
            # A bad request, not a server fault: the scoring server answers 400 with this text.
            raise RequestError(str(error)) from None
        except Exception:
            # The traceback names files on the server: log it, answer with a reference to the log line.
            ref = uuid.uuid4().hex[:12]
            log.exception("prediction failed (ref %s)", ref)
            msg = f"internal error while clustering the request (ref {ref}); the server log has the details"
            raise RequestError(msg, error_code=INTERNAL_ERROR) from None


mlflow.models.set_model(EmbedThenClusterModel())
