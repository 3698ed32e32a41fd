"""``python -m mwt_ray.train``: train (standard or modular), modularize, save a checkpoint.

    python -m mwt_ray.train                                   # embedded default: VGG16/4 on digits
    python -m mwt_ray.train --config tune_configs/cifar10_vgg16.yaml --set train.epochs=20
    python -m mwt_ray.train --standard                        # plain training, no masks
    python -m mwt_ray.train --num-workers 2                   # data parallel on Ray Train workers
    python -m mwt_ray.train --resume                          # continue the latest job of this name

Every run is a new job of its ``name`` (a fresh folder under ``<output_dir>/<name>/jobs/``), even when
the name was used before; ``--resume`` continues the latest job of that name from its last finished
epoch, in the same MLflow run, without logging an epoch twice.

Writes ``<output_dir>/<name>/``: ``checkpoint.pt`` (weights, config, per-class kernel counts,
module masks), ``metrics.json`` and ``history.csv`` of the job that finished last; each job's
per-epoch checkpoints under ``jobs/<job id>/``; an MLflow run per job.
"""
from __future__ import annotations

import sys

from .cli import run_command
from .cluster.shared_storage import check_job_places
from .config import Config, build_parser, load_config
from .jobs import train_in_process

__all__ = ["main", "train"]


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train in this process when ``scaling.num_workers`` is 0, else on that many Ray Train workers.

    Ray is imported only for the second: the first runs where Ray is not installed."""
    check_job_places(cfg)
    if cfg.scaling.num_workers == 0:
        return train_in_process(cfg, resume=resume)
    from .cluster.trainer import run_distributed

    return run_distributed(cfg, resume=resume)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--standard", action="store_true",
                        help="standard training: train.method=standard (no units, cross-entropy only)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (0: this process, no Ray)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest job of this name (its checkpoint and MLflow run) instead of a new job",
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.standard:
        # both spellings: a config file from before the method key may say modular: true
        overrides += ["train.method=standard", "train.modular=false"]
    if args.num_workers is not None:
        overrides.append(f"scaling.num_workers={args.num_workers}")
    return run_command(lambda: train(load_config(args.config, overrides), resume=args.resume),
                       interrupted_hint="; checkpoints up to the last finished epoch are kept: run the same "
                                        "command with --resume to continue")


if __name__ == "__main__":
    sys.exit(main())
