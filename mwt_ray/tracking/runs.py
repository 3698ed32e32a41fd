"""MLflow tracking of training jobs: one MLflow run per job, written by rank 0 only.

What a run holds:

- params: every config value, flattened to dotted keys (``train.lr``, ``scaling.num_workers``, ...);
- metrics, one value per epoch (``step`` = epoch, 1-based): everything ``training.fit`` reports
  (loss, ce_loss, cohesion_loss, coupling_loss, cohesion, coupling, kernel_rate, train_accuracy,
  test_accuracy, lr, epoch_time_s);
- artifacts at the end: ``checkpoint.pt`` (the final, modularized checkpoint), ``module_masks.pt``,
  ``metrics.json``, ``history.csv`` and ``convergence.png`` (the paper's Fig. 5 curves).

Where it goes: ``tracking.tracking_uri`` in the config, by default ``sqlite:///<cwd>/mlflow.db``
with artifacts in ``<cwd>/mlruns/<experiment>`` (an sqlite store keeps its artifacts next to the
database file). Browse it with::

    mlflow ui --backend-store-uri sqlite:///mlflow.db

For a shared server backed by a real database, start for example
``mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://...`` and set
``tracking.tracking_uri=http://host:5000``; the server is probed before training starts and a
server that does not answer stops the job with one line. Server credentials go in MLflow's own
variables (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``);
distributed jobs pass every ``MLFLOW_*`` variable on to the Ray workers. ``tracking.enabled=false``
switches tracking off.

Exactly-once epochs: a resumed job (after a worker failure, or ``--resume``) continues the same
MLflow run, and ``MlflowRun.log_epoch`` skips an epoch the run already has, so no epoch is logged
twice. Only ``mwt_ray.jobs`` and ``mwt_ray.cluster`` import this package: the core never depends on MLflow.

A run is a context manager: ``with open_run(cfg) as tracked:`` ends it FINISHED, KILLED (Ctrl-C,
SIGTERM: any ``KeyboardInterrupt``) or FAILED (any other exception) as the block ends. A run whose
process was SIGKILLed stays RUNNING until ``--resume`` continues it, or a new job of the same name
marks it FAILED (``fail_if_running``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.files import DiskFull, is_disk_full, writable_folder_error

__all__ = ["TrackingError", "MlflowRun", "open_run", "resolve_tracking_uri", "default_tracking_uri",
           "check_server", "check_store", "fail_if_running", "run_exists", "ui_address",
           "EXPERIMENT_KIND_TAG", "EXPERIMENT_KIND", "flatten_params", "ARTIFACTS"]

ARTIFACTS = ("checkpoint.pt", "module_masks.pt", "metrics.json", "history.csv", "convergence.png")
# The metric that marks an epoch as logged (every epoch's batch of metrics holds it).
_EPOCH_KEY = "test_accuracy"
_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


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


def _sqlite_path(uri: str) -> Path | None:
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
    path = _sqlite_path(uri)
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
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        return False
    if uri.startswith(("http://", "https://")):
        check_server(uri)  # bounded: MLflow's client retries for minutes against a server that does not answer
    _quiet_mlflow_logs()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise TrackingError(f"MLflow store {uri} cannot be read ({_first_line(error)})") from None
    return run.info.lifecycle_stage != "deleted"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def fail_if_running(uri: str, run_id: str) -> bool:
    """Mark run ``run_id`` FAILED if it is still RUNNING (its job was killed); True if it was."""
    _quiet_mlflow_logs()
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, "FAILED")
    except Exception:  # the run was deleted, the store moved: nothing to mark
        return False
    return True


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.05}} -> {"train.lr": "0.05"}; lists and None become their text."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten_params(value, name + ".")
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def _quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow.tracking._tracking_service.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Without Databricks credentials it warns before the error the command reports in one line.
    logging.getLogger("mlflow.utils.databricks_utils").setLevel(logging.ERROR)
    # It logs every database error with its traceback (a full disk: over 100 lines on stderr) and then
    # raises it as an MlflowException, which the command reports in its one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _writing(uri: str, what: str):
    """A write to the store at ``uri``; a full disk under it becomes one ``DiskFull`` line."""
    try:
        yield
    except Exception as error:
        if is_disk_full(error):
            raise DiskFull(f"disk full (ENOSPC): the MLflow store {uri} cannot be written ({what})") from None
        raise


class MlflowRun:
    """A handle on one MLflow run; cheap to pickle (``info()``) and reopen in a Ray worker."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None
        self._logged: set[int] | None = None

    @classmethod
    def from_info(cls, info: dict) -> MlflowRun:
        return cls(info["tracking_uri"], info["run_id"])

    def info(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    @property
    def client(self):
        if self._client is None:
            _quiet_mlflow_logs()
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def logged_epochs(self) -> set[int]:
        """Epochs (steps) this run already holds metrics for."""
        if self._logged is None:
            self._logged = {m.step for m in self.client.get_metric_history(self.run_id, _EPOCH_KEY)}
        return self._logged

    def log_epoch(self, metrics: dict[str, Any]) -> bool:
        """Log one epoch's metrics at step=epoch; False (and nothing logged) if it is already there."""
        from mlflow.entities import Metric

        epoch = int(metrics["epoch"])
        if epoch in self.logged_epochs():
            return False
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, epoch) for key, value in metrics.items()
                 if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)]
        with _writing(self.tracking_uri, f"metrics of epoch {epoch}"):
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        self._logged.add(epoch)
        return True

    def log_history(self, history: list[dict]) -> int:
        """Log the epochs of ``history`` the run does not have yet; returns how many were logged."""
        return sum(self.log_epoch(metrics) for metrics in history)

    def epoch_callback(self) -> Callable[[int, dict], None]:
        """An ``on_epoch_end`` hook for ``training.fit``."""
        return lambda epoch, metrics: self.log_epoch(metrics)

    def log_results(self, run_dir: str | Path, title: str | None = None) -> list[str]:
        """Upload the finished run's files (see ``ARTIFACTS``); returns the artifact names."""
        from ..core.checkpoint import load_checkpoint
        from .plots import plot_convergence

        run_dir = Path(run_dir)
        state = load_checkpoint(run_dir / "checkpoint.pt")
        uploaded = []
        with tempfile.TemporaryDirectory(prefix="mwt_artifacts_") as scratch:
            scratch = Path(scratch)
            if "module_masks" in state:
                import torch

                usage = state.get("kernel_usage") or {}
                torch.save({"module_masks": state["module_masks"], "tau": state.get("tau"),
                            "classes": state["architecture"].get("classes"),
                            "layer_sizes": usage.get("layer_sizes")}, scratch / "module_masks.pt")
            history = state.get("history") or []
            if history:
                plot_convergence(history, scratch / "convergence.png", title)
            for name in ARTIFACTS:
                path = run_dir / name if (run_dir / name).exists() else scratch / name
                if path.exists():
                    with _writing(self.tracking_uri, f"artifact {name}"):
                        self.client.log_artifact(self.run_id, str(path))
                    uploaded.append(name)
        return uploaded

    def end(self, status: str = "FINISHED") -> None:
        with _writing(self.tracking_uri, f"to mark run {self.run_id} {status}"):
            self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> MlflowRun:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        # SystemExit: Tune ends a trial it stops early (ASHA) with sys.exit(0) inside tune.report.
        status = ("FINISHED" if kind is None else "KILLED" if issubclass(kind, (KeyboardInterrupt, SystemExit))
                  else "FAILED")
        if error is None:
            self.end(status)
            return
        try:
            self.end(status)
        except (
            Exception
        ) as failure:  # e.g. the store is on the disk that is full: the job's own error stays the one raised
            reason = (
                f"its store {self.tracking_uri} is on a full disk too"
                if isinstance(failure, DiskFull)
                else _first_line(failure)
            )
            error.add_note(
                f"the MLflow run {self.run_id} could not be marked {status} and stays RUNNING ({reason}); "
                "a new job of the same name marks it FAILED"
            )


# MLflow 3's experiment "kind": its UI shows an experiment as "GenAI apps & agents" (overview, traces,
# sessions) or as "Machine learning" / "Model training" (runs). The tag and its values are the ones
# the UI's kind selector writes (server/js: setExperimentTag key "mlflow.experimentKind", values
# genai_development, custom_model_development, ...), and MLflow 3 UIs that decide by the experiment
# read it. MLflow 3.17's UI does not: a build flag makes it decide by the *workflow type* alone, the
# sidebar's GenAI / Model training switch, kept in the browser (localStorage "mlflow.workflowType",
# default genai) and overridden by the query ?workflowType=machine_learning. Nothing in the store
# changes that, so the project also prints the address with that query (``ui_address``).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "?workflowType=machine_learning"


def ui_address(uri: str, experiment_id: str) -> str:
    """Where the MLflow UI shows this experiment's training runs: the server's own page for an HTTP
    store, else ``mlflow ui``'s default address."""
    path = f"/#/experiments/{experiment_id}{UI_QUERY}"
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/") + path
    return f"http://127.0.0.1:5000{path} after mlflow ui --backend-store-uri {uri}"


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted in {uri}; restore it or set tracking.experiment"
            )
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an earlier version; a kind set by hand stays
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    db = _sqlite_path(uri)
    # Keep an sqlite store's artifacts next to the database, as an absolute location, so runs
    # logged from Ray workers (whose cwd is a Ray session folder) land in the same place.
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    location = (db.parent / "mlruns" / slug).resolve().as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def _store_setup_lock(uri: str):
    """Hold an exclusive lock while an sqlite store is opened and the experiment found or made: MLflow
    builds a new database with schema migrations, and two jobs doing that at once break it (seen with
    two ``mwt_ray.train`` jobs started together on a new store).

    The lock is on the database's folder itself (flock works on a directory's descriptor), not on a
    lock file beside the database: a lock file is left behind by a job refused here (a deleted
    experiment), and removing it afterwards would let two jobs lock two different files."""
    db = _sqlite_path(uri)
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


# Tags that say whose a run is: a job's id, a sweep's parent run. A run continued must carry the same.
_IDENTITY_TAGS = ("mwt.job_id", "mwt.kind")


def _check_own_run(run, name: str, tags: dict[str, str], uri: str) -> None:
    """Refuse to continue ``run`` for a job it does not belong to: the run id comes from a file in
    the job's (or sweep's) folder, and a file naming another job's run would make this job log into
    that run and overwrite its artifacts."""
    theirs = {key: run.data.tags.get(key) for key in _IDENTITY_TAGS if key in tags}
    mine = {key: tags[key] for key in theirs}
    if run.info.run_name != name or theirs != mine:
        said = ", ".join(f"{k} {v!r}" for k, v in theirs.items() if v != mine[k])
        raise TrackingError(f"MLflow run {run.info.run_id} in {uri} is not this job's (it is run {run.info.run_name!r}"
                            + (f", {said}" if said else "") + f"; this job is {name!r}"
                            + "".join(f", {k} {v!r}" for k, v in mine.items()) + "): the job's folder names another "
                            "run; remove its mlflow_run.json (or the sweep's sweep.json) to start a new run")


def open_run(cfg, run_id: str | None = None, *, tags: dict[str, str] | None = None,
             log: Callable[[str], None] | None = print) -> MlflowRun:
    """Create the job's MLflow run (every config value as a param), or continue ``run_id``.

    Checks the store first: an HTTP server must answer, a local store must be writable.
    Call this in the driver (it creates the experiment, see the module docstring).
    """
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_store(uri)
    if run_id is None:  # before the store is written (its experiment made)
        check_parent_run(uri, cfg.tracking.parent_run_id)
    if _sqlite_path(uri) is not None:
        _sqlite_path(uri).parent.mkdir(parents=True, exist_ok=True)
    _quiet_mlflow_logs()
    from mlflow import MlflowClient
    from mlflow.entities import Param

    try:
        with _store_setup_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment_id(client, cfg.tracking.experiment, uri)
    except TrackingError:
        raise
    except Exception as error:
        raise TrackingError(
            f"MLflow store {uri} cannot be used: {str(error).splitlines()[0] if str(error) else error!r}"
        ) from None
    params = flatten_params(cfg.model_dump(mode="json"))
    existing: dict[str, str] = {}
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except Exception:
            run = None
        if run is None or run.info.experiment_id != experiment_id or run.info.lifecycle_stage == "deleted":
            if log:
                log(
                    f"MLflow run {run_id} is not in experiment {cfg.tracking.experiment!r} of {uri}; starting a new run"
                )
            run_id = None
        else:
            _check_own_run(run, cfg.name, tags or {}, uri)
            existing = dict(run.data.params)
            client.update_run(run_id, status="RUNNING")
            if log:
                log(f"MLflow: continuing run {run_id} in {uri}")
    if run_id is None:
        run_tags = {"mwt.model": cfg.model.name, "mwt.dataset": cfg.data.name,
                    "mwt.modular": str(cfg.train.modular), **(tags or {})}
        if cfg.tracking.parent_run_id:  # shown nested under the parent (a sweep) in the MLflow UI
            run_tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        run_id = client.create_run(experiment_id, tags=run_tags, run_name=cfg.name).info.run_id
        if log:
            log(f"MLflow: run {run_id} in experiment {cfg.tracking.experiment!r} at {uri}; training runs shown at "
                f"{ui_address(uri, experiment_id)}")
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed and log:
        log("MLflow: params keep their first values; changed since: "
            + ", ".join(f"{k}={existing[k]}->{params[k]}" for k in changed))
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start:start + _PARAMS_PER_BATCH], synchronous=True)
    return MlflowRun(uri, run_id)
