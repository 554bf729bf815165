"""Mini-batch gradient descent: one compiled call per epoch, shuffled every epoch.

An epoch, as the theory describes it:

1. shuffle: a fresh permutation of the N training samples from an explicit PRNG key;
2. split into ``⌊N/B⌋`` batches of ``B``; the remaining ``N mod B`` samples form one smaller last
   batch (``last_batch="smaller"``, the default, so every sample is used once per epoch) or are
   left out of this epoch (``last_batch="drop"``; a different subset each epoch, as the order changes);
3. for each batch: forward → cost → backward (the manual :func:`fnn.backprop` or ``jax.grad``) →
   optimizer update.

The whole epoch is one jitted function: ``lax.scan`` over the full batches plus, if any, one step on
the smaller batch. No Python runs per batch.

A non-finite cost, gradient or updated value (params, optimizer state, batch-norm statistics)
stops training, and :func:`fit` reports the epoch, the step, the batch and the first place
(``z^l``, ``a^l``, cost, ``δ^l``, gradient or update, see :func:`nan_sites`) where a non-finite
value appeared; the params it returns are the last finite ones, from just before the failing
step. Checking every step costs time (it doubles the number of XLA kernels in a step), so the
check is split in two:

- ``make_epoch(..., guard=False)``, what :func:`fit` runs every epoch: every update is applied,
  and once at the end the epoch checks that all its costs and gradient norms and its final
  params, optimizer state and batch-norm statistics are finite. A non-finite value in a gradient
  or an update reaches the params or the optimizer state (a NaN through ``p + u``, an overflow
  of Adam's ``v`` in ``v`` itself), so a failure anywhere in the epoch shows there.
- ``make_epoch(..., guard=True)``, run only when that check fails, from the same inputs (same
  params, same key, hence the same order): every step is checked leaf by leaf inside the
  compiled scan, the failing update is not applied (nor any after it), and the first failure's
  step, site and batch are recorded in the scan carry, with no host callback in the loop. The
  manual backward pass makes every ``δ^l`` available to the check.

One case is seen only by the guarded epoch: a non-finite ``z^l`` that ``φ`` maps back to finite
values (``tanh(±∞)``, ``sigmoid(±∞)``, ``relu(NaN) = 0``) with everything after it finite; the
unguarded epoch lets such a step update the params. The other way round, a finite gradient whose
global norm overflows fails the end-of-epoch check; the guarded rerun then finds every value
finite and training goes on with its result.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn import _checks, distributed
from fnn.backprop import Trace, backprop_trace
from fnn.gradcheck import autodiff_grads
from fnn.losses import BINARY, CLASSES, Loss
from fnn.mlp import MLP, Params, State
from fnn.optim import ScaleByLearningRateState, SkipNonfiniteState, current_learning_rate, global_norm


def _manual(net, params, x, y, loss, l2, state):
    return backprop_trace(net, params, x, y, loss, l2, state, True)


def _autodiff(net, params, x, y, loss, l2, state):
    if state is None:
        return (*autodiff_grads(net, params, x, y, loss, l2), None, None)
    return (*autodiff_grads(net, params, x, y, loss, l2, state, True), None)


GRAD_SOURCES: dict[str, Callable] = {"manual": _manual, "autodiff": _autodiff}
"""Gradient sources: ``(net, params, x, y, loss, l2, state) -> (C, grads, new_state, trace or None)``."""
LAST_BATCH = ("smaller", "drop")


class EpochStats(NamedTuple):
    """What the compiled epoch returns besides the new state; arrays of one entry per step."""

    cost: jax.Array  # (steps,) the batch costs; NaN/inf where the step failed
    grad_norm: jax.Array  # (steps,) global gradient norm ‖∇C‖₂ before the update (and before clipping)
    batch_size: jax.Array  # (steps,) samples in each batch
    first_bad_step: jax.Array  # () int32: index of the first non-finite step, −1 if none
    first_bad_site: jax.Array  # () int32: index into nan_sites(net) of the first non-finite value there
    bad_batch: jax.Array  # (B,) int32: the sample indices of that step's batch (−1 padded), or all −1


def nan_sites(net: MLP) -> tuple[str, ...]:
    """Where a step's values are checked for NaN/inf, in the order they are computed:
    ``z^1, a^1, …, z^L, a^L, cost, δ^L, …, δ^1, gradient, update`` (the update: new params,
    optimizer state and batch-norm statistics)."""
    forward = [f"{kind}^{l}" for l in range(1, net.num_layers + 1) for kind in ("z", "a")]
    backward = [f"δ^{l}" for l in range(net.num_layers, 0, -1)]
    return (*forward, "cost", *backward, "gradient", "update")


def _site_flags(net: MLP, cost, trace: Trace | None, grads, updated) -> jax.Array:
    """One bool per :func:`nan_sites` entry: True where every value is finite (or not recorded);
    ``updated`` is what the step writes: new params, optimizer state and batch-norm statistics."""
    if trace is None:  # autodiff: only the cost, the gradient and the update are seen
        inner = [jnp.asarray(True)] * (3 * net.num_layers)
    else:
        forward = [all_finite(t) for pair in zip(trace.zs, trace.acts[1:]) for t in pair]
        inner = forward + [all_finite(d) for d in reversed(trace.deltas)]
    flags = inner[: 2 * net.num_layers] + [jnp.isfinite(cost)] + inner[2 * net.num_layers:]
    return jnp.stack(flags + [all_finite(grads), all_finite(updated)])


class FitResult(NamedTuple):
    """The outcome of :func:`fit`: final (last finite) state and the per-epoch history."""

    params: Params
    opt_state: Any
    key: jax.Array
    epoch: int  # epochs completed, counting those before a resume
    history: list  # one dict per epoch, see :func:`fit`
    stopped: str | None  # why training stopped early, or None
    state: State | None = None  # batch-norm running statistics, for networks that have them
    nan_report: dict | None = None  # where the first non-finite value appeared, see fit


def all_finite(tree) -> jax.Array:
    """True when every entry of every leaf is finite (no NaN, no ±inf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def _is_skip(node) -> bool:
    return isinstance(node, SkipNonfiniteState)


def _has_skip(opt_state) -> bool:
    """Whether the optimizer state holds a :func:`fnn.optim.skip_nonfinite` (known at trace time)."""
    return any(map(_is_skip, jax.tree_util.tree_leaves(opt_state, is_leaf=_is_skip)))


def skipped_updates(opt_state) -> int | None:
    """Updates skipped so far by :func:`fnn.optim.skip_nonfinite` inside ``opt_state`` (``None`` if absent)."""
    found = [n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_skip) if _is_skip(n)]
    return sum(int(n.skipped) for n in found) if found else None


def _learning_rate_of(opt):
    """The learning rate (float or schedule) of an :class:`fnn.optim.Optimizer` with exactly one
    step counter, else ``None`` (a chain or a foreign transform: no rate is reported)."""
    rate = getattr(opt, "hyperparams", {}).get("learning_rate")
    if rate is None:
        return None
    try:
        probe = jax.eval_shape(opt.init, [{"W": jax.ShapeDtypeStruct((1, 1), jnp.float32)}])
    except (ValueError, TypeError):
        return None
    counters = [s for s in jax.tree_util.tree_leaves(probe, is_leaf=_is_rate) if _is_rate(s)]
    return rate if len(counters) == 1 else None


def _rate_of_last_update(rate, opt_state):
    count = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_rate) if _is_rate(s)][0].count
    return rate(jnp.maximum(count - 1, 0)) if callable(rate) else jnp.asarray(rate)


def _is_rate(node) -> bool:
    return isinstance(node, ScaleByLearningRateState)


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
    mesh=None,
    guard: bool = True,
    grad_norm: bool = True,
) -> Callable:
    """The (un-jitted) epoch function
    ``(params, opt_state, state, key, x, y) -> (params, opt_state, state, key, stats)``.

    ``x: (N, n_0)``, ``y``: targets for all ``N`` samples; ``state`` the batch-norm running
    statistics (``None`` without batch norm). The key is split once per epoch; the returned key is
    the one to pass to the next epoch. With a ``mesh`` (see :mod:`fnn.distributed`) every batch is
    sharded over its ``"data"`` axis.

    ``guard=True`` checks every step and stops updating at the first non-finite value, recording
    where (``stats.first_bad_step``, ``first_bad_site``, ``bad_batch``). ``guard=False`` applies
    every update and checks only once, at the end: ``first_bad_step`` is then ``steps`` (one past
    the last step) when a cost, a gradient norm (if recorded) or a final param, optimizer-state
    or batch-norm entry is non-finite, else −1, and the site and batch are not known (−1); rerun
    the epoch with ``guard=True`` from the same inputs to find them. With
    :func:`fnn.optim.skip_nonfinite` in the optimizer, non-finite costs and gradients are its
    business: a skipped step changes neither the params nor the batch-norm statistics, and only
    the updated values are checked.

    ``grad_norm=False`` leaves out the global gradient norm of every step (``stats.grad_norm`` is
    then NaN): it saves one pass over the gradients per step, 3–5 % of a small model's step on a CPU.
    """
    grads_of = _checks.lookup(GRAD_SOURCES, "gradient source", grad_source)
    _checks.lookup(dict.fromkeys(LAST_BATCH), "last_batch rule", last_batch)

    def gradients_and_update(x, y, params, opt_state, state, idx):
        xb, yb = x[idx], y[idx]
        if mesh is not None:  # data parallel: the partitioner turns batch sums into all-reduces
            xb, yb = (jax.lax.with_sharding_constraint(t, distributed.batch_sharded(mesh)) for t in (xb, yb))
        cost, grads, new_bn, trace = grads_of(net, params, xb, yb, loss, l2, state)
        norm = global_norm(grads) if grad_norm else jnp.full((), jnp.nan, cost.dtype)
        updates, new_state = opt.update(grads, opt_state, params)
        new_params = jax.tree_util.tree_map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        if state is not None and _has_skip(opt_state):  # a skipped step leaves the running statistics too
            new_bn = _select(all_finite((grads, new_bn)), new_bn, state)
        return cost, grads, norm, trace, new_params, new_state, new_bn

    def plain_step(x, y, carry, batch):
        params, opt_state, state = carry
        cost, _, norm, _, params, opt_state, state = gradients_and_update(x, y, *carry, batch[1])
        return (params, opt_state, state), (cost, norm)

    def step(x, y, carry, batch):
        params, opt_state, state, bad, site, bad_batch = carry
        skips = _has_skip(opt_state)
        i, idx = batch
        cost, grads, norm, trace, new_params, new_state, new_bn = gradients_and_update(
            x, y, params, opt_state, state, idx)
        # Checked leaf by leaf (the norm may overflow for huge finite gradients), without host
        # callbacks: the first failure's step, site and batch are recorded in the carry. With
        # skip_nonfinite in the optimizer a non-finite gradient is its business; the update is not.
        flags = _site_flags(net, cost, trace, grads, (new_params, new_state, new_bn))
        finite = flags[-1] if skips else jnp.all(flags)
        first = (bad < 0) & ~finite
        bad = jnp.where(first, i, bad)
        site = jnp.where(first, jnp.argmin(flags).astype(jnp.int32), site)
        padded = jnp.full(bad_batch.shape, -1, jnp.int32).at[: idx.shape[0]].set(idx.astype(jnp.int32))
        bad_batch = jnp.where(first, padded, bad_batch)
        ok = finite & (bad < 0)  # after a failure no further update is applied
        params, opt_state, state = _select(ok, (new_params, new_state, new_bn), (params, opt_state, state))
        return (params, opt_state, state, bad, site, bad_batch), (cost, norm)

    def epoch(params, opt_state, state, key, x, y):
        key, shuffle_key = jax.random.split(key)  # shuffle at the start of every epoch
        batches, rest = shuffled_batches(shuffle_key, num_samples, batch_size, last_batch)
        full = batches.shape[0]
        minus = jnp.asarray(-1, jnp.int32)
        unknown = jnp.full((batch_size,), -1, jnp.int32)
        carry = (params, opt_state, state, minus, minus, unknown) if guard else (params, opt_state, state)
        body = functools.partial(step if guard else plain_step, x, y)
        carry, (costs, norms) = jax.lax.scan(body, carry, (jnp.arange(full, dtype=jnp.int32), batches))
        sizes = jnp.full((full,), batch_size, jnp.int32)
        if rest.shape[0]:
            carry, (c, g) = body(carry, (jnp.asarray(full, jnp.int32), rest))
            costs, norms = jnp.append(costs, c), jnp.append(norms, g)
            sizes = jnp.append(sizes, jnp.asarray(rest.shape[0], jnp.int32))
        if guard:
            params, opt_state, state, bad, site, bad_batch = carry
        else:
            params, opt_state, state = carry
            finite = all_finite((params, opt_state, state))
            if not _has_skip(opt_state):
                finite = finite & all_finite((costs, norms) if grad_norm else costs)
            bad, site, bad_batch = jnp.where(finite, -1, costs.shape[0]).astype(jnp.int32), minus, unknown
        return params, opt_state, state, key, EpochStats(costs, norms, sizes, bad, site, bad_batch)

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
        cost, acc = distributed.to_host(fn(params, state, xb, yb))
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
    mesh=None,
    data_parallel: bool = False,
    grad_norm: bool = True,
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
      mesh: a 1-D device mesh (:func:`fnn.distributed.data_mesh`) for data-parallel training: every
        batch is sharded over it, params and optimizer state replicated. ``train`` may hold global
        arrays made by :func:`fnn.distributed.global_batch_arrays` (one shard per process).
      data_parallel: shorthand for ``mesh=fnn.distributed.data_mesh()`` (every device).
      grad_norm: record the global gradient norm of every step (the default); ``False`` saves
        3–5 % of a small model's step on a CPU and leaves ``grad_norm`` out of the history.
      quiet: no progress lines.

    Returns:
      A :class:`FitResult`. ``history`` has one dict per epoch: ``epoch``, ``train_loss`` (mean cost
      over the epoch's samples), ``grad_norm`` (mean over the epoch's steps of the global gradient
      norm before clipping), ``learning_rate`` and ``learning_rate_last`` (the rates of the epoch's first and last
      updates, from the schedule and the state's step count; optimizers from :mod:`fnn.optim`),
      ``skipped_updates`` (with :func:`fnn.optim.skip_nonfinite`), ``held_out_loss``,
      ``held_out_accuracy``, ``samples_per_s``, ``seconds`` (epoch wall time) and ``elapsed``.
      ``history`` entries are plain Python numbers.
    """
    if data_parallel and mesh is None:
        mesh = distributed.data_mesh()
    x, y = train
    local = not isinstance(x, jax.Array) or x.is_fully_addressable
    x = net.check_input(params, x)
    y = jnp.asarray(y) if local else y
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"train targets have {y.shape[0]} samples but x has {n}.")
    if local:
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

    epoch_kw = dict(num_samples=n, batch_size=batch_size, l2=l2, grad_source=grad_source, last_batch=last_batch,
                    mesh=mesh, grad_norm=grad_norm)
    opt_state = opt.init(params) if opt_state is None else opt_state
    if state is None and net.has_state:
        state = net.init_state(x.dtype)
    net.check_state(state)
    if mesh is not None:
        distributed.check_divisible(mesh, batch_size, n % batch_size if last_batch == "smaller" else 0)
        everywhere = distributed.replicated(mesh)
        params, opt_state, state, key = jax.device_put((params, opt_state, state, key), everywhere)
        if local:
            x, y = jax.device_put((x, y), everywhere)
        if held_out is not None:
            held_out = jax.device_put(held_out, everywhere)
    # The normal path: unguarded and not donated, so that a failed epoch can be run again, guarded,
    # from the same inputs. The guarded epoch is compiled only if it is ever needed.
    fast = jax.jit(make_epoch(net, loss, opt, guard=False, **epoch_kw)).lower(
        params, opt_state, state, key, x, y).compile()
    guarded = functools.cache(lambda: jax.jit(make_epoch(net, loss, opt, guard=True,
                                                         **{**epoch_kw, "grad_norm": True})))

    history, stopped, nan_report, start = [], None, None, time.perf_counter()
    epoch = start_epoch
    rate = _learning_rate_of(opt)
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        lr_first = None if rate is None else float(distributed.to_host(current_learning_rate(rate, opt_state)))
        t0 = time.perf_counter()
        before = (params, opt_state, state, key)
        params, opt_state, state, key, stats = fast(*before, x, y)
        stats = distributed.to_host(stats)
        if int(stats.first_bad_step) >= 0:  # find where, and keep the params from before that step
            params, opt_state, state, key, stats = guarded()(*before, x, y)
            stats = distributed.to_host(stats)
        seconds = time.perf_counter() - t0
        bad = int(stats.first_bad_step)
        good = slice(None) if bad < 0 else slice(0, bad)
        kept = np.isfinite(stats.cost[good])  # with skip_nonfinite, skipped steps have no cost to average
        sizes = stats.batch_size[good][kept]
        record = {
            "epoch": epoch,
            "train_loss": _weighted_mean(stats.cost[good][kept], sizes),
            "samples_per_s": n / seconds,
            "seconds": seconds,
            "elapsed": time.perf_counter() - start,
        }
        if grad_norm:
            record["grad_norm"] = _weighted_mean(stats.grad_norm[good][kept], np.ones_like(sizes))
        if rate is not None:  # the rates of the epoch's first and last updates, from the state's step count
            record["learning_rate"] = lr_first
            record["learning_rate_last"] = float(distributed.to_host(
                _rate_of_last_update(rate, opt_state)))
        skipped = skipped_updates(opt_state)
        if skipped is not None:
            record["skipped_updates"] = skipped
        if held_out is not None:
            scores = evaluate(net, params, *held_out, loss, state=state)
            record["held_out_loss"], record["held_out_accuracy"] = scores["loss"], scores["accuracy"]
        history.append(record)
        if bad >= 0:
            site = nan_sites(net)[int(stats.first_bad_site)]
            batch = [int(i) for i in stats.bad_batch if i >= 0]
            nan_report = {"epoch": epoch, "step": bad, "steps": len(stats.cost), "site": site,
                          "cost": float(stats.cost[bad]), "grad_norm": float(stats.grad_norm[bad]), "batch": batch}
            stopped = (
                f"non-finite values at epoch {epoch}, step {bad} of {len(stats.cost)}: first in {site} "
                f"(cost {stats.cost[bad]}, gradient norm {stats.grad_norm[bad]}, batch of {len(batch)} samples "
                f"starting {batch[:5]}); training stopped and the parameters from before that step are kept."
            )
            if not quiet:
                print_fn(stopped)
            break
        if not quiet:
            print_fn(format_epoch(record, start_epoch + epochs))
        if on_epoch_end is not None:
            on_epoch_end(FitResult(params, opt_state, key, epoch, history, None, state))
    return FitResult(params, opt_state, key, epoch if stopped is None else epoch - 1, history, stopped, state,
                     nan_report)


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


def replay_step(net: MLP, params: Params, opt, opt_state, x, y, loss: Loss, batch, l2: float = 0.0,
                state: State | None = None) -> str:
    """Run one training step eagerly on the samples ``batch`` and describe every layer as a table.

    Meant for the batch a :class:`FitResult`'s ``nan_report`` names, with the params and optimizer
    state :func:`fit` kept (those from just before the failing step): it shows, per layer, the
    largest magnitude and the number of non-finite entries of ``z^l``, ``a^l`` and ``δ^l``, then the
    cost, the gradient norm and the update.
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
