"""Finding where a training step first turned non-finite, and replaying it.

A step's values are checked in the order they are computed (:func:`nan_sites`): ``z^l`` and
``a^l`` of the forward pass, the cost, the ``δ^l`` of the backward pass, the gradient and the
update. :func:`site_flags` computes one flag per site inside the compiled epoch, without host
callbacks; :func:`replay_step` replays a failing batch eagerly and prints per-layer statistics.

How :func:`fnn.fit` uses them. A non-finite cost, gradient or updated value (params, optimizer
state, batch-norm statistics) stops training, and :func:`fnn.fit` reports the epoch, the step, the
batch and the first place (``z^l``, ``a^l``, cost, ``δ^l``, gradient or update, see
:func:`nan_sites`) where a non-finite value appeared; the params it returns are the last finite
ones, from just before the failing step. Checking every step costs time (it doubles the number of
XLA kernels in a step), so the check is split in two:

- ``fnn.train.make_epoch(..., guard=False)``, what :func:`fnn.fit` runs every epoch: every update is
  applied, and once at the end the epoch checks that all its costs and gradient norms and its final
  params, optimizer state and batch-norm statistics are finite. A non-finite value in a gradient or
  an update reaches the params or the optimizer state (a NaN through ``p + u``, an overflow of
  Adam's ``v`` in ``v`` itself), so a failure anywhere in the epoch shows there.
- ``fnn.train.make_epoch(..., guard=True)``, run only when that check fails, from the same inputs
  (same params, same key, hence the same order): every step is checked leaf by leaf inside the
  compiled scan, the failing update is not applied (nor any after it), and the first failure's step,
  site and batch are recorded in the scan carry, with no host callback in the loop. The manual
  backward pass makes every ``δ^l`` available to the check.

With :func:`fnn.optim.skip_nonfinite` in the optimizer, non-finite costs and gradients are its
business: a skipped step changes neither the params nor the batch-norm statistics, and only the
updated values are checked.

One case is seen only by the guarded epoch: a non-finite ``z^l`` that ``φ`` maps back to finite
values (``tanh(±∞)``, ``sigmoid(±∞)``, ``relu(NaN) = 0``) with everything after it finite; the
unguarded epoch lets such a step update the params. The other way round, a finite gradient whose
global norm overflows fails the end-of-epoch check; the guarded rerun then finds every value
finite and training goes on with its result.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fnn.backprop import Trace, backprop_trace
from fnn.checks import all_finite
from fnn.epoch import Observer, Step
from fnn.losses import Loss
from fnn.metrics import evaluate
from fnn.mlp import MLP, Params, State
from fnn.optim import global_norm, has_skip_nonfinite


def nan_sites(net: MLP) -> tuple[str, ...]:
    """Where a step's values are checked for NaN/inf, in the order they are computed:
    ``z^1, a^1, …, z^L, a^L, cost, δ^L, …, δ^1, gradient, update`` (the update: new params,
    optimizer state and batch-norm statistics)."""
    forward = [f"{kind}^{l}" for l in range(1, net.num_layers + 1) for kind in ("z", "a")]
    backward = [f"δ^{l}" for l in range(net.num_layers, 0, -1)]
    return (*forward, "cost", *backward, "gradient", "update")


def site_flags(net: MLP, cost, trace: Trace | None, grads, updated) -> jax.Array:
    """One bool per :func:`nan_sites` entry: True where every value is finite (or not recorded);
    ``updated`` is what the step writes: new params, optimizer state and batch-norm statistics.
    With autodiff (``trace=None``) only the cost, the gradient and the update are seen."""
    if trace is None:
        inner = [jnp.asarray(True)] * (3 * net.num_layers)
    else:
        forward = [all_finite(t) for pair in zip(trace.zs, trace.acts[1:]) for t in pair]
        inner = forward + [all_finite(d) for d in reversed(trace.deltas)]
    flags = inner[: 2 * net.num_layers] + [jnp.isfinite(cost)] + inner[2 * net.num_layers:]
    return jnp.stack(flags + [all_finite(grads), all_finite(updated)])


def guard(net: MLP) -> Observer:
    """The NaN guard: an observer that stops the epoch at the first step with a non-finite value, and
    records its :func:`site_flags` (the first False one names the site). With
    :func:`fnn.optim.skip_nonfinite` in the optimizer only the update counts (a non-finite cost or
    gradient is then a skipped step, not a failure)."""

    def watch(s: Step) -> jax.Array:
        g = s.gradient
        flags = site_flags(net, g.cost, g.trace, g.grads, s.new)
        return jnp.where(flags[-1], True, flags) if has_skip_nonfinite(s.opt_state) else flags

    return Observer("guard", watch, stops=True)


def replay_step(net: MLP, params: Params, opt, opt_state, x, y, loss: Loss, batch, l2: float = 0.0,
                state: State | None = None) -> str:
    """Run one training step eagerly on the samples ``batch`` and describe every layer as a table.

    Meant for the batch a :class:`fnn.FitResult`'s ``nan_report`` names, with the params and
    optimizer state :func:`fnn.fit` kept (those from just before the failing step): it shows, per
    layer, the largest magnitude and the number of non-finite entries of ``z^l``, ``a^l`` and
    ``δ^l``, then the cost, the gradient norm and the update.
    """
    idx = np.asarray(batch)
    xb, yb = jnp.asarray(x)[idx], jnp.asarray(y)[idx]
    cost, grads, _, trace = backprop_trace(net, params, xb, yb, loss, l2, state, True)
    updates, _ = opt.update(grads, opt_state, params)

    def stats(t):
        t = np.asarray(t, np.float64)
        bad = int(np.sum(~np.isfinite(t)))
        finite = t[np.isfinite(t)]
        return f"{np.max(np.abs(finite)) if finite.size else float('nan'):10.3g} {bad:6d}"

    lines = [f"replay of a batch of {len(idx)} samples: cost {float(cost):.6g}, gradient norm "
             f"{float(global_norm(grads)):.6g}, largest |update| "
             f"{max(float(jnp.max(jnp.abs(u))) for u in jax.tree_util.tree_leaves(updates)):.6g}",
             f"{'layer':>5} {'max|z|':>10} {'bad':>6} {'max|a|':>10} {'bad':>6} {'max|δ|':>10} {'bad':>6}"]
    for l in range(net.num_layers):
        lines.append(f"{l + 1:>5} {stats(trace.zs[l])} {stats(trace.acts[l + 1])} {stats(trace.deltas[l])}")
    return "\n".join(lines)


def describe_failure(net: MLP, epoch: int, stats) -> tuple[dict, str]:
    """Where an epoch first turned non-finite, from its :class:`fnn.train.EpochStats` (on the host):
    ``(nan_report, sentence)``, the report :func:`fnn.fit` returns and the message it prints."""
    bad = int(stats.first_bad_step)
    site = nan_sites(net)[int(stats.first_bad_site)]
    batch = [int(i) for i in stats.bad_batch if i >= 0]
    report = {"epoch": epoch, "step": bad, "steps": len(stats.cost), "site": site,
              "cost": float(stats.cost[bad]), "grad_norm": float(stats.grad_norm[bad]), "batch": batch}
    return report, (
        f"non-finite values at epoch {epoch}, step {bad} of {len(stats.cost)}: first in {site} "
        f"(cost {stats.cost[bad]}, gradient norm {stats.grad_norm[bad]}, batch of {len(batch)} samples "
        f"starting {batch[:5]}); training stopped."
    )


def keep_finite(net: MLP, loss: Loss, x, y, boundaries) -> tuple[dict, tuple, str]:
    """After a failed epoch: of ``boundaries``, ``[(epoch, (params, opt_state, state, key)), ...]`` (oldest
    first), the newest whose params, optimizer state and training cost on ``(x, y)`` are finite, as
    ``(kept, values, sentence)``; the oldest candidate if none is."""
    for epoch, values in reversed(boundaries):  # noqa: B007 (newest first; falls through to the oldest)
        finite = all_finite(values[:3])
        cost = evaluate(net, values[0], x, y, loss, state=values[2])["loss"] if finite else math.nan
        if math.isfinite(cost):
            break
    kept = {"epoch": epoch, "train_loss": cost}
    return kept, values, (f"Kept the params from the end of epoch {epoch} (training loss {cost:.6g})." if
                          math.isfinite(cost) else f"Kept the params from the end of epoch {epoch}; their training "
                          "loss is not finite either (the initial params or the data?).")
