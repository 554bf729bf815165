"""Smoke tests of experiments 7–12 in ``--quick`` mode: they run, write their PNG and JSON, and
their qualitative claims hold even at the reduced sizes (each assertion can fail)."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each runs an experiment end to end (--quick)

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


@pytest.mark.parametrize("seed", [0, 1000])  # the claim holds in both seed ranges
def test_learning_rate(tmp_path, seed):
    r = run("learning_rate", tmp_path, "--seed", str(seed))
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
    # The README's block quotes the default run (experiments/results.py). The quadratic's curvature, the MLP's
    # λ_max(θ₀) and the first step do not depend on the run's size: they must be those of this fresh run.
    results = importlib.import_module("results")
    block = results.blocks(results.README.read_text())["learning_rate" if seed == 0 else f"learning_rate@{seed}"]
    block = block.splitlines()
    fresh = results.render_learning_rate({**r, "quick": False}).splitlines()
    assert [line.split("; ")[0] for line in block[:2]] == [line.split("; ")[0] for line in fresh[:2]]
    assert block[2] == fresh[2], "regenerate: python experiments/learning_rate.py && python experiments/results.py"
    # the rest follows from its numbers: 2/λ_max, the smallest rate slow, the 2× and larger rates stopped
    lam, two_over = (float(v) for v in re.findall(r"λ_max = ([\d.]+)`", block[0]))
    assert abs(2 / lam - two_over) < 1e-4
    slow, best = re.search(r"smallest rate \(([\d.]+)×\) is at loss ([\d.]+), the best \(([\d.]+)×\) at ([\d.]+)",
                           block[1]).group(2, 4)
    assert float(slow) > 2 * float(best)
    stopped = [float(f) for f in re.findall(r"([\d.]+)× at epoch", block[1])]
    assert stopped and min(stopped) > 1
    assert re.search(r"; 1× did not diverge, its loss rose on [1-9]", block[1])  # survives, not monotonically
    small, large = re.search(r"decrease ([-\d.]+) \(quadratic\).*; ([-\d.]+) and", block[2]).group(1, 2)
    assert float(small) > 0.95 and float(large) < 0  # the cost goes up beyond 2/λ_max


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
    # every number of the README's block is fixed by the script's constants (a quick run only stops gradient
    # descent sooner, after it has converged): the block must be this fresh run's
    results = importlib.import_module("results")
    assert results.render_newton(r) == results.blocks(results.README.read_text())["newton"], (
        "regenerate: python experiments/newton.py && python experiments/results.py")


def test_gradient_agreement(tmp_path, mnist_dir):
    r = run("gradient_agreement", tmp_path, "--data-dir", str(mnist_dir))
    assert r["checked_epochs"] == [0, 1, 2]
    for diffs in r["max_rel_diff"].values():
        assert np.asarray(diffs).shape == (3, 3)  # (checks, layers)
    assert r["max_observed"] <= 1e-5 and r["claim_holds"]
    assert r["final_held_out_accuracy"] > 0.85
    # The README's block quotes the default run (experiments/results.py). Its differences are rounding-level
    # and move with XLA's fusion decisions, so its form is checked against a fresh render, and the claim's
    # bound against the numbers it quotes.
    results = importlib.import_module("results")
    block = quoted_block("gradient_agreement")
    assert skeleton(block) == skeleton(results.render_gradient_agreement({**r, "quick": False})), REGENERATE
    checks, last, largest, per_batch, bound = re.search(
        r"(\d+) checks \(epochs 0–(\d+)\): largest per-layer relative difference (\S+) \((.*)\); "
        r"the claim ≤ (\S+) holds\.", block).groups()
    quoted = [float(v) for v in re.findall(r": (\S+?)(?:;|$)", per_batch)]
    assert int(checks) == int(last) + 1 and len(quoted) == 3
    assert float(largest) == max(quoted) <= float(bound) == 1e-5
    total, batches = (int(v) for v in re.search(r"over the (\d+) checks of the (\d+) batches", block).groups())
    assert total == int(checks) * batches
    zeros = [int(v) for v in re.findall(r"layer \d in (\d+)", block)]
    assert len(zeros) == len(r["sizes"]) - 1 and all(0 <= z <= total for z in zeros)


def test_mnist(tmp_path, mnist_dir):
    r = run("mnist", tmp_path, "--data-dir", str(mnist_dir))
    assert len(r["history"]) == 2 and r["stopped"] is None
    confusion = np.asarray(r["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 2000
    assert r["misclassified"] == 2000 - np.trace(confusion)
    assert r["final_held_out_accuracy"] == pytest.approx(np.trace(confusion) / 2000)
    assert r["final_held_out_accuracy"] > 0.9
    # the README's block (default run): the form of a fresh render, and what section 10 says follows from
    # its numbers: the claim's 95 %, the counts, the best and lowest epochs, over-fitting after the lowest
    results = importlib.import_module("results")
    block = quoted_block("mnist")
    assert skeleton(block) == skeleton(results.render_mnist({**r, "quick": False})), REGENERATE
    epochs, acc, wrong, n, best_epoch, best, loss, lowest, lowest_epoch, last, train_loss = re.search(
        r"after (\d+) epochs: held-out accuracy ([\d.]+) % \(([\d,]+) of ([\d,]+) wrong; best epoch (\d+): "
        r"([\d.]+) %\), training accuracy [\d.]+ %; held-out loss ([\d.]+) \(lowest, ([\d.]+), at epoch (\d+) "
        r"of (\d+)\) against a training loss of ([\d.]+)", block).groups()
    wrong, n = int(wrong.replace(",", "")), int(n.replace(",", ""))
    assert acc == f"{100 * (n - wrong) / n:.2f}" and float(acc) >= 95  # the claim
    assert float(best) >= float(acc) and 1 <= int(best_epoch) <= int(epochs) == int(last)
    assert float(train_loss) < float(lowest) < float(loss) and int(lowest_epoch) < int(last)  # over-fits after
    assert float(best) - float(acc) < 0.5  # which the held-out accuracy hardly shows
    digits = {int(d): float(a) for d, a in re.findall(r"(\d): ([\d.]+)(?:,|;)", block)}
    assert list(digits) == list(range(10))
    hardest = min(digits, key=digits.get)
    assert f"; hardest {hardest} ({digits[hardest]:.1f} %)" in block


def skeleton(text: str) -> set[str]:
    """The lines of ``text`` with every number (and ∞) replaced by ``#``: a block's form, whatever its run."""
    return {re.sub(r"(?<![\w.])[-+]?\d+(?:[,.]\d+)*(?:e[-+]\d+)?|∞", "#", line) for line in text.splitlines()}


def quoted_block(name: str) -> str:
    """The results block ``name`` of experiments/README.md (see experiments/results.py)."""
    results = importlib.import_module("results")
    return results.blocks(results.README.read_text())[name]


REGENERATE = "the block's form is not the renderer's: python experiments/<name>.py && python experiments/results.py"


def test_batch_sizes(tmp_path):
    r = run("batch_sizes", tmp_path)
    runs, seeds, epochs = r["runs"], r["seeds"], r["epochs"]
    assert list(runs) == ["B = N", "B = 128", "B = 32", "B = 1"] and seeds >= 2
    final = {name: np.asarray(run["full_train_cost"])[:, -1] for name, run in runs.items()}
    # more, noisier steps per epoch make more progress per epoch, in every seed
    assert np.all(final["B = 1"] < final["B = 32"]) and np.all(final["B = 32"] < final["B = 128"])
    assert np.all(final["B = 128"] < final["B = N"])
    assert runs["B = 1"]["steps_per_epoch"] == r["n"]
    for one in runs.values():
        costs, seconds = np.asarray(one["full_train_cost"]), np.asarray(one["epoch_seconds"])
        assert costs.shape == (seeds, epochs + 1) and seconds.shape == (seeds, epochs) and np.all(seconds > 0)
        # the time axis is the measured epoch times summed up, not epochs × a typical epoch
        np.testing.assert_array_equal(one["training_seconds"],
                                      np.concatenate([np.zeros((seeds, 1)), np.cumsum(seconds, axis=1)], axis=1))
        assert one["compile_seconds"] > 0 and one["first_call_seconds"] > 0
    costs = {name: np.asarray(c) for name, c in r["step_costs"].items()}
    assert costs["B = 1"].std() / costs["B = 1"].mean() > 3 * costs["B = 128"].std() / costs["B = 128"].mean()
    noise = r["gradient_noise"]
    ratio = np.asarray(noise["measured"]) / np.asarray(noise["predicted"])
    assert np.all((ratio > 0.5) & (ratio < 2))
    # Every level of the ladder: the batch sizes no other beats, recomputed from the costs and the times.
    # A level first met after epoch e was reached within (T_{e-1}, T_e]; a beats b where a's latest upper
    # bound over the seeds is below b's earliest lower bound.
    assert r["levels"] == sorted(r["levels"], reverse=True) and r["ladder"]
    for step in r["ladder"]:
        for compile_too, key in ((False, "leaders"), (True, "leaders_with_compile")):
            bounds = {}
            for name, one in runs.items():
                shift = one["compile_seconds"] + one["first_call_seconds"] if compile_too else 0.0
                pairs = []
                for c, t in zip(one["full_train_cost"], one["training_seconds"]):
                    e = next((e for e, v in enumerate(c) if v <= step["level"]), None)
                    pairs.append((t[-1] + shift, np.inf) if e is None else (t[max(e - 1, 0)] + shift, t[e] + shift))
                bounds[name] = (min(lo for lo, _ in pairs), max(hi for _, hi in pairs))
            beaten = {b for a in bounds for b in bounds if b != a and bounds[a][1] < bounds[b][0]}
            expected = [n for n in runs if np.isfinite(bounds[n][1]) and n not in beaten]
            assert step[key] == expected and expected, (step["level"], key)
    # the README's block (default run): a row per batch size, then a row per level, from easy to hard
    block = importlib.import_module("results").blocks(
        importlib.import_module("results").README.read_text())["batch_sizes"]
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert [row[0][2:] for row in rows[1:5]] == list(runs)
    levels = [float(row[0][2:]) for row in rows[6:]]
    assert levels and levels == sorted(levels, reverse=True)
    for row in rows[6:]:  # a batch size called first reached the level in every seed
        epochs_quoted = dict(zip(runs, row[1].split("; ")))
        for cell in row[2:4]:
            first = cell.removesuffix(" |")
            if first in runs:
                assert "–" not in epochs_quoted[first], row


@pytest.mark.parametrize("seed", [0, 1000])  # the claim holds in both seed ranges
def test_batchnorm(tmp_path, mnist_dir, seed):
    r = run("batchnorm", tmp_path, "--data-dir", str(mnist_dir), "--seed", str(seed))
    seeds, steps, tail = r["seeds"], r["steps"], r["last_epochs"]
    acc = {name: np.asarray(curve) for name, curve in r["accuracy"].items()}  # (seeds, epochs)
    assert seeds == list(range(seed, seed + len(seeds))) and len(seeds) >= 2
    assert acc["with BN"].shape == acc["without BN"].shape == (len(seeds), r["epochs"])
    assert not np.array_equal(acc["with BN"][0], acc["with BN"][1])  # another seed, another run
    for name, a in acc.items():  # the per-seed measures, recomputed from the curves
        m = r["per_seed"][name]
        np.testing.assert_allclose(m["after_first_epoch"], a[:, 0])
        np.testing.assert_allclose(m["mean_last_epochs"], a[:, -tail:].mean(axis=1))
        assert m["steps_to_level"] == [next((s for s, v in zip(steps, row) if v >= r["level"]), None) for row in a]
    end = acc["with BN"][:, -tail:].mean(axis=1) - acc["without BN"][:, -tail:].mean(axis=1)
    np.testing.assert_allclose(r["difference"]["mean_last_epochs"], end)
    f = r["findings"]
    assert f["higher_at_end_every_seed"] == bool(end.min() > 0) and f["lower_at_end_every_seed"] == bool(end.max() < 0)
    gap = acc["with BN"] - acc["without BN"]
    assert f["higher_share_second_half"] == pytest.approx(np.mean(gap[:, r["epochs"] // 2:] > 0))
    assert f["higher_after_first_epoch_every_seed"]  # BN's early lead holds even at the quick sizes
    # the README's block (default run): a row per seed, and its summary the range of those rows
    results = importlib.import_module("results")
    block = results.blocks(results.README.read_text())["batchnorm" if seed == 0 else f"batchnorm@{seed}"]
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(row[0][2:]) for row in rows] == list(range(seed, seed + len(rows))) and len(rows) >= 2
    quoted = [float(row[4].removesuffix(" |")) for row in rows]
    assert f"at the end {min(quoted):+.2f} to {max(quoted):+.2f}" in block
    assert f"every seed: {'yes' if min(quoted) > 0 else 'no'}" in block


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


def _pareto_sse(batch, steps, s_min, b_crit):
    """Squared error in log ``S`` of ``S(B) = S_min (1 + B_crit/B)`` (arrays broadcast) against ``steps``."""
    model = np.log(s_min)[..., None] + np.log1p(np.asarray(b_crit)[..., None] / batch)
    return np.sum((np.log(steps) - model) ** 2, axis=-1)


@pytest.mark.parametrize("seed", [0, 1000])  # the claim holds in both seed ranges
def test_gradient_noise(tmp_path, mnist_dir, seed):
    r = run("gradient_noise", tmp_path, "--data-dir", str(mnist_dir), "--seed", str(seed))
    b = np.asarray(r["noise_scale"], dtype=float)
    assert b.shape == (r["seeds"], r["epochs"]) == (2, 3)
    assert np.all(np.asarray(r["grad_trace_cov"]) > 0)  # per-example gradients differ
    q = [np.asarray(r[k]) for k in ("norm_p10", "norm_median", "norm_p90", "norm_max")]
    assert all(np.all(lo <= hi) for lo, hi in zip(q, q[1:])) and np.all(q[0] > 0)
    # with ‖G‖² resolved (> 0), B_simple is the ratio of the two recorded means
    sq = np.asarray(r["grad_sq"])
    np.testing.assert_allclose(b[sq > 0], np.asarray(r["grad_trace_cov"])[sq > 0] / sq[sq > 0], rtol=1e-6)
    # The ladder: each row's S is the geometric mean of its seeds' steps, E = B·S, and as B grows the steps
    # fall (or level off, up to 20 %: the seeds' spread at the largest batches) and the examples rise (up to 10 %)
    lad = r["ladder"]
    rows, rates = lad["rows"], lad["rates"]
    batch = np.array([row["batch"] for row in rows], float)
    steps, mean = np.asarray(lad["steps"], float), np.array([row["steps_mean"] for row in rows])
    assert steps.shape == (lad["seeds"], len(rows)) == (2, 3) and np.all(np.diff(batch) > 0)
    np.testing.assert_allclose(mean, np.exp(np.log(steps).mean(axis=0)), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(lad["examples"], float), steps * batch)
    assert np.all(mean[1:] <= 1.2 * mean[:-1]) and np.all((batch * mean)[1:] >= 0.9 * (batch * mean)[:-1])
    assert mean[-1] < mean[0] / 2  # batches 16× larger take far fewer steps
    # the chosen rate has the fewest steps of the rates tried, and both its neighbours on the grid were tried
    # and are no better, unless it is at an end of the grid, which the row then says
    for row in rows:
        tried = {float(k): float(v) for k, v in row["tried"].items()}
        k = rates.index(row["rate"])
        assert tried[row["rate"]] == min(tried.values()) == pytest.approx(row["steps_mean"])
        assert row["at_edge"] == (k in (0, len(rates) - 1))
        assert all(tried[rates[j]] >= tried[row["rate"]] for j in (k - 1, k + 1) if 0 <= j < len(rates))
    # the fits: B_crit = E_min/S_min, and no (S_min, B_crit) on a grid around the reported one fits better
    grid = np.meshgrid(np.geomspace(0.5, 2, 61), np.geomspace(0.25, 4, 121))
    for fit, s in [(lad["fit"], mean), *zip(lad["fit_per_seed"], steps)]:
        assert fit["e_min"] == pytest.approx(fit["s_min"] * fit["b_crit"], rel=1e-9) and not fit["at_bound"]
        best = _pareto_sse(batch, s, fit["s_min"], fit["b_crit"])
        assert best <= _pareto_sse(batch, s, fit["s_min"] * grid[0], fit["b_crit"] * grid[1]).min() + 1e-9
        assert np.sqrt(best / len(rows)) == pytest.approx(fit["rms_log"], rel=1e-6)
    assert lad["b_crit_per_seed"] == [f["b_crit"] for f in lad["fit_per_seed"]]
    # B_simple at the target: the ratio of the whole set's tr(Σ) and ‖G‖² (> 0), and per seed the median of its
    # runs over its B_crit; within an order of magnitude of B_crit (the paper's claim) even in the quick run
    at_target = np.asarray(lad["b_simple_at_target"], float)
    for i, row in enumerate(rows):
        assert np.all(np.asarray(row["grad_sq"]) > 0)
        np.testing.assert_allclose(row["b_simple"], np.asarray(row["trace_cov"]) / np.asarray(row["grad_sq"]))
        np.testing.assert_allclose(at_target[:, i], row["b_simple"])
    ratios = np.median(at_target, axis=1) / np.asarray(lad["b_crit_per_seed"])
    np.testing.assert_allclose(lad["ratio_per_seed"], ratios)
    assert lad["ratio"] == pytest.approx(np.median(at_target) / lad["fit"]["b_crit"])
    assert np.all(np.abs(np.log10(ratios)) <= 1)
    assert r["ladder_verdict"].startswith(f"B_simple at the target is within an order of magnitude of B_crit in all "
                                          f"{lad['seeds']} seeds")
    # the README's block (default run): the form of a fresh render, each factor the ratio of the values its
    # row quotes, the summary the range of the rows, and what section 14 says of them
    results = importlib.import_module("results")
    block = quoted_block("gradient_noise" if seed == 0 else f"gradient_noise@{seed}")
    assert skeleton(block) == skeleton(results.render_gradient_noise({**r, "quick": False})), REGENERATE
    over, ladder = block.split("- Critical batch size")
    rows = [[c.strip(" |`") for c in line.split(" | ")] for line in over.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(seed, seed + len(rows))) and len(rows) >= 2

    def value(cell):
        return np.inf if cell == "∞" else float(cell.replace(",", ""))

    def span(column):  # the quoted "lo–hi" of a column, as its cells write it
        cells = [row[column] for row in rows]
        return f"{min(cells, key=value)}–{max(cells, key=value)}"

    for seed_, first, second, late, growth, *_ in rows:
        ratio = value(late) / value(first)
        assert abs(value(growth) - ratio) <= 0.051 + ratio * (0.5 / value(first) + 0.5 / value(late)), seed_
        # grows, jumps in epoch 2 (more than 2×), and keeps growing after it
        assert value(growth) > value(second) > 2, seed_
    grows = sum(value(row[4]) > 1 for row in rows)
    rose, steps_ = (sum(int(row[5].split(" of ")[i]) for row in rows) for i in (0, 1))
    assert (f"epoch 1 in {grows} of {len(rows)} seeds: from {span(1)} in epoch 1 to {span(3)} (a factor {span(4)}); "
            f"epoch 2 alone {span(2)}× epoch 1; after that it rose in {100 * rose / steps_:.0f} % of the {steps_} "
            "epoch-to-epoch steps") in over
    assert f"≤ 0 in {sum(int(row[6].split(' of ')[0]) for row in rows)} of " in over
    # and the rest of section 14's reading: rises in about half of the later steps, some epochs unresolved, the
    # training loss down by orders of magnitude, the median per-example norm down while the largest stays large
    assert 0.3 < rose / steps_ < 0.7 and any(int(row[6].split(" of ")[0]) > 0 for row in rows)
    loss, median, spread = (tuple(float(v) for v in re.search(rf"{what} ([\d.]+) → ([\d.]+)", over).groups())
                            for what in ("training loss", "gradient norm", "largest over median"))
    assert loss[1] < loss[0] / 100 and median[1] < median[0] and spread[1] > spread[0]
    # The ladder's block: E = B·S per row, S falling and E rising with B (up to 10 %), B_crit = E_min/S_min as
    # quoted, and section 14's reading: B_simple at the target above B_crit, within a factor 10, in every seed
    table = [[c.strip(" |`") for c in line.split(" | ")] for line in ladder.splitlines()
             if line.startswith("| ") and line[2].isdigit()]
    quoted = np.array([[value(row[0]), value(row[2].split(" [")[0]), value(row[3])] for row in table])
    assert len(table) >= 3 and np.all(np.abs(quoted[:, 0] * quoted[:, 1] - quoted[:, 2]) <= 0.05 * quoted[:, 0] + 0.5)
    assert np.all(quoted[1:, 1] <= 1.2 * quoted[:-1, 1]) and np.all(quoted[1:, 2] >= 0.9 * quoted[:-1, 2])
    s_min, e_min, b_crit = (value(v) for v in re.search(
        r"`S_min` = ([\d.]+), `E_min` = ([\d,]+), `B_crit = E_min/S_min` = ([\d,]+)", ladder).groups())
    assert abs(e_min / s_min - b_crit) <= b_crit * (0.05 / s_min + 0.5 / e_min) + 0.5
    assert s_min <= 1.1 * quoted[:, 1].min() and e_min <= 1.1 * quoted[:, 2].min()  # the asymptotes, below the rows
    lo, hi, within, above = re.search(r"over its `B_crit`: ([\d.]+)–([\d.]+), within a factor 10 in (\d+) of \d+ "
                                      r"seeds, above 1 in (\d+) of", ladder).groups()
    n = int(re.search(r"in (\d+) of (\d+) seeds, above", ladder).group(2))
    assert int(within) == int(above) == n and 1 < float(lo) <= float(hi) <= 10


def test_private_mnist(tmp_path, mnist_dir):
    r = run("private_mnist", tmp_path, "--data-dir", str(mnist_dir))
    from fnn import privacy

    rows = r["rows"]
    assert list(rows) == ["0.5", "2.0", "8.0"] and [v["sigma"] for v in rows.values()] == [8, 4, 2]
    assert r["normalization"] == {"mean": 0.1307, "std": 0.3081}  # public constants, no private statistic
    for target, v in rows.items():
        # the accountant's ε of the run is what an independent call gives for its steps, within the target
        assert v["epsilon"] == pytest.approx(privacy.privacy_spent(r["q"], v["sigma"], v["steps"], r["delta"]))
        assert v["epsilon"] <= float(target) and v["steps"] == v["epochs"] * r["steps_per_epoch"]
        assert abs(v["plain_steps"] - v["steps"]) <= r["plain_steps_per_epoch"]  # the plain run's closest epoch
        assert v["range"][0] <= v["mean"] <= v["range"][1]
    assert r["plain_curves"][0][-1] > 0.5  # the quick non-private run learns something
    # the default run's number of epochs per ε: the most whole epochs whose ε stays within the target
    mod = importlib.import_module("private_mnist")
    q = 600 / 8000
    for target, (sigma, _) in mod.PAPER.items():
        e = mod.epochs_allowed(target, sigma, q, 13)
        assert privacy.privacy_spent(q, sigma, 13 * e, 1e-5) <= target < privacy.privacy_spent(q, sigma, 13 * e + 13,
                                                                                                  1e-5)
    # the README's blocks (default-mode runs, both seed ranges): the form of a fresh render, and the words
    # those their tables give
    results = importlib.import_module("results")
    fresh = results.render_private_mnist({**r, "quick": False}).splitlines()
    for key in ("private_mnist", "private_mnist@1000"):
        block = quoted_block(key).splitlines()
        assert skeleton("\n".join(block[1:-1])) == skeleton("\n".join(fresh[1:-1])), REGENERATE
        table = [[c.strip(" |") for c in line.split(" | ")] for line in block
                 if line.startswith("| ") and line[2].isdigit()]
        assert [float(row[0]) for row in table] == [0.5, 2, 8]

        def spread(cell):
            mean, lo, hi = (float(v) for v in re.match(r"([\d.]+) \[([\d.]+)–([\d.]+)\]", cell).groups())
            assert lo <= mean <= hi, cell
            return mean, lo, hi

        means, below, under = [], [], []
        for target, sigma, steps, spent, acc, _, plain, paper, gap in table:
            mean, lo, hi = spread(acc)
            assert float(sigma) == mod.PAPER[float(target)][0] and int(steps.replace(",", "")) % 13 == 0
            # the ε quoted is the accountant's for the quoted σ and steps at the default run's q = 600/8000
            assert spent == f"{privacy.privacy_spent(q, float(sigma), int(steps.replace(',', '')), 1e-5):.3f}"
            assert float(spent) <= float(target), (key, target)
            assert abs(float(paper) - mean - float(gap)) <= 0.051, (key, target)
            means.append(mean)
            below += [target] if hi < float(paper) else []
            under += [target] if hi < spread(plain)[1] else []
        rises = all(a < b for a, b in zip(means, means[1:]))
        assert block[-1] == (f"- mean accuracy {'rises' if rises else 'does not rise'} with ε at every step; every "
                             f"seed below the paper's figure at ε = {', '.join(below) or 'none'}; every private seed "
                             f"below every non-private one at ε = {', '.join(under) or 'none'}.")

def test_lanczos_top_is_the_largest_eigenvalue_of_an_explicit_hessian():
    # the experiment's Lanczos against numpy.linalg.eigvalsh of jax.hessian, on a network small enough to form it
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import fnn

    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    eos = importlib.import_module("edge_of_stability")
    net = fnn.MLP((3, 5, 2), "tanh", "identity")
    rng = np.random.default_rng(0)
    params = net.init(jax.random.PRNGKey(0), jnp.float64)
    x, y = jnp.asarray(rng.normal(size=(7, 3))), jnp.asarray(rng.normal(size=(7, 2)))
    flat, unravel = ravel_pytree(params)
    exact = np.linalg.eigvalsh(np.asarray(jax.hessian(
        lambda t: fnn.objective(net, unravel(t), x, y, fnn.losses.mse))(flat)))

    def product(u):
        return ravel_pytree(fnn.curvature.hvp(net, params, x, y, fnn.losses.mse, unravel(u)))[0]

    value, vector, residual = eos.lanczos_top(product, jnp.asarray(rng.normal(size=flat.shape)), flat.size)
    assert abs(float(value) - exact[-1]) <= 1e-10 * abs(exact[-1])  # P steps: the whole Krylov space
    assert float(jnp.linalg.norm(product(vector) - value * vector)) <= 1e-8 * abs(exact[-1])
    value, vector, residual = eos.lanczos_top(product, jnp.asarray(rng.normal(size=flat.shape)), 8)
    # fewer steps: a Ritz value within its residual of an eigenvalue, and never above the largest
    assert float(value) <= exact[-1] + 1e-12 and np.min(np.abs(exact - float(value))) <= float(residual) + 1e-12
    assert abs(float(jnp.linalg.norm(product(vector) - value * vector)) - float(residual)) <= 1e-8


def _edge_verdicts(sharp, eta, initial, low=0.9, high=1.15, hover=0.8, min_after=10):
    """The experiment's verdicts, restated from its docstring."""
    edge = 2 / eta
    reached = [i for i, s in enumerate(sharp) if s >= low * edge]
    if initial >= low * edge:
        rise = "starts at or above 2/η"
    elif reached:
        rise = "rises to 2/η"
    elif max(sharp) > 1.2 * initial:
        rise = "rises short of 2/η"
    else:
        rise = "does not rise"
    after = sharp[reached[0]:] if reached else []
    inside = sum(low * edge <= s <= high * edge for s in after)
    return rise, len(after) >= min_after and inside >= hover * len(after)


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
    assert [s["seed"] for s in r["per_seed"]] == [0, 1]
    params = net.init(jax.random.split(jax.random.PRNGKey(0), 3)[0])
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda t: fnn.objective(net, unravel(t), x, y, fnn.losses.mse))
    hv = jax.jit(lambda v: jax.jvp(grad, (flat,), (v,))[1])
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape, flat.dtype)
    for _ in range(300):
        w = hv(v / jnp.linalg.norm(v))
        lam, v = float(jnp.vdot(v / jnp.linalg.norm(v), w)), w
    first = r["per_seed"][0]
    assert abs(first["initial_sharpness"] - lam) <= 1e-3 * lam
    for s in r["per_seed"]:
        for run_, eta in zip(s["runs"], r["etas"]):
            costs, sharp = np.asarray(run_["costs"], float), np.asarray(run_["sharpness"], float)
            assert costs.shape == (r["steps"] // r["cost_every"],) and sharp.shape == (r["steps"] // r["every"],)
            assert np.all(np.isfinite(costs)) and costs[-1] < costs[0]
            assert max(run_["relative_residual"]) < 1e-2  # each measurement within 1 % of an eigenvalue
            # a run that did not diverge cannot have stayed far above the stability limit 2/η
            assert np.median(sharp[len(sharp) // 2:]) <= 1.5 * 2 / eta
            assert (run_["rise"], run_["hovers"]) == _edge_verdicts(list(sharp), eta, s["initial_sharpness"])
    for i, summary in enumerate(r["summary"]):
        runs = [s["runs"][i] for s in r["per_seed"]]
        assert summary["rises_to_edge"] == sum(x["rise"] == "rises to 2/η" for x in runs)
        assert summary["hovers"] == sum(x["hovers"] for x in runs)
    # where 2/η lies below the initial sharpness, gradient descent brings the sharpness down towards 2/η
    for s in r["per_seed"]:
        for run_, eta in zip(s["runs"], r["etas"]):
            if 2 / eta < 0.9 * s["initial_sharpness"]:
                assert run_["sharpness"][-1] < s["initial_sharpness"]
    # the README's blocks (default-mode runs, both seed ranges): every verdict is the one its quoted numbers give
    results = importlib.import_module("results")
    blocks = results.blocks(results.README.read_text())
    for key in ("edge_of_stability", "edge_of_stability@1000"):
        rows = [[c.strip(" |%") for c in line.split(" | ")] for line in blocks[key].splitlines()
                if line.startswith("| ") and line[2].isdigit()]
        assert len(rows) == 12, key  # 4 step sizes × 3 seeds
        fell = {}
        for eta, edge, seed, initial, first_at, largest, inside, rise, hovers, costs, rose in rows:
            mid, final = (float(c) for c in costs.split(" → "))
            fell[eta] = fell.get(eta, 0) + (final < mid)
            assert 0 <= float(rose) <= 100
            eta, edge, initial, largest = float(eta), float(edge), float(initial), float(largest)
            assert f"{2 / eta:.2f}" == f"{edge:.2f}"
            assert (rise == "starts at or above 2/η") == (initial >= 0.9 * edge - 0.005), (key, eta, seed)
            if first_at == "never":  # (the quoted figures are rounded to 0.005)
                assert largest < 0.9 * edge + 0.005 and rise in ("rises short of 2/η", "does not rise"), (key, eta)
            else:
                assert largest >= 0.9 * edge - 0.005, (key, eta, seed)
            share, count = inside.replace(" %", "").split(" of ")
            if abs(float(share) - 80) > 0.5:  # a share quoted as 80 % may lie on either side of it
                assert (hovers == "yes") == (int(count) >= 10 and float(share) >= 80), (key, eta, seed)
        for eta, count in fell.items():  # the summary's counts
            line = next(x for x in blocks[key].splitlines() if x.startswith(f"- η = {eta}: "))
            assert f"the cost fell over the second half in {count} of 3" in line, (key, eta)


def test_laplace(tmp_path, mnist_dir):
    r = run("laplace", tmp_path, "--data-dir", str(mnist_dir))
    mod = importlib.import_module("laplace")
    # the helpers, against direct computations: AUROC by counting pairs, a quarter turn by np.rot90
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40) / 4, rng.integers(0, 5, 30) / 4  # with ties
    pairs = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert mod.auroc(a, b) == pytest.approx(pairs, abs=1e-12)
    img = rng.uniform(size=(3, 784))
    turned = mod.rotate(img, 90).reshape(3, 28, 28)
    assert np.allclose(turned, np.rot90(img.reshape(3, 28, 28), k=1, axes=(1, 2)), atol=1e-6) or \
        np.allclose(turned, np.rot90(img.reshape(3, 28, 28), k=-1, axes=(1, 2)), atol=1e-6)
    assert np.allclose(mod.rotate(img, 0), img)
    # (a): the argmaxes and their distance are those of the grid's numbers
    betas = r["betas"]
    for run_ in r["runs"]:
        ev = [g["evidence"]["kron"] for g in run_["grid"]]
        ll = [g["held_out"]["log_likelihood"] for g in run_["grid"]]
        assert run_["evidence_argmax"] == betas[int(np.argmax(ev))]
        assert run_["steps_apart"] == abs(int(np.argmax(ev)) - int(np.argmax(ll)))
        assert run_["log_likelihood_given_up"] == pytest.approx(max(ll) - ll[int(np.argmax(ev))])
        rows = run_["calibration"]["rows"]
        assert set(rows) == {"MAP", *mod.STRUCTURES}
        for m in (m for by_set in rows.values() for m in by_set.values()):
            assert 0 < m["confidence"] <= 1
            if "nll" in m:
                assert m["bins"] == mod.BINS and 0 <= m["ece"] <= 1 and m["nll"] > 0
    assert r["verdicts"]["evidence"].startswith("undecided")  # two β's: both argmaxes at an end
    # the README's blocks (default-mode runs, both seed ranges): the tables' form is a fresh render's, and
    # the words follow from the numbers they quote
    results = importlib.import_module("results")
    fresh = results.render_laplace({**r, "quick": False})

    def table_form(text):
        return skeleton("\n".join(ln for ln in text.splitlines() if ln.startswith("| ")))

    for key in ("laplace", "laplace@1000"):
        block = quoted_block(key)
        assert table_form(block) == table_form(fresh), REGENERATE
        grid = [float(ln.split(" | ")[0].strip("| ")) for ln in block.splitlines()
                if ln.startswith("| ") and ln[2].isdigit()]
        assert tuple(grid) == mod.BETAS
        seeds = re.findall(r"seed \d+: ([\d.e-]+) against ([\d.e-]+), (\d+) grid steps? apart", block)
        assert len(seeds) == 3
        apart = []
        for ev, ll, steps in seeds:
            i, j = grid.index(float(ev)), grid.index(float(ll))
            assert abs(i - j) == int(steps)
            apart.append((abs(i - j), {i, j} & {0, len(grid) - 1}))
        verdict = ("undecided (an argmax at the grid's end)" if any(end for _, end in apart) else
                   "holds" if max(s for s, _ in apart) <= 1 else
                   "does not hold" if min(s for s, _ in apart) >= 2 else "mixed")
        assert f"(a) The claim **{verdict}** here." in block
        kept = re.findall(r"held-out accuracy (not )?kept \(it moves by at most ([\d.]+) points\)", block)
        assert len(kept) == len(mod.STRUCTURES)
        for word, moved in kept:
            assert (float(moved) < 100 * mod.ACCURACY_SLACK) == (word == "")


def test_influence(tmp_path, mnist_dir):
    r = run("influence", tmp_path, "--data-dir", str(mnist_dir))
    mod = importlib.import_module("influence")
    # the helpers, against direct counting
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 500)
    noisy, flipped = mod.flip_labels(y, 0.1, rng)
    assert flipped.sum() == 50 and np.all(noisy[flipped] != y[flipped]) and np.all(noisy[~flipped] == y[~flipped])
    assert noisy.min() >= 0 and noisy.max() <= 9
    scores = rng.normal(size=500)
    counts, order = mod.detection_curve(scores, flipped), np.argsort(-scores)
    assert [counts[k] for k in (0, 1, 50, 100, 500)] == [flipped[order[:k]].sum() for k in (0, 1, 50, 100, 500)]
    perfect = mod.summarize(mod.detection_curve(flipped.astype(float), flipped))
    assert perfect["area"] == pytest.approx(1 - 0.1 / 2) and perfect["found"]["0.1"] == 50
    # the quick run: every curve starts at 0, never falls, ends at 1 and passes through the counts quoted
    for run_ in r["runs"]:
        assert np.allclose(run_["learning_rates"], mod.LR) and len(run_["learning_rates"]) == r["epochs"]
        for k in run_["rankings"].values():
            c = np.array(k["curve"])
            assert c[0] == 0 and c[-1] == 1 and np.all(np.diff(c) >= 0)
            for p in mod.AT:
                assert c[round(100 * p)] * run_["flipped"] == pytest.approx(k["found"][f"{p:g}"])
            assert k["area"] == pytest.approx((c[:-1] + c[1:]).sum() / 200, abs=0.01)
        assert 0.3 < run_["rankings"]["random"]["area"] < 0.7  # ½ in expectation only
        sub = run_["subset"]  # the preconditioner of a subset of the rows, every row scored
        assert sub["rows"] == min(mod.SUBSET, r["n"]) and -1 <= sub["spearman"] <= 1
        assert 0 <= sub["top_decile_overlap"] <= 1 and 0 <= sub["found"] <= run_["flipped"]
        assert sub["found_full"] == run_["rankings"]["EK-FAC"]["found"]["0.1"]  # the same full-fit ranking
    # self-influence finds flipped labels faster than random even after two epochs on 1,024 images
    assert r["verdicts"]["EK-FAC above random"]["verdict"] == "holds"
    assert r["verdicts"]["TracIn above random"]["verdict"] == "holds"
    # the README's blocks (default-mode runs, both seed ranges): the tables' form is a fresh render's, and
    # the verdicts follow from the per-seed numbers they quote
    results = importlib.import_module("results")
    fresh = results.render_influence({**r, "quick": False})

    def table_form(text):
        return skeleton("\n".join(ln for ln in text.splitlines() if ln.startswith("| ")))

    def word(hits):
        return "holds" if all(hits) else "does not hold" if not any(hits) else "mixed"

    row = re.compile(r"^\| (\d+) \| ([\w -]+) \| ([\d,]+) of ([\d,]+) \| ([\d,]+) of [\d,]+ \| [\d,]+ of [\d,]+ "
                     r"\| ([\d.]+) \|$", re.M)
    for key in ("influence", "influence@1000"):
        block = quoted_block(key)
        assert table_form(block) == table_form(fresh), REGENERATE
        seeds = {}
        for seed, name, f10, flipped_, f20, area in row.findall(block):
            seeds.setdefault(seed, {})[name] = (int(f10.replace(",", "")), int(f20.replace(",", "")),
                                                int(flipped_.replace(",", "")), float(area))
        assert len(seeds) == 3 and all(set(s) == set(mod.METHODS) for s in seeds.values())
        for name in ("EK-FAC", "TracIn"):
            hits = [s[name][0] > 0.1 * s[name][2] and s[name][1] > 0.2 * s[name][2] for s in seeds.values()]
            assert f"{name}: verdict **{word(hits)}** ({sum(hits)} of 3 seeds)" in block
        areas = [{m: s[m][3] for m in mod.METHODS} for s in seeds.values()]
        claims = {"(b) Koh & Liang: EK-FAC's area above the training loss's": ("EK-FAC", "training loss"),
                  "(c) Pruthi et al.: TracIn's area above both EK-FAC's and the training loss's": ("TracIn", "EK-FAC",
                                                                                               "training loss")}
        for text, (first, *others) in claims.items():
            if any(a[first] in [a[o] for o in others] for a in areas):
                continue  # a tie at the quoted digits: the words cannot be checked from the block
            hits = [all(a[first] > a[o] for o in others) for a in areas]
            assert f"{text} in every seed: verdict **{word(hits)}** ({sum(hits)} of 3 seeds)." in block


def test_influence_lds(tmp_path):
    """Part 2 of experiment 19 (``--lds``) on tiny float64 problems, then the committed default-mode runs of both
    seed ranges: their size, and verdicts that follow from the per-test-point LDS their JSON holds."""
    import jax
    import jax.numpy as jnp
    from scipy.stats import spearmanr

    import fnn

    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    mod = importlib.import_module("influence")
    rng = np.random.default_rng(0)
    net = fnn.MLP((5, 4, 3), "relu", "identity")
    x, xt = (jnp.asarray(rng.normal(size=(n, 5))) for n in (24, 6))
    y, yt = (jnp.asarray(rng.integers(0, 3, n)) for n in (24, 6))
    # the vmapped retraining of every (subset, init) is fnn.fit on that subset alone, one full batch an epoch
    subsets = np.stack([np.sort(rng.choice(24, 12, replace=False)) for _ in range(2)])
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    steps = 15
    losses = np.asarray(mod.retrained_losses(net, steps, x, y, xt, yt, jnp.asarray(subsets), keys))
    assert losses.shape == (2, 2, 6)
    for m, idx in enumerate(subsets):
        for k, key in enumerate(keys):
            fit = fnn.fit(net, net.init(key, jnp.float64), fnn.optim.adam(mod.lds_schedule(steps)), (x[idx], y[idx]),
                          loss=mod.LOSS, epochs=steps, batch_size=len(idx), key=7, l2=mod.LDS_BETA, quiet=True)
            logp = np.asarray(jax.nn.log_softmax(net.apply(fit.params, xt)))
            np.testing.assert_allclose(losses[m, k], -logp[np.arange(6), np.asarray(yt)], rtol=1e-9)
    assert not np.allclose(losses[0], losses[1])  # the subsets matter
    # the checkpoints of one run: the last one is the run of `steps` steps
    stacked = mod.train_on(net, steps, 5, x, y, jnp.arange(24), keys[0])
    assert jax.tree.leaves(stacked)[0].shape[0] == 3
    alone = mod.train_on(net, steps, steps, x, y, jnp.arange(24), keys[0])
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(alone)):
        np.testing.assert_allclose(a[-1], b[0], rtol=1e-12)
    # the linear datamodel sums each subset's scores; the LDS is Spearman's ρ per test point (SciPy's)
    scores = rng.normal(size=(6, 24))
    predicted = mod.linear_datamodel(scores, subsets, 24)
    np.testing.assert_allclose(predicted, [[scores[t, s].sum() for t in range(6)] for s in subsets])
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    b[:, 0] = a[:, 0] ** 3  # a monotone relation: ρ = 1
    np.testing.assert_allclose(mod.spearman(a, b), [spearmanr(a[:, t], b[:, t])[0] for t in range(4)], atol=1e-12)
    assert mod.spearman(a, b)[0] == pytest.approx(1.0)

    # the committed runs, both seed ranges: recompute every verdict from the per-test-point LDS
    def word(hits):
        return "holds" if all(hits) else "does not hold" if not any(hits) else "mixed"

    results = importlib.import_module("results")
    for key, base in (("influence_lds", 0), ("influence_lds@1000", 1000)):
        r = json.loads((results.RESULTS / f"{key}.json").read_text())
        st = r["setting"]
        assert r["quick"] is False and r["base_seed"] == base and r["seeds"] == 3
        assert [run["seed"] for run in r["runs"]] == [base, base + 1, base + 2]
        assert st["subsets"] >= 50 and st["retrains"] >= 2 and st["test"] >= 100 and st["train"] >= 2000
        assert tuple(r["methods"]) == ("EK-FAC", "KFAC", "CG", "TracIn", "gradient dot products")
        means, sems = {}, {}
        for m in r["methods"]:
            v = np.array([run["lds"][m] for run in r["runs"]])
            assert v.shape == (3, st["test"]) and np.all(np.abs(v) <= 1)
            means[m], sems[m] = v.mean(1), v.std(1, ddof=1) / np.sqrt(st["test"])
            assert [q["mean"] for q in r["summary"][m]["per_seed"]] == pytest.approx(means[m], abs=1e-12)
        for m in r["methods"]:
            assert r["verdicts"][f"{m} above 0"]["verdict"] == word(means[m] > 2 * sems[m])
        for first, second in (("EK-FAC", "gradient dot products"), ("KFAC", "gradient dot products"),
                              ("CG", "gradient dot products"), ("TracIn", "gradient dot products"),
                              ("EK-FAC", "TracIn"), ("EK-FAC", "KFAC"), ("CG", "EK-FAC")):
            w = r["verdicts"][f"{first} at least {second}"]
            assert w["per_seed"] == list(means[first] >= means[second]) and w["verdict"] == word(w["per_seed"])
        assert len(r["verdicts"]) == 12
        assert (results.FIGURES / f"{key}.png").stat().st_size <= results.FIGURE_LIMIT
        text = results.render_influence_lds(r)
        assert all(f"| {m} | {means[m].mean():.3f} [" in text for m in r["methods"])
    # the figure of a committed run draws again
    args = importlib.import_module("common").parse_args("influence_lds", "", ["--out", str(tmp_path)])
    mod.lds_figure(args, r)
    assert (tmp_path / "influence_lds.png").read_bytes()[:8] == PNG_MAGIC
