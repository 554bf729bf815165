"""The multilayer perceptron: static configuration plus pure ``init`` and ``apply``.

Layer ``l = 1..L`` computes ``z^l = W^l a^{l-1} + b^l`` and ``a^l = φ_l(z^l)``, with ``a^0 = x``.
On a batch with samples as rows this is ``Z^l = A^{l-1} (W^l)ᵀ + b^l``. Parameters are a plain
list with one ``{"W": (fan_out, fan_in), "b": (fan_out,)}`` dict per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fnn import _checks
from fnn.activations import ACTIVATIONS, OUTPUT_ONLY, Activation
from fnn.initializers import INITIALIZERS

Params = list  # list[dict[str, jax.Array]]: [{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...]


@dataclasses.dataclass(frozen=True, init=False)
class MLP:
    """Configuration of a fully connected network; immutable and hashable (a valid static jit arg).

    Args:
      sizes: ``(n_0, n_1, ..., n_L)``: input width, hidden widths, output width.
      activation: one name for every hidden layer, or a sequence of one name per hidden layer.
      output: the output layer's activation (``"identity"`` for logits/regression,
        ``"softmax"``, ``"sigmoid"``, ...).
      init: initializer name, see :mod:`fnn.initializers`; stored as ``initializer`` (the
        method :meth:`init` creates parameters).

    Example: ``MLP((784, 256, 10), "relu", "identity")`` has two layers, W^1 (256, 784), W^2 (10, 256).
    """

    sizes: tuple[int, ...]
    activation: tuple[str, ...]
    output: str
    initializer: str

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Sequence[str] = "relu",
        output: str = "identity",
        init: str = "classic",
    ):
        ok = isinstance(sizes, Sequence) and len(sizes) >= 2
        if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise ValueError(
                f"sizes must be a sequence of at least two positive ints (input, ..., output); "
                f"got {sizes!r}."
            )
        sizes = tuple(sizes)
        hidden = len(sizes) - 2
        if isinstance(activation, str):
            names = (activation,) * hidden
        else:
            names = tuple(activation)
            if len(names) != hidden:
                raise ValueError(
                    f"activation has {len(names)} names but sizes {sizes} has {hidden} hidden "
                    f"layers; give one name, or one per hidden layer."
                )
        for name in names:
            _checks.lookup(ACTIVATIONS, "activation", name)
            if name in OUTPUT_ONLY:
                raise ValueError(f"{name!r} acts on a whole row and is only allowed as output.")
        _checks.lookup(ACTIVATIONS, "activation", output)
        _checks.lookup(INITIALIZERS, "initializer", init)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "activation", names)
        object.__setattr__(self, "output", output)
        object.__setattr__(self, "initializer", init)

    @property
    def num_layers(self) -> int:
        """``L``, the number of weight layers."""
        return len(self.sizes) - 1

    @property
    def activations(self) -> tuple[Activation, ...]:
        """``(φ_1, ..., φ_L)``: the hidden activations followed by the output activation."""
        return tuple(ACTIVATIONS[n] for n in self.activation + (self.output,))

    def init(self, key: jax.Array, dtype=jnp.float32) -> Params:
        """Fresh parameters ``[{"W": (n_l, n_{l-1}), "b": (n_l,)} for l = 1..L]`` of ``dtype``."""
        init = INITIALIZERS[self.initializer]
        keys = jax.random.split(key, self.num_layers)
        params = []
        for k, fan_in, fan_out in zip(keys, self.sizes[:-1], self.sizes[1:]):
            W, b = init(k, fan_in, fan_out, dtype)
            params.append({"W": W, "b": b})
        return params

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """The network's output ``a^L``: ``x (N, n_0) -> (N, n_L)``. Pure; jit/vmap/grad-able."""
        _, a = self.forward(params, x)
        return a[-1]

    def forward(self, params: Params, x: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """The forward pass keeping every layer: ``zs = [z^1..z^L]``, ``acts = [a^0=x, a^1..a^L]``.

        ``z^l`` and ``a^l`` have shape ``(N, n_l)``; this is what the backprop consumes.
        """
        x = self.check_input(params, x)
        zs, acts = [], [x]
        for layer, act in zip(params, self.activations):
            z = acts[-1] @ layer["W"].T + layer["b"]  # z^l = W^l a^{l-1} + b^l, batched
            zs.append(z)
            acts.append(act.phi(z))  # a^l = φ(z^l)
        return zs, acts

    def check_params(self, params: Params) -> None:
        """Raise ``ValueError``/``TypeError`` unless ``params`` matches this configuration."""
        if not isinstance(params, (list, tuple)) or len(params) != self.num_layers:
            got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(
                f"params must be a list of {self.num_layers} layers for sizes {self.sizes}; got {got}."
            )
        dtype = None
        for l, (layer, fan_in, fan_out) in enumerate(zip(params, self.sizes[:-1], self.sizes[1:]), 1):
            if not isinstance(layer, dict) or not {"W", "b"} <= set(layer):
                raise ValueError(f"layer {l} of params must be a dict with keys 'W' and 'b'.")
            for name, want in (("W", (fan_out, fan_in)), ("b", (fan_out,))):
                got = tuple(jnp.shape(layer[name]))
                if got != want:
                    raise ValueError(f"params[{l - 1}]['{name}'] must have shape {want}; got {got}.")
                leaf_dtype = jnp.result_type(layer[name])
                dtype = dtype or leaf_dtype
                if not jnp.issubdtype(leaf_dtype, jnp.floating) or leaf_dtype != dtype:
                    raise TypeError(
                        f"params must all share one floating dtype; params[{l - 1}]['{name}'] "
                        f"is {leaf_dtype}, expected {dtype}."
                    )

    def check_input(self, params: Params, x) -> jax.Array:
        """``x`` as an array after checking it against this configuration and ``params``."""
        self.check_params(params)
        x = _checks.float_array("x", x, ndim=2)
        if x.shape[1] != self.sizes[0]:
            raise ValueError(
                f"x has {x.shape[1]} features per sample but the network expects "
                f"{self.sizes[0]}: x must have shape (batch, {self.sizes[0]}); got {x.shape}."
            )
        dtype = jnp.result_type(params[0]["W"])
        if x.dtype != dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but params have {dtype}; cast one to the other "
                f"(e.g. x.astype(params[0]['W'].dtype))."
            )
        return x
