"""Vanishing gradients and initialization: activations and per-layer gradients of a deep net at init.

In the spirit of Glorot & Bengio, "Understanding the difficulty of training deep feedforward
neural networks", AISTATS 2010: a network of 8 hidden layers of 256 units on a batch of real MNIST
digits (z-scored; scikit-learn's digits when no MNIST directory is found), before any training.
For each configuration of activation and initialization it records

- the histogram of every hidden layer's activations ``a^l`` (saturation shows as mass piling up
  at the ends of a sigmoid's or tanh's range, where ``φ'(z) ≈ 0``);
- the gradient norm ``‖∂C/∂W^l‖_F`` of every layer, from the manual backprop (BP1–BP4) on the
  softmax cross-entropy: by BP2 ``δ^l = (δ^{l+1} W^{l+1}) ⊙ φ'(z^l)``, so small weights and small
  ``φ'`` shrink δ layer after layer on the way down to the input.

Configurations: sigmoid with the classic ``U(±1/√n)``; sigmoid with the naive unit Gaussian
``N(0, 1)`` for weights and biases (the initialization of early textbook code); tanh with the
classic init; tanh with Glorot's normalized init ``U(±√(6/(n+m)))``; ReLU with He's ``N(0, 2/n)``.
"""

from __future__ import annotations

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np

import fnn

CONFIGS = (  # (label, hidden activation, initializer name; "unit_normal" is built here)
    ("sigmoid, classic U(±1/√n)", "sigmoid", "classic"),
    ("sigmoid, naive N(0, 1)", "sigmoid", "unit_normal"),
    ("tanh, classic U(±1/√n)", "tanh", "classic"),
    ("tanh, Glorot U(±√(6/(n+m)))", "tanh", "xavier_uniform"),
    ("relu, He N(0, 2/n)", "relu", "he_normal"),
)
SATURATED = {"sigmoid": 0.05, "tanh": 0.05}
"""A sigmoid unit counts as saturated when ``a < 0.05`` or ``a > 0.95``; a tanh unit when ``|a| > 0.95``."""


def unit_normal_params(net: fnn.MLP, key: jax.Array) -> list:
    """``W^l, b^l ~ N(0, 1)`` entrywise, float32, in the layout of ``net.init``."""
    params = []
    for k, fan_in, fan_out in zip(jax.random.split(key, net.num_layers), net.sizes[:-1], net.sizes[1:]):
        kw, kb = jax.random.split(k)
        params.append({"W": jax.random.normal(kw, (fan_out, fan_in), jnp.float32),
                       "b": jax.random.normal(kb, (fan_out,), jnp.float32)})
    return params


def saturation(activation: str, a: np.ndarray) -> float:
    """Fraction of the entries of ``a`` in the flat ends of ``φ`` (see :data:`SATURATED`); for ReLU the zeros."""
    if activation == "sigmoid":
        return float(np.mean((a < SATURATED["sigmoid"]) | (a > 1 - SATURATED["sigmoid"])))
    if activation == "tanh":
        return float(np.mean(np.abs(a) > 1 - SATURATED["tanh"]))
    return float(np.mean(a == 0))


def load_batch(args, size: int):
    """``(x (size, d) float32 z-scored, y (size,) int32, name)`` from mnist-10k's training split, or digits."""
    try:
        data = fnn.data.load_dataset("mnist-10k", args.data_dir)
    except fnn.data.DataError:
        data = fnn.data.load_dataset("digits")
    normalizer = fnn.data.fit_zscore(data.x_train)
    x = fnn.data.zscore(normalizer, data.x_train[:size]).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(data.y_train[:size]), data.name


def main(argv=None) -> dict:
    args = common.parse_args("initialization", __doc__.splitlines()[0], argv)
    depth, width, batch = (5, 64, 200) if args.quick else (8, 256, 1000)
    x, y, dataset = load_batch(args, batch)
    loss = fnn.losses.softmax_cross_entropy
    key = jax.random.PRNGKey(0)

    results = {"dataset": dataset, "batch": int(x.shape[0]), "depth": depth, "width": width, "configs": {}}
    hidden_acts = {}
    for label, activation, init in CONFIGS:
        sizes = (x.shape[1],) + (width,) * depth + (10,)
        net = fnn.MLP(sizes, activation, "identity", init="classic" if init == "unit_normal" else init)
        params = unit_normal_params(net, key) if init == "unit_normal" else net.init(key)
        cost, grads = fnn.backprop(net, params, x, y, loss)
        _, acts = net.forward(params, x)
        acts = [np.asarray(a) for a in acts[1:-1]]  # hidden layers a^1..a^depth
        hidden_acts[label] = acts
        grad_norms = [float(jnp.linalg.norm(g["W"])) for g in grads]
        results["configs"][label] = {
            "activation": activation, "init": init, "cost": float(cost),
            "grad_norm_W": grad_norms,
            "first_over_last": grad_norms[0] / grad_norms[-1],
            "activation_mean": [float(a.mean()) for a in acts],
            "activation_std": [float(a.std()) for a in acts],
            "saturated_fraction": [saturation(activation, a) for a in acts],
        }

    plt = common.pyplot()
    fig = plt.figure(figsize=(20, 8.5))
    grid = fig.add_gridspec(2, 10)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, depth))
    for i, (label, activation, _) in enumerate(CONFIGS):
        ax = fig.add_subplot(grid[0, 2 * i: 2 * i + 2])
        acts = hidden_acts[label]
        top = max(float(np.quantile(a, 0.99)) for a in acts) if activation == "relu" else 1.0
        edges = np.linspace(0 if activation != "tanh" else -1, top, 61)
        for l, a in enumerate(acts):
            counts, _ = np.histogram(a, edges)  # ReLU values above the 99th percentile are left out
            ax.stairs(counts / a.size, edges, color=colors[l], label=f"layer {l + 1}" if l in (0, depth - 1) else None)
        sat = results["configs"][label]["saturated_fraction"]
        what = "zeros" if activation == "relu" else "saturated"
        ax.set(title=f"{label}\n{what}: layer 1 {100 * sat[0]:.0f}%, layer {depth} {100 * sat[-1]:.0f}%",
               xlabel="activation a", ylabel="fraction of units" if i == 0 else None, yscale="log")
        ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, :5])
    layers = np.arange(1, depth + 2)
    for label, _, _ in CONFIGS:
        ax.plot(layers, results["configs"][label]["grad_norm_W"], "o-", label=label)
    ax.set(yscale="log", xlabel="layer l (1 = next to the input, last = output)", ylabel="‖∂C/∂Wˡ‖_F",
           title=f"gradient norm per layer at initialization (manual backprop, {dataset}, batch {x.shape[0]})")
    ax.set_xticks(layers)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, 5:])
    for label, _, _ in CONFIGS:
        ax.plot(layers[:-1], results["configs"][label]["activation_std"], "o-", label=label)
    ax.set(yscale="log", xlabel="hidden layer l", ylabel="std of aˡ over batch and units",
           title="spread of the activations per layer")
    ax.set_xticks(layers[:-1])
    ax.legend(fontsize=8)
    common.save_figure(args, fig)

    common.save_json(args, results)
    parts = []
    for label, r in results["configs"].items():
        what = "zeros" if r["activation"] == "relu" else "saturated"
        parts.append(f"{label}: ‖∂C/∂W¹‖/‖∂C/∂Wᴸ‖ = {r['first_over_last']:.2e}, {what} in the last hidden layer "
                     f"{100 * r['saturated_fraction'][-1]:.0f}%, activation std layer 1 → {depth}: "
                     f"{r['activation_std'][0]:.3f} → {r['activation_std'][-1]:.3f}")
    common.conclude(args, f"{dataset}, {depth} hidden layers of {width}: " + "; ".join(parts) + ".")
    return results


if __name__ == "__main__":
    main()
