"""Any CNN made modular from its traced graph (torch.fx): a method's units found, not written per model.

A modular method (``core.methods``) says where its units sit in a traced graph (``UnitSite``: the
layer whose output channels or neurons the unit covers, its BN, the node whose output the unit
takes over) and what each unit computes (a module with a ``masked`` method). ``insert_units``
rewrites the graph accordingly; everything downstream (usage counting, modules at tau, extraction,
reuse, export) reads only the protocol below, never the method:

- each unit is an ``apply_unit`` node: ``(out, signal)`` from the tapped tensor, where ``signal`` is
  a (B, K) tensor >= 0 per unit and ``> 0`` means that channel or neuron is on for that sample
  (MwT: its kernel mask; MODA: the pooled positive activation);
- the last op is a ``modular_output`` node, so ``forward(x, return_masks=False)`` returns the logits,
  or ``(logits, signals)`` with the signals in execution order (what objectives and metrics read).

Tracing: parameter-free modules without children (torchvision's StochasticDepth, dropout variants)
are kept as leaves: traced through, they would bake the training flag of the moment into the graph.
Python branches elsewhere are fixed at tracing (in training mode): a model whose training output is
not the logits (GoogLeNet's auxiliary heads) is refused before training (``jobs.setup.check_model``).
In-place ops that read a unit's output are made out-of-place: the unit op may save it for backward.

``core.extract.extract_module`` cuts a module out of such a graph by propagating kept channels
through it (its docstring says the rule for each pattern).

Why torch.fx and not a dependency graph such as torch-pruning's: that library prunes once and
statically, with groups of coupled channels that must keep the same indices; MwT needs per-sample
masks during training and, at an addition, the union of both sides' kept channels, which a
rewrite of the traced graph expresses directly.
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .messages import first_line

__all__ = ["GraphError", "trace", "insert_units", "UnitSite", "Unit", "modular_units", "per_unit_masks",
           "uncovered_kernels", "conv_columns", "apply_unit", "modular_output", "is_unit_op", "is_modular_output",
           "module_of",
           "is_relu", "is_max_pool", "is_activation", "only_user"]


class GraphError(ValueError):
    """A model that cannot be made modular: its graph does not trace, or it holds no unit of the method."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of a modular graph: its state module (``name`` in the model: MwT's mask generator, MODA's
    activation signal), the layer whose output channels (a conv) or neurons (a Linear) it covers, that
    layer's BN (None for a Linear) and whether the unit op applies a ReLU it took over (qualified names)."""
    name: str
    state: nn.Module
    layer: str
    bn: str | None
    relu: bool

    @property
    def num_kernels(self) -> int:
        return self.state.num_kernels


@dataclasses.dataclass
class UnitSite:
    """Where a method puts a unit (what its site finder returns): ``layer`` (the conv or Linear node),
    ``bn`` (its BN node or None), ``tapped`` (the node whose output the unit op takes over), ``fold_relu``
    (``tapped`` is a ReLU that the unit op applies itself, on the ReLU's input) and ``state`` (the module
    whose ``masked`` the unit op calls)."""
    layer: fx.Node
    bn: fx.Node | None
    tapped: fx.Node
    fold_relu: bool
    state: nn.Module


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


# The protocol between a modular graph and the code that reads it (``core.extract``, ``core.kernel_usage``,
# tests): two functions that ``insert_units`` puts into the graph, recognised by identity (``is_unit_op``,
# ``is_modular_output``), which a pickled or deep-copied graph keeps, unlike node metadata.

def apply_unit(state: nn.Module, y: torch.Tensor, layer_input: torch.Tensor,
               relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit's op in the graph: ``state.masked(y, layer_input, relu)``, i.e. ``(out, signal)`` where ``out``
    replaces the tapped tensor ``y`` (with ``relu``: ``y`` is the input of a ReLU the op took over) and
    ``signal`` is (B, K), >= 0, > 0 where a channel is on. Its node's arguments are ``(state get_attr
    node, y, the layer's input, relu)``; ``getitem`` 0 of it is ``out``, 1 the signal. Anything with a
    ``masked`` method of that contract can stand in for the state (a test's hard 0/1 mask does)."""
    return state.masked(y, layer_input, relu)


def modular_output(output, return_masks: bool, signals: list[torch.Tensor]):
    """The last op of a modular graph: the network's own output (its first argument), with the units'
    signals in execution order when ``return_masks``."""
    return (output, list(signals)) if return_masks else output


def is_unit_op(node: fx.Node) -> bool:
    """Whether ``node`` is a unit's op (``apply_unit``)."""
    return node.op == "call_function" and node.target is apply_unit


def is_modular_output(node: fx.Node) -> bool:
    """Whether ``node`` is the op that returns the logits and, on request, the signals (``modular_output``)."""
    return node.op == "call_function" and node.target is modular_output


# ---------------------------------------------------------------------- what site finders use

def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for other nodes)."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def only_user(node: fx.Node) -> fx.Node | None:
    """The node's one user, or None where it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(module_of(gm, node)) is nn.ReLU
    return (node.op == "call_function" and node.target in (F.relu, torch.relu)) or \
        (node.op == "call_method" and node.target == "relu")


def is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(module_of(gm, node)) is nn.MaxPool2d
    return node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d)


# Elementwise activations that map 0 to 0 (a removed channel stays 0 through them).
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish)
_ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.leaky_relu, F.elu, F.mish,
                         F.hardtanh)


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An elementwise activation with ``act(0) = 0`` (ReLU, ReLU6, SiLU, hardswish, GELU, ...)."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _make_out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """A consumer of a unit's output must not overwrite it (the unit op may have saved it for backward)."""
    if node.op == "call_module" and getattr(module_of(gm, node), "inplace", False):
        module_of(gm, node).inplace = False  # shared modules (a block's one ReLU) lose nothing by it
    elif node.op == "call_function" and node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        node.target = node.target[:-1]  # x.relu_() -> x.relu(): torch's in-place methods end in one _
    elif node.op == "call_function" and node.target in (operator.iadd, operator.imul):
        node.target = operator.add if node.target is operator.iadd else operator.mul


def _state_name(gm: fx.GraphModule, layer: str, kind: str) -> str:
    """``<parent>.<kind>`` where the parent holds one layer of the unit's type (a conv -> BN unit such as the
    built-ins' ConvUnit or torchvision's Conv2dNormActivation), else ``<parent>.<layer>_<kind>``."""
    parent, _, attr = layer.rpartition(".")
    siblings = gm.get_submodule(parent).children() if parent else gm.children()
    kind_type = nn.Conv2d if isinstance(gm.get_submodule(layer), nn.Conv2d) else nn.Linear
    same_type = sum(isinstance(m, kind_type) for m in siblings)
    name = kind if same_type == 1 else f"{attr}_{kind}"
    return f"{parent}.{name}" if parent else name


def trace(model: nn.Module, name: str | None = None,
          leaf_modules: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """``model`` (its modules, shared, not copied) as a ``GraphModule``; ``GraphError`` naming the model
    (``name``) when its forward does not trace. ``leaf_modules``: module types kept whole, one node each."""
    label = name or type(model).__name__
    try:
        graph = _Tracer(leaf_modules).trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure is the same refusal
        message = first_line(error, 200)
        raise GraphError(f"model {label} cannot be modularized: its forward does not trace with torch.fx "
                         f"({message})") from None
    return fx.GraphModule(model, graph, class_name=f"Modular{type(model).__name__}")


SiteFinder = Callable[[fx.GraphModule], list[UnitSite]]


def insert_units(model: nn.Module, find_sites: SiteFinder, state_kind: str, name: str | None = None,
                 leaf_modules: tuple[type[nn.Module], ...] = (), none_found: str = "") -> fx.GraphModule:
    """``model`` traced, with a unit op at every site ``find_sites`` returns, its state module added at
    ``<parent>.<state_kind>``. Raises ``GraphError`` when the model does not trace or has no site
    (``none_found`` says what the method looks for)."""
    label = name or type(model).__name__
    gm = trace(model, name, leaf_modules)
    sites = find_sites(gm)
    if not sites:
        raise GraphError(f"model {label} cannot be modularized: {none_found}")
    signals, units = [], {}
    for site in sites:
        unit_name = _state_name(gm, site.layer.target, state_kind)
        gm.add_submodule(unit_name, site.state)
        tapped, y = site.tapped, site.tapped.args[0] if site.fold_relu else site.tapped
        with gm.graph.inserting_after(tapped):
            state_node = gm.graph.get_attr(unit_name)
        with gm.graph.inserting_after(state_node):
            op = gm.graph.call_function(apply_unit, (state_node, y, site.layer.args[0], site.fold_relu))
        units[op] = {"name": unit_name, "layer": site.layer.target, "bn": site.bn.target if site.bn else None,
                     "relu": site.fold_relu}
        with gm.graph.inserting_after(op):
            output = gm.graph.call_function(operator.getitem, (op, 0))
        with gm.graph.inserting_after(output):
            signal = gm.graph.call_function(operator.getitem, (op, 1))
        tapped.replace_all_uses_with(output, delete_user_cb=lambda user, node=op: user is not node)
        if site.fold_relu:
            gm.graph.erase_node(tapped)
        for user in list(output.users):
            _make_out_of_place(gm, user)
        signals.append(signal)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        return_masks = gm.graph.placeholder("return_masks", default_value=False)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    # Signals in execution order: the order their nodes run (a topological order of the graph).
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    signals.sort(key=order.__getitem__)
    with gm.graph.inserting_before(out):
        result = gm.graph.call_function(modular_output, (out.args[0], return_masks, signals))
    out.args = (result,)
    gm.graph.lint()
    gm.recompile()
    gm.meta["units"] = [units[n.args[0]] for n in signals]  # meta: kept by deepcopy and pickle
    return gm


def modular_units(model: nn.Module) -> list[Unit]:
    """The units of a modular graph, in the order its signals are returned."""
    return [Unit(state=model.get_submodule(u["name"]), **u) for u in getattr(model, "meta", {}).get("units", [])]


def per_unit_masks(model: nn.Module, keep) -> list[torch.Tensor]:
    """``keep`` as one bool vector per unit, in signal order: ``keep`` is a flat vector over all units'
    channels (a row of ``module_masks``, or the union of rows for a mixed module) or already one per unit."""
    units = modular_units(model)
    if not units:
        raise ValueError("the model has no units: extract modules from a modular model")
    sizes = [u.num_kernels for u in units]
    if isinstance(keep, torch.Tensor):
        if tuple(keep.shape) != (sum(sizes),):
            raise ValueError(f"module mask has shape {tuple(keep.shape)}, expected ({sum(sizes)},)")
        keep = list(torch.split(keep, sizes))
    if len(keep) != len(units):
        raise ValueError(f"expected {len(units)} kernel masks (one per unit), got {len(keep)}")
    for index, (unit, layer) in enumerate(zip(units, keep)):
        if tuple(layer.shape) != (unit.num_kernels,):
            raise ValueError(f"kernel mask of shape {tuple(layer.shape)} for unit {index} ({unit.layer}) "
                             f"with {unit.num_kernels} kernels")
    return [layer.to(torch.bool).cpu() for layer in keep]


def conv_columns(model: nn.Module) -> torch.Tensor:
    """(K,) bool over all units' channels: True where the unit covers a conv (not a Linear's neurons),
    the columns the kernel retention rate counts."""
    return torch.cat([torch.full((u.num_kernels,), u.bn is not None) for u in modular_units(model)])


def uncovered_kernels(model: nn.Module) -> int:
    """Kernels of the convs no unit covers (MwT's first conv; squeeze-excitation and other convs no BN
    follows): every module keeps them all, which the paper's Table 2 KRR totals count."""
    covered = {u.layer for u in modular_units(model)}
    return sum(m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in covered)
