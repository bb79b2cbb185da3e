"""Which MLflow store a command uses, named one way; a missing store refused; storage failures in words.

One store, several spellings: ``mlflow run`` passes its default store on percent-encoded
(``sqlite:////home/me/runs%20and%20mod%C3%A8les/mlflow.db``) while people and the CLI write plain
paths, and SQLAlchemy decodes the path it opens. Everything keyed on the store (the registry lock,
the artifact folder beside it, messages) therefore goes through :func:`sqlite_path` or
:func:`store_key`, and MLflow is handed the plain path: MLflow 3.17 creates the parent folder of a
``sqlite:///`` path without decoding it, so an encoded URI leaves an empty ``runs%20and...`` folder
beside the store.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

SQLITE = "sqlite:///"
#: Shown in messages that ask for another store.
HOW_TO_POINT = "pass --tracking-uri sqlite:////ABSOLUTE/PATH/mlflow.db (or set MLFLOW_TRACKING_URI)"
#: Errors of the operating system that are about the disk or permissions, not about the program.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def sqlite_path(uri: str) -> Path | None:
    """The database file a ``sqlite:///`` URI opens, absolute, or ``None`` for any other URI.

    Decoded as SQLAlchemy decodes it (``%20`` is a space) and resolved against the current
    folder, so the encoded and plain spellings of one file give one path.
    """
    if not uri.startswith(SQLITE):
        return None
    raw = uri[len(SQLITE):].split("?", 1)[0]
    if raw in ("", ":memory:"):
        return None
    return Path(os.path.abspath(unquote(raw))).resolve()


def canonical_uri(uri: str) -> str:
    """``uri`` as MLflow should be given it: a ``sqlite:///`` URI with its plain absolute path; others unchanged."""
    path = sqlite_path(uri)
    if path is None:
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return f"{SQLITE}{path}" + (f"?{query}" if query else "")


def store_key(uri: str) -> str:
    """One name per store: the database file of a ``sqlite:///`` URI, else the URI normalised.

    Normalised: scheme and host lower-case, credentials dropped, path percent-decoded without a
    trailing slash (``HTTP://Host:5000/`` and ``http://host:5000`` are one server).
    """
    path = sqlite_path(uri)
    if path is not None:
        return str(path)
    parts = urlsplit(uri.strip())
    if not parts.scheme or not parts.netloc:
        return uri.strip()
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme.lower()}://{host}{unquote(parts.path).rstrip('/')}{query}"


def describe(uri: str) -> str:
    """The store for a message: the plain-path URI of a SQLite file, else the URI without credentials."""
    path = sqlite_path(uri)
    if path is not None:
        return f"{SQLITE}{path}"
    parts = urlsplit(uri)
    if parts.password:
        return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
    return uri


def require_existing(uri: str, origin: str) -> None:
    """Refuse a ``sqlite:///`` store whose file does not exist (MLflow would create an empty one).

    ``origin`` says where the URI came from (``--tracking-uri``, ``MLFLOW_TRACKING_URI``, the
    default ``./mlflow.db``), for the message.
    """
    path = sqlite_path(uri)
    if path is None:
        return
    if path.is_dir():
        msg = f"the MLflow store {path} ({origin}) is a folder; expected the SQLite file, e.g. {path / 'mlflow.db'}"
        raise FileNotFoundError(msg)
    if not path.exists():
        folder = "" if path.parent.is_dir() else f"; the folder {path.parent} does not exist either"
        msg = (f"no MLflow store at {path} ({origin}){folder}. Run the command in the folder that holds "
               f"mlflow.db, or {HOW_TO_POINT}; only train, sweep and experiment create a new store")
        raise FileNotFoundError(msg)


def remove_encoded_twin(given: str) -> None:
    """Remove the empty folders MLflow made for a percent-encoded ``sqlite:///`` URI, if there are any.

    ``mlflow run`` opens its default store through the encoded URI before the entry point starts,
    and MLflow creates that URI's parent folder undecoded (``runs%20and%20mod%C3%A8les``, with
    ``parents=True``) although SQLAlchemy then opens the real one. Only folders on that encoded path
    whose name holds a ``%`` and that are not on the real path are removed, and only while empty.
    """
    if sqlite_path(given) is None or "%" not in given:
        return
    raw = given[len(SQLITE):].split("?", 1)[0]
    encoded, real = Path(os.path.abspath(raw)).parent, Path(os.path.abspath(unquote(raw))).parent
    folder = encoded
    while "%" in folder.name and folder != real and folder not in real.parents:
        if folder.is_symlink():
            return
        try:
            folder.rmdir()  # fails, and keeps the folder, if anything is in it
        except OSError:
            return
        folder = folder.parent


# ----------------------------------------------------------------------------- storage failures
def storage_failure(error: BaseException, uri: str | None = None) -> str | None:
    """One sentence for an error caused by the store's storage (read-only, disk full, busy), else ``None``.

    Looks through the exception's causes for SQLite's own error or an operating-system error
    about the disk or permissions, and names the store, the cause and the fix, without the SQL
    statement or traceback MLflow attaches.
    """
    if uri is None:
        uri = _active_uri()
    wrapper = None
    for cause in _chain(error):
        reason = _sqlite_reason(cause)
        if reason is not None:
            return _explain_sqlite(reason, uri)
        # An OSError that the package already put in words (a ValueError raised from it) keeps those words.
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS and not isinstance(wrapper, ValueError):
            return _explain_os(cause)
        wrapper = cause
    return None


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _sqlite_reason(error: BaseException) -> str | None:
    """SQLite's message (``attempt to write a readonly database``) if ``error`` is a SQLite failure."""
    module = type(error).__module__
    if module == "sqlite3" or (module.startswith("sqlalchemy") and type(error).__name__ == "OperationalError"):
        text = str(getattr(error, "orig", None) or error)
        return text.splitlines()[0].removeprefix("(sqlite3.OperationalError) ").strip()
    return None


def _explain_sqlite(reason: str, uri: str | None) -> str:
    path = sqlite_path(uri) if uri else None
    where = f"the MLflow store {path}" if path else f"the MLflow store {describe(uri) if uri else '(unknown)'}"
    text = reason.lower()
    if "readonly" in text or "read-only" in text:
        return f"cannot write to {where}: {_read_only_cause(path)} (SQLite: {reason}); make it writable or {HOW_TO_POINT}"
    if "disk is full" in text or "disk i/o error" in text:
        return f"cannot write to {where}: {_full_cause(path, reason)}"
    if "database is locked" in text or "database is busy" in text:
        return (f"{where} stayed busy (SQLite: {reason}): another process kept it locked; retry when it has "
                "finished, and avoid putting the store on a network file system")
    if "unable to open database file" in text:
        return f"cannot open {where} (SQLite: {reason}): check that its folder exists and is readable and writable"
    if "not a database" in text or "malformed" in text:
        return f"{where} is not a readable SQLite database (SQLite: {reason}); {HOW_TO_POINT}"
    return f"{where} failed (SQLite: {reason})"


def _read_only_cause(path: Path | None) -> str:
    if path is None:
        return "it is read-only"
    if path.exists() and not os.access(path, os.W_OK):
        return "the database file is read-only"
    if not os.access(path.parent, os.W_OK):
        return f"its folder {path.parent} is read-only (SQLite writes a journal file beside the database)"
    return "it is read-only (a read-only file system or mount?)"


def _full_cause(path: Path | None, reason: str) -> str:
    folder = path.parent if path is not None else Path.cwd()
    free = _free_bytes(folder)
    limit = _file_size_limit()
    size = path.stat().st_size if path is not None and path.exists() else None
    if limit is not None and (size is None or size + (1 << 20) >= limit):
        held = f" and the store is {size:,} bytes" if size is not None else ""
        return (f"this process may not write files beyond {limit:,} bytes (ulimit -f / RLIMIT_FSIZE){held} "
                f"(SQLite: {reason}); raise the limit or {HOW_TO_POINT}")
    if free is not None and free < 64 << 20:
        return (f"the disk holding it is full ({free / 2**20:.1f} MiB free in {folder}; SQLite: {reason}); free some "
                f"space or {HOW_TO_POINT}")
    return f"the disk may be full or failing (SQLite: {reason}); check the disk or {HOW_TO_POINT}"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _explain_os(error: OSError) -> str:
    target = f": {error.filename}" if error.filename else ""
    fixes = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some of your quota",
             errno.EFBIG: "raise the file-size limit (ulimit -f) or write elsewhere",
             errno.EROFS: "write to a writable file system"}
    return f"{error.strerror}{target}; {fixes.get(error.errno, 'check its permissions or use another path')}"


def _active_uri() -> str | None:
    """MLflow's tracking URI when MLflow has been imported (never imports it)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    try:
        return mlflow.get_tracking_uri()
    except Exception:  # noqa: BLE001 - naming the store is a courtesy; the error is reported anyway
        return None
