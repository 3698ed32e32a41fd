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

Nothing here waits for the GPU (the step stays asynchronous): classes and pairs absent from a
batch are left out by weight, never by indexing or a branch on a tensor, and the layers' masks are
concatenated once per step (``LayerMasks``) for the objective, the step's metrics and the
all-gather alike. Weighting changes the summation order against the literal equations, not the
value beyond float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LayerMasks", "mean_cosine_similarity", "class_onehot", "cohesion_coupling_losses", "modular_objective"]


@dataclass
class LayerMasks:
    """A batch's per-layer masks side by side: ``values`` (B, K), K the kernels of every masked
    layer; ``columns`` (K, L) is 1 where column k belongs to layer l, so per-layer sums of all
    layers are one matmul (``values @ columns``) instead of L small ops, each a GPU launch."""
    values: torch.Tensor
    columns: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.columns.shape[1]

    @classmethod
    def of(cls, masks: "list[torch.Tensor] | LayerMasks") -> "LayerMasks":
        """From a model's list of (B, K_l) masks (or unchanged)."""
        if isinstance(masks, LayerMasks):
            return masks
        return cls(torch.cat(masks, dim=1), layer_columns([m.shape[1] for m in masks], masks[0]))


def layer_columns(sizes: list[int], like: torch.Tensor) -> torch.Tensor:
    """``LayerMasks.columns`` for layers of ``sizes`` kernels, on ``like``'s device and dtype. Made
    on the device from shapes alone (no host-to-device copy) and cached per layout."""
    key = (tuple(sizes), like.device, like.dtype)
    columns = _LAYER_COLUMNS.get(key)
    if columns is None:
        columns = torch.block_diag(*[like.new_ones(size, 1) for size in sizes])
        _LAYER_COLUMNS[key] = columns
    return columns


_LAYER_COLUMNS: dict[tuple, torch.Tensor] = {}


def class_onehot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, C) one-hot rows. ``F.one_hot`` checks the labels' range on the host (a GPU sync each
    call); labels are checked once, when the data is loaded."""
    return (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(dtype)


def mean_cosine_similarity(masks: "list[torch.Tensor] | LayerMasks") -> torch.Tensor:
    """(B, B) matrix: cosine similarity of two samples' masks, averaged over layers.

    Each layer's rows are normalised as ``F.normalize(m, dim=1, eps=1e-12)`` does, with the norms of
    all layers from one matmul."""
    masks = LayerMasks.of(masks)
    flat, columns = masks.values, masks.columns
    # 1 / max(norm, 1e-12) per sample and layer, (B, L); clamping the squared norm keeps rsqrt's
    # gradient finite for an all-zero layer (where the clamp passes none).
    inverse_norms = (flat * flat).mm(columns).clamp_min(1e-24).rsqrt()
    normalised = flat * inverse_norms.mm(columns.t())
    return normalised.mm(normalised.t()).div_(masks.num_layers)


def cohesion_coupling_losses(masks: "list[torch.Tensor] | LayerMasks", labels: torch.Tensor,
                             num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L_ch (Eq. 4) and L_cp (Eq. 5) for one batch of per-layer masks ``(B, K_l)``.

    Under autocast the similarities stay in the masks' fp32 (see masking._MaskedActivation): they
    are differences of values near 1, which bf16 would round to about 0.4%."""
    masks = LayerMasks.of(masks)
    with torch.autocast(masks.values.device.type, enabled=False):
        similarity = mean_cosine_similarity(masks)
        onehot = class_onehot(labels, num_classes, similarity.dtype)
        per_class = onehot.t().mm(similarity).mm(onehot)  # sums of similarities over class-pair blocks
        counts = onehot.sum(dim=0)
        self_similarity = onehot.t().mv(torch.diagonal(similarity))

        # Same-class pairs counted as ordered pairs (j, k), j != k, on both sides of each class's
        # mean: the block's sum less its diagonal, over n (n - 1). Counts are whole numbers, so
        # clamp(max=1) is the 0/1 indicator "has a pair" without a comparison and a cast.
        ordered_pairs = counts * counts - counts
        has_pairs = ordered_pairs.clamp(max=1)
        mean_within = (torch.diagonal(per_class) - self_similarity) / ordered_pairs.clamp_min(1)
        # mean over classes with a pair of (1 - mean_within); 0 / 1 = 0 for a batch without any pair
        cohesion_loss = (has_pairs - mean_within * has_pairs).sum() / has_pairs.sum().clamp_min(1)

        cross_pairs = torch.outer(counts, counts)
        upper = torch.triu(cross_pairs.clamp(max=1), diagonal=1)  # class pairs h < i, both present
        coupling_loss = (per_class / cross_pairs.clamp_min(1) * upper).sum() / upper.sum().clamp_min(1)
    return cohesion_loss, coupling_loss


def modular_objective(logits: torch.Tensor, labels: torch.Tensor, masks: "list[torch.Tensor] | LayerMasks",
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
    masks = LayerMasks.of(masks)
    ce = F.cross_entropy(logits, labels)
    cohesion_loss, coupling_loss = cohesion_coupling_losses(masks, mask_labels, logits.shape[1])
    total = ce + alpha * cohesion_loss + beta * coupling_loss
    if sparsity:  # mean over layers of each layer's mean mask value
        with torch.autocast(masks.values.device.type, enabled=False):
            layer_means = (masks.values.sum(0) @ masks.columns) / (masks.columns.sum(0) * masks.values.shape[0])
        total = total + sparsity * layer_means.mean()
    parts = {"ce_loss": ce.detach(), "cohesion_loss": cohesion_loss.detach(),
             "coupling_loss": coupling_loss.detach()}
    return total, parts
