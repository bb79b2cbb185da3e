"""Where commands write: never over a user's file by accident.

A command's ``--out`` may replace an earlier output of the same kind (re-running a command is
normal), but any other existing file is refused unless the caller says ``overwrite``: a typo in
``--out`` must not destroy someone's data.
"""

from __future__ import annotations

from pathlib import Path

#: What each kind of output looks like, to recognise an earlier one.
KINDS = ("h5ad", "csv", "onnx", "cell-types-csv")
#: First columns of every benchmark CSV (see :data:`contrastive_sc.benchmarks.benchmark.COLUMNS`).
_CSV_HEADER = "dataset,method,seed"
#: The header of the cell types ``contrastive-sc annotate`` writes to a CSV.
CELL_TYPES_HEADER = "cell,cell_type,confidence"


def check_output(path: str | Path, kind: str, *, overwrite: bool = False) -> Path:
    """Return ``path`` as a Path if writing there loses nothing, else raise.

    Parameters
    ----------
    path
        Where the command will write.
    kind
        One of :data:`KINDS`: an ``.h5ad`` written by ``embed``, a benchmark ``.csv``, an
        encoder ``.onnx``.
    overwrite
        Replace any existing file.

    Raises
    ------
    FileExistsError
        When ``path`` is a folder, or an existing file that is not an earlier output of ``kind``
        and ``overwrite`` is false.
    """
    if kind not in KINDS:
        msg = f"unknown output kind {kind!r}; expected one of {list(KINDS)}"
        raise ValueError(msg)
    path = Path(path)
    if path.is_dir():
        msg = f"--out {str(path)!r} is a folder; give a file name"
        raise FileExistsError(msg)
    if not path.exists() or overwrite or _is_earlier_output(path, kind):
        return path
    msg = (f"refusing to overwrite {str(path)!r}: it exists and is not an earlier contrastive-sc {kind} output; "
           "choose another --out or pass --overwrite")
    raise FileExistsError(msg)


def _is_earlier_output(path: Path, kind: str) -> bool:
    try:
        if kind in ("csv", "cell-types-csv"):
            with path.open(encoding="utf-8") as handle:
                return handle.readline().startswith(_CSV_HEADER if kind == "csv" else CELL_TYPES_HEADER)
        if kind == "h5ad":
            import h5py

            with h5py.File(path, "r") as handle:
                return any(key.startswith("contrastive_") for key in handle.get("uns", {}))
        import onnx

        from ..serve.onnx_io import INPUT_NAME, OUTPUT_NAME

        graph = onnx.load(str(path), load_external_data=False).graph
        return [i.name for i in graph.input] == [INPUT_NAME] and [o.name for o in graph.output] == [OUTPUT_NAME]
    except Exception:  # unreadable as that kind: not ours
        return False
