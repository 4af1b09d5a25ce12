"""DQN and Double DQN as pure functions: TD targets, the masked Huber loss, ε-greedy, target updates.

The network is passed as ``apply_fn(params, obs) -> q[B, A]`` (a Flax ``module.apply``). Batches are
:class:`jaxdp.agents.replay.Transition` s, whose ``reward`` is the (n-step) discounted reward sum and
whose ``discount`` already is ``γ^k · (1 − terminated)``. So with ``done`` the termination (not the time
limit: a truncated episode still bootstraps from its final observation) the targets are::

    DQN:         y = r + γ (1 − done) max_a' Q(s', a'; θ⁻)
    Double DQN:  y = r + γ (1 − done) Q(s', argmax_a' Q(s', a'; θ); θ⁻)

and the loss is the Huber loss of ``Q(s, a; θ) − y`` (the "error clipping" of Mnih et al. 2015), with
``y`` under ``stop_gradient`` (a semi-gradient), averaged over the transitions with ``valid`` set.

The replay/target ablation of the lecture: without a target network the caller passes
``target_params=params`` (the target then moves with every step); without replay it feeds the most
recent transitions instead of a sampled batch. Neither needs a change here.

Example:
    >>> import jax.numpy as jnp
    >>> td_target(jnp.array([[1.0, 3.0]]), jnp.array([1.0]), jnp.array([0.5]))
    Array([2.5], dtype=float32)
"""

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from jaxdp.agents.replay import Transition

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def td_target(q_next_target: jax.Array, reward: jax.Array, discount: jax.Array) -> jax.Array:
    """DQN target ``reward + discount · max_a' q_next_target[:, a']``.

    Args:
        q_next_target: ``[B, A]`` target-network values of the next observation.
        reward: ``[B]`` (n-step discounted) rewards.
        discount: ``[B]`` ``γ^k · (1 − terminated)``.

    Returns:
        ``[B]`` targets.
    """
    chex.assert_rank(q_next_target, 2)
    chex.assert_shape([reward, discount], q_next_target.shape[:1])
    return reward + discount * jnp.max(q_next_target, axis=-1)


def double_td_target(
    q_next_online: jax.Array, q_next_target: jax.Array, reward: jax.Array, discount: jax.Array
) -> jax.Array:
    """Double DQN target: the online network picks ``a* = argmax q_next_online``, the target network
    evaluates it: ``reward + discount · q_next_target[:, a*]`` (van Hasselt et al. 2016).

    Args:
        q_next_online: ``[B, A]`` online-network values of the next observation.
        q_next_target: ``[B, A]`` target-network values of the next observation.
        reward: ``[B]``.
        discount: ``[B]``.

    Returns:
        ``[B]`` targets.
    """
    chex.assert_rank(q_next_online, 2)
    chex.assert_equal_shape([q_next_online, q_next_target])
    chex.assert_shape([reward, discount], q_next_target.shape[:1])
    best = jnp.argmax(q_next_online, axis=-1)
    return reward + discount * jnp.take_along_axis(q_next_target, best[:, None], axis=-1)[:, 0]


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x`` over the entries where ``mask`` is set (0 when none is); NaNs outside are ignored."""
    mask = jnp.broadcast_to(mask, x.shape)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def loss(
    params: Any,
    target_params: Any,
    apply_fn: ApplyFn,
    batch: Transition,
    *,
    double: bool = False,
    huber_delta: float | None = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The (Double) DQN loss: masked mean Huber loss of the TD error.

    Args:
        params: online-network parameters (differentiated).
        target_params: target-network parameters θ⁻; pass ``params`` to train without a target network
            (the lecture's ablation; the target is still under ``stop_gradient``).
        apply_fn: ``apply_fn(params, obs) -> q[B, A]``.
        batch: a :class:`Transition` batch; transitions with ``valid = False`` do not count.
        double: Double DQN target (``double`` is static: a Python bool).
        huber_delta: the Huber threshold δ (quadratic within ±δ, linear outside); ``None`` for the squared
            error ``½·td²``. Huber (Mnih et al. 2015's error clipping) suits clipped Atari rewards; on
            classic control with γ = 0.99 it lets Q drift upward, because the few terminal transitions that
            anchor Q pull with a force capped at δ while every bootstrapped one pushes up (measured here on
            CartPole: Q ≈ 3,400 after 3,000 updates with Huber vs ≈ 37 with the squared error), so
            jaxdp uses the squared error there, as CleanRL does.

    Returns:
        ``(loss, metrics)`` with metrics ``loss``, ``td_error_abs``, ``q_mean``, ``target_mean``,
        ``valid_fraction`` (means over valid transitions).

    Example:
        >>> (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(  # doctest: +SKIP
        ...     params, target_params, q_network.apply, batch, double=True)
    """
    q = apply_fn(params, batch.obs)
    chex.assert_rank(q, 2)
    chex.assert_shape([batch.action, batch.reward, batch.discount, batch.valid], q.shape[:1])
    q_taken = jnp.take_along_axis(q, batch.action.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    q_next_target = apply_fn(target_params, batch.next_obs)
    if double:
        target = double_td_target(apply_fn(params, batch.next_obs), q_next_target, batch.reward, batch.discount)
    else:
        target = td_target(q_next_target, batch.reward, batch.discount)
    target = jax.lax.stop_gradient(target)
    # Zeroing invalid rows before the Huber keeps garbage there (even NaN) out of the gradient too.
    td_error = jnp.where(batch.valid, q_taken - target, 0.0)
    if huber_delta is None:
        per_sample = 0.5 * td_error**2
    else:
        per_sample = optax.losses.huber_loss(td_error, delta=huber_delta)
    value = masked_mean(per_sample, batch.valid)
    metrics = {
        "loss": value,
        "td_error_abs": masked_mean(jnp.abs(td_error), batch.valid),
        "q_mean": masked_mean(q_taken, batch.valid),
        "target_mean": masked_mean(target, batch.valid),
        "valid_fraction": jnp.mean(batch.valid.astype(jnp.float32)),
    }
    return value, metrics


def epsilon_greedy(q_values: jax.Array, epsilon: float | jax.Array, key: jax.Array) -> jax.Array:
    """With probability ``epsilon`` a uniformly random action, else ``argmax q``.

    Args:
        q_values: ``[B, A]``.
        epsilon: scalar or ``[B]`` exploration rate in [0, 1].
        key: PRNG key.

    Returns:
        ``[B]`` int32 actions.
    """
    chex.assert_rank(q_values, 2)
    batch, num_actions = q_values.shape
    key_explore, key_action = jax.random.split(key)
    explore = jax.random.uniform(key_explore, (batch,)) < epsilon
    random_action = jax.random.randint(key_action, (batch,), 0, num_actions, dtype=jnp.int32)
    return jnp.where(explore, random_action, jnp.argmax(q_values, axis=-1).astype(jnp.int32))


def clip_reward(reward: jax.Array) -> jax.Array:
    """``sign(reward)``: the Atari reward clipping of Mnih et al. (2015), one scale for all games."""
    return jnp.sign(reward)


def polyak_update(target_params: Any, online_params: Any, tau: float | jax.Array) -> Any:
    """``τ · online + (1 − τ) · target``, leaf by leaf. ``tau = 1`` copies the online parameters (the hard
    update every C steps of DQN; the caller decides when), ``tau ≪ 1`` tracks them slowly."""
    return optax.incremental_update(online_params, target_params, tau)
