"""Module extraction: a smaller plain network with the irrelevant kernels physically removed.

A module drops the mask generators (as in the authors' code) and keeps, per masked conv, only the
kernels in its module mask, together with their BN entries, the matching input channels of the
next conv and the classifier's matching input features. It computes exactly what the full
network computes with its generators off and the removed kernels forced to zero
(``models.set_kernel_masks``), up to float summation order.

For ResNet, the two sides of a residual addition may keep different kernels. Rather than keeping
extra kernels to make them match, the block adds both into the union of their channels by index
(Fig. 3d): the compact equivalent of zero-padding each side to the full channel space.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .models import RESCNN_RESIDUALS, VGG, BasicBlock, ConvUnit, ResCNN, ResNet, masked_units

__all__ = ["extract_module", "PrunedResNet", "PrunedBasicBlock", "PrunedResCNN"]


def _copy_unit(source: ConvUnit, out_index: torch.Tensor, in_index: torch.Tensor) -> ConvUnit:
    conv = source.conv
    unit = ConvUnit(len(in_index), len(out_index), kernel_size=conv.kernel_size[0],
                    stride=conv.stride[0], relu=source.relu, pool=source.pool, masked=False)
    unit.conv.weight.data.copy_(conv.weight.data[out_index][:, in_index])
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(unit.bn, name).data.copy_(getattr(source.bn, name).data[out_index])
    unit.bn.num_batches_tracked.data.copy_(source.bn.num_batches_tracked.data)
    return unit.to(conv.weight.device)


def _residual_sum(main: torch.Tensor, main_positions: torch.Tensor, side: torch.Tensor,
                  side_positions: torch.Tensor, channels: int) -> torch.Tensor:
    """main + side, each placed at its channels of the union: zero-padding without the zeros."""
    out = main.new_zeros(main.shape[0], channels, *main.shape[2:])
    out.index_add_(1, main_positions, main)
    return out.index_add_(1, side_positions, side)


class PrunedBasicBlock(nn.Module):
    """A basic block whose residual sum lives in the union of both sides' kept channels."""

    def __init__(self, unit1: ConvUnit, unit2: ConvUnit, shortcut: ConvUnit | None,
                 out_channels: int, main_positions: torch.Tensor, shortcut_positions: torch.Tensor):
        super().__init__()
        self.unit1, self.unit2, self.shortcut = unit1, unit2, shortcut
        self.out_channels = out_channels
        self.register_buffer("main_positions", main_positions)
        self.register_buffer("shortcut_positions", shortcut_positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.unit2(self.unit1(x))
        side = x if self.shortcut is None else self.shortcut(x)
        out = _residual_sum(main, self.main_positions, side, self.shortcut_positions, self.out_channels)
        return F.relu(out, inplace=True)


class PrunedResNet(nn.Module):
    def __init__(self, stem: ConvUnit, blocks: list[PrunedBasicBlock], fc: nn.Linear):
        super().__init__()
        self.stem, self.blocks, self.fc = stem, nn.ModuleList(blocks), fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _per_layer(model: nn.Module, keep) -> list[torch.Tensor]:
    sizes = [u.num_kernels for u in masked_units(model)]
    if not sizes:
        raise ValueError("the model has no masked layers: extract modules from a modular model")
    if isinstance(keep, torch.Tensor):
        if keep.shape != (sum(sizes),):
            raise ValueError(f"module mask has shape {tuple(keep.shape)}, expected ({sum(sizes)},)")
        keep = list(torch.split(keep, sizes))
    if [len(k) for k in keep] != sizes:
        raise ValueError("module mask does not match the model's masked layers")
    for index, layer in enumerate(keep):
        if not layer.any():
            raise ValueError(f"module mask keeps no kernel in masked layer {index}")
    return [k.to(torch.bool).cpu() for k in keep]


def _indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


def _linear_with_inputs(source: nn.Linear, in_index: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(len(in_index), source.out_features, bias=source.bias is not None)
    layer.weight.data.copy_(source.weight.data[:, in_index])
    if source.bias is not None:
        layer.bias.data.copy_(source.bias.data)
    return layer.to(source.weight.device)


def _extract_vgg(model: VGG, keep: list[torch.Tensor]) -> VGG:
    first = model.units[0]
    out_indices = [torch.arange(first.num_kernels)] + [_indices(k) for k in keep]
    in_index = torch.arange(first.conv.in_channels)
    first_fc = next(i for i, layer in enumerate(model.classifier) if isinstance(layer, nn.Linear))
    module = VGG([len(i) for i in out_indices], model.pool_after, model.classifier[first_fc].out_features,
                 model.classifier[-1].out_features, modular=False, in_channels=len(in_index), dropout=model.dropout)
    for position, (unit, out_index) in enumerate(zip(model.units, out_indices)):
        module.units[position] = _copy_unit(unit, out_index, in_index)
        in_index = out_index
    module.classifier = copy.deepcopy(model.classifier)
    module.classifier[first_fc] = _linear_with_inputs(model.classifier[first_fc], in_index)
    return module.to(first.conv.weight.device)


def _extract_resnet(model: ResNet, keep: list[torch.Tensor]) -> PrunedResNet:
    layers = iter(keep)
    stem_out = torch.arange(model.stem.num_kernels)
    stem = _copy_unit(model.stem, stem_out, torch.arange(model.stem.conv.in_channels))
    live = stem_out  # channels of the full space that carry values into the next block
    blocks = []
    for block in model.blocks:
        block: BasicBlock
        k1, k2 = _indices(next(layers)), _indices(next(layers))
        unit1 = _copy_unit(block.unit1, k1, live)
        unit2 = _copy_unit(block.unit2, k2, k1)
        if block.shortcut is not None:
            side_channels = _indices(next(layers))
            shortcut = _copy_unit(block.shortcut, side_channels, live)
        else:
            side_channels, shortcut = live, None
        out_live = torch.unique(torch.cat([k2, side_channels]))  # sorted union
        blocks.append(PrunedBasicBlock(unit1, unit2, shortcut, len(out_live),
                                       torch.searchsorted(out_live, k2),
                                       torch.searchsorted(out_live, side_channels)))
        live = out_live
    return PrunedResNet(stem, blocks, _linear_with_inputs(model.fc, live)).to(model.fc.weight.device)


class PrunedResCNN(nn.Module):
    """ResCNN with pruned units; each residual sum is formed in the union of both sides' channels."""

    def __init__(self, units: list[ConvUnit], residuals: list[tuple[int, int, int, torch.Tensor, torch.Tensor]],
                 classifier: nn.Module):
        super().__init__()
        self.units, self.classifier = nn.ModuleList(units), classifier
        # (first unit, last unit, sum channels); positions of each side in the sum are buffers.
        self.residuals = [(first, last, channels) for first, last, channels, _, _ in residuals]
        for index, (*_, main, side) in enumerate(residuals):
            self.register_buffer(f"main_positions_{index}", main)
            self.register_buffer(f"side_positions_{index}", side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        starts = {first: i for i, (first, _, _) in enumerate(self.residuals)}
        ends = {last: i for i, (_, last, _) in enumerate(self.residuals)}
        residual = None
        for index, unit in enumerate(self.units):
            if index in starts:
                residual = x
            x = unit(x)
            if index in ends:
                k = ends[index]
                x = _residual_sum(x, getattr(self, f"main_positions_{k}"), residual,
                                  getattr(self, f"side_positions_{k}"), self.residuals[k][2])
        return self.classifier(torch.flatten(x, 1))


def _extract_rescnn(model: ResCNN, keep: list[torch.Tensor]) -> PrunedResCNN:
    first = model.units[0]
    out_indices = [torch.arange(first.num_kernels)] + [_indices(k) for k in keep]
    live = torch.arange(first.conv.in_channels)
    starts, first_of = dict(RESCNN_RESIDUALS), {last: first for first, last in RESCNN_RESIDUALS}
    units, residuals, residual_live = [], [], None
    for index, (unit, out_index) in enumerate(zip(model.units, out_indices)):
        if index in starts:
            residual_live = live
        units.append(_copy_unit(unit, out_index, live))
        live = out_index
        if index in first_of:
            summed = torch.unique(torch.cat([out_index, residual_live]))
            residuals.append((first_of[index], index, len(summed), torch.searchsorted(summed, out_index),
                              torch.searchsorted(summed, residual_live)))
            live = summed
    classifier = copy.deepcopy(model.classifier)
    classifier[-1] = _linear_with_inputs(model.classifier[-1], live)
    return PrunedResCNN(units, residuals, classifier).to(first.conv.weight.device)


def extract_module(model: nn.Module, keep) -> nn.Module:
    """Physically pruned copy of ``model`` keeping the kernels in ``keep``.

    ``keep``: a flat bool vector over all masked kernels (a row of ``module_masks``, or the
    union of several rows for a mixed module), or one bool vector per masked layer.
    """
    layers = _per_layer(model, keep)
    if isinstance(model, VGG):
        module = _extract_vgg(model, layers)
    elif isinstance(model, ResNet):
        module = _extract_resnet(model, layers)
    elif isinstance(model, ResCNN):
        module = _extract_rescnn(model, layers)
    else:
        raise TypeError(f"no extraction rule for {type(model).__name__}")
    return module.train(model.training)
