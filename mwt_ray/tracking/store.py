"""The MLflow store: where it is (``resolve_tracking_uri``), whether it can be used (``check_store``,
asked before anything is written, in well under a second), and the few reads and writes made on
a store outside a run (``run_exists``, ``fail_if_running``).

MLflow's own client retries for minutes against a server that does not answer, and builds a new
sqlite database to look for a run in a file that does not exist: these checks do neither.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from ..core.files import DiskFull, is_disk_full, writable_folder_error
from ..core.messages import first_line

__all__ = ["TrackingError", "default_tracking_uri", "resolve_tracking_uri", "sqlite_path", "check_server",
           "check_store", "check_parent_run", "run_exists", "fail_if_running", "quiet_mlflow_logs", "writing",
           "store_setup_lock"]


class TrackingError(ValueError):
    """The tracking store cannot be used (server down, path not writable, ...)."""


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """An absolute URI every process (also a Ray worker with another cwd) resolves the same way."""
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{(Path.cwd() / path).resolve()}"
        return uri
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return str(Path(uri).expanduser().resolve())  # a local folder (MLflow file store)
    return uri


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return Path(uri[len("sqlite:///"):])
    return None


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless the HTTP tracking server at ``uri`` answers within ``timeout``.

    Any HTTP answer counts as alive (a proxy or auth layer may answer /health with 401 or 404);
    refused connections, unknown hosts and timeouts do not.
    """
    url = uri.rstrip("/") + "/health"
    try:
        # A fresh opener reads the proxy settings now; urlopen's global one keeps those of its first use.
        with urllib.request.build_opener().open(url, timeout=timeout) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"MLflow tracking server {uri} does not answer ({url}: {reason}); start it, fix "
                            "tracking.tracking_uri, or set tracking.enabled=false") from None


# URI schemes MLflow has a tracking store for (a driver suffix as in postgresql+psycopg2 is allowed).
_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc", "uc")
_SQLITE_HEADER = b"SQLite format 3\x00"


def check_store(uri: str) -> None:
    """Raise TrackingError unless the store answers (HTTP) or can be used (sqlite file, folder):
    an unknown scheme, an sqlite path that is a folder or a file that is not a database, a folder
    that cannot be written. Takes well under a second (MLflow itself would retry for minutes)."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
        return
    if "://" in uri:
        scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme not in _SCHEMES:
            raise TrackingError(f"tracking.tracking_uri {uri!r} has a scheme MLflow does not know ({scheme!r}); use "
                                "http(s)://host:port, sqlite:///path/to/mlflow.db, postgresql://, mysql://, mssql://, "
                                "file:///folder or a folder")
    path = sqlite_path(uri)
    if path is not None:
        if path.is_dir():
            raise TrackingError(f"MLflow store {uri}: {path} is a folder, not an sqlite database file; "
                                f"use e.g. sqlite:///{path / 'mlflow.db'}")
        if path.exists():
            try:
                with open(path, "rb") as stream:
                    header = stream.read(len(_SQLITE_HEADER))
            except OSError as error:
                raise TrackingError(f"MLflow store {uri} cannot be read ({error.strerror or error})") from None
            if header and header != _SQLITE_HEADER:
                raise TrackingError(f"MLflow store {uri}: {path} is not an sqlite database (it starts with "
                                    f"{header[:8]!r}); point tracking.tracking_uri at another file")
            if header:
                _check_mlflow_tables(uri, path)
    local = uri[len("file://"):] if uri.startswith("file://") else uri if "://" not in uri else None
    if local is not None and Path(local).exists() and not Path(local).is_dir():
        raise TrackingError(f"MLflow store {uri} is a file, not a folder; set tracking.tracking_uri to a folder "
                            "or an sqlite:/// URI")
    folder = (
        path.parent if path is not None else Path(local) if local is not None else None
    )  # sqlite file, or a file store
    if folder is not None:
        reason = writable_folder_error(folder)
        if reason:
            raise TrackingError(f"MLflow store {uri} is not writable ({reason}); "
                                "set tracking.tracking_uri or tracking.enabled=false")


def _check_mlflow_tables(uri: str, path: Path) -> None:
    """An sqlite database that holds tables but not MLflow's is another program's: MLflow would add
    its own tables to it (and a user would look for the runs in vain elsewhere). Read-only look."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.Error as error:
        raise TrackingError(f"MLflow store {uri}: {path} cannot be read as an sqlite database ({error})") from None
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise TrackingError(f"MLflow store {uri}: {path} is an sqlite database of something else (tables {shown}), "
                            "not an MLflow store; point tracking.tracking_uri at a new file or an MLflow store")


def check_parent_run(uri: str, run_id: str | None) -> None:
    """``tracking.parent_run_id`` must name a run of the store: a made-up id would nest the run
    under nothing, silently."""
    if run_id and not run_exists(uri, run_id):
        raise TrackingError(f"tracking.parent_run_id {run_id!r} is not a run of {uri} (or it is deleted); give the id "
                            "of a run in that store, or leave it unset")


def run_exists(uri: str, run_id: str) -> bool:
    """Whether the store at ``uri`` holds run ``run_id`` (not deleted). Reads only: an sqlite file that
    does not exist is not created (MLflow's client would build a new database to look)."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        return False
    if uri.startswith(("http://", "https://")):
        check_server(uri)  # bounded: MLflow's client retries for minutes against a server that does not answer
    quiet_mlflow_logs()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise TrackingError(f"MLflow store {uri} cannot be read ({first_line(error, 300)})") from None
    return run.info.lifecycle_stage != "deleted"


def fail_if_running(uri: str, run_id: str) -> bool:
    """Mark run ``run_id`` FAILED if it is still RUNNING (its job was killed); True if it was."""
    quiet_mlflow_logs()
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, "FAILED")
    except Exception:  # the run was deleted, the store moved: nothing to mark
        return False
    return True


def quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow.tracking._tracking_service.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Without Databricks credentials it warns before the error the command reports in one line.
    logging.getLogger("mlflow.utils.databricks_utils").setLevel(logging.ERROR)
    # It logs every database error with its traceback (a full disk: over 100 lines on stderr) and then
    # raises it as an MlflowException, which the command reports in its one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def writing(uri: str, what: str):
    """A write to the store at ``uri``; a full disk under it becomes one ``DiskFull`` line."""
    try:
        yield
    except Exception as error:
        if is_disk_full(error):
            raise DiskFull(f"disk full (ENOSPC): the MLflow store {uri} cannot be written ({what})") from None
        raise


@contextlib.contextmanager
def store_setup_lock(uri: str):
    """Hold an exclusive lock while an sqlite store is opened and the experiment found or made: MLflow
    builds a new database with schema migrations, and two jobs doing that at once break it (seen with
    two ``mwt_ray.train`` jobs started together on a new store).

    The lock is on the database's folder itself (flock works on a directory's descriptor), not on a
    lock file beside the database: a lock file is left behind by a job refused here (a deleted
    experiment), and removing it afterwards would let two jobs lock two different files."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    descriptor = os.open(db.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
