"""Saving and loading a :class:`~contrastive_sc.method.model.ContrastiveSC`: one folder, bound by a manifest.

The folder holds ``config.json`` (the settings), ``data_setup.json`` (where the counts, labels
and batches were), ``preprocess_state.json``, ``encoder.pt`` (the module's checkpoint: init
args, weights, genes, model id), ``history.json``, ``training_clusters.npy`` and
``cell_types.npz`` when the model has them, and ``manifest.json`` (the content digest of each).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..analysis.annotate import CellTypeAnnotator
from ..analysis.cluster import TrainingClusters
from .config import ContrastiveConfig
from .data import DataSetup
from .encoder import load_checkpoint, save_checkpoint
from .manifest import MANIFEST, ManifestError, check_model_id, verify_manifest, write_manifest
from .preprocess import PreprocessState
from .train import TrainingHistory

FILES = {"config": "config.json", "setup": "data_setup.json", "state": "preprocess_state.json",
         "weights": "encoder.pt", "history": "history.json", "clusters": "training_clusters.npy",
         "cell_types": "cell_types.npz"}
#: Files a model may lack (fitted without clusters or without labels; saved before data_setup.json existed).
OPTIONAL_FILES = ("setup", "clusters", "cell_types")
#: The name the first releases gave the training clusters' file, still read when files are not checked.
_FIRST_RELEASE_CLUSTERS = "reference_centroids.npy"


def save_model(model, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` to the folder ``path``; refuse a folder holding another model unless ``overwrite``.

    Raises
    ------
    FileExistsError
        When ``path`` holds another model and ``overwrite`` is false.
    """
    path = Path(path)
    saved_id = _saved_model_id(path)
    if saved_id is not None and saved_id != model.model_id:
        if not overwrite:
            msg = (f"{str(path)!r} holds another saved model (id {saved_id}, this one is {model.model_id}); "
                   "save elsewhere or pass overwrite=True to replace it")
            raise FileExistsError(msg)
        for name in (*FILES.values(), _FIRST_RELEASE_CLUSTERS, MANIFEST):
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / FILES["config"]).write_text(model.config.to_json())
    (path / FILES["setup"]).write_text(json.dumps(model.setup.as_dict()))
    model.state.to_json(path / FILES["state"])
    save_checkpoint(model.encoder, path / FILES["weights"], genes=model.state.genes, model_id=model.model_id)
    (path / FILES["history"]).write_text(json.dumps(asdict(model.history) | {"gene_search": model.gene_search}))
    for key, part in {"clusters": model.training_clusters, "cell_types": model.annotator}.items():
        if part is None:
            (path / FILES[key]).unlink(missing_ok=True)
    if model.training_clusters is not None:
        np.save(path / FILES["clusters"], model.training_clusters.centroids)
    if model.annotator is not None:
        model.annotator.save(path / FILES["cell_types"])
    write_manifest(path, [name for name in FILES.values() if (path / name).exists()], model.model_id)
    return path


def load_model(path: str | Path, *, check_files: bool = True) -> dict:
    """The parts of the model saved in ``path``: ``config`` and the model's attributes, by name."""
    path = Path(path)
    missing = [name for key, name in FILES.items() if key not in OPTIONAL_FILES and not (path / name).exists()]
    if missing:
        msg = f"{str(path)!r} is not a saved ContrastiveSC model: missing {missing}"
        raise FileNotFoundError(msg)
    model_id = None
    if check_files:
        required = tuple(name for key, name in FILES.items() if key not in OPTIONAL_FILES)
        try:
            model_id = verify_manifest(path, required=required, optional=tuple(FILES[k] for k in OPTIONAL_FILES))
        except ManifestError as error:
            msg = f"{str(path)!r}: {error}"
            raise ManifestError(msg) from None
    state = PreprocessState.from_json(path / FILES["state"])
    checkpoint = load_checkpoint(path / FILES["weights"])
    if (checkpoint.genes or state.genes) != state.genes or checkpoint.module.n_inputs != state.n_genes:
        msg = (f"{str(path)!r}: {FILES['weights']} reads other genes than {FILES['state']} lists; "
               "the folder mixes two models")
        raise ValueError(msg)
    if model_id is not None:
        for name, found in ((FILES["weights"], checkpoint.model_id), (FILES["state"], state.model_id)):
            check_model_id(name, found, model_id)
    history = json.loads((path / FILES["history"]).read_text())
    first_release_id = history.pop("model_id", None)
    parts = {"config": ContrastiveConfig.from_params(json.loads((path / FILES["config"]).read_text())),
             "state": state, "encoder": checkpoint.module, "gene_search": history.pop("gene_search", []),
             "history": TrainingHistory(**history), "model_id": checkpoint.model_id or first_release_id}
    if (path / FILES["setup"]).exists():
        parts["setup"] = DataSetup.from_dict(json.loads((path / FILES["setup"]).read_text()))
    clusters = next((path / n for n in (FILES["clusters"], _FIRST_RELEASE_CLUSTERS) if (path / n).exists()), None)
    parts["training_clusters"] = TrainingClusters(np.load(clusters)) if clusters is not None else None
    if (path / FILES["cell_types"]).exists():
        parts["annotator"] = CellTypeAnnotator.load(path / FILES["cell_types"])
    return {k: v for k, v in parts.items() if v is not None or k == "training_clusters"}


def _saved_model_id(path: Path) -> str | None:
    """The id of the model saved in ``path``, ``""`` for one saved without an id, ``None`` if none is there."""
    if not (path / FILES["weights"]).exists():
        return None
    try:
        checkpoint = load_checkpoint(path / FILES["weights"])
    except Exception:  # noqa: BLE001 - a damaged file is another model's leftover, not ours
        return ""
    if checkpoint.model_id:
        return checkpoint.model_id
    try:  # the first releases kept the id in history.json
        return str(json.loads((path / FILES["history"]).read_text()).get("model_id", ""))
    except (OSError, ValueError, AttributeError):
        return ""
