"""The gradient noise scale and the per-example gradient norms over training, from the δ's.

Claim checked (McCandlish, Kaplan, Amodei et al., "An empirical model of large-batch training",
2018, section 3 and fig. 7): the simple noise scale ``B_simple = tr(Σ)/‖G‖²``, the batch size
beyond which larger batches stop paying off, grows as training proceeds, because the true gradient
``‖G‖²`` shrinks faster than the per-example noise ``tr(Σ)``.

Setting: 784-256-10 relu on mnist-10k (8,000 training images, z-scored), Adam 10⁻³, batch 128,
``--epochs`` epochs, ``--seeds`` seeds (initialization and batch order). Each step computes the
unbiased estimates of ``tr(Σ)`` and ``‖G‖²`` from the per-example gradients of its batch, read off
the backprop's δ's (:func:`fnn.per_example.noise_scale`), and every epoch records the ratio of
their epoch means, as the paper recommends, with the quantiles of the per-example gradient norms.
Departures from the paper: it measures much larger models and data sets and estimates ``B_simple``
from two batch sizes; here the per-example gradients give the estimate from one batch directly,
on a small network and 8,000 images, and "training proceeds" spans 20 epochs (1,260 steps).
"""

import common  # first: puts the repository on sys.path
from common import conclude, mnist_10k, parse_args, pyplot, save_figure, save_json

# isort: split
import jax
import numpy as np

import fnn

BATCH = 128
QUANTILES = ("norm_p10", "norm_median", "norm_p90", "norm_max")


def _extra(p):
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=5)


def run(x, y, held_out, epochs: int, seed: int) -> list[dict]:
    """One training run; its history with the noise scale and the norm quantiles of every epoch."""
    net = fnn.MLP((784, 256, 10), "relu", init="he_normal")
    init_key, order_key = jax.random.split(jax.random.PRNGKey(seed))
    result = fnn.fit(net, net.init(init_key), fnn.optim.adam(1e-3), (x, y), loss=fnn.losses.softmax_cross_entropy,
                     epochs=epochs, batch_size=BATCH, key=order_key, held_out=held_out,
                     per_example=("noise_scale", "norms"), quiet=True)
    if result.stopped:
        raise RuntimeError(result.stopped)
    return result.history


def main(argv=None) -> dict:
    args = parse_args("gradient_noise", __doc__, argv, _extra)
    x, y, xt, yt, _ = mnist_10k(args, quick_rows=1024)
    epochs, seeds = (3, 2) if args.quick else (args.epochs, args.seeds)
    histories = [run(x, y, (xt, yt), epochs, s) for s in common.seeds(args, seeds)]

    def series(key):  # (seeds, epochs)
        return np.array([[h[key] for h in hist] for hist in histories])

    b = series("noise_scale")
    # An epoch whose mean ‖G‖² estimate is ≤ 0 has a true gradient too small to tell from the noise
    # at this batch size: B_simple is then beyond measure, counted as +∞ (it sorts above every value).
    unresolved = series("grad_sq") <= 0
    b_ranked = np.where(unresolved, np.inf, b)
    tail = min(5, epochs)
    late = np.median(b_ranked[:, -tail:], axis=1)
    growth = late / b_ranked[:, 0]
    results = {
        "epochs": epochs, "seeds": seeds, "batch": BATCH,
        "noise_scale": b, "grad_trace_cov": series("grad_trace_cov"), "grad_sq": series("grad_sq"),
        "unresolved_epochs": unresolved, "train_loss": series("train_loss"),
        "held_out_accuracy": series("held_out_accuracy"), **{q: series(q) for q in QUANTILES},
        "late_epochs": tail, "late_median": late, "growth_late_over_first": growth,
        "grows_in_every_seed": bool(np.all(growth > 1)),
    }

    plt = pyplot()
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4))
    e = np.arange(1, epochs + 1)
    top = np.nanmax(np.where(unresolved, np.nan, b)) * 3
    for s in range(seeds):
        ax1.plot(e, np.where(unresolved[s], np.nan, b[s]), "o-", ms=3, color="C0", alpha=0.6,
                 label="B_simple, per seed" if s == 0 else None)
    ax1.plot(e[unresolved.any(0)], [top] * int(unresolved.any(0).sum()), "^", color="C0",
             label="‖G‖² estimate ≤ 0 in some seed")
    ax1.axhline(BATCH, color="grey", ls=":", lw=0.8, label=f"batch size {BATCH}")
    ax1.set(xlabel="epoch", ylabel="B_simple = tr(Σ)/‖G‖²", yscale="log",
            title="gradient noise scale (ratio of epoch means)")
    twin = ax1.twinx()
    twin.plot(e, results["train_loss"].mean(0), color="C3", lw=1, label="train loss (mean of seeds)")
    twin.set(ylabel="train loss", yscale="log")
    ax1.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    for s in range(seeds):  # the paper's reading: the noise scale against the loss reached (their fig. 7)
        keep = ~unresolved[s]
        ax3.plot(results["train_loss"][s][keep], b[s][keep], "o-", ms=3, color="C0", alpha=0.6,
                 label="per seed, one point per epoch" if s == 0 else None)
    ax3.axhline(BATCH, color="grey", ls=":", lw=0.8, label=f"batch size {BATCH}")
    ax3.set(xlabel="training loss (epoch mean)", ylabel="B_simple", xscale="log", yscale="log",
            title="B_simple against the training loss")
    ax3.invert_xaxis()  # training runs left to right
    ax3.legend(fontsize=8)
    for i, q in enumerate(QUANTILES):
        v = results[q]
        ax2.plot(e, v.mean(0), "o-", ms=3, color=f"C{i}", label=q.replace("norm_", ""))
        ax2.fill_between(e, v.min(0), v.max(0), color=f"C{i}", alpha=0.2)
    ax2.set(xlabel="epoch", ylabel="‖g_x‖ (per-example gradient norm)", yscale="log",
            title="per-example gradient norms (band: seeds' range)")
    ax2.legend(fontsize=8)
    save_figure(args, fig)
    save_json(args, results)

    grew = growth > 1
    verdict = (f"grows over training in all {seeds} seeds" if grew.all() else
               f"does not grow over training in any of {seeds} seeds" if not grew.any() else
               f"grows over training in {int(grew.sum())} of {seeds} seeds only")
    median = results["norm_median"]
    rises = np.mean(np.diff(b_ranked[:, 1:], axis=1) > 0)  # after epoch 2
    first_step = b_ranked[:, 1] / b_ranked[:, 0]
    conclude(args, (
        f"B_simple {verdict}: from {b[:, 0].min():.0f}–{b[:, 0].max():.0f} in epoch 1 to a median of "
        f"{np.min(late):.0f}–{np.max(late):.0f} over epochs {epochs - tail + 1}–{epochs} (factor "
        f"{growth.min():.1f}–{growth.max():.1f}; ∞ where ‖G‖² is not resolved). Epoch 2 alone is "
        f"{first_step.min():.1f}–{first_step.max():.1f}× epoch 1; after that B_simple rose in {100 * rises:.0f}% of "
        f"epoch-to-epoch steps, and in {int(unresolved.sum())} of {unresolved.size} seed-epochs the true gradient "
        f"was too small to resolve (‖G‖² estimate ≤ 0). The median per-example gradient norm went from "
        f"{median[:, 0].mean():.3g} to {median[:, -1].mean():.3g} while the ratio max/median went from "
        f"{(results['norm_max'][:, 0] / median[:, 0]).mean():.1f} to "
        f"{(results['norm_max'][:, -1] / median[:, -1]).mean():.1f}; held-out accuracy "
        f"{100 * results['held_out_accuracy'][:, -1].mean():.2f}% at the end."))
    return results


if __name__ == "__main__":
    main()
