"""Which of torchvision's classification models mwt-ray can modularize, and why the others are refused.

    python experiments/torchvision_coverage.py [--size 32] [--out experiments/results/torchvision_coverage.json]

Each model goes through the checks a modular training job makes before it trains
(``jobs.setup.check_model``): built untrained for 10 classes, made modular from its traced graph,
run in training mode on a batch of ``--size`` images (it must return the logits), and a module cut out
of it with half of every unit's kernels. Prints a table (model, mask units, masked kernels, seconds, or
the one-line refusal) and writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torchvision

from mwt_ray.config import load_config
from mwt_ray.core.data import ImageData
from mwt_ray.core.graph import modular_units
from mwt_ray.core.models import create_model
from mwt_ray.jobs.setup import check_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image size (CIFAR-10: 32)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "torchvision_coverage.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # torchvision's notes on GoogLeNet / Inception initialisation
    images, labels = torch.zeros(10, 3, args.size, args.size, dtype=torch.uint8), torch.arange(10)  # only shapes matter
    data = ImageData(images, labels, images, labels, classes=[str(c) for c in range(10)])
    rows = []
    for name in torchvision.models.list_models(module=torchvision.models):
        model_name = f"torchvision:{name}"
        cfg = load_config(None, [f"model.name={model_name}"])
        start = time.perf_counter()
        try:
            check_model(cfg, data)
        except ValueError as error:
            rows.append({"model": model_name, "ok": False, "reason": str(error)})
        else:
            units = modular_units(create_model(model_name, 10))
            rows.append({"model": model_name, "ok": True, "units": len(units),
                         "masked_kernels": sum(u.num_kernels for u in units)})
        rows[-1]["seconds"] = round(time.perf_counter() - start, 1)
        row = rows[-1]
        print(
            f"{model_name:36s} "
            + (
                f"ok   {row['units']:4d} units {row['masked_kernels']:6d} kernels"
                if row["ok"]
                else f"no   {row['reason'][:110]}"
            )
            + f"  {row['seconds']}s",
            flush=True,
        )
    passed = sum(r["ok"] for r in rows)
    print(f"{passed} of {len(rows)} models can be modularized at {args.size}x{args.size} "
          f"(torch {torch.__version__}, torchvision {torchvision.__version__})")
    Path(args.out).write_text(json.dumps({"size": args.size, "torchvision": torchvision.__version__,
                                          "passed": passed, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
