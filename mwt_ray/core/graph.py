"""Any CNN made modular from its traced graph (torch.fx): the paper's unit found, not written per model.

The rule (section 3.2.1 of the paper: conv -> BN -> x mask). Every ``Conv2d`` whose output goes only
into a ``BatchNorm2d`` gets a mask generator that reads the conv's input; its per-sample mask
multiplies the BN's output. The network's first conv (in execution order) stays unmasked, as in the
paper. What this means for the patterns of common CNNs:

- Residual additions, concatenations, pooling: nothing is masked there; the convs before them are.
- DenseNet: the BN after a concatenation follows no conv, so only each dense layer's bottleneck
  conv (conv1 -> norm2) is masked: 58 units in densenet121.
- Depthwise and grouped convs followed by a BN are masked like any other (a kernel per output channel).
- Squeeze-excitation: its 1x1 convs feed an activation, not a BN, so they are not masked; the scale
  it multiplies in keeps the channels of its input.
- A BN's ReLU is folded into the mask op (``relu(m * y) == m * relu(y)`` for ``m >= 0``, one pass
  fewer, as the built-in units do); other activations (ReLU6, hardswish, SiLU) follow the mask, and
  since each maps 0 to 0 a removed kernel stays 0.

Tracing: parameter-free modules without children (torchvision's StochasticDepth, dropout variants)
are kept as leaves: traced through, they would bake the training flag of the moment into the graph.
In-place activations that read a masked output are made out-of-place: the eager mask op saves its
output for the backward pass.

The result is a ``torch.fx.GraphModule`` whose ``forward(x, return_masks=False)`` returns the logits,
or ``(logits, masks)`` with the masks in execution order (what the objective and the metrics read).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .models import MaskGenerator

__all__ = ["GraphError", "modularize", "mask_units", "fixed_masks", "MaskUnit"]


class GraphError(ValueError):
    """A model that cannot be made modular: its graph does not trace, or it holds no maskable unit."""


class MaskUnit(nn.Module):
    """The inserted op: ``(act(y) * mask, mask)`` with ``mask = generator(conv_input)``, act ReLU or the
    identity. ``conv`` and ``bn`` name the unit it masks (qualified names in the model)."""

    def __init__(self, generator: MaskGenerator, conv: str, bn: str, relu: bool):
        super().__init__()
        self.generator = generator
        self.conv, self.bn, self.relu = conv, bn, relu

    @property
    def num_kernels(self) -> int:
        return self.generator.fc2.out_features

    def forward(self, y: torch.Tensor, conv_input: torch.Tensor):
        return self.generator.masked(y, conv_input, self.relu)


class _FixedMask(nn.Module):
    """A hard 0/1 mask in place of a unit's generator: the reference a module must match."""

    def __init__(self, unit: MaskUnit, keep: torch.Tensor):
        super().__init__()
        self.unit, self.keep = unit, keep

    def forward(self, y: torch.Tensor, conv_input: torch.Tensor):
        hard = self.keep.to(device=y.device, dtype=y.dtype)
        out = y * hard[None, :, None, None]
        return (F.relu(out) if self.unit.relu else out), hard.expand(y.shape[0], -1)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        childless = next(module.children(), None) is None
        stateless = next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is None
        return super().is_leaf_module(module, qualified_name) or (childless and stateless)


def _model_output(output, return_masks: bool, masks: list[torch.Tensor]):
    return (output, list(masks)) if return_masks else output


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    return (node.op == "call_function" and node.target in (F.relu, torch.relu)) or \
        (node.op == "call_method" and node.target == "relu")


def _make_out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """A consumer of a masked output must not overwrite it (the mask op saved it for backward)."""
    if node.op == "call_module" and getattr(_module(gm, node), "inplace", False):
        _module(gm, node).inplace = False  # shared modules (a block's one ReLU) lose nothing by it
    elif node.op == "call_function" and node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.endswith("__") and node.args and node.args[0] is not None:
        node.target = node.target[:-1]
    elif node.op == "call_function" and node.target in (operator.iadd, operator.imul):
        node.target = operator.add if node.target is operator.iadd else operator.mul


def _generator_name(gm: fx.GraphModule, conv: str) -> str:
    """``<parent>.mask_generator`` where the parent holds one conv (a conv -> BN unit such as the
    built-ins' ConvUnit or torchvision's Conv2dNormActivation), else ``<parent>.<conv>_mask_generator``."""
    parent, _, attr = conv.rpartition(".")
    siblings = gm.get_submodule(parent).children() if parent else gm.children()
    convs = sum(isinstance(m, nn.Conv2d) for m in siblings)
    name = "mask_generator" if convs == 1 else f"{attr}_mask_generator"
    return f"{parent}.{name}" if parent else name


def modularize(model: nn.Module, name: str | None = None) -> fx.GraphModule:
    """``model`` (its modules, shared, not copied) as a graph with a mask generator per masked unit.

    ``name`` names the model in errors. Raises ``GraphError`` when the model does not trace or has
    no conv -> BN unit after its first conv."""
    label = name or type(model).__name__
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure is the same refusal
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GraphError(f"model {label} cannot be modularized: its forward does not trace with torch.fx "
                         f"({message[:200]})") from None
    gm = fx.GraphModule(model, graph, class_name=f"Modular{type(model).__name__}")
    nodes = list(gm.graph.nodes)
    convs = [n for n in nodes if n.op == "call_module" and isinstance(_module(gm, n), nn.Conv2d)]
    units = []
    for conv in convs[1:]:
        users = list(conv.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(_module(gm, users[0]), nn.BatchNorm2d) \
                and users[0].args[0] is conv:
            units.append((conv, users[0]))
    if not units:
        raise GraphError(f"model {label} cannot be modularized: no conv -> BatchNorm unit after its first conv "
                         "(MwT masks a BN's output by kernels of the conv before it)")
    masks = []
    for conv, bn in units:
        conv_module: nn.Conv2d = _module(gm, conv)
        generator = MaskGenerator(conv_module.in_channels, conv_module.out_channels).to(conv_module.weight.device)
        fold = len(bn.users) == 1 and _is_relu(gm, next(iter(bn.users)))
        replaced = next(iter(bn.users)) if fold else bn
        unit_name = _generator_name(gm, conv.target)
        gm.add_submodule(unit_name, MaskUnit(generator, conv.target, bn.target, relu=fold))
        with gm.graph.inserting_after(replaced):
            masked = gm.graph.call_module(unit_name, (bn, conv.args[0]))
        with gm.graph.inserting_after(masked):
            output = gm.graph.call_function(operator.getitem, (masked, 0))
        with gm.graph.inserting_after(output):
            mask = gm.graph.call_function(operator.getitem, (masked, 1))
        replaced.replace_all_uses_with(output, delete_user_cb=lambda user: user is not masked)
        if fold:
            gm.graph.erase_node(replaced)
        for user in list(output.users):
            _make_out_of_place(gm, user)
        masks.append(mask)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        return_masks = gm.graph.placeholder("return_masks", default_value=False)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    # Masks in execution order: the order their nodes run (a topological order of the graph).
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    masks.sort(key=order.__getitem__)
    with gm.graph.inserting_before(out):
        result = gm.graph.call_function(_model_output, (out.args[0], return_masks, masks))
    out.args = (result,)
    gm.graph.lint()
    gm.recompile()
    gm.meta["mask_units"] = [n.args[0].target for n in masks]  # meta: kept by deepcopy and pickle
    return gm


def mask_units(model: nn.Module) -> list[MaskUnit]:
    """The mask units of a graph-modularized model, in the order its masks are returned."""
    return [model.get_submodule(name) for name in getattr(model, "meta", {}).get("mask_units", [])]


class fixed_masks:
    """``with fixed_masks(gm, keep): gm(x)``: each unit applies a hard 0/1 mask (one bool or 0/1
    vector per unit, in mask order) instead of its generator, as an extracted module computes."""

    def __init__(self, gm: fx.GraphModule, keep: list[torch.Tensor]):
        self.gm, self.units = gm, mask_units(gm)
        if len(keep) != len(self.units):
            raise ValueError(f"expected {len(self.units)} kernel masks (one per masked unit), got {len(keep)}")
        for unit, k in zip(self.units, keep):
            if tuple(k.shape) != (unit.num_kernels,):
                raise ValueError(f"kernel mask of shape {tuple(k.shape)} for {unit.conv} with {unit.num_kernels} kernels")
        self.keep = keep

    def __enter__(self):
        for name, unit, k in zip(self.gm.meta["mask_units"], self.units, self.keep):
            self._swap(name, _FixedMask(unit, k.float()))
        return self.gm

    def __exit__(self, *exc):
        for name, unit in zip(self.gm.meta["mask_units"], self.units):
            self._swap(name, unit)

    def _swap(self, name: str, module: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, attr, module)
