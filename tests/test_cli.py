"""The main job, ``fnn-train`` / ``python -m fnn``."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import fnn
from fnn.cli import main


def test_help_documents_every_flag():
    done = subprocess.run([sys.executable, "-m", "fnn", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in ("--dataset", "--data-dir", "--hidden", "--activation", "--loss", "--optimizer", "--lr",
                 "--batch-size", "--epochs", "--seed", "--grad-source", "--checkpoint-dir", "--resume", "--plot"):
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
    with pytest.raises(SystemExit, match=r"checkpoint has sizes \(64, 16, 10\), expected \(64, 8, 10\)"):
        main(base + [str(tmp_path / "x.json"), "--hidden", "8", "--checkpoint-dir", ck, "--resume"])
    with pytest.raises(SystemExit, match=r"checkpoint has adam b1=0.9, expected b1=0.8"):
        main(base + [str(tmp_path / "x.json"), "--b1", "0.8", "--checkpoint-dir", ck, "--resume"])
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


@pytest.mark.parametrize("argv,msg", [
    (["--optimizer", "sgd", "--b1", "0.9"], "sgd takes no --b1"),
    (["--resume"], "--resume needs --checkpoint-dir"),
])
def test_bad_flag_combinations(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(argv)


def test_debug_nans_replays_the_failing_batch(capsys):
    code = main(["--epochs", "5", "--hidden", "16", "--optimizer", "sgd", "--lr", "1e4", "--activation", "relu",
                 "--init", "he_normal", "--loss", "mse", "--quiet", "--debug-nans"])
    captured = capsys.readouterr()
    assert code == 1 and "non-finite values at epoch" in captured.err
    assert "replay of a batch of" in captured.out
    assert re.search(r"^ +1 +\S+ +\d+ +\S+ +\d+ +\S+ +\d+$", captured.out, flags=re.M)


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
    with pytest.raises(SystemExit, match="privacy settings"):
        main(["--epochs", "2", "--dp-noise", "2.0", "--resume", *flags])
    assert main(["--epochs", "2", "--dp-epsilon", "3", "--resume", *flags]) == 0
    out = capsys.readouterr().out
    assert f"σ = {sigma:.4g}" in out.split("resuming with the run's")[1]
    assert float(re.search(r"ε ([0-9.]+)", out.split("epoch   2/2")[1]).group(1)) > 3.0  # the same σ, twice the steps
