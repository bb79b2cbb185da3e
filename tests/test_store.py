"""One name per MLflow store (the encoded and plain spellings of a SQLite path), a missing store
refused, and storage failures turned into one sentence."""

import errno
import sqlite3
from urllib.parse import quote

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from contrastive_sc.cli import main
from contrastive_sc.mlops import registry, store, tracking

SPACED = "runs and modèles"


@pytest.fixture
def spaced_store(_template_store, tmp_path, monkeypatch):
    """A migrated store in a folder whose name holds a space and a non-ASCII letter; ``(db, encoded, plain)``."""
    import shutil

    folder = tmp_path / SPACED
    folder.mkdir()
    db = folder / "mlflow.db"
    shutil.copyfile(_template_store, db)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield db, f"sqlite:///{quote(str(db))}", f"sqlite:///{db}"
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _strays(root):
    return sorted(str(p) for p in root.rglob("*%*"))


def test_every_spelling_of_a_sqlite_store_is_one_file(spaced_store, tmp_path, monkeypatch):
    db, encoded, plain = spaced_store
    assert "%20" in encoded and "%C3%A8" in encoded  # what `mlflow run` passes on
    monkeypatch.chdir(tmp_path)
    relative = f"sqlite:///{SPACED}/mlflow.db"
    dotted = f"sqlite:///{quote(SPACED)}/../{quote(SPACED)}/mlflow.db"
    for uri in (encoded, plain, relative, dotted):
        assert store.sqlite_path(uri) == db
        assert store.canonical_uri(uri) == plain
        assert store.store_key(uri) == str(db)
        assert registry.lock_path(uri) == db.with_name("mlflow.db.registry.lock")
    assert store.describe(encoded) == plain
    assert store.sqlite_path("http://host:5000") is None and store.sqlite_path("sqlite:///:memory:") is None


def test_server_uris_are_normalised_for_the_lock():
    key = store.store_key("http://host.example:5000")
    assert store.store_key("HTTP://Host.Example:5000/") == key
    assert store.store_key("http://user:secret@host.example:5000") == key
    assert registry.lock_path("HTTP://Host.Example:5000/") == registry.lock_path("http://host.example:5000")
    assert registry.lock_path("http://other:5000") != registry.lock_path("http://host.example:5000")
    assert "secret" not in store.describe("https://user:secret@host.example/mlflow")


def test_an_encoded_uri_opens_and_locks_the_real_store_and_leaves_no_folder(spaced_store, tmp_path):
    db, encoded, plain = spaced_store
    assert tracking.setup(encoded, "spaced") == plain
    assert mlflow.get_tracking_uri() == plain and mlflow.get_registry_uri() == plain
    MlflowClient().create_registered_model("spaced-model")  # MLflow opens both stores
    with registry.registry_lock(encoded) as held:
        assert held == db.with_name("mlflow.db.registry.lock")
    location = MlflowClient().get_experiment_by_name("spaced").artifact_location
    assert location == (db.parent / "mlartifacts").as_uri()
    assert _strays(tmp_path) == []


def test_the_empty_folder_mlflow_made_for_an_encoded_uri_is_removed(spaced_store, tmp_path):
    db, encoded, _ = spaced_store
    # MLflow 3.17 makes the encoded parent of a sqlite:/// path before SQLAlchemy opens the decoded one.
    MlflowClient(tracking_uri=encoded).search_experiments()
    twin = tmp_path / quote(SPACED)
    assert twin.is_dir()
    tracking.setup(encoded)
    assert not twin.exists() and db.exists()
    twin.mkdir()
    (twin / "notes.txt").write_text("not ours")  # a folder with something in it is left alone
    tracking.setup(encoded)
    assert (twin / "notes.txt").read_text() == "not ours"


def test_the_cli_removes_the_encoded_folder_even_when_its_options_are_refused(spaced_store, tmp_path):
    db, encoded, _ = spaced_store
    (tmp_path / quote(SPACED)).mkdir()  # as the `mlflow run` process leaves it
    result = CliRunner().invoke(main, ["embed", "--model-uri", "models:/m@champion", "--data", "x", "--out", "y.h5ad",
                                       "--method", "bogus"], env={"MLFLOW_TRACKING_URI": encoded})
    assert result.exit_code == 2 and "bogus" in result.output
    assert _strays(tmp_path) == []


def test_only_empty_encoded_folders_are_removed(tmp_path):
    real = tmp_path / "my data" / "sub dir"
    real.mkdir(parents=True)
    (real / "mlflow.db").touch()
    uri = f"sqlite:///{quote(str(real / 'mlflow.db'))}"
    (tmp_path / "my%20data" / "sub%20dir").mkdir(parents=True)  # what MLflow's parents=True makes
    store.remove_encoded_twin(uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my data"] and (real / "mlflow.db").exists()
    (tmp_path / "my%20data" / "sub%20dir").mkdir(parents=True)
    (tmp_path / "my%20data" / "keep.txt").touch()
    store.remove_encoded_twin(uri)
    assert sorted(p.name for p in (tmp_path / "my%20data").iterdir()) == ["keep.txt"]
    store.remove_encoded_twin(f"sqlite:///{real / 'mlflow.db'}")  # a plain URI: nothing to look for
    assert (tmp_path / "my%20data" / "keep.txt").exists()


def test_the_lock_never_creates_the_folder_of_a_misspelt_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/no%20such/mlflow.db"
    with pytest.raises(ValueError, match="does not exist"), registry.registry_lock(uri):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_waiting_promotion_says_which_lock_it_waits_for(tracking_uri, tmp_path, caplog):
    from filelock import FileLock

    path = registry.lock_path(tracking_uri)
    with FileLock(str(path)), caplog.at_level("WARNING"), pytest.raises(ValueError, match="retry once"), \
            registry.registry_lock(tracking_uri, timeout=0.3):
        pass
    assert f"waiting for {path}" in caplog.text


# ----------------------------------------------------------------------------- a missing store
def _cli(args, env=None):
    result = CliRunner().invoke(main, args, env=env)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    return result, errors


@pytest.mark.parametrize("command", [
    ["register", "--name", "m"],
    ["register", "--name", "m", "--run-id", "abc"],
    ["promote", "--name", "m"],
    ["rollback", "--name", "m"],
    ["export-onnx", "--model-uri", "models:/m@champion", "--out", "OUT/e.onnx"],
    ["embed", "--model-uri", "models:/m@champion", "--data", "simulated", "--out", "OUT/e.h5ad"],
    ["speed-benchmark", "--data", "simulated", "--model-uri", "models:/m@champion", "--out", "OUT/s.csv"],
])
def test_commands_that_read_a_store_refuse_a_missing_one(command, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    # the wrong folder (the default ./mlflow.db), a mistyped --tracking-uri, a mistyped MLFLOW_TRACKING_URI
    for extra, env, origin in (([], None, f"the default ./mlflow.db in {tmp_path}"),
                               (["--tracking-uri", "sqlite:///mlfow.db"], None, "given by --tracking-uri"),
                               ([], {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlfow.db"},
                                "from MLFLOW_TRACKING_URI")):
        result, errors = _cli([*args, *extra], env=env)
        assert result.exit_code == 2 and len(errors) == 1, result.output
        assert errors[0].startswith("Error: no MLflow store at ") and origin in errors[0], errors[0]
        assert "--tracking-uri sqlite:///" in errors[0] and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [], "a refused command created something"


def test_a_folder_is_not_a_store(tmp_path):
    result, errors = _cli(["promote", "--name", "m", "--tracking-uri", f"sqlite:///{tmp_path}"])
    assert result.exit_code == 2 and "is a folder" in errors[0], result.output


def test_train_still_creates_a_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        uri = tracking.setup(f"sqlite:///{tmp_path}/new.db", "fresh")  # train, sweep and experiment call this
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert (tmp_path / "new.db").exists() and uri == f"sqlite:///{tmp_path}/new.db"


# ----------------------------------------------------------------------------- storage failures
def _readonly_sqlite_error(db):
    """The error SQLite itself gives for a write to a read-only database (no root rights involved)."""
    try:
        sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("CREATE TABLE t (x)")
    except sqlite3.OperationalError as error:
        return error
    raise AssertionError("a read-only connection accepted a write")


def test_a_storage_failure_is_one_sentence_without_sql(tracking_uri, tmp_path):
    from mlflow.exceptions import MlflowException

    db = tmp_path / "mlflow.db"
    cause = _readonly_sqlite_error(db)
    try:
        try:
            raise MlflowException(f"(sqlite3.OperationalError) {cause}\n[SQL: INSERT INTO x VALUES (?)]") from cause
        except MlflowException as error:
            raise ValueError("reading @champion failed: [SQL: INSERT ...]") from error  # as registry wraps it
    except ValueError as wrapped:
        message = store.storage_failure(wrapped, tracking_uri)
    assert message.startswith(f"cannot write to the MLflow store {db}: ") and "read-only" in message
    assert "SQL" not in message.replace("SQLite", "") and "\n" not in message
    assert store.storage_failure(ValueError("an ordinary mistake"), tracking_uri) is None


def test_disk_and_permission_errors_are_one_line_messages_through_the_cli():
    from contrastive_sc.cli import _friendly_errors

    @_friendly_errors
    def failing(error):
        raise error

    full = OSError(errno.ENOSPC, "No space left on device", "/data/out.h5ad")
    with pytest.raises(Exception, match=r"^No space left on device: /data/out.h5ad; free some space") as caught:
        failing(full)
    assert caught.value.exit_code == 2
    with pytest.raises(Exception, match=r"^No such file or directory: missing/folder/x.onnx$"):  # was "Error: 2"
        failing(FileNotFoundError(errno.ENOENT, "No such file or directory", "missing/folder/x.onnx"))
    with pytest.raises(Exception, match="read-only"):
        failing(MlflowLike("(sqlite3.OperationalError) attempt to write a readonly database [SQL: ...]"))


class MlflowLike(Exception):
    """An error whose cause is SQLite's own, as MLflow raises them."""

    def __init__(self, text):
        super().__init__(text)
        self.__cause__ = sqlite3.OperationalError("attempt to write a readonly database")


# ----------------------------------------------------------------------------- storage failures from real processes
def _versions_in(db):
    """A registry in ``db`` with versions 1-3 of ``m`` scored 0.5, 0.6, 0.9 on one dataset; 3 is @challenger."""
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    for value in (0.5, 0.6, 0.9):
        client.create_model_version("m", source="file:///nowhere/model", tags={
            "metric": "kmeans_ari", "metric_value": repr(value), "dataset": "sim", "dataset_digest": "abc123"})
    client.set_registered_model_alias("m", "challenger", "3")
    return client


def _unprivileged():
    """A command prefix under which file permissions bind: root's capability to override them is dropped."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]
    if setpriv is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without a working setpriv: read-only permissions cannot be enforced")
    return prefix


def _promote(db, prefix=(), **popen):
    """``contrastive-sc promote --name m`` in a real process (MLflow's own logging included)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(repo)}
    return subprocess.run([*prefix, sys.executable, "-m", "contrastive_sc", "promote", "--name", "m", "--tracking-uri",
                           f"sqlite:///{db}"], capture_output=True, text=True, timeout=300, env=env, **popen)


def _one_line_error(done, *expected):
    assert done.returncode == 2 and not done.stdout, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    for word in expected:
        assert word in lines[0], lines[0]
    assert "SQL:" not in lines[0] and "INSERT" not in lines[0] and "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture
def registry_folder(_template_store, tmp_path):
    import shutil

    folder = tmp_path / SPACED
    folder.mkdir()
    shutil.copyfile(_template_store, folder / "mlflow.db")
    client = _versions_in(folder / "mlflow.db")
    yield folder, client
    folder.chmod(0o755)
    (folder / "mlflow.db").chmod(0o644)


@pytest.mark.slow
def test_a_read_only_store_file_or_folder_is_one_line(registry_folder):
    folder, client = registry_folder
    db, prefix = folder / "mlflow.db", _unprivileged()

    folder.chmod(0o555)  # no lock file yet: taking the lock is what fails
    _one_line_error(_promote(db, prefix), "cannot take the registry lock", "the folder must be writable")
    folder.chmod(0o755)

    db.chmod(0o444)
    _one_line_error(_promote(db, prefix), f"cannot write to the MLflow store {db}: the database file is read-only",
                    "--tracking-uri")
    db.chmod(0o644)

    assert (folder / "mlflow.db.registry.lock").exists()
    folder.chmod(0o555)  # the lock exists: SQLite cannot write its journal beside the database
    _one_line_error(_promote(db, prefix), f"cannot write to the MLflow store {db}: its folder {folder} is read-only")
    folder.chmod(0o755)

    assert client.get_registered_model("m").aliases.get("champion") is None  # nothing half-written
    assert "[" not in client.get_registered_model("m").tags.get("champion_history", "")


@pytest.mark.slow
def test_a_store_that_cannot_grow_is_one_line(registry_folder):
    """Disk full, simulated without root: a file-size limit (RLIMIT_FSIZE, `ulimit -f`) below the store's size
    makes every write past it fail, as a full disk does (SQLite reports a disk I/O error)."""
    import resource

    folder, client = registry_folder
    db = folder / "mlflow.db"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    line = _one_line_error(_promote(db, preexec_fn=small_files), f"cannot write to the MLflow store {db}",
                           "RLIMIT_FSIZE", "65,536 bytes")
    assert "disk I/O error" in line
    assert client.get_registered_model("m").aliases.get("champion") is None
    assert str(client.get_model_version_by_alias("m", "challenger").version) == "3"


@pytest.mark.slow
def test_a_full_disk_is_one_line(_template_store, tmp_path):
    """A really full file system, where one can be made (root may mount a 1 MiB tmpfs)."""
    import os
    import shutil
    import subprocess

    built = tmp_path / "built.db"  # made here: this process keeps its engine open, which would keep the mount busy
    shutil.copyfile(_template_store, built)
    _versions_in(built)
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        shutil.copyfile(built, folder / "mlflow.db")
        with (folder / "filler").open("wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:  # the disk is full
                pass
        _one_line_error(_promote(folder / "mlflow.db"), f"cannot write to the MLflow store {folder / 'mlflow.db'}",
                        "the disk holding it is full", "database or disk is full")
    finally:
        subprocess.run(["umount", str(folder)], check=True)
