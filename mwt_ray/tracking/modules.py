"""An exported module in MLflow: a logged model, and with a name a version in the Model Registry.

The model is a pyfunc model around ``module.onnx`` (``served_module``, logged as code): it checks
each request against the module's input contract, refusing with HTTP 400 what the module cannot
score (NaN or infinite values, values outside [0, 1], another shape), then runs the ONNX program in
onnxruntime (``mlflow.pyfunc.load_model``, ``mlflow models serve --env-manager local``), so it runs
where mwt_ray is not installed. Its signature is that contract: a float32 tensor ``images`` (B, 3,
H, W) in [0, 1], a float32 tensor ``scores`` (B, M) in the order of the classes, which the model's
metadata names. ``module.pt2`` and the export's summary go beside
it as artifacts of the same run.

The run is nested under the run that trained the modular model when that run is in the store,
else a new run (the log says which).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import served_module
from .runs import open_run
from .store import quiet_mlflow_logs, resolve_tracking_uri, run_exists

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
    """float32 ``images`` of 4 dimensions in, float32 ``scores`` (B, M) out. The image dimensions are
    left open (-1) here: MLflow refuses a signature's shape before the model sees the request, with a
    message that prints the whole request first; ``served_module`` refuses a wrong channel count or
    size itself, in a message that says what the module takes (the contract's shape is in the metadata)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) * example.dim(), "images")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "scores")]))


@contextlib.contextmanager
def _mlflow_silent():
    """MLflow's own lines while the model is logged and registered (the input example's validation,
    a progress bar per artifact download, "Successfully registered model ...") off stderr: the
    export says in its own lines what was logged and registered."""
    import os

    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    enabled, bar = MLFLOW_LOGGING_STREAM.enabled, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    MLFLOW_LOGGING_STREAM.enabled = False
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = enabled
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def _served_config(summary: dict) -> dict:
    """What ``served_module`` checks requests against: the export's input contract."""
    return {"input_name": summary["input"]["name"], "output_name": summary["output"]["name"],
            "shape": list(summary["input"]["shape"][1:]), "range": list(summary["input"]["range"])}


def _requirements() -> list[str]:
    """What the served model imports, at the versions it was checked with (given, so that MLflow
    does not load the model in a subprocess to infer them)."""
    import importlib.metadata

    return [f"{p}=={importlib.metadata.version(p)}" for p in ("mlflow", "onnxruntime", "numpy")]


def log_module(cfg, folder: str | Path, summary: dict, example: torch.Tensor, register: str | None = None,
               log: Callable[[str], None] | None = print, on_run: Callable[[str, str], None] | None = None) -> dict:
    """Log ``folder``'s module.onnx as an MLflow model (and module.pt2, the summary) to a run nested
    under the source run when the store has it; with ``register`` a new registered model version
    tagged with classes, KRR, FLOPs and accuracy. ``on_run(tracking_uri, run_id)`` is called as soon
    as the run exists (the export records it, so that a later export can end it if this process is
    killed). Returns {"run_id", "model_uri", "registered"}."""
    folder = Path(folder)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    quiet_mlflow_logs()
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
        if on_run is not None:
            on_run(uri, tracked.run_id)
        with _fluent_run(uri, tracked.run_id) as mlflow, _mlflow_silent():
            mlflow.log_metrics({"module_krr": summary["krr"], "module_flops": summary["flops"]["module"],
                                "full_model_flops": summary["flops"]["full_model"],
                                "module_accuracy": accuracy["module"],
                                **({"standard_accuracy": accuracy["standard"]} if "standard" in accuracy else {})})
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(Path(served_module.__file__)),
                artifacts={served_module.ONNX_ARTIFACT: str(folder / "module.onnx")},
                model_config=_served_config(summary), signature=_signature(example, len(names)),
                input_example=example.numpy(), pip_requirements=_requirements(),
                metadata={"classes": names, "class_indices": tags["class_indices"], "input": summary["input"],
                          "output": summary["output"]}, tags=tags)
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
