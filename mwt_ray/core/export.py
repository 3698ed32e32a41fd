"""Modules that run without mwt_ray: a ``torch.export`` program and an ONNX file of a reused module.

What a user feeds a module is what they have: float32 RGB images in [0, 1], shape (B, 3, H, W) at
the training size, any batch size B. ``ImagesToScores`` puts the training set's per-channel
normalisation in front of the module, so both files take those images and give the M class scores
in the order of the sub-task's classes.

    program = export_program(ImagesToScores(module, data.mean, data.std), image_size=32)
    save_program(program, "module.pt2")           # torch.export.load("module.pt2").module()(images)
    write_onnx(program, "module.onnx")            # onnxruntime.InferenceSession("module.onnx")

The ONNX file is written without onnxscript's graph optimizer: in onnxscript 0.7.2 it turns an
``index_add`` over every channel into a copy that drops what was there (ResNet's identity shortcut
adds the block input to all channels of the residual sum), so the file computed other scores (4%
off on a ResNet18, found by ``check_scores``); ONNX Runtime optimises the graph itself when it loads it.
"""
from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write

__all__ = ["ImagesToScores", "export_program", "save_program", "load_program", "write_onnx", "onnx_session",
           "onnx_scores", "ScoreCheck", "check_scores", "fastest_calls", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME, OUTPUT_NAME = "images", "scores"


class ImagesToScores(nn.Module):
    """``module`` behind the training set's normalisation: images in [0, 1] in, class scores out."""

    def __init__(self, module: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.module = module
        # Not "mean" / "std": the ONNX exporter also names the output of ResNet's average pooling
        # "mean", and a file with the name twice does not load ("Duplicate definition of name").
        self.register_buffer("pixel_mean", mean.detach().to(torch.float32).reshape(1, -1, 1, 1).clone())
        self.register_buffer("pixel_std", std.detach().to(torch.float32).reshape(1, -1, 1, 1).clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module((images - self.pixel_mean) / self.pixel_std)


def export_program(module: nn.Module, image_size: int, channels: int = 3) -> torch.export.ExportedProgram:
    """``module`` (in eval mode, on the CPU) as a ``torch.export`` program with a dynamic batch size."""
    module = module.cpu().eval()
    example = torch.rand(2, channels, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """The program saved in memory first, then written by Python: torch.export.save's own file
    writer (C++) aborts the whole process (SIGABRT, exit 134) when the disk fills up mid-write,
    where Python's write raises ENOSPC (``DiskFull``). A module's program is a few MB."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return atomic_write(path, lambda temporary: temporary.write_bytes(buffer.getbuffer()))


def load_program(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a user without mwt_ray does: ``torch.export.load(path).module()``."""
    return torch.export.load(str(path)).module()


def write_onnx(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """One self-contained ONNX file (weights inside) of ``program``, input ``images``, output ``scores``."""
    def write(temporary: Path) -> None:
        torch.onnx.export(program, f=str(temporary), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          external_data=False, optimize=False, verbose=False)
    return atomic_write(path, write)


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_scores(session, images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.cpu().numpy()})[0])


@dataclass(frozen=True)
class ScoreCheck:
    """How far a float32 program's scores are from the module's exact scores (the module run in
    float64), beside how far float32 PyTorch itself is. Two correct float32 programs differ by
    their summation orders, and how much that shows in the scores depends on the network: a deep
    one whose BN layers divide by small running variances amplifies the rounding (an untrained
    MobileNetV2 module at scores below 1: PyTorch 6.1e-4 from exact, ONNX Runtime 2.6e-4, each
    other 3.5e-4). So the bar is relative to PyTorch's own error, with a floor for well-conditioned
    networks, where both are near the float32 resolution of the largest score."""
    difference: float          # the program's largest distance from the exact scores
    pytorch_difference: float  # float32 PyTorch's largest distance from them
    largest_score: float
    floor: float               # relative to max(1, largest score)
    factor: float              # how many times PyTorch's own error the program may be off

    @property
    def allowed(self) -> float:
        return max(self.floor * max(1.0, self.largest_score), self.factor * self.pytorch_difference)

    @property
    def agrees(self) -> bool:
        return self.difference <= self.allowed

    def as_dict(self) -> dict:
        return {"max_difference_from_float64": self.difference, "pytorch_difference_from_float64":
                self.pytorch_difference, "largest_score": self.largest_score, "allowed": self.allowed,
                "rule": f"max({self.floor:g} x max(1, largest score), {self.factor:g} x PyTorch's float32 difference)"}


@torch.no_grad()
def check_scores(program: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, images: torch.Tensor,
                 floor: float = 1e-4, factor: float = 4.0, batch_size: int = 256) -> ScoreCheck:
    """``program``'s scores on ``images`` against ``module``'s computed in float64 (a copy; the
    module is left as it is), beside float32 ``module``'s."""
    module = module.cpu().eval()
    exact_module = copy.deepcopy(module).double()
    worst = pytorch_worst = largest = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].cpu()
        exact = exact_module(x.double())
        worst = max(worst, (program(x).double() - exact).abs().max().item())
        pytorch_worst = max(pytorch_worst, (module(x).double() - exact).abs().max().item())
        largest = max(largest, exact.abs().max().item())
    return ScoreCheck(worst, pytorch_worst, largest, floor, factor)


@torch.no_grad()
def fastest_calls(
    functions: list[Callable[[torch.Tensor], object]], images: torch.Tensor, repeats: int = 5
) -> list[float]:
    """Seconds of one call of each function on ``images``: the fastest of ``repeats`` after two
    warm-up calls, the functions timed in turn (a b a b ...) so that load on the machine hits them
    alike (as ``reuse.compare_latency`` times modules; these may be programs or ONNX sessions)."""
    for function in functions:
        function(images)
        function(images)
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, spent in zip(functions, times):
            start = time.perf_counter()
            function(images)
            spent.append(time.perf_counter() - start)
    return [min(t) for t in times]
