"""A lost node on a multi-node Ray cluster: the work it held runs again elsewhere, nothing twice.

The cluster is simulated on this machine as an autoscaling cluster of small nodes looks to Ray: a
head with no CPUs (so no work lands on it) and three one-CPU worker nodes, each its own raylet
(``ray.cluster_utils.Cluster``). A node is removed the way a preempted instance goes, without a
graceful shutdown, while it runs a trial or a reuse sub-task, and a replacement node is added as an
autoscaler would. The node that runs a given process is found from the process tree: Ray's
workers are children of their node's raylet.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import empty_store

from mwt_ray.config import load_config
from mwt_ray.jobs import train_in_process

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

TINY = ["data.name=digits", "model.width=0.125", "data.train_limit=200", "train.batch_size=32",
        "modularize.cohesion_samples_per_class=20"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, logging_level="ERROR", log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def read_losing_a_node(cluster, process, pattern: str, node_for) -> tuple[list[str], re.Match | None]:
    """``process``'s stdout lines, read to its end (10 minutes at most); at the first line where
    ``pattern`` is found, the node ``node_for(match)`` names is lost. Returns the lines and that match."""
    lines, first = [], None
    deadline = time.monotonic() + 600
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        match = re.search(pattern, line)
        if match and first is None:
            first = match
            lose_node(cluster, node_for(match))
        assert time.monotonic() < deadline, "\n".join(lines)
    return lines, first


def node_of(cluster, pid: int):
    """The worker node whose raylet started process ``pid`` (directly or through its children)."""
    from ray._private import ray_constants

    raylets = {node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: node
               for node in cluster.worker_nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        pid = _parent(pid)
    raise AssertionError(f"process {pid} runs on no worker node of the cluster")


def lose_node(cluster, node) -> None:
    """Remove ``node`` as a lost instance goes (no graceful shutdown) and add a replacement."""
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(num_cpus=1)


# ----------------------------------------------------------------------------- reuse

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("lost_node_reuse")
    train_in_process(load_config(None, TINY + [f"output_dir={root}", "name=mod", "train.epochs=2",
                                               "tracking.enabled=false"]), log=None)
    return root / "mod" / "checkpoint.pt"


def test_a_reuse_subtask_on_a_lost_node_runs_again_on_a_new_actor(cluster, checkpoint, tmp_path):
    """Two actors on two of the three nodes; 1 s after the first sub-task finishes, the node of
    the actor that finished it (busy again by then) is lost. The sub-task it held runs again on a
    new actor on another node: every sub-task is in the table exactly once, the loss is one line."""
    from mwt_ray.cluster import evaluate_reuse

    subtasks = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [1, 2]]
    # Sub-tasks of a few seconds each (600 training samples, 8 epochs of fine-tuning): the loss lands in one.
    cfg = load_config(None, TINY + ["data.train_limit=600", f"reuse.subtasks={json.dumps(subtasks)}",
                                    "reuse.num_actors=2", "reuse.max_restarts=2", "reuse.epochs=8",
                                    "reuse.latency_batch_sizes=[]",
                                    "reuse.batch_size=32", f"reuse.output_dir={tmp_path / 'out'}",
                                    "tracking.enabled=false"])
    lines, lost = [], {}

    def lose_later(pid: int) -> None:
        node = node_of(cluster, pid)
        time.sleep(1.0)
        lost["node"] = node.node_id
        cluster.remove_node(node, allow_graceful=False)  # adding a node needs the main thread: see log()

    def log(line: str) -> None:
        lines.append(line)
        first = re.match(r"\[1/\d+\] .*pid (\d+)\)$", line)
        if first and not lost:
            lost["thread"] = threading.Thread(target=lose_later, args=(int(first[1]),))
            lost["thread"].start()
        if "lost its actor" in line and "replacement" not in lost:
            lost["replacement"] = cluster.add_node(num_cpus=1)

    tables = evaluate_reuse(str(checkpoint), None, cfg, log=log)
    lost["thread"].join()
    rows = tables.rows
    assert sorted(rows["index"]) == list(range(len(subtasks))), rows
    retried = [line for line in lines if "lost its actor" in line]
    assert len(retried) >= 1, lines
    again = {int(re.search(r"sub-task (\d+)", line)[1]) for line in retried}
    # Each sub-task that lost its actor finished on another node.
    assert all(rows.loc[rows["index"] == i, "node"].item() != lost["node"] for i in again), rows
    assert not any("[state-dump]" in line for line in lines)


# ----------------------------------------------------------------------------- a sweep's trial

POINTS = [{"train.alpha": 0.5, "train.beta": 1.5}, {"train.alpha": 1.0, "train.beta": 1.0}]


def sweep_config(tmp_path: Path) -> Path:
    empty_store(tmp_path / "mlflow.db")
    tree = {"name": "lossy", "output_dir": str(tmp_path / "runs"),
            "model": {"name": "vgg16", "width": 0.125},
            "data": {"name": "digits", "train_limit": 200},
            "train": {"epochs": 4, "batch_size": 32, "lr": 0.05},
            "modularize": {"cohesion_samples_per_class": 20},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "sweep": {"trials": 2, "max_concurrent": 2, "scheduler": "none", "subtasks_per_size": 1,
                      "tau_grid": [0.5, 0.9], "points": POINTS, "reuse": False, "standard_baseline": False}}
    path = tmp_path / "lossy.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_trial_on_a_lost_node_resumes_elsewhere_in_its_own_run(cluster, tmp_path):
    """When the sweep's progress shows a trial's second epoch, that trial's node is lost. The trial
    runs again on another node from its last finished epoch, in the same MLflow run: both trials
    complete, each epoch is logged once, no run is left RUNNING, the table and the last lines count
    the retry, and the retried trial's results equal those of the same trial trained without a fault."""
    config = sweep_config(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    stderr = (tmp_path / "stderr.txt").open("w")
    sweep = subprocess.Popen([sys.executable, "-m", "mwt_ray.sweep", "--config", str(config)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=stderr)

    def trial_node(epoch: re.Match):
        (job,) = (tmp_path / "runs" / "lossy").glob(f"*/trials/trial-{epoch[1]}/jobs/job-*/job.json")
        return node_of(cluster, json.loads(job.read_text())["pid"])

    lines, epoch = read_losing_a_node(cluster, sweep, r"^\s+trial (\w+) epoch 2/4", trial_node)
    victim = epoch[1] if epoch else None
    assert sweep.wait(timeout=60) == 0, "\n".join(lines) + (tmp_path / "stderr.txt").read_text()[-3000:]
    assert victim is not None, lines
    retry_lines = [line for line in lines if f"trial {victim}:" in line and "retry 1 of 3" in line]
    assert len(retry_lines) == 1, lines
    assert any(line.startswith("1 retry after a lost process or node") for line in lines[-3:]), lines[-3:]
    assert not any("[state-dump]" in line for line in lines)

    (folder,) = (tmp_path / "runs" / "lossy").glob("*/results.csv")
    table = pd.read_csv(folder, dtype={"trial": str})
    assert list(table["status"]) == ["completed", "completed"], table
    assert dict(zip(table["trial"], table["retries"])) == {t: int(t == victim) for t in table["trial"]}

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    trial_runs = {run.info.run_name: run for run in runs if run.info.run_name.startswith("trial-")}
    assert sorted(trial_runs) == sorted(f"trial-{t}" for t in table["trial"])
    for run in trial_runs.values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_accuracy")]
        assert sorted(steps) == [1, 2, 3, 4], (run.info.run_name, steps)

    # The same trial without a fault: same config, one thread as in the trial's one-CPU process.
    from mwt_ray.cluster.sweep import trial_config
    from mwt_ray.config import Config

    sweep_cfg = load_config(config, [])
    row = table[table["trial"] == victim].iloc[0]
    point = next(p for p in POINTS if p["train.alpha"] == row["alpha"] and p["train.beta"] == row["beta"])
    reference = trial_config(Config.model_validate(sweep_cfg.model_dump(mode="json")), point, tmp_path / "reference",
                             "reference", None).model_copy(deep=True)
    reference.tracking.enabled = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = train_in_process(reference, log=None)
    finally:
        torch.set_num_threads(threads)
    history = pd.read_csv(folder.parent / "trials" / f"trial-{victim}" / "history.csv")
    want = pd.read_csv(tmp_path / "reference" / "reference" / "history.csv")
    for column in ("loss", "train_accuracy", "test_accuracy", "val_accuracy", "kernel_rate"):
        assert history[column].tolist() == pytest.approx(want[column].tolist(), rel=1e-6, abs=1e-9), column
    assert row["test_accuracy"] == pytest.approx(expected["final"]["test_accuracy"], abs=1e-12)


# ----------------------------------------------------------------------------- data-parallel training

def test_data_parallel_training_on_a_lost_node_restarts_its_worker_group(cluster, tmp_path):
    """Two Ray Train workers on two nodes; when rank 0 reports its second epoch, its node is lost.
    With scaling.max_failures=1 the worker group starts again on the nodes left and the replacement,
    from the last checkpoint: the job finishes, each epoch logged once in one FINISHED run, and the
    terminal shows no raylet log dump."""
    from mlflow import MlflowClient

    store = empty_store(tmp_path / "mlflow.db")
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    command = [sys.executable, "-m", "mwt_ray.train", "--num-workers", "2", "--set", "scaling.max_failures=1",
               "--set", "name=dp", "--set", f"output_dir={tmp_path / 'runs'}", "--set", "model.width=0.125",
               "--set", "data.train_limit=600", "--set", "train.batch_size=32", "--set", "train.epochs=8",
               "--set", "modularize.cohesion_samples_per_class=20", "--set", f"tracking.tracking_uri={store}"]
    stderr = (tmp_path / "stderr.txt").open("w")
    job = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=stderr,
                           stdin=subprocess.DEVNULL)
    lines, epoch = read_losing_a_node(cluster, job, r"pid=(\d+)\)(?:\x1b\[[0-9;]*m)? epoch +2/8",
                                      lambda epoch: node_of(cluster, int(epoch[1])))
    assert job.wait(timeout=60) == 0, "\n".join(lines) + (tmp_path / "stderr.txt").read_text()[-3000:]
    assert epoch is not None, lines
    assert not any("[state-dump]" in line for line in lines)
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_accuracy")]
    assert sorted(steps) == list(range(1, 9)), steps
    history = pd.read_csv(tmp_path / "runs" / "dp" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 9))
