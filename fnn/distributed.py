"""Data-parallel training on XLA's SPMD machinery: a 1-D device mesh and sharded batches.

The choice: every batch is sharded over the mesh axis ``"data"`` with a sharding constraint inside
the compiled step, params and optimizer state are replicated, and the SPMD partitioner does the
rest. The manual backprop's batch reductions (``δᵀ a / N`` and ``Σ δ / N`` in BP3/BP4, and the
batch mean and variance of batch normalization) are sums over the sharded axis, so the partitioner
turns them into all-reduces: the gradients are averaged across devices without a hand-written
``psum``, and the result is the single-device computation (up to the order of floating-point sums).
The same code then runs on one device, on the GPUs of one machine, and across hosts. The DP-SGD
step splits every piece of its Poisson lot the same way (:func:`fnn.privacy.private_gradient`), and
the optimizers that read the batch (K-FAC's factors, the Gauss-Newton products of Hessian-free) get
it sharded, so their batch sums are all-reduced too.

Single process, N devices::

    mesh = fnn.distributed.data_mesh()                    # all devices on the axis "data"
    result = fnn.fit(..., mesh=mesh)                      # global batch_size divisible by N

Several processes (one per host; ``jax.distributed.initialize`` first), each with its own shard::

    jax.distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=i)
    mesh = fnn.distributed.data_mesh()                    # the devices of every process
    x, y = fnn.distributed.global_batch_arrays(mesh, x_local, y_local)
    result = fnn.fit(net, params, opt, (x, y), ..., mesh=mesh)
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) with axis ``"data"``."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params, optimizer state, keys)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Split along the first (sample) axis over the mesh axis ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def devices(mesh: Mesh | None) -> int:
    """How many devices ``mesh`` holds (1 without a mesh): the number of shards a batch splits into."""
    return 1 if mesh is None else int(mesh.devices.size)


def shard_rows(mesh: Mesh | None, *arrays) -> tuple:
    """``arrays`` constrained, inside a compiled function, to be split by sample over ``mesh``'s axis
    ``"data"`` (as they are without a mesh): what is computed per sample from them then runs on each
    device's rows, and a sum over the samples becomes per-device sums and an all-reduce."""
    if mesh is None:
        return arrays
    return tuple(jax.lax.with_sharding_constraint(a, batch_sharded(mesh)) for a in arrays)


def global_batch_arrays(mesh: Mesh, *local_arrays):
    """Global arrays, sharded by sample, from each process's own rows (``jax.make_array_from_process_local_data``).

    The global array is the processes' rows stacked in process order; every process passes the
    same number of rows.
    """
    sharding = batch_sharded(mesh)
    return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in local_arrays)


def to_host(tree):
    """NumPy copies of a pytree of (possibly multi-process, replicated) arrays."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)
    return jax.tree_util.tree_map(one, tree)


def check_divisible(mesh: Mesh, batch_size: int, rest: int) -> None:
    """Raise unless every batch (the full ones and a smaller last one) splits evenly over the mesh."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"the global batch of {batch_size} samples does not split over {n} devices; use a batch size "
            f"divisible by {n} (e.g. {batch_size - batch_size % n or n})."
        )
    if rest % n:
        raise ValueError(
            f"the last batch of the epoch holds {rest} samples, which does not split over {n} devices; "
            f"use last_batch='drop' or a training set whose size leaves a multiple of {n}."
        )
