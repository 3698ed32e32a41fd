"""FLOPs with fvcore (one multiply-add counts as one FLOP, the paper's convention)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["count_flops"]


def count_flops(model: nn.Module, image_size: int = 32, channels: int = 3) -> int:
    """FLOPs of one forward pass on a single image. Element-wise ops (ReLU, pooling, residual
    adds) are not counted, as in fvcore's defaults and the paper's tables."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore imports torch.jit APIs
        from fvcore.nn import FlopCountAnalysis

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, torch.zeros(1, channels, image_size, image_size, device=device))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        model.train(was_training)
