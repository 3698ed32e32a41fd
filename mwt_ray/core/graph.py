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
``extract_module`` cuts a module out of it by propagating kept channels through the same graph
(its docstring and ``_Extraction`` say the rule for each pattern).

Why torch.fx and not a dependency graph such as torch-pruning's: that library prunes once and
statically, with groups of coupled channels that must keep the same indices; MwT needs per-sample
masks during training and, at an addition, the union of both sides' kept channels, which a
rewrite of the traced graph expresses directly.
"""
from __future__ import annotations

import copy
import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .models import MaskGenerator

__all__ = ["GraphError", "modularize", "mask_units", "fixed_masks", "MaskUnit", "extract_module"]


class GraphError(ValueError):
    """A model that cannot be made modular: its graph does not trace, or it holds no maskable unit."""


@dataclasses.dataclass(frozen=True)
class MaskUnit:
    """One masked unit of a modular graph: its generator (``name`` in the model), the conv whose kernels
    it masks, the BN whose output it multiplies (qualified names) and whether a ReLU is folded in."""
    name: str
    generator: MaskGenerator
    conv: str
    bn: str
    relu: bool

    @property
    def num_kernels(self) -> int:
        return self.generator.fc2.out_features


class _FixedMask(nn.Module):
    """A hard 0/1 mask in place of a unit's generator (same ``masked`` contract): the reference a
    module must match."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep = keep

    def masked(self, y: torch.Tensor, conv_input: torch.Tensor, relu: bool):
        hard = self.keep.to(device=y.device, dtype=y.dtype)
        out = y * hard[None, :, None, None]
        return (F.relu(out) if relu else out), hard.expand(y.shape[0], -1)


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
    elif node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        node.target = node.target[:-1]  # x.relu_() -> x.relu(): torch's in-place methods end in one _
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
    masks, pairs, units = [], units, {}
    for conv, bn in pairs:
        conv_module: nn.Conv2d = _module(gm, conv)
        generator = MaskGenerator(conv_module.in_channels, conv_module.out_channels).to(conv_module.weight.device)
        fold = len(bn.users) == 1 and _is_relu(gm, next(iter(bn.users)))
        replaced = next(iter(bn.users)) if fold else bn
        unit_name = _generator_name(gm, conv.target)
        gm.add_submodule(unit_name, generator)
        with gm.graph.inserting_after(replaced):
            generator_node = gm.graph.get_attr(unit_name)
        with gm.graph.inserting_after(generator_node):
            masked = gm.graph.call_method("masked", (generator_node, bn, conv.args[0], fold))
        units[masked] = {"name": unit_name, "conv": conv.target, "bn": bn.target, "relu": fold}
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
    gm.meta["mask_units"] = [units[n.args[0]] for n in masks]  # meta: kept by deepcopy and pickle
    return gm


def mask_units(model: nn.Module) -> list[MaskUnit]:
    """The mask units of a graph-modularized model, in the order its masks are returned."""
    return [MaskUnit(generator=model.get_submodule(u["name"]), **u) for u in getattr(model, "meta", {}).get("mask_units", [])]


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
        for unit, k in zip(self.units, self.keep):
            self._swap(unit.name, _FixedMask(k.float()))
        return self.gm

    def __exit__(self, *exc):
        for unit in self.units:
            self._swap(unit.name, unit.generator)

    def _swap(self, name: str, module: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, attr, module)


# ----------------------------------------------------------------------------- extraction

# Ops that act on each channel alone: the kept channels of their input are those of their output.
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Identity,
                        nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d)
_PER_CHANNEL_FUNCTIONS = {F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.dropout, torch.relu,
                          torch.sigmoid, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.hardtanh}
_PER_CHANNEL_METHODS = {"relu", "sigmoid", "contiguous", "clone"}


def _attr(root: nn.Module, target: str):
    for atom in target.split("."):
        root = getattr(root, atom)
    return root


def _place(values: torch.Tensor, positions: torch.Tensor, channels: int) -> torch.Tensor:
    """``values`` at ``positions`` of a tensor of ``channels`` channels, zeros elsewhere."""
    out = values.new_zeros(values.shape[0], channels, *values.shape[2:])
    return out.index_copy_(1, positions, values)


def _sum_in_union(a: torch.Tensor, a_positions: torch.Tensor, b: torch.Tensor, b_positions: torch.Tensor,
                  channels: int) -> torch.Tensor:
    """a + b, each at its channels of the union of both (Fig. 3d): zero-padding without the zeros."""
    out = a.new_zeros(a.shape[0], channels, *a.shape[2:])
    return out.index_add_(1, a_positions, a).index_add_(1, b_positions, b)


def _positions(subset: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Where each channel of ``subset`` sits in the sorted channel list ``within``."""
    return torch.searchsorted(within, subset)


class _GroupedConv(nn.Module):
    """The kept part of a grouped conv: one plain conv per group, each on its own input channels."""

    def __init__(self, convs: list[nn.Conv2d], reads: list[torch.Tensor]):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        for index, positions in enumerate(reads):
            self.register_buffer(f"reads_{index}", positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x.index_select(1, getattr(self, f"reads_{i}"))) for i, conv in enumerate(self.convs)], 1)


class _Extraction:
    """Walks a modular graph once, in order, and writes the module's graph: each 4-D activation
    carries the sorted channels of the full network it still holds (``None``: a tensor whose
    channels are not pruned, such as the logits)."""

    def __init__(self, gm: fx.GraphModule, keep: list[torch.Tensor], example: torch.Tensor, label: str):
        from torch.fx.passes.shape_prop import ShapeProp

        self.gm, self.label = gm, label
        units = mask_units(gm)
        self.keep = {u.conv: torch.nonzero(k.to(torch.bool).cpu()).flatten() for u, k in zip(units, keep)}
        self.masked_bns = {u.bn for u in units}
        self.generators = {u.name for u in units}
        ShapeProp(gm).propagate(example)
        self.graph, self.modules, self.env, self.sets = fx.Graph(), {}, {}, {}
        self.constants = 0

    def refuse(self, node: fx.Node, what: str):
        raise GraphError(f"model {self.label}: cannot extract a module through {what} (node {node.name})")

    def channels(self, node) -> torch.Tensor | None:
        return self.sets.get(node) if isinstance(node, fx.Node) else None

    def full(self, node: fx.Node) -> int:
        return node.meta["tensor_meta"].shape[1]

    def constant(self, tensor: torch.Tensor) -> fx.Node:
        name = f"_extract_index_{self.constants}"
        self.constants += 1
        self.modules[name] = tensor
        return self.graph.get_attr(name)

    def module(self, node: fx.Node, module: nn.Module, *args) -> fx.Node:
        self.modules[node.target] = module
        return self.graph.call_module(node.target, args)

    def arg(self, value):
        return fx.node.map_arg(value, lambda n: self.env[n])

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            self.env[node] = self.step(node)
        device = next(self.gm.parameters()).device
        return fx.GraphModule({k: v.to(device) for k, v in self.modules.items()}, self.graph, class_name="Module")

    def step(self, node: fx.Node):
        gm, op = self.gm, node.op
        if op == "placeholder":
            if node.target == "return_masks":
                return None
            self.sets[node] = torch.arange(self.full(node))
            return self.graph.placeholder(node.target)
        if op == "output":
            (result,) = node.args
            return self.graph.output(self.env[result.args[0]])  # _model_output(logits, return_masks, masks)
        if op == "get_attr" and node.target in self.generators:
            return None  # a module has no generators
        if op == "get_attr":
            value = _attr(gm, node.target)
            self.modules[node.target] = copy.deepcopy(value) if isinstance(value, nn.Module) else value
            return self.graph.get_attr(node.target)
        if op == "call_method" and node.target == "masked" and node.args[0].target in self.generators:
            # The BN output of the kept channels, where the hard mask is 1 on every one.
            y, relu = node.args[1], node.args[3]
            self.sets[node] = self.sets[y]
            return self.graph.call_function(F.relu, (self.env[y],)) if relu else self.env[y]
        if op == "call_module":
            return self.call_module(node, gm.get_submodule(node.target))
        if op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0].op == "call_method" and node.args[0].target == "masked":
            if node.args[1] == 1:
                return None  # the mask: a module has none
            self.sets[node] = self.sets[node.args[0]]
            return self.env[node.args[0]]
        if op == "call_function" and node.target is _model_output:
            return None
        return self.call_function(node)

    def call_module(self, node: fx.Node, module: nn.Module):
        source = node.args[0] if node.args else None
        inputs = self.channels(source)
        x = self.env[source] if isinstance(source, fx.Node) else None
        if isinstance(module, nn.Conv2d):
            return self.conv(node, module, x, inputs)
        if isinstance(module, nn.BatchNorm2d) and node.target not in self.masked_bns:
            # A BN that no mask follows (after a concatenation, say) maps a removed channel's zeros to
            # its shift, a constant that the next layers read: such channels come back, as zeros before
            # the BN, and the BN keeps every channel.
            full = module.num_features
            if len(inputs) != full:
                x = self.graph.call_function(_place, (x, self.constant(inputs), full))
            self.sets[node] = torch.arange(full)
            return self.module(node, copy.deepcopy(module), x)
        if isinstance(module, nn.BatchNorm2d):
            bn = nn.BatchNorm2d(len(inputs), eps=module.eps, momentum=module.momentum, affine=module.affine,
                                track_running_stats=module.track_running_stats)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(module, name) is not None:
                        getattr(bn, name).copy_(getattr(module, name)[inputs])
                if module.num_batches_tracked is not None:
                    bn.num_batches_tracked.copy_(module.num_batches_tracked)
            self.sets[node] = inputs
            return self.module(node, bn, x)
        if isinstance(module, nn.Linear):
            features = self.features(source)
            if features is None:
                return self.module(node, copy.deepcopy(module), x)
            linear = nn.Linear(len(features), module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight[:, features])
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            return self.module(node, linear, x)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, source, module.start_dim, module.end_dim)
        parameterless = next(module.parameters(), None) is None and next(module.children(), None) is None
        if isinstance(module, _PER_CHANNEL_MODULES) or parameterless:
            # Parameter-free leaves (stochastic depth, dropout variants) act on whole samples or single
            # channels in every CNN seen; one that mixes channels would break the equivalence test.
            self.pass_through(node, source)
            self.modules[node.target] = copy.deepcopy(module)
            return self.graph.call_module(node.target, self.arg(node.args), self.arg(node.kwargs))
        self.refuse(node, f"a {type(module).__name__} module")

    def conv(self, node, module: nn.Conv2d, x, inputs):
        full_out = module.out_channels
        outputs = self.keep.get(node.target, torch.arange(full_out))
        groups = module.groups
        if groups == 1:
            weight = module.weight[outputs][:, inputs]
            computed, x_in = outputs, x
        elif groups == module.in_channels == full_out:
            # Depthwise: output channel j reads input channel j only. A kept kernel whose input channel
            # was removed reads zeros: its conv output is 0 and only its BN shift remains, so it is not
            # computed here but placed as a zero channel before its BN (kept, and counted as kept).
            computed = outputs[torch.isin(outputs, inputs)]
            x_in = x if torch.equal(computed, inputs) else \
                self.graph.call_function(torch.index_select, (x, 1, self.constant(_positions(computed, inputs))))
            weight = module.weight[computed]
        else:
            return self.grouped_conv(node, module, x, inputs, outputs)
        conv = nn.Conv2d(weight.shape[1] * (len(computed) if groups > 1 else 1), len(computed), module.kernel_size,
                         stride=module.stride, padding=module.padding, dilation=module.dilation,
                         groups=len(computed) if groups > 1 else 1, bias=module.bias is not None,
                         padding_mode=module.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if module.bias is not None:
                conv.bias.copy_(module.bias[computed])
        out = self.module(node, conv, x_in)
        if not torch.equal(computed, outputs):
            out = self.graph.call_function(_place, (out, self.constant(_positions(computed, outputs)), len(outputs)))
        self.sets[node] = outputs
        return out

    def grouped_conv(self, node, module: nn.Conv2d, x, inputs, outputs):
        """A grouped conv as one conv per group that keeps kernels and inputs, each reading its
        group's kept input channels; kept kernels of a group whose inputs are all gone read zeros and
        are placed as zero channels before their BN, as in the depthwise case."""
        groups, in_per, out_per = module.groups, module.in_channels // module.groups, module.out_channels // module.groups
        convs, reads, computed = [], [], []
        for group in range(groups):
            group_out = outputs[(outputs // out_per) == group]
            group_in = inputs[(inputs // in_per) == group]
            if len(group_out) == 0 or len(group_in) == 0:
                continue
            conv = nn.Conv2d(len(group_in), len(group_out), module.kernel_size, stride=module.stride,
                             padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
                             padding_mode=module.padding_mode)
            with torch.no_grad():
                conv.weight.copy_(module.weight[group_out][:, group_in - group * in_per])
                if module.bias is not None:
                    conv.bias.copy_(module.bias[group_out])
            convs.append(conv)
            reads.append(_positions(group_in, inputs))
            computed.append(group_out)
        computed = torch.cat(computed) if computed else outputs[:0]
        out = self.module(node, _GroupedConv(convs, reads), x)
        if not torch.equal(computed, outputs):
            out = self.graph.call_function(_place, (out, self.constant(_positions(computed, outputs)), len(outputs)))
        self.sets[node] = outputs
        return out

    def pass_through(self, node: fx.Node, source) -> None:
        """An op on each channel (or feature) alone: its output holds what its input holds."""
        for key, value in ((node, self.channels(source)), (("features", node), self.sets.get(("features", source)))):
            if value is not None:
                self.sets[key] = value

    def features(self, source) -> torch.Tensor | None:
        """The input features of a Linear that reads a flattened activation."""
        return self.sets.get(("features", source))

    def flatten(self, node, x, source, start_dim, end_dim):
        inputs = self.channels(source)
        out = self.graph.call_function(torch.flatten, (x, start_dim, end_dim))
        if inputs is not None:
            if start_dim != 1 or end_dim != -1:
                self.refuse(node, f"a flatten of dims {start_dim}..{end_dim}")
            shape = source.meta["tensor_meta"].shape
            spatial = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
            self.sets[("features", node)] = (inputs[:, None] * spatial + torch.arange(spatial)).flatten()
        return out

    def call_function(self, node: fx.Node):
        target, args = node.target, node.args
        # Pruned inputs: activations that hold some channels, or flattened ones that hold some features.
        tensors = [a for a in args if isinstance(a, fx.Node) and (a in self.sets or ("features", a) in self.sets)]
        if node.op == "call_function" and target is torch.flatten or (node.op == "call_method" and target == "flatten"):
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.env[args[0]], args[0], start, end)
        if node.op == "call_function" and target is torch.cat:
            parts = args[0]
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            pruned = [p for p in parts if self.channels(p) is not None]
            if not pruned:
                return self.copy(node)
            if dim != 1 or len(pruned) != len(parts):
                self.refuse(node, f"a concatenation along dim {dim}")
            offset, channels = 0, []
            for p in parts:
                channels.append(self.channels(p) + offset)
                offset += self.full(p)
            self.sets[node] = torch.cat(channels)
            return self.graph.call_function(torch.cat, ([self.env[p] for p in parts],), {"dim": 1})
        if not tensors:  # nothing pruned flows through here (shapes, the logits, constants)
            return self.copy(node)
        single = len(tensors) == 1 and args and args[0] is tensors[0]
        if single and ((node.op == "call_function" and target in _PER_CHANNEL_FUNCTIONS)
                       or (node.op == "call_method" and target in _PER_CHANNEL_METHODS)):
            self.pass_through(node, tensors[0])
            return self.copy(node)
        if any(self.channels(a) is None for a in tensors):
            self.refuse(node, f"{self.op_name(node)} on pruned features")
        if node.op == "call_function" and target in (operator.add, torch.add, operator.iadd) and len(tensors) == 2:
            a, b = args[0], args[1]
            sa, sb = self.channels(a), self.channels(b)
            if torch.equal(sa, sb):
                self.sets[node] = sa
                return self.graph.call_function(operator.add, (self.env[a], self.env[b]))
            union = torch.unique(torch.cat([sa, sb]))
            self.sets[node] = union
            return self.graph.call_function(_sum_in_union, (self.env[a], self.constant(_positions(sa, union)),
                                                            self.env[b], self.constant(_positions(sb, union)), len(union)))
        if node.op == "call_function" and target in (operator.mul, torch.mul, operator.imul):
            return self.product(node)
        self.refuse(node, f"{self.op_name(node)} on pruned channels")

    @staticmethod
    def op_name(node: fx.Node) -> str:
        return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))

    def product(self, node: fx.Node):
        """An elementwise product (squeeze-excitation's scale): a channel missing on either side is 0,
        so the product holds the channels both sides hold; a side with more is sliced to them."""
        a, b = node.args[0], node.args[1]
        sa, sb = self.channels(a), self.channels(b)
        if sa is None or sb is None:  # a scalar or an unpruned factor that broadcasts
            self.sets[node] = sa if sa is not None else sb
            return self.copy(node)
        both = sa[torch.isin(sa, sb)]
        sides = []
        for side, channels in ((a, sa), (b, sb)):
            value = self.env[side]
            if not torch.equal(channels, both):
                value = self.graph.call_function(torch.index_select, (value, 1, self.constant(_positions(both, channels))))
            sides.append(value)
        self.sets[node] = both
        return self.graph.call_function(operator.mul, tuple(sides))

    def copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, lambda n: self.env[n])


def extract_module(gm: fx.GraphModule, keep: list[torch.Tensor], example: torch.Tensor | None = None,
                   name: str | None = None) -> fx.GraphModule:
    """The module of ``keep`` (one 0/1 vector per mask unit, in mask order): the same network with the
    removed kernels physically gone and no generators, equal to ``gm`` under ``fixed_masks(gm, keep)``.
    ``example``: an input of the model's shape (channel counts are read from it; default 1x3x32x32)."""
    units = mask_units(gm)
    if len(keep) != len(units):
        raise ValueError(f"expected {len(units)} kernel masks (one per masked unit), got {len(keep)}")
    for unit, k in zip(units, keep):
        if not k.to(torch.bool).any():
            raise ValueError(f"module mask keeps no kernel of {unit.conv}")
    parameter = next(gm.parameters())
    example = torch.zeros(1, 3, 32, 32, device=parameter.device) if example is None else example
    was_training = gm.training
    module = _Extraction(gm.eval(), keep, example, name or type(gm).__name__).run()
    gm.train(was_training)
    return module.train(was_training)
