"""What one process does with a config: data, device, seeding, a training job, reuse from checkpoints.

The single-process command path and every Ray worker call these same functions; nothing here
imports Ray (``mwt_ray.cluster`` adds Ray on top).
"""
from __future__ import annotations

from ..config import Config
from .reuse_job import reuse_from_checkpoints
from .setup import (RESULT_FILES, JobFailed, SetupError, absolute_paths, architecture, check_job, load_data,
                    resolve_device, seed_everything)
from .storage import RunStorage, job_storage, latest_training_state, storage_root
from .training_job import LocalSession, TrainingJob, finish_run, modularize_model

__all__ = ["SetupError", "JobFailed", "RESULT_FILES", "resolve_device", "seed_everything", "load_data", "architecture",
           "check_job", "absolute_paths", "RunStorage", "job_storage", "latest_training_state", "storage_root",
           "LocalSession", "TrainingJob", "finish_run", "modularize_model", "reuse_from_checkpoints",
           "train_in_process"]


def train_in_process(cfg: Config, *, resume: bool = False, log=print, report=None) -> dict:
    """Train in this process (no Ray), checkpointing every epoch to the run storage; tracked in
    MLflow unless ``tracking.enabled`` is false. ``resume=True`` continues from the latest checkpoint;
    ``report(metrics)`` is called after every epoch."""
    check_job(cfg)
    storage = job_storage(cfg)
    storage.check_writable()
    session = LocalSession(storage, cfg.train.device, resume=resume, report=report)
    if not cfg.tracking.enabled:
        return TrainingJob(cfg, session).run()
    from ..tracking import open_run

    with open_run(cfg, tags={"mwt.num_workers": "0"}, log=log) as tracked:
        return TrainingJob(cfg, session, tracked.info()).run()
