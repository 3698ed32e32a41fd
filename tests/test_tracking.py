"""MLflow tracking with real stores: an sqlite file in tmp_path, and a real ``mlflow server``."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, mlflow_client, open_local
from helpers import tiny_config as _tiny_config

from mwt_ray.cluster import run_training as run
from mwt_ray.core.checkpoint import load_checkpoint
from mwt_ray.tracking import TrackingError, check_server, flatten_params, open_run, resolve_tracking_uri
from mwt_ray.tracking.plots import plot_convergence

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

METRIC_KEYS = ("loss", "ce_loss", "cohesion_loss", "coupling_loss", "batch_cohesion", "batch_coupling", "kernel_rate",
               "train_accuracy", "test_accuracy", "lr", "epoch_time_s")
ARTIFACTS = {"checkpoint.pt", "module_masks.pt", "metrics.json", "history.csv", "convergence.png"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train faster on one thread, and the machine has only 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path: Path, name: str, *overrides: str, epochs: int = 2):
    return _tiny_config(tmp_path, name, *overrides, workers=0, epochs=epochs)


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(client, experiment: str = "mwt-ray"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_flatten_params():
    flat = flatten_params({"train": {"lr": 0.05, "modular": True}, "reuse": {"subtasks": [[0, 1], [2, 3]]},
                           "data": {"root": None}, "name": "x"})
    assert flat == {"train.lr": "0.05", "train.modular": "True", "reuse.subtasks": "[[0, 1], [2, 3]]",
                    "data.root": "None", "name": "x"}


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path.resolve()}/sub/m.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"


def test_single_process_training_is_tracked(tmp_path):
    cfg = tiny_config(tmp_path, "single")
    summary = run(cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    (tracked,) = runs_of(client)
    run_id = tracked.info.run_id
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "single"
    assert tracked.data.params == flatten_params(cfg.model_dump(mode="json"))
    assert tracked.data.params["scaling.num_workers"] == "0"
    history = load_checkpoint(cfg.run_dir / "checkpoint.pt")["history"]
    for key in METRIC_KEYS:
        logged = client.get_metric_history(run_id, key)
        assert [m.step for m in logged] == [1, 2], key
        assert [m.value for m in logged] == pytest.approx([h[key] for h in history]), key
    assert summary["final"]["test_accuracy"] == pytest.approx(history[-1]["test_accuracy"])
    assert {a.path for a in client.list_artifacts(run_id)} == ARTIFACTS
    # artifacts live next to the sqlite file, not in the current directory
    local = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert local.is_relative_to(tmp_path)
    assert (local / "convergence.png").read_bytes().startswith(PNG_SIGNATURE)
    import torch

    masks = torch.load(local / "module_masks.pt", weights_only=True)
    assert masks["module_masks"].shape[0] == 10 and sum(masks["layer_sizes"]) == masks["module_masks"].shape[1]


def test_standard_training_is_tracked_without_mask_metrics(tmp_path):
    cfg = tiny_config(tmp_path, "std", "train.modular=false", epochs=1)
    run(cfg)
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tracked,) = runs_of(client)
    assert "batch_coupling" not in tracked.data.metrics and "test_accuracy" in tracked.data.metrics
    assert {a.path for a in client.list_artifacts(tracked.info.run_id)} == ARTIFACTS - {"module_masks.pt"}


def test_continued_run_logs_each_epoch_once(tmp_path):
    cfg = tiny_config(tmp_path, "cont")
    lines = []
    first = open_run(cfg, log=lines.append)
    epoch1 = {"epoch": 1, "test_accuracy": 0.5, "loss": 2.0, "lr": 0.1}
    epoch2 = {"epoch": 2, "test_accuracy": 0.6, "loss": 1.5, "lr": 0.05}
    assert first.log_epoch(epoch1) is True
    assert first.log_epoch({**epoch1, "test_accuracy": 0.9}) is False
    changed = cfg.model_copy(deep=True)
    changed.train.epochs = 5
    again = open_run(changed, first.run_id, log=lines.append)  # e.g. a resumed job with more epochs
    assert again.run_id == first.run_id
    assert again.log_history([epoch1, epoch2]) == 1
    client = client_for(first.tracking_uri)
    assert len(runs_of(client)) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "test_accuracy")] == [(1, 0.5), (2, 0.6)]
    assert client.get_run(first.run_id).data.params["train.epochs"] == "2"
    assert any("train.epochs=2->5" in line for line in lines)
    # an unknown run id (e.g. from another store) starts a new run instead of failing
    other = open_run(cfg, "0" * 32, log=lines.append)
    assert other.run_id != first.run_id and len(runs_of(client)) == 2


def test_a_resume_refuses_to_continue_a_run_of_another_job(tmp_path, capsys):
    """A job folder's mlflow_run.json replaced by another job's (forged, or copied by hand): the
    resume is refused in one line before it writes anything, and the other job's run, its params,
    metrics and checkpoint.pt artifact, is left as it was."""
    from mwt_ray.jobs import job_storage, list_jobs
    from mwt_ray.train import main

    mine, theirs = tiny_config(tmp_path, "mine", epochs=1), tiny_config(tmp_path, "theirs", epochs=1)
    run(mine, log=None)
    other = run(theirs, log=None)["mlflow_run_id"]
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = client.get_run(other)
    artifact = client.download_artifacts(other, "checkpoint.pt", str(tmp_path / "before"))
    forged = job_storage(theirs, list_jobs(theirs)[-1]).read_bytes("mlflow_run.json")
    job = Path(job_storage(mine, list_jobs(mine)[-1]).uri)
    (job / "mlflow_run.json").write_bytes(forged)
    code = main(
        [
            "--resume",
            "--set",
            "name=mine",
            "--set",
            f"output_dir={tmp_path / 'runs'}",
            "--set",
            "model.width=0.125",
            "--set",
            "data.train_limit=160",
            "--set",
            "train.batch_size=32",
            "--set",
            "train.epochs=2",
            "--set",
            "modularize.cohesion_samples_per_class=20",
            "--set",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    assert f"MLflow run {other}" in errors[0] and "is not this job's (it is run 'theirs'" in errors[0], errors
    after = client.get_run(other)
    assert (after.info.status, after.data.params, after.data.metrics) == \
           (before.info.status, before.data.params, before.data.metrics)
    again = client.download_artifacts(other, "checkpoint.pt", str(tmp_path / "after"))
    assert Path(again).read_bytes() == Path(artifact).read_bytes()


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (ValueError, "FAILED"),
                                           (KeyboardInterrupt, "KILLED"), (SystemExit, "KILLED")])
def test_a_run_ends_in_the_state_its_job_ended_in(tmp_path, raised, status):
    """SystemExit is how Tune ends a trial ASHA stopped (sys.exit(0) in tune.report): KILLED, not FAILED."""
    cfg = tiny_config(tmp_path, "ends")
    run = open_run(cfg, log=None)
    try:
        with run:
            if raised is not None:
                raise raised()
    except BaseException as error:
        assert type(error) is raised
    assert client_for(run.tracking_uri).get_run(run.run_id).info.status == status


def test_tracking_disabled_writes_no_store(tmp_path):
    cfg = tiny_config(tmp_path, "untracked", "tracking.enabled=false", epochs=1)
    run(cfg)
    assert (cfg.run_dir / "checkpoint.pt").is_file()
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_fails_fast_before_training(tmp_path):
    port = free_port()
    cfg = tiny_config(tmp_path, "down", f"tracking.tracking_uri=http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(TrackingError) as info:
        run(cfg)
    assert time.perf_counter() - start < 10
    assert f"http://127.0.0.1:{port} does not answer" in str(info.value) and "\n" not in str(info.value)
    assert not cfg.run_dir.exists()  # nothing trained


def test_unwritable_sqlite_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tiny_config(tmp_path, "nodb", f"tracking.tracking_uri=sqlite:///{blocker}/sub/mlflow.db")
    with pytest.raises(TrackingError, match="not writable"):
        run(cfg)


@pytest.mark.parametrize("make, uri, message", [
    (lambda p: p.write_text("a,b\n1,2\n"), "sqlite:///{p}", "is not an sqlite database"),
    (lambda p: p.mkdir(), "sqlite:///{p}", "is a folder, not an sqlite database file"),
    (lambda p: None, "foo://bar", "scheme MLflow does not know ('foo')"),
    (lambda p: p.write_text("x"), "file://{p}", "is a file, not a folder"),
])
def test_broken_store_is_refused_at_once(tmp_path, make, uri, message):
    """MLflow itself retries an sqlite path that is a folder for about 110 s; the check answers at once."""
    from mwt_ray.tracking import check_store

    path = tmp_path / "store"
    make(path)
    start = time.perf_counter()
    with pytest.raises(TrackingError, match=re.escape(message)) as info:
        check_store(uri.format(p=path))
    assert time.perf_counter() - start < 2 and "\n" not in str(info.value)


def test_plot_convergence(tmp_path):
    history = [{"epoch": e, "coupling": 0.9 - 0.1 * e, "cohesion": 0.5 + 0.1 * e, "kernel_rate": 0.8 - 0.1 * e,
                "train_accuracy": 0.3 * e, "test_accuracy": 0.25 * e} for e in (1, 2, 3)]
    path = plot_convergence(history, tmp_path / "fig5.png", "t")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError):
        plot_convergence([], tmp_path / "empty.png")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    artifacts = tmp_path / "server_artifacts"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(artifacts),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with open_local(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri, artifacts
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_training_against_a_real_mlflow_server(tmp_path, mlflow_server):
    uri, artifacts = mlflow_server
    check_server(uri)
    cfg = tiny_config(tmp_path, "served", f"tracking.tracking_uri={uri}", "tracking.experiment=served", epochs=1)
    run(cfg)
    client = client_for(uri)
    (tracked,) = runs_of(client, "served")
    assert tracked.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "batch_coupling")] == [1]
    assert {a.path for a in client.list_artifacts(tracked.info.run_id)} == ARTIFACTS
    assert any(p.name == "checkpoint.pt" for p in artifacts.rglob("*"))  # uploaded through the server's proxy
    assert not (tmp_path / "mlflow.db").exists()


def test_jobs_starting_together_on_a_new_sqlite_store(tmp_path):
    """Several processes opening runs at once on a store that does not exist yet: each gets its run
    (without the setup lock, MLflow's concurrent schema migrations broke the new database)."""
    code = ("import sys\nfrom mwt_ray.config import load_config\nfrom mwt_ray.tracking.runs import open_run\n"
            "cfg = load_config(None, [f'name=job{sys.argv[1]}', 'tracking.tracking_uri=sqlite:///' + sys.argv[2]])\n"
            "open_run(cfg, log=None).end()\n")
    db = tmp_path / "new" / "mlflow.db"
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(db)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 4, outputs
    client = mlflow_client(tmp_path / "new")
    runs = client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"job{i}" for i in range(4)]
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.fixture(scope="module")
def tracked_checkpoint(tmp_path_factory):
    """A finished tiny modular job tracked in store ``a/mlflow.db``: (its checkpoint.pt, its run id, store URI)."""
    tmp = tmp_path_factory.mktemp("tracked") / "a"
    cfg = tiny_config(tmp, "away", epochs=1)
    summary = run(cfg)
    return cfg.run_dir / "checkpoint.pt", summary["mlflow_run_id"], f"sqlite:///{tmp / 'mlflow.db'}"


REUSE_QUICK = ["--set", "reuse.num_actors=0", "--set", "reuse.sizes=[2]", "--set", "reuse.per_size=1",
               "--set", "reuse.epochs=0", "--set", "reuse.latency_batch_sizes=[]"]


def test_reuse_of_a_checkpoint_copied_away_from_its_store_logs_to_a_new_run(tracked_checkpoint, tmp_path, capsys):
    """The checkpoint names a run the store here does not hold; reuse says so in
    one line before evaluating and logs the tables to a new run (before: exit 1 after evaluating)."""
    import shutil

    from mwt_ray.reuse import main

    source, run_id, home = tracked_checkpoint
    (tmp_path / "copy").mkdir()
    shutil.copy2(source, tmp_path / "copy" / "checkpoint.pt")
    capsys.readouterr()  # the store here (b/mlflow.db) does not exist yet
    assert main(["--modular", str(tmp_path / "copy" / "checkpoint.pt"), *REUSE_QUICK,
                 "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'b' / 'mlflow.db'}"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    notice = [i for i, line in enumerate(lines) if f"run {run_id} of the checkpoint is not in" in line]
    first_row = next(i for i, line in enumerate(lines) if line.startswith("[1/1]"))
    assert len(notice) == 1 and notice[0] < first_row and "new run" in lines[notice[0]], out.out
    assert not out.err.strip(), out.err
    client = client_for(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    (new,) = runs_of(client)
    assert new.info.run_name == "away-reuse" and new.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(new.info.run_id, "reuse")} >= {"reuse/reuse_settings.json"}
    assert "reuse_subtasks" not in client_for(home).get_run(run_id).data.tags  # the original store is untouched


def test_reuse_refuses_an_explicit_run_that_is_not_in_the_store_before_evaluating(tracked_checkpoint, tmp_path,
                                                                                   monkeypatch):
    from mwt_ray.cluster import reuse_pool
    from mwt_ray.jobs import SetupError

    def never(*args, **kwargs):
        raise AssertionError("evaluated although the run to log to does not exist")

    monkeypatch.setattr(reuse_pool, "SubtaskEvaluator", never)
    store = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    (tmp_path / "b").mkdir()
    with pytest.raises(SetupError, match=f"MLflow run to log to {'f' * 32} is not in"):
        reuse_pool.evaluate_reuse(str(tracked_checkpoint[0]), mlflow_run={"tracking_uri": store, "run_id": "f" * 32},
                                  overrides=REUSE_QUICK[1::2], log=None)
    assert not any((tmp_path / "b").iterdir())  # looking did not create a database


def test_experiment_is_marked_as_model_training(tmp_path):
    """MLflow 3 opens an experiment on its GenAI overview unless it is marked as
    machine learning. The mark (the tag the UI's kind selector writes) is set when the project makes
    the experiment, added to one an earlier version made, and a kind set by hand is kept; the line
    that names the run gives the address that opens the training runs in MLflow 3.17's UI."""
    from mwt_ray.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    assert (EXPERIMENT_KIND_TAG, EXPERIMENT_KIND) == ("mlflow.experimentKind", "custom_model_development")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines = []
    open_run(tiny_config(tmp_path, "new"), log=lines.append).end()
    client = client_for(uri)
    experiment = client.get_experiment_by_name("mwt-ray")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    address = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert any(address in line and f"mlflow ui --backend-store-uri {uri}" in line for line in lines), lines

    old = client.create_experiment("made-before")  # as an earlier version made it: no kind
    open_run(tiny_config(tmp_path, "x", "tracking.experiment=made-before"), log=None).end()
    assert client.get_experiment(old).tags.get("mlflow.experimentKind") == "custom_model_development"
    mine = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    open_run(tiny_config(tmp_path, "y", "tracking.experiment=chosen"), log=None).end()
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"


def test_a_run_id_against_a_server_that_never_answers_is_refused_in_bounded_time():
    """A server that accepts connections and never answers (a hung MLflow behind a load balancer):
    looking up a run id there is one TrackingError within seconds, where MLflow's client retries
    for minutes (an export by run id hung past 3 minutes)."""
    import socket

    from mwt_ray.jobs.reuse_job import resolve_reference

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingError, match="does not answer"):
            resolve_reference("0123456789abcdef0123456789abcdef", uri)
        assert time.monotonic() - started < 30
