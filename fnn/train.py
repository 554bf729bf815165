"""Mini-batch gradient descent: one compiled call per epoch, shuffled every epoch.

An epoch, as the theory describes it: a fresh permutation of the ``N`` samples from an explicit
PRNG key, cut into ``⌊N/B⌋`` batches of ``B`` and, for the ``N mod B`` left over, one smaller
last batch (``last_batch="smaller"``, so every sample is used once per epoch) or none
(``"drop"``); for each batch, :func:`fnn.train_step` (gradient, then the optimizer's update). The
whole epoch is one jitted function, a ``lax.scan`` over the batches; no Python runs per batch.
With DP-SGD (``fit(..., privacy=...)``) the steps take Poisson lots instead (:mod:`fnn.privacy`).

A non-finite cost, gradient or updated value stops training; :func:`fit` reports where it happened
and keeps the params of the last epoch boundary whose training cost is finite. The check runs once
per epoch on the normal path and step by step only when an epoch fails (see :mod:`fnn.diagnose`).

The compiled epoch is cached: a second :func:`fit` with the same network, loss, optimizer (the same
object, or an :class:`fnn.optim.Optimizer` built by the same factory with equal hyper-parameters),
settings and array shapes reuses it instead of compiling again.
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checks, distributed, optim
from fnn.diagnose import all_finite, describe_failure, nan_sites, replay_step, site_flags  # noqa: F401
from fnn.losses import Loss, check_output
from fnn.metrics import epoch_record, evaluate, format_epoch, predictions_accuracy  # noqa: F401
from fnn.mlp import MLP, Params, State
from fnn.optim import global_norm, has_skip_nonfinite, scheduled_learning_rate, skipped_updates
from fnn.per_example import check_statistics, step_statistics
from fnn.privacy import Privacy, PrivatePlan, Spent, plan, private_gradient
from fnn.step import GRAD_SOURCES, train_step

LAST_BATCH = ("smaller", "drop")
_CACHE_SIZE = 16
_EPOCHS: collections.OrderedDict = collections.OrderedDict()  # (configuration, signature) -> compiled epoch


class EpochStats(NamedTuple):
    """What the compiled epoch returns besides the new state; arrays of one entry per step."""

    cost: jax.Array  # (steps,) the batch costs; NaN/inf where the step failed
    grad_norm: jax.Array  # (steps,) global gradient norm ‖∇C‖₂ before the update (and before clipping)
    batch_size: jax.Array  # (steps,) samples in each batch
    first_bad_step: jax.Array  # () int32: index of the first non-finite step, −1 if none
    first_bad_site: jax.Array  # () int32: index into nan_sites(net) of the first non-finite value there
    bad_batch: jax.Array  # (B,) int32: the sample indices of that step's batch (−1 padded), or all −1
    per_example: dict = {}  # per step, the statistics of fnn.per_example.step_statistics (steps, ...)


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
    before_failure: tuple | None = None  # (params, opt_state, state) just before the failing step, to replay it
    privacy_spent: Spent | None = None  # with privacy: every private step taken so far, earlier runs' included


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
    per_example: tuple[str, ...] = (),
    privacy: PrivatePlan | None = None,
) -> Callable:
    """The (un-jitted) epoch function
    ``(params, opt_state, state, key, x, y) -> (params, opt_state, state, key, stats)``.

    ``x: (N, n_0)``, ``y``: targets for all ``N`` samples; ``state`` the batch-norm running
    statistics (``None`` without batch norm). The key is split once per epoch; the returned key is
    the one to pass to the next epoch. With a ``mesh`` (see :mod:`fnn.distributed`) every batch is
    sharded over its ``"data"`` axis.

    ``guard=True`` checks every step and stops updating at the first non-finite value, recording
    where (``stats.first_bad_step``, ``first_bad_site``, ``bad_batch``); ``guard=False`` checks once
    at the end (``first_bad_step`` is then ``steps`` or −1; site and batch −1): see
    :mod:`fnn.diagnose`. ``grad_norm=False`` leaves out the global gradient norm of every step
    (``stats.grad_norm`` NaN). ``per_example`` names statistics of
    :data:`fnn.per_example.STATISTICS` to compute at every step (``stats.per_example``). With a
    ``privacy`` plan (:func:`fnn.privacy.plan`) the epoch is ``privacy.steps`` DP-SGD steps on
    fresh Poisson lots (:func:`fnn.privacy.private_gradient`) instead of a pass over a permutation.
    """
    checks.lookup(GRAD_SOURCES, "gradient source", grad_source)
    checks.lookup(dict.fromkeys(LAST_BATCH), "last_batch rule", last_batch)
    if privacy is not None and isinstance(opt, optim.BatchOptimizer):
        raise ValueError(
            f"the {opt.name} optimizer reads the curvature of the batch, which the privacy analysis does not "
            "cover (it bounds one example's influence through the clipped gradient only). Use a first-order "
            "optimizer with privacy.")
    per_example = check_statistics(net, per_example, grad_source)

    def gradients_and_update(x, y, params, opt_state, state, idx):
        if privacy is not None:  # idx is the step's key
            grads, s = private_gradient(net, params, x, y, loss, idx, clip=privacy.clip, q=privacy.q,
                                        noise_multiplier=privacy.noise_multiplier, chunk=privacy.chunk, l2=l2)
            norm = global_norm(grads) if grad_norm else jnp.full((), jnp.nan, s.cost.dtype)
            return (s.cost, grads, (norm, {"lot_size": s.lot_size}), None,
                    *optim.step(opt, grads, opt_state, params), state)
        xb, yb = x[idx], y[idx]
        if mesh is not None:  # data parallel: the partitioner turns batch sums into all-reduces
            xb, yb = (jax.lax.with_sharding_constraint(t, distributed.batch_sharded(mesh)) for t in (xb, yb))
        r = train_step(net, opt, params, opt_state, xb, yb, loss, l2=l2, state=state, grad_source=grad_source)
        norm = global_norm(r.grads) if grad_norm else jnp.full((), jnp.nan, r.cost.dtype)
        new_bn = r.state
        if state is not None and has_skip_nonfinite(opt_state):  # a skipped step leaves the statistics too
            new_bn = _select(all_finite((r.grads, new_bn)), new_bn, state)
        extra = step_statistics(net, params, r.trace, l2, per_example, batch_size)
        return r.cost, r.grads, (norm, extra), r.trace, r.params, r.opt_state, new_bn

    def plain_step(x, y, carry, batch):
        params, opt_state, state = carry
        cost, _, norm, _, params, opt_state, state = gradients_and_update(x, y, *carry, batch[1])
        return (params, opt_state, state), (cost, *norm)

    def step(x, y, carry, batch):
        params, opt_state, state, bad, site, bad_batch = carry
        skips = has_skip_nonfinite(opt_state)
        i, idx = batch
        cost, grads, norm, trace, new_params, new_state, new_bn = gradients_and_update(
            x, y, params, opt_state, state, idx)
        # Checked leaf by leaf (the norm may overflow for huge finite gradients), without host
        # callbacks: the first failure's step, site and batch are recorded in the carry. With
        # skip_nonfinite in the optimizer a non-finite gradient is its business; the update is not.
        flags = site_flags(net, cost, trace, grads, (new_params, new_state, new_bn))
        finite = flags[-1] if skips else jnp.all(flags)
        first = (bad < 0) & ~finite
        bad = jnp.where(first, i, bad)
        site = jnp.where(first, jnp.argmin(flags).astype(jnp.int32), site)
        if privacy is None:  # a private step's lot is not recorded
            padded = jnp.full(bad_batch.shape, -1, jnp.int32).at[: idx.shape[0]].set(idx.astype(jnp.int32))
            bad_batch = jnp.where(first, padded, bad_batch)
        ok = finite & (bad < 0)  # after a failure no further update is applied
        params, opt_state, state = _select(ok, (new_params, new_state, new_bn), (params, opt_state, state))
        return (params, opt_state, state, bad, site, bad_batch), (cost, *norm)

    def epoch(params, opt_state, state, key, x, y):
        key, shuffle_key = jax.random.split(key)  # shuffle at the start of every epoch
        if privacy is None:
            batches, rest = shuffled_batches(shuffle_key, num_samples, batch_size, last_batch)
        else:  # one key per step, for its Poisson lot and its noise
            batches, rest = jax.random.split(shuffle_key, privacy.steps), jnp.zeros((0,), jnp.int32)
        full = batches.shape[0]
        minus = jnp.asarray(-1, jnp.int32)
        unknown = jnp.full((batch_size,), -1, jnp.int32)
        carry = (params, opt_state, state, minus, minus, unknown) if guard else (params, opt_state, state)
        body = functools.partial(step if guard else plain_step, x, y)
        carry, (costs, norms, extra) = jax.lax.scan(body, carry, (jnp.arange(full, dtype=jnp.int32), batches))
        sizes = jnp.full((full,), batch_size, jnp.int32) if privacy is None else extra.pop("lot_size")
        if rest.shape[0]:
            carry, (c, g, e) = body(carry, (jnp.asarray(full, jnp.int32), rest))
            costs, norms = jnp.append(costs, c), jnp.append(norms, g)
            extra = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), extra, e)
            sizes = jnp.append(sizes, jnp.asarray(rest.shape[0], jnp.int32))
        if guard:
            params, opt_state, state, bad, site, bad_batch = carry
        else:
            params, opt_state, state = carry
            finite = all_finite((params, opt_state, state))
            if not has_skip_nonfinite(opt_state):
                finite = finite & all_finite((costs, norms) if grad_norm else costs)
            bad, site, bad_batch = jnp.where(finite, -1, costs.shape[0]).astype(jnp.int32), minus, unknown
        return params, opt_state, state, key, EpochStats(costs, norms, sizes, bad, site, bad_batch, extra)

    return epoch


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
    per_example: tuple[str, ...] = (),
    privacy: Privacy | None = None,
    quiet: bool = False,
    print_fn: Callable[[str], None] = print,
) -> FitResult:
    """Train ``net`` by mini-batch gradient descent; one compiled call per epoch.

    Args:
      net, params: the model and its initial parameters.
      opt: a gradient transformation ``(init, update)`` from :mod:`fnn.optim`.
      train: ``(x (N, n_0), y)`` training inputs and targets (already normalized), ``N ≥ 1``.
        Non-finite inputs are not refused here: the guard stops at the first step they poison and
        names the layer and the batch (or :func:`fnn.optim.skip_nonfinite` skips those steps).
      loss: the cost, an :class:`fnn.losses.Loss` or its name; it must accept ``net.output``
        (:func:`fnn.losses.check_output`). l2: ``β ≥ 0`` of ``½β Σ‖W‖²``.
      epochs: epochs to run in this call (after ``start_epoch`` already done).
      batch_size: ``B``; the last ``N mod B`` samples form a smaller batch or are dropped.
      key: PRNG key for the per-epoch shuffles, or an int seed.
      held_out: optional ``(x, y)`` evaluated after every epoch; checked like ``train`` and, as no
        guard watches it, refused when it holds a non-finite input or target.
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
      per_example: statistics of the per-example gradients to record every epoch, some of
        :data:`fnn.per_example.STATISTICS` (``"noise_scale"``, ``"norms"``); see
        :func:`fnn.per_example.epoch_statistics` for the history keys. Needs the manual gradients.
      privacy: DP-SGD settings (:class:`fnn.privacy.Privacy`); each epoch is then ``round(N/L)``
        steps on Poisson lots of expected size ``L`` (``batch_size`` is not used), drawn with their
        noise from ``fold_in(key, s)``, ``s`` the private steps spent before the epoch, earlier runs'
        included (so the key is not advanced: pass the same one, or the returned one, to resume),
        and the history records ``epsilon``, the ``ε`` spent so far (steps before ``start_epoch``
        included), and ``noise_multiplier``. To resume (``start_epoch > 0``)
        pass ``privacy._replace(spent=result.privacy_spent)`` of the run being resumed: its steps
        count at the ``σ`` they were taken with, and a ``target_epsilon`` is the whole run's budget.
      quiet: no progress lines.

    Returns:
      A :class:`FitResult`. ``history`` has one dict per epoch: ``epoch``, ``train_loss`` (mean cost
      over the epoch's samples), ``grad_norm`` (mean over the epoch's steps of the global gradient
      norm before clipping), ``learning_rate`` and ``learning_rate_last`` (the rates of the epoch's first and last
      updates, from the schedule and the state's step count; optimizers from :mod:`fnn.optim`),
      ``skipped_updates`` (with :func:`fnn.optim.skip_nonfinite`), ``held_out_loss``,
      ``held_out_accuracy``, ``samples_per_s``, ``seconds`` (epoch wall time) and ``elapsed``.
      ``history`` entries are plain Python numbers. With privacy, ``privacy_spent`` is a
      :class:`fnn.privacy.Spent` of every private step taken (the earlier runs' included, and the
      steps of a failed epoch too).

      When a step turns non-finite, training stops: ``stopped`` says where and ``nan_report`` holds
      the epoch, step, first non-finite site, batch, and ``kept``: ``{"epoch", "train_loss"}`` of the
      params returned. Those are the newest epoch boundary (the end of the last good epoch, the one
      before it, or the start of this call) whose params and training cost are finite, with their
      optimizer state, key and ``epoch``, so a checkpoint of them resumes exactly;
      ``before_failure`` holds ``(params, opt_state, state)`` from just before the failing step,
      for :func:`fnn.diagnose.replay_step`.
    """
    if data_parallel and mesh is None:
        mesh = distributed.data_mesh()
    loss = check_output(loss, net.output)
    key = checks.prng_key("key", key)
    l2 = checks.real_in("l2", l2, 0.0)
    epochs = checks.positive_int("epochs", epochs, allow_zero=True)
    if not isinstance(train, (tuple, list)) or len(train) != 2:
        raise TypeError(f"train must be a pair (x, y) of inputs and targets; got {type(train).__name__}.")
    x, y, local = _checked_data("training", net, params, loss, *train)
    n = x.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, {n}] (the training set size); got {batch_size!r}.")
    batch_size = int(batch_size)
    if held_out is not None:
        if not isinstance(held_out, (tuple, list)) or len(held_out) != 2:
            raise TypeError(f"held_out must be a pair (x, y) or None; got {type(held_out).__name__}.")
        held_out = _checked_data("held-out", net, params, loss, *held_out, finite=True)[:2]
    if net.has_state and last_batch == "smaller" and n % batch_size == 1:
        raise ValueError(
            f"with batch normalization the last batch of {n} samples in batches of {batch_size} would hold "
            f"1 sample, which has no batch variance; use last_batch='drop' or another batch size."
        )

    start_epoch = checks.positive_int("start_epoch", start_epoch, allow_zero=True)
    optim.check_built_for(opt, net, loss, l2)
    opt_state = _checked_opt_state(opt, params, opt_state)
    private = None
    if privacy is not None:
        if grad_source != "manual" or mesh is not None or net.has_state or per_example:
            raise ValueError("privacy needs grad_source='manual', one device, no batch norm and no per_example "
                             "statistics (the private step reads the δ's itself).")
        if optim.reads_objective(opt_state):
            raise ValueError("Newton's step reads the Hessian of its objective, a function of the training data that "
                             "the privacy analysis does not cover (it bounds one example's influence through the "
                             "clipped, noised gradient only). Use a first-order optimizer with privacy.")
        private = plan(privacy, n, start_epoch + epochs, start_epoch)
    epoch_kw = dict(num_samples=n, batch_size=batch_size, l2=l2, grad_source=grad_source, last_batch=last_batch,
                    mesh=mesh, grad_norm=grad_norm, per_example=check_statistics(net, per_example, grad_source),
                    privacy=None if private is None else private._replace(spent=None))  # the mechanism alone
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
    args = (params, opt_state, state, key, x, y)
    fast = _compiled_epoch(net, loss, opt, epoch_kw, args, guard=False)
    guarded = functools.partial(_compiled_epoch, net, loss, opt, {**epoch_kw, "grad_norm": True}, args, guard=True)

    history, stopped, nan_report, before_failure, start = [], None, None, None, time.perf_counter()
    spent = None if private is None else private.spent_after(0)
    boundaries = [(start_epoch, (params, opt_state, state, key))]  # candidates to keep if training fails
    epoch = start_epoch
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        lr_first = scheduled_learning_rate(opt, opt_state)
        t0 = time.perf_counter()
        before = (params, opt_state, state, key)
        # A private epoch draws its lots and noise from (key, steps spent before it), a count that only
        # grows over a run and its resumes (a failed epoch's steps included), so no draw is ever replayed.
        epoch_key = key if private is None else \
            jax.random.fold_in(key, private.spent_after((epoch - 1 - start_epoch) * private.steps).steps)
        params, opt_state, state, new_key, stats = fast(params, opt_state, state, epoch_key, x, y)
        stats = distributed.to_host(stats)
        if int(stats.first_bad_step) >= 0:  # find where (the params from before that step come back)
            params, opt_state, state, new_key, stats = guarded()(*before[:3], epoch_key, x, y)
            stats = distributed.to_host(stats)
        key = new_key if private is None else key
        record = epoch_record(epoch, stats, seconds=time.perf_counter() - t0, samples=n, grad_norm=grad_norm)
        record["elapsed"] = time.perf_counter() - start
        if private is not None:  # every step run counts, a failed epoch's too
            spent = private.spent_after((epoch - start_epoch) * private.steps)
            record["epsilon"] = spent.epsilon(private.delta)
            record["noise_multiplier"] = private.noise_multiplier
        if lr_first is not None:  # the rates of the epoch's first and last updates, from the state's step count
            record["learning_rate"] = float(distributed.to_host(lr_first))
            record["learning_rate_last"] = float(distributed.to_host(scheduled_learning_rate(opt, opt_state, -1)))
        skipped = skipped_updates(opt_state)
        if skipped is not None:
            record["skipped_updates"] = skipped
        if held_out is not None:
            scores = evaluate(net, params, *held_out, loss, state=state)
            record["held_out_loss"], record["held_out_accuracy"] = scores["loss"], scores["accuracy"]
        history.append(record)
        if int(stats.first_bad_step) >= 0:
            nan_report, stopped = describe_failure(net, epoch, stats)
            before_failure = (params, opt_state, state)
            kept, (params, opt_state, state, key), sentence = _keep_finite(net, loss, l2, x, y, boundaries)
            nan_report["kept"], stopped = kept, stopped + " " + sentence
            epoch = kept["epoch"]
            if not quiet:
                print_fn(stopped)
            break
        boundaries = [boundaries[0], *boundaries[1:][-1:], (epoch, (params, opt_state, state, key))]
        if not quiet:
            print_fn(format_epoch(record, start_epoch + epochs))
        if on_epoch_end is not None:
            on_epoch_end(FitResult(params, opt_state, key, epoch, history, None, state, privacy_spent=spent))
    return FitResult(params, opt_state, key, epoch, history, stopped, state, nan_report, before_failure, spent)


def _checked_opt_state(opt, params: Params, opt_state):
    """``opt_state``, or ``opt.init(params)`` for ``None``, after checking that it has the structure and
    shapes of ``opt.init(params)`` (a state of another optimizer, or of other params, is refused)."""
    if opt_state is None:
        return opt.init(params)
    want = jax.eval_shape(opt.init, params)
    if jax.tree.structure(opt_state) != jax.tree.structure(want) or \
            [jnp.shape(a) for a in jax.tree.leaves(opt_state)] != [a.shape for a in jax.tree.leaves(want)]:
        name = getattr(opt, "name", "") or type(opt).__name__
        raise ValueError(f"opt_state does not match the state of this optimizer ({name}) for these params: expected "
                         f"the structure of opt.init(params), {jax.tree.structure(want)}; got "
                         f"{jax.tree.structure(opt_state)}. Pass the state this optimizer made (or None for a fresh "
                         "one); a state of another optimizer cannot be resumed with this one.")
    return opt_state


def _checked_data(name: str, net: MLP, params: Params, loss: Loss, x, y, finite: bool = False):
    """``(x, y, local)`` after checking features, sample counts, targets (labels in range) and, with
    ``finite``, that every input and floating target is finite. Global arrays of several processes
    (``local`` False) are checked for shape only."""
    local = not isinstance(x, jax.Array) or x.is_fully_addressable
    try:
        x = net.check_input(params, x)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name} set: {e}") from None
    if x.shape[0] == 0:
        raise ValueError(f"the {name} set is empty: its x has 0 samples" +
                         ("; pass held_out=None instead." if name == "held-out" else "."))
    y = jnp.asarray(y) if local else y
    if jnp.ndim(y) == 0 or y.shape[0] != x.shape[0]:
        count = "no sample axis" if jnp.ndim(y) == 0 else f"{y.shape[0]} samples"
        raise ValueError(f"{name} targets have {count} but x has {x.shape[0]}; the first dimension of both is the "
                         f"sample (targets of shape {tuple(jnp.shape(y))}).")
    if not local:
        return x, y, local
    try:
        loss.target(jnp.zeros((x.shape[0], net.sizes[-1]), x.dtype), y)  # shapes, label range, soft targets
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name} targets: {e}") from None
    if finite:
        for what, a in (("x", x), ("targets", y)):
            if jnp.issubdtype(a.dtype, jnp.floating):
                bad = ~np.isfinite(np.asarray(a)).reshape(a.shape[0], -1).all(axis=1)
                if bad.any():
                    raise ValueError(f"{name} {what} has non-finite values in {int(bad.sum())} sample(s) (the first is "
                                     f"sample {int(np.argmax(bad))}); remove or impute them, they would make every "
                                     f"score NaN or, through a ReLU, silently finite.")
    return x, y, local


def _keep_finite(net, loss, l2, x, y, boundaries):
    """After a failed epoch: the newest epoch boundary whose params, optimizer state and training cost
    are finite, as ``(kept, values, sentence)``; the oldest candidate if none is."""
    for epoch, values in reversed(boundaries):  # noqa: B007 (newest first; falls through to the oldest)
        finite = all_finite(values[:3])
        cost = evaluate(net, values[0], x, y, loss, state=values[2])["loss"] if finite else math.nan
        if math.isfinite(cost):
            break
    kept = {"epoch": epoch, "train_loss": cost}
    return kept, values, (f"Kept the params from the end of epoch {epoch} (training loss {cost:.6g})." if
                          math.isfinite(cost) else f"Kept the params from the end of epoch {epoch}; their training "
                          "loss is not finite either (the initial params or the data?).")


def _optimizer_identity(opt):
    """Two optimizers that compute the same function: a built-in :class:`fnn.optim.Optimizer` by its
    factory and hyper-parameters (when those are hashable), any other by identity."""
    name, hyper = getattr(opt, "name", ""), getattr(opt, "hyperparams", None)
    if name and hyper is not None:
        items = tuple(sorted(hyper.items()))
        try:
            hash(items)
            return ("optimizer", name, items)
        except TypeError:
            pass
    return opt


def _signature(args) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((jnp.shape(a), jnp.result_type(a), getattr(a, "weak_type", False), getattr(a, "sharding", None))
                       for a in leaves)


def _compiled_epoch(net, loss, opt, epoch_kw, args, *, guard: bool):
    """The compiled epoch for this configuration and these arguments' shapes, from the cache when a
    previous call compiled it (the newest ``_CACHE_SIZE`` are kept)."""
    config = (make_epoch, net, loss, _optimizer_identity(opt), guard, tuple(sorted(epoch_kw.items())))
    cache_key = (config, _signature(args))
    if cache_key not in _EPOCHS:
        _EPOCHS[cache_key] = jax.jit(make_epoch(net, loss, opt, guard=guard, **epoch_kw)).lower(*args).compile()
        while len(_EPOCHS) > _CACHE_SIZE:
            _EPOCHS.popitem(last=False)
    _EPOCHS.move_to_end(cache_key)
    return _EPOCHS[cache_key]
