"""The sweep's objective: what a trained modular model's modules are worth at each tau.

Modularizing at any tau needs no retraining and no pass over the data: the per-class kernel counts
stored in the checkpoint give the module masks for every tau. The modular model's own accuracy
does not depend on tau, so an objective built on it would always prefer tau = 1 (fewest kernels).
What tau does cost is the accuracy of the modules: here, the mean accuracy of sampled M-class
mixed modules with no fine-tuning (``core.reuse.accuracy_without_fine_tuning``: extracted,
generators dropped, the original classifier's logits restricted to the M classes), measured on
the training samples held out of training (``data.val_fraction``), never on the test set::

    score(tau) = module_accuracy(tau) - krr_weight * KRR(tau)

with KRR the paper's kernel retention rate of the single-class modules. ``krr_weight`` says how
much accuracy (0..1) one unit of KRR is worth: at 0.1, keeping 10% fewer kernels is worth one
point of module accuracy. Each trial reports the tau with the best score, and the sweep ranks its
trials (``rank_trials``) and picks the best one (``best_trial``).
"""
from __future__ import annotations

import torch

from ..config import Config
from ..core.checkpoint import build_model, load_checkpoint
from ..core.data import ImageData
from ..core.graph import conv_columns
from ..core.kernel_usage import KernelUsage, module_masks
from ..core.metrics import coupling, kernel_retention_rate
from ..core.reuse import accuracy_without_fine_tuning, sample_subtasks
from .setup import SetupError

__all__ = ["default_subtask_sizes", "scan_tau", "best_tau", "scan_checkpoint", "pareto_front", "rank_trials",
           "best_trial"]


def default_subtask_sizes(num_classes: int) -> list[int]:
    """A small and a middle M: 2 and N // 2 (just 2 when N < 4)."""
    return sorted({2, max(2, num_classes // 2)})


def scan_tau(model: torch.nn.Module, usage: KernelUsage, data: ImageData, taus: list[float],
             subtasks: list[list[int]], krr_weight: float, device: torch.device) -> list[dict]:
    """One row per tau: KRR, coupling, mean mixed-module KRR and accuracy over ``subtasks`` on the
    validation split, and the score."""
    if data.val_labels is None:
        raise SetupError("scoring tau needs held-out training samples: set data.val_fraction > 0")
    model = model.to(device).eval()
    conv = conv_columns(model)  # KRR counts conv kernels only (not a method's hidden Linear neurons)
    rows = []
    for tau in taus:
        masks = module_masks(usage, tau)
        accuracies = [accuracy_without_fine_tuning(model, masks, data, task, device, split="val") for task in subtasks]
        module_accuracy = sum(accuracies) / len(accuracies)
        krr = kernel_retention_rate(masks[:, conv])
        rows.append({"tau": tau, "krr": krr, "coupling": coupling(masks),
                     "subtask_krr": sum(masks[t][:, conv].any(0).float().mean().item() for t in subtasks)
                     / len(subtasks),
                     "module_accuracy": module_accuracy, "score": module_accuracy - krr_weight * krr})
    return rows


def best_tau(rows: list[dict]) -> dict:
    """The row with the best score; ties go to the smaller KRR."""
    return max(rows, key=lambda row: (row["score"], -row["krr"]))


def scan_checkpoint(checkpoint_path, data: ImageData, cfg: Config, taus: list[float],
                    device: torch.device) -> list[dict]:
    """``scan_tau`` for a finished modular run's ``checkpoint.pt`` with the sweep's sub-task settings."""
    state = load_checkpoint(checkpoint_path)
    if "kernel_usage" not in state:
        raise SetupError(f"{checkpoint_path} holds no kernel usage counts: it is not a modularized run")
    sizes = cfg.sweep.subtask_sizes or default_subtask_sizes(data.num_classes)
    too_big = [m for m in sizes if m > data.num_classes]
    if too_big:
        raise SetupError(f"sweep.subtask_sizes {too_big} exceed the dataset's {data.num_classes} classes")
    subtasks = sample_subtasks(data.num_classes, sizes, cfg.sweep.subtasks_per_size, cfg.sweep.seed)
    usage = KernelUsage.from_state_dict(state["kernel_usage"])
    return scan_tau(build_model(state), usage, data, taus, subtasks, cfg.sweep.krr_weight, device)


def pareto_front(table) -> list[bool]:
    """Completed trials no other completed trial beats on both of the sweep's objectives: module
    accuracy (higher, on the held-out sub-tasks at the trial's tau) and KRR (lower)."""
    points = [(row.module_accuracy, row.krr) if row.status == "completed" else None for row in table.itertuples()]
    front = []
    for p in points:
        front.append(p is not None and not any(
            q is not None and q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in points))
    return front


def rank_trials(table, objective: str):
    """The sweep's results table (one row per trial) with its ``pareto`` column filled, best first:
    by score (``objective: score``), else by KRR (``pareto``: the front's lowest KRR leads)."""
    table = table.copy()
    table["pareto"] = pareto_front(table)
    if objective == "score":
        return table.sort_values("objective", ascending=False, na_position="last").reset_index(drop=True)
    return table.sort_values("krr", na_position="last").reset_index(drop=True)


def best_trial(ranked, objective: str) -> dict | None:
    """The row of the best completed trial of a ``rank_trials`` table, or None when none completed."""
    done = ranked[ranked["status"] == "completed"]
    if not len(done):
        return None
    return (done.iloc[0] if objective == "score" else done[done["pareto"]].iloc[0]).to_dict()
