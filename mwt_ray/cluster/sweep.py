"""Ray Tune + Optuna over the modular training settings, with tau scored inside each trial.

    python -m mwt_ray.sweep --config tune_configs/quickstart.yaml          # local Ray, this machine
    ray job submit -- python -m mwt_ray.sweep --config tune_configs/cifar10_vgg16.yaml   # a cluster

A trial is the same training job as ``python -m mwt_ray.train``: in the trial's own process
(``scaling.num_workers: 0``, ``sweep.cpus_per_trial`` CPUs) or on its own Ray Train workers
(``scaling.*`` per trial), named ``trial-<trial id>`` so that no two trials share checkpoints. Each
epoch reports ``epoch_score`` (val_accuracy on held-out training samples minus krr_weight x the
kernel rate) to Tune, where ASHA may stop a poor trial.
A trial that finishes scans ``sweep.tau_grid`` over its stored kernel counts (``jobs.objective``)
and reports its best tau and the score; Optuna (TPE, seeded, under ``sweep.max_concurrent``)
proposes the next settings from those scores. With ``sweep.tau_range`` tau is an Optuna dimension
instead. Early-stopped trials reach Optuna with the worst score (module accuracy 0, KRR 1), and
the results table marks them as stopped, with the epoch and val_accuracy they reached.

Everything lands in ``<output_dir>/<name>/<start time>/``: ``tune/`` (Tune's experiment, for
``--resume``), ``trials/trial-*/`` (each trial's run folder and checkpoints; the best one's
``reuse/`` tables when ``sweep.reuse`` is on), ``standard/`` (the standard baseline),
``results.csv`` / ``results.md`` / ``pareto.png``, and ``sweep.json`` (the MLflow parent run, the
status). The last stage evaluates the best trial's modules on sampled M-class sub-tasks against
the standard baseline on a pool of Ray actors (``cluster.reuse_pool``).
MLflow: one parent run per sweep, a nested run per trial (and the baseline); the parent
holds the table and the plot as artifacts and the best trial as tags.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Config, apply_for_method, flatten_space, keys_unread_by, validate_config
from ..core.files import atomic_write_text
from ..core.messages import last_line, one_line
from ..core.methods import get_method, method_names, modular_method_names
from ..jobs import JobFailed, SetupError, check_inputs, load_data, resolve_device
from ..jobs.objective import best_tau, best_trial, rank_trials, scan_checkpoint
from ..jobs.reuse_job import plan_subtasks
from .capacity import cluster_room
from .failures import is_lost_process_or_node
from .ray_output import ray_output_to
from .ray_session import ray_session
from .reuse_pool import pool_size
from .search import scheduler, search_space, searcher
from .shared_storage import check_job_places, check_shared_places, job_places
from .sweep_integrity import check_signing_key, sign_sweep, verify_sweep
from .sweep_progress import progress_callback, read_retries
from .trainer import check_cluster_resources, run_training

__all__ = ["run_sweep", "sweep_folder", "trial_config", "SWEEP_FILE"]

SWEEP_FILE = "sweep.json"
TRIAL_RESULT = "trial_result.json"


# --------------------------------------------------------------------------- one trial

def trial_config(base: Config, params: dict, folder: Path, name: str, parent_run_id: str | None) -> Config:
    """The trial's training config: the sweep's config with the sampled values, its own name and
    folder, a held-out validation split, and its MLflow run nested under the sweep's."""
    tree = base.model_dump(mode="json")
    tree.update(name=name, output_dir=str(folder))
    tree["data"]["val_fraction"] = base.sweep.val_fraction
    tree["modularize"]["report_taus"] = base.sweep.tau_grid  # module cohesion at every tau the trial may pick
    tree["tracking"]["parent_run_id"] = parent_run_id
    tree["scaling"]["storage_path"] = None  # each job's checkpoints in its own run folder
    return validate_config(apply_for_method(tree, {key: value for key, value in params.items() if key != "tau"}))


def _epoch_report(cfg: Config, metrics: dict) -> dict:
    """What Tune sees after each epoch.

    ``epoch_score`` (val_accuracy - krr_weight x kernel_rate, the share of kernels a sample uses
    being the training-time counterpart of KRR) is what ASHA compares. The objective itself only
    exists once tau is scored, so until then the report carries its worst value (module accuracy 0,
    KRR 1): a trial ASHA stops reaches Optuna as no better than any finished one."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers["epoch_score"] = metrics.get("val_accuracy", 0.0) - cfg.sweep.krr_weight * metrics.get("kernel_rate", 1.0)
    if cfg.sweep.objective == "pareto":
        return {**numbers, "module_accuracy": 0.0, "krr": 1.0}
    return {**numbers, "objective": -cfg.sweep.krr_weight}


def _report_epoch(cfg: Config, metrics: dict, report: Callable[[dict], None]) -> None:
    """Every epoch but the last goes to Tune. A trial that trained its last epoch is always scored:
    ASHA (whose last rung may be the last epoch, when ``sweep.grace_period`` equals the epochs)
    compares it only on its scored result, which carries the same ``epoch_score``."""
    if metrics.get("epoch") != cfg.train.epochs:
        report(_epoch_report(cfg, metrics))


def _tune_report_callback(cfg: Config):
    """Ray Train -> Tune: rank 0's per-epoch reports (not the last: see ``_report_epoch``), with
    epoch_score and the worst objective added."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics[0].get("epoch") != cfg.train.epochs:
                super().after_report(run_context, [_epoch_report(cfg, metrics[0]), *metrics[1:]], None)

    return EpochReports()


def sweep_trial(params: dict, *, base: dict, folder: str, parent_run_id: str | None) -> None:
    """Tune's trainable: train (resuming this trial's own job when Tune runs it again), then score tau.

    A trial that lost its process or node raises, and Tune runs it again (``sweep.max_failures``);
    an error of the trial's own (bad numerics, a config the model cannot train) would only fail
    again, so the trial ends at once with ``trial_error`` in its last report: no retry."""
    import ray
    import torch
    from ray import tune

    base_cfg = Config.model_validate(base)
    cfg = trial_config(base_cfg, params, Path(folder) / "trials", f"trial-{tune.get_context().get_trial_id()}",
                       parent_run_id)
    if cfg.scaling.num_workers == 0:  # a reused worker process keeps the thread count of its first import
        torch.set_num_threads(max(1, math.floor(cfg.sweep.cpus_per_trial)))
    node = {"node_id": ray.get_runtime_context().get_node_id()}  # where it runs, named if the node is lost

    def report(metrics: dict) -> None:
        tune.report({**metrics, **node})

    try:
        result = _train_and_score(cfg, params, report)
    except Exception as error:
        if is_lost_process_or_node(error):
            raise
        report({**_epoch_report(cfg, {}), "trial_error": last_line(error)})
        return
    report(result)


def _train_and_score(cfg: Config, params: dict, report: Callable[[dict], None]) -> dict:
    """The trial's training job (``report``: each epoch's metrics to Tune), then the tau scan over
    its stored kernel counts; returns its result."""
    import pandas as pd
    import torch

    started = time.perf_counter()
    summary = run_training(cfg, resume=True, report=lambda metrics: _report_epoch(cfg, metrics, report),
                           train_callbacks=[_tune_report_callback(cfg)] if cfg.scaling.num_workers else None)
    job_seconds = time.perf_counter() - started

    device = resolve_device(cfg.train.device) if cfg.scaling.num_workers == 0 else torch.device("cpu")
    taus = [params["tau"]] if "tau" in params else cfg.sweep.tau_grid
    scan = scan_checkpoint(cfg.run_dir / "checkpoint.pt", load_data(cfg), cfg, taus, device)
    best = best_tau(scan)
    final = summary["final"]
    result = {"epoch": final["epoch"], "val_accuracy": final["val_accuracy"], "test_accuracy": final["test_accuracy"],
              "tau": best["tau"], "krr": best["krr"], "coupling": best["coupling"],
              "cohesion": next((row.get("cohesion") for row in summary.get("modules", {}).get("by_tau", [])
                                if abs(row["tau"] - best["tau"]) < 1e-9), None),
              "module_accuracy": best["module_accuracy"], "subtask_krr": best["subtask_krr"],
              "objective": best["score"], "mlflow_run_id": summary.get("mlflow_run_id"),
              "epoch_score": _epoch_report(cfg, final)["epoch_score"],  # ASHA reads it in every report
              # where a trial's time goes (benchmarks/sweep.py): the training job, its epochs, the tau scan
              "job_seconds": job_seconds, "scan_seconds": time.perf_counter() - started - job_seconds,
              "epoch_seconds": float(pd.read_csv(cfg.run_dir / "history.csv")["epoch_time_s"].sum())}
    atomic_write_text(cfg.run_dir / TRIAL_RESULT, json.dumps({"result": result, "tau_scan": scan}, indent=2))
    if summary.get("mlflow_run_id"):
        from ..tracking.sweep_report import log_trial_scan

        log_trial_scan(cfg, summary["mlflow_run_id"], result, scan, cfg.run_dir / TRIAL_RESULT)
    return result


def train_standard(base: dict, folder: str, parent_run_id: str | None) -> dict:
    """The standard model the trials are compared with: same data split, same settings, no masks."""
    cfg = trial_config(Config.model_validate(base), {"train.method": "standard"}, Path(folder), "standard",
                       parent_run_id)
    return run_training(cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 0})}),
                        resume=True)


# --------------------------------------------------------------------------- the driver

def sweep_folder(cfg: Config, resume: bool) -> Path:
    """A new ``<output_dir>/<name>/<start time>/``, or with ``resume`` the latest unfinished one."""
    root = cfg.run_dir
    if not resume:
        return root / time.strftime("%Y%m%d-%H%M%S")
    unfinished = [p.parent for p in sorted(root.glob(f"*/{SWEEP_FILE}")) if _read_state(p).get("status") != "FINISHED"]
    if not unfinished:
        raise SetupError(f"--resume: no unfinished sweep named {cfg.name!r} under {root}; run without --resume "
                         "to start one")
    return unfinished[-1]


def _read_state(path: Path) -> dict:
    """A sweep folder's ``sweep.json``: a JSON object, or one line saying what it is instead."""
    if not path.is_file():
        raise SetupError(f"{path} is not a regular file; it should hold the sweep's state (JSON): move it away")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SetupError(f"{path} is not the sweep's state: cannot be read as JSON ({one_line(str(error))}); "
                         "move the folder away or start a new sweep without --resume") from None
    if not isinstance(state, dict):
        raise SetupError(f"{path} is not the sweep's state: it holds a JSON {type(state).__name__}, not an object; "
                         "move the folder away or start a new sweep without --resume")
    return state


def _check_space(cfg: Config) -> None:
    """Something to search, and every end of every range, every choice and every reference point
    must make a valid trial config (found here, not after the parent run and Tune's folder exist)."""
    if not cfg.sweep.space and cfg.sweep.tau_range is None:
        raise SetupError("sweep.space is empty: give at least one key to search, e.g. "
                         "{train.alpha: {low: 0.1, high: 3.0, log: true}}")
    tree = cfg.model_dump(mode="json")

    def trial_of(where: str, values: dict) -> None:
        try:
            validate_config(apply_for_method(json.loads(json.dumps(tree)), values))
        except ValueError as error:
            raise SetupError(f"{where} makes an invalid trial ({error})") from None

    methods = _check_methods(cfg)
    for key, dimension in cfg.sweep.space.items():
        if dimension.choices is None:
            _check_range_key(key, dimension)
        # A method's own setting is tried under a method that reads it.
        reader = next((m for m in methods if key not in keys_unread_by(m)), methods[0])
        for value in dimension.candidates():
            trial_of(f"sweep.space.{key}: the value {value!r}", {"train.method": reader, key: value})
    dimensions = {**cfg.sweep.space, **({"tau": cfg.sweep.tau_range} if cfg.sweep.tau_range else {})}
    for number, point in enumerate(cfg.sweep.points, 1):
        point = flatten_space(point)
        if "tau" in point and cfg.sweep.tau_range is None:
            raise SetupError(f"sweep.points: point {number} gives tau, but tau is not searched (sweep.tau_grid scans "
                             "it after training): remove tau from the point, or set sweep.tau_range to search it")
        for key, value in point.items():
            if key in dimensions:
                reason = _outside(dimensions[key], value)
                if reason:
                    raise SetupError(f"sweep.points: point {number} gives {key}={value!r}, {reason}")
        trial_of(f"sweep.points: point {number}", {k: v for k, v in point.items() if k != "tau"})


def _check_methods(cfg: Config) -> list[str]:
    """The methods the trials train (``train.method``'s choices where it is searched): modular ones only,
    and every searched setting of one method read by some trial (a key no trial reads searches nothing)."""
    searched = cfg.sweep.space.get("train.method")
    methods = list(searched.choices) if searched is not None and searched.choices is not None else [cfg.train.method]
    for method in methods:
        if method not in method_names():
            raise SetupError(f"sweep.space.train.method: unknown method {method!r}; choose among "
                             f"{', '.join(modular_method_names())}")
        if not get_method(method).modular:
            raise SetupError(f"sweep.space.train.method: {method} trains no modules; a sweep searches modular methods "
                             "(the standard model is its baseline: sweep.standard_baseline)")
    for key in cfg.sweep.space:
        if all(key in keys_unread_by(method) for method in methods):
            owner = next(m for m in method_names() if key.removeprefix("train.") in
                         get_method(m).weight_keys + get_method(m).option_keys)
            raise SetupError(f"sweep.space.{key} is a setting of method {owner}, which no trial trains "
                             f"(methods: {', '.join(methods)}): add {owner} to sweep.space.train.method's "
                             "choices or search another key")
    return methods


def _check_range_key(key: str, dimension) -> None:
    """A low/high range searches a number: the key must be a number, and a whole number (an int
    key) must be searched with ``integer: true`` (else every value between the ends fails its trial)."""
    import typing

    section, name = key.split(".")
    field = type(getattr(Config(), section)).model_fields.get(name)
    kinds = (
        {a for a in typing.get_args(field.annotation) or (field.annotation,) if a is not type(None)} if field else set()
    )
    if not kinds or not kinds <= {int, float} or bool in kinds:
        shown = "true/false" if bool in kinds else "not a number"
        raise SetupError(f"sweep.space.{key}: a low/high range searches numbers, but {key} is {shown}; give "
                         f"{{choices: [...]}} of its values instead")
    if kinds == {int} and not dimension.integer:
        raise SetupError(f"sweep.space.{key}: {key} takes whole numbers; add integer: true to its range "
                         f"(low {dimension.low:g}, high {dimension.high:g})")


def _outside(dimension, value) -> str | None:
    """Why a reference point's value lies outside its search dimension (None when it is inside)."""
    if dimension.choices is not None:
        return None if value in dimension.choices else f"not one of the choices {dimension.choices}"
    if not isinstance(value, (int, float)) or not math.isfinite(value):  # booleans: refused by the config
        return f"not a number in [{dimension.low:g}, {dimension.high:g}]"
    if dimension.integer and value != int(value):
        return f"not a whole number in [{dimension.low:g}, {dimension.high:g}]"
    if not dimension.low <= value <= dimension.high:
        return f"outside the searched range [{dimension.low:g}, {dimension.high:g}]"
    return None


def _check_stages(cfg: Config, num_classes: int) -> None:
    """Every stage must fit the cluster before the first trial trains: one trial's resources (or
    Tune waits forever), and the last stage's reuse actors and sub-tasks."""
    if cfg.scaling.num_workers > 0:
        check_cluster_resources(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
    else:
        room = cluster_room(cfg.sweep.cpus_per_trial, cfg.sweep.gpus_per_trial)
        if room.count < 1:
            raise SetupError(f"a trial asks for {cfg.sweep.cpus_per_trial:g} CPUs and "
                             f"{cfg.sweep.gpus_per_trial:g} GPUs (sweep.cpus_per_trial / sweep.gpus_per_trial), "
                             f"but the largest Ray node has {room.largest}; lower them or add nodes "
                             "(Tune would wait forever)")
    if cfg.sweep.reuse:
        tasks = plan_subtasks(cfg, num_classes)
        if cfg.reuse.num_actors != 0:
            pool_size(cfg, len(tasks))
    check_shared_places(job_places(cfg))  # trials, baseline and reuse actors run on any node


def _check_and_plan_sweep(cfg: Config, resume: bool, trust_folder: bool = False) -> tuple[Config, Path, int]:
    """Every check that needs no Ray, before anything is written; returns the dataset's class count."""
    if not cfg.train.modular and "train.method" not in cfg.sweep.space:
        raise SetupError(f"a sweep trains modular models: train.method must be one of "
                         f"{', '.join(modular_method_names())} (or searched in sweep.space)")
    _check_space(cfg)
    check_job_places(cfg)
    cfg, data = check_inputs(cfg)  # absolute paths and tracking URI: trials run in other working directories
    sizes = cfg.sweep.subtask_sizes
    if any(m > data.num_classes for m in sizes):
        raise SetupError(f"sweep.subtask_sizes {sizes} exceed the dataset's {data.num_classes} classes")
    _check_registered_modules(cfg, list(data.classes))
    check_signing_key()  # the sweep signs its Tune folder: an unusable secret refuses it before anything is written
    folder = sweep_folder(cfg, resume)
    if resume and not trust_folder:  # before Ray, the parent run or sweep.json: a refusal writes nothing
        verify_sweep(folder / "tune")
    return cfg, folder, data.num_classes


def _check_registered_modules(cfg: Config, class_names: list[str]) -> None:
    """``sweep.register_modules``: classes the dataset has, names MLflow's registry takes, tracking on."""
    from ..jobs.export_job import check_registry_name, parse_classes

    if cfg.sweep.register_modules and not cfg.tracking.enabled:
        raise SetupError("sweep.register_modules registers modules in MLflow: tracking.enabled is false")
    for classes in cfg.sweep.register_modules:
        text = ",".join(str(c) for c in classes)
        indices = parse_classes(text, class_names, what=f"sweep.register_modules {classes}")
        check_registry_name(registered_name(cfg.name, [class_names[c] for c in indices]))


def registered_name(sweep_name: str, class_names: list[str]) -> str:
    """The registered model of a sweep's module: ``<sweep name>-<class names joined by ->``."""
    return "-".join([sweep_name, *class_names])


def _register_modules(cfg: Config, folder: Path, outcome: dict, log) -> list[dict]:
    """The last stage's end: each of ``sweep.register_modules`` exported from the best trial at its tau
    (against the standard baseline) into ``modules/<classes>/`` and registered as ``registered_name``."""
    from ..jobs.export_job import check_registry_name, export_module, plan_export

    best = outcome["best"]
    trial = folder / "trials" / f"trial-{best['trial']}" / "checkpoint.pt"
    standard = folder / "standard" / "checkpoint.pt"
    summaries = []
    for classes in cfg.sweep.register_modules:
        text = ",".join(str(c) for c in classes)
        plan = plan_export(str(trial), text, folder / "modules" / text.replace(",", "-"),
                           standard_ref=str(standard) if standard.exists() else None, tau=float(best["tau"]), cfg=cfg)
        plan.register = registered_name(cfg.name, plan.class_names)
        check_registry_name(plan.register)
        summaries.append(export_module(plan, log=log))
    return summaries


class _SweepRecord:
    """``sweep.json`` and the sweep's MLflow parent run, started and ended together: however the
    sweep ends, both say how, and no child run is left RUNNING."""

    def __init__(self, folder: Path):
        self.path = folder / SWEEP_FILE
        self.state: dict = {}
        self.parent = None

    def start(self, cfg: Config, resume: bool, log: Callable[[str], None]) -> None:
        """Open (or with ``resume`` continue) the parent run, then write ``sweep.json`` as RUNNING."""
        earlier = _read_state(self.path) if resume else {}
        if cfg.tracking.enabled:
            from ..tracking.sweep_report import open_parent_run

            self.parent = open_parent_run(cfg, earlier.get("parent_run_id"), log)
        self.state = {"name": cfg.name, "status": "RUNNING", "parent_run_id": self.parent_run_id,
                      "config": cfg.model_dump(mode="json")}
        self._write()

    @property
    def parent_run_id(self) -> str | None:
        return self.parent.run_id if self.parent is not None else None

    def finish(self) -> None:
        if self.parent is not None:
            self.parent.end("FINISHED")
        self.state["status"] = "FINISHED"
        self._write()

    def fail(self, interrupted: bool) -> None:
        """After Ray is down (its workers can no longer touch a run): the parent and its children
        KILLED (interrupted) or FAILED, and a started ``sweep.json`` INTERRUPTED or FAILED."""
        if self.parent is not None:
            from ..tracking.sweep_report import close_child_runs

            close_child_runs(self.parent, "KILLED" if interrupted else "FAILED")
            self.parent.end("KILLED" if interrupted else "FAILED")
        if self.state.get("status") == "RUNNING":
            self.state["status"] = "INTERRUPTED" if interrupted else "FAILED"
            self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state, indent=2))


def run_sweep(cfg: Config, *, resume: bool = False, trust_folder: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Run (or with ``resume`` continue) the sweep; returns {"folder", "table", "best", "standard", "reuse",
    "modules" (the summaries of ``sweep.register_modules``' exports)}.

    Raises ``JobFailed`` when no trial completed. However it ends, the parent run and every child
    run (trials, baseline) end in a state that says how: FINISHED, FAILED (an error), KILLED
    (stopped early by ASHA, or the sweep interrupted); ``sweep.json`` says FINISHED, FAILED or
    INTERRUPTED.

    ``resume`` restores Tune's experiment only after ``sweep_integrity.verify_sweep`` found every
    file in it signed by this user's key (the sweep signs when it creates the Tuner and whenever
    ``fit`` returns or is interrupted); ``trust_folder`` skips that check, for a sweep killed
    before it could sign (SIGKILL, a lost head node) in a folder nobody else can write."""
    cfg, folder, num_classes = _check_and_plan_sweep(cfg, resume, trust_folder)
    # Tune's newer console output prints its banner and paths even at verbose=0; the progress lines
    # and the table below say what matters.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    record = _SweepRecord(folder)
    try:
        # The dashboard: Ray 2.60 hands a finished Train-in-Tune trial's CPUs back only with it. The
        # trials' own output stays in Ray's worker logs: the progress lines name each trial instead.
        with ray_output_to(folder / "ray_output.log"), ray_session(dashboard=True, worker_output=False):
            _check_stages(cfg, num_classes)
            record.start(cfg, resume, log)
            log(f"sweep {cfg.name!r}: {cfg.sweep.trials} trials, {cfg.sweep.max_concurrent} at a time, in {folder}")
            outcome = _tune(cfg, folder, record.parent, resume, trust_folder, log)
    except BaseException as error:
        record.fail(interrupted=isinstance(error, KeyboardInterrupt))
        raise
    record.finish()
    _log_failed_and_retried(outcome["table"], folder, log)
    return outcome


def _log_failed_and_retried(table, folder: Path, log: Callable[[str], None]) -> None:
    failed, retried = table[table["status"] == "failed"], table[table["retries"] > 0]
    if len(retried):
        log(f"{int(retried['retries'].sum())} retr{'y' if retried['retries'].sum() == 1 else 'ies'} after a lost "
            f"process or node, of {len(retried)} trial(s): {', '.join(map(str, retried['trial']))}")
    if len(failed):  # the last line a user reads says so
        log(
            f"{len(failed)} of {len(table)} trials failed "
            f"(trial {failed.iloc[0]['trial']}: {failed.iloc[0]['error']}); "
            f"the others' results are in {folder / 'results.csv'}"
        )


def _tune(cfg: Config, folder: Path, parent, resume: bool, trust_folder: bool, log) -> dict:
    """The standard baseline (a Ray task) beside the Tune experiment; then the results and the last stage."""
    import ray

    parent_run_id = parent.run_id if parent is not None else None
    standard = _start_standard_baseline(cfg, folder, parent_run_id)
    tuner = _tuner(cfg, folder, parent_run_id, resume, trust_folder, log)
    grid = _fit_signed(tuner, folder / "tune", log)
    outcome = _results(cfg, folder, grid, ray.get(standard) if standard is not None else None, parent, log)
    outcome["reuse"] = _reuse_best(cfg, folder, outcome, log) if cfg.sweep.reuse else None
    outcome["modules"] = _register_modules(cfg, folder, outcome, log)
    return outcome


def _start_standard_baseline(cfg: Config, folder: Path, parent_run_id: str | None):
    """The standard model's training as a Ray task (its object ref), or None without
    ``sweep.standard_baseline``. A lost process or node runs it again (resuming its job); its own
    errors are not retried."""
    if not cfg.sweep.standard_baseline:
        return None
    import ray

    remote = ray.remote(num_cpus=cfg.sweep.cpus_per_trial, num_gpus=cfg.sweep.gpus_per_trial,
                        max_retries=cfg.sweep.max_failures, retry_exceptions=False)(train_standard)
    return remote.remote(cfg.model_dump(mode="json"), str(folder), parent_run_id)


def _trainable(cfg: Config, folder: Path, parent_run_id: str | None):
    """``sweep_trial`` with the sweep's settings bound, and the resources of one trial (a trial that
    runs Ray Train workers holds almost nothing itself: its workers ask for their own)."""
    from ray import tune

    trainable = tune.with_parameters(sweep_trial, base=cfg.model_dump(mode="json"), folder=str(folder),
                                     parent_run_id=parent_run_id)
    resources = ({"cpu": 0.01} if cfg.scaling.num_workers else
                 {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial})
    return tune.with_resources(trainable, resources)


def _tuner(cfg: Config, folder: Path, parent_run_id: str | None, resume: bool, trust_folder: bool, log):
    """A new Tuner (signed at once: Tune writes tuner.pkl only here), or with ``resume`` the one in
    ``folder/tune`` restored after its signature is checked again."""
    from ray import tune

    trainable = _trainable(cfg, folder, parent_run_id)
    tune_path = folder / "tune"
    if resume and tune.Tuner.can_restore(str(tune_path)):
        if trust_folder:
            log(f"resuming the Tune experiment in {tune_path} without checking its signature (--trust-folder)")
        else:
            verify_sweep(tune_path)  # again, right before Tune unpickles: the window to swap a file stays short
            log(f"resuming the Tune experiment in {tune_path} (signature checked)")
        return tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    run_config = tune.RunConfig(name="tune", storage_path=str(folder), verbose=0,
                                callbacks=[progress_callback(cfg, folder)], log_to_file=True,
                                failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures))
    tuner = tune.Tuner(trainable, param_space=search_space(cfg), run_config=run_config,
                       tune_config=tune.TuneConfig(search_alg=searcher(cfg), scheduler=scheduler(cfg),
                                                   num_samples=cfg.sweep.trials))
    sign_sweep(tune_path)
    return tuner


def _fit_signed(tuner, tune_path: Path, log):
    """``tuner.fit()``, the Tune folder signed however it returns (also on Ctrl-C / SIGTERM, so that
    ``--resume`` can check what it restores)."""
    # Tune logs each failed trial's traceback (and a summary) at ERROR level on stderr; the progress
    # lines, the table's error column and the final line already say it once, in one line each.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    try:
        return tuner.fit()
    finally:
        try:
            sign_sweep(tune_path)
        except (OSError, ValueError) as error:
            log(f"warning: could not sign {tune_path} ({error}); --resume will need --trust-folder")


def _results(cfg: Config, folder: Path, grid, standard: dict | None, parent, log) -> dict:
    """The trials ranked and the best one chosen (``jobs.objective``), reported (``tracking.sweep_report``);
    ``JobFailed`` when no trial completed."""
    from ..tracking.sweep_report import report_sweep, results_table

    table = rank_trials(results_table(cfg, grid, standard, read_retries(folder)), cfg.sweep.objective)
    best = best_trial(table, cfg.sweep.objective)
    outcome = report_sweep(cfg, folder, table, best, standard, parent, log)
    if best is None:
        failed = table[table["status"] == "failed"]
        why = (f"{len(failed)} of {len(table)} failed; the first, trial {failed.iloc[0]['trial']}: "
               f"{failed.iloc[0]['error']}") if len(failed) else f"all {len(table)} were stopped early"
        raise JobFailed(f"no trial of sweep {cfg.name!r} completed ({why}); the table is in {folder / 'results.csv'}")
    return outcome


def _reuse_best(cfg: Config, folder: Path, outcome: dict, log):
    """The last stage: the best trial's modules (at its tau) on sampled M-class sub-tasks, against
    the standard baseline, on Ray actors; tables and plots go to the best trial's MLflow run."""
    from .reuse_pool import evaluate_reuse

    best = outcome["best"]
    standard = folder / "standard" / "checkpoint.pt"
    log(f"reuse: the modules of trial {best['trial']} at tau {best['tau']:.2f}")
    return evaluate_reuse(str(folder / "trials" / f"trial-{best['trial']}" / "checkpoint.pt"),
                          str(standard) if standard.exists() else None, cfg,
                          best.get("mlflow_run_id") or None, tau=float(best["tau"]), log=log)
