"""Batch normalization on MNIST, in the setting of Ioffe & Szegedy (2015, section 4.1).

Claim checked: with batch normalization a network of 3 fully connected hidden layers of 100
sigmoid units (batch 60, plain SGD) reaches a higher held-out accuracy sooner than the same network
without it. Both runs share the initial weights, the learning rate and the batch order.
"""

from common import conclude, parse_args, pyplot, save_figure, save_json  # first: puts the repository on sys.path

# isort: split
import jax
import numpy as np

import fnn


def _extra(p):
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate, the same for both networks")


def run(net, x, y, held_out, epochs, lr):
    """Train with SGD, batch 60; held-out accuracy after every epoch (a list) and the steps per epoch."""
    params = net.init(jax.random.PRNGKey(0))
    result = fnn.fit(net, params, fnn.optim.sgd(learning_rate=lr), (x, y), loss=fnn.losses.softmax_cross_entropy,
                     epochs=epochs, batch_size=60, key=jax.random.PRNGKey(1), held_out=held_out, quiet=True)
    return [r["held_out_accuracy"] for r in result.history], result.stopped


def main(argv=None) -> dict:
    args = parse_args("batchnorm", __doc__, argv, _extra)
    ds = fnn.data.load_dataset("mnist-10k", args.data_dir)
    x, y, xt, yt = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    epochs = args.epochs
    if args.quick:
        x, y, xt, yt, epochs = x[:1200], y[:1200], xt[:300], yt[:300], 2
    steps_per_epoch = -(-len(x) // 60)
    curves, stopped = {}, {}
    for name, bn in (("without BN", False), ("with BN", True)):
        net = fnn.MLP((784, 100, 100, 100, 10), "sigmoid", init="xavier_normal", batch_norm=bn)
        curves[name], stopped[name] = run(net, x, y, (xt, yt), epochs, args.lr)
    steps = [steps_per_epoch * (e + 1) for e in range(epochs)]

    def first_reaching(curve, level):
        return next((s for s, a in zip(steps, curve) if a >= level), None)

    # Single evaluations fluctuate (SGD at a large rate, and eval mode's running statistics), so the
    # comparison uses the first epoch, the steps to a fixed level and the mean of the last 5 epochs.
    level = 0.9
    tail = min(5, epochs)
    results = {
        "steps": steps, "accuracy": curves, "lr": args.lr, "batch": 60, "stopped": stopped,
        "after_first_epoch": {k: c[0] for k, c in curves.items()},
        "mean_last_epochs": {k: float(np.mean(c[-tail:])) for k, c in curves.items()}, "last_epochs": tail,
        "best": {k: max(c) for k, c in curves.items()},
        "level": level, "steps_to_level": {k: first_reaching(c, level) for k, c in curves.items()},
    }
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(steps, [100 * a for a in c], "o-", ms=3, label=name)
    ax.axhline(100 * level, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="training steps (batch 60)", ylabel="held-out accuracy (%)",
           title="784-100-100-100-10 sigmoid, SGD, mnist-10k")
    ax.legend()
    save_figure(args, fig)
    save_json(args, results)
    with_bn, without = results["steps_to_level"]["with BN"], results["steps_to_level"]["without BN"]
    sooner = with_bn is not None and (without is None or with_bn < without)
    higher = results["mean_last_epochs"]["with BN"] > results["mean_last_epochs"]["without BN"]
    m, f = results["mean_last_epochs"], results["after_first_epoch"]
    conclude(args, (
        f"after one epoch ({steps[0]} steps) held-out accuracy is {100 * f['with BN']:.1f}% with BN and "
        f"{100 * f['without BN']:.1f}% without; {100 * level:.0f}% is first reached after {with_bn} steps with BN "
        f"and {without} without; the mean over the last {tail} epochs (to {steps[-1]} steps) is "
        f"{100 * m['with BN']:.2f}% with BN and {100 * m['without BN']:.2f}% without. "
        f"Sooner: {'yes' if sooner else 'no'}; higher at the end: {'yes' if higher else 'no'}."))
    return results


if __name__ == "__main__":
    main()
