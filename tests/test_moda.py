"""MODA as the second method, checked against independent truth: where its units sit in traced graphs,
the activation-frequency modules against a brute-force count over the plain network, extracted
modules (first conv, hidden FC neurons, residual and depthwise models) against the model with the
dropped channels and neurons zeroed, and train / reuse / export end to end in new processes. The
losses themselves: tests/test_moda_losses.py."""
import json

import pytest
import torch
import torch.nn.functional as F
from hard_masks import fixed_masks
from helpers import run_module
from torch import nn

from mwt_ray.core.extract import extract_module
from mwt_ray.core.graph import conv_columns, modular_units
from mwt_ray.core.kernel_usage import count_kernel_usage, module_masks
from mwt_ray.core.methods.moda import ActivationSignal
from mwt_ray.core.models import create_model, list_models

TORCHVISION = ["torchvision:mobilenet_v2", "torchvision:resnet18", "torchvision:efficientnet_b0",
               "torchvision:mnasnet0_5", "torchvision:regnet_x_400mf"]


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics and affine terms, so that channels differ in how often they are positive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    return model.eval()


def test_units_of_the_built_in_vgg16_are_moda_s_fifteen():
    """MODA tracks VGG16's 13 conv ReLUs and the 2 hidden FC ReLUs of its head, not the logits: so does
    the traced graph, the first conv included; a ResNet's first conv too, and every block's two units."""
    vgg = create_model("vgg16", 10, 0.125, "moda")
    units = modular_units(vgg)
    assert len(units) == 15 and units[0].layer == "units.0.conv"
    assert [u.layer for u in units[13:]] == ["classifier.0", "classifier.2"] and all(u.bn is None for u in units[13:])
    assert all(isinstance(u.state, ActivationSignal) for u in units)
    assert conv_columns(vgg).sum() == sum(u.num_kernels for u in units[:13])
    resnet = modular_units(create_model("resnet18", 10, 0.125, "moda"))
    assert resnet[0].layer == "stem.conv" and len(resnet) == 1 + 8 * 2 + 3  # stem, blocks, shortcuts
    # MODA adds no parameters: the modular graph's weights are the plain network's
    plain = create_model("vgg16", 10, 0.125, "standard")
    assert sorted(vgg.state_dict()) == sorted(plain.state_dict())


def test_signals_are_the_pooled_positive_activations_of_the_plain_network():
    """The signal of a conv unit is the spatial mean of relu(BN(conv x)) per channel, of a hidden FC unit its
    ReLU output: read off the plain network by forward hooks."""
    torch.manual_seed(0)
    plain = randomised(create_model("vgg16", 10, 0.125, "standard"), 1)
    moda = create_model("vgg16", 10, 0.125, "moda").eval()
    moda.load_state_dict(plain.state_dict())
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(F.relu(o).mean((2, 3)))) for m in plain.modules()
             if isinstance(m, nn.BatchNorm2d)]
    hooks += [plain.classifier[i].register_forward_hook(lambda m, i, o: seen.append(F.relu(o))) for i in (0, 2)]
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        logits = plain(x)
        moda_logits, signals = moda(x, return_masks=True)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(moda_logits, logits)
    assert len(signals) == len(seen) == 15
    for signal, expected in zip(signals, seen):
        torch.testing.assert_close(signal, expected)


@pytest.mark.parametrize("tau", [0.5, 0.9, 1.0])
def test_activation_frequency_modules_match_a_brute_force_count(tau):
    """Usage counts and modules at tau against a literal loop: per sample, per tracked channel, "on" where the
    channel's activation is positive somewhere; per class the share of samples; kept at >= tau, and a layer a
    class would keep empty keeps its most frequent channels (all tied at the highest frequency, or channel
    argmax when the class never turns the layer on): the one rule for every method."""
    plain = randomised(create_model("vgg16", 4, 0.0625, "standard"), 2)
    moda = create_model("vgg16", 4, 0.0625, "moda").eval()
    moda.load_state_dict(plain.state_dict())
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.randn(40, 3, 32, 32, generator=generator), torch.arange(40) % 4
    usage = count_kernel_usage(moda, [(images[:16], labels[:16]), (images[16:], labels[16:])], 4)

    tracked = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)] + [plain.classifier[0], plain.classifier[2]]
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o)) for m in tracked]
    counts = [[[0] * (m.num_features if isinstance(m, nn.BatchNorm2d) else m.out_features) for m in tracked]
              for _ in range(4)]
    with torch.no_grad():
        for image, label in zip(images, labels.tolist()):
            plain(image[None])
            for layer, module in enumerate(tracked):
                activation = F.relu(outputs[module][0])
                for channel in range(activation.shape[0]):
                    counts[label][layer][channel] += int(bool((activation[channel] > 0).any()))
    for hook in hooks:
        hook.remove()
    flat = torch.tensor([[c for layer in per_class for c in layer] for per_class in counts])
    assert torch.equal(usage.counts, flat) and usage.class_sizes.tolist() == [10] * 4

    expected = []
    for per_class in counts:
        row = []
        for layer in per_class:
            share = [c / 10 for c in layer]
            kept = [s >= tau for s in share]
            if not any(kept):
                top = max(share)
                kept = [s == top for s in share] if top > 0 else [i == share.index(top) for i in range(len(share))]
            row += kept
        expected.append(row)
    assert torch.equal(module_masks(usage, tau), torch.tensor(expected))


def _check_extraction(name: str, width, seed: int, keep_share: float = 0.6) -> None:
    model = randomised(create_model(name, 10, width, "moda"), seed)
    generator = torch.Generator().manual_seed(seed)
    keep = [torch.rand(u.num_kernels, generator=generator) < keep_share for u in modular_units(model)]
    for layer in keep:
        layer[torch.randint(len(layer), (1,), generator=generator)] = True
    x = torch.randn(3, 3, 32, 32, generator=generator)
    module = extract_module(model, keep, torch.zeros(1, 3, 32, 32))
    with torch.no_grad(), fixed_masks(model, keep):
        reference = model(x)
        got = module(x)
    assert (got - reference).abs().max() <= 1e-4 * reference.abs().max().clamp_min(1), name
    # the kept units are cut, not zeroed: the first conv and (VGG) the hidden FC layers are smaller
    first = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    assert first.out_channels == int(keep[0].sum()), name


@pytest.mark.parametrize("name", list_models())
def test_extracted_moda_modules_equal_the_zeroed_model_built_ins(name):
    _check_extraction(name, 0.125, 4)


def test_a_vgg_module_cuts_the_hidden_fc_neurons():
    model = randomised(create_model("vgg16", 10, 0.125, "moda"), 5)
    keep = [torch.ones(u.num_kernels, dtype=torch.bool) for u in modular_units(model)]
    keep[13][1::2] = False  # every other neuron of the first hidden FC layer
    keep[14][:10] = False
    module = extract_module(model, keep, torch.zeros(1, 3, 32, 32))
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 54), (54, 10)]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), fixed_masks(model, keep):
        torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_extracted_moda_modules_equal_the_zeroed_model_torchvision(name):
    """Residual (ResNet, RegNet), inverted-residual and depthwise (MobileNetV2, MNASNet) and squeeze-excitation
    with SiLU (EfficientNet) CNNs: a depthwise kernel whose input channel was dropped keeps its BN shift."""
    _check_extraction(name, None, 6)


# ----------------------------------------------------------------------------- the commands



@pytest.mark.slow
def test_moda_trains_then_is_reused_and_exported(tmp_path):
    """``train.method=moda`` on the embedded digits through train, reuse and export, each in a new process:
    the method's losses in the history, modules whose KRR counts conv kernels and whose hidden FC neurons
    have a rate of their own, the shared size metrics, and a module file that computes the module."""
    result = run_module("mwt_ray.train", ["--set", "train.method=moda", "--set", "model.width=0.125",
                                   "--set", f"output_dir={tmp_path / 'runs'}", "--set", "name=moda",
                                   "--set", "train.epochs=2", "--set", "data.train_limit=300",
                                   "--set", "train.batch_size=32", "--set", "tracking.enabled=false",
                                   "--set", "modularize.cohesion_samples_per_class=10"], tmp_path)
    assert "moda training of vgg16" in result.stdout and "affinity " in result.stdout
    folder = tmp_path / "runs" / "moda"
    metrics = json.loads((folder / "metrics.json").read_text())
    modules = metrics["modules"]
    for key in ("krr", "neuron_retention_rate", "weight_share", "weight_share_conv", "overlap", "overlap_conv"):
        assert 0 <= modules[key] <= 1, key
    assert modules["overlap"] <= modules["weight_share"] and len(modules["layer_krr"]) == 15
    history = (folder / "history.csv").read_text().splitlines()[0].split(",")
    assert {"affinity_loss", "dispersion_loss", "compactness_loss", "kernel_rate"} <= set(history)
    assert "cohesion_loss" not in history

    checkpoint = folder / "checkpoint.pt"
    run_module("mwt_ray.reuse", ["--run", str(checkpoint), "--set", "reuse.num_actors=0", "--set", "reuse.epochs=1",
                          "--set", "reuse.subtasks=[[0, 1], [2, 3, 4]]", "--set", "reuse.latency_batch_sizes=[]"],
        tmp_path)
    rows = next((folder / "reuse").rglob("reuse_rows.csv")).read_text().splitlines()
    assert len(rows) == 3

    out = tmp_path / "module-0-1"
    run_module("mwt_ray.export", ["--run", str(checkpoint), "--classes", "0,1", "--out", str(out),
                           "--set", "reuse.epochs=0", "--set", "reuse.latency_batch_sizes=[1]",
                           "--set", "reuse.latency_repeats=1"], tmp_path)
    summary = json.loads((out / "module.json").read_text())
    conv_kernels = sum(m.out_channels for m in create_model("vgg16", 10, 0.125, "standard").modules()
                       if isinstance(m, nn.Conv2d))
    assert 0 < summary["krr"] <= 1 and summary["kernels_total"] == conv_kernels  # the hidden FC neurons not counted
    program = torch.export.load(out / "module.pt2").module()
    assert program(torch.rand(3, 3, 32, 32)).shape == (3, 2)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("used", ["both", "out", "signal"])
def test_the_pooled_activation_node_has_the_gradients_of_plain_ops(relu, used):
    """The eager unit op (one autograd node) against the same computation in plain autograd ops, float64:
    ``out = relu(y)`` or ``y``, ``signal = mean_hw(max(out, 0))``, either output alone or both used."""
    torch.manual_seed(7)
    y = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    grad_out, grad_signal = torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    results = []
    for plain in (False, True):
        leaf = y.clone().requires_grad_()
        source = leaf * 1.0  # the unit op may overwrite its input: never a leaf
        if plain:
            out = F.relu(source) if relu else source
            signal = F.relu(out).mean((2, 3))
        else:
            out, signal = ActivationSignal(4).masked(source, None, relu)
        terms = {"out": (out * grad_out).sum(), "signal": (signal * grad_signal).sum()}  # an unused output gets no
        sum(terms.values() if used == "both" else [terms[used]]).backward()  # gradient (None in the node's backward)
        results.append((out.detach(), signal.detach(), leaf.grad))
    for node, plain in zip(*results):
        torch.testing.assert_close(node, plain, rtol=1e-12, atol=1e-12)


class DepthwiseNet(nn.Module):
    """conv -> BN -> ReLU, depthwise conv -> BN -> ReLU, 1x1 conv -> BN, pool, FC: an inverted residual's chain."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.depthwise, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.project, self.bn3 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn2(self.depthwise(F.relu(self.bn1(self.expand(x))))))
        return self.fc(F.adaptive_avg_pool2d(self.bn3(self.project(x)), 1).flatten(1))


@pytest.mark.parametrize("kept_depthwise", [[5, 6], [1, 5]])
def test_a_depthwise_conv_whose_kept_kernels_read_only_dropped_channels(kept_depthwise):
    """MODA cuts the expanding conv too: a kept depthwise kernel may read only dropped channels, and with
    [5, 6] every kept kernel does (no conv is left to compute: zeros, then the BN's shift), as in the zeroed model."""
    from mwt_ray.core.methods.moda import insert_activation_units

    model = randomised(insert_activation_units(DepthwiseNet()), 8)
    keep = [torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool), torch.ones(6, dtype=torch.bool)]
    keep[0][[0, 1]] = True
    keep[1][kept_depthwise] = True
    module = extract_module(model, keep, torch.zeros(1, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), fixed_masks(model, keep):
        torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)
