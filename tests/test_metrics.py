"""Jaccard cohesion, coupling, KRR and the per-batch Fig. 5 metrics against literal set loops."""
import itertools

import pytest
import torch

from mwt_ray.core.metrics import batch_modularity, class_cohesion, cohesion, coupling, jaccard_matrix, kernel_retention_rate


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


def test_batch_modularity_matches_literal():
    masks = [torch.rand(20, 6) * (torch.rand(20, 6) < 0.5), torch.rand(20, 9) * (torch.rand(20, 9) < 0.5)]
    labels = torch.randint(0, 4, (20,))
    labels[:2] = torch.tensor([0, 1])
    sets = torch.cat([m > 0 for m in masks], 1)
    result = batch_modularity(masks, labels, 4)
    present = [c for c in range(4) if (labels == c).any()]
    unions = torch.stack([sets[labels == c].any(0) for c in present])
    assert result["coupling"] == pytest.approx(coupling(unions), abs=1e-6)
    with_pairs = [c for c in present if (labels == c).sum() > 1]
    expected = sum(class_cohesion(sets[labels == c]) for c in with_pairs) / len(with_pairs)
    assert result["cohesion"] == pytest.approx(expected, abs=1e-6)
    assert result["kernel_rate"] == pytest.approx(sets.float().mean().item())
