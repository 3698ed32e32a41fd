"""Reuse evaluation on a pool of Ray actors: sub-tasks per minute with 1 and 2 actors, and the
measured latency of 2-class modules against the whole model.

    python benchmarks/reuse_pool.py                                   # train tiny models on digits, then measure
    python benchmarks/reuse_pool.py --per-size 3 --fine-tune-epochs 5
    python benchmarks/reuse_pool.py --modular RUN/checkpoint.pt --standard STD/checkpoint.pt --set data.root=...

Without ``--modular`` it first trains (``--train-epochs``, 2) a modular and a standard VGG16 at
width 1/4 (the CIFAR-10 configuration's network: 32x32 inputs, 10 classes) on scikit-learn's
digits; sub-task throughput needs the real evaluation, not well-trained modules. Then the same
sub-tasks (M = 2..9, ``--per-size`` each, seeded) are evaluated by ``cluster.evaluate_reuse``
with 1 and with 2 actors of one CPU each on a local Ray cluster of ``--cpus`` CPUs. For each pool size:

- sub-tasks per minute over the pool's wall time (from the pool starting, actor start-up and
  loading included, to the last result), and the same from the first result on;
- where the time goes: the mean seconds per sub-task inside an actor, split into fine-tuning and
  latency measurement; the CPU seconds the actor's process used for it, and their ratio (the share
  of a core an actor got: other jobs on the machine take the rest); busy share = actor seconds /
  (actors x pool wall time), the pool's own idle time being the remainder.

Latency, two ways. (1) Module shapes: latency does not depend on the weights, only on how many
kernels each layer keeps, so modules of a given per-layer shape (the README's CIFAR-10 modules'
per-layer KRR, the union of two such modules, uniform keep rates) are extracted from an untrained
VGG16 at width 1/4 and timed against the whole network at 1 and 2 threads, beside their FLOPs
ratio: does the clock agree with fvcore? (2) For the 2-class sub-tasks of the 1-actor run (one
thread), the forward time of the reused module vs the whole standard model at batch 1 and 128
(fastest of ``--latency-repeats`` passes, interleaved), beside the FLOPs ratio.
Writes benchmarks/results/reuse_pool.json (or --out); the load average is recorded, as other jobs
on the machine move every number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def train_models(folder: Path, epochs: int) -> tuple[str, str]:
    from mwt_ray.config import load_config
    from mwt_ray.jobs import train_in_process

    base = ["data.name=digits", "model.name=vgg16", "model.width=0.25", "train.batch_size=64", f"train.epochs={epochs}",
            "tracking.enabled=false", f"output_dir={folder}"]
    for name, extra in (("modular", []), ("standard", ["train.method=standard"])):
        start = time.perf_counter()
        summary = train_in_process(load_config(None, base + [f"name={name}", *extra]), log=None)
        print(f"trained {name}: test accuracy {summary['final']['test_accuracy']:.2%}"
              + (f", KRR {summary['modules']['krr']:.3f}" if "modules" in summary else "")
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return str(folder / "modular" / "checkpoint.pt"), str(folder / "standard" / "checkpoint.pt")


def run_pool(modular: str, standard: str, actors: int, args, out: Path) -> dict:
    from mwt_ray.cluster import evaluate_reuse

    stamps: list[tuple[float, str]] = []

    def log(line: str) -> None:
        stamps.append((time.perf_counter(), line))
        if line.startswith("["):
            print(f"  {actors} actor(s) {line}", flush=True)

    overrides = [
        f"reuse.sizes={args.sizes}",
        f"reuse.per_size={args.per_size}",
        f"reuse.epochs={args.fine_tune_epochs}",
        f"reuse.num_actors={actors}",
        "reuse.cpus_per_actor=1",
        "reuse.latency_batch_sizes=[1,128]",
        f"reuse.latency_repeats={args.latency_repeats}",
        f"reuse.output_dir={out / f'actors{actors}'}",
        "tracking.enabled=false",
        *args.set,
    ]
    start = time.perf_counter()
    tables = evaluate_reuse(modular, standard, None, overrides=overrides, log=log)
    total = time.perf_counter() - start
    pool_start = next(t for t, line in stamps if line.startswith("reuse:"))
    results = [t for t, line in stamps if line.startswith("[")]
    rows = tables.rows
    wall = results[-1] - pool_start
    after_first = results[-1] - results[0]
    return {
        "actors": actors, "cpus_per_actor": 1, "subtasks": len(rows), "total_s": total, "pool_wall_s": wall,
        "subtasks_per_min": len(rows) / wall * 60,
        "subtasks_per_min_after_first": (len(rows) - 1) / after_first * 60 if after_first > 0 else None,
        "first_result_s": results[0] - pool_start,
        "mean_subtask_s": float(rows["seconds"].mean()), "mean_fine_tune_s": float(rows["fine_tune_s"].mean()),
        "mean_latency_s": float(rows["latency_s"].mean()), "mean_cpu_s": float(rows["cpu_s"].mean()),
        "core_share": float(rows["cpu_s"].sum() / rows["seconds"].sum()),
        "busy_share": float(rows["seconds"].sum()) / (actors * wall),
        "pids": sorted(int(p) for p in rows["pid"].unique()),
        "rows": json.loads(rows.to_json(orient="records")),
    }


def latency_summary(rows: list[dict]) -> dict:
    two = [r for r in rows if r["m"] == 2]
    pick = lambda key: [r[key] for r in two]  # noqa: E731
    return {
        "subtasks": len(two),
        "mean_krr": statistics.mean(pick("krr")),
        "flops_ratio": statistics.mean(1 - r["flops_reduction"] for r in two),
        **{f"latency_ratio_b{b}": statistics.median(pick(f"latency_ratio_b{b}")) for b in (1, 128)},
        **{
            f"latency_ratio_b{b}_range": [min(pick(f"latency_ratio_b{b}")), max(pick(f"latency_ratio_b{b}"))]
            for b in (1, 128)
        },
        **{f"module_ms_b{b}": statistics.median(pick(f"module_ms_b{b}")) for b in (1, 128)},
        **{f"model_ms_b{b}": statistics.median(pick(f"model_ms_b{b}")) for b in (1, 128)},
    }


# Per-layer KRR of the average module of the README's CIFAR-10 VGG16 (width 1/4, paper setting, 15
# epochs), first -> last masked layer; the union of two independent such modules keeps 1 - (1 - p)^2.
CIFAR_MODULE_PROFILE = [0.99, 0.71, 0.66, 0.50, 0.50, 0.46, 0.44, 0.35, 0.27, 0.18, 0.17, 0.12]


def shaped_latency(repeats: int, threads: list[int]) -> list[dict]:
    """Latency vs FLOPs of modules of given per-layer shapes (random kernels kept; time depends on
    the shape only): the CIFAR-10 profile above, its two-module union, and uniform keep rates."""
    import torch

    from mwt_ray.core.extract import extract_module
    from mwt_ray.core.flops import count_flops
    from mwt_ray.core.graph import mask_units
    from mwt_ray.core.models import create_model
    from mwt_ray.core.reuse import compare_latency

    torch.manual_seed(0)
    modular = create_model("vgg16", 10, 0.25, method="mwt").eval()
    plain = create_model("vgg16", 10, 0.25, method="standard").eval()
    sizes = [u.num_kernels for u in mask_units(modular)]
    profiles = {"CIFAR-10 module profile": CIFAR_MODULE_PROFILE,
                "two-module union of it": [1 - (1 - p) ** 2 for p in CIFAR_MODULE_PROFILE],
                **{f"uniform {p:.2f}": [p] * len(sizes) for p in (0.25, 0.5, 0.75)}}
    model_flops = count_flops(plain)
    before = torch.get_num_threads()
    out = []
    for name, profile in profiles.items():
        keep = torch.cat(
            [
                torch.zeros(k, dtype=torch.bool).index_fill_(0, torch.randperm(k)[: max(1, round(p * k))], True)
                for k, p in zip(sizes, profile)
            ]
        )
        module = extract_module(modular, keep).eval()
        row = {"module": name, "krr": keep.float().mean().item(), "flops_ratio": count_flops(module) / model_flops}
        for n in threads:
            torch.set_num_threads(n)
            for b in (1, 128):
                module_s, model_s = compare_latency([module, plain], b, 32, torch.device("cpu"), repeats)
                row[f"latency_ratio_b{b}_t{n}"] = module_s / model_s
                row[f"model_ms_b{b}_t{n}"] = model_s * 1e3
        out.append(row)
        print(
            f"  {name}: KRR {row['krr']:.3f}  FLOPs x{row['flops_ratio']:.2f}  latency "
            + "  ".join(
                f"{k[len('latency_ratio_') :]} x{v:.2f}" for k, v in row.items() if k.startswith("latency_ratio")
            ),
            flush=True,
        )
    torch.set_num_threads(before)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modular", help="modular checkpoint (default: train one on digits)")
    parser.add_argument("--standard", help="standard checkpoint (with --modular)")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--sizes", default="2..9")
    parser.add_argument("--per-size", type=int, default=2)
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--work", help="folder that keeps the trained models for later runs (default: a temporary one)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--set", action="append", default=[], help="extra --set items for the evaluation")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "reuse_pool.json"))
    args = parser.parse_args()

    import ray
    import torch

    load_before = os.getloadavg()
    print("latency of module shapes vs the whole VGG16 (width 1/4, 32x32), 1 and 2 threads:", flush=True)
    shapes = shaped_latency(args.latency_repeats * 2, [1, 2])
    with tempfile.TemporaryDirectory(prefix="reuse_bench_") as scratch:
        scratch = Path(scratch)
        work = Path(args.work) if args.work else scratch
        trained = [str(work / "runs" / n / "checkpoint.pt") for n in ("modular", "standard")]
        if args.modular:
            modular, standard = args.modular, args.standard
        elif all(Path(p).is_file() for p in trained):
            modular, standard = trained
            print(f"using the models trained before in {work}", flush=True)
        else:
            modular, standard = train_models(work / "runs", args.train_epochs)
        ray.init(
            address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False
        )  # not a running cluster
        try:
            runs = [run_pool(modular, standard, n, args, scratch) for n in args.actors]
        finally:
            ray.shutdown()
    by_actors = {r["actors"]: r for r in runs}
    one = by_actors.get(min(by_actors))
    latency = latency_summary(one["rows"])
    result = {
        "meta": {"modular": args.modular or "vgg16 width 0.25, digits, trained here", "train_epochs": args.train_epochs,
                 "sizes": args.sizes, "per_size": args.per_size, "fine_tune_epochs": args.fine_tune_epochs,
                 "latency_repeats": args.latency_repeats, "ray_cpus": args.cpus, "torch": torch.__version__,
                 "ray": ray.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
                 "load_average_before": load_before, "load_average_after": os.getloadavg(),
                 "date": time.strftime("%Y-%m-%d %H:%M")},
        "pools": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
        "speedup": (by_actors[max(by_actors)]["subtasks_per_min"] / one["subtasks_per_min"]) if len(runs) > 1 else None,
        "latency_2class": latency,
        "latency_by_shape": shapes,
        "rows": {r["actors"]: r["rows"] for r in runs},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(
        "\n| actors | sub-tasks | pool wall s | sub-tasks/min | after 1st result "
        "| s per sub-task (fine-tune + latency) "
        "| CPU s per sub-task | share of a core an actor got | busy share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        after = f"{r['subtasks_per_min_after_first']:.1f}" if r["subtasks_per_min_after_first"] else "-"
        print(
            f"| {r['actors']} | {r['subtasks']} | {r['pool_wall_s']:.1f} | {r['subtasks_per_min']:.1f} | {after} | "
            f"{r['mean_subtask_s']:.2f} ({r['mean_fine_tune_s']:.2f} + {r['mean_latency_s']:.2f}) | "
            f"{r['mean_cpu_s']:.2f} | "
            f"{r['core_share']:.0%} | {r['busy_share']:.0%} |"
        )
    if result["speedup"]:
        print(f"\nspeed-up with {max(by_actors)} actors: {result['speedup']:.2f}x")
    print(
        f"\n2-class modules ({latency['subtasks']}): KRR {latency['mean_krr']:.3f}, FLOPs {latency['flops_ratio']:.2f} "
        f"of the model's; measured latency module/model: batch 1 {latency['latency_ratio_b1']:.2f} "
        f"({latency['module_ms_b1']:.2f} vs {latency['model_ms_b1']:.2f} ms), "
        f"batch 128 {latency['latency_ratio_b128']:.2f} "
        f"({latency['module_ms_b128']:.1f} vs {latency['model_ms_b128']:.1f} ms)"
    )
    print("\n| module shape | KRR | FLOPs ratio | latency ratio b1 (1 / 2 threads) | b128 (1 / 2 threads) |")
    print("|---|---|---|---|---|")
    for r in shapes:
        print(f"| {r['module']} | {r['krr']:.3f} | {r['flops_ratio']:.2f} | {r['latency_ratio_b1_t1']:.2f} / "
              f"{r['latency_ratio_b1_t2']:.2f} | {r['latency_ratio_b128_t1']:.2f} / {r['latency_ratio_b128_t2']:.2f} |")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
