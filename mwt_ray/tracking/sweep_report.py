"""What a sweep leaves for people: the results table, the accuracy-vs-KRR plot with its Pareto
front, and the MLflow parent run that holds them (each trial's run nested under it)."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from ..core.files import atomic_write_text
from ..core.messages import last_line
from .plots import save_figure
from .runs import MlflowRun, open_run

__all__ = ["open_parent_run", "log_trial_scan", "results_table", "plot_pareto", "close_child_runs", "report_sweep"]

# Columns of the results table after the searched values, in this order.
RESULT_COLUMNS = ["status", "epoch", "val_accuracy", "test_accuracy", "accuracy_change", "tau", "krr", "cohesion",
                  "coupling", "module_accuracy", "subtask_krr", "objective", "pareto", "retries", "error",
                  "mlflow_run_id"]
# Kept in results.csv, left out of the printed and Markdown tables (long, or only for machines).
CSV_ONLY = ("error", "mlflow_run_id")


def open_parent_run(cfg, run_id: str | None, log) -> MlflowRun:
    """The sweep's own MLflow run: the whole config (sweep.* included) as params."""
    named = cfg.model_copy(update={"name": f"{cfg.name} (sweep)"})
    return open_run(named, run_id, tags={"mwt.kind": "sweep"}, log=log)


def log_trial_scan(cfg, run_id: str, result: dict, scan: list[dict], scan_file: Path) -> None:
    """On the trial's run: the chosen tau, its score and module metrics, and the whole tau scan."""
    from mlflow.entities import Metric, Param

    run = MlflowRun.from_info({"tracking_uri": _uri(cfg), "run_id": run_id})
    now = int(time.time() * 1000)
    keys = ("tau", "krr", "cohesion", "coupling", "module_accuracy", "subtask_krr", "objective")
    metrics = [Metric(f"sweep.{k}", float(result[k]), now, 0) for k in keys if result.get(k) is not None]
    metrics += [Metric(f"tau_scan.{k}", float(row[k]), now, i) for i, row in enumerate(scan)
                for k in ("tau", "krr", "module_accuracy", "score")]
    # modularize.tau, a param of every run, is the config's; the tau the sweep scored the trial at is
    # its own param, so that the compare view shows both side by side without mixing them up.
    run.client.log_batch(run_id, metrics=metrics, params=[Param("sweep.scored_tau", f"{result['tau']:g}")],
                         synchronous=True)
    run.client.set_tag(run_id, "mwt.best_tau", f"{result['tau']:g}")
    run.client.log_artifact(run_id, str(scan_file))


def _uri(cfg) -> str:
    from .store import resolve_tracking_uri

    return resolve_tracking_uri(cfg.tracking.tracking_uri)


def results_table(cfg, grid, standard: dict | None, retries: dict[str, int] | None = None):
    """One row per trial: the searched values, what it reached, its tau and score, how often it
    lost its process or node and ran again (``retries``: trial id -> count); stopped and failed
    trials are marked, with the epoch they reached. A failed trial is one Tune gave up on (its
    retries spent) or one that ended with an error of its own (``trial_error``, never retried).
    In Tune's order, its ``pareto`` column empty: ranking the trials is ``jobs.objective.rank_trials``."""
    import pandas as pd

    from ..config import keys_unread_by

    keys = [key for key in cfg.sweep.space if key != "train.method"]
    names = [key.split(".")[-1] for key in keys]
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        method = result.config.get("train.method", cfg.train.method)
        row = {"trial": metrics.get("trial_id") or Path(result.path).name, "method": method}
        # a key the trial's method does not read was sampled but not used: left empty
        row |= {key.split(".")[-1] if names.count(key.split(".")[-1]) == 1 else key:
                None if key in keys_unread_by(method) else result.config.get(key) for key in keys}
        own_error = metrics.get("trial_error")
        status = ("failed" if result.error or own_error else
                  "completed" if "krr" in metrics and "tau" in metrics else "stopped early")
        row |= {key: metrics.get(key) for key in RESULT_COLUMNS
                if key not in ("status", "accuracy_change", "pareto", "retries", "error")}
        row["status"] = status
        row["retries"] = (retries or {}).get(str(row["trial"]), 0)
        row["error"] = last_line(result.error) if result.error else own_error
        if status != "completed":
            row.update(tau=None, krr=None, cohesion=None, coupling=None, module_accuracy=None, subtask_krr=None,
                       objective=None)
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in table:
            table[column] = None
    standard_accuracy = (standard or {}).get("final", {}).get("test_accuracy")
    table["accuracy_change"] = (table["test_accuracy"] - standard_accuracy) if standard_accuracy is not None else None
    lead = ["trial", "method"]
    order = lead + [c for c in table.columns if c not in RESULT_COLUMNS and c not in lead] + RESULT_COLUMNS
    return table[order]


def plot_pareto(table, path: Path, standard_accuracy: float | None, title: str, best: str | None = None) -> Path:
    """Two panels over KRR: the module accuracy the objective scores (held-out sub-tasks at each
    trial's tau), with the Pareto front and the best trial, and the modular model's test accuracy
    beside the standard model's."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    done = table[table["status"] == "completed"]
    front = done[done["pareto"]].sort_values("krr")
    chosen = done[done["trial"].astype(str) == str(best)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
    panels = (("module_accuracy", "module accuracy on held-out sub-tasks (%)\n(what the objective scores)"),
              ("test_accuracy", "test accuracy of the modular model (%)"))
    methods = sorted(done["method"].unique()) if "method" in done else []
    for ax, (column, label) in zip(axes, panels):
        for index, method in enumerate(methods):  # one colour and marker per method
            of_method = done[done["method"] == method]
            ax.scatter(of_method["krr"], 100 * of_method[column], color=f"C{index}", marker="os^Dv"[index % 5],
                       alpha=0.6, label=f"{method} trial (its best tau)")
        ax.plot(front["krr"], 100 * front[column], "-o", color="C3", label="Pareto front (module accuracy, KRR)")
        for row in done.itertuples():
            ax.annotate(str(row.trial)[-5:], (row.krr, 100 * getattr(row, column)), fontsize=7, alpha=0.7,
                        xytext=(3, 3), textcoords="offset points")
        if len(chosen):
            ax.scatter(chosen["krr"], 100 * chosen[column], marker="*", s=220, color="C2", zorder=3,
                       label="best trial")
        ax.set_xlabel("kernel retention rate (KRR, lower is smaller modules)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if standard_accuracy is not None:
        axes[1].axhline(100 * standard_accuracy, color="gray", linestyle="--", label="standard model")
    for ax in axes:
        ax.legend(fontsize=8)
    return save_figure(fig, path, title, dpi=120)


def _by_method(table) -> str:
    """Markdown: each method's best completed trial (the table is ranked best first), when it holds several."""
    done = table[table["status"] == "completed"]
    if done["method"].nunique() < 2:
        return ""
    columns = ["method", "trial", "test_accuracy", "accuracy_change", "tau", "krr", "module_accuracy", "objective"]
    return "Best trial of each method\n\n" + _markdown(done.groupby("method", sort=True).head(1)[columns]) + \
        "\nAll trials, best first\n\n"


def _markdown(table) -> str:
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    columns = [c for c in table.columns if c not in CSV_ONLY]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table[columns].itertuples(index=False)]
    return "\n".join(lines) + "\n"


STOPPED_EARLY_NOTE = ("Stopped early by the sweep's scheduler (ASHA) after epoch {epoch}: its score was below "
                      "the cutoff of the trials at that epoch. Not a failure: the sweep spent its epochs elsewhere.")


def _close_stopped_runs(cfg, parent: MlflowRun, table) -> None:
    """End the runs of trials that did not complete, never left RUNNING. One ASHA stopped did what
    the sweep asked of it: FINISHED, tagged ``mwt.trial_status = stopped early`` with a note (the
    run's description in the UI) saying so; KILLED would show the red cross of a run a user killed.
    A failed trial's run is FAILED."""
    client = parent.client
    experiment = client.get_run(parent.run_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    for row in table.itertuples():
        run = by_name.get(f"trial-{row.trial}")
        if run is None or row.status == "completed":
            continue
        client.set_tag(run.info.run_id, "mwt.trial_status", row.status)
        if row.status == "stopped early":
            client.set_tag(run.info.run_id, "mlflow.note.content", STOPPED_EARLY_NOTE.format(epoch=row.epoch))
            client.set_terminated(run.info.run_id, "FINISHED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")


def close_child_runs(parent: MlflowRun, status: str) -> list[str]:
    """End every child run of the sweep still RUNNING (trials, the baseline) with ``status``
    (KILLED: the sweep was interrupted; FAILED: it failed), tagged with why; returns their ids."""
    client = parent.client
    experiment = client.get_run(parent.run_id).info.experiment_id
    closed = []
    for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.run_id}' and "
                                                "attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "mwt.trial_status", "interrupted" if status == "KILLED" else "sweep failed")
        client.set_terminated(run.info.run_id, status)
        closed.append(run.info.run_id)
    return closed


def report_sweep(cfg, folder: Path, table, best: dict | None, standard: dict | None, parent: MlflowRun | None,
                 log: Callable[[str], None]) -> dict:
    """Write the ranked table (CSV, Markdown) and the plot, log them to the parent run, tag the best trial."""
    atomic_write_text(folder / "results.csv", table.to_csv(index=False))
    atomic_write_text(folder / "results.md", _by_method(table) + _markdown(table))
    standard_accuracy = (standard or {}).get("final", {}).get("test_accuracy")
    plot_pareto(table, folder / "pareto.png", standard_accuracy, f"{cfg.name}: {cfg.model.name} on {cfg.data.name}",
                best["trial"] if best else None)
    if parent is not None:
        client = parent.client
        for name in ("results.csv", "results.md", "pareto.png"):
            client.log_artifact(parent.run_id, str(folder / name))
        if best is not None:
            client.set_tag(parent.run_id, "mwt.best_trial", str(best["trial"]))
            if best.get("mlflow_run_id"):
                client.set_tag(parent.run_id, "mwt.best_run_id", str(best["mlflow_run_id"]))
            client.log_batch(parent.run_id, metrics=_best_metrics(best), synchronous=True)
        if standard and standard.get("mlflow_run_id"):
            client.set_tag(parent.run_id, "mwt.standard_run_id", standard["mlflow_run_id"])
        _close_stopped_runs(cfg, parent, table)
    log(table.drop(columns=list(CSV_ONLY)).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if standard_accuracy is not None:
        log(f"standard model: test accuracy {standard_accuracy:.2%}")
    if best is not None:
        log(f"best trial {best['trial']}: objective {best['objective']:.4f} at tau {best['tau']:.2f} "
            f"(KRR {best['krr']:.3f}, test accuracy {best['test_accuracy']:.2%})")
    log(f"wrote results.csv, results.md, pareto.png to {folder}")
    return {"folder": folder, "table": table, "best": best, "standard": standard}


def _best_metrics(best: dict):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(f"best.{key}", float(best[key]), now, 0)
            for key in ("objective", "tau", "krr", "cohesion", "coupling", "module_accuracy", "test_accuracy")
            if best.get(key) is not None and not (isinstance(best[key], float) and math.isnan(best[key]))]
