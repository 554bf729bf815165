"""Training speed: fnn's compiled epoch against a jax.grad reference, PyTorch and the matmul rate.

Measured in one run, on synthetic MNIST-shaped data (``N = 60,000`` rows of 784 standard-normal
float32 inputs, labels drawn uniformly from ``0..9``), for ``784-256-256-10`` at batch ``B = 128`` and
``784-1024-1024-10`` at ``B = 256`` (relu hidden layers, softmax cross-entropy on the logits, Adam
with ``α = 10⁻³``, the same initial parameters everywhere):

- **Step time** of one training step, manual backprop (:func:`fnn.backprop`) against ``jax.grad``
  (:func:`fnn.autodiff_grads`): the same jitted ``lax.scan`` over ``K`` pre-drawn batches, the same
  Adam update, only the gradient function differs; with the number of matmuls and fusions in the
  two compiled programs, a comparison that no load on the machine can disturb. Beside them, the
  pieces of a step, each timed the same way (the forward pass alone, forward plus gradients, the
  Adam update alone), and the step as :func:`fnn.fit` runs it: :func:`fnn.train.make_epoch` on an
  epoch of exactly ``K`` batches with ``guard=False``, which adds the shuffle, the gather of each
  batch, the gradient norm and one finiteness check at the end, with either gradient source; and
  the guarded epoch that ``fit`` runs only to find a failure (finiteness checks of every ``z^l``,
  ``a^l``, ``δ^l``, gradient and update, ``where(ok, new, old)`` over params and optimizer state).
- **Epoch throughput** (samples/s) of :func:`fnn.train.make_epoch`, jitted exactly as :func:`fnn.fit`
  runs it (``guard=False``, nothing donated), with and without the per-step gradient norm
  (``fit(..., grad_norm=False)``), against (a) a PyTorch eager loop of the same model
  and optimizer (``torch.optim.Adam`` with its defaults; torch threads set to the core count, and
  to one thread; a repeat runs up to ``TORCH_SECONDS`` of an epoch, as every step costs the same)
  and (b) a plain ``jax.value_and_grad`` reference with a hand-written Adam in the same jit
  structure (shuffle, ``lax.scan`` over index batches gathered in the step, one smaller last
  batch). Each round also times a burst of jitted ``1024 × 1024 @ 1024 ×
  1024`` float32 products with half the FLOPs of an fnn epoch, so that the achieved rate
  ``6 · P · samples/s`` (``P`` parameters) is read as a fraction of the matmul rate measured
  under the same load.
- **Compile time** of each epoch function: ``jax.jit(...).lower(...)`` and ``.compile()``, once each.
- **GPU rows**: ``784-4096-4096-10`` at ``B = 8192`` in float32 and in bfloat16 mixed precision
  (``MLP(..., compute_dtype="bfloat16")``), run only when the default device is not a CPU (fnn,
  the reference and the matmul rate in the matmuls' dtype, no torch); on a CPU they are listed as
  unmeasured. In the mixed row the reference casts its forward matmuls the same way, but
  ``jax.grad`` runs its backward matmuls in float32 (a float32 cotangent times a bfloat16
  operand), so only fnn's time there is a bfloat16 step.
- **Per-example quantities** (``per_example``), **DP-SGD** (``private``), **curvature**
  (``curvature``) and **second-order steps** (``second_order``): each quantity on one batch by the
  δ route against its autodiff route and against a plain gradient or an Adam step, with XLA's
  memory analysis of each compiled program; see the functions of each section.
- **The Laplace posterior** (``laplace``, :func:`bench_laplace`): the kron posterior of
  ``784-256-256-10`` fitted on 8,000 rows against a gradient epoch over them, its GLM predictive on
  1,000 images against a gradient over them, and its evidence at a new prior precision against the
  fit; each beside its autodiff route (the Jacobians by ``vmap(jax.jacrev)``) and beside laplace-torch,
  an optional extra like torch (left out, with the reason, when it is missing).
- **Training-data attribution** (``influence``, :func:`bench_influence`): all-pairs gradient inner
  products of 1,000 test × 8,000 training rows on both CPU models by the δ route
  (:func:`fnn.influence.gradient_inner_products`) against materialized ``vmap(jax.grad)`` gradients and a
  matmul (timed on a subset and scaled per pair), with XLA's memory analysis of both routes' compiled
  block programs; EK-FAC's fit and the self-influence of the 8,000 rows against a gradient epoch over
  them; beside kronfluence, an optional extra like laplace-torch.

Every comparison alternates its contenders (given order in even rounds, reversed in odd ones)
after ``--warmup`` untimed rounds and reports the median of ``--repeats`` rounds, and the best.
Ratios are medians of the per-round ratios, so both sides of a ratio were timed seconds apart. Every
timing records the process CPU time too: ``cpu/wall`` is the number of cores a contender kept busy,
below the thread count when other jobs share the machine. ``--quick`` runs one small model on 2,048
samples: a smoke test of the code path in seconds, not a result.

Run as a script, it pins LAPACK (OpenBLAS) to one thread unless ``OPENBLAS_NUM_THREADS`` is set
(:func:`_pin_lapack_threads`): OpenBLAS's idle threads spin after every eigendecomposition and slow the
next XLA program on a few cores. BENCH.md gives the setting of each section's figures.

Output: tables on stdout (Markdown) and ``bench.json``. Run it by hand, never as a timed test::

    python experiments/bench.py [--repeats 5] [--warmup 1] [--quick] [--no-torch] [--out DIR]
                                [--sections steps,epochs,gpu,per_example,private,curvature,second_order,laplace,
                                            influence]
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import NamedTuple

import common  # first: it puts the repository root on sys.path for fnn

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fnn
from fnn.train import make_epoch

LEARNING_RATE = 1e-3
B1, B2, EPS = 0.9, 0.999, 1e-8  # Adam's defaults, in fnn and in torch alike
INPUTS, CLASSES = 784, 10
SAMPLES, QUICK_SAMPLES = 60_000, 2048
STEP_FLOPS = 1e10  # the K steps of one timed step call do about this many FLOPs (6 · P · B · K)
TORCH_SECONDS = 2.0  # the most one torch repeat runs; it stops at the end of its epoch before that
CPU_MATMUL, GPU_MATMUL = 1024, 8192  # n of the (n, n) @ (n, n) products that give the matmul rate
MANUAL_STEP, AUTODIFF_STEP = "step, manual backprop", "step, jax.grad"
FNN_MANUAL, FNN_AUTODIFF = "fnn.train epoch, manual", "fnn.train epoch, jax.grad"
FNN_GUARDED = "fnn.train guarded epoch (replay), manual"
NO_NORM = "fnn, grad_norm=False"
SECTIONS = ("steps", "epochs", "gpu", "per_example", "private", "curvature", "second_order", "laplace",
            "influence")


class Case(NamedTuple):
    """One benchmarked configuration: layer sizes, batch size, the params' dtype and the matmuls'
    (``compute``: ``None`` for the params' dtype, ``"bfloat16"`` for fnn's mixed precision)."""

    sizes: tuple[int, ...]
    batch: int
    dtype: str = "float32"
    compute: str | None = None

    @property
    def precision(self) -> str:
        return self.dtype if self.compute is None else f"{self.compute} matmuls, {self.dtype} params"

    @property
    def name(self) -> str:
        return "-".join(map(str, self.sizes))

    @property
    def params(self) -> int:
        """``P``: weights and biases."""
        return sum(n_in * n_out + n_out for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def matmul_flops(self) -> int:
        """Matmul FLOPs a training step executes per sample: ``z = a Wᵀ``, ``∂W = δᵀ a`` and ``δ W``,
        the last for every layer but the first (no gradient is taken for the inputs)."""
        layers = list(zip(self.sizes[:-1], self.sizes[1:]))
        return sum((4 if l == 0 else 6) * n_in * n_out for l, (n_in, n_out) in enumerate(layers))


CPU_CASES = (Case((784, 256, 256, 10), 128), Case((784, 1024, 1024, 10), 256))
QUICK_CASES = (Case((784, 64, 64, 10), 128),)  # stands in for both CPU cases
GPU_CASES = (Case((784, 4096, 4096, 10), 8192), Case((784, 4096, 4096, 10), 8192, compute="bfloat16"))
QUICK_GPU_CASES = (Case((784, 256, 256, 10), 512), Case((784, 256, 256, 10), 512, compute="bfloat16"))


# ---------------------------------------------------------------------------------------------
# Timing: alternated rounds, medians, paired ratios.


class Timing(NamedTuple):
    """One timed call: wall and process CPU seconds, and the units of work it did."""

    wall: float
    cpu: float
    work: float

    @property
    def rate(self) -> float:
        return self.work / self.wall


def alternate(contenders: dict[str, Callable[[], float]], repeats: int, warmup: int,
              pause: float = 0.0) -> dict[str, list[Timing]]:
    """Time every contender once per round for ``repeats`` rounds, after ``warmup`` untimed rounds.

    A contender runs one unit of measurement, blocks until its results are ready and returns the
    work it did (samples, steps, FLOPs). Round ``r`` runs the contenders in the given order when
    ``r`` is even and in reverse when it is odd, so that none always runs right after another.
    ``pause`` seconds pass, untimed, before every timed call: a contender that frees gigabytes
    leaves the freeing to the operating system after it returns, and the next call would pay it.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    timings: dict[str, list[Timing]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            time.sleep(pause)
            cpu, wall = time.process_time(), time.perf_counter()
            work = contenders[name]()
            timings[name].append(Timing(time.perf_counter() - wall, time.process_time() - cpu, work))
    return timings


def rate_summary(timings: list[Timing], scale: float = 1.0) -> dict:
    """``scale × work/s``: the median and the best round, every round, and ``cpu/wall`` overall."""
    rates = [scale * t.rate for t in timings]
    return {"median": float(np.median(rates)), "best": max(rates), "all": rates,
            "cpu_per_wall": sum(t.cpu for t in timings) / sum(t.wall for t in timings)}


def paired_ratio(a: list[Timing], b: list[Timing], scale: float = 1.0) -> dict:
    """``scale × rate_a / rate_b`` per round (both timed seconds apart) and the median over rounds."""
    rounds = [scale * ta.rate / tb.rate for ta, tb in zip(a, b)]
    return {"median": float(np.median(rounds)), "rounds": rounds}


# ---------------------------------------------------------------------------------------------
# Data and models.


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x (n, 784)`` standard-normal float32 and ``y (n,)`` int32 labels uniform in ``0..9``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, INPUTS), np.float32), rng.integers(0, CLASSES, n).astype(np.int32)


def fnn_model(case: Case):
    """``(net, loss, opt, params)``: the network, its loss, Adam and the initial params in ``case.dtype``."""
    net = fnn.MLP(case.sizes, "relu", "identity", compute_dtype=case.compute)
    params = net.init(jax.random.PRNGKey(0), jnp.dtype(case.dtype))
    return net, fnn.losses.softmax_cross_entropy, fnn.optim.adam(LEARNING_RATE), params


def _reference_cost(params, x, y, compute=None):
    """Mean softmax cross-entropy of the relu MLP ``params = [(W (out, in), b (out,)), ...]``; with
    ``compute`` the matmul operands are cast to it and the products summed in the params' dtype."""
    def dot(a, W):
        if compute is None:
            return a @ W.T
        return jnp.matmul(a.astype(compute), W.T.astype(compute), preferred_element_type=a.dtype)

    a = x
    for W, b in params[:-1]:
        a = jnp.maximum(dot(a, W) + b, 0)
    W, b = params[-1]
    z = dot(a, W) + b
    return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])


def _reference_adam(p, g, m, v, t):
    """One Adam step of one leaf (Kingma & Ba, Algorithm 1), written apart from :mod:`fnn.optim`."""
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
    new = p - LEARNING_RATE * m_hat / (jnp.sqrt(v_hat) + EPS)
    return new.astype(p.dtype), m.astype(p.dtype), v.astype(p.dtype)


def _reference_step(carry, batch, compute=None):
    params, m, v, count = carry
    cost, grads = jax.value_and_grad(functools.partial(_reference_cost, compute=compute))(params, *batch)
    count = count + 1
    t = count.astype(jnp.float32)
    leaves, treedef = jax.tree.flatten(params)
    new = [_reference_adam(*leaf, t) for leaf in zip(leaves, *map(jax.tree.leaves, (grads, m, v)))]
    params, m, v = (treedef.unflatten([n[i] for n in new]) for i in range(3))
    return (params, m, v, count), cost


def reference_epoch(num_samples: int, batch_size: int, compute: str | None = None) -> Callable:
    """``(params, m, v, count, key, x, y) -> (params, m, v, count, key, costs)``: the plain-JAX epoch.

    The structure of :func:`fnn.train.make_epoch`: a fresh permutation, ``lax.scan`` over the full
    batches of indices, each batch gathered (``x[idx]``) inside its step, and one step on the
    ``N mod B`` leftover samples.
    """
    full = num_samples // batch_size

    def epoch(params, m, v, count, key, x, y):
        def step(carry, idx):
            return _reference_step(carry, (x[idx], y[idx]), compute)

        key, shuffle = jax.random.split(key)
        order = jax.random.permutation(shuffle, num_samples)
        carry, costs = lax.scan(step, (params, m, v, count), order[: full * batch_size].reshape(full, batch_size))
        if num_samples % batch_size:
            carry, cost = step(carry, order[full * batch_size:])
            costs = jnp.append(costs, cost)
        return (*carry, key, costs)

    return epoch


# ---------------------------------------------------------------------------------------------
# Contenders: each a closure that runs one timed unit and keeps its own state.


def compiled(fn: Callable, donate: tuple[int, ...], *args) -> tuple[Callable, dict]:
    """``fn`` jitted, lowered and compiled for ``args``, and the wall and CPU seconds each stage took."""
    cpu, wall = time.process_time(), time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    cpu_lowered, wall_lowered = time.process_time(), time.perf_counter()
    executable = lowered.compile()
    seconds = {"lower_s": wall_lowered - wall, "compile_s": time.perf_counter() - wall_lowered,
               "lower_cpu_s": cpu_lowered - cpu, "compile_cpu_s": time.process_time() - cpu_lowered}
    return executable, seconds


def epoch_contender(run: Callable, state: list, x: jax.Array, y: jax.Array) -> Callable[[], float]:
    """One call of the compiled epoch ``run(*state, x, y)``; ``state`` is replaced by what it returns."""
    def contender() -> float:
        out = run(*state, x, y)
        state[:] = out[: len(state)]
        jax.block_until_ready(out)
        return x.shape[0]

    return contender


def fnn_epoch_contender(case: Case, x: jax.Array, y: jax.Array,
                        grad_norm: bool = True) -> tuple[Callable[[], float], dict]:
    """An epoch of :func:`fnn.train.make_epoch` per call, unguarded and not donated, as ``fit`` runs it
    (``grad_norm=False``: as ``fit(..., grad_norm=False)`` runs it)."""
    net, loss, opt, params = fnn_model(case)
    epoch = make_epoch(net, loss, opt, num_samples=x.shape[0], batch_size=case.batch, guard=False,
                       grad_norm=grad_norm)
    state = [params, opt.init(params), None, jax.random.PRNGKey(1)]  # (params, opt_state, bn_state, key)
    run, seconds = compiled(epoch, (), *state, x, y)
    return epoch_contender(run, state, x, y), seconds


def reference_epoch_contender(case: Case, x: jax.Array, y: jax.Array) -> tuple[Callable[[], float], dict]:
    """An epoch of :func:`reference_epoch` per call, from the same initial params."""
    params = [(layer["W"], layer["b"]) for layer in fnn_model(case)[3]]
    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    state = [params, m, v, jnp.zeros((), jnp.int32), jax.random.PRNGKey(1)]
    run, seconds = compiled(reference_epoch(x.shape[0], case.batch, case.compute), (0, 1, 2), *state, x, y)
    return epoch_contender(run, state, x, y), seconds


def torch_model(torch, params):
    """The relu MLP of fnn's ``params`` as a ``torch.nn.Sequential`` of ``Linear`` layers, with the same
    weights (``W (out, in)`` is ``Linear.weight`` as it is)."""
    layers = []
    for layer in params:
        linear = torch.nn.Linear(layer["W"].shape[1], layer["W"].shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.array(layer["W"])))
            linear.bias.copy_(torch.from_numpy(np.array(layer["b"])))
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def torch_contender(torch, case: Case, x: np.ndarray, y: np.ndarray, threads: int,
                    seconds: float) -> Callable[[], float]:
    """A PyTorch eager training loop of the same model: shuffled batches, forward, backward, Adam.

    Each call starts a fresh epoch (``torch.randperm``) and stops after the batch that passes
    ``seconds``, or at the end of the epoch; it returns the samples it trained on.
    """
    model = torch_model(torch, fnn_model(case)[3])
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, betas=(B1, B2), eps=EPS)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    n = x.shape[0]

    def contender() -> float:
        torch.set_num_threads(threads)
        order = torch.randperm(n, generator=generator)
        start, done = time.perf_counter(), 0
        while done < n and time.perf_counter() - start < seconds:
            idx = order[done:done + case.batch]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            done += idx.shape[0]
        return done

    return contender


def matmul_contender(n: int, dtype: str, calls: int) -> Callable[[], float]:
    """``calls`` jitted ``(n, n) @ (n, n)`` products per call; returns the FLOPs done, ``2 n³`` each."""
    a = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(3), (n, n), jnp.dtype(dtype))
    product = jax.jit(jnp.dot)
    product(a, b).block_until_ready()

    def contender() -> float:
        jax.block_until_ready([product(a, b) for _ in range(calls)])
        return 2.0 * n**3 * calls

    return contender


def import_torch(disabled: bool):
    """``(torch, None)``, or ``(None, why it is left out)``: torch is an optional extra of this script."""
    if disabled:
        return None, "left out: --no-torch"
    try:
        import torch
    except ImportError:
        return None, ("left out: torch is not installed (for a CPU build: pip install torch "
                      "--index-url https://download.pytorch.org/whl/cpu)")
    return torch, None


def import_laplace_torch(torch, torch_skipped: str | None = None):
    """``(laplace, None)``, or ``(None, why it is left out)``: laplace-torch, the contender of the ``laplace``
    section, is an optional extra like torch. This folder's ``laplace.py`` has the same module name, so
    the package is imported with this folder off ``sys.path`` and ``sys.modules`` put back afterwards
    (laplace-torch imports its submodules at import time and keeps them)."""
    if torch is None:
        return None, f"left out: laplace-torch needs torch ({torch_skipped})"
    here = os.path.dirname(os.path.abspath(__file__))
    path = sys.path[:]
    own = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "laplace" or k.startswith("laplace.")}
    sys.path[:] = [p for p in path if os.path.abspath(p or os.curdir) != here]
    try:
        laplace = importlib.import_module("laplace")
        importlib.import_module("laplace.curvature")
    except ImportError:
        return None, "left out: laplace-torch is not installed (pip install laplace-torch)"
    except Exception as error:  # a broken install of an optional extra is reported, not fatal
        return None, f"left out: laplace-torch failed to import ({type(error).__name__}: {error})"
    finally:
        sys.path[:] = path
        for k in [k for k in sys.modules if k == "laplace" or k.startswith("laplace.")]:
            del sys.modules[k]
        sys.modules.update(own)
    return laplace, None


# ---------------------------------------------------------------------------------------------
# The step and its pieces.


def _total(tree) -> jax.Array:
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))


def step_pieces(case: Case, x: jax.Array, y: jax.Array) -> dict[str, tuple[Callable, object]]:
    """Per piece, ``(body, init)``: a ``lax.scan`` body over batches ``(x_k, y_k)`` and its first carry.

    The pieces that update no params add their results up (one reduction per output leaf), so
    that XLA cannot drop them.
    """
    net, loss, opt, params = fnn_model(case)
    grads0 = fnn.backprop(net, params, x[: case.batch], y[: case.batch], loss)[1]

    def step(grads_of):
        def body(carry, batch):
            p, s = carry
            cost, grads = grads_of(net, p, *batch, loss)
            return fnn.optim.step(opt, grads, s, p), cost
        return body

    def forward(acc, batch):
        return acc + loss(net.apply(params, batch[0]), batch[1]), None

    def gradients(grads_of):
        def body(acc, batch):
            cost, grads = grads_of(net, params, *batch, loss)
            return acc + cost + _total(grads), None
        return body

    def adam(carry, batch):
        p, s = carry
        return fnn.optim.step(opt, grads0, s, p), None

    zero = jnp.zeros((), jnp.dtype(case.dtype))
    trained = (params, opt.init(params))
    plain = [(layer["W"], layer["b"]) for layer in params]
    reference = (plain, *(jax.tree.map(jnp.zeros_like, plain) for _ in range(2)), jnp.zeros((), jnp.int32))
    return {
        MANUAL_STEP: (step(fnn.backprop), trained),
        AUTODIFF_STEP: (step(fnn.autodiff_grads), trained),
        "step, jax.grad reference": (_reference_step, reference),
        "forward only": (forward, zero),
        "forward + manual backprop": (gradients(fnn.backprop), zero),
        "forward + jax.grad": (gradients(fnn.autodiff_grads), zero),
        "Adam update only": (adam, trained),
    }


def scan_contender(body: Callable, init, xs: jax.Array, ys: jax.Array) -> tuple[Callable[[], float], str]:
    """``lax.scan(body, init, (xs, ys))`` jitted, one call runs ``K = len(xs)`` steps; and its compiled HLO."""
    run, _ = compiled(lambda carry, xs, ys: lax.scan(body, carry, (xs, ys)), (), init, xs, ys)

    def contender() -> float:
        jax.block_until_ready(run(init, xs, ys))
        return xs.shape[0]

    return contender, run.as_text()


def fnn_steps_contender(case: Case, x: jax.Array, y: jax.Array, grad_source: str,
                        guard: bool = False) -> Callable[[], float]:
    """:func:`fnn.train.make_epoch` on an epoch of exactly ``K`` batches (``x (K·B, 784)``): ``K`` steps
    with everything ``fit`` adds to a step (the shuffle, the gather of each batch, the gradient norm,
    the finiteness check at the end, or with ``guard`` the checks of every step)."""
    net, loss, opt, params = fnn_model(case)
    epoch = make_epoch(net, loss, opt, num_samples=x.shape[0], batch_size=case.batch, grad_source=grad_source,
                       guard=guard)
    state = [params, opt.init(params), None, jax.random.PRNGKey(1)]
    run, _ = compiled(epoch, (), *state, x, y)
    contender = epoch_contender(run, state, x, y)
    return lambda: contender() / case.batch


def compiled_ops(hlo: str) -> dict:
    """Counts in an optimized HLO module: instructions, fusions, matmuls (``dot`` or a library call)."""
    instructions = re.findall(r"^\s*(?:ROOT )?%\S+ = (?:\(.*?\)|\S+) ([\w-]+)\(", hlo, flags=re.M)
    library = re.findall(r'"kind":"__(\w+?)_fusion"', hlo)
    return {"instructions": len(instructions), "fusions": instructions.count("fusion"),
            "dots": instructions.count("dot"), "library_fusions": len(library)}


def steps_for(case: Case, samples: int, flops: float) -> int:
    """``K``: steps per timed call, about ``flops`` of work, between 4 and 200 and at most ``N // B``."""
    return min(int(np.clip(round(flops / (6 * case.params * case.batch)), 4, 200)), samples // case.batch)


def bench_steps(case: Case, x: jax.Array, y: jax.Array, args) -> dict:
    """Milliseconds per step of each piece, alternated."""
    k = steps_for(case, x.shape[0], args.step_flops)
    xk, yk = x[: k * case.batch], y[: k * case.batch]
    xs, ys = xk.reshape(k, case.batch, INPUTS), yk.reshape(k, case.batch)
    contenders, programs = {}, {}
    for name, (body, init) in step_pieces(case, x, y).items():
        contenders[name], programs[name] = scan_contender(body, init, xs, ys)
    contenders[FNN_MANUAL] = fnn_steps_contender(case, xk, yk, "manual")
    contenders[FNN_AUTODIFF] = fnn_steps_contender(case, xk, yk, "autodiff")
    contenders[FNN_GUARDED] = fnn_steps_contender(case, xk, yk, "manual", guard=True)
    timings = alternate(contenders, args.repeats, args.warmup)
    ms = {name: rate_summary(t, 1e-3) for name, t in timings.items()}  # steps per ms

    def time_ratio(a: str, b: str) -> dict:  # time of a / time of b = rate of b / rate of a
        return paired_ratio(timings[b], timings[a])

    return {
        "model": case.name, "batch": case.batch, "steps_per_call": k,
        "ms": {name: 1 / r["median"] for name, r in ms.items()},
        "ms_best": {name: 1 / r["best"] for name, r in ms.items()},
        "ms_all": {name: [1 / v for v in r["all"]] for name, r in ms.items()},
        "cpu_per_wall": {name: r["cpu_per_wall"] for name, r in ms.items()},
        "manual_over_autodiff": time_ratio(MANUAL_STEP, AUTODIFF_STEP),
        "fnn_epoch_manual_over_autodiff": time_ratio(FNN_MANUAL, FNN_AUTODIFF),
        "fnn_epoch_over_plain_step": time_ratio(FNN_MANUAL, MANUAL_STEP),
        "guarded_over_fnn_epoch": time_ratio(FNN_GUARDED, FNN_MANUAL),
        "compiled_ops": {"manual": compiled_ops(programs[MANUAL_STEP]),
                         "autodiff": compiled_ops(programs[AUTODIFF_STEP])},
    }


# ---------------------------------------------------------------------------------------------
# Per-example quantities: the δ route against vmap(jax.grad).

CLIP = 1.0  # the clip norm c of the clipped sums


def _per_sample_grads(net, loss, params, x, y):
    """The autodiff route: ``vmap`` over samples of ``jax.grad`` of each sample's own cost (``N × P``)."""
    return jax.vmap(jax.grad(lambda p, xi, yi: fnn.objective(net, p, xi[None], yi[None], loss)),
                    in_axes=(None, 0, 0))(params, x, y)


def _vmap_norms(g) -> jax.Array:
    n = jax.tree.leaves(g)[0].shape[0]
    return jnp.sqrt(sum(jnp.sum(t.reshape(n, -1) ** 2, axis=1) for t in jax.tree.leaves(g)))


def per_example_pieces(case: Case) -> dict[str, Callable]:
    """Per quantity, ``(params, x, y) -> result``: the δ route (one :func:`fnn.backprop_trace` and a
    contraction from :mod:`fnn.per_example`) and the ``vmap(jax.grad)`` route, each summed to one
    number so that XLA computes all of it, except the per-example gradients themselves, which are
    returned (materialized, ``N × P``; summed, XLA would fuse them away); and the plain gradient
    (cost and ``∇C``) for scale."""
    net, loss, _, _ = fnn_model(case)
    pe = fnn.per_example

    def trace(params, x, y):
        return fnn.backprop_trace(net, params, x, y, loss)[3]

    def clip_weights(norms):
        return jnp.minimum(1, CLIP / jnp.maximum(norms, 1e-30))

    def via_vmap(quantity, reduce=_total):
        return lambda params, x, y: reduce(quantity(_per_sample_grads(net, loss, params, x, y)))

    def via_delta(quantity, reduce=_total):
        return lambda params, x, y: reduce(quantity(params, trace(params, x, y)))

    def materialized(tree):
        return tree

    return {
        "gradient (fnn.backprop)": lambda params, x, y: _total(fnn.backprop(net, params, x, y, loss)),
        "norms, δ": via_delta(lambda p, t: pe.grad_norms(net, p, t)),
        "norms, vmap(grad)": via_vmap(_vmap_norms),
        "clipped sum, δ": via_delta(lambda p, t: pe.clipped_sum(net, p, t, CLIP)[0]),
        "clipped sum, vmap(grad)": via_vmap(
            lambda g: jax.tree.map(lambda t: jnp.tensordot(clip_weights(_vmap_norms(g)), t, 1), g)),
        "sum_grad_squared, δ": via_delta(lambda p, t: pe.sum_grad_squared(net, p, t)),
        "sum_grad_squared, vmap(grad)": via_vmap(lambda g: jax.tree.map(lambda t: jnp.sum(t * t, axis=0), g)),
        "noise scale, δ": via_delta(lambda p, t: pe.noise_scale(net, p, t)),
        "batch_grad, δ": via_delta(lambda p, t: pe.batch_grad(net, p, t), materialized),
        "batch_grad, vmap(grad)": via_vmap(lambda g: g, materialized),
    }


def repeated(call: Callable[[], object], seconds: float, work: float = 1.0) -> Callable[[], float]:
    """A contender that runs ``call`` as many times as take about ``seconds`` (counted from one call after
    a first one that compiles) and returns ``work`` per call."""
    jax.block_until_ready(call())
    start = time.perf_counter()
    jax.block_until_ready(call())
    calls = max(1, round(seconds / (time.perf_counter() - start)))

    def contender() -> float:
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        return calls * work

    return contender


def time_pieces(pieces: dict[str, Callable], params, xb, yb, args):
    """Alternated timings (ms per call) of ``(params, x, y) -> result`` functions, each compiled once,
    with the memory of each compiled program (XLA's memory analysis: temporary buffers plus outputs)."""
    contenders, memory = {}, {}
    for name, fn in pieces.items():
        run = jax.jit(fn).lower(params, xb, yb).compile()
        analysis = run.memory_analysis()
        memory[name] = None if analysis is None else analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        contenders[name] = repeated(lambda run=run: run(params, xb, yb), args.per_example_seconds)
    timings = alternate(contenders, args.repeats, args.warmup)
    ms = {name: 1 / rate_summary(t, 1e-3)["median"] for name, t in timings.items()}
    return timings, ms, memory


def bench_per_example(case: Case, x: jax.Array, y: jax.Array, args) -> dict:
    """Milliseconds per batch of each per-example quantity by both routes, alternated, with the memory
    of each compiled program (XLA's memory analysis: temporary buffers plus outputs)."""
    params = fnn_model(case)[3]
    timings, ms, memory = time_pieces(per_example_pieces(case), params, x[: case.batch], y[: case.batch], args)
    plain = "gradient (fnn.backprop)"
    ratios = {}
    for name in timings:
        if name.endswith(", δ"):
            ratios[name] = {"over_gradient": paired_ratio(timings[plain], timings[name])}
            other = name.replace(", δ", ", vmap(grad)")
            if other in timings:
                ratios[name]["vmap_over_delta"] = paired_ratio(timings[name], timings[other])
    return {"model": case.name, "batch": case.batch, "ms": ms, "memory_bytes": memory, "ratios": ratios}


# ---------------------------------------------------------------------------------------------
# Curvature: the hand-written products, diagonals and Kronecker factors against a gradient and autodiff.

CURVATURE_AUTODIFF_DIAG_MAX_P = 300_000  # the autodiff diagonal holds N × P per output column: small model only


def curvature_pieces(case: Case) -> dict[str, Callable]:
    """Per quantity, ``((params, v), x, y) -> result``: the hand-written route (:mod:`fnn.curvature`) and,
    where one exists, the autodiff route; each reduced to one number so that XLA computes all of it. ``v``
    is the direction of ``H v`` and ``G v``, an argument of its own (a direction computed from ``params``,
    or ``params`` itself, would let XLA share matmuls between the two). Autodiff routes: ``jax.jvp(jax.grad(C))`` for
    ``H v``; for ``G v`` the network's ``jvp``, the loss's Hessian by ``jvp(grad)`` at the logits, and
    the network's ``vjp``; for the exact diagonal, ``lax.map`` over the ``K`` columns of ``S_x`` of
    ``vmap(jax.grad)`` of ``s_{x,c} · z^L_x``, squared and summed (``N × P`` per column; small model only)."""
    net, loss, _, params0 = fnn_model(case)
    cv = fnn.curvature
    curv = fnn.losses.output_curvature(loss, net.output)

    def logits(p, x):
        return net.forward_trace(p, x).zs[-1]

    def ggn_autodiff(p, v, x, y):
        z, jv = jax.jvp(lambda q: logits(q, x), (p,), (v,))
        hjv = jax.jvp(jax.grad(lambda o: loss(o, y) * o.shape[0]), (z,), (jv,))[1]
        return jax.vjp(lambda q: logits(q, x), p)[1](hjv / x.shape[0])[0]

    def diag_autodiff(p, x, y):
        target, _ = loss.target(logits(p, x), y)
        cols = jnp.moveaxis(curv.sqrt(lax.stop_gradient(logits(p, x)), target), 2, 0)  # (K, N, K)

        def column(s):
            g = jax.vmap(jax.grad(lambda q, xi, si: jnp.sum(si * logits(q, xi[None])[0])),
                         in_axes=(None, 0, 0))(p, x, s)
            return jax.tree.map(lambda t: jnp.sum(t * t, axis=0), g)

        return jax.tree.map(lambda t: jnp.sum(t, axis=0) / x.shape[0], lax.map(column, cols))

    pieces = {
        "gradient (fnn.backprop)": lambda p, x, y: _total(fnn.backprop(net, p, x, y, loss)),
        "H v, by hand": lambda p, v, x, y: _total(cv.hvp(net, p, x, y, loss, v)),
        "H v, jvp(grad)": lambda p, v, x, y: _total(jax.jvp(jax.grad(lambda q: fnn.objective(net, q, x, y, loss)),
                                                            (p,), (v,))[1]),
        "G v, by hand": lambda p, v, x, y: _total(cv.ggn_vp(net, p, x, y, loss, v)),
        "G v, autodiff": lambda p, v, x, y: _total(ggn_autodiff(p, v, x, y)),
        "exact GGN diagonal, by hand": lambda p, x, y: _total(cv.ggn_diag(net, p, x, y, loss)),
        "MC GGN diagonal (1 sample), by hand": lambda p, x, y: _total(
            cv.ggn_diag_mc(net, p, x, y, loss, key=jax.random.PRNGKey(0))),
        "KFLR factors, by hand": lambda p, x, y: _total(cv.kronecker_factors(net, p, x, y, loss)),
        "KFAC factors (1 sample), by hand": lambda p, x, y: _total(
            cv.kronecker_factors(net, p, x, y, loss, jax.random.PRNGKey(0))),
    }
    if sum(t.size for t in jax.tree.leaves(params0)) <= CURVATURE_AUTODIFF_DIAG_MAX_P:
        pieces["exact GGN diagonal, autodiff"] = lambda p, x, y: _total(diag_autodiff(p, x, y))
    takes_v = {"H v, by hand", "H v, jvp(grad)", "G v, by hand", "G v, autodiff"}
    return {name: _with_direction(fn, name in takes_v) for name, fn in pieces.items()}


def _with_direction(fn: Callable, takes_v: bool) -> Callable:
    """``fn`` as a function of ``((params, v), x, y)``."""
    if takes_v:
        return lambda pv, x, y: fn(pv[0], pv[1], x, y)
    return lambda pv, x, y: fn(pv[0], x, y)


def bench_curvature(case: Case, x: jax.Array, y: jax.Array, args) -> dict:
    """Milliseconds per batch of each curvature quantity, its ratio to a plain gradient, and the autodiff
    route's time over the hand-written one where both exist."""
    params = fnn_model(case)[3]
    v = fnn.MLP(case.sizes, "relu", "identity").init(jax.random.PRNGKey(7), jnp.dtype(case.dtype))  # a direction
    timings, ms, memory = time_pieces(curvature_pieces(case), (params, v), x[: case.batch], y[: case.batch], args)
    plain = "gradient (fnn.backprop)"
    ratios = {}
    for name in timings:
        if name.endswith(", by hand"):
            ratios[name] = {"over_gradient": paired_ratio(timings[plain], timings[name])}
            prefix = name[: -len(", by hand")]
            other = next((o for o in timings if o.startswith(prefix + ", ") and o != name), None)
            if other is not None:
                ratios[name]["autodiff_over_hand"] = paired_ratio(timings[name], timings[other])
                ratios[name]["autodiff_route"] = other
    return {"model": case.name, "batch": case.batch, "outputs": case.sizes[-1], "ms": ms, "memory_bytes": memory,
            "ratios": ratios}


# ---------------------------------------------------------------------------------------------
# Second-order steps: K-FAC and Hessian-free against an Adam step.

SECOND_ORDER_CASE = Case((784, 1024, 1024, 10), 256)
KFAC_REFRESH = 10  # K-FAC's default period T₃
HF_CG = (5, 20)  # CG budgets whose difference gives the cost of one CG iteration


def _float_total(tree) -> jax.Array:
    """The sum of every floating leaf (a PRNG key's words left out), so that XLA computes all of them."""
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating))


def second_order_pieces(case: Case) -> tuple[dict[str, Callable], dict]:
    """Per step, ``((params, states), x, y) -> number``: one :func:`fnn.train_step` (gradient and update,
    new params and the whole new optimizer state summed) with Adam; with K-FAC on a step that reuses
    the inverses and on one that refreshes them (the state's count set to 1 and to ``T₃``; the
    branch is a ``lax.cond``, so only the taken one runs); with Hessian-free at each CG budget of
    ``HF_CG``. Returns the pieces and the states they start from."""
    net, loss, adam, params = fnn_model(case)
    kfac = fnn.second_order.kfac(net, loss, refresh=KFAC_REFRESH)
    start = kfac.init(params)
    opts = {"Adam step": (adam, adam.init(params)),
            "K-FAC step, inverses reused": (kfac, start._replace(count=jnp.ones((), jnp.int32))),
            f"K-FAC step, inverses refreshed (1 in {KFAC_REFRESH})":
                (kfac, start._replace(count=jnp.full((), KFAC_REFRESH, jnp.int32)))}
    for k in HF_CG:
        hf = fnn.second_order.hessian_free(net, loss, cg_iters=k)
        opts[f"Hessian-free step, {k} CG iterations"] = (hf, hf.init(params))

    def piece(name, opt):
        def run(ps, x, y):
            r = fnn.train_step(net, opt, ps[0], ps[1][name], x, y, loss)
            return _float_total((r.params, r.opt_state))
        return run

    return {name: piece(name, opt) for name, (opt, _) in opts.items()}, {n: s for n, (_, s) in opts.items()}


def bench_second_order(case: Case, x: jax.Array, y: jax.Array, args) -> dict:
    """Milliseconds per step (alternated rounds) and, per round, the derived costs over an Adam step:
    K-FAC averaged over its refresh period ``((T₃ − 1) t_reused + t_refreshed) / T₃``, one CG iteration
    of Hessian-free ``(t_20 − t_5) / 15``, and a Hessian-free step at each budget."""
    pieces, states = second_order_pieces(case)
    params = fnn_model(case)[3]
    timings, ms, memory = time_pieces(pieces, (params, states), x[: case.batch], y[: case.batch], args)
    adam = [1 / t.rate for t in timings["Adam step"]]
    names = list(timings)
    reused, refreshed, hf_lo, hf_hi = ([1 / t.rate for t in timings[n]] for n in names[1:5])
    t = KFAC_REFRESH
    derived = {
        f"K-FAC step over its refresh period (T₃ = {t}) / Adam step":
            [((t - 1) * a + b) / t / c for a, b, c in zip(reused, refreshed, adam)],
        "one CG iteration of Hessian-free / Adam step":
            [(b - a) / (HF_CG[1] - HF_CG[0]) / c for a, b, c in zip(hf_lo, hf_hi, adam)],
    }
    derived.update({f"{n} / Adam step": [v / c for v, c in zip((1 / q.rate for q in timings[n]), adam)]
                    for n in names[1:]})
    return {"model": case.name, "batch": case.batch, "ms": ms, "memory_bytes": memory,
            "over_adam": {k: {"median": float(np.median(v)), "rounds": v} for k, v in derived.items()}}


# ---------------------------------------------------------------------------------------------
# The Laplace posterior: its fit, its GLM predictive and its evidence, against a gradient, autodiff and
# laplace-torch.

LAPLACE_CASE = Case((784, 256, 256, 10), 128)
LAPLACE_ROWS, QUICK_LAPLACE_ROWS = 8000, 512  # the training rows the posterior is fitted on
LAPLACE_CHUNK, QUICK_LAPLACE_CHUNK = 1024, 256  # rows per pass of the fit (fit_laplace's default batch_size)
PREDICTIVE_ROWS, QUICK_PREDICTIVE_ROWS = 1000, 64  # the images of the GLM predictive
JACOBIAN_ROWS, QUICK_JACOBIAN_ROWS = 10, 2  # the images of the routes that form J (K × P per image)
PRIOR, NEW_PRIOR = 1.0, 2.0  # δ of the fit, and the new δ the evidence is evaluated at
TORCH_EXACT_ROUNDS = 2  # laplace-torch's default fit takes tens of seconds here: its own, shorter comparison
KFLR_FIT, KFAC_FIT = "kron fit, KFLR (fit_laplace)", "kron fit, KFAC, 1 sample (fit_laplace)"
KFLR_JIT, KFAC_JIT = "kron fit, KFLR, jitted chunks", "kron fit, KFAC, 1 sample, jitted chunks"
KFLR_AUTODIFF = "kron fit, KFLR, jitted chunks, autodiff"
EVIDENCE, PRIOR_FIT = "evidence at a new δ (log_marginal_likelihood)", "optimize_prior_precision (fixed point)"
GLM, GLM_AUTODIFF = "GLM predictive (glm_predictive)", "GLM predictive, autodiff"
TORCH_FIT = "laplace-torch kron fit (default: exact factors)"
TORCH_EVIDENCE, TORCH_GLM = "laplace-torch evidence at a new δ", "laplace-torch GLM predictive (probit)"


def _kron_eigh(sums: list, n: int) -> list:
    """Per layer ``eigh(A / N)`` and ``eigh(N·G)`` from the sums ``(Σ_x ā ā ᵀ, Σ_x Σ_c Δ_c Δ_cᵀ)``, symmetrized,
    as :func:`fnn.laplace.fit_laplace` stores the kron posterior."""
    return [(jnp.linalg.eigh((A + A.T) / (2 * n)), jnp.linalg.eigh((G + G.T) / 2)) for A, G in sums]


def _chunked_kron_fit(factor_sums: Callable, x: jax.Array, y: jax.Array, chunk: int,
                      key: jax.Array | None = None) -> list:
    """The kron posterior's eigendecompositions from a jitted ``factor_sums(x_c, y_c)`` (per layer the two
    sums over the chunk's rows; with ``key``, ``factor_sums(x_c, y_c, key_c)``, a key per chunk) called on
    chunks of ``chunk`` rows, as :func:`fnn.laplace.fit_laplace` loops."""
    starts = range(0, x.shape[0], chunk)
    keys = [()] * len(starts) if key is None else [(k,) for k in jax.random.split(key, len(starts))]
    sums = None
    for lo, k in zip(starts, keys):
        part = factor_sums(x[lo:lo + chunk], y[lo:lo + chunk], *k)
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
    return _kron_eigh(sums, x.shape[0])


def laplace_pieces(net, loss) -> dict[str, Callable]:
    """The jitted routes the ``laplace`` section compares with fnn's:

    - ``"factors"`` ``(params, x_c, y_c)``: the KFLR sums ``m·A^l``, ``m·G^l`` of a chunk of ``m`` rows by
      :func:`fnn.curvature.kronecker_factors`; ``(params, x_c, y_c, key)``: KFAC's, one sampled column per row;
    - ``"factors, autodiff"``: the same sums with ``Δ^l_x = ∂z^L/∂z^l = ∂z^L/∂b^l`` from ``vmap(jax.jacrev)``
      of each sample's logits in the biases and ``H_x`` from ``vmap(jax.hessian)`` of its cost at the logits:
      ``Σ_x J_xᵀ H_x J_x`` (``A^l`` from the forward pass, as both routes form it);
    - ``"predictive, autodiff"`` ``(params, layers, δ, x)``: ``J Σ Jᵀ`` with ``J_x (K, P)`` from
      ``vmap(jax.jacrev)`` of the logits in all the params and ``Σ`` of the kron posterior (``layers`` as
      :class:`fnn.laplace.Posterior` keeps them: ``(a, Q_A, N g, Q_G)``) applied to it per layer in its
      eigenbasis, ``Σ_{ij} (Q_Gᵀ J^l_k Q_A)_{ij} (Q_Gᵀ J^l_{k'} Q_A)_{ij} / (N g_i a_j + δ_l)``: the dense
      Jacobian, without the rank-one structure ``J^l_k = Δ^l_k āᵀ`` that ``glm_predictive`` uses.
    """
    def factors(p, x, y, key=None):
        return [(x.shape[0] * f.A, x.shape[0] * f.G)
                for f in fnn.curvature.kronecker_factors(net, p, x, y, loss, key=key)]

    def factors_autodiff(p, x, y):
        def logits(biases, xi):
            return net.apply([{"W": layer["W"], "b": b} for layer, b in zip(p, biases)], xi[None])[0]

        jac = jax.vmap(jax.jacrev(logits), in_axes=(None, 0))([layer["b"] for layer in p], x)  # (m, K, n_l)
        acts = net.forward_trace(p, x).acts
        h = jax.vmap(jax.hessian(lambda z, t: loss(z[None], t[None])))(acts[-1], y)  # (m, K, K)
        out = []
        for a, j in zip(acts[:-1], jac):
            abar = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
            out.append((abar.T @ abar, jnp.einsum("mki,mkl,mlj->ij", j, h, j)))
        return out

    def predictive_autodiff(p, layers, delta, x):
        jac = jax.vmap(jax.jacrev(lambda q, xi: net.apply(q, xi[None])[0]), in_axes=(None, 0))(p, x)
        cov = 0.0
        for j, (a, qa, g, qg), d in zip(jac, layers, delta):
            wbar = jnp.concatenate([j["W"], j["b"][..., None]], axis=-1)  # (m, K, n_l, n_{l−1}+1)
            t = jnp.einsum("ig,mkij,ja->mkga", qg, wbar, qa)
            cov = cov + jnp.einsum("mkga,mlga,ga->mkl", t, t, 1 / (jnp.outer(g, a) + d))
        return cov

    return {"factors": jax.jit(factors), "factors, autodiff": jax.jit(factors_autodiff),
            "predictive, autodiff": jax.jit(predictive_autodiff)}


def _relative_error(got, want) -> float:
    """``max |got − want| / max |want|`` over every leaf."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    return max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want)) / max(
        float(jnp.max(jnp.abs(w))) for w in want)


def _laplace_torch_contenders(lt, torch, net_params, x: np.ndarray, y: np.ndarray, xj: np.ndarray,
                              chunk: int) -> tuple[Callable, Callable, Callable]:
    """laplace-torch on the same model, weights and rows, as contenders ``(fit, evidence, predictive)``: its
    kron fit at its defaults (``Laplace(model, "classification", subset_of_weights="all",
    hessian_structure="kron")``, the exact GGN's Kronecker factors from curvlinops, weights and biases
    factored apart) over a ``DataLoader`` of ``chunk`` rows, its evidence at the new δ, and its GLM
    predictive with the probit link on ``xj``. One fit is done here, so the first timed fit is not its
    first. Torch threads = the cores, set per call."""
    cores = os.cpu_count() or 1
    model = torch_model(torch, net_params)
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    loader = torch.utils.data.DataLoader(data, batch_size=chunk)
    xt = torch.from_numpy(xj)

    fitted = lt.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                        prior_precision=PRIOR)
    torch.set_num_threads(cores)
    fitted.fit(loader)
    new = torch.tensor(NEW_PRIOR)

    def fit() -> float:
        torch.set_num_threads(cores)
        fitted.fit(loader)
        return 1.0

    def evidence() -> float:
        torch.set_num_threads(cores)
        fitted.log_marginal_likelihood(prior_precision=new)
        return 1.0

    def predictive() -> float:
        torch.set_num_threads(cores)
        fitted(xt, pred_type="glm", link_approx="probit")
        return float(xj.shape[0])

    return fit, evidence, predictive


def bench_laplace(x: jax.Array, y: jax.Array, args, torch) -> dict:
    """The kron Laplace posterior (:mod:`fnn.laplace`) of ``784-256-256-10`` (``--quick``: ``784-64-64-10``)
    at its initial params (the timings do not depend on their values), ``δ = PRIOR``, on the first
    ``LAPLACE_ROWS`` training rows, in three alternated comparisons:

    - **fit**, against one gradient epoch over the same rows: :func:`fnn.train.make_epoch` as ``fit`` runs
      it (Adam, ``B = 128``), i.e. what one more epoch of training costs. :func:`fnn.laplace.fit_laplace` as
      it is called (a Python loop over chunks of ``LAPLACE_CHUNK`` rows, the curvature run op by op, then the
      eigendecompositions), exact (KFLR) and sampled (KFAC, one column per row); the same fits with each
      chunk's factors jitted (the same loop and eigendecompositions), by hand and, for KFLR, by autodiff
      (:func:`laplace_pieces`); on the fitted posterior, the evidence at the new δ ``NEW_PRIOR`` and the
      optimized δ (fixed point, defaults), against the KFLR fit; laplace-torch's evidence at the new δ;
    - laplace-torch's default fit against fnn's KFLR fit, over ``TORCH_EXACT_ROUNDS`` rounds (it takes tens of
      seconds), with no warm-up round of its own: both sides are warm by then;
    - **predictive**, per image: :func:`fnn.laplace.glm_predictive` on ``PREDICTIVE_ROWS`` images against one
      gradient (:func:`fnn.backprop`, jitted: a forward and a backward pass) over the same images; the
      autodiff route and laplace-torch's predictive, which form ``J`` (``K × P`` per image), on the first
      ``JACOBIAN_ROWS`` of them.

    Every contender is timed after ``--warmup`` untimed rounds, so the op-by-op compilations of the eager
    calls and the jit compilations are out of the figures: they are the steady state. The autodiff routes
    are checked against the hand-written ones once (relative errors in ``agreement``).
    """
    quick = args.quick
    case = QUICK_CASES[0] if quick else LAPLACE_CASE
    net, loss, _, params = fnn_model(case)
    rows, chunk = (QUICK_LAPLACE_ROWS, QUICK_LAPLACE_CHUNK) if quick else (LAPLACE_ROWS, LAPLACE_CHUNK)
    m, mj = (QUICK_PREDICTIVE_ROWS, QUICK_JACOBIAN_ROWS) if quick else (PREDICTIVE_ROWS, JACOBIAN_ROWS)
    xf, yf, xp, yp = x[:rows], y[:rows], x[:m], y[:m]
    pieces = laplace_pieces(net, loss)
    lap = fnn.laplace

    def fit(key=None):
        return lap.fit_laplace(net, params, (xf, yf), loss, structure="kron", prior_precision=PRIOR, key=key,
                               batch_size=chunk)

    post = fit()
    layers = post.curvature["layers"]
    prior_fits = []  # the optimized δ of the last call (--quick: at most 10 iterations, a smoke test)

    def prior_fit() -> float:
        prior_fits[:] = [lap.optimize_prior_precision(post, **({"iters": 10} if quick else {}))]
        jax.block_until_ready(prior_fits[0].posterior.prior_precision)
        return 1.0

    seconds = args.per_example_seconds
    epoch = fnn_epoch_contender(case, xf, yf)[0]
    fits = {
        f"gradient epoch (fnn.train, B={case.batch})": lambda: epoch() / rows,
        KFLR_FIT: lambda: (jax.block_until_ready(fit().curvature), 1.0)[1],
        KFAC_FIT: lambda: (jax.block_until_ready(fit(jax.random.PRNGKey(0)).curvature), 1.0)[1],
        KFLR_JIT: lambda: (jax.block_until_ready(
            _chunked_kron_fit(functools.partial(pieces["factors"], params), xf, yf, chunk)), 1.0)[1],
        KFAC_JIT: lambda: (jax.block_until_ready(_chunked_kron_fit(
            functools.partial(pieces["factors"], params), xf, yf, chunk, jax.random.PRNGKey(0))), 1.0)[1],
        KFLR_AUTODIFF: lambda: (jax.block_until_ready(
            _chunked_kron_fit(functools.partial(pieces["factors, autodiff"], params), xf, yf, chunk)), 1.0)[1],
        EVIDENCE: repeated(lambda: lap.log_marginal_likelihood(post, NEW_PRIOR), seconds),
        PRIOR_FIT: prior_fit,
    }
    grad = jax.jit(lambda p, x, y: fnn.backprop(net, p, x, y, loss))
    predictive = {
        f"gradient (fnn.backprop), {m:,} images": repeated(lambda: grad(params, xp, yp), seconds, m),
        GLM: repeated(lambda: lap.glm_predictive(post, xp), seconds, m),
        GLM_AUTODIFF: repeated(lambda: pieces["predictive, autodiff"](params, layers, post.prior_precision,
                                                                      xp[:mj]), seconds, mj),
    }
    lt, skipped = import_laplace_torch(torch, args.torch_skipped)
    torch_fit = None
    if lt is not None:
        torch_fit, fits[TORCH_EVIDENCE], predictive[TORCH_GLM] = _laplace_torch_contenders(
            lt, torch, params, np.array(xf), np.array(yf), np.array(xp[:mj]), chunk)  # writable, for torch

    warmup = 0 if quick else args.warmup  # --quick: every eager op compiles in its first call, a smoke test
    fit_timings = alternate(fits, args.repeats, warmup)
    predictive_timings = alternate(predictive, args.repeats, warmup)
    # both sides are warm: fnn's fit from the rounds above, laplace-torch's from the fit its setup does
    exact_timings = {} if torch_fit is None else alternate(
        {KFLR_FIT: fits[KFLR_FIT], TORCH_FIT: torch_fit}, min(args.repeats, TORCH_EXACT_ROUNDS), 0)

    def time_ratio(timings, a: str, b: str) -> dict:  # time of a / time of b = rate of b / rate of a
        return paired_ratio(timings[b], timings[a])

    epoch_name, grad_name = next(iter(fits)), next(iter(predictive))
    summaries = {**{k: rate_summary(t) for k, t in fit_timings.items()},
                 **{k: rate_summary(t) for k, t in predictive_timings.items()}}
    per_image = {k: 1e3 / summaries[k]["median"] for k in predictive}  # the predictive's work is images
    ms = {k: 1e3 / s["median"] for k, s in summaries.items()}
    ms.update({k: v * (mj if k in (GLM_AUTODIFF, TORCH_GLM) else m) for k, v in per_image.items()})
    ms.update({TORCH_FIT: 1e3 / rate_summary(exact_timings[TORCH_FIT])["median"]} if exact_timings else {})
    xc, yc, xj = xf[:chunk], yf[:chunk], xp[:mj]
    agreement = {
        "factors, autodiff against by hand": _relative_error(pieces["factors, autodiff"](params, xc, yc),
                                                             pieces["factors"](params, xc, yc)),
        "predictive, autodiff against glm_predictive": _relative_error(
            pieces["predictive, autodiff"](params, layers, post.prior_precision, xj), lap.glm_predictive(post, xj)[1]),
    }
    return {
        "model": case.name, "batch": case.batch, "outputs": case.sizes[-1], "rows": rows, "chunk": chunk,
        "predictive_rows": m, "jacobian_rows": mj, "prior_precision": PRIOR, "new_prior_precision": NEW_PRIOR,
        "epoch": epoch_name, "gradient": grad_name,
        "ms": ms, "ms_per_image": per_image,
        "cpu_per_wall": {k: s["cpu_per_wall"] for k, s in summaries.items()},
        "fit_over_epoch": {k: time_ratio(fit_timings, k, epoch_name) for k in fits
                           if k not in (epoch_name, EVIDENCE, PRIOR_FIT, TORCH_EVIDENCE)},
        "fit_autodiff_over_hand": time_ratio(fit_timings, KFLR_AUTODIFF, KFLR_JIT),
        "fit_called_over_jitted": {KFLR_FIT: time_ratio(fit_timings, KFLR_FIT, KFLR_JIT),
                                   KFAC_FIT: time_ratio(fit_timings, KFAC_FIT, KFAC_JIT)},
        "evidence_over_fit": {k: time_ratio(fit_timings, k, KFLR_FIT) for k in (EVIDENCE, PRIOR_FIT, TORCH_EVIDENCE)
                              if k in fit_timings},
        "predictive_over_gradient": {k: time_ratio(predictive_timings, k, grad_name) for k in predictive
                                     if k != grad_name},
        "predictive_over_glm": {k: time_ratio(predictive_timings, k, GLM) for k in (GLM_AUTODIFF, TORCH_GLM)
                                if k in predictive_timings},
        "torch_exact_over_kflr": time_ratio(exact_timings, TORCH_FIT, KFLR_FIT) if exact_timings else None,
        "torch_exact_rounds": len(exact_timings.get(TORCH_FIT, [])),
        "prior_fit": {"iterations": prior_fits[0].iterations, "converged": prior_fits[0].converged,
                      "prior_precision": np.asarray(prior_fits[0].posterior.prior_precision).tolist()},
        "agreement": agreement,
        "laplace_torch": metadata.version("laplace-torch") if lt else None, "laplace_torch_skipped": skipped,
    }


# ---------------------------------------------------------------------------------------------
# Training-data attribution: all-pairs gradient inner products by the δ route against materialized
# gradients, and EK-FAC self-influence against a gradient epoch, beside kronfluence.

INFLUENCE_CASES = (Case((784, 256, 256, 10), 128), Case((784, 1024, 1024, 10), 128))
INFLUENCE_TRAIN, QUICK_INFLUENCE_TRAIN = 8000, 512  # training rows: the inner products' columns, EK-FAC's fit
INFLUENCE_TEST, QUICK_INFLUENCE_TEST = 1000, 64  # test rows: the inner products' rows
INFLUENCE_BLOCK = 1024  # examples per block, gradient_inner_products' default, and the materialized route's
# (test, training) rows of the materialized route's timed subset per model: its matmul alone does P multiply-adds
# per pair, 4.3 × 10¹² (784-256-256-10) and 3.0 × 10¹³ (784-1024-1024-10) FLOPs for all pairs
MATERIALIZED_SUBSET = {"784-256-256-10": (250, 1000), "784-1024-1024-10": (100, 500)}
QUICK_MATERIALIZED_SUBSET = (32, 256)
INFLUENCE_DAMPING = 1e-3  # λ of M = G + λI
# kronfluence beside fnn: its fit, pairwise and self-scores on 8,000 rows took 75, 27 and 143 s in a probe, so
# it runs on the first 1,000 training rows and 100 test rows, one timed round
KRONFLUENCE_TRAIN, KRONFLUENCE_TEST = 1000, 100
DELTA_IP, EKFAC_FIT, EKFAC_SELF = "δ route (gradient_inner_products)", "EK-FAC fit (preconditioner)", "self_influence"
EKFAC_SAMPLED = "EK-FAC fit, 1 sampled column per row (key=0)"
FIT_SUBSET, QUICK_FIT_SUBSET = 1000, 128  # rows the subset preconditioner is fitted on
EKFAC_SUBSET = "EK-FAC fit on a subset (1 sampled column per row) + self_influence of every row"
FNN_EKFAC = ("fnn: EK-FAC fit", "fnn: influence, EK-FAC", "fnn: self_influence")
KRON_EKFAC = ("kronfluence: fit_all_factors (EK-FAC)", "kronfluence: compute_pairwise_scores",
              "kronfluence: compute_self_scores")


def import_kronfluence(torch, torch_skipped: str | None = None):
    """``(kronfluence modules, None)``, or ``(None, why it is left out)``: kronfluence, the contender of the
    ``influence`` section, is an optional extra like torch and laplace-torch. Install it without its
    dependencies' CUDA builds (``pip install --no-deps kronfluence accelerate einops einconv opt-einsum``):
    its plain install pulls a CUDA torch over a CPU one."""
    if torch is None:
        return None, f"left out: kronfluence needs torch ({torch_skipped})"
    try:
        analyzer = importlib.import_module("kronfluence.analyzer")
        arguments = importlib.import_module("kronfluence.arguments")
        task = importlib.import_module("kronfluence.task")
    except ImportError:
        return None, "left out: kronfluence is not installed (pip install --no-deps kronfluence accelerate ...)"
    except Exception as error:  # a broken install of an optional extra is reported, not fatal
        return None, f"left out: kronfluence failed to import ({type(error).__name__}: {error})"
    return (analyzer, arguments, task), None


def _flat_grads(net, loss) -> Callable:
    """``(params, x, y) -> (B, P)``: the materialized per-example gradients, ``vmap(jax.grad)`` flattened."""
    def flat(params, x, y):
        g = _per_sample_grads(net, loss, params, x, y)
        return jnp.concatenate([t.reshape(x.shape[0], -1) for t in jax.tree.leaves(g)], axis=1)

    return jax.jit(flat)


@jax.jit
def _gradient_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``(N_a, P) @ (P, N_b)``: the inner products of materialized gradients."""
    return a @ b.T


def _materialized_inner_products(flat: Callable, params, test, train, block: int) -> np.ndarray:
    """``(N_test, N_train)`` from materialized gradients: the test set's ``(N_test, P)`` once, the training
    set's in blocks of ``block`` rows, each block's products with the test gradients assembled on the host."""
    (xt, yt), (x, y) = test, train
    gt = flat(params, xt, yt)
    out = np.empty((xt.shape[0], x.shape[0]), np.float32)
    for lo in range(0, x.shape[0], block):
        out[:, lo:lo + block] = np.asarray(_gradient_matmul(gt, flat(params, x[lo:lo + block], y[lo:lo + block])))
    return out


def _program_memory(jitted, *args) -> dict:
    """XLA's memory analysis of ``jitted`` compiled for ``args`` (lowered and compiled, not run): argument,
    temporary and output bytes."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    if analysis is None:
        return {"argument": None, "temp": None, "output": None}
    return {"argument": analysis.argument_size_in_bytes, "temp": analysis.temp_size_in_bytes,
            "output": analysis.output_size_in_bytes}


def _influence_memory(net, loss, params, flat, test, train, block: int) -> dict:
    """The compiled block programs of both routes at the full sizes: the δ route's rows of a block
    (:func:`fnn.influence.gradient_rows`: ``δ^l`` and ``ā^l`` of ``block`` examples) and its
    ``(N_test, block)`` Gram block (:func:`fnn.influence.rows_inner_products`); the materialized route's
    ``(block, P)`` gradients and its ``(N_test, P) @ (P, block)`` matmul."""
    ifl = fnn.influence
    (xt, yt), (x, y) = test, train
    xb, yb = x[:block], y[:block]
    rows = jax.jit(ifl.gradient_rows, static_argnums=(0, 4))
    gram = jax.jit(ifl.rows_inner_products)
    rows_t, rows_b = rows(net, params, xt, yt, loss), rows(net, params, xb, yb, loss)
    p = sum(t.size for t in jax.tree.leaves(params))
    gt = jax.ShapeDtypeStruct((xt.shape[0], p), jnp.float32)
    gb = jax.ShapeDtypeStruct((xb.shape[0], p), jnp.float32)
    return {
        "δ route": {"rows of a block (gradient_rows)": _program_memory(rows, net, params, xb, yb, loss),
                    "Gram block (rows_inner_products)": _program_memory(gram, rows_t, rows_b, params)},
        "materialized": {"gradients of a block (vmap(grad))": _program_memory(flat, params, xb, yb),
                         "matmul block": _program_memory(_gradient_matmul, gt, gb)},
    }


def _kronfluence_contenders(kf, torch, net_params, train: tuple, test: tuple, damping: float, chunk: int,
                            folder: str) -> tuple[dict[str, Callable], Callable[[], dict]]:
    """kronfluence on the same model, weights and rows: ``Analyzer.fit_all_factors`` with EK-FAC (its
    defaults: one sampled label per row from the model's softmax, the eigenvalues re-fitted), then
    ``compute_pairwise_scores`` on ``test`` and ``compute_self_scores`` on ``train`` with damping ``λ``,
    batches of ``chunk`` rows, in ``folder`` (kronfluence saves every result to disk), in that order;
    and a function that loads the saved scores. Torch threads = the cores, set per call."""
    analyzer, arguments, task_module = kf
    F = torch.nn.functional
    cores = os.cpu_count() or 1

    class Classification(task_module.Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    def dataset(data):
        x, y = data
        return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    task = Classification()
    model = analyzer.prepare_model(torch_model(torch, net_params).eval(), task)
    tr, te = dataset(train), dataset(test)
    an = analyzer.Analyzer(analysis_name="bench", model=model, task=task, output_dir=folder, disable_tqdm=True,
                           cpu=True, disable_model_save=True)
    scores = arguments.ScoreArguments(damping_factor=damping)

    def fit() -> float:
        torch.set_num_threads(cores)
        an.fit_all_factors(factors_name="ekfac", dataset=tr, per_device_batch_size=chunk,
                           factor_args=arguments.FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        return 1.0

    def pairs() -> float:
        torch.set_num_threads(cores)
        an.compute_pairwise_scores(scores_name="pairs", factors_name="ekfac", query_dataset=te, train_dataset=tr,
                                   per_device_query_batch_size=len(te), per_device_train_batch_size=chunk,
                                   score_args=scores, overwrite_output_dir=True)
        return 1.0

    def self_scores() -> float:
        torch.set_num_threads(cores)
        an.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=tr,
                               per_device_train_batch_size=chunk, score_args=scores, overwrite_output_dir=True)
        return 1.0

    def scores_saved() -> dict:
        return {"pairs": an.load_pairwise_scores("pairs")["all_modules"].numpy(),
                "self": an.load_self_scores("self")["all_modules"].numpy()}

    return dict(zip(KRON_EKFAC, (fit, pairs, self_scores))), scores_saved


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ: Pearson's correlation of the ranks (no ties in continuous scores)."""
    ra, rb = np.argsort(np.argsort(a.ravel())), np.argsort(np.argsort(b.ravel()))
    return float(np.corrcoef(ra, rb)[0, 1])


def _warmup(args) -> int:
    """``--warmup``; none with ``--quick``, a smoke test (each contender compiles in its first call)."""
    return 0 if args.quick else args.warmup


def _inner_products_case(case: Case, x: jax.Array, y: jax.Array, xt: jax.Array, yt: jax.Array, args) -> dict:
    """All pairs ``⟨g_i, g_j⟩`` of the ``N_test × N_train`` rows by the δ route against the materialized route
    on the subset of ``MATERIALIZED_SUBSET`` (both timed per pair, alternated in one run), the memory of
    both routes' compiled block programs, and their agreement on the subset."""
    net, loss, _, params = fnn_model(case)
    flat = _flat_grads(net, loss)
    nt, nb = QUICK_MATERIALIZED_SUBSET if args.quick else MATERIALIZED_SUBSET[case.name]
    subset = ((xt[:nt], yt[:nt]), (x[:nb], y[:nb]))
    pairs = xt.shape[0] * x.shape[0]
    delta_scores = []

    def delta() -> float:
        delta_scores[:] = [fnn.influence.gradient_inner_products(net, params, (xt, yt), (x, y), loss,
                                                                 block=INFLUENCE_BLOCK)]
        return float(pairs)

    materialized_name = f"materialized (vmap(grad), matmul), {nt:,} × {nb:,} subset"
    timings = alternate({DELTA_IP: delta,
                         materialized_name: lambda: float(_materialized_inner_products(
                             flat, params, *subset, INFLUENCE_BLOCK).size)}, args.repeats, _warmup(args))
    want = _materialized_inner_products(flat, params, *subset, INFLUENCE_BLOCK)
    summaries = {k: rate_summary(t) for k, t in timings.items()}
    p = case.params
    return {
        "model": case.name, "params": p, "test": int(xt.shape[0]), "train": int(x.shape[0]), "pairs": pairs,
        "block": INFLUENCE_BLOCK, "materialized": materialized_name, "subset": [nt, nb],
        "seconds_all_pairs": {k: pairs / s["median"] for k, s in summaries.items()},  # the subset scaled per pair
        "ns_per_pair": {k: 1e9 / s["median"] for k, s in summaries.items()},
        "cpu_per_wall": {k: s["cpu_per_wall"] for k, s in summaries.items()},
        "materialized_over_delta": paired_ratio(timings[DELTA_IP], timings[materialized_name]),
        "memory_bytes": _influence_memory(net, loss, params, flat, (xt, yt), (x, y), INFLUENCE_BLOCK),
        "n_times_p_bytes": int(x.shape[0]) * p * 4,
        "agreement": _relative_error(jnp.asarray(delta_scores[0][:nt, :nb]), jnp.asarray(want)),
    }


def _ekfac_case(case: Case, x: jax.Array, y: jax.Array, args) -> dict:
    """EK-FAC's fit (:func:`fnn.influence.preconditioner`, exact columns and one sampled column per row) and
    the self-influence of every training row (:func:`fnn.influence.self_influence`) against one gradient
    epoch over the same rows, alternated; fit plus self-influence per round over the epoch of that round."""
    net, loss, _, params = fnn_model(case)
    epoch_name = f"gradient epoch (fnn.train, B={case.batch})"
    epoch = fnn_epoch_contender(case, x, y)[0]
    fitted = []

    def fit(key=None):
        pre = fnn.influence.preconditioner(net, params, (x, y), loss, method="ekfac", damping=INFLUENCE_DAMPING,
                                           key=key)
        jax.block_until_ready(pre.layers)
        return pre

    def exact() -> float:
        fitted[:] = [fit()]
        return 1.0

    scores = {}
    sub = QUICK_FIT_SUBSET if args.quick else FIT_SUBSET

    def self_scores() -> float:
        scores["full"] = fnn.influence.self_influence(fitted[0])  # a NumPy array: ready when it returns
        return 1.0

    def subset() -> float:  # the factors and eigenvalues of `sub` rows; every row scored
        pre = fnn.influence.preconditioner(net, params, (x[:sub], y[:sub]), loss, method="ekfac",
                                           damping=INFLUENCE_DAMPING, key=0)
        scores["subset"] = fnn.influence.self_influence(pre, (x, y))
        return 1.0

    exact()  # self_influence needs a fitted preconditioner before the first round
    timings = alternate({epoch_name: lambda: epoch() / x.shape[0], EKFAC_FIT: exact, EKFAC_SELF: self_scores,
                         EKFAC_SAMPLED: lambda: (fit(0), 1.0)[1], EKFAC_SUBSET: subset}, args.repeats,
                        _warmup(args))
    seconds = {k: [t.wall for t in v] for k, v in timings.items()}
    together = [(f + s) / e for f, s, e in zip(seconds[EKFAC_FIT], seconds[EKFAC_SELF], seconds[epoch_name])]
    summaries = {k: rate_summary(t) for k, t in timings.items()}
    return {
        "model": case.name, "rows": int(x.shape[0]), "batch": case.batch, "damping": INFLUENCE_DAMPING,
        "epoch": epoch_name, "ms": {k: 1e3 / s["median"] for k, s in summaries.items()},
        "cpu_per_wall": {k: s["cpu_per_wall"] for k, s in summaries.items()},
        "over_epoch": {**{k: paired_ratio(timings[epoch_name], timings[k]) for k in (EKFAC_FIT, EKFAC_SELF,
                                                                                        EKFAC_SAMPLED,
                                                                                        EKFAC_SUBSET)},
                       f"{EKFAC_FIT} + {EKFAC_SELF}": {"median": float(np.median(together)), "rounds": together}},
        "subset_rows": sub,
        "subset_against_full": {"spearman": _rank_correlation(scores["subset"], scores["full"]),
                                "top_decile_overlap": _top_overlap(scores["subset"], scores["full"], 0.1)},
    }


def _top_overlap(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    """The share of ``b``'s top ``fraction`` of rows that are in ``a``'s top ``fraction`` too."""
    k = max(1, int(round(fraction * a.size)))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def _kronfluence_case(case: Case, x: jax.Array, y: jax.Array, xt: jax.Array, yt: jax.Array, args, torch) -> dict:
    """kronfluence's EK-FAC fit, pairwise scores (test × training rows) and self-scores beside fnn's
    (:func:`fnn.influence.preconditioner` with one sampled column per row, as kronfluence samples,
    :func:`fnn.influence.influence`, :func:`fnn.influence.self_influence`) on the first ``KRONFLUENCE_TRAIN``
    training rows and ``KRONFLUENCE_TEST`` test rows, over one round: fnn's after one untimed pass (its
    compilations), kronfluence's without one (eager torch, nothing to compile; a pass takes about 30 s).
    With the rank correlation of the two libraries' scores (the sampled labels differ, so the curvatures
    differ a little)."""
    kf, skipped = (None, "left out: --quick (it takes seconds per call even on the small model)") if args.quick \
        else import_kronfluence(torch, args.torch_skipped)
    if kf is None:
        return {"kronfluence": None, "skipped": skipped}
    net, loss, _, params = fnn_model(case)
    x, y, test = x[:KRONFLUENCE_TRAIN], y[:KRONFLUENCE_TRAIN], (xt[:KRONFLUENCE_TEST], yt[:KRONFLUENCE_TEST])
    ours = {}

    def fit() -> float:
        ours["pre"] = fnn.influence.preconditioner(net, params, (x, y), loss, method="ekfac",
                                                   damping=INFLUENCE_DAMPING, key=0)
        jax.block_until_ready(ours["pre"].layers)
        return 1.0

    def pairs() -> float:
        ours["pairs"] = fnn.influence.influence(ours["pre"], test)
        return 1.0

    def self_scores() -> float:
        ours["self"] = fnn.influence.self_influence(ours["pre"])
        return 1.0

    mine = dict(zip(FNN_EKFAC, (fit, pairs, self_scores)))
    for c in mine.values():
        c()
    quiet = logging.getLogger()
    level = quiet.level
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="bench-kronfluence-") as folder:
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.WARNING)
        kron, saved = _kronfluence_contenders(kf, torch, params, (np.array(x), np.array(y)),
                                              (np.array(test[0]), np.array(test[1])), INFLUENCE_DAMPING,
                                              INFLUENCE_BLOCK, folder)
        timings = alternate(mine | kron, 1, 0)
        kron_scores = saved()
        quiet.setLevel(level)
    summaries = {k: rate_summary(t) for k, t in timings.items()}
    return {
        "kronfluence": metadata.version("kronfluence"), "skipped": None, "model": case.name,
        "test": int(test[0].shape[0]),
        "train": int(x.shape[0]), "rounds": len(timings[FNN_EKFAC[0]]),
        "ms": {k: 1e3 / s["median"] for k, s in summaries.items()},
        "cpu_per_wall": {k: s["cpu_per_wall"] for k, s in summaries.items()},
        "kronfluence_over_fnn": {k: paired_ratio(timings[f], timings[k]) for f, k in zip(FNN_EKFAC, KRON_EKFAC)},
        # kronfluence scores −I (its sign: positive = helpful) on the summed loss
        "rank_correlation": {"pairwise": _rank_correlation(-ours["pairs"], kron_scores["pairs"]),
                             "self": _rank_correlation(ours["self"], kron_scores["self"])},
    }


def bench_influence(x: jax.Array, y: jax.Array, args, torch) -> dict:
    """Training-data attribution (:mod:`fnn.influence`) at the initial params of each model (the timings do
    not depend on their values), on the first ``INFLUENCE_TRAIN`` rows as the training set and the next
    ``INFLUENCE_TEST`` as the test set (``--quick``: ``784-64-64-10`` on 512 and 64 rows):

    - **all-pairs gradient inner products** on ``784-256-256-10`` and ``784-1024-1024-10``
      (:func:`_inner_products_case`): the δ route against materialized per-example gradients and a matmul,
      with the compiled block programs' memory against ``N × P`` floats;
    - **EK-FAC self-influence** of every training row (:func:`_ekfac_case`) on both models, against a
      gradient epoch over the same rows;
    - **kronfluence** (:func:`_kronfluence_case`), an optional extra like torch, on ``784-256-256-10``.

    Every comparison of fnn's is timed after ``--warmup`` untimed rounds (one pass beside kronfluence), so
    the jit compilations are out of the figures. The δ route is checked against the materialized one on
    the subset (``agreement``: max |difference| / max |value|).
    """
    rows, test_rows = (QUICK_INFLUENCE_TRAIN, QUICK_INFLUENCE_TEST) if args.quick else (INFLUENCE_TRAIN,
                                                                                       INFLUENCE_TEST)
    cases = QUICK_CASES if args.quick else INFLUENCE_CASES
    xf, yf, xt, yt = x[:rows], y[:rows], x[rows:rows + test_rows], y[rows:rows + test_rows]
    return {
        "inner_products": [_inner_products_case(case, xf, yf, xt, yt, args) for case in cases],
        "ekfac": [_ekfac_case(case, xf, yf, args) for case in cases],
        "kronfluence": _kronfluence_case(cases[0], xf, yf, xt, yt, args, torch),
    }


# ---------------------------------------------------------------------------------------------
# DP-SGD: the private epoch against the ordinary one, and the δ route against vmap(jax.grad).

PRIVATE_CASE, PRIVATE_STEP_CASE = Case((784, 256, 256, 10), 256), Case((784, 1024, 1024, 10), 256)


def _vmap_private_gradient(net, params, x, y, loss, key, *, clip, noise_multiplier, q, chunk):
    """DP-SGD's gradient as it is written with ``vmap(jax.grad)``: the same Poisson lot, padded sizes
    and pieces (:func:`fnn.privacy.lot_sum`) and the same noise (:func:`fnn.privacy.gaussian`) as
    :func:`fnn.privacy.private_gradient`, but each piece's per-example gradients materialized
    (``piece × P``, at most ``chunk × P``), clipped and summed."""
    n = x.shape[0]
    lot_key, noise_key = jax.random.split(key)

    def clipped_sum(rows):
        real = rows < n
        rows = jnp.where(real, rows, 0)
        g = _per_sample_grads(net, loss, params, x[rows], y[rows])
        w = jnp.where(real, jnp.minimum(1, clip / jnp.maximum(_vmap_norms(g), 1e-30)), 0)
        return jax.tree.map(lambda s: jnp.tensordot(w, s, 1), g)

    start = fnn.privacy.gaussian(noise_key, params, noise_multiplier * clip)
    total, _ = fnn.privacy.lot_sum(lot_key, n, q, clipped_sum, start, chunk=chunk)
    return jax.tree.map(lambda t: t / (q * n), total)


def bench_private(x: jax.Array, y: jax.Array, args, quick: bool) -> dict:
    """Epoch throughput of the private epoch (lot size = the batch size; the default chunk, and chunks
    of 64) against the ordinary epoch of :func:`fnn.train.make_epoch`; and one DP-SGD gradient by
    the δ route (default chunk) against the ``vmap(jax.grad)`` route (pieces of at most 128) on
    the large model."""
    case = QUICK_CASES[0] if quick else PRIVATE_CASE
    net, loss, opt, params = fnn_model(case)
    n = x.shape[0]
    contenders = {"ordinary epoch": fnn_epoch_contender(case, x, y)[0]}
    for name, chunk in (("private epoch", fnn.privacy.Privacy._field_defaults["chunk"]),
                        ("private epoch, chunk 64", 64)):
        plan = fnn.privacy.plan(fnn.privacy.Privacy(clip=1.0, lot_size=case.batch, noise_multiplier=1.0, chunk=chunk),
                                n, 1)
        epoch = make_epoch(net, loss, opt, num_samples=n, batch_size=case.batch, guard=False, privacy=plan)
        state = [params, opt.init(params), None, jax.random.PRNGKey(1)]
        run, _ = compiled(epoch, (), *state, x, y)
        contenders[name] = epoch_contender(run, state, x, y)
    timings = alternate(contenders, args.repeats, args.warmup)
    epochs = {"model": case.name, "batch": case.batch,
              "samples_per_s": {k: rate_summary(t)["median"] for k, t in timings.items()},
              "private_over_ordinary": {k: paired_ratio(t, timings["ordinary epoch"])
                                        for k, t in timings.items() if k != "ordinary epoch"}}

    case = QUICK_CASES[0] if quick else PRIVATE_STEP_CASE
    net, loss, _, params = fnn_model(case)
    kw = dict(clip=1.0, noise_multiplier=1.0, q=case.batch / n)
    routes = {"δ route": lambda p, key: fnn.privacy.private_gradient(net, p, x, y, loss, key, **kw)[0],
              "vmap(grad) route": lambda p, key: _vmap_private_gradient(net, p, x, y, loss, key, chunk=128, **kw)}
    contenders, memory = {}, {}
    keys = jax.random.split(jax.random.PRNGKey(7), (16, 1 if quick else 3))  # a call: 3 lots
    for name, fn in routes.items():
        run, calls = jax.jit(fn).lower(params, jax.random.PRNGKey(0)).compile(), itertools.count()
        analysis = run.memory_analysis()
        memory[name] = None if analysis is None else analysis.temp_size_in_bytes

        def contender(run=run, calls=calls) -> float:  # call i: the lots of keys[i], alike for both routes
            for key in keys[next(calls) % len(keys)]:
                jax.block_until_ready(run(params, key))
            return float(keys.shape[1])

        contenders[name] = contender
    # The vmap route frees 1.3 GB after every call; the pause keeps that off the δ route's clock
    # (measured: the δ step right after it takes 180 ms instead of 35 ms, and 41 ms after 1 s).
    timings = alternate(contenders, args.repeats, args.warmup, pause=0.1 if quick else 1.0)
    ms = {k: 1e3 / rate_summary(t)["median"] for k, t in timings.items()}
    steps = {"model": case.name, "lot": case.batch, "ms": ms, "memory_bytes": memory,
             "vmap_over_delta": paired_ratio(timings["δ route"], timings["vmap(grad) route"])}

    # The noise alone: one normal per parameter of the large model, fnn.noise.normal against
    # jax.random.normal (the same numbers), each leaf from its own key as the private step draws them.
    leaves = jax.tree.leaves(params)
    samplers = {"jax.random.normal": jax.random.normal, "fnn.noise.normal": fnn.noise.normal}
    contenders = {}
    for name, normal in samplers.items():
        draw = jax.jit(lambda key, normal=normal: [normal(k, t.shape, t.dtype)
                                                   for k, t in zip(jax.random.split(key, len(leaves)), leaves)])
        jax.block_until_ready(draw(jax.random.PRNGKey(0)))
        contenders[name] = lambda draw=draw: (jax.block_until_ready(draw(jax.random.PRNGKey(1))), 1.0)[1]
    timings = alternate(contenders, 3 * args.repeats, args.warmup)
    noise = {"parameters": sum(t.size for t in leaves),
             "ms": {k: 1e3 / rate_summary(t)["median"] for k, t in timings.items()},
             "jax_over_fused": paired_ratio(timings["fnn.noise.normal"], timings["jax.random.normal"])}
    return {"epochs": epochs, "steps": steps, "noise": noise}


# ---------------------------------------------------------------------------------------------
# Epoch throughput.


def bench_epochs(case: Case, x_np: np.ndarray, y_np: np.ndarray, args, torch, matmul_n: int) -> dict:
    """Samples/s of fnn's epoch, the reference epoch and torch, with the matmul rate, alternated."""
    x, y = jnp.asarray(x_np, jnp.dtype(case.dtype)), jnp.asarray(y_np)
    n = x.shape[0]
    flops = 6 * case.params  # per sample: 2 forward, 4 backward (the convention of the targets)
    executed = case.matmul_flops
    contenders, compile_seconds = {}, {}
    contenders["fnn"], compile_seconds["fnn"] = fnn_epoch_contender(case, x, y)
    contenders[NO_NORM], compile_seconds[NO_NORM] = fnn_epoch_contender(case, x, y, grad_norm=False)
    contenders["jax.grad reference"], compile_seconds["jax.grad reference"] = reference_epoch_contender(case, x, y)
    cores = os.cpu_count() or 1
    torch_names = {f"torch eager, {cores} threads": cores, "torch eager, 1 thread": 1} if torch else {}
    for name, threads in torch_names.items():
        contenders[name] = torch_contender(torch, case, x_np, y_np, threads, args.torch_seconds)
    calls = max(1, math.ceil(flops * n / 2 / (2 * matmul_n**3)))  # half an fnn epoch's FLOPs
    contenders["matmul"] = matmul_contender(matmul_n, case.compute or case.dtype, calls)
    timings = alternate(contenders, args.repeats, args.warmup)

    matmul = rate_summary(timings["matmul"], 1e-9)
    out = {"model": case.name, "batch": case.batch, "dtype": case.dtype, "compute_dtype": case.compute,
           "precision": case.precision, "params": case.params,
           "samples": n, "flops_per_sample": flops, "matmul_flops_per_sample": executed,
           "matmul": {"n": matmul_n, "calls": calls, "gflops": matmul["median"], "gflops_best": matmul["best"],
                      "gflops_all": matmul["all"], "cpu_per_wall": matmul["cpu_per_wall"]},
           "compile": compile_seconds, "contenders": {}}
    for name in contenders:
        if name == "matmul":
            continue
        r = rate_summary(timings[name])
        fraction = paired_ratio(timings[name], timings["matmul"], flops)
        out["contenders"][name] = {
            "samples_per_s": r["median"], "samples_per_s_best": r["best"], "samples_per_s_all": r["all"],
            "gflops": flops * r["median"] / 1e9, "cpu_per_wall": r["cpu_per_wall"],
            "fraction_of_matmul": fraction["median"], "fraction_of_matmul_rounds": fraction["rounds"],
            "executed_fraction_of_matmul": fraction["median"] * executed / flops,
        }
    out["fnn_over_reference"] = paired_ratio(timings["fnn"], timings["jax.grad reference"])
    out["no_norm_over_reference"] = paired_ratio(timings[NO_NORM], timings["jax.grad reference"])
    if torch_names:
        over = {name: paired_ratio(timings["fnn"], timings[name]) for name in torch_names}
        fastest = max(torch_names, key=lambda name: out["contenders"][name]["samples_per_s"])
        out["fnn_over_torch"] = over
        out["fastest_torch"] = fastest
        out["fnn_over_fastest_torch"] = over[fastest]
        # fnn running the matmul FLOPs it executes at the full matmul rate: the most it could gain
        # on this torch loop on this machine (samples/s at most rate / executed, torch's is
        # fraction · rate / flops)
        out["fnn_over_torch_bound"] = flops / executed / out["contenders"][fastest]["fraction_of_matmul"]
    else:
        out["torch"] = args.torch_skipped
    return out


def gpu_rows(args, device_platform: str, x_np: np.ndarray, y_np: np.ndarray,
             matmul_n: int = GPU_MATMUL) -> list[dict]:
    """The GPU-only rows: measured (fnn, reference, matmul; no torch) off a CPU, else marked unmeasured."""
    rows = []
    for case in QUICK_GPU_CASES if args.quick else GPU_CASES:
        row = {"model": case.name, "batch": case.batch, "dtype": case.dtype, "compute_dtype": case.compute,
               "precision": case.precision}
        if device_platform == "cpu":
            row.update(measured=False, reason="unmeasured: no GPU here (jax platform cpu)")
        else:
            row.update(measured=True, **bench_epochs(case, x_np, y_np, args, None, matmul_n))
            row["torch"] = "not run: the torch contenders are a CPU comparison"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Targets and tables.


def targets(steps: list[dict], epochs: list[dict], device_platform: str, per_example: list[dict] = (),
            private: dict | None = None, curvature: list[dict] = (), laplace: dict | None = None,
            influence: dict | None = None) -> list[dict]:
    """Each target with its measured value (a median of per-round ratios) and its verdict.

    ``met`` is ``None`` where nothing was measured; ``within_noise`` is true when the goal lies
    between the smallest and the largest per-round ratio, so that the verdict could flip on a rerun.
    """
    cpu = device_platform == "cpu"
    if epochs:
        small, large = epochs[0], epochs[-1]  # the B=128 and the B=256 case (one stand-in in quick mode)
        fraction = large["contenders"]["fnn"]
    rows = [
        (f"fnn / fastest torch eager, {small['model']} B={small['batch']} (CPU)", ">=", 2.2,
         small.get("fnn_over_fastest_torch") if cpu else None),
        (f"fnn / jax.grad reference, {small['model']} B={small['batch']} (CPU)", ">=", 1.0,
         small["fnn_over_reference"] if cpu else None),
        (f"fnn (grad_norm=False) / jax.grad reference, {small['model']} B={small['batch']} (CPU)", ">=", 1.0,
         small["no_norm_over_reference"] if cpu else None),
        (f"fnn GFLOP/s (6·P) / matmul GFLOP/s, {large['model']} B={large['batch']} (CPU)", ">=", 0.9,
         {"median": fraction["fraction_of_matmul"], "rounds": fraction["fraction_of_matmul_rounds"]} if cpu else None),
    ] if epochs else []
    rows += [(f"manual / jax.grad step time, {s['model']} B={s['batch']}", "<=", 1.0, s["manual_over_autodiff"])
             for s in steps]
    if per_example:
        big = per_example[-1]
        for name, sense, goal, key in (("norms, δ", ">=", 50, "vmap_over_delta"),
                                       ("clipped sum, δ", ">=", 50, "vmap_over_delta"),
                                       ("norms, δ", "<=", 1.3, "over_gradient"),
                                       ("clipped sum, δ", "<=", 1.3, "over_gradient"),
                                       ("batch_grad, δ", ">=", 1.0, "vmap_over_delta")):
            what = "vmap(grad) time / δ time" if key == "vmap_over_delta" else "time / plain gradient"
            rows.append((f"{name[:-3]}: {what}, {big['model']} B={big['batch']}", sense, goal,
                         big["ratios"][name][key]))
    if private:
        e, s = private["epochs"], private["steps"]
        rows.append((f"private epoch / ordinary epoch (samples/s), {e['model']} B={e['batch']}", ">=",
                     0.7, e["private_over_ordinary"]["private epoch"]))
        rows.append((f"DP-SGD gradient: vmap(grad) time / δ time, {s['model']} lot {s['lot']}", ">=", 30,
                     s["vmap_over_delta"]))
    for c in curvature:
        r, where = c["ratios"], f"{c['model']} B={c['batch']}"
        hv = r["H v, by hand"]["autodiff_over_hand"]
        rows.append((f"H v: by-hand time / jvp(grad) time, {where}", "<=", 1.1,
                     {"median": 1 / hv["median"], "rounds": [1 / v for v in hv["rounds"]]}))
        for name, goal in (("MC GGN diagonal (1 sample), by hand", 2), ("KFAC factors (1 sample), by hand", 2),
                           ("KFLR factors, by hand", c["outputs"] + 1),
                           ("exact GGN diagonal, by hand", c["outputs"] + 1)):
            rows.append((f"{name[: -len(', by hand')]}: time / gradient, {where}", "<=", goal,
                         r[name]["over_gradient"]))
    if laplace:
        where = f"{laplace['model']}, {laplace['rows']:,} rows"
        for name in (KFLR_FIT, KFAC_FIT):
            rows.append((f"{name}: time / gradient epoch, {where}", "<=", 2, laplace["fit_over_epoch"][name]))
        rows.append((f"GLM predictive: time / gradient, {laplace['model']}, {laplace['predictive_rows']:,} images",
                     "<=", laplace["outputs"] + 1, laplace["predictive_over_gradient"][GLM]))
        rows.append((f"evidence at a new δ: time / KFLR fit, {where}", "<=", 0.01,
                     laplace["evidence_over_fit"][EVIDENCE]))
    if influence:
        for c in influence["inner_products"]:
            rows.append((f"inner products: materialized time / δ time per pair, {c['model']}, {c['test']:,} × "
                         f"{c['train']:,}", ">=", 10, c["materialized_over_delta"]))
        for e in influence["ekfac"]:
            rows.append((f"EK-FAC fit + self_influence: time / gradient epoch, {e['model']}, {e['rows']:,} rows", "<=",
                         3, e["over_epoch"][f"{EKFAC_FIT} + {EKFAC_SELF}"]))
            rows.append((f"EK-FAC fit on {e['subset_rows']:,} rows + self_influence of all: time / gradient epoch, "
                         f"{e['model']}, {e['rows']:,} rows", "<=", 3, e["over_epoch"][EKFAC_SUBSET]))
    out = []
    for name, sense, goal, ratio in rows:
        row = {"target": name, "goal": f"{sense} {goal}", "value": None, "range": None, "met": None,
               "within_noise": None}
        if ratio is not None:
            value, low, high = ratio["median"], min(ratio["rounds"]), max(ratio["rounds"])
            row.update(value=value, range=[low, high], met=value >= goal if sense == ">=" else value <= goal,
                       within_noise=low <= goal <= high)
        out.append(row)
    return out


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pastes into BENCH.md as it is)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def machine() -> dict:
    """What the numbers were measured on, and how busy the machine was when the run started."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    return {"cpu": model, "cores": os.cpu_count(), "platform": device.platform, "device": device.device_kind,
            "jax": jax.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "load_average_start": _load()}


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


STEP_RATIOS = (("step, manual / jax.grad", "manual_over_autodiff"),
               ("fnn.train epoch, manual / jax.grad", "fnn_epoch_manual_over_autodiff"),
               ("fnn.train epoch / step, manual", "fnn_epoch_over_plain_step"),
               ("guarded epoch / fnn.train epoch", "guarded_over_fnn_epoch"))


def _ratio(ratio: dict) -> str:
    """``median [smallest–largest round]``."""
    return f"{ratio['median']:.3g} [{min(ratio['rounds']):.3g}–{max(ratio['rounds']):.3g}]"


def print_tables(results: dict) -> None:
    m = results["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; jax {m['jax']} on {m['platform']} ({m['device']}); torch "
          f"{results['torch_version'] or results['torch_skipped']}; XLA_FLAGS={m['xla_flags']!r}; "
          f"OPENBLAS_NUM_THREADS={m.get('openblas_threads')}; load average "
          f"(1, 5, 15 min) {m['load_average_start']} at the start, {m['load_average_end']} at the end")

    steps = results["steps"]
    if steps:
        _print_steps(steps)
    if results["epochs"] or any(g["measured"] for g in results["gpu"]):
        _print_epochs(results)
    if results["gpu"]:
        _print_gpu(results["gpu"])
    if results["per_example"]:
        _print_per_example(results["per_example"])
    if results.get("curvature"):
        _print_curvature(results["curvature"])
    if results.get("second_order"):
        _print_second_order(results["second_order"])
    if results.get("laplace"):
        _print_laplace(results["laplace"])
    if results.get("influence"):
        _print_influence(results["influence"])
    if results["private"]:
        e, s = results["private"]["epochs"], results["private"]["steps"]
        print(f"\nDP-SGD, {e['model']}, lot = batch = {e['batch']}: samples/s "
              + ", ".join(f"{k} {v:,.0f}" for k, v in e["samples_per_s"].items()) + "; private / ordinary "
              + ", ".join(f"{k} {_ratio(v)}" for k, v in e["private_over_ordinary"].items()))
        print(f"DP-SGD gradient, {s['model']}, lot {s['lot']}: "
              + ", ".join(f"{k} {v:.1f} ms ({(s['memory_bytes'][k] or 0) / 2**20:,.1f} MiB temporaries)"
                          for k, v in s["ms"].items()) + f"; vmap / δ {_ratio(s['vmap_over_delta'])}")
        z = results["private"]["noise"]
        print(f"DP-SGD noise, {z['parameters']:,} normals: " + ", ".join(f"{k} {v:.2f} ms" for k, v in z["ms"].items())
              + f"; jax / fused {_ratio(z['jax_over_fused'])}")
    print("\nTargets")
    verdict = {True: "met", False: "missed", None: "not measured"}
    rows = [[t["target"], t["goal"], t["value"], None if t["range"] is None else "{:.3g}–{:.3g}".format(*t["range"]),
             verdict[t["met"]] + (" (goal within the rounds' range)" if t["within_noise"] else "")]
            for t in results["targets"]]
    print(table(["target", "goal", "median", "rounds", "verdict"], rows))


def _print_steps(steps: list[dict]) -> None:
    print("\nStep time: ms per step, median (best) of the rounds, and cpu/wall")
    print(table(["piece"] + [f"{s['model']} B={s['batch']}, K={s['steps_per_call']}" for s in steps],
                [[name] + [f"{s['ms'][name]:.3f} ({s['ms_best'][name]:.3f}) {s['cpu_per_wall'][name]:.2f}"
                           for s in steps] for name in steps[0]["ms"]]
                + [[f"{label} (paired)"] + [_ratio(s[key]) for s in steps] for label, key in STEP_RATIOS]
                + [[f"compiled {what}, manual / jax.grad"]
                   + [f"{s['compiled_ops']['manual'][what]} / {s['compiled_ops']['autodiff'][what]}" for s in steps]
                   for what in ("instructions", "fusions", "dots", "library_fusions")]))


def _print_epochs(results: dict) -> None:
    print("\nEpoch throughput: samples/s median (best); GFLOP/s = 6·P·samples/s at the median; of matmul: "
          "median of the per-round fractions")
    rows = []
    for e in results["epochs"] + [g for g in results["gpu"] if g["measured"]]:
        label = f"{e['model']} B={e['batch']} {e['precision']}"
        for name, c in e["contenders"].items():
            rows.append([label, name, f"{c['samples_per_s']:,.0f} ({c['samples_per_s_best']:,.0f})", c["gflops"],
                         c["fraction_of_matmul"], c["executed_fraction_of_matmul"], c["cpu_per_wall"]])
        mm = e["matmul"]
        rows.append([label, f"matmul {mm['n']}³", None, f"{mm['gflops']:.1f} ({mm['gflops_best']:.1f})", 1.0, 1.0,
                     mm["cpu_per_wall"]])
    print(table(["case", "contender", "samples/s", "GFLOP/s", "of matmul", "executed", "cpu/wall"], rows))
    print("executed: the fraction counting the matmul FLOPs a step runs (no δ for the input layer) instead of 6·P")
    ratios = []
    for e in results["epochs"]:
        line = (f"{e['model']} B={e['batch']}: fnn / reference {_ratio(e['fnn_over_reference'])}; "
                f"{NO_NORM} / reference {_ratio(e['no_norm_over_reference'])}")
        if "fnn_over_torch" in e:
            line += "".join(f"; fnn / {k} {_ratio(v)}" for k, v in e["fnn_over_torch"].items())
            line += ("; fnn / fastest torch with fnn's executed FLOPs at the matmul rate "
                     f"{e['fnn_over_torch_bound']:.2f}")
        ratios.append(line)
    print("Paired ratios: " + "\n               ".join(ratios))
    if results["torch_skipped"]:
        print(f"torch: {results['torch_skipped']}")

    print("\nCompile time of the epoch function, seconds wall (CPU)")
    print(table(["case", "epoch function", "lower", "compile"],
                [[f"{e['model']} B={e['batch']}", name, f"{c['lower_s']:.2f} ({c['lower_cpu_s']:.2f})",
                  f"{c['compile_s']:.2f} ({c['compile_cpu_s']:.2f})"]
                 for e in results["epochs"] for name, c in e["compile"].items()]))


def _print_gpu(gpu: list[dict]) -> None:
    print("\nGPU rows")
    print(table(["case", "fnn samples/s", "of matmul", "note"],
                [[f"{g['model']} B={g['batch']} {g['precision']}",
                  g["contenders"]["fnn"]["samples_per_s"] if g["measured"] else None,
                  g["contenders"]["fnn"]["fraction_of_matmul"] if g["measured"] else None,
                  g.get("reason", "measured")] for g in gpu]))


def _print_routes(title: str, results: list[dict], other: str, header: str, column: str) -> None:
    """One table of quantities by route: ms, time / plain gradient, the other route's time over this one's."""
    print(f"\n{title}: ms per batch (median), time / plain gradient, {header} "
          "(paired medians [range]), XLA memory (temporaries and outputs)")
    rows = []
    for p in results:
        for name, ms in p["ms"].items():
            r = p["ratios"].get(name, {})
            mem = p["memory_bytes"][name]
            rows.append([f"{p['model']} B={p['batch']}", name, f"{ms:.3f}",
                         _ratio(r["over_gradient"]) if "over_gradient" in r else None,
                         _ratio(r[other]) if other in r else None,
                         None if mem is None else f"{mem / 2**20:,.1f} MiB"])
    print(table(["case", "quantity, route", "ms", "/ gradient", column, "memory"], rows))


def _print_per_example(per: list[dict]) -> None:
    _print_routes("Per-example quantities", per, "vmap_over_delta", "vmap(grad) time / δ time", "vmap / δ")


def _print_curvature(curv: list[dict]) -> None:
    _print_routes("Curvature", curv, "autodiff_over_hand", "autodiff time / by-hand time", "autodiff / by hand")


def _print_second_order(r: dict) -> None:
    print(f"\nSecond-order steps, {r['model']} B={r['batch']}: ms per step (median), XLA memory (temporaries "
          "and outputs)")
    print(table(["step", "ms", "memory"], [[n, f"{ms:.2f}", f"{(r['memory_bytes'][n] or 0) / 2**20:,.1f} MiB"]
                                           for n, ms in r["ms"].items()]))
    print("\nSecond-order steps over an Adam step (median of per-round ratios [range])")
    print(table(["quantity", "/ Adam step"], [[n, _ratio(v)] for n, v in r["over_adam"].items()]))


def _print_laplace(r: dict) -> None:
    print(f"\nLaplace (kron posterior), {r['model']}: fit on {r['rows']:,} rows in chunks of {r['chunk']:,}, "
          f"predictive on {r['predictive_rows']:,} images (the routes that form J on {r['jacobian_rows']}); ms per "
          "call and per image (medians), time over the part's yardstick (paired medians [range])")
    fits, evidence = r["fit_over_epoch"], r["evidence_over_fit"]
    notes = {k: f"as called / jitted chunks {_ratio(v)}" for k, v in r["fit_called_over_jitted"].items()}
    notes |= {KFLR_AUTODIFF: f"autodiff / by hand {_ratio(r['fit_autodiff_over_hand'])}",
              PRIOR_FIT: f"{r['prior_fit']['iterations']} iterations, converged: {r['prior_fit']['converged']}"}
    notes.update({k: f"/ glm_predictive {_ratio(v)}" for k, v in r["predictive_over_glm"].items()})
    if r["torch_exact_over_kflr"] is not None:
        rounds = r["torch_exact_rounds"]
        notes[TORCH_FIT] = (f"/ fit_laplace KFLR {_ratio(r['torch_exact_over_kflr'])} "
                            f"({rounds} round{'s' * (rounds > 1)})")
    rows = [["fit", r["epoch"], r["ms"][r["epoch"]], None, "(yardstick)", None]]
    rows += [["fit", k, r["ms"][k], None, _ratio(v), notes.get(k)] for k, v in fits.items()]
    if TORCH_FIT in r["ms"]:
        rows.append(["fit", TORCH_FIT, r["ms"][TORCH_FIT], None, None, notes[TORCH_FIT]])
    rows += [["evidence", k, r["ms"][k], None, f"{_ratio(v)} of the KFLR fit", notes.get(k)]
             for k, v in evidence.items()]
    rows.append(["predictive", r["gradient"], r["ms"][r["gradient"]], r["ms_per_image"][r["gradient"]], "(yardstick)",
                 None])
    rows += [["predictive", k, r["ms"][k], r["ms_per_image"][k], _ratio(v), notes.get(k)]
             for k, v in r["predictive_over_gradient"].items()]
    print(table(["part", "contender", "ms per call", "ms per image", "/ yardstick", "note"], rows))
    print("agreement (max |difference| / max |value|): "
          + "; ".join(f"{k} {v:.2g}" for k, v in r["agreement"].items())
          + f"; laplace-torch: {r['laplace_torch'] or r['laplace_torch_skipped']}")


def _print_influence(r: dict) -> None:
    ips = r["inner_products"]
    print(f"\nGradient inner products, all pairs of {ips[0]['test']:,} test × {ips[0]['train']:,} training rows in "
          f"blocks of {ips[0]['block']:,}: seconds for all pairs (the materialized route timed on its subset and "
          "scaled per pair), ns per pair (medians), materialized / δ (paired median per pair [range])")
    rows = []
    for c in ips:
        for name, s in c["seconds_all_pairs"].items():
            ratio = c["materialized_over_delta"] if name != DELTA_IP else None
            rows.append([f"{c['model']} (P = {c['params']:,})", name, f"{s:,.2f}", f"{c['ns_per_pair'][name]:.3g}",
                         None if ratio is None else _ratio(ratio), c["cpu_per_wall"][name]])
    print(table(["model", "route", "s, all pairs", "ns per pair", "materialized / δ", "cpu/wall"], rows))
    print("XLA memory of the compiled block programs (arguments + temporaries; outputs apart), MiB, against N × P "
          "floats")
    rows = [[c["model"], route, program, f"{(m['argument'] + m['temp']) / 2**20:,.1f}", f"{m['output'] / 2**20:,.1f}",
             f"{c['n_times_p_bytes'] / 2**20:,.0f}"]
            for c in ips for route, programs in c["memory_bytes"].items() for program, m in programs.items()
            if m["temp"] is not None]
    print(table(["model", "route", "program", "args + temp", "output", "N × P floats"], rows))
    print("agreement, δ route against materialized (max |difference| / max |value|): "
          + "; ".join(f"{c['model']} {c['agreement']:.2g}" for c in ips))
    print(f"\nEK-FAC (λ = {r['ekfac'][0]['damping']}) on {r['ekfac'][0]['rows']:,} training rows: ms per call "
          "(median), time / gradient epoch (paired medians [range])")
    rows = [[e["model"], k, e["ms"][k] if k in e["ms"] else None, _ratio(v) if k != e["epoch"] else None,
             e["cpu_per_wall"].get(k)]
            for e in r["ekfac"] for k, v in {e["epoch"]: None, **e["over_epoch"]}.items()]
    print(table(["model", "contender", "ms", "/ epoch", "cpu/wall"], rows))
    print("self-influence with the subset's preconditioner against the full exact fit's: "
          + "; ".join(f"{e['model']} ({e['subset_rows']:,} rows) Spearman {e['subset_against_full']['spearman']:.3f}, "
                      f"top-decile overlap {e['subset_against_full']['top_decile_overlap']:.2f}" for e in r["ekfac"]))
    k = r["kronfluence"]
    if k["kronfluence"] is None:
        print(f"kronfluence: {k['skipped']}")
        return
    print(f"\nkronfluence {k['kronfluence']} beside fnn, {k['model']}: EK-FAC fit on {k['train']:,} rows, pairwise "
          f"scores of {k['test']} test × {k['train']:,} training rows, self-scores; ms per call (median of "
          f"{k['rounds']} rounds), kronfluence / fnn (paired)")
    print(table(["step", "fnn ms", "kronfluence ms", "kronfluence / fnn"],
                [[f.split(": ", 1)[1], k["ms"][f], k["ms"][g], _ratio(k["kronfluence_over_fnn"][g])]
                 for f, g in zip(FNN_EKFAC, KRON_EKFAC)]))
    print("rank correlation of the scores, fnn against kronfluence: "
          + ", ".join(f"{n} {v:.3f}" for n, v in k["rank_correlation"].items()))


def main(argv=None) -> dict:
    """Run the benchmark (``argv``: the command line); returns the results written to the JSON."""
    def extra(p):
        p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 5, quick 1)")
        p.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (default 1)")
        p.add_argument("--no-torch", action="store_true", help="leave the PyTorch contenders out")
        p.add_argument("--sections", default=",".join(SECTIONS),
                       help=f"comma-separated parts to run, of {','.join(SECTIONS)} (default: all)")

    args = common.parse_args("bench", __doc__.splitlines()[0], argv, extra)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0; got {args.repeats} and {args.warmup}.")
    args.torch_seconds = 0.2 if args.quick else TORCH_SECONDS
    args.step_flops = STEP_FLOPS / 20 if args.quick else STEP_FLOPS
    args.per_example_seconds = 0.02 if args.quick else 0.3
    torch, args.torch_skipped = import_torch(args.no_torch)
    info = machine()
    x_np, y_np = synthetic(QUICK_SAMPLES if args.quick else SAMPLES)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)

    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        raise ValueError(f"--sections takes some of {','.join(SECTIONS)}; got {args.sections!r}.")
    cases = QUICK_CASES if args.quick else CPU_CASES
    steps = [bench_steps(case, x, y, args) for case in cases] if "steps" in sections else []
    matmul_n = CPU_MATMUL if info["platform"] == "cpu" else GPU_MATMUL
    epochs = [bench_epochs(case, x_np, y_np, args, torch, matmul_n) for case in cases] if "epochs" in sections else []
    gpu = gpu_rows(args, info["platform"], x_np, y_np) if "gpu" in sections else []
    per = [bench_per_example(case, x, y, args) for case in cases] if "per_example" in sections else []
    private = bench_private(x, y, args, args.quick) if "private" in sections else None
    curvature = [bench_curvature(case, x, y, args) for case in cases] if "curvature" in sections else []
    second = bench_second_order(QUICK_CASES[0] if args.quick else SECOND_ORDER_CASE, x, y, args) \
        if "second_order" in sections else None
    laplace = bench_laplace(x, y, args, torch) if "laplace" in sections else None
    influence = bench_influence(x, y, args, torch) if "influence" in sections else None
    info["load_average_end"] = _load()
    results = {"machine": info, "samples": int(x.shape[0]), "repeats": args.repeats, "warmup": args.warmup,
               "torch_version": torch.__version__ if torch else None, "torch_skipped": args.torch_skipped,
               "steps": steps, "epochs": epochs, "gpu": gpu, "per_example": per, "private": private,
               "curvature": curvature, "second_order": second, "laplace": laplace,
               "influence": influence,
               "targets": targets(steps, epochs, info["platform"], per, private, curvature, laplace, influence)}
    print_tables(results)
    path = common.save_json(args, results)
    print(f"\n[bench] wrote {path} in {time.perf_counter() - args.started:.1f}s")
    return results


def _pin_lapack_threads() -> None:
    """Run again with ``OPENBLAS_NUM_THREADS=1`` unless it is set. XLA:CPU calls LAPACK (OpenBLAS) for its
    eigendecompositions and factorizations; after each call OpenBLAS's threads spin for about 0.1 s before
    they sleep, and on a few cores they take the cores from XLA's own thread pool: the next program runs
    slower (a gradient epoch right after a 785 × 785 ``eigh``: 215–250 ms against 191 ms). With one LAPACK
    thread nothing spins; the ``eigh`` itself is slower (87 ms against 63 ms). OpenBLAS reads the variable
    when it loads, so it is set before the process starts; ``OPENBLAS_NUM_THREADS`` given by the caller
    is kept."""
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OPENBLAS_NUM_THREADS": "1"})


if __name__ == "__main__":
    _pin_lapack_threads()
    main()
