"""What one process does with a config: data, device, seeding, a training job, reuse from checkpoints.

The single-process command path and every Ray worker call these same functions; nothing here
imports Ray (``mwt_ray.cluster`` adds Ray on top).
"""
from __future__ import annotations

import json

from ..config import Config
from .preflight import check_inputs, preflight_training
from .reuse_job import reuse_from_checkpoints
from .setup import (
    RESULT_FILES,
    JobFailed,
    SetupError,
    absolute_paths,
    architecture,
    check_job,
    load_data,
    resolve_device,
    seed_everything,
)
from .storage import (
    RUN_FILE,
    JobPlan,
    RunStorage,
    check_destinations,
    job_storage,
    latest_training_state,
    list_jobs,
    plan_job,
    start_job,
    storage_root,
)
from .training_job import LocalSession, TrainingJob, finish_run, modularize_model

__all__ = [
    "SetupError",
    "JobFailed",
    "RESULT_FILES",
    "resolve_device",
    "seed_everything",
    "load_data",
    "architecture",
    "check_job",
    "absolute_paths",
    "RunStorage",
    "job_storage",
    "latest_training_state",
    "storage_root",
    "JobPlan",
    "plan_job",
    "start_job",
    "list_jobs",
    "check_destinations",
    "LocalSession",
    "TrainingJob",
    "finish_run",
    "modularize_model",
    "reuse_from_checkpoints",
    "train_in_process",
    "check_inputs",
    "preflight_training",
]


def train_in_process(cfg: Config, *, resume: bool = False, log=print, report=None) -> dict:
    """Train in this process (no Ray) as a new job of ``cfg.name``, checkpointing every epoch to the
    job's folder; tracked in MLflow unless ``tracking.enabled`` is false. ``resume=True`` continues the
    latest job of that name (its checkpoint and its MLflow run; a new job when there is none);
    ``report(metrics)`` is called after every epoch.

    Every check on the input runs before anything is written (``jobs.preflight``)."""
    cfg, data, plan = preflight_training(cfg, resume, log)
    uri = cfg.tracking.tracking_uri if cfg.tracking.enabled else None
    session = LocalSession(plan.storage, cfg.train.device, resume=plan.resumed, report=report)
    if log:
        log(
            f"{'resuming' if plan.resumed else 'new'} job {plan.job_id} of {cfg.name!r} "
            f"(checkpoints in {plan.storage.uri})"
            + (" - it had finished: writing its results again" if plan.finished else "")
        )
    if not cfg.tracking.enabled:
        start_job(cfg, plan, None, log)
        return TrainingJob(cfg, session, data=data).run()
    from ..tracking import open_run

    run_id = plan.run_info.get("run_id") if plan.run_info.get("tracking_uri") == uri else None
    with open_run(cfg, run_id, tags={"mwt.num_workers": "0", "mwt.job_id": plan.job_id}, log=log) as tracked:
        start_job(cfg, plan, uri, log)
        plan.storage.write_bytes(RUN_FILE, json.dumps(tracked.info()).encode())
        return TrainingJob(cfg, session, tracked.info(), data=data).run()
