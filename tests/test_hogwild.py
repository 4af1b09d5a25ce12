"""Tests of jaxdp.hogwild (the synthetic model of lock-free threads)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jaxdp import hogwild
from jaxdp.strategies.hogwild import HogwildState

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}


def random_gradients(key, num_steps, params=PARAMS):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, (num_steps,) + leaf.shape) for k, leaf in zip(keys, leaves)]
    )


def run(tx, gradients, params=PARAMS):
    """jit + scan, applying the updates; returns (emitted updates, final state)."""

    def step(carry, gradient):
        params, state = carry
        updates, state = tx.update(gradient, state, params)
        return (optax.apply_updates(params, updates), state), updates

    @jax.jit
    def scan(gradients):
        (_, state), updates = lax.scan(step, (params, tx.init(params)), gradients)
        return updates, state

    return scan(gradients)


def assert_bitwise_equal(tree_a, tree_b):
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def one_write_then_zeros(num_coordinates, num_zero_steps):
    """A gradient of ones at step 0, zeros after: where each coordinate lands is visible."""
    ones = jnp.ones((1, num_coordinates))
    return jnp.concatenate([ones, jnp.zeros((num_zero_steps, num_coordinates))])


@pytest.mark.parametrize(
    "inner",
    [optax.adam(1e-2), optax.sgd(0.1, momentum=0.9)],
    ids=["adam", "sgd_momentum"],
)
@pytest.mark.parametrize(
    "threads, staleness", [(1, None), (4, 0)], ids=["one_thread", "four_threads_no_staleness"]
)
def test_no_contention_is_inner_exactly(inner, threads, staleness):
    gradients = random_gradients(jax.random.PRNGKey(0), 20)
    expected, _ = run(inner, gradients)
    updates, state = run(hogwild(inner, threads, staleness, overwrite_prob=0.0), gradients)
    assert_bitwise_equal(updates, expected)
    assert isinstance(state, HogwildState) and int(state.step) == 20 and state.buffer is None


def test_everything_overwritten_nothing_applied():
    gradients = random_gradients(jax.random.PRNGKey(1), 25)
    updates, state = run(hogwild(optax.sgd(0.1), 4, overwrite_prob=1.0), gradients)
    for u in jax.tree.leaves(updates) + jax.tree.leaves(state.buffer):
        np.testing.assert_array_equal(u, 0.0)


def test_fraction_of_applied_coordinates_is_one_minus_overwrite_prob():
    num_coordinates = 20_000
    overwrite_probs = jnp.array([0.1, 0.5, 0.8])
    gradients = one_write_then_zeros(num_coordinates, 3)

    def landed_per_step(overwrite_prob):
        # overwrite_prob is traced here: a sweep over it is a vmap.
        tx = hogwild(optax.sgd(1.0), 4, max_staleness=3, overwrite_prob=overwrite_prob, seed=2)
        updates, _ = run(tx, gradients, params=jnp.zeros(num_coordinates))
        return updates

    updates = np.asarray(jax.jit(jax.vmap(landed_per_step))(overwrite_probs))
    # A write lands whole or not at all, coordinate by coordinate: -1 once, or never.
    assert set(np.unique(updates).tolist()) <= {-1.0, 0.0}
    landed = -updates.sum(axis=1)
    assert landed.max() <= 1.0
    applied_fraction = landed.mean(axis=1)
    # Binomial sd <= 0.0036 at 20k coordinates.
    np.testing.assert_allclose(applied_fraction, 1.0 - np.asarray(overwrite_probs), atol=0.015)


def test_landing_delays_are_uniform_up_to_max_staleness():
    num_coordinates, max_staleness = 20_000, 3
    gradients = one_write_then_zeros(num_coordinates, max_staleness + 2)
    tx = hogwild(optax.sgd(1.0), num_threads=max_staleness + 1, seed=3)  # default staleness
    updates, _ = run(tx, gradients, params=jnp.zeros(num_coordinates))
    landed = -np.asarray(updates)
    # Every coordinate of the write lands exactly once, within max_staleness steps.
    np.testing.assert_array_equal(landed.sum(axis=0), 1.0)
    np.testing.assert_array_equal(landed[max_staleness + 1 :], 0.0)
    np.testing.assert_allclose(landed.mean(axis=1)[: max_staleness + 1], 1.0 / (max_staleness + 1), atol=0.015)


def test_with_staleness_flushed_sum_equals_inner_sum():
    num_steps, max_staleness, learning_rate = 30, 4, 0.1
    gradients = random_gradients(jax.random.PRNGKey(4), num_steps)
    padded = jax.tree.map(lambda g: jnp.concatenate([g, jnp.zeros((max_staleness,) + g.shape[1:])]), gradients)
    updates, state = run(hogwild(optax.sgd(learning_rate), 8, max_staleness, seed=5), padded)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(gradients)):
        np.testing.assert_allclose(u.sum(0), -learning_rate * g.sum(0), rtol=1e-5, atol=1e-5)
        # Stale: the updates emitted step by step are not the inner ones.
        assert not np.allclose(u[:num_steps], -learning_rate * g)
    for b in jax.tree.leaves(state.buffer):
        np.testing.assert_allclose(b, 0.0, atol=1e-6)


def test_reproducible_from_its_seed():
    gradients = random_gradients(jax.random.PRNGKey(6), 15)

    def scan(seed, gradients):
        tx = hogwild(optax.sgd(0.1), 4, overwrite_prob=0.3, seed=seed)
        step = lambda state, g: tx.update(g, state, PARAMS)[::-1]  # noqa: E731
        return lax.scan(step, tx.init(PARAMS), gradients)[1]

    updates_for = jax.jit(scan)  # the seed is traced: one compilation for all seeds
    first, again = updates_for(jax.random.PRNGKey(7), gradients), updates_for(jax.random.PRNGKey(7), gradients)
    other = updates_for(jax.random.PRNGKey(8), gradients)
    int_seed = run(hogwild(optax.sgd(0.1), 4, overwrite_prob=0.3, seed=7), gradients, params=PARAMS)[0]
    assert_bitwise_equal(first, again)
    assert_bitwise_equal(first, int_seed)
    assert not np.array_equal(np.asarray(first["w"]), np.asarray(other["w"]))


def test_vmap_threads_with_different_seeds():
    gradients = random_gradients(jax.random.PRNGKey(9), 10)

    def worker(seed_key):
        updates, _ = run(hogwild(optax.sgd(1.0), 4, overwrite_prob=0.2, seed=seed_key), gradients)
        return lax.psum(updates, "workers"), updates

    seeds = jax.random.split(jax.random.PRNGKey(10), 4)
    total, updates = jax.jit(jax.vmap(worker, axis_name="workers"))(seeds)
    w = np.asarray(updates["w"])
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[2], w[3])
    np.testing.assert_allclose(total["w"][0], w.sum(0), rtol=1e-6)


def tanh_regression_loss(params):
    x = jnp.linspace(-2.0, 2.0, 32)
    y = 1.5 * jnp.tanh(2.0 * x - 0.5)
    return jnp.mean((params["a"] * jnp.tanh(params["b"] * x + params["c"]) - y) ** 2)


def test_converges_on_a_non_convex_regression():
    params = {"a": jnp.array(0.5), "b": jnp.array(0.5), "c": jnp.array(0.0)}
    tx = hogwild(optax.sgd(0.2), num_threads=4, overwrite_prob=0.3, seed=1)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(tanh_regression_loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = lax.scan(step, (params, tx.init(params)), None, length=1000)
        return tanh_regression_loss(params)

    assert float(tanh_regression_loss(params)) > 0.3
    assert float(train(params)) < 1e-5


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: hogwild(optax.sgd(0.1), 0), "num_threads"),
        (lambda: hogwild(optax.sgd(0.1), 4, max_staleness=-1), "max_staleness"),
        (lambda: hogwild(optax.sgd(0.1), 4, overwrite_prob=-0.1), "overwrite_prob"),
        (lambda: hogwild(optax.sgd(0.1), 4, overwrite_prob=1.5), "overwrite_prob"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        make()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: hogwild(optax.sgd(0.1), 2.0), "num_threads"),
        (lambda: hogwild(optax.sgd(0.1), 2, max_staleness=1.5), "max_staleness"),
        (lambda: hogwild(optax.sgd(0.1), 2, seed="one"), "seed"),
    ],
)
def test_wrong_types_raise_type_error_naming_them(make, name):
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        make()
