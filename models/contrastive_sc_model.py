"""The embed-then-cluster MLflow pyfunc, defined from code (nothing is pickled).

Logged by every training run with ``python_model=<this file>``, the package as
``code_paths`` and the artifacts written by ``contrastive_sc.inference.package_model``.
It runs on onnxruntime and never imports torch.
"""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


class EmbedThenClusterModel(PythonModel):
    """Raw counts (gene columns) -> frozen preprocessing -> ONNX encoder -> clusters."""

    def load_context(self, context) -> None:
        from contrastive_sc.inference import EmbedThenCluster

        self.model = EmbedThenCluster(dict(context.artifacts))

    def predict(self, context, model_input, params=None):
        try:
            return self.model.predict(model_input, params)
        except ValueError as error:
            # A bad request, not a server fault: the scoring server answers 400 with this text.
            raise MlflowException.invalid_parameter_value(str(error)) from None


mlflow.models.set_model(EmbedThenClusterModel())
