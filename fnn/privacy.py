"""Differentially private gradient descent (DP-SGD) from the δ's, and its Rényi-DP accountant.

The mechanism (Abadi, Chu, Goodfellow et al., "Deep learning with differential privacy", CCS
2016, Algorithm 1), one step:

1. **Poisson sampling**: every one of the ``N`` training examples joins the lot independently with
   probability ``q`` (the lot's size is random, ``q N`` on average);
2. **clipping**: every example's gradient is clipped to norm ``c``, ``ḡ_x = g_x min(1, c/‖g_x‖)``,
   the whole network's norm (the data term only: the L2 term is data-independent);
3. **noise**: ``g̃ = (Σ_x ḡ_x + 𝒩(0, σ²c² I)) / (q N)``, divided by the *expected* lot size as the
   analysis assumes, then ``+ βW`` for an L2 term.

The clipped sum is read off the backprop's δ's (:func:`fnn.per_example.clipped_sum`), so the step
never builds the ``N × P`` per-example gradients. Under ``jit`` shapes are static: the lot is
padded to the nearest of a few sizes compiled around ``qN`` (:func:`lot_sizes`), and a larger one
runs in pieces, so the lot is exactly Poisson (no cap, no padding that changes the
analysis; padding rows have weight 0). The noise is ``jax.random.normal``'s, drawn in one fused
pass (:mod:`fnn.noise`).

Bookkeeping across calls: :func:`fnn.fit` returns what a run has spent (:class:`Spent`: its steps and
their composed RDP) and a resumed ``fit`` takes it back (``Privacy(..., spent=...)``; refused without
it), so ``ε`` counts every step at the ``σ`` it was taken with; each epoch's lots and noise come from
``fold_in(key, s)``, ``s`` the steps spent before the epoch (a count that only grows, over a run
and its resumes, a failed epoch's steps included), so no draw is ever used twice. ``δ ≥ 1/N`` is
refused unless asked for, and so is any optimizer that reads the data beyond the clipped gradient
(K-FAC, Hessian-free, Newton's step on a training objective).

Data-parallel over a device mesh (``fit(..., privacy=..., mesh=...)``, :func:`private_gradient`): the
lot is drawn once, globally, from the step's key; each device clips and sums its share of it; the
sums are all-reduced and the noise, drawn from the same key on every device, is added once. The
plan and the accounting do not depend on the mesh.

The step's running time depends on the lot's size (through the padded size), as with any
Poisson-sampled DP-SGD; the guarantee covers the released parameters, not that timing (nor the
:class:`PrivateStats`).

The accountant: the Rényi differential privacy (RDP) of the Poisson-subsampled Gaussian
mechanism (Mironov, Talwar & Zhang, "Rényi differential privacy of the sampled Gaussian
mechanism", 2019, §3.3). For an integer order ``α`` the expression is a finite sum::

    ε_α = log A_α / (α − 1),   A_α = Σ_{k=0}^{α} C(α, k) (1 − q)^{α−k} q^k exp((k² − k) / (2σ²)),

and for a fractional order ``α > 1`` the convergent series of the same section, with the
generalized binomial coefficients and ``z₀ = σ² log(1/q − 1) + ½``::

    A_α = Σ_{i≥0} C(α, i) [ q^i (1−q)^{α−i} e^{(i²−i)/(2σ²)} ½ erfc((i − z₀)/(√2 σ))
                          + q^{α−i} (1−q)^i e^{((α−i)²−(α−i))/(2σ²)} ½ erfc((z₀ − α + i)/(√2 σ)) ],

composed over ``T`` steps by addition (``T ε_α``) and converted to ``(ε, δ)``-DP by the conversion
of Canonne, Kamath & Steinke ("The discrete Gaussian for differential privacy", 2020, Prop. 12;
also Asoodeh et al. 2020)::

    ε = min_α [ T ε_α + log((α − 1)/α) − (log δ + log α)/(α − 1) ],

over the grid :data:`ORDERS` (fractional orders from 1.25 on, then integers up to 1024).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fnn import distributed, noise, optim, per_example
from fnn.backprop import backprop_trace
from fnn.checks import nonempty, positive_int, prng_key, real_in
from fnn.epoch import Batches, BatchGradient
from fnn.losses import Loss, check_l2, check_output, l2_active
from fnn.mlp import MLP, Params

ORDERS: tuple[float, ...] = (1.25, 1.5, 1.75, *(2 + i / 4 for i in range(33)), *range(11, 65),
                             72, 80, 96, 112, 128, 160, 192, 224, 256, 384, 512, 768, 1024)
"""The Rényi orders α over which ε is minimized: quarters from 1.25 to 10, then integers."""


def _check_rate_and_noise(q: float, noise_multiplier: float) -> tuple[float, float]:
    """``(q, σ)`` as floats after checking ``q ∈ [0, 1]`` and ``σ`` finite and ``> 0`` (``σ = 0`` gives no
    privacy; an infinite ``σ`` no information, and no finite accounting)."""
    return (real_in("the sampling rate q", q, 0.0, 1.0),
            real_in("the noise multiplier σ", noise_multiplier, 0.0, low_open=True))


def _log_erfc(x: float) -> float:
    """``log erfc(x)``, also where ``erfc`` underflows (its asymptotic series for ``x ≥ 20``)."""
    if x < 20:
        return math.log(math.erfc(x))
    u = 1 / (2 * x * x)
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(-u + 3 * u * u - 15 * u**3)


def _log_add(a: float, b: float) -> float:
    """``log(e^a + e^b)`` for scalars, ``-inf`` allowed."""
    top = max(a, b)
    return top if top == -math.inf else top + math.log1p(math.exp(min(a, b) - top))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """``log A_α`` for a fractional ``α > 1``: the series above, positive and negative terms summed apart
    in log space (running sums, so a long series costs linear time), until both new terms fall below
    ``e⁻³⁰`` of the sum; ``inf`` if it does not converge."""
    z0 = sigma * sigma * math.log(1 / q - 1) + 0.5
    positive = negative = -math.inf
    for i in range(10_000):
        j = alpha - i
        # C(α, i) = Γ(α+1) / (Γ(i+1) Γ(α−i+1)); its sign is that of Π_{m<i} (α − m)
        log_coef = math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(j + 1)
        sign = (-1) ** max(0, i - math.floor(alpha) - 1)
        s0 = (log_coef + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma * sigma)
              + math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma)))
        s1 = (log_coef + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma * sigma)
              + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        if sign > 0:
            positive = _log_add(positive, _log_add(s0, s1))
        else:
            negative = _log_add(negative, _log_add(s0, s1))
        if i > alpha + 1 and max(s0, s1) < positive - 30:
            break
    else:
        return math.inf
    if negative > -math.inf:
        return positive + math.log1p(-math.exp(negative - positive))
    return positive


def _log_a(q: float, sigma: float, alpha: float) -> float:
    """``log A_α`` of the sampled Gaussian mechanism, summed in log space."""
    if alpha != int(alpha):
        return _log_a_fractional(q, sigma, alpha)
    alpha = int(alpha)
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = math.lgamma(alpha + 1) - np.array([math.lgamma(i + 1) + math.lgamma(alpha - i + 1)
                                                   for i in range(alpha + 1)])
    with np.errstate(divide="ignore"):
        terms = log_binom + k * np.log(q) + (alpha - k) * np.log1p(-q) + (k * k - k) / (2 * sigma * sigma)
    top = np.max(terms)
    return float(top + np.log(np.sum(np.exp(terms - top))))


def _checked_orders(orders) -> np.ndarray:
    """``orders`` as a float array after checking they are finite reals ``> 1``."""
    if isinstance(orders, (str, bytes)) or not isinstance(orders, Sequence | np.ndarray):
        raise TypeError(f"orders must be a sequence of Rényi orders > 1, e.g. fnn.privacy.ORDERS; got {orders!r:.60}.")
    if not all(isinstance(a, numbers.Real) and not isinstance(a, bool) and math.isfinite(a) and a > 1
               for a in orders):
        raise ValueError(f"Rényi orders must be finite numbers > 1; got {list(orders)!r:.120}.")
    return np.asarray(orders, np.float64)


def rdp(q: float, noise_multiplier: float, steps: int = 1, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """``T ε_α`` for every order: the RDP of ``steps`` Poisson-subsampled Gaussian steps, shape ``(len(orders),)``.

    Args:
      q: the sampling rate (each example joins a lot with probability ``q``).
      noise_multiplier: ``σ``, the noise's standard deviation over the clip norm.
      steps: ``T``, the number of steps composed.
      orders: Rényi orders ``α > 1``.
    """
    q, noise_multiplier = _check_rate_and_noise(q, noise_multiplier)
    steps = positive_int("steps", steps, allow_zero=True)
    _checked_orders(orders)
    if q == 0:
        return np.zeros(len(orders))
    if q == 1:  # the plain Gaussian mechanism
        return steps * np.array([a / (2 * noise_multiplier**2) for a in orders], np.float64)
    return steps * np.array([_log_a(q, noise_multiplier, a) / (a - 1) for a in orders], np.float64)


def epsilon(rdp_values: np.ndarray, delta: float, orders: Sequence[float] = ORDERS) -> tuple[float, float]:
    """``(ε, α)``: the smallest ``ε`` of ``(ε, δ)``-DP that the RDP curve gives, and the order that gives it.

    ``ε = min_α [ε_α + log((α−1)/α) − (log δ + log α)/(α−1)]``, clamped at 0 (Canonne, Kamath &
    Steinke 2020, Prop. 12).
    """
    delta = real_in("δ", delta, 0.0, 1.0, low_open=True, high_open=True)
    rdp_values = np.asarray(rdp_values, np.float64)
    a = _checked_orders(orders)
    if rdp_values.shape != a.shape:
        raise ValueError(f"one RDP value per order: got {rdp_values.shape} values for {a.shape} orders.")
    if np.isnan(rdp_values).any() or (rdp_values < 0).any():
        raise ValueError(f"RDP values are ≥ 0 (or inf where an order diverges); got {rdp_values[rdp_values < 0]} "
                         f"and {int(np.isnan(rdp_values).sum())} NaN. Recompute them with fnn.privacy.rdp.")
    eps = rdp_values + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), orders[best]


def privacy_spent(q: float, noise_multiplier: float, steps: int, delta: float,
                  orders: Sequence[float] = ORDERS) -> float:
    """``ε`` after ``steps`` DP-SGD steps with sampling rate ``q`` and noise multiplier ``σ``, at ``δ``."""
    return epsilon(rdp(q, noise_multiplier, steps, orders), delta, orders)[0]


def noise_multiplier_for(target_epsilon: float, q: float, steps: int, delta: float,
                         orders: Sequence[float] = ORDERS, tolerance: float = 1e-3,
                         before: Spent | None = None) -> float:
    """The smallest ``σ`` (to a relative ``tolerance``) whose ``steps`` steps at rate ``q`` spend at most
    ``target_epsilon`` at ``δ``: the inverse of :func:`privacy_spent`, by bisection (ε falls as σ grows).

    ``before``: steps already taken (a :class:`Spent` over :data:`ORDERS`), composed with the new ones,
    so that ``target_epsilon`` is the budget of the whole run.
    """
    target_epsilon = real_in("the target ε", target_epsilon, 0.0, low_open=True)
    steps = positive_int("steps", steps)
    tolerance = real_in("tolerance", tolerance, 0.0, 1.0, low_open=True, high_open=True)
    offset = np.zeros(len(orders)) if before is None else np.asarray(before.rdp, np.float64)
    if offset.shape != (len(orders),):
        raise ValueError(f"before must hold one RDP value per order ({len(orders)}); got {offset.shape}.")
    already = epsilon(offset, delta, orders)[0]
    if before is not None and already >= target_epsilon:
        raise ValueError(f"the {before.steps} steps already taken spent ε = {already:.4g} ≥ the target ε = "
                         f"{target_epsilon:g}: no σ keeps the whole run within it. Raise the target, or stop here.")

    def spent(sigma):
        return epsilon(offset + rdp(q, sigma, steps, orders), delta, orders)[0]

    low, high = 1e-2, 1.0
    while spent(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no σ ≤ 1e6 reaches ε = {target_epsilon} with q = {q}, {steps} steps, δ = {delta}"
                             + ("" if before is None else f" after the {before.steps} steps already taken") + ".")
    if spent(low) <= target_epsilon:
        return low
    while (high - low) > tolerance * high:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= target_epsilon else (mid, high)
    return high


# ---------------------------------------------------------------------------------------------
# The mechanism.


class PrivateStats(NamedTuple):
    """What one private step saw (scalars): the lot's size, the mean cost over the lot and the
    fraction of its examples whose gradient was clipped. These are not privatized: they are for
    the researcher's eyes and the ``(ε, δ)`` guarantee does not cover releasing them."""

    lot_size: jax.Array
    cost: jax.Array
    clipped_fraction: jax.Array


def poisson_lot(key: jax.Array, num_samples: int, q: float, block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """A Poisson-sampled lot: ``(indices (N,) int32, count)``.

    Each of the ``N`` examples joins independently with probability ``q``; the ``count`` sampled
    indices come first, in increasing order, and the rest of the array holds ``N`` (no example).
    Drawn in ``O(qN)`` rather than ``O(N)``: the gaps between successive members of a Bernoulli(q)
    sequence are independent Geometric(q), ``⌊log u / log(1 − q)⌋ + 1`` for a uniform ``u``. They
    are drawn ``block`` at a time until the sequence passes ``N``; with the default block
    ``K = qN + 10√(qN) + 16`` one block does unless the lot has ``K`` members or more (probability
    below 10⁻²⁰ for ``qN ≥ 1``), so the loop's body runs once. Any block size gives the same
    distribution. (Exact up to the float32 resolution of the uniform draws, as any sampler.)
    """
    if block is not None:
        block = positive_int("block", block)
    key = prng_key("key", key)
    n = positive_int("num_samples", num_samples)
    q = real_in("the sampling rate q", q, 0.0, 1.0, low_open=True)
    cap = int(min(n, math.ceil(q * n + 10 * math.sqrt(q * n) + 16))) if block is None else block
    first_key, rest_key = jax.random.split(key)
    log_miss = jnp.log1p(-jnp.float32(min(q, 1 - 1e-7)))

    def next_block(state):  # the next K members of the endless sequence, after the last one drawn
        order, count, last, i = state
        u = jax.random.uniform(jnp.where(i == 0, first_key, jax.random.fold_in(rest_key, i)), (cap,),
                               minval=jnp.finfo(jnp.float32).tiny)
        gaps = jnp.floor(jnp.log(u) / log_miss) + 1 if q < 1 else jnp.ones(cap)
        gaps = jnp.minimum(gaps, n + 1)  # a gap past the end ends the lot; in int32 it could wrap around
        positions = last + jnp.cumsum(gaps.astype(jnp.int32))
        inside = positions < n  # a prefix, the positions increasing
        order = jax.lax.dynamic_update_slice(order, jnp.where(inside, positions, n), (count,))
        return order, count + jnp.sum(inside, dtype=jnp.int32), positions[-1], i + 1

    start = (jnp.full((n + cap,), n, jnp.int32), jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32),
             jnp.zeros((), jnp.int32))
    order, count, _, _ = jax.lax.while_loop(lambda state: state[2] < n - 1, next_block, start)
    return order[:n], count


def lot_sizes(num_samples: int, q: float) -> tuple[int, ...]:
    """The padded lot sizes a private step is compiled for, increasing.

    They step by ``⌈s⌉`` from about ``qN − 4s`` to ``qN + 4s`` (``s = √(qN(1 − q))``, the standard
    deviation of the lot's size): about nine sizes, and a lot is padded by about ``s/2`` rows
    (3 % at ``qN = 256``; each size is one more compiled backprop). A lot beyond the last
    (probability about 3·10⁻⁵ per step) is processed in pieces (:func:`lot_sum`). The sizes depend
    on ``N`` and ``q`` only, never on the data.
    """
    n = positive_int("num_samples", num_samples)
    q = real_in("the sampling rate q", q, 0.0, 1.0, low_open=True)
    mean, sd = q * n, math.sqrt(q * n * (1 - q))
    grain = max(1, math.ceil(sd))
    first, last = max(1, math.floor((mean - 4 * sd) / grain)), math.ceil((mean + 4 * sd) / grain)
    return tuple(sorted({min(n, grain * k) for k in range(first, last + 1)}))


def lot_sum(key: jax.Array, num_samples: int, q: float, rows_sum, start, *, chunk: int, shards: int = 1):
    """``(start + Σ_{pieces} rows_sum(rows), |lot|)`` over a Poisson lot drawn by :func:`poisson_lot` from ``key``.

    The lot's indices are padded with ``N`` (no example) to the smallest of :func:`lot_sizes` that
    holds them, and that padded lot, of static size ``m``, is cut into ``k = ⌈m/chunk⌉`` pieces
    of ``⌈m/k⌉`` indices, rounded up to a multiple of ``shards`` (the last piece padded too); a
    ``lax.switch`` picks the compiled size and a ``fori_loop`` runs the pieces. A lot larger than
    every size runs in as many pieces of the largest size's piece as it needs.
    ``rows_sum(rows (p,) int32) -> pytree like start`` must give padding rows (``rows == N``) no
    weight. Nothing is capped or truncated: every member of the lot is in some piece, so the
    sampling is exactly Poisson whatever the padding. ``shards``: the devices a piece is split over
    (:func:`private_gradient` on a mesh), so that each holds ``p/shards`` rows; ``chunk`` must be a
    multiple of it, and a piece then still holds at most ``chunk`` rows.
    """
    n = positive_int("num_samples", num_samples)
    chunk = positive_int("chunk", chunk)
    shards = positive_int("shards", shards)
    if chunk % shards:
        raise ValueError(f"pieces of at most chunk={chunk} rows cannot split into shards={shards} equal parts; use "
                         f"a chunk divisible by {shards}.")
    order, count = poisson_lot(key, n, q)
    sizes = lot_sizes(n, q)
    pieces = [-(-m // chunk) for m in sizes]
    piece = [-(-m // (k * shards)) * shards for m, k in zip(sizes, pieces)]
    length = max(*(k * p for k, p in zip(pieces, piece)), -(-n // piece[-1]) * piece[-1])
    order = jnp.concatenate([order, jnp.full((length - n,), n, jnp.int32)])  # room for every piece

    def run(k, p):
        def body(i, total):
            return jax.tree.map(jnp.add, total, rows_sum(jax.lax.dynamic_slice(order, (i * p,), (p,))))
        return body(0, start) if isinstance(k, int) and k == 1 else jax.lax.fori_loop(0, k, body, start)

    branches = [functools.partial(run, k, p) for k, p in zip(pieces, piece)]
    if sizes[-1] < n:  # beyond the last size: pieces of its piece's size, as many as the lot needs
        branches.append(lambda: run((count + piece[-1] - 1) // piece[-1], piece[-1]))
    branch = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count)
    return jax.lax.switch(branch, branches), count


def gaussian(key: jax.Array, like: Params, std: float) -> Params:
    """``𝒩(0, std² I)`` shaped like ``like``: one normal per entry, drawn by :func:`fnn.noise.normal`
    from a split of ``key`` per leaf, in each leaf's dtype."""
    std = real_in("std", std, 0.0)
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(prng_key("key", key), len(leaves))
    return treedef.unflatten([std * noise.normal(k, t.shape, t.dtype) for t, k in zip(leaves, keys)])


def private_gradient(net: MLP, params: Params, x: jax.Array, y: jax.Array, loss: Loss, key: jax.Array, *,
                     clip: float, noise_multiplier: float, q: float, chunk: int = 1024,
                     l2: float = 0.0, mesh: Mesh | None = None) -> tuple[Params, PrivateStats]:
    """One DP-SGD gradient from the training set ``(x (N, n_0), y)``: ``(g̃, stats)``.

    ``g̃ = (Σ_{x ∈ lot} g_x min(1, c/‖g_x‖) + 𝒩(0, σ²c² I)) / (qN) + βW``, the lot drawn by
    :func:`poisson_lot` from ``key`` and the noise (:func:`gaussian`) from an independent split of
    it. The lot is processed by :func:`lot_sum`, at most ``chunk`` examples per backprop; the
    clipped sum of each piece is read off its δ's (:func:`fnn.per_example.weighted_sum` with the
    clipping weights), so no ``N × P`` (or ``chunk × P``) array is ever built. The result has
    ``params``' structure and dtype. Batch norm in train mode is refused (one example's clip bound
    would not bound its influence).

    The bound in floating point: the norms ``‖g_x‖`` and the clipped sum are both computed in the
    params' dtype from the same rows of the trace (with a ``compute_dtype`` network too: the sum does
    not go through its bfloat16 matmul, whose rounded operands would be another gradient than the
    one whose norm was taken), and each weight clips to ``c (1 − m)``, with the margin
    :func:`clip_margin` covering the rounding of the norm and of the products, so that every
    example adds at most ``c`` (tested in float64).

    Data-parallel, over a 1-D ``mesh`` (:func:`fnn.distributed.data_mesh`; inside ``jit``, params, key
    and ``(x, y)`` replicated or ``(x, y)`` split by sample over several processes): the lot is the
    same global Poisson lot, drawn from the replicated key (every example joins with rate ``q``,
    whatever the sharding); every piece of it is split over the devices (``chunk`` counts the rows of
    all devices together and must be a multiple of their number, :func:`check_chunk`), each device
    clips and sums its rows, and the partitioner all-reduces the sums; the noise, drawn from the
    replicated key, is the same on every device and added once. The result is the single-device one
    to rounding, not bit for bit: the same clipped terms are added in another order (each device's
    partial sums, then the all-reduce, over pieces padded to a multiple of the devices); the lot
    (so its size) and the noise are the same draws, bit for bit.
    """
    loss = check_output(loss, net.output)
    if net.has_state:
        raise ValueError("DP-SGD is not defined for batch normalization in train mode: an example's influence "
                         "reaches every other example through the batch statistics, so clipping its gradient "
                         "does not bound it. Use a network without batch norm.")
    clip = real_in("clip", clip, 0.0, low_open=True)
    noise_multiplier = real_in("noise_multiplier", noise_multiplier, 0.0)
    q = real_in("the sampling rate q", q, 0.0, 1.0, low_open=True)
    chunk = check_chunk(chunk, mesh)
    l2 = check_l2(l2)
    key = prng_key("key", key)
    x = net.check_input(params, x)
    n = x.shape[0]
    nonempty("the training set x", n)
    if jnp.ndim(y) == 0 or jnp.shape(y)[0] != n:
        raise ValueError(f"y must hold one target per example of x ({n}); got shape {jnp.shape(y)}.")
    lot_key, noise_key = jax.random.split(key)
    dtype = jnp.result_type(params[0]["W"])
    bound = clip * (1 - clip_margin(net, dtype))

    def clipped_sum(rows):
        if mesh is not None:  # the lot stays whole on every device (never gathered); each takes its share
            rows = jax.lax.with_sharding_constraint(rows, distributed.replicated(mesh))
        (rows,) = distributed.shard_rows(mesh, rows)
        real = rows < n
        rows = jnp.where(real, rows, 0)
        _, _, _, trace = backprop_trace(net, params, *distributed.shard_rows(mesh, x[rows], y[rows]), loss)
        norms = per_example.grad_norms(net, params, trace)
        weights = jnp.where(real, jnp.minimum(1, bound / jnp.where(norms > 0, norms, 1)), 0).astype(dtype)
        return (per_example.weighted_sum(net, params, trace, weights, full_precision=True),
                jnp.sum(jnp.where(real, trace.costs, 0)),
                jnp.sum(real & (norms > bound), dtype=jnp.int32))

    # The sum starts from the noise: drawn once, before the lot (an operand of the lot's switch, so
    # that XLA materializes it instead of recomputing it inside every consumer of g̃).
    start = (gaussian(noise_key, params, noise_multiplier * clip), jnp.zeros((), dtype), jnp.zeros((), jnp.int32))
    (total, cost, clipped), count = lot_sum(lot_key, n, q, clipped_sum, start, chunk=chunk,
                                            shards=distributed.devices(mesh))
    grads = jax.tree.map(lambda t: t / (q * n), total)
    if l2_active(l2):
        grads = [{**g, "W": g["W"] + l2 * layer["W"]} for g, layer in zip(grads, params)]
    lot = jnp.maximum(count, 1)
    return grads, PrivateStats(count, cost / lot, clipped / lot)


def check_chunk(chunk: int, mesh: Mesh | None) -> int:
    """``chunk`` after checking that it is a positive int and, with a ``mesh``, a multiple of its devices
    (each device clips and sums an equal share of every piece of the lot)."""
    chunk = positive_int("chunk", chunk)
    devices = distributed.devices(mesh)
    if chunk % devices:
        fits = chunk - chunk % devices or devices
        raise ValueError(f"the private step's chunk of {chunk} examples per backprop pass does not split over the "
                         f"mesh's {devices} devices (each clips an equal share of every piece of the lot); use a "
                         f"chunk divisible by {devices}, e.g. Privacy(..., chunk={fits}).")
    return chunk


def clip_margin(net: MLP, dtype) -> float:
    """The relative margin ``m`` by which :func:`private_gradient` clips below ``c``: ``2 k u`` with
    ``u`` the unit roundoff of ``dtype`` and ``k = max_l n_l + 2L + 8``.

    The norm ``‖g_x‖² = Σ_l (‖δ^l_x‖² ‖a^{l−1}_x‖² + ‖δ^l_x‖²)`` is a sum of non-negative terms, each a
    product of sums of at most ``max_l n_l`` squares; such a sum has a relative error below
    ``γ_k = k u / (1 − k u)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, §4.2),
    and the weight and the products of the clipped sum add a few roundings more. With ``m = 2 k u``
    each clipped gradient's norm stays below ``c`` (``1.2·10⁻⁴`` for float32 and 1,024 units).
    """
    return 2 * (max(net.sizes) + 2 * net.num_layers + 8) * float(jnp.finfo(dtype).eps) / 2


# ---------------------------------------------------------------------------------------------
# Training: the settings fnn.fit takes, and what they resolve to.


class Spent(NamedTuple):
    """The privacy a run has spent: its DP-SGD ``steps`` and their composed RDP, ``Σ_t ε_α(q_t, σ_t)`` for
    every order of :data:`ORDERS` (``rdp``, a tuple of floats). Steps at different ``σ`` or ``q`` compose
    by adding their RDP (:meth:`plus`); :attr:`fnn.FitResult.privacy_spent` is one, and a resumed
    :func:`fnn.fit` takes it back as :attr:`Privacy.spent`."""

    steps: int
    rdp: tuple[float, ...]

    def plus(self, other: Spent) -> Spent:
        """The composition of the two: steps and RDP added (both over the same orders)."""
        if len(self.rdp) != len(other.rdp):
            raise ValueError(f"Spent.plus needs both over the same orders; got {len(self.rdp)} and {len(other.rdp)} "
                             "RDP values.")
        return Spent(self.steps + other.steps, tuple(a + b for a, b in zip(self.rdp, other.rdp)))

    def epsilon(self, delta: float) -> float:
        """``ε`` of the ``(ε, δ)`` guarantee at ``delta`` (0 for no steps)."""
        return 0.0 if self.steps == 0 else epsilon(np.asarray(self.rdp), delta)[0]


def account(q: float, noise_multiplier: float, steps: int) -> Spent:
    """:class:`Spent` of ``steps`` DP-SGD steps at sampling rate ``q`` and noise multiplier ``σ``."""
    steps = positive_int("steps", steps, allow_zero=True)
    return Spent(steps, tuple(rdp(q, noise_multiplier, steps).tolist()))


class Privacy(NamedTuple):
    """DP-SGD settings for :func:`fnn.fit` (``fit(..., privacy=Privacy(...))``).

    Attributes:
      clip: ``c``, the per-example gradient norm bound.
      lot_size: ``L``, the expected lot size; the sampling rate is ``q = L/N``, and an epoch is
        ``round(N/L)`` steps (each a fresh Poisson lot, not a pass over a permutation).
      noise_multiplier: ``σ``; or leave it ``None`` and give
      target_epsilon: the ``ε`` the whole run (``start_epoch + epochs`` epochs) may spend; ``σ`` is
        then the smallest that keeps to it (:func:`noise_multiplier_for`).
      delta: ``δ`` of the ``(ε, δ)`` guarantee; it must be below ``1/N`` (a mechanism that publishes
        one example in full, at random, is ``(0, 1/N)``-DP), unless ``allow_large_delta``.
      chunk: at most this many examples per backprop pass over the lot (memory, not privacy); with
        a mesh, the rows of all its devices together, a multiple of their number.
      spent: what the run being resumed spent (its :attr:`fnn.FitResult.privacy_spent`, a
        :class:`Spent`); required when :func:`fnn.fit` resumes (``start_epoch > 0``), so that ``ε``
        counts the earlier steps at the ``σ`` they were taken with, and a ``target_epsilon`` is the
        budget of the whole run.
      allow_large_delta: accept ``δ ≥ 1/N`` (a guarantee that allows releasing an example outright).
    """

    clip: float
    lot_size: int
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    chunk: int = 1024
    spent: Spent | None = None
    allow_large_delta: bool = False


class PrivatePlan(NamedTuple):
    """:class:`Privacy` resolved for one training set: what the compiled epoch needs (hashable), and
    ``spent``, what the run had spent before this call (``Spent(0, zeros)`` for a fresh run)."""

    q: float
    noise_multiplier: float
    clip: float
    chunk: int
    steps: int  # per epoch
    delta: float
    rdp_per_step: tuple[float, ...]
    spent: Spent | None = None

    def spent_after(self, steps_done: int) -> Spent:
        """What the run has spent after ``steps_done`` steps of this plan."""
        new = Spent(steps_done, tuple(steps_done * r for r in self.rdp_per_step))
        return new if self.spent is None else self.spent.plus(new)

    def epsilon(self, steps_done: int) -> float:
        """``ε`` spent after ``steps_done`` steps of this plan, the steps before it included."""
        return self.spent_after(steps_done).epsilon(self.delta)


def plan(settings: Privacy, num_samples: int, epochs: int, start_epoch: int = 0) -> PrivatePlan:
    """Check ``settings`` against a training set of ``num_samples`` and resolve ``σ`` for a run of
    ``epochs`` epochs in all, of which ``start_epoch`` are done (their spend is ``settings.spent``)."""
    if not isinstance(settings, Privacy):
        raise TypeError(f"privacy must be an fnn.privacy.Privacy(...); got {type(settings).__name__}.")
    n = positive_int("the number of training examples", num_samples)
    start_epoch = positive_int("start_epoch", start_epoch, allow_zero=True)
    clip = real_in("Privacy.clip", settings.clip, 0.0, low_open=True)
    lot_size = positive_int("Privacy.lot_size", settings.lot_size)
    if lot_size > n:
        raise ValueError(f"Privacy.lot_size must be at most the {n} training examples; got {lot_size}.")
    if (settings.noise_multiplier is None) == (settings.target_epsilon is None):
        raise ValueError("give exactly one of Privacy.noise_multiplier and Privacy.target_epsilon; got "
                         f"{settings.noise_multiplier!r} and {settings.target_epsilon!r}.")
    chunk = positive_int("Privacy.chunk", settings.chunk)
    delta = real_in("Privacy.delta", settings.delta, 0.0, 1.0, low_open=True, high_open=True)
    if delta >= 1 / n and not settings.allow_large_delta:
        raise ValueError(f"Privacy.delta = {delta:g} is not below 1/N = {1 / n:.3g} for these {n} examples: a "
                         "mechanism that publishes one whole example at random meets such a δ, so the guarantee says "
                         "little. Choose δ < 1/N (say 1/(10 N)), or pass allow_large_delta=True if you mean it.")
    spent = settings.spent
    if spent is not None:
        if not (isinstance(spent, Spent) and len(spent.rdp) == len(ORDERS)):
            raise TypeError(f"Privacy.spent must be an fnn.privacy.Spent over the {len(ORDERS)} orders of ORDERS (a "
                            f"FitResult.privacy_spent); got {spent!r:.80}.")
        spent = Spent(positive_int("Privacy.spent.steps", spent.steps, allow_zero=True), tuple(spent.rdp))
        epsilon(spent.rdp, delta)  # refuses NaN or negative RDP
    q = lot_size / n
    steps = max(1, round(n / lot_size))
    if start_epoch > 0 and spent is None:
        raise ValueError(f"resuming private training at start_epoch={start_epoch} needs what the earlier epochs "
                         "spent: pass Privacy(..., spent=result.privacy_spent) with the FitResult (or checkpoint) "
                         "of the run being resumed. Without it ε would leave those steps out, or count them at the "
                         "wrong σ.")
    if start_epoch == 0 and spent is not None and spent.steps > 0:
        raise ValueError(f"Privacy.spent holds {spent.steps} earlier steps but start_epoch is 0: pass the "
                         "start_epoch of the run being resumed, or leave spent out for a fresh run.")
    if spent is not None and spent.steps < start_epoch * steps:
        raise ValueError(f"Privacy.spent covers {spent.steps} steps, but {start_epoch} epochs of {steps} steps (lot "
                         f"size {lot_size} of {n}) come before start_epoch={start_epoch}: pass the privacy_spent of "
                         "the run being resumed, with its lot size (a resume cannot change the lot size).")
    remaining = epochs - start_epoch
    sigma = settings.noise_multiplier
    if sigma is None:
        sigma = noise_multiplier_for(settings.target_epsilon, q, steps * max(remaining, 1), delta, before=spent)
    q, sigma = _check_rate_and_noise(q, sigma)
    return PrivatePlan(q, sigma, clip, chunk, steps, delta, tuple(rdp(q, sigma).tolist()), spent)


# ---------------------------------------------------------------------------------------------
# DP-SGD in an epoch (fnn.epoch): a batch plan of Poisson lots and the private gradient.


def lots(private: PrivatePlan, width: int = 1) -> Batches:
    """The batch plan of DP-SGD: ``private.steps`` steps per epoch, each step's batch a key from which
    :func:`private_gradient` draws its Poisson lot and its noise. The epoch after ``e`` epochs of
    this run draws from ``fold_in(key, s)``, ``s`` the private steps spent before it (earlier runs'
    included, :attr:`PrivatePlan.spent`), a count that only grows, so no lot or noise is drawn twice;
    the run's key is not advanced. ``account(e)`` is the :class:`Spent` after ``e`` epochs of this
    run, with the history entries ``epsilon`` and ``noise_multiplier``."""

    def epoch_key(key, epochs_done):
        return jax.random.fold_in(key, private.spent_after(epochs_done * private.steps).steps)

    def account(epochs_done):
        spent = private.spent_after(epochs_done * private.steps)
        return spent, {"epsilon": spent.epsilon(private.delta), "noise_multiplier": private.noise_multiplier}

    return Batches(lambda key: (jax.random.split(key, private.steps), None), width, indices=False,
                   epoch_key=epoch_key, account=account)


def gradient(net: MLP, loss: Loss, l2: float, private: PrivatePlan, mesh: Mesh | None = None):
    """The gradient part of a DP-SGD epoch: ``(params, state, x, y, key) -> BatchGradient`` of
    :func:`private_gradient` on the whole training set, the batch being the step's key; its size is
    the lot's drawn size, and it holds no trace (the lot is not recorded) and no batch for the
    optimizer (one that reads the batch is refused by :func:`parts`). With a ``mesh``, data-parallel
    (:func:`private_gradient`)."""

    def private_step(params, state, x, y, key):
        grads, s = private_gradient(net, params, x, y, loss, key, clip=private.clip, q=private.q,
                                    noise_multiplier=private.noise_multiplier, chunk=private.chunk, l2=l2, mesh=mesh)
        return BatchGradient(s.cost, grads, state, None, s.lot_size, None)

    return private_step


def parts(private: PrivatePlan | None, net: MLP, loss: Loss, l2: float, opt, width: int = 1,
          mesh: Mesh | None = None):
    """``(lots(private), gradient(...))``, the two parts of a DP-SGD epoch; ``None`` without a plan.
    Refuses an optimizer that reads the curvature of the batch (K-FAC, Hessian-free)."""
    if private is None:
        return None
    if isinstance(opt, optim.BatchOptimizer):
        raise ValueError(
            f"the {opt.name} optimizer reads the curvature of the batch, which the privacy analysis does not "
            "cover (it bounds one example's influence through the clipped gradient only). Use a first-order "
            "optimizer with privacy.")
    return lots(private, width), gradient(net, loss, l2, private, mesh)


def training(settings: Privacy | None, net: MLP, opt_state, *, num_samples: int, epochs: int, start_epoch: int,
             custom: bool, mesh: Mesh | None = None) -> PrivatePlan | None:
    """For :func:`fnn.fit`: the :class:`PrivatePlan` of ``settings`` for ``epochs`` epochs after
    ``start_epoch``, after checking that the run can be private; ``None`` without settings.
    ``custom``: the run asks for something the private step does not do (autodiff, per-example
    statistics or a gradient of its own). ``mesh``: data-parallel, its devices must divide
    ``settings.chunk`` (:func:`check_chunk`); the plan, and so the accounting, does not depend on it."""
    if settings is None:
        return None
    if custom or net.has_state:
        raise ValueError("privacy needs grad_source='manual', no batch norm, no per_example statistics and no "
                         "gradient of its own (the private step reads the δ's itself).")
    if optim.reads_objective(opt_state):
        raise ValueError("Newton's step reads the Hessian of its objective, a function of the training data that "
                         "the privacy analysis does not cover (it bounds one example's influence through the "
                         "clipped, noised gradient only). Use a first-order optimizer with privacy.")
    private = plan(settings, num_samples, start_epoch + epochs, start_epoch)
    check_chunk(private.chunk, mesh)
    return private
