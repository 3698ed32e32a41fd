"""A researcher's own CNN, named to the commands as ``model.name=tests.own_cnn:tiny_cnn``, and the
ways such a name can be wrong (the bad-input tests name the attributes below)."""
import torch
from torch import nn


class TinyCNN(nn.Module):
    """Three conv -> BN -> ReLU units (the last two masked), a global pool and a linear classifier."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def tiny_cnn(num_classes: int) -> nn.Module:
    return TinyCNN(num_classes)


not_callable = 3


def not_a_module(num_classes: int) -> list:
    return [nn.Linear(4, num_classes)]


def raises(num_classes: int) -> nn.Module:
    raise RuntimeError(f"no network for {num_classes} classes")


def wrong_logits(num_classes: int) -> nn.Module:
    """Traces and has conv -> BN units, but gives one logit too many."""
    return TinyCNN(num_classes + 1)


def no_batchnorm(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def computed_widths(num_classes: int) -> nn.Module:
    """Computes its widths with tensors, as RegNet's constructor does: meta tensors cannot give a number."""
    model = TinyCNN(num_classes)
    model.classifier = nn.Linear(int(torch.tensor([4.0]).mul(4).item()), num_classes)
    return model
