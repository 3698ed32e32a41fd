"""Modularity metrics on binary kernel sets: Jaccard cohesion (Eq. 2), coupling (Eq. 3), KRR.

A kernel set is a 0/1 row over all masked kernels of the model (layers concatenated). All-pairs
Jaccard is a matrix product: |A n B| = A @ B.T and |A u B| = |A| + |B| - |A n B|, computed in
row blocks so a class with many samples never needs an n x n matrix at once. Two empty sets
count as identical (Jaccard 1).

Module cohesion (the paper's evaluation, RQ4) applies Eq. 2 after restricting each sample's set
to the kernels its class's module keeps: ``module_cohesions`` does that for several module masks
(several tau) in one blocked pass. The per-batch Fig. 5 metrics (``batch_modularity``) have no
tau: their keys say so (``batch_cohesion``, ``batch_coupling``).
"""
from __future__ import annotations

import torch

from .losses import LayerMasks, class_onehot, transposed_view

__all__ = [
    "jaccard_matrix",
    "class_cohesion",
    "cohesion",
    "module_cohesion",
    "module_cohesions",
    "coupling",
    "kernel_retention_rate",
    "kernel_rate",
    "batch_modularity",
]


def jaccard_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise Jaccard index between the rows of two 0/1 matrices."""
    a = a.to(torch.float32)
    b = a if b is None else b.to(torch.float32)
    intersection = a.mm(b.t())
    union = a.sum(1).unsqueeze(1) + b.sum(1).unsqueeze(0) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def class_cohesion(kernel_sets: torch.Tensor, block_size: int = 2048) -> float:
    """Eq. 2 for one class: mean Jaccard over all pairs j < k of its samples' kernel sets."""
    n = kernel_sets.shape[0]
    if n < 2:
        return float("nan")
    total = 0.0
    for start in range(0, n, block_size):
        rows = kernel_sets[start:start + block_size]
        # Pairs within the row block (upper triangle) plus pairs with every later sample.
        within = jaccard_matrix(rows)
        total += (within.sum().item() - within.diagonal().sum().item()) / 2
        for later in range(start + block_size, n, block_size):
            total += jaccard_matrix(rows, kernel_sets[later:later + block_size]).sum().item()
    return total / (n * (n - 1) / 2)


def cohesion(kernel_sets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean of Eq. 2 over the classes that have at least two samples."""
    values = [class_cohesion(kernel_sets[labels == c]) for c in range(num_classes)]
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def module_cohesions(kernel_sets: torch.Tensor, labels: torch.Tensor, module_masks: list[torch.Tensor],
                     block_size: int = 1024) -> list[float]:
    """Module cohesion (Eq. 2 on module-restricted kernel sets) for each of several module masks.

    ``kernel_sets``: (samples, kernels) 0/1; ``labels``: (samples,) class indices;
    ``module_masks``: a list of (classes, kernels) 0/1 masks, e.g. ``module_masks(usage, tau)`` for
    several tau (an all-ones mask gives the raw cohesion). For each mask, sample i of class c
    keeps ``kernel_sets[i] & mask[c]``; the result is the mean over classes with >= 2 samples of
    the mean Jaccard over all pairs of that class's restricted sets (two empty sets: 1).

    Exact, in one pass for all masks: per class, kernels no sample of the class uses are dropped,
    kernels every sample uses add a constant to every intersection and size, and the remaining
    kernels are grouped by which masks keep them (nested masks, as over tau, give few groups).
    Each block of pairs then costs one matrix product over those kernels (a product per group),
    a small product spreading the groups to the masks, and a few element-wise passes over a
    (masks, block, block) stack: no n x n matrix, and few large operations.
    """
    num_masks = len(module_masks)
    if num_masks == 0:
        return []
    if num_masks > 62:
        raise ValueError(f"at most 62 masks at once, got {num_masks}")
    member_all = torch.stack([m.to(torch.bool).cpu() for m in module_masks])  # (masks, classes, kernels)
    kernel_sets, labels = kernel_sets.cpu(), labels.cpu()
    per_class = []
    for c in range(member_all.shape[1]):
        sets = kernel_sets[labels == c].to(torch.bool)
        n = sets.shape[0]
        if n < 2:
            continue
        member = member_all[:, c]  # (masks, kernels)
        used = sets.sum(0)
        always = used == n
        varying = (used > 0) & ~always & member.any(0)
        const = (member & always).sum(1).to(torch.float32)  # per mask: kernels in every sample's set
        bits = member[:, varying].to(torch.int64)
        codes, order = (bits << torch.arange(num_masks)[:, None]).sum(0).sort(stable=True)
        x = sets[:, varying.nonzero().flatten()[order]].to(torch.float32)  # columns grouped by code
        group_codes, widths = torch.unique_consecutive(codes, return_counts=True)
        bounds = [0] + widths.cumsum(0).tolist()
        # spread[t, g] = 1 where mask t keeps group g's kernels.
        spread = ((group_codes[None, :] >> torch.arange(num_masks)[:, None]) & 1).to(torch.float32)
        sizes = (x @ bits[:, order].T.to(torch.float32) + const).T.contiguous()  # (masks, n)
        empties = sizes == 0
        # An empty set meets no set: counting its size as 0.5 keeps every union positive and its
        # Jaccard 0; each pair of two empty sets is added back as 1.
        sizes[empties] = 0.5
        empties = empties.to(torch.float64)
        total = torch.zeros(num_masks, dtype=torch.float64)
        for a in range(0, n, block_size):
            rows_a = x[a:a + block_size]
            for b in range(a, n, block_size):
                rows_b = x[b:b + block_size]
                products = torch.empty(len(bounds) - 1, len(rows_a), len(rows_b))
                for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                    torch.matmul(rows_a[:, lo:hi], rows_b[:, lo:hi].T, out=products[g])
                common = torch.addmm(const[:, None], spread, products.view(len(products), len(rows_a) * len(rows_b)))
                common = common.view(num_masks, len(rows_a), len(rows_b))
                union = (sizes[:, a:a + block_size, None] + sizes[:, None, b:b + block_size]).sub_(common)
                pair_sums = common.div_(union).sum(2).to(torch.float64).sum(1)  # rows in float32, then float64
                pair_sums += empties[:, a:a + block_size].sum(1) * empties[:, b:b + block_size].sum(1)
                if a == b:  # the diagonal block holds each pair twice and its self-pairs (Jaccard 1)
                    pair_sums = (pair_sums - len(rows_a)) / 2
                total += pair_sums
        per_class.append(total / (n * (n - 1) / 2))
    if not per_class:
        return [float("nan")] * num_masks
    return torch.stack(per_class).mean(0).tolist()


def module_cohesion(kernel_sets: torch.Tensor, labels: torch.Tensor, module_masks: torch.Tensor) -> float:
    """Module cohesion for one (classes, kernels) module mask: Eq. 2 on ``set & mask[label]``."""
    return module_cohesions(kernel_sets, labels, [module_masks])[0]


def coupling(module_masks: torch.Tensor) -> float:
    """Eq. 3 averaged over all pairs of modules; ``module_masks`` is (num_modules, kernels)."""
    n = module_masks.shape[0]
    if n < 2:
        return float("nan")
    jaccard = jaccard_matrix(module_masks)
    return ((jaccard.sum() - jaccard.diagonal().sum()) / (n * (n - 1))).item()


def kernel_retention_rate(module_masks: torch.Tensor) -> float:
    """Kept kernels / all masked kernels, averaged over modules."""
    return module_masks.to(torch.float32).mean().item()


def kernel_rate(kernel_sets: torch.Tensor) -> float:
    """Share of masked kernels a sample uses, averaged over samples (Fig. 5, bottom left)."""
    return kernel_sets.to(torch.float32).mean().item()


@torch.no_grad()
def batch_modularity(masks: list[torch.Tensor] | LayerMasks, labels: torch.Tensor,
                     num_classes: int) -> dict[str, torch.Tensor]:
    """Per-iteration cohesion, coupling and kernel rate of Fig. 5 (no tau filtering), as 0-dim
    tensors on the masks' device: the training step logs them every step without waiting for the
    GPU (classes are left out by weight, not by indexing), and reads them once per epoch.

    Each class's module in the batch is the union of its samples' kernel sets. Keys:
    ``batch_cohesion`` (Eq. 2 on raw sets; NaN if no class has two samples), ``batch_coupling``
    (Eq. 3 over the classes present; NaN if fewer than two) and ``kernel_rate``.
    """
    # Masks are >= 0 (the generator ends in relu), so their sign is the 0/1 kernel set; counts are
    # whole numbers, so clamp_max(1) is their "> 0" indicator. Both save a comparison and a cast
    # per use, each an op of its own in a step that runs them every iteration.
    kernel_sets = LayerMasks.of(masks).values.sign()
    onehot = class_onehot(labels, num_classes, kernel_sets.dtype)
    counts = onehot.sum(0)
    # Per class, the Jaccard index summed over its ordered pairs j != k (each sample's with itself is 1).
    jaccard, set_sizes = _self_jaccard(kernel_sets)
    pair_sums = (jaccard.mm(onehot) * onehot).sum(0) - counts
    ordered_pairs = counts * counts - counts
    has_pairs = ordered_pairs.clamp_max(1)
    cohesion_value = (pair_sums / ordered_pairs.clamp_min(1)).dot(
        has_pairs
    ) / has_pairs.sum()  # 0 / 0 = NaN without a pair

    # Each present class's module is the union of its samples' sets; coupling sums the Jaccard index
    # over pairs of present modules h != i (a module's with itself is 1).
    present = counts.clamp_max(1)
    modules = present.sum()
    unions = transposed_view(onehot).mm(kernel_sets).clamp_max_(1)
    between = present.dot(_self_jaccard(unions)[0].mv(present)) - modules
    coupling_value = between / (modules * modules - modules)  # NaN below 2
    return {
        "batch_cohesion": cohesion_value,
        "batch_coupling": coupling_value,
        "kernel_rate": set_sizes.sum() / kernel_sets.numel(),
    }


def _self_jaccard(sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``jaccard_matrix(sets)`` in fewer ops (a step runs it twice), and the sets' sizes: a 0/1 set's
    size is its intersection with itself, and 0 / 0 (two empty sets) is the only NaN, which counts as 1."""
    intersection = sets.mm(transposed_view(sets))
    sizes = intersection.diagonal()
    return intersection.div(sizes.view(-1, 1) + sizes - intersection).nan_to_num_(1.0), sizes
