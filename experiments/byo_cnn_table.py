"""The table of ``byo_cnn.sh`` from its run folders: accuracy, KRR, cohesion, coupling, 2-class reuse.

    python experiments/byo_cnn_table.py [RUNS]     # RUNS: the script's OUT (default experiments/results)

Reads each ``byo-*`` folder's ``metrics.json`` and, for modular runs, ``reuse/reuse_summary.csv``
(the mean over its sampled 2-class sub-tasks); prints a Markdown table, and per model whether the
modular seeds collapse (more than 20 points below the standard model, or seeds more than 10 apart:
the definition of a collapse used here, after MODA's report of MwT on MobileNet).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    rows = []
    for folder in sorted(root.glob("byo-*")):
        if not (folder / "metrics.json").is_file():
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        model, setting = folder.name[len("byo-"):].split("-", 1)
        row = {"model": model, "setting": setting, "test_acc": metrics["final"]["test_accuracy"]}
        modules = metrics.get("modules")
        if modules:
            row |= {"krr": modules["krr"], "cohesion": modules.get("cohesion"), "coupling": modules["coupling"]}
        reuse = folder / "reuse" / "reuse_summary.csv"
        if reuse.is_file():
            summary = pd.read_csv(reuse).iloc[0]
            row |= {"reuse_krr": summary["krr"], "reuse_flops_cut": summary["flops_reduction"],
                    "reuse_m_acc": summary["m_acc"], "reuse_standard_acc": summary.get("M_acc")}
        rows.append(row)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".4f"))
    for model, group in table.groupby("model"):
        standard = group.loc[group["setting"] == "standard", "test_acc"]
        seeds = group.loc[
            group["setting"].str.fullmatch(r"paper(-s\d+)?"), "test_acc"
        ]  # the seeds of the paper setting
        if standard.empty or seeds.empty:
            continue
        gap, spread = standard.iloc[0] - seeds.min(), seeds.max() - seeds.min()
        verdict = "collapses" if gap > 0.20 or spread > 0.10 else "does not collapse"
        print(f"{model}: paper setting, {len(seeds)} seed(s): {seeds.mean():.2%} mean, worst {gap * 100:.2f} points "
              f"below standard {standard.iloc[0]:.2%}, spread {spread * 100:.2f} points: {verdict}")


if __name__ == "__main__":
    main()
