"""Modularity metrics on binary kernel sets: Jaccard cohesion (Eq. 2), coupling (Eq. 3), KRR.

A kernel set is a 0/1 row over all masked kernels of the model (layers concatenated). All-pairs
Jaccard is a matrix product: |A n B| = A @ B.T and |A u B| = |A| + |B| - |A n B|, computed in
row blocks so a class with many samples never needs an n x n matrix at once. Two empty sets
count as identical (Jaccard 1).
"""
from __future__ import annotations

import torch

__all__ = [
    "jaccard_matrix",
    "class_cohesion",
    "cohesion",
    "coupling",
    "kernel_retention_rate",
    "kernel_rate",
    "batch_modularity",
]


def jaccard_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise Jaccard index between the rows of two 0/1 matrices."""
    a = a.to(torch.float32)
    b = a if b is None else b.to(torch.float32)
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
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
def batch_modularity(masks: list[torch.Tensor], labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Per-iteration cohesion, coupling and kernel rate of Fig. 5 (no tau filtering).

    Each class's module in the batch is the union of its samples' kernel sets.
    """
    kernel_sets = torch.cat([m > 0 for m in masks], dim=1).to(torch.float32)
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)
    counts = onehot.sum(0)
    jaccard = jaccard_matrix(kernel_sets)
    pair_sums = onehot.T @ (jaccard - torch.eye(len(labels), device=jaccard.device)) @ onehot
    has_pairs = counts > 1
    per_class = pair_sums.diagonal()[has_pairs] / (counts[has_pairs] * (counts[has_pairs] - 1))
    present = counts > 0
    unions = (onehot.T @ kernel_sets)[present] > 0
    return {
        "cohesion": per_class.mean().item() if has_pairs.any() else float("nan"),
        "coupling": coupling(unions),
        "kernel_rate": kernel_sets.mean().item(),
    }
