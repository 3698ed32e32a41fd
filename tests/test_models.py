"""Model registry, kernel counts, and the single-node generator + mask op against plain autograd."""
import itertools

import pytest
import torch

import mwt_ray.core.models as models
from mwt_ray.core.models import MaskGenerator, conv_units, create_model, masked_units


def test_kernel_counts_match_the_paper():
    vgg = create_model("vgg16")
    assert sum(u.num_kernels for u in conv_units(vgg)) == 4224  # Table 2
    assert sum(u.num_kernels for u in masked_units(vgg)) == 4160  # all but the first conv
    resnet = create_model("resnet18")
    # Table 2's 3904 counts the 3x3 convs; the three 1x1 shortcut convs (896 kernels) are masked too.
    assert sum(u.num_kernels for u in conv_units(resnet) if u.conv.kernel_size == (3, 3)) == 3904
    assert sum(u.num_kernels for u in masked_units(resnet)) == 4800 - 64


def test_standard_model_has_no_generators_and_same_backbone_shapes():
    modular, standard = create_model("vgg16", width=0.25), create_model("vgg16", width=0.25, modular=False)
    assert not masked_units(standard)
    backbone = {k: v.shape for k, v in modular.state_dict().items() if "mask_generator" not in k}
    assert backbone == {k: v.shape for k, v in standard.state_dict().items()}


@pytest.mark.parametrize("bad", [{"name": "alexnet"}, {"name": "vgg16", "width": 0}, {"name": "vgg16", "width": -1},
                                 {"name": "vgg16", "num_classes": 1}])
def test_registry_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="alexnet|width|num_classes"):
        create_model(**bad)


@pytest.mark.parametrize("relu, detach, sliced, mask_used", list(itertools.product([True, False], repeat=4)))
def test_masked_activation_matches_autograd(relu, detach, sliced, mask_used, monkeypatch):
    """The eager node (generator + mask in one, output overwriting its input) gives what autograd
    gives for ``act(y) * generator(x)``: outputs and the gradients of y, x and the generator's
    weights, with masks that are exactly 0 for some kernels, whether or not the loss also uses the
    mask itself (as the objective does), on the CPU's sliced path and the one-pass (GPU) path."""
    if sliced:  # slices of 2 samples: the batch of 8 is walked in 4 slices
        monkeypatch.setattr(models, "_CHUNK_ELEMENTS", 2 * 5 * 3 * 3)
    torch.manual_seed(0)
    generator = MaskGenerator(6, 5).double()
    with torch.no_grad():
        generator.fc2.bias.uniform_(-1, 1)  # about half the mask values are exactly 0
    generator.detach_input = detach
    x = torch.randn(8, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(8, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_out, grad_mask = torch.randn(8, 5, 3, 3, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)

    def outputs_and_grads(fused: bool):
        y_copy = y.clone()  # the node overwrites its input
        if fused:
            out, mask = generator.masked(y_copy, x, relu)
        else:
            mask = torch.relu(torch.tanh(generator.fc2(torch.relu(generator.fc1(
                (x.detach() if detach else x).mean(dim=(2, 3)))))))
            out = (torch.relu(y_copy) if relu else y_copy) * mask[:, :, None, None]
        loss = (out * grad_out).sum() + ((mask * grad_mask).sum() if mask_used else 0)
        inputs = [y] + ([] if detach else [x]) + list(generator.parameters())
        return [out, mask, *torch.autograd.grad(loss, inputs)]

    reference = outputs_and_grads(fused=False)
    assert 0.2 < (reference[1] == 0).double().mean() < 0.8
    for got, expected in zip(outputs_and_grads(fused=True), reference):
        torch.testing.assert_close(got, expected)


def test_simcnn_and_rescnn_layouts():
    # Layouts of the authors' public code: SimCNN is VGG16's 13 convs with a dropout classifier,
    # ResCNN 12 convs (64, 128 x3, 256, 512 x7) with three residual pairs.
    assert sum(u.num_kernels for u in conv_units(create_model("simcnn"))) == 4224
    assert [u.num_kernels for u in conv_units(create_model("rescnn"))] == [64, 128, 128, 128, 256] + [512] * 7
    for name in ("simcnn", "rescnn"):
        assert create_model(name, width=0.25)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "simcnn", "rescnn"])
def test_modular_forward_equals_naive_masking(name):
    """Mask after ReLU/pool (the fast path) equals the paper's BN -> x mask -> ReLU order."""
    model = create_model(name, width=0.125).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    logits, masks = model(x, return_masks=True)
    captured = iter(masks)

    def naive(unit, inp, masks_out=None):
        out = unit.bn(unit.conv(inp))
        if unit.mask_generator is not None:
            out = out * next(captured)[:, :, None, None]
        if unit.relu:
            out = torch.relu(out)
        return torch.nn.functional.max_pool2d(out, 2) if unit.pool else out

    for unit in conv_units(model):
        unit.forward = lambda inp, masks_out=None, unit=unit: naive(unit, inp)
    torch.testing.assert_close(model(x), logits)
