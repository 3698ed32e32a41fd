"""A training job, the same in one process and on every Ray Train worker: train, checkpoint every
epoch, resume, derive the modules, write the results.

    TrainingJob(cfg, LocalSession(job_storage(cfg, job_id))).run()   # one process, a fresh start in the job's folder

``TrainingJob.run`` reads top to bottom: build the model, ``resume`` from the session's state to
resume from, train with ``end_epoch`` after every epoch (``persist`` a checkpoint, then log the
epoch to MLflow), and ``finish``: derive the modules, write ``checkpoint.pt`` / ``metrics.json`` /
``history.csv`` and persist them as the final checkpoint. A *session* (``jobs.session.TrainingSession``)
says where the job runs: ``LocalSession`` (this process, world size 1) or
``cluster.worker.RayTrainSession`` (one rank of a Ray Train worker group, checkpoints reported to
Ray Train). *Job hooks* run once the job is ready to train (the fault drill, ``jobs.fault_drill``).

``train_in_process`` is the whole single-process job: the preflight, then a ``TrainingJob`` with a
``LocalSession``, in the job's MLflow run.
"""
from __future__ import annotations

import csv
import io
import json
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..core.checkpoint import load_weights, save_checkpoint
from ..core.data import ImageData, iterate_batches, place_data
from ..core.files import atomic_write_text, remove_stale_scratch, scratch_folder
from ..core.graph import conv_columns, uncovered_kernels
from ..core.kernel_usage import count_kernel_usage, modularity_report, module_masks
from ..core.methods import get_method
from ..core.models import create_model
from ..core.module_stats import parameter_shares
from ..core.training import make_optimizer, make_scheduler, prepare_model, train_epochs, unwrap_ddp
from .fault_drill import FaultDrill
from .job_plan import check_resume, start_job
from .preflight import check_and_plan_job
from .session import TrainingSession
from .setup import RESULT_FILES, SetupError, architecture, load_data, resolve_device, seed_everything
from .storage import KEEP_CHECKPOINTS, RUN_FILE, TRAINING_STATE, RunStorage

__all__ = ["TrainingJob", "JobHook", "LocalSession", "derive_modules", "finish_run", "train_in_process"]


def derive_modules(model, data: ImageData, cfg: Config, device: torch.device):
    """Kernel usage over the (un-augmented) training set, module masks at tau, and their metrics: KRR,
    cohesion, coupling, and the one-class modules' weight share and overlap (``core.module_stats``),
    the same for every method."""
    from ..core.progress import progress

    batches = progress(iterate_batches(data.train_images, data.train_labels, 512, mean=data.mean, std=data.std),
                       len(data.train_labels), "modularizing: counting kernel usage", count=lambda batch: len(batch[1]))
    usage = count_kernel_usage(model, batches, data.num_classes, device,
                               max_samples_per_class=cfg.modularize.cohesion_samples_per_class)
    masks = module_masks(usage, cfg.modularize.tau)
    report = modularity_report(usage, masks, uncovered_kernels=uncovered_kernels(model),
                               conv_columns=conv_columns(model), tau=cfg.modularize.tau,
                               taus=cfg.modularize.report_taus)
    shares = parameter_shares(unwrap_ddp(model), masks, torch.zeros(1, *data.train_images.shape[1:]))
    return usage, masks, report | {key: value for key, value in shares.items() if key != "per_class_share"}


def _write_results(run_dir: Path, history: list[dict], summary: dict) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "history.csv", table.getvalue())
    atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2))


def finish_run(model, data: ImageData, cfg: Config, device: torch.device, history: list[dict],
               log=print, mlflow_run_id: str | None = None) -> dict:
    """Derive the modules (modular runs), then write ``RESULT_FILES`` into ``cfg.run_dir``; returns the summary.
    ``mlflow_run_id`` goes into the checkpoint, so a reuse evaluation of it logs to the same run."""
    summary = {"config": cfg.model_dump(), "final": history[-1], "epochs": len(history)}
    extra = {"config": cfg.model_dump(), "history": history, "mlflow_run_id": mlflow_run_id}
    if cfg.train.modular:
        usage, masks, report = derive_modules(model, data, cfg, device)
        summary["modules"] = report
        extra |= {"kernel_usage": usage.state_dict(), "module_masks": masks, "tau": cfg.modularize.tau}
        if log:
            log(
                f"modules at tau={cfg.modularize.tau}: KRR {report['krr']:.3f}  "
                f"cohesion {report.get('cohesion', float('nan')):.3f}  "
                f"coupling {report['coupling']:.3f}  weight share {report['weight_share']:.3f} "
                f"(conv {report['weight_share_conv']:.3f})  overlap {report['overlap']:.3f}  per-layer KRR "
                + " ".join(f"{v:.2f}" for v in report["layer_krr"])
            )
    save_checkpoint(cfg.run_dir / "checkpoint.pt", model, architecture(cfg, data), **extra)
    _write_results(cfg.run_dir, history, summary)
    if log:
        log(
            f"test accuracy {history[-1]['test_accuracy']:.2%}; "
            f"wrote {', '.join(RESULT_FILES)} to {cfg.run_dir.resolve()}"
        )
    return summary


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


class LocalSession:
    """A job in this process (a ``TrainingSession``): world size 1, checkpoints written straight to
    the run storage.

    ``state``: the training state to resume from (``JobPlan.state``, already read by the preflight),
    None to start from scratch. ``report(metrics)`` runs after each epoch is checkpointed and logged
    (a sweep trial reports to Tune)."""

    rank, world_size = 0, 1

    def __init__(self, storage: RunStorage, device: torch.device | str = "auto", state: dict | None = None,
                 report: Callable[[dict], None] | None = None):
        self.storage = storage
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.state = state
        self.report = report

    def resume_state(self) -> dict | None:
        return self.state

    def wrap(self, model):
        return model

    def persist(self, folder: Path, folder_name: str, metrics: dict) -> None:
        self.storage.upload_dir(folder, folder_name)
        for _, old in self.storage.checkpoint_dirs()[:-KEEP_CHECKPOINTS]:
            self.storage.delete_dir(old)


# A job hook: called with the job once its model, optimizer and start epoch are set, before the
# first epoch (e.g. ``jobs.fault_drill.FaultDrill``, which registers an optimizer step hook).
JobHook = Callable[["TrainingJob"], None]


class TrainingJob:
    """One job (or one rank of a data-parallel job). ``run()`` returns the summary on rank 0, else None."""

    def __init__(self, cfg: Config, session: TrainingSession, tracking: dict | None = None,
                 data: ImageData | None = None, hooks: Sequence[JobHook] = ()):
        """``data``: what the preflight already loaded in this process (else loaded here, as a Ray
        worker must); ``hooks``: job hooks, called in order."""
        self.cfg, self.session, self.tracking, self.checked_data = cfg, session, tracking, data
        self.hooks = list(hooks)
        self.history: list[dict] = []
        self.resumes: list[int] = []  # the epochs this job was resumed from (after failures or re-runs)
        self.start_epoch = 0
        self.tracked = None
        self.summary = None

    def log(self, line: str) -> None:
        if self.session.rank == 0:  # not print(): Ray Train's print patch shows each printed line twice
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def run(self) -> dict | None:
        cfg, session = self.cfg, self.session
        if cfg.train.batch_size % session.world_size:
            raise SetupError(
                f"train.batch_size {cfg.train.batch_size} is not divisible by {session.world_size} workers"
            )
        remove_stale_scratch()  # what killed workers on this node left in the temporary folder
        data = self.checked_data if self.checked_data is not None else load_data(cfg)
        self.data = place_data(data, session.device, cfg.data.device_resident)
        seed_everything(cfg.train.seed)
        method = get_method(cfg.train.method)
        self.model = create_model(cfg.model.name, self.data.num_classes, cfg.model.width, method.name)
        self.model = method.prepare(self.model, cfg.train).to(session.device)
        self.settings = cfg.train.optim_settings()
        self.optimizer = make_optimizer(self.model, self.settings)
        self.scheduler = make_scheduler(self.optimizer, self.settings)
        self.resume(session.resume_state())
        self.model = prepare_model(session.wrap(self.model), self.settings)
        self.open_tracking()
        for hook in self.hooks:
            hook(self)
        if self.start_epoch < self.settings.epochs:
            self.log(f"{method.name} training of {cfg.model.name} (width {cfg.model.width}) on {cfg.data.name} with "
                     f"{session.world_size} worker{'s' if session.world_size > 1 else ''} on {session.device}: "
                     f"{len(self.data.train_labels)} train / {len(self.data.test_labels)} test images, "
                     f"{self.data.num_classes} classes, global batch {cfg.train.batch_size}, "
                     f"epochs {self.start_epoch + 1}..{self.settings.epochs}")
        train_epochs(self.model, self.data, self.settings, session.device, optimizer=self.optimizer,
                     scheduler=self.scheduler, start_epoch=self.start_epoch, on_epoch_end=self.end_epoch, log=self.log)
        if not self.history:
            raise SetupError("no epoch was trained and the checkpoint holds no history")
        self.persist(f"final_{time.strftime('%Y%m%d-%H%M%S')}_{len(self.history):04d}", self.finish, self.history[-1])
        return self.summary

    def resume(self, state: dict | None) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, RNG state and metric history."""
        if state is None:
            return
        check_resume(state, self.cfg, self.data.num_classes)
        source = f"checkpoint to resume ({state.get('source', 'run storage')})"
        try:
            load_weights(self.model, state["model_state"], source)
            self.optimizer.load_state_dict(state["optimizer_state"])
            self.scheduler.load_state_dict(state["scheduler_state"])
            _set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise SetupError(
                f"{error if isinstance(error, ValueError) else f'{source}: cannot be restored ({error!r})'}; "
                "run without --resume to start a new job"
            ) from None
        self.start_epoch, self.history = int(state["epoch"]), list(state["history"])
        self.resumes = list(state.get("resumes", [])) + [self.start_epoch]
        planned = (state.get("config") or {}).get("train", {}).get("epochs")
        if planned is not None and planned != self.settings.epochs:
            self.log(f"warning: the checkpoint was trained for train.epochs={planned}, now {self.settings.epochs}; the "
                     "learning-rate schedule continues from the checkpoint's (cosine over the old epoch count)")
        self.log(f"resuming from epoch {self.start_epoch} ({state['source']})")

    def open_tracking(self) -> None:
        """Rank 0 reopens the MLflow run the driver opened, and logs epochs a crash left unlogged."""
        if self.session.rank != 0 or not self.tracking:
            return
        from ..tracking import MlflowRun

        self.tracked = MlflowRun.from_info(self.tracking)
        backfilled = self.tracked.log_history(self.history)
        if backfilled:
            self.log(f"MLflow: logged {backfilled} checkpointed epoch(s) the run was missing")

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        self.history.append(metrics)
        self.persist(f"checkpoint_epoch_{epoch + 1:04d}", lambda folder: self.save_state(folder, epoch + 1), metrics)
        if self.tracked is not None:  # after the checkpoint: a crash in between is backfilled on resume
            self.tracked.log_epoch(metrics)
        if self.session.report is not None:  # last: a sweep may stop the trial right here
            self.session.report(metrics)

    def save_state(self, folder: Path, epoch: int) -> None:
        save_checkpoint(folder / TRAINING_STATE, self.model, architecture(self.cfg, self.data),
                        optimizer_state=self.optimizer.state_dict(), scheduler_state=self.scheduler.state_dict(),
                        epoch=epoch, history=self.history, rng=_rng_state(), resumes=self.resumes,
                        config=self.cfg.model_dump(mode="json"), mlflow_run_id=(self.tracking or {}).get("run_id"))

    def persist(self, folder_name: str, fill: Callable[[Path], None], metrics: dict) -> None:
        """Rank 0 fills a scratch folder; the session stores it as checkpoint ``folder_name``."""
        with scratch_folder() as scratch:
            if self.session.rank == 0:
                fill(scratch)
            self.session.persist(scratch, folder_name, metrics)

    def finish(self, folder: Path) -> None:
        """Derive the modules and write the results; the final checkpoint holds them too."""
        cfg = self.cfg
        self.summary = finish_run(
            unwrap_ddp(self.model),
            self.data,
            cfg,
            self.session.device,
            self.history,
            log=self.log,
            mlflow_run_id=self.tracked.run_id if self.tracked is not None else None,
        )
        if self.tracked is not None:
            self.summary["mlflow_run_id"] = self.tracked.run_id
            names = self.tracked.log_results(cfg.run_dir, title=f"{cfg.name}: {cfg.model.name} on {cfg.data.name}")
            self.log(f"MLflow: uploaded {', '.join(names)} to run {self.tracked.run_id}")
        self.save_state(folder, len(self.history))
        for name in RESULT_FILES:
            shutil.copy2(cfg.run_dir / name, folder / name)


def train_in_process(cfg: Config, *, resume: bool = False, log=print, report=None) -> dict:
    """Train in this process (no Ray) as a new job of ``cfg.name``, checkpointing every epoch to the
    job's folder; tracked in MLflow unless ``tracking.enabled`` is false. ``resume=True`` continues the
    latest job of that name (its checkpoint and its MLflow run; a new job when there is none);
    ``report(metrics)`` is called after every epoch.

    Every check on the input runs before anything is written (``jobs.preflight``)."""
    cfg, data, plan = check_and_plan_job(cfg, resume, log)
    uri = cfg.tracking.tracking_uri if cfg.tracking.enabled else None
    session = LocalSession(plan.storage, cfg.train.device, state=plan.state, report=report)
    hooks = [FaultDrill(cfg.scaling.fail_at_epoch)] if cfg.scaling.fail_at_epoch else []
    if log:
        log(
            f"{'resuming' if plan.resumed else 'new'} job {plan.job_id} of {cfg.name!r} "
            f"(checkpoints in {plan.storage.uri})"
            + (" - it had finished: writing its results again" if plan.finished else "")
        )
    if not cfg.tracking.enabled:
        start_job(cfg, plan, None, log)
        return TrainingJob(cfg, session, data=data, hooks=hooks).run()
    from ..tracking import open_run

    run_id = plan.run_info.get("run_id") if plan.run_info.get("tracking_uri") == uri else None
    with open_run(cfg, run_id, tags={"mwt.num_workers": "0", "mwt.job_id": plan.job_id}, log=log) as tracked:
        start_job(cfg, plan, uri, log)
        plan.storage.write_bytes(RUN_FILE, json.dumps(tracked.info()).encode())
        return TrainingJob(cfg, session, tracked.info(), data=data, hooks=hooks).run()
