"""fvcore FLOPs of models and modules against an analytic count of conv and linear layers."""
import pytest
import torch
from torch import nn

from mwt_ray.core.extract import extract_module
from mwt_ray.core.flops import count_flops
from mwt_ray.core.graph import modular_units
from mwt_ray.core.models import create_model, list_models


def analytic_flops(model, size=32, global_pool=False):
    """Multiply-adds of every Conv2d and Linear, plus fvcore's conventions for inference-mode
    BatchNorm (a scale and a shift: 2 per output value) and ResNet's global average pool (1 per
    input value: the final 4x4 map at 32x32 input, as many channels as the FC has inputs), from
    forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k
        elif isinstance(module, nn.BatchNorm2d):
            total += 2 * output.numel()
        else:
            total += module.in_features * module.out_features

    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    if global_pool:
        total += model.get_submodule("fc").in_features * (size // 8) ** 2
    return total


@pytest.mark.parametrize("name", list_models())
def test_module_flops_equal_analytic_count_and_are_below_the_model(name):
    model = create_model(name, width=0.125)
    plain = create_model(name, width=0.125, method="standard")
    sizes = [u.num_kernels for u in modular_units(model)]
    module = extract_module(model, torch.rand(sum(sizes)) < 0.5)
    assert count_flops(plain) == analytic_flops(plain, global_pool=name == "resnet18")
    assert count_flops(module) == analytic_flops(module, global_pool=name == "resnet18")
    assert count_flops(module) < count_flops(plain)


def test_full_width_vgg16_flops():
    vgg16 = create_model("vgg16", width=1.0, method="standard")
    assert count_flops(vgg16) == analytic_flops(vgg16)
