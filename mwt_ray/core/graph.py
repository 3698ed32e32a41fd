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
  fewer); BN -> ReLU -> max-pool gets the mask after the pool (it commutes with both, and touches a
  quarter of the values); other activations (ReLU6, hardswish, SiLU) follow the mask, and since each
  maps 0 to 0 a removed kernel stays 0.

Tracing: parameter-free modules without children (torchvision's StochasticDepth, dropout variants)
are kept as leaves: traced through, they would bake the training flag of the moment into the graph.
Python branches elsewhere are fixed at tracing (in training mode): a model whose training output is
not the logits (GoogLeNet's auxiliary heads) is refused before training (``jobs.setup.check_model``).
In-place activations that read a masked output are made out-of-place: the eager mask op saves its
output for the backward pass.

The result is a ``torch.fx.GraphModule`` whose ``forward(x, return_masks=False)`` returns the logits,
or ``(logits, masks)`` with the masks in execution order (what the objective and the metrics read).
Each unit is an ``apply_mask`` node and the last op a ``modular_output`` node (``is_mask_op`` and
``is_modular_output`` recognise them): the whole contract other code may rely on.
``core.extract.extract_module`` cuts a module out of it by propagating kept channels through the same
graph (its docstring says the rule for each pattern).

Why torch.fx and not a dependency graph such as torch-pruning's: that library prunes once and
statically, with groups of coupled channels that must keep the same indices; MwT needs per-sample
masks during training and, at an addition, the union of both sides' kept channels, which a
rewrite of the traced graph expresses directly.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .masking import MaskGenerator
from .messages import first_line

__all__ = ["GraphError", "insert_mask_units", "mask_units", "per_unit_masks", "MaskUnit", "init_mask_bias",
           "detach_generator_inputs", "unmasked_kernels", "apply_mask", "modular_output", "is_mask_op",
           "is_modular_output"]


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
        return self.generator.num_kernels


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type[nn.Module], ...] = ()):
        super().__init__()
        self.leaf_modules = tuple(leaf_modules)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, self.leaf_modules):
            return True
        childless = next(module.children(), None) is None
        stateless = (
            next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is None
        )
        return super().is_leaf_module(module, qualified_name) or (childless and stateless)


# The protocol between a modular graph and the code that reads it (``core.extract``, tests): two
# functions that ``insert_mask_units`` puts into the graph, recognised by identity (``is_mask_op``,
# ``is_modular_output``), which a pickled or deep-copied graph keeps, unlike node metadata.

def apply_mask(generator: nn.Module, y: torch.Tensor, conv_input: torch.Tensor,
               relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A masked unit's op in the graph: ``generator.masked(y, conv_input, relu)``, i.e.
    ``(act(y) * mask, mask)`` with the mask computed from the conv's input. Its node's arguments are
    ``(generator get_attr node, y, conv input, relu)``; ``getitem`` 0 of it is the masked output,
    1 the mask. Anything with a ``masked`` method of that contract can stand in for the generator."""
    return generator.masked(y, conv_input, relu)


def modular_output(output, return_masks: bool, masks: list[torch.Tensor]):
    """The last op of a modular graph: the network's own output (its first argument), with the masks
    in execution order when ``return_masks``."""
    return (output, list(masks)) if return_masks else output


def is_mask_op(node: fx.Node) -> bool:
    """Whether ``node`` is a masked unit's op (``apply_mask``)."""
    return node.op == "call_function" and node.target is apply_mask


def is_modular_output(node: fx.Node) -> bool:
    """Whether ``node`` is the op that returns the logits and, on request, the masks (``modular_output``)."""
    return node.op == "call_function" and node.target is modular_output


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    return (node.op == "call_function" and node.target in (F.relu, torch.relu)) or \
        (node.op == "call_method" and node.target == "relu")


def _is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.MaxPool2d
    return node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d)


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


def insert_mask_units(model: nn.Module, name: str | None = None,
               leaf_modules: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """``model`` (its modules, shared, not copied) as a graph with a mask generator per masked unit.

    ``name`` names the model in errors. ``leaf_modules``: module types kept whole, as one node each,
    rather than traced through (a layer of your own that ``extract_module`` is given a rule for).
    Raises ``GraphError`` when the model does not trace or has no conv -> BN unit after its first conv."""
    label = name or type(model).__name__
    try:
        graph = _Tracer(leaf_modules).trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure is the same refusal
        message = first_line(error, 200)
        raise GraphError(f"model {label} cannot be modularized: its forward does not trace with torch.fx "
                         f"({message})") from None
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
        if fold and len(replaced.users) == 1 and _is_max_pool(gm, next(iter(replaced.users))):
            # BN -> ReLU -> max-pool: the mask goes after the pool (it commutes with both, being >= 0),
            # where it multiplies a quarter of the values; the ReLU stays where it is.
            fold, replaced = False, next(iter(replaced.users))
        unit_name = _generator_name(gm, conv.target)
        gm.add_submodule(unit_name, generator)
        with gm.graph.inserting_after(replaced):
            generator_node = gm.graph.get_attr(unit_name)
        with gm.graph.inserting_after(generator_node):
            masked = gm.graph.call_function(apply_mask, (generator_node, bn if fold else replaced, conv.args[0], fold))
        units[masked] = {"name": unit_name, "conv": conv.target, "bn": bn.target, "relu": fold}
        with gm.graph.inserting_after(masked):
            output = gm.graph.call_function(operator.getitem, (masked, 0))
        with gm.graph.inserting_after(output):
            mask = gm.graph.call_function(operator.getitem, (masked, 1))
        replaced.replace_all_uses_with(output, delete_user_cb=lambda user, node=masked: user is not node)
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
        result = gm.graph.call_function(modular_output, (out.args[0], return_masks, masks))
    out.args = (result,)
    gm.graph.lint()
    gm.recompile()
    gm.meta["mask_units"] = [units[n.args[0]] for n in masks]  # meta: kept by deepcopy and pickle
    return gm


def mask_units(model: nn.Module) -> list[MaskUnit]:
    """The mask units of a graph-modularized model, in the order its masks are returned."""
    return [
        MaskUnit(generator=model.get_submodule(u["name"]), **u)
        for u in getattr(model, "meta", {}).get("mask_units", [])
    ]


def per_unit_masks(model: nn.Module, keep) -> list[torch.Tensor]:
    """``keep`` as one bool vector per mask unit, in mask order: ``keep`` is a flat vector over all masked
    kernels (a row of ``module_masks``, or the union of rows for a mixed module) or already one per unit."""
    units = mask_units(model)
    if not units:
        raise ValueError("the model has no masked layers: extract modules from a modular model")
    sizes = [u.num_kernels for u in units]
    if isinstance(keep, torch.Tensor):
        if tuple(keep.shape) != (sum(sizes),):
            raise ValueError(f"module mask has shape {tuple(keep.shape)}, expected ({sum(sizes)},)")
        keep = list(torch.split(keep, sizes))
    if len(keep) != len(units):
        raise ValueError(f"expected {len(units)} kernel masks (one per masked unit), got {len(keep)}")
    for index, (unit, layer) in enumerate(zip(units, keep)):
        if tuple(layer.shape) != (unit.num_kernels,):
            raise ValueError(f"kernel mask of shape {tuple(layer.shape)} for masked layer {index} ({unit.conv}) "
                             f"with {unit.num_kernels} kernels")
    return [layer.to(torch.bool).cpu() for layer in keep]


def init_mask_bias(model: nn.Module, value: float) -> None:
    """Set every mask generator's last bias (1.0 at construction): lower values start training with
    fewer kernels on (tanh(0) = 0 puts each kernel on the edge), higher ones with all firmly on."""
    with torch.no_grad():
        for unit in mask_units(model):
            unit.generator.b2.fill_(value)


def detach_generator_inputs(model: nn.Module, detach: bool = True) -> None:
    """With ``detach``, cohesion and coupling train only the mask generators: the backbone's
    convolutions get gradients from cross-entropy alone (through the masked activations), never
    through a generator's input. An option beyond the paper, which trains both together."""
    for unit in mask_units(model):
        unit.generator.detach_input = detach


def unmasked_kernels(model: nn.Module) -> int:
    """Kernels of the convs no mask covers (the first conv; squeeze-excitation and other convs no BN
    follows): every module keeps them all, which the paper's Table 2 KRR totals count."""
    masked = {u.conv for u in mask_units(model)}
    return sum(m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in masked)
