"""An exported module in MLflow: a logged model, and with a name a version in the Model Registry.

The model is MLflow's ONNX flavor of ``module.onnx``: what is saved is the ONNX program, served and
loaded through onnxruntime (``mlflow.pyfunc.load_model``, ``mlflow models serve --env-manager
local``), so it runs where mwt_ray is not installed. Its signature is the export's contract: a
float32 tensor ``images`` (B, 3, H, W) in [0, 1], a float32 tensor ``scores`` (B, M) in the order
of the classes, which the model's metadata names. ``module.pt2`` and the export's summary go beside
it as artifacts of the same run.

The run is nested under the run that trained the modular model when that run is in the store,
else a new run (the log says which).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch

from .runs import _quiet_mlflow_logs, open_run, resolve_tracking_uri, run_exists

__all__ = ["log_module", "MODEL_NAME"]

MODEL_NAME = "module"  # the logged model's name inside its run


@contextlib.contextmanager
def _fluent_run(uri: str, run_id: str):
    """MLflow's fluent API (``log_model``, ``register_model``) on run ``run_id`` of store ``uri``;
    the global tracking URI is put back afterwards."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            yield mlflow
    finally:
        mlflow.set_tracking_uri(before)


def _signature(example: torch.Tensor, classes: int):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]), "images")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "scores")]))


def log_module(cfg, folder: str | Path, summary: dict, example: torch.Tensor, register: str | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Log ``folder``'s module.onnx as an MLflow model (and module.pt2, the summary) to a run nested
    under the source run when the store has it; with ``register`` a new registered model version
    tagged with classes, KRR, FLOPs and accuracy. Returns {"run_id", "model_uri", "registered"}."""
    import onnx

    folder = Path(folder)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    _quiet_mlflow_logs()
    source = (summary["source"] or {}).get("mlflow_run")
    parent = source["run_id"] if source and run_exists(uri, source["run_id"]) else None
    names = [c["name"] for c in summary["classes"]]
    label = "-".join(names)
    if parent is None and log:
        log(f"MLflow: the run that trained the model is not in {uri}"
            + (f" (run {source['run_id']})" if source else "") + "; the module goes to a new run")
    tracking = cfg.tracking.model_copy(update={"parent_run_id": parent})
    run_cfg = cfg.model_copy(update={"name": f"{cfg.name} module {label}", "tracking": tracking})
    accuracy = summary["accuracy"]
    tags = {"classes": json.dumps(names), "class_indices": json.dumps([c["index"] for c in summary["classes"]]),
            "krr": f"{summary['krr']:.4f}", "flops": str(summary["flops"]["module"]),
            "full_model_flops": str(summary["flops"]["full_model"]), "accuracy": f"{accuracy['module']:.4f}",
            "tau": f"{summary['tau']:g}"}
    if "standard" in accuracy:
        tags["standard_accuracy"] = f"{accuracy['standard']:.4f}"
    with open_run(run_cfg, tags={"mwt.kind": "module", "mwt.classes": label}, log=log) as tracked:
        with _fluent_run(uri, tracked.run_id) as mlflow:
            mlflow.log_metrics({"module_krr": summary["krr"], "module_flops": summary["flops"]["module"],
                                "full_model_flops": summary["flops"]["full_model"],
                                "module_accuracy": accuracy["module"],
                                **({"standard_accuracy": accuracy["standard"]} if "standard" in accuracy else {})})
            info = mlflow.onnx.log_model(
                onnx.load(str(folder / "module.onnx")), name=MODEL_NAME, signature=_signature(example, len(names)),
                input_example=example.numpy(), metadata={"classes": names, "class_indices": tags["class_indices"],
                                                         "input": summary["input"], "output": summary["output"]},
                save_as_external_data=False, tags=tags)
            mlflow.log_artifact(str(folder / "module.pt2"), artifact_path="module_files")
            mlflow.log_dict(summary, "module_files/module.json")
            registered = None
            if register is not None:
                version = mlflow.register_model(info.model_uri, register, tags=tags)
                registered = {"name": register, "version": int(version.version),
                              "uri": f"models:/{register}/{version.version}"}
        result = {"run_id": tracked.run_id, "tracking_uri": uri, "parent_run_id": parent, "model_uri": info.model_uri,
                  "registered": registered}
    if log:
        log(f"MLflow: module logged as {info.model_uri} in run {tracked.run_id}"
            + (f", nested under {parent}" if parent else "")
            + (f"; registered model {register!r} version {registered['version']}" if registered else ""))
    return result
