"""``python -m mwt_ray.reuse``: reuse modules on sampled M-class sub-tasks and compare with the standard model.

    python -m mwt_ray.reuse --run <MLflow run id | checkpoint | run folder> [--standard <run id | checkpoint>]
    python -m mwt_ray.reuse --modular RUN/checkpoint.pt --standard RUN/checkpoint.pt --set 'reuse.sizes=[2,5]'

For each M in ``reuse.sizes`` (default 2..N-1) it samples ``reuse.per_size`` class sets (default
10; all of them when fewer exist) and evaluates them on a pool of Ray actors (``reuse.num_actors``,
default: as many as the cluster can place; 0 = in this process without Ray): the mixed module
fine-tuned with a new head (m-ACC), the standard model on the same classes (M-ACC), KRR, FLOPs and
measured latency of module vs model, and the module's accuracy with no fine-tuning. The tables
(paper tables 5-7 per M, and every sub-task) go to CSV, Markdown and a PNG in ``reuse.output_dir``
(default: ``reuse/`` beside the checkpoint) and to the MLflow run evaluated.

The modular checkpoint carries its config; ``--set`` overrides the ``reuse.*``, ``modularize.tau``,
``data.*``, ``tracking.*`` and ``train.device`` / ``train.seed`` values.
"""
from __future__ import annotations

import sys

from .cli import run_command
from .cluster import evaluate_reuse
from .config import build_parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__, with_config=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="the modular model: an MLflow run id, a checkpoint, or a run folder")
    source.add_argument("--modular", help="the modular model's checkpoint (the same as --run with a path)")
    parser.add_argument("--standard", help="the standard model to compare with: an MLflow run id, a checkpoint, "
                        "or a run folder of the same architecture and classes")
    args = parser.parse_args(argv)
    return run_command(lambda: evaluate_reuse(args.run or args.modular, args.standard, overrides=args.overrides))


if __name__ == "__main__":
    sys.exit(main())
