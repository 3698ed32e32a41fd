"""experiments/parallel_runs.py: a plan of in-process training jobs side by side, a deadline that
stops the slow ones, ``--resume`` that finishes them from their checkpoints, and one error line for a
bad plan. Real jobs on the embedded digits, small and short."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = "data.name=digits model.width=0.125 train.batch_size=64"


def run(plan: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "experiments/parallel_runs.py", str(plan), "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def epochs_done(out: Path, name: str) -> int:
    return max((int(p.name.rsplit("_", 1)[1]) for p in (out / "runs" / name / "jobs").glob("*/checkpoint_epoch_*")),
               default=0)


def test_deadline_stops_a_job_and_resume_finishes_it(tmp_path):
    plan, out = tmp_path / "plan.txt", tmp_path / "out"
    plan.write_text(f"# two jobs\nquick tune_configs/quickstart.yaml {SMALL} train.epochs=1 train.modular=false\n"
                    f"slow tune_configs/quickstart.yaml {SMALL} train.epochs=500\n")
    first = run(plan, out, "--parallel", "2", "--deadline", "60")
    assert first.returncode == 1, first.stderr
    assert (out / "runs" / "quick" / "metrics.json").exists()
    assert not (out / "runs" / "slow" / "metrics.json").exists()
    stopped_at = epochs_done(out, "slow")
    assert stopped_at > 0, "the stopped job left no epoch checkpoint to resume from"
    # The same job, now planned to end one epoch after where the deadline stopped it.
    plan.write_text(f"slow tune_configs/quickstart.yaml {SMALL} train.epochs={stopped_at + 1}\n")
    second = run(plan, out, "--resume")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from epoch {stopped_at}" in (out / "slow.log").read_text()
    with open(out / "runs" / "slow" / "history.csv") as table:
        assert [int(row["epoch"]) for row in csv.DictReader(table)] == list(range(1, stopped_at + 2))


@pytest.mark.parametrize("plan_text, message", [
    ("only-a-name\n", "plan.txt:1: expected '<name> <config.yaml> [key=value ...]'"),
    ("a tune_configs/quickstart.yaml\na tune_configs/quickstart.yaml\n", "plan.txt:2: job name 'a' is used twice"),
    ("a tune_configs/quickstart.yaml train.epochs\n", "plan.txt:1: expected"),
    ("# nothing but a comment\n", "holds no job"),
    ("a tune_configs/missing.yaml\n", "plan job 1 (a): config file 'tune_configs/missing.yaml' does not exist"),
    ("a tune_configs/quickstart.yaml train.epochs=0\n", "plan job 1 (a): invalid config"),
    ("a tune_configs/quickstart.yaml data.name=folder data.root=/nonexistent\n", "plan job 1 (a): data path"),
])
def test_bad_plan_is_one_error_line_and_writes_nothing(tmp_path, plan_text, message):
    plan, out = tmp_path / "plan.txt", tmp_path / "out"
    plan.write_text(plan_text)
    result = run(plan, out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()


def test_parallel_below_one_and_missing_plan(tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text("a tune_configs/quickstart.yaml\n")
    result = run(plan, tmp_path / "out", "--parallel", "0")
    assert result.returncode == 2 and result.stderr.strip() == "error: --parallel is 0; it must be at least 1"
    result = run(tmp_path / "absent.txt", tmp_path / "out")
    assert result.returncode == 2 and "error: plan" in result.stderr and "cannot be read" in result.stderr
