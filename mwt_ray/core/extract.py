"""Module extraction from a modular graph: the same network with the irrelevant kernels physically gone.

A module keeps, per unit, only the kernels (or a hidden Linear's neurons) of its module mask, with
their BN entries, the matching input channels of the layers that read them and the classifier's
matching input features; it has no unit state (MwT's mask generators). It computes what the modular
model computes with each unit's output multiplied by that hard 0/1 mask (MwT: its generator replaced
by the mask; MODA: the dropped channels and neurons zeroed), up to float summation order; it is
method-blind. It works on the traced graph of any model a method accepts, built-in or not: the kept channels of each
activation are propagated through the graph, node by node (``Extraction``), each op by its rule in
``EXTRACTION_RULES``:

- conv: kept kernels x kept input channels; BN: the kept channels' entries; Linear after a flatten:
  the kept features; a Linear a unit covers: also only its kept neurons (rows).
- Addition of two tensors with different kept channels (a residual): both are added into the union
  of their channels by index (the paper's Fig. 3d), never by keeping extra kernels.
- Concatenation: channel offsets. Elementwise product (squeeze-excitation's scale): the channels
  both sides hold.
- Where a removed channel's zeros turn into a constant, they come back as zeros: a BN that no mask
  follows (after a concatenation) keeps all its channels, and a kept depthwise or grouped kernel
  whose inputs are all gone is not computed but placed as a zero channel before its BN, so the BN
  shift is kept (and the kernel counts as kept).
- Parameter-free modules without a rule pass the kept channels through (they act on each channel
  or each sample alone in every CNN seen); anything else that touches pruned channels is refused,
  naming the op.

A layer of your own that the defaults refuse gets a rule through ``extract_module(..., rules={MyLayer:
rule})``: ``rule(extraction, node, module)`` writes the layer's kept part into the module's graph
with ``Extraction``'s methods and returns the new node (see ``Extraction`` and the rules below).
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import GraphError, is_modular_output, is_unit_op, modular_units, per_unit_masks
from .messages import first_line

__all__ = ["extract_module", "Extraction", "ExtractionRule", "EXTRACTION_RULES", "per_channel"]


# Ops that act on each channel alone: the kept channels of their input are those of their output.
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Identity,
                        nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d)
_PER_CHANNEL_FUNCTIONS = (F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.dropout, torch.relu,
                          torch.sigmoid, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                          F.hardtanh)
_PER_CHANNEL_METHODS = ("relu", "sigmoid", "contiguous", "clone")
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


class Extraction:
    """Walks a modular graph once, in order, and writes the module's graph: each 4-D activation
    carries the sorted channels of the full network it still holds (``None``: a tensor whose
    channels are not pruned, such as the logits), and each flattened one the features it holds.

    What a rule uses: ``channels`` / ``features`` (what an original node's output holds),
    ``keep_channels`` / ``keep_features`` (record it for the node the rule handles), ``value`` (the
    module graph's node for an original one), ``call_module`` (a module of the rule's own making, at
    the node's name), ``copy`` (the op unchanged), ``pass_through``, ``constant``, ``refuse`` and
    ``graph`` (the module's ``fx.Graph``, for other ops)."""

    def __init__(self, gm: fx.GraphModule, keep: list[torch.Tensor], example: torch.Tensor, label: str,
                 rules: Mapping[object, ExtractionRule]):
        from torch.fx.passes.shape_prop import ShapeProp

        self.gm, self.label, self.rules = gm, label, rules
        units = modular_units(gm)
        self.keep = {u.layer: torch.nonzero(k.to(torch.bool).cpu()).flatten() for u, k in zip(units, keep)}
        self.masked_bns = {u.bn for u in units}
        self.unit_states = {u.name for u in units}
        try:  # first plainly: ShapeProp prints a traceback of its own when a node fails
            with torch.no_grad():
                gm(example)
        except Exception as error:  # noqa: BLE001 - the model itself fails on this input
            message = first_line(error, 200)
            raise GraphError(f"model {label} does not run on an input of shape {tuple(example.shape)} "
                             f"({message})") from None
        ShapeProp(gm).propagate(example)
        self.graph, self.modules, self.env, self.sets = fx.Graph(), {}, {}, {}
        self.constants = 0

    # ------------------------------------------------------------------ what rules use

    def refuse(self, node: fx.Node, what: str):
        why = ""
        if node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) in _RESHAPES:
            why = ": a reshape that moves channels (as a channel shuffle does), which kept channels cannot follow"
        raise GraphError(f"model {self.label}: cannot extract a module through {what} (node {node.name}){why}")

    def channels(self, node) -> torch.Tensor | None:
        """The full network's channels (sorted indices) that ``node``'s output still holds; None where
        its channels are not pruned."""
        return self.sets.get(node) if isinstance(node, fx.Node) else None

    def features(self, node) -> torch.Tensor | None:
        """The features a flattened activation still holds (what a Linear reading it keeps), or None."""
        return self.sets.get(("features", node))

    def keep_channels(self, node: fx.Node, channels: torch.Tensor | None) -> None:
        if channels is not None:
            self.sets[node] = channels

    def keep_features(self, node: fx.Node, features: torch.Tensor | None) -> None:
        if features is not None:
            self.sets[("features", node)] = features

    def pruned_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The node's positional inputs that hold pruned channels or features."""
        return [a for a in node.args if isinstance(a, fx.Node) and (a in self.sets or ("features", a) in self.sets)]

    def full(self, node: fx.Node) -> int:
        """The channels of ``node``'s output in the full network."""
        return node.meta["tensor_meta"].shape[1]

    def value(self, node):
        """The module graph's node (or constant) for an original node or argument structure."""
        return fx.node.map_arg(node, lambda n: self.env[n])

    def constant(self, tensor: torch.Tensor) -> fx.Node:
        """A tensor the module keeps (an index, say), as a node of its graph."""
        name = f"_extract_index_{self.constants}"
        self.constants += 1
        self.modules[name] = tensor
        return self.graph.get_attr(name)

    def call_module(self, node: fx.Node, module: nn.Module, *args) -> fx.Node:
        """``module(*args)`` in the module's graph, the module stored under the original node's name."""
        self.modules[node.target] = module
        return self.graph.call_module(node.target, args)

    def copy(self, node: fx.Node) -> fx.Node:
        """The op unchanged, on the module graph's inputs."""
        return self.graph.node_copy(node, lambda n: self.env[n])

    def pass_through(self, node: fx.Node, source) -> None:
        """An op on each channel (or feature) alone: its output holds what its input holds."""
        self.keep_channels(node, self.channels(source))
        self.keep_features(node, self.features(source))

    # ------------------------------------------------------------------ the walk

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            self.env[node] = self.step(node)
        device = next(self.gm.parameters()).device
        return fx.GraphModule({k: v.to(device) for k, v in self.modules.items()}, self.graph, class_name="Module")

    def step(self, node: fx.Node):
        """The modular graph's own nodes (inputs, generators, mask ops, the output), then each op by its rule."""
        gm, op = self.gm, node.op
        if op == "placeholder":
            if node.target == "return_masks":
                return None
            self.sets[node] = torch.arange(self.full(node))
            return self.graph.placeholder(node.target)
        if op == "output":
            (result,) = node.args  # modular_output(logits, return_masks, masks): the module returns the logits
            return self.graph.output(self.env[result.args[0]])
        if op == "get_attr" and node.target in self.unit_states:
            return None  # a module has no unit state
        if op == "get_attr":
            value = _attr(gm, node.target)
            self.modules[node.target] = copy.deepcopy(value) if isinstance(value, nn.Module) else value
            return self.graph.get_attr(node.target)
        if is_unit_op(node):
            # The tapped tensor of the kept channels, where the hard mask is 1 on every one.
            y, relu = node.args[1], node.args[3]
            self.pass_through(node, y)
            return self.graph.call_function(F.relu, (self.env[y],)) if relu else self.env[y]
        if op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and is_unit_op(node.args[0]):
            if node.args[1] == 1:
                return None  # the signal: a module has none
            self.pass_through(node, node.args[0])
            return self.env[node.args[0]]
        if is_modular_output(node):
            return None
        if op == "call_module":
            module = gm.get_submodule(node.target)
            rule = next((self.rules[t] for t in type(module).__mro__ if t in self.rules), None)
            if rule is not None:
                return rule(self, node, module)
            if next(module.parameters(), None) is None and next(module.children(), None) is None:
                # Parameter-free leaves (stochastic depth, dropout variants) act on whole samples or single
                # channels in every CNN seen; one that mixes channels would break the equivalence test.
                return per_channel(self, node, module)
            self.refuse(node, f"a {type(module).__name__} module (extract_module's rules can add one for it)")
        rule = self.rules.get(node.target) if op in ("call_function", "call_method") else None
        if rule is not None:
            return rule(self, node, None)
        tensors = self.pruned_inputs(node)
        if not tensors:  # nothing pruned flows through here (shapes, the logits, constants)
            return self.copy(node)
        self.refuse(node, f"{_op_name(node)} on pruned {_what(self, tensors)}")


ExtractionRule = Callable[[Extraction, fx.Node, "nn.Module | None"], fx.Node]


def _op_name(node: fx.Node) -> str:
    """``x.view()`` or ``torch.transpose()``."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"x.{name}()" if node.op == "call_method" else f"{name}()"


def _what(ex: Extraction, tensors: list[fx.Node]) -> str:
    return "features" if any(ex.channels(a) is None for a in tensors) else "channels"


# ---------------------------------------------------------------------- the rules

def per_channel(ex: Extraction, node: fx.Node, module: nn.Module | None) -> fx.Node:
    """An op on each channel (or feature) of its first input alone, parameter-free: copied as it is,
    its output holding what its input holds. The rule for a parameter-free layer of your own."""
    if module is not None:
        ex.pass_through(node, node.args[0] if node.args else None)
        ex.modules[node.target] = copy.deepcopy(module)
        return ex.graph.call_module(node.target, ex.value(node.args), ex.value(node.kwargs))
    tensors = ex.pruned_inputs(node)
    if not tensors:
        return ex.copy(node)
    if len(tensors) == 1 and node.args[0] is tensors[0]:
        ex.pass_through(node, tensors[0])
        return ex.copy(node)
    ex.refuse(node, f"{_op_name(node)} on pruned {_what(ex, tensors)}")


def _conv(ex: Extraction, node: fx.Node, module: nn.Conv2d) -> fx.Node:
    source = node.args[0]
    inputs, x = ex.channels(source), ex.value(source)
    full_out = module.out_channels
    outputs = ex.keep.get(node.target, torch.arange(full_out))
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
            ex.graph.call_function(torch.index_select, (x, 1, ex.constant(_positions(computed, inputs))))
        weight = module.weight[computed]
    else:
        return _grouped_conv(ex, node, module, x, inputs, outputs)
    if len(computed) == 0:  # every kept kernel reads only removed channels: all of its output is zeros
        return _zero_output(ex, node, x, outputs)
    conv = nn.Conv2d(weight.shape[1] * (len(computed) if groups > 1 else 1), len(computed), module.kernel_size,
                     stride=module.stride, padding=module.padding, dilation=module.dilation,
                     groups=len(computed) if groups > 1 else 1, bias=module.bias is not None,
                     padding_mode=module.padding_mode)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if module.bias is not None:
            conv.bias.copy_(module.bias[computed])
    out = ex.call_module(node, conv, x_in)
    if not torch.equal(computed, outputs):
        out = ex.graph.call_function(_place, (out, ex.constant(_positions(computed, outputs)), len(outputs)))
    ex.keep_channels(node, outputs)
    return out


def _zero_output(ex: Extraction, node: fx.Node, x, outputs: torch.Tensor) -> fx.Node:
    """A conv none of whose kept kernels has a kept input channel: zeros of its output's shape, the
    kept channels held (their BN shift follows)."""
    _, _, height, width = node.meta["tensor_meta"].shape
    ex.keep_channels(node, outputs)
    return ex.graph.call_function(_zeros_for, (x, len(outputs), height, width))


def _zeros_for(x: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    return x.new_zeros(x.shape[0], channels, height, width)


def _grouped_conv(ex: Extraction, node: fx.Node, module: nn.Conv2d, x, inputs, outputs) -> fx.Node:
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
    if not computed:
        return _zero_output(ex, node, x, outputs)
    computed = torch.cat(computed)
    out = ex.call_module(node, _GroupedConv(convs, reads), x)
    if not torch.equal(computed, outputs):
        out = ex.graph.call_function(_place, (out, ex.constant(_positions(computed, outputs)), len(outputs)))
    ex.keep_channels(node, outputs)
    return out


def _batch_norm(ex: Extraction, node: fx.Node, module: nn.BatchNorm2d) -> fx.Node:
    source = node.args[0]
    inputs, x = ex.channels(source), ex.value(source)
    if node.target not in ex.masked_bns:
        # A BN that no mask follows (after a concatenation, say) maps a removed channel's zeros to
        # its shift, a constant that the next layers read: such channels come back, as zeros before
        # the BN, and the BN keeps every channel.
        full = module.num_features
        if len(inputs) != full:
            x = ex.graph.call_function(_place, (x, ex.constant(inputs), full))
        ex.keep_channels(node, torch.arange(full))
        return ex.call_module(node, copy.deepcopy(module), x)
    bn = nn.BatchNorm2d(len(inputs), eps=module.eps, momentum=module.momentum, affine=module.affine,
                        track_running_stats=module.track_running_stats)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, name) is not None:
                getattr(bn, name).copy_(getattr(module, name)[inputs])
        if module.num_batches_tracked is not None:
            bn.num_batches_tracked.copy_(module.num_batches_tracked)
    ex.keep_channels(node, inputs)
    return ex.call_module(node, bn, x)


def _linear(ex: Extraction, node: fx.Node, module: nn.Linear) -> fx.Node:
    """Kept input features x, where a unit covers the Linear, its kept neurons (else all of them)."""
    source = node.args[0]
    features = ex.features(source)
    outputs = ex.keep.get(node.target)
    if features is None and outputs is None:
        return ex.call_module(node, copy.deepcopy(module), ex.value(source))
    features = torch.arange(module.in_features) if features is None else features
    rows = torch.arange(module.out_features) if outputs is None else outputs
    linear = nn.Linear(len(features), len(rows), bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(module.weight[rows][:, features])
        if module.bias is not None:
            linear.bias.copy_(module.bias[rows])
    if outputs is not None:
        ex.keep_features(node, outputs)
    return ex.call_module(node, linear, ex.value(source))


def _flatten_into(ex: Extraction, node: fx.Node, source, start_dim: int, end_dim: int) -> fx.Node:
    inputs = ex.channels(source)
    out = ex.graph.call_function(torch.flatten, (ex.value(source), start_dim, end_dim))
    if inputs is not None:
        if start_dim != 1 or end_dim != -1:
            ex.refuse(node, f"a flatten of dims {start_dim}..{end_dim}")
        shape = source.meta["tensor_meta"].shape
        spatial = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
        ex.keep_features(node, (inputs[:, None] * spatial + torch.arange(spatial)).flatten())
    else:  # already (samples, features): flattening keeps them
        ex.keep_features(node, ex.features(source))
    return out


def _flatten_module(ex: Extraction, node: fx.Node, module: nn.Flatten) -> fx.Node:
    return _flatten_into(ex, node, node.args[0] if node.args else None, module.start_dim, module.end_dim)


def _flatten(ex: Extraction, node: fx.Node, module: None) -> fx.Node:
    args = node.args
    start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
    return _flatten_into(ex, node, args[0], start, end)


def _spatial_reduction(ex: Extraction, node: fx.Node, module: None) -> fx.Node:
    """``x.mean((2, 3))`` and the like (a global pool written as a reduction, as MNASNet does): each
    channel is reduced alone, so the kept channels stay, as channels or (without keepdim) as features."""
    source = node.args[0]
    inputs = ex.channels(source)
    if inputs is None:
        if ex.features(source) is not None:
            ex.refuse(node, "a reduction of pruned features")
        return ex.copy(node)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = len(source.meta["tensor_meta"].shape)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or any(d % rank < 2 for d in dims):
        ex.refuse(node, f"a reduction over dims {dims or 'all'} of pruned channels")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if keepdim or rank - len(dims) > 2:
        ex.keep_channels(node, inputs)
    else:
        ex.keep_features(node, inputs)
    return ex.copy(node)


def _concatenation(ex: Extraction, node: fx.Node, module: None) -> fx.Node:
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    pruned = [p for p in parts if ex.channels(p) is not None]
    if not pruned:
        return ex.copy(node)
    if dim != 1 or len(pruned) != len(parts):
        ex.refuse(node, f"a concatenation along dim {dim}")
    offset, channels = 0, []
    for p in parts:
        channels.append(ex.channels(p) + offset)
        offset += ex.full(p)
    ex.keep_channels(node, torch.cat(channels))
    return ex.graph.call_function(torch.cat, ([ex.value(p) for p in parts],), {"dim": 1})


def _addition(ex: Extraction, node: fx.Node, module: None) -> fx.Node:
    tensors = ex.pruned_inputs(node)
    if not tensors:
        return ex.copy(node)
    if any(ex.channels(a) is None for a in tensors) or len(tensors) != 2:
        ex.refuse(node, f"{_op_name(node)} on pruned {_what(ex, tensors)}")
    a, b = node.args[0], node.args[1]
    sa, sb = ex.channels(a), ex.channels(b)
    if torch.equal(sa, sb):
        ex.keep_channels(node, sa)
        return ex.graph.call_function(operator.add, (ex.value(a), ex.value(b)))
    union = torch.unique(torch.cat([sa, sb]))
    ex.keep_channels(node, union)
    return ex.graph.call_function(
        _sum_in_union,
        (ex.value(a), ex.constant(_positions(sa, union)), ex.value(b), ex.constant(_positions(sb, union)), len(union)),
    )


def _product(ex: Extraction, node: fx.Node, module: None) -> fx.Node:
    """An elementwise product (squeeze-excitation's scale): a channel missing on either side is 0,
    so the product holds the channels both sides hold; a side with more is sliced to them."""
    tensors = ex.pruned_inputs(node)
    if not tensors:
        return ex.copy(node)
    if any(ex.channels(t) is None for t in tensors):
        ex.refuse(node, f"{_op_name(node)} on pruned features")
    a, b = node.args[0], node.args[1]
    sa, sb = ex.channels(a), ex.channels(b)
    if sa is None or sb is None:  # a scalar or an unpruned factor that broadcasts over the channels
        pruned, factor = (a, b) if sa is not None else (b, a)
        shape = getattr(factor.meta.get("tensor_meta"), "shape", None) if isinstance(factor, fx.Node) else None
        channel_dim = None if shape is None else 1 - (len(pruned.meta["tensor_meta"].shape) - len(shape))
        if channel_dim is not None and 0 <= channel_dim < len(shape) and shape[channel_dim] != 1:
            ex.refuse(node, f"{_op_name(node)} of pruned channels by a factor per channel that no rule slices")
        ex.keep_channels(node, sa if sa is not None else sb)
        return ex.copy(node)
    both = sa[torch.isin(sa, sb)]
    sides = []
    for side, channels in ((a, sa), (b, sb)):
        value = ex.value(side)
        if not torch.equal(channels, both):
            value = ex.graph.call_function(torch.index_select, (value, 1, ex.constant(_positions(both, channels))))
        sides.append(value)
    ex.keep_channels(node, both)
    return ex.graph.call_function(operator.mul, tuple(sides))


# Op -> rule: module types (a subclass takes its nearest base's rule), functions of call_function
# nodes and method names of call_method nodes.
EXTRACTION_RULES: Mapping[object, ExtractionRule] = MappingProxyType({
    nn.Conv2d: _conv,
    nn.BatchNorm2d: _batch_norm,
    nn.Linear: _linear,
    nn.Flatten: _flatten_module,
    **dict.fromkeys(_PER_CHANNEL_MODULES, per_channel),
    **dict.fromkeys(_PER_CHANNEL_FUNCTIONS, per_channel),
    **dict.fromkeys(_PER_CHANNEL_METHODS, per_channel),
    torch.flatten: _flatten,
    "flatten": _flatten,
    **dict.fromkeys(("mean", "sum", "amax", torch.mean, torch.sum, torch.amax), _spatial_reduction),
    torch.cat: _concatenation,
    **dict.fromkeys((operator.add, torch.add, operator.iadd), _addition),
    **dict.fromkeys((operator.mul, torch.mul, operator.imul), _product),
})


def extract_module(gm: fx.GraphModule, keep, example: torch.Tensor | None = None, name: str | None = None,
                   rules: Mapping[object, ExtractionRule] | None = None) -> fx.GraphModule:
    """The module of ``keep`` cut out of the modular graph ``gm``: the removed kernels physically gone,
    no generators, equal to ``gm`` with each generator replaced by its hard 0/1 mask (``keep``: a flat
    bool vector over all masked kernels, or one per mask unit; see ``per_unit_masks``). ``example``:
    an input of the model's shape, from which channel and feature counts are read (default: one
    32x32 image with the first conv's channels). ``name`` names the model in errors. ``rules``: more
    op -> rule entries, over ``EXTRACTION_RULES`` (a layer of your own, keyed by its class)."""
    layers = per_unit_masks(gm, keep)
    for index, layer in enumerate(layers):
        if not layer.any():
            raise ValueError(f"module mask keeps no kernel in unit {index} ({modular_units(gm)[index].layer})")
    parameter = next(gm.parameters())
    if example is None:
        first = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
        example = torch.zeros(1, first.in_channels, 32, 32, device=parameter.device)
    was_training = gm.training
    try:
        extraction = Extraction(gm.eval(), layers, example, name or type(gm).__name__,
                                {**EXTRACTION_RULES, **(rules or {})})
        module = extraction.run()
    finally:
        gm.train(was_training)
    return module.train(was_training)
