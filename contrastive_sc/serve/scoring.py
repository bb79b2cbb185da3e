"""One scoring-server request answered in a separate process: the child's side.

MLflow's scoring server parses a JSON body in the request's thread, twice (``json.loads``, then
again to split data and params) and then builds the table from nested lists, all holding the
GIL: measured on a loaded two-core machine, a 60 MB body (10,000 cells x 2,000 genes) took 8 s
per ``json.loads`` and 20 s to become a DataFrame, during which no other request of the worker
moved. The served model (``models/contrastive_sc_model.py``) therefore hands a large JSON body
to a process forked from its fork server (:func:`~contrastive_sc.serve.isolation.run_killable`),
which loads the model, answers the request exactly as the server would, and is killed at the
request's deadline; the server's process only waits.
"""

from __future__ import annotations

import os

#: Set in a process answering one request, so that the model it loads answers in place (no fork server of its own).
REQUEST_PROCESS_ENV = "CONTRASTIVE_SC_REQUEST_PROCESS"
#: What the served model's fork server imports besides the clustering libraries, so that loading
#: the model in each child takes a fraction of a second.
SERVING_PRELOAD = ("contrastive_sc.serve.scoring", "contrastive_sc.serve.inference", "contrastive_sc.serve.onnx_io",
                   "contrastive_sc.analysis.annotate", "onnxruntime", "pyarrow.parquet", "mlflow.pyfunc.scoring_server",
                   "mlflow.pyfunc.loaders.code_model")


def in_request_process() -> bool:
    """Whether this process was started to answer one request (:func:`answer_request`)."""
    return bool(os.environ.get(REQUEST_PROCESS_ENV))


def answer_request(model_uri: str, data: bytes, content_type: str) -> tuple[int, str, str]:
    """``(status, body, media type)`` of the scoring server's answer to one request, computed here.

    Loads the served model (``model_uri``: the server's ``__pyfunc_model_path__``) and runs the
    server's own request handler on the body, so that parsing, params, errors and the answer are
    the server's; an error is answered as the server answers it (JSON ``error_code`` and ``message``).
    """
    import warnings

    os.environ[REQUEST_PROCESS_ENV] = "1"
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    with warnings.catch_warnings():  # MLflow's advice to model authors, once per loaded model
        warnings.simplefilter("ignore", UserWarning)
        model = scoring_server.load_model_with_mlflow_config(model_uri)
    try:
        answer = scoring_server.invocations(data, content_type, model, model.metadata.get_input_schema())
    except MlflowException as error:
        return error.get_http_status_code(), error.serialize_as_json(), "application/json"
    return answer.status, answer.response, answer.mimetype
