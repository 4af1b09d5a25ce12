"""jaxdp.local_steps against independently computed references (plain jax.grad and arithmetic)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.runtime import vmap as vmap_runtime
from jaxdp.workloads import digits

NUM_WORKERS = 3
BATCH = 8


@pytest.fixture(scope="module")
def data():
    return digits.load(seed=0)


@pytest.fixture(scope="module")
def params():
    return digits.init_mlp(jax.random.key(0), hidden=(16,))


def _batches(data, steps, seed=1):
    """x [steps, N, b, 64], y [steps, N, b]."""
    keys = jax.random.split(jax.random.key(seed), steps)
    return jax.vmap(lambda k: digits.worker_batches(k, data, NUM_WORKERS, BATCH))(keys)


def _run_workers(optimizer, params, xs, ys):
    """Run ``optimizer`` on N vmap workers for len(xs) steps; return per-step params and states."""

    def worker_step(p, s, x, y):
        updates, s = optimizer.update(jax.grad(digits.loss)(p, x, y), s, p)
        p = optax.apply_updates(p, updates)
        return p, s

    mapped = vmap_runtime.map_workers(worker_step, NUM_WORKERS)

    @jax.jit
    def run(p, s, xs, ys):
        def body(carry, batch):
            carry = mapped(*carry, *batch)
            return carry, carry

        return jax.lax.scan(body, (p, s), (xs, ys))[1]

    return run(
        vmap_runtime.replicate(params, NUM_WORKERS), vmap_runtime.replicate(optimizer.init(params), NUM_WORKERS), xs, ys
    )


def _assert_trees_close(actual, expected, rtol=1e-5, atol=2e-6):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol), actual, expected)


_grad = jax.jit(jax.grad(digits.loss))


def _sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


def _reference_rounds(params, xs, ys, lr, sync_every, outer_step):
    """Hand-written local SGD: per-worker SGD from the anchor; at the end of a round the anchor moves
    by ``outer_step(anchor, mean Δ)``. Returns the per-step parameters of each worker [steps][N]."""
    anchor = params
    local = [params] * NUM_WORKERS
    trajectory = []
    for t in range(xs.shape[0]):
        local = [
            jax.tree.map(lambda p, g: p - lr * g, local[n], _grad(local[n], xs[t, n], ys[t, n]))
            for n in range(NUM_WORKERS)
        ]
        if (t + 1) % sync_every == 0:
            mean_delta = jax.tree.map(lambda *d: sum(d) / NUM_WORKERS, *[_sub(anchor, l) for l in local])
            anchor = outer_step(anchor, mean_delta)
            local = [anchor] * NUM_WORKERS
        trajectory.append(local)
    return trajectory


def _worker(tree, n):
    return jax.tree.map(lambda leaf: leaf[n], tree)


def test_one_local_step_with_unit_outer_sgd_is_synchronous_sgd(data, params):
    xs, ys = _batches(data, 5)
    local = jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every=1, axis_name="workers")
    synchronous = optax.chain(jaxdp.allreduce("workers"), optax.sgd(0.1))
    local_params, local_states = _run_workers(local, params, xs, ys)
    sync_params, _ = _run_workers(synchronous, params, xs, ys)
    _assert_trees_close(local_params, sync_params)
    np.testing.assert_array_equal(local_states.count, 0)


def test_one_local_step_without_axis_is_inner_alone(data, params):
    xs, ys = _batches(data, 5)
    inner = optax.sgd(0.05, momentum=0.9)
    local = jaxdp.local_steps(inner, optax.sgd(1.0), sync_every=1)
    p, s = params, local.init(params)
    q, r = params, inner.init(params)
    for t in range(5):
        g = _grad(p, xs[t, 0], ys[t, 0])
        updates, s = local.update(g, s, p)
        p = optax.apply_updates(p, updates)
        updates, r = inner.update(_grad(q, xs[t, 0], ys[t, 0]), r, q)
        q = optax.apply_updates(q, updates)
    _assert_trees_close(p, q)
    assert int(s.count) == 0


@pytest.mark.parametrize("sync_every", [2, 3])
def test_unit_outer_sgd_without_axis_is_inner_for_any_sync_every(data, params, sync_every):
    """anchor − (anchor − local) = local: with no averaging, local_steps(inner, sgd(1)) is inner."""
    xs, ys = _batches(data, 6)
    local_params, _ = _run_workers(jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every), params, xs, ys)
    plain_params, _ = _run_workers(optax.sgd(0.1), params, xs, ys)
    _assert_trees_close(local_params, plain_params)


def test_unit_outer_sgd_is_model_averaging_with_bookkeeping(data, params):
    sync_every, rounds = 3, 3
    xs, ys = _batches(data, sync_every * rounds)
    optimizer = jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every, axis_name="workers")
    got_params, got_states = _run_workers(optimizer, params, xs, ys)
    # reference: each worker trains alone for B steps; then all take the mean of the local models
    expected = _reference_rounds(params, xs, ys, 0.1, sync_every, lambda anchor, delta: _sub(anchor, delta))

    for t in range(xs.shape[0]):
        for n in range(NUM_WORKERS):
            _assert_trees_close(_worker(_worker(got_params, t), n), expected[t][n])
    np.testing.assert_array_equal(got_states.count[:, 0], [1, 2, 0] * rounds)
    # the anchor changes only at synchronisations and then equals the (common) parameters
    for t in range(xs.shape[0]):
        anchor_t = _worker(_worker(got_states.anchor, t), 0)
        round_start = expected[(t // sync_every) * sync_every - 1][0] if t >= sync_every else params
        if (t + 1) % sync_every == 0:
            _assert_trees_close(anchor_t, expected[t][0])
        else:
            _assert_trees_close(anchor_t, round_start)
    # after a synchronisation all workers agree; in between they do not
    first_leaf = lambda tree: jax.tree.leaves(tree)[0]  # noqa: E731
    assert float(jnp.max(jnp.abs(jnp.diff(first_leaf(got_params)[sync_every - 1], axis=0)))) < 1e-6
    assert float(jnp.max(jnp.abs(jnp.diff(first_leaf(got_params)[0], axis=0)))) > 1e-4


def test_outer_sgd_is_the_global_learning_rate(data, params):
    sync_every, rounds, global_lr = 2, 3, 0.6
    xs, ys = _batches(data, sync_every * rounds)
    optimizer = jaxdp.local_steps(optax.sgd(0.1), optax.sgd(global_lr), sync_every, axis_name="workers")
    got_params, got_states = _run_workers(optimizer, params, xs, ys)
    def outer_sgd(anchor, mean_delta):
        return jax.tree.map(lambda a, d: a - global_lr * d, anchor, mean_delta)

    expected = _reference_rounds(params, xs, ys, 0.1, sync_every, outer_sgd)
    for t in range(xs.shape[0]):
        for n in range(NUM_WORKERS):
            _assert_trees_close(_worker(_worker(got_params, t), n), expected[t][n])
    np.testing.assert_array_equal(got_states.count[:, 0], [1, 0] * rounds)


def test_stateful_outer_and_inner_keep_their_state_across_rounds(data, params):
    """DiLoCo-like: inner = adam (state never reset), outer = Nesterov momentum on the mean Δ."""
    sync_every, rounds = 2, 3
    xs, ys = _batches(data, sync_every * rounds)
    inner, outer = optax.adam(1e-2), optax.sgd(0.7, momentum=0.9, nesterov=True)
    got_params, _ = _run_workers(jaxdp.local_steps(inner, outer, sync_every, axis_name="workers"), params, xs, ys)

    anchor, outer_state = params, outer.init(params)
    local = [params] * NUM_WORKERS
    inner_states = [inner.init(params)] * NUM_WORKERS
    for t in range(xs.shape[0]):
        for n in range(NUM_WORKERS):
            updates, inner_states[n] = inner.update(_grad(local[n], xs[t, n], ys[t, n]), inner_states[n], local[n])
            local[n] = optax.apply_updates(local[n], updates)
        if (t + 1) % sync_every == 0:
            mean_delta = jax.tree.map(lambda *d: sum(d) / NUM_WORKERS, *[_sub(anchor, l) for l in local])
            outer_updates, outer_state = outer.update(mean_delta, outer_state, anchor)
            anchor = optax.apply_updates(anchor, outer_updates)
            local = [anchor] * NUM_WORKERS
    for n in range(NUM_WORKERS):
        _assert_trees_close(_worker(_worker(got_params, -1), n), local[n], rtol=1e-4, atol=1e-5)


def test_sync_branch_runs_under_plain_jit_and_counts(params):
    """No vmap: lax.cond is a real branch; the count cycles 1..B-1, 0."""
    optimizer = jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every=4)
    step = jax.jit(optimizer.update)
    state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    counts = []
    for _ in range(9):
        _, state = step(grads, state, params)
        counts.append(int(state.count))
    assert counts == [1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert state.count.dtype == jnp.int32


def test_init_copies_params_into_anchor(params):
    state = jaxdp.local_steps(optax.sgd(0.1), optax.adam(1e-3), 2).init(params)
    _assert_trees_close(state.anchor, params, rtol=0, atol=0)
    assert int(state.count) == 0
    assert isinstance(state, jaxdp.strategies.LocalStepsState)


def test_params_none_raises():
    optimizer = jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), 2)
    grads = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        optimizer.update(grads, optimizer.init(grads))


def test_unbound_axis_raises_value_error_naming_axis_name():
    optimizer = jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), 2, axis_name="workers")
    grads = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="axis_name 'workers' is not bound"):
        optimizer.update(grads, optimizer.init(grads), grads)


@pytest.mark.parametrize("sync_every", [0, -3])
def test_sync_every_below_one_raises(sync_every):
    with pytest.raises(ValueError, match="sync_every"):
        jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every)


@pytest.mark.parametrize("sync_every", [2.0, True, "2"])
def test_sync_every_not_int_raises(sync_every):
    with pytest.raises(TypeError, match="sync_every"):
        jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every)


def test_bad_transforms_and_axis_raise():
    with pytest.raises(TypeError, match="inner"):
        jaxdp.local_steps(lambda g: g, optax.sgd(1.0), 2)
    with pytest.raises(TypeError, match="outer"):
        jaxdp.local_steps(optax.sgd(0.1), 1.0, 2)
    with pytest.raises(ValueError, match="local_steps: axis_name"):
        jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), 2, axis_name="")


def test_converges_on_digits(data):
    """4 workers, B = 5 local SGD steps, model averaging: > 90 % test accuracy in 300 steps."""
    num_workers = 4
    params = digits.init_mlp(jax.random.key(0))
    optimizer = jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every=5, axis_name="workers")

    def worker_step(p, s, key):
        x, y = digits.sample_batch(key, data.x_train, data.y_train, 16)
        updates, s = optimizer.update(jax.grad(digits.loss)(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    mapped = vmap_runtime.map_workers(worker_step, num_workers)

    @jax.jit
    def train(p, s, key):
        def body(carry, k):
            return mapped(*carry, jax.random.split(k, num_workers)), None

        return jax.lax.scan(body, (p, s), jax.random.split(key, 300))[0]

    worker_params, state = train(
        vmap_runtime.replicate(params, num_workers),
        vmap_runtime.replicate(optimizer.init(params), num_workers),
        jax.random.key(1),
    )
    assert int(state.count[0]) == 0  # 300 is a multiple of 5: the run ends on a synchronisation
    final = jax.tree.map(lambda leaf: leaf[0], worker_params)
    assert float(digits.accuracy(final, data.x_test, data.y_test)) > 0.9


def test_low_precision_params_keep_their_dtype():
    params = {"w": jnp.ones(3, jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)}
    optimizer = jaxdp.local_steps(optax.sgd(0.5), optax.sgd(1.0), sync_every=2)
    state = optimizer.init(params)
    step = jax.jit(optimizer.update)
    for _ in range(2):
        updates, state = step(params, state, params)
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.bfloat16 and state.anchor["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(params["w"], np.float32), 0.25)
