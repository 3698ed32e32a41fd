"""Reuse results as the paper's tables 5-7, plots against M, and their MLflow record.

``build_tables(rows)`` turns the per-sub-task rows (``jobs.SubtaskEvaluator.evaluate``) into a
``ReuseTables``: ``rows`` (one line per sub-task, sorted by M and classes) and ``summary`` (per M:
the mean of every measure), with the paper-shaped views ``krr_table`` (Table 5), ``cost_table``
(Table 6, plus the measured latency ratios) and ``accuracy_table`` (Table 7, plus the
zero-fine-tune accuracy). Percentages in the views are in %, as in the paper.

``write_report`` writes ``reuse_rows.csv``, ``reuse_summary.csv``, ``reuse_tables.md`` and
``reuse_vs_m.png`` (KRR, FLOPs reduction, latency ratio and accuracy against M); ``log_report``
uploads them under ``reuse/`` of an MLflow run and logs the per-M means as metrics with step = M
(``reuse_krr``, ``reuse_m_acc``, ...), beside whatever the run already holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..core.files import atomic_write_text
from .plots import save_figure

__all__ = ["ReuseTables", "build_tables", "write_report", "plot_reuse", "log_report", "REPORT_FILES"]

REPORT_FILES = ("reuse_rows.csv", "reuse_summary.csv", "reuse_tables.md", "reuse_vs_m.png")
# Per-M measures: (column in rows, name in the summary / MLflow metric suffix).
_MEASURES = (
    ("krr", "krr"), ("module_flops", "module_flops"), ("model_flops", "model_flops"),
    ("flops_reduction", "flops_reduction"), ("standard_accuracy", "M_acc"), ("module_accuracy", "m_acc"),
    ("accuracy_loss", "loss"), ("zero_ft_accuracy", "zero_ft_m_acc"), ("fine_tune_won", "fine_tune_won"),
    ("seconds", "seconds"),
    ("cpu_s", "cpu_s"), ("fine_tune_s", "fine_tune_s"), ("latency_s", "latency_s"),
)


@dataclass
class ReuseTables:
    rows: pd.DataFrame  # noqa: F821 - one row per sub-task
    summary: pd.DataFrame  # noqa: F821 - per M (index), the mean of each measure

    def _view(self, columns: dict[str, tuple[str, float]]):
        import pandas as pd

        view = pd.DataFrame(index=[f"{m}-class" for m in self.summary.index])
        for title, (column, scale) in columns.items():
            if column in self.summary:
                view[title] = self.summary[column].to_numpy() * scale
        view.index.name = "sub-task"
        return view

    def krr_table(self):
        """Table 5: mean KRR of the mixed modules per M (%)."""
        return self._view({"sub-tasks": ("subtasks", 1), "KRR (%)": ("krr", 100)})

    def cost_table(self):
        """Table 6: module FLOPs (millions) and reduction vs the model (%), plus measured latency ratios."""
        columns = {"FLOPs (M)": ("module_flops", 1e-6), "model FLOPs (M)": ("model_flops", 1e-6),
                   "Reduction (%)": ("flops_reduction", 100)}
        for col in self.summary.columns:
            if col.startswith("latency_ratio_b"):
                columns[f"latency module/model, batch {col[len('latency_ratio_b'):]}"] = (col, 1)
        return self._view(columns)

    def accuracy_table(self):
        """Table 7: M-ACC (standard model), m-ACC (the module reuse chose), loss = M-ACC - m-ACC (pp),
        the module's accuracy with no fine-tuning (%), and how often the fine-tuned module won the
        held-out choice over no fine-tuning (%; the rows say which won in "chosen")."""
        return self._view({"M-ACC": ("M_acc", 100), "m-ACC": ("m_acc", 100), "loss": ("loss", 100),
                           "m-ACC, no fine-tuning": ("zero_ft_m_acc", 100),
                           "fine-tuned chosen (%)": ("fine_tune_won", 100)})

    def to_markdown(self, title: str | None = None) -> str:
        parts = [f"# {title}\n"] if title else []
        for name, table in (("Kernel retention (Table 5)", self.krr_table()),
                            ("Cost (Table 6) and measured latency", self.cost_table()),
                            ("Accuracy (Table 7)", self.accuracy_table())):
            parts.append(f"## {name}\n\n{_markdown(table)}\n")
        parts.append(f"## Every sub-task\n\n{_markdown(self.rows, index=False)}\n")
        return "\n".join(parts)


def _markdown(frame, index: bool = True) -> str:
    """A pipe table (no tabulate dependency); floats with 4 significant digits."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if value != value else f"{value:.4g}"
        return str(value)

    header = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key, row in zip(frame.index, frame.itertuples(index=False)):
        lines.append("| " + " | ".join(([cell(key)] if index else []) + [cell(v) for v in row]) + " |")
    return "\n".join(lines)


def build_tables(rows: list[dict]) -> ReuseTables:
    import pandas as pd

    if not rows:
        raise ValueError("no reuse rows to tabulate")
    frame = pd.DataFrame(rows)
    frame["classes"] = frame["classes"].map(lambda c: " ".join(str(x) for x in c))
    frame = frame.sort_values(["m", "index"] if "index" in frame else ["m"]).reset_index(drop=True)
    latency = [c for c in frame.columns if c.startswith(("latency_ratio_b", "module_ms_b", "model_ms_b"))]
    grouped = frame.groupby("m")
    summary = pd.DataFrame({"subtasks": grouped.size()})
    for column, name in _MEASURES:
        if column in frame:
            summary[name] = grouped[column].mean()
    for column in latency:
        summary[column] = grouped[column].mean()
    summary.index.name = "M"
    return ReuseTables(frame, summary)


def plot_reuse(summary, path: str | Path, title: str | None = None) -> Path:
    """Four panels against M: KRR, FLOPs reduction, latency ratio (module / model), accuracy."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    m = summary.index.to_numpy()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(m, summary["krr"] * 100, "o-", color="C0")
    axes[0].set_ylabel("KRR (%)")
    if "flops_reduction" in summary:
        axes[1].plot(m, summary["flops_reduction"] * 100, "o-", color="C1")
    axes[1].set_ylabel("FLOPs reduction (%)")
    for col in [c for c in summary.columns if c.startswith("latency_ratio_b")]:
        axes[2].plot(m, summary[col], "o-", label=f"batch {col[len('latency_ratio_b'):]}")
    if "flops_reduction" in summary:
        axes[2].plot(m, 1 - summary["flops_reduction"], "k--", label="FLOPs ratio")
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].set_ylabel("latency module / model")
    axes[2].legend(fontsize=8)
    for col, label in (("M_acc", "M-ACC (standard)"), ("m_acc", "m-ACC (module)"),
                       ("zero_ft_m_acc", "m-ACC, no fine-tuning")):
        if col in summary:
            axes[3].plot(m, summary[col] * 100, "o-", label=label)
    axes[3].set_ylabel("test accuracy (%)")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("M (classes in the sub-task)")
        ax.set_xticks(m)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title, dpi=110)


def write_report(tables: ReuseTables, folder: str | Path, title: str | None = None) -> list[Path]:
    """Write ``REPORT_FILES`` into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "reuse_rows.csv", tables.rows.to_csv(index=False))
    atomic_write_text(folder / "reuse_summary.csv", tables.summary.to_csv())
    atomic_write_text(folder / "reuse_tables.md", tables.to_markdown(title))
    plot_reuse(tables.summary, folder / "reuse_vs_m.png", title)
    return [folder / name for name in REPORT_FILES]


def log_report(run, files: list[Path], tables: ReuseTables, settings: dict | None = None) -> None:
    """Upload ``files`` (and ``settings`` as reuse_settings.json) under ``reuse/`` of the MLflow run
    ``run`` (a ``runs.MlflowRun``) and log each per-M mean as a metric at step = M."""
    import tempfile
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"reuse_{column}", float(value), now, int(m))
               for column in tables.summary.columns if column != "subtasks"
               for m, value in tables.summary[column].items() if value == value]  # skip NaN
    for start in range(0, len(metrics), 1000):
        run.client.log_batch(run.run_id, metrics=metrics[start:start + 1000], synchronous=True)
    for path in files:
        run.client.log_artifact(run.run_id, str(path), artifact_path="reuse")
    if settings is not None:
        with tempfile.TemporaryDirectory(prefix="mwt_reuse_") as scratch:
            extra = Path(scratch) / "reuse_settings.json"
            extra.write_text(json.dumps(settings, indent=2, default=str))
            run.client.log_artifact(run.run_id, str(extra), artifact_path="reuse")
    run.client.set_tag(run.run_id, "mwt.reuse_subtasks", str(len(tables.rows)))
