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

__all__ = ["MaskGenerator"]


class _MaskedActivation(torch.autograd.Function):
    """One autograd node for a unit's generator and mask: ``mask = relu(tanh(fc2(relu(fc1(mean_hw(x))))))``
    and ``out = act(y) * mask``, where ``act`` is ReLU or the identity. Returns ``(out, mask)``.

    Why one node: autograd's own ops cost about 160 recorded aten ops per unit and step (views,
    transposes, copies), each a kernel launch on a GPU; this node's forward and backward do the
    same arithmetic in about 45. The product overwrites ``y`` (nothing else reads the BN output),
    and only the output is kept: the mask's gradient ``sum_hw(grad * act(y))`` is recovered as
    ``sum_hw(grad * out) / mask``. Where the mask is 0 that quotient is undefined, but the
    generator's final ``relu(tanh(.))`` has slope 0 there, so it is never used (a threshold, not a
    branch, drops it: no host sync). ``x`` is the conv's input, read only by the generator.

    The generator always computes in fp32, also under autocast: its output is the mask whose
    cosine similarities the objective compares, and bf16 would round them to about 3 digits.
    """

    @staticmethod
    def forward(ctx, y, x, w1, w2, b2, relu: bool, detach_input: bool):
        # Every op below counts (a launch on a GPU): no casts that do nothing, clamp_min_ for relu_
        # (which is clamp_min_ and one more dispatch), and no Python number in a binary op (each is
        # converted to a tensor by a copy op of its own). The mean's 1 / (h * w) rides on the
        # GEMMs' alpha instead: relu commutes with a positive factor, so with ``pooled`` and
        # ``hidden`` kept as the unscaled sum and its hidden layer, mean-based hidden = hidden / hw.
        scale = 1.0 / (x.shape[2] * x.shape[3])
        with torch.autocast(y.device.type, enabled=False):
            pooled = x.sum(dim=(2, 3), dtype=w1.dtype if x.dtype != w1.dtype else None)
            hidden = torch.mm(pooled, w1.transpose(0, 1)).clamp_min_(0)
            mask = torch.addmm(b2, hidden, w2.transpose(0, 1), alpha=scale).tanh_().clamp_min_(0)
        if relu:
            y.clamp_min_(0)
        y.mul_(_as_dtype(mask, y.dtype).view(*mask.shape, 1, 1))
        ctx.mark_dirty(y)
        ctx.set_materialize_grads(False)
        ctx.relu, ctx.detach_input, ctx.scale, ctx.x_shape, ctx.x_dtype = relu, detach_input, scale, x.shape, x.dtype
        ctx.save_for_backward(y, mask, hidden, pooled, w1, w2)
        return y, mask

    @staticmethod
    def backward(ctx, grad_out, grad_mask):
        out, mask, hidden, pooled, w1, w2 = ctx.saved_tensors
        need_y, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not ctx.detach_input
        grad_y, weighted = _activation_grads(grad_out, out, mask, ctx.relu, need_y)
        if weighted is None:  # the output was not used: only the mask's own gradient flows
            weighted = torch.zeros_like(mask)
        else:
            weighted.div_(mask)
        if grad_mask is not None:
            weighted.add_(grad_mask)
        # d relu(tanh(z)) / dz = 1 - tanh(z)^2 where the mask is positive, 0 elsewhere.
        grad_z = torch.ops.aten.threshold_backward(weighted.addcmul_(weighted * mask, mask, value=-1), mask, 0)
        # Gradients of the unscaled hidden layer and sum (see forward): each carries the 1 / hw as
        # a GEMM alpha. With beta=0, addmm ignores its first argument (a tensor of the output's
        # shape, never read), so it is mm with the factor folded in.
        scale = ctx.scale
        grad_hidden = torch.ops.aten.threshold_backward(torch.mm(grad_z, w2), hidden, 0)
        grad_w2 = torch.addmm(w2, grad_z.transpose(0, 1), hidden, beta=0, alpha=scale)
        grad_b2 = grad_z.sum(0)
        grad_w1 = torch.addmm(w1, grad_hidden.transpose(0, 1), pooled, beta=0, alpha=scale)
        grad_x = None
        if need_x:  # the mean's gradient as a broadcast view, never materialised at full size
            n, c, h, w = ctx.x_shape
            grad_x = _as_dtype(torch.addmm(pooled, grad_hidden, w1, beta=0, alpha=scale), ctx.x_dtype)
            grad_x = grad_x.view(n, c, 1, 1).expand(n, c, h, w)
        return grad_y, grad_x, grad_w1, grad_w2, grad_b2, None, None


def _activation_grads(grad_out, out, mask, relu: bool, need_y: bool):
    """``grad_y`` of ``out = act(y) * mask`` and the unnormalised mask gradient ``sum_hw(grad * out)``.

    On a CPU the batch is walked in slices of ~4 MB so each slice of ``grad`` and ``out`` is read
    from memory once and reused from cache for both results (about 2x faster there); on a GPU one
    vectorised pass is a few kernels where slices would be a few per slice.
    """
    if grad_out is None:
        return None, None
    mask4 = _as_dtype(mask, grad_out.dtype).view(*mask.shape, 1, 1)
    step = max(1, _CHUNK_ELEMENTS // max(1, grad_out.numel() // grad_out.shape[0]))
    if grad_out.device.type != "cpu" or step >= grad_out.shape[0]:
        weighted = (grad_out * out).sum(dim=(2, 3), dtype=mask.dtype)
        grad_y = None
        if need_y:  # out > 0 exactly where y > 0 and mask > 0; elsewhere the gradient is 0
            grad_y = grad_out * mask4
            grad_y = torch.ops.aten.threshold_backward(grad_y, out, 0) if relu else grad_y
        return grad_y, weighted
    weighted = torch.empty_like(mask)
    grad_y = torch.empty_like(grad_out) if need_y else None
    for start in range(0, grad_out.shape[0], step):
        rows = slice(start, start + step)
        g, o = grad_out[rows], out[rows]
        torch.sum(g * o, dim=(2, 3), dtype=mask.dtype, out=weighted[rows])
        if need_y and relu:
            torch.ops.aten.threshold_backward.grad_input(g * mask4[rows], o, 0, grad_input=grad_y[rows])
        elif need_y:
            torch.mul(g, mask4[rows], out=grad_y[rows])
    return grad_y, weighted


_CHUNK_ELEMENTS = 1 << 20


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class MaskGenerator(nn.Module):
    """Per-sample kernel mask from a conv's input: avgpool -> FC -> ReLU -> FC -> tanh -> ReLU.

    Hidden width, Kaiming-normal weights and a final bias of 1.0 (every kernel starts active,
    tanh(1) = 0.76) follow the authors' public code.
    """

    def __init__(self, in_channels: int, num_kernels: int):
        super().__init__()
        hidden = num_kernels if num_kernels < 128 else num_kernels // 2
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, num_kernels)
        nn.init.kaiming_normal_(self.fc1.weight)
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, 1.0)
        # True: the generator reads a detached copy of its input, so no gradient reaches the
        # backbone through the masks (see detach_generator_inputs).
        self.detach_input = False

    def forward(self, conv_input: torch.Tensor) -> torch.Tensor:
        """The mask in plain autograd ops: what ``torch.compile`` traces and fuses, and the reference
        the eager single-node path (``_MaskedActivation``) is tested against."""
        conv_input = conv_input.detach() if self.detach_input else conv_input
        with torch.autocast(conv_input.device.type, enabled=False):  # fp32: see _MaskedActivation
            pooled = conv_input.mean(dim=(2, 3), dtype=self.fc1.weight.dtype)
            return torch.relu(torch.tanh(self.fc2(torch.relu(self.fc1(pooled)))))

    def masked(self, y: torch.Tensor, conv_input: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(act(y) * mask, mask)``, with ``act`` ReLU or the identity; may overwrite ``y``.

        Eager: one custom autograd node (few launches, no extra activation kept). Under
        ``torch.compile``: plain ops, which the compiler fuses into the surrounding kernels."""
        if torch.compiler.is_compiling():
            mask = self(conv_input)
            return (F.relu(y) if relu else y) * mask.to(y.dtype)[:, :, None, None], mask
        return _MaskedActivation.apply(y, conv_input, self.fc1.weight, self.fc2.weight, self.fc2.bias,
                                       relu, self.detach_input)
