"""Tests of jaxdp.agents.a2c: n-step returns (termination, truncation, fake steps), GAE, the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp.agents import a2c
from jaxdp.agents.a2c import Rollout


def linear_actor_critic(params, obs):
    """logits[B, A] = obs @ w_pi, value[B] = obs @ w_v."""
    return obs @ params["w_pi"], obs @ params["w_v"]


def test_nstep_returns_hand_computed():
    gamma = 0.5
    # Columns: 0 no episode end; 1 terminated at t=1 (t=2 is the fake auto-reset step); 2 truncated at
    # t=1; 3 terminated and truncated at t=1 (termination wins: no bootstrap).
    rewards = jnp.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    terminated = jnp.array([[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    truncated = jnp.array([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    # next_values[t] = V(o_{t+1}); row 1 holds V of the final observations (10), row 3 the bootstrap (8).
    next_values = jnp.array([[-1.0] * 4, [10.0] * 4, [-1.0] * 4, [8.0] * 4])
    expected = np.array(
        [
            # G3 = 4 + .5*8 = 8, G2 = 3 + .5*8 = 7, G1 = 2 + .5*7 = 5.5, G0 = 1 + .5*5.5 = 3.75
            [3.75, 1 + 0.5 * 2, 1 + 0.5 * 7, 1 + 0.5 * 2],
            # terminated: G1 = 2; truncated: G1 = 2 + .5*10 = 7
            [5.5, 2.0, 7.0, 2.0],
            # fake steps (reward 0) continue into the next episode; they are masked by `valid` anyway
            [7.0, 4.0, 4.0, 4.0],
            [8.0, 8.0, 8.0, 8.0],
        ]
    )
    returns = a2c.nstep_returns(rewards, terminated, truncated, next_values, gamma)
    np.testing.assert_allclose(returns, expected, rtol=1e-6)
    assert returns.dtype == jnp.float32


def random_rollout_arrays(seed, time=12, envs=5):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(time, envs)).astype(np.float32)
    terminated = rng.random((time, envs)) < 0.15
    truncated = rng.random((time, envs)) < 0.1
    values = rng.normal(size=(time + 1, envs)).astype(np.float32)  # V(o_0) .. V(o_T)
    return rewards, terminated, truncated, values[:-1], values[1:]


def test_gae_lambda_one_equals_nstep_and_lambda_zero_is_one_step_td():
    gamma = 0.9
    rewards, terminated, truncated, values, next_values = random_rollout_arrays(0)
    assert terminated.any() and truncated.any()
    nstep = a2c.nstep_returns(rewards, terminated, truncated, next_values, gamma)
    advantages, returns = a2c.gae(rewards, terminated, truncated, values, next_values, gamma, 1.0)
    np.testing.assert_allclose(returns, nstep, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(advantages, nstep - values, rtol=1e-5, atol=1e-5)
    td_advantage, _ = a2c.gae(rewards, terminated, truncated, values, next_values, gamma, 0.0)
    one_step = rewards + gamma * np.where(terminated, 0.0, next_values) - values
    np.testing.assert_allclose(td_advantage, one_step, rtol=1e-6, atol=1e-6)


def test_next_values_shift():
    rollout = Rollout(
        obs=jnp.zeros((3, 2, 1)), action=jnp.zeros((3, 2), jnp.int32), reward=jnp.zeros((3, 2)),
        terminated=jnp.zeros((3, 2), bool), truncated=jnp.zeros((3, 2), bool), valid=jnp.ones((3, 2), bool),
        value=jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), bootstrap_value=jnp.array([7.0, 8.0]),
    )
    np.testing.assert_array_equal(a2c.next_values(rollout), [[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])


def one_step_rollout(reward):
    """One env, one terminating step from obs [1] with action 0."""
    return Rollout(
        obs=jnp.ones((1, 1, 1)), action=jnp.zeros((1, 1), jnp.int32), reward=jnp.full((1, 1), reward),
        terminated=jnp.ones((1, 1), bool), truncated=jnp.zeros((1, 1), bool), valid=jnp.ones((1, 1), bool),
        value=jnp.zeros((1, 1)), bootstrap_value=jnp.zeros(1),
    )


def test_gradient_step_follows_the_advantage():
    params = {"w_pi": jnp.zeros((1, 3)), "w_v": jnp.zeros(1)}
    optimizer = optax.sgd(0.1)

    def after_one_step(reward):
        rollout = one_step_rollout(reward)
        grads, _ = jax.grad(a2c.loss, has_aux=True)(params, linear_actor_critic, rollout, gamma=0.99, ent_coef=0.0)
        updates, _ = optimizer.update(grads, optimizer.init(params))
        return optax.apply_updates(params, updates)

    def log_prob_and_value(p):
        logits, value = linear_actor_critic(p, jnp.ones((1, 1)))
        return float(jax.nn.log_softmax(logits)[0, 0]), float(value[0])

    before, _ = log_prob_and_value(params)
    up, value_up = log_prob_and_value(after_one_step(1.0))  # advantage 1 - 0 > 0
    down, value_down = log_prob_and_value(after_one_step(-1.0))  # advantage < 0
    assert up > before > down
    assert value_up > 0 > value_down  # the critic moves towards G


def test_loss_matches_the_formula_and_ignores_fake_steps():
    time, envs, dim, actions, gamma = 6, 3, 4, 3, 0.9
    rewards, terminated, truncated, values, next_values = random_rollout_arrays(1, time, envs)
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(time, envs, dim)).astype(np.float32)
    action = rng.integers(0, actions, size=(time, envs)).astype(np.int32)
    valid = np.ones((time, envs), bool)
    valid[2, 0] = valid[4, 1] = False
    terminated[1, 0] = terminated[3, 1] = True  # the invalid steps follow a done
    params = {"w_pi": rng.normal(size=(dim, actions)).astype(np.float32),
              "w_v": rng.normal(size=(dim,)).astype(np.float32)}
    rollout = jax.tree.map(jnp.asarray, Rollout(obs, action, rewards, terminated, truncated, valid, values,
                                                next_values[-1]))

    total, metrics = jax.jit(a2c.loss, static_argnums=1)(params, linear_actor_critic, rollout, gamma=gamma,
                                                         ent_coef=0.01, vf_coef=0.5)
    # The same quantities with numpy, over the valid steps only.
    returns = np.asarray(a2c.nstep_returns(rewards, terminated, truncated, a2c.next_values(rollout), gamma))
    logits = np.asarray(obs) @ np.asarray(params["w_pi"])
    value = np.asarray(obs) @ np.asarray(params["w_v"])
    log_pi = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    taken = np.take_along_axis(log_pi, np.asarray(action)[..., None], -1)[..., 0]
    mask = np.asarray(valid)
    advantage = returns - value
    policy_loss = -np.mean((taken * advantage)[mask])
    value_loss = np.mean((advantage**2)[mask])
    ent = np.mean((-(np.exp(log_pi) * log_pi).sum(-1))[mask])
    np.testing.assert_allclose(metrics["policy_loss"], policy_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["value_loss"], value_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy"], ent, rtol=1e-5)
    np.testing.assert_allclose(total, policy_loss + 0.5 * value_loss - 0.01 * ent, rtol=1e-5)

    # The fake steps' actions, rewards and observations do not matter.
    changed = rollout._replace(
        action=rollout.action.at[2, 0].set(2).at[4, 1].set(0),
        reward=rollout.reward.at[2, 0].set(100.0).at[4, 1].set(-100.0),
        obs=rollout.obs.at[2, 0].set(50.0),
    )
    grad_fn = jax.jit(jax.grad(lambda p, r: a2c.loss(p, linear_actor_critic, r, gamma=gamma)[0]))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        grad_fn(params, rollout),
        grad_fn(params, changed),
    )


def test_loss_with_gae_lambda_one_equals_nstep_loss():
    rewards, terminated, truncated, values, next_values = random_rollout_arrays(2, 5, 2)
    obs = np.random.default_rng(2).normal(size=(5, 2, 3)).astype(np.float32)
    rollout = Rollout(obs, np.zeros((5, 2), np.int32), rewards, terminated, truncated, np.ones((5, 2), bool),
                      values, next_values[-1])
    params = {"w_pi": jnp.ones((3, 2)), "w_v": jnp.ones(3)}
    loss_fn = jax.jit(a2c.loss, static_argnums=1, static_argnames="gae_lambda")
    nstep, _ = loss_fn(params, linear_actor_critic, rollout, gamma=0.9)
    with_gae, _ = loss_fn(params, linear_actor_critic, rollout, gamma=0.9, gae_lambda=1.0)
    np.testing.assert_allclose(nstep, with_gae, rtol=1e-5)


def test_sample_action_follows_the_softmax():
    logits = jnp.log(jnp.array([[0.2, 0.5, 0.3]] * 20000))
    actions = a2c.sample_action(logits, jax.random.key(0))
    assert actions.dtype == jnp.int32 and actions.shape == (20000,)
    np.testing.assert_allclose(np.bincount(np.asarray(actions), minlength=3) / 20000, [0.2, 0.5, 0.3], atol=0.015)
