"""The reference an extracted module must match: a modular graph whose unit states are swapped for
hard 0/1 masks (``with fixed_masks(gm, keep): gm(x)``): MwT's generators replaced by the mask, MODA's
dropped channels and hidden neurons zeroed where its units tap the activations."""
import torch
import torch.nn.functional as F
from torch import fx, nn

from mwt_ray.core.graph import modular_units, per_unit_masks


class FixedMask(nn.Module):
    """A hard 0/1 mask in place of a unit's state, with its ``masked`` contract (what ``graph.apply_unit``
    calls): the tapped tensor (B, C, H, W) or (B, N) times the mask, the ReLU the unit took over after it."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep = keep

    def masked(self, y: torch.Tensor, conv_input: torch.Tensor, relu: bool):
        hard = self.keep.to(device=y.device, dtype=y.dtype)
        out = y * hard.view(1, -1, *[1] * (y.dim() - 2))
        return (F.relu(out) if relu else out), hard.expand(y.shape[0], -1)


class fixed_masks:
    """``with fixed_masks(gm, keep): gm(x)``: each unit applies a hard 0/1 mask instead of its generator,
    as an extracted module computes (``keep`` as ``graph.per_unit_masks`` takes it)."""

    def __init__(self, gm: fx.GraphModule, keep):
        self.gm, self.units, self.keep = gm, modular_units(gm), per_unit_masks(gm, keep)

    def __enter__(self):
        for unit, k in zip(self.units, self.keep):
            self._swap(unit.name, FixedMask(k.float()))
        return self.gm

    def __exit__(self, *exc):
        for unit in self.units:
            self._swap(unit.name, unit.state)

    def _swap(self, name: str, module: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, attr, module)
