"""Learning-curve figures (needs the optional ``plot`` extra: ``pip install 'fnn[plot]'``)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` with a file-only backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'fnn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], path, title: str = "") -> Path:
    """Write a PNG of train/held-out loss and held-out accuracy per epoch; returns the path."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    has_acc = any(r.get("held_out_accuracy") is not None for r in history)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    if any("held_out_loss" in r for r in history):
        ax.plot(epochs, [r.get("held_out_loss") for r in history], "s-", label="held out")
    ax.set(xlabel="epoch", ylabel="loss", yscale="log")
    ax.legend()
    if has_acc:
        axes[0, 1].plot(epochs, [100 * r["held_out_accuracy"] for r in history], "s-", color="C1")
        axes[0, 1].set(xlabel="epoch", ylabel="held-out accuracy (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
