"""Reuse evaluation on a pool of Ray actors: tiny digits models, a real local Ray cluster."""
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from mwt_ray.config import load_config
from mwt_ray.core.checkpoint import build_model, load_checkpoint, save_checkpoint
from mwt_ray.core.files import atomic_torch_save
from mwt_ray.core.kernel_usage import KernelUsage, module_masks
from mwt_ray.core.models import create_model
from mwt_ray.jobs import JobFailed, load_data, train_in_process
from mwt_ray.jobs.reuse_job import load_reference
from mwt_ray.tracking.reuse_report import REPORT_FILES

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

TINY = ["data.name=digits", "model.width=0.125", "data.train_limit=200", "train.batch_size=32",
        "modularize.cohesion_samples_per_class=20"]
FAST_REUSE = ["reuse.epochs=1", "reuse.latency_batch_sizes=[1,16]", "reuse.latency_repeats=2", "reuse.batch_size=32"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": a fresh cluster even when another one runs on this machine (ray.init() would join it)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def distinct_module_masks(layer_sizes: list[int], num_classes: int) -> torch.Tensor:
    """(classes, kernels) module masks that certainly differ, whatever training did: in each masked
    layer the first half of the kernels is dealt out among the classes (kernel k belongs to class
    k % num_classes alone) and the second half is shared by all, so every module keeps kernels in
    every layer, and in each layer of at least 2 * num_classes kernels every class owns some that
    no other class keeps: a mix of M < num_classes modules lacks those of the classes left out."""
    layers = []
    for size in layer_sizes:
        kernel = torch.arange(size)
        own = (kernel[None, :] % num_classes == torch.arange(num_classes)[:, None]) & (kernel < size // 2)
        layers.append(own | (kernel >= size // 2))
    return torch.cat(layers, dim=1)


def force_module_masks(checkpoint: Path, tracking_uri: str, run_id: str) -> None:
    """Replace a trained modular checkpoint's kernel usage and module masks by ``distinct_module_masks``,
    in the file and in its MLflow run's checkpoint.pt artifact (what an actor loads for a run id).

    A 2-epoch training of this tiny model may keep every kernel for every class (it did on an
    AVX-512 CPU, not on AVX2 ones), and then no module is smaller than the model. The counts are
    written so that every class uses its kernels in all of its samples and the others in none:
    ``module_masks`` rebuilds exactly these masks from them at any tau in (0, 1]."""
    from mlflow import MlflowClient

    state = load_checkpoint(checkpoint)
    usage = KernelUsage.from_state_dict(state["kernel_usage"])
    assert max(usage.layer_sizes) >= 2 * len(usage.class_sizes), (
        "no layer is wide enough for kernels of each class's own"
    )
    masks = distinct_module_masks(usage.layer_sizes, len(usage.class_sizes))
    usage.counts = masks.to(torch.int64) * usage.class_sizes[:, None]
    state["kernel_usage"], state["module_masks"] = usage.state_dict(), masks
    atomic_torch_save(state, checkpoint)
    MlflowClient(tracking_uri=tracking_uri).log_artifact(run_id, str(checkpoint))
    # What the pool will see: the run's artifact holds the forced masks, at the config's tau and at the ends.
    stored = load_reference({"mlflow": {"tracking_uri": tracking_uri, "run_id": run_id}})
    assert torch.equal(stored["module_masks"], masks)
    for tau in (state["config"]["modularize"]["tau"], 1e-6, 1.0):
        assert torch.equal(module_masks(KernelUsage.from_state_dict(stored["kernel_usage"]), tau), masks)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A modular and a standard run, both tracked in an sqlite MLflow store, plus two standard
    checkpoints of the wrong kind (another architecture, another class count)."""
    root = tmp_path_factory.mktemp("reuse_pool")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = TINY + [f"output_dir={root / 'runs'}", f"tracking.tracking_uri={uri}"]
    modular = train_in_process(load_config(None, common + ["name=mod", "train.epochs=2"]), log=None)
    mod_ckpt = root / "runs" / "mod" / "checkpoint.pt"
    force_module_masks(mod_ckpt, uri, modular["mlflow_run_id"])
    standard = train_in_process(load_config(None, common + ["name=std", "train.epochs=2", "train.modular=false"]),
                                log=None)
    wrong = {}
    for name, arch, classes in (("resnet", "resnet18", 10), ("five", "vgg16", 5)):
        model = create_model(arch, classes, 0.125, method="standard")
        path = root / f"{name}.pt"
        save_checkpoint(path, model, {"name": arch, "width": 0.125, "num_classes": classes, "method": "standard",
                                      "classes": [str(c) for c in range(classes)]})
        wrong[name] = str(path)
    return {"root": root, "uri": uri, "mod_ckpt": str(mod_ckpt),
            "std_ckpt": str(root / "runs" / "std" / "checkpoint.pt"), "mod_run": modular["mlflow_run_id"],
            "std_run": standard["mlflow_run_id"], **wrong}


def reuse_config(trained, *extra):
    return load_config(None, TINY + FAST_REUSE + [f"tracking.tracking_uri={trained['uri']}", *extra])


def test_pool_evaluates_every_sampled_subtask_once(trained, ray_cluster, tmp_path):
    """Run id in, tables out: every sub-task once with the right M, values checked against the
    checkpoints themselves, files written and logged to the run evaluated."""
    from mlflow import MlflowClient

    from mwt_ray.cluster import evaluate_reuse

    cfg = reuse_config(trained, "reuse.sizes=[2,9,10]", "reuse.per_size=2", "reuse.num_actors=2",
                       f"reuse.output_dir={tmp_path / 'out'}")
    lines = []
    tables = evaluate_reuse(trained["mod_run"], trained["std_run"], cfg, log=lines.append)
    rows = tables.rows
    # M=2 and M=9: 2 distinct sets each; M=10: the one set there is.
    assert sorted(rows["m"]) == [2, 2, 9, 9, 10]
    assert sorted(rows["index"]) == list(range(5))
    assert len(set(rows["classes"])) == 5
    assert sum(line.startswith("[") and "/5] M=" in line for line in lines) == 5
    # Two actors, one torch thread each (their CPU share).
    assert rows["pid"].nunique() == 2 and os.getpid() not in set(rows["pid"]) and set(rows["threads"]) == {1}
    for col in ("module_accuracy", "standard_accuracy", "zero_ft_accuracy", "krr", "val_accuracy"):
        assert rows[col].between(0, 1).all(), col
    assert (rows["accuracy_loss"] == rows["standard_accuracy"] - rows["module_accuracy"]).all()
    # The fixture's modules each own kernels (distinct_module_masks): a mix of fewer than all 10 lacks
    # some and must cost fewer FLOPs; all 10 together keep every kernel, the whole model's cost.
    smaller, whole = rows[rows["m"] < 10], rows[rows["m"] == 10]
    assert (smaller["module_flops"] < smaller["model_flops"]).all()
    assert (whole["module_flops"] == whole["model_flops"]).all() and (whole["krr"] == 1).all()
    assert (rows["latency_ratio_b16"] > 0).all() and (rows["module_ms_b1"] > 0).all()
    # Independent truth: KRR from the stored module masks, M-ACC from the standard model itself.
    state = load_checkpoint(trained["mod_ckpt"])
    standard = build_model(load_checkpoint(trained["std_ckpt"])).eval()
    data = load_data(cfg)
    for row in rows.itertuples():
        classes = [int(c) for c in row.classes.split()]
        assert row.krr == pytest.approx(state["module_masks"][classes].any(0).float().mean().item())
    row = rows.iloc[0]
    classes = [int(c) for c in row["classes"].split()]
    keep = sum((data.test_labels == c) for c in classes).bool()
    x = (data.test_images[keep].float() / 255 - data.mean[:, None, None]) / data.std[:, None, None]
    with torch.no_grad():
        predicted = torch.tensor(classes)[standard(x)[:, classes].argmax(1)]
    assert row["standard_accuracy"] == pytest.approx((predicted == data.test_labels[keep]).float().mean().item())
    # Per-M table = mean of the rows; files written; logged under the run evaluated.
    assert tables.summary.loc[9, "krr"] == pytest.approx(rows[rows["m"] == 9]["krr"].mean())
    assert list(tables.accuracy_table().index) == ["2-class", "9-class", "10-class"]
    for name in REPORT_FILES:
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "out" / "reuse_rows.csv")) == 5
    client = MlflowClient(tracking_uri=trained["uri"])
    logged = {f.path for f in client.list_artifacts(trained["mod_run"], "reuse")}
    assert {f"reuse/{name}" for name in REPORT_FILES} <= logged
    history = client.get_metric_history(trained["mod_run"], "reuse_krr")
    assert sorted(m.step for m in history) == [2, 9, 10]


@pytest.mark.parametrize("restarts", [2, 0])
def test_an_actor_killed_mid_subtask_is_restarted_and_its_subtask_retried(trained, ray_cluster, tmp_path, restarts,
                                                                         monkeypatch):
    from mwt_ray.cluster import evaluate_reuse

    out = tmp_path / "out"
    # The actor evaluating sub-task 1 kills its own process once, after its first fine-tuning step.
    monkeypatch.setenv("MWT_RAY_HOOKS", str(Path(__file__).with_name("kill_reuse_actor.py")))
    monkeypatch.setenv("MWT_RAY_HOOK_KILL_SUBTASK", "1")
    monkeypatch.setenv("MWT_RAY_HOOK_KILL_MARKER", str(out / ".fault_injected_subtask_1"))
    cfg = reuse_config(trained, "reuse.subtasks=[[0,1],[2,3],[4,5]]", "reuse.num_actors=1",
                       f"reuse.max_restarts={restarts}", "reuse.latency_batch_sizes=[]", f"reuse.output_dir={out}",
                       "tracking.enabled=false")
    if restarts == 0:
        with pytest.raises(JobFailed, match="reuse evaluation failed"):
            evaluate_reuse(trained["mod_ckpt"], None, cfg, log=None)
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained["uri"])
    target = client.create_run(client.get_experiment_by_name("mwt-ray").experiment_id).info.run_id
    tables = evaluate_reuse(
        trained["mod_ckpt"], None, cfg, {"tracking_uri": trained["uri"], "run_id": target}, log=None
    )
    # The run given is logged to although tracking.enabled is false in the config.
    assert "reuse/reuse_rows.csv" in {f.path for f in client.list_artifacts(target, "reuse")}
    marker = (out / ".fault_injected_subtask_1").read_text()
    killed = int(marker.split()[2])
    rows = tables.rows
    assert list(rows["index"]) == [0, 1, 2] and list(rows["classes"]) == ["0 1", "2 3", "4 5"]
    # Sub-task 0 ran on the first actor process, which died on sub-task 1; a restarted process did the rest.
    assert rows.loc[0, "pid"] == killed and rows.loc[1, "pid"] != killed and rows.loc[2, "pid"] == rows.loc[1, "pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)


def test_cli_reuse_in_process_from_a_checkpoint(trained, tmp_path, capsys):
    from mwt_ray.reuse import main

    out = tmp_path / "cli"
    code = main(["--run", str(Path(trained["mod_ckpt"]).parent), "--standard", trained["std_ckpt"],
                 *[f"--set={o}" for o in FAST_REUSE], "--set", "reuse.sizes=[3]", "--set", "reuse.per_size=2",
                 "--set", "reuse.num_actors=0", "--set", f"reuse.output_dir={out}", "--set", "tracking.enabled=false"])
    assert code == 0
    rows = pd.read_csv(out / "reuse_rows.csv")
    assert list(rows["m"]) == [3, 3] and rows["pid"].eq(os.getpid()).all()
    assert "[2/2] M=3" in capsys.readouterr().out


def _bad_cases():
    return [
        ("mod_ckpt", None, ["reuse.sizes=[2,11]"], "M=11 is outside 2..10"),
        ("mod_ckpt", None, ["reuse.sizes=[1,3]"], "M=1 is below 2"),
        ("mod_ckpt", None, ["reuse.per_size=0"], "reuse.per_size"),
        ("/no/such/checkpoint.pt", None, [], "neither a checkpoint file"),
        ("0123456789abcdef0123456789abcdef", None, [], "does not exist"),
        ("std_ckpt", None, [], "has no module masks"),
        ("std_run", None, [], "has no module masks"),
        ("mod_ckpt", "resnet", [], "of the same architecture"),
        ("mod_ckpt", "five", [], "of the same dataset"),
        ("mod_ckpt", "mod_ckpt", [], "was trained with method mwt; pass a standard"),
        ("mod_ckpt", "fedcba9876543210fedcba9876543210", [], "does not exist"),
        ("mod_ckpt", None, ["reuse.num_actors=3"], "room for 2"),
        ("mod_ckpt", None, ["reuse.cpus_per_actor=4"], "no room for one reuse actor"),
    ]


@pytest.mark.parametrize("modular,standard,overrides,message", _bad_cases())
def test_bad_input_one_line_and_nothing_written(trained, ray_cluster, tmp_path, capsys, modular, standard, overrides,
                                                message):
    from mlflow import MlflowClient

    from mwt_ray.reuse import main

    client = MlflowClient(tracking_uri=trained["uri"])
    runs_before = len(client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id]))
    artifacts_before = [f.path for f in client.list_artifacts(trained["mod_run"])]
    args = ["--run", trained.get(modular, modular)]
    if standard:
        args += ["--standard", trained.get(standard, standard)]
    out = tmp_path / "out"
    for item in FAST_REUSE + [f"reuse.output_dir={out}", f"tracking.tracking_uri={trained['uri']}", *overrides]:
        args += ["--set", item]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()
    assert len(client.search_runs([client.get_experiment_by_name("mwt-ray").experiment_id])) == runs_before
    assert [f.path for f in client.list_artifacts(trained["mod_run"])] == artifacts_before
