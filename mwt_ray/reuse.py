"""``python -m mwt_ray.reuse``: reuse modules on M-class sub-tasks and compare with the standard model.

    python -m mwt_ray.reuse --modular RUN/checkpoint.pt --standard RUN/checkpoint.pt --set 'reuse.sizes=[2,5]'

The modular checkpoint carries its config; ``--set`` overrides the ``reuse.*``, ``modularize.tau``,
``data.*`` and ``train.device`` / ``train.seed`` values. Writes ``reuse.json`` beside the modular checkpoint.
"""
from __future__ import annotations

import sys

from .cli import run_command
from .config import build_parser
from .jobs import reuse_from_checkpoints

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__, with_config=False)
    parser.add_argument("--modular", required=True, help="checkpoint of a modular run (has module masks)")
    parser.add_argument("--standard", help="checkpoint of a standard run of the same dataset")
    args = parser.parse_args(argv)
    return run_command(lambda: reuse_from_checkpoints(args.modular, args.standard, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
