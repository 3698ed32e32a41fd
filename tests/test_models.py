"""Model registry, kernel counts, and the in-place mask op against plain autograd."""
import pytest
import torch

from mwt_ray.core.models import _ApplyMask, conv_units, create_model, masked_units


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


@pytest.mark.parametrize("relu", [True, False])
def test_in_place_mask_matches_autograd(relu):
    y = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 5, dtype=torch.float64)
    mask[mask < 0.3] = 0
    mask.requires_grad_()
    grad = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    reference = (torch.relu(y) if relu else y) * mask[:, :, None, None]
    ref_grads = torch.autograd.grad(reference, [y, mask], grad)
    out = _ApplyMask.apply(y.clone(), mask, relu)
    grads = torch.autograd.grad(out, [y, mask], grad)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grads[0], ref_grads[0])
    # Where the mask is 0 its gradient is irrelevant (relu(tanh) has zero slope there).
    torch.testing.assert_close(grads[1] * (mask > 0), ref_grads[1] * (mask > 0))


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


def test_generator_gradients_match_plain_autograd():
    """The custom spatial mean (broadcast-view backward) gives autograd's gradients."""
    from mwt_ray.core.models import MaskGenerator

    torch.manual_seed(0)
    generator = MaskGenerator(6, 5).double()
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 5, dtype=torch.float64)
    (generator(x) * weights).sum().backward()
    fast = [x.grad.clone()] + [p.grad.clone() for p in generator.parameters()]
    x.grad = None
    generator.zero_grad()
    hidden = torch.relu(generator.fc1(x.mean(dim=(2, 3))))
    (torch.relu(torch.tanh(generator.fc2(hidden))) * weights).sum().backward()
    reference = [x.grad] + [p.grad for p in generator.parameters()]
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b)
