"""jaxdp.runtime.async_sim: schedule semantics, equivalences (sync SGD, plain SGD, a direct replay),
determinism, staleness statistics, stragglers, learning on digits, argument validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdp.runtime import async_sim as sim
from jaxdp.workloads import digits

DIM = 5
BATCH = 6


# A least-squares problem whose batches are a pure function of (worker id, local-step count): the worker
# state carries both, so a reference written without the simulator can reproduce every batch exactly.
def _batch(worker_id, count):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(123), worker_id), count)
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (BATCH, DIM))
    y = x @ jnp.arange(1.0, DIM + 1.0) + 0.3 * jax.random.normal(ky, (BATCH,))
    return x, y


def _lsq_grad(params, x, y):
    return jax.grad(lambda p: 0.5 * jnp.mean((x @ p - y) ** 2))(params)


def counted_local_step(worker_state, params, key):
    del key
    x, y = _batch(worker_state["id"], worker_state["count"])
    grads = _lsq_grad(params, x, y)
    worker_state = {"id": worker_state["id"], "count": worker_state["count"] + 1}
    return worker_state, grads, {"loss": 0.5 * jnp.mean((x @ params - y) ** 2)}


def _counters(num_workers):
    return {"id": jnp.arange(num_workers, dtype=jnp.int32), "count": jnp.zeros(num_workers, jnp.int32)}


def keyed_local_step(worker_state, params, key):
    """Samples its batch from the simulator's key instead of the worker state."""
    x, y = _batch(jax.random.randint(key, (), 0, 10_000), 0)
    return worker_state, _lsq_grad(params, x, y), {}


# ---------------------------------------------------------------------------------------------- schedule


def test_synchronous_schedule_is_lock_step_with_zero_staleness():
    s = sim.schedule(4, 1, 4, 5, sim.constant(2.0))
    assert s.events.worker.tolist() == [0, 1, 2, 3] * 5
    assert s.events.update_follows.tolist() == [False, False, False, True] * 5
    np.testing.assert_array_equal(s.updates.time, 2.0 * np.arange(1, 6))
    np.testing.assert_array_equal(s.updates.staleness, 0)
    np.testing.assert_array_equal(s.updates.workers, np.tile(np.arange(4), (5, 1)))
    assert sim.staleness_histogram(s).tolist() == [20]
    # Everyone pulls at the update, nobody in between.
    np.testing.assert_array_equal(s.events.pulls, s.events.update_follows[:, None] & np.ones(4, bool))


def test_comm_time_delays_push_and_reply():
    # Sync, constant step 1, B = 2, latency 0.5 each way: first update at 2 + 0.5, then every 0.5 + 2 + 0.5.
    s = sim.schedule(3, 2, 3, 4, sim.constant(1.0), comm_time=0.5)
    np.testing.assert_allclose(s.updates.time, [2.5, 5.5, 8.5, 11.5])


@pytest.mark.parametrize(
    "distribution",
    [sim.constant(0.7), sim.exponential(2.0), sim.lognormal(1.5, 0.8), sim.straggler(1.0, 0.2, 6.0)],
    ids=lambda d: type(d).__name__,
)
def test_sampled_durations_have_the_stated_mean(distribution):
    samples = sim.sample_durations(distribution, np.random.default_rng(0), 200_000)
    assert (samples > 0).all()
    np.testing.assert_allclose(samples.mean(), sim.mean_duration(distribution), rtol=0.02)


def test_downpour_constant_times_staleness_is_n_minus_1_after_the_first_round():
    s = sim.schedule(3, 1, 1, 12, sim.constant(1.0))
    assert s.updates.staleness[:, 0].tolist() == [0, 1, 2] + [2] * 9
    assert s.events.update_follows.all()  # M = 1: every arrival is an update


def test_downpour_exponential_staleness_histogram():
    n, updates = 4, 3000
    s = sim.schedule(n, 1, 1, updates, sim.exponential(1.0), seed=3)
    hist = sim.staleness_histogram(s)
    assert hist.sum() == updates * 1  # one applied Δ per update (M = 1)
    assert len(s.events.worker) == updates
    assert s.updates.staleness.max() > 0
    # With N equal-rate memoryless workers, between a worker's pull and its push the other N−1 push once
    # each on average: mean staleness N − 1.
    mean_staleness = (np.arange(len(hist)) * hist).sum() / hist.sum()
    assert abs(mean_staleness - (n - 1)) < 0.2
    # Staleness is consistent with the event record: version before update − anchor version.
    np.testing.assert_array_equal(s.updates.staleness[:, 0], np.arange(updates) - s.events.anchor_version)


def test_staleness_histogram_counts_every_applied_delta():
    s = sim.schedule(6, 3, 4, 200, sim.lognormal(1.0, 0.7), seed=1)
    assert sim.staleness_histogram(s).sum() == 200 * 4
    assert s.events.update_follows.sum() == 200
    assert s.updates.staleness.shape == (200, 4)
    # The M Δ's of update u are the M arrivals since update u − 1.
    starts = np.concatenate([[0], s.updates.event[:-1] + 1])
    for u in range(200):
        np.testing.assert_array_equal(s.updates.workers[u], s.events.worker[starts[u] : s.updates.event[u] + 1])


@pytest.mark.parametrize("reply", ["on_update", "immediate"])
def test_every_push_is_counted_and_times_are_ordered(reply):
    s = sim.schedule(5, 2, 3, 150, sim.exponential(1.0), seed=2, comm_time=0.1, reply=reply)
    pushes = sim.pushes_per_worker(s)
    assert pushes.sum() == len(s.events.worker)
    assert (pushes > 0).all()
    assert np.all(np.diff(s.events.time) >= 0)
    # A worker pushes again only after it pulled: between two pushes of w there is a pull of w.
    for w in range(5):
        mine = np.flatnonzero(s.events.worker == w)
        for a, b in zip(mine[:-1], mine[1:]):
            assert s.events.pulls[a:b, w].sum() == 1


def test_immediate_reply_pulls_the_pusher_only():
    s = sim.schedule(4, 1, 2, 50, sim.exponential(1.0), reply="immediate")
    np.testing.assert_array_equal(s.events.pulls, np.eye(4, dtype=bool)[s.events.worker])


def test_straggler_pushes_less():
    times = [sim.straggler(1.0, 0.3, 10.0)] + [sim.exponential(1.0)] * 3
    s = sim.schedule(4, 2, 1, 800, times, seed=0)
    pushes = sim.pushes_per_worker(s)
    # Its mean step time is 1·(0.7 + 0.3·10) = 3.7 against 1 for the others.
    assert pushes[0] < 0.5 * pushes[1:].min()
    assert pushes[0] > 0


def test_schedule_determinism():
    a = sim.schedule(4, 2, 2, 100, sim.exponential(1.0), seed=7)
    b = sim.schedule(4, 2, 2, 100, sim.exponential(1.0), seed=7)
    c = sim.schedule(4, 2, 2, 100, sim.exponential(1.0), seed=8)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.events.time[:50], c.events.time[:50])


# ---------------------------------------------------------------------------------------------- run


def test_m_equals_n_is_synchronous_sgd():
    n, updates, lr = 4, 8, 0.05
    s = sim.schedule(n, 1, n, updates, sim.constant(1.0))
    theta0 = jnp.zeros(DIM)
    out = sim.run(s, theta0, counted_local_step, optax.sgd(lr), optax.sgd(1.0), worker_state=_counters(n))

    # Independent synchronous SGD: at step k worker w uses its k-th batch; θ ← θ − lr · mean_w g_w.
    theta = np.zeros(DIM)
    for k in range(updates):
        grads = [np.asarray(_lsq_grad(jnp.asarray(theta, jnp.float32), *_batch(w, k))) for w in range(n)]
        theta = theta - lr * np.mean(grads, axis=0)
    np.testing.assert_allclose(out.params, theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.worker_state["count"], updates)
    np.testing.assert_array_equal(s.updates.staleness, 0)


def test_one_worker_one_step_is_plain_sgd():
    updates, lr, seed = 20, 0.1, 4
    s = sim.schedule(1, 1, 1, updates, sim.exponential(1.0))
    out = sim.run(s, jnp.zeros(DIM), keyed_local_step, optax.sgd(lr), optax.sgd(1.0), seed=seed)

    # Plain SGD with the documented key of event i, local step 0.
    theta = jnp.zeros(DIM)
    for i in range(updates):
        key = jax.random.fold_in(sim.event_key(seed, i), 0)
        _, grads, _ = keyed_local_step(None, theta, key)
        theta = theta - lr * grads
    np.testing.assert_allclose(out.params, theta, rtol=1e-5, atol=1e-6)


def _replay(s, lr_inner, lr_outer, aggregate):
    """The schedule replayed by a plain Python loop in float64 (the reference for run())."""
    n = s.num_workers
    theta = np.zeros(DIM)
    anchors = [theta.copy() for _ in range(n)]
    counts = [0] * n
    received = []
    for w, update, pulls in zip(s.events.worker, s.events.update_follows, s.events.pulls):
        local = anchors[w].copy()
        for _ in range(s.local_steps):
            x, y = (np.asarray(a, np.float64) for a in _batch(w, counts[w]))
            counts[w] += 1
            local -= lr_inner * x.T @ (x @ local - y) / len(y)
        received.append(anchors[w] - local)
        if update:
            total = np.sum(received, axis=0)
            theta = theta - lr_outer * (total / len(received) if aggregate == "mean" else total)
            received = []
        for p in np.flatnonzero(pulls):
            anchors[p] = theta.copy()
    return theta, counts


@pytest.mark.parametrize(
    "reply,aggregate", [("on_update", "sum"), ("immediate", "mean")], ids=["on_update-sum", "immediate-mean"]
)
def test_run_matches_a_direct_replay_of_the_schedule(reply, aggregate):
    n, lr_inner, lr_outer = 3, 0.05, 0.7
    s = sim.schedule(n, 3, 2, 25, sim.exponential(1.0), seed=5, reply=reply)
    assert s.updates.staleness.max() > 0  # asynchronous, not a disguised sync run
    out = sim.run(
        s, jnp.zeros(DIM), counted_local_step, optax.sgd(lr_inner), optax.sgd(lr_outer),
        aggregate=aggregate, worker_state=_counters(n),
    )
    theta, counts = _replay(s, lr_inner, lr_outer, aggregate)
    np.testing.assert_allclose(out.params, theta, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.worker_state["count"], counts)
    np.testing.assert_array_equal(out.worker_state["count"], 3 * sim.pushes_per_worker(s))


def test_event_step_driven_from_python_matches_run():
    n, seed = 3, 2
    s = sim.schedule(n, 2, 2, 10, sim.exponential(1.0), seed=1)
    inner, outer = optax.sgd(0.05), optax.sgd(1.0)
    out = sim.run(s, jnp.zeros(DIM), keyed_local_step, inner, outer, seed=seed)

    step = jax.jit(sim.make_event_step(keyed_local_step, inner, outer, local_steps=2))
    carry = sim.init_carry(jnp.zeros(DIM), inner, outer, n)
    arrivals = sim.arrival_inputs(s)
    for i in range(len(s.events.worker)):
        arrival = jax.tree.map(lambda a: a[i], arrivals)
        carry, _ = step(carry, arrival, sim.event_key(seed, i))
    np.testing.assert_allclose(carry.params, out.params, rtol=1e-6, atol=1e-7)
    assert int(carry.num_updates) == 10


def test_unrolled_worker_round_is_the_scanned_round_without_a_loop():
    """``unroll=True`` (for CNN gradients, which XLA:CPU runs slowly inside a loop) changes the program, not the
    arithmetic: same Δ, optimizer and worker states and metrics, and no while loop left in the compiled program."""
    inner, B = optax.sgd(0.05, momentum=0.9), 3
    anchor = jnp.linspace(-1.0, 1.0, DIM)
    x = jnp.linspace(0.0, 1.0, BATCH * DIM).reshape(BATCH, DIM)

    def local_step(worker_state, params, key):  # no random numbers: their own hashing loops would blur the check
        del key
        y = x @ jnp.arange(1.0, DIM + 1.0) + worker_state["count"]
        worker_state = {"id": worker_state["id"], "count": worker_state["count"] + 1}
        return worker_state, _lsq_grad(params, x, y), {"loss": 0.5 * jnp.mean((x @ params - y) ** 2)}

    def round_fn(unroll):
        return jax.jit(lambda: sim.worker_round(local_step, inner, B, anchor, inner.init(anchor),
                                                {"id": jnp.int32(1), "count": jnp.int32(4)}, jax.random.PRNGKey(0),
                                                unroll=unroll))

    scanned, unrolled = round_fn(False)(), round_fn(True)()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), scanned, unrolled)
    assert int(unrolled[2]["count"]) == 4 + B
    assert " while(" in round_fn(False).lower().compile().as_text()
    assert " while(" not in round_fn(True).lower().compile().as_text()


def test_unrolled_event_step_driven_from_python_matches_run():
    n = 3
    s = sim.schedule(n, 2, 2, 10, sim.exponential(1.0), seed=1)
    inner, outer = optax.sgd(0.05), optax.sgd(1.0)
    out = sim.run(s, jnp.zeros(DIM), counted_local_step, inner, outer, worker_state=_counters(n))

    step = jax.jit(sim.make_event_step(counted_local_step, inner, outer, local_steps=2, unroll=True))
    carry = sim.init_carry(jnp.zeros(DIM), inner, outer, n, _counters(n))
    arrivals = sim.arrival_inputs(s)
    for i in range(len(s.events.worker)):
        carry, _ = step(carry, jax.tree.map(lambda a: a[i], arrivals), sim.event_key(0, i))
    np.testing.assert_allclose(carry.params, out.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(carry.worker_states["count"], out.worker_state["count"])


def test_run_is_deterministic():
    s = sim.schedule(4, 2, 2, 30, sim.exponential(1.0), seed=0)
    inner, outer = optax.adam(0.05), optax.sgd(1.0)  # same objects: the second call reuses the compilation
    a = sim.run(s, jnp.zeros(DIM), keyed_local_step, inner, outer, seed=11)
    b = sim.run(s, jnp.zeros(DIM), keyed_local_step, inner, outer, seed=11)
    c = sim.run(s, jnp.zeros(DIM), keyed_local_step, inner, outer, seed=12)
    np.testing.assert_array_equal(np.asarray(a.params), np.asarray(b.params))
    for x, y in zip(jax.tree.leaves(a.outer_state), jax.tree.leaves(b.outer_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.params), np.asarray(c.params))


def test_eval_curve_and_local_metrics():
    s = sim.schedule(2, 2, 1, 12, sim.exponential(1.0), seed=0)
    eval_fn = lambda p: jnp.sum(p)  # noqa: E731
    out = sim.run(
        s, jnp.ones(DIM), counted_local_step, optax.sgd(0.05), optax.sgd(1.0),
        worker_state=_counters(2), eval_fn=eval_fn, eval_every=4,
    )
    np.testing.assert_array_equal(out.metrics["eval_update"], [0, 4, 8, 12])
    np.testing.assert_array_equal(out.metrics["eval_time"], np.concatenate([[0.0], s.updates.time[[3, 7, 11]]]))
    assert float(out.metrics["eval"][0]) == DIM  # θ_0 = ones
    np.testing.assert_allclose(out.metrics["eval"][-1], jnp.sum(out.params), rtol=1e-6)
    assert out.metrics["local"]["loss"].shape == (len(s.events.worker),)


def test_digits_mlp_learns_with_async_local_steps():
    data = digits.load(seed=0)
    params = digits.init_mlp(jax.random.PRNGKey(0), hidden=(32,))

    def local_step(worker_state, params, key):
        x, y = digits.sample_batch(key, data.x_train, data.y_train, 32)
        loss, grads = jax.value_and_grad(digits.loss)(params, x, y)
        return worker_state, grads, {"loss": loss}

    s = sim.schedule(4, 4, 2, 150, sim.exponential(1.0), seed=0)
    out = sim.run(
        s, params, local_step, optax.sgd(0.1), optax.sgd(1.0), seed=0,
        eval_fn=lambda p: digits.accuracy(p, data.x_test, data.y_test), eval_every=50,
    )
    curve = np.asarray(out.metrics["eval"])
    assert curve[0] < 0.3  # chance level at init
    assert curve[-1] > 0.9, curve
    assert np.asarray(out.metrics["local"]["loss"])[-50:].mean() < 0.5


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"master_batch": 5}, r"master_batch M=5 > num_workers N=4"),
        ({"master_batch": 0}, "master_batch"),
        ({"num_workers": 0}, "num_workers"),
        ({"local_steps": 0}, "local_steps"),
        ({"num_updates": 0}, "num_updates"),
        ({"comm_time": -1.0}, "comm_time"),
        ({"reply": "later"}, "reply"),
        ({"compute_time": [sim.constant(1.0)] * 3}, "compute_time"),
        ({"seed": -1}, "seed"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    args = {"num_workers": 4, "local_steps": 1, "master_batch": 2, "num_updates": 3,
            "compute_time": sim.constant(1.0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sim.schedule(**args)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: sim.constant(0.0), "time"),
        (lambda: sim.exponential(-1.0), "mean"),
        (lambda: sim.lognormal(1.0, -0.1), "sigma"),
        (lambda: sim.straggler(1.0, 1.5, 2.0), "slow_prob"),
        (lambda: sim.straggler(1.0, 0.1, 0.5), "slowdown"),
    ],
)
def test_distributions_reject_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_run_rejects_bad_arguments():
    s = sim.schedule(2, 1, 1, 2, sim.constant(1.0))
    with pytest.raises(ValueError, match="aggregate"):
        sim.run(s, jnp.zeros(DIM), keyed_local_step, optax.sgd(0.1), optax.sgd(1.0), aggregate="median")
    with pytest.raises(ValueError, match="eval_every"):
        sim.run(s, jnp.zeros(DIM), keyed_local_step, optax.sgd(0.1), optax.sgd(1.0), eval_every=0)
    with pytest.raises(TypeError, match="compute_time"):
        sim.schedule(2, 1, 1, 2, 1.0)
