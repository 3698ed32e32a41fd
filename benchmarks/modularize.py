"""Modularizing throughput (images/s) and peak memory at several dataset sizes.

    python benchmarks/modularize.py                       # VGG16 width 0.25, 10k and 50k images
    python benchmarks/modularize.py --sizes 5000 20000 --model resnet18

Each size runs in a fresh subprocess that streams synthetic CIFAR-sized batches (made on the fly,
never stored) through ``count_kernel_usage``, so the peak resident memory it reports is the
model plus the counting state: it must not grow with the number of images. Writes
benchmarks/results/modularize.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def worker(model_name: str, width: float, images: int, batch: int, cohesion_samples: int) -> dict:
    import torch

    from mwt_ray.core.kernel_usage import count_kernel_usage
    from mwt_ray.core.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, width=width)
    generator = torch.Generator().manual_seed(0)

    def batches():
        for start in range(0, images, batch):
            n = min(batch, images - start)
            yield torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    usage = count_kernel_usage(model, batches(), 10, max_samples_per_class=cohesion_samples)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state_bytes = usage.counts.numel() * usage.counts.element_size() + (
        usage.sample_kernel_sets.numel() if usage.sample_kernel_sets is not None else 0)
    return {"images": images, "seconds": elapsed, "images_per_s": images / elapsed,
            "peak_rss_mib": peak / 1024, "rss_before_mib": baseline / 1024,
            "counting_state_mib": state_bytes / 2**20, "kernels": usage.counts.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 50_000])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--cohesion-samples", type=int, default=1000, help="kept kernel sets per class (bounded)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "modularize.json"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.width, args.worker, args.batch, args.cohesion_samples)))
        return
    rows = []
    print(f"{'images':>8}{'seconds':>10}{'images/s':>10}{'peak RSS MiB':>14}{'state MiB':>11}", flush=True)
    for size in args.sizes:
        command = [sys.executable, __file__, "--worker", str(size), "--model", args.model, "--width", str(args.width),
                   "--batch", str(args.batch), "--cohesion-samples", str(args.cohesion_samples)]
        row = json.loads(
            subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
        rows.append(row)
        print(f"{row['images']:>8}{row['seconds']:>10.1f}{row['images_per_s']:>10.0f}{row['peak_rss_mib']:>14.0f}"
              f"{row['counting_state_mib']:>11.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "width": args.width, "batch": args.batch, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
