"""Data-parallel training: 8 simulated CPU devices, and 2 processes joined over loopback with gloo;
ordinary training, DP-SGD, K-FAC and Hessian-free, and the per-example statistics, each against one device.

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


def _on_eight_devices(code: str) -> dict:
    """What ``code`` prints last (JSON), run on 8 simulated CPU devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    done = _run(code, {"XLA_FLAGS": flags})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    out = _on_eight_devices(EIGHT_DEVICES)
    for bn in ("False", "True"):  # with batch norm the batch statistics are global too
        assert out[bn]["max_diff"] < 1e-5, out
        assert out[bn]["acc"][0] == out[bn]["acc"][1]
        assert out[bn]["sharding"] in ("P()", "PartitionSpec()")  # params replicated
    assert out["all_reduce"]
    assert "does not split over 8 devices" in out["error_36"] and "divisible by 8" in out["error_36"]
    assert "last batch of the epoch holds 3 samples" in out["error_40"] and "last_batch='drop'" in out["error_40"]


# One device against eight in one process: a small problem, and what the comparisons read.
ONE_AND_EIGHT = """
import json
import jax, jax.numpy as jnp, numpy as np
import fnn
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
x = rng.normal(size=(96, 5)).astype(np.float32)
y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
net = fnn.MLP((5, 8, 3), "tanh")
p = net.init(jax.random.PRNGKey(0))
loss = fnn.losses.softmax_cross_entropy
mesh = fnn.distributed.data_mesh()
diff = lambda a, b: max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(*map(jax.tree.leaves, (a, b))))
compiled_last = lambda: next(reversed(fnn.epoch._EPOCHS.values())).as_text()  # the HLO of the last fit's epoch
timing = ("seconds", "elapsed", "samples_per_s")
"""

PRIVATE_EIGHT_DEVICES = ONE_AND_EIGHT + """
from fnn import privacy
lots = fnn.epoch.Observer("lots", lambda s: s.gradient.size, summary=lambda v: {"lots": v.tolist()})
settings = privacy.Privacy(clip=1.0, lot_size=24, noise_multiplier=1.1, delta=1e-3, chunk=16)
kw = dict(loss=loss, epochs=2, batch_size=10, key=jax.random.PRNGKey(3), quiet=True, privacy=settings, l2=1e-3,
          observers=(lots,))
one, eight = (fnn.fit(net, p, fnn.optim.momentum(0.2), (x, y), mesh=m, **kw) for m in (None, mesh))
out = {"max_diff": diff(one.params, eight.params),
       "spent": [list(r.privacy_spent) for r in (one, eight)],
       "account": list(privacy.account(24 / 96, 1.1, 8)),  # q = L/N, σ, 2 epochs of round(N/L) steps
       "history": [[{k: h[k] for k in ("epsilon", "noise_multiplier", "lots", "train_loss")} for h in r.history]
                   for r in (one, eight)],
       "collectives": [op in compiled_last() for op in ("all-reduce(", "all-gather(")]}
try:
    fnn.fit(net, p, fnn.optim.sgd(0.1), (x, y), mesh=mesh, **{**kw, "privacy": settings._replace(chunk=20)})
except ValueError as e:
    out["error_chunk"] = str(e)
print(json.dumps(out))
"""


def test_private_training_on_eight_devices_equals_one_device():
    """DP-SGD data-parallel: the same global Poisson lots (their sizes step by step), the same noise
    (σc/(qN) ≈ 0.05 per entry per step, so any other draw would move the params far beyond 1e-5), the
    clipped sums equal to rounding (each device sums its rows, then the all-reduce: another order of
    the same terms), and the accountant's ``q``, ``σ`` and steps, hence ``ε``, exactly the same."""
    out = _on_eight_devices(PRIVATE_EIGHT_DEVICES)
    assert out["max_diff"] < 1e-5, out["max_diff"]
    one, eight = out["history"]
    assert [h["lots"] for h in one] == [h["lots"] for h in eight] and len(one[0]["lots"]) == 4  # round(96/24) steps
    assert [h["epsilon"] for h in one] == [h["epsilon"] for h in eight]
    assert [h["noise_multiplier"] for h in eight] == [1.1, 1.1]
    assert out["spent"][0] == out["spent"][1] == out["account"]  # q = 1/4, σ = 1.1, 8 steps on both
    np.testing.assert_allclose([h["train_loss"] for h in one], [h["train_loss"] for h in eight], rtol=1e-5)
    assert out["collectives"] == [True, False]  # the sums all-reduced; the lot whole on every device, never gathered
    error = out["error_chunk"]
    assert "chunk of 20 examples" in error and "8 devices" in error and "chunk=16" in error


SECOND_ORDER_EIGHT_DEVICES = ONE_AND_EIGHT + """
so = fnn.second_order
opts = {"kfac": lambda: so.kfac(net, loss, learning_rate=0.5, damping=1e-2, refresh=2, rescale=True),
        "hessian_free": lambda: so.hessian_free(net, loss, cg_iters=8, curvature_rows=16)}
out = {}
for name, opt in opts.items():
    kw = dict(loss=loss, epochs=2, batch_size=32, key=jax.random.PRNGKey(1), quiet=True,
              per_example=("noise_scale", "norms") if name == "kfac" else ())
    one, eight = (fnn.fit(net, p, opt(), (x, y), mesh=m, **kw) for m in (None, mesh))
    out[name] = {"params": diff(one.params, eight.params), "opt_state": diff(one.opt_state, eight.opt_state),
                 "history": [[{k: v for k, v in h.items() if k not in timing} for h in r.history]
                             for r in (one, eight)],
                 "replicated": sorted({str(a.sharding.spec) for a in jax.tree.leaves(eight.opt_state)}),
                 "all_reduce": "all-reduce" in compiled_last()}
print(json.dumps(out))
"""


def test_second_order_and_per_example_training_on_eight_devices_equal_one_device():
    """K-FAC (sampled factors, the step length from G Δ) with the per-example statistics, and
    Hessian-free on the batch's first 16 rows: the batch sharded, the factors, the Gauss-Newton
    products and the per-example sums all-reduced, the optimizer state (factors, inverses, CG's warm
    start) replicated, and everything equal to one device to rounding (sums in another order)."""
    out = _on_eight_devices(SECOND_ORDER_EIGHT_DEVICES)
    for name in ("kfac", "hessian_free"):
        run = out[name]
        assert run["params"] < 1e-5 and run["opt_state"] < 1e-4, (name, run["params"], run["opt_state"])
        assert run["replicated"] in (["P()"], ["PartitionSpec()"]) and run["all_reduce"], (name, run)
        one, eight = run["history"]
        assert [h.keys() for h in one] == [h.keys() for h in eight]
        for a, b in zip(one, eight):
            for key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"{name}: {key}")
    assert {"noise_scale", "norm_median", "norm_max"} <= set(out["kfac"]["history"][0][0])


PRIVACY = dict(clip=1.0, lot_size=24, noise_multiplier=1.1, delta=1e-3, chunk=16)
WORKER = """
import json, sys
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
kw = dict(loss=fnn.losses.softmax_cross_entropy, epochs=1, batch_size=40, quiet=True, mesh=mesh)
result = fnn.fit(net, params, fnn.optim.adam(learning_rate=1e-2), (xg, yg), key=jax.random.PRNGKey(1),
                 held_out=(x, y), **kw)
private = fnn.fit(net, params, fnn.optim.momentum(0.2), (xg, yg), key=jax.random.PRNGKey(3),
                  privacy=fnn.privacy.Privacy(**json.loads(sys.argv[4])), **kw)  # lots over all 240 examples
leaves = {f"{name}_{i}": a for name, r in (("adam", result), ("private", private))
          for i, a in enumerate(jax.tree_util.tree_leaves(fnn.distributed.to_host(r.params)))}
if pid == 0:
    np.savez(out, **leaves, acc=result.history[-1]["held_out_accuracy"], epsilon=private.history[-1]["epsilon"])
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_local_shards_equal_one_process(tmp_path):
    """An epoch of Adam and one of DP-SGD (each lot drawn from all 240 examples, 120 of them in
    each process) on a 4-device mesh over 2 processes: the params of one process to rounding, and
    the same ε."""
    port, out = _free_port(), tmp_path / "params.npz"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": flags}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), str(port), str(pid), str(out),
                               json.dumps(PRIVACY)],
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
    kw = dict(loss=fnn.losses.softmax_cross_entropy, epochs=1, batch_size=40, quiet=True)
    single = fnn.fit(net, params, fnn.optim.adam(learning_rate=1e-2), (x, y), key=jax.random.PRNGKey(1),
                     held_out=(x, y), **kw)
    with jax.enable_x64(False):  # as in the workers: the lots' uniform draws take the default float dtype
        private = fnn.fit(net, params, fnn.optim.momentum(0.2), (x, y), key=jax.random.PRNGKey(3),
                          privacy=fnn.privacy.Privacy(**PRIVACY), **kw)
    with np.load(out) as saved:
        for name, r in (("adam", single), ("private", private)):
            for i, a in enumerate(jax.tree_util.tree_leaves(r.params)):
                np.testing.assert_allclose(a, saved[f"{name}_{i}"], rtol=1e-5, atol=1e-6, err_msg=name)
        assert float(saved["acc"]) == single.history[-1]["held_out_accuracy"]
        assert float(saved["epsilon"]) == private.history[-1]["epsilon"]
