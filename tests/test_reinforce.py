"""Tests of jaxdp.agents.reinforce: returns-to-go, the complete-return mask, the loss and its baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.agents import reinforce
from jaxdp.agents.a2c import Rollout

# Two envs, five steps. Env 0: an episode ends at t=2, the next one is still running at the end.
# Env 1: one episode over the whole rollout.
REWARDS = jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0], [1.0, 0.0], [1.0, 4.0]])
DONES = jnp.array([[0, 0], [0, 0], [1, 0], [0, 0], [0, 1]], bool)
GAMMA = 0.5
EXPECTED_RETURNS = np.array(
    [[1 + 0.5 * 1.5, 0.75], [1 + 0.5 * 1, 1.5], [1.0, 2 + 0.5 * 2], [1 + 0.5 * 1, 0 + 0.5 * 4], [1.0, 4.0]]
)
EXPECTED_COMPLETE = np.array([[1, 1], [1, 1], [1, 1], [0, 1], [0, 1]], bool)


def linear_actor_critic(params, obs):
    return obs @ params["w_pi"], obs @ params["w_v"]


def linear_policy(params, obs):
    return obs @ params["w_pi"]


def test_returns_to_go_hand_computed():
    np.testing.assert_allclose(reinforce.returns_to_go(REWARDS, DONES, GAMMA), EXPECTED_RETURNS, rtol=1e-6)
    np.testing.assert_array_equal(reinforce.complete_mask(DONES), EXPECTED_COMPLETE)


def make_rollout(key, terminated=DONES, truncated=None, valid=None, dim=3, actions=2):
    time, envs = REWARDS.shape
    k_obs, k_act = jax.random.split(key)
    return Rollout(
        obs=jax.random.normal(k_obs, (time, envs, dim)),
        action=jax.random.randint(k_act, (time, envs), 0, actions),
        reward=REWARDS,
        terminated=terminated,
        truncated=jnp.zeros_like(DONES) if truncated is None else truncated,
        valid=jnp.ones_like(DONES) if valid is None else valid,
    )


def numpy_terms(params, rollout):
    logits = np.asarray(rollout.obs) @ np.asarray(params["w_pi"])
    value = np.asarray(rollout.obs) @ np.asarray(params["w_v"])
    log_pi = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    taken = np.take_along_axis(log_pi, np.asarray(rollout.action)[..., None], -1)[..., 0]
    return taken, value


@pytest.mark.parametrize("baseline", ["none", "mean", "value"])
def test_loss_matches_the_formula(baseline):
    rollout = make_rollout(jax.random.key(0))
    params = {"w_pi": jnp.array([[0.5, -0.5], [1.0, 0.0], [0.0, 0.3]]), "w_v": jnp.array([0.2, -0.1, 0.4])}
    total, metrics = reinforce.loss(params, linear_actor_critic, rollout, gamma=GAMMA, baseline=baseline,
                                    vf_coef=0.5)
    taken, value = numpy_terms(params, rollout)
    mask = EXPECTED_COMPLETE
    base = {"none": 0.0, "mean": EXPECTED_RETURNS[mask].mean(), "value": value}[baseline]
    policy_loss = -np.mean((taken * (EXPECTED_RETURNS - base))[mask])
    value_loss = np.mean(((EXPECTED_RETURNS - value) ** 2)[mask]) if baseline == "value" else 0.0
    np.testing.assert_allclose(metrics["policy_loss"], policy_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["value_loss"], value_loss, rtol=1e-5)
    np.testing.assert_allclose(total, policy_loss + 0.5 * value_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["complete_fraction"], mask.mean())


def test_value_baseline_is_fitted_but_not_differentiated_through_the_policy_term():
    rollout = make_rollout(jax.random.key(1))
    params = {"w_pi": jnp.zeros((3, 2)), "w_v": jnp.array([0.2, -0.1, 0.4])}
    grads, _ = jax.grad(reinforce.loss, has_aux=True)(params, linear_actor_critic, rollout, gamma=GAMMA,
                                                      baseline="value", vf_coef=0.5)
    # d/dw_v of 0.5 · mean((R − V)²) only: the baseline term contributes nothing.
    _, value = numpy_terms(params, rollout)
    obs = np.asarray(rollout.obs)[EXPECTED_COMPLETE]
    expected = 0.5 * np.mean(-2 * (EXPECTED_RETURNS - value)[EXPECTED_COMPLETE][:, None] * obs, axis=0)
    np.testing.assert_allclose(grads["w_v"], expected, rtol=1e-5)


@pytest.mark.parametrize("baseline", ["mean", "value"])
def test_incomplete_and_fake_steps_are_masked_out(baseline):
    valid = jnp.ones_like(DONES).at[1, 1].set(False)
    rollout = make_rollout(jax.random.key(2), valid=valid)
    params = {"w_pi": jnp.array([[0.5, -0.5], [1.0, 0.0], [0.0, 0.3]]), "w_v": jnp.array([0.2, -0.1, 0.4])}
    grad_fn = jax.jit(jax.grad(lambda p, r: reinforce.loss(p, linear_actor_critic, r, gamma=GAMMA,
                                                           baseline=baseline)[0]))
    # Env 0 after its episode end (t = 3, 4): no complete return; the fake step (1, 1): action irrelevant.
    changed = rollout._replace(
        reward=rollout.reward.at[3:, 0].set(50.0),
        action=rollout.action.at[3:, 0].set(1 - rollout.action[3:, 0]).at[1, 1].set(1 - rollout.action[1, 1]),
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), grad_fn(params, rollout),
                 grad_fn(params, changed))


def test_truncation_ends_a_return_too():
    truncated = jnp.zeros_like(DONES).at[2, 0].set(True)
    rollout = make_rollout(jax.random.key(3), terminated=DONES.at[2, 0].set(False), truncated=truncated)
    params = {"w_pi": jnp.ones((3, 2)), "w_v": jnp.ones(3)}
    reference = make_rollout(jax.random.key(3))
    for baseline in ("none", "mean", "value"):
        a = reinforce.loss(params, linear_actor_critic, rollout, gamma=GAMMA, baseline=baseline)[0]
        b = reinforce.loss(params, linear_actor_critic, reference, gamma=GAMMA, baseline=baseline)[0]
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_gradient_step_favours_the_rewarded_action():
    # One env: a single step with action 0 and return +1, the episode ends.
    rollout = Rollout(
        obs=jnp.ones((1, 1, 1)), action=jnp.zeros((1, 1), jnp.int32), reward=jnp.ones((1, 1)),
        terminated=jnp.ones((1, 1), bool), truncated=jnp.zeros((1, 1), bool), valid=jnp.ones((1, 1), bool),
    )
    params = {"w_pi": jnp.zeros((1, 2))}
    grads, _ = jax.grad(reinforce.loss, has_aux=True)(params, linear_policy, rollout, gamma=0.9, baseline="none")
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert float(jax.nn.softmax(linear_policy(new, jnp.ones((1, 1))))[0, 0]) > 0.5


def test_bad_baseline_is_named():
    rollout = make_rollout(jax.random.key(4))
    params = {"w_pi": jnp.ones((3, 2)), "w_v": jnp.ones(3)}
    with pytest.raises(ValueError, match="baseline"):
        reinforce.loss(params, linear_actor_critic, rollout, gamma=GAMMA, baseline="critic")
    with pytest.raises(ValueError, match="baseline"):
        reinforce.loss(params, linear_policy, rollout, gamma=GAMMA, baseline="value")
