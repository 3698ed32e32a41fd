"""What every job does before it trains: errors, device, seeding, data, and the checks on its input.

Two kinds of failure, told apart by the command-line exit status: ``SetupError`` (and every other
``ValueError``) is bad input found before anything was trained or written (exit 2);
``JobFailed`` is a job that started and could not finish (exit 1).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..core.data import ImageData, load_dataset
from ..core.messages import first_line

__all__ = ["SetupError", "JobFailed", "RESULT_FILES", "resolve_device", "seed_everything", "load_data",
           "architecture", "check_job", "check_model", "absolute_paths"]

# What a finished training job leaves in its run folder (``Config.run_dir``).
RESULT_FILES = ("checkpoint.pt", "metrics.json", "history.csv")


class SetupError(ValueError):
    """Bad input found before training starts (one line, exit status 2)."""


class JobFailed(RuntimeError):
    """A job that started but could not finish (e.g. workers failed beyond the failure budget)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"train.device is {name!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SetupError(f"train.device is {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: Config) -> ImageData:
    data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, train_limit=cfg.data.train_limit)
    # The held-out split depends on the data seed only, so every trial of a sweep holds out the same samples.
    return data.with_validation(cfg.data.val_fraction, seed=0) if cfg.data.val_fraction > 0 else data


def architecture(cfg: Config, data: ImageData) -> dict:
    """What a checkpoint records to rebuild its model (``core.checkpoint.build_model``)."""
    return {"name": cfg.model.name, "width": cfg.model.width, "num_classes": data.num_classes,
            "method": cfg.train.method, "classes": list(data.classes)}


def check_job(cfg: Config) -> ImageData:
    """The device and the data (loaded, decoded and cached here, once) against the batch size; part
    of ``jobs.preflight``, which first checks where the job writes."""
    if not cfg.scaling.use_gpu or cfg.scaling.num_workers == 0:
        resolve_device(cfg.train.device)
    data = load_data(cfg)
    if cfg.train.batch_size > len(data.train_labels):
        raise SetupError(f"train.batch_size {cfg.train.batch_size} is larger than the training set "
                         f"({len(data.train_labels)} samples)")
    check_model(cfg, data)
    return data


def check_logits(model: torch.nn.Module, name: str, example: torch.Tensor, num_classes: int) -> None:
    """The model's training-mode output is a (samples, classes) tensor: not, say, GoogLeNet's tuple of
    auxiliary heads."""
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as error:  # noqa: BLE001 - any failure here is the model's on this input
        message = first_line(error, 200)
        raise SetupError(f"model {name} does not run on the data's images of shape {tuple(example.shape[1:])} "
                         f"({message})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(example), num_classes):
        what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise SetupError(f"model {name} returns {what} in training mode, not one row of {num_classes} logits "
                         "per image (models with auxiliary outputs are not supported)")


def check_model(cfg: Config, data: ImageData) -> None:
    """The model runs on the data's images and gives logits; a modular one can also be made modular and
    have a module cut out of it: a model whose graph does not trace, has no conv -> BN unit, or holds a
    pattern the extraction does not handle (a channel shuffle, say) is refused here, before it is
    trained, not when its modules are wanted."""
    from ..core.extract import extract_module
    from ..core.graph import GraphError, modular_units
    from ..core.models import create_model

    try:
        model = create_model(cfg.model.name, data.num_classes, cfg.model.width, method=cfg.train.method)
        check_logits(model, cfg.model.name, torch.zeros(2, *data.train_images.shape[1:]), data.num_classes)
        if not cfg.train.modular:
            return
        generator = torch.Generator().manual_seed(0)
        keep = [torch.rand(u.num_kernels, generator=generator) < 0.5 for u in modular_units(model)]
        for layer in keep:
            layer[0] = True
        extract_module(model, keep, torch.zeros(1, *data.train_images.shape[1:]), name=cfg.model.name)
    except GraphError as error:
        raise SetupError(str(error)) from None


def absolute_paths(cfg: Config) -> Config:
    """A copy whose local paths are absolute: Ray workers run in another working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.scaling.storage_path and "://" not in cfg.scaling.storage_path:
        cfg.scaling.storage_path = str(Path(cfg.scaling.storage_path).expanduser().resolve())
    return cfg
