"""Distributed RL on the asynchronous master: HSA2C, A3C-style actor-critic and Gorila-style DQN on ``async_sim``.

This is the ``--runtime async_sim`` side of :mod:`jaxdp.train`: N workers, each with its OWN envpool pool of E
environments (and, for DQN, its own replay buffer and target network), push update vectors to a master that is
simulated event by event by :mod:`jaxdp.runtime.async_sim` (paper seeds/002, Alg. 1/2 and, for A2C, Alg. 8/9).

Who does what (per arrival event of the schedule, worker w):

* The worker pulled θ (its anchor) at the end of its previous exchange. It runs B *local steps*, each one
  :func:`make_local_step`: A2C/REINFORCE -- one rollout of ``rollout_len`` steps of its E envs with its current
  local parameters and the loss gradient of that rollout (the local mini-batch of Alg. 9 is the E·n steps of its
  E actor envs); DQN -- ``k = cfg.env_steps_per_update`` ε-greedy steps of its E envs added to its replay, then
  the gradient of the TD loss on a sampled batch. The gradient goes through the worker's inner optimizer.
* It pushes Δ = anchor − local. The master adds Δ to its accumulator; after every M arrivals it applies
  ``θ ← θ + outer.update(mean of the M Δ's)`` and (``reply="on_update"``) sends θ back to those M workers.

The two strategies (``cfg.strategy``):

* ``"dpsgd"`` -- HSA2C (B = ``cfg.local_steps``): ``inner`` = the configured optimizer (clip + Adam/RMSProp/SGD at
  ``cfg.learning_rate``) on the worker, its state kept across pulls; ``outer = optax.sgd(η_g)`` on the master,
  η_g = ``cfg.global_lr``, applied to the MEAN of the M update vectors. The paper's Alg. 1 writes the sum,
  θ ← θ − η_g Σ_m Δ_m: that is this rule with η_g · M. With the mean, M = N and equal compute times give the
  update rule of the vmap runtime's synchronous ``local_steps`` strategy (anchor − η_g · mean Δ).
* ``"async"`` -- Downpour / A3C-style actor-critic and Gorila-style DQN (B = 1): the worker pushes its raw gradient
  (``inner = optax.sgd(1.0)``, so Δ = anchor − (anchor − g) = g up to one float rounding) and the master owns the
  optimizer: ``outer = chain(configured optimizer, scale(η_g))`` on the mean of the M gradients -- one optimizer
  state on the parameter server, as in A3C's shared RMSProp and Gorila's parameter server.

Learning-rate annealing (``cfg.anneals_lr``, the default for actor-critic): the configured optimizer's rate decays
linearly to 0 over the steps its state takes in this run -- the master updates (``"async"``) or a worker's local
steps (``"dpsgd"``, the busiest worker's count), read from the schedule.

Environments: envpool's XLA step is a custom call whose target pool is a *static* attribute of the call (measured:
stepping pool A's function with pool B's handle bytes steps pool A), so one step function cannot serve several
pools by indexing their handles. Worker w's env step is therefore ``lax.switch(w, [step_0, ..., step_{N-1}])``
over the N pools' step functions (:func:`make_worker_env_step`); the handle bytes only order the calls. Worker w's
pool is made with seed ``lane_env_seed(cfg, seed, w)``, so its envs are those of lane w of the vmap runtime.

Time and accounting: the compute time of one local step is proportional to its env work (default
``exponential(mean = env steps of one local step)``: one time unit = one env step of one env), plus
``comm_time`` per one-way message (see :func:`jaxdp.runtime.async_sim.schedule`). Per log point
(``metrics.jsonl``) and in ``summary.json["accounting"]``: env steps ("data points", the paper's Fig. 5 metric)
per simulated time unit and per wall second, master updates per simulated time unit and per wall second,
pushes, replies, communication rounds (= pushes + replies), bytes sent (= rounds × parameter bytes: every push
carries one Δ, every reply one θ; the initial θ_0 everyone holds at time 0 is not counted), the staleness
histogram of the applied Δ's and the arrivals per worker. DQN's random warm-up (``learning_starts`` env steps,
split over the workers) happens before the schedule starts: it counts in ``total_steps`` but not in the
simulated time nor in the per-event rates.

The events run in chunks of ``chunk_events`` arrival events (a multiple of M); the host logs between chunks. A
chunk is one jitted ``lax.scan`` over its events, except for CNN torsos (image observations), where each event is
one jitted call from the host with the B local steps unrolled: XLA:CPU runs convolution gradients inside a loop
~20× slower than outside (jax-ml/jax#12868), and this keeps every gradient out of loops.

Determinism: the schedule is a NumPy function of the seed, local step b of event i uses
``fold_in(fold_in(PRNGKey(seed), i), b)`` and each pool is seeded from the seed, so the same config gives a
bitwise-identical run (parameters and episode returns); a run is always a whole number of chunks.

Checkpoints and signals (:func:`run`): the whole simulated state is checkpointed between chunks; ``--resume``
continues at the next event of the same schedule, with fresh env pools. SIGINT, SIGTERM or SIGUSR1 stops a run at
the next chunk boundary (the next event, in the host loop) with a checkpoint there.

Example:
    >>> from jaxdp.config import TrainConfig
    >>> cfg = TrainConfig(algo="a2c", strategy="dpsgd", runtime="async_sim", workers=4, local_steps=4,
    ...                   master_batch=2, total_steps=50_000, seeds=(0,), logdir="/tmp/hsa2c")
    >>> summary = run(cfg)  # doctest: +SKIP
    >>> summary["accounting"]["env_steps_per_sim_time"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp import atomic, provenance
from jaxdp import config as config_lib
from jaxdp import envs as envs_lib
from jaxdp import loop as loop_lib
from jaxdp import train as train_lib
from jaxdp.agents import a2c, dqn, reinforce
from jaxdp.agents import replay as replay_lib
from jaxdp.config import TrainConfig
from jaxdp.runtime import async_sim
from jaxdp.runtime._mpi_protocol import truncate_json_lines
from jaxdp.stopping import RunStopped, stop_requests

PyTree = Any

__all__ = [
    "AsyncProgress",
    "AsyncRunResult",
    "AsyncTrainer",
    "AsyncWorkerState",
    "default_compute_time",
    "execute",
    "make_async_train",
    "make_local_step",
    "make_worker_env_step",
    "run",
    "schedule_fingerprint",
    "train",
]


# ---------------------------------------------------------------------------------------------------------------
# Per-worker state.
# ---------------------------------------------------------------------------------------------------------------
class AsyncWorkerState(NamedTuple):
    """What one worker owns besides its anchor and inner optimizer state (those live in ``async_sim.SimCarry``).

    Stacked with a leading worker axis N in the simulator's carry.

    Attributes:
      worker: int32 scalar, this worker's id w (selects its env pool in :func:`make_worker_env_step`).
      pool: uint8 envpool handle bytes of pool w (they only order the custom calls; the pool is chosen by w).
      pending_reset: bool ``[E]``: the env's previous step was done, so its next step is an auto-reset.
      obs: ``[E, *obs_shape]`` current observations.
      first: bool ``[E]``: ``obs`` is the first observation of an episode.
      stats: episode-statistics accumulators (real-game return and length).
      local_updates: int32, local gradient steps this worker has taken (all rounds).
      env_steps: int32, vectorised env steps this worker has taken, times E (its data points).
      episodes: :class:`jaxdp.train.StepInfo` ``[B, T, E]`` of the worker's current round (local step b writes
        slot ``local_updates % B``), read by the host after each event.
      replay: DQN: this worker's replay buffer; ``()`` otherwise.
      target_params: DQN: this worker's target network θ⁻; ``()`` otherwise.
    """

    worker: jax.Array
    pool: jax.Array
    pending_reset: jax.Array
    obs: jax.Array
    first: jax.Array
    stats: envs_lib.EpisodeStats
    local_updates: jax.Array
    env_steps: jax.Array
    episodes: train_lib.StepInfo
    replay: PyTree
    target_params: PyTree


class AsyncTrainer(NamedTuple):
    """Everything :func:`train` needs for one run; made by :func:`make_async_train`. Good for ONE run: the env
    pools are mutable C++ state (make a new trainer to replay a seed)."""

    cfg: TrainConfig
    network: Any
    envs: tuple  # N XlaEnv, one pool per worker
    sched: async_sim.Schedule
    init: Callable  # jitted: (PRNGKey(seed)) -> async_sim.SimCarry at time 0 (θ_0, anchors, worker states)
    inner: optax.GradientTransformation
    outer: optax.GradientTransformation
    local_step: Callable
    warmup: Callable | None  # DQN: (worker_state, θ_0) -> (worker_state, StepInfo[N, steps, E])
    event_loop: str  # "scan": K events per jitted lax.scan; "host": one jitted call per event (CNNs)
    chunk: Callable  # jitted: (carry, arrivals[K], first_event) -> (carry, (StepInfo[K, B, T, E], metrics[K]))
    event: Callable  # jitted: (carry, arrival, index) -> (carry, (StepInfo[B, T, E], metrics))
    chunk_events: int  # K, a multiple of M
    num_chunks: int
    env_steps_per_event: int  # B · T · E
    warmup_env_steps: int  # all workers together
    param_bytes: int
    compute_time: Any
    comm_time: float


class AsyncRunResult(NamedTuple):
    """The result of :func:`train`.

    Attributes:
      params: the master's final θ.
      worker_state: the workers' final :class:`AsyncWorkerState` ``[N, ...]``.
      episodes: ``(env step, return, length)`` of every finished episode, in finishing order; ``env step`` =
        env steps of all workers done at the end of the event (or warm-up) in which it finished.
      records: the per-chunk log records (the lines of ``metrics.jsonl``).
      accounting: the whole-run accounting (see the module docstring).
      compile_seconds: time to compile the chunk (and warm-up) functions.
      run_seconds: wall time of the warm-up and all chunks, compilation excluded.
      network: the Flax module (``network.apply(params, obs)``).
    """

    params: PyTree
    worker_state: AsyncWorkerState
    episodes: list
    records: list
    accounting: dict
    compile_seconds: float
    run_seconds: float
    network: Any


# ---------------------------------------------------------------------------------------------------------------
# Environments: one pool per worker, dispatched by worker id.
# ---------------------------------------------------------------------------------------------------------------
def make_worker_env_step(envs: Sequence[envs_lib.XlaEnv]) -> Callable:
    """``step(worker, handle, actions) -> (handle, Step)`` that steps pool ``envs[worker]`` and no other.

    envpool bakes the pool into each XLA custom call (a static attribute), so the pools' step functions are the
    branches of a ``lax.switch`` on the (traced) worker id: only the selected branch runs, so only that worker's
    envs advance. All pools must have the same spec (the branches must return the same types).

    Args:
      envs: N :class:`jaxdp.envs.XlaEnv` of one lane each, same env id and ``num_envs``.

    Returns:
      The step function; ``worker`` is an int32 scalar (clamped into ``[0, N)`` by ``lax.switch``).

    Example:
      >>> pools = [envs_lib.make_xla("CartPole-v1", 2, seed=2 * w) for w in range(3)]
      >>> step = jax.jit(make_worker_env_step(pools))
      >>> handle, out = step(jnp.int32(1), pools[1].handle, jnp.zeros(2, jnp.int32))  # steps pool 1 only
    """
    envs = tuple(envs)
    if not envs:
        raise ValueError("make_worker_env_step: envs must hold at least one XlaEnv")
    if any(e.lanes != 1 for e in envs):
        raise ValueError("make_worker_env_step: every XlaEnv must have lanes=1 (one pool per worker)")
    if len({e.spec for e in envs}) != 1:
        raise ValueError("make_worker_env_step: all envs must have the same spec (env id and num_envs)")
    branches = [e.step for e in envs]

    def step(worker: jax.Array, handle: envs_lib.XlaHandle, actions: jax.Array):
        return jax.lax.switch(worker, branches, handle, actions)

    return step


class _WorkerEnv(NamedTuple):
    """Duck-types the part of XlaEnv that ``jaxdp.train.rollout`` uses (``step``), bound to one worker."""

    step: Callable


# ---------------------------------------------------------------------------------------------------------------
# Local steps (the Workload contract of async_sim: local_step(worker_state_w, params, key)).
# ---------------------------------------------------------------------------------------------------------------
def _steps_per_local_step(cfg: TrainConfig) -> int:
    """T: vectorised env steps of one local step (rollout length, or DQN's k)."""
    return cfg.env_steps_per_update if cfg.is_dqn else cfg.rollout


def _local_steps_B(cfg: TrainConfig) -> int:
    return 1 if cfg.strategy == "async" else cfg.local_steps


def _target_every(cfg: TrainConfig) -> int:
    # The single learner refreshes θ⁻ every target_update env steps, i.e. every target_update / (k·E) updates of
    # the model. Here the global model gets N workers' gradients, so a worker that refreshes every
    # target_update / (k·E·N) of ITS updates keeps the same lag in model updates (same rule as jaxdp.train).
    return max(1, round(cfg.target_update / (cfg.env_steps_per_update * cfg.envs_per_worker * cfg.workers)))


def _epsilon(cfg: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    duration = max(1.0, cfg.eps_fraction * cfg.total_steps)

    def epsilon(worker_env_steps):
        # Each worker decays its own ε on its own data, scaled by N: all workers reach eps_end when the run has
        # taken eps_fraction · total_steps env steps (if they take equal shares).
        frac = jnp.clip(worker_env_steps.astype(jnp.float32) * cfg.workers / duration, 0.0, 1.0)
        return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)

    return epsilon


def _huber_delta(cfg: TrainConfig, atari: bool) -> float | None:
    return 1.0 if (cfg.loss == "huber" or (cfg.loss == "auto" and atari)) else None


def _dqn_collect(cfg: TrainConfig, network, env_step, spec):
    """One ε-greedy vectorised env step of one worker into its replay (the acting half of Gorila's actor)."""
    atari = spec.is_atari

    def collect(ws: AsyncWorkerState, params, eps, key):
        q = network.apply(params, ws.obs)
        actions = dqn.epsilon_greedy(q, eps, key)
        handle, st = env_step(ws.worker, envs_lib.XlaHandle(ws.pool, ws.pending_reset), actions)
        reward = dqn.clip_reward(st.reward) if atari else st.reward
        buf = replay_lib.add(ws.replay, ws.obs, actions, reward, st.terminated, st.truncated, ws.first)
        stats, finished, rets, lens = envs_lib.episode_stats_update(ws.stats, st)
        ws = ws._replace(pool=handle.pool, pending_reset=handle.pending_reset, obs=st.obs, first=st.first,
                         stats=stats, replay=buf, env_steps=ws.env_steps + ws.obs.shape[0])
        return ws, train_lib.StepInfo(finished, rets, lens)

    return collect


def make_local_step(cfg: TrainConfig, network, env_step: Callable, spec: envs_lib.EnvSpec) -> Callable:
    """The worker's local step for ``cfg.algo``: ``local_step(worker_state_w, params, key) -> (ws, grads, metrics)``.

    * a2c / reinforce: one rollout of ``cfg.rollout`` steps of the worker's E envs acting with ``params`` (its
      current local parameters), then the gradient of ``a2c.loss`` / ``reinforce.loss`` on it (Atari rewards
      clipped to their sign for the loss; statistics keep the raw ones).
    * dqn / double_dqn: ``cfg.env_steps_per_update`` ε-greedy steps into the worker's replay, then the gradient of
      ``dqn.loss`` on a sampled batch against the worker's target network θ⁻; θ⁻ is refreshed from ``params``
      every C local updates (C = target_update / (k·E·N), or Polyak with ``tau < 1``).

    The episode ends of the step are written into ``ws.episodes[local_updates % B]``.

    Args:
      cfg: the run's config.
      network: Flax module (actor-critic or Q-network).
      env_step: from :func:`make_worker_env_step`.
      spec: the env spec of one worker's pool.

    Returns:
      The pure, jittable local step (metrics: a dict of scalars).

    Example:
      >>> pools = [envs_lib.make_xla("CartPole-v1", 4, seed=4 * w) for w in range(2)]  # doctest: +SKIP
      >>> step = make_local_step(cfg, network, make_worker_env_step(pools), pools[0].spec)  # doctest: +SKIP
      >>> ws_w, grads, metrics = jax.jit(step)(ws_w, params, key)  # doctest: +SKIP
    """
    B = _local_steps_B(cfg)
    T = _steps_per_local_step(cfg)
    atari = spec.is_atari
    apply = train_lib.network_apply(cfg, network, spec)

    def record(ws: AsyncWorkerState, info: train_lib.StepInfo) -> AsyncWorkerState:
        slot = ws.local_updates % B
        episodes = jax.tree.map(lambda buf, x: buf.at[slot].set(x), ws.episodes, info)
        return ws._replace(episodes=episodes, local_updates=ws.local_updates + 1)

    if not cfg.is_dqn:

        def loss_fn(p, traj):
            if cfg.algo == "a2c":
                return a2c.loss(p, apply, traj, gamma=cfg.gamma, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef)
            return reinforce.loss(p, apply, traj, gamma=cfg.gamma, baseline=cfg.baseline,
                                  ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef)

        def actor_critic_step(ws: AsyncWorkerState, params, key):
            env = _WorkerEnv(step=lambda h, a: env_step(ws.worker, h, a))
            lane = train_lib.Lane(params=params, target_params=(), opt_state=(), replay=(), obs=ws.obs,
                                  first=ws.first, stats=ws.stats, key=key, updates=ws.local_updates)
            handle = envs_lib.XlaHandle(ws.pool, ws.pending_reset)
            handle, lane, traj, info = train_lib.rollout(env, apply, handle, lane, T)
            if atari:
                traj = traj._replace(reward=dqn.clip_reward(traj.reward))
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, traj)
            ws = ws._replace(pool=handle.pool, pending_reset=handle.pending_reset, obs=lane.obs, first=lane.first,
                             stats=lane.stats, env_steps=ws.env_steps + T * ws.obs.shape[0])
            return record(ws, info), grads, metrics

        return actor_critic_step

    collect = _dqn_collect(cfg, network, env_step, spec)
    epsilon = _epsilon(cfg)
    target_every = _target_every(cfg)
    huber_delta = _huber_delta(cfg, atari)

    def dqn_step(ws: AsyncWorkerState, params, key):
        k_act, k_sample = jax.random.split(key)
        eps = epsilon(ws.env_steps)

        def body(ws, k):
            return collect(ws, params, eps, k)

        ws, info = jax.lax.scan(body, ws, jax.random.split(k_act, T))
        batch = replay_lib.sample(ws.replay, k_sample, cfg.batch_size, n_step=cfg.n_step, gamma=cfg.gamma)
        target = ws.target_params if cfg.target_network else params

        def loss_fn(p):
            return dqn.loss(p, target, apply, batch, double=cfg.algo == "double_dqn",
                            huber_delta=huber_delta)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        n = ws.local_updates + 1
        if cfg.tau < 1.0:
            target_params = dqn.polyak_update(ws.target_params, params, cfg.tau)
        else:  # hard copy of the worker's current (freshly pulled or local) parameters every C local updates
            copy = (n % target_every) == 0
            target_params = jax.tree.map(lambda p, t: jnp.where(copy, p, t), params, ws.target_params)
        ws = ws._replace(target_params=target_params)
        return record(ws, info), grads, {**metrics, "epsilon": eps}

    return dqn_step


# ---------------------------------------------------------------------------------------------------------------
# Construction.
# ---------------------------------------------------------------------------------------------------------------
def default_compute_time(cfg: TrainConfig) -> async_sim.ExponentialTime:
    """``exponential(mean = T·E)``: one local step lasts on average its env work, one unit per env step.

    Example:
      >>> default_compute_time(TrainConfig(algo="a2c", num_envs=16, rollout_len=8))
      ExponentialTime(mean=128.0)
    """
    return async_sim.exponential(float(_steps_per_local_step(cfg) * cfg.envs_per_worker))


def _check_cfg(cfg: TrainConfig) -> TrainConfig:
    cfg = config_lib.validate(cfg)
    if cfg.runtime != "async_sim":
        raise config_lib.ConfigError(f"train_async: --runtime must be async_sim, got {cfg.runtime!r}")
    return cfg


def _optimizers(cfg: TrainConfig, sched: async_sim.Schedule
                ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(inner, outer) for the strategy; see the module docstring.

    With ``cfg.anneals_lr`` the configured optimizer's learning rate decays linearly to 0 over the gradient steps
    ITS state will take in this run (``jaxdp.train`` counts loop iterations, which here would be wrong): the master
    updates for ``"async"`` (the master owns the optimizer), the most local steps any worker takes for ``"dpsgd"``
    (each worker's inner state counts its own; slower workers end with a small positive rate).
    """
    if cfg.strategy == "async":
        steps = len(sched.updates.time)
    else:
        steps = int(async_sim.pushes_per_worker(sched).max()) * sched.local_steps
    learning_rate = optax.linear_schedule(cfg.learning_rate, 0.0, max(1, steps)) if cfg.anneals_lr else None
    configured = train_lib.make_inner_optimizer(dataclasses.replace(cfg, anneal_lr="off"), learning_rate)
    if cfg.strategy == "async":
        return optax.sgd(1.0), optax.chain(configured, optax.scale(cfg.global_lr))
    return configured, optax.sgd(cfg.global_lr)


def _tree_bytes(tree: PyTree) -> int:
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _plan_events(cfg: TrainConfig, env_steps_per_event: int, warmup_env_steps: int,
                 chunk_events: int | None) -> tuple[int, int]:
    """(K events per chunk, number of chunks): ~50 chunks of at most ``MAX_CHUNK_ENV_STEPS`` env steps (a signal is
    honoured between chunks), K a multiple of M, ≥ the step budget."""
    M = cfg.master_batch
    needed = max(1, math.ceil(max(cfg.total_steps - warmup_env_steps, 1) / env_steps_per_event))
    if chunk_events is None:
        longest = max(1, train_lib.MAX_CHUNK_ENV_STEPS // (env_steps_per_event * M))
        chunk_events = M * max(1, min(math.ceil(needed / 50 / M), longest))
    elif isinstance(chunk_events, bool) or not isinstance(chunk_events, int) or chunk_events < 1:
        raise ValueError(f"train_async: chunk_events must be a positive int, got {chunk_events!r}")
    elif chunk_events % M:
        raise ValueError(f"train_async: chunk_events must be a multiple of --master-batch M={M}, "
                         f"got {chunk_events}")
    return chunk_events, max(1, math.ceil(needed / chunk_events))


def make_async_train(
    cfg: TrainConfig,
    *,
    compute_time: async_sim.ComputeTime | Sequence[async_sim.ComputeTime] | None = None,
    comm_time: float = 0.0,
    reply: str = "on_update",
    chunk_events: int | None = None,
    event_loop: str = "auto",
) -> AsyncTrainer:
    """Builds the pools, network, optimizers, schedule and jitted chunk of one async_sim run of ``cfg``.

    Args:
      cfg: a config with ``runtime="async_sim"`` and ``strategy`` ``"async"`` (B = 1) or ``"dpsgd"``
        (B = ``local_steps``); N = ``workers``, M = ``master_batch``, η_g = ``global_lr``, E = ``envs_per_worker``.
      compute_time: duration of one local step (one distribution or one per worker); default
        :func:`default_compute_time`.
      comm_time: one-way message latency (push, and reply) in the same units.
      reply: ``"on_update"`` or ``"immediate"`` (see :mod:`jaxdp.runtime.async_sim`).
      chunk_events: arrival events per chunk (a multiple of M), the host logs (and checkpoints) between chunks;
        default ~1/50 of the run, at most ``jaxdp.train.MAX_CHUNK_ENV_STEPS`` env steps.
      event_loop: ``"scan"`` (a chunk is one jitted ``lax.scan`` over its events), ``"host"`` (one jitted call per
        event, the B local steps unrolled: no gradient inside a loop) or ``"auto"``: ``"host"`` for image
        observations (CNN torsos, where XLA:CPU's convolution gradients inside loops are ~20× slower), else
        ``"scan"``. Both give the same run up to float rounding.

    Returns:
      An :class:`AsyncTrainer` (compiled by :func:`execute`).

    Example:
      >>> cfg = TrainConfig(algo="a2c", strategy="async", runtime="async_sim", workers=4, seeds=(0,),
      ...                   total_steps=100_000)
      >>> trainer = make_async_train(cfg, comm_time=32.0)  # doctest: +SKIP
      >>> async_sim.staleness_histogram(trainer.sched)  # doctest: +SKIP
    """
    cfg = _check_cfg(cfg)
    if event_loop not in ("auto", "scan", "host"):
        raise ValueError(f"train_async: event_loop must be 'auto', 'scan' or 'host', got {event_loop!r}")
    seed = cfg.seeds[0]
    N, E, M = cfg.workers, cfg.envs_per_worker, cfg.master_batch
    B, T = _local_steps_B(cfg), _steps_per_local_step(cfg)
    if compute_time is None:
        compute_time = default_compute_time(cfg)
    # DQN: random play before the schedule, split evenly over the workers.
    warmup_steps_per_worker = math.ceil(cfg.learning_starts / (N * E)) if cfg.is_dqn else 0
    warmup_env_steps = warmup_steps_per_worker * N * E
    env_steps_per_event = B * T * E
    K, num_chunks = _plan_events(cfg, env_steps_per_event, warmup_env_steps, chunk_events)
    sched = async_sim.schedule(N, B, M, K * num_chunks // M, compute_time, comm_time=comm_time, seed=seed,
                               reply=reply)
    assert len(sched.events.worker) == K * num_chunks  # E = U·M: each update takes exactly M arrivals

    pools = tuple(envs_lib.make_xla(cfg.env, E, seed=train_lib.lane_env_seed(cfg, cfg.seeds[0], w), episodic_life=True)
                  for w in range(N))
    spec = pools[0].spec
    train_lib.check_replay_memory(cfg, spec)  # before the workers' replays are allocated
    env_step = make_worker_env_step(pools)
    network = train_lib.make_network(cfg, spec)
    inner, outer = _optimizers(cfg, sched)

    def one_worker(w: int, params: PyTree) -> AsyncWorkerState:
        buf, target = (), ()
        if cfg.is_dqn:
            capacity, frame_stack = train_lib.replay_layout(cfg, spec)
            buf = replay_lib.init(capacity, E, spec.obs_shape, spec.obs_dtype, frame_stack=frame_stack)
            target = params
        zeros = lambda dtype: jnp.zeros((B, T, E), dtype)  # noqa: E731
        return AsyncWorkerState(
            worker=jnp.int32(w), pool=pools[w].handle.pool, pending_reset=pools[w].handle.pending_reset,
            obs=jnp.asarray(pools[w].initial_obs), first=jnp.ones((E,), bool), stats=envs_lib.episode_stats_init(E),
            local_updates=jnp.zeros((), jnp.int32), env_steps=jnp.zeros((), jnp.int32),
            episodes=train_lib.StepInfo(zeros(bool), zeros(jnp.float32), zeros(jnp.int32)),
            replay=buf, target_params=target)

    def init_fn(seed_key: jax.Array) -> async_sim.SimCarry:
        # Every worker starts from θ_0 (the key jaxdp.train's lanes use), its own pool's first observations.
        params = network.init(train_lib.initial_params_key(seed_key), jnp.asarray(pools[0].initial_obs))
        worker_state = jax.tree.map(lambda *xs: jnp.stack(xs), *[one_worker(w, params) for w in range(N)])
        return async_sim.init_carry(params, inner, outer, N, worker_state)

    init = jax.jit(init_fn)
    param_bytes = _tree_bytes(jax.eval_shape(init, jax.random.PRNGKey(seed)).params)
    local_step = make_local_step(cfg, network, env_step, spec)

    warmup = None
    if warmup_steps_per_worker > 0:
        collect = _dqn_collect(cfg, network, env_step, spec)
        k_warm = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(seed))[1], 0)

        def warmup_fn(ws_all: AsyncWorkerState, theta: PyTree):
            # Random play (ε = 1) of every worker in turn, filling its own replay.
            def per_worker(ws_all, w):
                ws = jax.tree.map(lambda x: x[w], ws_all)
                keys = jax.random.split(jax.random.fold_in(k_warm, w), warmup_steps_per_worker)
                ws, info = jax.lax.scan(lambda s, k: collect(s, theta, 1.0, k), ws, keys)
                ws_all = jax.tree.map(lambda x, v: x.at[w].set(v), ws_all, ws)
                return ws_all, info

            return jax.lax.scan(per_worker, ws_all, jnp.arange(N))

        warmup = jax.jit(warmup_fn, donate_argnums=0)

    if event_loop == "auto":
        event_loop = "host" if len(spec.obs_shape) == 3 else "scan"
    seed_key = jax.random.PRNGKey(seed)

    # The host event loop calls one event per program, so its B local steps can be unrolled: no convolution
    # gradient then sits inside a loop (see async_sim.worker_round).
    step = async_sim.make_event_step(local_step, inner, outer, local_steps=B, aggregate="mean",
                                     unroll=event_loop == "host")

    def one_event(carry: async_sim.SimCarry, arrival: async_sim.ArrivalInput, index: jax.Array):
        carry, metrics = step(carry, arrival, jax.random.fold_in(seed_key, index))
        # The arriving worker's round, all B local steps (each wrote its slot).
        episodes = jax.tree.map(lambda x: x[arrival.worker], carry.worker_states.episodes)
        return carry, (episodes, metrics)

    def chunk_fn(carry: async_sim.SimCarry, arrivals: async_sim.ArrivalInput, first_event: jax.Array):
        indices = first_event + jnp.arange(arrivals.worker.shape[0], dtype=jnp.int32)
        return jax.lax.scan(lambda c, xs: one_event(c, xs[1], xs[0]), carry, (indices, arrivals))

    return AsyncTrainer(cfg=cfg, network=network, envs=pools, sched=sched, init=init, inner=inner, outer=outer,
                        local_step=local_step, warmup=warmup, event_loop=event_loop,
                        chunk=jax.jit(chunk_fn, donate_argnums=0), event=jax.jit(one_event, donate_argnums=0),
                        chunk_events=K, num_chunks=num_chunks, env_steps_per_event=env_steps_per_event,
                        warmup_env_steps=warmup_env_steps, param_bytes=param_bytes, compute_time=compute_time,
                        comm_time=float(comm_time))


# ---------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------
def _episodes_of(info: train_lib.StepInfo, step_at_row: np.ndarray) -> list[tuple[int, float, int]]:
    """Episode ends of ``info[rows, ...]`` in time order; row r gets the env-step count ``step_at_row[r]``."""
    finished = np.asarray(info.finished).reshape(len(step_at_row), -1)
    returns = np.asarray(info.returns).reshape(len(step_at_row), -1)
    lengths = np.asarray(info.lengths).reshape(len(step_at_row), -1)
    rows, cols = np.nonzero(finished)
    return [(int(step_at_row[r]), float(returns[r, c]), int(lengths[r, c])) for r, c in zip(rows, cols)]


def _accounting(trainer: AsyncTrainer, events_done: int, run_seconds: float) -> dict:
    """The paper's accounting over the first ``events_done`` arrival events."""
    sched = trainer.sched
    ev = sched.events
    updates_done = int(np.sum(ev.update_follows[:events_done]))
    staleness = sched.updates.staleness[:updates_done]
    pushes = events_done
    replies = int(np.sum(ev.pulls[:events_done]))
    sim_time = float(ev.time[events_done - 1]) if events_done else 0.0
    event_env_steps = events_done * trainer.env_steps_per_event
    rounds = pushes + replies
    per_second = lambda x: x / run_seconds if run_seconds > 0 else None  # noqa: E731
    per_unit = lambda x: x / sim_time if sim_time > 0 else None  # noqa: E731
    return {
        "workers": sched.num_workers,
        "local_steps": sched.local_steps,
        "master_batch": sched.master_batch,
        "reply": sched.reply,
        "aggregate": "mean",
        "compute_time": repr(trainer.compute_time),
        "comm_time": trainer.comm_time,
        "sim_time": sim_time,
        "event_env_steps": event_env_steps,
        "warmup_env_steps": trainer.warmup_env_steps,
        "env_steps_per_sim_time": per_unit(event_env_steps),
        "env_steps_per_wall_second": per_second(event_env_steps + trainer.warmup_env_steps),
        "master_updates": updates_done,
        "master_updates_per_sim_time": per_unit(updates_done),
        "master_updates_per_wall_second": per_second(updates_done),
        "pushes": pushes,
        "replies": replies,
        "comm_rounds": rounds,
        "param_bytes": trainer.param_bytes,
        "bytes_pushed": pushes * trainer.param_bytes,
        "bytes_replied": replies * trainer.param_bytes,
        "bytes_sent": rounds * trainer.param_bytes,
        "staleness_histogram": np.bincount(staleness.ravel(), minlength=1).tolist() if updates_done else [],
        "staleness_mean": float(staleness.mean()) if updates_done else None,
        "staleness_max": int(staleness.max()) if updates_done else None,
        "pushes_per_worker": np.bincount(ev.worker[:events_done], minlength=sched.num_workers).tolist(),
    }


def train(
    cfg: TrainConfig,
    *,
    compute_time: async_sim.ComputeTime | Sequence[async_sim.ComputeTime] | None = None,
    comm_time: float = 0.0,
    reply: str = "on_update",
    chunk_events: int | None = None,
    event_loop: str = "auto",
    on_record: Callable[[dict], None] | None = None,
    progress: Any = None,
) -> AsyncRunResult:
    """Trains ``cfg`` on the simulated asynchronous master; writes no files (see :func:`run` for that).

    Args:
      cfg, compute_time, comm_time, reply, chunk_events, event_loop: see :func:`make_async_train`.
      on_record: called with each log record (one per chunk, and one after the DQN warm-up).
      progress: optional tqdm-like bar (``update(n)``, ``set_postfix(dict)``).

    Returns:
      An :class:`AsyncRunResult`. Log records hold ``step`` (env steps so far, all workers), ``episodic_return``
      (mean over the episodes finished in the chunk, or None), ``episodes``, ``sps`` (env steps per wall second
      in the chunk), ``sim_time``, ``master_updates``, ``env_steps_per_sim_time`` and
      ``master_updates_per_sim_time`` (cumulative), ``master_updates_per_wall_second`` (chunk), ``pushes``,
      ``replies``, ``comm_rounds``, ``bytes_sent`` (cumulative), ``staleness_mean``/``staleness_max`` of the
      chunk's applied Δ's, ``wall_seconds`` (run time so far, compilation excluded) and the learner metrics
      (mean over the chunk's events).

    Example:
      >>> result = train(cfg, compute_time=async_sim.constant(128.0))  # doctest: +SKIP
      >>> result.accounting["staleness_histogram"], result.episodes[-1]  # doctest: +SKIP
    """
    trainer = make_async_train(cfg, compute_time=compute_time, comm_time=comm_time, reply=reply,
                               chunk_events=chunk_events, event_loop=event_loop)
    return execute(trainer, on_record, progress)


class AsyncProgress(NamedTuple):
    """Where a run stands between two arrival events: what a checkpoint holds and a resumed run starts from.

    Attributes:
      carry: the simulator's state (θ, optimizer states, anchors, the workers' states and replays, the master's
        pending Δ's).
      events_done: arrival events of the schedule applied so far.
      warmup_done: DQN's random warm-up has filled the replays (True when there is none).
      episodes: ``(env step, return, length)`` of every episode finished so far.
      run_seconds: wall time of the warm-up and the events so far (all sessions of a resumed run).
    """

    carry: async_sim.SimCarry
    events_done: int
    warmup_done: bool
    episodes: list
    run_seconds: float


def _with_fresh_envs(saved: async_sim.SimCarry, fresh: async_sim.SimCarry) -> async_sim.SimCarry:
    """``saved`` with the env side of ``fresh``: envpool's state lives outside JAX, so a resumed run's pools are new
    and reset; their handles, first observations and episode accumulators replace the saved ones."""
    ws, new = saved.worker_states, fresh.worker_states
    return saved._replace(worker_states=ws._replace(pool=new.pool, pending_reset=new.pending_reset, obs=new.obs,
                                                    first=new.first, stats=new.stats))


def execute(trainer: AsyncTrainer, on_record: Callable[[dict], None] | None = None,
            progress: Any = None, stop: Callable[[list], bool] | None = None, *,
            start: AsyncProgress | None = None, interrupted: Callable[[], bool] | None = None,
            on_progress: Callable[[AsyncProgress], None] | None = None) -> AsyncRunResult:
    """Runs a trainer from :func:`make_async_train` (once: its pools are consumed); see :func:`train`.

    Args:
      trainer: from :func:`make_async_train`.
      on_record, progress: see :func:`train`.
      stop: ``stop(episodes)`` is called after every chunk with the finished episodes so far (``(env step,
        return, length)``); when it returns True the run ends there (the accounting covers the events done).
      start: continue from this point (a checkpoint, see :func:`run`) instead of time 0; the env pools are
        fresh, so episodes in progress at the checkpoint are not finished.
      interrupted: polled between chunks, and between events in the host event loop; when it returns True the
        run ends at once, at an event boundary (a signal, see :func:`run`).
      on_progress: called with the run's :class:`AsyncProgress` after the warm-up and after every chunk (or
        the part of one before an interruption), before the next one starts: the place to save a checkpoint.

    Example:
        >>> trainer = make_async_train(cfg)  # doctest: +SKIP
        >>> result = execute(trainer)  # doctest: +SKIP
    """
    cfg, sched, K = trainer.cfg, trainer.sched, trainer.chunk_events
    total_events = K * trainer.num_chunks
    interrupted = interrupted or (lambda: False)
    arrivals = async_sim.arrival_inputs(sched)
    t0 = time.perf_counter()
    carry = trainer.init(jax.random.PRNGKey(cfg.seeds[0]))
    jax.block_until_ready(carry)
    compile_seconds = time.perf_counter() - t0  # almost all of it is compilation
    episodes: list[tuple[int, float, int]] = []
    records: list[dict] = []
    run_seconds, events_done, warmup_done = 0.0, 0, trainer.warmup is None
    if start is not None:
        if not 0 <= start.events_done <= total_events or (start.events_done and not start.warmup_done):
            raise ValueError(f"train_async.execute: start at event {start.events_done} (warm-up done: "
                             f"{start.warmup_done}) is not a point of this run of {total_events} events")
        carry = _with_fresh_envs(start.carry, carry)
        events_done, run_seconds = start.events_done, start.run_seconds
        warmup_done = warmup_done or start.warmup_done
        episodes = [tuple(e) for e in start.episodes]
        if progress is not None:
            progress.update(_steps_at(trainer, start))

    def emit(record: dict) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    reported = False

    def report() -> None:
        nonlocal reported
        reported = True
        if on_progress is not None:
            on_progress(AsyncProgress(carry, events_done, warmup_done, list(episodes), run_seconds))

    if not warmup_done and not interrupted():
        t0 = time.perf_counter()
        warm = trainer.warmup.lower(carry.worker_states, carry.params).compile()
        compile_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        worker_states, info = warm(carry.worker_states, carry.params)
        jax.block_until_ready(worker_states)
        seconds = time.perf_counter() - t0
        run_seconds += seconds
        carry = carry._replace(worker_states=worker_states)
        warmup_done = True
        new = _episodes_of(info, np.full(int(np.prod(info.finished.shape[:2])), trainer.warmup_env_steps))
        episodes.extend(new)
        emit({"step": trainer.warmup_env_steps, "episodic_return": float(np.mean([r for _, r, _ in new]))
              if new else None, "episodes": len(new), "sps": trainer.warmup_env_steps / max(seconds, 1e-9),
              "sim_time": 0.0, "master_updates": 0, "wall_seconds": run_seconds, "phase": "warmup"})
        if progress is not None:
            progress.update(trainer.warmup_env_steps)
        report()

    def arrivals_of(first: int, end: int) -> async_sim.ArrivalInput:
        return jax.tree.map(lambda x: x[first:end], arrivals)

    t0 = time.perf_counter()
    compiled_events = events_done < total_events and warmup_done and not interrupted()
    if compiled_events:
        if trainer.event_loop == "scan":
            compiled = trainer.chunk.lower(carry, arrivals_of(0, K), jnp.int32(0)).compile()
        else:
            event = trainer.event.lower(carry, jax.tree.map(lambda x: x[0], arrivals), jnp.int32(0)).compile()
    compile_seconds += time.perf_counter() - t0

    def events(carry, first: int, end: int):
        """Events [first, end): one scanned chunk, or (host loop) one call per event until ``interrupted``."""
        if trainer.event_loop == "scan":  # a scan is not interrupted
            # A chunk's rest (a run resumed from the host loop's checkpoint inside one) compiles once more.
            chunk = compiled if end - first == K else trainer.chunk
            carry, out = chunk(carry, arrivals_of(first, end), jnp.int32(first))
            return carry, out, end
        outputs = []
        for i in range(first, end):
            carry, out = event(carry, jax.tree.map(lambda x: x[i], arrivals), jnp.int32(i))
            outputs.append(out)
            if interrupted():
                break
        return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs), first + len(outputs)

    while compiled_events and events_done < total_events and not interrupted():
        first = events_done
        t0 = time.perf_counter()
        # To the end of the chunk (a resumed host-loop run may start inside one): the records stay on the grid.
        carry, (info, metrics), events_done = events(carry, first, min((first // K + 1) * K, total_events))
        info, metrics = jax.device_get((info, metrics))
        seconds = time.perf_counter() - t0
        run_seconds += seconds
        steps_at_event = trainer.warmup_env_steps + trainer.env_steps_per_event * np.arange(first + 1,
                                                                                           events_done + 1)
        new = _episodes_of(info, steps_at_event)
        episodes.extend(new)
        acc = _accounting(trainer, events_done, run_seconds)
        updates_before = int(np.sum(sched.events.update_follows[:first]))
        chunk_staleness = sched.updates.staleness[updates_before:acc["master_updates"]]
        record = {
            "step": int(steps_at_event[-1]),
            "episodic_return": float(np.mean([r for _, r, _ in new])) if new else None,
            "episodes": len(new),
            "sps": (events_done - first) * trainer.env_steps_per_event / max(seconds, 1e-9),
            "sim_time": acc["sim_time"],
            "master_updates": acc["master_updates"],
            "env_steps_per_sim_time": acc["env_steps_per_sim_time"],
            "master_updates_per_sim_time": acc["master_updates_per_sim_time"],
            "master_updates_per_wall_second": (acc["master_updates"] - updates_before) / max(seconds, 1e-9),
            "pushes": acc["pushes"],
            "replies": acc["replies"],
            "comm_rounds": acc["comm_rounds"],
            "bytes_sent": acc["bytes_sent"],
            "staleness_mean": float(chunk_staleness.mean()) if chunk_staleness.size else None,
            "staleness_max": int(chunk_staleness.max()) if chunk_staleness.size else None,
            "wall_seconds": run_seconds,
            **{k: float(np.mean(v)) for k, v in metrics.items()},
        }
        emit(record)
        if progress is not None:
            progress.update((events_done - first) * trainer.env_steps_per_event)
            recent = [r for _, r, _ in episodes[-20:]]
            progress.set_postfix({"sps": f"{record['sps']:,.0f}",
                                  "return": f"{np.mean(recent):.1f}" if recent else "-"})
        report()
        if stop is not None and stop(episodes):
            break
    if not reported:  # interrupted before any work: the starting point is where the run stands
        report()

    return AsyncRunResult(params=carry.params, worker_state=carry.worker_states, episodes=episodes,
                          records=records, accounting=_accounting(trainer, events_done, run_seconds),
                          compile_seconds=compile_seconds, run_seconds=run_seconds, network=trainer.network)


def _steps_at(trainer: AsyncTrainer, point: AsyncProgress) -> int:
    """Env steps (all workers, warm-up included) taken at ``point``."""
    warmup = trainer.warmup_env_steps if trainer.warmup is not None and point.warmup_done else 0
    return warmup + point.events_done * trainer.env_steps_per_event


def schedule_fingerprint(trainer: AsyncTrainer) -> str:
    """A digest of the run's schedule and chunking: a checkpoint only continues the run whose events it saw.

    The config fixes most of it (the seed, N, B, M, ``--comm-time``, the length), but :func:`run`'s keyword
    arguments (``compute_time``, ``reply``, ``chunk_events``) are not in the config.
    """
    digest = hashlib.sha256()
    ev = trainer.sched.events
    for array in (ev.worker, ev.time, ev.update_follows, ev.pulls):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(f"{trainer.chunk_events}/{trainer.num_chunks}/{trainer.warmup_env_steps}".encode())
    return digest.hexdigest()[:16]


def _save(manager, trainer: AsyncTrainer, point: AsyncProgress) -> None:
    # The orbax step is the env steps taken: it grows with every event, and from before to after the warm-up.
    loop_lib.save_checkpoint(manager, _steps_at(trainer, point), point.carry, {
        "events_done": point.events_done, "warmup_done": point.warmup_done, "episodes": point.episodes,
        "run_seconds": point.run_seconds, "schedule": schedule_fingerprint(trainer)})


def _restore(manager, trainer: AsyncTrainer, logdir: str) -> AsyncProgress:
    template = jax.eval_shape(trainer.init, jax.random.PRNGKey(trainer.cfg.seeds[0]))
    restored = loop_lib.restore_checkpoint(manager, template)
    if restored is None:
        raise config_lib.ConfigError(f"--resume: no checkpoint in {logdir}/checkpoints")
    carry, host = restored
    if host.get("schedule") != schedule_fingerprint(trainer):
        raise config_lib.ConfigError(
            f"--resume: the run in {logdir} was simulated on another schedule (its compute times, reply rule or "
            f"chunk size differ from this run's): resume it with the arguments it was started with")
    return AsyncProgress(carry, int(host["events_done"]), bool(host["warmup_done"]),
                         [tuple(e) for e in host["episodes"]], float(host["run_seconds"]))


def run(
    cfg: TrainConfig,
    *,
    compute_time: async_sim.ComputeTime | Sequence[async_sim.ComputeTime] | None = None,
    comm_time: float = 0.0,
    reply: str = "on_update",
    chunk_events: int | None = None,
    event_loop: str = "auto",
) -> dict:
    """Trains ``cfg`` (``runtime="async_sim"``) with logging and checkpoints; returns the summary (also
    ``summary.json``).

    Writes to ``cfg.logdir`` in the format of :func:`jaxdp.loop.run`: ``config.json`` (what a ``--resume`` must
    match), ``metrics.jsonl`` (one record per chunk, see :func:`train`; TensorBoard events in ``tb/`` unless
    ``cfg.tensorboard`` is off), orbax checkpoints in ``checkpoints/`` (every ``cfg.checkpoint_interval`` seconds,
    checked after each chunk, and at the end) and ``summary.json`` with ``total_steps``, ``start_step`` (where a
    ``--resume`` began), ``wall_seconds``, ``compile_seconds``, ``sps`` (the steps from ``start_step``),
    ``final_return`` (mean of the episodes that ended in the last 10% of the steps), ``eval_return`` (greedy
    episodes of the master's final θ; ``eval_episodes_ended`` of them ended), ``episodes``, ``runtime``,
    ``accounting`` (see the module docstring) and ``config``.

    A checkpoint holds the whole simulated state (θ, the master's optimizer and pending Δ's, every worker's anchor,
    inner optimizer, replay and target network) and the event count; the schedule is a function of the config, so
    ``cfg.resume`` continues at the next event of the same schedule, with fresh env pools (envpool's state lives
    outside JAX; the episodes in progress are lost). The run's length cannot change on a resume: the schedule and
    the learning-rate annealing are drawn for the whole run.

    SIGINT (Ctrl-C), SIGTERM or SIGUSR1 stops the run at the next chunk boundary (the next event, in the host event
    loop of CNN torsos): it logs, saves a checkpoint and raises :class:`jaxdp.stopping.RunStopped`. A second signal
    stops it at once.

    Args:
      cfg: the config (``logdir`` must be set); see :func:`make_async_train` for the keyword arguments, which a
        resumed run must repeat.

    Returns:
      The summary dict.

    Example:
      >>> summary = run(dataclasses.replace(cfg, logdir="runs/hsa2c"))  # doctest: +SKIP
      >>> summary["final_return"], summary["accounting"]["bytes_sent"]  # doctest: +SKIP
    """
    t_start = time.time()
    cfg = _check_cfg(cfg)
    if not cfg.logdir:
        raise config_lib.ConfigError("train_async.run: --logdir must be set")
    config_lib.check_resumable(cfg, cfg.logdir)  # before any work: a --resume must match the run it continues
    if cfg.resume and not os.path.isdir(os.path.join(cfg.logdir, "checkpoints")):
        raise config_lib.ConfigError(f"--resume: no checkpoint in {cfg.logdir}/checkpoints")
    with contextlib.ExitStack() as stack:
        # From the start: a signal while the run is built (its schedule, envpool, a checkpoint's restore) is honoured
        # when the build ends, in one line (see jaxdp.loop.run).
        requested = stack.enter_context(stop_requests())
        trainer = make_async_train(cfg, compute_time=compute_time, comm_time=comm_time, reply=reply,
                                   chunk_events=chunk_events, event_loop=event_loop)
        total = trainer.warmup_env_steps + trainer.num_chunks * trainer.chunk_events * trainer.env_steps_per_event
        if requested and not cfg.resume:  # nothing written yet
            raise RunStopped(requested[0], 0, total, None, starting=True)
        forget_run = loop_lib.remover_of_new_files(cfg.logdir)  # a full disk before the first checkpoint
        manager = loop_lib._checkpoint_manager(cfg.logdir)
        start = _restore(manager, trainer, cfg.logdir) if cfg.resume else None
        if requested:  # nothing written yet: the checkpoint is as it was
            raise RunStopped(requested[0], _steps_at(trainer, start), total, cfg.logdir, starting=True)
        # A full or read-only disk: one line (loop.WriteFailed), the unfinished checkpoint removed. The checkpoints
        # are numbered by env step.
        writing = functools.partial(loop_lib.writes_in, cfg.logdir, checkpoint_step=manager.latest_step,
                                    manager=manager, nothing_saved=None if cfg.resume else forget_run)
        stack.enter_context(writing("training (logging or saving a checkpoint)"))
        config_lib.save_run_config(cfg, cfg.logdir)  # what a later --resume must match
        metrics_path = os.path.join(cfg.logdir, "metrics.jsonl")
        if start is not None:  # the records after the checkpoint will be logged again
            truncate_json_lines(metrics_path, _steps_at(trainer, start))
        last_save = time.time()
        last_save_seconds = 0.0  # how long the last save took (see loop.checkpoint_due)
        latest = start

        def checkpoint(point: AsyncProgress, force: bool = False) -> None:
            nonlocal last_save, last_save_seconds, latest
            latest = point
            if force or loop_lib.checkpoint_due(time.time() - last_save, last_save_seconds, cfg.checkpoint_interval):
                started = time.time()
                _save(manager, trainer, point)  # synchronous: the next chunk donates the carry's buffers
                last_save = time.time()
                last_save_seconds = last_save - started

        writer = loop_lib.MetricsWriter(metrics_path, os.path.join(cfg.logdir, "tb") if cfg.tensorboard else None)
        stack.callback(writer.close)
        bar = loop_lib._progress(cfg, total)
        if bar is not None:
            stack.callback(bar.close)
        result = execute(trainer, writer.write, bar, start=start, interrupted=lambda: bool(requested),
                         on_progress=lambda point: checkpoint(point, force=bool(requested)))
        if latest is not None:  # at the end, or where a signal stopped it (saved already, then)
            checkpoint(latest, force=True)
        if requested:
            raise RunStopped(requested[0], _steps_at(trainer, latest) if latest else 0, total, cfg.logdir)
    wall = time.time() - t_start  # training (compilation included); the evaluation is timed apart
    (eval_returns,), eval_seconds = loop_lib.evaluate_runs(cfg, result.network, [result.params], [cfg.seeds[0]])
    divergence = loop_lib.divergence_fields(result.params, os.path.join(cfg.logdir, "metrics.jsonl"))
    returns = [r for _, r, _ in result.episodes]
    start_step = _steps_at(trainer, start) if start is not None else 0
    summary = {
        "total_steps": total,
        "start_step": start_step,
        "wall_seconds": wall,
        "compile_seconds": result.compile_seconds,
        "run_seconds": result.run_seconds,
        "eval_seconds": eval_seconds,
        "sps": (total - start_step) / wall,  # a resumed run: the steps this process trained, in its wall time
        "final_return": loop_lib.final_return([st for st, _, _ in result.episodes], returns, total),
        **loop_lib.evaluation_fields(eval_returns),
        **divergence,
        "diverged_runs": int(loop_lib.diverged(divergence)),
        "episodes": len(returns),
        "runtime": "async_sim",
        "accounting": result.accounting,
        "config": dataclasses.asdict(cfg),
        "provenance": provenance.describe(),
    }
    with writing("writing the summary"):
        atomic.write_json(os.path.join(cfg.logdir, "summary.json"), summary)
    return summary
