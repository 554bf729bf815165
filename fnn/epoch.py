"""An epoch as a composition: a batch plan, a gradient and the optimizer's step, watched by observers.

One epoch of mini-batch training is, for every step ``s`` the plan draws::

    g = gradient(params, state, x, y, batch_s)                   # manual, autodiff or private
    params, opt_state = optim.step(opt, g.grads, opt_state, params, g.data)
    out_s = {o.name: o.watch(Step(...)) for o in observers}      # the NaN guard, ‖∇C‖, per-example ...

compiled as one ``lax.scan`` over the steps (no Python runs per step). Each part is a small value
defined where its concept lives:

- a *batch plan* (:class:`Batches`): shuffled mini-batches (:func:`fnn.train.shuffled`) or
  Poisson lots (:func:`fnn.privacy.lots`);
- a *gradient* ``(params, state, x, y, batch) -> BatchGradient``: the backprop or ``jax.grad`` on
  the batch's samples (:func:`fnn.step.batch_gradient`), or the clipped, noised DP-SGD gradient of
  a lot (:func:`fnn.privacy.gradient`), or one of your own;
- :func:`fnn.optim.step`;
- *observers* (:class:`Observer`): the guard that stops at the first non-finite value
  (:func:`fnn.diagnose.guard`), the global gradient norm (:data:`GRAD_NORM`), per-example statistics
  (:func:`fnn.per_example.observer`), or your own.

:func:`build_epoch` joins them; :func:`fnn.train.make_epoch` and :func:`fnn.fit` assemble the parts
from their arguments, and take a custom gradient and observers as they are.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn import optim
from fnn.checks import all_finite
from fnn.mlp import Params, State


class Batches(NamedTuple):
    """A batch plan: what each step of an epoch reads.

    Attributes:
      draw: ``key -> (steps, rest)``. ``steps`` is a pytree whose leaves have one entry per step along
        their first axis, each entry a step's batch as the gradient reads it (the sample indices
        ``(B,)``, or a key for a Poisson lot); ``rest`` is one more step's batch of another shape (a
        smaller last batch), or ``None``.
      width: the most samples one step reads (``B``); per-step records of samples are padded to it.
      indices: True when a batch is the int ``(B,)`` sample indices, recorded when a step fails.
      epoch_key: ``None``: every epoch draws from a split of the key it gets and returns the other
        half for the next epoch. Otherwise ``(key, epochs_done) -> key``, the key the epoch after
        ``epochs_done`` epochs of this run draws from, and the run's key is never advanced (DP-SGD:
        no lot or noise is drawn twice, across resumes too).
      account: ``None``, or ``epochs_done -> (spent, entries)``: what the run has spent after
        ``epochs_done`` epochs (DP-SGD's :class:`fnn.privacy.Spent`) and the history entries that
        say so (``epsilon``, ``noise_multiplier``).
    """

    draw: Callable[[jax.Array], tuple[Any, Any]]
    width: int
    indices: bool = True
    epoch_key: Callable[[jax.Array, int], jax.Array] | None = None
    account: Callable[[int], tuple[Any, dict]] | None = None


class BatchGradient(NamedTuple):
    """What a gradient returns for one step's batch."""

    cost: jax.Array  # () the batch's cost C (NaN/inf where it failed)
    grads: Params  # ∇C, shaped like params
    state: State | None  # batch-norm running statistics after the step (None without batch norm)
    trace: Any  # the backprop's fnn.Trace of the batch, or None when the gradient keeps none
    size: jax.Array  # () int32: the samples the step read (a Poisson lot's drawn size)
    data: tuple | None  # (x_B, y_B) for optimizers that read the batch (K-FAC, Newton); None refuses them


class Step(NamedTuple):
    """What an observer sees of one step: the values before it, its batch and gradient, and the
    values it writes (``new``: params, optimizer state, batch-norm statistics)."""

    params: Params
    opt_state: Any
    state: State | None
    batch: Any
    gradient: BatchGradient
    new: tuple


class Observer(NamedTuple):
    """Watches every step of an epoch.

    Attributes:
      name: the key of its values in :attr:`EpochStats.observed`.
      watch: ``Step -> pytree of arrays``, the same shapes at every step; stacked over the epoch's
        steps (one entry per step along the first axis).
      summary: the host values of the epoch's good steps (those before a failure, skipped steps
        left out) ``-> dict`` of history entries; ``None``: ``{name: mean over the steps}``.
      checked: its values must be finite for an epoch to count as finite (checked once, at the end
        of an epoch without a stopping observer).
      stops: ``watch`` returns a bool vector of flags; the first step with a False flag fails the
        epoch, and that step and every later one leave the params, optimizer state and statistics
        as they were. :attr:`EpochStats.first_bad_step` and ``first_bad_site`` (the first False
        flag's index) record it. At most one observer stops.
    """

    name: str
    watch: Callable[[Step], Any]
    summary: Callable[[Any], dict] | None = None
    checked: bool = False
    stops: bool = False


GRAD_NORM = Observer("grad_norm", lambda s: optim.global_norm(s.gradient.grads), checked=True)
"""The global gradient norm ``‖∇C‖₂`` of every step, before the update (and before clipping)."""


class EpochStats(NamedTuple):
    """What the compiled epoch returns besides the new state; arrays of one entry per step."""

    cost: jax.Array  # (steps,) the batch costs; NaN/inf where the step failed
    batch_size: jax.Array  # (steps,) samples in each batch (a lot's drawn size)
    first_bad_step: jax.Array  # () int32: index of the first non-finite step, −1 if none
    first_bad_site: jax.Array  # () int32: the stopping observer's first False flag there (fnn.diagnose.nan_sites)
    bad_batch: jax.Array  # (B,) int32: the sample indices of that step's batch (−1 padded), or all −1
    observed: dict = {}  # observer name -> its values, one entry per step

    @property
    def grad_norm(self):
        """``(steps,)`` the global gradient norms (:data:`GRAD_NORM`), NaN where not observed."""
        return self.observed.get("grad_norm", jnp.full(jnp.shape(self.cost), jnp.nan))

    @property
    def per_example(self) -> dict:
        """The per-example statistics (:func:`fnn.per_example.observer`), ``{}`` where not observed."""
        return self.observed.get("per_example", {})


def summarize(observers: Sequence[Observer], values: dict) -> dict:
    """The history entries of an epoch from its observers' host values of the good steps."""
    record = {}
    for o in observers:
        if o.stops:
            continue
        v = values[o.name]
        if o.summary is not None:
            record.update(o.summary(v))
            continue
        v = np.asarray(v, np.float64)
        mean = v.mean(axis=0) if v.shape[0] else np.full(v.shape[1:], np.nan)
        record[o.name] = float(mean) if mean.ndim == 0 else mean.tolist()
    return record


def _select(ok, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def build_epoch(opt, batches: Batches, gradient: Callable, observers: Sequence[Observer] = ()) -> Callable:
    """The (un-jitted) epoch ``(params, opt_state, state, key, x, y) -> (params, opt_state, state, key,
    EpochStats)`` of ``batches``, ``gradient`` and ``opt``, watched by ``observers``.

    ``x: (N, n_0)``, ``y`` the targets of all ``N`` samples, ``state`` the batch-norm statistics
    (``None`` without batch norm). The key is split once: one half draws the epoch's batches, the
    other is returned for the next epoch. With :func:`fnn.optim.skip_nonfinite` in ``opt``, a
    skipped step leaves the batch-norm statistics as they were too. Without a stopping observer the
    epoch is checked once at its end: ``first_bad_step`` is then the number of steps when a value
    (params, optimizer state, statistics, a cost, a ``checked`` observer's value) is not finite,
    else −1, and the site and batch are −1.
    """
    stopping = [o for o in observers if o.stops]
    if len(stopping) > 1:
        raise ValueError(f"at most one observer may stop an epoch; got {[o.name for o in stopping]}.")
    guard = stopping[0] if stopping else None
    names = [o.name for o in observers]
    if len(set(names)) != len(names):
        raise ValueError(f"observers need distinct names; got {names}.")

    def update(x, y, params, opt_state, state, batch):
        g = gradient(params, state, x, y, batch)
        new_params, new_opt_state = optim.step(opt, g.grads, opt_state, params, g.data)
        new_state = g.state
        if state is not None and optim.has_skip_nonfinite(opt_state):  # a skipped step leaves the statistics
            new_state = _select(all_finite((g.grads, new_state)), new_state, state)
        view = Step(params, opt_state, state, batch, g, (new_params, new_opt_state, new_state))
        return view, {o.name: o.watch(view) for o in observers}

    def step(x, y, carry, batch):
        (params, opt_state, state), failure = carry[:3], carry[3:]
        i, batch = batch
        view, out = update(x, y, params, opt_state, state, batch)
        ok = jnp.asarray(True)
        if guard is not None:
            bad, site, bad_batch = failure
            flags = out.pop(guard.name)
            first = (bad < 0) & ~jnp.all(flags)
            bad = jnp.where(first, i, bad)
            site = jnp.where(first, jnp.argmin(flags).astype(jnp.int32), site)
            if batches.indices:
                padded = jnp.full(bad_batch.shape, -1, jnp.int32).at[: batch.shape[0]].set(batch.astype(jnp.int32))
                bad_batch = jnp.where(first, padded, bad_batch)
            ok, failure = bad < 0, (bad, site, bad_batch)  # after a failure no further update is applied
        kept = _select(ok, view.new, (params, opt_state, state))
        return (*kept, *failure), (view.gradient.cost, view.gradient.size, out)

    def epoch(params, opt_state, state, key, x, y):
        key, draw_key = jax.random.split(key)
        steps, rest = batches.draw(draw_key)
        full = jax.tree.leaves(steps)[0].shape[0]
        minus, unknown = jnp.asarray(-1, jnp.int32), jnp.full((batches.width,), -1, jnp.int32)
        carry = (params, opt_state, state) + ((minus, minus, unknown) if guard is not None else ())
        body = functools.partial(step, x, y)
        carry, (costs, sizes, out) = jax.lax.scan(body, carry, (jnp.arange(full, dtype=jnp.int32), steps))
        if rest is not None and jax.tree.leaves(rest)[0].shape[0]:
            carry, last = body(carry, (jnp.asarray(full, jnp.int32), rest))
            costs, sizes, out = jax.tree.map(lambda a, b: jnp.concatenate([a, jnp.asarray(b)[None]]),
                                             (costs, sizes, out), last)
        params, opt_state, state = carry[:3]
        if guard is not None:
            bad, site, bad_batch = carry[3:]
        else:
            finite = all_finite((params, opt_state, state))
            if not optim.has_skip_nonfinite(opt_state):
                finite = finite & all_finite((costs, *[out[o.name] for o in observers if o.checked]))
            bad, site, bad_batch = jnp.where(finite, -1, costs.shape[0]).astype(jnp.int32), minus, unknown
        return params, opt_state, state, key, EpochStats(costs, sizes.astype(jnp.int32), bad, site, bad_batch, out)

    return epoch


# ---------------------------------------------------------------------------------------------
# Compiled epochs, cached.

CACHE_SIZE = 16
_EPOCHS: collections.OrderedDict = collections.OrderedDict()  # (configuration, signature) -> compiled epoch


def optimizer_identity(opt):
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


def compiled(config, build: Callable[[], Callable], args) -> Callable:
    """The compiled ``jax.jit(build())`` for ``args``, from the cache when an epoch of the same
    hashable ``config`` was compiled for arguments of the same structure, shapes, dtypes and
    shardings (the newest :data:`CACHE_SIZE` are kept)."""
    cache_key = (config, _signature(args))
    if cache_key not in _EPOCHS:
        _EPOCHS[cache_key] = jax.jit(build()).lower(*args).compile()
        while len(_EPOCHS) > CACHE_SIZE:
            _EPOCHS.popitem(last=False)
    _EPOCHS.move_to_end(cache_key)
    return _EPOCHS[cache_key]
