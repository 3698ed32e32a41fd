"""On-demand reuse (section 3.4): a mixed module for M classes, a new head, fine-tuning.

The mixed module keeps the union of the M modules' kernels (extracted, generators dropped). As
in the authors' code the new head is ReLU -> Linear(N, M) on the module's N original logits.
Fine-tuning trains module and head on the M classes' training samples (labels 0..M-1) and keeps
the best candidate on a held-out part of those training samples, never the test set; the
candidates are the module without fine-tuning (epoch 0: its original logits restricted to the M
classes, ``RestrictedLogits``) and every fine-tuned epoch, so fine-tuning never hands back a
module worse on the held-out samples than none. The standard model is scored on the same sub-task
with its logits restricted to the M classes, without fine-tuning.

Fine-tuning collapsed on a small sub-task set (the quickstart: a 2-class module at 91.67% without
fine-tuning, 50% after two epochs, every sample given one class; reproduced here on a 3-epoch
quickstart model, classes 4 and 6: training loss 0.16, held-out and test accuracy 50%). The cause
is BatchNorm: in train mode it normalises with each M-class batch's statistics, while its running
averages, which evaluation uses, are after a few dozen steps a blend of the N-class statistics the
model was trained with and the M-class ones, so the network evaluated is not the one trained.
After every epoch the running statistics are therefore recomputed on the sub-task's training
samples (no augmentation) before the epoch is scored: 50% became 97-100% on the
same module. The new head also starts as the restricted logits (weight 1 from each sub-task
class's original logit, 0 elsewhere, bias 0), so fine-tuning starts from the module without
fine-tuning instead of a random projection of the logits.
"""
from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from math import comb

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData, iterate_batches, validate_classes
from .extract import extract_module
from .flops import count_flops
from .graph import conv_columns
from .models import create_model
from .training import evaluate

__all__ = ["ReusedModel", "RestrictedLogits", "mixed_module_mask", "build_reused_model", "fine_tune", "reuse_module",
           "evaluate_subtask",
           "accuracy_without_fine_tuning", "inference_latency", "compare_latency",
           "sample_subtasks", "FineTuneSettings", "recompute_batchnorm_statistics"]


class ReusedModel(nn.Module):
    """The paper's reuse model: the mixed module and a new head ReLU -> Linear(N, M) on its N logits.

    Given ``classes`` the head starts as their restricted logits (see the module docstring); without,
    it has ``nn.Linear``'s random initialisation."""

    def __init__(self, module: nn.Module, num_original_classes: int, num_target_classes: int,
                 classes: list[int] | None = None):
        super().__init__()
        self.module = module
        self.head = nn.Linear(num_original_classes, num_target_classes)
        if classes is not None:
            if len(classes) != num_target_classes:
                raise ValueError(f"{len(classes)} classes for a head of {num_target_classes} outputs")
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()
                self.head.weight[torch.arange(num_target_classes), torch.tensor(list(classes))] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.module(x)))


class RestrictedLogits(nn.Module):
    """The mixed module with no fine-tuning: its original classifier's logits at ``classes``, in
    that order (what ``accuracy_without_fine_tuning`` scores)."""

    def __init__(self, module: nn.Module, classes: list[int]):
        super().__init__()
        self.module = module
        self.register_buffer("classes", torch.tensor(list(classes), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).index_select(1, self.classes)


def mixed_module_mask(module_masks: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Union of the modules of ``classes``: a kernel any of them keeps."""
    validate_classes(classes, module_masks.shape[0])
    return module_masks[classes].any(dim=0)


def build_reused_model(model: nn.Module, module_masks: torch.Tensor, classes: list[int]) -> ReusedModel:
    return ReusedModel(extract_module(model, mixed_module_mask(module_masks, classes)), module_masks.shape[0],
                       len(classes), classes)


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


@torch.no_grad()
def recompute_batchnorm_statistics(model: nn.Module, images: torch.Tensor, data: ImageData, device: torch.device,
                                   batch_size: int = 256) -> None:
    """Set every BatchNorm layer's running mean and variance to those of ``images`` (normalised with
    ``data``'s statistics, not augmented): the average of the statistics of its batches of
    ``batch_size`` (PyTorch's cumulative average, momentum None), exactly theirs when one batch
    holds them all. The weights are untouched."""
    layers = [layer for layer in model.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch, not an exponential one
    was_training = model.training
    model.train()
    try:
        for x, _ in iterate_batches(images, torch.zeros(len(images), dtype=torch.long), batch_size,
                                    mean=data.mean, std=data.std):
            model(x.to(device))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)


def fine_tune(model: nn.Module, data: ImageData, s: FineTuneSettings, device: torch.device,
              on_step: Callable[[int], None] | None = None, baseline: nn.Module | None = None) -> dict:
    """Fine-tune on ``data`` (already the sub-task, labels 0..M-1) and keep the best candidate on
    ``s.val_fraction`` of its training samples, held out here.

    The candidates are ``baseline`` (epoch 0: the model without fine-tuning, scored on the same
    held-out samples; it wins ties, being the simpler one) and each epoch's ``model``. Returns
    {"model": the winner (``baseline`` or ``model`` with the best epoch's weights loaded), "best_epoch"
    (0: the baseline), "val_accuracy", "baseline_val_accuracy", "history"}. With nothing held out
    the last epoch wins. ``on_step(step)`` runs after every optimizer step (1-based; fault injection
    uses it)."""
    train_data, val_images, val_labels = data.holdout(s.val_fraction, s.seed)
    held_out = len(val_labels) > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, nesterov=True,
                                weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, s.epochs))
    baseline_val = (
        evaluate(baseline, val_images, val_labels, data, device) if baseline is not None and held_out else None
    )
    best = {"epoch": 0, "val_accuracy": -1.0 if baseline_val is None else baseline_val, "state": None}
    history = []
    steps = 0
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
            steps += 1
            if on_step is not None:
                on_step(steps)
        scheduler.step()
        recompute_batchnorm_statistics(model, train_data.train_images, data, device)
        val = evaluate(model, val_images, val_labels, data, device) if held_out else float("nan")
        history.append({"epoch": epoch + 1, "val_accuracy": val})
        if not held_out or val > best["val_accuracy"]:
            best = {"epoch": epoch + 1, "val_accuracy": val, "state": copy.deepcopy(model.state_dict())}
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    winner = model if best["state"] is not None or baseline is None else baseline
    return {"model": winner, "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
            "baseline_val_accuracy": baseline_val, "history": history}


def reuse_module(modular_model: nn.Module, module_masks: torch.Tensor, data: ImageData, classes: list[int],
                 s: FineTuneSettings, device: torch.device,
                 on_step: Callable[[int], None] | None = None) -> tuple[nn.Module, dict]:
    """The module handed back for the sub-task ``classes`` (scores in their order) and how it was
    chosen: with ``s.epochs`` 0 the mixed module's restricted logits; else the better on held-out
    training samples of those and the fine-tuned ``ReusedModel`` (``fine_tune``). The info holds
    "best_epoch" (0: no fine-tuning won), "chosen" (words for the tables), "val_accuracy"."""
    validate_classes(classes, data.num_classes)
    keep = mixed_module_mask(module_masks, classes)
    restricted = RestrictedLogits(extract_module(modular_model, keep), classes).to(device).eval()
    if s.epochs == 0:
        return restricted, {"best_epoch": 0, "chosen": "no fine-tuning (reuse.epochs=0)", "val_accuracy": None}
    torch.manual_seed(s.seed)
    reused = ReusedModel(extract_module(modular_model, keep), module_masks.shape[0], len(classes), classes).to(device)
    tuned = fine_tune(reused, data.subset(classes), s, device, on_step=on_step, baseline=restricted)
    chosen = "no fine-tuning" if tuned["best_epoch"] == 0 else f"fine-tuned epoch {tuned['best_epoch']}"
    info = {k: tuned[k] for k in ("best_epoch", "val_accuracy", "baseline_val_accuracy", "history")}
    return tuned["model"].eval(), info | {"chosen": chosen}


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
    """``per_size`` distinct random class sets for each M in ``sizes`` (sorted class lists), all
    C(N, M) of them when there are no more than ``per_size``. Each M draws from its own generator
    seeded by (seed, M), so adding an M to ``sizes`` leaves the sets of the others unchanged."""
    if per_size < 1:
        raise ValueError(f"sub-tasks per size must be >= 1, got {per_size}")
    tasks = []
    for m in sizes:
        if not 2 <= m <= num_classes:
            raise ValueError(f"sub-task size {m} is out of range: use 2..{num_classes}")
        if comb(num_classes, m) <= per_size:
            tasks += [list(t) for t in combinations(range(num_classes), m)]
            continue
        rng = random.Random(f"{seed}-{m}")
        chosen: set[tuple[int, ...]] = set()
        while len(chosen) < per_size:
            chosen.add(tuple(sorted(rng.sample(range(num_classes), m))))
        tasks += [list(t) for t in sorted(chosen)]
    return tasks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def compare_latency(models: list[nn.Module], batch_size: int, image_size: int, device: torch.device,
                    repeats: int = 5, channels: int = 3) -> list[float]:
    """Seconds of one forward pass of each model on a batch of ``batch_size`` random images: the
    fastest of ``repeats`` passes (as ``timeit`` advises: slower passes measure other processes
    taking the CPU, not the model), the models timed in turn (a b a b ...) so that load on the
    machine hits them alike. Two warm-up passes each first; eval mode, no autograd."""
    x = torch.randn(batch_size, channels, image_size, image_size, device=device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
        m(x)  # two warm-up passes: the first call of a new shape sets up kernels and caches
        m(x)
    times: list[list[float]] = [[] for _ in models]
    try:
        for _ in range(repeats):
            for m, spent in zip(models, times):
                _sync(device)
                start = time.perf_counter()
                m(x)
                _sync(device)
                spent.append(time.perf_counter() - start)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [min(t) for t in times]


def inference_latency(model: nn.Module, batch_size: int, image_size: int, device: torch.device,
                      repeats: int = 5) -> float:
    """Seconds of one forward pass at ``batch_size``, the fastest of ``repeats`` (see ``compare_latency``)."""
    return compare_latency([model], batch_size, image_size, device, repeats)[0]


def evaluate_subtask(modular_model: nn.Module, module_masks: torch.Tensor, data: ImageData,
                     classes: list[int], s: FineTuneSettings, device: torch.device,
                     standard_model: nn.Module | None = None, arch: dict | None = None, *,
                     zero_fine_tune: bool = False, latency_batch_sizes: tuple[int, ...] = (),
                     latency_repeats: int = 5, model_flops: int | None = None,
                     whole_model: nn.Module | None = None, on_step: Callable[[int], None] | None = None) -> dict:
    """Reuse the mixed module of ``classes``: KRR, FLOPs vs the full network, accuracy of the module
    ``reuse_module`` hands back (m-ACC; "chosen" says whether fine-tuning or none won), and given
    ``standard_model`` the standard model's accuracy on the sub-task with its
    logits restricted to the M classes (M-ACC) and the loss M-ACC - m-ACC.

    ``arch`` ({"name", "num_classes", "width"}) adds the full network's FLOPs (``model_flops``
    skips recounting them) and the reduction; ``zero_fine_tune`` adds the mixed module's accuracy
    with no training (``accuracy_without_fine_tuning``); each of ``latency_batch_sizes`` adds the
    fastest forward time of the reused module and of the whole model (the standard model, else
    ``whole_model``, else the plain network of ``arch``) at that batch size, timed in turn, and
    their ratio. ``on_step`` is passed to ``fine_tune``. ``fine_tune_s`` and ``latency_s`` say
    where the time went."""
    validate_classes(classes, data.num_classes)
    sub = data.subset(classes)
    size = data.train_images.shape[-1]
    keep = mixed_module_mask(module_masks, classes)
    # KRR over conv kernels (a method's hidden Linear units, MODA's, are neurons: not counted)
    result: dict = {"classes": list(classes), "m": len(classes),
                    "krr": keep[conv_columns(modular_model)].float().mean().item()}
    if zero_fine_tune:
        result["zero_ft_accuracy"] = accuracy_without_fine_tuning(modular_model, module_masks, data, classes, device)
    start = time.perf_counter()
    reused, chosen = reuse_module(modular_model, module_masks, data, classes, s, device, on_step=on_step)
    result["fine_tune_s"] = time.perf_counter() - start
    result |= {
        "module_flops": count_flops(reused.module, size),
        "module_accuracy": evaluate(reused, sub.test_images, sub.test_labels, sub, device),
        "best_epoch": chosen["best_epoch"],
        "chosen": chosen["chosen"],
        "fine_tune_won": chosen["best_epoch"] > 0,
        "val_accuracy": chosen["val_accuracy"],
    }
    plain = standard_model if standard_model is not None else whole_model
    if plain is None and arch is not None and (model_flops is None or latency_batch_sizes):
        plain = create_model(arch["name"], arch["num_classes"], arch["width"], method="standard").to(device)
    if arch is not None:
        result["model_flops"] = model_flops if model_flops is not None else count_flops(plain, size)
        result["flops_reduction"] = 1 - result["module_flops"] / result["model_flops"]
    if standard_model is not None:
        result["standard_accuracy"] = evaluate(standard_model, sub.test_images, sub.test_labels, sub,
                                               device, classes=list(classes))
        result["accuracy_change"] = result["module_accuracy"] - result["standard_accuracy"]
        result["accuracy_loss"] = -result["accuracy_change"]
    if latency_batch_sizes and plain is None:
        raise ValueError("latency needs the whole model: pass standard_model or arch")
    start = time.perf_counter()
    for batch in latency_batch_sizes:
        module_s, model_s = compare_latency([reused, plain], batch, size, device, latency_repeats)
        result |= {f"module_ms_b{batch}": module_s * 1e3, f"model_ms_b{batch}": model_s * 1e3,
                   f"latency_ratio_b{batch}": module_s / model_s}
    if latency_batch_sizes:
        result["latency_s"] = time.perf_counter() - start
    return result
