"""Streaming kernel-usage counts and module masks against in-memory brute force."""
import pytest
import torch

from mwt_ray.core.modularize import KernelUsage, count_kernel_usage, module_masks, modularity_report
from mwt_ray.core.models import create_model, masked_units


def test_streaming_counts_equal_one_in_memory_pass():
    model = create_model("resnet18", width=0.125).eval()
    x = torch.randn(50, 3, 32, 32)
    y = torch.randint(0, 4, (50,))
    batches = [(x[s:e], y[s:e]) for s, e in [(0, 7), (7, 20), (20, 21), (21, 50)]]
    usage = count_kernel_usage(model, batches, 4, max_samples_per_class=5)
    with torch.no_grad():
        _, masks = model(x, return_masks=True)
    active = torch.cat(masks, 1) > 0
    expected = torch.stack([active[y == c].sum(0) for c in range(4)])
    assert torch.equal(usage.counts, expected)
    assert torch.equal(usage.class_sizes, torch.bincount(y, minlength=4))
    assert usage.counts.shape == (4, sum(u.num_kernels for u in masked_units(model)))
    # The cohesion sample keeps the first 5 samples of each class, in order.
    for c in range(4):
        first = active[y == c][:5]
        assert torch.equal(usage.sample_kernel_sets[usage.sample_labels == c], first)


def test_module_masks_threshold_and_non_empty_layers():
    counts = torch.tensor([[9, 10, 3, 0, 2], [1, 2, 8, 9, 0]])
    usage = KernelUsage(counts, torch.tensor([10, 10]), [3, 2])
    masks = module_masks(usage, 0.9)
    # Class 0, layer 1 and class 1, layer 0 have no kernel at >= 0.9: each keeps its most
    # frequent kernel there (index 4 at 0.2, index 2 at 0.8).
    assert masks.tolist() == [[True, True, False, False, True], [False, False, True, True, False]]
    assert module_masks(usage, 1.0)[0].tolist() == [False, True, False, False, True]
    assert module_masks(usage, 0.05).sum() == 8


def test_layer_a_class_never_activates_keeps_one_kernel():
    usage = KernelUsage(torch.tensor([[4, 4, 0, 0, 0]]), torch.tensor([4]), [2, 3])
    assert module_masks(usage, 0.9).tolist() == [[True, True, True, False, False]]


@pytest.mark.parametrize("tau", [0, -0.1, 1.01])
def test_tau_out_of_range(tau):
    usage = KernelUsage(torch.ones(2, 3, dtype=torch.int64), torch.tensor([1, 1]), [3])
    with pytest.raises(ValueError, match="tau must be in"):
        module_masks(usage, tau)


def test_class_without_samples_is_an_error():
    usage = KernelUsage(torch.ones(3, 3, dtype=torch.int64), torch.tensor([4, 0, 2]), [3])
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no samples"):
        module_masks(usage, 0.9)


def test_report_and_state_round_trip():
    usage = KernelUsage(torch.tensor([[5, 0, 5], [0, 5, 5]]), torch.tensor([5, 5]), [2, 1])
    masks = module_masks(usage, 0.9)
    report = modularity_report(usage, masks)
    assert report["krr"] == pytest.approx(4 / 6)
    assert report["coupling"] == pytest.approx(1 / 3)
    assert report["layer_krr"] == [0.5, 1.0]
    again = KernelUsage.from_state_dict(usage.state_dict())
    assert torch.equal(again.counts, usage.counts) and again.layer_sizes == [2, 1]
