"""``python -m mwt_ray.export``: a module's files run without mwt_ray, give the module's
scores, and its MLflow model loads, registers and serves.

The truth the files are checked against is computed here independently: with ``reuse.epochs=0``
the module is the modular model with its generators off and every kernel outside the classes'
modules forced to zero (``hard_masks.fixed_masks``), its logits restricted to the classes, on images
normalised with the training set's statistics.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, open_local, tiny_config

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

REPO = Path(__file__).resolve().parents[1]
CLASSES = [3, 5]
REGISTERED = "digits-3-5"
DATA = ["data.train_limit=500"]
FAST = ["--set", "reuse.latency_batch_sizes=[1,4]", "--set", "reuse.latency_repeats=1"]

# Runs in a fresh interpreter where ``import mwt_ray`` fails, as on a machine without it.
WITHOUT_MWT_RAY = r"""
import json, sys
sys.modules["mwt_ray"] = None
import numpy as np, torch
folder, images_file, uri, model_uri = sys.argv[1:5]
images = torch.from_numpy(np.load(images_file))
out = {}
try:
    import mwt_ray
    out["mwt_ray_importable"] = True
except ImportError:
    out["mwt_ray_importable"] = False
program = torch.export.load(folder + "/module.pt2").module()
out["pt2"] = [program(images[:1]).tolist(), program(images).tolist()]
import onnxruntime
session = onnxruntime.InferenceSession(folder + "/module.onnx", providers=["CPUExecutionProvider"])
out["onnx"] = session.run(["scores"], {"images": images.numpy()})[0].tolist()
if model_uri:
    import mlflow
    mlflow.set_tracking_uri(uri)
    out["pyfunc"] = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(images.numpy())["scores"]).tolist()
print("RESULT " + json.dumps(out))
"""


def _export(argv: list[str]) -> int:
    from mwt_ray.export import main

    return main(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny modular VGG16 (its MLflow run in an sqlite store) and a standard one, on digits; the
    strong coupling loss separates its modules in 5 epochs (KRR about 0.6 for classes 3 and 5)."""
    from mwt_ray.jobs import train_in_process

    tmp = tmp_path_factory.mktemp("export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        modular = train_in_process(tiny_config(tmp, "modular", *DATA, "train.beta=6", "train.lr=0.05", workers=0,
                                               epochs=5), log=None)
        train_in_process(tiny_config(tmp, "standard", *DATA, "train.modular=false", workers=0, epochs=1), log=None)
    finally:
        torch.set_num_threads(threads)
    return {"tmp": tmp, "run_id": modular["mlflow_run_id"], "uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "modular": tmp / "runs" / "modular", "standard": tmp / "runs" / "standard"}


@pytest.fixture(scope="module")
def exported(trained):
    """The 2-class module of classes 3 and 5, no fine-tuning, from the MLflow run id, registered."""
    out = trained["tmp"] / "module-3-5"
    status = _export(["--run", trained["run_id"], "--standard", str(trained["standard"]), "--classes", "3,5",
                      "--out", str(out), "--register", REGISTERED, "--set", "reuse.epochs=0",
                      "--set", f"tracking.tracking_uri={trained['uri']}", *FAST])
    assert status == 0
    return {**trained, "out": out, "summary": json.loads((out / "module.json").read_text())}


def _expected_scores(trained, classes: list[int], images: torch.Tensor) -> torch.Tensor:
    """The module's scores from the full modular model with hard masks (see the module docstring)."""
    from hard_masks import fixed_masks

    from mwt_ray.core.checkpoint import build_model, load_checkpoint
    from mwt_ray.core.data import load_dataset
    from mwt_ray.core.kernel_usage import KernelUsage, module_masks

    state = load_checkpoint(trained["modular"] / "checkpoint.pt")
    model = build_model(state).eval()
    keep = module_masks(KernelUsage.from_state_dict(state["kernel_usage"]), 0.9)[classes].any(0)
    data = load_dataset("digits", train_limit=500)  # the runs' data.train_limit: their normalisation
    with torch.no_grad(), fixed_masks(model, keep):
        return model((images - data.mean[:, None, None]) / data.std[:, None, None])[:, classes]


def _test_images(classes: list[int], count: int = 12) -> torch.Tensor:
    from mwt_ray.core.data import load_dataset

    sub = load_dataset("digits").subset(classes)
    return sub.test_images[:count].to(torch.float32) / 255


def _without_mwt_ray(folder: Path, images: torch.Tensor, uri: str = "", model_uri: str = "") -> dict:
    np.save(folder.parent / "images.npy", images.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_MWT_RAY, str(folder), str(folder.parent / "images.npy"), uri,
                             model_uri], capture_output=True, text=True, timeout=600, env=env, cwd=folder.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(out for out in result.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_summary_says_what_the_module_is_and_costs(exported):
    s = exported["summary"]
    assert [c["index"] for c in s["classes"]] == CLASSES and [c["name"] for c in s["classes"]] == ["3", "5"]
    assert s["tau"] == 0.9 and s["tau_from"] == "the run's modularize.tau"
    assert s["architecture"] == {"name": "vgg16", "width": 0.125, "num_classes": 10}
    assert s["fine_tuning"]["chosen"] == "no fine-tuning (reuse.epochs=0)"
    # A 2-class module of a trained model is smaller than the full model.
    assert s["kernels_kept"] < s["kernels_total"] and s["krr"] == pytest.approx(s["kernels_kept"] / s["kernels_total"])
    assert s["flops"]["module"] < s["flops"]["full_model"] and s["parameters"]["module"] < s["parameters"]["full_model"]
    assert set(s["latency_ms"]) == {"batch_1", "batch_4"}
    assert all(v > 0 for v in s["latency_ms"]["batch_4"].values())
    assert 0 <= s["accuracy"]["module"] <= 1 and 0 <= s["accuracy"]["standard"] <= 1
    assert s["input"]["range"] == [0.0, 1.0] and s["input"]["shape"] == ["batch", 3, 32, 32]
    assert "in [0, 1] (0-255 pixels: divide by 255 first)" in s["input"]["values"]
    assert s["versions"]["torch"] == torch.__version__.split("+")[0] and s["versions"]["mwt-ray"]
    assert s["source"]["mlflow_run"]["run_id"] == exported["run_id"]
    assert s["files"]["module.onnx"] == (exported["out"] / "module.onnx").stat().st_size
    assert sorted(p.name for p in exported["out"].iterdir()) == ["module.json", "module.onnx", "module.pt2"]


def test_files_and_logged_model_give_the_module_scores_without_mwt_ray(exported):
    """module.pt2 (batch 1 and 12), module.onnx and the registered MLflow model, loaded in a Python
    that cannot import mwt_ray, against the scores computed here from the hard-masked full model."""
    images = _test_images(CLASSES)
    expected = _expected_scores(exported, CLASSES, images)
    got = _without_mwt_ray(exported["out"], images, exported["uri"], f"models:/{REGISTERED}/1")
    assert got["mwt_ray_importable"] is False
    scale = max(1.0, expected.abs().max().item())
    for key, scores in (("pt2 batch 1", got["pt2"][0]), ("pt2", got["pt2"][1]), ("onnx", got["onnx"]),
                        ("pyfunc", got["pyfunc"])):
        scores = torch.tensor(scores)
        assert scores.shape == (1 if key == "pt2 batch 1" else len(images), 2), key
        torch.testing.assert_close(scores, expected[:len(scores)], atol=1e-4 * scale, rtol=0, msg=key)


def test_mlflow_run_is_nested_under_the_training_run_and_the_version_is_tagged(exported):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=exported["uri"])
    logged = exported["summary"]["mlflow"]
    run = client.get_run(logged["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == exported["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["mwt.kind"] == "module"
    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == logged["run_id"]
    assert json.loads(version.tags["classes"]) == ["3", "5"]
    assert float(version.tags["krr"]) == pytest.approx(exported["summary"]["krr"], abs=1e-4)
    assert int(version.tags["flops"]) == exported["summary"]["flops"]["module"]
    assert float(version.tags["accuracy"]) == pytest.approx(exported["summary"]["accuracy"]["module"], abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(logged["run_id"], "module_files")}
    assert artifacts == {"module_files/module.pt2", "module_files/module.json"}


def _invoke(port: int, inputs) -> tuple[int, dict]:
    """POST ``{"inputs": inputs}`` (NaN and Infinity as the JSON tokens Python writes) to /invocations."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                     data=json.dumps({"inputs": inputs}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with open_local(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# What the served model is sent that it cannot score, and what its 400 answer must say.
REFUSED = {
    "NaN pixel": (lambda x: x.index_fill_(0, torch.tensor([0]), float("nan")), "are NaN or infinite"),
    "infinite pixel": (lambda x: x.index_fill_(3, torch.tensor([5]), float("inf")), "are NaN or infinite"),
    "0-255 pixels": (lambda x: (x * 255).round(), "outside [0, 1]"),
    "negative pixel": (lambda x: x - 0.5, "outside [0, 1]"),
    "another size": (lambda x: x[:, :, :16, :16], "has shape (5, 3, 16, 16), not (B, 3, 32, 32)"),
    "one channel": (lambda x: x[:, :1], "has shape (5, 1, 32, 32), not (B, 3, 32, 32)"),
}


def test_served_model_answers_invocations_with_the_module_scores(exported, tmp_path):
    """``mlflow models serve -m models:/NAME/1 --env-manager local`` on 127.0.0.1, started and stopped
    here: valid images get the module's scores; images the module cannot score (``REFUSED``) get a
    400 whose message says what is wrong and what the module takes, never scores."""
    images = _test_images(CLASSES, count=5)
    expected = _expected_scores(exported, CLASSES, images)
    port = free_port()
    # As in an activated environment: MLflow starts the server by the name uvicorn, found on the PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": exported["uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # The server's log goes to a file: a pipe nobody reads fills up and blocks the server mid-start.
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                                   f"models:/{REGISTERED}/1", "--env-manager", "local", "-h", "127.0.0.1",
                                   "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline, last_error = time.monotonic() + 300, None
        while True:
            assert server.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                with open_local(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError as error:
                last_error = error
            assert time.monotonic() < deadline, (
                f"no answer to /ping in 300 s ({last_error!r}); the server's log ends:\n"
                + log_path.read_text(errors="replace")[-3000:]
            )
            time.sleep(1)
        status, answer = _invoke(port, images.tolist())
        refused = {name: _invoke(port, change(images.clone()).tolist()) for name, (change, _) in REFUSED.items()}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert status == 200, answer
    predictions = answer["predictions"]
    scores = torch.tensor(predictions["scores"] if isinstance(predictions, dict) else predictions)
    torch.testing.assert_close(scores, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=0)
    for name, (status, answer) in refused.items():
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (name, status, str(answer)[:500])
        message = answer["message"]
        assert REFUSED[name][1] in message, (name, message[-600:])
        assert "float32 RGB images of shape (B, 3, 32, 32) with every value finite and in [0, 1]" in message, name
        assert "predictions" not in answer, name


def test_fine_tuned_module_by_class_order_and_its_reported_accuracy(trained):
    """Fine-tuning on (no MLflow): the scores come in the order of --classes, and the accuracy in
    module.json is that of the .pt2 program's predictions on the sub-task's test images."""
    from mwt_ray.core.data import load_dataset

    out = trained["tmp"] / "module-7-1"
    assert _export(["--run", str(trained["modular"]), "--classes", "7,1", "--out", str(out), "--set", "reuse.epochs=1",
                    "--set", "tracking.enabled=false", *FAST]) == 0
    summary = json.loads((out / "module.json").read_text())
    assert summary["fine_tuning"]["epochs"] == 1 and summary["fine_tuning"]["best_epoch"] in (0, 1)
    assert summary["fine_tuning"]["chosen"] in ("no fine-tuning", "fine-tuned epoch 1") and "mlflow" not in summary
    sub = load_dataset("digits").subset([7, 1])  # labels 0 = class 7, 1 = class 1
    program = torch.export.load(str(out / "module.pt2")).module()
    with torch.no_grad():
        predicted = program(sub.test_images.to(torch.float32) / 255).argmax(1)
    assert summary["accuracy"]["module"] == pytest.approx((predicted == sub.test_labels).float().mean().item())
    assert summary["accuracy"]["test_images"] == len(sub.test_labels)


def test_tau_defaults_to_the_sweep_trials_choice(trained, tmp_path):
    """--tau's default: a sweep trial's tau (trial_result.json beside its checkpoint, or the metric
    sweep.tau on its MLflow run), else the run's modularize.tau; --tau wins over both."""
    import shutil

    from mlflow import MlflowClient

    from mwt_ray.jobs.export_job import plan_export

    store = [f"tracking.tracking_uri={trained['uri']}"]
    trial = tmp_path / "trial"
    shutil.copytree(trained["modular"], trial)
    plan = plan_export(str(trial), "3,5", tmp_path / "out", overrides=store)
    assert (plan.tau, plan.tau_from) == (0.9, "the run's modularize.tau")
    (trial / "trial_result.json").write_text(json.dumps({"result": {"tau": 0.7}, "tau_scan": []}))
    plan = plan_export(str(trial), "3,5", tmp_path / "out", overrides=store)
    assert plan.tau == 0.7 and "trial_result.json" in plan.tau_from
    assert plan_export(str(trial), "3,5", tmp_path / "out", tau=0.95, overrides=store).tau == 0.95
    MlflowClient(tracking_uri=trained["uri"]).log_metric(trained["run_id"], "sweep.tau", 0.8)
    plan = plan_export(trained["run_id"], "5,3", tmp_path / "out", overrides=store)
    assert plan.tau == 0.8 and "sweep.tau" in plan.tau_from and plan.classes == [5, 3]
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_sweep_last_stage_registers_the_best_trials_modules(trained, tmp_path):
    """``sweep.register_modules`` (cluster.sweep's last stage, on a sweep folder laid out as a sweep
    leaves it): each class set exported from the best trial at its tau, registered as <name>-<classes>."""
    import shutil

    from mlflow import MlflowClient

    from mwt_ray.cluster.sweep import _register_modules
    from mwt_ray.config import load_config

    folder = tmp_path / "sweep"
    shutil.copytree(trained["modular"], folder / "trials" / "trial-b")
    shutil.copytree(trained["standard"], folder / "standard")
    cfg = load_config(None, ["name=tiny", f"tracking.tracking_uri={trained['uri']}", "sweep.register_modules=[[6, 2]]",
                             "reuse.epochs=0", "reuse.latency_batch_sizes=[1]", "reuse.latency_repeats=1"])
    (summary,) = _register_modules(cfg, folder, {"best": {"trial": "b", "tau": 0.8}}, log=lambda line: None)
    assert summary["tau"] == 0.8 and [c["index"] for c in summary["classes"]] == [6, 2]
    assert "standard" in summary["accuracy"]
    assert json.loads((folder / "modules" / "6-2" / "module.json").read_text())["krr"] == summary["krr"]
    client = MlflowClient(tracking_uri=trained["uri"])
    version = client.get_model_version("tiny-6-2", "1")
    assert client.get_run(version.run_id).data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert json.loads(version.tags["classes"]) == ["6", "2"]


def test_progress_line_names_the_classes_once():
    from mwt_ray.jobs.export_job import _classes_text

    assert _classes_text([4, 6], ["4", "6"]) == "4, 6"  # digits: the names are the indices
    assert _classes_text([3, 5], ["cat", "dog"]) == "cat (3), dog (5)"
