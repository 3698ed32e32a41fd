"""Standard and modular training for one process, or one rank of a data-parallel group.

The whole path: ``fit`` runs epochs of ``train_epoch``; each step computes the logits (and, for
modular training, the per-layer masks), the objective of Eq. 6, and an SGD step. Under
``torch.distributed`` (set up by Ray Train or torchrun) each rank sees its slice of every global
batch, and the masks are all-gathered with autograd so cohesion and coupling are computed over the
whole global batch, exactly as one process would.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import ImageData, iterate_batches
from .losses import modular_objective
from .metrics import batch_modularity

__all__ = ["OptimSettings", "make_optimizer", "make_scheduler", "train_epoch", "evaluate", "fit",
           "gather_global_batch", "world", "unwrap_ddp",
           "loss_weight_ramp"]


@dataclass
class OptimSettings:
    """What ``fit`` needs; built by ``config.TrainConfig.optim_settings()``, where the defaults live."""
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    modular: bool
    alpha: float
    beta: float
    warmup_epochs: float  # ramp the modularity losses' weights from 0 over this many epochs
    augment: bool
    seed: int
    warmup_shape: str = "linear"  # linear, cosine or step: see loss_weight_ramp
    sparsity: float = 0.0  # weight of the mean mask value in the objective (0: the paper's Eq. 6)
    generator_lr_scale: float = 1.0  # mask generators' learning rate relative to lr


def world() -> tuple[int, int]:
    """(rank, world_size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks along dim 0; the backward sums each rank's gradient slice."""
    try:  # differentiable functional collective (newer torch)
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:  # older torch: the autograd-aware collective of torch.distributed.nn
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor), dim=0)
    gathered = all_gather_single_autograd(tensor.contiguous(), 0, dist.group.WORLD) * 1  # "* 1" waits for it
    assert gathered.grad_fn is not None or not tensor.requires_grad, "mask all-gather lost its gradient"
    return gathered


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (other models unchanged)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gather_global_batch(masks: list[torch.Tensor], labels: torch.Tensor):
    """Masks and labels of the whole global batch; gradients flow back to each rank's slice."""
    _, world_size = world()
    if world_size == 1:
        return masks, labels
    sizes = [m.shape[1] for m in masks]
    flat = _all_gather_with_grad(torch.cat(masks, dim=1))
    gathered_labels = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(gathered_labels, labels)
    return list(torch.split(flat, sizes, dim=1)), torch.cat(gathered_labels)


def make_optimizer(model: nn.Module, s: OptimSettings) -> torch.optim.Optimizer:
    """SGD over the whole model. With ``generator_lr_scale != 1`` the mask generators get a parameter
    group of their own at ``lr * generator_lr_scale`` (the cosine schedule scales both groups);
    at 1 there is one group, so default runs match earlier ones step for step."""
    settings = dict(lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay)
    if s.generator_lr_scale == 1.0:
        return torch.optim.SGD(model.parameters(), **settings)
    groups = {False: [], True: []}  # is the parameter a mask generator's?
    for name, parameter in model.named_parameters():
        groups["mask_generator." in name].append(parameter)
    return torch.optim.SGD([{"params": groups[False]},
                            {"params": groups[True], "lr": s.lr * s.generator_lr_scale}], **settings)


def make_scheduler(optimizer: torch.optim.Optimizer, s: OptimSettings):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs)


def loss_weight_ramp(s: OptimSettings, epoch_progress: float) -> float:
    """Factor on alpha, beta and the sparsity weight after ``epoch_progress`` epochs: 1 without a
    warm-up; otherwise rising from 0 to 1 over ``warmup_epochs``, linearly, along half a cosine
    wave (slow start, slow finish), or as a step (the losses switch on at ``warmup_epochs``)."""
    if s.warmup_epochs <= 0:
        return 1.0
    done = min(1.0, epoch_progress / s.warmup_epochs)
    if s.warmup_shape == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * done)
    if s.warmup_shape == "step":
        return float(done >= 1.0)
    if s.warmup_shape != "linear":
        raise ValueError(f"unknown warmup_shape {s.warmup_shape!r}; use linear, cosine or step")
    return done


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageData, s: OptimSettings,
                epoch: int, device: torch.device) -> dict[str, float]:
    """One epoch; returns epoch means of losses, train accuracy and (modular) Fig. 5 metrics."""
    rank, world_size = world()
    model.train()
    num_classes = data.num_classes
    steps = len(data.train_labels) // s.batch_size
    if steps == 0:
        raise ValueError(f"batch_size {s.batch_size} is larger than the training set ({len(data.train_labels)} samples)")
    names = ["loss", "ce_loss", "correct", "samples"] + (
        ["cohesion_loss", "coupling_loss", "batch_cohesion", "batch_coupling", "kernel_rate"] if s.modular else [])
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    # Steps that defined each value: a batch without a same-class pair has no cohesion (NaN).
    defined = torch.zeros(len(names), dtype=torch.float64, device=device)
    start = time.perf_counter()
    batches = iterate_batches(data.train_images, data.train_labels, s.batch_size, mean=data.mean,
                              std=data.std, shuffle=True, augment=s.augment, seed=s.seed * 100_003 + epoch,
                              drop_last=True, rank=rank, world_size=world_size)
    for step, (images, labels) in enumerate(batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if s.modular:
            logits, masks = model(images, return_masks=True)
            all_masks, all_labels = gather_global_batch(masks, labels)
            ramp = loss_weight_ramp(s, epoch + step / steps)
            loss, parts = modular_objective(logits, labels, all_masks, all_labels, s.alpha * ramp, s.beta * ramp,
                                            sparsity=s.sparsity * ramp)
        else:
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            parts = {"ce_loss": loss.detach()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            row = [loss.detach(), parts["ce_loss"], (logits.argmax(1) == labels).sum(), labels.new_tensor(len(labels))]
            if s.modular:
                fig5 = batch_modularity(all_masks, all_labels, num_classes)
                row += [parts["cohesion_loss"], parts["coupling_loss"], fig5["batch_cohesion"], fig5["batch_coupling"],
                        fig5["kernel_rate"]]
            row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in row])
            totals += torch.nan_to_num(row, nan=0.0)
            defined += ~row.isnan()
    if world_size > 1:  # per-rank step means average out; correct/samples are plain sums
        dist.all_reduce(totals)
        dist.all_reduce(defined)
    values = dict(zip(names, (totals / defined.clamp_min(1)).tolist()))
    values.update({name: float("nan") for name, n in zip(names, defined.tolist()) if n == 0})
    result = {name: values[name] for name in names if name not in ("correct", "samples")}
    result["train_accuracy"] = totals[2].item() / totals[3].item()
    result["epoch_time_s"] = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, data: ImageData,
             device: torch.device, batch_size: int = 512, classes: list[int] | None = None,
             shard: bool = False) -> float:
    """Top-1 accuracy; with ``classes``, logits are restricted to those classes and labels are
    indices into that list (how a standard model is scored on an M-class sub-task).

    ``shard=True`` under torch.distributed: each rank scores every world_size-th sample and the
    counts are summed, so the work is split instead of repeated."""
    rank, world_size = world() if shard else (0, 1)
    model = unwrap_ddp(model)  # no DDP collectives: ranks may see unequal shards
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    restrict = torch.tensor(classes, device=device) if classes is not None else None
    for x, y in iterate_batches(images[rank::world_size], labels[rank::world_size], batch_size,
                                mean=data.mean, std=data.std):
        logits = model(x.to(device))
        if restrict is not None:
            logits = logits[:, restrict]
        counts[0] += (logits.argmax(1) == y.to(device)).sum()
        counts[1] += len(y)
    if world_size > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return counts[0].item() / max(1, counts[1].item())


EpochCallback = Callable[[int, dict[str, float]], None]


def fit(model: nn.Module, data: ImageData, s: OptimSettings, device: torch.device, *,
        optimizer: torch.optim.Optimizer | None = None, scheduler=None, start_epoch: int = 0,
        on_epoch_end: EpochCallback | None = None, log: Callable[[str], None] | None = print) -> list[dict]:
    """Train ``model`` from ``start_epoch`` to ``s.epochs``; returns one metrics dict per epoch.

    ``on_epoch_end(epoch, metrics)`` runs after each epoch (checkpointing and reporting hooks).
    """
    optimizer = optimizer or make_optimizer(model, s)
    scheduler = scheduler or make_scheduler(optimizer, s)
    rank, _ = world()
    history = []
    for epoch in range(start_epoch, s.epochs):
        lr = optimizer.param_groups[0]["lr"]
        metrics = train_epoch(model, optimizer, data, s, epoch, device)
        scheduler.step()
        if dist.is_available() and dist.is_initialized():
            for buffer in unwrap_ddp(model).buffers():  # score rank 0's model (the one checkpointed)
                dist.broadcast(buffer, 0)
        metrics["test_accuracy"] = evaluate(model, data.test_images, data.test_labels, data, device, shard=True)
        if data.val_labels is not None:
            metrics["val_accuracy"] = evaluate(model, data.val_images, data.val_labels, data, device, shard=True)
        metrics["lr"] = lr
        metrics["epoch"] = epoch + 1
        if not all(math.isfinite(v) for k, v in metrics.items() if "loss" in k):
            raise FloatingPointError(f"loss became non-finite at epoch {epoch + 1}: {metrics}; lower lr, alpha or beta")
        history.append(metrics)
        if log is not None and rank == 0:
            log(format_epoch(metrics, s.epochs, s.modular))
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return history


def format_epoch(m: dict[str, float], epochs: int, modular: bool) -> str:
    line = (f"epoch {m['epoch']:>3}/{epochs}  loss {m['loss']:.4f}  ce {m['ce_loss']:.4f}  "
            f"train {m['train_accuracy']:.2%}  test {m['test_accuracy']:.2%}")
    if "val_accuracy" in m:
        line += f"  val {m['val_accuracy']:.2%}"
    if modular:
        line += (f"  L_ch {m['cohesion_loss']:.3f}  L_cp {m['coupling_loss']:.3f}  "
                 f"batch coh {m['batch_cohesion']:.3f}  batch coup {m['batch_coupling']:.3f}  "
                 f"kernel rate {m['kernel_rate']:.3f}")
    return line + f"  lr {m['lr']:.4f}  {m['epoch_time_s']:.1f}s"
