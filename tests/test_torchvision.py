"""torchvision's CNNs through the whole product: ``create_model("torchvision:<name>")``, then
``python -m mwt_ray.train``, ``python -m mwt_ray.reuse`` and ``python -m mwt_ray.export`` on the embedded
digits. (A sweep trial of one is in ``test_sweep.py``; the graph mechanism itself in ``test_graph.py``;
the models that are refused in ``test_bad_input.py``.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from mwt_ray.core.checkpoint import build_model, load_checkpoint
from mwt_ray.core.graph import modular_units
from mwt_ray.core.models import create_model

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

MOBILENET = "torchvision:mobilenet_v2"


def test_the_classifier_is_sized_and_width_goes_to_width_mult():
    plain = create_model(MOBILENET, num_classes=7, method="standard")
    assert isinstance(plain, nn.Module) and plain(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    full, half = convs(plain), convs(create_model(MOBILENET, num_classes=7, width=0.5, method="standard"))
    assert len(full) == len(half) and sum(half) < 0.6 * sum(full)  # torchvision rounds to multiples of 8
    modular = create_model(MOBILENET, num_classes=7, width=0.5)
    logits, masks = modular(torch.zeros(2, 3, 32, 32), return_masks=True)
    assert logits.shape == (2, 7) and [m.shape[1] for m in masks] == [u.num_kernels for u in modular_units(modular)]
    assert create_model("torchvision:resnet18", 4, width=1.0, method="standard").fc.out_features == 4  # its own width


@pytest.mark.parametrize("name, width, message", [
    ("torchvision:resnet19", None, "unknown torchvision model 'torchvision:resnet19'"),
    ("torchvision:resnet18", 0.5, "torchvision:resnet18 has no width multiplier"),
    ("resnet19", None, "or torchvision:<name> for a torchvision CNN"),
])
def test_bad_models_are_refused_by_name(name, width, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        create_model(name, 10, width)


def run(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_mobilenet_v2_trains_modularizes_reuses_and_exports(tmp_path):
    common = ["--set", f"output_dir={tmp_path}/runs", "--set", "tracking.enabled=false"]
    run("mwt_ray.train", "--set", f"model.name={MOBILENET}", "--set", "model.width=0.5", "--set", "train.epochs=2",
        "--set", "data.train_limit=300", "--set", "train.batch_size=32", *common, cwd=tmp_path)
    checkpoint = tmp_path / "runs" / "mwt" / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    assert state["architecture"] | {"classes": None} == {"name": MOBILENET, "width": 0.5, "num_classes": 10,
                                                          "method": "mwt", "classes": None}
    model = build_model(state)  # the checkpoint rebuilds the modular graph with its generators' keys
    sizes = [u.num_kernels for u in modular_units(model)]
    assert state["module_masks"].shape == (10, sum(sizes)) and len(sizes) == 51
    metrics = json.loads((tmp_path / "runs" / "mwt" / "metrics.json").read_text())
    assert 0 < metrics["modules"]["krr"] <= 1

    run("mwt_ray.reuse", "--run", str(checkpoint), "--set", "reuse.num_actors=0", "--set", "reuse.sizes=[2]",
        "--set", "reuse.per_size=1", "--set", "reuse.epochs=1", "--set", "reuse.latency_batch_sizes=[1]",
        "--set", "reuse.latency_repeats=1", "--set", "tracking.enabled=false", cwd=tmp_path)
    rows = (tmp_path / "runs" / "mwt" / "reuse" / "reuse_rows.csv").read_text().splitlines()
    assert len(rows) == 2  # a header and the one sub-task

    out = tmp_path / "module"
    run("mwt_ray.export", "--run", str(checkpoint), "--classes", "0,1", "--out", str(out), "--set", "reuse.epochs=0",
        "--set", "tracking.enabled=false", cwd=tmp_path)
    summary = json.loads((out / "module.json").read_text())
    assert summary["architecture"]["name"] == MOBILENET and 0 < summary["krr"] <= 1
    assert {p.name for p in out.iterdir()} >= {"module.pt2", "module.onnx", "module.json"}
