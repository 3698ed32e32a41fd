"""Step time of modular vs standard training: same model, same batch, same step code, one run.

    python benchmarks/step_time.py --grid cpu                    # VGG16, ResNet18: width 1 and 1/4 eager, 1/4 compiled
    python benchmarks/step_time.py --grid cuda                   # width 1: fp32 eager, bf16+compile
    python benchmarks/step_time.py --models vgg16 --widths 0.25 --steps 10 --precision bf16 --compile
    python benchmarks/step_time.py --batch 32 --widths 0.25 --out benchmarks/results/step_time_b32.json
    python benchmarks/step_time.py --method moda --models vgg16 --widths 0.25 --no-explain   # MODA's step

The counted step is ``TrainingStep.__call__`` exactly as ``train_epoch`` runs it (the objective, the
SGD step of ``make_optimizer`` and every per-step metric), built by ``TrainConfig(...).optim_settings()``
and ``prepare_model`` for both the standard and the modular model. Per model and setting:

- median step time, standard and modular, and their ratio. Steps are interleaved (standard,
  modular, standard, ...) so machine noise hits both alike; on CUDA each step is timed between two
  synchronisations, so host overhead a step cannot hide counts in full;
- ``aten::`` events per step, standard and modular, and their ratio: every profiler event whose name
  starts with ``aten::`` (nested ones included) over one step after the warm-up, CPU activity;
- graph breaks of the modular forward + objective + metrics under ``torch._dynamo.explain`` (0
  means ``compile`` sees each as one graph);
- on CUDA: the GPU's busy share of a modular (and standard) step, the device time of every GPU
  activity the profiler saw in one step over the median step's wall time; samples/s from a run of
  back-to-back steps with one synchronisation at the end (how ``train_epoch`` runs them); and the
  training time of one CIFAR-10 epoch (50,000 images, drop_last) at that rate.

Writes benchmarks/results/step_time.json (or --out) after every measured setting, so a run stopped
early keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mwt_ray.config import TrainConfig
from mwt_ray.core.losses import LayerMasks
from mwt_ray.core.models import create_model
from mwt_ray.core.training import TrainingStep, make_optimizer, prepare_model

CIFAR10_TRAIN_IMAGES = 50_000
NUM_CLASSES = 10

# --grid presets: (model, width, precision, compile) per setting; batch and steps come from the flags.
GRIDS = {
    "cpu": [(model, width, "fp32", compiled) for model in ("vgg16", "resnet18")
            for width, compiled in ((1.0, False), (0.25, False), (0.25, True))],
    "cuda": [(model, 1.0, precision, compiled) for model in ("vgg16", "resnet18", "simcnn")
             for precision, compiled in (("fp32", False), ("bf16", True))],
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(name: str, width: float, method: str, precision: str, compiled: bool, compile_mode: str,
               channels_last: bool, device: torch.device) -> TrainingStep:
    """A model and its ``TrainingStep`` as a training job builds them (the method's default weights)."""
    settings = TrainConfig(method=method, precision=precision, compile=compiled, compile_mode=compile_mode,
                           channels_last=channels_last).optim_settings()
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, width=width, method=method).to(device).train()
    prepare_model(model, settings)
    return TrainingStep(model, make_optimizer(model, settings), settings, NUM_CLASSES, device)


def profile_step(step: TrainingStep, images, labels, device: torch.device) -> dict:
    """``aten::`` events of one step (nested ones included) and, on CUDA, the GPU time it queued."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        step(images, labels, 1.0)
        synchronize(device)
    events = profiler.events()
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    result = {"aten_events": sum(1 for e in events if e.device_type == cpu and e.name.startswith("aten::"))}
    if device.type == "cuda":  # kernels, memsets and copies; one stream, so they do not overlap
        result["gpu_time_s"] = sum(e.time_range.elapsed_us() for e in events if e.device_type == gpu) * 1e-6
    return result


def graph_breaks(name: str, width: float, precision: str, method: str, device: torch.device) -> dict:
    """``torch._dynamo.explain`` of the modular forward, objective and step metrics on one batch.

    The three are what ``TrainingStep`` compiles (the model in place, the two functions apart); traced
    here as one function on a fresh uncompiled model, so each break inside any of them is counted."""
    from mwt_ray.core.methods import get_method
    from mwt_ray.core.metrics import batch_modularity

    settings = TrainConfig(method=method).optim_settings()
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, width=width, method=method).to(device).train()
    images = torch.randn(8, 3, 32, 32, device=device)
    labels = torch.arange(8, device=device) % NUM_CLASSES
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward_objective_metrics(images, labels):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits, masks = model(images, return_masks=True)
            masks = LayerMasks.of(masks)
            loss, _ = get_method(method).objective(logits, labels, masks, labels, NUM_CLASSES, settings, 1.0)
        return loss, batch_modularity(masks, labels, NUM_CLASSES)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward_objective_metrics)(images, labels)
    torch._dynamo.reset()
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "break_reasons": [str(reason.reason) for reason in explained.break_reasons][:5]}


def measure(name: str, width: float, precision: str, compiled: bool, args, device: torch.device) -> dict:
    torch._dynamo.reset()  # a setting compiles afresh, not with shapes made dynamic by the one before
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    kinds = ("standard", "modular")
    steps = {kind: build_step(name, width, args.method if kind == "modular" else "standard", precision, compiled,
                              args.compile_mode, args.channels_last, device) for kind in kinds}
    times = {kind: [] for kind in kinds}
    for i in range(args.warmup + args.steps):  # the warm-up also holds compilation and cuDNN's autotuning
        for kind in kinds:
            synchronize(device)
            start = time.perf_counter()
            steps[kind](images, labels, 1.0)
            synchronize(device)
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - start)
    row = {"model": name, "method": args.method, "width": width, "batch": args.batch, "precision": precision,
           "compile": compiled,
           "compile_mode": args.compile_mode if compiled else None, "channels_last": args.channels_last,
           "steps": args.steps, "warmup": args.warmup}
    for kind in kinds:
        row[f"{kind}_s"] = statistics.median(times[kind])
        row.update({f"{kind}_{key}": value for key, value in profile_step(steps[kind], images, labels, device).items()})
    row["time_ratio"] = row["modular_s"] / row["standard_s"]
    row["aten_ratio"] = row["modular_aten_events"] / row["standard_aten_events"]
    if device.type == "cuda":
        for kind in kinds:
            row[f"{kind}_gpu_busy"] = row[f"{kind}_gpu_time_s"] / row[f"{kind}_s"]
            synchronize(device)  # back-to-back steps: the host queues the next while the GPU runs this one
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[kind](images, labels, 1.0)
            synchronize(device)
            row[f"{kind}_samples_per_s"] = args.steps * args.batch / (time.perf_counter() - start)
            row[f"{kind}_epoch_s"] = (CIFAR10_TRAIN_IMAGES // args.batch) * args.batch / row[f"{kind}_samples_per_s"]
    if not args.no_explain:
        row.update(graph_breaks(name, width, precision, args.method, device))
    return row


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setting_label(row: dict) -> str:
    label = row["precision"] + ("+compile" if row["compile"] else " eager")
    if row["compile"] and row["compile_mode"] != "default":
        label += f"({row['compile_mode']})"
    return label + ("+NHWC" if row["channels_last"] else "")


def print_header(cuda: bool) -> None:
    columns = (f"{'model':<9}{'width':>6}{'setting':>22}{'std s':>9}{'mod s':>9}{'ratio':>7}"
               f"{'std aten':>10}{'mod aten':>10}{'ratio':>7}{'breaks':>7}")
    if cuda:
        columns += f"{'std busy':>9}{'mod busy':>9}{'std img/s':>11}{'mod img/s':>11}{'std ep s':>9}{'mod ep s':>9}"
    print(columns, flush=True)


def print_row(row: dict, cuda: bool) -> None:
    breaks = row.get("graph_breaks", "-")
    line = (f"{row['model']:<9}{row['width']:>6g}{setting_label(row):>22}{row['standard_s']:>9.4f}"
            f"{row['modular_s']:>9.4f}{row['time_ratio']:>7.3f}{row['standard_aten_events']:>10}"
            f"{row['modular_aten_events']:>10}{row['aten_ratio']:>7.2f}{breaks:>7}")
    if cuda:
        line += (
            f"{row['standard_gpu_busy']:>9.1%}{row['modular_gpu_busy']:>9.1%}{row['standard_samples_per_s']:>11.0f}"
            f"{row['modular_samples_per_s']:>11.0f}{row['standard_epoch_s']:>9.2f}{row['modular_epoch_s']:>9.2f}"
        )
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), help="a preset list of settings (replaces --models, "
                        "--widths, --precision and --compile)")
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--method", choices=["mwt", "moda"], default="mwt", help="the modular step's method")
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.25])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default")
    parser.add_argument("--channels-last", action="store_true", help="train.channels_last=true (also for a --grid)")
    parser.add_argument("--no-explain", action="store_true", help="skip the graph-break count")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.json"))
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first step builds the optimizer state)")
    device = torch.device(args.device)
    settings = GRIDS[args.grid] if args.grid else [(name, width, args.precision, args.compile)
                                                   for name in args.models for width in args.widths]
    meta = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "grid": args.grid, "method": args.method, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{meta['device']} {meta['gpu'] or meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"batch {args.batch}, median of {args.steps} steps after {args.warmup}", flush=True)
    print_header(device.type == "cuda")
    rows = []
    for name, width, precision, compiled in settings:
        rows.append(measure(name, width, precision, compiled, args, device))
        print_row(rows[-1], device.type == "cuda")
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
