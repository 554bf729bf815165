"""The perceptron converges on separable data within Novikoff's bound (R/γ)², and never on XOR.

Four panels: (a) the boundary the rule finds on two separable blobs, next to the separator the
data were drawn with; (b) updates made versus the bound (R/γ)² over separable sets of shrinking
margin γ (every point must lie under the diagonal); (c) cumulative updates versus the epoch limit:
a plateau once a separable set is learned, a straight line for XOR; (d) XOR, where the rule is
still making mistakes when the epoch limit stops it.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax.numpy as jnp
import numpy as np

from fnn import data, perceptron

SEPARATOR = np.array([np.cos(0.5), np.sin(0.5), 0.3]) / np.linalg.norm([np.cos(0.5), np.sin(0.5), 0.3])
"""The augmented unit vector ``u = (w, b)`` that labels the synthetic separable sets."""


def separable_set(n: int, gamma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform on ``[−2, 2]²`` kept only if ``|u·x'| ≥ gamma``; labels ``sign(u·x')``.

    Returns ``x (n, 2)`` float32 and ``s (n,)`` int32 in {−1, +1}.
    """
    rng = np.random.RandomState(seed)
    kept = np.empty((0, 2), np.float32)
    while len(kept) < n:
        x = rng.uniform(-2, 2, (4 * n, 2)).astype(np.float32)
        score = np.hstack([x, np.ones((len(x), 1), np.float32)]) @ SEPARATOR
        kept = np.vstack([kept, x[np.abs(score) >= gamma]])
    x = kept[:n]
    s = np.sign(np.hstack([x, np.ones((n, 1), np.float32)]) @ SEPARATOR).astype(np.int32)
    return x, s


def cumulative_updates(x, y, epochs: int) -> list[int]:
    """Updates made when the rule is stopped after ``1, 2, ..., epochs`` epochs (one compile)."""
    return [int(perceptron.train(x, y, k).updates) for k in range(1, epochs + 1)]


def _boundary(ax, w, lo, hi, **style):
    """Draw ``w_1 x_1 + w_2 x_2 + b = 0`` across ``x_1 ∈ [lo, hi]`` (skipped when ``w_2 = 0``)."""
    if abs(w[1]) > 1e-12:
        x1 = np.linspace(lo, hi, 2)
        ax.plot(x1, -(w[0] * x1 + w[2]) / w[1], **style)


def main(argv=None) -> dict:
    args = common.parse_args("perceptron", __doc__.splitlines()[0], argv)
    margins = (0.05, 0.2) if args.quick else (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    seeds = common.seeds(args, 2 if args.quick else 5)
    n_points, max_epochs, curve_epochs = (60, 2000, 15) if args.quick else (200, 20_000, 30)

    blobs = data.blobs(n=200, seed=args.seed, margin=0.5)
    fit = perceptron.train(blobs.x_train, blobs.y_train, max_epochs)
    known = jnp.asarray([1.0, 1.0, 0.0], jnp.float32)  # the line blobs() draws around, bias 0
    bound, radius, gamma = perceptron.mistake_bound(blobs.x_train, blobs.y_train, known)
    test_acc = float(np.mean(np.asarray(perceptron.predict(fit.w, blobs.x_test)) == 2 * blobs.y_test - 1))
    blobs_result = {
        "updates": int(fit.updates), "epochs": int(fit.epochs), "converged": bool(fit.converged),
        "bound": float(bound), "R": float(radius), "gamma": float(gamma), "test_accuracy": test_acc,
        "w": np.asarray(fit.w),
    }

    sweep = []
    for margin in margins:
        for seed in seeds:
            x, s = separable_set(n_points, margin, seed)
            out = perceptron.train(x, s, max_epochs)
            b, r, g = perceptron.mistake_bound(x, s, jnp.asarray(SEPARATOR, jnp.float32))
            sweep.append({"margin": margin, "seed": seed, "updates": int(out.updates), "epochs": int(out.epochs),
                          "converged": bool(out.converged), "bound": float(b), "R": float(r), "gamma": float(g)})
    within = all(r["converged"] and r["updates"] <= r["bound"] for r in sweep)
    worst_ratio = max(r["updates"] / r["bound"] for r in sweep)

    xor = data.xor()
    xor_fit = perceptron.train(xor.x_train, xor.y_train, max_epochs)
    xor_acc = float(np.mean(np.asarray(perceptron.predict(xor_fit.w, xor.x_train)) == 2 * xor.y_train - 1))
    # the separable set of the sweep that needed the most updates while converging inside the window
    slow = max((r for r in sweep if r["epochs"] <= curve_epochs - 5), key=lambda r: r["updates"])
    slow_x, slow_s = separable_set(n_points, slow["margin"], slow["seed"])
    curves = {
        "blobs": cumulative_updates(blobs.x_train, blobs.y_train, curve_epochs),
        f"separable, γ≥{slow['margin']} (seed {slow['seed']})": cumulative_updates(slow_x, slow_s, curve_epochs),
        "xor": cumulative_updates(xor.x_train, xor.y_train, curve_epochs),
    }
    xor_result = {"updates": int(xor_fit.updates), "epochs": int(xor_fit.epochs),
                  "converged": bool(xor_fit.converged), "train_accuracy": xor_acc, "w": np.asarray(xor_fit.w)}

    plt = common.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5))
    ax = axes[0, 0]
    for label, marker in ((0, "o"), (1, "s")):
        pts = blobs.x_train[blobs.y_train == label]
        ax.scatter(pts[:, 0], pts[:, 1], s=12, marker=marker, label=f"class {label}")
    lo, hi = float(blobs.x_train[:, 0].min()), float(blobs.x_train[:, 0].max())
    _boundary(ax, np.asarray(fit.w), lo, hi, color="k", label="perceptron")
    _boundary(ax, np.asarray(known), lo, hi, color="grey", ls="--", label="generating separator")
    ax.set(title=f"(a) blobs: {fit.updates} updates, {fit.epochs} epochs, bound (R/γ)²={float(bound):.0f}",
           xlabel="x₁", ylabel="x₂", ylim=(blobs.x_train[:, 1].min() - 0.5, blobs.x_train[:, 1].max() + 0.5))
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    bounds = np.array([r["bound"] for r in sweep])
    dots = ax.scatter(bounds, [r["updates"] for r in sweep], c=[r["margin"] for r in sweep], cmap="viridis",
                      norm="log")
    fig.colorbar(dots, ax=ax, label="margin threshold γ")
    line = np.array([1, bounds.max() * 2])
    ax.plot(line, line, "k--", label="updates = (R/γ)²")
    ax.set(xscale="log", yscale="log", xlabel="Novikoff bound (R/γ)²", ylabel="updates made",
           title=f"(b) {len(sweep)} separable sets, n={n_points}: all within bound: {within}")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for name, counts in curves.items():
        ax.plot(range(1, curve_epochs + 1), counts, "o-", ms=3, label=name)
    ax.set(xlabel="epoch limit", ylabel="updates made", title="(c) updates vs epochs: plateau = converged")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for label, marker in ((0, "o"), (1, "s")):
        pts = xor.x_train[xor.y_train == label]
        ax.scatter(pts[:, 0], pts[:, 1], s=120, marker=marker, label=f"class {label}")
    _boundary(ax, np.asarray(xor_fit.w), -0.5, 1.5, color="k", label="final perceptron")
    ax.set(xlim=(-0.5, 1.5), ylim=(-0.5, 1.5), xlabel="x₁", ylabel="x₂",
           title=f"(d) XOR: converged={bool(xor_fit.converged)} after {xor_fit.epochs} epochs,\n"
                 f"{xor_fit.updates} updates, final w'={np.round(np.asarray(xor_fit.w), 2)}, acc {100 * xor_acc:.0f}%")
    ax.legend(fontsize=8)
    common.save_figure(args, fig)

    results = {"blobs": blobs_result, "sweep": sweep, "all_within_bound": within, "worst_ratio": worst_ratio,
               "xor": xor_result, "cumulative_updates": curves}
    common.save_json(args, results)
    common.conclude(
        args,
        f"blobs: converged={blobs_result['converged']} after {blobs_result['updates']} updates in "
        f"{blobs_result['epochs']} epochs (Novikoff bound {blobs_result['bound']:.1f}, held-out accuracy "
        f"{100 * test_acc:.1f}%); {len(sweep)} separable sets with γ from {margins[0]} to {margins[-1]}: "
        f"{'all' if within else 'NOT all'} converged within (R/γ)², largest updates/bound = {worst_ratio:.3f}; "
        f"XOR: converged={xor_result['converged']} after {xor_result['epochs']} epochs and "
        f"{xor_result['updates']} updates, training accuracy {100 * xor_acc:.0f}%.",
    )
    return results


if __name__ == "__main__":
    main()
