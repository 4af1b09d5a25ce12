"""Host-side environment API: a pool of environments stepped from Python with numpy arrays.

:class:`HostEnv` wraps an envpool pool (or, for ids envpool lacks, a gymnasium ``SyncVectorEnv``)
and returns :class:`~jaxdp.envs.Step` tuples. It is a small class because it wraps external,
mutable state (the C++ pool); everything else in :mod:`jaxdp.envs` is pure functions.

Semantics (measured on envpool 1.2.5; the tests re-check each point):

* **Auto-reset is "next step".** After a step with ``terminated | truncated`` for env ``i``, the next
  step of env ``i`` ignores its action, resets, and returns the first observation of the new
  episode with reward 0 (envpool: ``elapsed_step`` 0 and dm ``step_type`` FIRST at that step;
  two runs that differ only in the actions sent at those steps produce identical observations).
  :attr:`Step.first` marks these steps; the pool itself does not report them through its gymnasium
  API, so they are tracked here: ``first[i]`` = env ``i``'s previous step was done.
  gymnasium's vector envs (``AutoresetMode.NEXT_STEP``) behave the same way.
* **Episodic life (Atari).** With ``episodic_life=True`` a lost life sets ``terminated`` (envpool's
  ``done``, dm ``discount`` 0); the following step is an auto-reset that does *not* restart the
  game: it runs envpool's own reset routine (no-ops, FIRE) instead of the agent's action, the
  remaining lives and ``elapsed_step`` carry over (``elapsed_step`` does not advance), and the
  reward is 0. The game really ends when all lives are lost (envpool's ``info["terminated"]`` = 1,
  only then) or at the time limit (``truncated``; the next reset is then a full one): that is
  :attr:`Step.game_over`. Because that reset acts on its own, a run with episodic life diverges from
  a run without it after the first lost life, even with the same seed and actions (they agree up to
  and including the life-loss step). envpool's dm API cannot tell a time limit from a termination
  on Atari (``discount`` is 0 for both), hence the gymnasium API is used here.
* **Seeds.** envpool seeds env ``i`` of a pool made with ``seed=s`` with ``s + i`` (env ``i`` of a
  pool with seed ``s`` behaves exactly like env 0 of a pool with seed ``s + i``). Same seed and
  same actions give the same observations and rewards. gymnasium's ``reset(seed=s)`` does the same.
* **Order.** In synchronous mode envpool returns envs in ``env_id`` order (we sort by the returned
  ``env_id`` anyway); in asynchronous mode (``batch_size < num_envs``) ``recv`` returns whichever
  ``batch_size`` envs finished first, with their ids.
* **Actions are validated before every send.** envpool checks an action array's dtype and shape
  only the first time and otherwise reinterprets the memory it is given (a float64 or a too-short
  array silently corrupts the envs), and an out-of-range action indexes past the game's action set.
  Here actions must be integers (converted to int32), of exactly the expected shape, and in
  ``[0, num_actions)``; otherwise a ValueError names the problem and nothing is sent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxdp.envs import spec as spec_lib
from jaxdp.envs.spec import EnvSpec, Step


def check_actions(actions: Any, num_actions: int, expected: int, where: str) -> np.ndarray:
    """Returns ``actions`` as a C-contiguous int32 array of shape ``(expected,)``, or raises.

    Args:
      actions: integer array-like.
      num_actions: the size of the action set; values must lie in ``[0, num_actions)``.
      expected: the required number of actions.
      where: the caller's name, for the error message.

    Raises:
      ValueError: non-integer dtype, wrong shape, or a value out of range.
    """
    arr = np.asarray(actions)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: actions must be integers (int32), got dtype {arr.dtype}")
    if arr.shape != (expected,):
        raise ValueError(f"{where}: actions must have shape ({expected},), got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_actions):
        bad = arr[(arr < 0) | (arr >= num_actions)]
        raise ValueError(
            f"{where}: actions must be in [0, {num_actions}), got {bad[:5].tolist()}"
        )
    return np.ascontiguousarray(arr, dtype=np.int32)


class HostEnv:
    """A pool of ``num_envs`` environments stepped from the host.

    Args:
      env_id: an envpool id (Atari ``*-v5``, ``CartPole-v1``, ...) or, as a fallback, a gymnasium id.
      num_envs: the number of environments, >= 1.
      seed: env ``i`` is seeded with ``seed + i``.
      batch_size: envs returned per :meth:`recv`. ``None`` or ``num_envs``: synchronous mode
        (:meth:`reset` / :meth:`step`). Smaller: asynchronous mode (:meth:`async_reset`, then
        :meth:`send` / :meth:`recv`), envpool only.
      episodic_life: Atari only: a lost life ends the learning episode (DQN training); use False for
        evaluation. Ignored for other games.
      repeat_action_probability: Atari sticky actions; 0 (DQN-standard) by default.
      num_threads: envpool worker threads; 0 lets envpool decide.
      backend: ``"auto"`` (envpool, else gymnasium), ``"envpool"`` or ``"gymnasium"``.

    Example:
      >>> env = HostEnv("CartPole-v1", num_envs=4, seed=0)
      >>> obs = env.reset()
      >>> step = env.step(np.zeros(4, np.int32))
      >>> step.obs.shape, step.reward.dtype
      ((4, 4), dtype('float32'))
      >>> env.close()
    """

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        seed: int = 0,
        *,
        batch_size: int | None = None,
        episodic_life: bool = True,
        repeat_action_probability: float = 0.0,
        num_threads: int = 0,
        backend: str = "auto",
    ) -> None:
        spec_lib.check_pool_args(
            "HostEnv", num_envs, episodic_life, repeat_action_probability, num_threads
        )
        num_envs = int(num_envs)
        seed = spec_lib.check_seed(seed, num_envs, "HostEnv")
        if batch_size is None:
            batch_size = num_envs
        if not spec_lib.is_int(batch_size) or not 1 <= batch_size <= num_envs:
            raise ValueError(
                f"HostEnv: batch_size must be an int in [1, num_envs={num_envs}], got {batch_size!r}"
            )
        self.backend = spec_lib.backend_of(env_id, backend)
        self.spec: EnvSpec = spec_lib.make_spec(env_id, num_envs, backend=self.backend)
        self.batch_size = int(batch_size)
        self.is_async = self.batch_size < num_envs
        if self.backend == "envpool":
            import envpool

            kwargs = spec_lib.envpool_kwargs(
                self.spec,
                [seed + i for i in range(num_envs)],
                batch_size=self.batch_size,
                episodic_life=episodic_life,
                repeat_action_probability=repeat_action_probability,
                num_threads=int(num_threads),
            )
            with spec_lib.quiet_spaces():
                self._pool = envpool.make_gymnasium(env_id, **kwargs)
                self._pool.observation_space  # built lazily (and cached) by the first recv
        else:
            if self.is_async:
                raise ValueError(
                    f"HostEnv: batch_size < num_envs (asynchronous mode) needs an envpool id, "
                    f"and {env_id!r} is served by gymnasium"
                )
            import gymnasium

            self._pool = gymnasium.make_vec(
                env_id,
                num_envs=num_envs,
                vectorization_mode="sync",
                vector_kwargs=dict(autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP),
            )
        self._seed = seed
        # _pending_reset[i]: env i's last step was done, so its next step is an auto-reset.
        self._pending_reset = np.zeros(num_envs, dtype=bool)
        self._started = False
        self._sent: np.ndarray | None = None  # env ids sent and not yet received

    # -- synchronous API -------------------------------------------------------------------------

    def reset(self) -> np.ndarray:
        """Resets every env (synchronous mode) and returns the observations, ``(num_envs, *obs_shape)``.

        With envpool, each env's random state continues (a second reset does not replay the first
        episode); make a new pool for an identical rerun.
        """
        if self.is_async:
            raise ValueError(
                "HostEnv.reset: the pool is asynchronous (batch_size < num_envs); use async_reset()"
            )
        if self.backend == "envpool":
            obs, info = self._pool.reset()
            obs = self._sorted(obs, info["env_id"])
        else:
            obs, _ = self._pool.reset(seed=self._seed if not self._started else None)
        self._pending_reset[:] = False
        self._started = True
        self._sent = None
        return np.asarray(spec_lib.one_hot_observations(self.spec, np.asarray(obs)), dtype=self.spec.obs_dtype)

    def step(self, actions: Any) -> Step:
        """Steps every env with ``actions`` (shape ``(num_envs,)``, ints in ``[0, num_actions)``).

        Returns:
          A :class:`Step` with leading axis ``num_envs``, in env order.

        Raises:
          ValueError: bad actions (nothing is sent), asynchronous mode, or no reset yet.
        """
        if self.is_async:
            raise ValueError(
                "HostEnv.step: the pool is asynchronous (batch_size < num_envs); use send()/recv()"
            )
        self.send(actions)
        step, _ = self.recv()
        return step

    # -- asynchronous API ------------------------------------------------------------------------

    def async_reset(self) -> None:
        """Starts an asynchronous pool: every env resets; :meth:`recv` then returns the first
        observations (``first=True``, reward 0) ``batch_size`` envs at a time."""
        if self.backend != "envpool":
            raise ValueError("HostEnv.async_reset: needs an envpool pool")
        self._pool.async_reset()
        self._pending_reset[:] = True
        self._started = True
        self._sent = None

    def send(self, actions: Any, env_ids: Any = None) -> None:
        """Sends actions without waiting for the results.

        Args:
          actions: ints in ``[0, num_actions)``, shape ``(batch_size,)`` (or ``(num_envs,)`` when
            ``env_ids`` is None in synchronous mode).
          env_ids: which envs the actions are for: distinct ints in ``[0, num_envs)``, as returned
            by the last :meth:`recv`. Required in asynchronous mode.

        Raises:
          ValueError: bad actions or env ids; nothing is sent.
        """
        if not self._started:
            raise ValueError("HostEnv.send: call reset() (or async_reset()) first")
        n = self.spec.num_envs
        if env_ids is None:
            if self.is_async:
                raise ValueError("HostEnv.send: env_ids is required in asynchronous mode")
            ids = np.arange(n, dtype=np.int32)
        else:
            ids = np.asarray(env_ids)
            if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"HostEnv.send: env_ids must be integers, got dtype {ids.dtype}")
            if ids.ndim != 1 or ids.size == 0 or (self.is_async and ids.shape != (self.batch_size,)):
                want = f"({self.batch_size},)" if self.is_async else "(k,), k >= 1"
                raise ValueError(f"HostEnv.send: env_ids must have shape {want}, got {ids.shape}")
            if ids.min() < 0 or ids.max() >= n or np.unique(ids).size != ids.size:
                raise ValueError(
                    f"HostEnv.send: env_ids must be distinct ints in [0, {n}), got {ids.tolist()}"
                )
            ids = ids.astype(np.int32)
        actions = check_actions(actions, self.spec.num_actions, ids.size, "HostEnv.send")
        if self.backend == "envpool":
            self._pool.send(actions, ids)
        else:
            if ids.size != n:
                raise ValueError("HostEnv.send: the gymnasium backend steps all envs at once")
            self._gym_actions = actions[np.argsort(ids)]
        self._sent = ids

    def recv(self) -> tuple[Step, np.ndarray]:
        """Receives the next batch of results.

        Returns:
          ``(step, env_ids)``: a :class:`Step` for ``batch_size`` envs and their int32 ids (sorted
          in synchronous mode). Send the next actions with these ids.
        """
        if self._sent is None and not (self.is_async and self._started):
            # envpool's recv would block forever waiting for envs that were never stepped.
            raise ValueError("HostEnv.recv: nothing was sent (call send() first)")
        if self.backend == "envpool":
            obs, reward, terminated, truncated, info = self._pool.recv()
            ids = np.asarray(info["env_id"], dtype=np.int32)
            if "terminated" in info:  # Atari: all lives lost (envpool's real end of game)
                game_end = np.asarray(info["terminated"]).astype(bool)
            else:
                game_end = np.asarray(terminated, dtype=bool)
            if not self.is_async:
                order = np.argsort(ids, kind="stable")
                if not np.array_equal(ids, np.arange(ids.size)):
                    obs, reward, terminated, truncated, game_end, ids = (
                        x[order] for x in (obs, reward, terminated, truncated, game_end, ids)
                    )
        else:
            obs, reward, terminated, truncated, _ = self._pool.step(self._gym_actions)
            ids = np.arange(self.spec.num_envs, dtype=np.int32)
            game_end = np.asarray(terminated, dtype=bool)
        self._sent = None
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        first = self._pending_reset[ids].copy()
        self._pending_reset[ids] = terminated | truncated
        step = Step(
            obs=np.asarray(spec_lib.one_hot_observations(self.spec, np.asarray(obs)), dtype=self.spec.obs_dtype),
            reward=np.asarray(reward, dtype=np.float32),
            terminated=terminated,
            truncated=truncated,
            game_over=game_end | truncated,
            first=first,
        )
        return step, ids

    def close(self) -> None:
        """Releases the pool."""
        self._pool.close()

    def __enter__(self) -> HostEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _sorted(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return x if np.array_equal(ids, np.arange(ids.size)) else x[np.argsort(ids, kind="stable")]


def make_host(env_id: str, num_envs: int, seed: int = 0, **kwargs: Any) -> HostEnv:
    """Returns ``HostEnv(env_id, num_envs, seed, **kwargs)`` (see :class:`HostEnv`)."""
    return HostEnv(env_id, num_envs, seed, **kwargs)
