"""MNIST end to end: a 784-256-10 network on real handwritten digits, its curves and its mistakes.

``mnist-10k`` is the real 10,000-image MNIST test set, split 8,000 for training and the last 2,000
held out (the harder half of the set, see :mod:`fnn.data`). Inputs ``x (N, 784)`` are z-scored with
per-pixel mean and standard deviation fitted on the training split only; the network is
``784-256-10`` (relu hidden layer, identity output), trained on the softmax cross-entropy
``C = −(1/N) Σ_x log softmax(z^L)_y`` with Adam (``α = 10⁻³``, ``B = 128``, reshuffled every
epoch) through :func:`fnn.fit` with the manual backprop. The held-out split is evaluated after
every epoch; the figure shows the training curves and a grid of misclassified held-out digits with
their true and predicted labels; the JSON has the history, the confusion matrix and the final
held-out accuracy.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn

SIZES = (784, 256, 10)
GRID = (4, 8)  # rows, columns of misclassified digits shown


def main(argv=None) -> dict:
    """Run the experiment (``argv``: the command line); returns the results written to the JSON."""
    args = common.parse_args("mnist", __doc__.splitlines()[0], argv)
    epochs = 2 if args.quick else 10
    x_train, y_train, x_test, y_test, data = common.mnist_10k(args, quick_rows=4096)

    net = fnn.MLP(SIZES, "relu", "identity")
    loss = fnn.losses.softmax_cross_entropy
    params = net.init(jax.random.PRNGKey(args.seed), jnp.float32)
    result = fnn.fit(net, params, fnn.optim.adam(1e-3), (x_train, y_train), loss=loss, epochs=epochs,
                     batch_size=128, key=jax.random.PRNGKey(args.seed + 1), held_out=(x_test, y_test), quiet=True)
    hist = result.history

    logits = np.asarray(jax.jit(net.apply)(result.params, x_test))  # (2000, 10)
    predicted, truth = logits.argmax(axis=1), np.asarray(data.y_test)
    accuracy = float(np.mean(predicted == truth))
    confusion = np.zeros((10, 10), np.int64)  # rows: true label, columns: predicted
    np.add.at(confusion, (truth, predicted), 1)
    wrong = np.flatnonzero(predicted != truth)
    off_diagonal = confusion - np.diag(np.diag(confusion))
    pair = np.unravel_index(np.argmax(off_diagonal), off_diagonal.shape)
    per_class = np.diag(confusion) / confusion.sum(axis=1)
    train_scores = fnn.evaluate(net, result.params, x_train, y_train, loss)

    plt = common.pyplot()
    rows, cols = GRID
    fig = plt.figure(figsize=(14, 5.6))
    grid = fig.add_gridspec(rows, 3 + cols)
    a = fig.add_subplot(grid[: rows // 2, :3])
    epochs_axis = [r["epoch"] for r in hist]
    a.semilogy(epochs_axis, [r["train_loss"] for r in hist], "o-", label="train (mean over the epoch)")
    a.semilogy(epochs_axis, [r["held_out_loss"] for r in hist], "s-", label="held out (after the epoch)")
    a.set(ylabel="softmax cross-entropy", title=f"{'-'.join(map(str, SIZES))} relu, Adam 1e-3, B = 128")
    a.legend(fontsize=8)
    a = fig.add_subplot(grid[rows // 2:, :3])
    a.plot(epochs_axis, [100 * r["held_out_accuracy"] for r in hist], "s-", color="C1")
    a.set(xlabel="epoch", ylabel="held-out accuracy (%)", title=f"final: {100 * accuracy:.2f} % of 2,000")
    images = np.asarray(data.x_test)
    for k in range(rows * cols):
        a = fig.add_subplot(grid[k // cols, 3 + k % cols])
        a.set_axis_off()
        if k < wrong.size:
            i = wrong[k]
            a.imshow(images[i].reshape(28, 28), cmap="gray_r")
            a.set_title(f"true {truth[i]} → {predicted[i]}", fontsize=8, color="C3")
    fig.suptitle(f"mnist-10k: {wrong.size} of {truth.size} held-out digits misclassified "
                 f"(the first {min(wrong.size, rows * cols)} shown)", fontsize=11)
    common.save_figure(args, fig)

    results = {
        "sizes": SIZES,
        "epochs": epochs,
        "history": hist,
        "final_held_out_accuracy": accuracy,
        "final_train_accuracy": train_scores["accuracy"],
        "misclassified": int(wrong.size),
        "misclassified_indices_shown": wrong[: rows * cols],
        "confusion": confusion,
        "per_class_accuracy": per_class,
        "most_confused": {"true": int(pair[0]), "predicted": int(pair[1]), "count": int(off_diagonal[pair])},
        "training_seconds": sum(r["seconds"] for r in hist),
        "stopped": result.stopped,
    }
    common.save_json(args, results)
    worst = int(np.argmin(per_class))
    best_epoch = max(hist, key=lambda r: r["held_out_accuracy"])
    lowest = min(hist, key=lambda r: r["held_out_loss"])
    common.conclude(args, (
        f"after {epochs} epochs ({results['training_seconds']:.1f} s of training) the held-out accuracy is "
        f"{100 * accuracy:.2f} % ({wrong.size} of {truth.size} wrong; best epoch {best_epoch['epoch']}: "
        f"{100 * best_epoch['held_out_accuracy']:.2f} %), train accuracy {100 * train_scores['accuracy']:.2f} %, "
        f"held-out loss {hist[-1]['held_out_loss']:.4f} (lowest {lowest['held_out_loss']:.4f} at epoch "
        f"{lowest['epoch']}) against train loss {hist[-1]['train_loss']:.4f}; "
        f"hardest digit {worst} ({100 * per_class[worst]:.1f} %), most frequent confusion "
        f"{pair[0]} → {pair[1]} ({off_diagonal[pair]} times)."
    ))
    return results


if __name__ == "__main__":
    main()
