"""The sweep: tau's objective on a real trained model, a real Tune + Optuna + ASHA sweep on a local
Ray cluster (more trials than fit at once), its MLflow parent and child runs, resume after the
driver is killed, submission through a real Ray head's job API, bad input, and cluster.yaml."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import empty_store, free_port

from mwt_ray.config import load_config
from mwt_ray.jobs import load_data, train_in_process
from mwt_ray.jobs.objective import best_tau, scan_checkpoint

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

REPO = Path(__file__).resolve().parents[1]


def sweep_yaml(tmp_path: Path, name: str = "tiny", *, store: bool = True, **sweep) -> Path:
    """A sweep small enough for this 2-core machine: VGG16 at 1/8 width on 300 digits, 3 epochs,
    tracked in an empty MLflow store in ``tmp_path`` (none with ``store=False``)."""
    if store:
        empty_store(tmp_path / "mlflow.db")
    tree = {"name": name, "output_dir": str(tmp_path / "runs"),
            "model": {"name": "vgg16", "width": 0.125},
            "data": {"name": "digits", "train_limit": 300},
            "train": {"epochs": 3, "batch_size": 32, "lr": 0.05},
            "modularize": {"cohesion_samples_per_class": 20},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "sweep": {"trials": 4, "max_concurrent": 2, "grace_period": 1, "subtasks_per_size": 2,
                      "points": [{"train.alpha": 0.5, "train.beta": 1.5}], "reuse": False, **sweep}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def mlflow_runs(tmp_path: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mwt-ray")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


# ----------------------------------------------------------------------------- the objective

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real modular model trained with a held-out validation split."""
    tmp_path = tmp_path_factory.mktemp("objective")
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=obj", "model.width=0.125", "data.train_limit=400",
                             "data.val_fraction=0.2", "train.epochs=6", "train.batch_size=32",
                             "modularize.cohesion_samples_per_class=10", "tracking.enabled=false"])
    train_in_process(cfg)
    return cfg


def test_tau_scan_scores_a_real_checkpoint_by_the_documented_formula(trained):
    """The scan on a real trained model: each row's score is module accuracy - krr_weight * KRR, a
    higher tau keeps a subset of kernels (KRR falls), and the chosen row is the best-scoring one.
    Where a short training lands (which tau loses accuracy) is not checked here: it differs between
    CPUs; ``test_best_tau_trades_accuracy_against_krr`` checks the choice on rows it controls."""
    cfg = trained
    data = load_data(cfg)
    taus = [0.2, 0.4, 0.6, 0.8, 0.9, 1.0]
    rows = scan_checkpoint(cfg.run_dir / "checkpoint.pt", data, cfg, taus, torch.device("cpu"))
    assert [row["tau"] for row in rows] == taus
    for row in rows:
        assert row["score"] == pytest.approx(row["module_accuracy"] - cfg.sweep.krr_weight * row["krr"])
        assert 0 <= row["module_accuracy"] <= 1 and 0 < row["krr"] <= 1
    krr = [row["krr"] for row in rows]
    assert krr == sorted(krr, reverse=True) and krr[-1] < krr[0]
    best = best_tau(rows)
    assert best["score"] == max(row["score"] for row in rows)


def test_best_tau_trades_accuracy_against_krr():
    """An objective on KRR alone would always pick the largest tau. Here tau = 1 keeps the fewest
    kernels but loses accuracy: the choice moves from the most accurate tau to the sparsest as
    krr_weight grows, and ties go to the smaller KRR."""
    accuracy = {0.6: 0.90, 0.8: 0.88, 0.9: 0.86, 1.0: 0.50}
    krr = {0.6: 0.80, 0.8: 0.50, 0.9: 0.40, 1.0: 0.10}

    def rows(weight):
        return [{"tau": t, "module_accuracy": accuracy[t], "krr": krr[t], "score": accuracy[t] - weight * krr[t]}
                for t in accuracy]

    # Brute force: the tau of the highest accuracy - weight * KRR, for weights either side of each crossover.
    for weight, expected in [(0.0, 0.6), (0.1, 0.8), (0.3, 0.9), (1.0, 0.9), (2.0, 1.0)]:
        assert best_tau(rows(weight))["tau"] == expected, weight
    tied = [{"tau": 0.6, "krr": 0.8, "score": 0.5}, {"tau": 0.9, "krr": 0.4, "score": 0.5}]
    assert best_tau(tied)["tau"] == 0.9


def test_scan_needs_held_out_samples(trained):
    cfg = trained.model_copy(update={"data": trained.data.model_copy(update={"val_fraction": 0.0})})
    with pytest.raises(ValueError, match="data.val_fraction"):
        scan_checkpoint(cfg.run_dir / "checkpoint.pt", load_data(cfg), cfg, [0.9], torch.device("cpu"))


# ----------------------------------------------------------------------------- the searcher

@pytest.mark.parametrize("objective", ["pareto", "score"])
def test_searcher_state_survives_tunes_save_and_restore(tmp_path, objective):
    """Tune saves its searcher, with the Optuna study inside, to the experiment folder (what --resume
    restores). Optuna 5.1's NSGA-II sampler (the pareto mode) holds a lock that cannot be pickled:
    the saved searcher must restore and go on exactly as the one that kept running."""
    from mwt_ray.cluster.search import search_space, searcher

    cfg = load_config(sweep_yaml(tmp_path, objective=objective, points=[]), [])
    search = searcher(cfg)
    search.set_search_properties(None, None, search_space(cfg))
    for i in range(4):
        params = search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", {"module_accuracy": 0.5 + 0.1 * i, "krr": 0.9 - 0.2 * i,
                                           "objective": 0.1 * i, **params})
    search.save_to_dir(str(tmp_path), session_str="s")
    restored = searcher(cfg)
    restored.restore_from_dir(str(tmp_path))
    assert restored.suggest("t4") == search.suggest("t4")


# ----------------------------------------------------------------------------- a real sweep

def run_sweep_cli(config: Path, *args: str, timeout: int = 900, **popen):
    return subprocess.run([sys.executable, "-m", "mwt_ray.sweep", "--config", str(config), *args],
                          cwd=config.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, **popen)


# Methods side by side: the method is a choice beside numeric keys, each method's weights searched where they apply.
METHOD_SPACE = {"train.method": {"choices": ["mwt", "moda"]},
                "train.alpha": {"low": 0.1, "high": 3.0, "log": True}, "train.beta": {"low": 0.3, "high": 3.0},
                "train.affinity": {"low": 0.5, "high": 2.0}}
METHOD_POINTS = [{"train.method": "mwt", "train.alpha": 0.5, "train.beta": 1.5, "train.affinity": 1.0},
                 {"train.method": "moda", "train.alpha": 0.5, "train.beta": 1.5, "train.affinity": 1.0}]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    config = sweep_yaml(tmp_path, reuse=True, register_modules=[[0, 1]], space=METHOD_SPACE, points=METHOD_POINTS)
    tree = yaml.safe_load(config.read_text())  # a tiny last stage: two 2-class sub-tasks on one actor
    tree["reuse"] = {"sizes": [2], "per_size": 2, "epochs": 1, "num_actors": 1, "latency_batch_sizes": [1],
                     "latency_repeats": 1}
    config.write_text(yaml.safe_dump(tree))
    start = time.perf_counter()
    result = run_sweep_cli(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, result, time.perf_counter() - start


def test_sweep_finishes_with_more_trials_than_fit_at_once(finished_sweep):
    tmp_path, result, seconds = finished_sweep
    print(f"sweep took {seconds:.0f}s")
    (folder,) = (tmp_path / "runs" / "tiny").iterdir()
    import pandas as pd

    table = pd.read_csv(folder / "results.csv", dtype={"trial": str})
    assert len(table) == 4 and table["trial"].is_unique
    assert set(table["status"]) <= {"completed", "stopped early"} and (table["status"] == "completed").any()
    done = table[table["status"] == "completed"]
    assert done["tau"].between(0, 1, inclusive="right").all() and done["krr"].between(0, 1).all()
    assert done["cohesion"].between(0, 1).all() and done["coupling"].between(0, 1).all()  # at each trial's tau
    assert done["objective"].tolist() == pytest.approx((done["module_accuracy"] - 0.1 * done["krr"]).tolist())
    assert (table["status"] == "stopped early").sum() == (table["epoch"] < 3).sum()  # stopped ones say where
    # both reference points ran; a method's own weights are shown only in its trials (sampled in all, used there)
    assert ((table["method"] == "mwt") & (table["alpha"] == 0.5) & (table["beta"] == 1.5)).sum() >= 1
    assert ((table["method"] == "moda") & (table["affinity"] == 1.0)).sum() >= 1
    assert set(table["method"]) == {"mwt", "moda"}
    assert table.loc[table["method"] == "mwt", "affinity"].isna().all()
    assert table.loc[table["method"] == "moda", ["alpha", "beta"]].isna().all().all()
    assert table["pareto"].any() and not table.loc[table["status"] != "completed", "pareto"].any()
    assert (folder / "pareto.png").read_bytes().startswith(b"\x89PNG")
    markdown = (folder / "results.md").read_text()
    assert "| trial | method |" in markdown
    assert ("Best trial of each method" in markdown) == (done["method"].nunique() == 2)
    lines = [line for line in result.stdout.splitlines() if "] trial " in line]
    assert len(lines) == 4  # one progress line per finished or stopped trial
    trial_folders = sorted(p.name for p in (folder / "trials").iterdir())
    assert len(trial_folders) == len(set(trial_folders)) == 4


def test_sweep_ends_by_reusing_the_best_trials_modules(finished_sweep):
    tmp_path, result, _ = finished_sweep
    import pandas as pd

    (folder,) = (tmp_path / "runs" / "tiny").iterdir()
    best = pd.read_csv(folder / "results.csv", dtype={"trial": str}).iloc[0]
    reuse = folder / "trials" / f"trial-{best['trial']}" / "reuse"
    rows = pd.read_csv(reuse / "reuse_rows.csv")
    assert len(rows) == 2 and (rows["m"] == 2).all()
    assert (rows["module_flops"] < rows["model_flops"]).all()
    assert rows["standard_accuracy"].between(0, 1).all()  # compared with the sweep's standard baseline
    client, runs = mlflow_runs(tmp_path)
    (best_run,) = [r for r in runs if r.info.run_name == f"trial-{best['trial']}"]
    assert "reuse/reuse_summary.csv" in {a.path for a in client.list_artifacts(best_run.info.run_id, "reuse")}


def test_sweep_registers_the_best_trials_module(finished_sweep):
    """sweep.register_modules: the best trial's module of classes 0 and 1, at its tau, exported into
    the sweep folder and registered as <sweep name>-<classes>, its run nested under the trial's."""
    import pandas as pd

    tmp_path, result, _ = finished_sweep
    (folder,) = (tmp_path / "runs" / "tiny").iterdir()
    best = pd.read_csv(folder / "results.csv", dtype={"trial": str}).iloc[0]
    summary = json.loads((folder / "modules" / "0-1" / "module.json").read_text())
    assert [c["index"] for c in summary["classes"]] == [0, 1] and summary["tau"] == pytest.approx(best["tau"])
    assert "standard" in summary["accuracy"]  # against the sweep's standard baseline
    client, runs = mlflow_runs(tmp_path)
    (trial_run,) = [r for r in runs if r.info.run_name == f"trial-{best['trial']}"]
    version = client.get_model_version("tiny-0-1", "1")
    assert client.get_run(version.run_id).data.tags["mlflow.parentRunId"] == trial_run.info.run_id
    assert json.loads(version.tags["classes"]) == ["0", "1"] and "registered model 'tiny-0-1'" in result.stdout


def test_sweep_mlflow_parent_and_children(finished_sweep):
    tmp_path, _, _ = finished_sweep
    client, runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("mwt.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5  # 4 trials + the standard baseline
    # and the registered module's run (sweep.register_modules), nested under its trial's run
    modules = [r for r in runs if r.data.tags.get("mwt.kind") == "module"]
    assert len(modules) == 1 and modules[0].data.tags["mlflow.parentRunId"] in {c.info.run_id for c in children}
    assert len(runs) == 1 + len(children) + len(modules)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "results.md", "pareto.png"}
    best = parent.data.tags["mwt.best_trial"]
    assert parent.data.tags["mwt.best_run_id"] in {c.info.run_id for c in children}
    standard = [c for c in children if c.info.run_name == "standard"]
    assert len(standard) == 1 and standard[0].data.params["train.method"] == "standard"
    trials = [c for c in children if c.info.run_name.startswith("trial-")]
    # the method is a param of every run (the compare view splits runs by it), and a tag
    import pandas as pd

    (folder,) = (tmp_path / "runs" / "tiny").iterdir()
    methods = dict(pd.read_csv(folder / "results.csv", dtype={"trial": str})[["trial", "method"]].values)
    assert {c.info.run_name: c.data.params["train.method"] for c in trials} == \
        {f"trial-{trial}": method for trial, method in methods.items()}
    assert all(c.data.tags["mwt.method"] == c.data.params["train.method"] for c in trials)
    assert f"trial-{best}" in {c.info.run_name for c in trials}
    for child in trials:
        assert child.data.params["data.val_fraction"] == "0.1"
        assert "val_accuracy" in child.data.metrics
        if child.data.tags.get("mwt.trial_status") == "stopped early":
            # Not a failure: FINISHED (KILLED would show a run a user killed), with a note that says why.
            assert child.info.status == "FINISHED" and "sweep.objective" not in child.data.metrics
            assert "Stopped early by the sweep's scheduler (ASHA)" in child.data.tags["mlflow.note.content"]
        else:
            assert child.info.status == "FINISHED" and "sweep.objective" in child.data.metrics
            assert "sweep.tau" in child.data.metrics and "mwt.best_tau" in child.data.tags
            # The tau the trial was scored at, as a param beside (and not mixed up with) the config's.
            assert child.data.params["sweep.scored_tau"] == child.data.tags["mwt.best_tau"]
            assert child.data.params["modularize.tau"] == "0.9"


def test_a_grace_period_equal_to_the_epochs_scores_every_finished_trial(tmp_path):
    """ASHA's last rung at the last epoch: a trial that trained every epoch is scored (tau scan,
    KRR), never thrown away as stopped early."""
    config = sweep_yaml(tmp_path, "graceful", trials=4, grace_period=3, standard_baseline=False, tau_grid=[0.5, 0.9])
    result = run_sweep_cli(config, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import pandas as pd

    (folder,) = (tmp_path / "runs" / "graceful").iterdir()
    table = pd.read_csv(folder / "results.csv", dtype={"trial": str})
    assert list(table["status"]) == ["completed"] * 4 and table["krr"].notna().all(), table
    assert "stopped early" not in result.stdout


def test_trials_on_ray_train_workers_with_early_stopping(tmp_path):
    """Each trial on its own Ray Train worker group (Train V2 inside Tune), two trials one at a time,
    ASHA on: every trial ends, completed or stopped, and the second does not wait forever for
    resources the first kept (ray-project/ray#54305 hung exactly this on a Ray without its
    dashboard). The model is torchvision's MobileNetV2 (any CNN in a sweep trial)."""
    tree = yaml.safe_load(sweep_yaml(tmp_path, "workers", trials=2, max_concurrent=1, standard_baseline=False,
                                     tau_range={"low": 0.5, "high": 1.0}).read_text())  # tau searched by Optuna
    tree["scaling"] = {"num_workers": 1, "cpus_per_worker": 0.99}
    tree["model"] = {"name": "torchvision:mobilenet_v2", "width": 0.25}
    config = tmp_path / "workers.yaml"
    config.write_text(yaml.safe_dump(tree))
    result = run_sweep_cli(config, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import pandas as pd

    (folder,) = (tmp_path / "runs" / "workers").iterdir()
    table = pd.read_csv(folder / "results.csv", dtype={"trial": str})
    assert len(table) == 2 and set(table["status"]) <= {"completed", "stopped early"}
    assert (table["status"] == "completed").any()
    _, runs = mlflow_runs(tmp_path)
    trial_runs = [r for r in runs if r.info.run_name.startswith("trial-")]
    assert len(trial_runs) == 2 and all(r.data.params["scaling.num_workers"] == "1" for r in trial_runs)
    assert all(r.data.params["model.name"] == "torchvision:mobilenet_v2" for r in trial_runs)
    done = table[table["status"] == "completed"]
    assert done["tau"].between(0.5, 1.0).all()  # each completed trial was scored at its sampled tau


# ----------------------------------------------------------------------------- trials that fail

def test_sweep_whose_every_trial_fails_exits_1_with_the_first_error(tmp_path):
    """A searched value that breaks every trial once it starts (too few samples for a batch): exit 1,
    one error line quoting the first trial's error, a FAILED parent run and sweep.json."""
    config = sweep_yaml(tmp_path, "broken", trials=2, scheduler="none", standard_baseline=False, points=[],
                        space={"data.train_limit": {"choices": [20]}})
    result = run_sweep_cli(config, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "no trial of sweep 'broken' completed (2 of 2 failed" in errors[0]
    assert "larger than the training set" in errors[0]
    (folder,) = (tmp_path / "runs" / "broken").iterdir()
    assert json.loads((folder / "sweep.json").read_text())["status"] == "FAILED"
    _, runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("mwt.kind") == "sweep"]
    assert parent.info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs)


def test_sweep_with_some_failed_trials_says_so_last(tmp_path):
    """One trial fails, one completes: exit 0, the table marks the failed one with its error, and the
    last line says how many failed. The failure is the trial's own (its config cannot train), so it
    is not retried, though sweep.max_failures allows 3 retries of a lost process or node."""
    config = sweep_yaml(tmp_path, "mixed", trials=2, scheduler="none", standard_baseline=False,
                        space={"data.train_limit": {"choices": [300, 20]}},
                        points=[{"data.train_limit": 300}, {"data.train_limit": 20}])
    result = run_sweep_cli(config, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("1 of 2 trials failed")
    import pandas as pd

    (folder,) = (tmp_path / "runs" / "mixed").iterdir()
    table = pd.read_csv(folder / "results.csv", dtype={"trial": str})
    assert sorted(table["status"]) == ["completed", "failed"]
    failed = table[table["status"] == "failed"].iloc[0]
    assert failed["train_limit"] == 20 and "larger than the training set" in failed["error"]
    assert table["retries"].tolist() == [0, 0] and "retry" not in result.stdout
    assert "an error of its own: not retried" in result.stdout
    _, runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("mwt.kind") == "sweep"]
    assert parent.info.status == "FINISHED" and all(r.info.status != "RUNNING" for r in runs)


def test_sigterm_mid_sweep_leaves_no_run_running(tmp_path):
    """SIGTERM while trials and the baseline train: exit 143, and the parent and every child run end
    KILLED (none left RUNNING); sweep.json says INTERRUPTED, so --resume finds it."""
    config = sweep_yaml(tmp_path, "stopped", trials=3, scheduler="none")
    driver = subprocess.Popen([sys.executable, "-m", "mwt_ray.sweep", "--config", str(config)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    seen = []
    for line in driver.stdout:  # the first trial epoch: trials and the baseline have open runs
        seen.append(line)
        if " epoch 1/" in line and "trial " in line:
            break
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 143, "".join(seen)[-2000:] + stderr[-2000:]
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == \
        ["error: stopped by SIGTERM; finished trials are kept: run the same command with --resume to continue"]
    (folder,) = (tmp_path / "runs" / "stopped").iterdir()
    assert json.loads((folder / "sweep.json").read_text())["status"] == "INTERRUPTED"
    _, runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("mwt.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED" and children
    assert {r.info.status for r in children} <= {"KILLED", "FINISHED"}
    assert any(r.info.status == "KILLED" and r.data.tags.get("mwt.trial_status") == "interrupted" for r in children)
    # The interrupted sweep signed its state; a tuner.pkl planted afterwards is refused, its payload never runs.
    marker = tmp_path / "payload-ran"
    (folder / "tune" / "tuner.pkl").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")  # pickle protocol 0: os.system(...)
    result = run_sweep_cli(config, "--resume")
    assert result.returncode == 2 and not marker.exists(), result.stderr[-3000:]
    (error,) = result.stderr.strip().splitlines()
    assert error.startswith("error:") and "tuner.pkl" in error


# ----------------------------------------------------------------------------- resume

def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Ray's processes included, whatever their session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_killed_driver_resumes_without_duplicate_runs(tmp_path):
    config = sweep_yaml(tmp_path, "resumable", trials=2, max_concurrent=1, scheduler="none")
    driver = subprocess.Popen([sys.executable, "-m", "mwt_ray.sweep", "--config", str(config)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    seen = []
    for line in driver.stdout:  # kill the whole driver (and its local Ray) once a trial has finished
        seen.append(line)
        if "] trial " in line:
            break
    for pid in [driver.pid, *descendants(driver.pid)]:  # the driver and the local Ray it started, trials included
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    driver.wait()
    assert any("[1/2] trial" in line for line in seen), "".join(seen)[-2000:]
    # SIGKILL left Tune's state unsigned: a plain --resume refuses it (it could have been planted) ...
    refused = run_sweep_cli(config, "--resume")
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == \
        refused.stderr.strip().splitlines() and "start a new sweep" in refused.stderr
    # ... and the user who knows the folder is theirs alone resumes it
    result = run_sweep_cli(config, "--resume", "--trust-folder")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The resumed trial repeats Tune's first iterations: Optuna keeps its first values, and says nothing.
    assert "already reported" not in result.stderr, result.stderr[-3000:]
    (folder,) = (tmp_path / "runs" / "resumable").iterdir()
    import pandas as pd

    table = pd.read_csv(folder / "results.csv", dtype={"trial": str})
    assert len(table) == 2 and (table["status"] == "completed").all()
    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("mwt.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    names = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(names) == sorted({*names}) and len(names) == 3, names  # each trial and the baseline once
    assert json.loads((folder / "sweep.json").read_text())["status"] == "FINISHED"


# ----------------------------------------------------------------------------- bad input

BAD = [
    (["--set", "sweep.space={train.alpha: {low: 2, high: 1}}"], "inverted range"),
    (["--set", "sweep.space={train.alpha: {low: 1, high: 1}}"], "empty or inverted range"),
    (["--set", "sweep.space={train.alpha: {choices: []}}"], "choices is empty"),
    (["--set", "sweep.space={train.alpha: {low: 0, high: 1, log: true}}"], "log range needs low > 0"),
    (["--set", "sweep.tau_grid=[0, 0.5]"], "(0, 1]"),
    (["--set", "sweep.tau_grid=[0.5, 1.5]"], "(0, 1]"),
    (["--set", "sweep.tau_range={low: 0.5, high: 2}"], "(0, 1]"),
    (["--set", "sweep.sampler=grid"], "sweep.sampler"),
    (["--set", "sweep.objective=accuracy"], "sweep.objective"),
    (["--set", "sweep.scheduler=hyperband"], "sweep.scheduler"),
    (["--set", "sweep.trials=0"], "sweep.trials"),
    (["--set", "sweep.max_concurrent=0"], "sweep.max_concurrent"),
    (["--set", "sweep.krr_weight=-1"], "sweep.krr_weight"),
    (["--set", "sweep.colour=blue"], "sweep.colour: unknown key"),
    (
        ["--set", "sweep.points=[]", "--set", "sweep.space={train.alpah: {low: 0.1, high: 1}}"],
        "'train.alpah' is not a config key",
    ),
    (
        ["--set", "sweep.points=[]", "--set", "sweep.space={scaling.num_workers: {choices: [1, 2]}}"],
        "cannot search 'scaling.num_workers'",
    ),
    (["--set", "sweep.points=[]", "--set", "sweep.space={train.lr: {low: 0, high: 0.1}}"], "sweep.space.train.lr"),
    (["--set", "sweep.points=[{train.lr: 0.1}]"], "not in sweep.space"),
    (["--set", "sweep.points=[{train.alpha: 0.5}]"], "a point misses train.beta"),
    (["--set", "sweep.subtask_sizes=[2, 11]"], "exceed the dataset's 10 classes"),
    (["--set", "sweep.subtask_sizes=[1]"], "sizes must be >= 2"),
    (["--set", "train.method=standard"], "a sweep trains modular models: train.method must be one of mwt, moda"),
    (["--set", "sweep.points=[]", "--set", "sweep.space={train.method: {choices: [mwt, lasso]}}"],
     "sweep.space.train.method: unknown method 'lasso'; choose among mwt, moda"),
    (["--set", "sweep.points=[]", "--set", "sweep.space={train.method: {choices: [mwt, standard]}}"],
     "standard trains no modules"),
    (["--set", "sweep.points=[]", "--set", "sweep.space={train.method: {choices: [mwt]}, train.affinity: {low: 0.5, "
      "high: 2}}"], "sweep.space.train.affinity is a setting of method moda, which no trial trains (methods: mwt)"),
    (["--set", "sweep.points=[]", "--set", "sweep.space={train.compactness: {low: 0.1, high: 1}}"],
     "train.compactness is a setting of method moda, which no trial trains"),
    (["--set", "sweep.points=[{train.method: mwt, train.affinity: 1}]", "--set",
      "sweep.space={train.method: {choices: [moda]}, train.affinity: {low: 0.5, high: 2}}"],
     "point 1 gives train.method='mwt', not one of the choices ['moda']"),
    (["--set", "train.affinity=2"], "train.affinity=2 is a setting of method moda, but train.method is mwt"),
    (["--resume"], "no unfinished sweep named 'tiny'"),
    (["--set", "sweep.points=[{train.alpha: 5, train.beta: 1}]"], "point 1 gives train.alpha=5, outside the searched"),
    (["--set", "sweep.points=[{train.alpha: -1, train.beta: 1}]"], "outside the searched range [0.1, 3]"),
    (["--set", "sweep.points=[{train.alpha: abc, train.beta: 1}]"], "train.alpha='abc', not a number"),
    (["--set", "sweep.points=[{train.alpha: true, train.beta: 1}]"], "train.alpha=true: true/false is not a number"),
    (
        [
            "--set",
            "sweep.tau_range={low: 0.5, high: 1}",
            "--set",
            "sweep.points=[{train.alpha: 0.5, train.beta: 1, tau: 0.2}]",
        ],
        "tau=0.2, outside",
    ),
    (
        ["--set", "sweep.points=[]", "--set", "sweep.space={model.name: {choices: [vgg16, alexnet]}}"],
        "the value 'alexnet' makes an invalid trial",
    ),
    (["--set", "sweep.points=[]", "--set", "sweep.space={}"], "sweep.space is empty"),
    (
        ["--set", "sweep.register_modules=[[0, 12]]"],
        "sweep.register_modules [0, 12] 0,12: target classes [12] are out of range",
    ),
    (
        ["--set", "sweep.register_modules=[[cat, 1]]"],
        "sweep.register_modules ['cat', 1]: 'cat' is neither a class name",
    ),
    (["--set", "sweep.register_modules=[[3, 3]]"], "repeat a class"),
    (["--set", "sweep.register_modules=[[3]]"], "a sub-task needs at least 2 classes"),
    (["--set", "sweep.register_modules=[[0, 1]]", "--set", "tracking.enabled=false"], "tracking.enabled is false"),
    (["--set", "sweep.register_modules=[[0, true]]"], "sweep.register_modules: true/false is not a number"),
    (
        ["--set", "sweep.points=[]", "--set", "sweep.space={train.method: {low: 0, high: 1}}"],
        "sweep.space.train.method: a low/high range searches numbers, but train.method is not a number",
    ),
    (
        ["--set", "sweep.points=[]", "--set", "sweep.space={model.name: {low: 0, high: 1}}"],
        "model.name is not a number",
    ),
    (
        ["--set", "sweep.points=[]", "--set", "sweep.space={train.epochs: {low: 2, high: 5}}"],
        "train.epochs takes whole numbers; add integer: true",
    ),
    (
        ["--set", "sweep.points=[{train.alpha: 0.5, train.beta: 1.5, tau: 0.9}]"],
        "point 1 gives tau, but tau is not searched",
    ),
]


@pytest.mark.parametrize("state, message", [
    ("not json {", "is not the sweep's state: cannot be read as JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    (None, "is not a regular file"),
])
def test_a_damaged_sweep_state_file_is_one_line_on_resume(tmp_path, capsys, state, message):
    """--resume reads sweep.json of each earlier sweep of the name: one that is not a JSON object
    (damaged, replaced by a list, a folder in its place) is named in one line, exit 2, nothing changed."""
    from mwt_ray.sweep import main

    config = sweep_yaml(tmp_path, store=False)
    earlier = tmp_path / "runs" / "tiny" / "20260101-000000"
    earlier.mkdir(parents=True)
    if state is None:
        (earlier / "sweep.json").mkdir()
    else:
        (earlier / "sweep.json").write_text(state)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["--config", str(config), "--resume"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(earlier / "sweep.json") in errors[0] and message in errors[0], errors
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# Checked against the Ray cluster's resources (every stage before the first trial).
BAD_FOR_THE_CLUSTER = [
    (["--set", "sweep.cpus_per_trial=64"], "a trial asks for 64 CPUs"),
    (["--set", "sweep.gpus_per_trial=1"], "1 GPUs"),
    (["--set", "sweep.reuse=true", "--set", "reuse.sizes=[2, 11]"], "reuse.sizes: M=11 is outside 2..10"),
    (["--set", "sweep.reuse=true", "--set", "reuse.subtasks=[[0, 12]]"], "12"),
    (["--set", "sweep.reuse=true", "--set", "reuse.cpus_per_actor=64"], "no room for one reuse actor"),
    (["--set", "sweep.reuse=true", "--set", "reuse.gpus_per_actor=1"], "no room for one reuse actor"),
    (["--set", "sweep.reuse=true", "--set", "reuse.num_actors=9"], "reuse.num_actors 9"),
]


def assert_fails_before_any_trial(tmp_path, capsys, args, message):
    from mwt_ray.sweep import main

    config = sweep_yaml(tmp_path, store=False)
    assert main(["--config", str(config), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], lines
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_fails_before_any_trial(tmp_path, capsys, args, message):
    assert_fails_before_any_trial(tmp_path, capsys, args, message)


@pytest.fixture(scope="class")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.usefixtures("local_ray")
class TestSettingsTheClusterCannotHold:
    """On one local Ray of 2 CPUs for the whole class (the sweep joins a Ray its process is on),
    instead of a Ray started and stopped per case."""

    @pytest.mark.parametrize(
        "args, message", BAD_FOR_THE_CLUSTER, ids=[" ".join(a)[:60] for a, _ in BAD_FOR_THE_CLUSTER]
    )
    def test_bad_input_fails_before_any_trial(self, tmp_path, capsys, args, message):
        assert_fails_before_any_trial(tmp_path, capsys, args, message)


# ----------------------------------------------------------------------------- a cluster

def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    validate_config(prepare_config(cluster))
    nodes = cluster["available_node_types"]
    gpu = [n for n in nodes.values() if n["resources"].get("GPU")]
    assert gpu and all(n["resources"].get("accelerator_type:A100") for n in gpu)
    assert nodes[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    start = " ".join(cluster["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    assert cluster["provider"]["use_internal_ips"] is True
    broken = {k: v for k, v in cluster.items() if k != "provider"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def stop_ray_under(temp_dir: str) -> None:
    """Stop only the Ray processes of the head started with ``--temp-dir temp_dir`` (``ray stop``
    would stop every Ray on the machine, a developer's own cluster included)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if temp_dir in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_job_submission_to_a_local_head(tmp_path):
    """ray start --head on 127.0.0.1, ray job submit of a tiny sweep, its MLflow runs, the head stopped."""
    import tempfile

    config = sweep_yaml(tmp_path, "submitted", trials=2, scheduler="none", standard_baseline=False, objective="pareto")
    tree = yaml.safe_load(config.read_text())
    del tree["tracking"]  # the default store, ./mlflow.db of the job: trials in Ray workers must find it too
    config.write_text(yaml.safe_dump(tree))
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="mwt-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS")  # as a user runs it (the job's driver gets the head's address from Ray)
    ray_cli = str(Path(sys.executable).parent / "ray")  # the ray of this environment
    try:
        # Every fixed default port moved, so that another Ray on this machine does not collide with it.
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "runtime-env-agent-port", "metrics-export-port",
                                                         "ray-client-server-port")]
        subprocess.run([ray_cli, "start", "--head", "--num-cpus=2", f"--port={port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard}", "--include-dashboard=true", f"--temp-dir={temp_dir}", *ports],
                       cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
        submitted = subprocess.run(
            [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
             sys.executable, "-m", "mwt_ray.sweep", "--config", str(config)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "succeeded" in submitted.stdout
        # With --working-dir the job runs in Ray's copy of that folder, which Ray deletes later: the
        # default relative output folder and MLflow store would go with it, so the job refuses them.
        package = tmp_path / "package"
        package.mkdir()
        trapped = subprocess.run(
            [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(package),
             "--", sys.executable, "-m", "mwt_ray.train", "--set", "train.epochs=1"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert trapped.returncode != 0, trapped.stdout[-3000:]
        errors = [line for line in trapped.stdout.splitlines() if line.startswith("error:")]
        assert len(set(errors)) == 1, trapped.stdout[-3000:]  # the job's line (ray job submit may show it twice)
        error = errors[0]
        assert "inside the job's working_dir package" in error and "_ray_pkg_" in error, error
        assert "output_dir runs resolves to" in error and "--set output_dir=/mnt/shared/runs" in error, error
    finally:
        stop_ray_under(temp_dir)
    client, runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("mwt.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" and "sweep.objective" in c.data.metrics for c in children)
    import pandas as pd  # the multi-objective mode: the table marks the front of test accuracy vs KRR

    table = pd.read_csv(next((tmp_path / "runs" / "submitted").glob("*/results.csv")), dtype={"trial": str})
    assert table["pareto"].any() and parent.data.tags["mwt.best_trial"] in set(table.loc[table["pareto"], "trial"])
