"""Checkpoints that load with ``torch.load(weights_only=True)``: tensors and plain Python only.

A checkpoint holds the model weights, the architecture (name, width, classes, modular), the
config it was trained with, and after modularizing the per-class kernel usage counts and module
masks. Training checkpoints add optimizer and scheduler state and the epoch. Files are written
to a temporary name and renamed, so a crash never leaves a half-written checkpoint. Files of an
older layout are migrated as they are read (``migrate_checkpoint``, keyed on the ``format`` field).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .files import atomic_torch_save, input_file_error
from .graph import modular_units
from .methods import method_names
from .models import check_model_name, create_model, is_factory_name, model_size_error
from .training import unwrap_ddp

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "migrate_checkpoint", "load_weights", "check_weights",
           "build_model", "check_architecture", "check_checkpoint"]


# The layout of the files ``save_checkpoint`` writes; ``migrate_checkpoint`` brings older ones to it.
# 1: a mask generator's weights as fc1.weight, fc2.weight, fc2.bias (some format-1 files already
#    hold them packed: the packing came before the number did);
# 2: each generator's weights and bias packed into one ``packed`` tensor;
# 3: the architecture names its training method (``method``) where it held ``modular`` true / false.
FORMAT = 3
_GENERATOR_LAYERS = ("fc1.weight", "fc2.weight", "fc2.bias")  # in the packed tensor's order


def save_checkpoint(path: str | Path, model: nn.Module, architecture: dict, **extra) -> None:
    """``architecture``: {"name", "width", "num_classes", "method", "classes"}; ``extra``: any
    weights-only-safe values (config dict, kernel_usage, module_masks, optimizer state, ...)."""
    state = unwrap_ddp(model).state_dict()
    atomic_torch_save({"format": FORMAT, "architecture": dict(architecture), "model_state": state, **extra}, path)


def migrate_checkpoint(state: dict) -> dict:
    """``state`` (a loaded checkpoint) brought to ``FORMAT`` in place, keyed on its ``format`` field
    (absent: 1); a file of a newer format than this code knows is refused. Returns ``state``."""
    if not isinstance(state, dict):
        return state
    found = state.get("format", 1)
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ValueError(f"checkpoint format {found!r} is not a format number")
    if found > FORMAT:
        raise ValueError(f"checkpoint format {found} is newer than this mwt_ray reads ({FORMAT}): upgrade mwt_ray")
    weights = state.get("model_state")
    if found < 2 and isinstance(weights, dict):
        # Generators are the submodules named *mask_generator (methods.mwt.insert_mask_units names them so); other
        # layers called fc1 / fc2 (squeeze-excitation's) are left alone.
        prefixes = {key[: -len(_GENERATOR_LAYERS[0])] for key in weights
                    if isinstance(key, str) and key.endswith("mask_generator." + _GENERATOR_LAYERS[0])}
        for prefix in sorted(prefixes):
            keys = [prefix + layer for layer in _GENERATOR_LAYERS]
            if prefix + "packed" not in weights and all(isinstance(weights.get(k), torch.Tensor) for k in keys):
                weights[prefix + "packed"] = torch.cat([weights.pop(k).flatten() for k in keys])
    arch = state.get("architecture")
    if found < 3 and isinstance(arch, dict) and "method" not in arch and isinstance(arch.get("modular"), bool):
        arch["method"] = "mwt" if arch.pop("modular") else "standard"
    state["format"] = FORMAT
    return state


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    reason = input_file_error(path)
    if reason == "is a folder":
        raise ValueError(
            f"checkpoint {str(path)!r} is a folder, not a checkpoint file (e.g. {str(path / 'checkpoint.pt')!r})"
        )
    if reason:
        raise ValueError(f"checkpoint {str(path)!r} {reason}" + ("" if reason.startswith(("does not", "cannot"))
                                                                 else ", not a checkpoint file"))
    try:
        with open(path, "rb") as stream:
            head = stream.read(4)
    except OSError as error:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {error.strerror or error}") from None
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (0x80 ...).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint file (it starts with {head!r}); "
                         "pass the checkpoint.pt of a training run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {reason[:300]}); "
                         "it may be truncated or not an mwt_ray checkpoint") from None
    if not isinstance(state, dict) or "architecture" not in state or "model_state" not in state:
        raise ValueError(f"{str(path)!r} is not an mwt_ray checkpoint (no architecture and model_state)")
    try:
        return migrate_checkpoint(state)
    except ValueError as error:
        raise ValueError(f"checkpoint {str(path)!r}: {error}") from None


def load_weights(model: nn.Module, weights: dict, source: str = "checkpoint") -> None:
    """``model.load_state_dict(weights)``, with a one-line summary of what does not fit."""
    check_weights(model, weights, source)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{source}: weights cannot be loaded ({' '.join(str(error).split())[:300]})") from None


def check_weights(model: nn.Module, weights: dict, source: str = "checkpoint") -> None:
    """Raise ValueError, in one line, unless ``weights`` has exactly ``model``'s keys and shapes
    (``model`` may live on the meta device: nothing is loaded)."""
    if not isinstance(weights, dict):
        raise ValueError(f"{source} holds no weights dictionary")
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    other_shape = [k for k in own if k in weights and hasattr(weights[k], "shape") and weights[k].shape != own[k].shape]
    if missing or unexpected or other_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        if other_shape:
            k = other_shape[0]
            parts.append(f"{len(other_shape)} of another shape (e.g. {k!r}: {list(weights[k].shape)} "
                         f"instead of {list(own[k].shape)})")
        raise ValueError(f"{source}: weights do not fit the model it describes: {', '.join(parts)}")


def check_architecture(state: dict, name: str, width: float, num_classes: int | None = None,
                       source: str = "checkpoint") -> None:
    arch = state["architecture"]
    if arch["name"] != name or abs(arch["width"] - width) > 1e-9 or (
            num_classes is not None and arch["num_classes"] != num_classes):
        raise ValueError(f"{source} holds {arch['name']} width {arch['width']} with {arch['num_classes']} classes, "
                         f"but the config asks for {name} width {width}"
                         + (f" with {num_classes} classes" if num_classes is not None else ""))


def build_model(state: dict) -> nn.Module:
    """The model a checkpoint describes, with its weights loaded."""
    migrate_checkpoint(state)
    arch = state["architecture"]
    model = create_model(arch["name"], arch["num_classes"], arch["width"], arch["method"])
    load_weights(model, state["model_state"], f"checkpoint of {arch['name']} width {arch['width']}")
    return model


def _fail(source: str, what: str) -> None:
    raise ValueError(f"{source}: {what}")


def _check_tensor(value, source: str, key: str, dtypes: tuple, shape: tuple | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(source, f"{key} is a {type(value).__name__}, not a tensor")
    if value.dtype not in dtypes:
        _fail(source, f"{key} has dtype {str(value.dtype).removeprefix('torch.')}, not "
                      f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)}")
    if shape is not None and tuple(value.shape) != shape:
        _fail(source, f"{key} has shape {list(value.shape)}, but the model it describes needs {list(shape)}")
    return value


def _non_finite(tree, where: str = ""):
    """The first place in ``tree`` (dicts, lists, tensors) where a floating tensor holds NaN or inf, or None."""
    stack = [(where, tree)]
    while stack:
        at, node = stack.pop()
        if isinstance(node, torch.Tensor):
            if (node.is_floating_point() or node.is_complex()) and node.numel() and not torch.isfinite(node).all():
                return at
        elif isinstance(node, dict):
            stack.extend((f"{at}.{k}" if at else str(k), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{at}[{i}]", v) for i, v in reversed(list(enumerate(node))))
    return None


_INTEGER = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_checkpoint(state: dict, source: str = "checkpoint") -> None:
    """Raise ValueError, in one line, unless ``state`` (a loaded checkpoint or training state) is whole:

    - its architecture is a known model of a sane width and class count, bounded before anything is
      built (a forged width of 1e6 would ask for terabytes);
    - its config, when it has one, names the same model;
    - its weights have exactly the keys and shapes of that model, built on the meta device;
    - every floating tensor in it is finite;
    - its modular state (``kernel_usage``, ``module_masks``) fits the model's masked kernels and classes.

    Every command that reads a checkpoint calls this before any other work."""
    if not isinstance(state, dict):
        _fail(source, "is not a dictionary of weights and settings")
    try:
        migrate_checkpoint(state)  # a state torch.load read directly (from object storage, say) is old too
    except ValueError as error:
        _fail(source, str(error))
    arch = state.get("architecture")
    if not isinstance(arch, dict):
        _fail(source, "has no architecture dictionary")
    name, width, classes, method = (arch.get(k) for k in ("name", "width", "num_classes", "method"))
    if not isinstance(name, str):
        _fail(source, f"architecture name {name!r} is not a model name")
    try:
        check_model_name(name)
    except ValueError as error:
        _fail(source, str(error))
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        _fail(source, f"architecture width {width!r} is not a positive number")
    if not isinstance(method, str) or method not in method_names():
        _fail(source, f"architecture method {method!r} is not one of {', '.join(method_names())}")
    reason = model_size_error(name, float(width), classes)
    if reason:
        _fail(source, f"architecture {reason}")
    names = arch.get("classes")
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != classes
                              or not all(isinstance(c, str) for c in names)):
        _fail(source, f"architecture classes {names!r:.80} are not {classes} class names")
    trained_as = (
        ((state.get("config") or {}).get("model") or {}).get("name") if isinstance(state.get("config"), dict) else None
    )
    if trained_as not in (None, name):
        _fail(source, f"records architecture {name} but was trained as {trained_as} (its config): "
                      "the checkpoint is not the run's")
    weights = state.get("model_state")
    try:
        with torch.device("meta"):  # every key and shape compared; nothing allocated
            model = create_model(name, classes, float(width), method)
    except ValueError:
        if not is_factory_name(name):
            raise
        # A user's constructor that computes with tensors fails on the meta device: built for real.
        model = create_model(name, classes, float(width), method)
    check_weights(model, weights, source)
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            _fail(source, f"weight {key!r} is a {type(value).__name__}, not a tensor")
    bad = _non_finite(state)
    if bad:
        _fail(source, f"{bad} holds NaN or infinite values")
    _check_modular_state(state, model, classes, source)


def _check_modular_state(state: dict, model: nn.Module, classes: int, source: str) -> None:
    has_usage, has_masks = "kernel_usage" in state, "module_masks" in state
    if not (has_usage or has_masks):
        return
    sizes = [u.num_kernels for u in modular_units(model)]
    if not sizes:
        _fail(source, "holds module masks but its model has no units (architecture method is standard)")
    kernels = sum(sizes)
    if has_usage:
        usage = state["kernel_usage"]
        if not isinstance(usage, dict):
            _fail(source, f"kernel_usage is a {type(usage).__name__}, not a dictionary of counts")
        counts = _check_tensor(usage.get("counts"), source, "kernel_usage.counts", _INTEGER, (classes, kernels))
        seen = _check_tensor(usage.get("class_sizes"), source, "kernel_usage.class_sizes", _INTEGER, (classes,))
        layers = _check_tensor(usage.get("layer_sizes"), source, "kernel_usage.layer_sizes", _INTEGER, (len(sizes),))
        if layers.tolist() != sizes:
            _fail(source, f"kernel_usage.layer_sizes {layers.tolist()} differ from the model's units {sizes}")
        # A class's count of samples using a kernel lies between 0 and the samples of the class seen.
        if (seen < 0).any() or (counts < 0).any() or (counts > seen[:, None]).any():
            _fail(source, "kernel_usage counts are negative or exceed their class's sample count")
    if has_masks:
        _check_tensor(state["module_masks"], source, "module_masks", (torch.bool,), (classes, kernels))
    tau = state.get("tau")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1):
        _fail(source, f"tau {tau!r} is not a number in (0, 1]")
