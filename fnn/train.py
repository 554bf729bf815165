"""Mini-batch gradient descent: one compiled call per epoch, shuffled every epoch.

An epoch, as the theory describes it: a fresh permutation of the ``N`` samples from an explicit
PRNG key, cut into ``⌊N/B⌋`` batches of ``B`` and, for the ``N mod B`` left over, one smaller
last batch (``last_batch="smaller"``, so every sample is used once per epoch) or none
(``"drop"``); for each batch, the gradient, then the optimizer's update. :func:`fit` assembles
the epoch from its parts (:mod:`fnn.epoch`: a batch plan, a gradient, :func:`fnn.optim.step`, and
observers) and compiles it as one ``lax.scan`` over the batches; no Python runs per batch. With
DP-SGD (``fit(..., privacy=...)``) the plan and the gradient are those of :mod:`fnn.privacy`.

A non-finite cost, gradient or updated value stops training; :func:`fit` reports where it happened
and keeps the params of the last epoch boundary whose training cost is finite. The check runs once
per epoch on the normal path and step by step only when an epoch fails (see :mod:`fnn.diagnose`).
A compiled epoch is cached (:func:`fnn.epoch.compiled`): a second :func:`fit` with the same network,
loss, optimizer (the same object, or one built by the same factory with equal hyper-parameters),
settings and array shapes reuses it.
"""

from __future__ import annotations

import functools
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from fnn import checks, diagnose, distributed, optim
from fnn import privacy as dp
from fnn.diagnose import describe_failure, keep_finite
from fnn.epoch import GRAD_NORM, Batches, EpochStats, Observer, build_epoch, compiled, optimizer_identity  # noqa: F401
from fnn.losses import Loss, check_output
from fnn.metrics import epoch_record, evaluate, format_epoch
from fnn.mlp import MLP, Params, State
from fnn.optim import scheduled_learning_rate, skipped_updates
from fnn.per_example import check_statistics, observer
from fnn.privacy import Privacy, Spent
from fnn.step import GRAD_SOURCES, batch_gradient

LAST_BATCH = ("smaller", "drop")


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


def shuffled(num_samples: int, batch_size: int, last_batch: str = "smaller") -> Batches:
    """The batch plan of mini-batch training: every epoch a fresh :func:`shuffled_batches` order."""
    checks.lookup(dict.fromkeys(LAST_BATCH), "last_batch rule", last_batch)
    return Batches(lambda key: shuffled_batches(key, num_samples, batch_size, last_batch), batch_size)


def parts(net: MLP, loss: Loss, opt, *, num_samples: int, batch_size: int, l2: float = 0.0,
          grad_source: str = "manual", last_batch: str = "smaller", mesh=None, grad_norm: bool = True,
          per_example: tuple[str, ...] = (), privacy: dp.PrivatePlan | None = None,
          gradient: Callable | None = None, observers: Sequence[Observer] = ()) -> tuple:
    """``(batches, gradient, observers)`` of an epoch (:mod:`fnn.epoch`) from :func:`make_epoch`'s arguments:
    shuffled mini-batches and :func:`fnn.step.batch_gradient`, or, with a ``privacy`` plan, Poisson lots
    and the private gradient (:func:`fnn.privacy.parts`); a ``gradient`` given replaces the default one.
    The observers: :data:`fnn.epoch.GRAD_NORM` (``grad_norm``), :func:`fnn.per_example.observer`
    (``per_example``), then ``observers``."""
    checks.lookup(GRAD_SOURCES, "gradient source", grad_source)
    batches, default = dp.parts(privacy, net, loss, l2, opt, batch_size, mesh) or (
        shuffled(num_samples, batch_size, last_batch), batch_gradient(net, loss, l2, grad_source, mesh))
    per_example = check_statistics(net, per_example, grad_source)
    statistics = observer(net, per_example, l2, batch_size, population=num_samples)  # batches drawn without replacement
    watching = (GRAD_NORM,) * bool(grad_norm) + (statistics,) * bool(per_example)
    return batches, gradient or default, (*watching, *observers)


def make_epoch(net: MLP, loss: Loss, opt, *, guard: bool = True, **kw) -> Callable:
    """The (un-jitted) epoch function
    ``(params, opt_state, state, key, x, y) -> (params, opt_state, state, key, EpochStats)`` of :func:`parts`
    (keywords ``num_samples``, ``batch_size`` and the rest), see :func:`fnn.epoch.build_epoch`.

    ``x: (N, n_0)``, ``y``: targets for all ``N`` samples; ``state`` the batch-norm running statistics
    (``None`` without batch norm). With a ``mesh`` (:mod:`fnn.distributed`) every batch is sharded over
    its ``"data"`` axis. ``guard=True`` adds :func:`fnn.diagnose.guard`: every step is checked and the
    first non-finite value stops the updates, recorded in ``first_bad_step``, ``first_bad_site`` and
    ``bad_batch``; ``guard=False`` checks once at the end (see :mod:`fnn.diagnose`). ``grad_norm=False``
    leaves out the global gradient norm (``stats.grad_norm`` NaN). ``per_example`` names statistics of
    :data:`fnn.per_example.STATISTICS` (``stats.per_example``). With a ``privacy`` plan
    (:func:`fnn.privacy.plan`) the epoch is ``privacy.steps`` DP-SGD steps on fresh Poisson lots.
    """
    batches, gradient, observers = parts(net, loss, opt, **kw)
    return build_epoch(opt, batches, gradient, (*observers, *(diagnose.guard(net),) * bool(guard)))


def fit(net: MLP, params: Params, opt, train: tuple[jax.Array, jax.Array], *, loss: Loss, epochs: int,
        batch_size: int, key: jax.Array, held_out: tuple[jax.Array, jax.Array] | None = None, l2: float = 0.0,
        grad_source: str = "manual", last_batch: str = "smaller", opt_state: Any = None, state: State | None = None,
        start_epoch: int = 0, on_epoch_end: Callable[[FitResult], None] | None = None, mesh=None,
        data_parallel: bool = False, grad_norm: bool = True, per_example: tuple[str, ...] = (),
        privacy: Privacy | None = None, gradient: Callable | None = None, observers: Sequence[Observer] = (),
        quiet: bool = False, print_fn: Callable[[str], None] = print) -> FitResult:
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
        arrays made by :func:`fnn.distributed.global_batch_arrays` (one shard per process). With
        ``privacy``, every lot is split over it instead (:func:`fnn.privacy.private_gradient`; the
        ``Privacy.chunk`` a multiple of its devices, ``batch_size`` unused).
      data_parallel: shorthand for ``mesh=fnn.distributed.data_mesh()`` (every device).
      grad_norm: record the global gradient norm of every step (the default); ``False`` saves
        3–5 % of a small model's step on a CPU and leaves ``grad_norm`` out of the history.
      per_example: statistics of the per-example gradients to record every epoch, some of
        :data:`fnn.per_example.STATISTICS` (``"noise_scale"``, ``"norms"``); see
        :func:`fnn.per_example.epoch_statistics` for the history keys. Needs the manual gradients. The noise
        scale's estimators are those for batches drawn without replacement from the ``N`` samples.
      privacy: DP-SGD settings (:class:`fnn.privacy.Privacy`); each epoch is then ``round(N/L)``
        steps on Poisson lots of expected size ``L`` (``batch_size`` is not used), drawn with their
        noise from ``fold_in(key, s)``, ``s`` the private steps spent before the epoch, earlier runs'
        included (so the key is not advanced: pass the same one, or the returned one, to resume),
        and the history records ``epsilon``, the ``ε`` spent so far (steps before ``start_epoch``
        included), and ``noise_multiplier``. To resume (``start_epoch > 0``)
        pass ``privacy._replace(spent=result.privacy_spent)`` of the run being resumed: its steps
        count at the ``σ`` they were taken with, and a ``target_epsilon`` is the whole run's budget.
      gradient: a gradient of your own for the epoch (:mod:`fnn.epoch`),
        ``(params, state, x, y, idx) -> fnn.epoch.BatchGradient`` of the batch ``idx (B,)`` of the
        training set, in place of the manual or autodiff one.
      observers: :class:`fnn.epoch.Observer` s of your own, watching every step; each adds its
        summary to the history (by default ``{name: mean over the epoch's steps}``).
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
    start_epoch = checks.positive_int("start_epoch", start_epoch, allow_zero=True)
    x, y, held_out, local = _checked_sets(net, params, loss, train, held_out)
    n, batch_size = x.shape[0], _checked_batch_size(net, batch_size, x.shape[0], last_batch)
    optim.check_built_for(opt, net, loss, l2)
    opt_state = optim.checked_state(opt, params, opt_state)
    per_example = check_statistics(net, per_example, grad_source)
    custom = grad_source != "manual" or bool(per_example) or gradient is not None
    private = dp.training(privacy, net, opt_state, num_samples=n, epochs=epochs, start_epoch=start_epoch, custom=custom,
                          mesh=mesh)
    epoch_kw = dict(num_samples=n, batch_size=batch_size, l2=l2, grad_source=grad_source, last_batch=last_batch,
                    mesh=mesh, grad_norm=grad_norm, per_example=per_example, gradient=gradient,
                    observers=tuple(observers), privacy=private and private._replace(spent=None))  # the mechanism
    plan, _, watching = parts(net, loss, opt, **{**epoch_kw, "privacy": private})  # with what was spent before
    if state is None and net.has_state:
        state = net.init_state(x.dtype)
    net.check_state(state)
    if mesh is not None and private is None:  # a private step splits its lot's pieces itself (Privacy.chunk)
        distributed.check_divisible(mesh, batch_size, n % batch_size if last_batch == "smaller" else 0)
    if mesh is not None:
        params, opt_state, state, key, held_out = jax.device_put((params, opt_state, state, key, held_out),
                                                                 distributed.replicated(mesh))
        x, y = jax.device_put((x, y), distributed.replicated(mesh)) if local else (x, y)
    # The normal path: unguarded and not donated, so that a failed epoch can be run again, guarded,
    # from the same inputs. The guarded epoch is compiled only if it is ever needed.
    args = (params, opt_state, state, key, x, y)
    fast = _compiled_epoch(net, loss, opt, epoch_kw, args, guard=False)
    guarded = functools.partial(_compiled_epoch, net, loss, opt, {**epoch_kw, "grad_norm": True}, args, guard=True)

    history, stopped, nan_report, before_failure, start = [], None, None, None, time.perf_counter()
    spent = plan.account(0)[0] if plan.account is not None else None
    boundaries = [(start_epoch, (params, opt_state, state, key))]  # candidates to keep if training fails
    epoch = start_epoch
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        lr_first, t0, before = scheduled_learning_rate(opt, opt_state), time.perf_counter(), (params, opt_state, state)
        epoch_key = key if plan.epoch_key is None else plan.epoch_key(key, epoch - 1 - start_epoch)
        params, opt_state, state, new_key, stats = fast(params, opt_state, state, epoch_key, x, y)
        stats = distributed.to_host(stats)
        if int(stats.first_bad_step) >= 0:  # find where (the params from before that step come back)
            params, opt_state, state, new_key, stats = guarded()(*before, epoch_key, x, y)
            stats = distributed.to_host(stats)
        key = new_key if plan.epoch_key is None else key
        record = epoch_record(epoch, stats, seconds=time.perf_counter() - t0, samples=n, observers=watching)
        record["elapsed"] = time.perf_counter() - start
        if plan.account is not None:  # every step run counts, a failed epoch's too
            spent, spent_entries = plan.account(epoch - start_epoch)
            record.update(spent_entries)
        record.update(_rates_and_scores(net, loss, opt, opt_state, lr_first, params, state, held_out))
        history.append(record)
        if int(stats.first_bad_step) >= 0:
            nan_report, stopped = describe_failure(net, epoch, stats)
            before_failure = (params, opt_state, state)
            kept, (params, opt_state, state, key), sentence = keep_finite(net, loss, x, y, boundaries)
            nan_report["kept"], stopped, epoch = kept, stopped + " " + sentence, kept["epoch"]
            if not quiet:
                print_fn(stopped)
            break
        boundaries = [boundaries[0], *boundaries[1:][-1:], (epoch, (params, opt_state, state, key))]
        if not quiet:
            print_fn(format_epoch(record, start_epoch + epochs))
        if on_epoch_end is not None:
            on_epoch_end(FitResult(params, opt_state, key, epoch, history, None, state, privacy_spent=spent))
    return FitResult(params, opt_state, key, epoch, history, stopped, state, nan_report, before_failure, spent)


def _rates_and_scores(net, loss, opt, opt_state, lr_first, params, state, held_out) -> dict:
    """An epoch's history entries after training: the learning rates of its first and last updates (from
    the schedule and the state's step count), the skipped updates, the held-out loss and accuracy."""
    out = {}
    if lr_first is not None:
        out["learning_rate"] = float(distributed.to_host(lr_first))
        out["learning_rate_last"] = float(distributed.to_host(scheduled_learning_rate(opt, opt_state, -1)))
    skipped = skipped_updates(opt_state)
    if skipped is not None:
        out["skipped_updates"] = skipped
    if held_out is not None:
        scores = evaluate(net, params, *held_out, loss, state=state)
        out["held_out_loss"], out["held_out_accuracy"] = scores["loss"], scores["accuracy"]
    return out


def _checked_sets(net, params, loss, train, held_out) -> tuple:
    """``(x, y, held_out, local)``: the training and held-out sets after :func:`_checked_data`."""
    if not isinstance(train, (tuple, list)) or len(train) != 2:
        raise TypeError(f"train must be a pair (x, y) of inputs and targets; got {type(train).__name__}.")
    x, y, local = checks.data_set("training", net, params, loss, *train)
    if held_out is not None:
        if not isinstance(held_out, (tuple, list)) or len(held_out) != 2:
            raise TypeError(f"held_out must be a pair (x, y) or None; got {type(held_out).__name__}.")
        held_out = checks.data_set("held-out", net, params, loss, *held_out, finite=True)[:2]
    return x, y, held_out, local


def _checked_batch_size(net, batch_size, n: int, last_batch: str) -> int:
    checks.lookup(dict.fromkeys(LAST_BATCH), "last_batch rule", last_batch)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, {n}] (the training set size); got {batch_size!r}.")
    if net.has_state and last_batch == "smaller" and n % batch_size == 1:
        raise ValueError(
            f"with batch normalization the last batch of {n} samples in batches of {batch_size} would hold "
            f"1 sample, which has no batch variance; use last_batch='drop' or another batch size."
        )
    return int(batch_size)


def _compiled_epoch(net, loss, opt, epoch_kw, args, *, guard: bool):
    """The compiled epoch for this configuration and these arguments' shapes (:func:`fnn.epoch.compiled`)."""
    config = (make_epoch, net, loss, optimizer_identity(opt), guard, tuple(sorted(epoch_kw.items())))
    return compiled(config, lambda: make_epoch(net, loss, opt, guard=guard, **epoch_kw), args)
