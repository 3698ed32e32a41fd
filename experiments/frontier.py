"""The accuracy / KRR frontier: modular runs against a standard run of the same budget,
one panel per budget, in a table (Markdown + CSV) and a plot.

    python experiments/frontier.py --out experiments/results/frontier \
        --panel "VGG16/4, CIFAR-10, 15 epochs" runs/cifar10-vgg16-standard runs/cifar10-vgg16-modular* \
        --panel "screen: 10k images, 8 epochs" runs/cifar10-vgg16-options/<time>/standard \
                runs/cifar10-vgg16-options/<time>/trials/trial-*

Each argument after a panel's title is a run folder holding ``metrics.json`` (what every training
job writes); the first is the standard run. A point is the modular model's test accuracy and its
modules' KRR at the run's ``modularize.tau``; its label names the options that differ from the
paper's method; each option's line joins its points that no other point of the same option beats
on both axes (its front). The shaded boxes are the targets set for the frontier (at most 1.6 points lost at KRR <= 0.34;
at most 3 points lost at KRR <= 0.25).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mwt_ray.config import TrainConfig

OPTIONS = {"warmup_epochs": "warm-up {:g}", "warmup_shape": "{} ramp", "sparsity": "sparsity {:g}",
           "generator_lr_scale": "generator lr x{:g}", "mask_bias_init": "bias init {:g}",
           "detach_generator_input": "detached generator input"}
TARGETS = [(0.34, -1.6), (0.25, -3.0)]
FLOOR_PP = -16  # the plots' lowest accuracy change; runs that collapsed below it are drawn on that edge


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """The points no other point beats on both axes (lower KRR, smaller accuracy loss), by KRR."""
    points = points.sort_values(["krr", "change_pp"], ascending=[True, False])
    best, keep = -float("inf"), []
    for index, change in points["change_pp"].items():
        if change > best:
            keep.append(index)
            best = change
    return points.loc[keep]


def changed_options(train: dict) -> list[str]:
    """The options of ``OPTIONS`` a run set away from the paper's defaults (a warm-up shape counts
    only with a warm-up)."""
    defaults = TrainConfig().model_dump()
    return [key for key in OPTIONS if train.get(key, defaults[key]) != defaults[key]
            and (key != "warmup_shape" or train.get("warmup_epochs"))]


def label(train: dict) -> str:
    """'paper' or the settings that differ from it, e.g. 'alpha 0.36, warm-up 3, sparsity 0.5'."""
    defaults = TrainConfig().model_dump()
    parts = [f"{key} {train[key]:.2g}" for key in ("alpha", "beta") if train[key] != defaults[key]]
    parts += [OPTIONS[key].format(train[key]) for key in changed_options(train)]
    return ", ".join(parts) or "paper (alpha 0.5, beta 1.5)"


def family(train: dict) -> str:
    """Which option a point measures (the colour in the plot); the warm-up alone is its own family."""
    changed = [key for key in changed_options(train) if key != "warmup_epochs"]
    if len(changed) > 1:
        return "combination"
    return changed[0] if changed else "warm-up" if train.get("warmup_epochs") else "paper"


def read_panel(title: str, folders: list[str]) -> pd.DataFrame:
    standard = json.loads((Path(folders[0]) / "metrics.json").read_text())
    if standard["config"]["train"]["modular"]:
        raise SystemExit(f"error: the first run of panel {title!r} must be a standard run, {folders[0]} is modular")
    base = standard["final"]["test_accuracy"]
    rows = [{"panel": title, "run": Path(folders[0]).name, "label": "standard", "family": "standard",
             "test_accuracy": base, "change_pp": 0.0}]
    for folder in folders[1:]:
        path = Path(folder) / "metrics.json"
        if not path.is_file():
            print(f"skipping {folder}: no metrics.json (unfinished?)")
            continue
        m = json.loads(path.read_text())
        modules, train = m["modules"], m["config"]["train"]
        change = 100 * (m["final"]["test_accuracy"] - base)
        rows.append({"panel": title, "run": Path(folder).name, "label": label(train), "family": family(train),
                     "test_accuracy": m["final"]["test_accuracy"],
                     "change_pp": change, "tau": m["config"]["modularize"]["tau"],
                     "krr": modules["krr"], "cohesion": modules.get("cohesion"),
                     "raw_cohesion": modules.get("raw_cohesion"), "coupling": modules["coupling"],
                     "layer_krr": " ".join(f"{v:.2f}" for v in modules["layer_krr"]),
                     "meets_target": any(modules["krr"] <= k and change >= d for k, d in TARGETS)})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path, references: list[tuple[str, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(table["panel"]))
    columns = min(2, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows_of_panels, columns, figsize=(6.5 * columns, 5 * rows_of_panels), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    colours = dict(zip(["paper", "warm-up", "sparsity", "generator_lr_scale", "mask_bias_init", "warmup_shape",
                        "detach_generator_input", "combination"], plt.get_cmap("tab10").colors))
    for ax, title in zip(axes, panels):
        rows = table[(table["panel"] == title) & (table["family"] != "standard")]
        for (k, d), shade in zip(TARGETS, (0.25, 0.12)):
            ax.fill_between([0, k], d, 1.0, color="tab:green", alpha=shade, lw=0)
            ax.text(k, d, f" target: >= {d:g} pp at KRR <= {k:g}", fontsize=7, va="bottom", ha="right")
        floor = max(min(-12, rows["change_pp"].min() - 1), FLOOR_PP)
        shown_change = rows["change_pp"].clip(lower=floor + 0.5)  # collapsed runs sit on the bottom edge
        for name, group in rows.groupby("family"):
            front = pareto_front(group)
            ax.plot(
                group["krr"],
                shown_change[group.index],
                "o",
                color=colours[name],
                label=name.replace("_", " "),
                alpha=0.85,
            )
            if len(front) > 1:
                ax.plot(front["krr"], shown_change[front.index], "-", color=colours[name], alpha=0.85)
        for i, (index, row) in enumerate(
            rows.sort_values("krr").iterrows()
        ):  # alternate sides: close points stay legible
            text = row["label"] + (f" ({row['change_pp']:.1f} pp)" if row["change_pp"] < floor else "")
            ax.annotate(text, (row["krr"], shown_change[index]), fontsize=6, xytext=(3, 4 if i % 2 else -10),
                        textcoords="offset points")
        if ax is axes[0]:
            for text, krr, change in references:
                ax.plot(krr, change, "kx", ms=8)
                ax.annotate(text, (krr, change), fontsize=6, xytext=(3, -9), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set(title=title, xlabel="KRR of the modules (lower: smaller modules)",
               ylabel="test accuracy change vs the standard run (pp)",
               xlim=(0, max(0.7, rows["krr"].max() + 0.05)), ylim=(floor, 1))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", nargs="+", action="append", required=True, metavar="TITLE RUN",
                        help="a title, the standard run folder, then the modular run folders")
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="LABEL:KRR:CHANGE",
        help="a point from elsewhere, drawn as a cross in the first panel, e.g. 'earlier run:0.336:-6.22'",
    )
    parser.add_argument("--out", required=True, help="folder for frontier.csv, frontier.md, frontier.png")
    args = parser.parse_args()
    if any(len(p) < 3 for p in args.panel):
        parser.error("each --panel needs a title, a standard run and at least one modular run")
    try:
        references = [(text, float(krr), float(change)) for text, krr, change in
                      (item.rsplit(":", 2) for item in args.reference)]
    except ValueError:
        parser.error(f"--reference takes LABEL:KRR:CHANGE, got {args.reference}")
    table = pd.concat([read_panel(p[0], p[1:]) for p in args.panel], ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "frontier.csv", index=False)
    shown = table.drop(columns=["family"]).round(4)
    (out / "frontier.md").write_text(shown.to_markdown(index=False) + "\n")
    plot(table, out / "frontier.png", references)
    print(shown.drop(columns=["layer_krr", "panel"]).to_string(index=False))
    print(f"wrote frontier.csv, frontier.md, frontier.png to {out}")


if __name__ == "__main__":
    main()
