"""Cohesion / coupling losses against a literal loop over Eq. 4 and Eq. 5."""
import itertools
import math

import pytest
import torch
from helpers import random_masks

from mwt_ray.core.losses import cohesion_coupling_losses, modular_objective


def cos(a, b):
    na, nb = a.norm(), b.norm()
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def literal_losses(masks, labels, num_classes):
    """Eq. 4 and 5 written as loops; per-layer cosine averaged over layers."""
    def similarity(j, k):
        return sum(cos(m[j], m[k]) for m in masks) / len(masks)

    members = {c: [i for i, y in enumerate(labels.tolist()) if y == c] for c in range(num_classes)}
    cohesion_terms = []
    for idx in members.values():
        if len(idx) < 2:
            continue
        pairs = list(itertools.combinations(idx, 2))
        cohesion_terms.append(sum(similarity(j, k) for j, k in pairs) / len(pairs))
    coupling_terms = []
    for h, i in itertools.combinations(range(num_classes), 2):
        if not members[h] or not members[i]:
            continue
        total = sum(similarity(j, k) for j in members[h] for k in members[i])
        coupling_terms.append(total / (len(members[h]) * len(members[i])))
    l_ch = 1 - sum(cohesion_terms) / len(cohesion_terms) if cohesion_terms else 0.0
    l_cp = sum(coupling_terms) / len(coupling_terms) if coupling_terms else 0.0
    return l_ch, l_cp


@pytest.mark.parametrize("trial", range(6))
def test_losses_match_literal_equations(trial):
    g = torch.Generator().manual_seed(trial)
    num_classes = 5
    batch = int(torch.randint(3, 24, (1,), generator=g))
    # Some classes absent, some with a single sample: both must be handled.
    labels = torch.randint(0, num_classes - 1, (batch,), generator=g)
    labels[0] = num_classes - 1
    masks = random_masks(batch, [3, 7, 4], generator=g)
    masks[0][1] = 0  # an all-zero mask in one layer
    l_ch, l_cp = cohesion_coupling_losses(masks, labels, num_classes)
    ref_ch, ref_cp = literal_losses(masks, labels, num_classes)
    assert math.isclose(l_ch.item(), ref_ch, abs_tol=1e-10)
    assert math.isclose(l_cp.item(), ref_cp, abs_tol=1e-10)


def test_degenerate_batches_give_zero_losses():
    masks = random_masks(1, [4, 4])
    l_ch, l_cp = cohesion_coupling_losses(masks, torch.tensor([2]), 3)
    assert l_ch.item() == 0 and l_cp.item() == 0
    masks = random_masks(3, [4])
    l_ch, l_cp = cohesion_coupling_losses(masks, torch.tensor([1, 1, 1]), 3)
    assert l_cp.item() == 0 and l_ch.item() > 0


def test_identical_class_masks_and_disjoint_classes_reach_the_optimum():
    a, b = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.5, 0.5])
    masks = [torch.stack([a, a, b, b])]
    l_ch, l_cp = cohesion_coupling_losses(masks, torch.tensor([0, 0, 1, 1]), 2)
    assert l_ch.item() == pytest.approx(0.0, abs=1e-7) and l_cp.item() == pytest.approx(0.0, abs=1e-7)


def test_objective_backpropagates_into_masks():
    masks = [m.float().requires_grad_() for m in random_masks(8, [5, 6], zero_fraction=0)]
    logits = torch.randn(8, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    total, parts = modular_objective(logits, labels, masks, labels, alpha=0.5, beta=1.5)
    expected = parts["ce_loss"] + 0.5 * parts["cohesion_loss"] + 1.5 * parts["coupling_loss"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks)
