"""Environments: envpool (Atari ``*-v5``, classic control) first, gymnasium as the fallback.

* :func:`validate_env_id`, :func:`make_spec`, :class:`EnvSpec` -- what an id is, without a pool; games that
  observe one integer state (FrozenLake, Taxi) are delivered one-hot (:func:`one_hot_observations`);
* :class:`HostEnv` / :func:`make_host` -- a pool stepped from Python (sync, or async send/recv);
* :func:`make_xla` / :class:`XlaEnv` -- envpool stepped inside ``jit`` / ``lax.scan`` / ``vmap``,
  with lanes for seed sweeps;
* :class:`Step` -- one batched transition (raw reward, terminated, truncated, game_over, first);
* :class:`EpisodeStats`, :func:`episode_stats_init`, :func:`episode_stats_update` -- returns and
  lengths of the real game (all lives), as pure functions.

This package knows nothing of agents or of distribution. The semantics (auto-reset, episodic life,
seeding, validation), measured on envpool 1.2.5, are stated in :mod:`jaxdp.envs.host`.
"""

from jaxdp.envs.host import HostEnv, make_host
from jaxdp.envs.spec import (
    ATARI_SETTINGS,
    EnvSpec,
    Step,
    backend_of,
    make_spec,
    one_hot_observations,
    validate_env_id,
)
from jaxdp.envs.stats import EpisodeStats, episode_stats_init, episode_stats_update
from jaxdp.envs.xla import XlaEnv, XlaHandle, make_xla

__all__ = [
    "ATARI_SETTINGS",
    "EnvSpec",
    "EpisodeStats",
    "HostEnv",
    "Step",
    "XlaEnv",
    "XlaHandle",
    "backend_of",
    "episode_stats_init",
    "episode_stats_update",
    "make_host",
    "make_spec",
    "make_xla",
    "one_hot_observations",
    "validate_env_id",
]
