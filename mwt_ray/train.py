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
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_save, save_checkpoint
from .config import Config, ConfigError, load_config
from .data import ImageData, iterate_batches, load_dataset
from .models import create_model
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
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: Config) -> ImageData:
    return load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.image_size, cfg.data.train_limit)


def architecture(cfg: Config, data: ImageData) -> dict:
    return {"name": cfg.model.name, "width": cfg.model.width, "num_classes": data.num_classes,
            "modular": cfg.train.modular, "classes": list(data.classes)}


def modularize_model(model, data: ImageData, cfg: Config, device: torch.device):
    """Kernel usage over the (un-augmented) training set, module masks at tau, and their metrics."""
    batches = iterate_batches(data.train_images, data.train_labels, 512, mean=data.mean, std=data.std)
    usage = count_kernel_usage(model, batches, data.num_classes, device,
                               max_samples_per_class=cfg.modularize.cohesion_samples_per_class)
    masks = module_masks(usage, cfg.modularize.tau)
    return usage, masks, modularity_report(usage, masks)


def write_results(run_dir: Path, history: list[dict], summary: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = run_dir / ".history.csv.tmp"
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    temporary.replace(run_dir / "history.csv")
    temporary = run_dir / ".metrics.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2))
    temporary.replace(run_dir / "metrics.json")


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


def train_single_process(cfg: Config, log=print, on_epoch_end=None) -> dict:
    device = resolve_device(cfg.train.device)
    data = load_data(cfg).to(device)
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
    if cfg.scaling.num_workers > 0:
        from .distributed import run_distributed

        return run_distributed(cfg, log)
    if not cfg.tracking.enabled:
        return train_single_process(cfg, log)
    from .tracking import open_run

    tracked = open_run(cfg, tags={"mwt.num_workers": "0"}, log=log)
    try:
        summary = train_single_process(cfg, log, on_epoch_end=tracked.epoch_callback())
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
