"""``python -m mwt_ray.sweep``: Ray Tune + Optuna over alpha, beta (and more), tau scored per trial.

    python -m mwt_ray.sweep --config tune_configs/quickstart.yaml            # local Ray on this machine
    python -m mwt_ray.sweep --config tune_configs/quickstart.yaml --resume   # continue the latest unfinished sweep
    python -m mwt_ray.sweep ... --resume --trust-folder   # one killed before it could sign its state (SIGKILL)
    ray job submit --address http://HEAD:8265 -- python -m mwt_ray.sweep --config tune_configs/cifar10_vgg16.yaml

Trains every trial (one process, or Ray Train workers with scaling.num_workers > 0), stops poor
trials early (ASHA on val_accuracy), scans tau on each finished trial, trains a standard baseline,
and writes results.csv / results.md / pareto.png plus an MLflow parent run with a nested run per
trial. See ``mwt_ray.cluster.sweep`` and the README for the objective.
"""
from __future__ import annotations

import sys

from .cli import run_command
from .cluster.sweep import run_sweep
from .config import build_parser, load_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--resume", action="store_true", help="continue the latest unfinished sweep of this name "
                        "(only from files this user's sweep signed)")
    parser.add_argument("--trust-folder", action="store_true", help="with --resume: also restore a sweep that could "
                        "not sign its last state (killed by SIGKILL, a lost head node); only for a folder nobody "
                        "else can write, as Tune's state files are pickles that run code when loaded")
    args = parser.parse_args(argv)
    if args.trust_folder and not args.resume:
        parser.error("--trust-folder goes with --resume")
    return run_command(lambda: run_sweep(load_config(args.config, args.overrides), resume=args.resume,
                                         trust_folder=args.trust_folder),
                       interrupted_hint="; finished trials are kept: run the same command with --resume to continue")


if __name__ == "__main__":
    sys.exit(main())
