"""Model registry, kernel counts, and the single-node generator + mask op against plain autograd."""
import copy
import itertools

import pytest
import torch

from mwt_ray.core.checkpoint import FORMAT, build_model, load_checkpoint
from mwt_ray.core.graph import modular_units
from mwt_ray.core.masking import MaskGenerator
from mwt_ray.core.methods.mwt import insert_mask_units
from mwt_ray.core.models import create_model, list_models


def conv_kernels(model) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_kernel_counts_match_the_paper():
    vgg = create_model("vgg16", width=1.0)
    assert sum(conv_kernels(vgg)) == 4224  # Table 2
    assert sum(u.num_kernels for u in modular_units(vgg)) == 4160  # all but the first conv
    resnet = create_model("resnet18", width=1.0)
    # Table 2's 3904 counts the 3x3 convs; the three 1x1 shortcut convs (896 kernels) are masked too.
    assert (
        sum(m.out_channels for m in resnet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        == 3904
    )
    assert sum(u.num_kernels for u in modular_units(resnet)) == 4800 - 64


def test_standard_model_has_no_generators_and_same_backbone_shapes():
    modular, standard = create_model("vgg16", width=0.25), create_model("vgg16", width=0.25, method="standard")
    assert not modular_units(standard)
    backbone = {k: v.shape for k, v in modular.state_dict().items() if "mask_generator" not in k}
    assert backbone == {k: v.shape for k, v in standard.state_dict().items()}


@pytest.mark.parametrize("bad", [{"name": "alexnet"}, {"name": "vgg16", "width": 0}, {"name": "vgg16", "width": -1},
                                 {"name": "vgg16", "num_classes": 1}])
def test_registry_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="alexnet|width|num_classes"):
        create_model(**bad)


@pytest.mark.parametrize("relu, detach, mask_used", list(itertools.product([True, False], repeat=3)))
def test_masked_activation_matches_autograd(relu, detach, mask_used):
    """The eager node (generator + mask in one, output overwriting its input) gives what autograd
    gives for ``act(y) * generator(x)``: outputs and the gradients of y, x and the generator's
    weights, with masks that are exactly 0 for some kernels, whether or not the loss also uses the
    mask itself (as the objective does)."""
    torch.manual_seed(0)
    generator = MaskGenerator(6, 5).double()
    with torch.no_grad():
        generator.b2.uniform_(-1, 1)  # about half the mask values are exactly 0
    generator.detach_input = detach
    x = torch.randn(8, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(8, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_out, grad_mask = torch.randn(8, 5, 3, 3, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)

    def outputs_and_grads(fused: bool):
        y_copy = y.clone()  # the node overwrites its input
        if fused:
            out, mask = generator.masked(y_copy, x, relu)
        else:
            pooled = (x.detach() if detach else x).mean(dim=(2, 3))
            mask = torch.relu(torch.tanh(torch.relu(pooled @ generator.w1.t()) @ generator.w2.t() + generator.b2))
            out = (torch.relu(y_copy) if relu else y_copy) * mask[:, :, None, None]
        loss = (out * grad_out).sum() + ((mask * grad_mask).sum() if mask_used else 0)
        inputs = [y] + ([] if detach else [x]) + list(generator.parameters())
        return [out, mask, *torch.autograd.grad(loss, inputs)]

    reference = outputs_and_grads(fused=False)
    assert 0.2 < (reference[1] == 0).double().mean() < 0.8
    for got, expected in zip(outputs_and_grads(fused=True), reference):
        torch.testing.assert_close(got, expected)


def test_masked_activation_follows_its_parameter_in_place_and_to_new_storage():
    """The eager node reads the weights through views made once per storage: an in-place update (what
    SGD does) and a move to new storage (``.double()``) are both seen, as autograd's own ops see them,
    also when the views were first made under inference mode (an evaluation before training)."""
    torch.manual_seed(0)
    generator = MaskGenerator(6, 5)
    x, y = torch.randn(4, 6, 3, 3), torch.randn(4, 5, 3, 3)

    def reference(y, x):
        mask = torch.relu(
            torch.tanh(torch.relu(x.mean(dim=(2, 3)) @ generator.w1.t()) @ generator.w2.t() + generator.b2)
        )
        return y * mask[:, :, None, None]

    with torch.inference_mode():
        generator.masked(y.clone(), x, False)  # views made
    with torch.no_grad():
        generator.packed.mul_(-0.5).add_(0.1)
    out, _ = generator.masked(y.clone().requires_grad_().clone(), x, False)
    torch.testing.assert_close(out, reference(y, x))
    out.sum().backward()
    generator.double()
    x, y = x.double(), y.double()
    out, _ = generator.masked(y.clone().requires_grad_().clone(), x, False)  # the node overwrites a non-leaf
    torch.testing.assert_close(out, reference(y, x))
    generator.packed.grad = None
    out.sum().backward()
    assert generator.packed.grad.dtype == torch.float64


def test_checkpoints_with_separate_generator_layers_load(tmp_path):
    """Checkpoints written before the weights were packed (format 1) hold fc1.weight, fc2.weight and
    fc2.bias per generator: the checkpoint loader packs them; a squeeze-excitation's fc1 / fc2 stay."""
    model = create_model("vgg16", num_classes=4, width=0.125)
    state = model.state_dict()
    old = {}
    for unit in modular_units(model):
        generator = unit.state
        del state[f"{unit.name}.packed"]
        old[unit.name] = {
            "fc1.weight": generator.w1.detach() + 1,
            "fc2.weight": generator.w2.detach() + 2,
            "fc2.bias": generator.b2.detach() + 3,
        }
        state.update({f"{unit.name}.{key}": value for key, value in old[unit.name].items()})
    state["se.fc1.weight"] = torch.ones(2, 2)  # not a generator's: left as it is
    architecture = {"name": "vgg16", "width": 0.125, "num_classes": 4, "modular": True}
    torch.save({"format": 1, "architecture": architecture, "model_state": state}, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["format"] == FORMAT and "se.fc1.weight" in loaded["model_state"]
    assert loaded["architecture"]["method"] == "mwt" and "modular" not in loaded["architecture"]  # format 3
    del loaded["model_state"]["se.fc1.weight"]
    fresh = build_model(loaded)
    for unit in modular_units(fresh):
        expected = old[unit.name]
        assert torch.equal(unit.state.w1, expected["fc1.weight"])
        assert torch.equal(unit.state.w2, expected["fc2.weight"])
        assert torch.equal(unit.state.b2, expected["fc2.bias"])
    torch.save({"format": FORMAT + 1, "architecture": architecture, "model_state": state}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="newer than this mwt_ray reads"):
        load_checkpoint(tmp_path / "new.pt")


def test_simcnn_and_rescnn_layouts():
    # Layouts of the authors' public code: SimCNN is VGG16's 13 convs with a dropout classifier,
    # ResCNN 12 convs (64, 128 x3, 256, 512 x7) with three residual pairs.
    assert sum(conv_kernels(create_model("simcnn", width=1.0))) == 4224
    assert conv_kernels(create_model("rescnn", width=1.0)) == [64, 128, 128, 128, 256] + [512] * 7
    for name in ("simcnn", "rescnn"):
        assert create_model(name, width=0.25)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", list_models())
def test_modular_forward_equals_naive_masking(name):
    """The modular graph (ReLU folded into the mask op, the mask after a max-pool) equals the paper's
    order on the plain network: BN -> x mask -> ReLU -> pool, the mask put on each masked BN's output
    by a forward hook, in the order the graph returns the masks."""
    plain = create_model(name, width=0.125, method="standard").double().eval()
    reference = copy.deepcopy(plain)
    model = insert_mask_units(plain, name)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    logits, masks = model(x, return_masks=True)
    for unit, mask in zip(modular_units(model), masks):
        reference.get_submodule(unit.bn).register_forward_hook(
            lambda module, inputs, out, mask=mask: out * mask[:, :, None, None])
    with torch.no_grad():
        torch.testing.assert_close(reference(x), logits)
    assert len(masks) == len(modular_units(model)) and all(0.2 < (m > 0).double().mean() for m in masks)


def test_masks_come_in_the_order_the_graph_runs_them():
    """ResNet's shortcut conv runs after the block's two convs (the order checkpoints' kernel counts
    are stored in); the mask order is read from the graph, not from the module registration."""
    model = create_model("resnet18", width=0.125)
    names = [u.layer for u in modular_units(model)]
    assert names[:5] == ["blocks.0.unit1.conv", "blocks.0.unit2.conv", "blocks.1.unit1.conv", "blocks.1.unit2.conv",
                         "blocks.2.unit1.conv"]
    assert names[5:7] == ["blocks.2.unit2.conv", "blocks.2.shortcut.conv"]
    order = [n.target for n in model.graph.nodes if n.op == "call_module" and n.target in names]
    assert order == names


def test_a_registered_factory_is_a_built_in_everywhere(monkeypatch):
    """One decorated function is all a new built-in takes: the registry, the default width and the
    config read it."""
    from mwt_ray.config import load_config
    from mwt_ray.core import models

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @models.register_model("tiny_vgg")
    def tiny_vgg(num_classes: int, width: float):
        return models.VGG([models._scaled(16, width)] * 2, [True, True], 8, num_classes)

    assert "tiny_vgg" in list_models()
    model = create_model("tiny_vgg", num_classes=3, method="standard")
    assert conv_kernels(model) == [round(16 * models.DEFAULT_WIDTH)] * 2  # the one default width
    assert load_config(None, ["model.name=tiny_vgg"]).model.width == models.DEFAULT_WIDTH
    with pytest.raises(ValueError, match="taken"):
        models.register_model("tiny_vgg")


def test_the_config_and_create_model_share_one_default_width():
    from mwt_ray.config import load_config
    from mwt_ray.core.models import DEFAULT_WIDTH

    for name in list_models():
        cfg = load_config(None, [f"model.name={name}"])
        assert cfg.model.width == DEFAULT_WIDTH
        default = create_model(name, method="standard")
        explicit = create_model(name, width=DEFAULT_WIDTH, method="standard")
        assert conv_kernels(default) == conv_kernels(explicit)


def test_a_function_of_ones_own_builds_the_model():
    """``package.module:function``: the network it returns for num_classes, made modular like any CNN."""
    model = create_model("own_cnn:tiny_cnn", num_classes=7)
    assert [u.layer for u in modular_units(model)] == ["features.3", "features.7"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert create_model("own_cnn:tiny_cnn", num_classes=3, width=1.0, method="standard").classifier.out_features == 3
    with pytest.raises(ValueError, match="takes num_classes and no width"):
        create_model("own_cnn:tiny_cnn", width=0.5)
    # A constructor that computes with tensors fails on the meta device the name is checked on.
    assert create_model("own_cnn:computed_widths", num_classes=4)(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_a_checkpoint_of_ones_own_model_is_checked_and_rebuilt(tmp_path):
    from mwt_ray.core.checkpoint import check_checkpoint, save_checkpoint

    for name in ("own_cnn:tiny_cnn", "own_cnn:computed_widths"):
        model = create_model(name, num_classes=4)
        save_checkpoint(tmp_path / "own.pt", model, {"name": name, "width": 1.0, "num_classes": 4, "method": "mwt"})
        state = load_checkpoint(tmp_path / "own.pt")
        check_checkpoint(state)
        rebuilt = build_model(state).eval()
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(rebuilt(x), model.eval()(x))


@pytest.mark.parametrize("name, expected", [
    ("nosuchpkg.mod:f", "module nosuchpkg.mod cannot be imported"),
    ("own_cnn:missing", "module own_cnn has no attribute 'missing'"),
    ("own_cnn:not_callable", "is a int, not a Python function of num_classes"),
    ("own_cnn:not_a_module", "not_a_module(num_classes=10) returned a list, not a torch.nn.Module"),
    ("own_cnn:raises", "raises(num_classes=10) raised RuntimeError: no network for 10 classes"),
    ("a:b:c", "is not package.module:function"),
    (":f", "is not package.module:function"),
    ("own_cnn:", "is not package.module:function"),
])
def test_a_bad_function_name_is_one_line(name, expected):
    with pytest.raises(ValueError, match="^model ") as error:
        create_model(name)
    assert expected in str(error.value) and "\n" not in str(error.value)
