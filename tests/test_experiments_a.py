"""Experiments 1–6 run end to end in --quick mode, write their PNG and JSON, and show their claim."""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each runs an experiment end to end (--quick)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(name: str, out: Path, *extra: str) -> dict:
    """Import ``experiments/<name>.py`` under a private module name and run ``main(--quick)``.

    Returns the JSON it wrote, after checking that the PNG and JSON exist.
    """
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))  # the scripts import their siblings (`common`, `xor`)
    spec = importlib.util.spec_from_file_location(f"_experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    returned = module.main(["--quick", "--out", str(out), *extra])
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["quick"] is True and saved["seconds"] > 0
    assert set(returned) <= set(saved)
    return saved


@pytest.mark.parametrize("seed", [0, 1000])  # the claim holds in both seed ranges
def test_perceptron(tmp_path, seed):
    r = run("perceptron", tmp_path, "--seed", str(seed))
    assert {"blobs", "sweep", "all_within_bound", "worst_ratio", "xor", "cumulative_updates"} <= set(r)
    assert r["blobs"]["converged"] and r["blobs"]["updates"] <= r["blobs"]["bound"]
    assert r["all_within_bound"] and r["worst_ratio"] <= 1
    assert all(s["converged"] and 0 < s["updates"] <= s["bound"] for s in r["sweep"])
    assert not r["xor"]["converged"] and r["xor"]["train_accuracy"] <= 0.75
    xor_curve = r["cumulative_updates"]["xor"]
    assert all(b > a for a, b in zip(xor_curve, xor_curve[1:]))  # a mistake in every epoch, forever
    assert len(set(r["cumulative_updates"]["blobs"][-3:])) == 1  # converged: no more updates
    # the README's block quotes the default run (experiments/results.py): the blobs do not depend on the run's
    # size, so their line is this fresh run's; the rest follows from its numbers, as section 1 reads them
    block = quoted_block("perceptron" if seed == 0 else f"perceptron@{seed}").splitlines()
    assert block[0] == importlib.import_module("results").render_perceptron({**r, "quick": False}).splitlines()[0]
    ratio, most, bound = re.search(r"updates/bound ([\d.]+); most updates ([\d,]+) .* bound of ([\d,]+)",
                                   block[1]).groups()
    most, bound = int(most.replace(",", "")), int(bound.replace(",", ""))
    assert "all converged within the bound" in block[1] and most / bound <= float(ratio) < 0.5  # loose
    epochs, updates, w, acc = re.search(r"converged no after ([\d,]+) epochs and ([\d,]+) updates, "
                                        r"final `w' = \((.*)\)`, training accuracy (\d+) %", block[2]).groups()
    assert int(updates.replace(",", "")) == 4 * int(epochs.replace(",", ""))  # a mistake per sample per epoch
    assert [float(v) for v in w.split(", ")] == [0, 0, 0] and int(acc) == 50


@pytest.mark.parametrize("seed", [0, 1000])  # the claim holds in both seed ranges
def test_xor(tmp_path, seed):
    r = run("xor", tmp_path, "--seed", str(seed))
    assert {"perceptron", "single_unit", "mlp_2_2_1", "learning_rate", "steps", "seeds", "long_run"} <= set(r)
    assert not r["perceptron"]["converged"]
    assert min(r["single_unit"]["final_loss"]) >= math.log(2) - 1e-3  # a linear unit cannot beat ln 2
    mlp = r["mlp_2_2_1"]
    assert mlp["n_solved"] >= 1 and mlp["n_solved"] == sum(mlp["solved"])
    solved_losses = [loss for loss, ok in zip(mlp["final_loss"], mlp["solved"]) if ok]
    assert max(solved_losses) < 0.05
    # The stalled seeds, continued: each verdict is the one the thresholds give for what was measured,
    # and what section 2 says of them holds: the gradient has not vanished, the weights still grow.
    long, t = r["long_run"], r["long_run"]["thresholds"]
    grad, weight, eig = (np.asarray(long[k]) for k in ("grad_norm", "weight_norm", "hessian_eigenvalues"))
    half = long["steps"].index(long["half"])
    stalled = [s for s, ok in enumerate(mlp["solved"]) if not ok]
    assert stalled  # seed 1 stalls: the quick run exercises the verdict
    for s in stalled:
        growth = weight[s, -1] / weight[s, half] - 1
        assert growth == pytest.approx(long["weight_growth_second_half"][s])
        assert long["verdict"][s] == expected_verdict(grad[s, -1], growth, eig[s, 0], eig[s, -1], t,
                                                      escaped=long["solved"][s])
        assert grad[s, -1] < grad[s, half] and grad[s, -1] > t["grad_tol"] and growth > t["growth_tol"]
    # the Hessian the verdict reads, from the R-operator, against jax.hessian in float64 (an independent
    # oracle), at the stalled seeds' final params
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import fnn

    net = fnn.MLP((2, 2, 1), "sigmoid", "identity")
    unravel = ravel_pytree(net.init(jax.random.PRNGKey(0), jnp.float64))[1]
    data = fnn.data.xor()
    x, y = jnp.asarray(data.x_train, jnp.float64), jnp.asarray(data.y_train, jnp.float64)
    hessian = jax.jit(jax.hessian(lambda theta: fnn.objective(net, unravel(theta), x, y,
                                                              fnn.losses.binary_cross_entropy_with_logits)))
    for s in stalled:
        oracle = np.linalg.eigvalsh(np.asarray(hessian(jnp.asarray(long["final_params"][s], jnp.float64))))
        np.testing.assert_allclose(eig[s], oracle, atol=1e-5 * np.abs(oracle).max())
    # the README's block (default run): every verdict follows from the numbers it quotes
    rows = [line.split(" | ") for line in quoted_block("xor" if seed == 0 else f"xor@{seed}").splitlines()
            if line.startswith("| ") and line.endswith(("plateau |", "saddle |", "minimum |", "escaped |"))]
    assert rows
    for row in rows:
        before, after = (float(v) for v in row[4].split(" → "))
        low, high = (float(v) for v in row[5].split(", "))
        quoted = expected_verdict(float(row[2].split(" → ")[1]), after / before - 1, low, high, t, escaped=False)
        assert row[6].removesuffix(" |") in (quoted, "escaped"), row


def expected_verdict(grad_norm, growth, lowest, highest, t, escaped) -> str:
    """Section 2's rule, written out again: escaped, saddle, minimum or plateau."""
    if escaped:
        return "escaped"
    if lowest < -t["negative"] * highest:
        return "saddle"
    return "minimum" if grad_norm <= t["grad_tol"] and growth <= t["growth_tol"] else "plateau"


@pytest.mark.parametrize("seed", [0, 1000])  # the claim holds in both seed ranges
def test_universal_approximation(tmp_path, seed):
    r = run("universal_approximation", tmp_path, "--seed", str(seed))
    widths, steps, window = r["widths"], r["steps"], r["window"] // r["chunk"]
    assert set(r["rmse_best"]) == {"sin(x)", "|x|", "step [x ≥ 0]"}
    assert r["padded_units_max_abs_weight"] == 0.0  # the extra units of the shared program never moved
    for name in r["rmse_best"]:
        loss, rmse = np.asarray(r["train_mse_all"][name]), np.asarray(r["rmse_all"][name])  # (widths, seeds, K)
        assert loss.shape == rmse.shape == (len(widths), r["seeds"], len(steps))
        for b in r["budgets"]:  # the best network found by step b: the lowest training loss up to b, any init
            k = steps.index(b)
            for i in range(len(widths)):
                s, j = np.unravel_index(np.argmin(loss[i, :, : k + 1]), (r["seeds"], k + 1))
                assert r["rmse_best_at_budget"][name][str(b)][i] == rmse[i, s, j], (name, b, i)
        for i, w in enumerate(r["at_cap"][name]):  # still improving: the lowest loss fell ≥ tol over the window
            best = np.minimum.accumulate(loss[i].min(axis=0))
            assert w["still_improving"] == bool(best[-1 - window] - best[-1] >= r["tol"] * best[-1 - window])
    for name in ("sin(x)", "|x|"):
        errors = r["rmse_best"][name]
        assert len(errors) == len(widths)
        assert errors[-1] < 0.2 * errors[0], (name, errors)
    # the README's block (default run): three step counts per target, each slope the fit of the quoted errors
    key = "universal_approximation" if seed == 0 else f"universal_approximation@{seed}"
    lines = quoted_block(key).splitlines()
    header = next(line for line in lines if line.startswith("| target"))
    quoted_widths = [int(c.split("= ")[1]) for c in header.split(" | ") if c.startswith("n = ")]
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and not line.startswith(("| target", "| ---"))]
    assert len(rows) == 3 * len(r["rmse_best"])
    for row in rows:
        errors = [float(c) for c in row[-2 - len(quoted_widths):-2]]
        fitted = np.polyfit(np.log(quoted_widths), np.log(errors), 1)[0]
        assert abs(fitted - float(row[-2])) < 0.05, row  # the errors are quoted to 2 significant figures


@pytest.mark.parametrize("seed", [0, 1000])  # the claim holds in both seed ranges
def test_capacity(tmp_path, seed):
    r = run("capacity", tmp_path, "--seed", str(seed))
    widths = r["widths"]
    train, held = np.array(r["train_mse"]), np.array(r["held_out_mse"])  # (widths, draws)
    assert train.shape == held.shape == (len(widths), r["repeats"]) and r["repeats"] >= 2
    for key, mse in (("train", train), ("held_out", held)):  # every claim recomputed from the draws
        f, k = r[key], int(np.argmin(mse.mean(axis=1)))
        assert f["lowest_width"] == widths[k]
        for s, v in zip(f["spread"], mse):
            assert s["min"] == v.min() and s["max"] == v.max() and s["mean"] == pytest.approx(v.mean())
        neighbours = [j for j in (k - 1, k + 1) if 0 <= j < len(widths)]
        assert f["resolved"] == all(mse[k].max() < mse[j].min() for j in neighbours)
        np.testing.assert_array_equal(f["wins"], (mse[:, None, :] < mse[None, :, :]).sum(axis=2))
    k = int(np.argmin(held.mean(axis=1)))
    assert r["under_fitting_resolved"] == any(held[k].max() < held[j].min() for j in range(k))
    assert r["over_fitting_resolved"] == any(held[k].max() < held[j].min() for j in range(k + 1, len(widths)))
    assert train.mean(1)[-1] < train.mean(1)[0] / 3  # more capacity fits the training set better
    assert r["best_width"] != widths[0] and held.mean(1).min() < 0.8 * held.mean(1)[0]  # width 1 under-fits
    assert held.mean(1).min() > 0.8 * r["noise_variance"]  # nothing beats the noise
    # the README's block (default run): a row per width, min ≤ mean ≤ max, and its words follow from its ranges
    block = quoted_block("capacity" if seed == 0 else f"capacity@{seed}")
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert_spreads_ordered(rows)
    quoted = [[float(v) for v in row[2].removesuffix(" |").replace(" [", "–").rstrip("]").split("–")] for row in rows]
    j = int(np.argmin([mean for mean, _, _ in quoted]))
    assert f"held out: lowest mean at n = {int(rows[j][0][2:])};" in block
    resolved = all(quoted[j][2] < quoted[i][1] for i in (j - 1, j + 1) if 0 <= i < len(rows))
    assert ("minimum resolved" if resolved else "minimum not resolved") in block


@pytest.mark.parametrize("seed", [0, 1000])  # the claim holds in both seed ranges
def test_initialization(tmp_path, mnist_dir, seed):
    r = run("initialization", tmp_path, "--data-dir", str(mnist_dir), "--seed", str(seed))
    assert r["dataset"] == "mnist-10k"
    c, depth = r["configs"], r["depth"]
    assert len(c) == 6 and r["seeds"] >= 2
    for label, v in c.items():
        assert len(v["act_std"]) == len(v["saturated"]) == depth, label
        assert len(v["delta_std"]) == len(v["grad_W_std"]) == depth + 1, label
        for k, s in v["ratios"].items():
            assert 0 < s["min"] <= s["mean"] <= s["max"], (label, k)
    sig, tanh = c["sigmoid classic U(±1/√n)"]["ratios"], c["tanh classic U(±1/√n)"]["ratios"]
    glorot = c["tanh Glorot U(±√(6/(n+m)))"]["ratios"]
    # BP2 with the classic init (n·Var W = 1/3, φ' ≤ 1): δ shrinks on the way down
    assert tanh["delta"]["max"] < 0.5
    # eq. 14: for tanh the weight gradients δ^l (a^{l-1})ᵀ keep their size far better than δ itself
    assert tanh["grad_W"]["min"] > 5 * tanh["delta"]["max"]
    # Glorot's init (n·Var W = 1) shrinks δ much less than the classic one
    assert glorot["delta"]["min"] > 2 * tanh["delta"]["max"]
    # sigmoid (σ' ≤ 1/4, activations not shrinking going up): δ and the weight gradients both vanish
    assert sig["delta"]["max"] < 1e-2 and sig["grad_W"]["max"] < 1e-2
    assert 0.5 < c["relu He U(±√(6/n))"]["ratios"]["delta"]["mean"] < 2  # He keeps δ's size
    assert c["sigmoid naive N(0,1)"]["saturated"][-1] > 0.3 > c["sigmoid classic U(±1/√n)"]["saturated"][-1]
    # in training, the top sigmoid layer is driven toward 0 while the first stays near 1/2 (their Fig. 2)
    t = r["training"]
    mean = np.asarray(t["runs"]["sigmoid classic U(±1/√n)"]["mean"])  # (seeds, probes, hidden layers)
    assert mean.shape[1:] == (t["iterations"] // t["probe_every"], len(t["sizes"]) - 2)
    assert mean[:, -1, -1].max() < mean[:, 0, -1].min()
    assert np.all(np.abs(mean[:, -1, 0] - 0.5) < 0.05)
    # experiments/README.md quotes the default run in a block generated from its JSON (experiments/results.py);
    # a quick run has other sizes, so only the block's form is checked: a row per configuration, in order,
    # and every quoted mean within its [min–max]
    key = "initialization" if seed == 0 else f"initialization@{seed}"
    rows = [line.split(" | ") for line in quoted_block(key).splitlines() if line.startswith("| ")]
    labels = [row[0][2:] for row in rows if row[0][2:] in c]  # the table at initialization, then in training
    assert labels == list(c) + list(r["training"]["runs"])
    assert_spreads_ordered(rows)


def test_optimizers(tmp_path, mnist_dir):
    r = run("optimizers", tmp_path, "--data-dir", str(mnist_dir))
    runs, seeds = r["runs"], r["seeds"]
    assert set(runs) == {"SGD", "momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam"}
    assert len(seeds) >= 2 and r["pilot_seed"] not in seeds  # the rates come from a seed that is not measured
    for s in range(len(seeds)):  # within a seed: same init, same first batch for every optimizer
        first = [v[s]["costs"][0] for v in runs.values()]
        np.testing.assert_allclose(first, first[0], rtol=1e-6)
    assert runs["SGD"][0]["costs"][0] != runs["SGD"][1]["costs"][0]  # another seed, another start
    for name, rs in runs.items():
        for v in rs:
            assert len(v["costs"]) == r["iterations"] and np.all(np.isfinite(v["costs"])), name
            assert v["final_train_loss"] < v["costs"][0], name  # every optimizer made progress
        pilot = r["pilot"][name]  # the documented rule: lowest final loss of the pilot, diverged runs excluded
        losses = [np.inf if v is None else v for v in pilot["final_train_loss"]]
        assert pilot["chosen"] == pilot["grid"][int(np.argmin(losses))] == r["summary"][name]["learning_rate"]
        finals, spread = [v["final_train_loss"] for v in rs], r["summary"][name]["final_train_loss"]
        assert spread["min"] == min(finals) <= spread["mean"] <= max(finals) == spread["max"], name
    # a pair is ordered only where every seed of one is below every seed of the other
    for key in ("final_train_loss", "iterations_to_target"):
        per_seed = {n: [np.inf if v[key] is None else v[key] for v in rs] for n, rs in runs.items()}
        for a, row in r["findings"][key]["pairs"].items():
            for b, sym in row.items():
                lo, hi = max(per_seed[a]) < min(per_seed[b]), max(per_seed[b]) < min(per_seed[a])
                assert sym == ("<" if lo else ">" if hi else "~"), (key, a, b)
    # the README's block quotes the default run (see test_initialization): a row per optimizer, in order
    rows = [line.split(" | ") for line in quoted_block("optimizers").splitlines() if line.startswith("| ")]
    assert [row[0][2:] for row in rows[2:]] == list(runs)
    assert_spreads_ordered(rows)


def quoted_block(name: str) -> str:
    """The results block ``name`` of experiments/README.md (see experiments/results.py)."""
    results = importlib.import_module("results")
    return results.blocks(results.README.read_text())[name]


def assert_spreads_ordered(rows: list) -> None:
    """Every ``mean [min–max]`` in the table cells ``rows`` has ``min ≤ mean ≤ max``; there is at least one."""
    spreads = [(cell.split(" [")[0], *cell.split(" [")[1].split("]")[0].split("–"))
               for row in rows for cell in row if " [" in cell]
    assert spreads
    for mean, lo, hi in spreads:
        assert float(lo) <= float(mean) <= float(hi), (mean, lo, hi)
