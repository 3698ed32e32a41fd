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
off on a ResNet18, found by ``onnx_max_difference``); ONNX Runtime optimises the graph itself when it loads it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .files import DiskFull, full_disk_message, is_disk_full

__all__ = ["ImagesToScores", "export_program", "save_program", "load_program", "write_onnx", "onnx_session",
           "onnx_scores", "onnx_max_difference", "scores_agree", "fastest_calls", "INPUT_NAME", "OUTPUT_NAME"]

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


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export.save wants a name ending in .pt2


def _write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` then rename to ``path``: a failure never leaves a half-written file."""
    path = Path(path)
    temporary = _temporary(path)
    try:
        write(temporary)
        temporary.replace(path)
    except OSError as error:
        if is_disk_full(error):
            raise DiskFull(full_disk_message(path.name, path.parent)) from error
        raise
    finally:
        temporary.unlink(missing_ok=True)
    return path


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    return _write_atomically(path, lambda temporary: torch.export.save(program, str(temporary)))


def load_program(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a user without mwt_ray does: ``torch.export.load(path).module()``."""
    return torch.export.load(str(path)).module()


def write_onnx(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """One self-contained ONNX file (weights inside) of ``program``, input ``images``, output ``scores``."""
    def write(temporary: Path) -> None:
        torch.onnx.export(program, f=str(temporary), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          external_data=False, optimize=False, verbose=False)
    return _write_atomically(path, write)


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_scores(session, images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.cpu().numpy()})[0])


@torch.no_grad()
def onnx_max_difference(session, module: nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(the largest absolute difference between ONNX Runtime's scores and ``module``'s on ``images``,
    the largest absolute score)."""
    module = module.cpu().eval()
    worst = largest = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].cpu()
        expected = module(x)
        worst = max(worst, (onnx_scores(session, x) - expected).abs().max().item())
        largest = max(largest, expected.abs().max().item())
    return worst, largest


def scores_agree(difference: float, largest_score: float, tolerance: float) -> bool:
    """Whether two float32 programs agree: within ``tolerance``, relative to the largest score where
    scores exceed 1. float32 keeps about 7 digits, so scores of a few hundred (a module without
    fine-tuning gives such logits) differ in the 4th decimal between two correct summation orders:
    on one, float32 PyTorch itself was 8.8e-5 away from the same module in float64."""
    return difference <= tolerance * max(1.0, largest_score)


@torch.no_grad()
def fastest_calls(functions: list[Callable[[torch.Tensor], object]], images: torch.Tensor, repeats: int = 5) -> list[float]:
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
