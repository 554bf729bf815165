"""Data-parallel training: 8 simulated CPU devices, and 2 processes joined over loopback with gloo.

Each scenario runs in a subprocess so the device count of the rest of the test session stays 1.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import fnn

pytestmark = pytest.mark.slow  # multi-device and multi-process runs, each in fresh processes

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds: every subprocess here is bounded


def _run(code: str, env_extra: dict, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    env.pop("JAX_ENABLE_X64", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _data(n=240):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
    return x, y


EIGHT_DEVICES = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import fnn
from fnn.train import make_epoch
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
x = rng.normal(size=(203, 5)).astype(np.float32)
y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
mesh = fnn.distributed.data_mesh()
out = {}
for bn in (False, True):
    net = fnn.MLP((5, 16, 16, 3), "tanh", batch_norm=bn)
    p = net.init(jax.random.PRNGKey(0))
    kw = dict(loss=fnn.losses.softmax_cross_entropy, epochs=2, batch_size=40, key=jax.random.PRNGKey(1),
              quiet=True, held_out=(x, y), last_batch="drop")
    one = fnn.fit(net, p, fnn.optim.adam(learning_rate=1e-2), (x, y), **kw)
    eight = fnn.fit(net, p, fnn.optim.adam(learning_rate=1e-2), (x, y), data_parallel=True, **kw)
    leaves = zip(*(jax.tree_util.tree_leaves((r.params, r.state)) for r in (one, eight)))
    out[str(bn)] = {"max_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves),
                    "acc": [one.history[-1]["held_out_accuracy"], eight.history[-1]["held_out_accuracy"]],
                    "sharding": str(eight.params[0]["W"].sharding.spec)}
# the compiled epoch really splits the batch: its HLO reduces across devices
net = fnn.MLP((5, 16, 3), "tanh")
opt = fnn.optim.sgd(learning_rate=0.1)
p = net.init(jax.random.PRNGKey(0))
epoch = make_epoch(net, fnn.losses.softmax_cross_entropy, opt, num_samples=203, batch_size=40,
                   last_batch="drop", mesh=mesh)
args = (p, opt.init(p), None, jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(y))
hlo = jax.jit(epoch).lower(*args).compile().as_text()
out["all_reduce"] = "all-reduce" in hlo
for batch, last in ((36, "drop"), (40, "smaller")):
    try:
        fnn.fit(net, p, opt, (x, y), loss=fnn.losses.softmax_cross_entropy, epochs=1, batch_size=batch,
                key=jax.random.PRNGKey(1), quiet=True, mesh=mesh, last_batch=last)
        out[f"error_{batch}"] = None
    except ValueError as e:
        out[f"error_{batch}"] = str(e)
print(json.dumps(out))
"""


def test_eight_devices_equal_one_device():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    done = _run(EIGHT_DEVICES, {"XLA_FLAGS": flags})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for bn in ("False", "True"):  # with batch norm the batch statistics are global too
        assert out[bn]["max_diff"] < 1e-5, out
        assert out[bn]["acc"][0] == out[bn]["acc"][1]
        assert out[bn]["sharding"] in ("P()", "PartitionSpec()")  # params replicated
    assert out["all_reduce"]
    assert "does not split over 8 devices" in out["error_36"] and "divisible by 8" in out["error_36"]
    assert "last batch of the epoch holds 3 samples" in out["error_40"] and "last_batch='drop'" in out["error_40"]


WORKER = """
import sys
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
import fnn
assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
rng = np.random.default_rng(0)
x = rng.normal(size=(240, 5)).astype(np.float32)
y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
mine = slice(120 * pid, 120 * (pid + 1))           # this process loads only its own half
mesh = fnn.distributed.data_mesh()
xg, yg = fnn.distributed.global_batch_arrays(mesh, x[mine], y[mine])
net = fnn.MLP((5, 16, 3), "tanh")
params = net.init(jax.random.PRNGKey(0))
result = fnn.fit(net, params, fnn.optim.adam(learning_rate=1e-2), (xg, yg), loss=fnn.losses.softmax_cross_entropy,
                 epochs=1, batch_size=40, key=jax.random.PRNGKey(1), quiet=True, mesh=mesh, held_out=(x, y))
host = fnn.distributed.to_host(result.params)
if pid == 0:
    np.savez(out, *jax.tree_util.tree_leaves(host), acc=result.history[-1]["held_out_accuracy"])
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_local_shards_equal_one_process(tmp_path):
    port, out = _free_port(), tmp_path / "params.npz"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": flags}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), str(port), str(pid), str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    try:
        logs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [log[1][-2000:] for log in logs]

    x, y = _data()
    net = fnn.MLP((5, 16, 3), "tanh")
    params = net.init(jax.random.PRNGKey(0))
    single = fnn.fit(net, params, fnn.optim.adam(learning_rate=1e-2), (x, y), loss=fnn.losses.softmax_cross_entropy,
                     epochs=1, batch_size=40, key=jax.random.PRNGKey(1), quiet=True, held_out=(x, y))
    with np.load(out) as saved:
        leaves = [saved[f"arr_{i}"] for i in range(4)]
        acc = float(saved["acc"])
    for a, b in zip(jax.tree_util.tree_leaves(single.params), leaves):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert acc == single.history[-1]["held_out_accuracy"]
