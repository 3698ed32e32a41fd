import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_masks(batch, layer_sizes, zero_fraction=0.3, generator=None):
    """Masks in [0, 1) with exact zeros, like relu(tanh(.)) produces."""
    masks = []
    for k in layer_sizes:
        m = torch.rand(batch, k, dtype=torch.float64, generator=generator)
        m[torch.rand(batch, k, generator=generator) < zero_fraction] = 0
        masks.append(m)
    return masks
