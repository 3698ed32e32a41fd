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

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData, iterate_batches, validate_classes
from .extract import extract_module
from .flops import count_flops
from .models import create_model
from .training import evaluate

__all__ = ["ReusedModel", "mixed_module_mask", "build_reused_model", "fine_tune", "evaluate_subtask",
           "accuracy_without_fine_tuning",
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
    """What ``fine_tune`` needs; built by ``config.ReuseConfig.fine_tune_settings()``, where the defaults live."""
    epochs: int
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    val_fraction: float
    seed: int


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


@torch.no_grad()
def accuracy_without_fine_tuning(modular_model: nn.Module, module_masks: torch.Tensor, data: ImageData,
                                 classes: list[int], device: torch.device, split: str = "test") -> float:
    """Reuse for free: the mixed module of ``classes`` (extracted, generators dropped), scored with
    its original classifier's logits restricted to those classes, with no new head and no training.

    ``split``: "test", or "val" for the samples ``ImageData.with_validation`` held out of training."""
    sub = data.subset(classes)
    images, labels = getattr(sub, f"{split}_images"), getattr(sub, f"{split}_labels")
    if images is None:
        raise ValueError(f"the data has no {split!r} split")
    module = extract_module(modular_model, mixed_module_mask(module_masks, classes)).to(device)
    return evaluate(module, images, labels, sub, device, classes=list(classes))


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
