"""Which job a command runs: a new one, or with ``--resume`` the latest of its name, and the checks
that decide it (the checkpoint to resume fits the config, the destinations can be written).

Every run of ``python -m mwt_ray.train`` is a *job* with its own folder in the run storage
(``jobs.storage`` has the layout), so running a name again trains again, and ``--resume`` continues
the latest job of that name.
"""
from __future__ import annotations

import io
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..core.checkpoint import check_architecture, check_checkpoint
from ..core.files import writable_folder_error
from ..core.messages import error_line
from .setup import SetupError
from .stale_runs import fail_stale_runs
from .storage import JOB_FILE, RUN_FILE, TRAINING_STATE, RunStorage

__all__ = ["storage_root", "new_job_id", "job_storage", "list_jobs", "latest_training_state", "check_resume",
           "check_destinations", "JobPlan", "plan_job", "start_job"]


def storage_root(cfg: Config) -> str:
    """The folder of every job of ``cfg.name``: ``scaling.storage_path/<name>``, or
    ``<output_dir>/<name>/jobs`` as an absolute path."""
    if cfg.scaling.storage_path:
        root = cfg.scaling.storage_path
        root = root if "://" in root else str(Path(root).expanduser().resolve())
        return f"{root.rstrip('/')}/{cfg.name}"
    return str((cfg.run_dir / "jobs").resolve())


def new_job_id() -> str:
    """``job-<date>-<time>-<microseconds>``: job ids sort by start time."""
    now = time.time()
    return f"job-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{int(now % 1 * 1e6):06d}"


def job_storage(cfg: Config, job_id: str) -> RunStorage:
    """The folder of one job: ``<storage root>/<job id>``."""
    return RunStorage(f"{storage_root(cfg).rstrip('/')}/{job_id}")


def list_jobs(cfg: Config) -> list[str]:
    """The ids of every job of ``cfg.name`` in the run storage, oldest first."""
    return RunStorage(storage_root(cfg)).subfolders("job-")


def _read_state(storage: RunStorage, name: str) -> dict:
    data = storage.read_bytes(f"{name}/{TRAINING_STATE}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def latest_training_state(storage: RunStorage | str) -> dict | None:
    """The newest readable ``training_state.pt`` in a job's folder, or None when it has none."""
    storage = RunStorage(storage) if isinstance(storage, str) else storage
    folders = storage.checkpoint_dirs()
    failure = None
    for _, name in reversed(folders):
        try:
            state = _read_state(storage, name)
        except Exception as error:  # damaged by hand or by the file system: try the one before
            failure = failure or (name, error)
            continue
        if not isinstance(state, dict) or not {"architecture", "model_state", "epoch"} <= set(state):
            failure = failure or (name, ValueError("not a training state"))
            continue
        state["source"] = f"{storage.uri}/{name}"
        return state
    if failure:
        name, error = failure
        reason = error_line(error, 200)
        raise SetupError(f"checkpoint {storage.uri}/{name}/{TRAINING_STATE} cannot be read ({reason}); "
                         "start a new job (without --resume) or delete it")
    return None


def check_resume(state: dict, cfg: Config, num_classes: int | None = None) -> None:
    source = f"checkpoint to resume ({state.get('source', 'run storage')})"
    try:
        check_architecture(state, cfg.model.name, cfg.model.width, num_classes, source=source)
    except (ValueError, KeyError, TypeError) as error:
        raise SetupError(f"{error}; run without --resume to start a new job") from None
    if state["architecture"].get("method") != cfg.train.method:
        raise SetupError(f"{source} is from {state['architecture'].get('method')} training, but "
                         f"train.method={cfg.train.method}; "
                         "run without --resume to start a new job")
    try:  # the whole checkpoint: weights against the architecture (on the meta device), finite values
        check_checkpoint(state, source)
    except ValueError as error:
        raise SetupError(f"{error}; run without --resume to start a new job") from None


def check_destinations(cfg: Config) -> None:
    """Where the job will write, checked before any data is decoded (so that a failing check leaves no
    dataset cache behind either): the output folder, the run storage and the MLflow store."""
    reason = writable_folder_error(cfg.run_dir)
    if reason:
        raise SetupError(
            f"output_dir {cfg.output_dir!r} cannot be written ({reason}); set output_dir to a writable folder"
        )
    RunStorage(storage_root(cfg)).check_writable()
    if cfg.tracking.enabled:
        from ..tracking import check_store, resolve_tracking_uri

        check_store(resolve_tracking_uri(cfg.tracking.tracking_uri))


@dataclass
class JobPlan:
    """What a job will be, decided before anything is written (``plan_job``)."""
    job_id: str
    storage: RunStorage
    resumed: bool
    state: dict | None = None  # the training state it resumes from
    run_info: dict = field(default_factory=dict)  # its MLflow run so far (tracking_uri, run_id)
    finished: bool = False


def plan_job(cfg: Config, resume: bool, num_classes: int | None = None, log=print) -> JobPlan:
    """Decide the job, reading only: a new one, or with ``resume`` the latest job of ``cfg.name``
    (a new one when there is none). Raises SetupError when the checkpoint to resume does not fit
    the config (another model, width or class count); that the storage can be written is
    ``check_destinations``' part of the preflight (``jobs.preflight``)."""
    jobs = list_jobs(cfg) if resume else []
    if resume and not jobs and log:
        log(f"--resume: no earlier job named {cfg.name!r} in {storage_root(cfg)}; starting a new job")
    plan = JobPlan(jobs[-1], job_storage(cfg, jobs[-1]), True) if jobs else JobPlan(new_job_id(), None, False)
    if plan.storage is None:
        plan.storage = job_storage(cfg, plan.job_id)
        return plan
    plan.state = latest_training_state(plan.storage)
    if plan.state is not None:
        check_resume(plan.state, cfg, num_classes)
    plan.finished = any(name.startswith("final_") for _, name in plan.storage.checkpoint_dirs())
    raw = plan.storage.read_bytes(RUN_FILE)
    try:
        plan.run_info = json.loads(raw) if raw else {}
    except ValueError:
        plan.run_info = {}
    return plan


def start_job(cfg: Config, plan: JobPlan, tracking_uri: str | None = None, log=print) -> None:
    """Write the job's record; a new job also marks FAILED the MLflow runs that earlier jobs of the
    same name left RUNNING (their process was killed without a chance to end them)."""
    record = {"job_id": plan.job_id, "name": cfg.name, "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "num_workers": cfg.scaling.num_workers,
              "resumed": plan.resumed}
    plan.storage.write_bytes(JOB_FILE, json.dumps(record, indent=1).encode())
    if not plan.resumed and tracking_uri is not None:
        earlier = {job_id: job_storage(cfg, job_id) for job_id in list_jobs(cfg) if job_id != plan.job_id}
        fail_stale_runs(earlier, tracking_uri, log)
