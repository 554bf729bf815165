"""``fnn-train`` findings of the outside review (issue 28): one test per finding, each failing before its fix.

The runs train the four XOR points with a 2-4-2 network; private runs take 160 blobs in lots of 8, where the
accountant is quick (q = 0.05), and compile their epoch once for all.
"""

import errno
import fcntl
import json
import os
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest

import fnn.cli
from fnn import checkpoint, privacy
from fnn.cli import main
from fnn.train import FitResult

XOR = ["--dataset", "xor", "--batch-size", "4", "--hidden", "4", "--quiet"]
# 160 training samples, q = 8/160 = 0.05, 20 steps an epoch
PRIVATE = ["--dataset", "blobs", "--batch-size", "16", "--hidden", "4", "--quiet", "--optimizer", "sgd", "--lr", "0.5",
           "--dp-clip", "1", "--dp-lot-size", "8"]


def _error(argv, capsys, code=2):
    """Run ``main(argv)`` expecting it to stop with exit status ``code``; its ``(stdout, stderr)``."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == code, err
    assert "fnn-train: error: " in err and "Traceback" not in err
    return out, err


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_finding_04_delta_of_1_over_n_or_more_is_refused_unless_allowed(capsys, monkeypatch):
    argv = PRIVATE + ["--dp-noise", "1", "--epochs", "1", "--dp-delta", "0.01"]
    # before: trained with δ = 0.01 on 160 examples, silently
    out, err = _error(argv, capsys)
    assert "--dp-delta 0.01 is not below 1/N = 1/160 = 0.00625" in err and "add --dp-allow-large-delta" in err
    assert "gradient check" not in out
    given = []

    def fit(net, params, opt, train, *, key, privacy, **kwargs):  # what the CLI asks fnn.fit for
        given.append(privacy)
        return FitResult(params, None, key, 0, [], None)

    monkeypatch.setattr(fnn.cli, "fit", fit)
    # before: no such flag
    assert main(argv + ["--dp-allow-large-delta"]) == 0
    assert given[0].delta == 0.01 and given[0].allow_large_delta is True
    privacy.plan(given[0], 160, 1)  # which fnn.fit refuses without allow_large_delta
    with pytest.raises(ValueError, match="allow_large_delta"):
        privacy.plan(given[0]._replace(allow_large_delta=False), 160, 1)
    _, err = _error(XOR + ["--dp-allow-large-delta"], capsys)
    assert "--dp-allow-large-delta only apply to private training: add --dp-clip" in err


def test_finding_21_unwritable_plot_or_history_stops_before_training_and_leaves_nothing(tmp_path, capsys):
    # os.access(tmp_path, W_OK) says yes (and says yes to root anywhere), yet neither file can be created
    for flag, name in (("--history", "history.json"), ("--plot", "curves.png")):
        link = tmp_path / name
        link.symlink_to(tmp_path / "missing" / name)
        # before: trained, then a FileNotFoundError traceback at the end
        out, err = _error(XOR + ["--epochs", "1", flag, str(link)], capsys)
        assert f"{flag} {link} cannot be written: No such file or directory. Give a file in a directory" in err
        assert "gradient check" not in out
    # the files (and directories) created to find out are removed again when the start fails later
    new = tmp_path / "new" / "dir"
    # before: new/dir stayed behind
    _error(XOR + ["--batch-size", "5", "--history", str(new / "h.json"), "--plot", str(new / "c.png")], capsys)
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "history.json"]  # the two links


def test_finding_22_privacy_numbers_must_be_finite_and_in_range(capsys):
    # before: --dp-noise inf and --dp-epsilon inf trained (with no noise, and with σ = 0.01); the rest
    # stopped later, in other words
    for flag in ("--dp-epsilon", "--dp-noise", "--dp-delta", "--dp-clip"):
        bounds = "> 0 and < 1" if flag == "--dp-delta" else "> 0"
        for value in ("0", "-1", "inf", "nan", *(["1"] if flag == "--dp-delta" else [])):
            given = {"--dp-clip": "1", "--dp-lot-size": "2", "--dp-noise": "1", flag: value}
            if flag == "--dp-epsilon":
                del given["--dp-noise"]
            out, err = _error(XOR + ["--epochs", "1"] + [a for kv in given.items() for a in kv], capsys)
            assert f"argument {flag}: must be a finite float {bounds}; got {value}" in err
            assert "gradient check" not in out


# The lock's protocol: an exclusive flock on the directory's .lock file (fnn.checkpoint.lock).
HOLD = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()")


def test_finding_23_a_second_run_on_a_checkpoint_dir_in_use_is_refused(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ck / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        # before: both runs wrote epoch-*.npz into ck, racing for the temporaries and the final names
        second = subprocess.run([sys.executable, "-m", "fnn", *XOR, "--epochs", "1", "--checkpoint-dir", str(ck)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert (f"fnn-train: error: --checkpoint-dir {ck} is in use: another run holds its lock ({ck}/.lock). "
                "Wait for that run to end, or give this one another --checkpoint-dir.") in second.stderr
        assert "gradient check" not in second.stdout and os.listdir(ck) == [".lock"]
    finally:
        holder.communicate("", timeout=60)  # the holder ends: its lock is dropped, its file stays
    # the lock file a finished (or killed) holder leaves does not block, and this run removes it
    assert main(XOR + ["--epochs", "2", "--checkpoint-dir", str(ck)]) == 0
    assert sorted(os.listdir(ck)) == ["epoch-000001.npz", "epoch-000002.npz"]
    # --resume and --overwrite take the lock as well
    with checkpoint.lock(ck):
        for how in ("--resume", "--overwrite"):
            assert "is in use" in _error(XOR + ["--epochs", "3", "--checkpoint-dir", str(ck), how], capsys)[1]
        fd = os.open(ck / ".lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):  # the same flock another process would take
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert main(XOR + ["--epochs", "3", "--checkpoint-dir", str(ck), "--resume"]) == 0
    assert sorted(os.listdir(ck)) == ["epoch-000001.npz", "epoch-000002.npz", "epoch-000003.npz"]


def test_finding_24_a_full_disk_stops_with_a_message_and_keeps_the_older_checkpoints(tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck"
    assert main(XOR + ["--epochs", "2", "--checkpoint-dir", str(ck)]) == 0
    before = _files(ck)

    def full_disk(file, **arrays):  # np.savez as checkpoint.save calls it, on a full disk
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    for how, epoch, advice in (("--resume", 3, " with --resume (without --overwrite) to continue."),
                               ("--overwrite", 1, " and run again.")):
        # before: an OSError traceback
        _, err = _error(XOR + ["--epochs", "3", "--checkpoint-dir", str(ck), how], capsys, code=1)
        assert (f"cannot write the checkpoint {checkpoint.path_for(ck, epoch)} in --checkpoint-dir {ck}: [Errno 28] "
                f"No space left on device. The 2 older checkpoint(s) there are intact (newest epoch-000002.npz)") in err
        assert "Free space there (or give another --checkpoint-dir)" in err and err.rstrip().endswith(advice)
        assert _files(ck) == before
    monkeypatch.undo()
    assert [checkpoint.load(p).epoch for p in checkpoint.checkpoints(ck)] == [1, 2]


def test_finding_28_a_failed_start_leaves_no_new_checkpoint_dir_and_names_the_missing_data_dir(tmp_path, capsys,
                                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the data search would go on to $FNN_DATA_DIR and the cache (mnist-10k is never downloaded)
    monkeypatch.delenv("FNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    readme = ["--dataset", "mnist-10k", "--data-dir", "../shared/data/mnist-t10k", "--hidden", "8", "--epochs", "1",
              "--checkpoint-dir", "ckpt"]
    # before: "cannot load --dataset mnist-10k: MNIST files not found: ..." and an empty ckpt/ left behind
    _, err = _error(readme, capsys)
    assert os.listdir(tmp_path) == []
    assert (f"--data-dir ../shared/data/mnist-t10k is not a directory (looked for "
            f"{(tmp_path / '../shared/data/mnist-t10k').resolve()}).") in err
    # a start that fails once the directory is made and locked removes it, and the parents it made
    (tmp_path / "empty").mkdir()
    for argv in (["--dataset", "mnist-10k", "--data-dir", "empty"], XOR + ["--batch-size", "5"]):
        # before: runs/a/ckpt stayed behind, empty
        _error(argv + ["--epochs", "1", "--checkpoint-dir", "runs/a/ckpt"], capsys)
        assert os.listdir(tmp_path) == ["empty"]
    # a directory that was there before stays, and one that got a checkpoint stays
    (tmp_path / "mine").mkdir()
    _error(XOR + ["--batch-size", "5", "--checkpoint-dir", "mine"], capsys)
    assert main(XOR + ["--epochs", "1", "--checkpoint-dir", "runs/ckpt"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["empty", "mine", "runs"] and os.listdir("runs/ckpt") == ["epoch-000001.npz"]


def _epsilon(q, sigma, steps, delta):
    """ε of ``steps`` Poisson-sampled Gaussian steps by dp_accounting's RDP accountant, on fnn's orders."""
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(privacy.ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def test_finding_01_02_resume_carries_the_privacy_spent_in_the_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck"
    flags = PRIVATE + ["--dp-epsilon", "2", "--checkpoint-dir", str(ck)]
    assert main(["--epochs", "2", *flags]) == 0
    meta = checkpoint.load(ck / "epoch-000002.npz").meta
    sigma, delta = meta["privacy"]["resolved_noise_multiplier"], meta["privacy"]["delta"]
    # before: the checkpoint held no privacy_spent
    spent = privacy.Spent(meta["privacy_spent"]["steps"], tuple(meta["privacy_spent"]["rdp"]))
    assert spent.steps == 40 and spent.epsilon(delta) == pytest.approx(_epsilon(0.05, sigma, 40, delta), rel=1e-3)
    assert spent.epsilon(delta) == pytest.approx(2.0, rel=1e-2)
    assert main(["--epochs", "3", "--resume", "--history", str(tmp_path / "3.json"), *flags]) == 0
    # a checkpoint written before privacy_spent was stored: its spending is recomputed from its settings
    old = checkpoint.load(ck / "epoch-000003.npz")
    checkpoint.save(ck / "epoch-000003.npz", params=old.params, opt_state=old.opt_state, key=old.key, epoch=3,
                    normalizer=old.normalizer, net=old.net, opt=old.opt,
                    meta={k: v for k, v in old.meta.items() if k != "privacy_spent"})
    # and --resume takes the flags of the first run, again and again
    assert main(["--epochs", "4", "--resume", "--history", str(tmp_path / "4.json"), *flags]) == 0
    assert "privacy settings" not in capsys.readouterr().err
    for epochs in (3, 4):
        last = json.loads((tmp_path / f"{epochs}.json").read_text())[-1]
        assert last["epoch"] == epochs
        assert last["epsilon"] == pytest.approx(_epsilon(0.05, sigma, 20 * epochs, delta), rel=1e-3)
    stored = checkpoint.load(ck / "epoch-000004.npz").meta["privacy_spent"]
    assert stored["steps"] == 80
    assert privacy.Spent(80, tuple(stored["rdp"])).epsilon(delta) == pytest.approx(_epsilon(0.05, sigma, 80, delta),
                                                                                    rel=1e-3)
