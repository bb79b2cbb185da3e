"""Batch inference on Spark: ``mlflow.pyfunc.spark_udf`` over the registered embed-then-cluster model.

A real local Spark session (``local[2]``) scores a Spark DataFrame of gene-count columns with the
model registered in a real SQLite registry; the labels must be those of the in-process pyfunc.
On a cluster the same code runs with ``SparkSession.builder.master(<cluster master>)``.
"""

import shutil
import sys

import mlflow
import numpy as np
import pytest

from contrastive_sc.mlops import tracking

pytestmark = pytest.mark.slow


def _spark_or_skip():
    try:
        import pyspark  # noqa: F401
    except ImportError:
        pytest.skip("pyspark is not installed: install the extra, `pip install -e .[spark]`")
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: Spark needs a Java runtime (17 or later for pyspark 4)")


@pytest.fixture
def spark(monkeypatch):
    _spark_or_skip()
    from pyspark.sql import SparkSession

    # Spark's Python workers must run this interpreter (the one with the package and mlflow).
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
    session = (SparkSession.builder.master("local[2]").appName("contrastive-sc-test")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.memory", "1g").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_udf_labels_equal_in_process_predict(tracking_uri, synthetic, tiny_config, spark):
    from pyspark.sql.functions import col, struct

    tracking.setup(tracking_uri, "spark")
    run = tracking.train_run(synthetic.copy(), tiny_config.replace(n_genes=50), label_key="label",
                             methods=("kmeans",), map_plot=False)
    version = mlflow.register_model(run["model_uri"], "spark-clusterer").version
    model_uri = f"models:/spark-clusterer/{version}"

    cells = synthetic.to_df().astype("float64")
    expected = mlflow.pyfunc.load_model(model_uri).predict(cells, params={"method": "trained"})

    # One partition: one Python worker loads the model (each load imports mlflow and onnxruntime).
    frame = spark.createDataFrame(cells.reset_index(names="cell_id")).coalesce(1)
    genes = list(cells.columns)
    # A struct result takes the prediction columns by name; "cluster" alone would be result_type="long".
    predict = mlflow.pyfunc.spark_udf(
        spark, model_uri, result_type="cluster long, gene_coverage double, cell_type string, confidence double",
        env_manager="local", params={"method": "trained"})
    scored = (frame.withColumn("prediction", predict(struct(*[col(g) for g in genes])))
              .select("cell_id", "prediction.cluster", "prediction.gene_coverage", "prediction.cell_type",
                      "prediction.confidence").toPandas()
              .set_index("cell_id").loc[cells.index])

    np.testing.assert_array_equal(scored["cluster"].to_numpy(), expected["cluster"].to_numpy())
    # a model trained with labels names the cells in batch exactly as in process
    np.testing.assert_array_equal(scored["cell_type"].to_numpy(), expected["cell_type"].to_numpy())
    np.testing.assert_allclose(scored["confidence"].to_numpy(), expected["confidence"].to_numpy())
    assert (scored["gene_coverage"] == 1.0).all()
    assert scored["cluster"].nunique() > 1
