"""The main job, ``fnn-train`` / ``python -m fnn``."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import fnn
from fnn import checkpoint
from fnn.cli import ConfigError, RunConfig, check, config_from_args, main, make_optimizer, parser, run

FAST = ["--hidden", "8", "--quiet"]  # one small configuration, compiled once for the tests below


def _error(argv, capsys, code=2):
    """Run ``main(argv)`` expecting it to stop with exit status ``code``; its ``(stdout, stderr)``."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == code, err
    assert "fnn-train: error: " in err
    return out, err


def test_help_documents_every_flag():
    done = subprocess.run([sys.executable, "-m", "fnn", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in ("--dataset", "--data-dir", "--hidden", "--activation", "--loss", "--optimizer", "--lr",
                 "--batch-size", "--epochs", "--seed", "--grad-source", "--checkpoint-dir", "--resume", "--plot",
                 "--laplace"):
        assert flag in done.stdout


def test_digits_run_checks_gradients_trains_and_plots(tmp_path, capsys):
    png, hist = tmp_path / "curves.png", tmp_path / "history.json"
    assert main(["--epochs", "3", "--plot", str(png), "--history", str(hist), "--hidden", "32"]) == 0
    out = capsys.readouterr().out
    check = re.search(r"manual vs autodiff per layer: .*\(max ([0-9.e+-]+)\); manual vs finite differences: "
                      r"max ([0-9.e+-]+)", out)
    assert check and float(check.group(1)) < 1e-5 and float(check.group(2)) < 1e-5
    # the table: one line per layer and leaf of the 64-32-10 network, 16 coordinates (10 for b²)
    table = re.findall(r"^ +(\d) (W|b) +([0-9.e+-]+) +([0-9.e+-]+) +(\d+)$", out, flags=re.M)
    assert [(l, k, int(n)) for l, k, _, _, n in table] == [("1", "W", 16), ("1", "b", 16), ("2", "W", 16),
                                                           ("2", "b", 10)]
    assert max(float(v) for row in table for v in row[2:4]) < 1e-5
    assert len(re.findall(r"^epoch +\d+/3 .*samples/s", out, flags=re.M)) == 3
    assert re.search(r"held-out accuracy \d+\.\d+%, median [\d,]+ samples/s", out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["epoch"] for r in json.loads(hist.read_text())] == [1, 2, 3]


def test_resume_continues_to_the_same_result(tmp_path, capsys):
    base = ["--epochs", "4", "--hidden", "16", "--quiet", "--history"]
    main(base + [str(tmp_path / "straight.json")])
    ck = str(tmp_path / "ck")
    main(["--epochs", "2", "--hidden", "16", "--quiet", "--checkpoint-dir", ck])
    # flags that describe another model or optimizer are refused, naming the difference
    _, err = _error(base + [str(tmp_path / "x.json"), "--hidden", "8", "--checkpoint-dir", ck, "--resume"], capsys)
    assert "cannot --resume: " in err and "checkpoint has sizes (64, 16, 10), expected (64, 8, 10)" in err
    _, err = _error(base + [str(tmp_path / "x.json"), "--b1", "0.8", "--checkpoint-dir", ck, "--resume"], capsys)
    assert "checkpoint has adam b1=0.9, expected b1=0.8" in err
    main(base + [str(tmp_path / "resumed.json"), "--checkpoint-dir", ck, "--resume"])
    assert "resumed from" in capsys.readouterr().out
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [r["epoch"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a["train_loss"] == b["train_loss"] and a["held_out_accuracy"] == b["held_out_accuracy"]


def test_autodiff_source_and_other_optimizers(capsys):
    assert main(["--epochs", "1", "--hidden", "8", "--grad-source", "autodiff", "--optimizer", "rmsprop",
                 "--decay", "0.95", "--quiet"]) == 0
    assert "gradients: autodiff" in capsys.readouterr().out


def test_mixed_precision_flag(tmp_path, capsys):
    assert main(["--epochs", "2", "--hidden", "32", "--compute-dtype", "bfloat16", "--quiet",
                 "--checkpoint-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 matmuls" in out and "gradient check on the first batch (matmuls in float32)" in out
    ck = fnn.checkpoint.load(fnn.checkpoint.latest(tmp_path))
    assert ck.net.compute_dtype == "bfloat16" and ck.params[0]["W"].dtype == np.float32


def test_mnist_10k(mnist_dir, capsys):
    assert main(["--dataset", "mnist-10k", "--data-dir", str(mnist_dir), "--epochs", "1", "--hidden", "32"]) == 0
    assert "8000 train / 2000 held out" in capsys.readouterr().out


def _garbage_mnist(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"not an IDX file")
    return str(tmp_path)


def _file(tmp_path):
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file")


# Each mistake stops before training with "fnn-train: error: <message>" and exit status 2 (messages are regexes).
@pytest.mark.parametrize("argv, message", [
    # before: ZeroDivisionError traceback
    (["--batch-size", "0"], "argument --batch-size: must be a finite int ≥ 1; got 0"),
    # before: ValueError traceback from fit, after the gradient check
    (["--batch-size", "5000"], "--batch-size 5000 is larger than the 1437 training samples of digits"),
    # before: ValueError traceback from fit (1437 = 1436 + 1: a last batch of one sample)
    (["--batch-norm", "--batch-size", "1436"], "the last batch .* would hold 1 sample"),
    # before: exit status 0, having trained no epoch
    (["--epochs", "-1"], "argument --epochs: must be a finite int ≥ 0; got -1"),
    # before: exit status 0 with a negative training loss
    (["--l2", "-0.1"], "argument --l2: must be a finite float ≥ 0; got -0.1"),
    # before: exit status 0 with a NaN loss
    (["--l2", "nan"], "argument --l2: must be a finite float ≥ 0; got nan"),
    # before: taken as --epochs 3
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    # before: ValueError traceback from fnn.MLP
    (["--hidden", "0"], "invalid model: sizes must be a sequence of at least two positive ints"),
    # before: exit status 1 (a SystemExit with a message)
    (["--optimizer", "sgd", "--b1", "0.9"], "sgd takes no --b1"),
    # before: ValueError traceback from fnn.optim.adam
    (["--b1", "1.5"], r"b1 must be a finite number in \[0, 1\)"),
    # before: exit status 1 (a SystemExit with a message)
    (["--resume"], "--resume needs --checkpoint-dir"),
    # before: no such flag
    (["--resume", "--overwrite", "--checkpoint-dir", "ck"], "give one of them"),
    # before: trained without privacy, silently
    (["--dp-noise", "1.0"], "--dp-noise only apply to private training: add --dp-clip"),
    # before: ValueError traceback from fit, after the gradient check
    (["--dp-clip", "1", "--dp-lot-size", "64", "--dp-noise", "1", "--grad-source", "autodiff"],
     "--dp-clip needs --grad-source manual"),
    # before: exit status 1 (a SystemExit with a message)
    (["--dp-clip", "1", "--dp-lot-size", "5000", "--dp-noise", "1"],
     "--dp-lot-size 5000 is larger than the 1437 training samples of digits"),
    # before: DataError traceback
    (["--dataset", "mnist-10k", "--data-dir", "{garbage}"], "cannot load --dataset mnist-10k: .*t10k"),
    # before: FileExistsError traceback from the plot, after training (the trained params lost)
    (["--plot", "{file}/curves.png"], "--plot .*/file/curves.png: cannot create its directory"),
    # before: IsADirectoryError traceback, after training
    (["--history", "{tmp}"], "--history .* is a directory; give a file name"),
    # before: ValueError traceback from matplotlib, after training
    (["--plot", "{tmp}/curves.xyz"], r"matplotlib writes no \.xyz files"),
    # before: FileExistsError traceback at the end of the first epoch
    (["--checkpoint-dir", "{file}"], "--checkpoint-dir .*/file cannot be created"),
    # before: TypeError traceback after training
    (["--overwrite"], "--overwrite needs --checkpoint-dir"),
    # before: no such flag (the CLI knew the first-order optimizers only)
    (["--optimizer", "hessian_free", "--refresh", "3"],
     "hessian_free takes no --refresh; it takes --lr, --damping, --cg-iters, --decay, --cg-tol, --backtrack$"),
    (["--optimizer", "kfac_adaptive", "--lr", "0.1"], "kfac_adaptive takes no --lr: it chooses its step length itself"),
    (["--optimizer", "kfac_adaptive", "--schedule", "cosine"], "kfac_adaptive takes no --schedule cosine"),
    (["--optimizer", "kfac_adaptive", "--rescale"],
     "kfac_adaptive takes no --rescale; it takes --damping, --decay, --refresh, --adapt-every, --gamma-every, "
     "--exact$"),
    (["--optimizer", "kfac", "--damping", "-1"], r"damping must be a finite number in \[0, inf\); got -1.0"),
    (["--optimizer", "hessian_free", "--schedule", "cosine"],
     "hessian_free takes a constant learning rate, not --schedule cosine"),
    (["--optimizer", "kfac", "--batch-norm"], "K-FAC is not defined for batch-normalized networks"),
    (["--optimizer", "kfac", "--dp-clip", "1", "--dp-lot-size", "64", "--dp-noise", "1"],
     "--dp-clip needs a first-order --optimizer: kfac reads the curvature of the batch"),
    (["--optimizer", "kfac", "--debug-nans"], "--debug-nans replays the step of a first-order --optimizer"),
    # before: no such flag (the Laplace approximation was library-only)
    (["--laplace", "kron", "--batch-norm"], "--laplace kron covers networks without batch norm"),
    (["--laplace", "diag", "--loss", "mae"], "--laplace diag with --loss mae: mae has no curvature .* use --loss mse"),
    (["--laplace", "kron", "--dp-clip", "1", "--dp-lot-size", "64", "--dp-noise", "1"],
     r"--laplace kron reads every training example's curvature .* outside the privacy accounting of --dp-clip: .*"
     r"would break the \(ε, δ\) guarantee"),
    (["--laplace", "full", "--hidden", "128"],
     r"--laplace full forms a P × P matrix, and the network \(64, 128, 10\) has P = 9,610 parameters, above the limit "
     "of 5,000; use --laplace kron"),
    (["--laplace", "last_layer", "--hidden", "600"], "has P = 6,010 parameters in its output layer, above the limit"),
    (["--laplace", "block"], "argument --laplace: invalid choice: 'block'"),
    pytest.param(["--loss", "categorical_cross_entropy"], "categorical_cross_entropy reads probabilities",
                 # before: trained on the identity output as if it gave probabilities, exit status 0
                 marks=pytest.mark.skipif(not hasattr(fnn.losses, "check_output"), reason="no check_output yet")),
])
def test_mistakes_stop_before_training_with_status_2(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "garbage").mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / "garbage" / name).write_bytes(b"not an IDX file")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "file", garbage=tmp_path / "garbage") for a in argv]
    out, err = _error(FAST + ["--epochs", "1", *argv], capsys)
    assert re.search("^fnn-train: error: .*" + message, err, flags=re.M), err
    assert "Traceback" not in err and "gradient check" not in out


def test_loss_output_pair_is_checked_before_training(monkeypatch, capsys):
    def refuse(loss, output):
        raise ValueError(f"{loss.name} does not suit {output!r}; use softmax_cross_entropy.")

    monkeypatch.setattr(fnn.losses, "check_output", refuse, raising=False)
    # before: no check; the pair went on to training
    _, err = _error(FAST + ["--loss", "mse"], capsys)
    assert "error: --loss mse with --output identity: mse does not suit 'identity'; use softmax_cross_entropy." in err


def test_help_gives_every_option_a_help_line_and_its_default():
    p = parser()
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    # before: 13 flags (--activation, --batch-size, --epochs, ...) had no help line, so no default shown
    assert [a.option_strings for a in options if not (a.help or "").strip()] == []
    assert " ".join(p.format_help().split()).count("(default: ") == len(options)


def test_failed_gradient_check_stops_the_run(monkeypatch, capsys):
    real = fnn.gradcheck.backprop

    def off_by_one_percent(*args, **kwargs):  # a wrong ∂C/∂W^2, as a bug in the δ-recursion would give
        cost, grads, *rest = real(*args, **kwargs)
        grads = [*grads[:-1], {**grads[-1], "W": 1.01 * grads[-1]["W"]}]
        return (cost, grads, *rest)

    monkeypatch.setattr(fnn.gradcheck, "backprop", off_by_one_percent)
    # before: the table showed 9.9e-03 and training went on (exit status 0)
    _, err = _error(FAST + ["--epochs", "1"], capsys, code=1)
    assert "gradient check failed: the manual and autodiff gradients of layer 2 W differ by 9.9e-03 (relative), " \
           "above the float32 tolerance 0.001" in err


def test_fresh_run_refuses_a_directory_with_checkpoints_unless_overwrite(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(FAST + ["--epochs", "2", "--checkpoint-dir", str(ck)]) == 0
    files = {p.name: p.read_bytes() for p in ck.iterdir()}
    first = checkpoint.load(ck / "epoch-000002.npz").meta
    assert first["run"] and first["held_out_loss"] > 0
    # before: the second run silently overwrote the first run's epoch-000001.npz (and rotated its files out)
    _, err = _error(FAST + ["--epochs", "1", "--seed", "1", "--checkpoint-dir", str(ck)], capsys)
    assert "Use --resume to continue that run, another --checkpoint-dir, or --overwrite to replace them." in err
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == files
    assert main(FAST + ["--epochs", "1", "--seed", "1", "--checkpoint-dir", str(ck), "--overwrite"]) == 0
    assert os.listdir(ck) == ["epoch-000001.npz"]
    assert checkpoint.load(ck / "epoch-000001.npz").meta["run"] not in (None, first["run"])


def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(FAST + ["--epochs", "2", "--checkpoint-dir", str(ck)]) == 0
    run = checkpoint.load(ck / "epoch-000002.npz").meta["run"]
    data = (ck / "epoch-000002.npz").read_bytes()
    (ck / "epoch-000002.npz").write_bytes(data[: len(data) // 2])
    (ck / ".epoch-000003.npz.k1ll3d.tmp").write_bytes(data)  # a write killed before its rename
    capsys.readouterr()
    # before: "cannot --resume" (exit status 1) on the damaged file; the temporary file stayed
    assert main(FAST + ["--epochs", "3", "--checkpoint-dir", str(ck), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"--resume skips a damaged checkpoint: \S+epoch-000002.npz: not a readable checkpoint", err)
    assert re.search(r"resumed from \S+epoch-000001.npz \(epoch 1\), the newest intact checkpoint", out)
    assert sorted(os.listdir(ck)) == ["epoch-000001.npz", "epoch-000002.npz", "epoch-000003.npz"]
    assert {checkpoint.load(p).meta["run"] for p in ck.iterdir()} == {run}
    for p in ck.iterdir():
        p.write_bytes(b"damaged")
    # before: exit status 1, "cannot --resume" naming the newest file only
    _, err = _error(FAST + ["--epochs", "4", "--checkpoint-dir", str(ck), "--resume"], capsys)
    assert f"cannot --resume: no intact checkpoint in {ck}" in err


def test_divergence_keeps_and_saves_the_last_finite_params_and_replays_the_failing_batch(tmp_path, capsys):
    ck = tmp_path / "ck"
    code = main(["--epochs", "5", "--hidden", "16", "--optimizer", "sgd", "--lr", "1e4", "--activation", "relu",
                 "--init", "he_normal", "--loss", "mse", "--quiet", "--debug-nans", "--checkpoint-dir", str(ck)])
    captured = capsys.readouterr()
    assert code == 1 and "non-finite values at epoch" in captured.err
    assert "replay of a batch of" in captured.out
    assert re.search(r"^ +1 +\S+ +\d+ +\S+ +\d+ +\S+ +\d+$", captured.out, flags=re.M)
    # before: nothing said which params were kept, and a run failing in its first epoch saved none
    kept = re.search(r"kept the params of epoch (\d+), in (\S+)", captured.err)
    saved = checkpoint.load(kept.group(2))
    assert saved.epoch == int(kept.group(1))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(saved.params))


def test_data_parallel_flag_on_one_device(capsys):
    assert main(["--epochs", "1", "--hidden", "8", "--quiet", "--data-parallel", "--batch-size", "100",
                 "--last-batch", "drop"]) == 0


def test_private_run_prints_epsilon_and_resume_keeps_its_noise(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    flags = ["--hidden", "16", "--optimizer", "sgd", "--lr", "0.5", "--dp-clip", "1.0", "--dp-lot-size", "128",
             "--checkpoint-dir", ck]
    assert main(["--epochs", "1", "--dp-epsilon", "3", *flags]) == 0
    first = capsys.readouterr().out
    sigma = float(re.search(r"σ = ([0-9.]+)", first).group(1))
    assert float(re.search(r"ε ([0-9.]+)", first).group(1)) == pytest.approx(3.0, rel=0.01)
    assert "privacy settings" in _error(["--epochs", "2", "--dp-noise", "2.0", "--resume", *flags], capsys)[1]
    assert main(["--epochs", "2", "--dp-epsilon", "3", "--resume", *flags]) == 0
    out = capsys.readouterr().out
    assert f"σ = {sigma:.4g}" in out.split("resuming with the run's")[1]
    assert float(re.search(r"ε ([0-9.]+)", out.split("epoch   2/2")[1]).group(1)) > 3.0  # the same σ, twice the steps


def test_resume_keeps_the_runs_chunk_when_the_default_changes(tmp_path, capsys, monkeypatch):
    """``Privacy.chunk`` bounds memory, not privacy: a checkpoint written under another default chunk
    resumes (with its own chunk) instead of being refused as other privacy settings."""
    from fnn import privacy
    ck = str(tmp_path / "ck")
    flags = ["--hidden", "8", "--optimizer", "sgd", "--lr", "0.5", "--dp-clip", "1.0", "--dp-lot-size", "128",
             "--dp-noise", "1.0", "--checkpoint-dir", ck]
    defaults = privacy.Privacy.__new__.__defaults__
    monkeypatch.setattr(privacy.Privacy.__new__, "__defaults__", (*defaults[:-1], 64))  # an older default
    assert main(["--epochs", "1", "--quiet", *flags]) == 0
    monkeypatch.setattr(privacy.Privacy.__new__, "__defaults__", defaults)
    assert privacy.Privacy(clip=1.0, lot_size=1).chunk != 64
    assert main(["--epochs", "2", "--resume", *flags]) == 0
    assert "privacy settings" not in capsys.readouterr().err


XOR = RunConfig(dataset="xor", hidden=(4,), batch_size=4, quiet=True)  # the four XOR points: a run compiles fast


def test_run_config_is_the_flags_and_runs_without_argparse(tmp_path, capsys):
    assert config_from_args(parser().parse_args([])) == RunConfig()  # the flags' defaults are RunConfig's
    assert config_from_args(parser().parse_args(["--optimizer", "kfac", "--damping", "0.1", "--hidden", "8", "4"])) \
        == RunConfig(optimizer="kfac", hyperparams=(("damping", 0.1),), hidden=(8, 4))
    assert config_from_args(parser().parse_args(["--optimizer", "kfac", "--exact", "--refresh", "2"])).hyperparams \
        == (("exact", True), ("refresh", 2))
    # a switch that is on by default (Hessian-free's backtracking) can be switched off
    off = config_from_args(parser().parse_args(["--optimizer", "hessian_free", "--no-backtrack", "--cg-tol", "0"]))
    assert off.hyperparams == (("backtrack", False), ("cg_tol", 0.0))
    hyper = make_optimizer(check(off), fnn.MLP((2, 4, 2)), fnn.losses.softmax_cross_entropy, 10).hyperparams
    assert (hyper["backtrack"], hyper["cg_tol"]) == (False, 0.0)
    assert config_from_args(parser().parse_args(["--optimizer", "hessian_free"])).hyperparams == ()
    history = tmp_path / "h.json"
    assert run(XOR._replace(epochs=2, history=str(history), hyperparams={"b1": 0.8})) == 0
    assert "xor: 4 train / 4 held out, network (2, 4, 2) relu->identity, softmax_cross_entropy, adam lr=0.001" \
        in capsys.readouterr().out
    assert [r["epoch"] for r in json.loads(history.read_text())] == [1, 2]
    mistakes = [(XOR._replace(resume=True), "--resume needs --checkpoint-dir"),
                (XOR._replace(optimizer="lion"), "argument --optimizer: invalid choice: 'lion'"),
                (XOR._replace(batch_size=0), "argument --batch-size: must be a finite int ≥ 1; got 0"),
                (XOR._replace(optimizer="sgd", hyperparams={"b1": 0.8}), "sgd takes no --b1; it takes --lr$"),
                (XOR._replace(batch_size=5), "--batch-size 5 is larger than the 4 training samples of xor")]
    for config, message in mistakes:
        with pytest.raises(ConfigError, match=message):
            run(config)
    assert check(XOR._replace(hyperparams={"eps": 1e-6, "b1": 0.8})).hyperparams == (("b1", 0.8), ("eps", 1e-6))


def test_second_order_optimizers_are_built_for_the_runs_network_loss_l2_and_seed():
    net, loss = fnn.MLP((2, 4, 2)), fnn.losses.softmax_cross_entropy
    opt = make_optimizer(check(XOR._replace(optimizer="kfac", l2=0.01, seed=3, hyperparams={"refresh": 2})),
                         net, loss, 10)
    hyper = opt.hyperparams
    assert (hyper["net"], hyper["loss"], hyper["l2"], hyper["seed"], hyper["refresh"]) == (net, loss, 0.01, 3, 2)
    assert hyper["learning_rate"] == 1e-3  # no --lr: kfac's own default
    scheduled = make_optimizer(check(XOR._replace(optimizer="kfac", schedule="cosine", lr=0.5)), net, loss, 10)
    assert callable(scheduled.hyperparams["learning_rate"])  # kfac takes a schedule, hessian_free does not
    assert make_optimizer(check(XOR._replace(optimizer="hessian_free")), net, loss, 10).hyperparams[
        "learning_rate"] == 1.0


def test_hessian_free_trains_from_the_command_line(tmp_path, capsys):
    history = tmp_path / "h.json"
    assert main(["--dataset", "xor", "--hidden", "4", "--batch-size", "4", "--quiet", "--optimizer", "hessian_free",
                 "--cg-iters", "5", "--epochs", "3", "--history", str(history)]) == 0
    assert "hessian_free lr=1.0" in capsys.readouterr().out  # no --lr: hessian_free's own default
    losses = [r["train_loss"] for r in json.loads(history.read_text())]
    assert losses[2] < losses[1] < losses[0]


def test_kfac_adaptive_trains_from_the_command_line(tmp_path, capsys):
    """K-FAC with momentum and adaptive damping takes no learning rate: built without one, it trains."""
    history = tmp_path / "h.json"
    assert main(["--dataset", "xor", "--hidden", "4", "--batch-size", "4", "--quiet", "--optimizer", "kfac_adaptive",
                 "--damping", "1", "--adapt-every", "1", "--epochs", "3", "--history", str(history)]) == 0
    assert "kfac_adaptive step length from its model" in capsys.readouterr().out
    losses = [r["train_loss"] for r in json.loads(history.read_text())]
    assert losses[2] < losses[0]


def test_kfac_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, capsys):
    ck, flags = str(tmp_path / "ck"), ["--dataset", "xor", "--hidden", "4", "--batch-size", "2", "--quiet",
                                       "--optimizer", "kfac", "--lr", "0.1", "--damping", "0.01", "--refresh", "3"]
    assert main(flags + ["--epochs", "3", "--history", str(tmp_path / "straight.json")]) == 0
    assert main(flags + ["--epochs", "1", "--checkpoint-dir", ck]) == 0
    assert fnn.optim.describe(checkpoint.load(checkpoint.latest(ck)).opt)["hyperparams"]["damping"] == 0.01
    _, err = _error(flags + ["--epochs", "3", "--checkpoint-dir", ck, "--resume", "--damping", "0.1"], capsys)
    assert "checkpoint has kfac damping=0.01, expected damping=0.1" in err
    assert main(flags + ["--epochs", "3", "--checkpoint-dir", ck, "--resume", "--history",
                         str(tmp_path / "resumed.json")]) == 0
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [r["epoch"] for r in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed):
        assert a["train_loss"] == b["train_loss"] and a["held_out_loss"] == b["held_out_loss"]


@pytest.mark.slow
def test_kfac_reaches_95_percent_on_digits(tmp_path, capsys):
    history = tmp_path / "h.json"
    assert main(["--optimizer", "kfac", "--lr", "0.1", "--damping", "0.01", "--hidden", "64", "--epochs", "5",
                 "--quiet", "--history", str(history)]) == 0
    printed = float(re.search(r"held-out accuracy ([\d.]+)%", capsys.readouterr().out).group(1))
    accuracy = json.loads(history.read_text())[-1]["held_out_accuracy"]
    assert accuracy >= 0.95 and printed == pytest.approx(100 * accuracy, abs=0.01)


# 160 training and 40 held-out blobs with a 2-4-2 network: the Laplace fits compile once for the tests below
BLOBS = ["--dataset", "blobs", "--hidden", "4", "--batch-size", "16", "--epochs", "2", "--lr", "0.01", "--quiet"]


def _z(saved, x):
    """``x`` z-scored with the statistics of the checkpoint ``saved`` (those of its training split)."""
    return np.asarray(fnn.data.zscore(fnn.data.Normalizer(*saved.normalizer), x), np.float32)


def test_laplace_kron_prints_the_evidence_optimal_beta_and_calibration_and_saves_the_posterior(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(BLOBS + ["--l2", "1e-3", "--laplace", "kron", "--checkpoint-dir", str(ck)]) == 0
    out = capsys.readouterr().out
    saved = checkpoint.load(checkpoint.latest(ck))
    ds = fnn.data.blobs()
    # the posterior refitted here at the saved params, on the z-scored training split, from δ = N·β
    post = fnn.laplace.fit_laplace(saved.net, saved.params, (_z(saved, ds.x_train), ds.y_train),
                                   "softmax_cross_entropy", structure="kron", l2=1e-3)
    best = fnn.laplace.optimize_prior_precision(post)
    delta = float(best.posterior.prior_precision[0])
    assert "Laplace (kron) at the trained params, on the training split: N = 160, P = 22;" in out
    start = re.search(r"log evidence at the training β = 0.001 \(δ = N·β = ([\d.]+)\): (\S+)", out)
    assert float(start.group(1)) == pytest.approx(0.16)
    assert float(start.group(2)) == pytest.approx(float(fnn.laplace.log_marginal_likelihood(post)), abs=1e-4)
    optimum = re.search(r"δ\* = (\S+), β\* = δ\*/N = (\S+): (\S+) \(MacKay's fixed point, (\d+) iterations, "
                        r"converged\)", out)
    assert float(optimum.group(1)) == pytest.approx(delta, rel=1e-5)
    assert float(optimum.group(2)) == pytest.approx(delta / 160, rel=1e-5)
    assert float(optimum.group(3)) == pytest.approx(best.evidence[-1], abs=1e-4)
    assert int(optimum.group(4)) == best.iterations
    # the table's rows: the plain network's softmax, and the probit predictive of the posterior at δ*
    x_test = _z(saved, ds.x_test)
    assert "calibration on the 40 held-out samples (ECE over 15 equal-width confidence bins):" in out
    expected = {"MAP": jax.nn.softmax(saved.net.apply(saved.params, x_test)),
                "Laplace": fnn.laplace.predict(best.posterior, x_test)}
    for row, probs in expected.items():
        printed = re.search(rf"^  {row} +(\S+) +(\S+) +(\S+)% +(\S+)$", out, flags=re.M).groups()
        ref = fnn.metrics.calibration(probs, ds.y_test, bins=15)
        assert [float(v) for v in printed] == pytest.approx(
            [ref["nll"], ref["ece"], 100 * ref["accuracy"], ref["confidence"]], abs=1e-4)
    # the last checkpoint holds the posterior at δ*, and says so
    assert f"posterior saved in {ck / 'epoch-000002.npz'}" in out
    assert (saved.epoch, saved.posterior.structure, saved.posterior.n) == (2, "kron", 160)
    assert float(saved.posterior.prior_precision[0]) == pytest.approx(delta, rel=1e-6)
    assert float(fnn.laplace.log_marginal_likelihood(saved.posterior)) == pytest.approx(best.evidence[-1], abs=1e-4)
    # --resume reads it and trains on, without the posterior
    assert main(BLOBS + ["--l2", "1e-3", "--epochs", "3", "--checkpoint-dir", str(ck), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert checkpoint.load(checkpoint.latest(ck)).posterior is None


def test_laplace_regression_prints_the_held_out_gaussian_nll(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["--dataset", "regression-1d", "--hidden", "4", "--batch-size", "16", "--epochs", "1", "--quiet",
                 "--laplace", "diag", "--checkpoint-dir", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "log evidence at δ = 1 (--l2 0 gives no prior to start from)" in out
    printed = re.search(r"NLL on the 40 held-out samples \(nats per sample\): MAP \(noise σ² I\) (\S+), Laplace "
                        r"\(σ² I \+ J Σ Jᵀ\) (\S+)$", out, flags=re.M)
    saved = checkpoint.load(checkpoint.latest(ck))
    ds = fnn.data.regression_1d()
    x = _z(saved, ds.x_test)
    r = np.asarray(saved.net.apply(saved.params, x), np.float64) - ds.y_test  # (40, 1)
    # mse is the Gaussian N(y | f, (K/2) I): σ² = 1/2 for one output; Laplace adds J Σ Jᵀ
    jsj = np.asarray(fnn.laplace.glm_predictive(saved.posterior, x)[1], np.float64)[:, :, 0]
    for variance, value in ((0.5, printed.group(1)), (0.5 + jsj, printed.group(2))):
        assert float(value) == pytest.approx(np.mean(0.5 * (np.log(2 * np.pi * variance) + r ** 2 / variance)),
                                             abs=1e-4)


def test_laplace_of_a_non_canonical_pair_prints_the_evidence_only(capsys):
    assert main(BLOBS + ["--epochs", "0", "--output", "sigmoid", "--loss", "categorical_cross_entropy",
                         "--laplace", "last_layer"]) == 0
    out = capsys.readouterr().out
    assert "(the posterior covers the output layer's 10)" in out and "β* = δ*/N" in out
    assert "no calibration table: categorical_cross_entropy on a sigmoid output is not a canonical pair" in out
    assert "train on output softmax for the table" in out and "posterior not saved (no --checkpoint-dir)" in out
