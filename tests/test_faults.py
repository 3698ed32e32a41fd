"""Real kills of ``python -m mwt_ray.train`` in one process: what a SIGKILL, a SIGTERM and a Ctrl-C
leave behind, and what ``--resume`` and a new job make of it.

The promise (README, "Failures"): every epoch is checkpointed before it is logged, so a SIGKILL loses
at most the epoch in progress; ``--resume`` continues the latest job of the name in the same MLflow
run with each epoch logged once; SIGTERM / SIGINT end with one line and the run marked KILLED; a run
left RUNNING by a SIGKILL is marked FAILED when a new job of that name starts.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mwt_ray.core.checkpoint import load_checkpoint

from conftest import mlflow_client, only_run

REPO = Path(__file__).resolve().parents[1]


def command(tmp: Path, name: str, epochs: int, *more: str) -> list[str]:
    return [sys.executable, "-m", "mwt_ray.train", "--set", f"name={name}", "--set", f"output_dir={tmp / 'runs'}",
            "--set", f"train.epochs={epochs}", "--set", "data.train_limit=300", "--set", "model.width=0.125",
            "--set", "train.batch_size=32", "--set", "modularize.cohesion_samples_per_class=20",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *more]


def environment(tmp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "MWT_RAY_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}


def start(tmp: Path, name: str, epochs: int) -> subprocess.Popen:
    return subprocess.Popen(command(tmp, name, epochs), cwd=tmp, env=environment(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def jobs(tmp: Path, name: str) -> list[Path]:
    return sorted((tmp / "runs" / name / "jobs").glob("job-*"))


def wait_for_epoch(process: subprocess.Popen, tmp: Path, name: str, epoch: int, timeout: float = 240) -> None:
    """Until the job has checkpointed ``epoch`` (and MLflow has it: the epoch is logged right after)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((job / f"checkpoint_epoch_{epoch:04d}" / "training_state.pt").exists() for job in jobs(tmp, name)):
            time.sleep(0.5)
            return
        if process.poll() is not None:
            pytest.fail(f"the job ended (status {process.returncode}) before epoch {epoch}: {process.stderr.read()[-2000:]}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"no checkpoint of epoch {epoch} after {timeout} s")


def finish(tmp: Path, name: str, epochs: int, *more: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command(tmp, name, epochs, *more), cwd=tmp, env=environment(tmp), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_sigkill_then_resume_logs_every_epoch_once(tmp_path):
    process = start(tmp_path, "k", epochs=3)
    wait_for_epoch(process, tmp_path, "k", 1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    (job,) = jobs(tmp_path, "k")
    client = mlflow_client(tmp_path)
    killed = only_run(client)
    assert killed.info.status == "RUNNING"  # nobody could end it
    done = sorted(int(p.name[-4:]) for p in job.glob("checkpoint_epoch_*"))
    assert done and done[-1] < 3 and not list(job.glob("final_*"))

    result = finish(tmp_path, "k", 3, "--resume")
    assert f"resuming job {job.name}" in result.stdout and f"resuming from epoch {done[-1]}" in result.stdout
    assert jobs(tmp_path, "k") == [job]  # the same job, not a new one
    run = only_run(client)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    for key in ("test_accuracy", "loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3], key
    final = load_checkpoint(tmp_path / "runs" / "k" / "checkpoint.pt")
    assert [m["epoch"] for m in final["history"]] == [1, 2, 3]
    state = load_checkpoint(next(job.glob("final_*")) / "training_state.pt")
    assert state["resumes"] == [done[-1]]
    # at most KEEP_CHECKPOINTS (2) checkpoint folders, the final one included, and no partial copy
    assert len([p for p in job.iterdir() if p.is_dir()]) == 2


def test_sigkill_then_new_job_marks_the_abandoned_run_failed(tmp_path):
    process = start(tmp_path, "n", epochs=3)
    wait_for_epoch(process, tmp_path, "n", 1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    (first,) = jobs(tmp_path, "n")

    result = finish(tmp_path, "n", 1)  # the same command without --resume: a new job from scratch
    assert "marked FAILED" in result.stdout
    second = [j for j in jobs(tmp_path, "n") if j != first]
    assert len(second) == 1 and list(second[0].glob("final_*"))
    client = mlflow_client(tmp_path)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])}
    statuses = sorted(r.info.status for r in client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id]))
    assert statuses == ["FAILED", "FINISHED"], runs
    state = load_checkpoint(next(second[0].glob("final_*")) / "training_state.pt")
    assert state["resumes"] == [] and [m["epoch"] for m in state["history"]] == [1]


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_sigterm_and_sigint_end_in_one_line_and_a_killed_run(tmp_path, sig, status, name):
    process = start(tmp_path, "t", epochs=4)
    wait_for_epoch(process, tmp_path, "t", 1)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: stopped by {name}") and "--resume" in lines[0], stderr[-3000:]
    run = only_run(mlflow_client(tmp_path))
    assert run.info.status == "KILLED"
    (job,) = jobs(tmp_path, "t")
    assert (job / "checkpoint_epoch_0001" / "training_state.pt").is_file()  # what was done is kept


def test_sigterm_of_a_data_parallel_job(tmp_path):
    """ray.init installs its own SIGTERM handler (a stack dump, then abort: exit 134); the command's
    handler is put back, so a data-parallel job ends like a single-process one."""
    process = subprocess.Popen(command(tmp_path, "d", 6, "--num-workers", "2"), cwd=tmp_path, env=environment(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epoch(process, tmp_path, "d", 1, timeout=300)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM"), stderr[-3000:]
    assert only_run(mlflow_client(tmp_path)).info.status == "KILLED"
