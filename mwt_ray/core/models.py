"""The built-in CNNs (CIFAR-style VGG16-BN, ResNet18, SimCNN, ResCNN) and the model registry.

Every model is a plain network: ``create_model(name, modular=False)`` is what standard training
trains. ``modular=True`` hands the same network to ``graph.modularize``, which finds its conv -> BN
units in the traced graph and gives every one but the first a mask generator (section 3.2.1 of the
paper); nothing here knows about masks. The built-ins are written as conv units
(``units.N.conv``, ``units.N.bn``) so their generators sit at ``units.N.mask_generator``.

``create_model("torchvision:<name>")`` builds that torchvision model untrained, with its classifier
sized for the classes, and goes through the same ``modularize``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .graph import modularize

__all__ = ["ConvUnit", "VGG", "ResNet", "ResCNN", "BasicBlock", "create_model", "list_models", "check_model_name",
           "TORCHVISION_PREFIX", "MAX_PARAMETERS", "MAX_CLASSES", "model_size_error"]


class ConvUnit(nn.Module):
    """conv -> BN -> [ReLU] -> [2x2 max-pool]: the unit MwT masks (on the BN's output) and prunes."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 stride: int = 1, relu: bool = True, pool: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.relu:
            y = F.relu(y, inplace=True)
        return F.max_pool2d(y, 2) if self.pool else y


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _init_backbone(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-BN for 32x32 inputs: conv units (``conv_channels`` kernels each, a 2x2 max-pool after those
    ``pool_after`` marks), then FC-ReLU-FC-ReLU-FC on the 1x1 feature map."""

    def __init__(self, conv_channels: list[int], pool_after: list[bool], hidden: int,
                 num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        units = []
        for out_channels, pool in zip(conv_channels, pool_after):
            units.append(ConvUnit(in_channels, out_channels, pool=pool))
            in_channels = out_channels
        self.units = nn.Sequential(*units)
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.classifier = nn.Sequential(
            *drop, nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
            *drop, nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        _init_backbone(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.units(x), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two conv units and, where the shape changes, a 1x1 shortcut conv unit."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.unit1 = ConvUnit(in_channels, out_channels, stride=stride)
        self.unit2 = ConvUnit(out_channels, out_channels, relu=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvUnit(in_channels, out_channels, kernel_size=1, stride=stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unit2(self.unit1(x))  # before the shortcut: the masks' order is unit1, unit2, shortcut
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)), inplace=True)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages of basic blocks, global average pool, FC."""

    def __init__(self, stage_channels: list[int], blocks_per_stage: list[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.stem = ConvUnit(in_channels, stage_channels[0])
        blocks = []
        channels = stage_channels[0]
        for stage, (out_channels, count) in enumerate(zip(stage_channels, blocks_per_stage)):
            for index in range(count):
                blocks.append(BasicBlock(channels, out_channels, 2 if stage > 0 and index == 0 else 1))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        _init_backbone(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


RESCNN_CHANNELS = (64, 128, 128, 128, 256, 512, 512, 512, 512, 512, 512, 512)
RESCNN_POOL_AFTER = (1, 4, 5, 8, 9)
RESCNN_RESIDUALS = ((2, 3), (6, 7), (10, 11))  # (first, last) unit of each residual pair


class ResCNN(nn.Module):
    """ResCNN of CNNSplitter / MwT: 12 conv units, 2x2 pools after units 1, 4, 5, 8, 9, and three
    residual pairs whose input is added to the second unit's (ReLU-ed) output, no ReLU after the
    sum; then dropout and one FC on the 1x1 feature map."""

    def __init__(self, channels: list[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        units = []
        for index, out_channels in enumerate(channels):
            units.append(ConvUnit(in_channels, out_channels, pool=index in RESCNN_POOL_AFTER))
            in_channels = out_channels
        self.units = nn.ModuleList(units)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(in_channels, num_classes))
        _init_backbone(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        starts, ends = dict(RESCNN_RESIDUALS), {last for _, last in RESCNN_RESIDUALS}
        residual = None
        for index, unit in enumerate(self.units):
            if index in starts:
                residual = x
            x = unit(x)
            if index in ends:
                x = x + residual
        return self.classifier(torch.flatten(x, 1))


def _vgg16(num_classes: int, width: float, dropout: float = 0.0) -> VGG:
    channels = [_scaled(c, width) for c in VGG16_LAYOUT if c != "M"]
    pool_after = [nxt == "M" for cur, nxt in zip(VGG16_LAYOUT, VGG16_LAYOUT[1:] + (None,)) if cur != "M"]
    return VGG(channels, pool_after, _scaled(512, width), num_classes, dropout=dropout)


def _simcnn(num_classes: int, width: float) -> VGG:
    return _vgg16(num_classes, width, dropout=0.5)


def _rescnn(num_classes: int, width: float) -> ResCNN:
    return ResCNN([_scaled(c, width) for c in RESCNN_CHANNELS], num_classes)


def _resnet18(num_classes: int, width: float) -> ResNet:
    return ResNet([_scaled(c, width) for c in (64, 128, 256, 512)], [2, 2, 2, 2], num_classes)


_REGISTRY: dict[str, Callable[[int, float], nn.Module]] = {
    "vgg16": _vgg16,
    "resnet18": _resnet18,
    "simcnn": _simcnn,
    "rescnn": _rescnn,
}


TORCHVISION_PREFIX = "torchvision:"


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)  # the classification models


def list_models() -> list[str]:
    """The built-ins; any of torchvision's classification models is also accepted as ``torchvision:<name>``."""
    return sorted(_REGISTRY)


def check_model_name(name: str) -> None:
    """Raise ValueError, naming what is allowed, unless ``name`` is a built-in or ``torchvision:<name>``."""
    if name in _REGISTRY:
        return
    if name.startswith(TORCHVISION_PREFIX):
        known = _torchvision_names()
        if name[len(TORCHVISION_PREFIX):] in known:
            return
        raise ValueError(f"unknown torchvision model {name!r}; torchvision {_torchvision_version()} has "
                         f"{', '.join(known)}")
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}, or "
                     f"{TORCHVISION_PREFIX}<name> for a torchvision CNN (e.g. {TORCHVISION_PREFIX}mobilenet_v2)")


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__.split("+")[0]


# torchvision's classification models whose constructors take ``width_mult``. Others are refused by
# name, before their constructor runs: RegNet's, given an unknown keyword, first computes its stage
# widths with tensors, which fails on the meta device with a message about meta tensors.
_WIDTH_MULTIPLIER = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")


def _torchvision_model(name: str, num_classes: int, width: float | None) -> nn.Module:
    """The torchvision model, untrained, its classifier sized for ``num_classes``; ``width`` goes to
    the constructor's ``width_mult`` (MobileNet) and is refused, unless 1 (its own), where there is none."""
    import torchvision

    arch = name[len(TORCHVISION_PREFIX):]
    if width is None or width == 1.0:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if arch not in _WIDTH_MULTIPLIER:
        raise ValueError(_no_width_multiplier(name, width))
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, width_mult=width)
    except TypeError as error:
        if "width_mult" not in str(error):
            raise
    raise ValueError(_no_width_multiplier(name, width)) from None


def _no_width_multiplier(name: str, width: float) -> str:
    return (f"width {width:g}: {name} has no width multiplier (only MobileNet's constructors take width_mult); "
            "leave model.width unset for its own width")


# Models larger than this are refused before they are built (float32 weights alone: 8 GB).
MAX_PARAMETERS = 2e9
# Class counts beyond this are refused before a classifier is built: no dataset here comes near it,
# and with it a head of the widest allowed model stays below MAX_PARAMETERS.
MAX_CLASSES = 100_000


@functools.cache
def _parameters_at_width_one(name: str, num_classes: int = 10) -> int:
    """Parameters of ``name`` at width 1, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, num_classes, None if name.startswith(TORCHVISION_PREFIX)
                                                   else 1.0, modular=False).parameters())


def model_size_error(name: str, width: float | None, num_classes: int = 10) -> str | None:
    """Why a ``name`` of ``width`` and ``num_classes`` is too large to build, or None; decided before
    building it at that width. Every channel count scales with the width, so the parameter count
    grows with its square (``width * width``: ``width ** 2`` of a float near 1e300 raises)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 2 <= num_classes <= MAX_CLASSES:
        return f"{num_classes!r} classes: a model has 2..{MAX_CLASSES} classes"
    if width is None or width == 1.0:  # the architecture's own width: a torchvision model is as large as published
        return None
    if not (isinstance(width, (int, float)) and not isinstance(width, bool) and math.isfinite(width) and width > 0):
        return f"width {width!r} is not a positive number"
    if name.startswith(TORCHVISION_PREFIX) and name[len(TORCHVISION_PREFIX):] not in _WIDTH_MULTIPLIER:
        return _no_width_multiplier(name, width)
    at_one = _parameters_at_width_one(name, num_classes)
    estimate = at_one * max(1.0, width * width)
    if estimate > MAX_PARAMETERS:
        largest = math.sqrt(MAX_PARAMETERS / at_one)
        return (f"width {width:g} would give {name} about {estimate:.2g} parameters, more than the "
                f"{MAX_PARAMETERS:.0e} allowed; use a width up to {largest:.1f}")
    return None


def create_model(name: str, num_classes: int = 10, width: float | None = None, modular: bool = True) -> nn.Module:
    """Build a model, e.g. ``create_model("vgg16", width=0.25)`` or ``create_model("torchvision:mobilenet_v2")``:
    plain with ``modular=False``, else its modular graph (``graph.modularize``), whose
    ``forward(x, return_masks=True)`` also returns the masks. ``width``: the channel multiplier; None is
    the architecture's own (1.0 for the built-ins)."""
    check_model_name(name)
    if width is not None and not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if name in _REGISTRY:
        model = _REGISTRY[name](num_classes, 1.0 if width is None else float(width))
    else:
        model = _torchvision_model(name, num_classes, None if width is None else float(width))
    return modularize(model, name) if modular else model
