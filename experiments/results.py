"""The results blocks of experiments/README.md, generated from the experiments' committed JSON.

A block is the text between ``<!-- results KEY -->`` and ``<!-- /results -->``; ``KEY`` is an
experiment's name for its default run (base seed 0), or ``NAME@S`` for the run with ``--seed S``. It
quotes fields of the committed ``experiments/results/KEY.json``, rendered by ``RENDER[NAME]``, so a
quoted number cannot drift from what the script wrote; the run's figure is committed beside it as
``experiments/figures/KEY.png``. After changing an experiment, run it and take its output:

    python experiments/<name>.py [--seed S] && python experiments/results.py --take out/<name>

``--take DIR`` copies ``DIR/<name>.json`` (a default-mode run) and ``DIR/<name>.png`` into the committed
folders under the run's key, then every block is rewritten from the committed JSON. ``--check`` only
compares, and fails (exit status 1) where a block has no committed JSON, a committed JSON renders to
other text than its block, or a figure that experiments/README.md references is not committed; CI runs
it (``tests/test_results.py``). Where a block holds deterministic counts only, as ``autodiff_graphs``'
does, ``tests/test_experiments_b.py`` also renders a fresh run's JSON and compares it with the block.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from common import FIGURE_BYTES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "experiments" / "README.md"
RESULTS = ROOT / "experiments" / "results"
FIGURES = ROOT / "experiments" / "figures"
FIGURE_LIMIT = FIGURE_BYTES
"""Bytes a committed figure may take (``common.save_figure`` lowers the resolution to fit)."""
BLOCK = re.compile(r"(<!-- results (\w+(?:@\d+)?) -->\n)(.*?)(<!-- /results -->)", re.S)
FIGURE = re.compile(r"\]\((figures/[\w@.-]+\.png)\)")


def _more(counts: dict, other: dict, top: int = 5) -> str:
    """The primitives ``counts`` has more of than ``other``, largest surplus first."""
    surplus = {k: v - other.get(k, 0) for k, v in counts.items() if v > other.get(k, 0)}
    ranked = sorted(surplus.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return ", ".join(f"`{k}` (+{v})" for k, v in ranked)


def render_autodiff_graphs(r: dict) -> str:
    ops, dots, depth = r["total_operations"], r["dot_general"], r["depth"]
    layers = len(r["small_sizes"]) - 1
    manual, auto = r["backward_only_counts"]["manual"], r["backward_only_counts"]["autodiff"]
    return (
        f"- graphs (nested calls inlined): forward {ops['forward']} operations ({dots['forward']} matmuls, depth "
        f"{depth['forward']}), manual backprop {ops['manual']} ({dots['manual']} matmuls, depth {depth['manual']}), "
        f"`jax.grad` {ops['autodiff']} ({dots['autodiff']} matmuls, depth {depth['autodiff']}): both add "
        f"{dots['manual'] - dots['forward']} = `2L − 1` = {2 * layers - 1} matmuls. Beyond the forward pass "
        f"`jax.grad` has more {_more(auto, manual)}; the manual graph more {_more(manual, auto)}.\n"
    )


def _default_run(r: dict, name: str) -> None:
    if r.get("quick"):
        raise ValueError(f"out/{name}/{name}.json is from a --quick run; its block quotes the default run: "
                         f"run python experiments/{name}.py without --quick first")


def _spread(s: dict, digits: str, scale: float = 1) -> str:
    lo, mean, hi = (float(s[k]) * scale for k in ("min", "mean", "max"))  # JSON writes inf as "inf"
    if hi == float("inf"):
        return "never" if lo == float("inf") else f"never in some seeds (best {lo:{digits}})"
    return f"{mean:{digits}} [{lo:{digits}}–{hi:{digits}}]"


def _seed_range(r: dict, count: int) -> str:
    """``"seeds S–S+N−1"`` (``"seed S"`` for one) for the run's base seed ``S`` and ``count`` seeds."""
    first = r.get("base_seed", 0)
    return f"seed {first}" if count == 1 else f"seeds {first}–{first + count - 1}"


def _names(names: list) -> str:
    return ", ".join(names) or "none"


def render_optimizers(r: dict) -> str:
    """The default run's per-optimizer spreads and what they support (a quick run has other sizes, so
    the test checks this block's form, not its numbers)."""
    _default_run(r, "optimizers")
    seeds, target, found = r["seeds"], r["target"], r["findings"]
    lines = [f"- {r['dataset']}, `{'-'.join(map(str, r['sizes']))}`, {r['iterations']} iterations of "
             f"{r['batch_size']}, seeds {seeds[0]}–{seeds[-1]}, rates from the pilot on seed {r['pilot_seed']}; "
             f"mean [min–max] over the seeds.", "",
             f"| optimizer | α (pilot grid) | final training loss | iterations to a {r['smooth']}-iteration mean "
             f"≤ {target} | held-out accuracy (%) |", "| --- | --- | --- | --- | --- |"]
    for name, s in r["summary"].items():
        p = r["pilot"][name]
        grid = ", ".join(f"**{a:g}**" if a == p["chosen"] else f"{a:g}" for a in p["grid"])
        lines.append(f"| {name} | {p['chosen']:g} ({grid}{'; end of the grid' if p['at_edge'] else ''}) | "
                     f"{_spread(s['final_train_loss'], '.4f')} | {_spread(s['iterations_to_target'], '.0f')} | "
                     f"{_spread(s['held_out_accuracy'], '.1f', 100)} |")
    lines.append("")
    for key, what in (("final_train_loss", "final training loss"), ("iterations_to_target", "iterations")):
        f = found[key]
        behind = [n for n in f["order"][1:] if n not in f["tied_with_lowest"]]
        words = {"<": "lower (ranges disjoint)", ">": "higher (ranges disjoint)", "~": "not distinguishable"}
        versus = "; ".join(f"{n} {words[f['pairs'][n]['SGD']]}" for n in ("AdaGrad", "RMSProp", "Adam"))
        if r["summary"][f["lowest"]][key]["mean"] == "inf":
            lines.append(f"- {what}: no optimizer has a value in every seed.")
            continue
        lines.append(f"- {what}: lowest mean {f['lowest']}; ranges overlapping its range: "
                     f"{_names(f['tied_with_lowest'])}; ranges above it: {_names(behind)}. Against SGD: {versus}.")
    return "\n".join(lines) + "\n"


def render_initialization(r: dict) -> str:
    """The default run's per-configuration ratios and the training runs (a quick run has other sizes,
    so the test checks this block's form, not its numbers)."""
    _default_run(r, "initialization")
    depth, found, t = r["depth"], r["findings"], r["training"]
    lines = [f"- At initialization: {r['dataset']}, {depth} hidden layers of {r['width']}, batch {r['batch']}, "
             f"{_seed_range(r, r['seeds'])}; first over last hidden layer, mean [min–max].", "",
             f"| configuration | δ¹/δ{depth} | ∂C/∂W¹ / ∂C/∂W{depth} | a{depth}/a¹ | saturated in layer {depth} |",
             "| --- | --- | --- | --- | --- |"]
    for label, c in r["configs"].items():
        ratio = {k: f"{_spread(c['ratios'][k], '.2g')} ({c['bands'][k]})" for k in ("delta", "grad_W")}
        what = " (zeros)" if c["activation"] == "relu" else ""
        lines.append(f"| {label} | {ratio['delta']} | {ratio['grad_W']} | {_spread(c['ratios']['act'], '.2g')} | "
                     f"{100 * c['saturated'][-1]:.0f} %{what} |")
    g = found["glorot_over_classic_delta"]
    lines += ["", f"- δ shrink going down in every seed: {_names(found['delta_shrinks'])}. ∂C/∂W shrink: "
                  f"{_names(found['grad_W_shrinks'])}. δ shrink while ∂C/∂W stay within a factor 2 (eq. 14): "
                  f"{_names(found['delta_shrinks_grad_W_not'])}. δ within a factor 2: "
                  f"{_names(found['delta_within_2'])}."
                  f" Glorot's init instead of the classic one: δ¹/δ{depth} {g['tanh']:.0f} times larger for tanh, "
                  f"{g['sigmoid']:.0f} times for sigmoid.",
              f"- In training: sigmoid `{'-'.join(map(str, t['sizes']))}`, SGD α = {t['learning_rate']}, batch "
              f"{t['batch']}, {t['iterations']} iterations, {_seed_range(r, t['seeds'])}; mean activation of the top "
              f"hidden layer on {t['probe']} training images.", "",
              f"| init | top layer after {t['probe_every']} iterations | lowest | at the end | lower layers at the end "
              f"| loss, last {t['probe_every']} iterations |", "| --- | --- | --- | --- | --- | --- |"]
    for label, run in t["runs"].items():
        lower = run["lower_last"]
        lines.append(f"| {label} | {_spread(run['top_first'], '.2f')} | {_spread(run['top_min'], '.2f')} | "
                     f"{_spread(run['top_last'], '.2f')} | {lower['min']:.2f}–{lower['max']:.2f} | "
                     f"{_spread(run['loss_last'], '.2f')} |")
    lines += ["", f"- Top layer below {found['low_top']} at the end in every seed: {_names(found['top_near_zero'])}; "
                  f"loss within 5 % of the chance level ln 10 in every seed: {_names(found['at_chance'])}; below it: "
                  f"{_names(found['below_chance'])}."]
    return "\n".join(lines) + "\n"


def _g(v: float, digits: int = 2) -> str:
    """``v`` to ``digits`` significant figures, as Python's ``g`` writes it."""
    return f"{float(v):.{digits}g}"


def _span(values, fmt: str) -> str:
    """``"lo to hi"`` of ``values`` in the format ``fmt``, or one number where both read the same."""
    lo, hi = f"{min(values):{fmt}}", f"{max(values):{fmt}}"
    return lo if lo == hi else f"{lo} to {hi}"


def _cell(text: str) -> str:
    """``text`` safe in a Markdown table cell."""
    return text.replace("|", "\\|")


def render_xor(r: dict) -> str:
    """The default run: the counts of the 5,000-step run and, per stalled seed, what the continued run
    measured and the verdict its thresholds give (a quick run has other sizes, so the test checks this
    block's form and that every verdict follows from the numbers it quotes)."""
    _default_run(r, "xor")
    p, single, mlp, long = r["perceptron"], r["single_unit"], r["mlp_2_2_1"], r["long_run"]
    solved = mlp["solved"]
    stalled = [s for s, ok in enumerate(solved) if not ok]
    half = long["steps"].index(long["half"])
    end = long["steps"][-1]
    t = long["thresholds"]
    lines = [f"- perceptron rule: converged {p['converged']} after {p['epochs']:,} epochs ({p['updates']:,} updates), "
             f"accuracy {100 * p['accuracy']:.0f} %. One sigmoid unit, {r['seeds']} seeds: lowest cost "
             f"{min(single['final_loss']):.4f} (ln 2 = 0.6931), output within "
             f"{max(single['max_distance_from_half']):.0e} of ½ on every point.",
             f"- 2-2-1, η = {r['learning_rate']:g}, {r['steps']:,} steps: {mlp['n_solved']} of {r['seeds']} seeds "
             f"classify all four points (cost ≤ {max(c for c, ok in zip(mlp['final_loss'], solved) if ok):.4f}); "
             f"stalled: seeds {_names([str(r.get('base_seed', 0) + s) for s in stalled])}.",
             f"- continued to {end:,} steps, measured every {long['steps'][1] - long['steps'][0]:,}; ‖∇C‖ ∝ steps^p "
             f"and the growth of ‖θ‖ over steps {long['half']:,}–{end:,}; Hessian from `fnn.curvature.hvp`.", "",
             f"| seed | cost − ½ ln 2 | ‖∇C‖ at {long['half']:,} → {end:,} | p | ‖θ‖ at {long['half']:,} → {end:,} "
             "| Hessian eigenvalues, min and max | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in stalled:
        g, w, e = long["grad_norm"][s], long["weight_norm"][s], long["hessian_eigenvalues"][s]
        lines.append(f"| {r.get('base_seed', 0) + s} | {long['excess_over_half_ln2'][s]:.1e} | "
                     f"{g[half]:.1e} → {g[-1]:.1e} | "
                     f"{long['grad_norm_exponent_second_half'][s]:.2f} | {w[half]:.2f} → {w[-1]:.2f} | "
                     f"{e[0]:.1e}, {e[-1]:.2g} | {long['verdict'][s]} |")
    ok = [s for s in range(len(solved)) if solved[s]]
    if ok:
        g = [long["grad_norm"][s] for s in ok]
        w = [long["weight_norm"][s] for s in ok]
        lines.append(f"| solved ({len(ok)}) | cost {_span([long['cost'][s][-1] for s in ok], '.1e')} | "
                     f"{_span([x[half] for x in g], '.1e')} → {_span([x[-1] for x in g], '.1e')} | "
                     f"{_span([long['grad_norm_exponent_second_half'][s] for s in ok], '.2f')} | "
                     f"{_span([x[half] for x in w], '.2f')} → {_span([x[-1] for x in w], '.2f')} | | |")
    lines += ["", f"- verdict: saddle if the lowest eigenvalue < −{t['negative']:g} × the largest; minimum if, "
                  f"besides, ‖∇C‖ ≤ {t['grad_tol']:g} and ‖θ‖ grew by ≤ {100 * t['growth_tol']:g} % over the "
                  "second half; else plateau."]
    return "\n".join(lines) + "\n"


def render_universal_approximation(r: dict) -> str:
    """The default run's width curves at three budgets, their slopes, and which widths were still
    improving (a quick run has other sizes, so the test checks this block's form and its slopes
    against its own quoted errors)."""
    _default_run(r, "universal_approximation")
    widths, budgets, cap = r["widths"], r["budgets"], r["cap"]
    lines = [f"- `MLP((1, n, 1), \"tanh\")`, full-batch Adam at {r['rate']:g} · 2^(−t/{r['half_life']:,}), "
             f"{r['seeds']} initializations; RMS error on 1,001 points of the network with the lowest training loss "
             f"found up to the given step (over the initializations and the checkpoints every {r['chunk']:,} steps).",
             "", "| target | steps | " + " | ".join(f"n = {n}" for n in widths) + " | log-log slope | lowest at |",
             "| --- | --- | " + " | ".join("---" for _ in widths) + " | --- | --- |"]
    for name, per_budget in r["rmse_best_at_budget"].items():
        s = r["summary"][name]
        for b in budgets:
            lines.append(f"| {_cell(name)} | {b:,} | " + " | ".join(_g(e) for e in per_budget[str(b)])
                         + f" | {s['slope_at_budget'][str(b)]:.2f} | n = {s['lowest_at_budget'][str(b)]} |")
    lines.append("")
    for name, per_width in r["at_cap"].items():
        s = r["summary"][name]
        improving = [str(n) for n, w in zip(widths, per_width) if w["still_improving"]]
        ratios = s["cap_over_quarter"]
        lines.append(f"- {name}: {cap // 4:,} → {cap:,} steps multiplies the error by {_g(min(ratios))}–"
                     f"{_g(max(ratios))}; training loss still improving at {cap:,} steps (its lowest fell by ≥ "
                     f"{100 * r['tol']:g} % over the last {r['window']:,}) for n = {_names(improving)}; a width not "
                     f"below the one before it at {cap:,} steps: n = "
                     f"{_names([str(n) for n in s['not_below_previous_width'][str(cap)]])}.")
    step = r["at_cap"]["step [x ≥ 0]"]
    lines.append("- the piecewise-linear interpolant of the 200 training points has RMS error "
                 + ", ".join(f"{_g(v)} ({n})" for n, v in r["interpolant_rmse"].items())
                 + f". The step: share of the squared error between the two training points around the jump "
                 f"{100 * min(w['gap_share'] for w in step):.0f}–{100 * max(w['gap_share'] for w in step):.0f} %; "
                 f"sup error {min(w['sup_error'] for w in step):.3f}–{max(w['sup_error'] for w in step):.3f}.")
    return "\n".join(lines) + "\n"


def render_capacity(r: dict) -> str:
    """The default run's MSE per width over the draws and what the ranges resolve (a quick run has
    other sizes, so the test checks this block's form and that its words follow from its ranges)."""
    _default_run(r, "capacity")
    widths, t, h, n = r["widths"], r["train"], r["held_out"], r["repeats"]
    lines = [f"- {r['n_train']} training points, {n} draws (noise and initialization), {r['steps']:,} Adam steps; "
             f"{r['n_held_out']:,} held-out points; noise variance {r['noise_variance']:.2f}. MSE mean [min–max] "
             "over the draws.", "", "| n | training MSE | held-out MSE |", "| --- | --- | --- |"]
    for w, a, b in zip(widths, t["spread"], h["spread"]):
        lines.append(f"| {w} | {_spread(a, '.3g')} | {_spread(b, '.3g')} |")
    k, j, last = t["lowest_index"], h["lowest_index"], len(widths) - 1
    rise = (f"; n = {widths[last]}: {t['last_over_lowest']:.3g} times the lowest mean, its range "
            f"{'above' if widths[last] in t['ranges_above_lowest'] else 'overlapping'} n = {widths[k]}'s, higher in "
            f"{t['wins'][k][last]} of {n} draws" if k < last else "")
    near = "; ".join(f"n = {w}: {'ranges disjoint' if ok else 'ranges overlap'}, n = {widths[j]} lower in "
                     f"{h['wins'][j][widths.index(int(w))]} of {n} draws"
                     for w, ok in h["resolved_from_neighbours"].items())
    lines += ["", f"- training: lowest mean at n = {widths[k]}, the mean "
                  + ("" if t["mean_falls_to_lowest"] else "not ") + "falling at every step up to it"
                  + rise + ".",
              f"- held out: lowest mean at n = {widths[j]}; against its neighbours: {near}; minimum "
              + ("resolved" if h["resolved"] else "not resolved") + f". Ranges above it: "
              f"{_names([f'n = {w}' for w in h['ranges_above_lowest']])}. Under-fitting "
              + ("resolved" if r["under_fitting_resolved"] else "not resolved") + "; over-fitting "
              + ("resolved" if r["over_fitting_resolved"] else "not resolved") + "."]
    return "\n".join(lines) + "\n"


def render_batch_sizes(r: dict) -> str:
    """The default run's costs, measured times and, per cost level, the batch sizes no other beats
    (timings vary from run to run: the block is the run of its date; the test checks its form)."""
    _default_run(r, "batch_sizes")
    runs = r["runs"]
    lines = [f"- digits, N = {r['n']:,}, 64-64-10 tanh, SGD η = {r['eta']:g}, {r['epochs']} epochs, "
             f"{_seed_range(r, r['seeds'])}; min–max over the seeds.", "",
             f"| B | steps/epoch | cost after {r['epochs']} epochs | held-out accuracy (%) | compile (s) "
             "| first call (ms) | median epoch (ms) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        final = [c[-1] for c in run["full_train_cost"]]
        acc = [100 * a for a in run["held_out_accuracy"]]
        lines.append(f"| {name} | {run['steps_per_epoch']:,} | {min(final):.4f}–{max(final):.4f} | "
                     f"{min(acc):.1f}–{max(acc):.1f} | {run['compile_seconds']:.2f} | "
                     f"{1000 * run['first_call_seconds']:.1f} | {1000 * run['median_epoch_seconds']:.2f} |")
    lines += ["", "| cost level | epochs to reach it, per seed: " + ", ".join(runs) + " | first in training time "
              "| first with compile and first call |", "| --- | --- | --- | --- |"]

    def who(names):
        return "none" if not names else names[0] if len(names) == 1 else "not resolved: " + ", ".join(names)

    for step in r["ladder"]:
        epochs = "; ".join("/".join("–" if e is None else str(e) for e in step["epochs"][name]) for name in runs)
        lines.append(f"| {_g(step['level'])} | {epochs} | {who(step['leaders'])} | "
                     f"{who(step['leaders_with_compile'])} |")
    noise = r["gradient_noise"]
    ratio = [m / p for m, p in zip(noise["measured"], noise["predicted"])]
    lines += ["", f"- noise: measured E‖∇C_B − ∇C‖² over the formula: {min(ratio):.2f}–{max(ratio):.2f} for B = "
                  f"{', '.join(map(str, noise['batch_sizes']))}."]
    return "\n".join(lines) + "\n"


def render_batchnorm(r: dict) -> str:
    """The default run per seed and the differences (a quick run has other sizes, so the test checks
    this block's form and that its summary follows from its rows)."""
    _default_run(r, "batchnorm")
    ps, d, f = r["per_seed"], r["difference"], r["findings"]
    lines = [f"- `mnist-10k`, {r['train_images']:,} training and {r['held_out_images']:,} held-out images, "
             f"784-100-100-100-10 sigmoid, SGD η = {r['lr']:g}, batch {r['batch']}, {r['epochs']} epochs = "
             f"{r['steps'][-1]:,} steps, seeds {r['seeds'][0]}–{r['seeds'][-1]}; held-out accuracy (%), with BN / "
             "without.", "",
             f"| seed | after epoch 1 | steps to {100 * r['level']:.0f} % | mean of the last {r['last_epochs']} epochs "
             "| with BN − without at the end (points) |", "| --- | --- | --- | --- | --- |"]
    for i, s in enumerate(r["seeds"]):
        a, b = ps["with BN"], ps["without BN"]
        steps = "/".join("never" if v is None else f"{v:,}" for v in (a["steps_to_level"][i], b["steps_to_level"][i]))
        lines.append(f"| {s} | {100 * a['after_first_epoch'][i]:.2f} / {100 * b['after_first_epoch'][i]:.2f} | "
                     f"{steps} | "
                     f"{100 * a['mean_last_epochs'][i]:.2f} / {100 * b['mean_last_epochs'][i]:.2f} | "
                     f"{100 * d['mean_last_epochs'][i]:+.2f} |")
    end = [100 * v for v in d["mean_last_epochs"]]
    first = [100 * v for v in d["after_first_epoch"]]
    lines += ["", f"- with BN − without, in points: after epoch 1 {min(first):+.2f} to {max(first):+.2f}; at the end "
                  f"{min(end):+.2f} to {max(end):+.2f}, mean {sum(end) / len(end):+.2f}. BN higher at the end in every "
                  f"seed: {'yes' if f['higher_at_end_every_seed'] else 'no'}; sooner to {100 * r['level']:.0f} % in "
                  f"{f['sooner_seeds']} of {len(r['seeds'])} seeds; ahead in "
                  f"{100 * f['higher_share_second_half']:.0f} % of the evaluations (seed × epoch) of the second half."]
    return "\n".join(lines) + "\n"


def render_learning_rate(r: dict) -> str:
    """The default run: the quadratic's curvature and η sweep, the MLP's runs and the first step (a quick
    run has fewer steps and epochs, so the test compares the size-free clauses with a fresh run and checks
    that the rest follows from the numbers it quotes)."""
    _default_run(r, "learning_rate")
    q, m, f = r["quadratic"], r["mlp"], r["first_step_factors"]
    runs = sorted(m["runs"].values(), key=lambda run: run["factor"])
    kept = [run for run in runs if not run["diverged"]]
    best = min(kept, key=lambda run: run["final_loss"])
    stops = [f"{run['factor']:g}× at epoch {len(run['train_loss'])}" for run in runs if run["diverged"]]
    above = [run for run in kept if run["factor"] >= 1]
    border = ("every η below 2/λ_max converged and every η above diverged"
              if q["all_below_converge"] and q["all_above_diverge"] else "the border at 2/λ_max was not reproduced")
    lines = [f"- quadratic: `λ_max = {q['lambda_max']:.4f}` (closed-form `H = (2/N)X̃ᵀX̃` equals `jax.hessian` to "
             f"{q['hessian_rel_error_autodiff_vs_closed_form']:.1e}), `2/λ_max = {q['eta_critical']:.4f}`, "
             f"`κ = {q['lambda_max'] / q['lambda_min']:.1f}`; {border}; the measured excess after {q['steps']} steps "
             f"matches the formula within {100 * q['theory_max_rel_deviation']:.2g} %.",
             f"- MLP: `λ_max(θ₀) = {m['lambda_max_init']:.3f}`, `2/λ_max = {m['eta_critical']:.4f}`; after "
             f"{m['epochs']} full-batch epochs the smallest rate ({runs[0]['factor']:g}×) is at loss "
             f"{runs[0]['final_loss']:.4f}, the best ({best['factor']:g}×) at {best['final_loss']:.4f}; stopped by "
             f"`fit`'s NaN guard: {_names(stops)}"
             + "".join(f"; {run['factor']:g}× did not diverge, its loss rose on "
                       f"{int(np.sum(np.diff(run['train_loss']) > 0))} of the {len(run['train_loss']) - 1} epochs "
                       "after the first" for run in above) + ".",
             f"- first step: actual/predicted decrease {q['first_step_ratio'][0]:.4f} (quadratic) and "
             f"{m['first_step_ratio'][0]:.4f} (MLP) at `η = {f[0]:g}·2/λ_max`; {q['first_step_ratio'][-1]:.2f} and "
             f"{m['first_step_ratio'][-1]:.2f} at `{f[-1]:g}·2/λ_max`; on the quadratic the first step stops "
             f"decreasing `C` at `η = 2‖g‖²/gᵀHg = {q['first_step_zero_crossing_factor']:.2f}·2/λ_max`."]
    return "\n".join(lines) + "\n"


def render_newton(r: dict) -> str:
    """Every number is fixed by the script's constants; a quick run only runs gradient descent for fewer
    steps, so the test compares the block with a fresh quick run's."""
    o, q = r["one_d"], r["quadratic"]
    measured, bound = q["gd_steps_measured"], q["gd_steps_predicted"]

    def steps(name):
        return f"{measured[name] if measured[name] is not None else 'never'} (bound `log(tol)/log ρ`: {bound[name]})"

    return (f"- 1-D from `θ₀ = {o['theta0']:g}`: Newton reaches `|θ − ln 2| ≤ 1e-12` in "
            f"{o['newton_steps_to_1e-12']} steps, gradient descent (`η = {o['eta_gd']:g}`) in "
            f"{o['gd_steps_to_1e-12']}; "
            f"Newton's `e_{{t+1}}/e_t²` = {', '.join(f'{c:.3f}' for c in o['newton_quadratic_constants'])} (theory "
            "`f‴/2f″ = 0.5` at `θ*`).\n"
            f"- 2-D quadratic, `κ = {q['kappa']:g}`: Newton's single step lands at relative distance "
            f"{q['newton_relative_error_after_one_step']:.1e} from `θ*`; gradient descent needs {steps('1.8/λ_max')} "
            f"steps to reach {q['tolerance']:g} with `η = 1.8/λ_max`, crossing the valley floor "
            f"{q['gd_sign_changes_steep_axis']} times in its first 40 steps, and {steps('2/(λ_min+λ_max)')} with the "
            "best constant rate `η = 2/(λ_min + λ_max)`.\n")


def render_edge_of_stability(r: dict) -> str:
    """The default-mode run per step size and seed: the sharpness against 2/η, the cost and the two verdicts
    (a quick run uses fewer images, steps and seeds, so the test checks this block's form and that every
    verdict follows from the numbers it quotes)."""
    _default_run(r, "edge_of_stability")
    seeds, steps, (low, high) = r["per_seed"], r["steps"], r["band"]
    residual = max(max(run["relative_residual"]) for s in seeds for run in s["runs"])
    lines = [f"- `{'-'.join(map(str, r['sizes']))}` tanh, `mse`, the first {r['subset']:,} images, {steps:,} "
             f"full-batch steps, {_seed_range(r, len(seeds))}; sharpness by {r['lanczos_steps']}-step Lanczos "
             f"every {r['every']} steps (largest relative Ritz residual {residual:.0e}); *at the edge*: within "
             f"{low:g}–{high:g} × 2/η; "
             f"*hovers*: at least {100 * r['hover']:.0f} % of at least {r['min_after']} measurements after first "
             "reaching the band lie in it.", "",
             "| η | 2/η | seed | sharpness at initialization | first at the edge (step) | largest sharpness "
             f"| in the band after | rise | hovers | C at step {steps // 2:,} → {steps:,} | steps of the second half "
             "on which C rose |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, eta in enumerate(r["etas"]):
        for s in seeds:
            run = s["runs"][i]
            first = "never" if run["first_at_edge"] is None else f"{(run['first_at_edge'] + 1) * r['every']:,}"
            lines.append(f"| {eta:g} | {2 / eta:.2f} | {s['seed']} | {s['initial_sharpness']:.2f} | {first} | "
                         f"{run['max_sharpness']:.2f} | {100 * run['share_in_band_after']:.0f} % of "
                         f"{run['measurements_after']} | {run['rise']} | {'yes' if run['hovers'] else 'no'} | "
                         f"{run['mid_cost']:.4f} → {run['final_cost']:.4f} | {100 * run['rose_on']:.0f} % |")
    lines.append("")
    for s in r["summary"]:
        lines.append(f"- η = {s['eta']:g}: rises to 2/η in {s['rises_to_edge']} of {s['seeds']} seeds (starts at or "
                     f"above it in {s['starts_at_edge']}); hovers at 2/η in {s['hovers']} of {s['seeds']}; the cost "
                     f"fell over the second half in {s['cost_fell']} of {s['seeds']}.")
    return "\n".join(lines) + "\n"


def render_perceptron(r: dict) -> str:
    """The default run: the blobs, the sweep of separable sets against Novikoff's bound, and XOR (a quick run
    has a smaller sweep and epoch limit, so the test compares the blobs line with a fresh run and checks that
    the rest follows from the numbers it quotes)."""
    _default_run(r, "perceptron")
    b, x, sweep = r["blobs"], r["xor"], r["sweep"]
    most = max(sweep, key=lambda s: s["updates"])
    margins = sorted({s["margin"] for s in sweep})
    return (f"- blobs: converged {'yes' if b['converged'] else 'no'} after {b['updates']} updates in {b['epochs']} "
            f"epochs (bound `(R/γ)²` = {b['bound']:.1f} for the generating separator), held-out accuracy "
            f"{100 * b['test_accuracy']:.0f} %.\n"
            f"- {len(sweep)} separable sets, margins γ from {margins[0]:g} to {margins[-1]:g} "
            f"({len({s['seed'] for s in sweep})} seeds each): "
            + ("all converged within the bound" if r["all_within_bound"] else "not all converged within the bound")
            + f"; largest updates/bound {r['worst_ratio']:.3f}; most updates {most['updates']:,} (γ = "
            f"{most['margin']:g}, seed {most['seed']}) against a bound of {most['bound']:,.0f}.\n"
            f"- XOR: converged {'yes' if x['converged'] else 'no'} after {x['epochs']:,} epochs and {x['updates']:,} "
            f"updates, final `w' = ({', '.join(f'{v:g}' for v in x['w'])})`, training accuracy "
            f"{100 * x['train_accuracy']:.0f} %.\n")


def _count(v: float) -> str:
    """A noise scale: an integer with thousands separators, ``∞`` where it is not resolved."""
    return "∞" if v == float("inf") else f"{v:,.0f}"


def _factor(v: float) -> str:
    return "∞" if v == float("inf") else f"{v:.1f}"


def render_gradient_noise(r: dict) -> str:
    """The default run per seed, then the ranges over the seeds; then the batch-size ladder per batch size,
    the fit of its critical batch size and ``B_simple`` at its target against it (a quick run has fewer
    images, seeds, epochs and batch sizes, so the test checks this block's form against a fresh quick run's
    and that its summaries follow from its rows)."""
    _default_run(r, "gradient_noise")
    epochs, seeds, tail = r["epochs"], r["seeds"], r["late_epochs"]
    unresolved = np.asarray(r["unresolved_epochs"], bool)  # (seeds, epochs)
    b = np.where(unresolved, np.inf, np.asarray(r["noise_scale"], float))  # ‖G‖² ≤ 0 counted as ∞
    late, growth = np.asarray(r["late_median"], float), np.asarray(r["growth_late_over_first"], float)
    second = b[:, 1] / b[:, 0]
    rises = (np.diff(b[:, 1:], axis=1) > 0).sum(axis=1)  # after epoch 2
    steps = epochs - 2
    lines = [f"- 784-256-10 relu, SGD α = {r['rate']:g}, batch {r['batch']}, {epochs} epochs, {_seed_range(r, seeds)}; "
             "`B_simple` per epoch is the ratio of the epoch means of the `tr(Σ)` and `‖G‖²` estimates, ∞ where the "
             "`‖G‖²` estimate is ≤ 0.",
             "", f"| seed | `B_simple`, epoch 1 | epoch 2 / epoch 1 | median over epochs {epochs - tail + 1}–{epochs} "
             "| median / epoch 1 | rises after epoch 2 | epochs with `‖G‖²` ≤ 0 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in range(seeds):
        lines.append(f"| {r.get('base_seed', 0) + s} | {_count(b[s, 0])} | {_factor(second[s])} | {_count(late[s])} "
                     f"| {_factor(growth[s])} "
                     f"| {rises[s]} of {steps} | {int(unresolved[s].sum())} of {epochs} |")
    resolved = b[:, 1:][np.isfinite(b[:, 1:])]
    loss = np.asarray(r["train_loss"], float).mean(axis=0)
    median, top = (np.asarray(r[k], float) for k in ("norm_median", "norm_max"))
    spread = np.asarray(top / median).mean(axis=0)
    lines += ["", f"- median over epochs {epochs - tail + 1}–{epochs} above epoch 1 in {int(np.sum(growth > 1))} of "
                  f"{seeds} seeds: from {_count(b[:, 0].min())}–{_count(b[:, 0].max())} in epoch 1 to "
                  f"{_count(late.min())}–{_count(late.max())} (a factor {_factor(growth.min())}–"
                  f"{_factor(growth.max())}); epoch 2 alone {_factor(second.min())}–{_factor(second.max())}× epoch 1; "
                  f"after that it rose in {100 * rises.sum() / (seeds * steps):.0f} % of the {seeds * steps} "
                  f"epoch-to-epoch steps, its resolved values between {_count(resolved.min())} and "
                  f"{_count(resolved.max())}; `‖G‖²` estimate ≤ 0 in {int(unresolved.sum())} of {unresolved.size} "
                  "seed-epochs.",
              f"- means over the seeds, epoch 1 → epoch {epochs}: training loss {loss[0]:.2g} → {loss[-1]:.2g}; "
              f"median per-example gradient norm {median.mean(axis=0)[0]:.3g} → {median.mean(axis=0)[-1]:.3g}; "
              f"largest over median {spread[0]:.0f} → {spread[-1]:.0f}; held-out accuracy at the end "
              f"{100 * np.mean(np.asarray(r['held_out_accuracy'])[:, -1]):.2f} %."]
    lad = r["ladder"]  # the batch-size ladder: a row per batch size, the fit, B_simple against B_crit
    rows, fit, n, rates = lad["rows"], lad["fit"], lad["seeds"], lad["rates"]
    lines += ["", f"- Critical batch size: SGD on batches of {rows[0]['batch']:,} to {rows[-1]['batch']:,}, "
                 f"{_seed_range(r, n)}; `S` = steps until the loss on the first {lad['probe']:,} training images is "
                 f"≤ {lad['target']:g}, `E = B·S`; rate per batch size from a grid √2 apart ({rates[0]:g} to "
                 f"{rates[-1]:g}), the one with the fewest steps (geometric mean over the seeds); `B_simple` on all "
                 "training images at the parameters where each run reached the target.",
             "", "| B | rate (rates tried) | `S`: geometric mean [min–max] | `E = B·S` | `B_simple` at the target: "
                 "median [min–max] |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        tried, steps, simple = ([float(k) for k in row["tried"]], np.asarray(row["steps"], float),
                                np.asarray(row["b_simple"], float))
        lines.append(f"| {row['batch']:,} | {row['rate']:g} ({min(tried):g}–{max(tried):g}) | {row['steps_mean']:.1f} "
                     f"[{steps.min():.0f}–{steps.max():.0f}] | {row['batch'] * row['steps_mean']:,.0f} | "
                     f"{_count(np.median(simple))} [{_count(simple.min())}–{_count(simple.max())}] |")
    crit, ratios = np.asarray(lad["b_crit_per_seed"], float), np.asarray(lad["ratio_per_seed"], float)
    simple = np.asarray(lad["b_simple_at_target"], float)
    lines += ["", f"- fit of `S = S_min (1 + B_crit/B)`, i.e. `(S/S_min − 1)(E/E_min − 1) = 1`, by least squares in "
                  f"log `S` to the geometric means: `S_min` = {fit['s_min']:.1f}, `E_min` = {fit['e_min']:,.0f}, "
                  f"`B_crit = E_min/S_min` = {fit['b_crit']:,.0f} (rms {fit['rms_log']:.2f} in log `S`); per seed "
                  f"`B_crit` {crit.min():,.0f}–{crit.max():,.0f}. Chosen rate at an end of the grid for "
                  f"{sum(row['at_edge'] for row in rows)} of {len(rows)} batch sizes.",
              f"- `B_simple` at the target: median {_count(lad['b_simple_median'])} over the {simple.size} runs "
              f"({_count(simple.min())}–{_count(simple.max())}), {lad['ratio']:.1f}× `B_crit`; per seed, the median "
              f"of its runs over its `B_crit`: {ratios.min():.1f}–{ratios.max():.1f}, within a factor 10 in "
              f"{int(np.sum(np.abs(np.log10(ratios)) <= 1))} of {n} seeds, above 1 in {int(np.sum(ratios > 1))} of "
              f"{n}."]
    return "\n".join(lines) + "\n"


def render_mnist(r: dict) -> str:
    """The default run's final scores, its best epochs and its mistakes (a quick run has fewer images and
    epochs, so the test checks this block's form against a fresh quick run's and that its words follow
    from its numbers)."""
    _default_run(r, "mnist")
    hist, confusion = r["history"], np.asarray(r["confusion"])
    n, last = int(confusion.sum()), hist[-1]
    best = max(hist, key=lambda h: h["held_out_accuracy"])
    lowest = min(hist, key=lambda h: h["held_out_loss"])
    per_class = 100 * np.asarray(r["per_class_accuracy"], float)
    worst, pair = int(np.argmin(per_class)), r["most_confused"]
    return (f"- after {r['epochs']} epochs: held-out accuracy {100 * r['final_held_out_accuracy']:.2f} % "
            f"({r['misclassified']:,} of {n:,} wrong; best epoch {best['epoch']}: "
            f"{100 * best['held_out_accuracy']:.2f} %), training accuracy {100 * r['final_train_accuracy']:.2f} %; "
            f"held-out loss {last['held_out_loss']:.4f} (lowest, {lowest['held_out_loss']:.4f}, at epoch "
            f"{lowest['epoch']} of {last['epoch']}) against a training loss of {last['train_loss']:.4f} (mean over "
            "the last epoch).\n"
            "- held-out accuracy per digit (%): " + ", ".join(f"{d}: {a:.1f}" for d, a in enumerate(per_class))
            + f"; hardest {worst} ({per_class[worst]:.1f} %); most frequent confusion {pair['true']} → "
            f"{pair['predicted']} ({pair['count']} times).\n")


def render_gradient_agreement(r: dict) -> str:
    """The default run's largest differences, per batch and per layer (rounding-level figures that move
    with XLA's fusion decisions, so the test checks this block's form against a fresh quick run's and the
    claim's bound, not its values)."""
    _default_run(r, "gradient_agreement")
    diffs = {name: np.asarray(d, float) for name, d in r["max_rel_diff"].items()}  # name -> (checks, L)
    checks, layers = next(iter(diffs.values())).shape
    zero = sum((d == 0).sum(axis=0) for d in diffs.values())
    total = checks * len(diffs)
    return (f"- `{'-'.join(map(str, r['sizes']))}` ({', '.join(r['activations'])}), {r['dtype']}, {checks} checks "
            f"(epochs {r['checked_epochs'][0]}–{r['checked_epochs'][-1]}): largest per-layer relative difference "
            f"{r['max_observed']:.2e} ("
            + "; ".join(f"{name}: {v:.2e}" for name, v in r["max_per_batch"].items())
            + f"); the claim ≤ {r['claim']:g} " + ("holds" if r["claim_holds"] else "does not hold") + ".\n"
            f"- bit-identical (difference 0) over the {total} checks of the {len(diffs)} batches: "
            + ", ".join(f"layer {l + 1} in {int(zero[l])}" for l in range(layers))
            + f". Held-out accuracy after {r['epochs']} epochs: {100 * r['final_held_out_accuracy']:.2f} %.\n")


def render_private_mnist(r: dict) -> str:
    """The default-mode run per target ε at the paper's σ against the paper and a non-private run of the
    same number of steps (a quick run has fewer images and epochs, so the test checks this block's form
    against a fresh quick run's and that its words follow from its numbers)."""
    _default_run(r, "private_mnist")
    norm = r["normalization"]
    lines = [f"- mnist-10k, N = {r['n']:,}, lots of {r['lot']} (q = {r['q']:.3f}, {r['steps_per_epoch']} steps per "
             f"epoch), clip {r['clip']:g}, δ = {r['delta']:g}, SGD η = {r['lr']:g}; inputs standardized with the "
             f"public constants {norm['mean']} and {norm['std']}; {_seed_range(r, r['seeds'])}; held-out accuracy "
             "(%), mean [min–max] over the seeds.", "",
             "| target ε | σ (the paper's) | steps | ε spent | DP-SGD | gain in the last epoch (points) "
             "| not private, same steps | paper | paper − DP-SGD (points) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t, v in r["rows"].items():
        lines.append(f"| {float(t):g} | {v['sigma']:g} | {v['steps']:,} | {v['epsilon']:.3f} | {100 * v['mean']:.2f} "
                     f"[{100 * v['range'][0]:.2f}–{100 * v['range'][1]:.2f}] | {100 * v['gain_last_epoch']:+.2f} | "
                     f"{100 * v['plain_mean']:.2f} [{100 * v['plain_range'][0]:.2f}–{100 * v['plain_range'][1]:.2f}] "
                     f"after {v['plain_steps']:,} | {100 * v['paper']:.0f} | {100 * (v['paper'] - v['mean']):.1f} |")
    lines += ["", "- mean accuracy " + ("rises" if r["monotone_in_epsilon"] else "does not rise") + " with ε at every "
              "step; every seed below the paper's figure at ε = "
              + _names([f"{float(t):g}" for t, b in r["below_paper"].items() if b])
              + "; every private seed below every non-private one at ε = "
              + _names([f"{float(t):g}" for t, b in r["below_plain"].items() if b]) + "."]
    return "\n".join(lines) + "\n"


def render_second_order(r: dict) -> str:
    """The default-mode run: the pilot's grids and choices, each method's run, the target and both verdicts
    (timings move from run to run, so the test checks this block's form against a fresh quick run's and
    that every verdict follows from the numbers the JSON holds)."""
    _default_run(r, "second_order")
    runs, pilots, budget = r["runs"], r["pilots"], r["budget_s"]
    lines = [f"- `{'-'.join(map(str, r['sizes']))}`, sparse initialization from seed {r.get('base_seed', 0)}, "
             f"the {r['rows']:,} training images; {budget:.0f} s of training per method (momentum and Adam at "
             f"least {r['min_steps']:,} iterations), errors on {r['eval_rows']:,} of the training images; pilot "
             f"{r['pilot_seconds']:.0f} s per value, scored on the {r['held_out_rows']:,} held-out images. "
             f"Hessian-free: gradient on {r['hf_batch']:,} images, curvature on {r['hf_curvature_rows']:,}, at most "
             f"{r['hf_cg_max']} CG iterations, ε = {r['hf_cg_tol']:g}.", "",
             f"| method | pilot grid (chosen in bold) | batch | steps in {budget:.0f} s | ms per step | compile (s) "
             f"| iterations to the target | seconds to the target | cross-entropy at {budget:.0f} s "
             "| at the end (iterations) | squared error at the end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        p, reach = pilots[name], r["reach"][name]
        grid = ", ".join(f"**{v:g}**" if v == p["chosen"] else f"{v:g}" for v in p["grid"])
        edge = " (an end)" if p["at_edge"] else ""
        at_budget = run["iterations"][run["budget_index"]]
        lines.append(f"| {name} | {p['what']}: {grid}{edge} | {run['batch']:,} | {at_budget:,} | "
                     f"{run['ms_per_step']:,.0f} | {run['compile_s']:.1f} | "
                     f"{'never' if reach is None else format(reach['iteration'], ',')} | "
                     f"{'—' if reach is None else format(reach['seconds'], '.0f')} | "
                     f"{r['per_second'][name]:.4f} | {run['cross_entropy'][-1]:.4f} ({run['steps']:,}) | "
                     f"{run['squared_error'][-1]:.1f} |")
    mom = runs["momentum"]
    lines += ["", f"- initial cross-entropy {r['initial_cross_entropy']:.4f}; the target is momentum's final error "
                  f"{r['target']:.4f}, after {mom['steps']:,} iterations (first reached at iteration "
                  f"{r['reach']['momentum']['iteration']:,})."]
    for name, v in r["per_iteration"].items():
        if v["iterations_to_target"] is not None:
            where = (f"it reaches the target at iteration {v['iterations_to_target']:,}, momentum at "
                     f"{v['momentum_iterations_to_target']:,}")
        else:
            where = (f"it does not reach the target in its {v['iterations_run']:,} iterations, where momentum "
                     f"needed {v['momentum_iterations_to_target']:,}; at iteration {v['iterations_run']:,} it is at "
                     f"{v['error_at_last']:.4f}, momentum at {v['momentum_error_there']:.4f}")
        run, mom_run = runs[name], runs["momentum"]
        its = [i for i in run["iterations"] if 0 < i <= v["iterations_run"]]
        below = sum(np.interp(i, run["iterations"], run["cross_entropy"])
                    < np.interp(i, mom_run["iterations"], mom_run["cross_entropy"]) for i in its)
        lines.append(f"- per iteration, {name}: the papers' claim **{v['verdict']}** here: {where}; below momentum "
                     f"at {below} of its {len(its)} snapshots, at equal iterations.")
    order = sorted(r["per_second"], key=r["per_second"].get)
    cost = ", ".join(f"{n} {runs[n]['ms_per_step'] / mom['ms_per_step']:.1f}" for n in r["per_iteration"])
    lines.append(f"- per second, at {budget:.0f} s: " + " < ".join(f"{n} {r['per_second'][n]:.4f}" for n in order)
                 + f"; a step costs {cost} momentum steps.")
    hf, kf = runs.get("Hessian-free", {}), runs.get("K-FAC", {})
    if hf.get("cg_iterations"):
        cg = np.asarray(hf["cg_iterations"])
        lines.append(f"- Hessian-free ran {int(np.median(cg))} CG iterations per step in the median "
                     f"({int(cg.min())}–{int(cg.max())}); K-FAC's λ ended at {kf['final_damping']:.3g} and γ at "
                     f"{kf['final_gamma']:.3g}.")
    return "\n".join(lines) + "\n"


def render_laplace(r: dict) -> str:
    """The default-mode run: (a) the evidence and the held-out fit per β, each seed's argmaxes and the verdict;
    (b) MAP against each Laplace posterior on every evaluation set, and Laplace Redux's figures (a quick run
    has fewer images, epochs and β's, so the test checks this block's form against a fresh quick run's and
    that every verdict follows from the numbers the JSON holds)."""
    _default_run(r, "laplace")
    runs, v = r["runs"], r["verdicts"]
    sizes = "-".join(map(str, r["sizes"]))
    lines = [f"- mnist-10k, N = {r['n']:,} training images, {r['held_out']:,} held out; `{sizes}` relu, Adam "
             f"α = {r['lr']:g} cosine-decayed over {r['epochs']} epochs of batches of {r['batch']}; "
             f"{_seed_range(r, r['seeds'])}; mean [min–max] over the seeds.", "",
             "| β | log evidence / N, kron | log evidence / N, diag | held-out log-likelihood / image (MAP) "
             "| held-out accuracy (%) |", "| --- | --- | --- | --- | --- |"]
    for i, beta in enumerate(r["betas"]):
        def spread(get, scale=1.0, digits=".4f"):
            vals = np.array([get(run["grid"][i]) for run in runs]) * scale
            return f"{vals.mean():{digits}} [{vals.min():{digits}}–{vals.max():{digits}}]"
        lines.append(f"| {beta:g} | {spread(lambda g: g['evidence']['kron'])} "
                     f"| {spread(lambda g: g['evidence']['diag'])} "
                     f"| {spread(lambda g: g['held_out']['log_likelihood'])} "
                     f"| {spread(lambda g: g['held_out']['accuracy'], 100, '.2f')} |")
    lines += ["", "- per seed, the argmax of the evidence (kron) against that of the held-out log-likelihood: "
              + "; ".join(f"seed {run['seed']}: {run['evidence_argmax']:g} against {run['held_out_argmax']:g}, "
                          f"{run['steps_apart']} grid step{'s' if run['steps_apart'] != 1 else ''} apart, "
                          f"{run['log_likelihood_given_up']:.4f} nats per held-out image given up (diag's argmax "
                          f"{run['diag_evidence_argmax']:g})" for run in runs)
              + f". (a) The claim **{v['evidence']}** here.", "",
              f"- (b) the MAP trained at β = {r['calibration_beta']:g}; each posterior's prior precision re-chosen by "
              "the evidence (β after: " + "; ".join(
                  f"{s} {_span([run['calibration']['prior'][s]['beta'] for run in runs], '.2g')}"
                  for s in ("last_layer", "kron", "diag")) + f"); probit predictive; ECE over {r['bins']} bins.", "",
              "| method | set | NLL | ECE | accuracy (%) | mean confidence (%) | AUROC held-out vs set (%) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, by_set in r["summary"].items():
        for name, m in by_set.items():
            def cell(metric, scale=1.0, digits=".3f"):
                if metric not in m:
                    return "—"
                x = m[metric]
                return f"{scale * x['mean']:{digits}} [{scale * x['min']:{digits}}–{scale * x['max']:{digits}}]"
            label = method if method == "MAP" else f"Laplace, {method.replace('_', ' ')}"
            lines.append(f"| {label} | {name} | {cell('nll')} | {cell('ece')} | {cell('accuracy', 100, '.2f')} "
                         f"| {cell('confidence', 100, '.1f')} | {cell('auroc', 100, '.1f')} |")
    lines.append("")
    for s in ("last_layer", "kron", "diag"):
        w = v[s]
        moved = max(abs(run["calibration"]["rows"][s]["held-out"]["accuracy"]
                        - run["calibration"]["rows"]["MAP"]["held-out"]["accuracy"]) for run in runs)
        doubt = "falls more" if w["more_doubt_outside"] else "does not fall more"

        def against_map(metric, s=s):
            below = sum(run["calibration"]["rows"][s]["held-out"][metric]
                        < run["calibration"]["rows"]["MAP"]["held-out"][metric] for run in runs)
            return ("lower than the MAP's in every seed" if below == len(runs) else
                    "higher than the MAP's in every seed" if below == 0 else f"lower in {below} of {len(runs)} seeds")
        lines.append(f"- (b) {s.replace('_', ' ')}: held-out accuracy {'kept' if w['accuracy_kept'] else 'not kept'} "
                     f"(it moves by at most {100 * moved:.2f} points); held-out NLL {against_map('nll')}, ECE "
                     f"{against_map('ece')}; confidence {doubt} on permuted digits than on held-out ones in every "
                     "seed.")
    p = r["paper"]
    lines.append(f"- {p['source']}: mean confidence on the OOD sets MAP {p['confidence']['MAP']:.1f} %, LA "
                 f"{p['confidence']['LA']:.1f} %, LA* {p['confidence']['LA*']:.1f} %; AUROC {p['auroc']['MAP']:.1f}, "
                 f"{p['auroc']['LA']:.1f}, {p['auroc']['LA*']:.1f}.")
    return "\n".join(lines) + "\n"


def render_influence(r: dict) -> str:
    """The default-mode run: per ranking the flipped labels found after inspecting 10, 20 and 30 % of the
    training set and the area under the curve, per seed and over the seeds, the damping's effect, and the
    verdicts (a quick run has fewer images, epochs and seeds, so the test checks this block's form against a
    fresh quick run's and that every verdict follows from the per-seed numbers the block quotes)."""
    _default_run(r, "influence")
    runs, s, v, at = r["runs"], r["summary"], r["verdicts"], r["at"]
    flipped = runs[0]["flipped"]
    after = [f"after {100 * p:g} %" for p in at]
    rule = "| --- | --- | " + " | ".join("---" for _ in at) + " |"
    lines = [f"- mnist-10k, N = {r['n']:,} training images, {flipped:,} labels flipped ({100 * r['flip']:g} %) per "
             f"seed; `{'-'.join(map(str, r['sizes']))}` relu, Adam α = {r['lr']:g} for {r['epochs']} epochs of "
             f"batches of {r['batch']}, β = {r['beta']:g}; EK-FAC with λ = {r['damping_fraction']:g} × the mean "
             f"eigenvalue of its Gauss-Newton matrix (λ = {_span([run['damping'] for run in runs], '.2g')}); TracIn "
             f"over the {r['epochs']} end-of-epoch checkpoints; {_seed_range(r, r['seeds'])}; mean [min–max] over "
             "the seeds.", "",
             f"| ranking | flipped labels found {after[0]} inspected | {' | '.join(after[1:])} "
             "| area under the curve |", rule]
    for m, row in s.items():
        cells = [_spread({k: row[f"found {p:g}"][k] for k in ("min", "mean", "max")}, ".1f", 100 / flipped)
                 for p in at]
        lines.append(f"| {m} | " + " | ".join(f"{c} %" for c in cells) + f" | {_spread(row['area'], '.3f')} |")
    lines += ["| random, expected | " + " | ".join(f"{100 * p:g} %" for p in at) + " | 0.5 |", "",
              f"| seed | ranking | found {after[0]} | {' | '.join(after[1:])} | area |", "| --- " + rule]
    for run in runs:
        for m, k in run["rankings"].items():
            found = " | ".join(f"{k['found'][f'{p:g}']:,} of {run['flipped']:,}" for p in at)
            lines.append(f"| {run['seed']} | {m} | {found} | {k['area']:.4f} |")
    fit = [run["fitted"][-1] for run in runs]
    lines += ["", f"- after the last epoch: {_span([100 * f['flipped'] for f in fit], '.1f')} % of the flipped "
                  f"examples predicted as their flipped label, {_span([100 * f['clean'] for f in fit], '.1f')} % of "
                  "the clean ones as theirs; held-out accuracy "
                  f"{_span([100 * run['held_out_accuracy'] for run in runs], '.1f')} % (true labels).",
              "- EK-FAC's area with λ = " + "; ".join(
                  f"{float(f):g} × the mean eigenvalue: {_span([run['damping_areas'][f] for run in runs], '.3f')}"
                  for f in runs[0]["damping_areas"]) + "."]
    if all("subset" in run for run in runs):
        sub = [run["subset"] for run in runs]
        lines.append(f"- EK-FAC fitted on a random {sub[0]['rows']:,} of the {r['n']:,} rows (one sampled output "
                     f"column each), every row scored: Spearman's ρ with the full fit's self-influence "
                     f"{_span([s['spearman'] for s in sub], '.4f')}, top-decile overlap "
                     f"{_span([s['top_decile_overlap'] for s in sub], '.3f')}; flipped labels found after "
                     f"{100 * at[0]:g} % " + ", ".join(f"{s['found']} (full fit {s['found_full']})" for s in sub) + ".")
    expected = " and ".join(f"{p * flipped:g} after {100 * p:g} %" for p in at[:2])
    above = {m: v[f"{m} above random"] for m in ("EK-FAC", "TracIn")}
    claims = "; ".join(f"{m}: verdict **{w['verdict']}** ({sum(w['per_seed'])} of {len(runs)} seeds)"
                       for m, w in above.items())
    lines.append(f"- (a) more flipped labels found than random inspection finds in expectation ({expected}), in "
                 f"every seed: {claims}.")
    w = v["EK-FAC above training loss"]
    lines.append(f"- (b) Koh & Liang: EK-FAC's area above the training loss's in every seed: verdict "
                 f"**{w['verdict']}** ({sum(w['per_seed'])} of {len(runs)} seeds).")
    w = v["TracIn above EK-FAC and training loss"]
    lines.append(f"- (c) Pruthi et al.: TracIn's area above both EK-FAC's and the training loss's in every seed: "
                 f"verdict **{w['verdict']}** ({sum(w['per_seed'])} of {len(runs)} seeds).")
    return "\n".join(lines) + "\n"


def render_influence_lds(r: dict) -> str:
    """The default-mode run of part 2 (``--lds``): per method the mean LDS over the test points per seed (with
    its standard error and quartiles) and over the seeds, the damping's effect, the retrainings' agreement, the
    full model, the verdicts and the literature's values (a quick run has other sizes, so the test checks that
    the committed runs' verdicts follow from the per-test-point values their JSON holds)."""
    _default_run(r, "influence_lds")
    runs, s, v, st = r["runs"], r["summary"], r["verdicts"], r["setting"]
    seeds = [run["seed"] for run in runs]
    models = st["subsets"] * st["retrains"]
    lines = [f"- mnist-10k; per seed N = {st['train']:,} training images and T = {st['test']} held-out test points "
             f"drawn at random; `{'-'.join(map(str, r['sizes']))}` relu, full-batch Adam α = {r['lr']:g} "
             f"cosine-decayed to 0 over {st['steps']} steps, β = {r['beta']:g}; M = {st['subsets']} random halves "
             f"of the training images, each retrained from K = {st['retrains']} inits ({models} models per seed); "
             "the actual outcome is the test loss averaged over the K. Scores from one model trained on all N: "
             f"λ = {r['damping_fraction']:g} × the mean eigenvalue of G "
             f"(λ = {_span([run['damping'] for run in runs], '.2g')}), CG {st['cg_iters']} iterations, TracIn over "
             f"{st['checkpoints']} checkpoints; {_seed_range(r, r['seeds'])}.", "",
             "| method | mean LDS: mean [min–max] over the seeds | "
             + " | ".join(f"seed {seed}: mean ± s.e. (quartiles)" for seed in seeds) + " |",
             "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
    for m in r["methods"]:
        cells = [f"{q['mean']:.3f} ± {q['sem']:.3f} ({q['q25']:.2f}, {q['median']:.2f}, {q['q75']:.2f})"
                 for q in s[m]["per_seed"]]
        lines.append(f"| {m} | {s[m]['mean']:.3f} [{s[m]['min']:.3f}–{s[m]['max']:.3f}] | " + " | ".join(cells) + " |")
    a = s["retrain agreement"]
    lines += ["", f"- two retrainings of the same subsets against each other (ρ between single models' test losses, "
                  f"mean over the test points and pairs): {a['mean']:.3f} [{a['min']:.3f}–{a['max']:.3f}].",
              "- mean LDS with λ = " + "; ".join(
                  f"{float(f):g} × the mean eigenvalue: EK-FAC "
                  f"{_span([run['damping_lds']['EK-FAC'][f] for run in runs], '.3f')}, KFAC "
                  f"{_span([run['damping_lds']['KFAC'][f] for run in runs], '.3f')}"
                  for f in runs[0]["damping_lds"]["EK-FAC"]) + ".",
              f"- the model trained on all N: cost {_span([run['final_cost'] for run in runs], '.4f')}, gradient norm "
              f"{_span([run['gradient_norm'] for run in runs], '.2g')} at the end; held-out accuracy "
              f"{_span([100 * run['held_out_accuracy'] for run in runs], '.1f')} % (all 2,000 held-out images); mean "
              f"test loss on the T points {_span([run['full_test_loss'] for run in runs], '.3f')}, against "
              f"{_span([run['subset_test_loss'] for run in runs], '.3f')} after training on a half."]
    for claim, w in v.items():
        rule = "more than two standard errors above 0" if claim.endswith("above 0") else ""
        lines.append(f"- {claim}{f' ({rule})' if rule else ''} in every seed: verdict **{w['verdict']}** "
                     f"({sum(w['per_seed'])} of {len(runs)} seeds).")
    lit = r["literature"]
    lines.append(f"- {lit['source']}: LDS of the MLP " + ", ".join(f"{k} {x:.2f}" for k, x in lit["MLP"].items())
                 + "; of the LR " + ", ".join(f"{k} {x:.2f}" for k, x in lit["LR"].items()) + ".")
    return "\n".join(lines) + "\n"


RENDER = {"autodiff_graphs": render_autodiff_graphs, "optimizers": render_optimizers,
          "initialization": render_initialization, "xor": render_xor,
          "universal_approximation": render_universal_approximation, "capacity": render_capacity,
          "batch_sizes": render_batch_sizes, "batchnorm": render_batchnorm,
          "learning_rate": render_learning_rate, "newton": render_newton,
          "edge_of_stability": render_edge_of_stability, "perceptron": render_perceptron,
          "gradient_noise": render_gradient_noise, "mnist": render_mnist,
          "gradient_agreement": render_gradient_agreement, "private_mnist": render_private_mnist,
          "second_order": render_second_order, "laplace": render_laplace,
          "influence": render_influence, "influence_lds": render_influence_lds}


def blocks(text: str) -> dict[str, str]:
    """``{name: body}`` of every results block in ``text``."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def key_of(run: dict, name: str) -> str:
    """The block key of a run's JSON: ``name`` for base seed 0, else ``name@S``."""
    seed = run.get("base_seed", 0)
    return name if seed == 0 else f"{name}@{seed}"


def take(folder: Path) -> str:
    """Copy ``folder/<name>.json`` and its PNG into the committed folders; returns the run's key."""
    found = sorted(p for p in Path(folder).glob("*.json") if p.stem in RENDER)
    if len(found) != 1:
        raise SystemExit(f"--take {folder}: expected one experiment's <name>.json there (name one of "
                         f"{', '.join(sorted(RENDER))}), found {[p.name for p in found] or 'none'}")
    path = found[0]
    run, name = json.loads(path.read_text()), path.stem
    if run.get("quick"):
        raise SystemExit(f"--take {folder}: {path.name} is from a --quick run; the blocks quote default runs: "
                         f"run python experiments/{name}.py without --quick first")
    key, png = key_of(run, name), path.with_suffix(".png")
    if not png.exists():
        raise SystemExit(f"--take {folder}: {png.name} is missing beside {path.name}; re-run the experiment")
    if png.stat().st_size > FIGURE_LIMIT:
        raise SystemExit(f"--take {folder}: {png.name} has {png.stat().st_size:,} bytes, more than the "
                         f"{FIGURE_LIMIT:,} a committed figure may take; re-run the experiment (it saves within it)")
    RESULTS.mkdir(exist_ok=True)
    FIGURES.mkdir(exist_ok=True)
    (RESULTS / f"{key}.json").write_text(path.read_text())
    (FIGURES / f"{key}.png").write_bytes(png.read_bytes())
    return key


def check(text: str, results: Path = RESULTS, figures_root: Path = README.parent) -> list[str]:
    """What is wrong with the blocks and figures of ``text`` against the committed files (empty: nothing)."""
    problems = []
    for m in BLOCK.finditer(text):
        key = m.group(2)
        name, path = key.split("@")[0], results / f"{key}.json"
        if name not in RENDER:
            problems.append(f"block {key}: no renderer for {name!r}")
        elif not path.exists():
            problems.append(f"block {key}: no committed results/{key}.json (run the experiment, then --take)")
        elif RENDER[name](json.loads(path.read_text())) != m.group(3):
            problems.append(f"block {key}: differs from its committed JSON (run python experiments/results.py)")
    for figure in FIGURE.findall(text):
        if not (figures_root / figure).exists():
            problems.append(f"figure {figure}: referenced, not committed")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="experiments/results.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--take", nargs="+", default=(), metavar="DIR",
                   help="output folders of default-mode runs to commit (their JSON and PNG)")
    p.add_argument("--check", action="store_true", help="compare only; exit status 1 on a problem")
    args = p.parse_args(argv)
    text = README.read_text()
    if args.check:
        problems = check(text)
        print("\n".join(problems) if problems else "every block matches its committed JSON; every figure exists")
        return 1 if problems else 0
    for folder in args.take:
        print(f"took {take(Path(folder))}")
    rewritten = []

    def replace(m):
        key = m.group(2)
        path = RESULTS / f"{key}.json"
        if not path.exists():
            return m.group(0)
        body = RENDER[key.split("@")[0]](json.loads(path.read_text()))
        if body != m.group(3):
            rewritten.append(key)
        return m.group(1) + body + m.group(4)

    README.write_text(BLOCK.sub(replace, text))
    print(f"rewrote {', '.join(rewritten) or 'nothing (every block matched)'}")
    missing = [m.group(2) for m in BLOCK.finditer(text) if not (RESULTS / f"{m.group(2)}.json").exists()]
    if missing:
        print(f"no committed JSON yet for: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
