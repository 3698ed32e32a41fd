"""What one process does with a config: data, device, seeding, a training job, reuse from checkpoints.

The single-process command path and every Ray worker call these same functions; nothing here
imports Ray (``mwt_ray.cluster`` adds Ray on top), so a single-process job runs where Ray is not
installed.
"""
from __future__ import annotations

from .fault_drill import FaultDrill
from .job_plan import (
    JobPlan,
    check_destinations,
    job_storage,
    latest_training_state,
    list_jobs,
    plan_job,
    start_job,
    storage_root,
)
from .preflight import check_and_plan_job, check_inputs
from .reuse_job import reuse_from_checkpoints
from .session import TrainingSession
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
from .storage import RunStorage
from .training_job import JobHook, LocalSession, TrainingJob, derive_modules, finish_run, train_in_process

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
    "TrainingSession",
    "LocalSession",
    "JobHook",
    "FaultDrill",
    "TrainingJob",
    "finish_run",
    "derive_modules",
    "reuse_from_checkpoints",
    "train_in_process",
    "check_inputs",
    "check_and_plan_job",
]

