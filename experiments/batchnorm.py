"""Batch normalization on MNIST, in the setting of Ioffe & Szegedy (2015, section 4.1), over several seeds.

Claim checked: with batch normalization a network of 3 fully connected hidden layers of 100
sigmoid units (batch 60, plain SGD) reaches a higher held-out accuracy sooner than the same network
without it. Within a seed both runs share the initial weights (``W``; the network without BN adds
zero biases, the one with BN ``γ = 1``, ``β = 0``), the learning rate and the batch order; seed
``s`` (``--seed`` and up) draws both from ``PRNGKey(s)``. Measured per seed: the held-out accuracy after
the first epoch, the steps until it first reaches ``LEVEL``, its mean over the last ``TAIL`` epochs, and the
share of the evaluations of the second half of training in which BN is ahead; the
conclusion gives each difference (with BN minus without) over the seeds, and calls BN better on a
measure only where it is better in every seed.

Departures from the paper, which trained for 50,000 steps on the 60,000 MNIST training images
from small random Gaussian weights: here ``--epochs`` (30) epochs of the 8,000 training images of
``mnist-10k`` (134 steps each, 4,020 in all), fnn's ``xavier_normal`` initialization
(``W ~ N(0, 1/n_in)``, biases 0), and the held-out accuracy on the other 2,000 images.
"""

import common  # first: puts the repository on sys.path
from common import conclude, parse_args, pyplot, save_figure, save_json

# isort: split
import jax
import numpy as np

import fnn

BATCH = 60
LEVEL = 0.9
TAIL = 5
SEEDS = 4
NAMES = ("without BN", "with BN")


def _extra(p):
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate, the same for both networks")
    p.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds S … S+N−1 for --seed S (default {SEEDS})")


def run(net, seed, x, y, held_out, epochs, lr):
    """Train with SGD, batch 60, from seed ``seed``; held-out accuracy after every epoch (a list) and
    why training stopped early (``None`` if it did not)."""
    init_key, order_key = jax.random.split(jax.random.PRNGKey(seed))
    result = fnn.fit(net, net.init(init_key), fnn.optim.sgd(learning_rate=lr), (x, y),
                     loss=fnn.losses.softmax_cross_entropy, epochs=epochs, batch_size=BATCH, key=order_key,
                     held_out=held_out, quiet=True)
    return [r["held_out_accuracy"] for r in result.history], result.stopped


def spread(values) -> dict:
    """``{"mean", "min", "max"}`` over seeds; ``None`` (level never reached) counts as ``inf``."""
    v = np.array([np.inf if a is None else a for a in values], float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def main(argv=None) -> dict:
    args = parse_args("batchnorm", __doc__.splitlines()[0], argv, _extra)
    ds = fnn.data.load_dataset("mnist-10k", args.data_dir)
    x, y, xt, yt = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    epochs, seeds = args.epochs, args.seeds
    if args.quick:
        x, y, xt, yt, epochs, seeds = x[:1200], y[:1200], xt[:300], yt[:300], 2, 2
    steps_per_epoch = -(-len(x) // BATCH)
    steps = [steps_per_epoch * (e + 1) for e in range(epochs)]
    tail = min(TAIL, epochs)
    nets = {name: fnn.MLP((784, 100, 100, 100, 10), "sigmoid", init="xavier_normal", batch_norm=bn)
            for name, bn in zip(NAMES, (False, True))}
    curves, stopped = {name: [] for name in NAMES}, {name: [] for name in NAMES}
    for seed in common.seeds(args, seeds):
        for name, net in nets.items():
            curve, why = run(net, seed, x, y, (xt, yt), epochs, args.lr)
            curves[name].append(curve)
            stopped[name].append(why)

    def first_reaching(curve):
        return next((s for s, a in zip(steps, curve) if a >= LEVEL), None)

    # Single evaluations fluctuate (SGD at a large rate, and eval mode's running statistics), so the
    # comparison uses the first epoch, the steps to a fixed level and the mean of the last epochs.
    per_seed = {name: {"after_first_epoch": [c[0] for c in curves[name]],
                       "steps_to_level": [first_reaching(c) for c in curves[name]],
                       "mean_last_epochs": [float(np.mean(c[-tail:])) for c in curves[name]],
                       "best": [max(c) for c in curves[name]]} for name in NAMES}
    with_bn, without = per_seed["with BN"], per_seed["without BN"]
    difference = {  # with BN minus without, per seed; for the steps, None where either never got there
        "after_first_epoch": [a - b for a, b in zip(with_bn["after_first_epoch"], without["after_first_epoch"])],
        "mean_last_epochs": [a - b for a, b in zip(with_bn["mean_last_epochs"], without["mean_last_epochs"])],
        "steps_to_level": [None if a is None or b is None else a - b
                           for a, b in zip(with_bn["steps_to_level"], without["steps_to_level"])],
    }
    gap = np.asarray(curves["with BN"]) - np.asarray(curves["without BN"])  # (seeds, epochs)
    sooner = [a is not None and (b is None or a < b)
              for a, b in zip(with_bn["steps_to_level"], without["steps_to_level"])]
    findings = {"higher_after_first_epoch_every_seed": min(difference["after_first_epoch"]) > 0,
                "higher_at_end_every_seed": min(difference["mean_last_epochs"]) > 0,
                "lower_at_end_every_seed": max(difference["mean_last_epochs"]) < 0,
                "sooner_every_seed": all(sooner), "sooner_seeds": int(sum(sooner)),
                "higher_share_second_half": float(np.mean(gap[:, epochs // 2:] > 0))}
    results = {
        "seeds": common.seeds(args, seeds), "steps": steps, "accuracy": curves, "lr": args.lr, "batch": BATCH,
        "epochs": epochs, "train_images": len(x), "held_out_images": len(xt), "stopped": stopped, "level": LEVEL,
        "last_epochs": tail, "per_seed": per_seed,
        "summary": {name: {k: spread(v) for k, v in m.items()} for name, m in per_seed.items()},
        "difference": difference,
        "difference_summary": {k: spread(v) for k, v in difference.items() if None not in v},
        "findings": findings,
    }

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    for i, name in enumerate(NAMES):
        c = 100 * np.asarray(curves[name])
        for row in c:
            ax.plot(steps, row, "-", color=f"C{i}", lw=0.7, alpha=0.45)
        ax.plot(steps, c.mean(0), "o-", ms=3, color=f"C{i}", lw=1.8,
                label=f"{name}: mean of {seeds} seeds (thin: each)")
    ax.axhline(100 * LEVEL, color="grey", lw=0.8, ls=":")
    ax.set(xlabel=f"training steps (batch {BATCH})", ylabel="held-out accuracy (%)",
           ylim=(max(0, ax.get_ylim()[0]), 100),
           title=f"(a) 784-100-100-100-10 sigmoid, SGD η = {args.lr}, {len(x):,} mnist-10k images")
    ax.legend(fontsize=8)
    ax = axes[1]
    for s, row in enumerate(100 * gap):
        ax.plot(steps, row, "o-", ms=2.5, lw=1, label=f"seed {s}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel=f"training steps (batch {BATCH})", ylabel="with BN − without (points; log beyond ±2)",
           yscale="symlog",
           title=f"(b) BN's advantage per seed; mean of the last {tail} epochs "
                 f"{100 * min(difference['mean_last_epochs']):+.1f} to "
                 f"{100 * max(difference['mean_last_epochs']):+.1f}")
    ax.legend(fontsize=8)
    save_figure(args, fig)
    save_json(args, results)
    conclude(args, describe(results))
    return results


def _points(s: dict) -> str:
    return f"{100 * s['mean']:+.2f} [{100 * s['min']:+.2f} to {100 * s['max']:+.2f}]"


def describe(r: dict) -> str:
    """The conclusion, in words, from the results ``r``."""
    m, d, f, steps = r["summary"], r["difference_summary"], r["findings"], r["steps"]

    def acc(name, key):
        s = m[name][key]
        return f"{100 * s['mean']:.2f} % [{100 * s['min']:.2f}–{100 * s['max']:.2f}]"

    level = r["per_seed"]
    text = (f"{len(r['seeds'])} seeds, mean [min–max]. After one epoch ({steps[0]} steps): with BN "
            f"{acc('with BN', 'after_first_epoch')}, without {acc('without BN', 'after_first_epoch')}; "
            f"{100 * r['level']:.0f} % first reached after " + ", ".join(
                f"{'/'.join('never' if v is None else str(v) for v in level[n]['steps_to_level'])} steps {n}"
                for n in ("with BN", "without BN"))
            + f" (seeds {r['seeds'][0]}–{r['seeds'][-1]}); mean of the last {r['last_epochs']} epochs "
            f"(to {steps[-1]:,} "
            f"steps): with BN {acc('with BN', 'mean_last_epochs')}, without {acc('without BN', 'mean_last_epochs')}. "
            f"With BN minus without, in points: after one epoch {_points(d['after_first_epoch'])}, at the end "
            f"{_points(d['mean_last_epochs'])}. ")
    text += ("BN higher at the end in every seed" if f["higher_at_end_every_seed"] else
             "BN lower at the end in every seed" if f["lower_at_end_every_seed"] else
             "BN not higher at the end in every seed")
    return text + (f"; sooner to {100 * r['level']:.0f} % in {f['sooner_seeds']} of {len(r['seeds'])} seeds; higher "
                   f"in {100 * f['higher_share_second_half']:.0f} % of the evaluations (seed × epoch) of the second "
                   f"half of training.")


if __name__ == "__main__":
    main()
