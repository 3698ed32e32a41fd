"""CIFAR-style VGG16-BN and ResNet18 whose convolutions can carry MwT mask generators.

One model class serves both standard training (``modular=False``: no generators, a plain
network) and modular training (``modular=True``: every conv but the first gets a mask
generator, section 3.2.1 of the paper). ``create_model`` is the registry.

A masked conv unit computes ``mask * BN(conv(x))`` with a per-sample mask in [0, 1) over its
output kernels, followed by ReLU where the architecture has one. Because the mask is
non-negative, ``relu(mask * y) == mask * relu(y)`` and ``maxpool(mask * y) == mask * maxpool(y)``
exactly, so the unit applies the mask after ReLU and after pooling: the result is the same and
the multiply touches 4x fewer values behind a pooling layer.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MaskGenerator",
    "ConvUnit",
    "VGG",
    "ResNet",
    "ResCNN",
    "BasicBlock",
    "create_model",
    "list_models",
    "masked_units", "init_mask_bias", "detach_generator_inputs",
    "set_kernel_masks",
]


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
        # (which is clamp_min_ and one more dispatch), a float factor for the mean (an int divisor
        # is converted by a copy op of its own).
        with torch.autocast(y.device.type, enabled=False):
            pooled = x.sum(dim=(2, 3), dtype=w1.dtype if x.dtype != w1.dtype else None).mul_(1.0 / (x.shape[2] * x.shape[3]))
            hidden = torch.mm(pooled, w1.transpose(0, 1)).clamp_min_(0)
            mask = torch.addmm(b2, hidden, w2.transpose(0, 1)).tanh_().clamp_min_(0)
        if relu:
            y.clamp_min_(0)
        y.mul_(_as_dtype(mask, y.dtype).view(*mask.shape, 1, 1))
        ctx.mark_dirty(y)
        ctx.set_materialize_grads(False)
        ctx.relu, ctx.detach_input, ctx.x_shape, ctx.x_dtype = relu, detach_input, x.shape, x.dtype
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
        grad_hidden = torch.ops.aten.threshold_backward(torch.mm(grad_z, w2), hidden, 0)
        grad_w2 = torch.mm(grad_z.transpose(0, 1), hidden)
        grad_b2 = grad_z.sum(0)
        grad_w1 = torch.mm(grad_hidden.transpose(0, 1), pooled)
        grad_x = None
        if need_x:  # the mean's gradient as a broadcast view, never materialised at full size
            n, c, h, w = ctx.x_shape
            grad_x = _as_dtype(torch.mm(grad_hidden, w1).mul_(1.0 / (h * w)), ctx.x_dtype)
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


class ConvUnit(nn.Module):
    """conv -> BN -> [ReLU] -> [2x2 max-pool] -> x mask, the unit MwT masks and prunes.

    ``kernel_mask`` (a 0/1 vector over output kernels, or None) switches the generator off and
    applies a fixed hard mask instead: that is the reference an extracted module must match.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 stride: int = 1, relu: bool = True, pool: bool = False, masked: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu
        self.pool = pool
        self.mask_generator = MaskGenerator(in_channels, out_channels) if masked else None
        self.kernel_mask: torch.Tensor | None = None

    @property
    def num_kernels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.kernel_mask is not None:
            hard = self.kernel_mask.to(y.dtype)
            y = y * hard[None, :, None, None]
            if self.relu:
                y = F.relu(y)
            if self.pool:
                y = F.max_pool2d(y, 2)
            if masks is not None:
                masks.append(hard.expand(x.shape[0], -1))
            return y
        if self.mask_generator is None:
            if self.relu:
                y = F.relu(y, inplace=True)
            return F.max_pool2d(y, 2) if self.pool else y
        if self.pool:
            if self.relu:
                y = F.relu(y, inplace=True)
            out, mask = self.mask_generator.masked(F.max_pool2d(y, 2), x, relu=False)
        else:
            out, mask = self.mask_generator.masked(y, x, self.relu)
        if masks is not None:
            masks.append(mask)
        return out


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _init_backbone(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-BN for 32x32 inputs: conv units, then FC-ReLU-FC-ReLU-FC on the 1x1 feature map.

    ``conv_channels`` lists each conv's kernel count and ``pool_after`` whether a 2x2 max-pool
    follows it, so a pruned module is the same class with fewer channels.
    """

    def __init__(self, conv_channels: list[int], pool_after: list[bool], hidden: int,
                 num_classes: int, modular: bool = True, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.conv_channels = list(conv_channels)
        self.pool_after = list(pool_after)
        self.dropout = dropout
        units = []
        for index, (out_channels, pool) in enumerate(zip(conv_channels, pool_after)):
            units.append(ConvUnit(in_channels, out_channels, pool=pool, masked=modular and index > 0))
            in_channels = out_channels
        self.units = nn.ModuleList(units)
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.classifier = nn.Sequential(
            *drop, nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
            *drop, nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        _init_backbone(self)

    def forward(self, x: torch.Tensor, return_masks: bool = False):
        masks: list[torch.Tensor] | None = [] if return_masks else None
        for unit in self.units:
            x = unit(x, masks)
        logits = self.classifier(torch.flatten(x, 1))
        return (logits, masks) if return_masks else logits


class BasicBlock(nn.Module):
    """ResNet basic block; its two convs and its 1x1 shortcut conv (if any) are masked units."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, modular: bool):
        super().__init__()
        self.unit1 = ConvUnit(in_channels, out_channels, stride=stride, masked=modular)
        self.unit2 = ConvUnit(out_channels, out_channels, relu=False, masked=modular)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvUnit(in_channels, out_channels, kernel_size=1, stride=stride,
                                     relu=False, masked=modular)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        out = self.unit2(self.unit1(x, masks), masks)
        identity = x if self.shortcut is None else self.shortcut(x, masks)
        return F.relu(out + identity, inplace=True)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (unmasked), four stages of basic blocks, global average pool, FC."""

    def __init__(self, stage_channels: list[int], blocks_per_stage: list[int], num_classes: int,
                 modular: bool = True, in_channels: int = 3):
        super().__init__()
        self.stem = ConvUnit(in_channels, stage_channels[0], masked=False)
        blocks = []
        channels = stage_channels[0]
        for stage, (out_channels, count) in enumerate(zip(stage_channels, blocks_per_stage)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, modular))
                channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(channels, num_classes)
        _init_backbone(self)

    def forward(self, x: torch.Tensor, return_masks: bool = False):
        masks: list[torch.Tensor] | None = [] if return_masks else None
        x = self.stem(x, masks)
        for block in self.blocks:
            x = block(x, masks)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return (logits, masks) if return_masks else logits


RESCNN_CHANNELS = (64, 128, 128, 128, 256, 512, 512, 512, 512, 512, 512, 512)
RESCNN_POOL_AFTER = (1, 4, 5, 8, 9)
RESCNN_RESIDUALS = ((2, 3), (6, 7), (10, 11))  # (first, last) unit of each residual pair


class ResCNN(nn.Module):
    """ResCNN of CNNSplitter / MwT: 12 conv units, 2x2 pools after units 1, 4, 5, 8, 9, and three
    residual pairs whose input is added to the second unit's (ReLU-ed) output, no ReLU after the
    sum; then dropout and one FC on the 1x1 feature map."""

    def __init__(self, channels: list[int], num_classes: int, modular: bool = True, in_channels: int = 3):
        super().__init__()
        units = []
        for index, out_channels in enumerate(channels):
            units.append(ConvUnit(in_channels, out_channels, pool=index in RESCNN_POOL_AFTER,
                                  masked=modular and index > 0))
            in_channels = out_channels
        self.units = nn.ModuleList(units)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(in_channels, num_classes))
        _init_backbone(self)

    def forward(self, x: torch.Tensor, return_masks: bool = False):
        masks: list[torch.Tensor] | None = [] if return_masks else None
        starts, ends = dict(RESCNN_RESIDUALS), {last for _, last in RESCNN_RESIDUALS}
        residual = None
        for index, unit in enumerate(self.units):
            if index in starts:
                residual = x
            x = unit(x, masks)
            if index in ends:
                x = x + residual
        logits = self.classifier(torch.flatten(x, 1))
        return (logits, masks) if return_masks else logits


def _vgg16(num_classes: int, width: float, modular: bool, dropout: float = 0.0) -> VGG:
    channels = [_scaled(c, width) for c in VGG16_LAYOUT if c != "M"]
    pool_after = [nxt == "M" for cur, nxt in zip(VGG16_LAYOUT, VGG16_LAYOUT[1:] + (None,)) if cur != "M"]
    return VGG(channels, pool_after, _scaled(512, width), num_classes, modular, dropout=dropout)


def _simcnn(num_classes: int, width: float, modular: bool) -> VGG:
    return _vgg16(num_classes, width, modular, dropout=0.5)


def _rescnn(num_classes: int, width: float, modular: bool) -> ResCNN:
    return ResCNN([_scaled(c, width) for c in RESCNN_CHANNELS], num_classes, modular)


def _resnet18(num_classes: int, width: float, modular: bool) -> ResNet:
    return ResNet([_scaled(c, width) for c in (64, 128, 256, 512)], [2, 2, 2, 2], num_classes, modular)


_REGISTRY: dict[str, Callable[[int, float, bool], nn.Module]] = {
    "vgg16": _vgg16,
    "resnet18": _resnet18,
    "simcnn": _simcnn,
    "rescnn": _rescnn,
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, width: float = 1.0, modular: bool = True) -> nn.Module:
    """Build a registered model, e.g. ``create_model("vgg16", width=0.25)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return _REGISTRY[name](num_classes, float(width), modular)


def masked_units(model: nn.Module) -> list[ConvUnit]:
    """The units that own a mask generator, in the order their masks are returned."""
    return [m for m in model.modules() if isinstance(m, ConvUnit) and m.mask_generator is not None]


def init_mask_bias(model: nn.Module, value: float) -> None:
    """Set every mask generator's last bias (1.0 at construction): lower values start training with
    fewer kernels on (tanh(0) = 0 puts each kernel on the edge), higher ones with all firmly on."""
    with torch.no_grad():
        for unit in masked_units(model):
            unit.mask_generator.fc2.bias.fill_(value)


def detach_generator_inputs(model: nn.Module, detach: bool = True) -> None:
    """With ``detach``, cohesion and coupling train only the mask generators: the backbone's
    convolutions get gradients from cross-entropy alone (through the masked activations), never
    through a generator's input. An option beyond the paper, which trains both together."""
    for unit in masked_units(model):
        unit.mask_generator.detach_input = detach


def conv_units(model: nn.Module) -> list[ConvUnit]:
    return [m for m in model.modules() if isinstance(m, ConvUnit)]


def set_kernel_masks(model: nn.Module, kernel_masks: list[torch.Tensor] | None) -> None:
    """Switch generators off and force fixed 0/1 masks (one per masked unit), or undo with None."""
    units = masked_units(model)
    if kernel_masks is None:
        for unit in units:
            unit.kernel_mask = None
        return
    if len(kernel_masks) != len(units):
        raise ValueError(f"expected {len(units)} kernel masks (one per masked layer), got {len(kernel_masks)}")
    for unit, keep in zip(units, kernel_masks):
        if keep.shape != (unit.num_kernels,):
            raise ValueError(f"kernel mask of shape {tuple(keep.shape)} for a layer with {unit.num_kernels} kernels")
        unit.kernel_mask = keep.to(device=unit.conv.weight.device, dtype=torch.float32)
