"""Pure RL functions: targets, losses, action selection and the replay buffer.

One module per algorithm -- :mod:`~jaxdp.agents.dqn` (DQN and Double DQN), :mod:`~jaxdp.agents.a2c`,
:mod:`~jaxdp.agents.reinforce` -- plus :mod:`~jaxdp.agents.replay` (device-side ring buffer) and
:mod:`~jaxdp.agents.schedules`. Networks come in as ``apply_fn(params, obs)``; environments as arrays.
Nothing here knows about distribution (strategies, runtimes) or about envpool.
"""

from jaxdp.agents import a2c, dqn, reinforce, replay, schedules
from jaxdp.agents.a2c import Rollout
from jaxdp.agents.replay import ReplayBuffer, Transition

__all__ = ["a2c", "dqn", "reinforce", "replay", "schedules", "Rollout", "ReplayBuffer", "Transition"]
