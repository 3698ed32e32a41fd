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

__all__ = ["save_checkpoint", "load_checkpoint", "build_model", "check_architecture"]


def save_checkpoint(path: str | Path, model: nn.Module, architecture: dict, **extra) -> None:
    """``architecture``: {"name", "width", "num_classes", "modular", "classes"}; ``extra``: any
    weights-only-safe values (config dict, kernel_usage, module_masks, optimizer state, ...)."""
    state = unwrap_ddp(model).state_dict()
    atomic_torch_save({"format": 1, "architecture": dict(architecture), "model_state": state, **extra}, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {error}") from None
    if not isinstance(state, dict) or "architecture" not in state or "model_state" not in state:
        raise ValueError(f"{str(path)!r} is not an mwt_ray checkpoint")
    return state


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
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint weights do not fit {arch['name']} width {arch['width']}: {error}") from None
    return model
