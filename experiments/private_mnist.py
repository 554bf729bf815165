"""Differentially private training on MNIST: held-out accuracy against the privacy budget ε.

Claim checked (Abadi, Chu, Goodfellow et al., "Deep learning with differential privacy", CCS 2016,
§5.2 and fig. 4): DP-SGD trains a useful MNIST classifier at a modest privacy cost; with one hidden
layer of 1,000 ReLU units, lots of 600, clip 4 and δ = 10⁻⁵ they report about 90 %, 95 % and 97 %
test accuracy at ε = 0.5, 2 and 8 (full MNIST, 60,000 training images, PCA to 60 dimensions).

Setting here: the same network, lot size, clip and δ on mnist-10k (8,000 training images, z-scored;
the last 2,000 held out), ``--epochs`` epochs of ``round(N/L) = 13`` Poisson-lot steps, SGD, σ
solved for each target ε over the whole run (:func:`fnn.privacy.noise_multiplier_for`), and a
non-private run of the same network and optimizer (shuffled batches of 600) for reference; every
setting over ``--seeds`` seeds. Departures: no PCA (Abadi et al. compute a differentially private
PCA and spend part of ε on it; the plain network on raw pixels needs no extra budget). With 8,000
instead of 60,000 images the sampling rate q = L/N is 7.5× larger at the same lot size, so each
step costs more privacy and the same ε buys fewer or noisier steps: the accuracies should fall
below the paper's, and the gap should be largest at small ε.
"""

from common import conclude, mnist_10k, parse_args, pyplot, save_figure, save_json  # first: repository on path

# isort: split
import jax
import numpy as np

import fnn
from fnn import privacy

LOT, CLIP, DELTA = 600, 4.0, 1e-5
TARGETS = (0.5, 2.0, 8.0)
PAPER = {0.5: 0.90, 2.0: 0.95, 8.0: 0.97}


def _extra(p):
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")


def run(x, y, held_out, epochs: int, seed: int, lr: float, target) -> dict:
    """One training run (``target=None``: not private); its final held-out accuracy, ε and σ."""
    net = fnn.MLP((784, 1000, 10), "relu", init="he_normal")
    settings = None if target is None else privacy.Privacy(clip=CLIP, lot_size=LOT, target_epsilon=target,
                                                            delta=DELTA)
    result = fnn.fit(net, net.init(jax.random.PRNGKey(seed)), fnn.optim.sgd(lr), (x, y),
                     loss=fnn.losses.softmax_cross_entropy, epochs=epochs, batch_size=LOT,
                     key=jax.random.PRNGKey(100 + seed), held_out=held_out, privacy=settings, quiet=True)
    if result.stopped:
        raise RuntimeError(result.stopped)
    last = result.history[-1]
    return {"accuracy": last["held_out_accuracy"], "curve": [r["held_out_accuracy"] for r in result.history],
            "epsilon": last.get("epsilon"), "noise_multiplier": last.get("noise_multiplier")}


def main(argv=None) -> dict:
    args = parse_args("private_mnist", __doc__, argv, _extra)
    x, y, xt, yt, _ = mnist_10k(args, quick_rows=1800)
    epochs, seeds = (2, 1) if args.quick else (args.epochs, args.seeds)
    settings = [None, *TARGETS]
    runs = {str(t): [run(x, y, (xt, yt), epochs, s, args.lr, t) for s in range(seeds)] for t in settings}
    acc = {t: np.array([r["accuracy"] for r in rs]) for t, rs in runs.items()}
    results = {
        "epochs": epochs, "seeds": seeds, "lot": LOT, "clip": CLIP, "delta": DELTA, "lr": args.lr,
        "q": LOT / len(x), "steps": epochs * round(len(x) / LOT),
        "accuracy": acc, "mean": {t: float(a.mean()) for t, a in acc.items()},
        "range": {t: [float(a.min()), float(a.max())] for t, a in acc.items()},
        "epsilon": {t: rs[0]["epsilon"] for t, rs in runs.items()},
        "noise_multiplier": {t: rs[0]["noise_multiplier"] for t, rs in runs.items()},
        "curves": {t: [r["curve"] for r in rs] for t, rs in runs.items()},
        "paper": {str(k): v for k, v in PAPER.items()},
    }
    private = [str(t) for t in TARGETS]
    means = [results["mean"][t] for t in private]
    results["monotone_in_epsilon"] = bool(all(a < b for a, b in zip(means, means[1:])))
    results["below_paper"] = {t: results["range"][t][1] < PAPER[float(t)] for t in private}

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    eps = np.array(TARGETS)
    low = [100 * (m - results["range"][t][0]) for m, t in zip(means, private)]
    high = [100 * (results["range"][t][1] - m) for m, t in zip(means, private)]
    ax1.errorbar(eps, [100 * m for m in means], yerr=[low, high], fmt="o-", capsize=3,
                 label=f"fnn, mnist-10k (N = {len(x)}), {seeds} seeds: mean, range")
    ax1.plot(eps, [100 * PAPER[e] for e in TARGETS], "s--", color="grey",
             label="Abadi et al. 2016, full MNIST (N = 60,000), PCA 60")
    ax1.axhline(100 * results["mean"]["None"], color="C2", ls=":", label="not private (same network, SGD)")
    ax1.set(xscale="log", xlabel="ε (δ = 1e-5)", ylabel="held-out accuracy (%)", xticks=eps,
            xticklabels=[f"{e:g}" for e in eps], title="accuracy against the privacy budget")
    ax1.xaxis.set_minor_locator(plt.NullLocator())
    ax1.legend(fontsize=8)
    for i, t in enumerate(settings):
        curves = np.array(results["curves"][str(t)])
        ax2.plot(np.arange(1, epochs + 1), 100 * curves.mean(0), "o-", ms=3, color=f"C{i}",
                 label="not private" if t is None else f"ε = {t:g}, σ = {results['noise_multiplier'][str(t)]:.2f}")
    ax2.set(xlabel="epoch (13 lots of 600 expected)", ylabel="held-out accuracy (%)", title="training curves (mean)")
    ax2.legend(fontsize=8)
    save_figure(args, fig)
    save_json(args, results)

    parts = [f"ε = {t}: {100 * results['mean'][t]:.2f}% ({100 * results['range'][t][0]:.2f}–"
             f"{100 * results['range'][t][1]:.2f}, σ = {results['noise_multiplier'][t]:.2f}; paper "
             f"{100 * PAPER[float(t)]:.0f}%)" for t in private]
    conclude(args, (
        f"held-out accuracy after {epochs} epochs ({results['steps']} steps at q = {results['q']:.3f}) over {seeds} "
        f"seeds: " + "; ".join(parts) + f"; not private {100 * results['mean']['None']:.2f}%. Accuracy "
        + ("rises with ε at every step" if results["monotone_in_epsilon"] else "does not rise with ε at every step")
        + "; every seed is below the paper's figure at "
        + (", ".join(f"ε = {t}" for t in private if results["below_paper"][t]) or "no ε")
        + " (8,000 images, so q is 7.5× the paper's and each step costs more privacy)."))
    return results


if __name__ == "__main__":
    main()
