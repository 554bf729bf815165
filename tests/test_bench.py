"""The benchmark script runs in ``--quick`` mode and writes a complete JSON (no timing assertions)."""

from __future__ import annotations

import importlib
import json
import math
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark's quick run compiles and times every configuration

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def numbers(tree, path="$"):
    """Every number in a JSON tree as ``(path, value)``; non-finite floats are saved as strings."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree
    elif isinstance(tree, str):
        assert tree.lower() not in {"nan", "inf", "-inf"}, f"{path} is {tree}"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_quick(tmp_path):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    bench = importlib.import_module("bench")
    returned = bench.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["quick"] is True and saved["seconds"] > 0
    assert set(returned) <= set(saved)
    sections = {"machine", "steps", "epochs", "gpu", "per_example", "private", "curvature", "second_order", "laplace",
                "influence", "targets", "samples", "repeats"}
    assert sections <= set(saved)
    assert len(saved["per_example"]) == len(saved["steps"]) == 1
    for path, value in numbers(saved):
        assert math.isfinite(value), f"{path} = {value}"

    assert saved["machine"]["cores"] >= 1 and saved["machine"]["platform"]
    for step in saved["steps"]:
        assert step["steps_per_call"] >= 1
        assert set(step["ms"]) == set(step["ms_best"]) == set(step["cpu_per_wall"])
        assert {"step, manual backprop", "step, jax.grad", "fnn.train epoch, manual"} <= set(step["ms"])
        assert all(positive(v) for v in step["ms"].values())
        for key in ("manual_over_autodiff", "fnn_epoch_manual_over_autodiff", "fnn_epoch_over_plain_step"):
            ratio = step[key]
            assert positive(ratio["median"]) and len(ratio["rounds"]) == saved["repeats"]
        for program in step["compiled_ops"].values():
            assert program["instructions"] > 0 and program["dots"] + program["library_fusions"] > 0

    torch_present = saved["torch_version"] is not None
    for epoch in saved["epochs"]:
        assert epoch["samples"] == saved["samples"] and positive(epoch["params"])
        assert positive(epoch["matmul"]["gflops"]) and positive(epoch["fnn_over_reference"]["median"])
        for name in ("fnn", "fnn, grad_norm=False", "jax.grad reference"):
            c = epoch["contenders"][name]
            assert all(positive(c[k]) for k in ("samples_per_s", "samples_per_s_best", "gflops", "fraction_of_matmul",
                                                 "executed_fraction_of_matmul", "cpu_per_wall"))
        for timing in epoch["compile"].values():
            assert positive(timing["lower_s"]) and positive(timing["compile_s"])
        torch_rows = [name for name in epoch["contenders"] if name.startswith("torch")]
        if torch_present:
            assert len(torch_rows) == 2 and positive(epoch["fnn_over_fastest_torch"]["median"])
        else:  # torch is an optional extra: its columns are left out, with the reason
            assert not torch_rows and epoch["torch"] == saved["torch_skipped"] and "torch" in saved["torch_skipped"]

    for row in saved["gpu"]:
        assert row["dtype"] == "float32" and row["compute_dtype"] in {None, "bfloat16"}
        if saved["machine"]["platform"] == "cpu":
            assert row["measured"] is False and "unmeasured" in row["reason"]
        else:
            assert row["measured"] is True and positive(row["contenders"]["fnn"]["samples_per_s"])

    for per in saved["per_example"]:
        assert all(positive(v) for v in per["ms"].values())
        assert {"norms, δ", "norms, vmap(grad)", "clipped sum, δ", "clipped sum, vmap(grad)", "batch_grad, δ",
                "batch_grad, vmap(grad)", "gradient (fnn.backprop)"} <= set(per["ms"])
        for name, ratios in per["ratios"].items():
            assert name.endswith(", δ") and positive(ratios["over_gradient"]["median"])
        assert all(v is None or v >= 0 for v in per["memory_bytes"].values())

    private = saved["private"]
    assert positive(private["epochs"]["samples_per_s"]["ordinary epoch"])
    assert {"private epoch", "private epoch, chunk 64"} == set(private["epochs"]["private_over_ordinary"])
    assert all(positive(v) for v in private["steps"]["ms"].values())
    assert positive(private["steps"]["vmap_over_delta"]["median"])
    assert set(private["noise"]["ms"]) == {"jax.random.normal", "fnn.noise.normal"}
    assert positive(private["noise"]["jax_over_fused"]["median"]) and private["noise"]["parameters"] > 0

    assert len(saved["curvature"]) == 1
    for c in saved["curvature"]:
        assert all(positive(v) for v in c["ms"].values())
        assert {"gradient (fnn.backprop)", "H v, by hand", "H v, jvp(grad)", "G v, by hand", "G v, autodiff",
                "exact GGN diagonal, by hand", "exact GGN diagonal, autodiff", "MC GGN diagonal (1 sample), by hand",
                "KFLR factors, by hand", "KFAC factors (1 sample), by hand"} == set(c["ms"])
        for name, ratios in c["ratios"].items():
            assert name.endswith(", by hand") and positive(ratios["over_gradient"]["median"])
        assert {name for name, r in c["ratios"].items() if "autodiff_over_hand" in r} == {
            "H v, by hand", "G v, by hand", "exact GGN diagonal, by hand"}

    second = saved["second_order"]
    assert list(second["ms"]) == ["Adam step", "K-FAC step, inverses reused",
                                  "K-FAC step, inverses refreshed (1 in 10)", "Hessian-free step, 5 CG iterations",
                                  "Hessian-free step, 20 CG iterations"]
    assert all(positive(v) for v in second["ms"].values())
    assert len(second["over_adam"]) == 2 + 4 and all(len(r["rounds"]) == saved["repeats"]
                                                     for r in second["over_adam"].values())
    # the refresh period's mean lies between the two K-FAC steps it averages, per round
    period = second["over_adam"]["K-FAC step over its refresh period (T₃ = 10) / Adam step"]["rounds"]
    reused = second["over_adam"]["K-FAC step, inverses reused / Adam step"]["rounds"]
    refreshed = second["over_adam"]["K-FAC step, inverses refreshed (1 in 10) / Adam step"]["rounds"]
    assert all(min(a, b) <= p <= max(a, b) for p, a, b in zip(period, reused, refreshed))

    lap = saved["laplace"]
    fits = {"kron fit, KFLR (fit_laplace)", "kron fit, KFAC, 1 sample (fit_laplace)", "kron fit, KFLR, jitted chunks",
            "kron fit, KFAC, 1 sample, jitted chunks", "kron fit, KFLR, jitted chunks, autodiff"}
    evidence = {"evidence at a new δ (log_marginal_likelihood)", "optimize_prior_precision (fixed point)"}
    predictive = {"GLM predictive (glm_predictive)", "GLM predictive, autodiff"}
    torch_rows = {"laplace-torch kron fit (default: exact factors)", "laplace-torch evidence at a new δ",
                  "laplace-torch GLM predictive (probit)"}
    assert set(lap["fit_over_epoch"]) == fits and set(lap["predictive_over_gradient"]) >= predictive
    assert set(lap["evidence_over_fit"]) >= evidence
    assert set(lap["ms"]) == fits | evidence | predictive | {lap["epoch"], lap["gradient"]} | (
        torch_rows if lap["laplace_torch"] else set())
    assert all(positive(v) for v in lap["ms"].values()) and all(positive(v) for v in lap["ms_per_image"].values())
    ratios = [*lap["fit_over_epoch"].values(), *lap["evidence_over_fit"].values(),
              *lap["fit_called_over_jitted"].values(), *lap["predictive_over_gradient"].values(),
              *lap["predictive_over_glm"].values(), lap["fit_autodiff_over_hand"]]
    assert all(positive(r["median"]) and len(r["rounds"]) == saved["repeats"] for r in ratios)
    assert all(0 <= err < 1e-4 for err in lap["agreement"].values())  # the autodiff routes compute the same numbers
    assert lap["prior_fit"]["iterations"] >= 1 and all(positive(d) for d in lap["prior_fit"]["prior_precision"])
    if lap["laplace_torch"]:
        assert set(lap["predictive_over_glm"]) == {"GLM predictive, autodiff", "laplace-torch GLM predictive (probit)"}
        assert positive(lap["torch_exact_over_kflr"]["median"]) and lap["torch_exact_rounds"] >= 1
    else:  # laplace-torch is an optional extra: its rows are left out, with the reason
        assert lap["laplace_torch_skipped"].startswith("left out") and lap["torch_exact_over_kflr"] is None

    inf = saved["influence"]
    assert len(inf["inner_products"]) == len(inf["ekfac"]) == 1
    for c in inf["inner_products"]:
        assert set(c["seconds_all_pairs"]) == set(c["ns_per_pair"]) == {"δ route (gradient_inner_products)",
                                                                        c["materialized"]}
        assert all(positive(v) for v in c["seconds_all_pairs"].values()) and c["pairs"] == c["test"] * c["train"]
        ratio = c["materialized_over_delta"]
        assert positive(ratio["median"]) and len(ratio["rounds"]) == saved["repeats"]
        assert 0 <= c["agreement"] < 1e-4  # both routes compute the same inner products
        for programs in c["memory_bytes"].values():
            assert len(programs) == 2 and all(m["temp"] is None or m["argument"] > 0 for m in programs.values())
        # the materialized matmul takes a block of (block, P) gradients; the δ route's programs hold rows of the net
        matmul = c["memory_bytes"]["materialized"]["matmul block"]
        if matmul["temp"] is not None:
            assert matmul["argument"] >= min(c["block"], c["train"]) * c["params"] * 4
            assert all(m["argument"] + m["temp"] < matmul["argument"] for m in c["memory_bytes"]["δ route"].values())
    for e in inf["ekfac"]:
        assert set(e["ms"]) == {e["epoch"], "EK-FAC fit (preconditioner)", "self_influence",
                                "EK-FAC fit, 1 sampled column per row (key=0)",
                                "EK-FAC fit on a subset (1 sampled column per row) + self_influence of every row"}
        assert all(positive(v) for v in e["ms"].values())
        agree = e["subset_against_full"]  # the subset's self-influence ranks the rows like the full fit's
        assert -1 <= agree["spearman"] <= 1 and 0 <= agree["top_decile_overlap"] <= 1 and e["subset_rows"] < e["rows"]
        assert all(positive(r["median"]) and len(r["rounds"]) == saved["repeats"] for r in e["over_epoch"].values())
    assert inf["kronfluence"]["kronfluence"] is None and "--quick" in inf["kronfluence"]["skipped"]

    # torch, reference (with and without the norm), matmul; one per step row; five per-example targets; two DP;
    # five per curvature case; four Laplace; three influence
    assert len(saved["targets"]) == 4 + len(saved["steps"]) + 5 * bool(saved["per_example"]) + 2 + 5 * len(
        saved["curvature"]) + 4 + 3
    for target in saved["targets"]:
        assert target["met"] in (True, False, None)
        assert (target["met"] is None) == (target["value"] is None) == (target["range"] is None)
        if target["range"] is not None:
            low, high = target["range"]
            assert low <= target["value"] <= high


def test_gpu_rows_code_path():
    """The rows that only a GPU measures, run here on the CPU with small sizes: the float32 and the
    bfloat16 mixed-precision epochs compile, train and are reported (timings are meaningless)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    bench = importlib.import_module("bench")
    args = types.SimpleNamespace(quick=True, repeats=1, warmup=0, torch_seconds=0.1, torch_skipped="not run")
    x, y = bench.synthetic(1024)
    rows = bench.gpu_rows(args, "gpu", x, y, matmul_n=128)
    assert [row["compute_dtype"] for row in rows] == [None, "bfloat16"]
    for row in rows:
        assert row["measured"] is True and row["samples"] == 1024
        for name in ("fnn", "jax.grad reference"):
            assert positive(row["contenders"][name]["samples_per_s"])
