"""Jaccard cohesion, coupling, KRR and the per-batch Fig. 5 metrics against literal set loops."""
import itertools
import math

import pytest
import torch

from mwt_ray.core.metrics import (
    batch_modularity,
    class_cohesion,
    cohesion,
    coupling,
    jaccard_matrix,
    kernel_retention_rate,
    module_cohesion,
    module_cohesions,
)


def ji(a, b):
    sa, sb = set(a.nonzero().flatten().tolist()), set(b.nonzero().flatten().tolist())
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def literal_cohesion(sets, labels, num_classes):
    values = []
    for c in range(num_classes):
        rows = sets[labels == c]
        pairs = list(itertools.combinations(range(len(rows)), 2))
        if pairs:
            values.append(sum(ji(rows[j], rows[k]) for j, k in pairs) / len(pairs))
    return sum(values) / len(values)


def test_jaccard_matrix_matches_sets():
    sets = torch.rand(9, 13) < 0.4
    sets[0] = False  # an empty set
    sets[1] = False
    jm = jaccard_matrix(sets)
    for i in range(9):
        for j in range(9):
            assert jm[i, j].item() == pytest.approx(ji(sets[i], sets[j]))


@pytest.mark.parametrize("block", [3, 4, 2048])
def test_cohesion_blocks_match_literal(block):
    sets = torch.rand(40, 17) < 0.6
    labels = torch.randint(0, 3, (40,))
    literal = literal_cohesion(sets, labels, 3)
    blocked = sum(class_cohesion(sets[labels == c], block) for c in range(3)) / 3
    assert blocked == pytest.approx(literal, abs=1e-6)
    assert cohesion(sets, labels, 3) == pytest.approx(literal, abs=1e-6)


def test_coupling_and_krr_match_literal():
    modules = torch.rand(5, 30) < 0.3
    pairs = list(itertools.combinations(range(5), 2))
    assert coupling(modules) == pytest.approx(sum(ji(modules[a], modules[b]) for a, b in pairs) / len(pairs))
    assert kernel_retention_rate(modules) == pytest.approx(sum(m.sum().item() / 30 for m in modules) / 5)


@pytest.mark.parametrize("empty_class", [False, True])
def test_batch_modularity_matches_literal(empty_class):
    """Against Eq. 2 and 3 on Python-level sets; ``empty_class``: class 3's samples use no kernel at
    all (empty sets, Jaccard 1 with each other, and an empty module)."""
    masks = [torch.rand(20, 6) * (torch.rand(20, 6) < 0.5), torch.rand(20, 9) * (torch.rand(20, 9) < 0.5)]
    labels = torch.randint(0, 3 if empty_class else 4, (20,))
    labels[:2] = torch.tensor([0, 1])
    if empty_class:
        labels[5:8] = 3
        for m in masks:
            m[5:8] = 0
    sets = torch.cat([m > 0 for m in masks], 1)
    result = batch_modularity(masks, labels, 4)
    present = [c for c in range(4) if (labels == c).any()]
    unions = torch.stack([sets[labels == c].any(0) for c in present])
    assert set(result) == {"batch_cohesion", "batch_coupling", "kernel_rate"}  # no tau: named per batch
    assert result["batch_coupling"] == pytest.approx(coupling(unions), abs=1e-6)
    with_pairs = [c for c in present if (labels == c).sum() > 1]
    expected = sum(class_cohesion(sets[labels == c]) for c in with_pairs) / len(with_pairs)
    assert result["batch_cohesion"] == pytest.approx(expected, abs=1e-6)
    assert result["kernel_rate"] == pytest.approx(sets.float().mean().item())


def literal_module_cohesion(sets, labels, masks):
    """Eq. 2 on module-restricted sets with Python sets and a loop over every same-class pair."""
    values = []
    for c in range(masks.shape[0]):
        module = {k for k in range(masks.shape[1]) if masks[c, k]}
        restricted = [{k for k in range(sets.shape[1]) if sets[i, k]} & module
                      for i in range(len(labels)) if labels[i] == c]
        pairs = [(a, b) for j, a in enumerate(restricted) for b in restricted[j + 1:]]
        if pairs:
            values.append(sum(1.0 if not (a | b) else len(a & b) / len(a | b) for a, b in pairs) / len(pairs))
    return sum(values) / len(values) if values else float("nan")


ISSUE_SETS = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
ISSUE_LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_module_cohesion_issue_example():
    # Class 0's pairs: 2/3, 1/2, 2/3; class 1's sets are identical. Raw cohesion (11/18 + 1) / 2.
    raw = 29 / 36
    assert cohesion(ISSUE_SETS, ISSUE_LABELS, 2) == pytest.approx(raw)
    modules = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]]).bool()  # the modules at tau 0.9
    assert module_cohesion(ISSUE_SETS, ISSUE_LABELS, modules) == pytest.approx(1.0)
    everything = torch.ones(2, 4, dtype=torch.bool)  # the modules at tau 0.3 keep every kernel
    assert module_cohesions(ISSUE_SETS, ISSUE_LABELS, [everything, modules]) == pytest.approx([raw, 1.0])
    assert literal_module_cohesion(ISSUE_SETS, ISSUE_LABELS, modules) == 1.0


@pytest.mark.parametrize("block", [1, 3, 5, 512])
def test_module_cohesions_match_literal(block):
    generator = torch.Generator().manual_seed(block)
    num_classes, kernels = 4, 23
    labels = torch.randint(0, num_classes, (41,), generator=generator)
    labels[:2] = 3  # class 3 has pairs; with 41 samples the others almost surely do too
    frequency = torch.rand(num_classes, kernels, generator=generator)
    frequency[:, :3] = 1.0  # kernels every sample uses (constant part of every intersection)
    frequency[:, 3:5] = 0.0  # kernels no sample uses
    sets = torch.rand(41, kernels, generator=generator) < frequency[labels]
    sets[5:8] = False  # empty kernel sets (two empty sets have Jaccard 1)
    scores = torch.rand(num_classes, kernels, generator=generator)
    masks = [torch.ones(num_classes, kernels, dtype=torch.bool), torch.zeros(num_classes, kernels, dtype=torch.bool)]
    masks += [scores > q for q in (0.2, 0.5, 0.8)]  # nested, like module masks over tau
    masks += [torch.rand(num_classes, kernels, generator=generator) < 0.4 for _ in range(2)]  # not nested
    got = module_cohesions(sets, labels, masks, block_size=block)
    expected = [literal_module_cohesion(sets, labels, m) for m in masks]
    assert got == pytest.approx(expected, abs=1e-6)
    assert got[0] == pytest.approx(cohesion(sets, labels, num_classes), abs=1e-6)
    assert got[1] == 1.0  # every restricted set is empty
    for m, value in zip(masks, got):
        assert module_cohesion(sets, labels, m) == pytest.approx(value, abs=1e-6)


def test_module_cohesion_skips_classes_without_pairs():
    sets = torch.tensor([[1, 0], [1, 1], [0, 1]]).bool()
    masks = torch.ones(3, 2, dtype=torch.bool)
    assert module_cohesion(sets, torch.tensor([0, 0, 1]), masks) == pytest.approx(0.5)
    assert math.isnan(module_cohesion(sets, torch.tensor([0, 1, 2]), masks))
    assert module_cohesions(sets, torch.tensor([0, 0, 1]), []) == []
