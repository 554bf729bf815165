"""Batch normalization (Ioffe & Szegedy 2015) of one layer, forward and hand-derived backward.

A batch-normalized layer replaces ``z = W a + b`` by ``h = W a`` (no bias: β takes its place) and

    μ = (1/N) Σ_x h_x,   σ² = (1/N) Σ_x (h_x − μ)²,   x̂ = (h − μ)/√(σ² + ε),   u = γ ⊙ x̂ + β,

followed by the activation, ``a = φ(u)``. In train mode μ and σ² are the batch's statistics and
the running averages are updated, ``m ← ρ m + (1−ρ) μ`` and ``v ← ρ v + (1−ρ) σ² N/(N−1)``; in
eval mode the running ``m`` and ``v`` take their place and the layer is a fixed affine map.

Backward, with ``G`` the per-sample ``δ`` at ``u`` (rows of shape ``(N, n)``, the batch-mean
``1/N`` applied in the parameter gradients as in :mod:`fnn.backprop`):

    ∂C/∂γ = (1/N) Σ_x G ⊙ x̂,      ∂C/∂β = (1/N) Σ_x G,
    δ_h = γ/√(σ²+ε) ⊙ (G − mean_x G − x̂ ⊙ mean_x(G ⊙ x̂))      (train mode)
    δ_h = γ/√(v+ε) ⊙ G                                          (eval mode)

The two mean terms of train mode are the paths through μ and σ²; dropping them (a widely copied
mistake) gives the eval-mode formula applied to batch statistics, which is wrong in training.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Cache(NamedTuple):
    """What the backward pass needs: ``x̂ (N, n)`` and ``1/√(σ²+ε) (n,)``."""

    xhat: jax.Array
    inv_std: jax.Array


def forward(h, gamma, beta, running: dict, *, train: bool, momentum: float, eps: float):
    """``h (N, n) -> (u (N, n), cache, new running statistics {"mean", "var"})``."""
    if train:
        n = h.shape[0]
        if n < 2:
            raise ValueError(
                f"batch normalization in train mode needs a batch of at least 2 samples to estimate a "
                f"variance; got a batch of {n}. Use a larger batch, or eval mode (train=False)."
            )
        mu = jnp.mean(h, axis=0)
        var = jnp.mean(jnp.square(h - mu), axis=0)
        new = {
            "mean": momentum * running["mean"] + (1 - momentum) * mu,
            "var": momentum * running["var"] + (1 - momentum) * var * (n / (n - 1)),
        }
    else:
        mu, var, new = running["mean"], running["var"], running
    inv_std = jax.lax.rsqrt(var + eps)
    xhat = (h - mu) * inv_std
    return gamma * xhat + beta, Cache(xhat, inv_std), new


def backward(G, gamma, cache: Cache, *, train: bool):
    """``G = δ at u (N, n) -> (δ_h (N, n), ∂C/∂γ (n,), ∂C/∂β (n,))`` (see the module docstring)."""
    grad_gamma = jnp.mean(G * cache.xhat, axis=0)
    grad_beta = jnp.mean(G, axis=0)
    if train:
        G = G - grad_beta - cache.xhat * grad_gamma  # the paths through μ and σ²
    return gamma * cache.inv_std * G, grad_gamma, grad_beta
