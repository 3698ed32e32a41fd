"""Every check a command makes before it writes anything: one place, one order.

    cfg, data = check_inputs(cfg)                         # sweep, reuse stage: input only
    cfg, data, plan = check_and_plan_job(cfg, resume)     # train, data-parallel train, a sweep's trial

The order is what keeps the promise that a refusal leaves nothing behind: first what the config
says of itself (the data-parallel settings), then the places the job writes (output folder, run
storage, MLflow store; before any data is decoded, so a refused job leaves no dataset cache
either), then the device, then the data (decoded and cached once) against the batch size, then,
for training, the job to run (a new one, or the checkpoint ``--resume`` continues, which must fit
the config). Checks that need a running Ray cluster (resources) come after these, in
``mwt_ray.cluster``.
"""
from __future__ import annotations

from ..config import Config
from ..core.data import ImageData
from .job_plan import JobPlan, check_destinations, plan_job
from .setup import SetupError, absolute_paths, check_job

__all__ = ["check_inputs", "check_and_plan_job"]


def _check_data_parallel(cfg: Config) -> None:
    workers = cfg.scaling.num_workers
    if cfg.train.batch_size % workers:
        raise SetupError(f"train.batch_size {cfg.train.batch_size} is not divisible by scaling.num_workers {workers}: "
                         "every worker must get the same share of the global batch")
    if cfg.scaling.use_gpu and cfg.train.device == "cpu":
        raise SetupError("scaling.use_gpu=true but train.device=cpu; set train.device=auto")
    if not cfg.scaling.use_gpu and cfg.train.device.startswith("cuda"):
        raise SetupError(f"train.device={cfg.train.device} but scaling.use_gpu=false: Ray Train workers get no GPU; "
                         "set scaling.use_gpu=true")


def check_inputs(cfg: Config) -> tuple[Config, ImageData]:
    """The config with absolute local paths (Ray workers run elsewhere) and an absolute MLflow
    tracking URI (for the same reason), and the checked data. Raises SetupError / TrackingError."""
    cfg = absolute_paths(cfg)
    if cfg.scaling.num_workers > 0:
        _check_data_parallel(cfg)
    check_destinations(cfg)
    if cfg.tracking.enabled:
        from ..tracking import resolve_tracking_uri

        cfg.tracking.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    return cfg, check_job(cfg)


def check_and_plan_job(cfg: Config, resume: bool = False, log=print) -> tuple[Config, ImageData, JobPlan]:
    """``check_inputs``, then the training job to run (reading only)."""
    cfg, data = check_inputs(cfg)
    return cfg, data, plan_job(cfg, resume, data.num_classes, log=log)
