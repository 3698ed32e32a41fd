"""Modularizing (section 3.3): per-class kernel usage counts, then module masks for any tau.

One no-grad pass streams the training set through the modular model and adds, per class and
kernel, how many samples had a mask value > 0 there. Memory is classes x kernels whatever the
dataset size. Module masks for any tau come from those counts without another pass.

Cohesion is the paper's module cohesion: Eq. 2 over each sample's kernel set restricted to the
kernels of its class's module, so it depends on tau. It needs the per-sample kernel sets, which
exist only during the counting pass (``max_samples_per_class``): ``modularity_report`` and
``modularity_by_tau`` compute it for several tau from those sets in one pass.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .graph import modular_units
from .metrics import coupling, kernel_rate, kernel_retention_rate, module_cohesions

__all__ = ["KernelUsage", "count_kernel_usage", "module_masks", "split_layers", "modularity_by_tau",
           "modularity_report", "TAU_GRID"]

# The tau values ``modularity_report`` tabulates (plus the configured tau) when per-sample kernel
# sets are kept. All share one pass over the sets: on CIFAR-10-sized data (50k samples x 1,040
# kernels) the grid adds about as much time as the cohesion at one tau (seconds on 2 CPU cores).
# ``taus=None`` skips it.
TAU_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class KernelUsage:
    """How often each masked kernel was active for each class's training samples.

    ``counts[c, k]``: number of class-c samples whose mask at kernel k was > 0.
    ``class_sizes[c]``: number of class-c samples seen. ``layer_sizes``: kernels per masked layer.
    ``sample_kernel_sets``/``sample_labels``: an optional bounded sample of per-sample kernel
    sets (at most ``max_samples_per_class`` per class), kept for the exact Jaccard cohesion.
    """

    counts: torch.Tensor
    class_sizes: torch.Tensor
    layer_sizes: list[int]
    sample_kernel_sets: torch.Tensor | None = None
    sample_labels: torch.Tensor | None = None

    @property
    def frequencies(self) -> torch.Tensor:
        return self.counts.to(torch.float64) / self.class_sizes.clamp_min(1)[:, None].to(torch.float64)

    def state_dict(self) -> dict:
        return {"counts": self.counts, "class_sizes": self.class_sizes,
                "layer_sizes": torch.tensor(self.layer_sizes, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, state: dict) -> KernelUsage:
        return cls(state["counts"], state["class_sizes"], [int(v) for v in state["layer_sizes"]])


@torch.no_grad()
def count_kernel_usage(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       num_classes: int, device: torch.device | str | None = None,
                       max_samples_per_class: int | None = 0) -> KernelUsage:
    """Stream ``(images, labels)`` batches through ``model`` in eval mode and count usage.

    ``max_samples_per_class``: how many per-sample kernel sets to keep per class for the exact
    Jaccard cohesion (None: all, 0: none). ``device`` defaults to the model's."""
    units = modular_units(model)
    device = device if device is not None else next(model.parameters()).device
    if not units:
        raise ValueError("the model has no units: build it with a modular method (create_model(..., method='mwt'))")
    layer_sizes = [u.num_kernels for u in units]
    counts = torch.zeros(num_classes, sum(layer_sizes), dtype=torch.int64, device=device)
    class_sizes = torch.zeros(num_classes, dtype=torch.int64, device=device)
    kept_sets, kept_labels = [], []
    kept_per_class = torch.zeros(num_classes, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            _, masks = model(images, return_masks=True)
            active = torch.cat([m > 0 for m in masks], dim=1)
            counts.index_add_(0, labels, active.to(torch.int64))
            class_sizes += torch.bincount(labels, minlength=num_classes)
            if max_samples_per_class is None:
                kept_sets.append(active.cpu())
                kept_labels.append(labels.cpu())
            elif max_samples_per_class > 0:
                labels_cpu, active_cpu = labels.cpu(), active.cpu()
                # Keep the first samples of each class up to the cap: a bounded, unbiased-enough
                # sample when the data order is shuffled or class-interleaved.
                rank = torch.zeros_like(labels_cpu)
                for c in labels_cpu.unique().tolist():
                    idx = (labels_cpu == c).nonzero().flatten()
                    rank[idx] = kept_per_class[c] + torch.arange(len(idx))
                    kept_per_class[c] += len(idx)
                take = rank < max_samples_per_class
                kept_sets.append(active_cpu[take])
                kept_labels.append(labels_cpu[take])
    finally:
        model.train(was_training)
    usage = KernelUsage(counts.cpu(), class_sizes.cpu(), layer_sizes)
    if kept_sets:
        usage.sample_kernel_sets = torch.cat(kept_sets)
        usage.sample_labels = torch.cat(kept_labels)
    return usage


def split_layers(flat: torch.Tensor, layer_sizes: list[int]) -> list[torch.Tensor]:
    """Split the last dimension of a (..., total_kernels) tensor into per-layer pieces."""
    return list(torch.split(flat, layer_sizes, dim=-1))


def module_masks(usage: KernelUsage, tau: float) -> torch.Tensor:
    """(classes, kernels) bool: module c keeps kernel k where its frequency is >= tau.

    A layer where no kernel reaches tau would cut the module's path in two; there the module
    keeps the layer's most frequent kernel(s) for that class instead (threshold lowered to the
    layer's highest frequency; a single kernel if the class never activates the layer).
    """
    if not (0 < tau <= 1):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    empty = (usage.class_sizes == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"class(es) {empty} have no samples: cannot build their modules")
    kept = []
    for freq in split_layers(usage.frequencies, usage.layer_sizes):
        highest = freq.max(dim=1, keepdim=True)
        layer = freq >= torch.minimum(torch.full_like(freq[:, :1], tau), highest.values)
        never_active = highest.values.squeeze(1) == 0
        layer[never_active] = torch.nn.functional.one_hot(highest.indices[never_active, 0], freq.shape[1]).bool()
        kept.append(layer)
    return torch.cat(kept, dim=1)


def _module_cohesions(usage: KernelUsage, masks: list[torch.Tensor]) -> list[float]:
    """Module cohesion of each mask over the kept per-sample kernel sets, equal masks computed once."""
    unique: list[torch.Tensor] = []
    index = []
    for m in masks:
        found = next((i for i, u in enumerate(unique) if u is m or torch.equal(u, m)), None)
        if found is None:
            unique.append(m)
            found = len(unique) - 1
        index.append(found)
    values = module_cohesions(usage.sample_kernel_sets, usage.sample_labels, unique)
    return [values[i] for i in index]


def _tau_table(usage: KernelUsage, taus: Sequence[float], extra: Sequence[torch.Tensor] = (),
               known: dict[float, torch.Tensor] | None = None) -> tuple[dict[float, dict[str, float]], list[float]]:
    """{tau: cohesion, krr, coupling} for ``taus`` and the module cohesion of ``extra`` masks,
    from one pass over the kept kernel sets (cohesion is left out when none are kept)."""
    known = known or {}
    grid = sorted({float(t) for t in taus})
    masks = [known[t] if t in known else module_masks(usage, t) for t in grid]
    has_sets = usage.sample_kernel_sets is not None
    values = _module_cohesions(usage, [*extra, *masks]) if has_sets else []
    table = {}
    for i, (t, m) in enumerate(zip(grid, masks)):
        row = {"cohesion": values[len(extra) + i]} if has_sets else {}
        table[t] = row | {"krr": kernel_retention_rate(m), "coupling": coupling(m)}
    return table, values[:len(extra)]


def modularity_by_tau(usage: KernelUsage, taus: Sequence[float] = TAU_GRID) -> dict[float, dict[str, float]]:
    """Module cohesion, KRR and coupling at each tau: ``{tau: {"cohesion", "krr", "coupling"}}``.

    The modules come from ``module_masks(usage, tau)``; cohesion needs the per-sample kernel sets
    ``count_kernel_usage`` kept (they exist only while modularizing) and is omitted without them.
    All taus share one blocked pass over those sets (``metrics.module_cohesions``). Cohesion
    usually rises with tau on trained models (paper, RQ4) but need not be monotone."""
    return _tau_table(usage, taus)[0]


def modularity_report(usage: KernelUsage, masks: torch.Tensor, uncovered_kernels: int = 0,
                      tau: float | None = None, taus: Sequence[float] | None = TAU_GRID,
                      conv_columns: torch.Tensor | None = None) -> dict:
    """KRR, coupling, module cohesion and per-layer KRR of the modules ``masks`` (at ``tau``).

    ``krr`` counts masked kernels only; ``krr_all_kernels`` follows the paper's Table 2 totals,
    where the ``uncovered_kernels`` (MwT's first conv's) count as kept by every module. ``conv_columns``
    (``graph.conv_columns``): the columns of conv kernels; KRR counts those only, and the neurons of
    hidden Linear units (MODA's) get ``neuron_retention_rate`` of their own.

    With per-sample kernel sets kept by ``count_kernel_usage``: ``cohesion`` is the paper's module
    cohesion (Eq. 2 after restricting each sample's kernel set to its class's module), and
    ``raw_cohesion`` is Eq. 2 on the unrestricted sets (what earlier versions called cohesion; it
    does not depend on tau). ``by_tau`` lists ``{"tau", "cohesion", "krr", "coupling"}`` for each
    of ``taus`` plus ``tau`` (``taus=None`` or empty: only ``tau``, if given, else no table); all
    cohesions come from one pass over the kernel sets."""
    kernels = masks if conv_columns is None else masks[:, conv_columns]
    total = kernels.shape[1] + uncovered_kernels
    report = {
        "krr": kernel_retention_rate(kernels),
        "krr_all_kernels": (kernels.sum(1).to(torch.float64).mean().item() + uncovered_kernels) / total,
        "coupling": coupling(masks),
        "layer_krr": [kernel_retention_rate(layer) for layer in split_layers(masks, usage.layer_sizes)],
        "module_kernels": masks.sum(1).tolist(),
        "total_kernels": int(masks.shape[1]),
    }
    if conv_columns is not None and not conv_columns.all():
        report["neuron_retention_rate"] = kernel_retention_rate(masks[:, ~conv_columns])
    if tau is not None:
        report["tau"] = float(tau)
    grid = list(taus or ()) + ([tau] if tau is not None else [])
    if usage.sample_kernel_sets is None:
        return report
    everything = torch.ones_like(masks, dtype=torch.bool)
    table, (raw, module) = _tau_table(usage, grid, extra=[everything, masks],
                                      known={float(tau): masks} if tau is not None else None)
    report["cohesion"] = module
    report["raw_cohesion"] = raw
    report["kernel_rate"] = kernel_rate(usage.sample_kernel_sets)
    if table:
        report["by_tau"] = [{"tau": t} | row for t, row in table.items()]
    return report
