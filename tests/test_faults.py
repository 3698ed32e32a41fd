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
from helpers import empty_store, mlflow_client, only_run

from mwt_ray.core.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

REPO = Path(__file__).resolve().parents[1]


def command(tmp: Path, name: str, epochs: int, *more: str) -> list[str]:
    return [sys.executable, "-m", "mwt_ray.train", "--set", f"name={name}", "--set", f"output_dir={tmp / 'runs'}",
            "--set", f"train.epochs={epochs}", "--set", "data.train_limit=300", "--set", "model.width=0.125",
            "--set", "train.batch_size=32", "--set", "modularize.cohesion_samples_per_class=20",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *more]


def environment(tmp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "MWT_RAY_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}


def start(tmp: Path, name: str, epochs: int) -> subprocess.Popen:
    """The job as a terminal starts it. A suite started in the background by a shell without job
    control (``cmd &`` in a script) ignores SIGINT, and an ignored signal stays ignored in every
    child: Ctrl-C would then never reach the job. A handler here (not SIG_IGN) gives the child
    SIGINT's default, as a foreground job has."""
    empty_store(tmp / "mlflow.db")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command(tmp, name, epochs), cwd=tmp, env=environment(tmp), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


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
            pytest.fail(
                f"the job ended (status {process.returncode}) before epoch {epoch}: {process.stderr.read()[-2000:]}"
            )
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
    statuses = sorted(
        r.info.status for r in client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])
    )
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
    assert len(lines) == 1 and lines[0].startswith(f"error: stopped by {name}") and "--resume" in lines[0], stderr[
        -3000:
    ]
    run = only_run(mlflow_client(tmp_path))
    assert run.info.status == "KILLED"
    (job,) = jobs(tmp_path, "t")
    assert (job / "checkpoint_epoch_0001" / "training_state.pt").is_file()  # what was done is kept


def test_sigterm_of_a_data_parallel_job(tmp_path):
    """ray.init installs its own SIGTERM handler (a stack dump, then abort: exit 134); the command's
    handler is put back, so a data-parallel job ends like a single-process one."""
    empty_store(tmp_path / "mlflow.db")
    process = subprocess.Popen(command(tmp_path, "d", 6, "--num-workers", "2"), cwd=tmp_path, env=environment(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epoch(process, tmp_path, "d", 1, timeout=300)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM"), stderr[-3000:]
    assert only_run(mlflow_client(tmp_path)).info.status == "KILLED"


def test_a_sigterm_swallowed_in_a_finaliser_still_stops_the_command(capsys):
    """Python drops an exception raised inside a ``__del__`` (or a garbage-collection callback) with
    an "Exception ignored" line: a SIGTERM whose handler runs there must still stop the command."""
    from mwt_ray.cli import run_command

    steps = []

    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs here, inside __del__
                pass

    def action():
        Finaliser()  # collected at once
        steps.append("after the finaliser")
        for _ in range(300):
            time.sleep(0.01)
        steps.append("finished")

    assert run_command(action) == 143
    assert "finished" not in steps
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: stopped by SIGTERM"] and "Exception ignored" not in err


def test_a_sigterm_after_the_work_is_still_a_stop(capsys):
    from mwt_ray.cli import run_command

    assert run_command(lambda: os.kill(os.getpid(), signal.SIGTERM)) == 143
    assert capsys.readouterr().err.strip() == "error: stopped by SIGTERM"


def test_scratch_folders_of_killed_processes_go_and_live_ones_stay(tmp_path, monkeypatch):
    """A Ray worker killed mid-checkpoint never removes its scratch folder (the issue seen: a
    training_state.pt left in /tmp after a SIGTERM). Folders are named after their process; the next
    command's end, or a job's start, removes those of processes that are gone."""
    import tempfile

    from mwt_ray.cli import run_command
    from mwt_ray.core.files import remove_stale_scratch, scratch_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"mwt_ckpt_{dead.pid}_abc"
    left.mkdir()
    (left / "training_state.pt").write_bytes(b"state")
    with scratch_folder() as mine:
        assert mine.parent == tmp_path and mine.name.startswith(f"mwt_ckpt_{os.getpid()}_")
        assert remove_stale_scratch() == [left] and mine.is_dir() and not left.exists()
    assert not mine.exists()
    left.mkdir()
    assert run_command(lambda: None) == 0 and not left.exists()  # every command cleans up at its end


# ----------------------------------------------------------------------------- a full disk

def mount_small_disk(folder: Path, size: str) -> None:
    """A tmpfs of ``size`` at ``folder``: a disk that fills up (output folder and MLflow store on it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {result.stderr.strip()}")


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    mount_small_disk(disk, "3m")  # the MLflow store fits, a checkpoint of the tiny model (~2.4 MB) does not
    yield disk
    unmount(disk)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its disk is full; the filler file."""
    filler = folder / "filler"
    with open(filler, "wb") as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
        except OSError:
            pass
    return filler


def disk_command(disk: Path, name: str, epochs: int, *more: str) -> list[str]:
    return [sys.executable, "-m", "mwt_ray.train", "--set", f"name={name}", "--set", f"output_dir={disk / 'runs'}",
            "--set", f"train.epochs={epochs}", "--set", "data.train_limit=100", "--set", "model.width=0.125",
            "--set", "train.batch_size=32", "--set", "modularize.cohesion_samples_per_class=10",
            "--set", f"tracking.tracking_uri=sqlite:///{disk / 'mlflow.db'}", *more]


def store_runs(disk: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{disk / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])


@pytest.mark.parametrize("scratch_on_disk", [False, True], ids=["scratch elsewhere", "scratch on the full disk"])
def test_full_disk_is_one_line_leaves_no_partial_checkpoint_and_ends_the_run(small_disk, tmp_path, scratch_on_disk):
    """A full disk prints none of MLflow's logged tracebacks and leaves no .partial-checkpoint
    folder nor a run RUNNING: one line that says the disk is full (ENOSPC),
    exit 1, no partial copy, and the run FAILED, or the line says it could not be marked. With room
    again, --resume continues in the same run. The checkpoint's scratch folder (TMPDIR) is either on
    another disk or on the full one (torch.save then fails without an errno)."""
    env = {**environment(tmp_path), "TMPDIR": str(small_disk / "tmp") if scratch_on_disk else str(tmp_path)}
    (small_disk / "tmp").mkdir()
    result = subprocess.run(disk_command(small_disk, "full", 2), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full (ENOSPC): no space left on the device of "), lines[
        :5
    ]
    assert "--resume" in lines[0]
    assert not [p for p in small_disk.rglob(".partial-*")], sorted(small_disk.rglob("*"))
    _, (run,) = store_runs(small_disk)
    if "could not be marked FAILED" in lines[0]:  # the store shares the full disk: said, and it stays RUNNING
        assert (
            run.info.status == "RUNNING" and f"MLflow run {run.info.run_id}" in lines[0] and "stays RUNNING" in lines[0]
        )
    else:
        assert run.info.status == "FAILED"
    if not scratch_on_disk:  # the copy failed, its partial folder was removed: the store was writable again
        assert run.info.status == "FAILED", lines[0]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = subprocess.run(disk_command(small_disk, "full", 2, "--resume"), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, (again,) = store_runs(small_disk)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")) == [1, 2]


def test_store_filling_up_mid_job_says_the_run_could_not_be_ended(small_disk, tmp_path, monkeypatch, capsys):
    """The disk fills up after the first checkpoint (another program writes to it): logging the epoch
    to MLflow fails, and so does marking the run FAILED. One line says both; nothing half-written stays;
    with the space back, --resume logs the missing epoch once and finishes the run."""
    import torch

    from mwt_ray.jobs.training_job import LocalSession
    from mwt_ray.train import main

    store_folder = small_disk / "store"
    store_folder.mkdir()
    original = LocalSession.persist
    filled = []

    def persist_then_fill(self, folder, name, metrics):
        original(self, folder, name, metrics)
        if name == "checkpoint_epoch_0001" and not filled:
            filled.append(fill(small_disk))

    monkeypatch.setattr(LocalSession, "persist", persist_then_fill)
    monkeypatch.setenv("MWT_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = [a for a in disk_command(small_disk, "mid", 2)[3:]]
    argv[argv.index(f"tracking.tracking_uri=sqlite:///{small_disk / 'mlflow.db'}")] = \
        f"tracking.tracking_uri=sqlite:///{store_folder / 'mlflow.db'}"
    argv[argv.index(f"output_dir={small_disk / 'runs'}")] = (
        f"output_dir={tmp_path / 'runs'}"  # checkpoints fit elsewhere
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert main(argv) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1, lines[:5]
        assert lines[0].startswith(
            f"error: disk full (ENOSPC): the MLflow store sqlite:///{store_folder / 'mlflow.db'} "
            "cannot be written (metrics of epoch 1)"
        ), lines[0]
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{store_folder / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])
        assert run.info.status == "RUNNING"
        assert f"the MLflow run {run.info.run_id} could not be marked FAILED and stays RUNNING (its store" in lines[0]
        assert not list(small_disk.rglob(".partial-*")) and not list((tmp_path / "runs").rglob(".partial-*"))

        filled[0].unlink()  # the space is back
        assert main(argv + ["--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")) == [1, 2]


# ----------------------------------------------------------------------------- an export killed or out of disk

@pytest.fixture(scope="module")
def export_source(tmp_path_factory):
    """The checkpoint of one tiny modular job (tracking off: each test's export has its own store)."""
    import torch

    from mwt_ray.config import load_config
    from mwt_ray.jobs import train_in_process

    out = tmp_path_factory.mktemp("export-source") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_in_process(load_config(None, ["name=src", f"output_dir={out}", "train.epochs=1", "data.train_limit=100",
                                            "model.width=0.125", "train.batch_size=32", "tracking.enabled=false",
                                            "modularize.cohesion_samples_per_class=10"]), log=None)
    finally:
        torch.set_num_threads(threads)
    return out / "src" / "checkpoint.pt"


def export_command(source: Path, out: Path, tmp: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "mwt_ray.export", "--run", str(source), "--classes", "3,5", "--out", str(out),
            "--set", "reuse.epochs=0", "--set", "reuse.latency_batch_sizes=[1]", "--set", "reuse.latency_repeats=1",
            "--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *more]


def module_runs(tmp: Path) -> list:
    client = mlflow_client(tmp)
    experiment = client.get_experiment_by_name("mwt-ray")
    return [] if experiment is None else client.search_runs([experiment.experiment_id], "tags.`mwt.kind` = 'module'")


@pytest.mark.parametrize("size, file", [("1m", "module.pt2"), ("2m", "module.onnx")])
def test_export_to_a_full_disk_is_one_line_and_publishes_nothing(export_source, tmp_path, size, file):
    """The output folder on a disk that fills up while ``file`` is written (the tiny model's
    module.pt2 and module.onnx are about 1.1 MB each): one line, exit 1, no module file, no staging
    folder, and no MLflow run, where torch.export.save used to abort the process (exit 134)."""
    disk = tmp_path / "disk"
    mount_small_disk(disk, size)
    try:
        empty_store(tmp_path / "mlflow.db")
        out = disk / "module"
        result = subprocess.run(export_command(export_source, out, tmp_path, "--register", "m"), cwd=tmp_path,
                                env=environment(tmp_path), capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, lines[:5]
        assert lines[0] == f"error: disk full (ENOSPC): no space left on the device of {out} to write {file}; " \
                           "nothing was written", lines[0]
        assert sorted(p.name for p in disk.iterdir()) == [], sorted(disk.rglob("*"))  # --out itself removed again
        assert module_runs(tmp_path) == []
    finally:
        unmount(disk)


def test_export_killed_mid_way_is_cleaned_by_the_next_export(export_source, tmp_path):
    """SIGKILL while the module is being logged to MLflow (its files published, its run RUNNING): the
    staging folder stays with the run's id; the next export into the folder removes it, marks that
    run FAILED, and ends with the module's files and its own FINISHED run."""
    import json

    empty_store(tmp_path / "mlflow.db")
    out = tmp_path / "module"
    process = subprocess.Popen(export_command(export_source, out, tmp_path, "--register", "m"), cwd=tmp_path,
                               env=environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, run_id = time.monotonic() + 240, None
    while run_id is None:
        for record in out.glob(".export-*/owner.json"):
            try:
                run_id = json.loads(record.read_text()).get("run_id")
            except (OSError, ValueError):  # replaced as it was read
                pass
        assert process.poll() is None, f"the export ended (status {process.returncode}) before its run was recorded"
        assert time.monotonic() < deadline, "no MLflow run recorded in 240 s"
        time.sleep(0.02)
    process.kill()
    process.communicate(timeout=30)
    (staging,) = out.glob(".export-*")
    assert staging.name.startswith(f".export-{process.pid}-")
    assert mlflow_client(tmp_path).get_run(run_id).info.status == "RUNNING"  # nobody could end it

    result = subprocess.run(export_command(export_source, out, tmp_path), cwd=tmp_path, env=environment(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removed {staging.name}, left by an export that was killed (pid {process.pid}); its MLflow run {run_id} " \
           "was left RUNNING, marked FAILED" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["module.json", "module.onnx", "module.pt2"]
    # Nothing but the export's own lines: no ONNX Runtime warning about a CUDA provider, no MLflow chatter.
    assert result.stderr.strip() == "", result.stderr[-3000:]
    assert "module of classes 3, 5 at tau 0.9" in result.stdout
    statuses = {run.info.run_id: run.info.status for run in module_runs(tmp_path)}
    assert statuses.pop(run_id) == "FAILED" and list(statuses.values()) == ["FINISHED"]
    assert json.loads((out / "module.json").read_text())["mlflow"]["run_id"] in statuses
