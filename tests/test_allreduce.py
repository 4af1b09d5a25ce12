"""jaxdp.allreduce: N workers with batch b == one worker with batch N·b; errors; convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.runtime import vmap as vmap_runtime
from jaxdp.workloads import digits

NUM_WORKERS = 4
BATCH = 8
STEPS = 6


@pytest.fixture(scope="module")
def data():
    return digits.load(seed=0)


def _batches(data, steps, seed=1):
    """Per-step, per-worker batches: x [steps, N, b, 64], y [steps, N, b]."""
    keys = jax.random.split(jax.random.key(seed), steps)
    return jax.vmap(lambda k: digits.worker_batches(k, data, NUM_WORKERS, BATCH))(keys)


@pytest.mark.parametrize("make_optimizer", [lambda: optax.sgd(0.1), lambda: optax.adam(1e-2)], ids=["sgd", "adam"])
def test_workers_equal_one_worker_with_the_union_batch(data, make_optimizer):
    params = digits.init_mlp(jax.random.key(0), hidden=(16,))
    xs, ys = _batches(data, STEPS)

    # N workers, each with its own copy of the parameters and its own batch, inside lax.scan.
    distributed = optax.chain(jaxdp.allreduce("workers"), make_optimizer())

    def worker_step(p, s, x, y):
        grads = jax.grad(digits.loss)(p, x, y)
        updates, s = distributed.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    mapped = vmap_runtime.map_workers(worker_step, NUM_WORKERS)

    @jax.jit
    def run_workers(p, s, xs, ys):
        def body(carry, batch):
            return mapped(*carry, *batch), None

        return jax.lax.scan(body, (p, s), (xs, ys))[0]

    worker_params, _ = run_workers(
        vmap_runtime.replicate(params, NUM_WORKERS),
        vmap_runtime.replicate(distributed.init(params), NUM_WORKERS),
        xs,
        ys,
    )

    # One worker, batch N·b: the union of the workers' batches, mean loss.
    single = make_optimizer()

    @jax.jit
    def single_step(p, s, x, y):
        grads = jax.grad(digits.loss)(p, x, y)
        updates, s = single.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    p, s = params, single.init(params)
    for t in range(STEPS):
        p, s = single_step(p, s, xs[t].reshape(NUM_WORKERS * BATCH, -1), ys[t].reshape(-1))

    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p, params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the comparison below is not vacuous
    for worker in range(NUM_WORKERS):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a[worker], b, rtol=1e-5, atol=2e-6), worker_params, p
        )


def test_averages_exactly_and_keeps_empty_state():
    transform = jaxdp.allreduce("workers")
    state = transform.init({"w": jnp.zeros(2)})
    assert state == jaxdp.strategies.AllReduceState()
    grads = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])}
    averaged, new_state = jax.vmap(lambda g: transform.update(g, state), axis_name="workers")(grads)
    np.testing.assert_allclose(averaged["w"], np.tile([[3.0, 3.0]], (3, 1)))
    assert new_state == state


def test_tuple_axis_name_averages_over_both_axes():
    transform = jaxdp.allreduce(("hosts", "workers"))
    values = jnp.arange(6.0).reshape(2, 3)
    inner = jax.vmap(lambda g: transform.update(g, transform.init(g))[0], axis_name="workers")
    averaged = jax.vmap(inner, axis_name="hosts")(values)
    np.testing.assert_allclose(averaged, np.full((2, 3), 2.5))


def test_unbound_axis_raises_value_error_naming_axis_name():
    transform = jaxdp.allreduce("workers")
    grads = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"axis_name 'workers' is not bound.*vmap/shard_map/pmap"):
        transform.update(grads, transform.init(grads))
    with pytest.raises(ValueError, match="axis_name 'workers'"):
        jax.jit(lambda g: transform.update(g, transform.init(g)))(grads)
    # bound under a different name is still unbound
    with pytest.raises(ValueError, match="axis_name 'workers'"):
        jax.vmap(lambda g: transform.update(g, transform.init(g)), axis_name="devices")(jnp.ones((2, 3)))


@pytest.mark.parametrize("bad", ["", (), ("workers", "")])
def test_bad_axis_name_value(bad):
    with pytest.raises(ValueError, match="axis_name"):
        jaxdp.allreduce(bad)


@pytest.mark.parametrize("bad", [3, None, ["workers"]])
def test_bad_axis_name_type(bad):
    with pytest.raises(TypeError, match="axis_name"):
        jaxdp.allreduce(bad)


def test_converges_on_digits(data):
    """4 workers × batch 16, allreduce + sgd: > 90 % test accuracy in 300 steps."""
    params = digits.init_mlp(jax.random.key(0))
    optimizer = optax.chain(jaxdp.allreduce("workers"), optax.sgd(0.1, momentum=0.9))

    def worker_step(p, s, key):
        x, y = digits.sample_batch(key, data.x_train, data.y_train, 16)
        grads = jax.grad(digits.loss)(p, x, y)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    mapped = vmap_runtime.map_workers(worker_step, NUM_WORKERS)

    @jax.jit
    def train(p, s, key):
        def body(carry, k):
            return mapped(*carry, jax.random.split(k, NUM_WORKERS)), None

        return jax.lax.scan(body, (p, s), jax.random.split(key, 300))[0]

    worker_params, _ = train(
        vmap_runtime.replicate(params, NUM_WORKERS),
        vmap_runtime.replicate(optimizer.init(params), NUM_WORKERS),
        jax.random.key(1),
    )
    final = jax.tree.map(lambda leaf: leaf[0], worker_params)
    # synchronous: every worker holds the same parameters
    jax.tree.map(lambda leaf: np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape)), worker_params)
    assert float(digits.accuracy(final, data.x_test, data.y_test)) > 0.9
