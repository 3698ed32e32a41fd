"""Sweep throughput: trials per hour with 1 and 2 concurrent trials, and where a trial's time goes.

    python benchmarks/sweep.py [--trials 4] [--epochs 4]

Runs the same small sweep (VGG16 at width 1/4 on the embedded digits, no early stopping so every
trial does the same work, no standard baseline) with sweep.max_concurrent 1 and then 2, one CPU
per trial, on a local Ray started by the sweep. Per trial it splits Tune's own time for the trial
(``time_total_s``) into the training job (``job_seconds``: data, model, epochs, checkpoints,
modularizing, MLflow), of which the epochs themselves (``epoch_seconds``), and the tau scan
(``scan_seconds``); what is left is the trial's Ray / Tune overhead (process start, imports,
reporting). The sweep's wall time against the trials' summed time shows scheduling gaps.
Prints a table and writes benchmarks/results/sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(trials: int, epochs: int, concurrent: int, workdir: Path) -> dict:
    from mwt_ray.cluster.sweep import run_sweep
    from mwt_ray.config import load_config

    tree = {"name": f"bench-{concurrent}", "output_dir": str(workdir / "runs"),
            "model": {"name": "vgg16", "width": 0.25}, "data": {"name": "digits"},
            "train": {"epochs": epochs, "batch_size": 64},
            "tracking": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"},
            "sweep": {"trials": trials, "max_concurrent": concurrent, "scheduler": "none", "standard_baseline": False,
                      "reuse": False, "cpus_per_trial": 1}}
    path = workdir / f"bench-{concurrent}.yaml"
    path.write_text(yaml.safe_dump(tree))
    start = time.perf_counter()
    outcome = run_sweep(load_config(path), log=lambda line: None)
    wall = time.perf_counter() - start
    folder = outcome["folder"]
    per_trial = []
    for result_file in sorted((folder / "tune").glob("*/result.json")):
        last = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()][-1]
        per_trial.append({k: last.get(k) for k in ("time_total_s", "job_seconds", "epoch_seconds", "scan_seconds")})
    trials_df = pd.DataFrame(per_trial)
    mean = trials_df.mean()
    return {"concurrent": concurrent, "trials": trials, "epochs": epochs, "wall_s": wall,
            "trials_per_hour": trials / wall * 3600,
            "trial_s": mean["time_total_s"], "job_s": mean["job_seconds"], "epochs_s": mean["epoch_seconds"],
            "scan_s": mean["scan_seconds"],
            "trial_overhead_share": 1 - (mean["job_seconds"] + mean["scan_seconds"]) / mean["time_total_s"],
            "sweep_overhead_share": 1 - trials_df["time_total_s"].sum() / (wall * concurrent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mwt_sweep_bench_") as scratch:
        for concurrent in (1, 2):
            rows.append(run(args.trials, args.epochs, concurrent, Path(scratch)))
            print(f"max_concurrent {concurrent}: {rows[-1]['trials_per_hour']:.0f} trials/hour", flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    out = ROOT / "benchmarks" / "results" / "sweep.json"
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "load_average": os.getloadavg()},
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
