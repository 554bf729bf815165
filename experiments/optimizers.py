"""Optimizer comparison on MNIST: SGD, momentum, Nesterov, AdaGrad, RMSProp and Adam on one MLP.

In the spirit of Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015, Fig. 2
(multilayer network on MNIST): the network ``784-1000-1000-10`` with ReLU hidden units and He
initialization, softmax cross-entropy, mini-batches of 128 from the 8,000 training images of
``mnist-10k`` (z-scored), gradients from the manual backprop. Every optimizer starts from the
same initial parameters and sees the same batches in the same order; the training loss of each
mini-batch (before its update) is recorded at every iteration. The learning rates were chosen by
a 2-epoch pilot on a grid of 3–4 rates per optimizer (see ``experiments/README.md``); they are
the ``RATES`` below. Without an MNIST directory the script falls back to scikit-learn's digits.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn

RATES = {  # name -> (optimizer, learning rate α); momentum ρ = 0.9, Adam β = (0.9, 0.999)
    "SGD": (fnn.optim.sgd, 0.3),
    "momentum": (fnn.optim.momentum, 0.03),
    "Nesterov": (fnn.optim.nesterov, 0.03),
    "AdaGrad": (fnn.optim.adagrad, 0.003),
    "RMSProp": (fnn.optim.rmsprop, 3e-4),
    "Adam": (fnn.optim.adam, 1e-3),
}
LOSS = fnn.losses.softmax_cross_entropy
BATCH = 128
SMOOTH = 10
"""Iterations in the moving average drawn over the raw mini-batch losses."""
THRESHOLD = 0.05
"""The speed measure: the first iteration at which the ``SMOOTH``-iteration mean loss is ≤ this."""


def load(args, quick: bool):
    """``(x_train, y_train, x_test, y_test, name)``: z-scored float32 inputs, int32 labels."""
    try:
        data = fnn.data.load_dataset("mnist-10k", args.data_dir)
    except fnn.data.DataError as e:
        print(f"[{args.name}] no MNIST ({e}); using scikit-learn's digits instead")
        data = fnn.data.load_dataset("digits")
    if quick:
        data = data._replace(x_train=data.x_train[:1024], y_train=data.y_train[:1024])
    data, _ = fnn.data.zscore_dataset(data)
    return (*(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test)), data.name)


def make_epoch(net: fnn.MLP, opt: fnn.optim.GradientTransformation):
    """A jitted ``(params, state, x, y, batches (B, BATCH)) -> ((params, state), costs (B,))``.

    One ``lax.scan`` over the rows of ``batches`` (sample indices): cost and gradients by the manual
    backprop, then the optimizer's update ``θ ← θ + u``.
    """

    def epoch(params, state, x, y, batches):
        def step(carry, idx):
            params, state = carry
            r = fnn.train_step(net, opt, params, state, x[idx], y[idx], LOSS)
            return (r.params, r.opt_state), r.cost

        return jax.lax.scan(step, (params, state), batches)

    return jax.jit(epoch)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each ``window`` consecutive values (``len(values) − window + 1`` of them)."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main(argv=None) -> dict:
    args = common.parse_args("optimizers", __doc__.splitlines()[0], argv)
    hidden, epochs = ((64, 64), 2) if args.quick else ((1000, 1000), 5)
    x, y, x_test, y_test, dataset = load(args, args.quick)
    net = fnn.MLP((x.shape[1], *hidden, 10), "relu", "identity", init="he_normal")
    initial = net.init(jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)  # one batch order, shared by every optimizer
    per_epoch = x.shape[0] // BATCH
    order = [jnp.asarray(rng.permutation(x.shape[0])[: per_epoch * BATCH].reshape(per_epoch, BATCH))
             for _ in range(epochs)]

    runs = {}
    for name, (make_opt, rate) in RATES.items():
        opt = make_opt(rate)
        epoch = make_epoch(net, opt)
        params, state, costs = initial, opt.init(initial), []
        for batches in order:
            (params, state), c = epoch(params, state, x, y, batches)
            costs.append(np.asarray(c))
        costs = np.concatenate(costs)
        train = fnn.evaluate(net, params, x, y, LOSS)
        test = fnn.evaluate(net, params, x_test, y_test, LOSS)
        smooth = moving_average(costs, SMOOTH)
        below = np.flatnonzero(smooth <= THRESHOLD)
        runs[name] = {
            "learning_rate": rate, "costs": costs, "final_train_loss": train["loss"],
            "last_epoch_mean_batch_loss": float(costs[-per_epoch:].mean()),
            "held_out_accuracy": test["accuracy"], "diverged": bool(not np.all(np.isfinite(costs))),
            "iterations_to_threshold": int(below[0] + SMOOTH) if below.size else None,
        }
        print(f"[{args.name}] {name:9s} α={rate:g}: training loss {train['loss']:.4f}, "
              f"held-out accuracy {100 * test['accuracy']:.2f}%")

    ranking = sorted(runs, key=lambda n: runs[n]["final_train_loss"] if not runs[n]["diverged"] else np.inf)
    iterations = epochs * per_epoch

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    for i, (name, r) in enumerate(runs.items()):
        ax.plot(np.arange(1, iterations + 1), r["costs"], color=f"C{i}", lw=0.6, alpha=0.3)
        ax.plot(np.arange(SMOOTH, iterations + 1), moving_average(r["costs"], SMOOTH), color=f"C{i}", lw=2,
                label=f"{name} (α={r['learning_rate']:g})")
    ax.set(yscale="log", xlabel=f"iteration (mini-batch of {BATCH})", ylabel="training cost (mini-batch)",
           title=f"(a) {dataset}, {'-'.join(map(str, net.sizes))} ReLU: mini-batch loss "
                 f"(thin) and its {SMOOTH}-iteration mean")
    ax.legend(fontsize=9)
    ax = axes[1]
    names = list(runs)
    ax.bar(names, [runs[n]["final_train_loss"] for n in names], color=[f"C{i}" for i in range(len(names))])
    for i, n in enumerate(names):
        ax.text(i, runs[n]["final_train_loss"], f"{100 * runs[n]['held_out_accuracy']:.1f}%", ha="center",
                va="bottom", fontsize=8)
    ax.set(ylabel=f"loss on all {x.shape[0]} training images",
           title=f"(b) after {iterations} iterations (labels: held-out accuracy)")
    ax.tick_params(axis="x", rotation=30)
    common.save_figure(args, fig)

    results = {"dataset": dataset, "sizes": list(net.sizes), "batch_size": BATCH, "epochs": epochs,
               "threshold": THRESHOLD,
               "iterations": iterations, "runs": runs, "ranking": ranking}
    common.save_json(args, results)
    best, second = runs[ranking[0]], runs[ranking[1]]
    reached = {n: r["iterations_to_threshold"] for n, r in runs.items()}
    common.conclude(
        args,
        f"{ranking[0]} reached the lowest training loss after {iterations} iterations: "
        f"{best['final_train_loss']:.4f} (next {ranking[1]} {second['final_train_loss']:.4f}); order: "
        + ", ".join(f"{n} {runs[n]['final_train_loss']:.4f}" for n in ranking)
        + f"; iterations until the {SMOOTH}-iteration mean loss ≤ {THRESHOLD}: "
        + ", ".join(f"{n} {'never' if it is None else it}" for n, it in reached.items())
        + "; held-out accuracy: " + ", ".join(f"{n} {100 * r['held_out_accuracy']:.1f}%" for n, r in runs.items())
        + ".",
    )
    return results


if __name__ == "__main__":
    main()
