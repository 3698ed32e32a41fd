"""Data-parallel modular training on Ray Train (Train V2): checkpointed, restartable, tracked.

    python -m mwt_ray.train --num-workers 2                      # 2 CPU workers (gloo) on this machine
    python -m mwt_ray.train --config c.yaml --set scaling.num_workers=8 --set scaling.use_gpu=true  # NCCL
    RAY_ADDRESS=ray://head:10001 python -m mwt_ray.train ...     # a running cluster

``run_distributed(cfg)`` runs ``train_loop_per_worker`` on ``scaling.num_workers`` Ray Train
workers. Each worker runs the core loop (``training.train_epochs``) on its slice of every global batch
(``train.batch_size`` is the global batch; ``data.iterate_batches`` shards it by rank) with the
model wrapped in DistributedDataParallel. The masks of the whole global batch are all-gathered
with autograd (``training.gather_global_batch``), so cohesion and coupling are the losses over
the global batch, exactly as in one process, and their gradients reach every worker's slice.

BatchNorm: under DDP each worker normalises with the statistics of its own slice of the batch
(running statistics are broadcast from rank 0 at every forward). With few samples per worker this
differs slightly from one process; ``run_distributed(..., sync_batchnorm=True)`` converts the model
to SyncBatchNorm for exact global-batch statistics, which PyTorch only supports on GPUs
(``scaling.use_gpu=true``).

Checkpoints: after every epoch rank 0 writes ``training_state.pt`` (model, optimizer, scheduler,
epoch, metric history, RNG state, the epochs it was resumed from, MLflow run id) and every rank
calls ``ray.train.report`` (only rank 0 attaches the checkpoint).
Storage is ``scaling.storage_path`` (a shared folder or an object-store URI on a multi-node cluster),
by default ``<output_dir>/<name>/checkpoints`` (the layout is in ``jobs.storage``).

With ``scaling.max_failures`` > 0 a dead worker restarts the worker group from the latest
checkpoint. Every run is a new job (its own folder in the run storage, its own MLflow run);
``resume=True`` (``--resume``) continues the latest job of the same ``name`` instead. A job that
fails after starting ends in one line naming the worker that failed first (a worker whose process
died before the workers that then lost their connection to it); the workers' stderr (tracebacks,
Ray's own log lines) goes to ``worker_stderr.log`` in the job's folder instead of the terminal.
``scaling.fail_at_epoch=N`` kills rank 0's process (SIGKILL) once, half-way through epoch N, to
exercise that path (``jobs.fault_drill``).
After training, rank 0 derives the modules and writes the same ``checkpoint.pt``, ``metrics.json``
and ``history.csv`` as single-process training (``jobs.finish_run``).

Before anything trains, bad input stops the job with one line: a global batch not divisible by
the workers, a storage path that cannot be written, a checkpoint to resume whose architecture is
not the config's, an MLflow server that does not answer, and more workers, CPUs or GPUs than the
Ray cluster has (Ray would otherwise wait for them forever).

Rank 0 prints one line per epoch. Ray Train's own logging runs at level WARNING
(``MWT_RAY_TRAIN_LOG_LEVEL=INFO`` for more).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import Config
from ..core.files import atomic_write
from ..core.messages import error_line
from ..jobs import (
    RESULT_FILES,
    JobFailed,
    JobPlan,
    SetupError,
    check_and_plan_job,
    start_job,
    storage_root,
    train_in_process,
)
from ..jobs.storage import KEEP_CHECKPOINTS, RUN_FILE, RunStorage
from .capacity import cluster_room
from .ray_output import ray_output_to
from .ray_session import ray_session
from .runtime_env import worker_runtime_env
from .shared_storage import check_job_places, check_shared_places, job_places
from .worker import loop_config, train_loop_per_worker

__all__ = ["run_distributed", "run_training", "check_cluster_resources", "check_and_plan_distributed_job",
           "describe_failure", "DistributedTrainingError"]


class DistributedTrainingError(JobFailed):
    """Training started but failed more often than ``scaling.max_failures`` allows; ``lost_worker``:
    the last failure was a worker whose process died (a lost node, a kill), not an error of its own."""

    def __init__(self, message: str, lost_worker: bool = False):
        super().__init__(message)
        self.lost_worker = lost_worker

    def __reduce__(self):  # crosses processes (a sweep trial's actor) with its flag
        return type(self), (str(self), self.lost_worker)


def check_cluster_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Raise SetupError unless the running Ray cluster can place every worker now.

    Ray Train would otherwise wait forever for resources that never come.
    """
    room = cluster_room(cpus_per_worker, 1.0 if use_gpu else 0.0)
    if room.count >= num_workers:
        return
    raise SetupError(
        f"scaling asks for {num_workers} worker{'s' if num_workers != 1 else ''} with {room.asked} each, "
        f"but the Ray cluster has {room.have}: room for {room.count}; lower scaling.num_workers or "
        "scaling.cpus_per_worker, or add nodes (Ray would wait forever)"
    )


def check_and_plan_distributed_job(cfg: Config, sync_batchnorm: bool = False, resume: bool = False,
                                   log: Callable[[str], None] | None = print) -> tuple[Config, JobPlan]:
    """``jobs.check_and_plan_job`` for Ray Train workers: every check that needs no Ray cluster,
    before anything is written; returns the config with absolute paths and the job to run (a new
    one, or with ``resume`` the latest job of the name, whose checkpoint must fit the config)."""
    if cfg.scaling.num_workers < 1:
        raise SetupError("scaling.num_workers must be >= 1 for distributed training")
    if sync_batchnorm and not cfg.scaling.use_gpu:
        raise SetupError("SyncBatchNorm needs GPUs (PyTorch has no CPU implementation); set scaling.use_gpu=true")
    cfg, _, plan = check_and_plan_job(cfg, resume, log)
    return cfg, plan


def _dead_ranks(error: BaseException) -> list[int]:
    """The ranks of a failed Ray Train run whose process died (rather than raised an error)."""
    def died(exc) -> bool:
        names = {type(exc).__name__, type(getattr(exc, "health_check_failure", None)).__name__}
        return bool(names & {"WorkerHealthCheckFailedError", "ActorDiedError", "ActorUnavailableError",
                             "WorkerHealthCheckTimeoutError"})

    failures = dict(sorted((getattr(error, "worker_failures", None) or {}).items()))
    return [rank for rank, exc in failures.items() if died(exc)]


def describe_failure(error: BaseException) -> str:
    """One line on why a Ray Train run failed, naming the worker that failed first: a worker whose
    process died is named before the workers that then lost their connection to it."""
    failures = dict(sorted((getattr(error, "worker_failures", None) or {}).items()))
    if failures:
        dead = _dead_ranks(error)
        if dead:
            rank = dead[0]
            pid = re.search(r"pid=(\d+)", str(failures[rank])) or re.search(r"pid: (\d+)", str(failures[rank]))
            others = [r for r in failures if r != rank]
            return (f"worker rank {rank}{f' (pid {pid[1]})' if pid else ''} died: its process was killed or crashed "
                    "(a signal, the out-of-memory killer, a lost node)"
                    + (f"; rank(s) {', '.join(map(str, others))} then failed" if others else ""))
        rank, exc = next(iter(failures.items()))
        base = getattr(exc, "_base_exc", exc)
        kind = "" if isinstance(base, (SetupError, JobFailed)) else f"{type(base).__name__}: "
        return f"worker rank {rank} failed: {kind}{error_line(base, 400)}"
    cause = getattr(error, "controller_failure", None) or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return next(
        (line.strip() for line in lines if "Error" in line or "error" in line),
        lines[0] if lines else type(cause).__name__,
    )


def run_distributed(cfg: Config, log: Callable[[str], None] | None = print, *, sync_batchnorm: bool = False,
                    callbacks: list | None = None, resume: bool = False) -> dict:
    """Train on ``cfg.scaling.num_workers`` Ray Train workers as a new job of ``cfg.name`` (with
    ``resume``: the latest job of that name continues); returns the summary of ``finish_run``.

    Uses the Ray cluster this process is connected to, else ``ray.init()`` (which joins the cluster
    named by ``RAY_ADDRESS`` or starts a local one, shut down again at the end).
    """
    log = log or (lambda line: None)
    cfg, plan = check_and_plan_distributed_job(cfg, sync_batchnorm, resume, log)
    local = plan.storage.is_local
    stderr_log = (
        Path(plan.storage.path) / "worker_stderr.log" if local else cfg.run_dir / f"{plan.job_id}.worker_stderr.log"
    )
    # The redirect lasts until Ray is shut down: Ray forwards the workers' lines asynchronously, and
    # tracebacks of the surviving workers still arrive after the training has failed.
    with ray_output_to(stderr_log):
        return _train_on_ray(cfg, plan, stderr_log, sync_batchnorm, callbacks, log)


def _train_on_ray(cfg: Config, plan: JobPlan, stderr_log: Path, sync_batchnorm: bool, callbacks, log) -> dict:
    with ray_session():
        check_cluster_resources(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
        check_shared_places(job_places(cfg))
        with _job_run(cfg, plan, log) as tracked:
            from ..tracking import resolve_tracking_uri

            start_job(cfg, plan, resolve_tracking_uri(cfg.tracking.tracking_uri) if tracked else None, log)
            log(f"{'resuming' if plan.resumed else 'new'} job {plan.job_id} of {cfg.name!r} (checkpoints in "
                f"{plan.storage.uri}; the workers' stderr goes to {stderr_log})")
            # The state the preflight read to resume from goes to the workers through Ray's object
            # store: read once, not again by every worker from the run storage.
            planned = {"state": ray.put(plan.state), "source": plan.state["source"]} if plan.state else None
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=loop_config(
                    cfg, tracked.info() if tracked else None, sync_batchnorm, plan.storage.uri, planned
                ),
                torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
                scaling_config=ray.train.ScalingConfig(
                    num_workers=cfg.scaling.num_workers,
                    use_gpu=cfg.scaling.use_gpu,
                    resources_per_worker={
                        "CPU": cfg.scaling.cpus_per_worker,
                        **({"GPU": 1} if cfg.scaling.use_gpu else {}),
                    },
                ),
                run_config=ray.train.RunConfig(
                    name=plan.job_id,
                    storage_path=storage_root(cfg),
                    failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                    logging_config=ray.train.LoggingConfig(
                        log_level=os.environ.get("MWT_RAY_TRAIN_LOG_LEVEL", "WARNING")
                    ),
                    worker_runtime_env=worker_runtime_env(),
                    callbacks=callbacks,
                ),
            )
            try:
                result = trainer.fit()
            except ray.train.TrainingFailedError as error:
                raise DistributedTrainingError(
                    f"distributed training failed (scaling.max_failures={cfg.scaling.max_failures}): "
                    f"{describe_failure(error)}; the workers' stderr is in {stderr_log}",
                    lost_worker=bool(_dead_ranks(error))) from None
            _prune_checkpoints(plan.storage)
            summary = _collect_results(result, cfg)
            if tracked:
                summary["mlflow_run_id"] = tracked.run_id
            return summary


def _prune_checkpoints(storage: RunStorage) -> None:
    """Keep the newest ``KEEP_CHECKPOINTS`` checkpoint folders: a driver killed between a checkpoint's
    upload and its registration with Ray Train leaves one more, which the resumed job removes here."""
    for _, old in storage.checkpoint_dirs()[:-KEEP_CHECKPOINTS]:
        try:
            storage.delete_dir(old)
        except OSError:
            pass


def _job_run(cfg: Config, plan: JobPlan, log):
    """The job's MLflow run (continued when the job resumes and names one in the same store), or no run."""
    if not cfg.tracking.enabled:
        return contextlib.nullcontext()
    from ..tracking import open_run, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    run_id = plan.run_info.get("run_id") if plan.run_info.get("tracking_uri") == uri else None
    tracked = open_run(cfg, run_id, tags={"mwt.num_workers": str(cfg.scaling.num_workers), "mwt.job_id": plan.job_id},
                       log=log)
    plan.storage.write_bytes(RUN_FILE, json.dumps(tracked.info()).encode())
    return tracked


def run_training(cfg: Config, *, resume: bool = False, log: Callable[[str], None] = print, report=None,
                 train_callbacks: list | None = None) -> dict:
    """Train as the config says: on ``scaling.num_workers`` Ray Train workers, or in this process
    without Ray when it is 0 (``jobs.train_in_process``, which calls ``report(metrics)`` after every
    epoch). A new job of ``cfg.name`` each time; ``resume=True`` continues the latest job of that name
    (its checkpoint and MLflow run). ``train_callbacks``: Ray Train run callbacks (a sweep trial
    forwards reports to Tune)."""
    check_job_places(cfg)
    if cfg.scaling.num_workers > 0:
        return run_distributed(cfg, log, callbacks=train_callbacks, resume=resume)
    return train_in_process(cfg, resume=resume, log=log, report=report)


def _collect_results(result, cfg: Config) -> dict:
    """Read the summary from the final checkpoint; copy its result files into ``cfg.run_dir`` (they
    are there already when rank 0 ran on this node; an earlier job's when it ran on another)."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise DistributedTrainingError("training finished without a final checkpoint")
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        if not (folder / "metrics.json").exists():
            raise DistributedTrainingError(f"the latest checkpoint {checkpoint.path} holds no metrics.json")
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:  # rank 0 on this node wrote them already; elsewhere, an earlier job's may be here
            atomic_write(cfg.run_dir / name, lambda temporary, source=folder / name: shutil.copy2(source, temporary))
        return json.loads((folder / "metrics.json").read_text())
