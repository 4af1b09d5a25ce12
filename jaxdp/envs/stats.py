"""Episode statistics of the *real* game, as pure (jittable) functions.

The return of an episode is the sum of the raw (unclipped) rewards of every step from the start of
a game to the step with :attr:`~jaxdp.envs.Step.game_over`; with episodic life on, that is the sum
over all lives, not the return of the last life. The length is the number of agent steps that acted
on that game: every step except the auto-reset steps (:attr:`~jaxdp.envs.Step.first`), whose action
the environment ignores. For envpool this equals envpool's own ``elapsed_step`` at the end of the
game (a life-loss reset does not advance it either), and the time limit (27 000 for Atari) bounds it.

Works on the host (numpy steps) and inside ``jit`` / ``lax.scan`` / ``vmap`` alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxdp.envs.spec import Step


class EpisodeStats(NamedTuple):
    """Per-env accumulators of the game in progress.

    Attributes:
      returns: float32 ``(num_envs,)``, raw return so far.
      lengths: int32 ``(num_envs,)``, agent steps so far (auto-reset steps not counted).
    """

    returns: jax.Array
    lengths: jax.Array


def episode_stats_init(num_envs: int) -> EpisodeStats:
    """Returns zeroed accumulators for ``num_envs`` environments.

    Example:
      >>> episode_stats_init(3).lengths
      Array([0, 0, 0], dtype=int32)
    """
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"episode_stats_init: num_envs must be an int >= 1, got {num_envs!r}")
    return EpisodeStats(jnp.zeros(num_envs, jnp.float32), jnp.zeros(num_envs, jnp.int32))


def episode_stats_update(
    stats: EpisodeStats, step: Step, env_ids: Any = None
) -> tuple[EpisodeStats, jax.Array, jax.Array, jax.Array]:
    """Adds one step to the accumulators and reports the games that ended with it.

    Args:
      stats: the accumulators.
      step: a :class:`Step` for all envs, or for the envs ``env_ids`` (asynchronous host mode).
      env_ids: optional int ``(batch,)``: which envs ``step`` is for (as returned by
        ``HostEnv.recv``). None: ``step`` covers every env, in order.

    Returns:
      ``(stats, finished, returns, lengths)``: the new accumulators (reset where a game ended);
      bool ``finished`` (the game of that env ended at this step); float32 ``returns`` and int32
      ``lengths`` of those games, 0 where ``finished`` is False. The three outputs have the leading
      shape of ``step.reward``. The mean return of the games that ended is
      ``returns.sum() / max(finished.sum(), 1)``.

    Example:
      >>> stats = episode_stats_init(2)
      >>> step = Step(obs=None, reward=jnp.array([1.0, 2.0]), terminated=jnp.array([True, False]),
      ...             truncated=jnp.array([False, False]), game_over=jnp.array([True, False]),
      ...             first=jnp.array([False, False]))
      >>> stats, finished, returns, lengths = episode_stats_update(stats, step)
      >>> finished.tolist(), returns.tolist(), lengths.tolist(), stats.returns.tolist()
      ([True, False], [1.0, 0.0], [1, 0], [0.0, 2.0])
    """
    reward = jnp.asarray(step.reward, jnp.float32)
    first = jnp.asarray(step.first, bool)
    game_over = jnp.asarray(step.game_over, bool)
    chex.assert_equal_shape([reward, first, game_over])
    if env_ids is None:
        chex.assert_equal_shape([reward, stats.returns])
        returns_so_far, lengths_so_far = stats.returns, stats.lengths
    else:
        env_ids = jnp.asarray(env_ids, jnp.int32)
        chex.assert_equal_shape([reward, env_ids])
        returns_so_far, lengths_so_far = stats.returns[env_ids], stats.lengths[env_ids]
    # Auto-reset steps carry reward 0 and their action was ignored: they add nothing. Masking the
    # reward too keeps this exact even for an environment that reports a reset reward.
    returns = returns_so_far + jnp.where(first, 0.0, reward)
    lengths = lengths_so_far + jnp.where(first, 0, 1).astype(jnp.int32)
    new_returns = jnp.where(game_over, 0.0, returns)
    new_lengths = jnp.where(game_over, 0, lengths)
    if env_ids is None:
        new_stats = EpisodeStats(new_returns, new_lengths)
    else:
        new_stats = EpisodeStats(
            stats.returns.at[env_ids].set(new_returns), stats.lengths.at[env_ids].set(new_lengths)
        )
    return (
        new_stats,
        game_over,
        jnp.where(game_over, returns, 0.0),
        jnp.where(game_over, lengths, 0),
    )
