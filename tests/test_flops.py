"""fvcore FLOPs of models and modules against an analytic count of conv and linear layers."""
import pytest
import torch
from torch import nn

from mwt_ray.core.extract import extract_module
from mwt_ray.core.flops import count_flops
from mwt_ray.core.models import create_model, masked_units


def analytic_flops(model, size=32):
    """Multiply-adds of every Conv2d and Linear, plus fvcore's conventions for inference-mode
    BatchNorm (a scale and a shift: 2 per output value) and ResNet's global average pool (1 per
    input value), from forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k
        elif isinstance(module, nn.BatchNorm2d):
            total += 2 * output.numel()
        elif module is last_block:
            total += output.numel()
        else:
            total += module.in_features * module.out_features

    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    last_block = model.blocks[-1] if hasattr(model, "blocks") else None
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds) or m is last_block]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "simcnn", "rescnn"])
def test_module_flops_equal_analytic_count_and_are_below_the_model(name):
    model = create_model(name, width=0.125)
    plain = create_model(name, width=0.125, modular=False)
    sizes = [u.num_kernels for u in masked_units(model)]
    module = extract_module(model, torch.rand(sum(sizes)) < 0.5)
    assert count_flops(plain) == analytic_flops(plain)
    assert count_flops(module) == analytic_flops(module)
    assert count_flops(module) < count_flops(plain)


def test_full_width_vgg16_flops():
    assert count_flops(create_model("vgg16", modular=False)) == analytic_flops(create_model("vgg16", modular=False))
