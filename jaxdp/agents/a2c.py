"""Advantage actor-critic (A2C) as pure functions: n-step returns, GAE(λ), the loss, action sampling.

The network is passed as ``apply_fn(params, obs) -> (logits[B, A], value[B])`` (a Flax ActorCritic's
``apply``). A rollout is ``T`` steps of ``E`` envs (:class:`Rollout`), collected by ``lax.scan``.

n-step returns, with ``done = terminated | truncated`` and ``V(o_{t+1})`` the value of the observation
returned by step ``t``::

    G_t = r_t + γ · [ (1 − done_t) · G_{t+1} + truncated_t · (1 − terminated_t) · V(o_{t+1}) ]
    G_T = V(o_T)   (the bootstrap after the last step)

Why: a *terminated* episode has no future, so nothing is bootstrapped; a *truncated* one (time limit)
does have a future that the rollout does not show, so it is bootstrapped from its final observation
``o_{t+1}`` -- with envpool that observation is returned by the done step itself, so its value is at
hand; and a step whose episode goes on continues with ``G_{t+1}``. envpool's auto-reset adds a fake
step after every done (its action is ignored, its reward is 0); the recursion never reads through it
because the step before it is done, and its own loss terms are masked out by ``valid``.

The loss (Mnih et al. 2016), with masked means over ``valid`` steps::

    A_t = G_t − V(o_t)                      (G under stop_gradient)
    policy_loss = −mean(log π(a_t | o_t) · stop_gradient(A_t))
    value_loss  = mean(A_t²)
    loss = policy_loss + vf_coef · value_loss − ent_coef · mean(entropy(π(· | o_t)))

Example:
    >>> import jax.numpy as jnp
    >>> rewards = jnp.array([[1.0], [1.0]])
    >>> no = jnp.zeros((2, 1), bool)
    >>> nstep_returns(rewards, no, no, next_values=jnp.array([[0.0], [10.0]]), gamma=0.5)
    Array([[4.],
           [6.]], dtype=float32)
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxdp.agents.dqn import masked_mean

ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


class Rollout(NamedTuple):
    """``T`` steps of ``E`` envs, time-major. Step ``t`` acts in ``obs[t]``.

    The loop fills the ``[T, E]`` fields from a ``lax.scan`` over env steps (each step emits one slice)
    and sets ``bootstrap_value`` after the scan.

    Attributes:
        obs: ``[T, E, *obs_shape]`` observation the action was taken in.
        action: ``[T, E]`` int32.
        reward: ``[T, E]`` reward of the step.
        terminated: ``[T, E]`` bool, the step ended the episode (no bootstrap).
        truncated: ``[T, E]`` bool, the step hit a time limit (bootstrap from the final observation).
        valid: ``[T, E]`` bool, False for envpool's fake auto-reset step: ``valid[t] = not first`` of the
            observation that step ``t`` returned.
        value: ``[T, E]`` ``V(obs[t])`` computed while acting (needed by A2C; unused by REINFORCE).
        bootstrap_value: ``[E]`` ``V`` of the observation returned by the last step (A2C only).
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    valid: jax.Array
    value: jax.Array | None = None
    bootstrap_value: jax.Array | None = None


def next_values(rollout: Rollout) -> jax.Array:
    """``[T, E]`` values of the observations returned by each step: ``V(o_{t+1})``.

    Step ``t`` returns the observation that step ``t + 1`` acts in (also after a done: envpool returns
    the final observation, and the fake step acts in it), so this is ``value`` shifted by one, with
    ``bootstrap_value`` last.
    """
    if rollout.value is None or rollout.bootstrap_value is None:
        raise ValueError("a2c: rollout.value and rollout.bootstrap_value must be set")
    return jnp.concatenate([rollout.value[1:], rollout.bootstrap_value[None]], axis=0)


def _check_time_major(*arrays: jax.Array) -> None:
    chex.assert_rank(arrays[0], 2)
    chex.assert_shape(arrays, arrays[0].shape)


def nstep_returns(
    rewards: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    next_values: jax.Array,
    gamma: float | jax.Array,
) -> jax.Array:
    """n-step (to the end of the rollout) bootstrapped returns ``G[T, E]``, see the module docstring.

    Args:
        rewards: ``[T, E]``.
        terminated: ``[T, E]`` bool.
        truncated: ``[T, E]`` bool.
        next_values: ``[T, E]`` ``V(o_{t+1})``, the value of the observation returned by step ``t``
            (the last row is the bootstrap value).
        gamma: discount factor (may be traced).

    Returns:
        ``[T, E]`` float32 returns.
    """
    _check_time_major(rewards, terminated, truncated, next_values)
    terminated = terminated.astype(bool)
    truncated = truncated.astype(bool)
    done = terminated | truncated
    bootstrap = truncated & ~terminated

    def backward(future_return, step):
        reward, done_, bootstrap_, next_value = step
        future = jnp.where(done_, 0.0, future_return) + jnp.where(bootstrap_, next_value, 0.0)
        g = reward + gamma * future
        return g, g

    _, returns = jax.lax.scan(
        backward,
        next_values[-1].astype(jnp.float32),
        (rewards.astype(jnp.float32), done, bootstrap, next_values.astype(jnp.float32)),
        reverse=True,
    )
    return returns


def gae(
    rewards: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) with the same episode handling.

    ``δ_t = r_t + γ (1 − terminated_t) V(o_{t+1}) − V(o_t)``, ``A_t = δ_t + γλ (1 − done_t) A_{t+1}``,
    ``A_T = 0``; returns ``A + V``. With ``λ = 1`` (and ``next_values[t] = values[t + 1]`` where the
    episode goes on) the returns equal :func:`nstep_returns`.

    Args:
        rewards, terminated, truncated: ``[T, E]``.
        values: ``[T, E]`` ``V(o_t)``.
        next_values: ``[T, E]`` ``V(o_{t+1})``.
        gamma: discount factor.
        lam: λ in [0, 1].

    Returns:
        ``(advantages, returns)``, both ``[T, E]``.
    """
    _check_time_major(rewards, terminated, truncated, values, next_values)
    terminated = terminated.astype(bool)
    done = terminated | truncated.astype(bool)
    values = values.astype(jnp.float32)
    deltas = rewards + gamma * jnp.where(terminated, 0.0, next_values.astype(jnp.float32)) - values

    def backward(future_advantage, step):
        delta, done_ = step
        advantage = delta + gamma * lam * jnp.where(done_, 0.0, future_advantage)
        return advantage, advantage

    _, advantages = jax.lax.scan(
        backward, jnp.zeros_like(deltas[0]), (deltas.astype(jnp.float32), done), reverse=True
    )
    return advantages, advantages + values


def log_prob(logits: jax.Array, action: jax.Array) -> jax.Array:
    """``log π(action)`` under the categorical ``softmax(logits)``; ``logits[..., A]``, ``action[...]``."""
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_pi, action.astype(jnp.int32)[..., None], axis=-1)[..., 0]


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the categorical ``softmax(logits)`` over the last axis."""
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1)


def evaluate(apply_fn: ApplyFn, params: Any, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Applies the network to ``obs[T, E, ...]`` as one batch of ``T·E``: ``(logits[T, E, A], value[T, E])``."""
    time, envs = obs.shape[:2]
    logits, value = apply_fn(params, obs.reshape(time * envs, *obs.shape[2:]))
    chex.assert_rank(logits, 2)
    chex.assert_shape(value, (time * envs,))
    return logits.reshape(time, envs, -1), value.reshape(time, envs)


def loss(
    params: Any,
    apply_fn: ApplyFn,
    rollout: Rollout,
    *,
    gamma: float | jax.Array,
    ent_coef: float | jax.Array = 0.01,
    vf_coef: float | jax.Array = 0.5,
    gae_lambda: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The A2C loss of a rollout (see the module docstring).

    Args:
        params: actor-critic parameters (differentiated).
        apply_fn: ``apply_fn(params, obs[B, ...]) -> (logits[B, A], value[B])``.
        rollout: a :class:`Rollout` with ``value`` and ``bootstrap_value`` set.
        gamma: discount factor.
        ent_coef: weight of the entropy bonus.
        vf_coef: weight of the value loss.
        gae_lambda: ``None`` uses :func:`nstep_returns`; a λ uses the GAE(λ) returns (λ = 1 gives the
            same returns).

    Returns:
        ``(loss, metrics)`` with ``loss``, ``policy_loss``, ``value_loss``, ``entropy``,
        ``advantage_mean``, ``return_mean``, ``valid_fraction``.

    Example:
        >>> grads, metrics = jax.grad(loss, has_aux=True)(params, net.apply, rollout, gamma=0.99)  # doctest: +SKIP
    """
    _check_time_major(rollout.reward, rollout.terminated, rollout.truncated, rollout.valid, rollout.action)
    following_values = next_values(rollout)
    if gae_lambda is None:
        returns = nstep_returns(rollout.reward, rollout.terminated, rollout.truncated, following_values, gamma)
    else:
        _, returns = gae(
            rollout.reward, rollout.terminated, rollout.truncated, rollout.value, following_values, gamma,
            gae_lambda,
        )
    returns = jax.lax.stop_gradient(returns)
    logits, value = evaluate(apply_fn, params, rollout.obs)
    advantage = returns - value
    valid = rollout.valid.astype(bool)
    policy_loss = -masked_mean(log_prob(logits, rollout.action) * jax.lax.stop_gradient(advantage), valid)
    value_loss = masked_mean(advantage**2, valid)
    mean_entropy = masked_mean(entropy(logits), valid)
    total = policy_loss + vf_coef * value_loss - ent_coef * mean_entropy
    metrics = {
        "loss": total,
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": mean_entropy,
        "advantage_mean": masked_mean(advantage, valid),
        "return_mean": masked_mean(returns, valid),
        "valid_fraction": jnp.mean(valid.astype(jnp.float32)),
    }
    return total, metrics


def sample_action(logits: jax.Array, key: jax.Array) -> jax.Array:
    """Samples ``a ~ softmax(logits)`` over the last axis: ``[..., A] -> [...]`` int32."""
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
