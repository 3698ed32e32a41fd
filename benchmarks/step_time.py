"""Step time of modular vs standard training: same model, same batch, measured in one run.

    python benchmarks/step_time.py                     # VGG16 and ResNet18, width 1 and 0.25
    python benchmarks/step_time.py --models vgg16 --widths 0.25 --steps 10

Standard and modular steps are interleaved (standard, modular, standard, ...) so machine noise
hits both alike; the table shows medians. Writes benchmarks/results/step_time.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mwt_ray.core.losses import modular_objective
from mwt_ray.core.metrics import batch_modularity
from mwt_ray.core.models import create_model
from mwt_ray.config import TrainConfig
from mwt_ray.core.training import make_optimizer


def make_step(model, optimizer, modular: bool, alpha=0.5, beta=1.5):
    def step(x, y):
        if modular:
            logits, masks = model(x, return_masks=True)
            loss, _ = modular_objective(logits, y, masks, y, alpha, beta)
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if modular:
            batch_modularity(masks, y, logits.shape[1])  # the training loop logs these every step
        return loss
    return step


def measure(name: str, width: float, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    runners = {}
    for modular in (False, True):
        torch.manual_seed(0)
        model = create_model(name, width=width, modular=modular).to(device).train()
        runners[modular] = make_step(model, make_optimizer(model, TrainConfig().optim_settings()), modular)
    times = {False: [], True: []}
    for i in range(warmup + steps):
        for modular in (False, True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            runners[modular](x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[modular].append(time.perf_counter() - start)
    standard, modular = statistics.median(times[False]), statistics.median(times[True])
    return {"model": name, "width": width, "batch": batch, "standard_s": standard, "modular_s": modular,
            "ratio": modular / standard}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.25])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    print(f"{'model':<10}{'width':>6}{'standard s':>12}{'modular s':>12}{'ratio':>8}", flush=True)
    for name in args.models:
        for width in args.widths:
            row = measure(name, width, args.batch, args.steps, args.warmup, device)
            rows.append(row)
            print(f"{name:<10}{width:>6}{row['standard_s']:>12.4f}{row['modular_s']:>12.4f}{row['ratio']:>8.3f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
