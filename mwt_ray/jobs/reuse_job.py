"""Reuse from trained models, without Ray: plan an evaluation (every check on the input, the
sampled sub-tasks) and evaluate sub-tasks with models and data loaded once.

    plan = plan_reuse("runs/mwt/checkpoint.pt", "runs/std/checkpoint.pt", overrides=["reuse.sizes=[2,5]"])
    evaluator = SubtaskEvaluator(plan.spec)          # in this process, or in each Ray actor
    rows = [evaluator.evaluate(i, task) for i, task in enumerate(plan.tasks)]

A model is named by a *reference*: a checkpoint file, a run folder holding ``checkpoint.pt``, or
an MLflow run id (its ``checkpoint.pt`` artifact). ``plan.spec`` is a small picklable dict that
says where everything is (absolute paths or the MLflow run), so a Ray actor, also one restarted
on another node, loads the same models and data from storage. ``reuse_from_checkpoints`` is the
one-process command path (``reuse.num_actors=0``); ``mwt_ray.cluster.reuse_pool`` runs the same
evaluator on a pool of actors.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, apply_overrides, validate_config
from ..config.base import LIMIT_REASONS, MAX_SUBTASKS
from ..core.checkpoint import build_model, check_checkpoint, load_checkpoint
from ..core.data import validate_classes
from ..core.files import atomic_write_text, input_file_error, writable_folder_error
from ..core.flops import count_flops
from ..core.kernel_usage import KernelUsage, module_masks
from ..core.models import create_model
from ..core.reuse import evaluate_subtask, sample_subtasks
from .setup import SetupError, absolute_paths, load_data, resolve_device

__all__ = [
    "ReusePlan",
    "ReuseSources",
    "SubtaskEvaluator",
    "load_sources",
    "plan_reuse",
    "plan_subtasks",
    "resolve_reference",
    "load_reference",
    "reuse_from_checkpoints",
    "format_row",
]

_RUN_ID = re.compile(r"[0-9a-f]{32}")
# Settings a reuse evaluation may change; the rest of model.* and train.* come from the checkpoint.
_OVERRIDABLE = ("train.device", "train.seed")


def resolve_reference(ref: str, tracking_uri: str | None, what: str = "modular model") -> dict:
    """A checkpoint file, a run folder with ``checkpoint.pt``, or an MLflow run id -> a source spec:
    {"path": absolute path} or {"mlflow": {"tracking_uri", "run_id"}}. Raises SetupError."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    if path.is_file():
        return {"path": str(path.resolve())}
    reason = input_file_error(path)
    if reason not in (None, "does not exist", "is a folder"):  # a FIFO or a device: refused unopened
        raise SetupError(f"{what} {ref!r} {reason}, not a checkpoint file")
    if not _RUN_ID.fullmatch(ref):
        raise SetupError(f"{what} {ref!r} is neither a checkpoint file, a run folder with checkpoint.pt, "
                         "nor an MLflow run id (32 hex digits)")
    from ..tracking import resolve_tracking_uri
    from ..tracking.store import run_exists

    uri = resolve_tracking_uri(tracking_uri)
    if not run_exists(uri, ref):  # reads only: an sqlite store that is not there is not created to look
        raise SetupError(f"{what}: MLflow run {ref!r} does not exist in {uri} (set tracking.tracking_uri)")
    return {"mlflow": {"tracking_uri": uri, "run_id": ref}}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def load_reference(source: dict, what: str = "modular model") -> dict:
    """The checkpoint a source spec names (an MLflow run's artifact is downloaded to a temporary folder)."""
    if "path" in source:
        return _checked(load_checkpoint(source["path"]), f"{what} {source['path']}")
    run = source["mlflow"]
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bar on stderr
    with tempfile.TemporaryDirectory(prefix="mwt_reuse_") as scratch:
        try:
            local = _client(run["tracking_uri"]).download_artifacts(run["run_id"], "checkpoint.pt", scratch)
        except Exception:
            raise SetupError(f"{what}: MLflow run {run['run_id']} has no checkpoint.pt artifact "
                             "(a run that finished training uploads one)") from None
        finally:
            if before is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before
        return _checked(load_checkpoint(local), f"{what} (MLflow run {run['run_id']})")


def _checked(state: dict, source: str) -> dict:
    """``state`` once ``check_checkpoint`` found it whole (its refusal as SetupError: bad input, exit 2)."""
    try:
        check_checkpoint(state, source)
    except ValueError as error:
        raise SetupError(str(error)) from None
    return state


def _describe(source: dict) -> str:
    return source["path"] if "path" in source else f"MLflow run {source['mlflow']['run_id']}"


@dataclass
class ReusePlan:
    """What an evaluation does: the spec every evaluator loads, the sub-tasks, where results go."""
    spec: dict
    tasks: list[list[int]]
    cfg: Config
    out_dir: Path
    mlflow_run: dict | None = (
        None  # {"tracking_uri", "run_id"} of the run evaluated (results are logged there), when known
    )
    class_names: list[str] = field(default_factory=list)

    @property
    def has_standard(self) -> bool:
        return self.spec.get("standard") is not None


def _config_for(state: dict, cfg: Config | None, overrides: list[str], tau: float | None) -> Config:
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    fixed = [k for k in keys if k.split(".")[0] in ("model", "train") and k not in _OVERRIDABLE]
    if fixed:
        raise SetupError(f"{fixed[0]!r}: model and training settings come from the checkpoint and cannot be overridden")
    tree = _known_keys(copy.deepcopy(state.get("config") or {}), Config)
    if (
        cfg is not None
    ):  # the caller's data, reuse, tracking and output settings; model and training stay the checkpoint's
        given = cfg.model_dump(mode="json")
        for key in ("data", "reuse", "tracking", "output_dir"):
            tree[key] = given[key]
    tree = apply_overrides(tree, overrides)
    if tau is not None:
        tree.setdefault("modularize", {})["tau"] = tau
    return absolute_paths(validate_config(tree))


def _known_keys(tree: dict, model) -> dict:
    """The checkpoint's config without keys this version does not know (a checkpoint of an older
    or newer version still loads; what is dropped falls back to its default)."""
    known = {}
    for key, value in tree.items():
        field_info = model.model_fields.get(key)
        if field_info is None or field_info.exclude:
            continue
        sub = field_info.annotation
        if isinstance(value, dict) and isinstance(sub, type) and hasattr(sub, "model_fields"):
            value = _known_keys(value, sub)
        known[key] = value
    return known


def plan_subtasks(cfg: Config, num_classes: int) -> list[list[int]]:
    """The sub-tasks ``cfg.reuse`` asks for on a model of ``num_classes`` classes: its explicit class
    lists, then the sampled ones per M. Raises SetupError for settings that do not fit the model
    (also the sweep's check of its reuse stage before any trial trains)."""
    n = num_classes
    sizes = list(cfg.reuse.sizes) or ([] if cfg.reuse.subtasks else list(range(2, n)))
    outside = [m for m in sizes if not 2 <= m <= n]
    if outside:
        raise SetupError(f"reuse.sizes: M={outside[0]} is outside 2..{n} (the model has {n} classes)")
    for task in cfg.reuse.subtasks:
        validate_classes(task, n)
    # Counted before sampling (M-class sets number C(n, M): every one is taken when fewer than per_size).
    planned = len(cfg.reuse.subtasks) + sum(min(cfg.reuse.per_size, math.comb(n, m)) for m in sizes)
    if planned > MAX_SUBTASKS:
        raise SetupError(f"reuse: {planned} sub-tasks planned (reuse.subtasks, reuse.sizes x reuse.per_size), more "
                         f"than the {MAX_SUBTASKS} allowed: {LIMIT_REASONS[MAX_SUBTASKS]}")
    seed = cfg.train.seed if cfg.reuse.sampling_seed is None else cfg.reuse.sampling_seed
    tasks = [list(t) for t in cfg.reuse.subtasks] + sample_subtasks(n, sizes, cfg.reuse.per_size, seed)
    if not tasks:
        raise SetupError("no sub-tasks: set reuse.sizes (e.g. [2, 5]) or reuse.subtasks (e.g. [[0, 1]])")
    return tasks


@dataclass
class ReuseSources:
    """The checked inputs of reuse and export: the modular model (source spec and checkpoint), its
    settings and data, and the standard model when one is given."""
    cfg: Config
    modular: dict
    state: dict
    data: ImageData  # noqa: F821
    standard: dict | None = None
    standard_state: dict | None = None

    @property
    def where(self) -> str:
        return _describe(self.modular)

    def source_run(self) -> dict | None:
        """{"tracking_uri", "run_id"} of the MLflow run that trained the modular model, when known."""
        if "mlflow" in self.modular:
            return dict(self.modular["mlflow"])
        from ..tracking import resolve_tracking_uri

        run_id = self.state.get("mlflow_run_id")
        return (
            {"tracking_uri": resolve_tracking_uri(self.cfg.tracking.tracking_uri), "run_id": run_id} if run_id else None
        )


def load_sources(modular_ref: str, standard_ref: str | None = None, cfg: Config | None = None,
                 overrides: list[str] | None = None, *, tau: float | None = None) -> ReuseSources:
    """Resolve and check the modular model (a modular checkpoint whose classes are the data's) and
    the standard model (same architecture and classes, not modular); nothing is written. Settings:
    the modular checkpoint's config, with ``cfg``'s data / reuse / tracking / output sections when
    given, then ``overrides``, then ``tau``. Raises SetupError / ConfigError."""
    overrides = list(overrides or [])
    uri = _tracking_uri(cfg, overrides)
    modular_source = resolve_reference(modular_ref, uri, "modular model")
    state = load_reference(modular_source, "modular model")
    where = _describe(modular_source)
    if "kernel_usage" not in state and "module_masks" not in state:
        raise SetupError(f"{where} has no module masks: pass the checkpoint or MLflow run of a modular run")
    cfg = _config_for(state, cfg, overrides, tau)
    arch = state["architecture"]
    data = load_data(cfg)
    if arch["num_classes"] != data.num_classes:
        raise SetupError(
            f"{where} has {arch['num_classes']} classes but dataset {cfg.data.name!r} has {data.num_classes}"
        )
    if arch.get("classes") and list(arch["classes"]) != list(data.classes):
        raise SetupError(f"{where} classes {arch['classes']} differ from the dataset's {data.classes}")
    sources = ReuseSources(cfg, modular_source, state, data)
    if standard_ref:
        sources.standard = resolve_reference(standard_ref, cfg.tracking.tracking_uri, "standard model")
        sources.standard_state = load_reference(sources.standard, "standard model")
        check_standard(sources.standard_state, arch, _describe(sources.standard))
    return sources


def plan_reuse(modular_ref: str, standard_ref: str | None = None, cfg: Config | None = None,
               overrides: list[str] | None = None, *, tau: float | None = None) -> ReusePlan:
    """Check every input and sample the sub-tasks; nothing is written. Raises SetupError / ConfigError.

    Settings as in ``load_sources``. The data is loaded once here to check it against the checkpoint."""
    sources = load_sources(modular_ref, standard_ref, cfg, overrides, tau=tau)
    cfg, modular_source, arch = sources.cfg, sources.modular, sources.state["architecture"]
    tasks = plan_subtasks(cfg, sources.data.num_classes)
    if cfg.reuse.num_actors == 0:
        resolve_device(cfg.train.device)
    evaluated = sources.source_run()
    if "path" in modular_source:
        default_out = Path(modular_source["path"]).parent / "reuse"
    else:
        default_out = Path(cfg.output_dir) / f"reuse-{evaluated['run_id'][:8]}"
    out_dir = Path(cfg.reuse.output_dir).expanduser().resolve() if cfg.reuse.output_dir else default_out
    reason = writable_folder_error(out_dir)
    if reason:
        raise SetupError(f"reuse output folder {str(out_dir)!r} cannot be written ({reason})")
    spec = {"config": cfg.model_dump(mode="json"), "modular": modular_source, "standard": sources.standard,
            "architecture": dict(arch)}
    return ReusePlan(spec, tasks, cfg, out_dir, evaluated, list(sources.data.classes))


def _tracking_uri(cfg: Config | None, overrides: list[str]) -> str | None:
    """The tracking URI to look MLflow run ids up in, before the checkpoint (and its config) is known."""
    if cfg is not None:
        base = cfg.model_dump(mode="json")
        return validate_config(
            apply_overrides(base, [o for o in overrides if o.startswith("tracking.")])
        ).tracking.tracking_uri
    tracking = [o for o in overrides if o.strip().startswith("tracking.")]
    return validate_config(apply_overrides({}, tracking)).tracking.tracking_uri


def check_standard(state: dict, arch: dict, where: str) -> None:
    """The standard model must be a non-modular model of the modular one's architecture and classes."""
    theirs = state["architecture"]
    if theirs.get("method") != "standard":
        raise SetupError(f"standard model {where} was trained with method {theirs.get('method')}; pass a standard "
                         "(train.method=standard) run")
    if theirs["name"] != arch["name"] or abs(theirs["width"] - arch["width"]) > 1e-9:
        raise SetupError(f"standard model {where} is {theirs['name']} width {theirs['width']}, but the modules come "
                         f"from {arch['name']} width {arch['width']}: use a standard model of the same architecture")
    if theirs["num_classes"] != arch["num_classes"] or (
            theirs.get("classes") and arch.get("classes") and list(theirs["classes"]) != list(arch["classes"])):
        raise SetupError(
            f"standard model {where} has {theirs['num_classes']} classes {theirs.get('classes')}, but the "
            f"modules have {arch['num_classes']} {arch.get('classes')}: use a standard model of the same dataset"
        )


class SubtaskEvaluator:
    """Holds the data, the modular model, its module masks and the standard model (loaded once from
    ``spec``) and evaluates one sub-task per call."""

    def __init__(self, spec: dict, device: torch.device | str | None = None):
        self.cfg = validate_config(copy.deepcopy(spec["config"]))
        self.device = resolve_device(self.cfg.train.device) if device is None else torch.device(device)
        state = load_reference(spec["modular"])
        self.arch = state["architecture"]
        self.model = build_model(state).to(self.device)
        if "kernel_usage" in state:  # masks for the asked tau, from the stored counts: no pass over the data
            self.masks = module_masks(KernelUsage.from_state_dict(state["kernel_usage"]), self.cfg.modularize.tau)
        else:
            self.masks = state["module_masks"]
        self.standard = None
        if spec.get("standard"):
            self.standard = build_model(load_reference(spec["standard"], "standard model")).to(self.device)
        self.data = load_data(self.cfg).to(self.device)
        self.whole = self.standard if self.standard is not None else create_model(
            self.arch["name"], self.arch["num_classes"], self.arch["width"], method="standard").to(self.device)
        self.model_flops = count_flops(self.whole, self.data.train_images.shape[-1])
        self.settings = self.cfg.reuse.fine_tune_settings(self.cfg.train.seed)

    def evaluate(self, index: int, classes: list[int], on_step=None) -> dict:
        r = self.cfg.reuse
        start, cpu = time.perf_counter(), time.process_time()
        row = evaluate_subtask(self.model, self.masks, self.data, list(classes), self.settings, self.device,
                               self.standard, self.arch, zero_fine_tune=r.zero_fine_tune,
                               latency_batch_sizes=tuple(r.latency_batch_sizes), latency_repeats=r.latency_repeats,
                               model_flops=self.model_flops, whole_model=self.whole, on_step=on_step)
        # cpu_s / seconds: the share of a core this process got (below its thread count when the machine is busy).
        return {"index": index, **row, "seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
                "pid": os.getpid(),
                "device": str(self.device)}


def format_row(row: dict, done: int | None = None, total: int | None = None) -> str:
    """One progress line for a finished sub-task."""
    head = f"[{done}/{total}] " if done is not None else ""
    line = (f"{head}M={row['m']} classes {row['classes']}: KRR {row['krr']:.3f}  FLOPs {row['module_flops'] / 1e6:.2f}M"
            + (f" ({row['flops_reduction']:.1%} fewer)" if "flops_reduction" in row else "")
            + f"  m-ACC {row['module_accuracy']:.2%}")
    if "standard_accuracy" in row:
        line += f"  M-ACC {row['standard_accuracy']:.2%}  loss {row['accuracy_loss'] * 100:+.2f} pp"
    if "zero_ft_accuracy" in row:
        line += f"  zero-fine-tune {row['zero_ft_accuracy']:.2%}"
    if "chosen" in row:
        line += f"  chosen: {row['chosen']}"
    ratios = [f"b{k[len('latency_ratio_b'):]} x{v:.2f}" for k, v in row.items() if k.startswith("latency_ratio_b")]
    if ratios:
        line += "  latency " + " ".join(ratios)
    return line + f"  ({row.get('seconds', 0):.1f} s, pid {row.get('pid', '?')})"


def reuse_from_checkpoints(modular_path: str, standard_path: str | None, overrides: list[str],
                           log=print) -> list[dict]:
    """Evaluate every sub-task in this process, one after another; writes ``reuse.json`` beside the
    modular checkpoint and returns the rows (``reuse.num_actors`` is ignored)."""
    plan = plan_reuse(modular_path, standard_path, None, overrides)
    evaluator = SubtaskEvaluator(plan.spec)
    rows = []
    for index, task in enumerate(plan.tasks):
        rows.append(evaluator.evaluate(index, task))
        if log:
            log(format_row(rows[-1], index + 1, len(plan.tasks)))
    if "path" in plan.spec["modular"]:
        out = Path(plan.spec["modular"]["path"]).parent / "reuse.json"
        atomic_write_text(out, json.dumps(rows, indent=2))
        if log:
            log(f"wrote {out}")
    return rows
