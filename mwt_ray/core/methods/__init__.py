"""Training methods: what a method adds to cross-entropy, and which channels are on for a sample.

A method decides two things only (``Method``):

- where its units sit in a traced graph and what each computes (``insert_units``): a unit covers the
  output channels of a conv (or the neurons of a hidden Linear) and returns a per-sample signal,
  ``> 0`` where a channel is on (MwT: its kernel mask; MODA: the channel's pooled activation);
- what its objective adds to cross-entropy, from those signals (``objective``).

Everything after that is shared and method-blind: usage counts (``kernel_usage``), modules at tau,
KRR, extraction, reuse, export, the sweep, Ray Train and MLflow read the units and their signals,
never the method. ``standard`` has no units: the plain network and cross-entropy.

A new method is one file in this package that calls ``register_method`` (every module here is
imported below) and the ``train`` keys of its weights in ``config.TrainConfig`` (named in
``weight_keys``, so a weight set for another method is refused).
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["Method", "register_method", "get_method", "method_names", "modular_method_names", "keys_of_other_methods"]

# (logits, labels, signals (LayerMasks), signal labels, num_classes, settings, ramp) -> (loss, parts)
Objective = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Method:
    """A training method. ``insert_units(model, name, leaf_modules)`` turns the plain network into its
    modular graph (None: the plain network is trained as it is). ``objective(logits, labels, signals,
    signal_labels, num_classes, settings, ramp)`` returns the loss and its detached parts: ``ce_loss``
    and ``loss_names``; ``settings`` is ``training.OptimSettings``, whose weights (``weight_keys``) it
    reads and multiplies by ``ramp`` (the warm-up factor). ``option_keys``: other ``train`` keys only
    this method reads, applied to a new model by ``configure``."""
    name: str
    summary: str
    insert_units: Callable[..., fx.GraphModule] | None
    objective: Objective | None
    loss_names: tuple[str, ...] = ()
    weight_keys: tuple[str, ...] = ()
    option_keys: tuple[str, ...] = ()
    configure: Callable[[nn.Module, object], None] | None = None  # (modular model, train config): option keys

    def prepare(self, model: nn.Module, train_config) -> nn.Module:
        """Apply the method's ``option_keys`` (read from ``train_config``) to a freshly built model."""
        if self.configure is not None:
            self.configure(model, train_config)
        return model

    @property
    def modular(self) -> bool:
        return self.insert_units is not None

    def modularize(self, model: nn.Module, name: str | None = None,
                   leaf_modules: tuple[type[nn.Module], ...] = ()) -> nn.Module:
        """The network as this method trains it: its modular graph, or the plain network for ``standard``."""
        return self.insert_units(model, name, leaf_modules) if self.modular else model


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if not method.name.isidentifier() or method.name in _METHODS:
        raise ValueError(f"method name {method.name!r} is not an identifier or is taken")
    _METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    return list(_METHODS)


def modular_method_names() -> list[str]:
    return [name for name, method in _METHODS.items() if method.modular]


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def keys_of_other_methods(name: str) -> dict[str, str]:
    """``{train key: its method}`` for the keys that methods other than ``name`` read and ``name`` does not."""
    own = set(get_method(name).weight_keys + get_method(name).option_keys)
    return {key: other.name for other in _METHODS.values() if other.name != name
            for key in other.weight_keys + other.option_keys if key not in own}


# Each module registers itself on import: standard (the reference) and mwt (the default) first, then by name.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: (info.name != "standard", info.name != "mwt",
                                                                      info.name)):
    importlib.import_module(f"{__name__}.{_info.name}")
