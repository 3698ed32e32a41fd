"""Standard and modular training for one process, or one rank of a data-parallel group.

The whole path: ``train_epochs`` runs epochs of ``train_epoch``; each step computes the logits (and, for
modular training, the per-layer masks), the objective of Eq. 6, and an SGD step. Under
``torch.distributed`` (set up by Ray Train or torchrun) each rank sees its slice of every global
batch, and the masks are all-gathered with autograd so cohesion and coupling are computed over the
whole global batch, exactly as one process would.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import ImageData, iterate_batches
from .graph import modular_units
from .losses import LayerMasks
from .methods import get_method
from .metrics import batch_modularity

__all__ = ["OptimSettings", "make_optimizer", "make_scheduler", "prepare_model", "TrainingStep", "StepValues",
           "step_value_names", "train_epoch", "evaluate", "train_epochs", "gather_global_batch", "world", "unwrap_ddp",
           "loss_weight_ramp"]


@dataclass
class OptimSettings:
    """What ``train_epochs`` needs; built by ``config.TrainConfig.optim_settings()``, where the defaults live: each
    field is read from the ``train`` key of the same name."""
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    method: str  # standard, mwt or moda (core.methods)
    alpha: float  # MwT's weights
    beta: float
    warmup_epochs: float  # ramp the modularity losses' weights from 0 over this many epochs
    augment: bool
    seed: int
    warmup_shape: str = "linear"  # linear, cosine or step: see loss_weight_ramp
    sparsity: float = 0.0  # weight of the mean mask value in the objective (0: the paper's Eq. 6)
    affinity: float = 1.0  # MODA's weights
    dispersion: float = 1.0
    compactness: float = 0.3
    generator_lr_scale: float = 1.0  # mask generators' learning rate relative to lr
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast and a grad scaler)
    channels_last: bool = False  # NHWC activations (faster convolutions on tensor cores)
    compile: bool = False  # torch.compile the model, the objective and the step's metrics
    compile_mode: str = "default"  # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune

    @property
    def modular(self) -> bool:
        return get_method(self.method).modular


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


def gather_global_batch(masks: list[torch.Tensor] | LayerMasks,
                        labels: torch.Tensor) -> tuple[LayerMasks, torch.Tensor]:
    """Masks and labels of the whole global batch; gradients flow back to each rank's slice."""
    masks = LayerMasks.of(masks)
    _, world_size = world()
    if world_size == 1:
        return masks, labels
    gathered_labels = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(gathered_labels, labels)
    return LayerMasks(_all_gather_with_grad(masks.values), masks.columns), torch.cat(gathered_labels)


def make_optimizer(model: nn.Module, s: OptimSettings) -> torch.optim.Optimizer:
    """SGD over the whole model. With ``generator_lr_scale != 1`` the mask generators get a parameter
    group of their own at ``lr * generator_lr_scale`` (the cosine schedule scales both groups);
    at 1 there is one group, so default runs match earlier ones step for step."""
    settings = dict(lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay)
    if s.generator_lr_scale == 1.0:
        return torch.optim.SGD(model.parameters(), **settings)
    generators = {id(p) for unit in modular_units(model) for p in unit.state.parameters()}
    groups = {False: [], True: []}  # is the parameter a mask generator's?
    for parameter in model.parameters():
        groups[id(parameter) in generators].append(parameter)
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


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_model(model: nn.Module, s: OptimSettings) -> nn.Module:
    """Apply the step's model options in place: channels-last weights, then ``torch.compile``.

    Call it on the model as training will run it, after any DDP wrapping (PyTorch's advice for
    compiling DDP). ``nn.Module.compile`` compiles in place, so ``state_dict`` keys stay those of
    the plain model (no ``_orig_mod.``): checkpoints load into an uncompiled model."""
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    if s.compile:
        model.compile(mode=s.compile_mode)
    return model


class TrainingStep:
    """One optimizer step on one batch, as ``train_epoch`` runs it; returns its ``StepValues``.

    The values (``step_value_names``) stay on the device: nothing in a step waits for the GPU (no
    ``.item()``, no branch on a tensor), so the host can queue the next step while this one runs.
    ``train_epoch`` reads them once per epoch. The exception is fp16,
    whose grad scaler checks for infinite gradients on the host every step (bf16 needs no scaler).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, s: OptimSettings,
                 num_classes: int, device: torch.device):
        if s.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"unknown precision {s.precision!r}; use {', '.join(AUTOCAST_DTYPES)}")
        self.model, self.optimizer, self.s, self.num_classes, self.device = model, optimizer, s, num_classes, device
        self.autocast_dtype = AUTOCAST_DTYPES[s.precision]
        self.scaler = torch.amp.GradScaler(device.type) if s.precision == "fp16" else None
        self.method = get_method(s.method)
        self.objective, self.metrics = self.method.objective, batch_modularity
        if s.compile and s.modular:
            self.objective = torch.compile(self.method.objective, mode=s.compile_mode)
            self.metrics = torch.compile(batch_modularity, mode=s.compile_mode)
        self.cuda_graphs = s.compile and s.compile_mode == "reduce-overhead"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, ramp: float) -> StepValues:
        s, model = self.s, self.model
        if self.cuda_graphs:  # a new step: CUDA-graph outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if s.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if s.modular:
                logits, signals = model(images, return_masks=True)
                all_signals, all_labels = gather_global_batch(signals, labels)
                loss, parts = self.objective(logits, labels, all_signals, all_labels, self.num_classes, s, ramp)
            else:
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
                parts = {"ce_loss": loss.detach()}
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with torch.no_grad():
            values = {"loss": loss.detach(), "ce_loss": parts["ce_loss"],
                      "correct": (logits.argmax(1) == labels).sum(dtype=torch.float32)}
            if s.modular:  # the Fig. 5 metrics read only which channels are on: the same for every method
                values |= {name: parts[name] for name in self.method.loss_names}
                values |= self.metrics(all_signals, all_labels, self.num_classes)
            return StepValues.of(values)


STEP_VALUES = ("loss", "ce_loss", "correct")
BATCH_MODULARITY = ("batch_cohesion", "batch_coupling", "kernel_rate")


def step_value_names(method: str) -> tuple[str, ...]:
    """What a ``TrainingStep`` of ``method`` gives: a batch's losses and metrics, and its correct predictions."""
    found = get_method(method)
    return STEP_VALUES + found.loss_names + BATCH_MODULARITY if found.modular else STEP_VALUES


@dataclass(frozen=True)
class StepValues:
    """A step's values, read by name: ``values["loss"]``, ``values.to_dict()`` (floats, a host read).

    They are held in one device tensor (``table``, in the order of ``names``) because that one copy
    is also what keeps them: under ``compile_mode=reduce-overhead`` the compiled objective's outputs
    live in CUDA-graph buffers that the next step overwrites. The names travel with the tensor, so
    no reader depends on an order."""
    names: tuple[str, ...]
    table: torch.Tensor

    @classmethod
    def of(cls, values: dict[str, torch.Tensor]) -> StepValues:
        return cls(tuple(values), torch.stack(list(values.values())))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.table[self.names.index(name)]

    def to_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.table.tolist()))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageData, s: OptimSettings,
                epoch: int, device: torch.device, step: TrainingStep | None = None) -> dict[str, float]:
    """One epoch; returns epoch means of losses, train accuracy and (modular) Fig. 5 metrics.

    Batches come from wherever ``data`` lives (on the device: no host copy per step)."""
    rank, world_size = world()
    model.train()
    step = step or TrainingStep(model, optimizer, s, data.num_classes, device)
    steps = len(data.train_labels) // s.batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size {s.batch_size} is larger than the training set ({len(data.train_labels)} samples)"
        )
    start = time.perf_counter()
    batches = iterate_batches(data.train_images, data.train_labels, s.batch_size, mean=data.mean,
                              std=data.std, shuffle=True, augment=s.augment, seed=s.seed * 100_003 + epoch,
                              drop_last=True, rank=rank, world_size=world_size)
    steps_values, samples = [], 0
    for index, (images, labels) in enumerate(batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        steps_values.append(step(images, labels, loss_weight_ramp(s, epoch + index / steps)))
        samples += len(labels)
    result = _epoch_means(steps_values, samples, world_size)
    result["epoch_time_s"] = time.perf_counter() - start
    return result


def _epoch_means(steps_values: list[StepValues], samples: int, world_size: int) -> dict[str, float]:
    """Every step value's mean over the epoch (over all ranks), and ``train_accuracy`` from the
    summed correct predictions: the epoch's one read of the device.

    A value is NaN in a step that does not define it (a batch without a same-class pair has no
    cohesion): its mean is over the steps that do. Per-rank step means average out over ranks;
    correct predictions and samples are plain sums."""
    names, n = steps_values[0].names, len(steps_values[0].names)
    table = torch.stack([values.table for values in steps_values]).to(torch.float64)
    packed = torch.cat([table.nan_to_num(0.0).sum(0), (~table.isnan()).sum(0).to(torch.float64),
                        table.new_tensor([samples])])  # one collective and one host read for all three
    if world_size > 1:
        dist.all_reduce(packed)
    read = packed.tolist()
    totals, defined, samples = dict(zip(names, read[:n])), dict(zip(names, read[n:2 * n])), read[2 * n]
    result = {name: totals[name] / defined[name] if defined[name] else float("nan")
              for name in names if name != "correct"}
    result["train_accuracy"] = totals["correct"] / samples
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


def train_epochs(model: nn.Module, data: ImageData, s: OptimSettings, device: torch.device, *,
        optimizer: torch.optim.Optimizer | None = None, scheduler=None, start_epoch: int = 0,
        on_epoch_end: EpochCallback | None = None, log: Callable[[str], None] | None = print) -> list[dict]:
    """Train ``model`` from ``start_epoch`` to ``s.epochs``; returns one metrics dict per epoch.

    ``on_epoch_end(epoch, metrics)`` runs after each epoch (checkpointing and reporting hooks).
    """
    optimizer = optimizer or make_optimizer(model, s)
    scheduler = scheduler or make_scheduler(optimizer, s)
    rank, _ = world()
    step = TrainingStep(model, optimizer, s, data.num_classes, device)
    history = []
    for epoch in range(start_epoch, s.epochs):
        lr = optimizer.param_groups[0]["lr"]
        metrics = train_epoch(model, optimizer, data, s, epoch, device, step)
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
            log(format_epoch(metrics, s.epochs, get_method(s.method).loss_names))
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return history


def format_epoch(m: dict[str, float], epochs: int, loss_names: tuple[str, ...] = ()) -> str:
    line = (f"epoch {m['epoch']:>3}/{epochs}  loss {m['loss']:.4f}  ce {m['ce_loss']:.4f}  "
            f"train {m['train_accuracy']:.2%}  test {m['test_accuracy']:.2%}")
    if "val_accuracy" in m:
        line += f"  val {m['val_accuracy']:.2%}"
    if loss_names:  # a modular method's losses (cohesion 0.123), then the method-blind batch metrics
        line += "".join(f"  {name.removesuffix('_loss')} {m[name]:.3f}" for name in loss_names)
        line += (f"  batch coh {m['batch_cohesion']:.3f}  batch coup {m['batch_coupling']:.3f}  "
                 f"kernel rate {m['kernel_rate']:.3f}")
    return line + f"  lr {m['lr']:.4f}  {m['epoch_time_s']:.1f}s"
