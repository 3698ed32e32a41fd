"""One rank of a data-parallel job on Ray Train: the same ``jobs.TrainingJob`` as one process, with
Ray Train's context (rank, device), its checkpoints and DistributedDataParallel.

``train_loop_per_worker`` also runs in a plain process outside a Ray Train worker group (world
size 1, checkpoints written straight to the storage folder): ``train_loop_per_worker(loop_config(cfg))``.
The command's single-process path does not come here (``jobs.train_in_process``, no Ray at all).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from torch import nn

from ..config import Config
from ..core.checkpoint import load_checkpoint
from ..jobs import LocalSession, RunStorage, TrainingJob, latest_training_state, plan_job
from ..jobs.fault_drill import FaultDrill
from ..jobs.storage import TRAINING_STATE

__all__ = ["train_loop_per_worker", "loop_config", "wrap_model", "RayTrainSession", "wait_until_registered"]


def wrap_model(model: nn.Module, sync_batchnorm: bool = False) -> nn.Module:
    """``ray.train.torch.prepare_model``: to the worker's device, and DDP when world size > 1.

    DDP forwards keyword arguments, so ``model(x, return_masks=True)`` returns (logits, masks)
    as the bare model does; ``checkpoint.save_checkpoint`` and ``unwrap_ddp`` get the bare module.
    """
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # find_unused_parameters stays False: a modular model uses every generator at every step.
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


class RayTrainSession:
    """A rank of a Ray Train worker group (a ``jobs.TrainingSession``): rank 0 attaches checkpoints,
    every rank reports.

    ``planned``: the training state the driver's preflight read to resume from, in Ray's object
    store (``{"state": ObjectRef, "source": its folder}``), so that the workers need not read the
    run storage (an object store's download) again; None when it read none."""

    report = None  # a sweep trial's Tune sees rank 0's ray.train.report through its TuneReportCallback

    def __init__(self, context, storage: RunStorage, sync_batchnorm: bool = False, planned: dict | None = None):
        self.storage, self.sync_batchnorm, self.planned = storage, sync_batchnorm, planned
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
        self.device = device[0] if isinstance(device, list) else device

    def resume_state(self) -> dict | None:
        """The checkpoint Ray Train restores (after a worker failure, or a resumed job's latest
        registered one), else the newest one in the job's folder: the driver's when that is still
        the newest, else read here (a failed attempt may have stored a newer one)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state = load_checkpoint(Path(folder) / TRAINING_STATE, map_location="cpu")
            state["source"] = checkpoint.path
            return state
        folders = self.storage.checkpoint_dirs()
        newest = f"{self.storage.uri}/{folders[-1][1]}" if folders else None
        if self.planned is not None and self.planned["source"] == newest:
            return ray.get(self.planned["state"])
        return latest_training_state(self.storage)

    def wrap(self, model: nn.Module) -> nn.Module:
        return wrap_model(model, self.sync_batchnorm) if self.world_size > 1 else model

    def persist(self, folder: Path, folder_name: str, metrics: dict) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if self.rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=folder_name)


def wait_until_registered(storage: RunStorage, folder_name: str, timeout_s: float = 30.0) -> None:
    """Wait until Ray Train's controller has registered checkpoint ``folder_name``: the fault drill's
    ``wait_for_checkpoint`` on Ray Train.

    ``ray.train.report`` returns once the checkpoint is uploaded, but the controller registers it
    when it next polls the worker; a worker killed before that poll loses the checkpoint. The drill
    waits for the registration (visible in the controller's snapshot file, Ray's internal format,
    hence only here) so that the injected failure always resumes from the previous epoch. Real
    failures can hit that window: then the epoch is trained again, and MLflow keeps the values it
    logged first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if folder_name.encode() in (storage.read_bytes("checkpoint_manager_snapshot.json") or b""):
            return
        time.sleep(0.1)


def loop_config(cfg: Config, tracking: dict | None = None, sync_batchnorm: bool = False,
                storage_uri: str | None = None, planned_state=None) -> dict:
    """The ``train_loop_config`` of ``train_loop_per_worker``: plain JSON-like values, and the
    training state the driver read to resume from (``RayTrainSession``'s ``planned``), if any.
    ``storage_uri``: the job's folder; by default the latest job of ``cfg.name`` (a new one if none)."""
    if storage_uri is None:
        storage_uri = plan_job(cfg, resume=True, log=None).storage.uri
    return {"config": cfg.model_dump(mode="json"), "experiment": storage_uri,
            "tracking": tracking, "sync_batchnorm": sync_batchnorm, "planned_state": planned_state}


def _quiet_ray_train_reports() -> None:
    """Ray Train logs "Reporting training result ..." at INFO on every rank for every report, from a
    logger named after its file (outside the ``ray.train`` logger that ``LoggingConfig`` sets).
    Imported here, not at the top: a private module whose path changes between Ray versions, and
    the worker must run without it."""
    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


def _ray_context():
    """Ray Train's context inside a training worker, None in a plain process."""
    try:
        return ray.train.get_context()
    except RuntimeError:
        return None


def train_loop_per_worker(config: dict) -> dict | None:
    """One worker of a data-parallel job (or the whole job in a plain process without Ray).

    ``config``: from ``loop_config``. Returns the run summary on rank 0, None on other ranks.
    """
    cfg = Config.model_validate(config["config"])
    storage = RunStorage(config["experiment"])
    context = _ray_context()
    if context is not None:
        _quiet_ray_train_reports()
        session = RayTrainSession(context, storage, config.get("sync_batchnorm", False), config.get("planned_state"))
    else:
        session = LocalSession(storage, cfg.train.device, state=latest_training_state(storage))
    drill = cfg.scaling.fail_at_epoch
    hooks = [FaultDrill(drill, wait_for_checkpoint=wait_until_registered if context else None)] if drill else []
    return TrainingJob(cfg, session, config.get("tracking"), hooks=hooks).run()
