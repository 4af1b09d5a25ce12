"""What an environment is: its static description (:class:`EnvSpec`), one batched transition
(:class:`Step`), and the id check the CLI runs before any work.

Ids are resolved in this order: envpool's registry (Atari ``*-v5``, classic control, ...), then
gymnasium's. Only discrete action spaces are supported (the agents are DQN / A2C / REINFORCE).

Atari ``*-v5`` ids are configured with the standard DQN preprocessing (Mnih et al. 2015; Machado
et al. 2018 for the time limit), set explicitly here so a change of envpool's defaults cannot change
them (:data:`ATARI_SETTINGS`): 84×84 grey frames, a stack of 4, an action repeat (frame skip) of 4
with max-pooling over the last two frames (envpool does the pooling), 1 to 30 no-ops at the start of
a game, FIRE pressed at reset in games that need it, the minimal action set, a time limit of 27 000
agent steps (108 000 frames), **no** reward clipping in the environment (the agent clips; raw rewards
reach the statistics) and **no** sticky actions (``repeat_action_probability=0``: DQN-standard;
envpool 1.2.5 also defaults to 0 for ``-v5``, unlike gymnasium/ALE's ``-v5`` which uses 0.25).
Episodic life (a life loss ends the *learning* episode) is a flag of the pool constructors.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

# Preprocessing passed to envpool for every Atari pool (see the module docstring).
ATARI_SETTINGS: dict[str, Any] = dict(
    img_height=84,
    img_width=84,
    gray_scale=True,
    stack_num=4,
    frame_skip=4,
    noop_max=30,
    use_fire_reset=True,
    full_action_space=False,
    max_episode_steps=27000,
    reward_clip=False,
    zero_discount_on_life_loss=False,
)


class EnvSpec(NamedTuple):
    """Static description of a batch of ``num_envs`` copies of one environment.

    Hashable (usable as a static argument of ``jax.jit``).

    Attributes:
      env_id: the registry id, e.g. ``"Pong-v5"`` or ``"CartPole-v1"``.
      num_envs: the number of environments stepped together (one lane).
      obs_shape: the shape of one observation (``(4, 84, 84)`` for Atari: channels first).
      obs_dtype: the numpy dtype of observations (uint8 for Atari, float32 for classic control).
      num_actions: the size of the discrete action set; actions are ints in ``[0, num_actions)``.
      is_atari: whether this is an envpool Atari game (lives, episodic life, uint8 frames).
      max_episode_steps: the time limit in agent steps (a game is truncated after it), or None.
      obs_states: 0 for array observations; ``n > 0`` when the game's observation is one integer state in
        ``[0, n)`` (FrozenLake, Taxi, CliffWalking...): every env API then delivers it one-hot, float32 ``(n,)``
        (``obs_shape``), so the same networks and replay buffers serve (:func:`one_hot_observations`).
    """

    env_id: str
    num_envs: int
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    num_actions: int
    is_atari: bool
    max_episode_steps: int | None
    obs_states: int = 0


class Step(NamedTuple):
    """One batched transition, as returned by every environment API in :mod:`jaxdp.envs`.

    Every field has a leading axis of the environments stepped (``num_envs``, or ``batch_size``
    in asynchronous mode).

    Attributes:
      obs: the observation after the step, ``obs_shape`` and ``obs_dtype``.
      reward: float32, the raw (unclipped) reward of the step.
      terminated: bool, the *learning* episode ended in a terminal state (do not bootstrap).
        With episodic life on, a lost life counts as terminal.
      truncated: bool, the episode was cut by the time limit: not terminal, bootstrap from
        ``obs`` (with next-step auto-reset it is still the episode's last observation).
      game_over: bool, the real game ended: all lives lost, or the time limit. The episode
        statistics (:func:`jaxdp.envs.episode_stats_update`) close an episode here and only here.
      first: bool, this step was an automatic reset: the environment ignored the action, returned
        the first observation of a new episode and reward 0. It follows every step with
        ``terminated | truncated``. The transition (previous obs, action, this step) is not a real
        one: agents must mask it out of their losses and replay buffers.
    """

    obs: Any
    reward: Any
    terminated: Any
    truncated: Any
    game_over: Any
    first: Any


def _envpool_registry() -> Any:
    import envpool  # noqa: F401  (registers every envpool id)
    from envpool.registration import registry

    return registry


def _gymnasium_registry() -> dict[str, Any]:
    import gymnasium

    return gymnasium.envs.registry


def backend_of(env_id: str, backend: str = "auto") -> str:
    """Returns ``"envpool"`` or ``"gymnasium"``: which library provides ``env_id``.

    Only registries are consulted; nothing is created.

    Args:
      env_id: an environment id.
      backend: ``"auto"`` (envpool first, gymnasium as the fallback), ``"envpool"`` or
        ``"gymnasium"`` (force one; raises if it lacks the id).

    Raises:
      ValueError: the id is unknown to the allowed registries, or ``backend`` is not one of the three.
    """
    if backend not in ("auto", "envpool", "gymnasium"):
        raise ValueError(f"backend must be 'auto', 'envpool' or 'gymnasium', got {backend!r}")
    if not isinstance(env_id, str):
        raise TypeError(f"env_id must be a str, got {type(env_id).__name__}")
    if backend in ("auto", "envpool") and env_id in _envpool_registry().specs:
        return "envpool"
    if backend in ("auto", "gymnasium") and env_id in _gymnasium_registry():
        return "gymnasium"
    if backend == "auto":
        # Each id once: gymnasium registers the classic-control ids envpool has too.
        known = list(dict.fromkeys([*_envpool_registry().specs, *_gymnasium_registry()]))
        alias = _envpool_atari_id(env_id)
        # A wrong case ('cartpole-v1') names the id it spells, not three near spellings that differ in case.
        same_letters = [k for k in known if k.lower() == env_id.lower()]
        close = [alias] if alias else same_letters or difflib.get_close_matches(env_id, known, n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown --env {env_id!r}: not an envpool or gymnasium id{hint}")
    raise ValueError(f"unknown --env {env_id!r}: not a {backend} id")


def _envpool_atari_id(env_id: str) -> str | None:
    """envpool's id of a game named the gym / ALE way (``PongNoFrameskip-v4``, ``Pong-v4``, ``ALE/Pong-v5``, as
    CleanRL's and SB3's scripts spell it), or None. envpool's ``Pong-v5`` steps with the DQN preprocessing itself."""
    name = env_id.removeprefix("ALE/")
    for suffix in ("NoFrameskip-v4", "NoFrameskip-v0", "Deterministic-v4", "-v4", "-v0", "-v5"):
        if name.endswith(suffix):
            candidate = name[: -len(suffix)] + "-v5"
            return candidate if candidate != env_id and candidate in _envpool_registry().specs else None
    return None


def one_hot_observations(spec: EnvSpec, obs: Any) -> Any:
    """``obs`` as the agents see it: integer states one-hot (float32, last axis ``spec.obs_states``) when the
    game's observation is one integer state, else unchanged. NumPy in, NumPy out; a JAX array in, JAX out."""
    if not spec.obs_states:
        return obs
    return (obs[..., None] == np.arange(spec.obs_states, dtype=np.int32)).astype(np.float32)


def _time_limit(steps: int) -> int | None:
    """envpool's time limit, None where it has none (it writes INT32_MAX: CliffWalking-v0)."""
    return None if steps >= np.iinfo(np.int32).max else steps


def _envpool_discrete_actions(env_id: str, raw_spec: Any) -> int:
    actions = raw_spec.action_array_spec
    keys = [k for k in actions if k not in ("env_id", "players.env_id")]
    action = actions.get("action")
    if keys != ["action"] or not np.issubdtype(action.dtype, np.integer):
        raise ValueError(
            f"--env {env_id!r}: its action space is not a single discrete action "
            f"(envpool action spec {keys}); jaxdp's agents need discrete actions"
        )
    return int(action.maximum) + 1


def _envpool_raw_spec(env_id: str, **kwargs: Any) -> Any:
    """envpool's static spec of ``env_id``, or ValueError naming the id where envpool cannot make it here (Procgen
    needs the system's Qt 5 libraries, VizdoomCustom-v1 a scenario file: a traceback from inside envpool otherwise)."""
    import envpool

    try:
        return envpool.make_spec(env_id, **kwargs)
    except (ImportError, RuntimeError) as error:  # RuntimeError: VizdoomCustom-v1 needs a scenario file
        raise ValueError(f"--env {env_id!r}: envpool cannot make it here ({error})") from error


def _envpool_single_agent_obs(env_id: str, raw_spec: Any) -> Any:
    """The spec of the one observation array of a single-player game, or ValueError naming what jaxdp cannot play:
    several players taking turns (TicTacToe, KuhnPoker: envpool's XLA interface refuses them), or an observation
    of several arrays (MiniGrid's image and direction, Jumanji's board and action mask)."""
    players = int(getattr(raw_spec.config, "max_num_players", 1))
    if players > 1:
        raise ValueError(f"--env {env_id!r} is a game of {players} players; jaxdp's agents play single-player games")
    observations = [k.removeprefix("obs:") for k in raw_spec.state_array_spec if k == "obs" or k.startswith("obs:")]
    if observations != ["obs"]:
        raise ValueError(f"--env {env_id!r}: its observation is several arrays ({', '.join(observations)}); "
                         "jaxdp's networks read one array")
    return raw_spec.state_array_spec["obs"]


def validate_env_id(env_id: str) -> None:
    """Raises ValueError unless ``env_id`` names an envpool or gymnasium environment.

    Fast and side-effect free: looks the id up in the registries, and for envpool ids reads the
    static spec to reject what jaxdp's agents cannot play: continuous or several actions, several players, an
    observation of several arrays, a family envpool cannot load here. Creates no pool and no environment
    (the CLI calls this before any work).

    Example:
      >>> validate_env_id("CartPole-v1")
      >>> validate_env_id("Foo-v9")
      Traceback (most recent call last):
      ...
      ValueError: unknown --env 'Foo-v9': not an envpool or gymnasium id
    """
    if backend_of(env_id) == "envpool":
        raw = _envpool_raw_spec(env_id)
        _envpool_single_agent_obs(env_id, raw)
        _envpool_discrete_actions(env_id, raw)


def _is_atari(env_id: str) -> bool:
    return _envpool_registry().specs[env_id][0] == "envpool.atari"


def make_spec(env_id: str, num_envs: int, *, backend: str = "auto") -> EnvSpec:
    """Returns the :class:`EnvSpec` of ``num_envs`` copies of ``env_id``.

    For envpool ids this reads envpool's static spec (no pool is created); for gymnasium ids one
    environment is created to read its spaces and then closed.

    Args:
      env_id: an envpool or gymnasium id with a discrete action space.
      num_envs: environments per lane, >= 1.
      backend: ``"auto"``, ``"envpool"`` or ``"gymnasium"`` (see :func:`backend_of`).

    Returns:
      The spec. Atari observations are ``(4, 84, 84)`` uint8, channels first.

    Raises:
      ValueError: unknown id, continuous or several actions, several players, several observation arrays, a
        family envpool cannot load here, or ``num_envs < 1``.

    Example:
      >>> make_spec("CartPole-v1", 8).obs_shape
      (4,)
    """
    if not is_int(num_envs) or num_envs < 1:
        raise ValueError(f"make_spec: num_envs must be an int >= 1, got {num_envs!r}")
    num_envs = int(num_envs)
    if backend_of(env_id, backend) == "envpool":
        atari = _is_atari(env_id)
        raw = _envpool_raw_spec(env_id, **(ATARI_SETTINGS if atari else {}))
        obs = _envpool_single_agent_obs(env_id, raw)
        num_actions = _envpool_discrete_actions(env_id, raw)
        obs_shape, obs_dtype, states = tuple(int(d) for d in obs.shape), np.dtype(obs.dtype), 0
        if obs_shape in ((), (-1,)) and np.issubdtype(obs_dtype, np.integer):  # one integer state per env
            states = int(obs.maximum) + 1
            obs_shape, obs_dtype = (states,), np.dtype(np.float32)
        return EnvSpec(
            env_id=env_id,
            num_envs=num_envs,
            obs_shape=obs_shape,
            obs_dtype=obs_dtype,
            num_actions=num_actions,
            is_atari=atari,
            max_episode_steps=_time_limit(int(raw.config.max_episode_steps)),
            obs_states=states,
        )
    import gymnasium

    env = gymnasium.make(env_id)
    try:
        if not isinstance(env.action_space, gymnasium.spaces.Discrete):
            raise ValueError(
                f"--env {env_id!r}: its action space {env.action_space} is not discrete; "
                "jaxdp's agents need discrete actions"
            )
        if int(env.action_space.start) != 0:
            raise ValueError(f"--env {env_id!r}: discrete actions must start at 0")
        space, states = env.observation_space, 0
        if isinstance(space, gymnasium.spaces.Discrete):
            if int(space.start) != 0:
                raise ValueError(f"--env {env_id!r}: discrete observations must start at 0, got {space}")
            states = int(space.n)
            obs_shape, obs_dtype = (states,), np.dtype(np.float32)
        elif isinstance(space, gymnasium.spaces.Box):
            obs_shape, obs_dtype = tuple(space.shape), np.dtype(space.dtype)
        else:
            raise ValueError(f"--env {env_id!r}: observation space {space} is not a Box or Discrete")
        return EnvSpec(
            env_id=env_id,
            num_envs=num_envs,
            obs_shape=obs_shape,
            obs_dtype=obs_dtype,
            num_actions=int(env.action_space.n),
            is_atari=False,
            max_episode_steps=env.spec.max_episode_steps if env.spec is not None else None,
            obs_states=states,
        )
    finally:
        env.close()


def envpool_kwargs(
    spec: EnvSpec,
    env_seeds: list[int],
    *,
    batch_size: int,
    episodic_life: bool,
    repeat_action_probability: float,
    num_threads: int,
) -> dict[str, Any]:
    """The keyword arguments of ``envpool.make_gymnasium`` for a pool of ``len(env_seeds)`` envs.

    Env ``i`` is seeded with ``env_seeds[i]`` (envpool's per-env seed list). Internal helper shared
    by the host and XLA constructors.
    """
    kwargs: dict[str, Any] = dict(
        num_envs=len(env_seeds),
        batch_size=batch_size,
        seed=[int(s) for s in env_seeds],
        num_threads=num_threads,
    )
    if spec.is_atari:
        kwargs.update(ATARI_SETTINGS)
        kwargs.update(
            episodic_life=bool(episodic_life),
            repeat_action_probability=float(repeat_action_probability),
        )
    return kwargs


def is_int(value: Any) -> bool:
    """A Python or numpy integer, and not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@contextlib.contextmanager
def quiet_spaces() -> Iterator[None]:
    """Silences gymnasium's "Box ... precision lowered" warning, which envpool's float64 bounds of
    float32 observations (classic control) trigger at every pool creation; it is harmless here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting", category=UserWarning)
        yield


def check_seed(seed: Any, count: int, where: str) -> int:
    """Validates a base seed so that ``seed + count - 1`` still fits envpool's int32 seeds."""
    if not is_int(seed):
        raise TypeError(f"{where}: seed must be an int, got {seed!r}")
    seed = int(seed)
    if not (0 <= seed and seed + count - 1 < 2**31):
        raise ValueError(f"{where}: seed must be in [0, 2**31 - {count}] (one seed per env), got {seed}")
    return seed


def check_pool_args(
    where: str, num_envs: Any, episodic_life: Any, repeat_action_probability: Any, num_threads: Any
) -> None:
    """Validates the constructor arguments shared by the host and XLA pools."""
    if not is_int(num_envs) or num_envs < 1:
        raise ValueError(f"{where}: num_envs must be an int >= 1, got {num_envs!r}")
    if not isinstance(episodic_life, (bool, np.bool_)):
        raise TypeError(f"{where}: episodic_life must be a bool, got {episodic_life!r}")
    if not (0.0 <= float(repeat_action_probability) <= 1.0):
        raise ValueError(
            f"{where}: repeat_action_probability must be in [0, 1], got {repeat_action_probability!r}"
        )
    if not is_int(num_threads) or num_threads < 0:
        raise ValueError(
            f"{where}: num_threads must be an int >= 0 (0: envpool decides), got {num_threads!r}"
        )
