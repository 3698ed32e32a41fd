"""Methods side by side on one harness: standard, MwT (the paper's weights and this project's best setting)
and MODA (its defaults), on the same models, data, budget and metric code; one table.

    python experiments/methods.py                                   # the grid below, 2 runs at a time
    python experiments/methods.py --models vgg16 --seeds 0 --epochs 3 --limit 1000   # a quick look
    python experiments/methods.py --table-only                      # the table from finished runs

Every run is ``python -m mwt_ray.train`` in a process of its own (one torch thread, ``--parallel`` at a
time), then ``python -m mwt_ray.reuse`` of its 2- and 5-class sub-tasks against the standard model of
the same seed. What is held equal: the data subset (``--limit`` class-balanced training images of the
shared CIFAR-10, all 10,000 test images), epochs, seeds, optimizer (the project's SGD defaults: lr 0.05,
Nesterov momentum 0.9, weight decay 5e-4, cosine), batch 128, augmentation (crop + flip), tau 0.9 and
the empty-layer rule, the sub-tasks (sampled once per seed) and the reuse fine-tuning budget.

The table (mean over seeds, and the spread where there are several): test accuracy and its change
against the standard model; KRR over conv kernels; weight share of a one-class module (whole model and
conv layers only) and overlap of two (MODA's definitions, ``core.module_stats``); FLOPs of the 2- and
5-class composed modules over the model's; their accuracy with no fine-tuning (target-class logits) and
after the project's fine-tuning, each against the standard model on the same classes. Writes
``<out>/methods.json`` and ``<out>/methods.md``. Step time is ``benchmarks/step_time.py --method``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

# name -> extra settings; MwT's best documented setting (experiments/README.md, "Bring your own CNN"): its
# losses ramped in over 60% of the epochs and a mask sparsity weight of 2.
METHODS = {
    "standard": ["train.method=standard"],
    "mwt-paper": ["train.method=mwt", "train.alpha=0.5", "train.beta=1.5"],
    "mwt-best": ["train.method=mwt", "train.sparsity=2", "train.warmup_epochs={warmup}"],
    "moda": ["train.method=moda", "train.affinity=1.0", "train.dispersion=1.0", "train.compactness=0.3"],
}
MODELS = ["vgg16", "resnet18", "torchvision:mobilenet_v2"]


def run_name(model: str, method: str, seed: int) -> str:
    return f"{model.split(':')[-1]}-{method}-s{seed}"


def command(module: str, args: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    print(f"  {log.stem}: {module} {'done' if result.returncode == 0 else 'FAILED'} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    if result.returncode:
        raise RuntimeError(f"{module} failed: see {log}")


def train(args, model: str, method: str, seed: int) -> None:
    name = run_name(model, method, seed)
    if (args.out / name / "metrics.json").is_file():
        return
    sets = [f"name={name}", f"output_dir={args.out}", f"model.name={model}", "data.name=folder",
            f"data.root={args.data}", f"data.train_limit={args.limit}", f"train.epochs={args.epochs}",
            f"train.seed={seed}", "modularize.tau=0.9", "modularize.cohesion_samples_per_class=0",
            f"tracking.tracking_uri=sqlite:///{args.out / 'mlflow.db'}", "tracking.experiment=methods"]
    sets += [s.format(warmup=max(1, round(0.6 * args.epochs))) for s in METHODS[method]]
    command("mwt_ray.train", [a for s in sets for a in ("--set", s)], args.out / f"{name}.log")


def reuse(args, model: str, method: str, seed: int, subtasks: list[list[int]]) -> None:
    name = run_name(model, method, seed)
    if method == "standard" or any((args.out / name / "reuse").rglob("reuse_rows.csv")):
        return
    sets = ["reuse.num_actors=0", f"reuse.subtasks={json.dumps(subtasks)}", f"reuse.epochs={args.reuse_epochs}",
            "reuse.zero_fine_tune=true", "reuse.latency_batch_sizes=[]"]
    command("mwt_ray.reuse", ["--run", str(args.out / name / "checkpoint.pt"),
                              "--standard", str(args.out / run_name(model, "standard", seed) / "checkpoint.pt"),
                              *[a for s in sets for a in ("--set", s)]], args.out / f"{name}.reuse.log")


def subtasks_of(seed: int) -> list[list[int]]:
    from mwt_ray.core.reuse import sample_subtasks

    return sample_subtasks(10, [2, 5], 2, seed)


def run_row(args, model: str, method: str, seed: int) -> dict | None:
    folder = args.out / run_name(model, method, seed)
    if not (folder / "metrics.json").is_file():
        return None
    metrics = json.loads((folder / "metrics.json").read_text())
    row = {"model": model, "method": method, "seed": seed, "test_acc": metrics["final"]["test_accuracy"],
           "epoch_s": metrics["final"].get("epoch_time_s")}
    modules = metrics.get("modules") or {}
    row |= {key: modules.get(key) for key in ("krr", "weight_share", "weight_share_conv", "overlap", "overlap_conv",
                                              "neuron_retention_rate")}
    rows = next(iter((folder / "reuse").rglob("reuse_rows.csv")), None) if (folder / "reuse").is_dir() else None
    if rows is not None:
        table = pd.read_csv(rows)
        for m, group in table.groupby("m"):
            row |= {f"flops_{m}": (group["module_flops"] / group["model_flops"]).mean(),
                    f"no_ft_{m}": group["zero_ft_accuracy"].mean(), f"ft_{m}": group["module_accuracy"].mean(),
                    f"standard_{m}": group["standard_accuracy"].mean()}
    return row


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per model and method, with the accuracy spread and the change against standard."""
    standard = frame[frame["method"] == "standard"].set_index(["model", "seed"])["test_acc"]
    frame = frame.assign(change=[acc - standard.get((model, seed), float("nan"))
                                 for model, seed, acc in frame[["model", "seed", "test_acc"]].itertuples(index=False)])
    numeric = frame.drop(columns=["seed"]).groupby(["model", "method"], sort=False)
    table = numeric.mean(numeric_only=True)
    table["seeds"] = numeric.size()
    table["acc_spread"] = numeric["test_acc"].max() - numeric["test_acc"].min()
    return table.reset_index()


def markdown(table: pd.DataFrame) -> str:
    def pct(value, signed=False):
        return "" if pd.isna(value) else (f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}")

    def frac(value):
        return "" if pd.isna(value) else f"{value:.3f}"

    header = ("| model | method | seeds | test acc % (spread) | vs standard (pts) | KRR | weight share (conv) | "
              "overlap (conv) | FLOPs 2 / 5 | 2-class: no FT / FT / standard % | 5-class: no FT / FT / standard % |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in table.to_dict("records"):
        reuse = {m: " / ".join(pct(r.get(f"{k}_{m}")) for k in ("no_ft", "ft", "standard")) for m in (2, 5)}
        lines.append(
            f"| {r['model']} | {r['method']} | {r['seeds']} | {pct(r['test_acc'])} ({pct(r['acc_spread'])}) | "
            f"{pct(r['change'], True) if r['method'] != 'standard' else ''} | {frac(r.get('krr'))} | "
            f"{frac(r.get('weight_share'))} ({frac(r.get('weight_share_conv'))}) | "
            f"{frac(r.get('overlap'))} ({frac(r.get('overlap_conv'))}) | "
            f"{frac(r.get('flops_2'))} / {frac(r.get('flops_5'))} | "
            f"{reuse[2] if r['method'] != 'standard' else ''} | {reuse[5] if r['method'] != 'standard' else ''} |")
    return "\n".join(lines) + "\n"


def decisions(args) -> str:
    """Where MODA's units differ from MODA's code, measured on the trained MODA models: what each unit taps
    (ReLU taken over, another activation, or a BN with none), and at residual additions how many channels
    the union of both sides keeps over their intersection (MODA's code), in the one-class modules."""
    import collections
    import operator

    import torch

    from mwt_ray.core.checkpoint import build_model, load_checkpoint
    from mwt_ray.core.extract import EXTRACTION_RULES, Extraction
    from mwt_ray.core.graph import is_unit_op, module_of, per_unit_masks

    lines = ["| model | units: ReLU / other activation / no activation | additions | channels after additions: "
             "union / intersection |", "|---|---|---|---|"]
    for model in args.models:
        folder = args.out / run_name(model, "moda", args.seeds[0])
        if not (folder / "checkpoint.pt").is_file():
            continue
        state = load_checkpoint(folder / "checkpoint.pt")
        gm = build_model(state).eval()
        taps = collections.Counter()
        for node in gm.graph.nodes:
            if is_unit_op(node):
                tapped = module_of(gm, node.args[1]) if isinstance(node.args[1].target, str) else None
                taps["relu" if node.args[3] else "none" if isinstance(tapped, torch.nn.BatchNorm2d) else "other"] += 1
        union = intersection = additions = 0
        for keep in state["module_masks"]:
            extraction = Extraction(gm, per_unit_masks(gm, keep), torch.zeros(1, 3, 32, 32), model, EXTRACTION_RULES)
            extraction.run()
            for node in gm.graph.nodes:
                sides = [extraction.channels(a) for a in node.args[:2]] if node.target in (
                    operator.add, operator.iadd, torch.add) else []
                if len(sides) == 2 and all(s is not None for s in sides):
                    additions += 1
                    union += len(extraction.channels(node))
                    intersection += int(torch.isin(sides[0], sides[1]).sum())
        classes = len(state["module_masks"])
        lines.append(f"| {model} | {taps['relu']} / {taps['other']} / {taps['none']} | {additions // classes} | "
                     f"{union / classes:.0f} / {intersection / classes:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=5000, help="class-balanced training images")
    parser.add_argument("--reuse-epochs", type=int, default=3, help="fine-tuning epochs of a reused module")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--table-only", action="store_true", help="only the table, from the finished runs")
    parser.add_argument("--decisions", action="store_true", help="also measure the MODA decisions (units by "
                        "what they tap, union vs intersection at residual additions) on the first seed's models")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if "standard" not in args.methods:
        parser.error("--methods must include standard: every method is compared with it")
    runs = [(model, method, seed) for seed in args.seeds for model in args.models for method in args.methods]
    if not args.table_only:
        print(f"{len(runs)} runs, {args.parallel} at a time, into {args.out}", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:  # seed by seed, each a whole table's worth
            for seed in args.seeds:
                of_seed = [run for run in runs if run[2] == seed]  # standard runs first: reuse compares with them
                list(pool.map(lambda run: train(args, *run), sorted(of_seed, key=lambda run: run[1] != "standard")))
                list(pool.map(lambda run: reuse(args, *run, subtasks_of(run[2])), of_seed))
    rows = [row for run in runs if (row := run_row(args, *run)) is not None]
    table = summarise(pd.DataFrame(rows))
    (args.out / "methods.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": rows}, indent=2, default=float))
    text = markdown(table)
    if args.decisions:
        text += "\nMODA's units and residual additions (first seed):\n\n" + decisions(args)
    (args.out / "methods.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
