"""The Laplace approximation and the evidence, from the hand-written curvature.

A Gaussian posterior over the weights centred on trained parameters ``θ*``, with the generalized
Gauss-Newton matrix as its precision (MacKay, "A practical Bayesian framework for backpropagation
networks", Neural Computation 1992; Daxberger et al., "Laplace Redux — effortless Bayesian deep
learning", NeurIPS 2021; Immer et al., "Scalable marginal likelihood estimation for model selection in
deep learning", ICML 2021). Every curvature quantity comes from :mod:`fnn.curvature` (the δ-recursion
extended to second order); nothing here calls autodiff.

**The model.** fnn trains ``C(θ) = (1/N) Σ_x ℓ_x(θ) + ½β Σ_l ‖W^l‖²``. ``N·C(θ)`` is read as a negative log
posterior: the likelihood of sample ``x`` is ``exp(−ℓ_x)`` and the prior ``N(0, δ_l⁻¹ I)`` on every
parameter of layer ``l``, weights and biases, with ``δ = N β`` (the biases, which the L2 term leaves
free, get their layer's precision too: the evidence needs a proper prior). The temperature is 1:
the posterior is ``∝ exp(−N·C)``. Per loss, ``exp(−ℓ_x)`` is

==================================  ====================================================================
``half_mse``                        the Gaussian ``N(y | f, I)``; ``log p = −ℓ − (K/2) log 2π``
``mse``                             the Gaussian ``N(y | f, (K/2) I)`` (ℓ is a mean over the K outputs);
                                    ``log p = −ℓ − (K/2) log πK``
``softmax_/categorical_cross_``     the categorical likelihood; ``log p = −ℓ``
``entropy``
``binary_cross_entropy``,           the product of K Bernoulli likelihoods to the power ``1/K`` (ℓ is a
``..._with_logits``                 mean over the outputs): a tempered likelihood, ``log p`` taken as ``−ℓ``
==================================  ====================================================================

and the output ``o`` the curvature splits at (the logits for a canonical pair, else ``a^L``) is the
``f`` of the predictive. ``mae`` (no curvature) and batch-normalized networks are refused.

**Posterior.** ``Λ = N·G + diag(δ)`` with ``G`` the mean Gauss-Newton matrix of the training data
(:func:`fnn.curvature.ggn_vp`), in one of four structures:

- ``"full"``: the whole ``P × P`` matrix from ``P`` products ``G e_p`` (small networks);
- ``"kron"``: per layer ``N·(G^l ⊗ A^l) + δ_l I`` over ``W̄ = [W | b]`` (row-major), from the Kronecker
  factors (:func:`fnn.curvature.kronecker_factors`: exact columns, KFLR, or sampled, KFAC), kept as the
  eigendecompositions ``A = Q_A diag(a) Q_Aᵀ``, ``G = Q_G diag(g) Q_Gᵀ``: the precision's eigenvalues are
  ``N g_i a_j + δ_l`` with eigenvectors ``q_{G,i} ⊗ q_{A,j}``;
- ``"diag"``: ``N·diag G + δ`` (:func:`fnn.curvature.ggn_diag`, or its Monte-Carlo estimate);
- ``"last_layer"``: the full posterior over the output layer's ``W̄^L`` alone, the other layers fixed at
  ``θ*``: ``Λ_L = Σ_x Σ_c (Δ_{x,c} ⊗ ā_x)(Δ_{x,c} ⊗ ā_x)ᵀ + δ_L I`` from the back-propagated columns
  (:func:`fnn.curvature.split_columns`).

**Evidence.** ``log p(D | δ) ≈ log p(D | θ*) + log p(θ* | δ) + (P/2) log 2π − ½ log det Λ``
``= log p(D | θ*) − ½ Σ_l δ_l ‖θ*_l‖² + ½ Σ_l P_l log δ_l − ½ log det Λ`` (:func:`log_marginal_likelihood`;
for ``"last_layer"`` the sums run over the output layer only). ``log det Λ`` is a sum over the stored
eigenvalues (``"full"`` with one δ, ``"kron"``, ``"diag"``, ``"last_layer"``), so a new δ costs no pass over
the data (Immer et al. 2021, §4); ``"full"`` with a δ per layer takes a Cholesky factorization. Its
derivative is ``∂/∂ log δ_l = ½ (P_l − δ_l ‖θ*_l‖² − δ_l tr Σ_l)``, ``Σ = Λ⁻¹`` and ``Σ_l`` its block of layer
``l``; MacKay's fixed point ``δ_l ← γ_l / ‖θ*_l‖²`` with the effective number of parameters
``γ_l = P_l − δ_l tr Σ_l`` sets it to 0 (:func:`optimize_prior_precision`).

**Predictive** (:func:`glm_predictive`): the linearized network ``f(x; θ) ≈ f(x; θ*) + J_x (θ − θ*)`` gives
``f(x) ~ N(f(x; θ*), J_x Σ J_xᵀ)``. ``J_x`` is read off the δ's: ``∂f_k/∂W̄^l = Δ^l_k ā^{l−1 ᵀ}`` with
``Δ^l_k = ∂f_k/∂z^l`` (:func:`fnn.curvature.output_jacobian`), so for ``"kron"``, in the eigenbasis,

    ``(J Σ Jᵀ)_{kk'} = Σ_l Σ_{i,j} (Q_Gᵀ Δ^l_k)_i (Q_Gᵀ Δ^l_{k'})_i (Q_Aᵀ ā)_j² / (N g_i a_j + δ_l)``,

since ``(q_{G,i} ⊗ q_{A,j})ᵀ (Δ ⊗ ā) = (q_{G,i}ᵀ Δ)(q_{A,j}ᵀ ā)``: no Jacobian and no covariance is
formed. ``"diag"``: ``Σ_{i,j} Δ_{k,i} Δ_{k',i} ā_j² σ²_{ij}``. ``"full"`` and ``"last_layer"`` form ``J``
(``K`` rows per input). :func:`predict` turns it into predictions: the probit approximation
``softmax(f / √(1 + π/8 · diag JΣJᵀ))`` (MacKay 1992; ``sigmoid`` likewise), or Monte-Carlo over
the logits; for regression the mean and ``J Σ Jᵀ`` plus the likelihood's noise. :func:`sample` draws
parameters from the posterior, for a Monte-Carlo predictive through the network itself.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fnn import curvature
from fnn.checks import positive_int, prng_key
from fnn.losses import Loss, check_output, output_curvature, resolve
from fnn.mlp import MLP, Params

STRUCTURES = ("full", "kron", "diag", "last_layer")
CLASSIFICATION = {"softmax_cross_entropy": "softmax", "categorical_cross_entropy": "softmax",
                  "binary_cross_entropy_with_logits": "sigmoid", "binary_cross_entropy": "sigmoid"}


class Posterior(NamedTuple):
    """A Laplace posterior (module docstring).

    ``structure``; ``net``, ``loss``; ``params`` (``θ*``); ``n`` (``N``); ``prior_precision`` (``δ_l``
    per layer, ``(L,)``); ``log_likelihood`` (``log p(D | θ*)``); ``curvature``: the data part ``N·G`` in the
    structure's form (``"full"``: ``H (P, P)`` and its eigendecomposition; ``"kron"``: per layer
    ``(a, Q_A, g, Q_G)`` with ``n`` folded in as ``N g``; ``"diag"``: ``(P,)`` in ``ravel_pytree`` order;
    ``"last_layer"``: ``H_L`` over ``W̄^L.ravel()`` and its eigendecomposition).
    """

    structure: str
    net: MLP
    loss: Loss
    params: Params
    n: int
    prior_precision: jax.Array
    log_likelihood: jax.Array
    curvature: dict


def noise_variance(loss: Loss, k: int) -> float | None:
    """``σ²`` of the Gaussian likelihood ``N(y | f, σ² I)`` that a regression loss over ``k`` outputs is
    (``half_mse``: 1, ``mse``: ``k/2``; module docstring), ``None`` for the other losses."""
    return {"half_mse": 1.0, "mse": k / 2}.get(loss.name)


def _log_normalizer(loss: Loss, k: int) -> float:
    var = noise_variance(loss, k)
    return 0.0 if var is None else 0.5 * k * math.log(2 * math.pi * var)


def _check(net: MLP, loss) -> Loss:
    if not isinstance(net, MLP):
        raise TypeError(f"the Laplace approximation needs the network (an fnn.MLP); got {type(net).__name__}.")
    if any(net.normalized):
        raise ValueError("the Laplace approximation here covers plain layers only; this network has batch norm. "
                         "Train a network without batch norm, or fold the running statistics into W and b first.")
    loss = check_output(resolve(loss), net.output)
    output_curvature(loss, net.output)
    if loss.name == "mae":
        raise ValueError("mae has no curvature (its second derivative is 0 wherever it exists), so its Laplace "
                         "precision would be the prior alone. Use mse or half_mse.")
    return loss


def _precisions(value, layers: int, what: str = "prior_precision") -> jax.Array:
    """``δ`` as a ``(layers,)`` array: a positive scalar for every layer, or one per layer."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(layers, float(arr))
    if arr.shape != (layers,):
        raise ValueError(f"{what} must be a positive number or one per layer ({layers}); got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{what} must be finite and > 0 (a proper prior); got {arr.tolist()}.")
    return jnp.asarray(arr)


def _layer_sizes(params: Params) -> list[int]:
    return [sum(int(v.size) for v in layer.values()) for layer in params]


def _chunks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def fit_laplace(net: MLP, params: Params, data, loss: Loss | str, *, structure: str = "kron",
                prior_precision=None, l2: float | None = None, key: jax.Array | int | None = None,
                samples: int = 1, batch_size: int = 1024) -> Posterior:
    """The Laplace posterior of ``net`` at ``params`` on ``data = (x, y)`` (module docstring).

    Args:
      structure: one of :data:`STRUCTURES`.
      prior_precision: ``δ`` (a number, or one per layer); or give ``l2``, the ``β`` training used, for
        ``δ = N β``.
      key, samples: sampled columns (KFAC factors, the Monte-Carlo diagonal) instead of exact ones.
      batch_size: rows per pass, to bound memory (the result does not depend on it beyond rounding).
    """
    loss = _check(net, loss)
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}; got {structure!r}.")
    net.check_params(params)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"data must be the pair (x, y) of training inputs and targets; got {type(data).__name__}"
                        f"{'' if not isinstance(data, (tuple, list)) else f' of length {len(data)}'}.")
    x, y = data
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != net.sizes[0]:
        raise ValueError(f"x must have shape (N, {net.sizes[0]}): one row of {net.sizes[0]} features per training "
                         f"sample; got shape {tuple(x.shape)}.")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("data is empty: the Laplace approximation needs the training set.")
    batch_size = positive_int("batch_size", batch_size)
    if prior_precision is None:
        if l2 is None or not l2 > 0:
            raise ValueError("give prior_precision (δ > 0), or the l2 (β > 0) training used, for δ = N·β: the "
                             "evidence needs a proper prior.")
        prior_precision = n * float(l2)
    delta = _precisions(prior_precision, net.num_layers)
    y = jnp.asarray(y)
    loss.target(jnp.zeros((n, net.sizes[-1]), x.dtype), y)  # the targets' shape and range, checked here, eagerly
    samples = positive_int("samples", samples)
    keys = None if key is None else jax.random.split(prng_key("key", key), len(_chunks(n, batch_size)))
    if structure == "full":
        size = ravel_pytree(params)[0].size
        loglik, acc = 0.0, None
        for lo, hi in _chunks(n, batch_size):
            xc, yc = x[lo:hi], y[lo:hi]
            part = {"H": jnp.concatenate([_full_columns(net, loss, params, xc, yc, s, min(s + 256, size))
                                          for s in range(0, size, 256)], axis=0)}
            loglik = loglik + _chunk_log_likelihood(net, loss, params, xc, yc)
            acc = part if acc is None else _add(acc, part)
    else:
        acc, loglik = _curvature_total(net, loss, structure, samples, batch_size, params, x, y, keys)
    curv = _finish(structure, acc, n)
    if not bool(_all_finite([loglik, curv])):
        raise FloatingPointError(f"the log-likelihood or the curvature at these params is not finite (log p(D | θ*) "
                                 f"= {float(loglik)}): check the data and params for NaN or inf, and that "
                                 "training converged.")
    return Posterior(structure, net, loss, params, n, delta, jnp.asarray(loglik), curv)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_log_likelihood(net, loss, params, x, y) -> jax.Array:
    """``Σ_x log p(y_x | θ)`` over the chunk."""
    out = net.apply(params, x)
    return -x.shape[0] * (loss(out, y) + _log_normalizer(loss, out.shape[-1]))


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _full_columns(net, loss, params, x, y, start: int, stop: int) -> jax.Array:
    """Rows ``start:stop`` of the chunk's share of ``N·G``: ``m · G e_p``, one product per column, in sequence
    (XLA's CPU backend in jaxlib 0.10 miscompiles the batched float32 form of the softmax curvature's
    ``u − Σ_k p_k u_k``, with ``p`` broadcast over the columns, beyond 2¹⁵ elements)."""
    op = curvature.product_operator(net, params, x, y, loss)
    flat, unravel = ravel_pytree(params)
    eye = jnp.eye(flat.size, dtype=flat.dtype)[start:stop]
    return x.shape[0] * jax.lax.map(lambda e: ravel_pytree(op(unravel(e)))[0], eye)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _curvature_sum(net, loss, structure, samples, params, x, y, key) -> tuple[dict, jax.Array]:
    """The chunk's share of ``N·G`` in the structure's raw form (sums over its rows), ``"full"`` aside, and its
    log-likelihood, in one program (its forward pass is the curvature's)."""
    m = x.shape[0]
    loglik = _chunk_log_likelihood(net, loss, params, x, y)
    if structure == "diag":
        d = (curvature.ggn_diag(net, params, x, y, loss) if key is None else
             curvature.ggn_diag_mc(net, params, x, y, loss, key=key, samples=samples))
        return {"h": m * ravel_pytree(d)[0]}, loglik
    if structure == "kron":
        factors = curvature.kronecker_factors(net, params, x, y, loss, key=key, samples=samples)
        return {"A": [m * f.A for f in factors], "G": [m * f.G for f in factors]}, loglik
    cols = curvature.split_columns(net, params, x, y, loss, key=key, samples=samples)
    d, a = cols.deltas[-1], cols.inputs[-1]  # (C, N, K), (N, n+1)
    per = jnp.einsum("cnk,ni->cnki", d, a).reshape(d.shape[0] * d.shape[1], -1)
    return {"H": cols.scale * per.T @ per}, loglik


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _curvature_total(net, loss, structure, samples, size, params, x, y, keys) -> tuple[dict, jax.Array]:
    """:func:`_curvature_sum` over the chunks of ``size`` rows, summed in one program."""
    return curvature.sum_over_chunks(functools.partial(_curvature_sum.__wrapped__, net, loss, structure, samples,
                                                       params), size, x, y, keys)


@jax.jit
def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)]))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _finish(structure: str, acc: dict, n: int) -> dict:
    """The curvature as kept: symmetrized, and its eigendecomposition (module docstring)."""
    if structure in ("full", "last_layer"):
        h = (acc["H"] + acc["H"].T) / 2
        lam, vec = jnp.linalg.eigh(h)
        return {"H": h, "eigvals": jnp.maximum(lam, 0), "eigvecs": vec}
    if structure == "diag":
        return {"h": acc["h"]}
    out = []
    for A, G in zip(acc["A"], acc["G"]):
        a, qa = jnp.linalg.eigh((A + A.T) / (2 * n))
        g, qg = jnp.linalg.eigh((G + G.T) / 2)  # N·G^l: the N is carried by g
        out.append((jnp.maximum(a, 0), qa, jnp.maximum(g, 0), qg))
    return {"layers": out}


def _layer_norms(post: Posterior) -> jax.Array:
    """``‖θ*_l‖²`` per layer (weights and biases)."""
    return _squared_norms(post.params)


@jax.jit
def _squared_norms(params: Params) -> jax.Array:
    return jnp.stack([sum(jnp.sum(v ** 2) for v in layer.values()) for layer in params])


@jax.jit
def _kron_logdet_and_trace(layers: list, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``Σ_l Σ_ij log(N g_i a_j + δ_l)`` and ``Σ_ij 1/(N g_i a_j + δ_l)`` per layer: one program for every δ."""
    logdet, traces = 0.0, []
    for l, (a, _, g, _) in enumerate(layers):
        ev = jnp.outer(g, a) + delta[l]
        logdet = logdet + jnp.sum(jnp.log(ev))
        traces.append(jnp.sum(1 / ev))
    return logdet, jnp.stack(traces)


def _scope(post: Posterior) -> np.ndarray:
    """The layers the posterior covers: all, or the output layer alone."""
    layers = post.net.num_layers
    return np.arange(layers) if post.structure != "last_layer" else np.array([layers - 1])


def _per_param(post: Posterior, delta: jax.Array) -> jax.Array:
    """``δ`` spread over the flat parameters (``ravel_pytree`` order)."""
    return jnp.concatenate([jnp.full(s, d) for s, d in zip(_layer_sizes(post.params), delta)])


def _logdet_and_trace(post: Posterior, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log det Λ`` and ``tr Σ_l`` per layer (0 outside the posterior's scope)."""
    c, layers = post.curvature, post.net.num_layers
    if post.structure == "kron":
        return _kron_logdet_and_trace(c["layers"], delta)
    if post.structure == "diag":
        ev = c["h"] + _per_param(post, delta)
        sizes = np.cumsum([0, *_layer_sizes(post.params)])
        inv = 1 / ev
        return jnp.sum(jnp.log(ev)), jnp.asarray([jnp.sum(inv[s:e]) for s, e in zip(sizes[:-1], sizes[1:])])
    if post.structure == "last_layer":
        ev = c["eigvals"] + delta[-1]
        return jnp.sum(jnp.log(ev)), jnp.zeros(layers).at[-1].set(jnp.sum(1 / ev))
    sizes = np.cumsum([0, *_layer_sizes(post.params)])
    if bool(jnp.all(delta == delta[0])):
        ev = c["eigvals"] + delta[0]
        diag_sigma = (c["eigvecs"] ** 2) @ (1 / ev)
        logdet = jnp.sum(jnp.log(ev))
    else:
        chol = jnp.linalg.cholesky(c["H"] + jnp.diag(_per_param(post, delta)))
        logdet = 2 * jnp.sum(jnp.log(jnp.diag(chol)))
        inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(chol.shape[0], dtype=chol.dtype))
        diag_sigma = jnp.diag(inv)
    return logdet, jnp.asarray([jnp.sum(diag_sigma[s:e]) for s, e in zip(sizes[:-1], sizes[1:])])


def log_marginal_likelihood(post: Posterior, prior_precision=None) -> jax.Array:
    """``log p(D | δ)`` (module docstring) at the posterior's ``δ`` or at ``prior_precision``; no pass over
    the data."""
    delta = post.prior_precision if prior_precision is None else _precisions(prior_precision, post.net.num_layers)
    scope = _scope(post)
    sizes = jnp.asarray(_layer_sizes(post.params), delta.dtype)[scope]
    logdet, _ = _logdet_and_trace(post, delta)
    d = delta[scope]
    return (post.log_likelihood - 0.5 * jnp.sum(d * _layer_norms(post)[scope]) + 0.5 * jnp.sum(sizes * jnp.log(d))
            - 0.5 * logdet)


def evidence_gradient(post: Posterior, prior_precision=None) -> jax.Array:
    """``∂ log p(D | δ) / ∂ log δ_l`` per layer, ``½(P_l − δ_l‖θ*_l‖² − δ_l tr Σ_l)`` (0 outside the scope)."""
    delta = post.prior_precision if prior_precision is None else _precisions(prior_precision, post.net.num_layers)
    _, traces = _logdet_and_trace(post, delta)
    mask = jnp.zeros(post.net.num_layers).at[_scope(post)].set(1.0)
    sizes = jnp.asarray(_layer_sizes(post.params), delta.dtype)
    return mask * 0.5 * (sizes - delta * _layer_norms(post) - delta * traces)


class PriorFit(NamedTuple):
    """:func:`optimize_prior_precision`'s result: the posterior at the chosen δ, the iterations taken,
    whether the relative change fell below the tolerance, and the evidence after every iteration."""

    posterior: Posterior
    iterations: int
    converged: bool
    evidence: list


def optimize_prior_precision(post: Posterior, *, method: str = "fixed_point", per_layer: bool = False,
                             iters: int = 200, tol: float | None = None, learning_rate: float = 0.5) -> PriorFit:
    """The ``δ`` that maximizes the evidence, one for every layer (``per_layer=False``) or one each.

    ``"fixed_point"``: MacKay's update ``δ ← γ / ‖θ*‖²``, ``γ = P − δ tr Σ`` (summed over the layers for one
    δ); it converges in a few to a few tens of iterations where ``‖θ*‖²`` is not tiny, since ``γ`` moves
    slowly with δ. ``"gradient"``: ascent on ``log δ`` with step ``learning_rate · ∂/∂ log δ / P`` (``P``
    of the δ's layers), slower but monotone for a small enough step. Both stop when ``log δ`` moves by
    less than ``tol`` (default ``1e-10`` for float64 curvature, ``1e-5`` for float32, where the iteration's
    own rounding moves ``log δ`` by about ``10⁻⁶``).
    """
    if method not in ("fixed_point", "gradient"):
        raise ValueError(f"method must be 'fixed_point' or 'gradient'; got {method!r}.")
    iters = positive_int("iters", iters)
    if tol is None:
        tol = 1e-10 if post.log_likelihood.dtype == jnp.float64 else 1e-5
    scope = _scope(post)
    layers = post.net.num_layers
    sizes = np.asarray(_layer_sizes(post.params), float)
    norms = np.asarray(_layer_norms(post))
    delta = np.asarray(post.prior_precision, float)
    history, converged = [], False
    for _ in range(iters):
        _, traces = _logdet_and_trace(post, jnp.asarray(delta))
        traces = np.asarray(traces)
        if method == "fixed_point":
            gamma = sizes - delta * traces
            if per_layer:
                new = delta.copy()
                new[scope] = gamma[scope] / norms[scope]
            else:
                new = np.full(layers, gamma[scope].sum() / norms[scope].sum())
        else:
            grad = np.asarray(evidence_gradient(post, jnp.asarray(delta)))
            if per_layer:
                step = np.zeros(layers)
                step[scope] = learning_rate * grad[scope] / sizes[scope]
            else:
                step = np.full(layers, learning_rate * grad[scope].sum() / sizes[scope].sum())
            new = delta * np.exp(step)
        moved = np.max(np.abs(np.log(new[scope]) - np.log(delta[scope])))
        delta = new
        history.append(float(log_marginal_likelihood(post, jnp.asarray(delta))))
        if not np.all(np.isfinite(delta)) or np.any(delta <= 0):
            raise FloatingPointError(f"the {method} iteration left the positive reals (δ = {delta.tolist()}); "
                                     "try method='gradient' with a smaller learning_rate.")
        if moved < tol:
            converged = True
            break
    return PriorFit(post._replace(prior_precision=jnp.asarray(delta)), len(history), converged, history)


def glm_predictive(post: Posterior, x) -> tuple[jax.Array, jax.Array]:
    """The linearized predictive at inputs ``x (M, d)``: ``f(x; θ*) (M, K)`` and ``J Σ Jᵀ (M, K, K)``
    (module docstring), ``f`` the output the curvature splits at."""
    f, cols = curvature.output_jacobian(post.net, post.params, x, post.loss)
    delta, c = post.prior_precision, post.curvature
    if post.structure == "kron":
        cov = 0.0
        for (a, qa, g, qg), d, ab, dl in zip(c["layers"], delta, cols.inputs, cols.deltas):
            u = jnp.einsum("kni,ij->nkj", dl, qg)  # Q_Gᵀ Δ_k
            w = (ab @ qa) ** 2  # (Q_Aᵀ ā)²
            t = w @ (1 / (jnp.outer(g, a) + d)).T  # Σ_j w_j / (N g_i a_j + δ)
            cov = cov + jnp.einsum("nki,nli,ni->nkl", u, u, t)
        return f, cov
    if post.structure == "diag":
        variances = _unflatten(post, 1 / (c["h"] + _per_param(post, delta)))
        cov = 0.0
        for layer, ab, dl in zip(variances, cols.inputs, cols.deltas):
            s = jnp.concatenate([layer["W"], layer["b"][:, None]], axis=1)  # σ² over W̄
            t = (ab ** 2) @ s.T  # Σ_j ā_j² σ²_ij
            cov = cov + jnp.einsum("kni,lni,ni->nkl", dl, dl, t)
        return f, cov
    if post.structure == "last_layer":
        jac = jnp.einsum("kni,nj->nkij", cols.deltas[-1], cols.inputs[-1]).reshape(f.shape[0], f.shape[1], -1)
        sigma = (c["eigvecs"] / (c["eigvals"] + delta[-1])) @ c["eigvecs"].T
        return f, jnp.einsum("nkp,pq,nlq->nkl", jac, sigma, jac)
    jac = _flat_jacobian(cols)
    prec = c["H"] + jnp.diag(_per_param(post, delta))
    sigma = jnp.linalg.inv(prec)
    return f, jnp.einsum("nkp,pq,nlq->nkl", jac, (sigma + sigma.T) / 2, jac)


def _unflatten(post: Posterior, flat: jax.Array) -> Params:
    return ravel_pytree(post.params)[1](flat)


def _flat_jacobian(cols) -> jax.Array:
    """``J (M, K, P)`` in ``ravel_pytree`` order (per layer ``W`` row-major, then ``b``)."""
    parts = []
    for ab, dl in zip(cols.inputs, cols.deltas):
        m, k = dl.shape[1], dl.shape[0]
        parts.append(jnp.einsum("kni,nj->nkij", dl, ab[:, :-1]).reshape(m, k, -1))
        parts.append(jnp.moveaxis(dl, 0, 1))
    return jnp.concatenate(parts, axis=2)


def predict(post: Posterior, x, *, method: str = "probit", samples: int = 1000,
            key: jax.Array | int | None = None):
    """Predictions from :func:`glm_predictive`.

    Classification (the softmax or sigmoid of a canonical pair): the class probabilities ``(M, K)``, by
    the probit approximation (``method="probit"``: ``link(f / √(1 + π/8 · diag JΣJᵀ))``) or by ``samples``
    draws of the logits from ``N(f, JΣJᵀ)`` (``"mc"``, needs ``key``). Regression (``mse``, ``half_mse``):
    ``(mean, covariance)`` with the likelihood's noise added (``σ² I``, ``σ² = 1`` or ``K/2``).
    """
    f, cov = glm_predictive(post, x)
    k = f.shape[-1]
    noise = noise_variance(post.loss, k)
    if noise is not None:
        return f, cov + noise * jnp.eye(k, dtype=f.dtype)
    if not output_curvature(post.loss, post.net.output).at_logits:
        raise ValueError(f"{post.loss.name} on a {post.net.output} output: the predictive is over the probabilities "
                         "themselves (glm_predictive), with no link to integrate; use the canonical output.")
    link = jax.nn.softmax if CLASSIFICATION[post.loss.name] == "softmax" else jax.nn.sigmoid
    if method == "probit":
        var = jnp.diagonal(cov, axis1=1, axis2=2)
        return link(f / jnp.sqrt(1 + math.pi / 8 * var))
    if method == "mc":
        if key is None:
            raise ValueError("method='mc' needs key (a PRNG key or an int seed) for the logits' draws.")
        samples = positive_int("samples", samples)
        chol = jnp.linalg.cholesky(cov + 1e-12 * jnp.eye(k, dtype=f.dtype))
        eps = jax.random.normal(prng_key("key", key), (samples, *f.shape), f.dtype)
        return jnp.mean(link(f + jnp.einsum("nkl,snl->snk", chol, eps)), axis=0)
    raise ValueError(f"method must be 'probit' or 'mc'; got {method!r}.")


def sample(post: Posterior, key: jax.Array | int, count: int) -> Params:
    """``count`` draws of the parameters from the posterior, stacked on a leading axis of every leaf
    (the layers outside a ``"last_layer"`` posterior stay at ``θ*``)."""
    count = positive_int("count", count)
    key = prng_key("key", key)
    delta, c = post.prior_precision, post.curvature
    flat, unravel = ravel_pytree(post.params)
    if post.structure == "diag":
        eps = jax.random.normal(key, (count, flat.size), flat.dtype)
        draws = flat + eps / jnp.sqrt(c["h"] + _per_param(post, delta))
        return jax.vmap(unravel)(draws)
    if post.structure == "full":
        chol = jnp.linalg.cholesky(c["H"] + jnp.diag(_per_param(post, delta)))
        eps = jax.random.normal(key, (flat.size, count), flat.dtype)
        z = jax.scipy.linalg.solve_triangular(chol.T, eps, lower=False)  # z ~ N(0, Λ⁻¹)
        return jax.vmap(unravel)(flat + z.T)
    if post.structure == "last_layer":
        last = post.params[-1]
        wbar = jnp.concatenate([last["W"], last["b"][:, None]], axis=1)
        eps = jax.random.normal(key, (count, wbar.size), wbar.dtype)
        z = (eps / jnp.sqrt(c["eigvals"] + delta[-1])) @ c["eigvecs"].T
        draws = wbar + z.reshape(count, *wbar.shape)
        out = [jax.tree.map(lambda t: jnp.broadcast_to(t, (count, *t.shape)), layer) for layer in post.params[:-1]]
        return [*out, {"W": draws[:, :, :-1], "b": draws[:, :, -1]}]
    out = []
    for layer, (a, qa, g, qg), d, k in zip(post.params, c["layers"], delta, jax.random.split(key, len(delta))):
        wbar = jnp.concatenate([layer["W"], layer["b"][:, None]], axis=1)
        eps = jax.random.normal(k, (count, *wbar.shape), wbar.dtype)
        z = jnp.einsum("ij,sjk,lk->sil", qg, eps / jnp.sqrt(jnp.outer(g, a) + d), qa)
        draws = wbar + z
        out.append({"W": draws[:, :, :-1], "b": draws[:, :, -1]})
    return out
