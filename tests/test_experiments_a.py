"""Experiments 1–6 run end to end in --quick mode, write their PNG and JSON, and show their claim."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

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


def test_perceptron(tmp_path):
    r = run("perceptron", tmp_path)
    assert {"blobs", "sweep", "all_within_bound", "worst_ratio", "xor", "cumulative_updates"} <= set(r)
    assert r["blobs"]["converged"] and r["blobs"]["updates"] <= r["blobs"]["bound"]
    assert r["all_within_bound"] and r["worst_ratio"] <= 1
    assert all(s["converged"] and 0 < s["updates"] <= s["bound"] for s in r["sweep"])
    assert not r["xor"]["converged"] and r["xor"]["train_accuracy"] <= 0.75
    xor_curve = r["cumulative_updates"]["xor"]
    assert all(b > a for a, b in zip(xor_curve, xor_curve[1:]))  # a mistake in every epoch, forever
    assert len(set(r["cumulative_updates"]["blobs"][-3:])) == 1  # converged: no more updates


def test_xor(tmp_path):
    r = run("xor", tmp_path)
    assert {"perceptron", "single_unit", "mlp_2_2_1", "learning_rate", "steps", "seeds"} <= set(r)
    assert not r["perceptron"]["converged"]
    assert min(r["single_unit"]["final_loss"]) >= math.log(2) - 1e-3  # a linear unit cannot beat ln 2
    mlp = r["mlp_2_2_1"]
    assert mlp["n_solved"] >= 1 and mlp["n_solved"] == sum(mlp["solved"])
    solved_losses = [loss for loss, ok in zip(mlp["final_loss"], mlp["solved"]) if ok]
    assert max(solved_losses) < 0.05


def test_universal_approximation(tmp_path):
    r = run("universal_approximation", tmp_path)
    assert {"widths", "rmse_best", "rmse_all_seeds", "sup_error_best"} <= set(r)
    for name in ("sin(x)", "|x|"):
        errors = r["rmse_best"][name]
        assert len(errors) == len(r["widths"])
        assert errors[-1] < 0.2 * errors[0], (name, errors)
    assert set(r["rmse_best"]) == {"sin(x)", "|x|", "step [x ≥ 0]"}


def test_capacity(tmp_path):
    r = run("capacity", tmp_path)
    assert {"widths", "train_mse", "held_out_mse", "best_width", "u_shaped", "rise_after_best"} <= set(r)
    train, held = np.array(r["train_mse_mean"]), np.array(r["held_out_mse_mean"])
    assert train[-1] < train[0] / 3  # more capacity fits the training set better
    assert r["best_width"] != r["widths"][0] and held.min() < 0.8 * held[0]  # width 1 under-fits
    assert held[-1] > held.min()  # the largest net is past the held-out minimum
    assert held.min() > 0.8 * r["noise_variance"]  # nothing beats the noise


def test_initialization(tmp_path, mnist_dir):
    r = run("initialization", tmp_path, "--data-dir", str(mnist_dir))
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
    rows = [line.split(" | ") for line in quoted_block("initialization").splitlines() if line.startswith("| ")]
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
