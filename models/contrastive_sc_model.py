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
- a request without a ``Content-Type`` answers 415 naming the accepted types, and every error
  answer is one line that does not repeat the request (see :func:`guard_invocations`);
- a request over the server's budget (cells x genes, cells x neighbours, cells x clusters)
  answers 400 naming the budget and what fits; one whose clustering runs in a separate process
  (:mod:`contrastive_sc.serve.isolation`) answers 503 when every slot for such work is taken
  (retry), and 504 with the model's message when it passes ``CONTRASTIVE_SC_CLUSTER_TIMEOUT``,
  its process killed (``serving/serve.sh`` lists the settings);
- answers are written by C JSON encoders rather than MLflow's pure-Python one (see
  :func:`fast_json_responses`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)
from mlflow.pyfunc import PythonModel

log = logging.getLogger("contrastive_sc.serving")


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

#: The request bodies MLflow's scoring server reads (``scoring_server.CONTENT_TYPES``); only JSON carries params.
ACCEPTED_CONTENT_TYPES = ("application/json", "text/csv", "application/vnd.apache.parquet")
#: Longest error message passed on from MLflow's own parsers (none of this model's is longer).
_MAX_MESSAGE_CHARS = 1000
#: When the request being answered by this thread arrived (set by :func:`guard_invocations`).
_request = threading.local()


def request_started() -> float | None:
    """``time.monotonic()`` at which the scoring server handed this thread's request to MLflow, if served."""
    return getattr(_request, "started", None)


def _one_line(error: MlflowException) -> str:
    """MLflow's message for a request it could not parse, on one line and without the request's data.

    MLflow 3.17 quotes the whole body after a JSON error (``Input: b'...'``) and inside the
    ``repr`` of a UTF-8 error: those two are rewritten from the underlying exception.
    """
    cause = error.__cause__ or error.__context__
    if isinstance(cause, UnicodeDecodeError):
        return f"Invalid input: the body is not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, json.JSONDecodeError):
        return (f"Invalid input: the body is not valid JSON ({cause.msg} at line {cause.lineno} column {cause.colno}); "
                "send a JSON object with one of dataframe_split, dataframe_records, inputs, instances")
    text = " ".join(str(error.message).split())
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def _as_request_error(error: MlflowException) -> RequestError:
    try:
        code = ErrorCode.Value(error.error_code)
    except ValueError:
        code = INVALID_PARAMETER_VALUE
    return RequestError(_one_line(error), error_code=code)


class _OneLineErrors:
    """The served ``PyFuncModel``, raising MLflow's own errors from ``predict`` (its params and schema
    checks) as :class:`RequestError`, which the scoring server passes on without quoting the request."""

    def __init__(self, model) -> None:
        self._model = model
        self.metadata = model.metadata

    def predict(self, data, params=None):
        try:
            return self._model.predict(data, params=params)
        except RequestError:
            raise
        except MlflowException as error:
            raise _as_request_error(error) from None

    def __getattr__(self, name):
        return getattr(self._model, name)


def guard_invocations() -> bool:
    """Wrap MLflow's request handler (``scoring_server.invocations``) in the process serving this model.

    - A request without a ``Content-Type`` header answers 415 naming the accepted types (MLflow
      3.17 fails on ``None.split`` and answers 500).
    - Every error is answered as JSON on one line, without the request: MLflow quotes the whole
      body after a JSON or UTF-8 error, answers its unsupported-type 415 as plain text, and
      rewrites an error from ``predict``'s params check as ``Failed to predict data '<the table>'``.
    - The time the request arrived is kept for its thread (:func:`request_started`), from which
      the model's clustering deadline counts.

    Returns
    -------
    Whether the wrapper is installed.
    """
    from mlflow.pyfunc import scoring_server

    original = getattr(scoring_server, "invocations", None)
    response = getattr(scoring_server, "InvocationsResponse", None)
    if original is None or response is None:
        log.warning("mlflow.pyfunc.scoring_server.invocations not found: requests are answered by MLflow alone")
        return False
    if getattr(original, "_contrastive_sc_guard", False):
        return True

    def refuse(status: int, code: str, message: str):
        return response(response=json.dumps({"error_code": code, "message": message}), status=status,
                        mimetype="application/json")

    def guarded(data, content_type, model, input_schema):
        from contrastive_sc.serve.scoring import in_request_process

        _request.started = time.monotonic()
        try:
            if not str(content_type or "").strip():
                return refuse(415, "BAD_REQUEST", "the request has no Content-Type header; send one of "
                              f"{', '.join(ACCEPTED_CONTENT_TYPES)} (only JSON carries params)")
            served = _served_model(model)
            if served is not None and served.isolate and not in_request_process():
                try:
                    served.limits.check_body(len(data))
                except ValueError as error:
                    raise RequestError(str(error)) from None
                mime = str(content_type).split(";")[0].strip().lower()
                if mime == "application/json" and len(data) > served.limits.inline_body_bytes:
                    status, body, mimetype = _answer_in_process(served, data, content_type, _request.started)
                    return response(response=body, status=status, mimetype=mimetype)
            try:
                answer = original(data, content_type, _OneLineErrors(model), input_schema)
            except RequestError:
                raise
            except MlflowException as error:
                log.warning("request refused: %s", _one_line(error))
                raise _as_request_error(error) from None
            if answer.status == 415 and answer.mimetype != "application/json":
                text = " ".join(str(answer.response).split())
                if "content types" in text:  # MLflow's list repeats the types with Python brackets
                    text = (f"unsupported Content-Type {' '.join(str(content_type).split())[:100]!r}; send one of "
                            f"{', '.join(ACCEPTED_CONTENT_TYPES)}")
                return refuse(415, "BAD_REQUEST", text)
            return answer
        finally:
            _request.started = None

    guarded._contrastive_sc_guard = True
    scoring_server.invocations = guarded
    return True


def _served_model(model):
    """The :class:`~contrastive_sc.serve.inference.EmbedThenCluster` behind a loaded ``PyFuncModel``, if it is this one."""
    try:
        python_model = model.unwrap_python_model()
    except Exception:  # another flavour, or MLflow changed: answer as MLflow does
        return None
    return python_model.model if isinstance(python_model, EmbedThenClusterModel) else None


def _answer_in_process(served, data: bytes, content_type: str, started: float) -> tuple[int, str, str]:
    """The whole request (parsing included) in a killable process: ``(status, body, media type)``."""
    from contrastive_sc.serve.isolation import run_killable
    from contrastive_sc.serve.scoring import answer_request

    try:
        with served.heavy_slots.hold():
            return run_killable(answer_request, (os.environ[_SERVER_MODEL_PATH_ENV], data, content_type),
                                deadline=started + served.limits.cluster_timeout)
    except Exception as error:
        raise _serving_error(error, served.limits) from None


def _serving_error(error: Exception, limits) -> RequestError:
    """The answer to a request whose separate process could not answer: busy (503), too slow (504), failed (500)."""
    from contrastive_sc.serve.isolation import ServerBusy, WorkTimedOut

    if isinstance(error, ServerBusy):
        return RequestError(str(error), error_code=TEMPORARILY_UNAVAILABLE)
    if isinstance(error, WorkTimedOut):
        msg = (f"this request took longer than this server's limit of {limits.cluster_timeout:g} s "
               "(CONTRASTIVE_SC_CLUSTER_TIMEOUT) and its work was stopped; send fewer cells or a smaller n_neighbors / "
               "n_clusters, or cluster a large dataset with the batch entry point `python -m contrastive_sc embed`")
        return RequestError(msg, error_code=DEADLINE_EXCEEDED)
    ref = uuid.uuid4().hex[:12]
    log.error("prediction failed in its separate process (ref %s): %s: %s", ref, type(error).__name__, error)
    msg = f"internal error while answering the request (ref {ref}); the server log has the details"
    return RequestError(msg, error_code=INTERNAL_ERROR)


class EmbedThenClusterModel(PythonModel):
    """Raw counts (gene columns) -> frozen preprocessing -> ONNX encoder -> clusters."""

    # The model checks its input itself (gene columns, raw counts): MLflow's type-hint validation is
    # off, which also keeps its "Add type hints" advice out of every server log.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from contrastive_sc.serve.inference import EmbedThenCluster
        from contrastive_sc.serve.scoring import SERVING_PRELOAD, in_request_process

        # In `mlflow models serve` (and not in a process answering one of its requests).
        served = bool(os.environ.get(_SERVER_MODEL_PATH_ENV)) and not in_request_process()
        try:
            # Served: large clustering in killable processes (an in-process caller's thread is its own).
            self.model = EmbedThenCluster(dict(context.artifacts), isolate=served)
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
        guard_invocations()
        if served:
            from contrastive_sc.serve.isolation import start_fork_server

            start_fork_server(SERVING_PRELOAD)  # now, so that the first large request does not wait for its imports
        limits = self.model.limits
        log.info("contrastive-sc model loaded: %d genes, %d training clusters, onnxruntime %s with %d thread(s), "
                 "%s", self.model.state.n_genes, len(self.model.centroids), self.model.encoder.providers,
                 self.model.encoder.threads, limits)

    def predict(self, context, model_input, params=None):
        from contrastive_sc.serve.isolation import ServerBusy, WorkTimedOut

        try:
            return self.model.predict(model_input, params, started=request_started())
        except ValueError as error:
            # A bad request, not a server fault: the scoring server answers 400 with this text.
            raise RequestError(str(error)) from None
        except (ServerBusy, WorkTimedOut) as error:
            raise _serving_error(error, self.model.limits) from None
        except Exception:
            # The traceback names files on the server: log it, answer with a reference to the log line.
            ref = uuid.uuid4().hex[:12]
            log.exception("prediction failed (ref %s)", ref)
            msg = f"internal error while clustering the request (ref {ref}); the server log has the details"
            raise RequestError(msg, error_code=INTERNAL_ERROR) from None


mlflow.models.set_model(EmbedThenClusterModel())
