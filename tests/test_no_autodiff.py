"""The manual backprop path must not call autodiff: every JAX autodiff entry point is trapped."""

import jax
import jax.numpy as jnp
import pytest
from jax._src.interpreters import ad

import fnn


class AutodiffCalled(AssertionError):
    pass


@pytest.fixture
def trap_autodiff(monkeypatch):
    """Make every way into JAX's autodiff raise.

    ``grad``, ``vjp``, ``linearize`` and friends all build JVP or linearize traces, so trapping
    the two trace classes catches any route, public or private; the public names are trapped
    too so the error points at the caller.
    """

    def boom(*args, **kwargs):
        raise AutodiffCalled("autodiff was called")

    for cls in (ad.JVPTrace, ad.LinearizeTrace):
        monkeypatch.setattr(cls, "__init__", boom)
    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd", "jacrev", "hessian"):
        monkeypatch.setattr(jax, name, boom)


def _problem(output="softmax"):
    net = fnn.MLP((4, 6, 5, 3), ("tanh", "relu"), output)
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 4), jnp.float32)
    y = jnp.arange(8) % 3
    return net, params, x, y


def test_the_trap_catches_autodiff(trap_autodiff):
    """Without this the test below could pass vacuously."""
    net, params, x, y = _problem()
    with pytest.raises(AutodiffCalled):
        fnn.autodiff_grads(net, params, x, y, fnn.losses.categorical_cross_entropy)
    with pytest.raises(AutodiffCalled):
        # a private route into autodiff, bypassing the public names
        from jax._src import api
        api.grad(lambda w: jnp.sum(w**2))(jnp.ones(3))


@pytest.mark.parametrize("loss_name", sorted(fnn.losses.LOSSES))
def test_backprop_runs_without_autodiff(trap_autodiff, loss_name):
    loss = fnn.losses.LOSSES[loss_name]
    net, params, x, y = _problem("softmax" if loss.outputs is None else min(loss.outputs))
    if loss.targets != "classes":
        y = jax.nn.one_hot(y, 3, dtype=jnp.float32)
    fnn.backprop(net, params, x, y, loss, 0.1)
    # a fresh jit (new function object) so tracing really happens under the trap
    jax.jit(lambda p, x, y: fnn.backprop(net, p, x, y, loss, 0.1))(params, x, y)


@pytest.mark.slow
def test_per_example_quantities_run_without_autodiff(trap_autodiff):
    net, params, x, y = _problem()
    loss = fnn.losses.categorical_cross_entropy
    pe = fnn.per_example

    def everything(params, x, y):
        _, _, _, trace = fnn.backprop_trace(net, params, x, y, loss, 0.1)
        return (pe.batch_grad(net, params, trace, 0.1), pe.batch_l2(net, params, trace, 0.1),
                pe.sum_grad_squared(net, params, trace, 0.1), pe.variance(net, params, trace),
                pe.clipped_sum(net, params, trace, 1.0, 0.1), pe.noise_scale(net, params, trace, 0.1))

    everything(params, x, y)
    jax.jit(lambda p, x, y: everything(p, x, y))(params, x, y)


@pytest.mark.slow
def test_the_private_gradient_runs_without_autodiff(trap_autodiff):
    net, params, x, y = _problem()
    step = jax.jit(lambda p, key: fnn.privacy.private_gradient(net, p, x, y, fnn.losses.categorical_cross_entropy,
                                                               key, clip=1.0, noise_multiplier=1.0, q=0.5, chunk=3))
    step(params, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_curvature_runs_without_autodiff(trap_autodiff):
    net, params, x, y = _problem()
    loss = fnn.losses.categorical_cross_entropy
    cv = fnn.curvature

    def everything(params, x, y, key):
        return (cv.hvp(net, params, x, y, loss, params, 0.1), cv.ggn_vp(net, params, x, y, loss, params, 0.1),
                cv.ggn_diag(net, params, x, y, loss, 0.1), cv.ggn_diag_mc(net, params, x, y, loss, 0.1, key=key),
                cv.kronecker_factors(net, params, x, y, loss), cv.kronecker_factors(net, params, x, y, loss, key),
                cv.sharpness(net, params, x, y, loss, max_iter=3), cv.sharpness(net, params, x, y, loss, matrix="ggn",
                                                                                 max_iter=3),
                cv.product_operator(net, params, x, y, loss, 0.1, matrix="hessian")(params),
                cv.product_operator(net, params, x, y, loss, 0.1)(params))

    # traced once under jit: every operation of every quantity passes the trap while tracing
    jax.jit(lambda p, x, y, k: everything(p, x, y, k))(params, x, y, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_second_order_optimizers_run_without_autodiff(trap_autodiff):
    net, params, x, y = _problem()
    loss = fnn.losses.categorical_cross_entropy
    for opt in (fnn.second_order.kfac(net, loss, rescale=True), fnn.second_order.hessian_free(net, loss, cg_iters=3)):
        _, grads = fnn.backprop(net, params, x, y, loss)
        step = jax.jit(lambda p, s, g, x, y, opt=opt: fnn.optim.step(opt, g, s, p, (x, y)))
        step(params, opt.init(params), grads, x, y)
