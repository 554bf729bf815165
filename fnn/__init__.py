"""fnn: a small functional neural-network package on JAX, with hand-derived backpropagation.

Read these first::

    net = fnn.MLP(sizes=(784, 256, 10), activation="relu", output="identity")
    params = net.init(jax.random.PRNGKey(0))
    loss, grads = fnn.backprop(net, params, x, y, fnn.losses.softmax_cross_entropy)
"""

from fnn import activations, initializers, losses
from fnn.backprop import backprop, objective
from fnn.gradcheck import autodiff_grads, check_gradients
from fnn.losses import Loss, l2_penalty
from fnn.mlp import MLP

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "backprop",
    "objective",
    "check_gradients",
    "autodiff_grads",
    "Loss",
    "l2_penalty",
    "activations",
    "initializers",
    "losses",
]
