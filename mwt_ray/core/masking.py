"""The MwT mask generator and its masked-activation op: what every modular model, built-in or traced,
computes at a masked unit (section 3.2.1 of the paper: ``out = act(BN(conv(x))) * mask(x)``).

``MaskGenerator.masked`` is the op the modular graph calls (``core.graph``): one custom autograd node
in eager mode, plain ops under ``torch.compile``. Its mask is non-negative, so it commutes with ReLU
and max-pooling; the graph applies it after them where that touches fewer values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .losses import transposed_view

__all__ = ["MaskGenerator"]


class _MaskedActivation(torch.autograd.Function):
    """One autograd node for a unit's generator and mask: ``mask = relu(tanh(W2 relu(W1 mean_hw(x)) + b2))``
    and ``out = act(y) * mask``, where ``act`` is ReLU or the identity. Returns ``(out, mask)``.

    Why one node: autograd's own ops cost about 160 recorded aten ops per unit and step (views,
    transposes, copies), each a kernel launch on a GPU or a dispatch; this node's forward and
    backward do the same arithmetic in about 50 (15-16 and 33-34 in a VGG16 step on the CPU). The
    product overwrites ``y`` (nothing else reads the BN output), and only the output is kept: the
    mask's gradient ``sum_hw(grad * act(y))`` is recovered as ``sum_hw(grad * out) / mask``. Where
    the mask is 0 that quotient is undefined, but the generator's final ``relu(tanh(.))`` has slope
    0 there, so it is never used (a threshold, not a branch, drops it: no host sync). ``x`` is the
    conv's input, read only by the generator.

    The generator always computes in fp32, also under autocast: its output is the mask whose
    cosine similarities the objective compares, and bf16 would round them to about 3 digits.
    """

    @staticmethod
    def forward(ctx, y, x, packed, views, layout, relu: bool, detach_input: bool):
        # Every op below counts (a launch on a GPU): no casts that do nothing, clamp_min_ for relu_
        # (which is clamp_min_ and one more dispatch), no Python number in a binary op (each is
        # converted to a tensor by a copy op of its own), and the weights as views of the packed
        # parameter made once (``_packed_views``). The mean's 1 / (h * w) rides on the GEMMs' alpha:
        # relu commutes with a positive factor, so with ``pooled`` and ``hidden`` kept as the unscaled
        # sum and its hidden layer, mean-based hidden = hidden / hw.
        scale = 1.0 / (x.shape[2] * x.shape[3])
        w1_t, w2_t, b2, w1, w2 = views
        with torch.autocast(y.device.type, enabled=False):
            pooled = x.sum(dim=(2, 3), dtype=packed.dtype if x.dtype != packed.dtype else None)
            hidden = torch.mm(pooled, w1_t).clamp_min_(0)
            # add(b2, mm, alpha) rather than addmm: addmm first copies the broadcast bias into its output
            mask = torch.add(b2, torch.mm(hidden, w2_t), alpha=scale).tanh_().clamp_min_(0)
        if relu:
            y.clamp_min_(0)
        mask4 = _as_dtype(mask, y.dtype).view(*mask.shape, 1, 1)
        y.mul_(mask4)
        ctx.mark_dirty(y)
        ctx.set_materialize_grads(False)
        ctx.relu, ctx.detach_input, ctx.scale, ctx.layout = relu, detach_input, scale, layout
        ctx.x_shape, ctx.x_dtype, ctx.packed_shape = x.shape, x.dtype, packed.shape
        ctx.save_for_backward(y, mask, mask4, hidden, pooled, w1, w2)
        return y, mask

    @staticmethod
    def backward(ctx, grad_out, grad_mask):
        out, mask, mask4, hidden, pooled, w1, w2 = ctx.saved_tensors
        need_y, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not ctx.detach_input
        grad_y, weighted = _activation_grads(grad_out, out, mask4, mask.dtype, ctx.relu, need_y)
        if weighted is None:  # the output was not used: only the mask's own gradient flows
            weighted = grad_mask
        elif grad_mask is None:
            weighted.div_(mask)
        else:
            weighted = torch.addcdiv(grad_mask, weighted, mask)
        # d relu(tanh(z)) / dz = 1 - tanh(z)^2 where the mask is positive, 0 elsewhere.
        grad_z = torch.ops.aten.threshold_backward(torch.ops.aten.tanh_backward(weighted, mask), mask, 0)
        # Gradients of the unscaled hidden layer and sum (see forward): each carries the 1 / hw as
        # a GEMM alpha, and the weights' gradients are written straight into the views of one packed
        # gradient (every element is written: empty, not zeros). With beta=0, addmm ignores its
        # first argument (here the output itself), so it is mm with the factor folded in.
        scale, layout = ctx.scale, ctx.layout
        grad_packed = torch.empty(ctx.packed_shape, dtype=w1.dtype, device=w1.device)
        (grad_w1, grad_w2), grad_b2 = _weights(grad_packed, layout, transposed=False), _bias(grad_packed, layout)
        grad_hidden = torch.ops.aten.threshold_backward(torch.mm(grad_z, w2), hidden, 0)
        torch.addmm(grad_w2, transposed_view(grad_z), hidden, beta=0, alpha=scale, out=grad_w2)
        torch.sum(grad_z, 0, out=grad_b2)
        torch.addmm(grad_w1, transposed_view(grad_hidden), pooled, beta=0, alpha=scale, out=grad_w1)
        grad_x = None
        if need_x:  # the mean's gradient as a broadcast view, never materialised at full size
            n, c, h, w = ctx.x_shape
            grad_x = _as_dtype(torch.addmm(pooled, grad_hidden, w1, beta=0, alpha=scale), ctx.x_dtype)
            grad_x = grad_x.as_strided((n, c, h, w), (c, 1, 0, 0))
        return grad_y, grad_x, grad_packed, None, None, None, None


def _packed_views(packed: torch.Tensor, layout: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """``(W1^T, W2^T, b2, W1, W2)`` as views of ``packed``, made once per storage rather than at every
    step (each view is an op of its own, forward and backward). Detached, since the node computes the
    parameter's gradient itself, but sharing ``packed``'s storage and version counter: the optimizer's
    in-place updates show through them, and a change between forward and backward still fails
    autograd's check. A new storage (``model.to``, ``.double()``) makes new views."""
    cached = _PACKED_VIEWS.get(packed)
    if cached is None or cached[0] != packed.data_ptr():
        data = packed.detach()
        views = (
            *_weights(data, layout, transposed=True),
            _bias(data, layout),
            *_weights(data, layout, transposed=False),
        )
        cached = _PACKED_VIEWS[packed] = (packed.data_ptr(), views)
    return cached[1]


_PACKED_VIEWS = WeakIdKeyDictionary()  # a generator's packed parameter -> (its data_ptr, its views)


def _weights(packed: torch.Tensor, layout: tuple[int, int, int], transposed: bool):
    """``(W1, W2)`` of a generator's packed parameter ``[W1 (hidden x in) | W2 (kernels x hidden) | b2]``
    as strided views, one op each; with ``transposed``, ``(W1^T, W2^T)``."""
    inputs, hidden, kernels = layout
    if transposed:
        return packed.as_strided((inputs, hidden), (1, inputs)), packed.as_strided(
            (hidden, kernels), (1, hidden), hidden * inputs
        )
    return packed.as_strided((hidden, inputs), (inputs, 1)), packed.as_strided(
        (kernels, hidden), (hidden, 1), hidden * inputs
    )


def _bias(packed: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """``b2`` of a packed parameter (see ``_weights``)."""
    inputs, hidden, kernels = layout
    return packed.as_strided((kernels,), (1,), hidden * inputs + kernels * hidden)


def _activation_grads(grad_out, out, mask4, mask_dtype: torch.dtype, relu: bool, need_y: bool):
    """``grad_y`` of ``out = act(y) * mask`` and the unnormalised mask gradient ``sum_hw(grad * out)``;
    ``mask4`` is the mask as (B, K, 1, 1) in ``out``'s dtype; the mask gradient comes in ``mask_dtype``.

    One vectorised pass for each, on every device. ``grad_y`` is written into the product's buffer:
    one full-size allocation where there were three. On the CPU (2-core Xeon, batch 128) that made
    walking the batch in cache-sized slices, which an earlier version did there, no faster per step
    (VGG16 at width 1: 1.052x vs 1.058x of the standard step; at 1/4 1.129x vs 1.144x, within noise),
    and slices cost ops of their own.
    """
    if grad_out is None:
        return None, None
    product = grad_out * out
    weighted = product.sum(dim=(2, 3), dtype=mask_dtype)
    if not need_y:
        return None, weighted
    grad_y = torch.mul(grad_out, mask4, out=product)
    if relu:  # out > 0 exactly where y > 0 and mask > 0; elsewhere the gradient is 0
        torch.ops.aten.threshold_backward.grad_input(grad_y, out, 0, grad_input=grad_y)
    return grad_y, weighted


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class MaskGenerator(nn.Module):
    """Per-sample kernel mask from a conv's input: avgpool -> FC -> ReLU -> FC -> tanh -> ReLU.

    Hidden width, Kaiming-normal weights and a final bias of 1.0 (every kernel starts active,
    tanh(1) = 0.76) follow the authors' public code. The two layers' weights ``w1`` (hidden x in),
    ``w2`` (kernels x hidden) and the bias ``b2`` are views of one parameter, ``packed``: the
    optimizer updates each parameter tensor with ops of its own (SGD with momentum: about 9 per
    tensor, a GPU launch each), so one tensor per unit instead of three saves two thirds of them.
    """

    def __init__(self, in_channels: int, num_kernels: int):
        super().__init__()
        hidden = num_kernels if num_kernels < 128 else num_kernels // 2
        self.layout = (in_channels, hidden, num_kernels)
        self.packed = nn.Parameter(torch.empty(hidden * in_channels + num_kernels * hidden + num_kernels))
        with torch.no_grad():
            nn.init.kaiming_normal_(self.w1)
            nn.init.kaiming_normal_(self.w2)
            self.b2.fill_(1.0)
        # True: the generator reads a detached copy of its input, so no gradient reaches the
        # backbone through the masks (see detach_generator_inputs).
        self.detach_input = False

    @property
    def in_channels(self) -> int:
        return self.layout[0]

    @property
    def num_kernels(self) -> int:
        return self.layout[2]

    @property
    def w1(self) -> torch.Tensor:
        return _weights(self.packed, self.layout, transposed=False)[0]

    @property
    def w2(self) -> torch.Tensor:
        return _weights(self.packed, self.layout, transposed=False)[1]

    @property
    def b2(self) -> torch.Tensor:
        return _bias(self.packed, self.layout)

    def forward(self, conv_input: torch.Tensor) -> torch.Tensor:
        """The mask in plain autograd ops: what ``torch.compile`` traces and fuses, and the reference
        the eager single-node path (``_MaskedActivation``) is tested against."""
        conv_input = conv_input.detach() if self.detach_input else conv_input
        with torch.autocast(conv_input.device.type, enabled=False):  # fp32: see _MaskedActivation
            pooled = conv_input.mean(dim=(2, 3), dtype=self.packed.dtype)
            return torch.relu(torch.tanh(F.linear(torch.relu(F.linear(pooled, self.w1)), self.w2, self.b2)))

    def masked(self, y: torch.Tensor, conv_input: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(act(y) * mask, mask)``, with ``act`` ReLU or the identity; may overwrite ``y``.

        Eager: one custom autograd node (few launches, no extra activation kept). Under
        ``torch.compile``: plain ops, which the compiler fuses into the surrounding kernels."""
        if torch.compiler.is_compiling():
            mask = self(conv_input)
            return (F.relu(y) if relu else y) * mask.to(y.dtype)[:, :, None, None], mask
        return _MaskedActivation.apply(y, conv_input, self.packed, _packed_views(self.packed, self.layout), self.layout,
                                       relu, self.detach_input)
