"""``python -m fnn``: a short demonstration until the training command lands.

Trains the 2-2-1 XOR network by plain gradient descent on the manual backprop, after checking the
manual gradients against autodiff.
"""

import time

import jax
import jax.numpy as jnp

import fnn


def main() -> None:
    net = fnn.MLP((2, 4, 1), "tanh", "identity", init="xavier_uniform")
    x = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.float32)
    y = jnp.array([[0], [1], [1], [0]], jnp.float32)
    loss = fnn.losses.binary_cross_entropy_with_logits
    params = net.init(jax.random.PRNGKey(0))
    check = fnn.check_gradients(net, params, x, y, loss)
    print(f"manual vs autodiff gradients, max relative difference per layer: {check}")

    @jax.jit
    def step(params):
        cost, grads = fnn.backprop(net, params, x, y, loss)
        return jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads), cost

    start = time.perf_counter()
    for t in range(2001):
        params, cost = step(params)
        if t % 500 == 0:
            print(f"step {t:5d}  loss {float(cost):.5f}")
    pred = (net.apply(params, x) > 0).astype(jnp.int32).ravel()
    print(f"XOR predictions {pred.tolist()} (targets [0, 1, 1, 0]) in {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
