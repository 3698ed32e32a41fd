"""experiments/parallel_runs.py: a plan of in-process training jobs side by side, a deadline that
stops the slow ones, ``--resume`` that finishes them from their checkpoints, and one error line for a
bad plan. Real jobs on the embedded digits, small and short."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "parallel_runs.py"
SMALL = "data.name=digits data.train_limit=320 model.width=0.125 train.batch_size=64"


def run(plan: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "experiments/parallel_runs.py", str(plan), "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def epochs_done(out: Path, name: str) -> int:
    return max((int(p.name.rsplit("_", 1)[1]) for p in (out / "runs" / name / "jobs").glob("*/checkpoint_epoch_*")),
               default=0)


def load_script():
    """experiments/parallel_runs.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("parallel_runs_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deadline_stops_a_job_and_resume_finishes_it(tmp_path, monkeypatch, capsys):
    """The deadline falls when the test decides, not when the machine's speed makes it fall: the
    script runs here with a clock that stands at 0 until the quick job has exited and the slow one
    has stored an epoch checkpoint, and then jumps past the deadline. (With a real 60 s deadline the
    slow job had not finished its first epoch on a busy machine.) The jobs are real processes."""
    plan, out = tmp_path / "plan.txt", tmp_path / "out"
    plan.write_text(f"# two jobs\nquick tune_configs/quickstart.yaml {SMALL} train.epochs=1 train.modular=false\n"
                    f"slow tune_configs/quickstart.yaml {SMALL} train.epochs=500\n")
    script, deadline, children, fell = load_script(), 60.0, {}, []
    # Only against a stalled machine, so that the test ends instead of hanging: not what decides it.
    hang_guard = time.monotonic() + 600

    def popen(command, **kwargs):  # the script's Popen, keeping each job's process for the clock to look at
        process = subprocess.Popen(command, **kwargs)
        children[command[command.index("--job") + 1]] = process
        return process

    def clock() -> float:
        if not fell:
            quick, slow = children.get("quick"), children.get("slow")
            quick_exited = quick is not None and quick.poll() is not None
            # A slow job that exited on its own also ends the wait: the assertions below then say why.
            slow_ready = slow is not None and (slow.poll() is not None or epochs_done(out, "slow") > 0)
            if quick_exited and slow_ready:
                fell.append("events")
            elif time.monotonic() > hang_guard:
                fell.append("hang guard")
        return deadline + 1 if fell else 0.0

    monkeypatch.setattr(script, "time", SimpleNamespace(monotonic=clock, sleep=time.sleep))
    monkeypatch.setattr(script, "subprocess", SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT))
    monkeypatch.chdir(REPO)  # the plan's config paths are relative to the repository, as in the run below
    # Two jobs on CI's 2 cores: one torch thread each is their share. More threads than cores spin in
    # OpenMP waits and make a loaded machine several times slower (speed only: the clock decides).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = script.main([str(plan), "--out", str(out), "--parallel", "2", "--deadline", str(deadline)])
    printed = capsys.readouterr()
    assert fell == ["events"], (
        f"the jobs stalled: after 600 s quick had not exited or slow had no checkpoint\n{printed.out}"
    )
    assert code == 1, printed.err
    assert children["quick"].returncode == 0, (out / "quick.log").read_text()
    assert children["slow"].returncode == -9, (out / "slow.log").read_text()  # killed at the deadline
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


GOOD = "a tune_configs/quickstart.yaml\n"


@pytest.mark.parametrize(
    "plan_text, extra, message",
    [
        ("only-a-name\n", [], "plan.txt:1: expected '<name> <config.yaml> [key=value ...]'"),
        (
            "a tune_configs/quickstart.yaml\na tune_configs/quickstart.yaml\n",
            [],
            "plan.txt:2: job name 'a' is used twice",
        ),
        ("a tune_configs/quickstart.yaml train.epochs\n", [], "plan.txt:1: expected"),
        ("# nothing but a comment\n", [], "holds no job"),
        ("a tune_configs/missing.yaml\n", [], "plan job 1 (a): config file 'tune_configs/missing.yaml' does not exist"),
        ("a tune_configs/quickstart.yaml train.epochs=0\n", [], "plan job 1 (a): invalid config"),
        ("a tune_configs/quickstart.yaml data.name=folder data.root=/nonexistent\n", [], "plan job 1 (a): data path"),
        # An --out that cannot be written is bad input too (it was an OSError from mkdir: exit 1). A file in
        # the way, and sysfs, where no one can create files: CI runs as root, for whom chmod blocks nothing.
        (GOOD, ["--out", "{tmp}/a-file"], "--out '{tmp}/a-file' cannot be written ({tmp}/a-file is not a folder)"),
        (
            GOOD,
            ["--out", "{tmp}/a-file/out"],
            "--out '{tmp}/a-file/out' cannot be written ({tmp}/a-file is not a folder)",
        ),
        (
            GOOD,
            ["--out", "/sys/mwt_ray_parallel_runs/out"],
            "--out '/sys/mwt_ray_parallel_runs/out' cannot be written (/sys:",
        ),
        # Argument errors: one line, not argparse's usage block.
        (GOOD, ["--parallel", "two"], "argument --parallel: invalid int value: 'two'"),
        (GOOD, ["--deadline", "soon"], "argument --deadline: invalid float value: 'soon'"),
        (GOOD, ["--deadline", "0"], "--deadline is 0; it must be a positive number of seconds"),
        (GOOD, ["--deadline", "nan"], "--deadline is nan; it must be a positive number of seconds"),
        (GOOD, ["--bogus"], "unrecognized arguments: --bogus"),
        (GOOD, ["--set"], "argument --set: expected one argument"),
    ],
)
def test_bad_plan_is_one_error_line_and_writes_nothing(tmp_path, plan_text, extra, message):
    plan, out, a_file = tmp_path / "plan.txt", tmp_path / "out", tmp_path / "a-file"
    plan.write_text(plan_text)
    a_file.write_text("not a folder\n")  # for the --out cases
    result = run(plan, out, *[e.format(tmp=tmp_path) for e in extra])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(tmp=tmp_path) in lines[0], (
        result.stderr
    )
    # Nothing written: no output folder, nothing else beside the plan, the file left as it was.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "plan.txt"] and not out.exists()
    assert a_file.read_text() == "not a folder\n"
    assert not Path("/sys/mwt_ray_parallel_runs").exists()


def test_a_plan_that_is_a_pipe_is_refused_without_waiting(tmp_path):
    """Opening a FIFO for reading waits for a writer forever; the plan is refused from os.stat alone."""
    import os

    plan = tmp_path / "plan.fifo"
    os.mkfifo(plan)
    result = run(plan, tmp_path / "out")
    assert result.returncode == 2 and result.stderr.strip() == \
        f"error: plan '{plan}' is not a regular file (a FIFO, a device or a folder)", result.stderr
    assert not (tmp_path / "out").exists()


def test_parallel_below_one_and_missing_plan(tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text("a tune_configs/quickstart.yaml\n")
    result = run(plan, tmp_path / "out", "--parallel", "0")
    assert result.returncode == 2 and result.stderr.strip() == "error: --parallel is 0; it must be at least 1"
    result = run(tmp_path / "absent.txt", tmp_path / "out")
    assert result.returncode == 2 and "error: plan" in result.stderr and "cannot be read" in result.stderr
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr == "error: the plan file is required\n"
    assert not (tmp_path / "out").exists()
