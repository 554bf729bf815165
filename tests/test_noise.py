"""fnn.noise: the fused Gaussian draws are jax.random.normal's, bit for bit, and fall back where they cannot be."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnn import noise

shapes = st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple)


@settings(max_examples=16)
@given(shape=shapes, seeds=st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=6),
       dtype=st.sampled_from([jnp.float32, jnp.float64]), typed=st.booleans())
def test_normal_is_jax_random_normal_bit_for_bit(shape, seeds, dtype, typed):
    draw = jax.jit(noise.normal, static_argnums=(1, 2))
    reference = jax.jit(jax.random.normal, static_argnums=(1, 2))
    for seed in seeds:  # one compilation per shape, several keys through it
        key = jax.random.key(seed) if typed else jax.random.PRNGKey(seed)
        expected, got = np.asarray(reference(key, shape, dtype)), np.asarray(draw(key, shape, dtype))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8))


def test_normal_is_bit_exact_on_a_large_draw_too():
    """A draw the size of a layer (the counter's low word runs to 2¹⁹) and a split key, as DP-SGD uses them."""
    key = jax.random.split(jax.random.PRNGKey(11), 3)[2]
    expected = np.asarray(jax.random.normal(key, (1024, 785), jnp.float32))
    got = np.asarray(jax.jit(noise.normal, static_argnums=(1, 2))(key, (1024, 785), jnp.float32))
    np.testing.assert_array_equal(got, expected)
    assert abs(expected.mean()) < 5 / np.sqrt(expected.size) and abs(expected.std() - 1) < 5e-3  # not all zeros


def test_normal_is_bit_exact_in_float64_too():
    """A float64 draw takes 52 mantissa bits from the two output words, high word first: one fixed draw
    with a raw and a typed key, against jax.random.normal bit for bit (no hypothesis draw needed).
    Catches the mutant noise-float64-words-swapped in the fast tier."""
    for key in (jax.random.PRNGKey(7), jax.random.key(7)):
        expected = np.asarray(jax.random.normal(key, (3, 257), jnp.float64))
        got = np.asarray(noise.normal(key, (3, 257), jnp.float64))
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got.view(np.uint64), expected.view(np.uint64))


def test_the_fused_pass_is_the_one_taken_for_float32():
    """The fused path emits no call of JAX's threefry primitive (else the speed-up would be lost silently)."""
    fused = jax.make_jaxpr(lambda k: noise.normal(k, (64,)))(jax.random.PRNGKey(0))
    plain = jax.make_jaxpr(lambda k: jax.random.normal(k, (64,)))(jax.random.PRNGKey(0))
    assert "random_bits" not in str(fused) and "erf_inv" in str(fused)
    assert "random_bits" in str(plain)


@pytest.mark.parametrize("case", ["bfloat16", "float16", "rbg key"])
def test_other_dtypes_and_generators_fall_back_to_jax(case):
    key = jax.random.key(3, impl="rbg") if case == "rbg key" else jax.random.PRNGKey(3)
    dtype = jnp.float32 if case == "rbg key" else jnp.dtype(case)
    expected = np.asarray(jax.random.normal(key, (5, 7), dtype).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(noise.normal(key, (5, 7), dtype).astype(jnp.float32)), expected)


def test_the_old_counter_layout_falls_back_to_jax():
    key = jax.random.PRNGKey(5)
    with jax.threefry_partitionable(False):
        expected = np.asarray(jax.random.normal(key, (33,), jnp.float32))
        np.testing.assert_array_equal(np.asarray(noise.normal(key, (33,), jnp.float32)), expected)
