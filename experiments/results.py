"""The results blocks of experiments/README.md, generated from the experiments' JSON.

A block is the text between ``<!-- results NAME -->`` and ``<!-- /results -->``; it quotes only the
deterministic fields of ``NAME.json`` (counts, not timings), rendered by ``RENDER[NAME]``, so a quoted
number cannot drift from what the script prints: ``tests/test_experiments_b.py`` renders a fresh
run's JSON and compares it with the block. After changing an experiment, regenerate with

    python experiments/<name>.py && python experiments/results.py

which rewrites every block whose ``out/<name>/<name>.json`` exists (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "experiments" / "README.md"
BLOCK = re.compile(r"(<!-- results (\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


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
             f"seeds 0–{r['seeds'] - 1}; first over last hidden layer, mean [min–max].", "",
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
              f"{t['batch']}, {t['iterations']} iterations, seeds 0–{t['seeds'] - 1}; mean activation of the top "
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


RENDER = {"autodiff_graphs": render_autodiff_graphs, "optimizers": render_optimizers,
          "initialization": render_initialization}


def blocks(text: str) -> dict[str, str]:
    """``{name: body}`` of every results block in ``text``."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="experiments/results.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "out"), help="folder holding <name>/<name>.json (default out/)")
    p.add_argument("--check", action="store_true", help="compare only; exit status 1 on a difference")
    args = p.parse_args(argv)
    text = README.read_text()
    stale = []

    def replace(m):
        name = m.group(2)
        path = Path(args.out) / name / f"{name}.json"
        if name not in RENDER or not path.exists():
            return m.group(0)
        body = RENDER[name](json.loads(path.read_text()))
        if body != m.group(3):
            stale.append(name)
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(replace, text)
    if args.check:
        print("stale: " + ", ".join(stale) if stale else "every block matches its JSON")
        return 1 if stale else 0
    README.write_text(new)
    print(f"rewrote {', '.join(stale) or 'nothing (every block matched)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
