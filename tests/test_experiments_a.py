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
    c = r["configs"]
    assert len(c) == 5 and all(len(v["grad_norm_W"]) == r["depth"] + 1 for v in c.values())
    assert c["sigmoid, classic U(±1/√n)"]["first_over_last"] < 1e-2  # vanishing gradient
    assert c["sigmoid, naive N(0, 1)"]["saturated_fraction"][-1] > 0.3  # saturation
    assert c["sigmoid, classic U(±1/√n)"]["saturated_fraction"][-1] < 0.05
    shrink = c["tanh, classic U(±1/√n)"]["activation_std"]
    assert shrink[-1] < shrink[0] / 2
    for label in ("tanh, Glorot U(±√(6/(n+m)))", "relu, He N(0, 2/n)"):
        assert 0.1 < c[label]["first_over_last"] < 10, label  # gradients keep their size


def test_optimizers(tmp_path, mnist_dir):
    r = run("optimizers", tmp_path, "--data-dir", str(mnist_dir))
    assert {"runs", "ranking", "iterations", "sizes", "threshold"} <= set(r)
    runs = r["runs"]
    assert set(runs) == {"SGD", "momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam"}
    first = [v["costs"][0] for v in runs.values()]
    np.testing.assert_allclose(first, first[0], rtol=1e-6)  # same init, same first batch
    for name, v in runs.items():
        assert len(v["costs"]) == r["iterations"] and np.all(np.isfinite(v["costs"])), name
        assert v["final_train_loss"] < v["costs"][0], name  # every optimizer made progress
    assert sorted(r["ranking"]) == sorted(runs)
