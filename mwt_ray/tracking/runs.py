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
marks it FAILED (``store.fail_if_running``).
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.files import DiskFull
from ..core.messages import first_line
from .store import (
    TrackingError,
    check_parent_run,
    check_store,
    quiet_mlflow_logs,
    resolve_tracking_uri,
    sqlite_path,
    store_setup_lock,
    writing,
)

__all__ = ["MlflowRun", "open_run", "ui_address", "EXPERIMENT_KIND_TAG", "EXPERIMENT_KIND", "flatten_params",
           "ARTIFACTS"]

ARTIFACTS = ("checkpoint.pt", "module_masks.pt", "metrics.json", "history.csv", "convergence.png")
# The metric that marks an epoch as logged (every epoch's batch of metrics holds it).
_EPOCH_KEY = "test_accuracy"
_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


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
            quiet_mlflow_logs()
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
        with writing(self.tracking_uri, f"metrics of epoch {epoch}"):
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
                    with writing(self.tracking_uri, f"artifact {name}"):
                        self.client.log_artifact(self.run_id, str(path))
                    uploaded.append(name)
        return uploaded

    def end(self, status: str = "FINISHED") -> None:
        with writing(self.tracking_uri, f"to mark run {self.run_id} {status}"):
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
                else first_line(failure, 300)
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
    db = sqlite_path(uri)
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
    log = log or (lambda line: None)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_store(uri)
    if run_id is None:  # before the store is written (its experiment made)
        check_parent_run(uri, cfg.tracking.parent_run_id)
    client, experiment_id = _open_experiment(uri, cfg.tracking.experiment)
    run = _run_to_continue(client, uri, experiment_id, run_id, cfg, tags or {}, log)
    if run is None:
        run_id = _create_run(client, uri, experiment_id, cfg, tags or {}, log)
        existing = {}
    else:
        run_id, existing = run.info.run_id, dict(run.data.params)
        client.update_run(run_id, status="RUNNING")
        log(f"MLflow: continuing run {run_id} in {uri}")
    _log_params(client, run_id, flatten_params(cfg.model_dump(mode="json")), existing, log)
    return MlflowRun(uri, run_id)


def _open_experiment(uri: str, name: str):
    """An MLflow client of the store and the id of experiment ``name`` in it (made if new)."""
    if sqlite_path(uri) is not None:
        sqlite_path(uri).parent.mkdir(parents=True, exist_ok=True)
    quiet_mlflow_logs()
    from mlflow import MlflowClient

    try:
        with store_setup_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            return client, _experiment_id(client, name, uri)
    except TrackingError:
        raise
    except Exception as error:
        raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(error)}") from None


def _run_to_continue(client, uri: str, experiment_id: str, run_id: str | None, cfg, tags: dict[str, str], log):
    """Run ``run_id`` when it is a live run of the experiment and this job's (else ``TrackingError``);
    None when there is none to continue (said in a line when one was named)."""
    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:
        run = None
    if run is None or run.info.experiment_id != experiment_id or run.info.lifecycle_stage == "deleted":
        log(f"MLflow run {run_id} is not in experiment {cfg.tracking.experiment!r} of {uri}; starting a new run")
        return None
    _check_own_run(run, cfg.name, tags, uri)
    return run


def _create_run(client, uri: str, experiment_id: str, cfg, tags: dict[str, str], log) -> str:
    run_tags = {"mwt.model": cfg.model.name, "mwt.dataset": cfg.data.name, "mwt.method": cfg.train.method,
                **tags}
    if cfg.tracking.parent_run_id:  # shown nested under the parent (a sweep) in the MLflow UI
        run_tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    run_id = client.create_run(experiment_id, tags=run_tags, run_name=cfg.name).info.run_id
    log(f"MLflow: run {run_id} in experiment {cfg.tracking.experiment!r} at {uri}; training runs shown at "
        f"{ui_address(uri, experiment_id)}")
    return run_id


def _log_params(client, run_id: str, params: dict[str, str], existing: dict[str, str], log) -> None:
    """The params the run does not hold yet; a param holds its first value (MLflow refuses a change),
    and the changed ones are said in a line."""
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log("MLflow: params keep their first values; changed since: "
            + ", ".join(f"{k}={existing[k]}->{params[k]}" for k in changed))
    from mlflow.entities import Param

    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start:start + _PARAMS_PER_BATCH], synchronous=True)
