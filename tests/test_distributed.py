"""Data-parallel training on a real local Ray cluster (2 CPUs, gloo), tracked in a real MLflow store.

The cluster is started once for the module (``ray.init(num_cpus=2)``) and shut down at the end.
Ray Train's controller polls every 0.2 s instead of 2 s, which keeps each ``fit`` short.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
import ray.train  # noqa: E402
from helpers import free_port, mlflow_client, only_run, tiny_config  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402

from mwt_ray.cluster import loop_config, run_distributed, train_loop_per_worker  # noqa: E402
from mwt_ray.cluster.trainer import _prune_checkpoints, check_and_plan_distributed_job  # noqa: E402
from mwt_ray.core.checkpoint import build_model, load_checkpoint  # noqa: E402
from mwt_ray.jobs import RunStorage, SetupError, job_storage, latest_training_state, list_jobs  # noqa: E402
from mwt_ray.tracking import TrackingError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METRIC_KEYS = ("loss", "ce_loss", "cohesion_loss", "coupling_loss", "batch_cohesion", "batch_coupling", "kernel_rate",
               "train_accuracy", "test_accuracy", "lr", "epoch_time_s")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The in-process parts (single-process reference, plain-process loop) on one thread, like a
    Ray worker with 1 CPU; the machine has only 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")  # never another's cluster
    yield ray.cluster_resources()
    ray.shutdown()


def job_folder(cfg) -> str:
    """The folder of the latest (here: the only) job of ``cfg.name``."""
    return job_storage(cfg, list_jobs(cfg)[-1]).uri


@pytest.fixture(scope="module")
def two_worker_run(cluster, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("two_workers")
    cfg = tiny_config(tmp_path, "two")
    start = time.perf_counter()
    summary = run_distributed(cfg)
    return cfg, tmp_path, summary, time.perf_counter() - start


# ----------------------------------------------------------------------------- (1) end to end

def test_two_workers_end_to_end(two_worker_run):
    cfg, tmp_path, summary, _ = two_worker_run
    assert summary["epochs"] == 2 and summary["final"]["epoch"] == 2
    run_dir = cfg.run_dir.resolve()
    for name in ("checkpoint.pt", "metrics.json", "history.csv"):
        assert (run_dir / name).is_file(), name
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert [m["epoch"] for m in state["history"]] == [1, 2]
    model = build_model(state)  # the unwrapped module was saved: no "module." prefixes
    assert not any(k.startswith("module.") for k in state["model_state"])
    assert state["module_masks"].shape[0] == 10
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert json.loads((run_dir / "metrics.json").read_text())["modules"]["krr"] > 0

    # per-epoch training state in the Ray run storage, holding optimizer and scheduler too
    assert len(list_jobs(cfg)) == 1
    training_state = latest_training_state(job_folder(cfg))
    assert training_state["epoch"] == 2 and training_state["resumes"] == []
    assert training_state["optimizer_state"]["state"] and training_state["scheduler_state"]["last_epoch"] == 2

    client = mlflow_client(tmp_path)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2" and run.data.params["train.batch_size"] == "32"
    assert run.data.params["model.width"] == "0.125"
    for key in METRIC_KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint.pt", "module_masks.pt", "metrics.json", "history.csv", "convergence.png"} <= artifacts
    # The workers' stderr went to the job's log, and without Ray Train's per-report INFO lines.
    log = Path(job_folder(cfg)) / "worker_stderr.log"
    assert log.is_file() and "Reporting training result" not in log.read_text()


def test_a_new_job_unless_resumed(two_worker_run):
    """Without resume a run of the same name is a new job; with it, the latest job (no Ray needed)."""
    cfg, _, _, _ = two_worker_run
    (existing,) = list_jobs(cfg)
    _, fresh = check_and_plan_distributed_job(cfg)
    assert not fresh.resumed and fresh.job_id != existing and fresh.state is None
    _, resumed = check_and_plan_distributed_job(cfg, resume=True)
    assert resumed.resumed and resumed.job_id == existing and resumed.finished and resumed.state["epoch"] == 2
    assert list_jobs(cfg) == [existing]  # planning writes nothing


def test_resume_continues_same_job_and_mlflow_run(two_worker_run):
    """Resuming a finished job finds its final checkpoint: nothing is retrained or re-logged."""
    cfg, tmp_path, summary, first_seconds = two_worker_run
    again = run_distributed(cfg, resume=True)
    assert again["epochs"] == 2
    assert again["final"] == summary["final"]
    assert len(list_jobs(cfg)) == 1
    state = latest_training_state(job_folder(cfg))
    assert state["resumes"] == [2]
    client = mlflow_client(tmp_path)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1, 2]


# ----------------------------------------------------------------------------- (2) same loss and gradients

def _gradient_step(config: dict) -> None:
    """One modular step on the same global batch; with Ray Train each rank takes its slice."""
    import torch.distributed as dist

    from mwt_ray.cluster import worker as distributed
    from mwt_ray.config import TrainConfig
    from mwt_ray.core import models, training
    from mwt_ray.core.data import iterate_batches, load_dataset
    from mwt_ray.core.methods import get_method

    method = get_method(config["method"])
    settings = TrainConfig(method=method.name).optim_settings()

    rank, world_size = training.world()
    data = load_dataset("digits", train_limit=200)
    # The first global batch, split by rank exactly as train_epoch does.
    images, labels = next(iterate_batches(data.train_images, data.train_labels, 32, mean=data.mean, std=data.std,
                                          shuffle=True, seed=3, rank=rank, world_size=world_size))
    results = {}
    for gather in (True, False):
        torch.manual_seed(0)
        model = models.create_model("vgg16", 10, 0.125, method=method.name)
        # eval(): BatchNorm uses its running statistics, so each sample's logits and masks do not
        # depend on which other samples share its slice. In train mode every worker would
        # normalise with its own slice's statistics (DDP's documented behaviour), and the
        # comparison would test BatchNorm instead of the mask all-gather.
        model.eval()
        if world_size > 1:
            model = distributed.wrap_model(model)
        logits, masks = model(images, return_masks=True)
        if gather:
            all_masks, all_labels = training.gather_global_batch(masks, labels)
        else:  # what a worker optimises without the gather: its own slice's pairs only
            all_masks, all_labels = masks, labels
        loss, parts = method.objective(logits, labels, all_masks, all_labels, 10, settings, 1.0)
        loss.backward()
        values = torch.stack([loss.detach(), *(parts[name] for name in method.loss_names)])
        if world_size > 1:
            dist.all_reduce(values)  # the CE part is a per-slice mean: the global loss is the mean
            values /= world_size
        results["gathered" if gather else "local"] = {
            **dict(zip(("loss", *method.loss_names), values.tolist())), "labels": all_labels.clone(),
            "grads": {n: p.grad.clone() for n, p in training.unwrap_ddp(model).named_parameters()}}
    if rank == 0:
        torch.save(results, config["out"])


@pytest.mark.parametrize("method", ["mwt", "moda"])
def test_two_workers_match_one_process_loss_and_gradients(cluster, tmp_path, method):
    """Each method's signals (MwT's masks, MODA's pooled activations) all-gathered with autograd: two
    workers' losses and gradients are one process's on the whole batch."""
    from ray import cloudpickle  # Ray's own copy pickles the training function

    from mwt_ray.core.methods import get_method

    # Workers cannot import this test module: ship its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    single_path, dist_path = tmp_path / "single.pt", tmp_path / "dist.pt"
    _gradient_step({"out": str(single_path), "method": method})  # this process: world size 1
    TorchTrainer(_gradient_step, train_loop_config={"out": str(dist_path), "method": method},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(name="grads", storage_path=str(tmp_path / "ray"))).fit()
    single = torch.load(single_path, weights_only=True)["gathered"]
    both = torch.load(dist_path, weights_only=True)
    gathered, local = both["gathered"], both["local"]

    assert torch.equal(gathered["labels"], single["labels"])  # the gather rebuilt the global batch in order
    loss_names = get_method(method).loss_names
    for key in ("loss", *loss_names):
        assert gathered[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    assert set(gathered["grads"]) == set(single["grads"])
    generator_grads = 0
    for name, grad in single["grads"].items():
        torch.testing.assert_close(gathered["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        generator_grads += "mask_generator" in name and grad.abs().sum().item() > 0
    assert generator_grads > 0 or method != "mwt"  # MwT's generators did get gradients from cohesion/coupling
    # Without the gather each worker sees half the pairs: losses and gradients differ, so the
    # comparison above is sensitive to exactly what the gather provides.
    first = loss_names[0]
    assert abs(local[first] - single[first]) > 0.05 * abs(single[first])
    differs = [n for n, g in single["grads"].items() if ("mask_generator" in n or method != "mwt")
               and not torch.allclose(local["grads"][n], g, rtol=1e-4, atol=1e-6)]
    assert differs


# ----------------------------------------------------------------------------- (3) worker kill

def test_worker_killed_mid_epoch_resumes_and_logs_each_epoch_once(cluster, tmp_path):
    cfg = tiny_config(tmp_path, "kill", "scaling.fail_at_epoch=2", "scaling.max_failures=1", epochs=3)
    summary = run_distributed(cfg)
    storage = Path(job_folder(cfg))
    marker = storage / ".fault_injected_epoch_2"
    assert marker.is_file() and "at epoch 2" in marker.read_text()  # the kill really happened
    state = latest_training_state(str(storage))
    assert state["resumes"] == [1]  # the restarted worker group continued from epoch 1's checkpoint
    assert summary["epochs"] == 3
    final = load_checkpoint(cfg.run_dir / "checkpoint.pt")
    assert [m["epoch"] for m in final["history"]] == [1, 2, 3]
    assert json.loads((cfg.run_dir / "metrics.json").read_text())["epochs"] == 3

    client = mlflow_client(tmp_path)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    for key in ("test_accuracy", "loss", "batch_coupling"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3], key


# ----------------------------------------------------------------------------- (4) fail fast

def one_line_error(error_type, fn, limit_s: float = 10.0) -> str:
    start = time.perf_counter()
    with pytest.raises(error_type) as info:
        fn()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message and message
    assert elapsed < limit_s, f"took {elapsed:.1f}s to fail: {message}"
    return message


@pytest.mark.parametrize("overrides, expected", [
    (["scaling.num_workers=3", "train.batch_size=48"], "3 workers with 1 CPU each, but the Ray cluster has 2 CPUs"),
    (["scaling.cpus_per_worker=1.5"], "room for 1"),
    (["scaling.use_gpu=true"], "0 GPUs"),
])
def test_more_workers_than_the_cluster_has(cluster, tmp_path, overrides, expected):
    cfg = tiny_config(tmp_path, "big", "tracking.enabled=false", *overrides)
    message = one_line_error(SetupError, lambda: run_distributed(cfg))
    assert expected in message
    assert not (cfg.run_dir / "checkpoint.pt").exists()


def test_batch_not_divisible_by_workers(tmp_path):
    cfg = tiny_config(tmp_path, "odd", "train.batch_size=33")
    assert "not divisible" in one_line_error(SetupError, lambda: run_distributed(cfg))


def test_unwritable_storage_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tiny_config(tmp_path, "nostore", f"scaling.storage_path={blocker / 'storage'}")
    message = one_line_error(SetupError, lambda: run_distributed(cfg))
    assert "not writable" in message and str(blocker) in message


def test_unreachable_tracking_server(tmp_path):
    cfg = tiny_config(tmp_path, "noserver", f"tracking.tracking_uri=http://127.0.0.1:{free_port()}")
    message = one_line_error(TrackingError, lambda: run_distributed(cfg))
    assert "does not answer" in message


def test_cli_reports_unreachable_server_in_one_line(tmp_path):
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "mwt_ray.train", "--num-workers", "2", "--set", f"output_dir={tmp_path}",
         "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"127.0.0.1:{port} does not answer" in lines[0], result.stderr[-2000:]


def test_resume_checkpoint_of_another_model(two_worker_run):
    cfg, _, _, _ = two_worker_run
    for section, key, value, expected in (
        ("model", "width", 0.25, "width 0.125"),
        ("model", "name", "resnet18", "vgg16"),
        ("train", "method", "standard", "mwt training"),
    ):
        other = cfg.model_copy(deep=True)
        setattr(getattr(other, section), key, value)
        message = one_line_error(SetupError, lambda cfg=other: run_distributed(cfg, resume=True))
        assert expected in message and "run without --resume" in message


# ----------------------------------------------------------------------------- no Ray

def test_train_loop_runs_in_a_plain_process_and_resumes(tmp_path):
    """The worker function without Ray: world size 1, checkpoints straight to the storage folder."""
    cfg = tiny_config(tmp_path, "plain", "tracking.enabled=false", workers=0, epochs=1)
    first = train_loop_per_worker(loop_config(cfg))
    assert first["epochs"] == 1
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})})
    second = train_loop_per_worker(loop_config(longer))
    assert second["epochs"] == 2
    assert len(list_jobs(cfg)) == 1
    storage = Path(job_folder(cfg))
    state = latest_training_state(str(storage))
    assert state["epoch"] == 2 and state["resumes"] == [1]
    assert [m["epoch"] for m in load_checkpoint(cfg.run_dir / "checkpoint.pt")["history"]] == [1, 2]
    assert len([p for p in storage.iterdir() if p.is_dir()]) <= 2  # older checkpoints pruned


def test_both_sessions_have_the_session_interface(tmp_path):
    from mwt_ray.cluster.worker import RayTrainSession
    from mwt_ray.jobs import LocalSession, TrainingSession

    assert isinstance(LocalSession(RunStorage(str(tmp_path)), "cpu"), TrainingSession)
    for method in ("resume_state", "wrap", "persist"):
        assert callable(getattr(RayTrainSession, method)), method


def test_prune_keeps_the_newest_checkpoints(tmp_path):
    """A driver killed between a checkpoint's upload and its registration leaves one folder too many;
    the job's end removes it, keeping the newest two."""
    storage = RunStorage(str(tmp_path / "job"))
    for epoch in (1, 2, 3):
        folder = tmp_path / "job" / f"checkpoint_epoch_{epoch:04d}"
        folder.mkdir(parents=True)
        (folder / "training_state.pt").write_bytes(b"x")
        os.utime(folder / "training_state.pt", (1000 + epoch, 1000 + epoch))
    _prune_checkpoints(storage)
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]


def test_describe_failure_names_the_dead_worker_first():
    """Ray Train reports every rank's failure; the one line names the worker whose process died
    (with its pid), not the survivor that lost its connection to it; a worker's own error as itself."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from mwt_ray.cluster.trainer import describe_failure

    dead = WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(pid=4242, ip=10.0.0.1)",
                                        failure=RuntimeError("The actor died unexpectedly"))
    lost = UserExceptionWithTraceback(
        RuntimeError("gloo: Connection reset by peer"), "Traceback (most recent call last): ..."
    )
    message = describe_failure(WorkerGroupError("two failures", {1: lost, 0: dead}))
    assert message.startswith("worker rank 0 (pid 4242) died") and "rank(s) 1 then failed" in message
    assert "Connection reset" not in message and "\n" not in message
    own = UserExceptionWithTraceback(SetupError("checkpoint holds 10 classes"), "Traceback ...")
    assert describe_failure(WorkerGroupError("one", {1: own})) == "worker rank 1 failed: checkpoint holds 10 classes"
    bug = UserExceptionWithTraceback(KeyError("x"), "Traceback ...")
    assert describe_failure(WorkerGroupError("one", {0: bug})) == "worker rank 0 failed: KeyError: 'x'"
