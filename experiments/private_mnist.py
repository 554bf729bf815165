"""Differentially private training on MNIST: held-out accuracy against the privacy budget ε.

Claim checked (Abadi, Chu, Goodfellow et al., "Deep learning with differential privacy", CCS 2016,
§5.2 and fig. 4): DP-SGD trains a useful MNIST classifier at a modest privacy cost; with one hidden
layer of 1,000 ReLU units, lots of 600, clip 4 and δ = 10⁻⁵ they report about 90 %, 95 % and 97 %
test accuracy at ε = 0.5, 2 and 8, with noise multipliers σ = 8, 4 and 2 (full MNIST, 60,000 training
images, PCA to 60 dimensions).

Setting here: the same network, lot size, clip, δ and σ per ε on mnist-10k (8,000 training images,
the last 2,000 held out), SGD, epochs of ``round(N/L) = 13`` Poisson-lot steps; each ε gets as many
whole epochs as its σ allows (:func:`fnn.privacy.privacy_spent` of the run at most the target). The
inputs are standardized with constants, not with statistics of the private images (which would be a
release the budget does not count): the mean 0.1307 and standard deviation 0.3081 of the pixel
intensities of MNIST's 60,000 training images, a public data set disjoint from mnist-10k. A
non-private run of the same network and optimizer (shuffled batches of 600) runs as many steps as the
longest private one, and its held-out accuracy is read after the epoch closest to each private run's
step count. Every setting over ``--seeds`` seeds from ``--seed``.

Departures: no PCA (Abadi et al. compute a differentially private PCA and spend part of ε on it; fnn
does not implement DP-PCA); 8,000 instead of 60,000 images, so the sampling rate q = L/N is 7.5× the
paper's, and each step spends more privacy: at the paper's σ the same ε buys fewer steps (a few
hundred to about 1,500 here); a fixed learning rate, not the paper's decaying one; no tuning per ε
(tuning on the private data would itself not be accounted).
"""

import common  # first: puts the repository on sys.path
from common import conclude, parse_args, pyplot, save_figure, save_json

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn
from fnn import privacy

LOT, CLIP, DELTA = 600, 4.0, 1e-5
PAPER = {0.5: (8.0, 0.90), 2.0: (4.0, 0.95), 8.0: (2.0, 0.97)}
"""Target ε -> (the paper's σ, its reported test accuracy)."""
PUBLIC_MEAN, PUBLIC_STD = 0.1307, 0.3081
"""Pixel mean and standard deviation of MNIST's 60,000 training images (intensities in [0, 1])."""
QUICK_ROWS, QUICK_EPOCHS = 1800, 2


def _extra(p):
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")


def epochs_allowed(target: float, sigma: float, q: float, steps_per_epoch: int) -> int:
    """The most whole epochs whose ``steps_per_epoch``-step epochs at ``(q, σ)`` spend at most ``target``."""
    epochs = 1
    while privacy.privacy_spent(q, sigma, (epochs + 1) * steps_per_epoch, DELTA) <= target:
        epochs += 1
    return epochs


def run(x, y, held_out, epochs: int, seed: int, lr: float, sigma) -> dict:
    """One training run (``sigma=None``: not private); its held-out accuracy per epoch, ε and σ."""
    net = fnn.MLP((784, 1000, 10), "relu", init="he_normal")
    settings = None if sigma is None else privacy.Privacy(clip=CLIP, lot_size=LOT, noise_multiplier=sigma, delta=DELTA)
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))  # run_key: the lots and the noise
    result = fnn.fit(net, net.init(init_key), fnn.optim.sgd(lr), (x, y),
                     loss=fnn.losses.softmax_cross_entropy, epochs=epochs, batch_size=LOT,
                     key=run_key, held_out=held_out, privacy=settings, quiet=True)
    if result.stopped:
        raise RuntimeError(result.stopped)
    last = result.history[-1]
    return {"curve": [r["held_out_accuracy"] for r in result.history], "epsilon": last.get("epsilon"),
            "noise_multiplier": last.get("noise_multiplier")}


def main(argv=None) -> dict:
    args = parse_args("private_mnist", __doc__, argv, _extra)
    raw = fnn.data.load_dataset("mnist-10k", args.data_dir)
    x, xt = ((jnp.asarray(v, jnp.float32) - PUBLIC_MEAN) / PUBLIC_STD for v in (raw.x_train, raw.x_test))
    y, yt = jnp.asarray(raw.y_train), jnp.asarray(raw.y_test)
    if args.quick:
        x, y = x[:QUICK_ROWS], y[:QUICK_ROWS]
    n, seeds = len(x), 1 if args.quick else args.seeds
    q, per_epoch = LOT / n, round(n / LOT)
    plain_per_epoch = -(-n // LOT)  # shuffled batches of 600, the last one smaller
    epochs = {t: QUICK_EPOCHS if args.quick else epochs_allowed(t, sigma, q, per_epoch)
              for t, (sigma, _) in PAPER.items()}
    longest = max(epochs.values()) * per_epoch
    plain_epochs = round(longest / plain_per_epoch)
    private = {str(t): [run(x, y, (xt, yt), epochs[t], s, args.lr, PAPER[t][0]) for s in common.seeds(args, seeds)]
               for t in PAPER}
    plain = [run(x, y, (xt, yt), plain_epochs, s, args.lr, None) for s in common.seeds(args, seeds)]

    rows = {}
    for t, rs in private.items():
        steps = epochs[float(t)] * per_epoch
        at = min(max(1, round(steps / plain_per_epoch)), plain_epochs)  # the plain run's epoch closest to it
        acc = np.array([r["curve"][-1] for r in rs])
        plain_acc = np.array([r["curve"][at - 1] for r in plain])
        rows[t] = {"sigma": PAPER[float(t)][0], "epochs": epochs[float(t)], "steps": steps,
                   "epsilon": rs[0]["epsilon"], "accuracy": acc, "mean": float(acc.mean()),
                   "range": [float(acc.min()), float(acc.max())], "paper": PAPER[float(t)][1],
                   "plain_steps": at * plain_per_epoch, "plain_mean": float(plain_acc.mean()),
                   "plain_range": [float(plain_acc.min()), float(plain_acc.max())],
                   "gain_last_epoch": float(np.mean([r["curve"][-1] - r["curve"][-2] for r in rs]))
                   if epochs[float(t)] > 1 else 0.0}
    means = [rows[t]["mean"] for t in rows]
    results = {
        "n": n, "seeds": seeds, "lot": LOT, "clip": CLIP, "delta": DELTA, "lr": args.lr, "q": q,
        "steps_per_epoch": per_epoch, "plain_steps_per_epoch": plain_per_epoch, "plain_epochs": plain_epochs,
        "normalization": {"mean": PUBLIC_MEAN, "std": PUBLIC_STD}, "rows": rows,
        "curves": {t: [r["curve"] for r in rs] for t, rs in private.items()},
        "plain_curves": [r["curve"] for r in plain],
        "monotone_in_epsilon": bool(all(a < b for a, b in zip(means, means[1:]))),
        "below_paper": {t: r["range"][1] < r["paper"] for t, r in rows.items()},
        "below_plain": {t: r["range"][1] < r["plain_range"][0] for t, r in rows.items()},
    }

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    eps = np.array(list(PAPER))
    low = [100 * (r["mean"] - r["range"][0]) for r in rows.values()]
    high = [100 * (r["range"][1] - r["mean"]) for r in rows.values()]
    ax1.errorbar(eps, [100 * m for m in means], yerr=[low, high], fmt="o-", capsize=3,
                 label=f"DP-SGD, mnist-10k (N = {n:,}), {seeds} seeds: mean, range")
    ax1.plot(eps, [100 * r["plain_mean"] for r in rows.values()], "^:", color="C2",
             label="not private, the same number of steps")
    ax1.plot(eps, [100 * r["paper"] for r in rows.values()], "s--", color="grey",
             label="Abadi et al. 2016, full MNIST (N = 60,000), PCA 60")
    ax1.set(xscale="log", xlabel="ε (δ = 1e-5); σ = 8, 4, 2 as in the paper", ylabel="held-out accuracy (%)",
            xticks=eps, xticklabels=[f"{e:g}" for e in eps], title="accuracy against the privacy budget")
    ax1.xaxis.set_minor_locator(plt.NullLocator())
    ax1.legend(fontsize=8)
    for i, (t, r) in enumerate(rows.items()):
        curve = 100 * np.array(results["curves"][t]).mean(0)
        ax2.plot(per_epoch * np.arange(1, len(curve) + 1), curve, color=f"C{i}", label=f"ε = {t}, σ = {r['sigma']:g}")
    plain_curve = 100 * np.array(results["plain_curves"]).mean(0)
    ax2.plot(plain_per_epoch * np.arange(1, len(plain_curve) + 1), plain_curve, color="C3", ls=":",
             label="not private")
    ax2.set(xlabel=f"step (lots of {LOT} expected, q = {q:.3f}; {per_epoch} per epoch)",
            ylabel="held-out accuracy (%)", title="training curves (mean over seeds)")
    ax2.legend(fontsize=8)
    save_figure(args, fig)
    save_json(args, results)
    conclude(args, describe(results))
    return results


def describe(r: dict) -> str:
    """The conclusion, from the rows."""
    parts = [f"ε = {t} (σ = {v['sigma']:g}, {v['steps']} steps, ε spent {v['epsilon']:.3f}): "
             f"{100 * v['mean']:.2f} % [{100 * v['range'][0]:.2f}–{100 * v['range'][1]:.2f}] against "
             f"{100 * v['plain_mean']:.2f} % without privacy after {v['plain_steps']} steps; paper "
             f"{100 * v['paper']:.0f} %" for t, v in r["rows"].items()]
    below = [t for t, b in r["below_paper"].items() if b]
    return ("; ".join(parts) + ". Accuracy " + ("rises" if r["monotone_in_epsilon"] else "does not rise")
            + " with ε at every step; every seed below the paper's figure at ε = " + (", ".join(below) or "none")
            + "; every private seed below every non-private one at ε = "
            + (", ".join(t for t, b in r["below_plain"].items() if b) or "none") + ".")


if __name__ == "__main__":
    main()
