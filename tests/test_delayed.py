"""Tests of jaxdp.delays and jaxdp.delayed (asynchronous SGD with stale gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxdp import delayed, delays
from jaxdp.strategies.delayed import DelayedState

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}


def random_gradients(key, num_steps, params=PARAMS):
    """A pytree like ``params`` with a leading axis of ``num_steps`` random gradients."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, (num_steps,) + leaf.shape) for k, leaf in zip(keys, leaves)]
    )


def run(tx, gradients, params=PARAMS):
    """jit + scan: feeds ``gradients`` to ``tx`` while applying its updates.

    Returns the emitted updates, the params passed at each step and the final state.
    """

    def step(carry, gradient):
        params, state = carry
        updates, state = tx.update(gradient, state, params)
        return (optax.apply_updates(params, updates), state), (updates, params)

    @jax.jit
    def scan(gradients):
        (_, state), (updates, params_seen) = lax.scan(step, (params, tx.init(params)), gradients)
        return updates, params_seen, state

    return scan(gradients)


def run_with_fixed_params(tx, gradients, params=PARAMS):
    """jit + scan with params held fixed (so emitted updates are comparable across runs)."""

    def step(state, gradient):
        updates, state = tx.update(gradient, state, params)
        return state, updates

    return jax.jit(lambda g: lax.scan(step, tx.init(params), g))(gradients)


def assert_bitwise_equal(tree_a, tree_b):
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def arrival_steps(dist, seed, num_steps):
    """The documented delay schedule: d_t = sample(dist, fold_in(key, t))."""
    key = jax.random.PRNGKey(seed)
    sample = jax.vmap(lambda t: delays.sample(dist, jax.random.fold_in(key, t)))
    return np.arange(num_steps) + np.asarray(sample(jnp.arange(num_steps)))


def arrival_sums(gradients, arrivals, num_steps):
    """Per step, the sum of the gradients arriving then (numpy, float64), and the counts."""
    sums = jax.tree.map(lambda g: np.zeros((num_steps,) + g.shape[1:]), gradients)
    counts = np.zeros(num_steps, np.int64)
    for t, s in enumerate(arrivals):
        if s < num_steps:
            counts[s] += 1
            for total, g in zip(jax.tree.leaves(sums), jax.tree.leaves(gradients)):
                total[s] += np.asarray(g[t], np.float64)
    return sums, counts


# --- delays -----------------------------------------------------------------------------


def test_distribution_probabilities_match_their_formulas():
    np.testing.assert_array_equal(delays.fixed(3).probs, [0, 0, 0, 1])
    np.testing.assert_allclose(delays.uniform(4).probs, np.full(5, 0.2), rtol=1e-6)
    k = np.arange(6)
    geometric = 0.3 * 0.7**k
    np.testing.assert_allclose(delays.geometric(0.3, 5).probs, geometric / geometric.sum(), rtol=1e-5)
    np.testing.assert_allclose(delays.geometric(1.0, 3).probs, [1, 0, 0, 0])
    zipf = (k + 1.0) ** -1.5
    np.testing.assert_allclose(delays.zipf(1.5, 5).probs, zipf / zipf.sum(), rtol=1e-5)
    assert [delays.max_delay(d) for d in (delays.fixed(0), delays.uniform(7), delays.zipf(1.0, 2))] == [0, 7, 2]


@pytest.mark.parametrize(
    "dist",
    [delays.fixed(3), delays.uniform(5), delays.geometric(0.3, 7), delays.zipf(1.5, 10)],
    ids=["fixed", "uniform", "geometric", "zipf"],
)
def test_sample_frequencies_match_probs(dist):
    num_samples = 20_000
    keys = jax.random.split(jax.random.PRNGKey(1), num_samples)
    samples = np.asarray(jax.jit(jax.vmap(lambda k: delays.sample(dist, k)))(keys))
    assert samples.dtype == np.int32
    assert samples.min() >= 0 and samples.max() <= delays.max_delay(dist)
    frequencies = np.bincount(samples, minlength=delays.max_delay(dist) + 1) / num_samples
    # Binomial standard deviation <= 0.0036 at n = 20k: 0.015 is > 4 sigma.
    np.testing.assert_allclose(frequencies, np.asarray(dist.probs), atol=0.015)


def test_distribution_parameters_are_pytree_leaves_a_sweep_is_a_vmap():
    ps = jnp.array([0.2, 0.5, 0.9])
    batch = jax.vmap(lambda p: delays.geometric(p, 4))(ps)
    assert batch.probs.shape == (3, 5)
    for p, probs in zip(ps, batch.probs):
        np.testing.assert_allclose(probs, delays.geometric(float(p), 4).probs, rtol=1e-6)


# --- delayed: exact equivalences ----------------------------------------------------------


@pytest.mark.parametrize(
    "inner",
    [optax.adam(1e-2), optax.sgd(0.1, momentum=0.9)],
    ids=["adam", "sgd_momentum"],
)
@pytest.mark.parametrize("delay", [0, delays.fixed(0), delays.uniform(0)], ids=["int", "fixed", "uniform"])
def test_delay_zero_is_inner_exactly(inner, delay):
    gradients = random_gradients(jax.random.PRNGKey(0), 20)
    expected_updates, expected_params, _ = run(inner, gradients)
    updates, params_seen, state = run(delayed(inner, delay), gradients)
    assert_bitwise_equal(updates, expected_updates)
    assert_bitwise_equal(params_seen, expected_params)
    assert isinstance(state, DelayedState) and int(state.step) == 20


def test_fixed_delay_sgd_applies_gradient_t_minus_d():
    d, num_steps = 3, 12
    gradients = random_gradients(jax.random.PRNGKey(1), num_steps)
    updates, _, _ = run(delayed(optax.sgd(0.1), d), gradients)
    for t in range(num_steps):
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(gradients)):
            expected = -0.1 * g[t - d] if t >= d else jnp.zeros_like(g[t])
            np.testing.assert_allclose(u[t], expected, rtol=1e-6)


def test_fixed_delay_adam_is_adam_on_the_shifted_sequence():
    d, num_steps = 4, 15
    gradients = random_gradients(jax.random.PRNGKey(2), num_steps)
    inner = optax.adam(1e-2)
    state, updates = run_with_fixed_params(delayed(inner, d), gradients)
    _, expected = run_with_fixed_params(inner, jax.tree.map(lambda g: g[: num_steps - d], gradients))
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(u[:d], 0.0)
        np.testing.assert_allclose(u[d:], e, rtol=1e-6, atol=1e-9)
    # The empty steps did not advance adam: it counted only the arrivals.
    assert int(state.inner_state[0].count) == num_steps - d


def test_one_point_distribution_is_the_int_delay_bitwise_concrete_or_traced():
    """A one-point distribution takes the fixed-delay path when its probabilities are concrete
    and the sampling path when traced (a vmap); both are the int delay -- bit for bit when
    concrete, to rounding when traced (the batched predicate turns the cond into a select, which
    compiles adam differently) -- also when the point is below max_delay (more slots than needed;
    the stale slots are never read as live)."""
    num_steps, inner = 16, optax.adam(1e-2)
    gradients = random_gradients(jax.random.PRNGKey(11), num_steps)
    for d, probs in [(3, delays.fixed(3).probs), (1, jnp.array([0.0, 1.0, 0.0, 0.0]))]:
        _, expected = run_with_fixed_params(delayed(inner, d), gradients)
        _, concrete = run_with_fixed_params(delayed(inner, delays.DelayDistribution(probs)), gradients)
        assert_bitwise_equal(concrete, expected)
        traced = jax.vmap(
            lambda p: run_with_fixed_params(delayed(inner, delays.DelayDistribution(p)), gradients)[1]
        )(probs[None])
        for t, e in zip(jax.tree.leaves(traced), jax.tree.leaves(expected)):
            np.testing.assert_allclose(t[0], e, rtol=1e-6, atol=1e-8)


def test_slots_are_reused_without_zeroing_and_sums_stay_exact():
    """Long run, few slots: every slot is reused many times; a slot is overwritten when it comes
    back into use, so the arrival sums never include a gradient from an earlier round."""
    dist, seed, num_steps = delays.uniform(2), 9, 60
    arrivals = arrival_steps(dist, seed, num_steps)
    gradients = random_gradients(jax.random.PRNGKey(12), num_steps)
    sums, counts = arrival_sums(gradients, arrivals, num_steps)
    _, updates = run_with_fixed_params(delayed(optax.sgd(1.0), dist, seed=seed), gradients)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(sums)):
        np.testing.assert_allclose(u, -e, rtol=1e-6, atol=1e-6)
    assert (counts == 0).any() and (counts >= 2).any()


@pytest.mark.parametrize(
    "dist",
    [delays.uniform(4), delays.geometric(0.4, 6), delays.zipf(1.2, 8)],
    ids=["uniform", "geometric", "zipf"],
)
def test_random_delays_apply_every_gradient_exactly_once(dist):
    num_gradients, seed = 40, 3
    max_delay = delays.max_delay(dist)
    num_steps = num_gradients + max_delay
    gradients = random_gradients(jax.random.PRNGKey(4), num_gradients)
    # Flush: max_delay zero gradients after the real ones.
    padded = jax.tree.map(lambda g: jnp.concatenate([g, jnp.zeros((max_delay,) + g.shape[1:])]), gradients)
    # scale_by_schedule counts the steps at which inner runs.
    inner = optax.chain(optax.sgd(1.0), optax.scale_by_schedule(lambda count: 1.0))
    state, updates = run_with_fixed_params(delayed(inner, dist, seed=seed), padded)

    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(gradients)):
        np.testing.assert_allclose(u.sum(0), -g.sum(0), rtol=1e-5, atol=1e-5)

    # Step by step against the documented schedule: what arrives at s is summed.
    arrivals = arrival_steps(dist, seed, num_steps)
    assert np.all(arrivals - np.arange(num_steps) <= max_delay)
    expected_sums, expected_counts = arrival_sums(gradients, arrivals[:num_gradients], num_steps)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected_sums)):
        np.testing.assert_allclose(u, -e, rtol=1e-5, atol=1e-6)
    # Non-empty steps: those where any gradient (zero flush gradients included) arrived.
    non_empty = len(set(arrivals[arrivals < num_steps].tolist()))
    assert int(state.inner_state[1].count) == non_empty
    assert non_empty < num_steps  # the schedule has empty steps, so the count is informative


def test_gradients_arriving_together_are_summed_before_inner():
    dist, seed, num_steps = delays.uniform(3), 5, 24
    arrivals = arrival_steps(dist, seed, num_steps)
    gradients = random_gradients(jax.random.PRNGKey(6), num_steps)
    sums, counts = arrival_sums(gradients, arrivals, num_steps)
    assert counts.max() >= 2, "the seeded schedule must contain a collision"

    inner = optax.adam(1e-2)
    state, updates = run_with_fixed_params(delayed(inner, dist, seed=seed), gradients)
    # Reference: adam on the per-step arrival sums, only at the non-empty steps.
    non_empty = np.flatnonzero(counts)
    _, expected = run_with_fixed_params(inner, jax.tree.map(lambda s: jnp.asarray(s[non_empty], jnp.float32), sums))
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_allclose(u[non_empty], e, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(u[counts == 0], 0.0)
    # What is still in flight is counted in the state.
    in_flight = int(np.sum(arrivals >= num_steps))
    assert int(state.counts.sum()) == in_flight


# --- DC-ASGD ---------------------------------------------------------------------------------


def test_compensation_zero_equals_plain_delayed():
    gradients = random_gradients(jax.random.PRNGKey(7), 20)
    dist = delays.uniform(3)
    plain, _, _ = run(delayed(optax.adam(1e-1), dist, seed=1), gradients)
    compensated, _, _ = run(delayed(optax.adam(1e-1), dist, compensation=0.0, seed=1), gradients)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(compensated)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("delay", [2, delays.uniform(3)], ids=["fixed", "uniform"])
def test_compensation_corrects_each_gradient_with_the_params_it_was_computed_at(delay):
    lam, learning_rate, num_steps, seed = 0.7, 0.5, 16, 2
    gradients = random_gradients(jax.random.PRNGKey(8), num_steps)
    tx = delayed(optax.sgd(learning_rate), delay, compensation=lam, seed=seed)
    updates, params_seen, _ = run(tx, gradients)

    if isinstance(delay, int):
        arrivals = np.arange(num_steps) + delay
    else:
        arrivals = arrival_steps(delay, seed, num_steps)
    for u, g, w in zip(jax.tree.leaves(updates), jax.tree.leaves(gradients), jax.tree.leaves(params_seen)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        expected = np.zeros_like(g)
        for t, s in enumerate(arrivals):
            if s < num_steps:  # g + λ g⊙g⊙(w_now − w_then), by hand
                expected[s] += g[t] + lam * g[t] * g[t] * (w[s] - w[t])
        np.testing.assert_allclose(u, -learning_rate * expected, rtol=1e-5, atol=1e-6)
    # The correction is not vacuous: params moved between receipt and application.
    assert not np.allclose(np.asarray(params_seen["w"][-1]), np.asarray(params_seen["w"][0]))


def test_compensation_requires_params():
    tx = delayed(optax.sgd(0.1), 2, compensation=0.5)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="params"):
        tx.update(PARAMS, state)


# --- vmap / scan / shard_map ------------------------------------------------------------------


def test_vmap_workers_with_different_seeds_inside_scan():
    num_workers, num_steps, max_delay = 4, 30, 3
    gradients = random_gradients(jax.random.PRNGKey(9), num_steps)
    padded = jax.tree.map(lambda g: jnp.concatenate([g, jnp.zeros((max_delay,) + g.shape[1:])]), gradients)

    def worker(seed_key):
        tx = delayed(optax.sgd(1.0), delays.uniform(max_delay), seed=seed_key)

        def step(state, gradient):
            updates, state = tx.update(gradient, state, PARAMS)
            return state, updates

        _, updates = lax.scan(step, tx.init(PARAMS), padded)
        total = jax.tree.map(lambda u: u.sum(0), updates)
        return updates, lax.psum(total, "workers")

    seeds = jax.random.split(jax.random.PRNGKey(10), num_workers)
    updates, total = jax.jit(jax.vmap(worker, axis_name="workers"))(seeds)
    w = np.asarray(updates["w"])
    for i in range(num_workers):
        for j in range(i + 1, num_workers):
            assert not np.allclose(w[i], w[j]), "workers with different seeds must differ"
    for u, g in zip(jax.tree.leaves(total), jax.tree.leaves(gradients)):
        np.testing.assert_allclose(u[0], -num_workers * g.sum(0), rtol=1e-5, atol=1e-5)


def mark_varying(x, axis_name):
    """Under shard_map, a scan carry must vary over the mesh axis from the start."""
    if axis_name in jax.typeof(x).manual_axis_type.varying:
        return x
    return lax.pcast(x, (axis_name,), to="varying")


def test_shard_map_workers_with_their_own_delays():
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("workers",))
    num_workers, num_steps, max_delay = len(devices), 12, 2
    gradients = random_gradients(jax.random.PRNGKey(11), num_steps)
    seeds = jnp.arange(num_workers, dtype=jnp.uint32) + 3
    stacked = jax.tree.map(lambda g: jnp.broadcast_to(g, (num_workers,) + g.shape), gradients)

    def worker(seed, gradients):
        # Per-worker seed: the arrival step (the cond predicate) varies over the mesh axis.
        tx = delayed(optax.adam(1e-2), delays.uniform(max_delay), compensation=0.1, seed=seed[0])

        def step(carry, gradient):
            params, state = carry
            updates, state = tx.update(gradient, state, params)
            return (optax.apply_updates(params, updates), state), updates

        state = jax.tree.map(lambda x: mark_varying(x, "workers"), tx.init(PARAMS))
        params = jax.tree.map(lambda x: mark_varying(x, "workers"), PARAMS)
        _, updates = lax.scan(step, (params, state), jax.tree.map(lambda g: g[0], gradients))
        return jax.tree.map(lambda u: u[None], updates)

    spec = jax.tree.map(lambda _: PartitionSpec("workers"), stacked)
    fn = jax.jit(jax.shard_map(worker, mesh=mesh, in_specs=(PartitionSpec("workers"), spec), out_specs=spec))
    sharded = fn(seeds, stacked)
    for i in range(num_workers):
        tx = delayed(optax.adam(1e-2), delays.uniform(max_delay), compensation=0.1, seed=int(seeds[i]))
        expected, _, _ = run(tx, gradients)
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-8)


# --- learning ---------------------------------------------------------------------------------


def tanh_regression_loss(params):
    x = jnp.linspace(-2.0, 2.0, 32)
    y = 1.5 * jnp.tanh(2.0 * x - 0.5)
    return jnp.mean((params["a"] * jnp.tanh(params["b"] * x + params["c"]) - y) ** 2)


def final_loss(tx, num_steps=1000):
    params = {"a": jnp.array(0.5), "b": jnp.array(0.5), "c": jnp.array(0.0)}

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(tanh_regression_loss)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = lax.scan(step, (params, tx.init(params)), None, length=num_steps)
    return tanh_regression_loss(params)


@pytest.mark.parametrize(
    "tx",
    [
        delayed(optax.sgd(0.2), delays.uniform(4)),
        delayed(optax.sgd(0.2), delays.zipf(1.0, 8), compensation=1.0, seed=1),
    ],
    ids=["uniform", "zipf_dc_asgd"],
)
def test_converges_on_a_non_convex_regression(tx):
    initial = tanh_regression_loss({"a": jnp.array(0.5), "b": jnp.array(0.5), "c": jnp.array(0.0)})
    assert float(initial) > 0.3
    assert float(jax.jit(lambda: final_loss(tx))()) < 1e-6


# --- argument validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: delayed(optax.sgd(0.1), -1), "delay"),
        (lambda: delayed(optax.sgd(0.1), 2, compensation=-0.5), "compensation"),
        (lambda: delays.fixed(-2), "d"),
        (lambda: delays.uniform(-1), "max_delay"),
        (lambda: delays.geometric(0.5, -3), "max_delay"),
        (lambda: delays.geometric(0.0, 4), "p"),
        (lambda: delays.geometric(1.5, 4), "p"),
        (lambda: delays.zipf(-1.0, 4), "exponent"),
        (lambda: delayed(optax.sgd(0.1), delays.DelayDistribution(jnp.array([0.5, -0.5]))), "delay"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        make()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: delayed(optax.sgd(0.1), 1.5), "delay"),
        (lambda: delayed(optax.sgd(0.1), 2, seed="zero"), "seed"),
        (lambda: delays.uniform(2.0), "max_delay"),
    ],
)
def test_wrong_types_raise_type_error_naming_them(make, name):
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        make()
