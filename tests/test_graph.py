"""Modularizing a CNN from its traced graph (``core.graph``), checked against references built here.

The CNN below is defined only in this test and holds each pattern the mechanism must handle: a
residual addition, a depthwise conv, a squeeze-excitation scale, a concatenation followed by a BN,
a grouped conv, in-place activations after masked BNs and a parameter-free leaf (stochastic-depth-like). The
reference for every masked output is the original model with a forward hook on each masked BN that
multiplies its output by the mask: the literal conv -> BN -> x mask of the paper, in plain autograd.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hard_masks import fixed_masks
from torch import nn

from mwt_ray.core.graph import GraphError, modular_units
from mwt_ray.core.masking import MaskGenerator
from mwt_ray.core.methods.mwt import insert_mask_units
from mwt_ray.core.models import create_model, list_models


class DropPath(nn.Module):
    """Parameter-free and branching on ``self.training``, like torchvision's StochasticDepth."""

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1, generator=None) > 0.25).to(x.dtype)
        return x * keep / 0.75


class PatternNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)          # first conv: never masked
        self.stem_bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)             # masked, ReLU folded
        self.a_bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)             # masked, then a residual addition
        self.b_bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)                              # one module, used twice
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise, masked
        self.dw_bn = nn.BatchNorm2d(8)
        self.act6 = nn.ReLU6(inplace=True)
        self.se_reduce = nn.Conv2d(8, 4, 1)                            # SE: conv -> activation, not masked
        self.se_expand = nn.Conv2d(4, 8, 1)
        self.branch = nn.Conv2d(8, 4, 1, bias=False)                   # masked, then concatenated
        self.branch_bn = nn.BatchNorm2d(4)
        self.cat_bn = nn.BatchNorm2d(12)                               # follows a concatenation: not masked
        self.proj = nn.Conv2d(12, 6, 1, bias=False)                    # masked, SiLU after the mask
        self.proj_bn = nn.BatchNorm2d(6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False)  # grouped, masked
        self.grouped_bn = nn.BatchNorm2d(6)
        self.drop = DropPath()
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        y = self.relu(self.a_bn(self.a(x)))
        x = self.relu(self.b_bn(self.b(y)) + x)
        x = self.act6(self.dw_bn(self.dw(x)))
        scale = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))))
        x = x * scale
        c = F.hardswish(self.branch_bn(self.branch(x)), inplace=True)
        x = F.relu(self.cat_bn(torch.cat([x, c], dim=1)), inplace=True)
        x = F.silu(self.proj_bn(self.proj(x)))
        x = F.relu(self.grouped_bn(self.grouped(x)))
        x = self.drop(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MASKED = ["a", "b", "dw", "branch", "proj", "grouped"]


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN running statistics and affine parameters away from their defaults, so that an error in
    which BN entries a unit uses shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def hooked_reference(model: nn.Module, masks_for: dict[str, callable]) -> list:
    """Forward hooks on the masked BNs of ``model``: output * mask, the mask from ``masks_for[conv](conv_input)``."""
    handles, inputs = [], {}
    for conv, mask_of in masks_for.items():
        conv_module, bn_module = model.get_submodule(conv), model.get_submodule(f"{conv}_bn")
        handles.append(conv_module.register_forward_pre_hook(lambda m, args, c=conv: inputs.__setitem__(c, args[0])))
        handles.append(bn_module.register_forward_hook(
            lambda m, args, out, c=conv, f=mask_of: out * f(inputs[c]).to(out.dtype)[:, :, None, None]))
    return handles


def test_masked_units_are_the_conv_bn_pairs_after_the_first_conv():
    gm = insert_mask_units(PatternNet())
    assert [u.layer for u in modular_units(gm)] == MASKED
    assert [u.relu for u in modular_units(gm)] == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]  # only a's BN goes into a ReLU alone
    assert [u.num_kernels for u in modular_units(gm)] == [8, 8, 8, 4, 6, 6]
    assert all(u.state.in_channels == gm.get_submodule(u.layer).in_channels for u in modular_units(gm))


def test_masks_come_in_the_order_their_convs_run():
    model = PatternNet()
    order = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n))
    gm = insert_mask_units(model)
    logits, masks = gm(torch.randn(3, 3, 16, 16), return_masks=True)
    ran = [n for n in order if n in MASKED]
    assert [u.layer for u in modular_units(gm)] == ran[: len(MASKED)]
    assert [tuple(m.shape) for m in masks] == [(3, u.num_kernels) for u in modular_units(gm)]
    assert logits.shape == (3, 5) and torch.is_tensor(gm(torch.randn(2, 3, 16, 16)))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hard_masks_equal_the_hooked_original(training):
    torch.manual_seed(0)
    model = randomised(PatternNet())
    plain, reference = copy.deepcopy(model), copy.deepcopy(model)
    gm = insert_mask_units(model)
    for m in (gm, plain, reference):
        m.train(training)
        m.get_submodule("drop").eval()  # DropPath's randomness aside
    g = torch.Generator().manual_seed(1)
    keep = [torch.rand(u.num_kernels, generator=g) < 0.6 for u in modular_units(gm)]
    keep[1][:] = False  # one side of the addition keeps nothing
    x = torch.randn(4, 3, 16, 16)
    hooked_reference(
        reference, {c: (lambda inp, k=k: k.float().expand(inp.shape[0], -1)) for c, k in zip(MASKED, keep)}
    )
    with fixed_masks(gm, keep):
        assert torch.allclose(gm(x), reference(x), rtol=1e-5, atol=1e-6)
    with fixed_masks(gm, [torch.ones(u.num_kernels, dtype=torch.bool) for u in modular_units(gm)]):
        assert torch.allclose(gm(x), plain(x), rtol=1e-5, atol=1e-6)  # all kept: the original network
    # the generators are back
    assert all(isinstance(gm.get_submodule(u.name), MaskGenerator) for u in modular_units(gm))


def test_generator_masks_and_gradients_equal_the_hooked_original():
    """The eager mask op (one custom autograd node that overwrites the BN output) against the paper's
    unit in plain autograd ops: logits, masks and every parameter's gradient."""
    torch.manual_seed(0)
    model = randomised(PatternNet()).eval()  # eval: BN statistics fixed, DropPath off, same in both
    reference = copy.deepcopy(model)
    gm = insert_mask_units(model).eval()
    units = {u.layer: u.state for u in modular_units(gm)}
    seen = []
    handles = hooked_reference(
        reference, {c: (lambda inp, g=g: seen.append(g(inp)) or seen[-1]) for c, g in units.items()}
    )
    x = torch.randn(4, 3, 16, 16)
    logits, masks = gm(x, return_masks=True)
    (logits.square().sum() + sum(m.sum() for m in masks)).backward()
    got = {n: p.grad.clone() for n, p in gm.named_parameters()}
    gm.zero_grad()
    expected = reference(x)
    (expected.square().sum() + sum(m.sum() for m in seen)).backward()
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    for m, r in zip(masks, seen):
        assert torch.allclose(m, r, rtol=1e-5, atol=1e-7)
    # The reference has the backbone's own copies; the generators it calls are gm's (zeroed above).
    reference_grads = {**{n: p.grad for n, p in reference.named_parameters()},
                       **{n: p.grad for n, p in gm.named_parameters() if "mask_generator" in n}}
    assert set(reference_grads) == set(got) and any("mask_generator" in n for n in got)
    for name, grad in got.items():
        assert torch.allclose(grad, reference_grads[name], rtol=1e-4, atol=1e-6), name
    for h in handles:
        h.remove()


def test_a_leaf_keeps_the_training_flag_out_of_the_graph():
    gm = insert_mask_units(PatternNet())
    assert any(n.op == "call_module" and n.target == "drop" for n in gm.graph.nodes)
    x = torch.randn(8, 3, 16, 16)
    gm.eval()
    assert torch.equal(gm(x), gm(x))  # DropPath off in eval, although traced in train mode


class NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.c2(F.relu(self.c1(x))), 1).flatten(1))


class DataDependent(NoBatchNorm):
    def forward(self, x):
        return super().forward(x) if x.sum() > 0 else super().forward(-x)


@pytest.mark.parametrize("model, expected", [
    (NoBatchNorm(), "model NoBatchNorm cannot be modularized: no conv -> BatchNorm unit"),
    (DataDependent(), "model DataDependent cannot be modularized: its forward does not trace"),
])
def test_what_cannot_be_modularized_says_so_in_one_line(model, expected):
    with pytest.raises(GraphError) as error:
        insert_mask_units(model)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
               "regnet_x_400mf", "vgg11_bn"]
# Seconds each on 2 CPU cores (a minute and more under load): the slow tier, beside the small ones.
LARGE = {"resnet50", "efficientnet_b0", "densenet121", "regnet_x_400mf"}


def tiered(names: list[str]) -> list:
    return [pytest.param(name, marks=pytest.mark.slow) if name in LARGE else name for name in names]


def conv_bn_units_by_running(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Independent truth: run the model with hooks and list, in call order, each conv whose output
    tensor is the input of a BN and of no other module that ran, dropping the first conv that ran."""
    outputs, readers, order = {}, {}, []
    names = {m: n for n, m in model.named_modules()}
    hooks = []
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue
        def pre(m, args):
            for a in args:
                if torch.is_tensor(a) and id(a) in outputs:
                    readers.setdefault(id(a), []).append(m)
        def post(m, args, out):
            if isinstance(m, nn.Conv2d):
                outputs[id(out)] = m
                order.append((m, out))
        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    units = [names[conv] for conv, out in order[1:]
             if len(readers.get(id(out), [])) == 1 and isinstance(readers[id(out)][0], nn.BatchNorm2d)]
    return units


@pytest.mark.parametrize("name", tiered(TORCHVISION))
def test_torchvision_models_are_masked_at_every_conv_bn_unit(name):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    expected = conv_bn_units_by_running(model, x)
    gm = insert_mask_units(model, name)
    assert [u.layer for u in modular_units(gm)] == expected
    if name == "densenet121":
        assert len(expected) == 6 + 12 + 24 + 16  # one bottleneck conv per dense layer
    if name in ("resnet18", "mobilenet_v2"):  # in-place ReLU / ReLU6 after masked BNs: backward still works
        logits, masks = gm.train()(x, return_masks=True)
        (logits.sum() + sum(m.sum() for m in masks)).backward()
        assert all(u.state.packed.grad is not None for u in modular_units(gm))


# ----------------------------------------------------------------------------- extraction

def runs_on(model: nn.Module, size: int) -> bool:
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError:
        return False
    return True


def random_keep(gm, seed: int, share: float = 0.5, empty_side: bool = False) -> list[torch.Tensor]:
    """Random module masks with at least one kernel per unit (the floor a module keeps)."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for u in modular_units(gm):
        k = torch.rand(u.num_kernels, generator=g) < share
        k[torch.randint(u.num_kernels, (1,), generator=g)] = True
        if empty_side:  # nothing but the floor
            k[:] = False
            k[0] = True
        keep.append(k)
    return keep


def conv_kernels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def check_extraction(gm, keep, size: int, batch: int = 3):
    from mwt_ray.core.extract import extract_module

    gm.eval()
    x = torch.randn(batch, 3, size, size)
    module = extract_module(gm, keep, x[:1]).eval()
    with fixed_masks(gm, keep):
        expected = gm(x)
    got = module(x)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale, float((got - expected).abs().max() / scale)
    assert not any(isinstance(m, MaskGenerator) for m in module.modules())
    return module


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extracted_pattern_net_equals_the_hard_masked_model(seed, size):
    torch.manual_seed(seed)
    gm = insert_mask_units(randomised(PatternNet(), seed))
    keep = random_keep(gm, seed)
    if seed == 2:
        keep[1][:] = False
        keep[1][3] = True  # one side of the addition keeps only the floor
    module = check_extraction(gm, keep, size)
    removed = sum(int((~k).sum()) for k in keep)
    dw = modular_units(gm)[2]  # depthwise kernels whose input channel is gone are not computed (they read zeros)
    assert conv_kernels(module) <= conv_kernels(gm) - removed
    assert dw.layer == "dw"


@pytest.mark.parametrize("name", tiered(TORCHVISION) + list_models())
def test_modules_equal_the_hard_masked_model(name):
    """torchvision's CNNs and the built-ins alike: random module masks and masks keeping only the
    floor, at 32x32 and (where the architecture allows another size) 64x64, BN statistics randomised;
    no extra kernels (where no depthwise or grouped conv reads only removed channels, exactly the kept
    ones); fewer FLOPs than the full model."""
    import torchvision
    from fvcore.nn import FlopCountAnalysis

    torch.manual_seed(0)
    plain = create_model(name, 10, 0.125, method="standard") if name in list_models() else \
        getattr(torchvision.models, name)(num_classes=10)
    gm = insert_mask_units(randomised(plain), name)
    sizes = (32, 64) if runs_on(plain, 64) else (32,)  # VGG-like classifiers read a 1x1 map of a 32x32 input
    for size in sizes:
        keep = random_keep(gm, size)
        module = check_extraction(gm, keep, size, batch=2)
        removed = sum(int((~k).sum()) for k in keep)
        grouped = any(m.groups > 1 for m in gm.modules() if isinstance(m, nn.Conv2d))
        assert conv_kernels(module) <= conv_kernels(gm) - removed
        if not grouped:
            assert conv_kernels(module) == conv_kernels(gm) - removed
    floor = check_extraction(gm, random_keep(gm, 0, empty_side=True), 32, batch=2)
    x = torch.zeros(1, 3, 32, 32)
    def flops(m):
        return FlopCountAnalysis(m.eval(), x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()

    assert flops(floor) < flops(module) < flops(gm)
