"""The built-in CNNs (CIFAR-style VGG16-BN, ResNet18, SimCNN, ResCNN) and the model registry.

Every model is a plain network: ``create_model(name, method="standard")`` is what standard training
trains. A modular method (``core.methods``: ``mwt``, the default, or ``moda``) gets the same network as
its modular graph, its units found in the traced graph (MwT: a mask generator per conv -> BN unit but
the first, section 3.2.1 of the paper); nothing here knows about masks. The built-ins are written as conv units
(``units.N.conv``, ``units.N.bn``) so their generators sit at ``units.N.mask_generator``.

A new built-in is one function decorated with ``@register_model("<name>")``: ``list_models``, the
config and the tests that run every built-in read the registry.

``create_model("torchvision:<name>")`` builds that torchvision model untrained, with its classifier
sized for the classes, and ``create_model("package.module:function")`` the network a function of
the user's returns for ``num_classes``; both go through the same graph rewrite. Checkpoints record
the name, so every command rebuilds such a model by importing the function again.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .messages import first_line
from .methods import get_method

__all__ = ["ConvUnit", "VGG", "ResNet", "ResCNN", "BasicBlock", "create_model", "list_models", "check_model_name",
           "register_model", "default_width", "is_factory_name", "DEFAULT_WIDTH", "TORCHVISION_PREFIX",
           "FACTORY_FORM", "MAX_PARAMETERS", "MAX_CLASSES", "model_size_error"]


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


_REGISTRY: dict[str, Callable[[int, float], nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[[int, float], nn.Module]], Callable[[int, float], nn.Module]]:
    """Decorator that makes ``factory(num_classes, width)`` the built-in ``name``: ``create_model``,
    ``list_models``, the config and the tests that run every built-in all read the registry."""
    if not name.isidentifier() or name in _REGISTRY:
        raise ValueError(f"built-in model name {name!r} is not an identifier or is taken")

    def register(factory: Callable[[int, float], nn.Module]) -> Callable[[int, float], nn.Module]:
        _REGISTRY[name] = factory
        return factory
    return register


@register_model("vgg16")
def vgg16(num_classes: int, width: float, dropout: float = 0.0) -> VGG:
    channels = [_scaled(c, width) for c in VGG16_LAYOUT if c != "M"]
    pool_after = [nxt == "M" for cur, nxt in zip(VGG16_LAYOUT, VGG16_LAYOUT[1:] + (None,)) if cur != "M"]
    return VGG(channels, pool_after, _scaled(512, width), num_classes, dropout=dropout)


@register_model("resnet18")
def resnet18(num_classes: int, width: float) -> ResNet:
    return ResNet([_scaled(c, width) for c in (64, 128, 256, 512)], [2, 2, 2, 2], num_classes)


@register_model("simcnn")
def simcnn(num_classes: int, width: float) -> VGG:
    return vgg16(num_classes, width, dropout=0.5)


@register_model("rescnn")
def rescnn(num_classes: int, width: float) -> ResCNN:
    return ResCNN([_scaled(c, width) for c in RESCNN_CHANNELS], num_classes)


# The width of a built-in when none is given (``create_model`` and the config alike): a quarter of
# the paper's channels, which trains on a CPU; 1.0 is the paper's models.
DEFAULT_WIDTH = 0.25

TORCHVISION_PREFIX = "torchvision:"
FACTORY_FORM = "package.module:function"


def default_width(name: str) -> float:
    """The width ``name`` is built at when none is given: ``DEFAULT_WIDTH`` for a built-in, else 1.0,
    the architecture's own (a torchvision model as published, a factory's network as it builds it)."""
    return DEFAULT_WIDTH if name in _REGISTRY else 1.0


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)  # the classification models


def list_models() -> list[str]:
    """The built-ins; any of torchvision's classification models is also accepted as ``torchvision:<name>``,
    and a CNN of your own as ``package.module:function`` (see ``create_model``)."""
    return sorted(_REGISTRY)


def is_factory_name(name: str) -> bool:
    """Whether ``name`` names a model factory of the user's (``package.module:function``), not a built-in
    or torchvision model; it may still be malformed (``check_model_name`` says why)."""
    return ":" in name and not name.startswith(TORCHVISION_PREFIX)


def check_model_name(name: str) -> None:
    """Raise ValueError, in one line naming what is allowed, unless ``name`` is a built-in,
    ``torchvision:<name>``, or ``package.module:function`` whose function imports, builds an
    ``nn.Module`` from ``num_classes`` alone and does not raise (tried once per name and process)."""
    if not isinstance(name, str):
        raise ValueError(f"model name {name!r} is not a string")
    if name in _REGISTRY:
        return
    if name.startswith(TORCHVISION_PREFIX):
        known = _torchvision_names()
        if name[len(TORCHVISION_PREFIX):] in known:
            return
        raise ValueError(f"unknown torchvision model {name!r}; torchvision {_torchvision_version()} has "
                         f"{', '.join(known)}")
    if is_factory_name(name):
        reason = _factory_error(name)
        if reason:
            raise ValueError(reason)
        return
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}, "
                     f"or {TORCHVISION_PREFIX}<name> for a torchvision CNN (e.g. {TORCHVISION_PREFIX}mobilenet_v2), "
                     f"or {FACTORY_FORM} for your own (a function of num_classes that returns the network)")


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__.split("+")[0]


def _first_line(error: BaseException) -> str:
    """The error's class and the first line of its message: the user's code raised it."""
    return f"{type(error).__name__}: {first_line(error, 200)}" if str(error).strip() else type(error).__name__


def _import_factory(name: str) -> Callable[..., nn.Module]:
    """The callable ``package.module:function`` names; ValueError, one line, where there is none."""
    module_name, _, attribute = name.partition(":")
    if ":" in attribute or not all(part.isidentifier() for part in module_name.split(".")) \
            or not attribute.isidentifier():
        raise ValueError(f"model {name!r} is not {FACTORY_FORM} (a dotted module path, one colon and a function "
                         f"name, none of them empty), a built-in ({', '.join(list_models())}) or "
                         f"{TORCHVISION_PREFIX}<name>")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"model {name!r}: module {module_name} cannot be imported ({_first_line(error)}); "
                         "its package must be in the working directory or on PYTHONPATH") from None
    except Exception as error:  # noqa: BLE001 - any failure of the user's module is the same refusal
        raise ValueError(f"model {name!r}: importing module {module_name} raised {_first_line(error)}") from None
    if not hasattr(module, attribute):
        raise ValueError(f"model {name!r}: module {module_name} has no attribute {attribute!r}")
    factory = getattr(module, attribute)
    # Only a Python function or an nn.Module class: a checkpoint names its factory, and a forged one
    # must not get a builtin or any other callable (os.system, subprocess.Popen) called on loading.
    if not (inspect.isfunction(factory) or (inspect.isclass(factory) and issubclass(factory, nn.Module))):
        raise ValueError(f"model {name!r} is a {type(factory).__name__}, not a Python function of num_classes "
                         "(or an nn.Module class) that returns an nn.Module")
    return factory


def _build_with_factory(name: str, num_classes: int) -> nn.Module:
    factory = _import_factory(name)
    call = f"{name.partition(':')[2]}(num_classes={num_classes})"
    try:
        model = factory(num_classes=num_classes)
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is the same refusal
        raise ValueError(f"model {name!r}: {call} raised {_first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: {call} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@functools.cache
def _factory_error(name: str) -> str | None:
    """Why the factory ``name`` cannot build a model, or None: imported and called once per process,
    with 10 classes on the meta device (nothing allocated, whatever the network's size), and again
    for real where it fails there: a constructor may compute with tensors, which meta ones refuse."""
    try:
        with torch.device("meta"):
            _build_with_factory(name, 10)
    except ValueError as error:
        if not _builds_for_real(name):
            return str(error)
    return None


def _builds_for_real(name: str) -> bool:
    try:
        _build_with_factory(name, 10)
    except ValueError:
        return False
    return True


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
        return sum(p.numel() for p in create_model(name, num_classes, 1.0, method="standard").parameters())


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
    if is_factory_name(name):
        return _factory_width_error(name, width)
    at_one = _parameters_at_width_one(name, num_classes)
    estimate = at_one * max(1.0, width * width)
    if estimate > MAX_PARAMETERS:
        largest = math.sqrt(MAX_PARAMETERS / at_one)
        return (f"width {width:g} would give {name} about {estimate:.2g} parameters, more than the "
                f"{MAX_PARAMETERS:.0e} allowed; use a width up to {largest:.1f}")
    return None


def _factory_width_error(name: str, width: float) -> str:
    return (f"width {width:g}: model {name} is built by its own function, which takes num_classes and no width; "
            "leave model.width unset (or 1, its own)")


def create_model(name: str, num_classes: int = 10, width: float | None = None, method: str = "mwt") -> nn.Module:
    """Build a model as ``method`` trains it: plain for ``"standard"``, else its modular graph, whose
    ``forward(x, return_masks=True)`` also returns the units' signals (``core.methods``).

    ``name``: a built-in (``list_models()``), e.g. ``create_model("vgg16", width=0.25)``;
    ``torchvision:<name>``; or ``package.module:function`` for a CNN of your own, where
    ``function(num_classes=...)`` returns the plain network (it is imported by that name again
    wherever a checkpoint of it is read). ``width``: the channel multiplier; None is
    ``default_width(name)`` (``DEFAULT_WIDTH`` for the built-ins, the architecture's own otherwise).
    A factory's network is built as the function builds it: a width other than 1 is refused."""
    check_model_name(name)
    if width is not None and not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if name in _REGISTRY:
        model = _REGISTRY[name](num_classes, default_width(name) if width is None else float(width))
    elif is_factory_name(name):
        if width is not None and width != 1.0:
            raise ValueError(_factory_width_error(name, width))
        model = _build_with_factory(name, num_classes)
    else:
        model = _torchvision_model(name, num_classes, None if width is None else float(width))
    return get_method(method).modularize(model, name)
