"""Mutation testing of fnn's core: would the test suite notice a one-line bug?

Each entry of :data:`MUTANTS` is a deliberate one-line bug in ``fnn/``: an exact piece of a source
file and what to put in its place. For each mutant, on its own, the script copies ``fnn/``,
``tests/`` and ``pyproject.toml`` into a fresh temporary directory, makes the edit there (the
checkout is never touched), and runs the tests that should catch it with
``python -m pytest -x -q``. A mutant is **caught** when those tests fail (or time out), and
**survives** when they pass. The score is the fraction caught.

A survivor is either a missing test (add one, and say in its comment which mutant it catches) or a
mutant that does not change behaviour (then it does not belong in the list). The list covers the
δ-recursion (BP1–BP4 and the φ' they call), every loss's derivative, every optimizer's update, the
shuffle and the epoch, the checkpoint round trip, batch norm's backward, the per-example quantities,
DP-SGD (its accountant, its step and its Gaussian noise), the curvature (the losses' output Hessians,
φ'' in the R-backward, the Hessian and Gauss-Newton products, the exact and Monte-Carlo GGN diagonals,
the Kronecker factors, the sharpness) and the second-order optimizers (K-FAC and Hessian-free); a new
quantity adds its mutants here as it lands.

How it runs:

- The original text of every mutant must occur exactly once in its file, checked before anything
  runs, so that the list cannot rot silently when the code changes: the script stops and names
  the mutant to update.
- Before the mutants, the unmutated copy runs every selected test once (the baseline): a test
  that fails without a bug would count every mutant as caught. It takes about half the run (its
  property tests are CI's too); ``--no-baseline`` skips it.
- The copy is what the tests import: ``PYTHONPATH`` and the working directory point at it, and a
  small pytest plugin written into the copy stops the run (exit status 4, reported as an error)
  if ``fnn`` comes from anywhere else, e.g. the editable install of the checkout.
- Hypothesis runs the repository's ``default`` profile (the same derandomized examples as CI),
  with one change made by that plugin: failing examples are not shrunk, since only pass or fail
  matters here and shrinking a failing property test can take minutes.
- Each mutant's tests are a few pytest node ids (fast, deterministic tests first, a property
  test last where one is needed), so that a caught mutant takes seconds.

Usage, from the repository root (run by hand, like ``experiments/bench.py``, never in CI's hot path)::

    python experiments/mutation.py                  # every mutant: about 35 minutes on 2 cores
    python experiments/mutation.py --list           # the mutants, checked against the sources
    python experiments/mutation.py --only sce-fused-without-target-sum --only epoch-key-not-advanced
    python experiments/mutation.py --jobs 4         # mutants in parallel, on a larger machine
    python experiments/mutation.py --marker "not slow"   # what the fast tier alone catches

Options: ``--timeout S`` per pytest run (default 900; a run that times out counts as caught),
``--no-baseline``, ``--fail-under PCT`` (exit status 1 when the score is lower), ``--marker EXPR``
(passes ``-m EXPR`` to every pytest run, the baseline's and each mutant's, so that only the selected
tests of each mutant run). With ``--marker "not slow"`` the score is the share of mutants that the
fast tier (``pytest -m "not slow"``) catches: a mutant whose tests are all deselected (pytest's exit
status 5, no tests ran) counts as survived and is reported as "no fast test". Prints one line per
mutant as it finishes, then a table, the survivors with what they mean, and the score.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("fnn", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug: in ``file``, the text ``original`` (exactly once) becomes ``mutated``."""

    name: str
    area: str
    file: str  # relative to the repository root
    original: str
    mutated: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root, in the order to run
    bug: str  # what the mutant does, in words


def _ids(*node_ids: str) -> tuple[str, ...]:
    return tuple(f"tests/{n}" for n in node_ids)


# Test selections used by several mutants.
HF_CG = "test_second_order.py::test_hessian_free_cg_as_martens_runs_it"
KFAC_ADAPTIVE = "test_second_order.py::test_kfac_adaptive_against_dense_steps"
# The property test under jit: 40 examples of any width, where the eager one (470 examples) takes minutes.
BACKPROP_PROPERTY = "test_backprop.py::test_backprop_equals_autodiff_any_width_under_jit"
NOT_CANONICAL = "test_backprop.py::test_an_output_that_is_not_the_canonical_one_of_its_loss"
BY_HAND = _ids("test_backprop.py::test_closed_form_2_2_1", "test_backprop.py::test_batch_gradient_is_the_mean_of_"
               "per_sample_gradients", "test_backprop.py::test_l2_adds_beta_w_to_weights_only")
TRAJECTORY = "test_optim.py::test_trajectory_matches_numpy_reference"
PER_EXAMPLE = _ids("test_per_example.py::test_a_linear_layer_by_hand",
                   "test_per_example.py::test_every_quantity_on_one_fixed_batch",
                   "test_per_example.py::test_batch_norm_in_eval_mode_and_refused_in_train_mode",
                   "test_per_example.py::test_every_quantity_equals_vmap_of_jax_grad")
BATCH_NORM = _ids("test_batchnorm.py::test_batch_of_two", "test_batchnorm.py::test_gamma_away_from_one",
                  "test_batchnorm.py::test_dropping_the_mean_and_variance_paths_is_caught",
                  "test_batchnorm.py::test_eval_mode_backward_equals_autodiff")

# Curvature and the second-order optimizers: fast, deterministic tests on fixed networks first.
CURVATURE_PRODUCTS = "test_curvature.py::test_products_and_diagonal_equal_autodiff"
DEEP = "test_curvature.py::test_products_of_a_deep_network_through_every_curved_activation"
FACTORS = "test_curvature.py::test_the_exact_columns_factor_the_output_hessian"

DELTA, LOSS, OPTIM, EPOCH, CHECKPOINT, BN, PER_EX, PRIVACY = (
    "δ-recursion", "losses", "optimizers", "shuffle and epoch", "checkpoint", "batch norm", "per-example", "privacy")
CURV, SECOND, LAPLACE = "curvature", "second-order", "laplace"
KRON_DENSE = "test_laplace.py::test_kron_and_diag_against_dense_forms_of_the_same_approximation"

MUTANTS: tuple[Mutant, ...] = (
    # -- the δ-recursion: fnn/backprop.py and the φ' it calls -----------------------------------
    Mutant("bp1-without-output-derivative", DELTA, "fnn/backprop.py",
           "delta = phi[-1].backward(zs[-1], acts[-1], loss.grad(acts[-1], target))  # BP1",
           "delta = loss.grad(acts[-1], target)  # BP1",
           _ids(NOT_CANONICAL, BACKPROP_PROPERTY), "BP1 forgets φ'(z^L) for a non-canonical output"),
    Mutant("bp1-fused-for-any-output", DELTA, "fnn/backprop.py",
           "if loss.canonical_output == net.output:", "if loss.canonical_output is not None:",
           _ids(NOT_CANONICAL, BACKPROP_PROPERTY),
           "the fused δ^L = φ(z) − y also for an output that is not the canonical one"),
    Mutant("bp1-invalid-labels-kept", DELTA, "fnn/backprop.py",
           "delta = mark_invalid(delta, valid)", "delta = delta",
           _ids("test_backprop.py::test_labels_out_of_range_under_jit_poison_loss_and_gradients"),
           "a traced out-of-range label silently drops out of the gradient"),
    Mutant("bp2-without-hidden-derivative", DELTA, "fnn/backprop.py",
           'delta = phi[l - 1].backward(zs[l - 1], acts[l], net.matmul(delta, params[l]["W"]))',
           'delta = net.matmul(delta, params[l]["W"])',
           BY_HAND, "BP2 forgets ⊙ φ'(z^l)"),
    Mutant("bp2-next-layer-activation", DELTA, "fnn/backprop.py",
           "delta = phi[l - 1].backward(", "delta = phi[l].backward(",
           BY_HAND, "BP2 uses the φ' of the layer above"),
    Mutant("bp3-sum-not-mean", DELTA, "fnn/backprop.py",
           'grads[l] = {"b": jnp.sum(delta, axis=0) / n}', 'grads[l] = {"b": jnp.sum(delta, axis=0)}',
           BY_HAND, "BP3 without the batch mean 1/N"),
    Mutant("bp4-sum-not-mean", DELTA, "fnn/backprop.py",
           'net.matmul(delta.T, acts[l]) / n', 'net.matmul(delta.T, acts[l])',
           BY_HAND, "BP4 without the batch mean 1/N"),
    Mutant("bp4-l2-twice", DELTA, "fnn/backprop.py",
           'grads[l]["W"] + l2 * params[l]["W"]', 'grads[l]["W"] + 2 * l2 * params[l]["W"]',
           BY_HAND, "∂/∂W of ½β‖W‖² taken as 2βW"),
    Mutant("cost-without-l2", DELTA, "fnn/backprop.py",
           "cost = jnp.mean(costs) + l2_penalty(params, l2)", "cost = jnp.mean(costs)",
           BY_HAND, "the cost leaves out ½β Σ‖W‖²"),
    Mutant("relu-derivative-at-zero", DELTA, "fnn/activations.py",
           "_nan_through(z, (z > 0).astype(z.dtype))", "_nan_through(z, (z >= 0).astype(z.dtype))",
           _ids("test_backprop.py::test_pre_activations_of_exactly_zero"),
           "relu'(0) = 1 instead of jax's sub-gradient 0"),
    Mutant("tanh-derivative", DELTA, "fnn/activations.py",
           "return 1 - t * t", "return 1 - t",
           _ids("test_activations.py::test_dphi_equals_autodiff"), "tanh' = 1 − tanh instead of 1 − tanh²"),
    Mutant("softmax-jacobian-diagonal", DELTA, "fnn/activations.py",
           "return a * (g - jnp.sum(g * a, axis=-1, keepdims=True))", "return a * (1 - a) * g",
           _ids("test_activations.py::test_backward_is_the_vector_jacobian_product"),
           "the softmax Jacobian taken as diagonal, a ⊙ (1 − a)"),
    # -- every loss's derivative (and the values they pair with): fnn/losses.py -------------------
    Mutant("mse-derivative-without-2", LOSS, "fnn/losses.py",
           "_over_k(lambda a, y: 2 * (a - y)),", "_over_k(lambda a, y: a - y),",
           _ids("test_losses.py::test_grad_is_the_derivative_of_the_per_sample_cost[mse]"),
           "∂/∂a of (1/K)Σ(a − y)² without the 2"),
    Mutant("half-mse-derivative-sign", LOSS, "fnn/losses.py",
           "    lambda a, y: a - y,", "    lambda a, y: y - a,",
           _ids("test_losses.py::test_grad_is_the_derivative_of_the_per_sample_cost[half_mse]"),
           "∂/∂a of ½‖a − y‖² with the wrong sign"),
    Mutant("mae-derivative-not-averaged", LOSS, "fnn/losses.py",
           "_over_k(lambda a, y: jnp.sign(a - y)),", "lambda a, y: jnp.sign(a - y),",
           _ids("test_losses.py::test_grad_is_the_derivative_of_the_per_sample_cost[mae]"),
           "MAE's derivative not divided by K"),
    Mutant("bce-derivative", LOSS, "fnn/losses.py",
           "(_clip(p) - y) / (_clip(p) * (1 - _clip(p)))", "(_clip(p) - y) / _clip(p)",
           _ids("test_losses.py::test_grad_is_the_derivative_of_the_per_sample_cost[binary_cross_entropy]"),
           "∂/∂p of the binary cross-entropy as (p − y)/p"),
    Mutant("bce-fused-not-averaged", LOSS, "fnn/losses.py",
           'canonical_output="sigmoid",\n    fused_delta=_over_k(lambda z, y: lax.logistic(z) - y),',
           'canonical_output="sigmoid",\n    fused_delta=lambda z, y: lax.logistic(z) - y,',
           _ids("test_losses.py::test_fused_delta_is_the_derivative_through_the_canonical_output"
                "[binary_cross_entropy]"),
           "the fused δ^L of sigmoid + binary cross-entropy not divided by K"),
    Mutant("bce-logits-derivative-sign", LOSS, "fnn/losses.py",
           "    _over_k(lambda z, y: lax.logistic(z) - y),", "    _over_k(lambda z, y: y - lax.logistic(z)),",
           _ids("test_losses.py::test_grad_is_the_derivative_of_the_per_sample_cost"
                "[binary_cross_entropy_with_logits]"),
           "∂/∂z of the cross-entropy on logits with the wrong sign"),
    Mutant("bce-logits-fused-not-averaged", LOSS, "fnn/losses.py",
           'canonical_output="identity",\n    fused_delta=_over_k(lambda z, y: lax.logistic(z) - y),',
           'canonical_output="identity",\n    fused_delta=lambda z, y: lax.logistic(z) - y,',
           _ids("test_losses.py::test_fused_delta_is_the_derivative_through_the_canonical_output"
                "[binary_cross_entropy_with_logits]"),
           "the fused δ^L of the cross-entropy on logits not divided by K"),
    Mutant("cce-derivative-unclipped", LOSS, "fnn/losses.py",
           "lambda p, y: -y * _unclipped(p) / _clip(p),", "lambda p, y: -y * _unclipped(p) / p,",
           _ids("test_backprop.py::test_probabilities_of_exactly_zero_and_one"),
           "−y/p without the clip: infinite at a probability of exactly 0"),
    Mutant("cce-derivative-ignores-the-clip", LOSS, "fnn/losses.py",
           "lambda p, y: -y * _unclipped(p) / _clip(p),", "lambda p, y: -y / _clip(p),",
           _ids("test_backprop.py::test_the_derivative_of_a_clipped_probability_is_that_of_the_clipped_cost"),
           "−y/p where the cost's clip holds p at ε (the cost is flat there)"),
    Mutant("bce-derivative-ignores-the-clip", LOSS, "fnn/losses.py",
           "return _unclipped(p) * (_clip(p) - y)", "return (_clip(p) - y)",
           _ids("test_backprop.py::test_the_derivative_of_a_clipped_probability_is_that_of_the_clipped_cost"),
           "(p − y)/(p(1 − p)) where the cost's clip holds p at ε or 1 − ε"),
    Mutant("relu-maps-nan-to-zero", DELTA, "fnn/activations.py",
           "return jnp.where(z <= 0, 0, z).astype(z.dtype)", "return jnp.where(z > 0, z, 0).astype(z.dtype)",
           _ids("test_activations.py::test_nan_in_is_nan_out[relu]"),
           "relu(NaN) = 0: a NaN sample gives finite logits"),
    Mutant("sce-fused-without-target-sum", LOSS, "fnn/losses.py",
           "return jnp.sum(y, axis=-1, keepdims=True) * softmax(z) - y", "return softmax(z) - y",
           _ids("test_losses.py::test_soft_targets_in_softmax_cross_entropy",
                "test_losses.py::test_fused_delta_is_the_derivative_through_the_canonical_output", BACKPROP_PROPERTY),
           "δ^L = softmax(z) − y, wrong for soft targets whose rows do not sum to 1 (issue 21, 1)"),
    Mutant("sce-value-without-target-sum", LOSS, "fnn/losses.py",
           "lambda z, y: jnp.sum(y, axis=-1) * _logsumexp(z) - jnp.sum(y * z, axis=-1),",
           "lambda z, y: _logsumexp(z) - jnp.sum(y * z, axis=-1),",
           _ids("test_losses.py::test_soft_targets_in_softmax_cross_entropy",
                "test_losses.py::test_value_matches_textbook_formula[softmax_cross_entropy]"),
           "the cost logsumexp(z) − y·z, wrong for soft targets"),
    Mutant("logsumexp-unshifted", LOSS, "fnn/losses.py",
           "return m[:, 0] + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1))",
           "return jnp.log(jnp.sum(jnp.exp(z), axis=-1))",
           _ids("test_losses.py::test_logits_of_plus_minus_1e4"), "log-sum-exp without the max shift: overflow"),
    Mutant("probabilities-unclipped", LOSS, "fnn/losses.py",
           "return jnp.clip(p, eps, 1 - eps)", "return p",
           _ids("test_backprop.py::test_probabilities_of_exactly_zero_and_one"),
           "log(0) at probabilities of exactly 0 and 1"),
    Mutant("l2-penalty-without-half", LOSS, "fnn/losses.py",
           "return 0.5 * beta * sum(", "return beta * sum(",
           _ids("test_losses.py::test_l2_penalty_counts_weights_only"), "the L2 term β Σ‖W‖² instead of ½β Σ‖W‖²"),
    # -- every optimizer's update: fnn/optim.py -------------------------------------------------
    Mutant("sgd-ascent", OPTIM, "fnn/optim.py",
           "return -rate.astype(g.dtype) * g", "return rate.astype(g.dtype) * g",
           _ids(f"{TRAJECTORY}[sgd]"), "θ ← θ + αg"),
    Mutant("schedule-step-frozen", OPTIM, "fnn/optim.py",
           "ScaleByLearningRateState(_increment(state.count))", "ScaleByLearningRateState(state.count)",
           _ids(f"{TRAJECTORY}[sgd_inverse_sqrt]"), "the schedule's step counter never advances"),
    Mutant("momentum-as-average", OPTIM, "fnn/optim.py",
           "v = (rho * v.astype(wide) + g.astype(wide)).astype(v.dtype)",
           "v = (rho * v.astype(wide) + (1 - rho) * g.astype(wide)).astype(v.dtype)",
           _ids(f"{TRAJECTORY}[momentum]"), "momentum v ← ρv + (1 − ρ)g instead of ρv + g"),
    Mutant("nesterov-without-rho", OPTIM, "fnn/optim.py",
           "(g.astype(wide) + rho * v.astype(wide))", "(g.astype(wide) + v.astype(wide))",
           _ids(f"{TRAJECTORY}[nesterov]"), "Nesterov's look-ahead g + v instead of g + ρv"),
    Mutant("adagrad-without-root", OPTIM, "fnn/optim.py",
           "return g / (delta + jnp.sqrt(r)), r", "return g / (delta + r), r",
           _ids(f"{TRAJECTORY}[adagrad]"), "AdaGrad divides by r, not √r"),
    Mutant("rmsprop-decay-swapped", OPTIM, "fnn/optim.py",
           "            r = _ema(r, g * g, rho)", "            r = _ema(r, g * g, 1 - rho)",
           _ids(f"{TRAJECTORY}[rmsprop]"), "RMSProp's running mean with ρ and 1 − ρ swapped"),
    Mutant("rmsprop-centered-uncentered", OPTIM, "fnn/optim.py",
           "jnp.sqrt(jnp.maximum(r - m * m, 0))", "jnp.sqrt(jnp.maximum(r, 0))",
           _ids(f"{TRAJECTORY}[rmsprop_centered]"), "centered RMSProp forgets to subtract m²"),
    Mutant("adam-first-moment-uncorrected", OPTIM, "fnn/optim.py",
           "m.astype(wide) / (1 - b1**t)", "m.astype(wide)",
           _ids(f"{TRAJECTORY}[adam]"), "Adam without the bias correction of m"),
    Mutant("adam-second-moment-correction-frozen", OPTIM, "fnn/optim.py",
           "v.astype(wide) / (1 - b2**t)", "v.astype(wide) / (1 - b2)",
           _ids(f"{TRAJECTORY}[adam]"), "Adam's v̂ = v/(1 − β₂) at every step"),
    Mutant("adamw-decay-sign", OPTIM, "fnn/optim.py",
           "(g + lam * p).astype(g.dtype) if decayed else g", "(g - lam * p).astype(g.dtype) if decayed else g",
           _ids(f"{TRAJECTORY}[adamw]"), "weight decay that grows the weights"),
    Mutant("weight-decay-on-biases", OPTIM, "fnn/optim.py",
           'return bool(path) and getattr(path[-1], "key", None) == "W"', "return bool(path)",
           _ids(f"{TRAJECTORY}[add_decayed_weights_sgd]"), "the default mask decays the biases too"),
    Mutant("clip-inverted", OPTIM, "fnn/optim.py",
           "factor = jnp.where(norm > c, c / norm, 1.0)", "factor = jnp.where(norm > c, norm / c, 1.0)",
           _ids(f"{TRAJECTORY}[clip_by_global_norm_sgd]"), "clipping stretches long gradients"),
    Mutant("newton-undamped", OPTIM, "fnn/optim.py",
           "step = jnp.linalg.solve(H + lam * jnp.eye(theta.size, dtype=H.dtype), g)",
           "step = jnp.linalg.solve(H, g)",
           _ids(f"{TRAJECTORY}[newton_damped]"), "Newton's step ignores the damping λ"),
    Mutant("skipped-updates-not-counted", OPTIM, "fnn/optim.py",
           "skipped = jnp.where(finite, state.skipped, _increment(state.skipped))", "skipped = state.skipped",
           _ids("test_optim.py::test_skip_nonfinite_skips_and_counts"), "skip_nonfinite does not count"),
    Mutant("apply-updates-subtracts", OPTIM, "fnn/optim.py",
           "return (p + u).astype(jnp.result_type(p))", "return (p - u).astype(jnp.result_type(p))",
           _ids(f"{TRAJECTORY}[sgd]"), "θ ← θ − u: every update applied backwards"),
    # -- the shuffle and the epoch: fnn/train.py, fnn/metrics.py ----------------------------------
    Mutant("epoch-key-not-advanced", EPOCH, "fnn/epoch.py",
           "key, draw_key = jax.random.split(key)", "_, draw_key = jax.random.split(key)",
           _ids("test_train.py::test_fit_draws_a_new_order_every_epoch_and_returns_the_advanced_key"),
           "the epoch returns the key it got: the same order every epoch (issue 21, 2)"),
    Mutant("fit-drops-the-epoch-key", EPOCH, "fnn/train.py",
           "key = new_key if plan.epoch_key is None else key",
           "key = key",
           _ids("test_train.py::test_fit_draws_a_new_order_every_epoch_and_returns_the_advanced_key"),
           "fit passes the same key to every epoch"),
    Mutant("shuffle-without-permutation", EPOCH, "fnn/train.py",
           "order = jax.random.permutation(key, num_samples)", "order = jnp.arange(num_samples)",
           _ids("test_train.py::test_every_sample_once_per_epoch_and_orders_differ"), "no shuffle at all"),
    Mutant("last-batch-dropped", EPOCH, "fnn/train.py",
           'rest = order[full * batch_size:] if last_batch == "smaller" else order[:0]', "rest = order[:0]",
           _ids("test_train.py::test_last_smaller_batch_is_a_real_step"),
           "the N mod B leftover samples are never used"),
    Mutant("guard-updates-after-the-failure", EPOCH, "fnn/epoch.py",
           "ok, failure = bad < 0, (bad, site, bad_batch)", "ok, failure = jnp.all(flags), (bad, site, bad_batch)",
           _ids("test_epoch.py::test_the_guard_stops_every_update_from_the_first_failing_step_on"),
           "the guarded epoch goes on updating after the first failing step"),
    Mutant("skipped-step-keeps-new-statistics", EPOCH, "fnn/epoch.py",
           "new_state = _select(all_finite((g.grads, new_state)), new_state, state)",
           "new_state = new_state",
           _ids("test_train.py::test_a_skipped_step_leaves_the_batch_norm_statistics_alone"),
           "a step skip_nonfinite skips still writes its batch-norm statistics"),
    Mutant("observer-sees-the-updated-params", EPOCH, "fnn/epoch.py",
           "view = Step(params, opt_state, state, batch, g, (new_params, new_opt_state, new_state))",
           "view = Step(new_params, opt_state, state, batch, g, (new_params, new_opt_state, new_state))",
           _ids("test_epoch.py::test_an_epoch_built_from_a_custom_gradient_and_an_observer_equals_the_loop_it_stands_for"),
           "observers see the params after the step instead of before it"),
    Mutant("epoch-loss-unweighted", EPOCH, "fnn/metrics.py",
           '"train_loss": _weighted_mean(stats.cost[good][kept], sizes)',
           '"train_loss": _weighted_mean(stats.cost[good][kept], np.ones_like(sizes))',
           _ids("test_train.py::test_epoch_loss_is_the_batch_size_weighted_mean_of_the_batch_costs"),
           "train_loss weights the smaller last batch like a full one (issue 21, 3)"),
    Mutant("last-batch-size-recorded-as-full", EPOCH, "fnn/epoch.py",
           "EpochStats(costs, sizes.astype(jnp.int32),",
           "EpochStats(costs, jnp.full_like(sizes, batches.width).astype(jnp.int32),",
           _ids("test_train.py::test_epoch_loss_is_the_batch_size_weighted_mean_of_the_batch_costs"),
           "the smaller last batch is recorded (and weighted) as a full one"),
    # -- the checkpoint round trip: fnn/checkpoint.py -----------------------------------------------
    Mutant("checkpoint-leaves-reversed", CHECKPOINT, "fnn/checkpoint.py",
           "return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out)",
           "return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out[::-1])",
           _ids("test_checkpoint.py::test_round_trip_is_exact"), "leaves restored in the wrong order"),
    Mutant("checkpoint-dtype-lost", CHECKPOINT, "fnn/checkpoint.py",
           "out.append(jax.numpy.asarray(got))", "out.append(jax.numpy.asarray(got, jax.numpy.float32))",
           _ids("test_checkpoint.py::test_round_trip_is_exact"), "every leaf comes back as float32"),
    Mutant("checkpoint-key-not-restored", CHECKPOINT, "fnn/checkpoint.py",
           'key=jax.numpy.asarray(arrays["key"]),', "key=jax.random.PRNGKey(0),",
           _ids("test_checkpoint.py::test_round_trip_is_exact"), "the PRNG key is not restored"),
    # The flipped byte of test_flipped_byte_is_refused is refused by the zip's own CRC-32 before the
    # SHA-256 digest is read; the second test changes an array inside a consistent archive.
    Mutant("checkpoint-checksum-partial", CHECKPOINT, "fnn/checkpoint.py",
           "h.update(a.tobytes())", "h.update(a.tobytes()[:8])",
           _ids("test_checkpoint.py::test_flipped_byte_is_refused",
                "test_checkpoint.py::test_an_array_changed_inside_a_consistent_archive_is_refused"),
           "the checksum reads 8 bytes of each array"),
    # -- batch norm: fnn/batchnorm.py -------------------------------------------------------------
    Mutant("bn-backward-without-mean-and-variance-paths", BN, "fnn/batchnorm.py",
           "G = G - grad_beta - cache.xhat * grad_gamma", "G = G - grad_beta",
           BATCH_NORM, "train-mode δ_h without the path through σ²"),
    Mutant("bn-backward-without-gamma", BN, "fnn/batchnorm.py",
           "return gamma * cache.inv_std * G, grad_gamma, grad_beta", "return cache.inv_std * G, grad_gamma, grad_beta",
           BATCH_NORM, "δ_h without the factor γ"),
    Mutant("bn-grad-gamma-summed", BN, "fnn/batchnorm.py",
           "grad_gamma = jnp.mean(G * cache.xhat, axis=0)", "grad_gamma = jnp.sum(G * cache.xhat, axis=0)",
           BATCH_NORM, "∂C/∂γ without the batch mean 1/N"),
    Mutant("bn-running-variance-biased", BN, "fnn/batchnorm.py",
           "var * (n / (n - 1))", "var",
           _ids("test_batchnorm.py::test_train_mode_statistics_and_running_averages"),
           "the running variance averages the biased batch variance"),
    # -- per-example quantities: fnn/per_example.py ----------------------------------------------
    Mutant("pe-batch-grad-without-l2", PER_EX, "fnn/per_example.py",
           'g["W"] = g["W"] + l2 * layer["W"]', 'g["W"] = g["W"]',
           PER_EXAMPLE, "g_x^W without βW"),
    Mutant("pe-batch-l2-cross-term", PER_EX, "fnn/per_example.py",
           "2 * l2 * jnp.sum(d * h, axis=1)", "l2 * jnp.sum(d * h, axis=1)",
           PER_EXAMPLE, "‖g_x^W‖² with β δ·h instead of 2β δ·h"),
    Mutant("pe-batch-l2-beta-squared", PER_EX, "fnn/per_example.py",
           'l2 ** 2 * jnp.sum(layer["W"] ** 2)', 'l2 * jnp.sum(layer["W"] ** 2)',
           PER_EXAMPLE, "‖g_x^W‖² with β‖W‖² instead of β²‖W‖²"),
    Mutant("pe-sum-grad-squared-without-n", PER_EX, "fnn/per_example.py",
           "n * l2 ** 2 * W * W", "l2 ** 2 * W * W",
           PER_EXAMPLE, "Σ_x g_x⊙g_x counts β²W⊙W once, not N times"),
    Mutant("pe-variance-unbiased", PER_EX, "fnn/per_example.py",
           "jnp.maximum(s / n - m * m, 0)", "jnp.maximum(s / (n - 1) - m * m, 0)",
           PER_EXAMPLE, "the variance's second moment divided by N − 1"),
    Mutant("pe-weighted-sum-l2-unweighted", PER_EX, "fnn/per_example.py",
           's["W"] + jnp.sum(w) * l2 * layer["W"]', 's["W"] + l2 * layer["W"]',
           PER_EXAMPLE, "Σ_x w_x g_x adds βW once, not (Σ w_x) times"),
    Mutant("pe-clip-scales-up", PER_EX, "fnn/per_example.py",
           "scale = jnp.minimum(1, max_norm / jnp.where(norms > 0, norms, 1))",
           "scale = max_norm / jnp.where(norms > 0, norms, 1)",
           PER_EXAMPLE, "clipping also stretches short gradients to norm c"),
    Mutant("pe-trace-cov-biased", PER_EX, "fnn/per_example.py",
           "sample_cov = (sum_sq - n * mean_sq) / (n - 1)", "sample_cov = (sum_sq - n * mean_sq) / n",
           PER_EXAMPLE, "tr(Σ) divided by N, not N − 1"),
    Mutant("pe-grad-sq-biased", PER_EX, "fnn/per_example.py",
           "trace_cov, grad_sq = sample_cov, mean_sq - sample_cov / n", "trace_cov, grad_sq = sample_cov, mean_sq",
           PER_EXAMPLE, "‖G‖² estimated by ‖ḡ‖² without − tr(Σ)/N"),
    Mutant("pe-noise-scale-with-replacement", PER_EX, "fnn/per_example.py",
           "grad_sq = mean_sq - (1 - n / population) * sample_cov / n", "grad_sq = mean_sq - sample_cov / n",
           _ids("test_per_example.py::test_noise_scale_without_replacement_is_unbiased_over_every_batch"),
           "batches drawn without replacement from M examples estimated as independent draws: ‖G‖² low by s²/M"),
    Mutant("pe-noise-scale-population-trace", PER_EX, "fnn/per_example.py",
           "trace_cov = (1 - 1 / population) * sample_cov", "trace_cov = sample_cov",
           _ids("test_per_example.py::test_noise_scale_without_replacement_is_unbiased_over_every_batch"),
           "tr(Σ) of one example drawn from M as the finite-population S² (divisor M − 1)"),
    Mutant("pe-norms-padded-with-zero", PER_EX, "fnn/per_example.py",
           "constant_values=jnp.nan", "constant_values=0",
           _ids("test_per_example.py::test_training_records_the_statistics_of_each_step"),
           "the smaller batch's missing norms recorded as 0, which the epoch's quantiles then count"),
    # -- privacy: the accountant and the DP-SGD step, fnn/privacy.py --------------------------------
    Mutant("dp-rdp-integer-term", PRIVACY, "fnn/privacy.py",
           "(k * k - k) / (2 * sigma * sigma)", "(k * k) / (2 * sigma * sigma)",
           _ids("test_privacy.py::test_epsilon_equals_dp_accounting_on_integer_orders"),
           "A_α's exponent k²/(2σ²) instead of (k² − k)/(2σ²)"),
    Mutant("dp-rdp-fractional-signs", PRIVACY, "fnn/privacy.py",
           "sign = (-1) ** max(0, i - math.floor(alpha) - 1)", "sign = 1",
           _ids("test_privacy.py::test_fractional_orders_equal_the_definition_by_quadrature"),
           "the generalized binomial coefficients of a fractional order all taken positive"),
    Mutant("dp-gaussian-without-half", PRIVACY, "fnn/privacy.py",
           "a / (2 * noise_multiplier**2)", "a / noise_multiplier**2",
           _ids("test_privacy.py::test_full_batch_is_the_gaussian_mechanism"),
           "the Gaussian mechanism's RDP α/σ² instead of α/(2σ²)"),
    Mutant("dp-conversion-sign", PRIVACY, "fnn/privacy.py",
           "eps = rdp_values + np.log1p(-1 / a)", "eps = rdp_values + np.log1p(1 / a)",
           _ids("test_privacy.py::test_epsilon_equals_dp_accounting_on_integer_orders"),
           "the RDP-to-(ε, δ) conversion with log((α+1)/α) for log((α−1)/α)"),
    Mutant("dp-padded-rows-count", PRIVACY, "fnn/privacy.py",
           "weights = jnp.where(real, jnp.minimum(1, bound / jnp.where(norms > 0, norms, 1)), 0).astype(dtype)",
           "weights = jnp.minimum(1, bound / jnp.where(norms > 0, norms, 1)).astype(dtype)",
           _ids("test_privacy.py::test_without_noise_the_step_is_the_clipped_sum_of_vmap_grad[7]"),
           "the padding rows of the lot's padded size join the clipped sum"),
    Mutant("dp-divided-by-the-drawn-lot", PRIVACY, "fnn/privacy.py",
           "lambda t: t / (q * n), total)", "lambda t: t / jnp.maximum(count, 1), total)",
           _ids("test_privacy.py::test_without_noise_the_step_is_the_clipped_sum_of_vmap_grad[7]"),
           "g̃ divided by the drawn lot's size, not the expected qN the analysis assumes"),
    Mutant("dp-noise-without-clip", PRIVACY, "fnn/privacy.py",
           "gaussian(noise_key, params, noise_multiplier * clip)", "gaussian(noise_key, params, noise_multiplier)",
           _ids("test_privacy.py::test_the_noise_is_gaussian_with_standard_deviation_sigma_c_over_qn"),
           "noise of standard deviation σ instead of σc"),
    Mutant("dp-lot-beyond-sizes-dropped", PRIVACY, "fnn/privacy.py",
           "    if sizes[-1] < n:  # beyond the last size", "    if False:  # beyond the last size",
           _ids("test_privacy.py::test_lot_sum_covers_every_member_at_every_padded_size"),
           "a lot larger than every compiled size is cut to the largest (the rest of it dropped)"),
    Mutant("dp-lot-second-block-overwrites", PRIVACY, "fnn/privacy.py",
           "jnp.where(inside, positions, n), (count,))", "jnp.where(inside, positions, n), (0,))",
           _ids("test_privacy.py::test_poisson_lots_have_binomial_sizes_and_uniform_membership"),
           "a further block of Poisson gaps written over the first block's members"),
    Mutant("dp-sum-through-bfloat16", PRIVACY, "fnn/privacy.py",
           "weights, full_precision=True)", "weights, full_precision=False)",
           _ids("test_reliability.py::test_finding_03_a_clipped_gradient_never_exceeds_the_clip_norm[bfloat16]"),
           "the clipped sum through the network's bfloat16 matmul, whose rounded operands can exceed c"),
    Mutant("dp-epoch-noise-from-the-run-key", PRIVACY, "fnn/privacy.py",
           "return jax.random.fold_in(key, private.spent_after(epochs_done * private.steps).steps)",
           "return key",
           _ids("test_reliability.py::test_finding_02_a_resume_with_the_first_key_draws_fresh_lots_and_noise"),
           "every private epoch's lots and noise from the key fit was given (a resume replays them)"),
    Mutant("dp-resume-forgets-the-spent", PRIVACY, "fnn/privacy.py",
           "return new if self.spent is None else self.spent.plus(new)", "return new",
           _ids("test_privacy.py::test_a_resumed_plan_adds_this_calls_steps_to_what_was_spent_before",
                "test_privacy.py::test_private_training_records_epsilon_and_resumes_bit_for_bit"),
           "ε after a resume counts only the steps of this call"),
    Mutant("hf-non-finite-warm-start-kept", "second-order", "fnn/second_order.py",
           "last = jnp.where(jnp.all(jnp.isfinite(last)), last, 0)", "last = last",
           _ids("test_reliability.py::test_finding_15_one_non_finite_batch_does_not_stall_hessian_free"),
           "a NaN CG solution kept as every later step's warm start"),
    Mutant("sharpness-start-not-mixed", "curvature", "fnn/curvature.py",
           "_MIX = 0.1  #", "_MIX = 0.0  #",
           _ids("test_reliability.py::test_finding_13_sharpness_started_on_the_second_eigenvector_finds_the_first"),
           "power iteration started on a smaller eigenvalue's eigenvector stays there"),
    Mutant("noise-threefry-rotation", PRIVACY, "fnn/noise.py",
           "(17, 29, 16, 24))", "(17, 29, 16, 25))",
           _ids("test_noise.py::test_normal_is_bit_exact_on_a_large_draw_too",
                "test_noise.py::test_normal_is_jax_random_normal_bit_for_bit"),
           "one rotation constant of Threefry-2x32 off by one (the draws still look Gaussian)"),
    Mutant("noise-float64-words-swapped", PRIVACY, "fnn/noise.py",
           "bits = (h0.astype(uint) << uint(32)) | h1.astype(uint)",
           "bits = (h1.astype(uint) << uint(32)) | h0.astype(uint)",
           _ids("test_noise.py::test_normal_is_bit_exact_in_float64_too",
                "test_noise.py::test_normal_is_jax_random_normal_bit_for_bit"),
           "a float64 draw takes its 64 bits low word first"),
    Mutant("noise-counter-words-swapped", PRIVACY, "fnn/noise.py",
           "h0, h1 = _threefry2x32(words[0], words[1], jnp.zeros_like(index), index)",
           "h0, h1 = _threefry2x32(words[0], words[1], index, jnp.zeros_like(index))",
           _ids("test_noise.py::test_normal_is_bit_exact_on_a_large_draw_too"),
           "the flat position in the counter's first word instead of its second"),
    # -- curvature: the output Hessians of fnn/losses.py, φ'' of fnn/activations.py, fnn/curvature.py ----
    Mutant("bce-output-hessian-unsquared", CURV, "fnn/losses.py",
           "(1 - y) / ((1 - q) * (1 - q))", "(1 - y) / (1 - q)",
           _ids(f"{FACTORS}[binary_cross_entropy-softmax]", f"{CURVATURE_PRODUCTS}[binary_cross_entropy-softmax]"),
           "∂²/∂p² of the binary cross-entropy with (1 − y)/(1 − p) for (1 − y)/(1 − p)²"),
    Mutant("bernoulli-hessian-not-averaged", CURV, "fnn/losses.py",
           "return s * (1 - s) / z.shape[-1]", "return s * (1 - s)",
           _ids(f"{FACTORS}[binary_cross_entropy-sigmoid]", f"{CURVATURE_PRODUCTS}[binary_cross_entropy-sigmoid]"),
           "the sigmoid cross-entropy's H = diag(σ(1 − σ)) without the 1/K of the mean over outputs"),
    Mutant("cce-output-hessian-unsquared", CURV, "fnn/losses.py",
           "return _unclipped(p) * y / (q * q)", "return _unclipped(p) * y / q",
           _ids(f"{FACTORS}[categorical_cross_entropy-sigmoid]",
                f"{CURVATURE_PRODUCTS}[categorical_cross_entropy-sigmoid]"),
           "∂²/∂p² of −y log p as y/p instead of y/p²"),
    Mutant("softmax-hessian-outer-product-sign", CURV, "fnn/losses.py",
           "* p * (u - jnp.sum(p * u, axis=-1, keepdims=True))", "* p * (u + jnp.sum(p * u, axis=-1, keepdims=True))",
           _ids(f"{FACTORS}[softmax_cross_entropy-identity]", f"{DEEP}[softmax_cross_entropy-identity]"),
           "the softmax cross-entropy's H = diag p + p pᵀ instead of diag p − p pᵀ"),
    Mutant("softmax-hessian-factor-diagonal", CURV, "fnn/losses.py",
           "* jnp.eye(z.shape[-1], dtype=z.dtype) - p[:, :, None] * r[:, None, :])",
           "* jnp.eye(z.shape[-1], dtype=z.dtype))",
           _ids(f"{FACTORS}[softmax_cross_entropy-identity]", f"{DEEP}[softmax_cross_entropy-identity]"),
           "the factor S of diag p − p pᵀ taken as diag √p: the exact diagonal and KFLR lose the outer product"),
    Mutant("softmax-sample-without-target-sum", CURV, "fnn/losses.py",
           "return jnp.sqrt(jnp.sum(y, axis=-1, keepdims=True)) * (p - drawn)", "return p - drawn",
           _ids(f"{FACTORS}[softmax_cross_entropy-identity]"),
           "the sampled column p − e_ŷ without √(Σy): biased for soft targets whose rows do not sum to 1"),
    Mutant("softmax-second-derivative-sign", CURV, "fnn/activations.py",
           "keepdims=True)) - a * jnp.sum(g * da, axis=-1, keepdims=True)",
           "keepdims=True)) + a * jnp.sum(g * da, axis=-1, keepdims=True)",
           _ids("test_curvature.py::test_backward_r_is_the_derivative_of_backward[softmax]", f"{DEEP}[mse-softmax]"),
           "the softmax's second-order term in the R-backward: + a Σ g ȧ for − a Σ g ȧ"),
    Mutant("elementwise-second-derivative-without-direction", CURV, "fnn/activations.py",
           "lambda z, a, g, r: g * d2phi(z) * r)", "lambda z, a, g, r: g * d2phi(z))",
           _ids("test_curvature.py::test_backward_r_is_the_derivative_of_backward[tanh]",
                f"{DEEP}[softmax_cross_entropy-identity]"),
           "the element-wise R-term g ⊙ φ''(z) without ⊙ R{z}"),
    Mutant("hvp-without-the-output-second-derivative", CURV, "fnn/curvature.py",
           "if hessian and out.name not in PIECEWISE_LINEAR:", "if False:",
           _ids(f"{DEEP}[mse-softmax]", f"{CURVATURE_PRODUCTS}[mse-tanh]"),
           "H v of a non-canonical output without the term ∂_z[gᵀφ_L'] R{z^L}"),
    Mutant("hvp-without-the-hidden-second-derivatives", CURV, "fnn/curvature.py",
           "if hessian and act.name not in PIECEWISE_LINEAR:  # φ''", "if False:  # φ''",
           _ids(f"{DEEP}[softmax_cross_entropy-identity]"),
           "H v without (δ^{l+1} W^{l+1}) ⊙ φ''(z^l) ⊙ R{z^l}: the Gauss-Newton product of the hidden layers"),
    Mutant("hvp-without-the-direction-in-the-backward-pass", CURV, "fnn/curvature.py",
           'back = back + net.matmul(d_h, dv["W"])', "back = back",
           _ids(f"{DEEP}[softmax_cross_entropy-identity]"),
           "R{δ^l} without the term δ^{l+1} V^{l+1}"),
    Mutant("hvp-without-r-activations-in-bp4", CURV, "fnn/curvature.py",
           "rW = rW + net.matmul(d_h.T, ras[l - 1])", "rW = rW",
           _ids(f"{DEEP}[softmax_cross_entropy-identity]"),
           "R{∂C/∂W^l} without (δ^l)ᵀ R{a^{l−1}}"),
    Mutant("r-forward-not-propagated", CURV, "fnn/curvature.py",
           'rh = rh + net.matmul(ra, layer["W"].T)', "rh = rh",
           _ids(f"{DEEP}[softmax_cross_entropy-identity]"),
           "R{z^l} = V^l a^{l−1} + v_b without W^l R{a^{l−1}}: J v of the last layer's parameters only"),
    Mutant("r-backward-bias-summed", CURV, "fnn/curvature.py",
           'g["b"] = jnp.sum(rdelta, axis=0) / n', 'g["b"] = jnp.sum(rdelta, axis=0)',
           _ids(f"{DEEP}[softmax_cross_entropy-identity]"),
           "R{∂C/∂b} without the batch mean 1/N"),
    Mutant("r-backward-batch-norm-gamma-path", CURV, "fnn/curvature.py",
           "rgam = rgam + delta * bn.inv_std * rhs[l]", "rgam = rgam",
           _ids(f"{DEEP}[categorical_cross_entropy-sigmoid-batch_norm]"),
           "R{∂C/∂γ} without δ ⊙ R{x̂}, the direction's path through the normalized input"),
    Mutant("ggn-diag-columns-summed-before-squaring", CURV, "fnn/curvature.py",
           "sq = jnp.sum(d_h * d_h, axis=0)", "sq = jnp.sum(d_h, axis=0) ** 2",
           _ids(f"{DEEP}[softmax_cross_entropy-identity]"),
           "diag G from (Σ_c Δ_c)² instead of Σ_c Δ_c²: the columns' cross terms counted"),
    Mutant("ggn-diag-mc-not-averaged", CURV, "fnn/curvature.py",
           "_columns(net, params, trace, curv, top), l2, 1.0 / m)", "_columns(net, params, trace, curv, top), l2)",
           _ids("test_curvature.py::test_sampled_columns_of_a_single_output_are_exact"),
           "the Monte-Carlo diagonal sums its M columns' squares without dividing by M"),
    Mutant("kfac-factor-not-averaged", CURV, "fnn/curvature.py",
           'prng_key("key", key), m), 1.0 / m', 'prng_key("key", key), m), 1.0',
           _ids("test_curvature.py::test_sampled_columns_of_a_single_output_are_exact"),
           "KFAC's G^l sums its M sampled columns without dividing by M"),
    Mutant("kronecker-a-without-the-bias-input", CURV, "fnn/curvature.py",
           "abar = jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=1)",
           "abar = jnp.concatenate([a, jnp.zeros((n, 1), a.dtype)], axis=1)",
           _ids("test_curvature.py::test_kronecker_factors_of_wide_layers[mse-tanh]"),
           "A^l built from [a; 0]: the bias's rows of A are lost"),
    Mutant("sharpness-eigenvalue-unsigned", CURV, "fnn/curvature.py",
           "lam = jnp.vdot(v, w)", "lam = jnp.linalg.norm(w)",
           _ids("test_curvature.py::test_sharpness_when_the_most_negative_eigenvalue_dominates"),
           "power iteration's λ as ‖M v‖: a dominant negative eigenvalue looks positive, λ_max is never sought"),
    Mutant("sharpness-matrix-swapped", CURV, "fnn/curvature.py",
           'out = _product(net, params, unravel(u), loss, curv, trace, target, valid, l2, hessian=matrix == "hessian")',
           'out = _product(net, params, unravel(u), loss, curv, trace, target, valid, l2, hessian=matrix == "ggn")',
           _ids("test_curvature.py::test_sharpness_against_eigvalsh[0]"),
           "sharpness(matrix='hessian') iterates on G, and matrix='ggn' on H"),
    # -- the second-order optimizers: fnn/second_order.py ------------------------------------------
    Mutant("kfac-model-without-damping", SECOND, "fnn/second_order.py",
           "curv = jnp.vdot(flat_d, flat_gd) + gamma * jnp.vdot(flat_d, flat_d)", "curv = jnp.vdot(flat_d, flat_gd)",
           _ids("test_second_order.py::test_kfac_rescaled_step_minimizes_the_damped_quadratic_model"),
           "K-FAC's quadratic model for the step length leaves out γ‖Δ‖²"),
    Mutant("kfac-step-length-not-capped", SECOND, "fnn/second_order.py",
           "rate = jnp.minimum(rate, jnp.vdot(", "rate = jnp.maximum(rate, jnp.vdot(",
           _ids("test_second_order.py::test_kfac_rescaled_step_minimizes_the_damped_quadratic_model"),
           "the model's step length α* is a floor for the learning rate instead of being capped by it"),
    Mutant("kfac-sampling-key-not-advanced", SECOND, "fnn/second_order.py",
           "return updates, KfacState(_next(state.count), A, G, A_inv, G_inv, key)",
           "return updates, KfacState(_next(state.count), A, G, A_inv, G_inv, state.key)",
           _ids("test_second_order.py::test_kfac_draws_new_columns_at_every_step"),
           "K-FAC keeps its key: every step samples the same columns' noise"),
    Mutant("kfac-g-running-average-swapped", SECOND, "fnn/second_order.py",
           "rho * g + (1 - rho) * f.G", "(1 - rho) * g + rho * f.G",
           _ids("test_second_order.py::test_kfac_running_averages_and_refresh_period"),
           "G ← (1 − ρ)G + ρG_batch: the running factor forgets at the rate it should keep"),
    Mutant("kfac-first-step-averaged-with-the-identity", SECOND, "fnn/second_order.py",
           "first = state.count == 0", "first = state.count < 0",
           _ids("test_second_order.py::test_kfac_running_averages_and_refresh_period"),
           "the first step's factors averaged with init's identity matrices"),
    Mutant("kflr-sampled", SECOND, "fnn/second_order.py",
           "key=None if exact else sub)", "key=sub)",
           _ids("test_second_order.py::test_kfac_update_is_the_kronecker_solve[0.3-softmax_cross_entropy-identity]"),
           "exact=True (KFLR) samples the columns as KFAC does"),
    Mutant("kfac-pi-inverted", SECOND, "fnn/second_order.py",
           "a + pi * root * jnp.eye(a.shape[0], dtype=a.dtype)", "a + root / pi * jnp.eye(a.shape[0], dtype=a.dtype)",
           _ids("test_second_order.py::test_kfac_update_is_the_kronecker_solve[0.3-mse-identity]"),
           "the π-correction given to A the wrong way round: A + (√γ/π) I"),
    Mutant("hf-model-sign", SECOND, "fnn/second_order.py",
           "phi = -0.5 * jnp.vdot(x, b + r)", "phi = -0.5 * jnp.vdot(x, b - r)",
           _ids(f"{HF_CG}[3-iterations]"),
           "q(d) read off CG's residual with + ½rᵀd: wrong unless CG converged"),
    Mutant("hf-warm-start-not-decayed", SECOND, "fnn/second_order.py",
           "warm * ravel_pytree(state.previous)[0]", "ravel_pytree(state.previous)[0]",
           _ids(f"{HF_CG}[3-iterations]"),
           "CG warm-started from the previous solution itself, not decay times it"),
    Mutant("hf-warm-start-not-kept", SECOND, "fnn/second_order.py",
           "unravel(last), rho.astype(state.rho.dtype)", "state.previous, rho.astype(state.rho.dtype)",
           _ids(f"{HF_CG}[3-iterations]"),
           "the state keeps the old CG solution: every step starts CG from the first one's start"),
    Mutant("hf-cg-residual-sign", SECOND, "fnn/second_order.py",
           "x, r = x + a * p, r - a * mp", "x, r = x + a * p, r + a * mp",
           _ids("test_second_order.py::test_conjugate_gradient_against_numpy_solve"),
           "CG's residual updated as r + αMp"),
    Mutant("hf-learning-rate-ignored", SECOND, "fnn/second_order.py",
           "jnp.where(accept, alpha * s, 0)", "jnp.where(accept, s, 0)",
           _ids(f"{HF_CG}[3-iterations]"),
           "an accepted Hessian-free step is d, whatever the learning rate α"),
    Mutant("hf-no-backtracking", SECOND, "fnn/second_order.py",
           'take_last = ~(c["best_cost"] <= last_cost)', "take_last = True",
           _ids(f"{HF_CG}[backtracking]"),
           "the last CG iterate is the step even where an earlier saved one costs less (Martens 2010 §4.6)"),
    Mutant("hf-stopping-rule-without-k", SECOND, "fnn/second_order.py",
           "< k * tol)", "< tol)",
           _ids(f"{HF_CG}[stopping-rule]"),
           "CG's relative-progress test compares with ε instead of kε: it stops later than Martens' rule"),
    Mutant("kfac-adaptive-no-momentum", SECOND, "fnn/second_order.py",
           "plane = (h22 > 0) & (det > 1e-12 * h11 * h22)", "plane = h22 < 0",
           _ids(f"{KFAC_ADAPTIVE}[softmax_cross_entropy-identity-lambda-falls]"),
           "K-FAC's step is the rescaled proposal alone: the previous update never enters (§7 left out)"),
    Mutant("kfac-adaptive-lambda-rule-inverted", SECOND, "fnn/second_order.py",
           "jnp.where(rho > 0.75, lam * omega1,", "jnp.where(rho > 0.75, lam / omega1,",
           _ids(f"{KFAC_ADAPTIVE}[softmax_cross_entropy-identity-lambda-falls]"),
           "a good reduction ratio raises λ instead of lowering it"),
    Mutant("kfac-adaptive-gamma-fixed", SECOND, "fnn/second_order.py",
           "tries = [state.gamma * omega2, state.gamma, state.gamma / omega2]",
           "tries = [state.gamma, state.gamma, state.gamma]",
           _ids(f"{KFAC_ADAPTIVE}[softmax_cross_entropy-identity-lambda-falls]"),
           "γ never moves from √(λ + β): the §6.6 grid left out"),
    Mutant("kfac-adaptive-rho-on-damped-model", SECOND, "fnn/second_order.py",
           "gamma, A_inv, G_inv, step, _, model = lax.cond(", "gamma, A_inv, G_inv, step, model, _ = lax.cond(",
           _ids(f"{KFAC_ADAPTIVE}[softmax_cross_entropy-identity-lambda-rises]"),
           "ρ measured against the damped model, where Martens & Grosse use the undamped one"),
    Mutant("hf-damping-not-in-cg", SECOND, "fnn/second_order.py",
           "return ravel_pytree(ggn(unravel(v)))[0] + lam * v", "return ravel_pytree(ggn(unravel(v)))[0]",
           _ids("test_second_order.py::test_hessian_free_solves_the_damped_gauss_newton_system"
                "[softmax_cross_entropy-identity]"),
           "CG solves G d = −∇C without the damping λ"),
    # -- per-example quantities, beyond the ones above: fnn/per_example.py --------------------------
    Mutant("pe-sum-grad-squared-cross-term", PER_EX, "fnn/per_example.py",
           "2 * l2 * W * (d.T @ a)", "l2 * W * (d.T @ a)",
           PER_EXAMPLE, "Σ_x g_x⊙g_x with βW⊙δᵀa instead of 2βW⊙δᵀa"),
    Mutant("pe-noise-scale-grad-sq-without-l2", PER_EX, "fnn/per_example.py",
           'mean = [{**m, "W": m["W"] + l2 * layer["W"]} for m, layer in zip(mean, params)]', "mean = mean",
           _ids("test_per_example.py::test_training_records_the_statistics_of_each_step",
                "test_per_example.py::test_every_quantity_equals_vmap_of_jax_grad"),
           "‖G‖² of the noise scale from the data gradient alone, without βW"),
    Mutant("pe-epoch-quantiles-count-the-padding", PER_EX, "fnn/per_example.py",
           "norms = norms[np.isfinite(norms)]", "norms = norms",
           _ids("test_per_example.py::test_training_records_the_statistics_of_each_step"),
           "the epoch's norm quantiles taken over the NaN padding of the smaller batch too"),
    # -- the Laplace approximation: fnn/laplace.py, and the calibration it is judged by ----------------
    Mutant("laplace-kron-n-twice", LAPLACE, "fnn/laplace.py",
           "a, qa = jnp.linalg.eigh((A + A.T) / (2 * n))", "a, qa = jnp.linalg.eigh((A + A.T) / 2)",
           _ids(f"{KRON_DENSE}[softmax_cross_entropy-identity]"),
           "the kron precision's data part N² (G ⊗ A) where it is N (G ⊗ A): A keeps its N"),
    Mutant("laplace-evidence-without-prior-normalizer", LAPLACE, "fnn/laplace.py",
           "+ 0.5 * jnp.sum(sizes * jnp.log(d))", "+ 0.5 * jnp.sum(jnp.log(d))",
           _ids("test_laplace.py::test_bayesian_linear_regression_is_exact"),
           "the log prior's normalizer ½ P log δ counted once per layer, not per parameter"),
    Mutant("laplace-log-normalizer-per-output-missing", LAPLACE, "fnn/laplace.py",
           "0.5 * k * math.log(2 * math.pi * var)", "0.5 * math.log(2 * math.pi * var)",
           _ids("test_laplace.py::test_bayesian_linear_regression_is_exact"),
           "the Gaussian likelihood's normalizer for one output, whatever K"),
    Mutant("laplace-fixed-point-without-delta", LAPLACE, "fnn/laplace.py",
           "gamma = sizes - delta * traces", "gamma = sizes - traces",
           _ids("test_laplace.py::test_the_prior_precision_optimized_both_ways_agrees_and_zeroes_the_gradient[kron]"),
           "MacKay's effective number of parameters γ = P − tr Σ, without δ"),
    Mutant("laplace-glm-kron-unrotated", LAPLACE, "fnn/laplace.py",
           "w = (ab @ qa) ** 2  # (Q_Aᵀ ā)²", "w = ab ** 2  # (Q_Aᵀ ā)²",
           _ids(f"{KRON_DENSE}[softmax_cross_entropy-identity]"),
           "the GLM predictive reads ā in the standard basis, not in A's eigenbasis"),
    Mutant("laplace-glm-diag-unsquared", LAPLACE, "fnn/laplace.py",
           "t = (ab ** 2) @ s.T", "t = ab @ s.T",
           _ids(f"{KRON_DENSE}[softmax_cross_entropy-identity]"),
           "the diag predictive weighs σ²_ij by ā_j, not ā_j²"),
    Mutant("laplace-last-layer-without-scale", LAPLACE, "fnn/laplace.py",
           'return {"H": cols.scale * per.T @ per}', 'return {"H": per.T @ per}',
           _ids("test_laplace.py::test_last_layer_against_the_dense_block"),
           "the last layer's precision from the columns without their scale"),
    Mutant("laplace-probit-without-pi-over-8", LAPLACE, "fnn/laplace.py",
           "f / jnp.sqrt(1 + math.pi / 8 * var)", "f / jnp.sqrt(1 + var)",
           _ids("test_laplace.py::test_probit_is_within_its_known_error_of_monte_carlo"),
           "the probit approximation without MacKay's π/8"),
    Mutant("laplace-kron-sample-variance", LAPLACE, "fnn/laplace.py",
           "eps / jnp.sqrt(jnp.outer(g, a) + d)", "eps / (jnp.outer(g, a) + d)",
           _ids("test_laplace.py::test_samples_have_the_posterior_covariance[kron]"),
           "kron draws scaled by the precision's eigenvalues, not by their square roots"),
    Mutant("calibration-ece-unweighted", LAPLACE, "fnn/metrics.py",
           "ece += inside.mean() * abs(", "ece += abs(",
           _ids("test_metrics.py::test_calibration_of_known_cases"),
           "the ECE sums the bins' gaps without weighting them by their share of the samples"),
    Mutant("private-lot-gathered-in-every-piece", "privacy", "fnn/privacy.py",
           "rows = jax.lax.with_sharding_constraint(rows, distributed.replicated(mesh))", "pass",
           _ids("test_distributed.py::test_private_training_on_eight_devices_equals_one_device"),
           "on a mesh, XLA splits the lot's indices and gathers them back in every piece of the private step"),
    Mutant("gram-lower-blocks-not-transposed", CURV, "fnn/curvature.py",
           "upper[i, j] if i <= j else upper[j, i].T", "upper[i, j] if i <= j else upper[j, i]",
           _ids("test_curvature.py::test_gram_equals_the_dense_product_and_is_symmetric"),
           "a wide Gram matrix mirrors its upper blocks below the diagonal without transposing them"),
    Mutant("chunks-first-counted-twice", CURV, "fnn/curvature.py",
           "acc = lax.fori_loop(1, whole, body, acc)", "acc = lax.fori_loop(0, whole, body, acc)",
           _ids("test_curvature.py::test_sum_over_chunks_visits_every_row_once_in_order",
                "test_influence.py::test_block_size_does_not_matter"),
           "the loop over the chunks adds the first chunk a second time"),
    Mutant("influence-cg-from-a-literal-zero", "influence", "fnn/influence.py",
           "damping * v, g, 0 * g, iters))", "damping * v, g, jnp.zeros_like(g), iters))",
           _ids("test_influence.py::test_cg_influence_on_hundreds_of_rows_against_a_dense_solve"),
           "CG starts from a compile-time zero, which XLA:CPU turns into NaN scores from a few hundred rows on"),
    Mutant("influence-non-finite-data-kept", "influence", "fnn/influence.py",
           "*data, finite=True)", "*data)",
           _ids("test_influence.py::test_non_finite_inputs_are_refused_by_every_entry_point"),
           "attribution scores data with NaN or inf in it (NaN scores, or finite wrong ones through a ReLU)"),
)

# A plugin for the pytest run in the copy: refuse to run against any fnn but the copy's, and do
# not shrink failing hypothesis examples (the same examples are drawn; only pass/fail matters here).
PLUGIN = '''
import os
from pathlib import Path

import pytest
from hypothesis import Phase, settings


def pytest_configure(config):
    copy = Path(os.environ["FNN_MUTATION_COPY"]).resolve()
    try:
        import fnn
    except ImportError as e:
        raise pytest.UsageError(f"fnn cannot be imported from the mutated copy in {copy}: {e}") from None
    where = Path(fnn.__file__).resolve()
    if copy not in where.parents:
        raise pytest.UsageError(f"fnn was imported from {where}, not from the mutated copy in {copy}")
    base = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
    settings.register_profile("mutation", parent=base, phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("mutation")
'''
PLUGIN_NAME = "_fnn_mutation_plugin"


@dataclass
class Outcome:
    mutant: Mutant | None  # None: the baseline
    status: str  # "caught", "timeout", "survived", or "error"
    seconds: float
    detail: str  # the first failing test, or what went wrong


def check_list(mutants=MUTANTS, root: Path = ROOT) -> None:
    """Raise ``SystemExit`` naming every mutant whose original text is not in its file exactly once,
    whose replacement is no change, whose name repeats, or whose tests name a missing file."""
    problems, names = [], set()
    for m in mutants:
        if m.name in names:
            problems.append(f"{m.name}: the name is used twice")
        names.add(m.name)
        path = root / m.file
        count = path.read_text(encoding="utf-8").count(m.original) if path.is_file() else 0
        if count != 1:
            problems.append(f"{m.name}: the original text occurs {count} times in {m.file}, not once: "
                            f"{m.original!r}")
        if m.original == m.mutated:
            problems.append(f"{m.name}: the replacement is the original text")
        for node in m.tests:
            if not (root / node.split("::")[0]).is_file():
                problems.append(f"{m.name}: no test file {node.split('::')[0]}")
    if problems:
        raise SystemExit("the mutant list does not match the sources; update experiments/mutation.py:\n  "
                         + "\n  ".join(problems))


def _copy(root: Path, into: Path) -> Path:
    """``fnn/``, ``tests/`` and ``pyproject.toml`` of ``root`` (no caches), plus the plugin, in ``into``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=ignore)
        else:
            shutil.copy2(src, into / name)
    (into / f"{PLUGIN_NAME}.py").write_text(PLUGIN, encoding="utf-8")
    return into


def _apply(copy: Path, m: Mutant) -> None:
    path = copy / m.file
    text = path.read_text(encoding="utf-8")
    if text.count(m.original) != 1:  # the list is checked up front; this guards the copy too
        raise SystemExit(f"{m.name}: the original text is not in {m.file} exactly once")
    path.write_text(text.replace(m.original, m.mutated), encoding="utf-8")


def _environment(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant and its original can share size and mtime
    env["HYPOTHESIS_PROFILE"] = "default"
    env["FNN_MUTATION_COPY"] = str(copy)
    # the checkout's compilation cache (tests/conftest.py): what a mutant leaves unchanged compiles once
    env.setdefault("FNN_JAX_CACHE", str(ROOT / ".jax_cache"))
    if "FNN_DATA_DIR" not in env and (ROOT.parent / "shared" / "data" / "mnist-t10k").is_dir():
        env["FNN_DATA_DIR"] = str(ROOT.parent / "shared" / "data" / "mnist-t10k")
    return env


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


NO_TEST = "no fast test"  # the detail of a mutant whose tests --marker deselected, every one


def run_tests(root: Path, tests: tuple[str, ...], timeout: float, mutant: Mutant | None = None,
              marker: str | None = None) -> Outcome:
    """``python -m pytest -x -q tests`` in a fresh copy of ``root`` (with ``mutant`` applied), with
    ``-m marker`` when one is given."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fnn-mutant-") as tmp:
        copy = _copy(root, Path(tmp))
        if mutant is not None:
            _apply(copy, mutant)
        select = [] if marker is None else ["-m", marker]
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", PLUGIN_NAME, *select,
               *tests]
        proc = subprocess.Popen(cmd, cwd=copy, env=_environment(copy), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(mutant, "timeout", time.perf_counter() - start, f"no result after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    # pytest's exit status: 0 all passed, 1 some failed, 2 interrupted (a collection error: the
    # mutant broke an import), 3 internal error, 4 usage error (the plugin: wrong fnn), 5 no tests.
    if proc.returncode == 0:
        return Outcome(mutant, "survived" if mutant else "passed", seconds, "")
    if proc.returncode in (1, 2):
        return Outcome(mutant, "caught" if mutant else "failed", seconds, _first_failure(output))
    if proc.returncode == 5 and marker is not None:  # -m deselected every test: none of them can catch it
        return Outcome(mutant, "survived" if mutant else "passed", seconds, f"{NO_TEST} (-m {marker!r})")
    tail = "\n".join(output.strip().splitlines()[-15:])
    return Outcome(mutant, "error", seconds, f"pytest exit status {proc.returncode}:\n{tail}")


def baseline(root: Path, mutants, timeout: float, marker: str | None = None) -> None:
    """Every selected test on the unmutated copy, in one run; ``SystemExit`` unless all pass."""
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    where = "" if marker is None else f" (-m {marker!r})"
    print(f"baseline: {len(tests)} tests{where} on the unmutated copy ...", flush=True)
    out = run_tests(root, tests, timeout * max(1, len(mutants)), marker=marker)
    if out.status != "passed":
        raise SystemExit(f"the baseline did not pass ({out.status}): {out.detail}\nA selected test fails without "
                         f"any mutant, so it cannot tell a mutant apart; fix that first.")
    print(f"baseline: passed in {out.seconds:.0f} s", flush=True)


def _table(outcomes: list[Outcome]) -> str:
    rows = [("mutant", "area", "result", "s", "caught by")]
    rows += [(o.mutant.name, o.mutant.area, o.status, f"{o.seconds:.0f}", o.detail.replace("tests/", ""))
             for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines[:1]))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="experiments/mutation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the mutants (checked against the sources) and stop")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutant (repeatable)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    p.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the selected tests without mutants")
    p.add_argument("--fail-under", type=float, default=None, metavar="PCT",
                   help="exit with status 1 when the score is below PCT percent")
    p.add_argument("--marker", default=None, metavar="EXPR",
                   help='pass -m EXPR to every pytest run, e.g. "not slow" for the fast tier (a mutant whose '
                        'tests are all deselected survives: "no fast test")')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_list()
    unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
    if unknown:
        raise SystemExit(f"unknown mutants {unknown}; see --list")
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.area}]  {m.file}: {m.bug}\n    - {m.original!r}\n    + {m.mutated!r}"
                  f"\n    tests: {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants, every original text found exactly once.")
        return 0
    if not args.no_baseline:
        baseline(ROOT, mutants, args.timeout, args.marker)
    outcomes: list[Outcome] = []

    def one(m: Mutant) -> Outcome:
        out = run_tests(ROOT, m.tests, args.timeout, m, args.marker)
        outcomes.append(out)
        print(f"[{len(outcomes):>2}/{len(mutants)}] {m.name}: {out.status} ({out.seconds:.0f} s) "
              f"{out.detail.splitlines()[0] if out.detail else ''}", flush=True)
        return out

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, mutants))
    outcomes.sort(key=lambda o: mutants.index(o.mutant))
    errors = [o for o in outcomes if o.status == "error"]
    for o in errors:
        print(f"\n{o.mutant.name}: {o.detail}")
    if errors:
        raise SystemExit(f"{len(errors)} mutants could not be judged (see above); no score.")
    print("\n" + _table(outcomes))
    survivors = [o.mutant for o in outcomes if o.status == "survived"]
    if survivors:
        print("\nSurvivors (a missing test, or a mutant that does not change behaviour):")
        for o in outcomes:
            if o.status == "survived":
                m = o.mutant
                ran = o.detail if o.detail.startswith(NO_TEST) else f"tests run: {' '.join(m.tests)}"
                print(f"  {m.name} [{m.file}]: {m.bug}\n    {ran}")
    caught = len(outcomes) - len(survivors)
    score = 100 * caught / len(outcomes)
    tier = "" if args.marker is None else f" by the tests of -m {args.marker!r}"
    print(f"\nscore: {caught}/{len(outcomes)} mutants caught{tier} = {score:.1f} % "
          f"({time.strftime('%Y-%m-%d')}, {sum(o.seconds for o in outcomes) / 60:.1f} min of test runs)")
    return 1 if args.fail_under is not None and score < args.fail_under else 0


if __name__ == "__main__":
    sys.exit(main())
