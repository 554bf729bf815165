"""Smoke tests of experiments 7–12 in ``--quick`` mode: they run, write their PNG and JSON, and
their qualitative claims hold even at the reduced sizes (each assertion can fail)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(name: str, out: Path, *extra: str) -> dict:
    """Run ``experiments/<name>.py --quick --out out`` in-process; return its JSON after checking both files."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    module = importlib.import_module(name)
    returned = module.main(["--quick", "--out", str(out), *extra])
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["quick"] is True
    assert set(returned) <= set(saved)
    return saved


def test_learning_rate(tmp_path):
    r = run("learning_rate", tmp_path)
    quad, mlp = r["quadratic"], r["mlp"]
    assert {"lambda_max", "eta_critical", "excess_measured", "excess_theory"} <= set(quad)
    # the closed-form Hessian is the autodiff one, and 2/λ_max is the border of convergence
    assert quad["hessian_rel_error_autodiff_vs_closed_form"] < 1e-5
    assert quad["all_below_converge"] and quad["all_above_diverge"]
    assert quad["theory_max_rel_deviation"] < 1e-2
    # MLP: the largest η diverges and fit's NaN guard says so; the smallest is slow
    runs = sorted(mlp["runs"].values(), key=lambda run: run["factor"])
    assert runs[-1]["diverged"] and "non-finite" in runs[-1]["stopped"]
    finite = [run["final_loss"] for run in runs if not run["diverged"]]
    assert runs[0]["final_loss"] > 2 * min(finite)
    # first step: η‖g‖² predicts the decrease for small η, and fails (increase) beyond 2/λ_max
    assert quad["first_step_ratio"][0] > 0.95 and mlp["first_step_ratio"][0] > 0.95
    assert quad["first_step_ratio"][-1] < 0 and mlp["first_step_ratio"][-1] < 0
    np.testing.assert_allclose(quad["first_step_ratio"], quad["first_step_ratio_theory"], atol=0.02)


def test_newton(tmp_path):
    r = run("newton", tmp_path)
    quad, one = r["quadratic"], r["one_d"]
    assert quad["newton_relative_error_after_one_step"] < 1e-12
    steps = quad["gd_steps_measured"]
    assert all(s is not None and s > 100 for s in steps.values())
    for name, s in steps.items():
        assert s <= quad["gd_steps_predicted"][name]  # the linear-rate bound log(tol)/log ρ
    assert quad["gd_sign_changes_steep_axis"] >= 20  # the zig-zag across the valley
    assert one["newton_steps_to_1e-12"] <= 8 < one["gd_steps_to_1e-12"]
    assert abs(one["newton_quadratic_constants"][-1] - 0.5) < 0.05  # e_{t+1} ≈ ½ e_t²


def test_gradient_agreement(tmp_path, mnist_dir):
    r = run("gradient_agreement", tmp_path, "--data-dir", str(mnist_dir))
    assert r["checked_epochs"] == [0, 1, 2]
    for diffs in r["max_rel_diff"].values():
        assert np.asarray(diffs).shape == (3, 3)  # (checks, layers)
    assert r["max_observed"] <= 1e-5 and r["claim_holds"]
    assert r["final_held_out_accuracy"] > 0.85


def test_mnist(tmp_path, mnist_dir):
    r = run("mnist", tmp_path, "--data-dir", str(mnist_dir))
    assert len(r["history"]) == 2 and r["stopped"] is None
    confusion = np.asarray(r["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 2000
    assert r["misclassified"] == 2000 - np.trace(confusion)
    assert r["final_held_out_accuracy"] == pytest.approx(np.trace(confusion) / 2000)
    assert r["final_held_out_accuracy"] > 0.9


def test_batch_sizes(tmp_path):
    r = run("batch_sizes", tmp_path)
    runs = r["runs"]
    final = {name: run["full_train_cost"][-1] for name, run in runs.items()}
    # more, noisier steps per epoch make more progress per epoch
    assert final["B = 1"] < final["B = 32"] < final["B = 128"] < final["B = N"]
    assert runs["B = 1"]["steps_per_epoch"] == r["n"]
    assert all(len(run["full_train_cost"]) == r["epochs"] + 1 for run in runs.values())
    costs = {name: np.asarray(c) for name, c in r["step_costs"].items()}
    assert costs["B = 1"].std() / costs["B = 1"].mean() > 3 * costs["B = 128"].std() / costs["B = 128"].mean()
    noise = r["gradient_noise"]
    ratio = np.asarray(noise["measured"]) / np.asarray(noise["predicted"])
    assert np.all((ratio > 0.5) & (ratio < 2))


def test_autodiff_graphs(tmp_path):
    r = run("autodiff_graphs", tmp_path)
    for name in ("forward", "manual", "autodiff"):
        assert "dot_general" in (tmp_path / f"autodiff_graphs_{name}.txt").read_text()
    dots, layers = r["dot_general"], len(r["small_sizes"]) - 1
    assert dots["forward"] == layers
    assert dots["manual"] - dots["forward"] == dots["autodiff"] - dots["forward"] == 2 * layers - 1
    assert r["total_operations"]["forward"] < r["total_operations"]["manual"]
    assert r["delta_vs_cotangent_max_rel_diff"] < 1e-5
    assert r["manual_vs_autodiff_max_rel_diff"] < 1e-5
    assert set(r["step_seconds"]["small"]) == {"manual eager", "manual jit", "autodiff eager", "autodiff jit"}
    # The README's results block is generated from this JSON (experiments/results.py): the quoted
    # counts must be those of a fresh run. (Before, they were typed in and had gone stale: 101/111.)
    results = importlib.import_module("results")
    quoted = results.blocks(results.README.read_text())["autodiff_graphs"]
    assert results.render_autodiff_graphs(r) == quoted, (
        "experiments/README.md quotes other graph counts than a fresh run gives; regenerate with "
        "python experiments/autodiff_graphs.py && python experiments/results.py")


def test_gradient_noise(tmp_path, mnist_dir):
    r = run("gradient_noise", tmp_path, "--data-dir", str(mnist_dir))
    b = np.asarray(r["noise_scale"], dtype=float)
    assert b.shape == (r["seeds"], r["epochs"]) == (2, 3)
    assert np.all(np.asarray(r["grad_trace_cov"]) > 0)  # per-example gradients differ
    q = [np.asarray(r[k]) for k in ("norm_p10", "norm_median", "norm_p90", "norm_max")]
    assert all(np.all(lo <= hi) for lo, hi in zip(q, q[1:])) and np.all(q[0] > 0)
    # with ‖G‖² resolved (> 0), B_simple is the ratio of the two recorded means
    sq = np.asarray(r["grad_sq"])
    np.testing.assert_allclose(b[sq > 0], np.asarray(r["grad_trace_cov"])[sq > 0] / sq[sq > 0], rtol=1e-6)


def test_private_mnist(tmp_path, mnist_dir):
    r = run("private_mnist", tmp_path, "--data-dir", str(mnist_dir))
    assert set(r["mean"]) == {"None", "0.5", "2.0", "8.0"}
    # the accountant kept each run within its target, and more ε means less noise
    for target in ("0.5", "2.0", "8.0"):
        assert 0.95 * float(target) <= r["epsilon"][target] <= float(target)
    sigmas = [r["noise_multiplier"][t] for t in ("0.5", "2.0", "8.0")]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0
    assert r["mean"]["None"] > 0.5  # the quick non-private run learns something


def test_edge_of_stability(tmp_path, mnist_dir):
    r = run("edge_of_stability", tmp_path, "--data-dir", str(mnist_dir))
    # the initial sharpness against power iteration on jax.jvp(jax.grad) of the objective (autodiff)
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import fnn

    raw = fnn.data.load_dataset("mnist-10k", str(mnist_dir))
    data, _ = fnn.data.zscore_dataset(raw)
    x = jnp.asarray(data.x_train[: r["subset"]], jnp.float32)
    y = jax.nn.one_hot(jnp.asarray(data.y_train[: r["subset"]]), 10, dtype=jnp.float32)
    net = fnn.MLP(tuple(r["sizes"]), "tanh", "identity")
    params = net.init(jax.random.PRNGKey(0))
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda t: fnn.objective(net, unravel(t), x, y, fnn.losses.mse))
    hv = jax.jit(lambda v: jax.jvp(grad, (flat,), (v,))[1])
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape, flat.dtype)
    for _ in range(300):
        w = hv(v / jnp.linalg.norm(v))
        lam, v = float(jnp.vdot(v / jnp.linalg.norm(v), w)), w
    assert r["initial_converged"]
    assert abs(r["initial_sharpness"] - lam) <= 1e-3 * lam
    for run_ in r["runs"]:
        costs, sharp = np.asarray(run_["costs"], float), np.asarray(run_["sharpness"], float)
        assert costs.shape == (r["steps"],) and sharp.shape == (r["steps"] // r["every"],)
        assert np.all(np.isfinite(costs)) and costs[-1] < costs[0]
        # a run that did not diverge cannot have stayed far above the stability limit 2/η
        assert run_["late_median_over_edge"] <= 1.5
        # the verdict is the one its numbers give
        edge = 0.9 <= run_["late_median_over_edge"] <= 1.15
        assert (run_["verdict"] == "edge") == edge
    # where 2/η lies below the initial sharpness, gradient descent brought the sharpness down to about 2/η
    unstable = [x for x in r["runs"] if x["two_over_eta"] < r["initial_sharpness"]]
    assert unstable and all(x["sharpness"][-1] < r["initial_sharpness"] for x in unstable)
