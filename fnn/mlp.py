"""The multilayer perceptron: static configuration plus pure ``init`` and ``apply``.

Layer ``l = 1..L`` computes ``z^l = W^l a^{l-1} + b^l`` and ``a^l = φ_l(z^l)``, with ``a^0 = x``.
On a batch with samples as rows this is ``Z^l = A^{l-1} (W^l)ᵀ + b^l``. Parameters are a plain
list with one ``{"W": (fan_out, fan_in), "b": (fan_out,)}`` dict per layer.

A hidden layer with batch normalization (:mod:`fnn.batchnorm`) holds ``{"W", "gamma", "beta"}``
instead (no ``b``) and computes ``z^l = γ ⊙ x̂ + β`` from ``h = W a^{l-1}``. Its running mean and
variance live in a separate *state* list (``net.init_state()``), one ``{"mean", "var"}`` dict per
normalized layer and ``{}`` elsewhere, so optimizers never touch them:

    out = net.apply(params, x, state)                # eval mode: running statistics
    out, state = net.apply_train(params, x, state)   # train mode: batch statistics, new state

Mixed precision: ``MLP(..., compute_dtype="bfloat16")`` runs every matmul of the forward pass
(``a^{l-1} (W^l)ᵀ``) and of the backprop (``(δ^l)ᵀ a^{l-1}`` and ``δ^l W^l``) with operands rounded
to bfloat16 and products accumulated and returned in the params' dtype (float32): the master
weights, biases, activations, the loss, the gradients and the optimizer state all stay float32.
That is the mode for hardware with fast bfloat16 matmuls (GPU tensor cores, TPUs); results differ
from a float32 run by bfloat16 rounding of the matmul operands (relative error at most 2⁻⁸ per
operand). bfloat16 has float32's exponent range, so no loss scaling is needed. (``jax.grad`` of
such a network differentiates the same rounded forward pass, but its backward matmuls take a
float32 cotangent and run in float32; only the manual backprop keeps them in bfloat16.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnn import batchnorm, checks
from fnn.activations import ACTIVATIONS, OUTPUT_ONLY, Activation
from fnn.initializers import INITIALIZERS

Params = list  # list[dict[str, jax.Array]]: [{"W": (n_l, n_{l-1}), "b": (n_l,)}, ...]
State = list  # list[dict[str, jax.Array]]: [{"mean": (n_l,), "var": (n_l,)} or {}, ...]


COMPUTE_DTYPES = ("bfloat16",)  # float16 would need loss scaling (its range ends at 65504)


def _compute_dtype_name(dtype) -> str | None:
    """``None``, or the canonical name of one of ``COMPUTE_DTYPES`` given by name or type."""
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None or one of {list(COMPUTE_DTYPES)}; got {dtype!r}.")
    return name


class ForwardTrace(NamedTuple):
    """Every intermediate of one forward pass, layer by layer ``l = 1..L`` (all ``(N, n_l)``):

    - ``zs[l-1] = z^l``, the input of φ (``h^l + b^l``, or ``γ ⊙ x̂ + β`` with batch norm);
    - ``acts[l] = a^l = φ(z^l)``, with ``acts[0] = x``;
    - ``bn[l-1]``: the :class:`fnn.batchnorm.Cache` of a batch-normalized layer, ``None`` elsewhere;
    - ``state``: the new running statistics (``None`` when no state was passed);
    - ``hs[l-1] = h^l = a^{l-1} (W^l)ᵀ``, the matmul's output before the bias or batch norm.

    This is what the backprop consumes (:func:`fnn.backprop.backprop_trace`) and what diagnostics
    and per-example quantities read. Under ``jit``, entries nobody reads cost nothing.
    """

    zs: list
    acts: list
    bn: list
    state: State | None
    hs: list


Cache = ForwardTrace  # the former name (which had the first four fields)


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
      batch_norm: ``True`` for every hidden layer, or one bool per hidden layer.
      bn_momentum: ``ρ`` of the running averages; bn_eps: ``ε`` of ``√(σ² + ε)``.
      compute_dtype: ``None`` (matmuls in the params' dtype) or ``"bfloat16"`` for the operands
        of every matmul (see :meth:`matmul`).

    Example: ``MLP((784, 256, 10), "relu", "identity")`` has two layers, W^1 (256, 784), W^2 (10, 256).
    """

    sizes: tuple[int, ...]
    activation: tuple[str, ...]
    output: str
    initializer: str
    batch_norm: tuple[bool, ...]
    bn_momentum: float
    bn_eps: float
    compute_dtype: str | None

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Sequence[str] = "relu",
        output: str = "identity",
        init: str = "classic",
        batch_norm: bool | Sequence[bool] = False,
        bn_momentum: float = 0.9,
        bn_eps: float = 1e-5,
        compute_dtype: str | None = None,
    ):
        ok = isinstance(sizes, Sequence) and len(sizes) >= 2
        if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise ValueError(
                f"sizes must be a sequence of at least two positive ints (input, ..., output); "
                f"got {sizes!r}."
            )
        sizes = tuple(sizes)
        hidden = len(sizes) - 2
        names = (activation,) * hidden if isinstance(activation, str) else tuple(activation)
        bn = (bool(batch_norm),) * hidden if isinstance(batch_norm, bool) else tuple(batch_norm)
        for what, values in (("activation", names), ("batch_norm", bn)):
            if len(values) != hidden:
                raise ValueError(
                    f"{what} has {len(values)} entries but sizes {sizes} has {hidden} hidden "
                    f"layers; give one value, or one per hidden layer."
                )
        if not all(isinstance(b, bool) for b in bn):
            raise ValueError(f"batch_norm must be a bool or a sequence of bools; got {batch_norm!r}.")
        for name in names:
            checks.lookup(ACTIVATIONS, "activation", name)
            if name in OUTPUT_ONLY:
                raise ValueError(f"{name!r} acts on a whole row and is only allowed as output.")
        checks.lookup(ACTIVATIONS, "activation", output)
        checks.lookup(INITIALIZERS, "initializer", init)
        bn_momentum = checks.real_in("bn_momentum", bn_momentum, 0.0, 1.0, high_open=True)
        bn_eps = checks.real_in("bn_eps", bn_eps, 0.0, low_open=True)
        compute_dtype = _compute_dtype_name(compute_dtype)
        for field, value in (("sizes", sizes), ("activation", names), ("output", output), ("initializer", init),
                             ("batch_norm", bn), ("bn_momentum", bn_momentum), ("bn_eps", bn_eps),
                             ("compute_dtype", compute_dtype)):
            object.__setattr__(self, field, value)

    def config(self) -> dict:
        """The constructor's arguments as JSON data (tuples as lists): ``MLP(**net.config()) == net``."""
        return {"init" if f.name == "initializer" else f.name:
                list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}

    def replace(self, **changes) -> MLP:
        """A copy with some of the constructor's arguments changed, e.g. ``net.replace(compute_dtype=None)``."""
        args = self.config()
        unknown = set(changes) - set(args)
        if unknown:
            raise TypeError(f"MLP.replace: unknown arguments {sorted(unknown)}; expected some of {sorted(args)}.")
        return MLP(**{**args, **changes})

    @property
    def num_layers(self) -> int:
        """``L``, the number of weight layers."""
        return len(self.sizes) - 1

    @property
    def activations(self) -> tuple[Activation, ...]:
        """``(φ_1, ..., φ_L)``: the hidden activations followed by the output activation."""
        return tuple(ACTIVATIONS[n] for n in self.activation + (self.output,))

    @property
    def normalized(self) -> tuple[bool, ...]:
        """Per layer ``1..L``: whether it is batch-normalized (the output layer never is)."""
        return self.batch_norm + (False,)

    @property
    def has_state(self) -> bool:
        """Whether the network has batch-norm running statistics (and so needs a state)."""
        return any(self.batch_norm)

    def matmul(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``a @ b`` as every layer computes it: ``(m, k) @ (k, n) -> (m, n)`` in ``a``'s dtype.

        With a ``compute_dtype``, both operands are rounded to it and the products are summed in
        ``a``'s dtype (``preferred_element_type``), as bfloat16 tensor-core matmuls do.
        """
        if self.compute_dtype is None:
            return a @ b
        low = jnp.dtype(self.compute_dtype)
        return jnp.matmul(a.astype(low), b.astype(low), preferred_element_type=a.dtype)

    def init(self, key: jax.Array, dtype=jnp.float32) -> Params:
        """Fresh parameters of ``dtype``: ``{"W", "b"}`` per layer, ``{"W", "gamma"=1, "beta"=0}`` with BN."""
        init = INITIALIZERS[self.initializer]
        keys = jax.random.split(key, self.num_layers)
        params = []
        for k, fan_in, fan_out, bn in zip(keys, self.sizes[:-1], self.sizes[1:], self.normalized):
            W, b = init(k, fan_in, fan_out, dtype)
            params.append({"W": W, "gamma": jnp.ones(fan_out, dtype), "beta": jnp.zeros(fan_out, dtype)}
                          if bn else {"W": W, "b": b})
        return params

    def init_state(self, dtype=jnp.float32) -> State:
        """Running statistics: mean 0 and variance 1 for every batch-normalized layer, ``{}`` elsewhere."""
        return [{"mean": jnp.zeros(n, dtype), "var": jnp.ones(n, dtype)} if bn else {}
                for n, bn in zip(self.sizes[1:], self.normalized)]

    def apply(self, params: Params, x: jax.Array, state: State | None = None) -> jax.Array:
        """The network's output ``a^L``: ``x (N, n_0) -> (N, n_L)``. Pure; jit/vmap/grad-able.

        With batch norm, ``state`` is required and its running statistics are used (eval mode).
        """
        return self.forward_trace(params, x, state).acts[-1]

    def apply_train(self, params: Params, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        """Train-mode output with batch statistics, and the updated running statistics."""
        fwd = self.forward_trace(params, x, state, train=True)
        return fwd.acts[-1], fwd.state

    def forward(self, params: Params, x: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """The forward pass keeping every layer: ``zs = [z^1..z^L]``, ``acts = [a^0=x, a^1..a^L]``.

        ``z^l`` and ``a^l`` have shape ``(N, n_l)``. A network with batch norm needs
        :meth:`forward_trace` (and its state).
        """
        fwd = self.forward_trace(params, x)
        return fwd.zs, fwd.acts

    def forward_trace(self, params: Params, x: jax.Array, state: State | None = None, *,
                      train: bool = False) -> ForwardTrace:
        """The forward pass with every intermediate kept, as a :class:`ForwardTrace`.

        ``x (N, n_0)``; with batch norm, ``state`` is required and ``train`` chooses the batch's
        statistics (``True``, a new running state is returned in the trace) or the running ones.
        """
        x = self.check_input(params, x)
        self.check_state(state)
        hs, zs, acts, caches, new_state = [], [], [x], [], []
        for l, (layer, act, bn) in enumerate(zip(params, self.activations, self.normalized)):
            h = self.matmul(acts[-1], layer["W"].T)  # h^l = W^l a^{l-1}
            if bn:  # β replaces the bias
                z, cache, running = batchnorm.forward(h, layer["gamma"], layer["beta"], state[l], train=train,
                                                      momentum=self.bn_momentum, eps=self.bn_eps)
            else:
                z = h + layer["b"]  # z^l = W^l a^{l-1} + b^l
                cache, running = None, {}
            hs.append(h)
            zs.append(z)
            acts.append(act.phi(z))  # a^l = φ(z^l)
            caches.append(cache)
            new_state.append(running)
        return ForwardTrace(zs, acts, caches, new_state if state is not None else None, hs)

    def check_params(self, params: Params, name: str = "params") -> None:
        """Raise ``ValueError``/``TypeError`` unless ``params`` matches this configuration.

        ``name`` is what the messages call the tree (``"v"`` for a direction of the same structure).
        """
        if not isinstance(params, (list, tuple)) or len(params) != self.num_layers:
            got = f"{len(params)} layers" if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(
                f"{name} must be a list of {self.num_layers} layers for sizes {self.sizes}; got {got}."
            )
        dtype = None
        for l, (layer, fan_in, fan_out, bn) in enumerate(
            zip(params, self.sizes[:-1], self.sizes[1:], self.normalized), 1
        ):
            want = {"W": (fan_out, fan_in), "gamma": (fan_out,), "beta": (fan_out,)} if bn else \
                {"W": (fan_out, fan_in), "b": (fan_out,)}
            if not isinstance(layer, dict) or set(layer) != set(want):
                got = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
                raise ValueError(f"layer {l} of {name} must be a dict with keys {sorted(want)}; got {got}.")
            for key, shape in want.items():
                got = tuple(jnp.shape(layer[key]))
                if got != shape:
                    raise ValueError(f"{name}[{l - 1}]['{key}'] must have shape {shape}; got {got}.")
                leaf_dtype = jnp.result_type(layer[key])
                if not jnp.issubdtype(leaf_dtype, jnp.floating):
                    raise TypeError(f"{name} must be floating arrays; {name}[{l - 1}]['{key}'] is {leaf_dtype}. "
                                    f"Convert it, e.g. with .astype(jnp.float32).")
                dtype = dtype or leaf_dtype
                if leaf_dtype != dtype:
                    raise TypeError(f"{name} must all share one floating dtype; {name}[{l - 1}]['{key}'] "
                                    f"is {leaf_dtype}, expected {dtype} (that of {name}[0]['W']).")

    def check_state(self, state: State | None) -> None:
        """Raise unless ``state`` holds running statistics for exactly the batch-normalized layers."""
        if state is None:
            if self.has_state:
                raise ValueError("this network has batch normalization: pass its state (net.init_state()).")
            return
        if not isinstance(state, (list, tuple)) or len(state) != self.num_layers:
            raise ValueError(f"state must be a list of {self.num_layers} dicts (net.init_state()); got {state!r}.")
        for l, (entry, n, bn) in enumerate(zip(state, self.sizes[1:], self.normalized)):
            keys = {"mean", "var"} if bn else set()
            if not isinstance(entry, dict) or set(entry) != keys:
                raise ValueError(f"state[{l}] must have keys {sorted(keys)}; got {entry!r}.")
            for name in keys:
                if tuple(jnp.shape(entry[name])) != (n,):
                    raise ValueError(f"state[{l}]['{name}'] must have shape ({n},); got {jnp.shape(entry[name])}.")

    def check_input(self, params: Params, x) -> jax.Array:
        """``x`` as an array after checking it against this configuration and ``params``."""
        self.check_params(params)
        x = checks.float_array("x", x, ndim=2)
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
