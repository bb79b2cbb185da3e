import subprocess
import sys


def test_import_has_no_heavy_side_effects():
    code = (
        "import sys, contrastive_sc\n"
        "heavy = [m for m in ('mlflow', 'onnxruntime', 'leidenalg', 'pyspark') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
