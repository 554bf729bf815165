"""Computation graphs and automatic differentiation: the forward pass, the δ-recursion and jax.grad as jaxprs.

A small network ``4-5-5-3`` (tanh, relu, identity output; softmax cross-entropy, batch of 8) is
traced with ``jax.make_jaxpr`` three times:

- **forward**: ``net.apply(params, x)``, the chain ``z^l = a^{l−1}(W^l)ᵀ + b^l``, ``a^l = φ_l(z^l)``;
- **manual backward**: :func:`fnn.backprop`, the forward pass plus BP1–BP4 written by hand;
- **autodiff backward**: :func:`fnn.autodiff_grads` (``jax.value_and_grad`` of :func:`fnn.objective`),
  the forward pass plus the transposed (vector-Jacobian) rules JAX derives for each primitive.

Nested ``jit`` calls inside a jaxpr are inlined, so each graph is a flat DAG whose nodes are
primitive operations (``dot_general``, ``add``, ``tanh``, ``select_n``, ...) and whose edges are the
arrays passing between them. The figure draws the three DAGs (column = longest path from the
inputs), counts their operations by primitive (bar chart), and times one SGD training step
(gradients + update) executed eagerly (op by op from Python) against the same step compiled by
``jax.jit`` (one XLA program), as the median of repeated runs after warm-up, for the small network
and for ``784-256-128-10`` on a batch of 128. The three jaxpr listings are written next to the
figure as ``autodiff_graphs_{forward,manual,autodiff}.txt``.

Finally it checks numerically that the backprop's per-sample ``δ^l`` are the cotangents
``∂C_x/∂z^l`` that reverse mode computes: ``δ^{x,l}`` is ``∂C/∂b^l`` of :func:`fnn.backprop` on
the single sample ``x``, and ``jax.grad`` of the batch cost with respect to an additive zero shift
of ``z^l`` gives ``(1/N) δ^{x,l}`` in row ``x``.

Output: ``autodiff_graphs.png``, ``autodiff_graphs.json`` and the three ``.txt`` listings.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

import fnn

SMALL = (4, 5, 5, 3)
LARGE = (784, 256, 128, 10)
ACTIVATIONS = ("tanh", "relu")
ETA = 0.1
INLINED = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat", "checkpoint")
CATEGORIES = {
    "matmul": {"dot_general"},
    "nonlinear": {"tanh", "exp", "log", "logistic", "log1p", "expm1", "integer_pow", "sqrt", "rsqrt", "pow"},
    "arithmetic": {"add", "sub", "mul", "div", "neg", "add_any", "max", "min", "abs", "sign"},
    "select / compare": {"select_n", "gt", "lt", "ge", "le", "eq", "ne", "and", "or", "not"},
    "reduce": {"reduce_sum", "reduce_max", "reduce_min", "argmax"},
}
COLORS = {"input": "k", "matmul": "C3", "nonlinear": "C1", "arithmetic": "C0", "select / compare": "C2",
          "reduce": "C4", "shape / dtype": "0.6"}


def category(primitive: str) -> str:
    """The kind of a primitive, for colouring: matmul, nonlinear, arithmetic, ..., or shape / dtype."""
    return next((name for name, members in CATEGORIES.items() if primitive in members), "shape / dtype")


def _sub_jaxpr(eqn):
    """The inner jaxpr of a call-like equation (``jit``, ``custom_jvp_call``, ...), or ``None``."""
    if eqn.primitive.name not in INLINED:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if inner is not None:
            return getattr(inner, "jaxpr", inner)  # a ClosedJaxpr holds its Jaxpr in .jaxpr
    return None


def flat_graph(closed) -> tuple[list[str], list[list[int]]]:
    """The DAG of a (closed) jaxpr with nested calls inlined.

    Returns ``(labels, inputs)``: node ``k`` is an input array (label ``"input"``) or one primitive
    application (label = primitive name), and ``inputs[k]`` lists the nodes whose outputs it reads.
    Literals and constants are not nodes.
    """
    labels, inputs = [], []

    def node(label, preds):
        labels.append(label)
        inputs.append(sorted(set(p for p in preds if p is not None)))
        return len(labels) - 1

    def read(env, v):
        return None if isinstance(v, Literal) else env.get(v)

    def visit(jaxpr, env):
        for eqn in jaxpr.eqns:
            args = [read(env, v) for v in eqn.invars]
            inner = _sub_jaxpr(eqn)
            if inner is not None:
                inner_env = dict(zip(inner.invars, args))
                visit(inner, inner_env)
                for out, inner_out in zip(eqn.outvars, inner.outvars):
                    env[out] = read(inner_env, inner_out)
            else:
                k = node(eqn.primitive.name, args)
                for out in eqn.outvars:
                    env[out] = k

    jaxpr = closed.jaxpr
    visit(jaxpr, {v: node("input", []) for v in jaxpr.invars})
    return labels, inputs


def depths(inputs: list[list[int]]) -> list[int]:
    """Each node's longest path from an input (inputs 0); the nodes are in topological order."""
    depth = [0] * len(inputs)
    for k, preds in enumerate(inputs):
        depth[k] = 1 + max((depth[p] for p in preds), default=-1)
    return depth


def draw_graph(ax, labels: list[str], inputs: list[list[int]], title: str) -> None:
    """Nodes at column = longest path from an input, coloured by :func:`category`; edges as thin lines."""
    from matplotlib.collections import LineCollection

    depth = depths(inputs)
    rows = Counter()
    pos = []
    for d in depth:
        pos.append((d, rows[d]))
        rows[d] += 1
    y = [(r - (rows[d] - 1) / 2) for d, r in pos]
    edges = [[(depth[p], y[p]), (depth[k], y[k])] for k, preds in enumerate(inputs) for p in preds]
    ax.add_collection(LineCollection(edges, colors="0.8", linewidths=0.5, zorder=1))
    kinds = ["input" if lab == "input" else category(lab) for lab in labels]
    for kind, color in COLORS.items():
        idx = [k for k, c in enumerate(kinds) if c == kind]
        if idx:
            ax.scatter([depth[k] for k in idx], [y[k] for k in idx], s=14, color=color, zorder=2,
                       label=f"{kind} ({len(idx)})")
    for k, lab in enumerate(labels):
        if lab in ("dot_general", "tanh", "exp", "log"):
            ax.annotate(lab.replace("dot_general", "dot"), (depth[k], y[k]), fontsize=5, xytext=(1, 3),
                        textcoords="offset points")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("longest path from the inputs", fontsize=8)
    ax.set_yticks([])
    ax.legend(fontsize=6, loc="upper left", ncol=7, frameon=False)
    ax.margins(y=0.12)


def sgd_step(net: fnn.MLP, loss: fnn.Loss, grads_of):
    """``(params, x, y) -> (params − η∇C, C)``: one training step with the gradient function ``grads_of``."""
    opt = fnn.optim.sgd(ETA)

    def step(params, x, y):
        cost, grads = grads_of(net, params, x, y, loss)
        return fnn.optim.step(opt, grads, opt.init(params), params)[0], cost

    return step


def median_seconds(fn, args, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` (waiting for the result) over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timings(sizes, batch: int, repeats: int) -> dict:
    """Eager and jitted step times (seconds) for manual and autodiff gradients on ``sizes``."""
    net, loss = fnn.MLP(sizes, ACTIVATIONS, "identity"), fnn.losses.softmax_cross_entropy
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    params = net.init(k1, jnp.float32)
    x = jax.random.normal(k2, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(k3, (batch,), 0, sizes[-1])
    out = {}
    for name, grads_of in (("manual", fnn.backprop), ("autodiff", fnn.autodiff_grads)):
        step = sgd_step(net, loss, grads_of)
        out[f"{name} eager"] = median_seconds(step, (params, x, y), 2, repeats)
        out[f"{name} jit"] = median_seconds(jax.jit(step), (params, x, y), 3, 5 * repeats)
    return out


def delta_is_cotangent(net: fnn.MLP, params, x, y, loss) -> float:
    """``max_l`` relative difference between the per-sample ``δ^l`` and ``N · ∂C/∂z^l`` from ``jax.grad``.

    ``δ^{x,l}`` is ``∂C/∂b^l`` of :func:`fnn.backprop` on the single sample ``x`` (``N = 1``).
    """

    @jax.jit
    def differences(params, x, y):
        per_sample = jax.vmap(lambda xi, yi: fnn.backprop(net, params, xi[None], yi[None], loss)[1])(x, y)
        deltas = [layer["b"] for layer in per_sample]  # (N, n_l) each

        def cost(shifts):  # C with z^l ← z^l + s^l; its gradient at s = 0 is ∂C/∂z^l
            a = x
            for layer, act, s in zip(params, net.activations, shifts):
                a = act.phi(a @ layer["W"].T + layer["b"] + s)
            return loss(a, y)

        cotangents = jax.grad(cost)([jnp.zeros_like(d) for d in deltas])
        return jnp.stack([fnn.gradcheck.relative_difference(d, x.shape[0] * c) for d, c in zip(deltas, cotangents)])

    return float(jnp.max(differences(params, x, y)))


def main(argv=None) -> dict:
    """Run the experiment (``argv``: the command line); returns the results written to the JSON."""
    args = common.parse_args("autodiff_graphs", __doc__.splitlines()[0], argv)
    repeats = 3 if args.quick else 30
    net, loss = fnn.MLP(SMALL, ACTIVATIONS, "identity"), fnn.losses.softmax_cross_entropy
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    params = net.init(k1, jnp.float32)
    x = jax.random.normal(k2, (8, SMALL[0]), jnp.float32)
    y = jax.random.randint(k3, (8,), 0, SMALL[-1])

    jaxprs = {
        "forward": jax.make_jaxpr(lambda p, x: net.apply(p, x))(params, x),
        "manual": jax.make_jaxpr(lambda p, x, y: fnn.backprop(net, p, x, y, loss))(params, x, y),
        "autodiff": jax.make_jaxpr(lambda p, x, y: fnn.autodiff_grads(net, p, x, y, loss))(params, x, y),
    }
    for name, jaxpr in jaxprs.items():
        Path(args.out, f"autodiff_graphs_{name}.txt").write_text(str(jaxpr) + "\n")
    graphs = {name: flat_graph(j) for name, j in jaxprs.items()}
    counts = {name: Counter(lab for lab in labels if lab != "input") for name, (labels, _) in graphs.items()}
    # the backward pass alone: what each gradient graph adds to the forward graph
    backward = {name: counts[name] - counts["forward"] for name in ("manual", "autodiff")}
    depth = {name: max(depths(inputs)) for name, (_, inputs) in graphs.items()}
    delta_check = delta_is_cotangent(net, params, x, y, loss)
    grad_check = float(jnp.max(jax.jit(lambda p: fnn.check_gradients(net, p, x, y, loss))(params)))
    times = {"small": timings(SMALL, 8, repeats)}
    if not args.quick:
        times["large"] = timings(LARGE, 128, repeats // 3)

    plt = common.pyplot()
    fig = plt.figure(figsize=(15, 15))
    grid = fig.add_gridspec(4, 3, height_ratios=[0.7, 1.1, 1.1, 1.3])
    titles = {"forward": "forward pass: net.apply", "manual": "manual backward: fnn.backprop (forward + BP1–BP4)",
              "autodiff": "autodiff backward: jax.value_and_grad of fnn.objective (forward + transposed rules)"}
    for row, (name, (labels, inputs)) in enumerate(graphs.items()):
        ops = sum(counts[name].values())
        draw_graph(fig.add_subplot(grid[row, :]), labels, inputs,
                   f"({'abc'[row]}) {titles[name]}: {ops} operations, depth {depth[name]}")
    a = fig.add_subplot(grid[3, :2])
    prims = sorted(set().union(*counts.values()), key=lambda p: (-counts["autodiff"][p], p))
    at = np.arange(len(prims))
    for i, name in enumerate(counts):
        a.bar(at + (i - 1) * 0.28, [counts[name][p] for p in prims], 0.28, label=name)
    a.set_xticks(at, prims, rotation=60, ha="right", fontsize=8)
    a.set(ylabel="operations", title=f"(d) operations by primitive, {'-'.join(map(str, SMALL))} network, batch 8")
    a.legend()
    a = fig.add_subplot(grid[3, 2])
    kinds = ["manual eager", "manual jit", "autodiff eager", "autodiff jit"]
    names = {"small": f"{'-'.join(map(str, SMALL))}, B = 8", "large": f"{'-'.join(map(str, LARGE))}, B = 128"}
    for i, (size, t) in enumerate(times.items()):
        a.barh(np.arange(4) + (i - 0.5) * 0.4, [1e3 * t[k] for k in kinds], 0.4, label=names[size])
    a.set_yticks(np.arange(4), kinds)
    a.set(xscale="log", xlabel="ms per SGD step (median)", title="(e) eager versus jit")
    a.legend(fontsize=8)
    common.save_figure(args, fig)

    speedup = {size: {g: t[f"{g} eager"] / t[f"{g} jit"] for g in ("manual", "autodiff")} for size, t in times.items()}
    results = {
        "small_sizes": SMALL,
        "large_sizes": LARGE,
        "activations": ACTIVATIONS,
        "operation_counts": {name: dict(c) for name, c in counts.items()},
        "backward_only_counts": {name: dict(c) for name, c in backward.items()},
        "total_operations": {name: sum(c.values()) for name, c in counts.items()},
        "depth": depth,
        "dot_general": {name: c["dot_general"] for name, c in counts.items()},
        "delta_vs_cotangent_max_rel_diff": delta_check,
        "manual_vs_autodiff_max_rel_diff": grad_check,
        "step_seconds": times,
        "jit_speedup": speedup,
        "jaxpr_files": [f"autodiff_graphs_{name}.txt" for name in jaxprs],
        "manual_jaxpr_excerpt": str(jaxprs["manual"]).splitlines()[:30],
    }
    common.save_json(args, results)
    L = net.num_layers
    dots = results["dot_general"]
    more_auto = backward["autodiff"] - backward["manual"]
    more_manual = backward["manual"] - backward["autodiff"]

    def listing(counter):
        return ", ".join(f"{p} +{c}" for p, c in counter.most_common()) or "nothing"

    common.conclude(args, "\n".join([
        f"graphs of the {'-'.join(map(str, SMALL))} network: forward {results['total_operations']['forward']} "
        f"operations ({dots['forward']} matmuls), manual backprop {results['total_operations']['manual']} "
        f"({dots['manual']} matmuls), jax.grad {results['total_operations']['autodiff']} ({dots['autodiff']} matmuls). "
        f"Both gradient graphs add {dots['manual'] - dots['forward']} and {dots['autodiff'] - dots['forward']} "
        f"matmuls to the forward pass; the theory's count for L = {L} layers is 2L − 1 = {2 * L - 1} "
        f"(δ^lᵀ a^(l−1) for every ∂C/∂W^l, δ^l W^l for every δ^(l−1) but the input's).",
        "How they compute the same thing: reverse mode walks the forward graph backwards and multiplies the "
        "incoming cotangent by each operation's transposed Jacobian; for z^l = a^(l−1) W^lᵀ + b^l that gives "
        "ā^(l−1) = z̄^l W^l, W̄^l = z̄^lᵀ a^(l−1), b̄^l = Σ_x z̄^l, and for a^l = φ(z^l) it gives z̄^l = ā^l ⊙ φ'(z^l): "
        "exactly BP2, BP4, BP3 and BP1, with the δ^l the cotangents of z^l (scaled by N, because C is a mean). "
        f"Measured: max relative difference between δ^l (fnn.backprop, per sample) and N·∂C/∂z^l (jax.grad) "
        f"{delta_check:.1e}; between the two gradients {grad_check:.1e}. Beyond the forward pass, jax.grad's graph has "
        f"{listing(more_auto)}; the manual one has {listing(more_manual)} (the backprop's fused δ^L = softmax(z^L) − y "
        "and φ' written out, against the transposes of every jnp operation, masks and log-sum-exp shift included).",
        "one SGD step, median: " + "; ".join(
            f"{size} network: manual {1e3 * t['manual eager']:.2f} ms eager vs {1e3 * t['manual jit']:.3f} ms jit "
            f"({speedup[size]['manual']:.0f}×), autodiff {1e3 * t['autodiff eager']:.2f} ms eager vs "
            f"{1e3 * t['autodiff jit']:.3f} ms jit ({speedup[size]['autodiff']:.0f}×)" for size, t in times.items())
        + " (eager dispatches every primitive from Python; jit runs one fused XLA program).",
    ]))
    return results


if __name__ == "__main__":
    main()
