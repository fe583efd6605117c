"""Plots the notebooks share: loss curves from `train()` histories, and saving figures."""
import pathlib

import matplotlib.pyplot as plt


def plot_loss_curves(histories, title="Loss", x="step", show_train=True, ax=None):
    """Validation (solid) and training (dashed) loss of one or more runs on one axes.

    histories: {run name: history dict returned by utils.train.train}
    x: "step" or "tokens_seen" for the horizontal axis.
    """
    if x not in ("step", "tokens_seen"):
        raise ValueError(f"x must be 'step' or 'tokens_seen', got {x!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        ax.plot(h[x], h["val_loss"], color=color, marker="o", markersize=3, label=f"{name} (val)")
        if show_train:
            # train_loss[0] is NaN (nothing trained yet at step 0); matplotlib leaves it out.
            ax.plot(h[x], h["train_loss"], color=color, linestyle="--", alpha=0.7, label=f"{name} (train)")
    ax.set_xlabel("optimizer step" if x == "step" else "tokens seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def save_figure(fig, path, dpi=120):
    """Save `fig` as PNG (creating the folder) and return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path
