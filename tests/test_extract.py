"""An extracted module computes what the hard-masked full network computes, also through a layer of
the user's own once a rule for it is passed."""
import pytest
import torch
import torch.nn.functional as F
from hard_masks import fixed_masks
from torch import nn

from mwt_ray.core.extract import EXTRACTION_RULES, extract_module
from mwt_ray.core.graph import GraphError, modular_units
from mwt_ray.core.methods.mwt import insert_mask_units
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
    sizes = [u.num_kernels for u in modular_units(model)]
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
    sizes = [u.num_kernels for u in modular_units(model)]
    module = extract_module(model, torch.ones(sum(sizes), dtype=torch.bool))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_module_masks_are_rejected():
    model = create_model("vgg16", width=0.125)
    sizes = [u.num_kernels for u in modular_units(model)]
    with pytest.raises(ValueError, match="shape"):
        extract_module(model, torch.ones(sum(sizes) + 1, dtype=torch.bool))
    keep = torch.ones(sum(sizes), dtype=torch.bool)
    keep[: sizes[0]] = False
    with pytest.raises(ValueError, match="no kernel in unit 0"):
        extract_module(model, keep)
    with pytest.raises(ValueError, match="the model has no units"):
        extract_module(create_model("vgg16", width=0.125, method="standard"), keep)


class ChannelScale(nn.Module):
    """A learned scale per channel: a layer of the user's own with parameters, which extraction
    cannot cut down without being told how."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight[None, :, None, None]


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a, self.a_bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.scale = ChannelScale(8)
        self.b, self.b_bn = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.scale(F.relu(self.a_bn(self.a(x))))
        x = F.relu(self.b_bn(self.b(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_scale_rule(extraction, node, module):
    """The scale of the kept channels only: the layer acts on each channel alone."""
    source = node.args[0]
    kept = extraction.channels(source)
    scale = ChannelScale(len(kept))
    with torch.no_grad():
        scale.weight.copy_(module.weight[kept])
    extraction.keep_channels(node, kept)
    return extraction.call_module(node, scale, extraction.value(source))


def test_a_layer_of_ones_own_is_extracted_once_a_rule_for_it_is_passed():
    torch.manual_seed(0)
    gm = insert_mask_units(ScaledNet(), leaf_modules=(ChannelScale,)).eval()
    keep = [torch.tensor([True, False, True, True, False, False, True, False]),
            torch.tensor([False, True, True, False, True, False])]
    with pytest.raises(GraphError, match="through a ChannelScale module"):
        extract_module(gm, keep)
    module = extract_module(gm, keep, rules={ChannelScale: channel_scale_rule}).eval()
    assert module.get_submodule("scale").weight.shape == (4,)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad(), fixed_masks(gm, keep):
        torch.testing.assert_close(module(x), gm(x), atol=1e-5, rtol=1e-4)
    # Traced through instead, the layer is a product with a factor per channel: refused, not miscut.
    with pytest.raises(GraphError, match="factor per channel"):
        extract_module(insert_mask_units(ScaledNet()), keep)
    assert ChannelScale not in EXTRACTION_RULES  # a call's rules extend the defaults for that call only
