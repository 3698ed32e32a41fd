"""A CNN of the user's own (``tests/own_cnn.py``) through the commands, each in a new process: trained
as ``model.name=tests.own_cnn:tiny_cnn``, then reused and exported from nothing but its checkpoint,
which rebuilds the model by importing the function again."""
import json

import pytest
import torch
from helpers import run_module

from mwt_ray.core.checkpoint import build_model, load_checkpoint
from mwt_ray.core.graph import modular_units

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

OWN = "tests.own_cnn:tiny_cnn"




def test_own_cnn_trains_then_is_reused_and_exported_from_its_checkpoint(tmp_path):
    run_module("mwt_ray.train", ["--set", f"model.name={OWN}", "--set", f"output_dir={tmp_path / 'runs'}",
                          "--set", "name=own", "--set", "train.epochs=1", "--set", "data.train_limit=100",
                          "--set", "train.batch_size=32", "--set", "tracking.enabled=false",
                          "--set", "modularize.cohesion_samples_per_class=10"], tmp_path)
    checkpoint = tmp_path / "runs" / "own" / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    assert state["architecture"]["name"] == OWN and state["architecture"]["width"] == 1.0
    model = build_model(state)
    assert [u.layer for u in modular_units(model)] == ["features.3", "features.7"]
    assert state["module_masks"].shape == (10, 32)

    run_module("mwt_ray.reuse", ["--run", str(checkpoint), "--set", "reuse.num_actors=0", "--set", "reuse.epochs=0",
                          "--set", "reuse.subtasks=[[0, 1]]", "--set", "reuse.latency_batch_sizes=[]"], tmp_path)
    assert any((tmp_path / "runs" / "own" / "reuse").rglob("*.csv"))

    out = tmp_path / "module-0-1"
    run_module("mwt_ray.export", ["--run", str(checkpoint), "--classes", "0,1", "--out", str(out),
                           "--set", "reuse.epochs=0", "--set", "reuse.latency_batch_sizes=[1]",
                           "--set", "reuse.latency_repeats=1"], tmp_path)
    assert json.loads((out / "module.json").read_text())
    program = torch.export.load(out / "module.pt2").module()
    assert program(torch.rand(3, 3, 32, 32)).shape == (3, 2)
