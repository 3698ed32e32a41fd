"""MwT, Modularizing while Training (the paper): a mask generator per conv -> BN unit, and cohesion /
coupling losses on the masks (Eq. 4-6).

Where its units go (section 3.2.1: conv -> BN -> x mask). Every ``Conv2d`` whose output goes only
into a ``BatchNorm2d`` gets a mask generator that reads the conv's input; its per-sample mask
multiplies the BN's output and is the unit's signal. The network's first conv (in execution order)
stays unmasked, as in the paper. What this means for the patterns of common CNNs:

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
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..graph import UnitSite, insert_units, is_max_pool, is_relu, modular_units, module_of, only_user
from ..losses import modular_objective
from ..masking import MaskGenerator
from . import Method, register_method

__all__ = ["MWT", "insert_mask_units", "init_mask_bias", "detach_generator_inputs"]


def mask_sites(gm: fx.GraphModule) -> list[UnitSite]:
    """A unit at every conv -> BN after the first conv, tapped after the BN (its ReLU folded in, or after
    BN -> ReLU -> max-pool)."""
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(module_of(gm, n), nn.Conv2d)]
    sites = []
    for conv in convs[1:]:
        bn = only_user(conv)
        if bn is None or not isinstance(module_of(gm, bn), nn.BatchNorm2d) or bn.args[0] is not conv:
            continue
        conv_module: nn.Conv2d = module_of(gm, conv)
        generator = MaskGenerator(conv_module.in_channels, conv_module.out_channels).to(conv_module.weight.device)
        after_bn = only_user(bn)
        fold = after_bn is not None and is_relu(gm, after_bn)
        tapped = after_bn if fold else bn
        if fold and only_user(tapped) is not None and is_max_pool(gm, only_user(tapped)):
            # BN -> ReLU -> max-pool: the mask goes after the pool (it commutes with both, being >= 0),
            # where it multiplies a quarter of the values; the ReLU stays where it is.
            fold, tapped = False, only_user(tapped)
        sites.append(UnitSite(conv, bn, tapped, fold, generator))
    return sites


def insert_mask_units(model: nn.Module, name: str | None = None,
                      leaf_modules: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """``model`` (its modules, shared, not copied) as a graph with a mask generator per masked unit.

    ``name`` names the model in errors. ``leaf_modules``: module types kept whole, as one node each,
    rather than traced through (a layer of your own that ``extract_module`` is given a rule for).
    Raises ``GraphError`` when the model does not trace or has no conv -> BN unit after its first conv."""
    return insert_units(model, mask_sites, "mask_generator", name, leaf_modules,
                        none_found="no conv -> BatchNorm unit after its first conv (MwT masks a BN's output by "
                        "kernels of the conv before it)")


def init_mask_bias(model: nn.Module, value: float) -> None:
    """Set every mask generator's last bias (1.0 at construction): lower values start training with
    fewer kernels on (tanh(0) = 0 puts each kernel on the edge), higher ones with all firmly on."""
    with torch.no_grad():
        for unit in modular_units(model):
            unit.state.b2.fill_(value)


def detach_generator_inputs(model: nn.Module, detach: bool = True) -> None:
    """With ``detach``, cohesion and coupling train only the mask generators: the backbone's
    convolutions get gradients from cross-entropy alone (through the masked activations), never
    through a generator's input. An option beyond the paper, which trains both together."""
    for unit in modular_units(model):
        unit.state.detach_input = detach


def _configure(model: nn.Module, train_config) -> None:
    init_mask_bias(model, train_config.mask_bias_init)
    detach_generator_inputs(model, train_config.detach_generator_input)


def _objective(logits, labels, signals, signal_labels, num_classes, s, ramp):
    return modular_objective(logits, labels, signals, signal_labels, s.alpha * ramp, s.beta * ramp,
                             sparsity=s.sparsity * ramp)


MWT = register_method(Method(
    name="mwt", summary="MwT: mask generators per conv -> BN unit, cohesion / coupling of the masks",
    insert_units=insert_mask_units, objective=_objective, loss_names=("cohesion_loss", "coupling_loss"),
    weight_keys=("alpha", "beta", "sparsity"),
    option_keys=("generator_lr_scale", "mask_bias_init", "detach_generator_input"), configure=_configure))
