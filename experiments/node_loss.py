"""What a lost node costs a sweep: the quickstart on a simulated multi-node cluster, with and without faults.

    python experiments/node_loss.py [--epochs 8] [--out experiments/results/node_loss.json]

The cluster is an autoscaling cluster of small nodes as Ray sees it, on this machine: a head with
no CPUs and three one-CPU worker nodes, each its own raylet (``ray.cluster_utils.Cluster``). The
sweep is ``tune_configs/quickstart.yaml`` cut to four fixed trials (its two reference points and two
more, so that both runs train the same trials), two at a time, no early stopping, reuse of the best
trial on two actors. It runs twice: once without faults, once losing a node (no graceful shutdown,
a replacement node added as an autoscaler would) when the first trial reports its third epoch, and
again 2 s after the first reuse sub-task finishes. The table compares the two runs: trials
completed, retries, sub-tasks evaluated, wall time, and each trial's test accuracy (a trial that
resumed must end where the fault-free one did: training is deterministic on one thread).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
POINTS = [{"train.alpha": 0.5, "train.beta": 1.5}, {"train.alpha": 1.0, "train.beta": 6.0},
          {"train.alpha": 2.0, "train.beta": 3.0}, {"train.alpha": 0.4, "train.beta": 8.0}]


def node_of(cluster, pid: int):
    """The worker node whose raylet started process ``pid``: Ray's workers are its children."""
    from ray._private import ray_constants

    raylets = {node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: node
               for node in cluster.worker_nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise RuntimeError(f"process {pid} runs on no worker node")


def run(cluster, folder: Path, epochs: int, faults: bool) -> dict:
    """One sweep on ``cluster``; with ``faults`` a node is lost mid-trial and mid-reuse."""
    from mlflow import MlflowClient

    store = f"sqlite:///{folder / 'mlflow.db'}"
    command = [sys.executable, "-m", "mwt_ray.sweep", "--config", str(REPO / "tune_configs" / "quickstart.yaml"),
               "--set", f"output_dir={folder / 'runs'}", "--set", f"tracking.tracking_uri={store}",
               "--set", f"train.epochs={epochs}", "--set", "sweep.trials=4", "--set", "sweep.scheduler=none",
               "--set", f"sweep.points={json.dumps(POINTS)}", "--set", "sweep.register_modules=[]",
               "--set", "reuse.num_actors=2", "--set", "reuse.epochs=4"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_worker_niceness": "0"}
    started = time.perf_counter()
    sweep = subprocess.Popen(command, env=env, cwd=folder, text=True, stdout=subprocess.PIPE,
                             stderr=(folder / "stderr.txt").open("w"), stdin=subprocess.DEVNULL)
    lines, lost, pending = [], [], []
    for line in sweep.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        print(("  lossy | " if faults else "  clean | ") + line, flush=True)
        if pending:  # add the replacement from this thread: Ray's node start needs the main thread
            pending.pop().join()
            cluster.add_node(num_cpus=1)
        if not faults:
            continue
        epoch = re.match(r"\s+trial (\w+) epoch 3/", line)
        if epoch and not lost:
            (job,) = (folder / "runs" / "quickstart").glob(f"*/trials/trial-{epoch[1]}/jobs/job-*/job.json")
            lost.append(("trial", epoch[1]))
            cluster.remove_node(node_of(cluster, json.loads(job.read_text())["pid"]), allow_graceful=False)
            cluster.add_node(num_cpus=1)
        first = re.match(r"\[1/\d+\] M=.*pid (\d+)\)$", line)
        if first and len(lost) == 1:
            lost.append(("reuse actor", first[1]))
            node = node_of(cluster, int(first[1]))

            def later(node=node):
                time.sleep(2.0)
                cluster.remove_node(node, allow_graceful=False)

            pending.append(threading.Thread(target=later))
            pending[-1].start()
    code = sweep.wait()
    seconds = time.perf_counter() - started
    (results,) = (folder / "runs" / "quickstart").glob("*/results.csv")
    table = pd.read_csv(results, dtype={"trial": str})
    rows = list((results.parent / "trials").glob("trial-*/reuse/reuse_rows.csv"))
    reuse = pd.read_csv(rows[0]) if rows else pd.DataFrame({"index": []})
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])
    return {"exit": code, "seconds": round(seconds, 1), "lost": lost,
            "trials_completed": int((table["status"] == "completed").sum()), "trials": len(table),
            "retries": int(table["retries"].sum()), "subtasks": len(reuse),
            "subtasks_distinct": int(reuse["index"].nunique()),
            "subtask_losses": sum("lost its actor" in line for line in lines),
            "runs_running": sum(r.info.status == "RUNNING" for r in runs),
            "state_dump_lines": sum("[state-dump]" in line for line in lines),
            "test_accuracy": {f"{a:g}/{b:g}": float(acc) for a, b, acc in
                              zip(table["alpha"], table["beta"], table["test_accuracy"])}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "node_loss.json"))
    args = parser.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_worker_niceness"] = "0"
    outcome = {}
    for faults in (False, True):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            with tempfile.TemporaryDirectory(prefix="node-loss-") as folder:
                outcome["lossy" if faults else "clean"] = run(cluster, Path(folder), args.epochs, faults)
        finally:
            ray.shutdown()
            cluster.shutdown()
    clean, lossy = outcome["clean"], outcome["lossy"]
    same = {key: lossy["test_accuracy"].get(key) == value for key, value in clean["test_accuracy"].items()}
    table = pd.DataFrame({name: {key: value for key, value in run.items() if key != "test_accuracy"}
                          for name, run in outcome.items()})
    print(table.to_string())
    print(f"test accuracy of each trial equal in both runs: {same}")
    print(f"time with the faults / without: {lossy['seconds'] / clean['seconds']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"epochs": args.epochs, "runs": outcome, "same_accuracy": same,
                                          "machine": os.uname().machine, "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
