"""Mini-batch gradient descent: one compiled call per epoch, shuffled every epoch.

An epoch, as the theory describes it:

1. shuffle: a fresh permutation of the N training samples from an explicit PRNG key;
2. split into ``⌊N/B⌋`` batches of ``B``; the remaining ``N mod B`` samples form one smaller last
   batch (``last_batch="smaller"``, the default, so every sample is used once per epoch) or are
   left out of this epoch (``last_batch="drop"``; a different subset each epoch, as the order changes);
3. for each batch: forward → cost → backward (the manual :func:`fnn.backprop` or ``jax.grad``) →
   optimizer update.

The whole epoch is one jitted function: ``lax.scan`` over the full batches plus, if any, one step on
the smaller batch, with params and optimizer state donated. No Python runs per batch.

A non-finite cost, gradient or updated parameter stops training: inside the compiled epoch the
failing update is not applied (nor any after it), so the params returned are the last finite ones,
and :func:`fit` reports the epoch and the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn import _checks
from fnn.backprop import backprop
from fnn.gradcheck import autodiff_grads
from fnn.losses import BINARY, CLASSES, Loss
from fnn.mlp import MLP, Params, State

GRAD_SOURCES: dict[str, Callable] = {"manual": backprop, "autodiff": autodiff_grads}
LAST_BATCH = ("smaller", "drop")


class EpochStats(NamedTuple):
    """What the compiled epoch returns besides the new state; arrays of one entry per step."""

    cost: jax.Array  # (steps,) the batch costs; NaN/inf where the step failed
    grad_norm: jax.Array  # (steps,) global gradient norm ‖∇C‖₂ before the update
    batch_size: jax.Array  # (steps,) samples in each batch
    first_bad_step: jax.Array  # () int32: index of the first non-finite step, −1 if none


class FitResult(NamedTuple):
    """The outcome of :func:`fit`: final (last finite) state and the per-epoch history."""

    params: Params
    opt_state: Any
    key: jax.Array
    epoch: int  # epochs completed, counting those before a resume
    history: list  # one dict per epoch, see :func:`fit`
    stopped: str | None  # why training stopped early, or None
    state: State | None = None  # batch-norm running statistics, for networks that have them


def global_norm(tree) -> jax.Array:
    """``‖tree‖₂ = sqrt(Σ_leaves Σ x²)``."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


def all_finite(tree) -> jax.Array:
    """True when every entry of every leaf is finite (no NaN, no ±inf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def _select(ok, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def shuffled_batches(key: jax.Array, num_samples: int, batch_size: int, last_batch: str = "smaller"):
    """One epoch's sample order: ``(full (⌊N/B⌋, B), rest (N mod B,))`` index arrays.

    A fresh permutation of ``0..N−1`` from ``key``, cut into full batches; ``rest`` holds the
    leftover indices (empty with ``last_batch="drop"``). Every index appears exactly once in
    ``full`` and ``rest`` together, except the dropped ones.
    """
    full = num_samples // batch_size
    order = jax.random.permutation(key, num_samples)
    rest = order[full * batch_size:] if last_batch == "smaller" else order[:0]
    return order[: full * batch_size].reshape(full, batch_size), rest


def make_epoch(
    net: MLP,
    loss: Loss,
    opt,
    *,
    num_samples: int,
    batch_size: int,
    l2: float = 0.0,
    grad_source: str = "manual",
    last_batch: str = "smaller",
) -> Callable:
    """The (un-jitted) epoch function
    ``(params, opt_state, state, key, x, y) -> (params, opt_state, state, key, stats)``.

    ``x: (N, n_0)``, ``y``: targets for all ``N`` samples; ``state`` the batch-norm running
    statistics (``None`` without batch norm). The key is split once per epoch; the returned key is
    the one to pass to the next epoch.
    """
    grads_of = _checks.lookup(GRAD_SOURCES, "gradient source", grad_source)
    _checks.lookup(dict.fromkeys(LAST_BATCH), "last_batch rule", last_batch)

    def step(carry, batch):
        params, opt_state, state, bad = carry
        i, xb, yb = batch
        if state is None:
            cost, grads = grads_of(net, params, xb, yb, loss, l2)
            new_bn = None
        else:
            cost, grads, new_bn = grads_of(net, params, xb, yb, loss, l2, state, True)
        norm = global_norm(grads)
        updates, new_state = opt.update(grads, opt_state, params)
        new_params = jax.tree_util.tree_map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        # the norm may overflow for huge finite gradients, so finiteness is checked leaf by leaf
        finite = jnp.isfinite(cost) & all_finite(grads) & all_finite(new_params)
        ok = finite & (bad < 0)  # after a failure no further update is applied
        bad = jnp.where((bad < 0) & ~finite, i, bad)
        params, opt_state, state = _select(ok, (new_params, new_state, new_bn), (params, opt_state, state))
        return (params, opt_state, state, bad), (cost, norm)

    def epoch(params, opt_state, state, key, x, y):
        key, shuffle_key = jax.random.split(key)  # shuffle at the start of every epoch
        batches, rest = shuffled_batches(shuffle_key, num_samples, batch_size, last_batch)
        full = batches.shape[0]
        carry = (params, opt_state, state, jnp.asarray(-1, jnp.int32))
        carry, (costs, norms) = jax.lax.scan(step, carry, (jnp.arange(full, dtype=jnp.int32), x[batches], y[batches]))
        sizes = jnp.full((full,), batch_size, jnp.int32)
        if rest.shape[0]:
            carry, (c, g) = step(carry, (jnp.asarray(full, jnp.int32), x[rest], y[rest]))
            costs, norms = jnp.append(costs, c), jnp.append(norms, g)
            sizes = jnp.append(sizes, jnp.asarray(rest.shape[0], jnp.int32))
        params, opt_state, state, bad = carry
        return params, opt_state, state, key, EpochStats(costs, norms, sizes, bad)

    return epoch


def predictions_accuracy(net: MLP, loss: Loss, output: jax.Array, y: jax.Array) -> jax.Array | None:
    """Fraction of correct predictions, or ``None`` for regression losses.

    Classes: ``argmax`` of the output against the label (or the one-hot row's argmax). Binary: the
    output thresholded at 0 (logits, identity output) or 0.5 (probabilities).
    """
    if loss.targets == CLASSES:
        labels = y if jnp.issubdtype(y.dtype, jnp.integer) else jnp.argmax(y, axis=-1)
        return jnp.mean(jnp.argmax(output, axis=-1) == labels)
    if loss.targets == BINARY:
        threshold = 0.0 if net.output == "identity" else 0.5
        target, _ = loss.target(output, y)
        return jnp.mean((output > threshold) == (target > 0.5))
    return None


def evaluate(net: MLP, params: Params, x: jax.Array, y: jax.Array, loss: Loss, batch_size: int = 4096,
             state: State | None = None) -> dict:
    """Held-out cost and accuracy (``None`` for regression), computed in chunks of ``batch_size``.

    Batch-normalized networks are evaluated in eval mode, with the running statistics ``state``.
    """
    fn = _evaluate_fn(net, loss)
    totals, count = None, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        cost, acc = fn(params, state, xb, yb)
        weight = xb.shape[0]
        part = (float(cost) * weight, None if acc is None else float(acc) * weight)
        totals = part if totals is None else (totals[0] + part[0], None if acc is None else totals[1] + part[1])
        count += weight
    return {"loss": totals[0] / count, "accuracy": None if totals[1] is None else totals[1] / count}


_EVAL_CACHE: dict = {}


def _evaluate_fn(net, loss):
    if (net, loss) not in _EVAL_CACHE:
        def fn(params, state, x, y):
            out = net.apply(params, x, state)
            return loss(out, y), predictions_accuracy(net, loss, out, y)
        _EVAL_CACHE[(net, loss)] = jax.jit(fn)
    return _EVAL_CACHE[(net, loss)]


def fit(
    net: MLP,
    params: Params,
    opt,
    train: tuple[jax.Array, jax.Array],
    *,
    loss: Loss,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    held_out: tuple[jax.Array, jax.Array] | None = None,
    l2: float = 0.0,
    grad_source: str = "manual",
    last_batch: str = "smaller",
    opt_state: Any = None,
    state: State | None = None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[FitResult], None] | None = None,
    quiet: bool = False,
    print_fn: Callable[[str], None] = print,
) -> FitResult:
    """Train ``net`` by mini-batch gradient descent; one compiled call per epoch.

    Args:
      net, params: the model and its initial parameters.
      opt: a gradient transformation ``(init, update)`` from :mod:`fnn.optim`.
      train: ``(x (N, n_0), y)`` training inputs and targets (already normalized).
      loss: the cost; l2: ``β`` of ``½β Σ‖W‖²``.
      epochs: epochs to run in this call (after ``start_epoch`` already done).
      batch_size: ``B``; the last ``N mod B`` samples form a smaller batch or are dropped.
      key: PRNG key for the per-epoch shuffles.
      held_out: optional ``(x, y)`` evaluated after every epoch.
      grad_source: ``"manual"`` (:func:`fnn.backprop`) or ``"autodiff"`` (``jax.grad``).
      opt_state, start_epoch: to resume; ``opt_state`` defaults to ``opt.init(params)``.
      state: batch-norm running statistics; defaults to ``net.init_state()`` for networks with
        batch norm (trained in train mode, evaluated in eval mode), ``None`` otherwise.
      on_epoch_end: called with the state after every finished epoch (e.g. to checkpoint).
      quiet: no progress lines.

    Returns:
      A :class:`FitResult`. ``history`` has one dict per epoch: ``epoch``, ``train_loss`` (mean cost
      over the epoch's samples), ``grad_norm`` (mean global gradient norm), ``held_out_loss``,
      ``held_out_accuracy``, ``samples_per_s``, ``seconds`` (epoch wall time) and ``elapsed``.
      ``history`` entries are plain Python numbers.
    """
    x, y = train
    x = net.check_input(params, x)
    y = jnp.asarray(y)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"train targets have {y.shape[0]} samples but x has {n}.")
    loss.target(jnp.zeros((n, net.sizes[-1]), x.dtype), y)  # validates targets (and label range) up front
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, {n}] (the training set size); got {batch_size!r}.")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int; got {epochs!r}.")
    if held_out is not None:
        held_out = (net.check_input(params, held_out[0]), jnp.asarray(held_out[1]))
    if net.has_state and last_batch == "smaller" and n % batch_size == 1:
        raise ValueError(
            f"with batch normalization the last batch of {n} samples in batches of {batch_size} would hold "
            f"1 sample, which has no batch variance; use last_batch='drop' or another batch size."
        )

    epoch_fn = make_epoch(net, loss, opt, num_samples=n, batch_size=batch_size, l2=l2,
                          grad_source=grad_source, last_batch=last_batch)
    opt_state = opt.init(params) if opt_state is None else opt_state
    if state is None and net.has_state:
        state = net.init_state(x.dtype)
    net.check_state(state)
    # Copy what will be donated so the caller's arrays stay valid.
    params, opt_state, state = jax.tree_util.tree_map(jnp.copy, (params, opt_state, state))
    compiled = jax.jit(epoch_fn, donate_argnums=(0, 1, 2)).lower(params, opt_state, state, key, x, y).compile()

    history, stopped, start = [], None, time.perf_counter()
    epoch = start_epoch
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        t0 = time.perf_counter()
        params, opt_state, state, key, stats = compiled(params, opt_state, state, key, x, y)
        stats = jax.device_get(stats)
        seconds = time.perf_counter() - t0
        bad = int(stats.first_bad_step)
        good = slice(None) if bad < 0 else slice(0, bad)
        sizes = stats.batch_size[good]
        record = {
            "epoch": epoch,
            "train_loss": _weighted_mean(stats.cost[good], sizes),
            "grad_norm": _weighted_mean(stats.grad_norm[good], np.ones_like(sizes)),
            "samples_per_s": n / seconds,
            "seconds": seconds,
            "elapsed": time.perf_counter() - start,
        }
        if held_out is not None:
            scores = evaluate(net, params, *held_out, loss, state=state)
            record["held_out_loss"], record["held_out_accuracy"] = scores["loss"], scores["accuracy"]
        history.append(record)
        if bad >= 0:
            stopped = (
                f"non-finite cost, gradient or update at epoch {epoch}, step {bad} of {len(stats.cost)} "
                f"(cost {stats.cost[bad]}, gradient norm {stats.grad_norm[bad]}); training stopped "
                f"and the parameters from before that step are kept."
            )
            if not quiet:
                print_fn(stopped)
            break
        if not quiet:
            print_fn(format_epoch(record, start_epoch + epochs))
        if on_epoch_end is not None:
            on_epoch_end(FitResult(params, opt_state, key, epoch, history, None, state))
    return FitResult(params, opt_state, key, epoch if stopped is None else epoch - 1, history, stopped, state)


def _weighted_mean(values, weights) -> float:
    weights = np.asarray(weights, np.float64)
    return float(np.sum(np.asarray(values, np.float64) * weights) / weights.sum()) if weights.size else math.nan


def format_epoch(record: dict, epochs: int) -> str:
    """One progress line: epoch, train loss, held-out loss and accuracy, samples/s, elapsed."""
    parts = [f"epoch {record['epoch']:>3}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    if "held_out_loss" in record:
        parts.append(f"held-out loss {record['held_out_loss']:.4f}")
        if record["held_out_accuracy"] is not None:
            parts.append(f"acc {100 * record['held_out_accuracy']:.2f}%")
    parts += [f"{record['samples_per_s']:,.0f} samples/s", f"{record['elapsed']:.1f}s"]
    return "  ".join(parts)
