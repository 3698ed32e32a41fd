"""MODA (ICSE 2026): modularity objectives on the activations themselves instead of on generated masks.

A unit per conv -> BN (the first conv's included) and per hidden Linear, at its activation
(``activation_sites`` says where in a traced graph); its signal is the pooled positive activation, so
a channel is "on" for a sample where it is positive somewhere. No masks: the network is the plain one,
and modules drop the channels and neurons a class rarely turns on (``kernel_usage``, shared).

Conventions (tested against a literal loop over the definitions in tests/test_moda_losses.py):

- Each tracked layer l gives every sample a non-negative vector h_l (a conv: the spatial mean of
  its activation's positive part per channel; a hidden Linear: its output's positive part), made by
  ``ActivationSignal`` and passed on as ``LayerMasks``, the same layout as MwT's masks.
- Cosine similarity is taken per layer (F.normalize's eps: a vector of norm below 1e-12 is divided
  by 1e-12, so an all-zero one has similarity 0 to everything) and averaged over layers: every
  layer weighs the same whatever its width.
- Unlike MwT's Eq. 4-5 (per-class means), affinity and dispersion are means over all unordered
  pairs i < j of the batch, pooled: affinity over the same-class pairs, dispersion over the
  different-class pairs. L_aff = 1 - mean similarity, L_dis = mean similarity.
- A batch with no same-class pair has L_aff = 0 and one with a single class L_dis = 0, with zero
  gradient (MODA's own code divides by the zero pair count there and gives NaN, which would end a run).
- Compactness L_com is each layer's mean |h| over samples and entries, averaged over layers.

How: with N the signals normalised per layer and divided by sqrt(L), ``N_i . N_j`` is the
similarity of samples i and j. With Q = O^T N the per-class sums of N (O the one-hot labels) and
S the sum over all samples, the similarity summed over ordered same-class pairs i != j is
``sum_c |Q_c|^2 - sum_i |N_i|^2`` and over ordered different-class pairs ``|S|^2 - sum_c |Q_c|^2``;
pair counts follow from the class counts alone. No loop over layers, pairs or classes, no batch x
batch matrix, and nothing waits for the GPU: an empty pair set is left out by a 0 weight (counts are
whole numbers, so clamp_max(1) is the indicator), never by a branch on a tensor or by indexing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import UnitSite, insert_units, is_activation, is_relu, module_of, only_user
from ..losses import LayerMasks, class_onehot
from . import Method, register_method

__all__ = ["MODA", "ActivationSignal", "moda_losses", "moda_objective", "insert_activation_units", "activation_sites"]


def moda_losses(signals: LayerMasks | list[torch.Tensor], labels: torch.Tensor,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_aff, L_dis, L_com)`` for one batch of per-layer signals ``(B, D_l)``, as 0-dim tensors.

    Computed in the signals' dtype (fp32 from ``ActivationSignal``) with autocast off: the
    similarities are sums of values near 1, which bf16 would round to about 0.4%."""
    signals = LayerMasks.of(signals)
    values, columns = signals.values, signals.columns
    batch, layers = values.shape[0], columns.shape[1]
    with torch.autocast(values.device.type, enabled=False):
        onehot = class_onehot(labels, num_classes, values.dtype)
        squares = (values * values).mm(columns)  # (B, L) squared norm of each sample's layer
        # 1 / (sqrt(L) max(norm, 1e-12)) per entry; the clamp passes no gradient to a norm below eps,
        # as F.normalize's does not
        inverse = squares.clamp_min(1e-24).rsqrt().mm(columns.t()) * layers ** -0.5
        normalised = values * inverse
        class_sums = onehot.t().mm(normalised)  # Q (C, K)
        self_sum = (normalised * normalised).sum()  # the pairs i = i, which no pair set contains
        class_square = (class_sums * class_sums).sum()
        total = class_sums.sum(0)  # S, summed over the C rows of Q rather than the B of N
        counts = onehot.sum(0)
        count_square = counts.dot(counts)
        same_pairs = count_square - batch  # ordered pairs i != j in the same class
        diff_pairs = batch * batch - count_square  # ordered pairs in different classes
        # The sums cancel to rounding, not to exactly 0, when a pair set is empty: the 0/1 factor
        # makes the loss and its gradient exactly 0 there.
        same_weight = same_pairs.clamp_max(1) / same_pairs.clamp_min(1)
        diff_weight = diff_pairs.clamp_max(1) / diff_pairs.clamp_min(1)
        affinity = same_pairs.clamp_max(1) - (class_square - self_sum) * same_weight
        dispersion = (total.dot(total) - class_square) * diff_weight
        # Per entry 1 / (B D_l L), so that the sum is the mean over layers of each layer's mean |h|
        entry_weights = columns.mv(columns.sum(0).reciprocal()) / (batch * layers)
        compactness = values.abs().sum(0).dot(entry_weights)
    return affinity, dispersion, compactness


def moda_objective(logits: torch.Tensor, labels: torch.Tensor, signals: LayerMasks | list[torch.Tensor],
                   signal_labels: torch.Tensor, num_classes: int, affinity: float, dispersion: float,
                   compactness: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE + affinity * L_aff + dispersion * L_dis + compactness * L_com; also returns the four parts, detached.

    ``signals``/``signal_labels`` may cover more samples than ``logits``/``labels``: under data
    parallelism they are gathered from every worker, so the pair losses see the whole global batch
    while cross-entropy stays local (DDP averages it), as in ``losses.modular_objective``.
    """
    ce = F.cross_entropy(logits, labels)
    affinity_loss, dispersion_loss, compactness_loss = moda_losses(signals, signal_labels, num_classes)
    total = (torch.add(ce, affinity_loss, alpha=affinity).add_(dispersion_loss, alpha=dispersion)
             .add_(compactness_loss, alpha=compactness))  # alpha: no op per Python number
    parts = {"ce_loss": ce.detach(), "affinity_loss": affinity_loss.detach(),
             "dispersion_loss": dispersion_loss.detach(), "compactness_loss": compactness_loss.detach()}
    return total, parts


class _PooledActivation(torch.autograd.Function):
    """``(out, signal)`` of a 4-D unit as one autograd node: ``out = relu(y)`` (in place) or ``y``, and
    ``signal`` = the spatial mean of ``out``'s positive part per channel, in ``dtype``.

    Why one node: autograd's mean backward materialises ``grad / (h w)`` at full size and then adds it
    to the gradient from the next layer, two full-size passes per unit; here the signal's gradient
    rides in one ``add`` into the next layer's, and the ReLU's mask is applied to that sum in place
    (VGG16 at width 1/4, batch 128: 22 full-size ``div`` calls, 4.7% of a step's CPU time, gone)."""

    @staticmethod
    def forward(ctx, y, relu: bool, dtype):
        # mean's dtype argument copies its input even where it is that dtype already: given only when not
        if relu:
            out = torch.relu_(y)
            ctx.mark_dirty(y)
            signal = out.mean(dim=(2, 3), dtype=None if out.dtype == dtype else dtype)
        else:
            out = y
            signal = F.relu(out).mean(dim=(2, 3), dtype=None if out.dtype == dtype else dtype)
        ctx.relu, ctx.scale = relu, 1.0 / (out.shape[2] * out.shape[3])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(out)
        return out, signal

    @staticmethod
    def backward(ctx, grad_out, grad_signal):
        (out,) = ctx.saved_tensors
        if grad_signal is None:  # the signal was not used (a plain forward)
            if grad_out is None or not ctx.relu:
                return grad_out, None, None
            return torch.ops.aten.threshold_backward(grad_out, out, 0), None, None
        # The mean's 1 / (h w) rides on add's alpha (a Python number in a binary op is a copy op of its own)
        spread = grad_signal if grad_signal.dtype == out.dtype else grad_signal.to(out.dtype)
        spread = spread.view(*spread.shape, 1, 1).expand(out.shape)
        if not ctx.relu:
            spread = torch.ops.aten.threshold_backward(spread, out, 0)  # the positive part's slope
        grad = spread.mul(ctx.scale) if grad_out is None else torch.add(grad_out, spread, alpha=ctx.scale)
        if ctx.relu:  # (grad_out + spread) where out > 0, in place in the new tensor
            torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)
        return grad, None, None


class ActivationSignal(nn.Module):
    """MODA's stand-in for a unit's mask generator: no parameters, the unit's output is only activated,
    and the signal the objective reads is the activation itself.

    It keeps the contract of ``MaskGenerator.masked`` (see ``graph.apply_unit``), so a modular graph
    runs MODA unchanged. ``conv_input`` is unused: MwT's generator computes its mask from the conv's
    input, while MODA's signal depends on the output alone. ``num_kernels`` is the unit's channel (or
    neuron) count, which code that sizes per-unit tensors reads from every unit.
    """

    def __init__(self, num_kernels: int):
        super().__init__()
        self.num_kernels = num_kernels

    def masked(self, y: torch.Tensor, conv_input: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(act(y), signal)``, ``act`` ReLU or the identity; with ReLU ``y`` is overwritten.

        In place is safe: the graph lets nothing else read ``y``, and BatchNorm's backward reads its
        input, not its output. ``relu_`` rather than ``clamp_min_``: its gradient at exactly 0 is 0,
        as ``F.relu``'s. The signal, (B, C) for a 4-D output and (B, N) for a 2-D one, is in fp32 also
        under autocast (see ``moda_losses``; fp64 if the model is); "> 0" means the channel or neuron
        is on for that sample.
        """
        dtype = torch.promote_types(y.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
        if y.dim() == 4 and not torch.compiler.is_compiling():  # one autograd node (eager)
            return _PooledActivation.apply(y, relu, dtype)
        out = torch.relu_(y) if relu else y
        if out.dim() == 4:  # per channel: the spatial mean of the positive part (out itself after relu)
            return out, (out if relu else F.relu(out)).mean(dim=(2, 3), dtype=dtype)
        # F.relu makes a new tensor even after relu (a later in-place op on out must not change the
        # signal); .to() then copies only from a lower precision
        return out, F.relu(out).to(dtype)


# ---------------------------------------------------------------------- where MODA's units go

def activation_sites(gm: fx.GraphModule) -> list[UnitSite]:
    """A unit at the activation of every conv -> BN (the first conv's included) and of every hidden
    Linear (one whose only user is an activation: the logits' Linear has none), found in the traced
    graph. MODA's code tracks every ``nn.ReLU`` module's output; in a traced graph that means:

    - conv -> BN -> ReLU: the ReLU is taken over by the unit op (``relu``), its output tracked;
    - conv -> BN -> another activation (ReLU6, SiLU, hardswish, ...): tracked after it, and "on"
      means a positive value somewhere (the positive part's mean > 0; for ReLU the same as MODA's);
    - conv -> BN with no activation (a linear bottleneck, a residual branch before its addition):
      the BN's output is tracked, the same definition of "on". MODA's ResNet instead tracks the ReLU
      after the addition; here the branch is cut before the addition and the addition keeps the union
      of both sides' channels (the zeroed model's exact equivalent), where MODA's code keeps their
      intersection.
    """
    sites = []
    for node in gm.graph.nodes:
        layer = module_of(gm, node)
        if isinstance(layer, nn.Conv2d):
            bn = only_user(node)
            if bn is None or not isinstance(module_of(gm, bn), nn.BatchNorm2d) or bn.args[0] is not node:
                continue
            after = only_user(bn)
            tapped = after if after is not None and is_activation(gm, after) else bn
            sites.append(UnitSite(node, bn, tapped, tapped is not bn and is_relu(gm, tapped),
                                  ActivationSignal(layer.out_channels)))
        elif isinstance(layer, nn.Linear):
            after = only_user(node)
            if after is not None and is_activation(gm, after):
                sites.append(UnitSite(node, None, after, is_relu(gm, after), ActivationSignal(layer.out_features)))
    return sites


def insert_activation_units(model: nn.Module, name: str | None = None,
                            leaf_modules: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """``model`` (its modules, shared) as a graph whose units return the tracked activations' signals."""
    return insert_units(model, activation_sites, "activation_signal", name, leaf_modules,
                        none_found="no conv -> BatchNorm unit and no hidden Linear -> activation (MODA shapes the "
                        "activations of those)")


def _objective(logits, labels, signals, signal_labels, num_classes, s, ramp):
    return moda_objective(logits, labels, signals, signal_labels, num_classes, s.affinity * ramp,
                          s.dispersion * ramp, s.compactness * ramp)


MODA = register_method(Method(
    name="moda", summary="MODA: no masks; affinity, dispersion and compactness of the pooled activations",
    insert_units=insert_activation_units, objective=_objective,
    loss_names=("affinity_loss", "dispersion_loss", "compactness_loss"),
    weight_keys=("affinity", "dispersion", "compactness")))
