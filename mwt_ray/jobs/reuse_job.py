"""Reuse from trained checkpoints, in one process: load the modular (and standard) model, rebuild
module masks for the asked tau from the stored kernel counts, evaluate every sub-task, write
``reuse.json`` beside the modular checkpoint and print a per-M table."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..config import apply_overrides, validate_config
from ..core.checkpoint import build_model, load_checkpoint
from ..core.data import validate_classes
from ..core.files import atomic_write_text
from ..core.modularize import KernelUsage, module_masks
from ..core.reuse import evaluate_subtask, sample_subtasks
from .setup import SetupError, load_data, resolve_device

__all__ = ["reuse_from_checkpoints"]


def reuse_from_checkpoints(modular_path: str, standard_path: str | None, overrides: list[str],
                           log=print) -> list[dict]:
    """Evaluate the sub-tasks of the modular checkpoint's config (``reuse.*``, overridable)."""
    import pandas as pd

    state = load_checkpoint(modular_path)
    if "kernel_usage" not in state:
        raise SetupError(f"{modular_path!r} has no kernel usage counts: pass the checkpoint of a modular run")
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    fixed = [k for k in keys if k.split(".")[0] in ("model", "train") and k not in ("train.device", "train.seed")]
    if fixed:
        raise SetupError(f"{fixed[0]!r}: model and training settings come from the checkpoint and cannot be overridden")
    cfg = validate_config(apply_overrides(copy.deepcopy(state["config"]), overrides))
    device = resolve_device(cfg.train.device)
    data = load_data(cfg).to(device)
    arch = state["architecture"]
    if arch["num_classes"] != data.num_classes:
        raise SetupError(f"checkpoint has {arch['num_classes']} classes but dataset {cfg.data.name!r} has {data.num_classes}")
    if arch.get("classes") and list(arch["classes"]) != list(data.classes):
        raise SetupError(f"checkpoint classes {arch['classes']} differ from the dataset's {data.classes}")
    modular = build_model(state).to(device)
    # Module masks for the requested tau, from the stored counts: no pass over the data.
    masks = module_masks(KernelUsage.from_state_dict(state["kernel_usage"]), cfg.modularize.tau)
    standard = None
    if standard_path:
        standard_state = load_checkpoint(standard_path)
        standard_arch = standard_state["architecture"]
        if standard_arch["modular"] or list(standard_arch.get("classes", [])) != list(data.classes):
            raise SetupError(f"{standard_path!r} is not a standard model of this dataset's classes {data.classes}")
        standard = build_model(standard_state).to(device)
    tasks = [list(t) for t in cfg.reuse.subtasks] + sample_subtasks(
        data.num_classes, cfg.reuse.sizes, cfg.reuse.per_size, cfg.train.seed)
    for task in tasks:
        validate_classes(task, data.num_classes)
    if not tasks:
        raise SetupError("no sub-tasks: set reuse.subtasks (e.g. [[0,1]]) or reuse.sizes (e.g. [2,5])")
    settings = cfg.reuse.fine_tune_settings(cfg.train.seed)
    rows = []
    for task in tasks:
        row = evaluate_subtask(modular, masks, data, task, settings, device, standard, arch)
        rows.append(row)
        if log:
            line = (f"classes {task}: KRR {row['krr']:.3f}  FLOPs {row['module_flops'] / 1e6:.2f}M "
                    f"({row['flops_reduction']:.1%} fewer)  module acc {row['module_accuracy']:.2%}")
            if standard is not None:
                line += f"  standard acc {row['standard_accuracy']:.2%}  change {row['accuracy_change'] * 100:+.2f} pp"
            log(line)
    out = Path(modular_path).parent / "reuse.json"
    atomic_write_text(out, json.dumps(rows, indent=2))
    if log:
        table = pd.DataFrame(rows).drop(columns=["classes"]).groupby("m").mean(numeric_only=True)
        log(table.to_string(float_format=lambda v: f"{v:.4g}"))
        log(f"wrote {out}")
    return rows
