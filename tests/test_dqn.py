"""Tests of jaxdp.agents.dqn (targets, loss, masking, ε-greedy, target updates) and agents.schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.agents import dqn, schedules
from jaxdp.agents.replay import Transition


def linear_q(params, obs):
    """A linear Q-network: q[B, A] = obs[B, D] @ w[D, A] + b[A]."""
    return obs @ params["w"] + params["b"]


def make_batch(obs, action, reward, next_obs, discount, valid) -> Transition:
    return Transition(
        obs=jnp.asarray(obs, jnp.float32),
        action=jnp.asarray(action, jnp.int32),
        reward=jnp.asarray(reward, jnp.float32),
        next_obs=jnp.asarray(next_obs, jnp.float32),
        discount=jnp.asarray(discount, jnp.float32),
        valid=jnp.asarray(valid, bool),
    )


def test_td_target_hand_computed():
    q_next = jnp.array([[1.0, 3.0, -2.0], [2.0, -1.0, 0.0], [-5.0, -4.0, -6.0]])
    reward = jnp.array([1.0, 0.0, 2.0])
    discount = jnp.array([0.5, 0.0, 0.25])  # the second transition terminated
    np.testing.assert_allclose(dqn.td_target(q_next, reward, discount), [1 + 0.5 * 3, 0.0, 2 + 0.25 * -4])


def test_double_td_target_hand_computed():
    q_next_online = jnp.array([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 9.0]])
    q_next_target = jnp.array([[1.0, 3.0, -2.0], [2.0, -1.0, 0.0], [-5.0, -4.0, -6.0]])
    reward = jnp.array([1.0, 0.0, 2.0])
    discount = jnp.array([0.5, 1.0, 0.25])
    # The online network picks actions 0, 1, 2; the target network evaluates them: 1, -1, -6.
    expected = [1 + 0.5 * 1.0, 0.0 + 1.0 * -1.0, 2 + 0.25 * -6.0]
    np.testing.assert_allclose(dqn.double_td_target(q_next_online, q_next_target, reward, discount), expected)
    # ... which is below the max-based target wherever the two networks disagree (less overestimation).
    assert np.all(np.asarray(dqn.td_target(q_next_target, reward, discount)) >= np.asarray(expected))


def test_loss_hand_computed_huber_and_semi_gradient():
    params = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "b": jnp.zeros(2)}
    target_params = {"w": jnp.array([[0.5, 0.0], [0.0, 0.5]]), "b": jnp.zeros(2)}
    batch = make_batch(
        obs=[[1.0, 0.0], [0.0, 1.0]],  # q = [1, 0] and [0, 2]
        action=[0, 1],  # q_taken = 1, 2
        reward=[1.0, -3.0],
        next_obs=[[2.0, 0.0], [0.0, 4.0]],  # target q_next = [1, 0] and [0, 2]
        discount=[0.5, 1.0],
        valid=[True, True],
    )
    # targets: 1 + 0.5*1 = 1.5 and -3 + 2 = -1; TD errors -0.5 (quadratic) and 3 (linear, delta=1).
    expected = (0.5 * 0.25 + (3.0 - 0.5)) / 2
    value, metrics = dqn.loss(params, target_params, linear_q, batch)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["td_error_abs"], 1.75, rtol=1e-6)
    # Semi-gradient: d/dq_taken of Huber is clip(td, -1, 1); the target contributes nothing.
    grads = jax.grad(lambda p: dqn.loss(p, target_params, linear_q, batch)[0])(params)
    expected_w = np.zeros((2, 2))
    expected_w[0, 0] = -0.5 / 2  # obs [1, 0], action 0, td -0.5
    expected_w[1, 1] = 1.0 / 2  # obs [0, 1], action 1, td 3 clipped to 1
    np.testing.assert_allclose(grads["w"], expected_w, rtol=1e-6)
    np.testing.assert_allclose(grads["b"], [-0.25, 0.5], rtol=1e-6)


def test_no_target_network_is_still_a_semi_gradient():
    # The ablation passes target_params=params: the target moves with params but is not differentiated.
    params = {"w": jnp.array([[1.0, -1.0], [0.5, 2.0]]), "b": jnp.array([0.1, -0.2])}
    batch = make_batch([[1.0, 2.0]], [1], [0.3], [[-1.0, 1.0]], [0.9], [True])
    shared = jax.grad(lambda p: dqn.loss(p, p, linear_q, batch)[0])(params)
    frozen_copy = jax.tree.map(jnp.array, params)
    separate = jax.grad(lambda p: dqn.loss(p, frozen_copy, linear_q, batch)[0])(params)
    jax.tree.map(np.testing.assert_allclose, shared, separate)


@pytest.mark.parametrize("double", [False, True])
def test_loss_is_masked_by_valid(double):
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    target_params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
    obs = rng.normal(size=(6, 3))
    next_obs = rng.normal(size=(6, 3))
    action = np.array([0, 1, 2, 3, 0, 1])
    reward = np.array([1.0, -1.0, 0.5, 0.0, 2.0, 1.0])
    discount = np.full(6, 0.99)
    valid = np.array([True, False, True, True, False, True])

    @jax.jit
    def loss_and_grad(batch):
        fn = lambda p: dqn.loss(p, target_params, linear_q, batch, double=double, huber_delta=2.0)[0]
        return jax.value_and_grad(fn)(params)

    full = loss_and_grad(make_batch(obs, action, reward, next_obs, discount, valid))
    only_valid = loss_and_grad(
        make_batch(obs[valid], action[valid], reward[valid], next_obs[valid], discount[valid], valid[valid])
    )
    # Garbage (even NaN) in the invalid rows changes nothing.
    garbage_next, garbage_reward = next_obs.copy(), reward.copy()
    garbage_next[~valid], garbage_reward[~valid] = np.nan, 1e9
    garbage = loss_and_grad(make_batch(obs, action, garbage_reward, garbage_next, discount, valid))
    for other in (only_valid, garbage):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), full, other)
    # No valid transition at all: loss 0, gradient 0 (not NaN).
    none_valid = loss_and_grad(make_batch(obs, action, reward, next_obs, discount, np.zeros(6, bool)))
    assert float(none_valid[0]) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(none_valid[1]))


def test_double_flag_switches_the_target():
    params = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]]), "b": jnp.zeros(2)}  # online prefers action 0
    target_params = {"w": jnp.array([[0.0, 0.0], [0.0, 5.0]]), "b": jnp.zeros(2)}  # target: q = [0, 5]
    batch = make_batch([[1.0, 1.0]], [0], [1.0], [[1.0, 1.0]], [0.5], [True])
    _, plain = dqn.loss(params, target_params, linear_q, batch, double=False)
    _, double = dqn.loss(params, target_params, linear_q, batch, double=True)
    np.testing.assert_allclose(plain["target_mean"], 1 + 0.5 * 5)
    np.testing.assert_allclose(double["target_mean"], 1 + 0.5 * 0)


def test_epsilon_greedy():
    q = jnp.array([[0.0, 2.0, 1.0]] * 6000)
    epsilon_greedy = jax.jit(dqn.epsilon_greedy)
    greedy = epsilon_greedy(q, 0.0, jax.random.key(0))
    assert greedy.dtype == jnp.int32 and np.all(np.asarray(greedy) == 1)
    random = np.asarray(epsilon_greedy(q, 1.0, jax.random.key(1)))
    np.testing.assert_allclose(np.bincount(random, minlength=3) / len(random), [1 / 3] * 3, atol=0.03)
    # ε = 0.3: greedy with probability 0.7 + 0.3/3.
    mixed = np.asarray(epsilon_greedy(q, jnp.float32(0.3), jax.random.key(2)))
    np.testing.assert_allclose(np.mean(mixed == 1), 0.8, atol=0.02)
    # Per-row ε.
    per_row = np.asarray(dqn.epsilon_greedy(q[:4], jnp.array([0.0, 0.0, 0.0, 0.0]), jax.random.key(3)))
    np.testing.assert_array_equal(per_row, [1, 1, 1, 1])


def test_clip_reward():
    np.testing.assert_array_equal(dqn.clip_reward(jnp.array([-7.0, -0.1, 0.0, 0.2, 21.0])), [-1, -1, 0, 1, 1])


def test_polyak_update():
    target = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
    online = {"w": jnp.array([3.0, -2.0]), "b": jnp.array(0.5)}
    hard = dqn.polyak_update(target, online, 1.0)
    jax.tree.map(np.testing.assert_array_equal, hard, online)  # bit-exact copy
    soft = jax.jit(dqn.polyak_update)(target, online, jnp.float32(0.25))
    np.testing.assert_allclose(soft["w"], [1.5, 1.0])
    np.testing.assert_allclose(soft["b"], 3.125)
    jax.tree.map(np.testing.assert_array_equal, dqn.polyak_update(target, online, 0.0), target)


def test_linear_schedule():
    epsilon = schedules.linear(1.0, 0.1, 100)
    values = [float(epsilon(step)) for step in (0, 25, 100, 1000)]
    np.testing.assert_allclose(values, [1.0, 0.775, 0.1, 0.1], rtol=1e-6)
    assert float(epsilon(100)) == np.float32(0.1)  # the end is reached exactly
    # Hyperparameters as arrays: a sweep is a vmap over them, inside jit.
    sweep = jax.jit(jax.vmap(lambda end, step: schedules.linear(1.0, end, 10)(step), in_axes=(0, None)))
    np.testing.assert_allclose(sweep(jnp.array([0.0, 0.5]), 5), [0.5, 0.75])
    np.testing.assert_allclose(schedules.constant(0.3)(12345), 0.3)
    with pytest.raises(ValueError, match="duration"):
        schedules.linear(1.0, 0.1, 0)


def test_loss_squared_error_when_huber_delta_is_none():
    """``huber_delta=None`` is ½·td² (the classic-control default); Huber equals it inside ±δ."""
    obs = jnp.eye(3, dtype=jnp.float32)
    params = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])}
    apply = lambda p, o: o @ p["w"]
    batch = Transition(obs=obs, action=jnp.array([0, 1, 0]), reward=jnp.array([1.0, 0.0, 5.0]),
                              next_obs=obs, discount=jnp.array([0.0, 0.0, 0.0]), valid=jnp.array([True, True, True]))
    td = np.array([1.0 - 1.0, 2.0 - 0.0, 3.0 - 5.0])
    got = float(dqn.loss(params, params, apply, batch, huber_delta=None)[0])
    np.testing.assert_allclose(got, np.mean(0.5 * td**2), rtol=1e-6)
    big = float(dqn.loss(params, params, apply, batch, huber_delta=10.0)[0])
    np.testing.assert_allclose(big, got, rtol=1e-6)
