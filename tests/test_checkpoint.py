"""Checkpoint files: round trip, atomic writes, and refusal of truncated or corrupt files."""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn import checkpoint
from fnn.checkpoint import CheckpointError


class State(NamedTuple):
    count: jax.Array
    mu: list


def _state():
    net = fnn.MLP((3, 4, 2), "tanh")
    params = net.init(jax.random.PRNGKey(0))
    opt_state = State(jnp.asarray(7, jnp.int32), jax.tree_util.tree_map(lambda p: p * 0.5, params))
    return params, opt_state


def _save(path, epoch=3):
    params, opt_state = _state()
    norm = (np.arange(3, dtype=np.float32), np.ones(3, np.float32))
    return checkpoint.save(path, params=params, opt_state=opt_state, key=jax.random.PRNGKey(42), epoch=epoch,
                           normalizer=norm, meta={"note": "x"})


def test_round_trip_is_exact(tmp_path):
    params, opt_state = _state()
    _save(tmp_path / "a.npz")
    ck = checkpoint.load(tmp_path / "a.npz", params=params, opt_state=opt_state)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves((params, opt_state)), leaves((ck.params, ck.opt_state))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert isinstance(ck.opt_state, State) and ck.opt_state.count.dtype == jnp.int32
    np.testing.assert_array_equal(ck.key, jax.random.PRNGKey(42))
    assert ck.epoch == 3 and ck.meta == {"note": "x"}
    np.testing.assert_array_equal(ck.normalizer[0], np.arange(3))


def test_file_holds_no_pickled_objects(tmp_path):
    path = _save(tmp_path / "a.npz")
    with np.load(path, allow_pickle=False) as z:  # would raise on object arrays
        assert all(z[name].dtype != object for name in z.files)


@pytest.mark.parametrize("cut", [0.3, 0.9, 0.999])
def test_truncated_checkpoint_is_refused_and_the_previous_one_still_loads(tmp_path, cut):
    params, opt_state = _state()
    first = _save(checkpoint.path_for(tmp_path, 1), epoch=1)
    second = _save(checkpoint.path_for(tmp_path, 2), epoch=2)
    assert checkpoint.latest(tmp_path) == second
    data = second.read_bytes()
    second.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=str(second.name)):
        checkpoint.load(second, params=params, opt_state=opt_state)
    assert checkpoint.load(first, params=params, opt_state=opt_state).epoch == 1


def test_flipped_byte_is_refused(tmp_path):
    params, opt_state = _state()
    path = _save(tmp_path / "a.npz")
    data = bytearray(path.read_bytes())
    # flip a byte inside the first array's data: after the .npy magic, version and header
    start = data.index(b"\x93NUMPY")
    header_len = int.from_bytes(data[start + 8:start + 10], "little")
    i = start + 10 + header_len + 4
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        checkpoint.load(path, params=params, opt_state=opt_state)


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    path = _save(tmp_path / "a.npz")
    other = fnn.MLP((3, 5, 2), "tanh").init(jax.random.PRNGKey(0))
    _, opt_state = _state()
    with pytest.raises(CheckpointError, match=r"\[0\]\['W'\].*\[4, 3\].*\[5, 3\]"):
        checkpoint.load(path, params=other, opt_state=opt_state)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A crash while writing must leave neither the target nor a temporary file behind."""
    params, opt_state = _state()
    target = tmp_path / "a.npz"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(target, params=params, opt_state=opt_state, key=jax.random.PRNGKey(0), epoch=1)
    assert os.listdir(tmp_path) == []


def test_overwrite_is_all_or_nothing(tmp_path, monkeypatch):
    params, opt_state = _state()
    path = _save(tmp_path / "a.npz", epoch=1)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        _save(path, epoch=2)
    assert checkpoint.load(path, params=params, opt_state=opt_state).epoch == 1
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]


def test_prune_keeps_the_newest(tmp_path):
    for e in range(1, 6):
        _save(checkpoint.path_for(tmp_path, e), epoch=e)
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["epoch-000004.npz", "epoch-000005.npz"]
