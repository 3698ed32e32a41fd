"""Module extraction from a modular graph: the same network with the irrelevant kernels physically gone.

A module keeps, per masked unit, only the kernels of its module mask, with their BN entries, the
matching input channels of the layers that read them and the classifier's matching input features;
it has no mask generators (as in the authors' code). It computes what the modular model computes
with its generators replaced by those hard 0/1 masks (``graph.fixed_masks``), up to float summation
order. It works on the traced graph of any model ``graph.modularize`` accepts, built-in or not: the
kept channels of each activation are propagated through the graph, node by node (``_Extraction``):

- conv: kept kernels x kept input channels; BN: the kept channels' entries; Linear after a flatten:
  the kept features.
- Addition of two tensors with different kept channels (a residual): both are added into the union
  of their channels by index (the paper's Fig. 3d), never by keeping extra kernels.
- Concatenation: channel offsets. Elementwise product (squeeze-excitation's scale): the channels
  both sides hold.
- Where a removed channel's zeros turn into a constant, they come back as zeros: a BN that no mask
  follows (after a concatenation) keeps all its channels, and a kept depthwise or grouped kernel
  whose inputs are all gone is not computed but placed as a zero channel before its BN, so the BN
  shift is kept (and the kernel counts as kept).
- Anything else that touches pruned channels is refused, naming the op.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import GraphError, _model_output, mask_units, per_unit_masks

__all__ = ["extract_module"]


# Ops that act on each channel alone: the kept channels of their input are those of their output.
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Identity,
                        nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d)
_PER_CHANNEL_FUNCTIONS = {F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.dropout, torch.relu,
                          torch.sigmoid, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.hardtanh}
_PER_CHANNEL_METHODS = {"relu", "sigmoid", "contiguous", "clone"}
_RESHAPES = {"size", "view", "reshape", "transpose", "permute", "chunk", "split", "unflatten"}


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
        try:  # first plainly: ShapeProp prints a traceback of its own when a node fails
            with torch.no_grad():
                gm(example)
        except Exception as error:  # noqa: BLE001 - the model itself fails on this input
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GraphError(f"model {label} does not run on an input of shape {tuple(example.shape)} "
                             f"({message[:200]})") from None
        ShapeProp(gm).propagate(example)
        self.graph, self.modules, self.env, self.sets = fx.Graph(), {}, {}, {}
        self.constants = 0

    def refuse(self, node: fx.Node, what: str):
        why = ""
        if node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) in _RESHAPES:
            why = ": a reshape that moves channels (as a channel shuffle does), which kept channels cannot follow"
        raise GraphError(f"model {self.label}: cannot extract a module through {what} (node {node.name}){why}")

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
        groups, in_per, out_per = (
            module.groups,
            module.in_channels // module.groups,
            module.out_channels // module.groups,
        )
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
        elif self.features(source) is not None:  # already (samples, features): flattening keeps them
            self.sets[("features", node)] = self.features(source)
        return out

    def spatial_reduction(self, node: fx.Node):
        """``x.mean((2, 3))`` and the like (a global pool written as a reduction, as MNASNet does): each
        channel is reduced alone, so the kept channels stay, as channels or (without keepdim) as features."""
        source = node.args[0]
        inputs = self.channels(source)
        if inputs is None:
            if ("features", source) in self.sets:
                self.refuse(node, "a reduction of pruned features")
            return self.copy(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        rank = len(source.meta["tensor_meta"].shape)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims or any(d % rank < 2 for d in dims):
            self.refuse(node, f"a reduction over dims {dims or 'all'} of pruned channels")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        self.sets[node if keepdim or rank - len(dims) > 2 else ("features", node)] = inputs
        return self.copy(node)

    def call_function(self, node: fx.Node):
        target, args = node.target, node.args
        # Pruned inputs: activations that hold some channels, or flattened ones that hold some features.
        tensors = [a for a in args if isinstance(a, fx.Node) and (a in self.sets or ("features", a) in self.sets)]
        if node.op == "call_function" and target is torch.flatten or (node.op == "call_method" and target == "flatten"):
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.env[args[0]], args[0], start, end)
        if target in ("mean", "sum", "amax") or target in (torch.mean, torch.sum, torch.amax):
            return self.spatial_reduction(node)
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
            return self.graph.call_function(
                _sum_in_union,
                (
                    self.env[a],
                    self.constant(_positions(sa, union)),
                    self.env[b],
                    self.constant(_positions(sb, union)),
                    len(union),
                ),
            )
        if node.op == "call_function" and target in (operator.mul, torch.mul, operator.imul):
            return self.product(node)
        self.refuse(node, f"{self.op_name(node)} on pruned channels")

    @staticmethod
    def op_name(node: fx.Node) -> str:
        """``x.view()`` or ``torch.transpose()``."""
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"x.{name}()" if node.op == "call_method" else f"{name}()"

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
                value = self.graph.call_function(
                    torch.index_select, (value, 1, self.constant(_positions(both, channels)))
                )
            sides.append(value)
        self.sets[node] = both
        return self.graph.call_function(operator.mul, tuple(sides))

    def copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, lambda n: self.env[n])


def extract_module(gm: fx.GraphModule, keep, example: torch.Tensor | None = None,
                   name: str | None = None) -> fx.GraphModule:
    """The module of ``keep`` cut out of the modular graph ``gm``: the removed kernels physically gone,
    no generators, equal to ``gm`` under ``fixed_masks(gm, keep)`` (``keep``: a flat bool vector over
    all masked kernels, or one per mask unit; see ``per_unit_masks``). ``example``: an input of the
    model's shape, from which channel and feature counts are read (default: one 32x32 image with the
    first conv's channels). ``name`` names the model in errors."""
    layers = per_unit_masks(gm, keep)
    for index, layer in enumerate(layers):
        if not layer.any():
            raise ValueError(f"module mask keeps no kernel in masked layer {index} ({mask_units(gm)[index].conv})")
    parameter = next(gm.parameters())
    if example is None:
        first = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
        example = torch.zeros(1, first.in_channels, 32, 32, device=parameter.device)
    was_training = gm.training
    try:
        module = _Extraction(gm.eval(), layers, example, name or type(gm).__name__).run()
    finally:
        gm.train(was_training)
    return module.train(was_training)
