"""Cohesion and coupling losses (Eq. 4-6 of the paper), vectorised over pairs, classes and layers.

Conventions (tested against a literal loop over the equations in tests/test_losses.py):

- Cosine similarity is taken per masked layer and averaged over layers, so every layer weighs
  the same whatever its kernel count. A mask that is all zeros has similarity 0 to everything.
- Eq. 4 averages per class and Eq. 5 per class pair, as the paper writes them (not pooled over
  all pairs). Classes with fewer than two samples in the batch have no same-class pair and are
  left out of the cohesion average; class pairs where either class is absent are left out of the
  coupling average. A batch with no such class (pair) contributes a loss of 0.

Because both losses are linear in the pairwise similarity matrix, the mean over layers of the
per-layer losses equals the loss of the mean similarity matrix, and that matrix is one matmul of
the per-layer-normalised masks concatenated: no loop over layers, pairs or classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mean_cosine_similarity", "cohesion_coupling_losses", "modular_objective"]


def mean_cosine_similarity(masks: list[torch.Tensor]) -> torch.Tensor:
    """(B, B) matrix: cosine similarity of two samples' masks, averaged over layers."""
    normalised = torch.cat([F.normalize(m, dim=1, eps=1e-12) for m in masks], dim=1)
    return normalised @ normalised.T / len(masks)


def cohesion_coupling_losses(masks: list[torch.Tensor], labels: torch.Tensor,
                             num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L_ch (Eq. 4) and L_cp (Eq. 5) for one batch of per-layer masks ``(B, K_l)``."""
    similarity = mean_cosine_similarity(masks)
    onehot = F.one_hot(labels, num_classes).to(similarity.dtype)
    per_class = onehot.T @ similarity @ onehot  # sums of similarities over class-pair blocks
    counts = onehot.sum(dim=0)
    self_similarity = onehot.T @ torch.diagonal(similarity)

    same_pairs = counts * (counts - 1) / 2
    has_pairs = same_pairs > 0
    if has_pairs.any():
        within = (torch.diagonal(per_class) - self_similarity) / 2
        cohesion_loss = 1 - (within[has_pairs] / same_pairs[has_pairs]).mean()
    else:
        cohesion_loss = similarity.new_zeros(())

    cross_pairs = torch.outer(counts, counts)
    upper = torch.triu(torch.ones_like(cross_pairs, dtype=torch.bool), diagonal=1) & (cross_pairs > 0)
    if upper.any():
        coupling_loss = (per_class[upper] / cross_pairs[upper]).mean()
    else:
        coupling_loss = similarity.new_zeros(())
    return cohesion_loss, coupling_loss


def modular_objective(logits: torch.Tensor, labels: torch.Tensor, masks: list[torch.Tensor],
                      mask_labels: torch.Tensor, alpha: float, beta: float, sparsity: float = 0.0,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """O = CE + alpha * L_ch + beta * L_cp (Eq. 6); also returns the three parts, detached.

    ``sparsity > 0`` adds ``sparsity * mean mask value`` (each layer's mean, averaged over layers):
    an option beyond the paper that pushes kernels off for every sample, where the coupling loss
    only pushes classes apart.

    ``masks``/``mask_labels`` may cover more samples than ``logits``/``labels``: under data
    parallelism they are the masks gathered from every worker, so the pair losses see the whole
    global batch while cross-entropy stays local (DDP averages it).
    """
    ce = F.cross_entropy(logits, labels)
    cohesion_loss, coupling_loss = cohesion_coupling_losses(masks, mask_labels, logits.shape[1])
    total = ce + alpha * cohesion_loss + beta * coupling_loss
    if sparsity:
        total = total + sparsity * torch.stack([m.mean() for m in masks]).mean()
    parts = {"ce_loss": ce.detach(), "cohesion_loss": cohesion_loss.detach(),
             "coupling_loss": coupling_loss.detach()}
    return total, parts
