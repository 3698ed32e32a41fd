"""Data-parallel throughput of modular training on Ray Train, and the cost of the mask all-gather.

    python benchmarks/data_parallel.py                          # CPU: 1 worker (1 and 2 CPUs), 2 workers
    python benchmarks/data_parallel.py --gpu --workers 1 2 4    # GPUs (NCCL), one per worker
    python benchmarks/data_parallel.py --data digits --steps 10

Every configuration trains the same global batch (``--batch``, split evenly over the workers) with
the real modular step of ``training.train_epoch``: forward with masks, the autograd all-gather of
masks and labels (``training.gather_global_batch``), the Eq. 6 objective, backward (DDP averages
the gradients), SGD step, and the per-step Fig. 5 metrics. Inside the step, rank 0 times

- the gather's forward (``gather_global_batch``: masks and labels of all ranks), and
- its backward: identity autograd nodes placed on both sides of the gather record when the
  gradient reaches the gathered masks and when it leaves for the local ones.

Both include waiting for the slower worker, which is part of what the gather costs. The table
shows samples/s (global batch x steps / wall time of the timed steps, after a barrier), the same
from the median step time (less sensitive to other load on the machine; the JSON records the load
average), and the gather's share of the step time. Writes benchmarks/results/data_parallel.json (or --out).
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

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


class _Stamp(torch.autograd.Function):
    """Identity whose backward records when the gradient passes through it."""

    @staticmethod
    def forward(ctx, x, times):
        ctx.times = times
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.times.append(time.perf_counter())
        return grad, None


def bench_loop(config: dict) -> None:
    import torch.distributed as dist

    from mwt_ray.cluster.worker import wrap_model
    from mwt_ray.config import TrainConfig
    from mwt_ray.core.data import iterate_batches, load_dataset
    from mwt_ray.core.losses import LayerMasks, modular_objective
    from mwt_ray.core.metrics import batch_modularity
    from mwt_ray.core.models import create_model
    from mwt_ray.core.training import gather_global_batch, make_optimizer, world

    torch.set_num_threads(config["threads"])
    rank, world_size = world()
    use_gpu = config["gpu"]
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    batch = config["batch"]
    torch.manual_seed(0)
    model = create_model(config["model"], 10, config["width"], method="mwt").to(device).train()
    model = wrap_model(model)  # DDP when world size > 1
    optimizer = make_optimizer(model, TrainConfig().optim_settings())
    if config["data"] == "digits":
        data = load_dataset("digits").to(device)
        batches = list(iterate_batches(data.train_images, data.train_labels, batch, mean=data.mean, std=data.std,
                                       shuffle=True, augment=True, seed=0, drop_last=True, rank=rank,
                                       world_size=world_size))
    else:
        generator = torch.Generator().manual_seed(0)
        lo, hi = rank * batch // world_size, (rank + 1) * batch // world_size
        batches = []
        for _ in range(4):
            x = torch.randn(batch, 3, 32, 32, generator=generator)
            y = torch.randint(0, 10, (batch,), generator=generator)
            batches.append((x[lo:hi].to(device), y[lo:hi].to(device)))

    def sync():
        if use_gpu:
            torch.cuda.synchronize()

    step_s, gather_fwd_s, gather_bwd_s = [], [], []
    total = config["warmup"] + config["steps"]
    for i in range(total):
        if i == config["warmup"]:
            sync()
            if world_size > 1:
                dist.barrier()
            loop_start = time.perf_counter()
        images, labels = batches[i % len(batches)]
        sync()
        start = time.perf_counter()
        logits, masks = model(images, return_masks=True)
        leave, arrive = [], []
        masks = [_Stamp.apply(m, leave) for m in masks]
        sync()
        g0 = time.perf_counter()
        all_masks, all_labels = gather_global_batch(masks, labels)
        sync()
        g1 = time.perf_counter()
        all_masks = LayerMasks(_Stamp.apply(all_masks.values, arrive), all_masks.columns)
        loss, _ = modular_objective(logits, labels, all_masks, all_labels, 0.5, 1.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            batch_modularity(all_masks, all_labels, 10)
        sync()
        end = time.perf_counter()
        if i >= config["warmup"]:
            step_s.append(end - start)
            gather_fwd_s.append(g1 - g0)
            # from the last gradient reaching the gathered masks to the first leaving the gather
            gather_bwd_s.append(max(0.0, min(leave) - max(arrive)) if world_size > 1 else 0.0)
    sync()
    if world_size > 1:
        dist.barrier()
    wall = time.perf_counter() - loop_start
    if rank == 0:
        result = {"wall_s": wall, "samples_per_s": batch * config["steps"] / wall,
                  "samples_per_s_median_step": batch / statistics.median(step_s),
                  "step_s_median": statistics.median(step_s),
                  "gather_fwd_s_median": statistics.median(gather_fwd_s),
                  "gather_bwd_s_median": statistics.median(gather_bwd_s),
                  "gather_share": (sum(gather_fwd_s) + sum(gather_bwd_s)) / sum(step_s)}
        Path(config["out"]).write_text(json.dumps(result))


def measure(workers: int, cpus_per_worker: int, args, scratch: Path) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = scratch / f"w{workers}_c{cpus_per_worker}.json"
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if args.gpu else {})}
    config = {"model": args.model, "width": args.width, "batch": args.batch, "steps": args.steps,
              "warmup": args.warmup, "data": args.data, "threads": cpus_per_worker, "gpu": args.gpu,
              "out": str(out)}
    TorchTrainer(bench_loop, train_loop_config=config,
                 torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
                 scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=args.gpu,
                                                        resources_per_worker=resources),
                 run_config=ray.train.RunConfig(name=f"bench_w{workers}_c{cpus_per_worker}",
                                                storage_path=str(scratch / "ray"),
                                                logging_config=ray.train.LoggingConfig(log_level="WARNING"))).fit()
    row = {"workers": workers, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": int(args.gpu),
           "global_batch": args.batch, "per_worker_batch": args.batch // workers, **json.loads(out.read_text())}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cpus-per-worker", nargs="+", type=int, default=None,
                        help="CPUs (torch threads) per worker; default: 1, plus all CPUs for a single worker")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", choices=["random", "digits"], default="random")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_parallel.json"))
    args = parser.parse_args()

    import ray

    ray.init(include_dashboard=False, logging_level="WARNING")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    plan = []
    for workers in args.workers:
        for per in args.cpus_per_worker or sorted({1, cpus // workers} if workers == 1 else {1}):
            if workers * per <= cpus and (not args.gpu or workers <= ray.cluster_resources().get("GPU", 0)):
                plan.append((workers, per))
    load_before = os.getloadavg()
    rows = []
    header = f"{'workers':>7} {'CPU/worker':>10} {'batch/worker':>12} {'samples/s':>10} {'(median step)':>13} " \
             f"{'step s':>8} {'gather fwd ms':>13} {'gather bwd ms':>13} {'gather share':>12}"
    with tempfile.TemporaryDirectory(prefix="mwt_bench_") as scratch:
        for workers, per in plan:
            row = measure(workers, per, args, Path(scratch))
            rows.append(row)
            print(f"done: {workers} worker(s) x {per} CPU: {row['samples_per_s']:.1f} samples/s", flush=True)
    ray.shutdown()
    lines = [header] + [
        f"{r['workers']:>7} {r['cpus_per_worker']:>10} {r['per_worker_batch']:>12} {r['samples_per_s']:>10.1f} "
        f"{r['samples_per_s_median_step']:>13.1f} {r['step_s_median']:>8.3f} "
        f"{1000 * r['gather_fwd_s_median']:>13.2f} {1000 * r['gather_bwd_s_median']:>13.2f} "
        f"{r['gather_share']:>11.2%}"
        for r in rows
    ]
    print("\n".join(lines))
    meta = {"model": args.model, "width": args.width, "global_batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "data": args.data, "device": "gpu" if args.gpu else "cpu",
            "torch": torch.__version__, "ray": ray.__version__, "cpus": cpus, "machine": platform.machine(),
            "gpu_name": torch.cuda.get_device_name() if args.gpu and torch.cuda.is_available() else None,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "table": lines}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
