"""Data-parallel modular training on Ray Train (Train V2): checkpointed, restartable, tracked.

    python -m mwt_ray.train --num-workers 2                      # 2 CPU workers (gloo) on this machine
    python -m mwt_ray.train --config c.yaml --set scaling.num_workers=8 --set scaling.use_gpu=true  # NCCL
    RAY_ADDRESS=ray://head:10001 python -m mwt_ray.train ...     # a running cluster

``run_distributed(cfg)`` runs ``train_loop_per_worker`` on ``scaling.num_workers`` Ray Train
workers. Each worker runs the core loop (``training.fit``) on its slice of every global batch
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
epoch, metric history, RNG state, the epochs it was resumed from, MLflow run id) and every rank calls ``ray.train.report`` (only
rank 0 attaches the checkpoint). Storage is ``scaling.storage_path`` (a shared folder or an
object-store URI on a multi-node cluster), by default ``<output_dir>/<name>/ray_train``::

    <storage>/<name>/checkpoint_epoch_0003/training_state.pt
    <storage>/<name>/final_<time>/   training_state.pt, checkpoint.pt, metrics.json, history.csv
    <storage>/<name>/mlflow_run.json  the MLflow run of this job

With ``scaling.max_failures`` > 0 a dead worker restarts the worker group from the latest
checkpoint, and re-running a job with the same ``name`` and storage resumes it (so use a new name
for a fresh run). ``scaling.fail_at_epoch=N`` kills rank 0's process (SIGKILL) once, half-way
through epoch N, to exercise that path; a marker file in the storage keeps the restarted attempt
from failing again. After training, rank 0 modularizes and writes the same ``checkpoint.pt``,
``metrics.json`` and ``history.csv`` as single-process training (``train.finish_run``).

Before anything trains, bad input stops the job with one line: a global batch not divisible by
the workers, a storage path that cannot be written, a checkpoint to resume whose architecture is
not the config's, an MLflow server that does not answer, and more workers, CPUs or GPUs than the
Ray cluster has (Ray would otherwise wait for them forever).

Rank 0 prints one line per epoch. Ray Train's own logging runs at level WARNING
(``MWT_RAY_TRAIN_LOG_LEVEL=INFO`` for more).

``train_loop_per_worker`` also runs in a plain process without Ray (world size 1, checkpoints
written straight to the storage folder): ``train_loop_per_worker(loop_config(cfg))``.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .checkpoint import check_architecture, load_checkpoint, save_checkpoint
from .config import Config
from .models import create_model
from .train import JobFailed, architecture, finish_run, load_data, resolve_device, seed_everything
from .training import fit, make_optimizer, make_scheduler, unwrap_ddp

__all__ = ["run_distributed", "train_loop_per_worker", "loop_config", "wrap_model", "SetupError",
           "DistributedTrainingError", "storage_root", "check_cluster_resources", "latest_training_state",
           "TRAINING_STATE"]

TRAINING_STATE = "training_state.pt"
RUN_FILE = "mlflow_run.json"
KEEP_CHECKPOINTS = 2


class SetupError(ValueError):
    """Bad input found before training starts (one line)."""


class DistributedTrainingError(JobFailed):
    """Training started but failed more often than ``scaling.max_failures`` allows."""


# --------------------------------------------------------------------------- storage

class _Storage:
    """The job's folder in the run storage: a local path or a pyarrow URI (s3://, gs://, ...)."""

    def __init__(self, path_or_uri: str):
        import pyarrow.fs as pafs

        self._pafs = pafs
        if "://" in path_or_uri:
            self.fs, self.path = pafs.FileSystem.from_uri(path_or_uri)
        else:
            self.fs, self.path = pafs.LocalFileSystem(), str(Path(path_or_uri).expanduser().resolve())
        self.uri = path_or_uri

    def _join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def check_writable(self) -> None:
        probe = self._join(f".write_probe_{os.getpid()}_{time.time_ns()}")
        try:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as error:  # PermissionError, NotADirectoryError, cloud auth errors, ...
            reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
            raise SetupError(f"run storage {self.uri} is not writable ({reason}); set scaling.storage_path "
                             "to a writable folder or URI") from None

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._join(name)).type != self._pafs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self._join(name)) as stream:
            return stream.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(self._join(name)) as stream:
            stream.write(data)

    def checkpoint_dirs(self) -> list[tuple[float, str]]:
        """(mtime of training_state.pt, folder name) of every checkpoint folder, oldest first."""
        selector = self._pafs.FileSelector(self.path, allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            if info.type == self._pafs.FileType.Directory and info.base_name.startswith(("checkpoint_", "final_")):
                state = self.fs.get_file_info(f"{info.path}/{TRAINING_STATE}")
                if state.type == self._pafs.FileType.File:
                    found.append((state.mtime.timestamp() if state.mtime else 0.0, info.base_name))
        return sorted(found)

    def upload_dir(self, local_dir: str | Path, name: str) -> None:
        target = self._join(name)
        self.fs.create_dir(target, recursive=True)
        self._pafs.copy_files(str(local_dir), target, source_filesystem=self._pafs.LocalFileSystem(),
                              destination_filesystem=self.fs)

    def delete_dir(self, name: str) -> None:
        self.fs.delete_dir(self._join(name))


def storage_root(cfg: Config) -> str:
    """``scaling.storage_path``, or ``<output_dir>/<name>/ray_train`` as an absolute path."""
    if cfg.scaling.storage_path:
        root = cfg.scaling.storage_path
        return root if "://" in root else str(Path(root).expanduser().resolve())
    return str((cfg.run_dir / "ray_train").resolve())


def _experiment(cfg: Config) -> _Storage:
    root = storage_root(cfg)
    return _Storage(f"{root.rstrip('/')}/{cfg.name}")


def latest_training_state(storage: _Storage | str) -> dict | None:
    """The newest ``training_state.pt`` in a job's storage folder, or None."""
    storage = _Storage(storage) if isinstance(storage, str) else storage
    folders = storage.checkpoint_dirs()
    if not folders:
        return None
    name = folders[-1][1]
    data = storage.read_bytes(f"{name}/{TRAINING_STATE}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise SetupError(f"checkpoint {storage.uri}/{name}/{TRAINING_STATE} cannot be read ({error}); "
                         "delete it or use a new name") from None
    state["source"] = f"{storage.uri}/{name}"
    return state


def _check_resume(state: dict, cfg: Config, num_classes: int | None = None) -> None:
    source = f"checkpoint to resume ({state.get('source', 'run storage')})"
    try:
        check_architecture(state, cfg.model.name, cfg.model.width, num_classes, source=source)
    except ValueError as error:
        raise SetupError(f"{error}; use a new name or delete the run storage") from None
    if bool(state["architecture"].get("modular")) != cfg.train.modular:
        kind = "modular" if state["architecture"].get("modular") else "standard"
        raise SetupError(f"{source} is from {kind} training, but train.modular={cfg.train.modular}; "
                         "use a new name or delete the run storage")


# --------------------------------------------------------------------------- worker side

def _ray_context():
    """Ray Train's context inside a training worker, None in a plain process."""
    try:
        import ray.train

        return ray.train.get_context()
    except (ImportError, RuntimeError):
        return None


def wrap_model(model: nn.Module, sync_batchnorm: bool = False) -> nn.Module:
    """``ray.train.torch.prepare_model``: to the worker's device, and DDP when world size > 1.

    DDP forwards keyword arguments, so ``model(x, return_masks=True)`` returns (logits, masks)
    as the bare model does; ``checkpoint.save_checkpoint`` and ``unwrap`` get the bare module.
    """
    import ray.train.torch

    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # find_unused_parameters stays False: a modular model uses every generator at every step.
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _wait_until_registered(storage: _Storage, folder_name: str, timeout_s: float = 30.0) -> None:
    """Wait until Ray Train's controller has registered checkpoint ``folder_name``.

    ``ray.train.report`` returns once the checkpoint is uploaded, but the controller registers it
    when it next polls the worker; a worker killed before that poll loses the checkpoint. Fault
    injection waits for the registration (visible in the controller's snapshot file) so that the
    injected failure always resumes from the previous epoch. Real failures can hit that window:
    then the epoch is trained again, and MLflow keeps the values it logged first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = storage.read_bytes("checkpoint_manager_snapshot.json") or b""
        if folder_name.encode() in snapshot:
            return
        time.sleep(0.1)


def _fault_hook(storage: _Storage, fail_at_epoch: int, start_epoch: int, steps_per_epoch: int,
                log: Callable[[str], None], in_ray: bool):
    """An optimizer step hook that SIGKILLs this process once, half-way through ``fail_at_epoch``."""
    marker = f".fault_injected_epoch_{fail_at_epoch}"
    kill_step = max(1, steps_per_epoch // 2)
    done = 0

    def hook(optimizer, args, kwargs):
        nonlocal done
        done += 1
        epoch = start_epoch + (done - 1) // steps_per_epoch + 1
        step = (done - 1) % steps_per_epoch + 1
        if epoch == fail_at_epoch and step == kill_step and not storage.exists(marker):
            if in_ray and epoch > 1:
                _wait_until_registered(storage, f"checkpoint_epoch_{epoch - 1:04d}")
            storage.write_bytes(marker, f"killed pid {os.getpid()} at epoch {epoch} step {step}\n".encode())
            log(f"fault injection: killing worker pid {os.getpid()} at epoch {epoch}, step {step}/{steps_per_epoch}")
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def loop_config(cfg: Config, tracking: dict | None = None, sync_batchnorm: bool = False) -> dict:
    """The ``train_loop_config`` of ``train_loop_per_worker``: plain JSON-like values only."""
    return {"config": cfg.model_dump(mode="json"), "experiment": _experiment(cfg).uri,
            "tracking": tracking, "sync_batchnorm": sync_batchnorm}


def _absolute(cfg: Config) -> Config:
    """A copy whose local paths are absolute: Ray workers run in another working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.scaling.storage_path and "://" not in cfg.scaling.storage_path:
        cfg.scaling.storage_path = str(Path(cfg.scaling.storage_path).expanduser().resolve())
    return cfg


def train_loop_per_worker(config: dict) -> dict | None:
    """One worker of a data-parallel job (or the whole job in a plain process without Ray).

    ``config``: from ``loop_config``. Returns the run summary on rank 0, None on other ranks.
    """
    cfg = Config.model_validate(config["config"])
    storage = _Storage(config["experiment"])
    context = _ray_context()
    if context is not None:
        import ray.train
        import ray.train.torch

        rank, world_size = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
        if isinstance(device, list):
            device = device[0]
    else:
        rank, world_size = 0, 1
        device = resolve_device(cfg.train.device)

    def log(line: str) -> None:
        if rank == 0:  # not print(): Ray Train's print patch shows each printed line twice
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    if cfg.train.batch_size % world_size:
        raise SetupError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world_size} workers")
    data = load_data(cfg).to(device)
    seed_everything(cfg.train.seed)
    model = create_model(cfg.model.name, data.num_classes, cfg.model.width, cfg.train.modular).to(device)
    settings = cfg.train.optim_settings()
    optimizer = make_optimizer(model, settings)
    scheduler = make_scheduler(optimizer, settings)
    arch = architecture(cfg, data)

    if context is not None:
        checkpoint = ray.train.get_checkpoint()
        state = None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state = load_checkpoint(Path(folder) / TRAINING_STATE, map_location="cpu")
                state["source"] = checkpoint.path
    else:
        state = latest_training_state(storage)
    history: list[dict] = []
    start_epoch = 0
    resumes: list[int] = []  # the epochs this job was resumed from (after failures or re-runs)
    if state is not None:
        _check_resume(state, cfg, data.num_classes)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        _set_rng_state(state["rng"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        resumes = list(state.get("resumes", [])) + [start_epoch]
        planned = (state.get("config") or {}).get("train", {}).get("epochs")
        if planned is not None and planned != settings.epochs:
            log(f"warning: the checkpoint was trained for train.epochs={planned}, now {settings.epochs}; the "
                "learning-rate schedule continues from the checkpoint's (cosine over the old epoch count)")
        log(f"resuming from epoch {start_epoch} ({state['source']})")

    if context is not None and world_size > 1:
        model = wrap_model(model, config.get("sync_batchnorm", False))
    tracked = None
    if rank == 0 and config.get("tracking"):
        from .tracking import MlflowRun

        tracked = MlflowRun.from_info(config["tracking"])
        backfilled = tracked.log_history(history)  # epochs checkpointed but not logged before a crash
        if backfilled:
            log(f"MLflow: logged {backfilled} checkpointed epoch(s) the run was missing")
    if cfg.scaling.fail_at_epoch and rank == 0:
        steps = len(data.train_labels) // cfg.train.batch_size
        optimizer.register_step_post_hook(_fault_hook(storage, cfg.scaling.fail_at_epoch, start_epoch, steps, log,
                                                            in_ray=context is not None))

    def save_state(folder: Path, epoch: int) -> None:
        save_checkpoint(folder / TRAINING_STATE, model, arch, optimizer_state=optimizer.state_dict(),
                        scheduler_state=scheduler.state_dict(), epoch=epoch, history=history,
                        rng=_rng_state(), resumes=resumes, config=cfg.model_dump(mode="json"),
                        mlflow_run_id=(config.get("tracking") or {}).get("run_id"))

    def persist(folder_name: str, fill: Callable[[Path], None], metrics: dict) -> None:
        """Rank 0 fills a folder; Ray Train (or the plain process) stores it as a checkpoint."""
        with tempfile.TemporaryDirectory(prefix="mwt_ckpt_") as scratch:
            if rank == 0:
                fill(Path(scratch))
            if context is not None:
                from ray.train import Checkpoint

                checkpoint = Checkpoint.from_directory(scratch) if rank == 0 else None
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=folder_name)
            else:
                storage.upload_dir(scratch, folder_name)
                for _, old in storage.checkpoint_dirs()[:-KEEP_CHECKPOINTS]:
                    storage.delete_dir(old)

    def on_epoch_end(epoch: int, metrics: dict) -> None:
        history.append(metrics)
        persist(f"checkpoint_epoch_{epoch + 1:04d}", lambda folder: save_state(folder, epoch + 1), metrics)
        if tracked is not None:  # after the checkpoint: a crash in between is backfilled on resume
            tracked.log_epoch(metrics)

    if start_epoch < settings.epochs:
        kind = "modular" if cfg.train.modular else "standard"
        log(f"{kind} training of {cfg.model.name} (width {cfg.model.width}) on {cfg.data.name} with {world_size} "
            f"worker(s) on {device}: {len(data.train_labels)} train images, global batch {cfg.train.batch_size}, "
            f"epochs {start_epoch + 1}..{settings.epochs}")
    fit(model, data, settings, device, optimizer=optimizer, scheduler=scheduler, start_epoch=start_epoch,
        on_epoch_end=on_epoch_end, log=log)
    if not history:
        raise SetupError("no epoch was trained and the checkpoint holds no history")

    summary = None

    def finish(folder: Path) -> None:
        nonlocal summary
        summary = finish_run(unwrap_ddp(model), data, cfg, device, history, log=log)
        if tracked is not None:
            names = tracked.log_results(cfg.run_dir, title=f"{cfg.name}: {cfg.model.name} on {cfg.data.name}")
            log(f"MLflow: uploaded {', '.join(names)} to run {tracked.run_id}")
        save_state(folder, len(history))
        for name in ("checkpoint.pt", "metrics.json", "history.csv"):
            shutil.copy2(cfg.run_dir / name, folder / name)

    persist(f"final_{time.strftime('%Y%m%d-%H%M%S')}_{len(history):04d}", finish, history[-1])
    return summary


# --------------------------------------------------------------------------- driver side

def check_cluster_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Raise SetupError unless the running Ray cluster can place every worker now.

    Ray Train would otherwise wait forever for resources that never come.
    """
    import ray

    need = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    room = sum(min(math.floor(res.get(key, 0.0) / amount + 1e-9) for key, amount in need.items()) for res in nodes)
    if room >= num_workers:
        return
    total = ray.cluster_resources()
    asked = f"{cpus_per_worker:g} CPU" + (" and 1 GPU" if use_gpu else "")
    have = f"{total.get('CPU', 0):g} CPUs" + (f" and {total.get('GPU', 0):g} GPUs" if use_gpu else "")
    raise SetupError(f"scaling asks for {num_workers} workers with {asked} each, but the Ray cluster has {have} "
                     f"on {len(nodes)} node(s): room for {room}; lower scaling.num_workers or "
                     "scaling.cpus_per_worker, or add nodes (Ray would wait forever)")


def _worker_runtime_env() -> dict | None:
    """Environment for the workers: this source tree on PYTHONPATH when mwt_ray is not an
    installed package, and the driver's MLFLOW_* variables (server credentials, TLS settings)."""
    env = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    parent = Path(__file__).resolve().parent.parent
    if not ("site-packages" in parent.parts or "dist-packages" in parent.parts):
        paths = [str(parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return {"env_vars": env} if env else None


def preflight(cfg: Config, sync_batchnorm: bool = False) -> tuple[Config, _Storage]:
    """Every check that needs no Ray cluster; returns the config with absolute paths."""
    cfg = _absolute(cfg)
    workers = cfg.scaling.num_workers
    if workers < 1:
        raise SetupError("scaling.num_workers must be >= 1 for distributed training")
    if cfg.train.batch_size % workers:
        raise SetupError(f"train.batch_size {cfg.train.batch_size} is not divisible by scaling.num_workers {workers}: "
                         "every worker must get the same share of the global batch")
    if sync_batchnorm and not cfg.scaling.use_gpu:
        raise SetupError("SyncBatchNorm needs GPUs (PyTorch has no CPU implementation); set scaling.use_gpu=true")
    if cfg.scaling.use_gpu and cfg.train.device == "cpu":
        raise SetupError("scaling.use_gpu=true but train.device=cpu; set train.device=auto")
    if not cfg.scaling.use_gpu and cfg.train.device.startswith("cuda"):
        raise SetupError(f"train.device={cfg.train.device} but scaling.use_gpu=false: Ray Train workers get no GPU; "
                         "set scaling.use_gpu=true")
    storage = _experiment(cfg)
    storage.check_writable()
    state = latest_training_state(storage)
    if state is not None:
        _check_resume(state, cfg)
    if cfg.tracking.enabled:
        from .tracking import check_store, resolve_tracking_uri

        check_store(resolve_tracking_uri(cfg.tracking.tracking_uri))
    return cfg, storage


def run_distributed(cfg: Config, log: Callable[[str], None] | None = print, *, sync_batchnorm: bool = False) -> dict:
    """Train on ``cfg.scaling.num_workers`` Ray Train workers; returns the summary of ``finish_run``.

    Uses the Ray cluster this process is connected to, else ``ray.init()`` (which joins the cluster
    named by ``RAY_ADDRESS`` or starts a local one, shut down again at the end).
    """
    log = log or (lambda line: None)
    cfg, storage = preflight(cfg, sync_batchnorm)
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    started = not ray.is_initialized()
    if started:
        ray.init()
    tracked = None
    try:
        check_cluster_resources(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
        if cfg.tracking.enabled:
            from .tracking import open_run, resolve_tracking_uri

            previous = storage.read_bytes(RUN_FILE)
            previous = json.loads(previous) if previous else {}
            uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
            run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
            tracked = open_run(cfg, run_id, tags={"mwt.num_workers": str(cfg.scaling.num_workers)}, log=log)
            storage.write_bytes(RUN_FILE, json.dumps(tracked.info()).encode())
        resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config(cfg, tracked.info() if tracked else None, sync_batchnorm),
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=cfg.name, storage_path=storage_root(cfg),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                logging_config=ray.train.LoggingConfig(log_level=os.environ.get("MWT_RAY_TRAIN_LOG_LEVEL", "WARNING")),
                worker_runtime_env=_worker_runtime_env()),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            cause = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
            raise DistributedTrainingError(
                f"distributed training failed (scaling.max_failures={cfg.scaling.max_failures}): {cause.strip()}") from error
        summary = _collect_results(result, cfg)
    except BaseException as error:
        if tracked is not None:
            tracked.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    if tracked is not None:
        tracked.end("FINISHED")
    return summary


def _collect_results(result, cfg: Config) -> dict:
    """Read the summary from the final checkpoint; copy the result files into ``cfg.run_dir``
    when rank 0 ran on another node."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise DistributedTrainingError("training finished without a final checkpoint")
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        if not (folder / "metrics.json").exists():
            raise DistributedTrainingError(f"the latest checkpoint {checkpoint.path} holds no metrics.json")
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoint.pt", "metrics.json", "history.csv"):
            if not (cfg.run_dir / name).exists():
                shutil.copy2(folder / name, cfg.run_dir / name)
        return json.loads((folder / "metrics.json").read_text())
