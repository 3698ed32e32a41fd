"""Checkpoints that load with ``torch.load(weights_only=True)``: tensors and plain Python only.

A checkpoint holds the model weights, the architecture (name, width, classes, modular), the
config it was trained with, and after modularizing the per-class kernel usage counts and module
masks. Training checkpoints add optimizer and scheduler state and the epoch. Files are written
to a temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .files import atomic_torch_save
from .models import create_model
from .training import unwrap_ddp

__all__ = ["save_checkpoint", "load_checkpoint", "load_weights", "check_weights", "build_model", "check_architecture"]


def save_checkpoint(path: str | Path, model: nn.Module, architecture: dict, **extra) -> None:
    """``architecture``: {"name", "width", "num_classes", "modular", "classes"}; ``extra``: any
    weights-only-safe values (config dict, kernel_usage, module_masks, optimizer state, ...)."""
    state = unwrap_ddp(model).state_dict()
    atomic_torch_save({"format": 1, "architecture": dict(architecture), "model_state": state, **extra}, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file (e.g. {str(path / 'checkpoint.pt')!r})")
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
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
    return state


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
    arch = state["architecture"]
    model = create_model(arch["name"], arch["num_classes"], arch["width"], arch["modular"])
    load_weights(model, state["model_state"], f"checkpoint of {arch['name']} width {arch['width']}")
    return model
