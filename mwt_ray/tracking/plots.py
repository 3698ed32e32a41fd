"""Convergence plot of a training run, like Fig. 5 of the MwT paper.

Fig. 5 follows modular training epoch by epoch: coupling falls, cohesion rises, the kernel rate
(share of kernels a sample activates) falls, and accuracy climbs. ``plot_convergence`` draws those
four panels from the per-epoch metrics ``training.train_epochs`` returns (a standard run has no masks, so
only its accuracy and loss panels are drawn). Uses matplotlib's Agg backend: no display needed.

These are the per-batch metrics (``batch_coupling``, ``batch_cohesion``, ``kernel_rate``: raw
kernel sets, no tau), not the module cohesion measured after modularizing. Histories written
before the rename, with ``coupling`` / ``cohesion`` per epoch, are still drawn.
"""
from __future__ import annotations

from pathlib import Path

from ..core.files import atomic_write

__all__ = ["plot_convergence", "save_figure"]

# (metric keys, newest first, then the names older histories used), title, color
_MODULAR_PANELS = (
    (("batch_coupling", "coupling"), "coupling (per batch)", "C3"),
    (("batch_cohesion", "cohesion"), "cohesion (per batch)", "C2"),
    (("kernel_rate",), "kernel rate", "C0"),
)


def plot_convergence(history: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG with one panel per Fig. 5 curve (x axis: epoch) and return its path."""
    if not history:
        raise ValueError("plot_convergence needs at least one epoch of metrics")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(m.get("epoch", i + 1)) for i, m in enumerate(history)]
    panels = []
    for keys, label, color in _MODULAR_PANELS:
        key = next((k for k in keys if all(k in m for m in history)), None)
        if key is not None:
            panels.append((key, label, color))
    if not panels and all("ce_loss" in m for m in history):  # standard training: show the loss instead
        panels = [("ce_loss", "cross-entropy loss", "C1")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.0), squeeze=False)
    for ax, (key, label, color) in zip(axes[0], panels):
        ax.plot(epochs, [m[key] for m in history], marker="o", markersize=3, color=color)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for key, label, style in (("train_accuracy", "train", "--"), ("test_accuracy", "test", "-")):
        if all(key in m for m in history):
            ax.plot(epochs, [100 * m[key] for m in history], style, marker="o", markersize=3, label=label)
    ax.set_title("accuracy (%)")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path, title, dpi=120)


def save_figure(fig, path: str | Path, title: str | None, dpi: int) -> Path:
    """``fig`` with its title, laid out and written whole (``atomic_write``) to ``path``, then closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=dpi))
    finally:
        plt.close(fig)
