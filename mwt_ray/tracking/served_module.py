"""The MLflow model of an exported module: ``module.onnx`` run by ONNX Runtime behind a check of
what comes in, so that a request the module cannot score is refused with HTTP 400 and a message
that says what it takes, instead of scores computed from it.

The module was trained on float32 RGB images in [0, 1] (its normalisation inside): NaN or infinite
pixels give NaN scores, which are not even valid JSON, and 0-255 pixels give confident scores of
the wrong class (logits in the thousands). Both are refused here, as is any other shape than
(B, C, H, W) at the training size. ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` is what
MLflow's scoring server turns into a 400 (``pyfunc/scoring_server``: it re-raises an
``MlflowException`` from ``predict`` with its own code, any other error as a 400 without the message).

This file is logged as code (MLflow's models-from-code): MLflow copies it into the model and runs
it wherever the model is loaded, under a module name of its own, so it imports only numpy, ONNX
Runtime and MLflow, never mwt_ray. What it needs to know (input shape and range, names) comes from
the model's ``model_config``, the ONNX file from its artifacts.
"""
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

ONNX_ARTIFACT = "module.onnx"


def contract(config: dict) -> str:
    channels, height, width = config["shape"]
    low, high = config["range"]
    return (f"the module takes {config['input_name']!r}: float32 RGB images of shape (B, {channels}, {height}, "
            f"{width}) with every value finite and in [{low:g}, {high:g}] (normalisation is inside; 0-255 "
            f"pixels: divide by 255 first)")


def check_images(model_input, config: dict) -> np.ndarray:
    """The images in ``model_input`` (an array, or a dict holding one under the input's name) as a
    float32 array, or ``MlflowException`` (HTTP 400) saying what is wrong and what the module takes."""
    def refuse(problem: str):
        raise MlflowException(f"{problem}; {contract(config)}", error_code=INVALID_PARAMETER_VALUE)

    name = config["input_name"]
    if isinstance(model_input, dict):
        if set(model_input) != {name}:
            refuse(f"the input has the tensors {sorted(model_input)}, not the one tensor {name!r}")
        model_input = model_input[name]
    try:
        images = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError):
        refuse(f"the input ({type(model_input).__name__}) is not an array of numbers")
    expected = tuple(config["shape"])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
        refuse(f"the input has shape {tuple(images.shape)}, not (B, {', '.join(map(str, expected))}) with B >= 1")
    finite = np.isfinite(images)
    if not finite.all():
        refuse(f"{int(images.size - finite.sum())} of its {images.size} values are NaN or infinite")
    low, high = config["range"]
    smallest, largest = float(images.min()), float(images.max())
    if smallest < low or largest > high:
        refuse(f"its values run from {smallest:g} to {largest:g}, outside [{low:g}, {high:g}]")
    return images


class ValidatedOnnxModule(PythonModel):
    """Checks the images (``check_images``), then returns ``{output name: scores}`` from ONNX Runtime."""

    def load_context(self, context):
        import onnxruntime

        self.config = dict(context.model_config)
        # Only providers this onnxruntime build has: asking for CUDA on a CPU build prints a warning
        # on every load. CUDA first where it exists; the CPU provider is always there.
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = onnxruntime.InferenceSession(context.artifacts[ONNX_ARTIFACT], providers=providers)

    # The annotation is one MLflow infers no schema from: the logged signature stays the contract,
    # and MLflow does not warn on every load that predict has no type hints.
    def predict(self, context, model_input: np.ndarray, params=None):
        images = check_images(model_input, self.config)
        scores = self.session.run([self.config["output_name"]], {self.config["input_name"]: images})[0]
        return {self.config["output_name"]: scores}


# MLflow runs this file under its own module name when it loads the model; imported as part of
# mwt_ray (to log it, or in tests) it sets nothing.
if not __name__.startswith("mwt_ray."):
    set_model(ValidatedOnnxModule())
