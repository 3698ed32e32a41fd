"""Streaming kernel-usage counts and module masks against in-memory brute force."""
import pytest
import torch

from mwt_ray.core.graph import modular_units
from mwt_ray.core.kernel_usage import (
    TAU_GRID,
    KernelUsage,
    count_kernel_usage,
    modularity_by_tau,
    modularity_report,
    module_masks,
)
from mwt_ray.core.metrics import coupling, kernel_retention_rate
from mwt_ray.core.models import create_model


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
    assert usage.counts.shape == (4, sum(u.num_kernels for u in modular_units(model)))
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


def usage_of(sets, labels, num_classes, layer_sizes):
    """KernelUsage with every sample's kernel set kept, as ``count_kernel_usage(..., None)`` gives."""
    counts = torch.stack([sets[labels == c].sum(0) for c in range(num_classes)])
    return KernelUsage(counts, torch.bincount(labels, minlength=num_classes), layer_sizes, sets, labels)


def literal_module_cohesion(sets, labels, masks):
    """Each sample's kernel set AND its class's module, then Eq. 2 over every same-class pair, in
    Python sets and loops."""
    per_class = []
    for c in range(masks.shape[0]):
        module = set(masks[c].nonzero().flatten().tolist())
        kept = [set(sets[i].nonzero().flatten().tolist()) & module for i in range(len(labels)) if labels[i] == c]
        jaccards = []
        for j in range(len(kept)):
            for k in range(j + 1, len(kept)):
                union = kept[j] | kept[k]
                jaccards.append(len(kept[j] & kept[k]) / len(union) if union else 1.0)
        if jaccards:
            per_class.append(sum(jaccards) / len(jaccards))
    return sum(per_class) / len(per_class)


ISSUE_SETS = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
ISSUE_LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("tau, modules, expected", [
    (0.9, [[1, 1, 0, 0], [0, 0, 1, 1]], 1.0),
    (0.3, [[1, 1, 1, 1], [0, 0, 1, 1]], 29 / 36),
])
def test_issue_example_module_versus_raw_cohesion(tau, modules, expected):
    usage = usage_of(ISSUE_SETS, ISSUE_LABELS, 2, [4])
    masks = module_masks(usage, tau)
    assert masks.int().tolist() == modules
    report = modularity_report(usage, masks, tau=tau)
    assert report["raw_cohesion"] == pytest.approx(29 / 36)  # 0.806 whatever tau
    assert report["cohesion"] == pytest.approx(expected)
    assert report["cohesion"] == pytest.approx(literal_module_cohesion(ISSUE_SETS, ISSUE_LABELS, masks))
    assert report["tau"] == tau
    rows = {row["tau"]: row for row in report["by_tau"]}
    assert sorted(rows) == sorted(set(TAU_GRID) | {tau})
    assert rows[tau]["cohesion"] == report["cohesion"] and rows[tau]["krr"] == report["krr"]


def test_by_tau_matches_literal_on_random_data():
    generator = torch.Generator().manual_seed(7)
    num_classes, layer_sizes = 3, [4, 6, 5]
    labels = torch.randint(0, num_classes, (45,), generator=generator)
    frequency = torch.rand(num_classes, sum(layer_sizes), generator=generator) ** 0.5
    sets = torch.rand(45, sum(layer_sizes), generator=generator) < frequency[labels]
    sets[:2] = False
    usage = usage_of(sets, labels, num_classes, layer_sizes)
    taus = (0.05, 0.3, 0.55, 0.8, 0.95, 1.0)
    table = modularity_by_tau(usage, taus)
    assert list(table) == list(taus)
    for tau, row in table.items():
        masks = module_masks(usage, tau)
        assert row["cohesion"] == pytest.approx(literal_module_cohesion(sets, labels, masks), abs=1e-6)
        assert row["krr"] == kernel_retention_rate(masks) and row["coupling"] == coupling(masks)
    report = modularity_report(usage, module_masks(usage, 0.55), tau=0.55, taus=taus)
    assert report["cohesion"] == pytest.approx(table[0.55]["cohesion"])
    raw = literal_module_cohesion(sets, labels, torch.ones(num_classes, sum(layer_sizes), dtype=torch.bool))
    assert report["raw_cohesion"] == pytest.approx(raw, abs=1e-6)
    assert [row["tau"] for row in report["by_tau"]] == list(taus)
    print("tau, module cohesion, KRR:", [(t, round(r["cohesion"], 3), round(r["krr"], 3)) for t, r in table.items()])


def test_cohesion_need_not_rise_with_tau():
    # Kernels a, b, c with frequencies 2/5, 3/5, 3/5: at tau 0.6 the module drops a, which turns
    # {a, b} / {a} (a shared kernel) into {b} / {} while {b, c} / {b} gain only a little.
    sets = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]]).bool()
    labels = torch.zeros(5, dtype=torch.long)
    table = modularity_by_tau(usage_of(sets, labels, 1, [3]), [0.4, 0.6])
    assert table[0.4]["cohesion"] == pytest.approx(19 / 60)  # the raw sets
    assert table[0.6]["cohesion"] == pytest.approx(3 / 10)


def test_report_on_counted_model_and_without_kernel_sets():
    model = create_model("vgg16", width=0.125).eval()
    x, y = torch.randn(40, 3, 32, 32), torch.arange(40) % 4
    usage = count_kernel_usage(model, [(x[:25], y[:25]), (x[25:], y[25:])], 4, max_samples_per_class=None)
    masks = module_masks(usage, 0.7)
    report = modularity_report(usage, masks, tau=0.7, taus=None)
    assert [row["tau"] for row in report["by_tau"]] == [0.7]
    expected = literal_module_cohesion(usage.sample_kernel_sets, usage.sample_labels, masks)
    assert report["cohesion"] == pytest.approx(expected, abs=1e-6)
    assert "by_tau" not in modularity_report(usage, masks, taus=None)
    counts_only = KernelUsage(usage.counts, usage.class_sizes, usage.layer_sizes)
    without = modularity_report(counts_only, masks, tau=0.7)
    assert not {"cohesion", "raw_cohesion", "kernel_rate", "by_tau"} & set(without)
    assert without["krr"] == report["krr"] and without["coupling"] == report["coupling"]
    assert "cohesion" not in modularity_by_tau(counts_only, [0.5])[0.5]
