"""MODA's losses against a literal float64 loop over their definitions, and its activation signal."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import random_masks
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mwt_ray.core.losses import LayerMasks
from mwt_ray.core.methods.moda import ActivationSignal, moda_losses, moda_objective


def literal_cos(a, b):
    """<a, b> / (max(|a|, 1e-12) max(|b|, 1e-12)), one scalar op at a time (autograd-able)."""
    def norm(v):
        square = sum(v[k] * v[k] for k in range(len(v)))
        return torch.sqrt(square) if square > 1e-24 else torch.tensor(1e-12, dtype=v.dtype)
    return sum(a[k] * b[k] for k in range(len(a))) / (norm(a) * norm(b))


def literal_losses(layers, labels):
    """(L_aff, L_dis, L_com): loops over layers and unordered pairs i < j, pooled over classes."""
    y = labels.tolist()
    batch = len(y)
    pairs = list(itertools.combinations(range(batch), 2))
    same = [(i, j) for i, j in pairs if y[i] == y[j]]
    diff = [(i, j) for i, j in pairs if y[i] != y[j]]
    affinity, dispersion, compactness = 0.0, 0.0, 0.0
    for h in layers:
        if same:
            affinity = affinity + sum(literal_cos(h[i], h[j]) for i, j in same) / len(same)
        if diff:
            dispersion = dispersion + sum(literal_cos(h[i], h[j]) for i, j in diff) / len(diff)
        width = h.shape[1]
        compactness = compactness + sum(h[i][k].abs() for i in range(batch) for k in range(width)) / (batch * width)
    n = len(layers)
    return (1 - affinity / n if same else 0.0), dispersion / n, compactness / n


def activations(batch, widths, seed):
    """Non-negative float64 leaves with exact zeros, an all-zero block and an all-zero sample."""
    g = torch.Generator().manual_seed(seed)
    layers = [m * torch.rand(1, dtype=torch.float64, generator=g) * 5 for m in random_masks(batch, widths, generator=g)]
    if batch > 1:
        layers[0][1] = 0
    if batch > 3:
        for h in layers:
            h[3] = 0
    return [h.requires_grad_() for h in layers]


def assert_matches_literal(layers, labels, num_classes):
    got = moda_losses(layers, labels, num_classes)
    want = literal_losses(layers, labels)
    for g, w in zip(got, want):
        assert g.shape == () and g.dtype == torch.float64
        assert abs(g.detach().item() - (w if isinstance(w, float) else w.detach().item())) <= 1e-10
        got_grads = torch.autograd.grad(g, layers, retain_graph=True)
        if isinstance(w, float):  # an empty pair set: a constant, no gradient anywhere
            want_grads = [torch.zeros_like(h) for h in layers]
        else:
            want_grads = torch.autograd.grad(w, layers, retain_graph=True, allow_unused=True)
            want_grads = [torch.zeros_like(h) if d is None else d for h, d in zip(layers, want_grads)]
        for d, e in zip(got_grads, want_grads):
            # relative as well: a sample's all-zero block is divided by eps = 1e-12, so its gradient
            # toward a non-zero partner is ~1e12, which float64 holds to ~1e-4 absolute
            torch.testing.assert_close(d, e, rtol=1e-10, atol=1e-10)
    return got


@pytest.mark.parametrize("seed", range(4))
def test_losses_match_literal_loop(seed):
    g = torch.Generator().manual_seed(100 + seed)
    batch, num_classes = 9, 7  # classes 5 and 6 never occur
    labels = torch.randint(0, 4, (batch,), generator=g)
    labels[0] = 4  # a class with a single sample
    labels[1:3] = labels[5]  # at least one same-class pair
    assert_matches_literal(activations(batch, [3, 7, 4, 1], seed), labels, num_classes)


def test_no_same_class_pair_gives_zero_affinity_and_gradient():
    layers = activations(5, [4, 6], seed=7)
    affinity, dispersion, _ = assert_matches_literal(layers, torch.tensor([4, 0, 2, 1, 3]), 6)
    assert affinity.item() == 0 and dispersion.item() > 0
    assert all((d == 0).all() for d in torch.autograd.grad(affinity, layers))


def test_single_class_gives_zero_dispersion_and_gradient():
    layers = activations(6, [5, 3], seed=8)
    affinity, dispersion, _ = assert_matches_literal(layers, torch.full((6,), 2), 3)
    assert dispersion.item() == 0 and 0 < affinity.item() < 1
    assert all((d == 0).all() for d in torch.autograd.grad(dispersion, layers))


def test_single_sample_has_no_pairs():
    layers = activations(1, [3, 2], seed=9)
    affinity, dispersion, compactness = assert_matches_literal(layers, torch.tensor([1]), 2)
    assert affinity.item() == 0 and dispersion.item() == 0 and compactness.item() > 0


def test_layer_masks_and_list_agree():
    layers = activations(8, [3, 5], seed=10)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    for a, b in zip(moda_losses(layers, labels, 3), moda_losses(LayerMasks.of(layers), labels, 3)):
        assert a.item() == b.item()


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_no_host_sync_forward_or_backward():
    """.item(), tolist, bool(tensor) and boolean indexing all reach these ops (a GPU sync each)."""
    layers = activations(8, [3, 5], seed=11)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    with _RecordOps() as recorded:
        affinity, dispersion, compactness = moda_losses(layers, labels, 3)
        (affinity + dispersion + compactness).backward()
    assert "mm" in recorded.ops  # the mode did see the ops
    assert not recorded.ops & {"_local_scalar_dense", "nonzero", "masked_select", "index"}


def test_objective_is_ce_plus_weighted_parts():
    # The signals cover a larger (gathered) batch than the logits: CE reads only logits/labels.
    signals = activations(10, [4, 6, 2], seed=12)
    signal_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 3, 1])
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 4, 1])
    total, parts = moda_objective(logits, labels, signals, signal_labels, 5, affinity=0.7, dispersion=1.3,
                                  compactness=0.3)
    aff, dis, com = literal_losses(signals, signal_labels)
    ce = F.cross_entropy(logits, labels)
    assert abs(total.item() - (ce + 0.7 * aff + 1.3 * dis + 0.3 * com).item()) <= 1e-10
    assert set(parts) == {"ce_loss", "affinity_loss", "dispersion_loss", "compactness_loss"}
    assert abs(parts["ce_loss"].item() - ce.item()) <= 1e-12
    for name, value in [("affinity_loss", aff), ("dispersion_loss", dis), ("compactness_loss", com)]:
        assert abs(parts[name].item() - value.item()) <= 1e-10
    assert all(p.shape == () and not p.requires_grad for p in parts.values())
    total.backward()
    assert logits.grad.abs().sum() > 0 and all(h.grad.abs().sum() > 0 for h in signals)


def literal_channel_means(out):
    b, c, h, w = out.shape
    out = out.detach()
    return torch.tensor([[sum(max(float(out[i, j, p, q]), 0.0) for p in range(h) for q in range(w)) / (h * w)
                          for j in range(c)] for i in range(b)], dtype=torch.float64)


@pytest.mark.parametrize("relu", [True, False])
def test_signal_of_conv_output(relu):
    y = torch.randn(2, 3, 4, 5)  # negatives included
    unit = ActivationSignal(3)
    assert unit.num_kernels == 3 and not list(unit.parameters())
    out, signal = unit.masked(y.clone(), None, relu)
    assert torch.equal(out, F.relu(y) if relu else y)
    assert signal.shape == (2, 3) and signal.dtype == torch.float32
    torch.testing.assert_close(signal.double(), literal_channel_means(y), rtol=0, atol=1e-6)
    assert (literal_channel_means(y) > 0).any() and (signal >= 0).all()


@pytest.mark.parametrize("relu", [True, False])
def test_signal_of_linear_output_is_a_copy(relu):
    y = torch.randn(4, 6)
    out, signal = ActivationSignal(6).masked(y.clone(), None, relu)
    assert torch.equal(out, F.relu(y) if relu else y)
    assert torch.equal(signal, torch.tensor([[max(float(v), 0.0) for v in row] for row in y]))
    out.mul_(2)  # a later in-place op on the activation leaves the signal as it was
    assert torch.equal(signal, F.relu(y))


def test_signal_is_fp32_under_autocast():
    conv, linear, unit = nn.Conv2d(2, 3, 3), nn.Linear(8, 5), ActivationSignal(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(torch.randn(2, 2, 6, 6))
        z = linear(torch.randn(2, 8))
        assert y.dtype == z.dtype == torch.bfloat16
        expected = literal_channel_means(y.float())  # before relu_ overwrites y
        _, signal = unit.masked(y, None, True)
        _, hidden = unit.masked(z, None, False)
    assert signal.dtype == hidden.dtype == torch.float32
    torch.testing.assert_close(signal.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(hidden, F.relu(z.float()))


@pytest.mark.parametrize("relu", [True, False])
def test_backward_through_conv_bn_matches_out_of_place(relu):
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(2, 4, 3, padding=1).double(), nn.BatchNorm2d(4).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    out_weights, signal_weights = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    params = [x.requires_grad_(), conv.weight, conv.bias, bn.weight, bn.bias]

    def grads(activate):
        out, signal = activate(bn(conv(x)))
        return torch.autograd.grad((out * out_weights).sum() + (signal * signal_weights).sum(), params)

    def out_of_place(y):
        out = F.relu(y) if relu else y
        return out, F.relu(out).mean(dim=(2, 3))

    got = grads(lambda y: ActivationSignal(4).masked(y, x, relu))
    for d, e in zip(got, grads(out_of_place)):
        torch.testing.assert_close(d, e, rtol=0, atol=1e-10)
    assert all(d.abs().sum() > 0 for d in got)
