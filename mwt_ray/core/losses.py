"""Cohesion and coupling losses (Eq. 4-6 of the paper), vectorised over pairs, classes and layers.

Conventions (tested against a literal loop over the equations in tests/test_losses.py):

- Cosine similarity is taken per masked layer and averaged over layers, so every layer weighs
  the same whatever its kernel count. A mask that is all zeros has similarity 0 to everything.
- Eq. 4 averages per class and Eq. 5 per class pair, as the paper writes them (not pooled over
  all pairs). Classes with fewer than two samples in the batch have no same-class pair and are
  left out of the cohesion average; class pairs where either class is absent are left out of the
  coupling average. A batch with no such class (pair) contributes a loss of 0.

How: with N the masks normalised per layer (each layer's part a unit vector, or 0) and L layers,
the similarity of samples j and k is ``N_j . N_k / L``. Both losses read only its sums over
class-pair blocks, which are ``Q Q^T / L`` for ``Q`` the per-class sums of N: no loop over layers,
pairs or classes, and no batch x batch matrix. The two losses are one autograd node with its
backward written out (25 recorded ops in a VGG16 step, where autograd's backward of the earlier
forward recorded ~130).

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

__all__ = ["LayerMasks", "class_onehot", "cohesion_coupling_losses", "modular_objective"]


@dataclass
class LayerMasks:
    """A batch's per-layer masks side by side: ``values`` (B, K), K the kernels of every masked
    layer; ``columns`` (K, L) is 1 where column k belongs to layer l, so per-layer sums of all
    layers are one matmul (``values @ columns``) instead of L small ops, each a GPU launch."""
    values: torch.Tensor
    columns: torch.Tensor

    @classmethod
    def of(cls, masks: list[torch.Tensor] | LayerMasks) -> LayerMasks:
        """From a model's list of (B, K_l) masks (or unchanged)."""
        if isinstance(masks, LayerMasks):
            return masks
        return cls(_ConcatLayers.apply(*masks), layer_columns([m.shape[1] for m in masks], masks[0]))


class _ConcatLayers(torch.autograd.Function):
    """``torch.cat(masks, dim=1)`` whose backward hands each layer its columns in one split (autograd's
    own cat backward narrows once per layer, three recorded ops each)."""

    @staticmethod
    def forward(ctx, *masks):
        ctx.sizes = [m.shape[1] for m in masks]
        return torch.cat(masks, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad.split_with_sizes(ctx.sizes, dim=1)


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
    onehot = torch.zeros(len(labels), num_classes, dtype=dtype, device=labels.device)
    return onehot.scatter_(1, labels.view(-1, 1), 1.0)


class _PairLosses(torch.autograd.Function):
    """``(L_ch, L_cp)`` from ``values`` (B, K), ``columns`` (K, L) and one-hot labels O (B, C).

    Forward: N = values / (sqrt(L) x per-layer norm), so that ``N_j . N_k`` is the similarity of
    samples j and k; Q = O^T N (C, K); ``blocks = Q Q^T``, the similarity summed over each class-pair
    block; ``self_sums``, each class's sum of ``N_j . N_j`` (pairs j = k, which cohesion leaves out).
    Both losses are linear in ``blocks`` and ``self_sums``, with weights from the class counts
    alone: ``L_ch = [any class has a pair] - sum_c w_c (blocks_cc - self_sums_c)`` and
    ``L_cp = sum_{h<i} v_hi blocks_hi``. Backward is the chain rule through those steps.

    The L rides on GEMM alphas (a Python number in a binary op is an op of its own); with beta=0,
    addmm ignores its first argument (a tensor of the output's shape, never read).
    """

    @staticmethod
    def forward(ctx, values, columns, onehot):
        layers = columns.shape[1]
        columns_t, onehot_t = transposed_view(columns), transposed_view(onehot)
        squares = (values * values).mm(columns)  # (B, L) squared norm of each sample's layer
        # 1 / (sqrt(L) x max(norm, 1e-12)) per kernel, the clamp as F.normalize's eps
        inverse = torch.addmm(values, squares.clamp_min(1e-24).rsqrt(), columns_t, beta=0, alpha=layers ** -0.5)
        normalised = values * inverse
        class_sums = onehot_t.mm(normalised)  # Q
        blocks = class_sums.mm(transposed_view(class_sums))
        self_sums = onehot_t.mv((normalised * normalised).sum(1))

        # Same-class pairs counted as ordered pairs (j, k), j != k, on both sides of each class's
        # mean: the block's sum less its diagonal, over n (n - 1). Counts are whole numbers, so
        # clamp_max(1) is the 0/1 indicator "has a pair" without a comparison and a cast.
        counts = onehot.sum(0)
        ordered_pairs = counts * counts - counts
        has_pairs = ordered_pairs.clamp_max(1)
        classes_with_pairs = has_pairs.sum()
        # L_ch: mean over classes with a pair of (1 - their mean similarity); 0 without any pair
        cohesion_weights = has_pairs / (ordered_pairs.clamp_min(1) * classes_with_pairs.clamp_min(1))
        cohesion = classes_with_pairs.clamp_max(1) - cohesion_weights.dot(blocks.diagonal() - self_sums)
        # L_cp: mean over class pairs h < i, both present, of their mean similarity
        cross_pairs = counts.view(-1, 1) * counts
        upper = torch.triu(cross_pairs.clamp_max(1), diagonal=1)
        coupling_weights = upper / (cross_pairs.clamp_min(1) * upper.sum().clamp_min(1))
        coupling = (blocks * coupling_weights).sum()

        # For backward: v + v^T (blocks are symmetric in Q) and 2 w, per class and per sample.
        twice_cohesion_weights = (cohesion_weights + cohesion_weights).view(-1, 1)
        ctx.layers = layers
        ctx.save_for_backward(normalised, inverse, squares, class_sums, columns, onehot,
                              coupling_weights + transposed_view(coupling_weights), twice_cohesion_weights,
                              onehot.mm(twice_cohesion_weights))
        return cohesion, coupling

    @staticmethod
    def backward(ctx, grad_cohesion, grad_coupling):
        (normalised, inverse, squares, class_sums, columns, onehot,
         symmetric_coupling, twice_cohesion_weights, twice_sample_weights) = ctx.saved_tensors
        # dN_j = grad_cp ((v + v^T) Q)_c - 2 grad_ch w_c (Q_c - N_j), c the class of j: through Q = O^T N
        # (blocks) and through N_j . N_j (self_sums)
        per_class = torch.addcmul(symmetric_coupling.mm(class_sums) * grad_coupling, class_sums,
                                  twice_cohesion_weights * grad_cohesion, value=-1)
        grad_normalised = torch.addcmul(onehot.mm(per_class), normalised, twice_sample_weights * grad_cohesion)
        # Through the normalisation: inverse x (dN - L N (dN . N over the layer)); where the squared
        # norm was clamped (an all-zero layer) the norm passes no gradient.
        along = torch.addmm(squares, grad_normalised * normalised, columns, beta=0, alpha=ctx.layers)
        along = torch.ops.aten.threshold_backward(along, squares, 1e-24)
        grad_values = torch.addcmul(grad_normalised, normalised, along.mm(transposed_view(columns)), value=-1)
        return grad_values.mul_(inverse), None, None


def transposed_view(matrix: torch.Tensor) -> torch.Tensor:
    """A contiguous matrix's transpose as one strided view (``.t()`` records three ops)."""
    rows, columns = matrix.shape
    return matrix.as_strided((columns, rows), (1, columns))


def cohesion_coupling_losses(masks: list[torch.Tensor] | LayerMasks, labels: torch.Tensor,
                             num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L_ch (Eq. 4) and L_cp (Eq. 5) for one batch of per-layer masks ``(B, K_l)``.

    Under autocast the similarities stay in the masks' fp32 (see masking._MaskedActivation): they
    are differences of values near 1, which bf16 would round to about 0.4%."""
    masks = LayerMasks.of(masks)
    with torch.autocast(masks.values.device.type, enabled=False):
        onehot = class_onehot(labels, num_classes, masks.values.dtype)
        return _PairLosses.apply(masks.values, masks.columns, onehot)


def modular_objective(logits: torch.Tensor, labels: torch.Tensor, masks: list[torch.Tensor] | LayerMasks,
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
    total = torch.add(ce, cohesion_loss, alpha=alpha).add_(coupling_loss, alpha=beta)  # no op per Python number
    if sparsity:  # mean over layers of each layer's mean mask value
        with torch.autocast(masks.values.device.type, enabled=False):
            layer_means = (masks.values.sum(0) @ masks.columns) / (masks.columns.sum(0) * masks.values.shape[0])
        total = total + sparsity * layer_means.mean()
    parts = {"ce_loss": ce.detach(), "cohesion_loss": cohesion_loss.detach(),
             "coupling_loss": coupling_loss.detach()}
    return total, parts
