"""An extracted module computes what the hard-masked full network computes."""
import pytest
import torch

from mwt_ray.core.extract import extract_module
from mwt_ray.core.graph import fixed_masks, mask_units
from mwt_ray.core.models import create_model, list_models


def _trained_like(name):
    model = create_model(name, width=0.125)
    model.train()
    with torch.no_grad():  # non-trivial BN running statistics
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("keep_fraction", [0.05, 0.4, 1.0])
def test_extracted_module_equals_hard_masked_model(name, keep_fraction):
    model = _trained_like(name)
    sizes = [u.num_kernels for u in mask_units(model)]
    keep = torch.rand(sum(sizes)) < keep_fraction
    layers = list(torch.split(keep, sizes))
    for layer in layers:  # every layer keeps at least one kernel, as module_masks guarantees
        layer[torch.randint(len(layer), (1,))] = True
    module = extract_module(model, torch.cat(layers)).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), fixed_masks(model, layers):
        torch.testing.assert_close(module(x), model(x), atol=1e-5, rtol=1e-4)
    kept_params = sum(p.numel() for p in module.parameters())
    full_params = sum(p.numel() for n, p in model.named_parameters() if "mask_generator" not in n)
    assert kept_params <= full_params
    if keep_fraction < 1:
        assert kept_params < full_params


def test_module_is_independent_of_the_model():
    model = _trained_like("vgg16")
    sizes = [u.num_kernels for u in mask_units(model)]
    module = extract_module(model, torch.ones(sum(sizes), dtype=torch.bool))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_module_masks_are_rejected():
    model = create_model("vgg16", width=0.125)
    sizes = [u.num_kernels for u in mask_units(model)]
    with pytest.raises(ValueError, match="shape"):
        extract_module(model, torch.ones(sum(sizes) + 1, dtype=torch.bool))
    keep = torch.ones(sum(sizes), dtype=torch.bool)
    keep[: sizes[0]] = False
    with pytest.raises(ValueError, match="no kernel in masked layer 0"):
        extract_module(model, keep)
    with pytest.raises(ValueError, match="no masked layers"):
        extract_module(create_model("vgg16", width=0.125, modular=False), keep)
