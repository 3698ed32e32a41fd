"""On-demand reuse (section 3.4): a mixed module for M classes, a new head, fine-tuning.

The mixed module keeps the union of the M modules' kernels (extracted, generators dropped). As
in the authors' code the new head is ReLU -> Linear(N, M) on the module's N original logits.
Fine-tuning trains module and head on the M classes' training samples (labels 0..M-1) and keeps
the epoch with the best accuracy on a held-out part of those training samples, never the test
set. The standard model is scored on the same sub-task with its logits restricted to the M
classes, without fine-tuning.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData, iterate_batches, validate_classes
from .extract import extract_module
from .files import atomic_write_text
from .flops import count_flops
from .models import create_model
from .training import evaluate

__all__ = ["ReusedModel", "mixed_module_mask", "build_reused_model", "fine_tune", "evaluate_subtask",
           "sample_subtasks", "FineTuneSettings"]


class ReusedModel(nn.Module):
    def __init__(self, module: nn.Module, num_original_classes: int, num_target_classes: int):
        super().__init__()
        self.module = module
        self.head = nn.Linear(num_original_classes, num_target_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.module(x)))


def mixed_module_mask(module_masks: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Union of the modules of ``classes``: a kernel any of them keeps."""
    validate_classes(classes, module_masks.shape[0])
    return module_masks[classes].any(dim=0)


def build_reused_model(model: nn.Module, module_masks: torch.Tensor, classes: list[int]) -> ReusedModel:
    return ReusedModel(extract_module(model, mixed_module_mask(module_masks, classes)), module_masks.shape[0], len(classes))


@dataclass
class FineTuneSettings:
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_fraction: float = 0.1
    seed: int = 0


def fine_tune(model: nn.Module, data: ImageData, s: FineTuneSettings, device: torch.device) -> dict:
    """Fine-tune on ``data`` (already the sub-task, labels 0..M-1); keeps the best epoch in place."""
    train_data, val_images, val_labels = data.holdout(s.val_fraction, s.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, nesterov=True,
                                weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, s.epochs))
    best = {"epoch": 0, "val_accuracy": -1.0, "state": copy.deepcopy(model.state_dict())}
    history = []
    for epoch in range(s.epochs):
        model.train()
        batches = iterate_batches(train_data.train_images, train_data.train_labels, s.batch_size,
                                  mean=data.mean, std=data.std, shuffle=True, augment=True,
                                  seed=s.seed * 100_003 + epoch)
        for x, y in batches:
            if len(y) < 2:  # BatchNorm needs more than one sample
                continue
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        val = evaluate(model, val_images, val_labels, data, device) if len(val_labels) else float("nan")
        history.append({"epoch": epoch + 1, "val_accuracy": val})
        if len(val_labels) == 0 or val > best["val_accuracy"]:
            best = {"epoch": epoch + 1, "val_accuracy": val, "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "history": history}


def sample_subtasks(num_classes: int, sizes: list[int], per_size: int, seed: int) -> list[list[int]]:
    """``per_size`` distinct random class sets for each M in ``sizes`` (sorted class lists)."""
    from math import comb

    rng = random.Random(seed)
    tasks = []
    for m in sizes:
        if not 2 <= m <= num_classes:
            raise ValueError(f"sub-task size {m} is out of range: use 2..{num_classes}")
        wanted = min(per_size, comb(num_classes, m))
        chosen: set[tuple[int, ...]] = set()
        while len(chosen) < wanted:
            chosen.add(tuple(sorted(rng.sample(range(num_classes), m))))
        tasks += [list(t) for t in sorted(chosen)]
    return tasks


def evaluate_subtask(modular_model: nn.Module, module_masks: torch.Tensor, data: ImageData,
                     classes: list[int], s: FineTuneSettings, device: torch.device,
                     standard_model: nn.Module | None = None, arch: dict | None = None) -> dict:
    """Reuse the mixed module of ``classes``: KRR, FLOPs vs the full network, accuracy after
    fine-tuning, and (given ``standard_model``) the standard model's accuracy on the sub-task."""
    validate_classes(classes, data.num_classes)
    sub = data.subset(classes)
    torch.manual_seed(s.seed)
    keep = mixed_module_mask(module_masks, classes)
    reused = ReusedModel(extract_module(modular_model, keep), module_masks.shape[0], len(classes)).to(device)
    tuned = fine_tune(reused, sub, s, device)
    size = data.train_images.shape[-1]
    result = {
        "classes": list(classes),
        "m": len(classes),
        "krr": keep.float().mean().item(),
        "module_flops": count_flops(reused.module, size),
        "module_accuracy": evaluate(reused, sub.test_images, sub.test_labels, sub, device),
        "best_epoch": tuned["best_epoch"],
        "val_accuracy": tuned["val_accuracy"],
    }
    if arch is not None:
        plain = create_model(arch["name"], arch["num_classes"], arch["width"], modular=False)
        result["model_flops"] = count_flops(plain, size)
        result["flops_reduction"] = 1 - result["module_flops"] / result["model_flops"]
    if standard_model is not None:
        result["standard_accuracy"] = evaluate(standard_model, sub.test_images, sub.test_labels, sub,
                                               device, classes=list(classes))
        result["accuracy_change"] = result["module_accuracy"] - result["standard_accuracy"]
    return result


def reuse_from_checkpoints(modular_path: str, standard_path: str | None, overrides: list[str],
                           log=print) -> list[dict]:
    """Evaluate the sub-tasks of the modular checkpoint's config (``reuse.*``, overridable)."""
    import json

    import pandas as pd

    from .checkpoint import build_model, load_checkpoint
    from .config import apply_overrides, validate_config
    from .modularize import KernelUsage, module_masks
    from .train import load_data, resolve_device

    state = load_checkpoint(modular_path)
    if "kernel_usage" not in state:
        raise ValueError(f"{modular_path!r} has no kernel usage counts: pass the checkpoint of a modular run")
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    fixed = [k for k in keys if k.split(".")[0] in ("model", "train") and k not in ("train.device", "train.seed")]
    if fixed:
        raise ValueError(f"{fixed[0]!r}: model and training settings come from the checkpoint and cannot be overridden")
    cfg = validate_config(apply_overrides(copy.deepcopy(state["config"]), overrides))
    device = resolve_device(cfg.train.device)
    data = load_data(cfg).to(device)
    arch = state["architecture"]
    if arch["num_classes"] != data.num_classes:
        raise ValueError(f"checkpoint has {arch['num_classes']} classes but dataset {cfg.data.name!r} has {data.num_classes}")
    if arch.get("classes") and list(arch["classes"]) != list(data.classes):
        raise ValueError(f"checkpoint classes {arch['classes']} differ from the dataset's {data.classes}")
    modular = build_model(state).to(device)
    # Module masks for the requested tau, from the stored counts: no pass over the data.
    masks = module_masks(KernelUsage.from_state_dict(state["kernel_usage"]), cfg.modularize.tau)
    standard = None
    if standard_path:
        standard_state = load_checkpoint(standard_path)
        standard_arch = standard_state["architecture"]
        if standard_arch["modular"] or list(standard_arch.get("classes", [])) != list(data.classes):
            raise ValueError(f"{standard_path!r} is not a standard model of this dataset's classes {data.classes}")
        standard = build_model(standard_state).to(device)
    tasks = [list(t) for t in cfg.reuse.subtasks] + sample_subtasks(
        data.num_classes, cfg.reuse.sizes, cfg.reuse.per_size, cfg.train.seed)
    for task in tasks:
        validate_classes(task, data.num_classes)
    if not tasks:
        raise ValueError("no sub-tasks: set reuse.subtasks (e.g. [[0,1]]) or reuse.sizes (e.g. [2,5])")
    settings = FineTuneSettings(cfg.reuse.epochs, cfg.reuse.lr, cfg.reuse.batch_size,
                                val_fraction=cfg.reuse.val_fraction, seed=cfg.train.seed)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m mwt_ray.reuse --modular RUN/checkpoint.pt [--standard RUN/checkpoint.pt] --set reuse.sizes=[2,5]``"""
    import sys

    from .config import ConfigError
    from .train import build_parser

    parser = build_parser("Reuse modules on M-class sub-tasks and compare with the standard model.")
    parser.add_argument("--modular", required=True, help="checkpoint of a modular run (has module masks)")
    parser.add_argument("--standard", help="checkpoint of a standard run of the same dataset")
    args = parser.parse_args(argv)
    if args.config:
        parser.error("--config is not used here: the modular checkpoint carries its config; use --set")
    try:
        reuse_from_checkpoints(args.modular, args.standard, args.overrides)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
