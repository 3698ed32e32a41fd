"""``python -m mwt_ray.export``: one module a user can take away, as files that run without mwt_ray.

    python -m mwt_ray.export --run <MLflow run id | checkpoint | run folder> --classes cat,dog --out DIR
        [--standard <same>] [--tau T] [--register NAME] [--set reuse.epochs=N] [--set key=value ...]

The module of ``--classes`` (indices or class names, in the order its scores come out) at ``--tau``
(default: the tau the run chose: a sweep trial's ``sweep.tau``, else its ``modularize.tau``). With
``reuse.epochs=0`` it is the union of the classes' modules with the original classifier's logits
restricted to them; with N > 0 the paper's reuse head fine-tuned on those classes' training
samples, unless the module without fine-tuning does better on held-out training samples.

It writes to ``--out``: ``module.pt2`` (``torch.export.load(path).module()``), ``module.onnx``
(checked with ONNX Runtime on the sub-task's test images) and ``module.json`` (source, classes, tau,
KRR, kernels, FLOPs, latency, accuracy, against the ``--standard`` model when given, the input
contract, versions). Both programs take float32 RGB images in [0, 1], shape (B, 3, H, W) at the
training size, and return the class scores. With tracking on (the run's ``tracking.*``, or
``--set tracking.tracking_uri=...``) the module is logged as an MLflow model (the ONNX program behind
a check that refuses, with HTTP 400 when served, NaN, infinite or out-of-range values and other
shapes), nested under the source run when the store has it; ``--register NAME`` adds a version of
registered model NAME.
"""
from __future__ import annotations

import sys

from .cli import run_command
from .config import build_parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__, with_config=False)
    parser.add_argument(
        "--run", required=True, help="the modular model: an MLflow run id, a checkpoint, or a run folder"
    )
    parser.add_argument("--classes", required=True, help="class indices or names, comma-separated: 3,5 or cat,dog")
    parser.add_argument("--out", required=True, help="the folder module.pt2, module.onnx and module.json go to")
    parser.add_argument("--standard", help="the standard model to compare with (same kinds of reference as --run)")
    parser.add_argument("--tau", type=float, help="module threshold; default: the tau the run chose")
    parser.add_argument("--register", metavar="NAME", help="register the module in the MLflow Model Registry as NAME")
    args = parser.parse_args(argv)

    def export() -> None:
        from .jobs.export_job import export_module, plan_export

        plan = plan_export(args.run, args.classes, args.out, standard_ref=args.standard, tau=args.tau,
                           register=args.register, overrides=args.overrides)
        export_module(plan)

    return run_command(export)


if __name__ == "__main__":
    sys.exit(main())
