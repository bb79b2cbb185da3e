"""A model is one unit: a manifest of content digests binds the files of a saved or packaged model.

At save (and at packaging for serving) every file the model needs is hashed (SHA-256) into
``manifest.json`` with the model's id; every file also carries that id itself where its format
has room for it. Loading verifies all of it and refuses, naming the file, a folder whose files
were changed, swapped for another model's, removed or added: a tampered model never answers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """The files of a model do not match its manifest."""


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, names: list[str], model_id: str) -> Path:
    """Hash ``names`` (files of ``folder``) into ``folder/manifest.json`` with ``model_id``."""
    folder = Path(folder)
    files = {name: file_digest(folder / name) for name in sorted(names)}
    path = folder / MANIFEST
    path.write_text(json.dumps({"version": MANIFEST_VERSION, "model_id": model_id, "files": files}, indent=1))
    return path


def verify_manifest(folder: str | Path, *, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> str:
    """Check ``folder`` against its manifest; return the model id.

    Every ``required`` file must be listed; a listed file must be present and unchanged; an
    ``optional`` file that is present must be listed (another model's file added to this one).

    Raises
    ------
    ManifestError
        Naming the first file that does not match, and why.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, model_id = dict(manifest["files"]), str(manifest["model_id"])
    except FileNotFoundError:
        msg = (f"{MANIFEST} is missing: the model's files cannot be checked (a model saved by contrastive-sc before "
               "manifests, or a folder assembled by hand); save or log the model again")
        raise ManifestError(msg) from None
    except (ValueError, KeyError, TypeError) as error:
        msg = f"{MANIFEST} is unreadable ({error}); the model's files cannot be checked"
        raise ManifestError(msg) from None
    for name in required:
        if name not in files:
            msg = f"{name} is not listed in {MANIFEST}: it does not belong to model {model_id}"
            raise ManifestError(msg)
    for name in optional:
        if (folder / name).exists() and name not in files:
            msg = f"{name} is not part of model {model_id} (not listed in {MANIFEST}); remove it"
            raise ManifestError(msg)
    for name, expected in files.items():
        path = folder / name
        if not path.exists():
            msg = f"{name}, listed in {MANIFEST} of model {model_id}, is missing"
            raise ManifestError(msg)
        if file_digest(path) != expected:
            msg = (f"{name} does not match {MANIFEST} (its content digest differs): the file was changed or "
                   f"belongs to another model than {model_id}")
            raise ManifestError(msg)
    return model_id


def check_model_id(name: str, found: str | None, model_id: str) -> None:
    """Refuse a file that names another model than the manifest does."""
    if found != model_id:
        msg = f"{name} belongs to model {found or '(none)'}, not to model {model_id} of {MANIFEST}"
        raise ManifestError(msg)
