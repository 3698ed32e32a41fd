"""``python -m mwt_ray.train``: train (standard or modular), modularize, save a checkpoint.

    python -m mwt_ray.train                                   # embedded default: VGG16/4 on digits
    python -m mwt_ray.train --config tune_configs/cifar10_vgg16.yaml --set train.epochs=20
    python -m mwt_ray.train --standard                        # plain training, no masks

Writes ``<output_dir>/<name>/``: ``checkpoint.pt`` (weights, config, per-class kernel counts,
module masks), ``metrics.json`` and ``history.csv``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import save_checkpoint
from .config import Config, ConfigError, load_config
from .files import atomic_write_text
from .data import ImageData, iterate_batches, load_dataset
from .models import conv_units, create_model
from .modularize import count_kernel_usage, modularity_report, module_masks
from .training import fit

__all__ = ["JobFailed", "main", "run", "train_single_process", "modularize_model", "resolve_device", "load_data", "seed_everything"]


class JobFailed(RuntimeError):
    """A job that started but could not finish (e.g. workers failed beyond the failure budget)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"train.device is {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: Config) -> ImageData:
    return load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, train_limit=cfg.data.train_limit)


def architecture(cfg: Config, data: ImageData) -> dict:
    return {"name": cfg.model.name, "width": cfg.model.width, "num_classes": data.num_classes,
            "modular": cfg.train.modular, "classes": list(data.classes)}


def modularize_model(model, data: ImageData, cfg: Config, device: torch.device):
    """Kernel usage over the (un-augmented) training set, module masks at tau, and their metrics."""
    batches = iterate_batches(data.train_images, data.train_labels, 512, mean=data.mean, std=data.std)
    usage = count_kernel_usage(model, batches, data.num_classes, device,
                               max_samples_per_class=cfg.modularize.cohesion_samples_per_class)
    masks = module_masks(usage, cfg.modularize.tau)
    first_convs = sum(u.num_kernels for u in conv_units(model) if u.mask_generator is None)
    return usage, masks, modularity_report(usage, masks, unmasked_kernels=first_convs)


def write_results(run_dir: Path, history: list[dict], summary: dict) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "history.csv", table.getvalue())
    atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2))


def finish_run(model, data: ImageData, cfg: Config, device: torch.device, history: list[dict],
               log=print) -> dict:
    """Modularize (modular runs), then write checkpoint and results; returns the summary."""
    summary = {"config": cfg.model_dump(), "final": history[-1], "epochs": len(history)}
    extra = {"config": cfg.model_dump(), "history": history}
    if cfg.train.modular:
        usage, masks, report = modularize_model(model, data, cfg, device)
        summary["modules"] = report
        extra |= {"kernel_usage": usage.state_dict(), "module_masks": masks, "tau": cfg.modularize.tau}
        if log:
            log(f"modules at tau={cfg.modularize.tau}: KRR {report['krr']:.3f}  cohesion {report.get('cohesion', float('nan')):.3f}  "
                f"coupling {report['coupling']:.3f}  per-layer KRR " + " ".join(f"{v:.2f}" for v in report["layer_krr"]))
    save_checkpoint(cfg.run_dir / "checkpoint.pt", model, architecture(cfg, data), **extra)
    write_results(cfg.run_dir, history, summary)
    if log:
        log(f"test accuracy {history[-1]['test_accuracy']:.2%}; wrote {cfg.run_dir}/checkpoint.pt, metrics.json, history.csv")
    return summary


def check_job(cfg: Config) -> ImageData:
    """Every check on the input that needs no training, before anything is written: the data
    (loaded, decoded and cached here, once), the device, the batch size, the output folder."""
    if not cfg.scaling.use_gpu or cfg.scaling.num_workers == 0:
        resolve_device(cfg.train.device)
    data = load_data(cfg)
    if cfg.train.batch_size > len(data.train_labels):
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than the training set "
                         f"({len(data.train_labels)} samples)")
    existing = next(p for p in [cfg.run_dir.absolute(), *cfg.run_dir.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {cfg.output_dir!r} cannot be written ({existing} is not a writable folder)")
    return data


def train_single_process(cfg: Config, log=print, on_epoch_end=None, data: ImageData | None = None) -> dict:
    device = resolve_device(cfg.train.device)
    data = (data if data is not None else check_job(cfg)).to(device)
    seed_everything(cfg.train.seed)
    model = create_model(cfg.model.name, data.num_classes, cfg.model.width, cfg.train.modular).to(device)
    if log:
        kind = "modular" if cfg.train.modular else "standard"
        log(f"{kind} training of {cfg.model.name} (width {cfg.model.width}) on {cfg.data.name}: "
            f"{len(data.train_labels)} train / {len(data.test_labels)} test images, {data.num_classes} classes, "
            f"{cfg.train.epochs} epochs, device {device}")
    history = fit(model, data, cfg.train.optim_settings(), device, on_epoch_end=on_epoch_end, log=log)
    return finish_run(model, data, cfg, device, history, log)


def run(cfg: Config, log=print) -> dict:
    """Train as the config says: on Ray Train workers (scaling.num_workers > 0) or in this
    process; tracked in MLflow unless tracking.enabled is false (see mwt_ray.tracking)."""
    data = check_job(cfg)
    if cfg.scaling.num_workers > 0:
        from .distributed import run_distributed

        return run_distributed(cfg, log)
    if not cfg.tracking.enabled:
        return train_single_process(cfg, log, data=data)
    from .tracking import open_run

    tracked = open_run(cfg, tags={"mwt.num_workers": "0"}, log=log)
    try:
        summary = train_single_process(cfg, log, on_epoch_end=tracked.epoch_callback(), data=data)
        tracked.log_results(cfg.run_dir, title=f"{cfg.name}: {cfg.model.name} on {cfg.data.name}")
    except BaseException as error:
        tracked.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    tracked.end("FINISHED")
    return summary


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see tune_configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--standard", action="store_true", help="standard training (no mask generators)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (0: this process, no Ray)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.standard:
        overrides.append("train.modular=false")
    if args.num_workers is not None:
        overrides.append(f"scaling.num_workers={args.num_workers}")
    try:
        cfg = load_config(args.config, overrides)
        run(cfg)
    except (ConfigError, ValueError) as error:  # bad input: nothing was trained
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (JobFailed, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
