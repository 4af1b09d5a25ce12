"""The training loop: agent + environments + optimizer (strategy) + worker layout, as pure jitted functions.

Layout of one run (PureJaxRL's idea, made explicit):

* A *lane* is one worker of one seed: its own ``E`` environments, its own parameter copy, optimizer state, replay
  buffer and PRNG key. Everything in :class:`Lane` is written for ONE lane, unbatched, so an algorithm reads top to
  bottom like CleanRL.
* Workers are a ``jax.vmap`` with ``axis_name="workers"``, so the strategies' collectives (``allreduce``,
  ``local_steps(axis_name=...)``) see them; runs are an outer ``jax.vmap`` without an axis name. A run is a seed
  or, in a hyperparameter sweep (``cfg.sweep``), a (grid point, seed) pair whose values ride in ``Lane.hparams``.
* All lanes share ONE envpool pool of ``seeds x workers x E`` environments stepped through envpool's XLA interface
  inside ``lax.scan``; :mod:`jaxdp.envs` batches the env step under ``vmap`` (``custom_vmap``) so the per-lane code
  never sees the flattening. One compile serves every seed and worker.
* :func:`make_train` returns a :class:`Trainer` of jitted pieces (``init``, ``warmup``, ``chunk``); the host loop
  (:func:`run`, :mod:`jaxdp.loop`) calls them, logs between chunks and checkpoints. :func:`make_train_fn` gives
  the whole run as one pure function, which a user may ``jax.vmap`` over keys (and hyperparameters held as
  arrays).
* ``--pipeline overlap`` (:func:`_overlap`): each iteration's acting and learning run at the same time, as two
  programs on two threads, acting with parameters one update old -- Cleanba's schedule, deterministic.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

import jaxdp
from jaxdp import envs as envs_lib
from jaxdp import nets as nets_lib
from jaxdp.agents import a2c, dqn, reinforce, replay as replay_lib
from jaxdp.config import CNN_TORSOS, ConfigError, TrainConfig, check_replay_fits, check_torso_fits

PyTree = Any
WORKERS = "workers"


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters that may be arrays (sweeps with jax.vmap).
# ---------------------------------------------------------------------------------------------------------------
class Hyperparams(NamedTuple):
    """The hyperparameters a pure ``train`` (:func:`make_train_fn`) takes as values, so that ``jax.vmap`` sweeps
    them: each field is a number or an array, or ``None`` to keep the config's value. A field that is given
    overrides the config; under ``vmap``, give ``in_axes`` as a ``Hyperparams`` too (``None`` for fields not swept).

    Attributes:
      learning_rate: the inner optimizer's rate (the start of its annealing when ``--anneal-lr``).
      eps_start, eps_end, eps_fraction: DQN's ε-greedy schedule: ε falls linearly from ``eps_start`` to
        ``eps_end`` over the first ``eps_fraction`` of ``total_steps``.
      delay: ``--strategy async``: how late every gradient is applied, an int in ``[0, max_delay]``, or a
        :class:`jaxdp.delays.DelayDistribution` over ``0..max_delay`` (``probs`` of shape ``(max_delay + 1,)``).
        ``cfg.max_delay`` sizes the ring buffer of gradients in flight, so it is the largest delay a sweep can hold.
      gamma: the discount factor, in ``(0, 1]``.
      ent_coef, vf_coef: A2C's and REINFORCE's entropy-bonus and value-loss weights.
    """

    learning_rate: float | jax.Array | None = None
    eps_start: float | jax.Array | None = None
    eps_end: float | jax.Array | None = None
    eps_fraction: float | jax.Array | None = None
    delay: int | jax.Array | jaxdp.delays.DelayDistribution | None = None
    gamma: float | jax.Array | None = None
    ent_coef: float | jax.Array | None = None
    vf_coef: float | jax.Array | None = None


def _concrete_value(x: Any) -> float | None:
    """The value of the scalar ``x`` when known at trace time, else None (a tracer cannot be checked)."""
    return None if isinstance(x, jax.core.Tracer) else float(x)


def check_hyperparams(cfg: TrainConfig, hparams: Hyperparams) -> Hyperparams:
    """Checks ``hparams`` against ``cfg``: the fields ``cfg`` can use, their shapes (one value per ``train`` call;
    ``vmap`` adds the sweep axes) and, where known at trace time, their ranges. Raises TypeError / ValueError
    naming the field; returns ``hparams``."""
    if not isinstance(hparams, Hyperparams):
        raise TypeError(f"train: hyperparameters must be a jaxdp.train.Hyperparams, e.g. "
                        f"Hyperparams(learning_rate=lr), got {type(hparams).__name__}")

    def check(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
        if value is None:
            return
        if jnp.ndim(value) != 0:
            raise ValueError(f"train: Hyperparams.{name} must be one number per train call (vmap over an array to "
                             f"sweep it), got shape {jnp.shape(value)}")
        v = _concrete_value(value)
        above_low = v is not None and (low < v if open_low else low <= v)  # comparisons with NaN are False
        if v is not None and not (above_low and v <= high):
            raise ValueError(f"train: Hyperparams.{name} must be in {'(' if open_low else '['}{low:g}, {high:g}], "
                             f"got {v:g}")

    check("learning_rate", hparams.learning_rate, 0.0, float("inf"))
    eps_given = [n for n in ("eps_start", "eps_end", "eps_fraction") if getattr(hparams, n) is not None]
    if eps_given and not cfg.is_dqn:
        raise ValueError(f"train: Hyperparams.{eps_given[0]} is DQN's ε-greedy schedule; --algo {cfg.algo} has none")
    check("eps_start", hparams.eps_start, 0.0, 1.0)
    check("eps_end", hparams.eps_end, 0.0, 1.0)
    check("eps_fraction", hparams.eps_fraction, 0.0, 1.0)
    check("gamma", hparams.gamma, 0.0, 1.0, open_low=True)
    loss_given = [n for n in ("ent_coef", "vf_coef") if getattr(hparams, n) is not None]
    if loss_given and cfg.is_dqn:
        raise ValueError(f"train: Hyperparams.{loss_given[0]} weighs a term of the actor-critic losses; "
                         f"--algo {cfg.algo} has none")
    check("ent_coef", hparams.ent_coef, 0.0, float("inf"))
    check("vf_coef", hparams.vf_coef, 0.0, float("inf"))
    delay = hparams.delay
    if delay is not None:
        if cfg.strategy != "async":
            raise ValueError(f"train: Hyperparams.delay is the stale-gradient delay of --strategy async; "
                             f"--strategy {cfg.strategy} has none")
        if isinstance(delay, jaxdp.delays.DelayDistribution):
            if jnp.shape(delay.probs) != (cfg.max_delay + 1,):
                raise ValueError(f"train: Hyperparams.delay.probs must have shape (max_delay + 1,) = "
                                 f"({cfg.max_delay + 1},) per train call, got {jnp.shape(delay.probs)}")
            jaxdp.delays._validate(delay, "train: Hyperparams.delay")
        else:
            if not jnp.issubdtype(jnp.result_type(delay), jnp.integer):
                raise ValueError(f"train: Hyperparams.delay must be an int (or a DelayDistribution), "
                                 f"got dtype {jnp.result_type(delay)}")
            check("delay", delay, 0, cfg.max_delay)
    return hparams


def _given(cfg: TrainConfig, hparams: Hyperparams | None, name: str):
    """``hparams.<name>`` when given, else the config's value."""
    value = None if hparams is None else getattr(hparams, name)
    return getattr(cfg, name) if value is None else value


# ---------------------------------------------------------------------------------------------------------------
# Optimizer: the inner optax chain, wrapped by the strategy.
# ---------------------------------------------------------------------------------------------------------------
def make_inner_optimizer(cfg: TrainConfig, learning_rate: float | jax.Array | None = None, *,
                         decay_steps: int | None = None) -> optax.GradientTransformation:
    """The optimizer one learner applies to its gradients (before any strategy wraps it).

    Args:
      cfg: the run's configuration (optimizer, learning rate, annealing, gradient clipping).
      learning_rate: overrides ``cfg.learning_rate``; may be a traced array (sweeps).
      decay_steps: optimizer steps over which an annealed rate reaches 0; default: this loop's gradient updates.
        Runtimes whose optimizer steps differ from the loop's iterations (MPI, async master) pass their own.
    """
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    if cfg.anneals_lr:
        # Linear decay to 0 over the learner's gradient steps (PureJaxRL, SB3): a final policy that stays put.
        if decay_steps is None:
            decay_steps = cfg.num_iterations - cfg.acting_only_iterations
        lr = optax.linear_schedule(lr, 0.0, max(1, int(decay_steps)))
    opt = {
        "adam": lambda: optax.adam(lr, eps=1e-5),
        "rmsprop": lambda: optax.rmsprop(lr, decay=0.99, eps=1e-5),
        "sgd": lambda: optax.sgd(lr),
    }[cfg.optimizer]()
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def delay_distribution(cfg: TrainConfig, delay: Any = None):
    """The delays of ``--strategy async``: ``cfg.delay`` up to ``cfg.max_delay``, or a swept ``Hyperparams.delay``
    (an int becomes a one-hot distribution over ``0..max_delay``: the ring buffer keeps ``max_delay + 1`` slots)."""
    d = jaxdp.delays
    if isinstance(delay, d.DelayDistribution):
        return delay
    if delay is not None:
        return d.DelayDistribution(jax.nn.one_hot(delay, cfg.max_delay + 1, dtype=jnp.float32))
    return {
        "fixed": lambda: cfg.max_delay,
        "uniform": lambda: d.uniform(cfg.max_delay),
        "geometric": lambda: d.geometric(0.5, cfg.max_delay),
        "zipf": lambda: d.zipf(1.5, cfg.max_delay),
    }[cfg.delay]()


def make_optimizer(cfg: TrainConfig, learning_rate: float | jax.Array | None = None, *, delay: Any = None,
                   inner: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """The per-worker update rule for ``cfg.strategy`` (run under ``vmap(axis_name="workers")``).

    ``learning_rate`` and ``delay`` override the config (see :class:`Hyperparams`); both may be traced arrays.
    ``inner``: the learner's own optax chain, in place of :func:`make_inner_optimizer`'s (``cfg.optimizer``,
    ``lr``, ``anneal_lr`` and ``max_grad_norm`` are then not read, nor is ``learning_rate``).

    * single: the inner optimizer.
    * sync: ``allreduce`` then inner -- every worker applies the mean gradient (synchronous data parallelism).
    * async: ``allreduce`` then ``delayed(inner)`` -- a parameter server applying gradients that are
      ``max_delay`` steps stale (the stale-gradient model of asynchronous SGD; the real asynchronous master is the
      ``async_sim`` / ``mpi`` runtime).
    * dpsgd: ``local_steps(inner, sgd(global_lr), B, "workers")`` -- B local steps, then the mean update vector.
    * hogwild: ``hogwild(inner)`` per worker (stale reads, lost writes), gradients all-reduced across workers.
    """
    inner = make_inner_optimizer(cfg, learning_rate) if inner is None else inner
    many = cfg.workers > 1
    if cfg.strategy == "single":
        return inner
    if cfg.strategy == "sync":
        return optax.chain(jaxdp.allreduce(WORKERS), inner)
    if cfg.strategy == "async":
        stale = jaxdp.delayed(inner, delay_distribution(cfg, delay), seed=cfg.seeds[0])
        return optax.chain(jaxdp.allreduce(WORKERS), stale) if many else stale
    if cfg.strategy == "dpsgd":
        return jaxdp.local_steps(inner, optax.sgd(cfg.global_lr), cfg.local_steps, axis_name=WORKERS if many else None)
    if cfg.strategy == "hogwild":
        wild = jaxdp.hogwild(inner, num_threads=cfg.threads, overwrite_prob=cfg.overwrite_prob, seed=cfg.seeds[0])
        return optax.chain(jaxdp.allreduce(WORKERS), wild) if many else wild
    raise ValueError(f"unknown strategy {cfg.strategy!r}")


# ---------------------------------------------------------------------------------------------------------------
# Per-lane state.
# ---------------------------------------------------------------------------------------------------------------
class Lane(NamedTuple):
    """Everything one worker of one seed owns."""

    params: PyTree
    target_params: PyTree  # DQN target network (== params, unused, for A2C/REINFORCE)
    opt_state: PyTree
    replay: PyTree  # DQN replay buffer; () otherwise
    obs: jax.Array  # [E, ...] current observations
    first: jax.Array  # [E] bool: obs is the first observation of an episode (the replay needs it)
    stats: PyTree  # episode statistics accumulators
    key: jax.Array
    updates: jax.Array  # gradient updates done (int32)
    # --pipeline overlap: the data acted in the last iteration, which the next update learns (``act``'s ``data``:
    # an a2c.Rollout, or DQN's Played steps); () otherwise.
    pending: PyTree = ()
    # A hyperparameter sweep (cfg.sweep): this lane's values of the swept fields (None for the rest, so a run
    # without a sweep carries no leaves here).
    hparams: Hyperparams = Hyperparams()


class Played(NamedTuple):
    """DQN: the ``k`` vectorised env steps one iteration played, ``[k, E, ...]``, not yet in the replay (the
    arguments of :func:`jaxdp.agents.replay.add`)."""

    obs: jax.Array  # the observations the actions were taken in
    action: jax.Array
    reward: jax.Array  # clipped on Atari
    terminated: jax.Array
    truncated: jax.Array
    first: jax.Array  # obs is the first observation of an episode


class StepInfo(NamedTuple):
    """Per-environment episode ends emitted by every env step (reduced on the host)."""

    finished: jax.Array  # bool [E]
    returns: jax.Array  # f32 [E] real-game return of the finished episodes
    lengths: jax.Array  # i32 [E]


class Trainer(NamedTuple):
    """Jitted pieces of one run; see the module docstring."""

    cfg: TrainConfig
    env: Any
    initial_handle: Callable  # () -> the env handle laid out for [S, N] lanes
    init: Callable  # (keys[S]) -> lanes[S, N]
    warmup: Callable | None  # DQN random play before learning: (handle, lanes) -> (handle, lanes, info)
    # (handle, lanes, start, length) -> (handle, lanes, (info, metrics)); jitted, except with --pipeline overlap
    # (host code that runs an actor program and a learner program at once, see _overlap)
    chunk: Callable
    chunk_iterations: int
    warmup_iterations: int
    num_chunks: int
    total_iterations: int  # warmup + learning iterations: exactly --total-steps
    env_steps_per_iteration: int  # per seed, all workers together
    network: Any


# ---------------------------------------------------------------------------------------------------------------
# Networks.
# ---------------------------------------------------------------------------------------------------------------
def make_network(cfg: TrainConfig, spec) -> Any:
    check_torso_fits(cfg, spec.obs_shape)
    check_replay_fits(cfg, spec.is_atari)
    torso = nets_lib.make_torso(cfg.torso_for(spec.is_atari), hidden_sizes=cfg.hidden, layer_norm=cfg.layer_norm,
                                obs_ndim=len(spec.obs_shape))
    if cfg.is_dqn:
        return nets_lib.QNetwork(torso, num_actions=spec.num_actions)
    return nets_lib.ActorCritic(torso, num_actions=spec.num_actions, separate_critic=cfg.critic == "separate")


def replay_layout(cfg: TrainConfig, spec) -> tuple[int, int]:
    """``(capacity, frame_stack)`` of one DQN lane's replay on ``spec``'s env. Without replay (the lecture's ablation)
    the buffer holds just the latest steps of each env; Atari frames are stored once, not once per stack."""
    capacity = cfg.replay_capacity(spec.is_atari) if cfg.replay else max(cfg.batch_size, 8 * cfg.envs_per_worker)
    return capacity, spec.obs_shape[0] if spec.is_atari else 1


def check_replay_memory(cfg: TrainConfig, spec, available: tuple[int, str] | None = None, *,
                        lanes: int | None = None) -> None:
    """Raises ConfigError if the DQN replays that one process of this run allocates exceed the memory it has left.

    Such a run can only fail after it has started (``--seeds 0 .. 7`` of Atari DQN asks for 8 x 7.07 GB, over twice
    a 24 GB machine's memory): when the replays are allocated and zeroed, or, where memory is overcommitted, later.
    The replays of one memory: every lane's on ``--runtime vmap``, and on ``devices`` over CPU devices (one host); one
    device's lanes on ``devices`` over accelerators; the workers' on ``async_sim``; one worker's per process on
    ``mpi`` and ``distributed``.

    Args:
      cfg: a validated config.
      spec: the env's :class:`~jaxdp.envs.EnvSpec` (one env's observation shape and dtype).
      available: ``(bytes, where)`` in place of :func:`jaxdp.memory.available_bytes` (tests).
      lanes: the env pool's lanes of :func:`make_train_fn` (its vmapped calls), in place of the config's runs.
    """
    if not cfg.is_dqn:
        return
    from jaxdp import memory

    runs_here = len(cfg.runs) if lanes is None else lanes
    runs = ([f"{lanes} lanes"] * (lanes > 1) if lanes is not None else
            [f"{len(cfg.grid)} sweep points"] * bool(cfg.sweep) + [f"{len(cfg.seeds)} seeds"] * (len(cfg.seeds) > 1))
    workers = [f"{cfg.workers} workers"] * (cfg.workers > 1)
    if cfg.runtime in ("mpi", "distributed"):
        replays, layout = 1, []
    elif cfg.runtime == "async_sim":
        replays, layout = cfg.workers, workers
    elif cfg.runtime == "devices" and jax.default_backend() != "cpu":
        replays, layout = runs_here, runs + ["on each device"]
    else:
        replays, layout = runs_here * cfg.workers, runs + workers
    free, where = available or memory.available_bytes()
    _check_replays_fit(cfg, spec, replays, free, where, whose=f" ({' x '.join(layout)})" if layout else "",
                       advice=f" or train fewer {' and '.join(n.split(' ', 1)[1] for n in runs + workers)} at once"
                       if layout else "")


def _check_replays_fit(cfg: TrainConfig, spec, replays: int, free: int, where: str, *, whose: str = "",
                       advice: str = "") -> None:
    """Raises the ConfigError of :func:`check_replay_memory` and :func:`check_shared_replay_memory` if ``replays``
    replays of this run take more than ``free`` bytes, the memory ``where`` names (``"available on this host"``)."""
    from jaxdp import memory

    capacity, frame_stack = replay_layout(cfg, spec)
    one = replay_lib.bytes_required(capacity, spec.obs_shape, frame_stack, spec.obs_dtype, cfg.envs_per_worker)
    if replays * one <= free:
        return
    held = f"--buffer-size {capacity}" if cfg.buffer_size else f"the default --buffer-size {capacity}"
    if replays == 1:
        raise ConfigError(f"{held}: a DQN replay of {capacity} transitions on {cfg.env} takes "
                          f"{memory.gigabytes(one)}, more than the {memory.gigabytes(free)} {where}; lower "
                          f"--buffer-size")
    raise ConfigError(f"{held}: {replays} DQN replays{whose} of {capacity} transitions on {cfg.env} take "
                      f"{memory.gigabytes(replays * one)} ({memory.gigabytes(one)} each), more than the "
                      f"{memory.gigabytes(free)} {where}; lower --buffer-size{advice}")


def check_shared_replay_memory(cfg: TrainConfig, spec, processes: list[tuple[str, int, bool]]) -> None:
    """Raises ConfigError if the DQN replays of a multi-process job's processes that share a memory exceed it.

    On CPU the processes of one host (``mpirun -n 5`` on one machine: 4 worker ranks, 4 x 7.07 GB of Atari replays)
    share its memory; :func:`check_replay_memory` sees one process. ``processes`` holds, for every process of the
    job in rank order, ``(the memory it allocates from, bytes available there, whether it holds a replay)`` -- the
    memory named as ``"host NAME"``, or an accelerator as ``"the KIND of process I (host NAME)"`` -- gathered by the
    runtime, so that every process reaches the same verdict, and raises the same error, before any other collective.
    """
    if not cfg.is_dqn:
        return
    places: dict[str, tuple[int, int]] = {}  # memory -> (replays, the least a process there saw available)
    for place, free, holds_replay in processes:
        replays, least = places.get(place, (0, free))
        places[place] = (replays + bool(holds_replay), min(least, free))
    for place, (replays, free) in places.items():
        _check_replays_fit(cfg, spec, replays, free, f"available on {place}" if replays == 1 else "available there",
                           whose=f" (one per worker process on {place})",
                           advice=" or start fewer processes on each host")


# The largest batch a CNN sees per call on XLA:CPU (see network_apply).
CPU_CNN_MICROBATCH = 32


def cnn_on_cpu(cfg: TrainConfig, spec) -> bool:
    """Whether the network is a CNN running on XLA:CPU, whose convolutions want small batches and no loops."""
    return spec.is_atari and cfg.torso in ("auto", *CNN_TORSOS) and jax.default_backend() == "cpu"


def network_apply(cfg: TrainConfig, network, spec) -> Callable:
    """``network.apply`` as actors and losses call it.

    A CNN on XLA:CPU sees at most ``CPU_CNN_MICROBATCH`` frames per call: a convolution's im2col buffers for 128
    Pong frames leave the cache, and the A2C update of one 16-env x 8-step rollout takes 112 ms as one batch, 50 ms
    as four of 32 (2-core EPYC, jax 0.10). Same parameters, same outputs up to float rounding.
    """
    if cnn_on_cpu(cfg, spec):
        return nets_lib.microbatched(network.apply, CPU_CNN_MICROBATCH)
    return network.apply


# ---------------------------------------------------------------------------------------------------------------
# The algorithms, one lane at a time.
# ---------------------------------------------------------------------------------------------------------------
def _env_step(env, handle, obs_actions):
    return env.step(handle, obs_actions)


def _dqn_lane_fns(cfg: TrainConfig, env, network, tx, hparams: Hyperparams | None = None):
    spec = env.spec
    apply = network_apply(cfg, network, spec)
    E = cfg.envs_per_worker
    k_steps = cfg.env_steps_per_update
    steps_per_update_all = k_steps * E * cfg.workers  # per seed
    target_every = max(1, round(cfg.target_update / steps_per_update_all))
    eps_start, eps_end = _given(cfg, hparams, "eps_start"), _given(cfg, hparams, "eps_end")
    eps_fraction = _given(cfg, hparams, "eps_fraction")
    if hparams is None or hparams.eps_fraction is None:
        eps_duration = max(1.0, eps_fraction * cfg.total_steps)
    else:  # swept: maybe a traced array
        eps_duration = jnp.maximum(1.0, jnp.asarray(eps_fraction, jnp.float32) * cfg.total_steps)
    atari = spec.is_atari
    # Huber for clipped Atari rewards (Mnih et al. 2015); the squared error elsewhere (see dqn.loss).
    huber_delta = 1.0 if (cfg.loss == "huber" or (cfg.loss == "auto" and atari)) else None

    def epsilon(env_steps):
        frac = jnp.clip(env_steps / eps_duration, 0.0, 1.0)
        return eps_start + frac * (eps_end - eps_start)

    def collect(handle, lane: Lane, eps):
        key, k_act = jax.random.split(lane.key)
        q = apply(lane.params, lane.obs)
        actions = dqn.epsilon_greedy(q, eps, k_act)
        handle, st = env.step(handle, actions)
        reward = dqn.clip_reward(st.reward) if atari else st.reward
        played = Played(lane.obs, actions, reward, st.terminated, st.truncated, lane.first)
        stats, finished, rets, lens = envs_lib.episode_stats_update(lane.stats, st)
        lane = lane._replace(obs=st.obs, first=st.first, stats=stats, key=key)
        return handle, lane, played, StepInfo(finished, rets, lens)

    def store(lane: Lane, played: Played):
        """Writes the ``k_steps`` played steps into the replay, oldest first (the learner's half: acting leaves
        the replay alone, so an actor can run while the learner samples it)."""
        def add(i, buf):
            return replay_lib.add(buf, *jax.tree.map(lambda x: x[i], played))

        # A real loop, even for one step: XLA removes a loop of one trip, and then fuses the buffer's update into
        # both of its readers (the minibatch gather and the lane's output) and copies the whole buffer every
        # update (Pong DQN: 12 steps/s instead of ~190). `updates` is never negative, but XLA cannot know that.
        trips = k_steps + jnp.minimum(lane.updates, 0)
        return lane._replace(replay=jax.lax.fori_loop(0, trips, add, lane.replay))

    def gradient(lane: Lane):
        """The DQN gradient at lane.params from a replay minibatch (no optimizer: runtimes reuse this)."""
        key, k_sample = jax.random.split(lane.key)
        batch = replay_lib.sample(lane.replay, k_sample, cfg.batch_size, n_step=cfg.n_step, gamma=cfg.gamma)
        target = lane.target_params if cfg.target_network else lane.params

        def loss_fn(p):
            return dqn.loss(p, target, apply, batch, double=cfg.algo == "double_dqn",
                            huber_delta=huber_delta)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(lane.params)
        return lane._replace(key=key), grads, {"loss": loss, **metrics}

    def refresh_target(lane: Lane, params):
        """After an update: Polyak, or a hard copy every `target_every` updates (a select: no branch)."""
        n = lane.updates + 1
        if cfg.tau < 1.0:
            target_params = dqn.polyak_update(lane.target_params, params, cfg.tau)
        else:
            copy = (n % target_every) == 0
            target_params = jax.tree.map(lambda p, t: jnp.where(copy, p, t), params, lane.target_params)
        return lane._replace(params=params, target_params=target_params, updates=n)

    def learn(lane: Lane):
        lane, grads, metrics = gradient(lane)
        updates, opt_state = tx.update(grads, lane.opt_state, lane.params)
        params = optax.apply_updates(lane.params, updates)
        return refresh_target(lane._replace(opt_state=opt_state), params), metrics

    def collect_steps(handle, lane: Lane, eps):
        """The `k_steps` vectorised env steps between two gradient updates (one scan)."""

        def body(carry, _):
            h, ln = carry
            h, ln, played, info = collect(h, ln, eps)
            return (h, ln), (played, info)

        # The replay stays out of the loop: acting does not touch it, and a 1M-frame buffer carried through a
        # while loop is copied (measured: Pong DQN 12 steps/s instead of ~190).
        replay = lane.replay
        (handle, lane), (played, info) = jax.lax.scan(body, (handle, lane._replace(replay=())), None,
                                                      length=k_steps)
        return handle, lane._replace(replay=replay), played, info

    def warmup_iteration(handle, lane):
        handle, lane, played, info = collect_steps(handle, lane, 1.0)
        return handle, store(lane, played), info

    def act(handle, lane: Lane, env_steps):
        return collect_steps(handle, lane, epsilon(env_steps))  # data: the played steps, for `learn` to store

    def learn_half(lane: Lane, played: Played, env_steps):
        lane, metrics = learn(store(lane, played))
        metrics["epsilon"] = epsilon(env_steps)
        return lane, metrics

    def iteration(handle, lane: Lane, env_steps):
        handle, lane, data, info = act(handle, lane, env_steps)
        lane, metrics = learn_half(lane, data, env_steps)
        return handle, lane, info, metrics

    def gradient_step(handle, lane: Lane, env_steps):
        """Workload form: k env steps, then the gradient and the target refresh (params updated by the caller)."""
        eps = epsilon(env_steps)
        handle, lane, played, info = collect_steps(handle, lane, eps)
        lane, grads, metrics = gradient(store(lane, played))
        lane = refresh_target(lane, lane.params)
        return handle, lane, grads, info, {**metrics, "epsilon": eps}

    return LaneFunctions(warmup_iteration, iteration, gradient_step, act, learn_half)


def rollout(env, apply: Callable, handle, lane: Lane, length: int):
    """Acts for ``length`` steps with the current stochastic policy; returns an a2c.Rollout (time-major).

    ``apply(params, obs) -> (logits, value)`` is the actor-critic's apply (see :func:`network_apply`)."""

    def body(carry, _):
        h, ln = carry
        key, k_act = jax.random.split(ln.key)
        logits, value = apply(ln.params, ln.obs)
        actions = a2c.sample_action(logits, k_act)
        h, st = env.step(h, actions)
        stats, finished, rets, lens = envs_lib.episode_stats_update(ln.stats, st)
        step = a2c.Rollout(obs=ln.obs, action=actions, reward=st.reward, terminated=st.terminated,
                           truncated=st.truncated, valid=~st.first, value=value)
        ln = ln._replace(obs=st.obs, first=st.first, stats=stats, key=key)
        return (h, ln), (step, StepInfo(finished, rets, lens))

    (handle, lane), (traj, info) = jax.lax.scan(body, (handle, lane), None, length=length)
    _, bootstrap_value = apply(lane.params, lane.obs)
    return handle, lane, traj._replace(bootstrap_value=bootstrap_value), info


def _actor_critic_lane_fns(cfg: TrainConfig, env, network, tx):
    atari = env.spec.is_atari
    apply = network_apply(cfg, network, env.spec)

    def act(handle, lane: Lane, env_steps):
        """One rollout with the current policy (rewards clipped on Atari): the data of one update."""
        del env_steps
        handle, lane, traj, info = rollout(env, apply, handle, lane, cfg.rollout)
        if atari:
            traj = traj._replace(reward=dqn.clip_reward(traj.reward))
        return handle, lane, traj, info

    def gradient(lane: Lane, traj):
        def loss_fn(p):
            if cfg.algo == "a2c":
                return a2c.loss(p, apply, traj, gamma=cfg.gamma, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef)
            return reinforce.loss(p, apply, traj, gamma=cfg.gamma, baseline=cfg.baseline,
                                  ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(lane.params)
        return grads, {"loss": loss, **metrics}

    def learn(lane: Lane, traj, env_steps):
        del env_steps
        grads, metrics = gradient(lane, traj)
        updates, opt_state = tx.update(grads, lane.opt_state, lane.params)
        params = optax.apply_updates(lane.params, updates)
        return lane._replace(params=params, opt_state=opt_state, updates=lane.updates + 1), metrics

    def gradient_step(handle, lane: Lane, env_steps):
        """One rollout and the A2C / REINFORCE gradient at lane.params (no optimizer: runtimes reuse this)."""
        handle, lane, traj, info = act(handle, lane, env_steps)
        grads, metrics = gradient(lane, traj)
        return handle, lane, grads, info, metrics

    def iteration(handle, lane: Lane, env_steps):
        handle, lane, traj, info = act(handle, lane, env_steps)
        lane, metrics = learn(lane, traj, env_steps)
        return handle, lane, info, metrics

    return LaneFunctions(None, iteration, gradient_step, act, learn)


class LaneFunctions(NamedTuple):
    """What one lane of ``cfg.algo`` does; every function is written for ONE lane, unbatched.

    ``iteration(handle, lane, env_steps) -> (handle, lane, StepInfo, metrics)`` acts and learns with ``tx``; it is
    exactly ``act`` then ``learn``, its two halves (the benchmark times ``act`` alone as the actor's cost):
    ``act(handle, lane, env_steps) -> (handle, lane, data, StepInfo)`` plays (A2C/REINFORCE: ``data`` is the
    rollout; DQN: the :class:`Played` steps) and changes only the acting fields of the lane (obs, first, stats,
    key); ``learn(lane, data, env_steps) -> (lane, metrics)`` updates (DQN: stores ``data`` in the replay first)
    and changes only the learning fields (params, target_params, opt_state, replay, updates; DQN also draws
    from key) -- so the two can run at the same time (``--pipeline overlap``).
    ``gradient_step(handle, lane, env_steps) -> (handle, lane, grads, StepInfo, metrics)`` acts and returns the
    gradient at ``lane.params`` without applying it -- what a worker of an asynchronous runtime
    computes. ``warmup_iteration(handle, lane) -> (handle, lane, StepInfo)``: DQN's random play (None otherwise).
    """

    warmup_iteration: Callable | None
    iteration: Callable
    gradient_step: Callable
    act: Callable
    learn: Callable


def lane_functions(cfg: TrainConfig, env, network, tx, hparams: Hyperparams | None = None) -> LaneFunctions:
    """The :class:`LaneFunctions` of ``cfg.algo``, learning with ``tx``; ``hparams``' ε schedule, discount and loss
    weights override the config's (the learning rate and delays live in ``tx``: see :func:`make_optimizer`)."""
    if hparams is not None:
        # The losses read these from the config as numbers; a swept value is a traced one (arithmetic only).
        given = {n: getattr(hparams, n) for n in ("gamma", "ent_coef", "vf_coef") if getattr(hparams, n) is not None}
        cfg = dataclasses.replace(cfg, **given) if given else cfg
    if cfg.is_dqn:
        return _dqn_lane_fns(cfg, env, network, tx, hparams)
    return _actor_critic_lane_fns(cfg, env, network, tx)


def run_hyperparams(cfg: TrainConfig) -> Hyperparams:
    """The swept hyperparameters of every run of ``cfg`` (``cfg.runs``), arrays ``[runs]`` (float32; a swept
    ``--max-delay`` is the int32 ``delay``); ``None`` for the fields not swept (all of them without a sweep)."""
    values = {}
    for name, _ in cfg.sweep:
        # (config attribute holding the resolved value, Hyperparams field): --max-delay under --delay fixed is the
        # delay.
        attribute, field = {"lr": ("learning_rate", "learning_rate"), "max_delay": ("max_delay", "delay")}.get(
            name, (name, name))
        column = [getattr(cfg.point_config(point), attribute) for point, _ in cfg.runs]
        values[field] = jnp.asarray(column, jnp.int32 if field == "delay" else jnp.float32)
    return Hyperparams(**values)


def swept_lane_functions(cfg: TrainConfig, env, network,
                         inner: optax.GradientTransformation | None = None) -> LaneFunctions:
    """:class:`LaneFunctions` that learn with each lane's own hyperparameters (``Lane.hparams``, see
    :func:`run_hyperparams`): the optimizer and the ε schedule are built inside the lane's trace from its values,
    so one compiled program trains every point of a sweep, and a lane computes what :func:`lane_functions` of its
    point's config computes (the values are traced float32 numbers instead of Python constants)."""

    cfg = cfg.build_config  # a swept delay: the ring holds the largest

    def per_lane(name: str, lane_position: int) -> Callable:
        def fn(*args):
            hp = args[lane_position].hparams
            tx = make_optimizer(cfg, hp.learning_rate, delay=hp.delay, inner=inner)
            return getattr(lane_functions(cfg, env, network, tx, hp), name)(*args)

        return fn

    one = lane_functions(cfg, env, network, make_optimizer(cfg, inner=inner))  # which functions exist
    return LaneFunctions(
        warmup_iteration=None if one.warmup_iteration is None else per_lane("warmup_iteration", 1),
        iteration=per_lane("iteration", 1), gradient_step=per_lane("gradient_step", 1), act=per_lane("act", 1),
        learn=per_lane("learn", 0))


def _seed_strategy_keys(opt_state: PyTree, seed_key: jax.Array) -> PyTree:
    """Gives the strategies' random streams (delays of ``delayed``, lost writes of ``hogwild``) the lane's seed.

    The optimizer is built once for all lanes, with ``seed=cfg.seeds[0]``; without this every seed of a sweep would
    draw the same delays. ``seed_key`` is ``PRNGKey(seed)``, the key that seed gives on its own, so a sweep's lane
    still equals the single-seed run.
    """
    from jaxdp.strategies.delayed import DelayedState
    from jaxdp.strategies.hogwild import HogwildState

    kinds = (DelayedState, HogwildState)

    def reseed(state):
        if isinstance(state, kinds) and jnp.shape(state.key) == jnp.shape(seed_key):
            return state._replace(key=seed_key.astype(state.key.dtype))
        return state

    return jax.tree.map(reseed, opt_state, is_leaf=lambda x: isinstance(x, kinds))


def initial_params_key(seed_key: jax.Array) -> jax.Array:
    """The key of a seed's initial parameters θ_0. Every runtime derives it so, which makes a lane of a sweep, a
    single-seed run and an async simulation with the same seed start from the same θ_0."""
    return jax.random.split(seed_key)[0]


def _make_init_lane(cfg: TrainConfig, env, network, tx) -> Callable[..., Lane]:
    spec, E = env.spec, cfg.envs_per_worker

    def init_lane(seed_key: jax.Array, worker: jax.Array, obs: jax.Array | None = None) -> Lane:
        # Every worker of a seed starts from the same parameters (the global model); keys differ per worker.
        # Vmapped over seeds, the orthogonal initialisers draw one seed at a time (jaxdp.nets.initializers).
        key = jax.random.fold_in(seed_key, worker)
        if obs is None:  # the lane's reset observations, from the pool (or given by the caller)
            obs = env.initial_observation(key)
        params = network.init(initial_params_key(seed_key), obs)
        buf = ()
        if cfg.is_dqn:
            capacity, frame_stack = replay_layout(cfg, spec)
            buf = replay_lib.init(capacity, E, spec.obs_shape, spec.obs_dtype, frame_stack=frame_stack)
        return Lane(params=params, target_params=params, opt_state=_seed_strategy_keys(tx.init(params), seed_key),
                    replay=buf, obs=obs,
                    first=jnp.ones((E,), bool), stats=envs_lib.episode_stats_init(E), key=key,
                    updates=jnp.zeros((), jnp.int32))

    return init_lane


# ---------------------------------------------------------------------------------------------------------------
# make_train
# ---------------------------------------------------------------------------------------------------------------
def lane_env_seed(cfg: TrainConfig, seed: int, worker: int) -> int:
    """The seed of env 0 of the lane (seed, worker): its envs are seeded ``seed·E·N + worker·E + i``.

    Every runtime seeds a lane so, so a lane of a sweep plays the envs of the single-seed run with its seed, also
    for non-contiguous sweeps (``--seeds 0 2``), and worker w of any runtime plays those of worker w of another.
    """
    return (seed * cfg.workers + worker) * cfg.envs_per_worker


def env_seed(cfg: TrainConfig) -> int:
    """Pool seed of a run: env 0 of worker 0 of its first seed (:func:`lane_env_seed`). A pool made with an int
    seed seeds its envs consecutively, so lane k of such a pool plays the envs of the single-seed run with seed
    ``cfg.seeds[0] + k`` (``make_train_fn``'s sweeps)."""
    return lane_env_seed(cfg, cfg.seeds[0], 0)


#: The most env steps (of one lane) in one compiled chunk. The host logs, checkpoints and honours a stop request
#: only between chunks: a long run's 1% chunk would make a signal wait (a 50M-step DQN CartPole chunk: ~26 s).
MAX_CHUNK_ENV_STEPS = 100_000


def default_chunk_iterations(cfg: TrainConfig) -> int:
    """~100 chunks over a run, each at most :data:`MAX_CHUNK_ENV_STEPS` env steps, never more than the run.

    Where one exists, a length that divides the learning iterations, at most halving the chunk: a shorter last
    chunk is another program to compile (~1.5 s, a fifth of the default CartPole A2C run).
    """
    longest = max(1, MAX_CHUNK_ENV_STEPS // cfg.steps_per_iteration)
    target = max(1, min(cfg.num_iterations, math.ceil(cfg.num_iterations / 100), longest))
    return next((c for c in range(target, (target - 1) // 2, -1) if cfg.learning_iterations % c == 0), target)


def _check_inner(inner: Any, *, swept_lr: bool) -> None:
    if inner is None:
        return
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got "
                        f"{type(inner).__name__}")
    if swept_lr:  # each lane's rate is built into make_inner_optimizer's chain; a given chain has its own
        raise ValueError("inner: a given optimizer has its own learning rate, so it cannot be swept over lr; sweep "
                         "by building one chain per rate, or leave inner out")


def make_train(cfg: TrainConfig, *, chunk_iterations: int | None = None,
               inner: optax.GradientTransformation | None = None) -> Trainer:
    """Builds the environments, network, optimizer and jitted loop pieces for ``cfg``.

    Args:
      cfg: a validated :class:`TrainConfig`.
      chunk_iterations: loop iterations per jitted chunk (the host logs and checkpoints between chunks).
      inner: the learner's optax chain, e.g. ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4))``,
        in place of the one ``cfg`` names (``optimizer``, ``lr``, ``anneal_lr``, ``max_grad_norm``); the strategy
        wraps it as it wraps that one. Not with a sweep of ``lr``.

    Returns:
      A :class:`Trainer`.
    """
    _check_inner(inner, swept_lr="lr" in dict(cfg.sweep))
    S, N, E = len(cfg.runs), cfg.workers, cfg.envs_per_worker
    run_seeds = [seed for _, seed in cfg.runs]  # the seed of each run: S = grid points x seeds
    on_devices = cfg.runtime == "devices"
    # Lane (run r, worker w) plays the envs of worker w of a single-seed run with r's seed (lane_env_seed).
    if on_devices:
        from jaxdp.runtime import devices as devices_runtime

        mesh = devices_runtime.make_mesh(N, WORKERS)
        # One pool per worker (its S seed lanes), stepped on that worker's device (see device_env).
        pools = [envs_lib.make_xla(cfg.env, E, seed=[lane_env_seed(cfg, s, w) for s in run_seeds], lanes=S,
                                   episodic_life=True) for w in range(N)]
        env = device_env(pools)
    else:
        lane_seeds = [lane_env_seed(cfg, s, w) for s in run_seeds for w in range(N)]
        env = envs_lib.make_xla(cfg.env, E, seed=lane_seeds, lanes=S * N, episodic_life=True)
    spec = env.spec
    check_replay_memory(cfg, spec)  # before the lanes' replays are allocated
    network = make_network(cfg, spec)
    tx = make_optimizer(cfg.build_config, inner=inner)  # its state's structure is every lane's
    fns = swept_lane_functions(cfg, env, network, inner) if cfg.sweep else lane_functions(cfg, env, network, tx)
    warmup_iteration, iteration = fns.warmup_iteration, fns.iteration

    base_init_lane = _make_init_lane(cfg, env, network, tx)  # tx.init's state does not depend on the values
    hparams = run_hyperparams(cfg)  # [S] per swept field

    def init_lane(key: jax.Array, worker: jax.Array, hp: Hyperparams, obs: jax.Array | None = None) -> Lane:
        return base_init_lane(key, worker, obs)._replace(hparams=hp)

    workers = jnp.arange(N)
    # The env handle: the pool token is shared by every lane; each lane has its own pending-reset flags.
    handle_axes = envs_lib.XlaHandle(pool=None, pending_reset=0)

    def initial_handle() -> envs_lib.XlaHandle:
        pending = jnp.broadcast_to(env.handle.pending_reset, (S, N, E))
        return envs_lib.XlaHandle(pool=env.handle.pool, pending_reset=pending)

    if on_devices:
        # Seeds: a vmap inside each device; workers: the mesh axis, whose name the strategies' collectives use.
        def over_lanes(fn, with_metrics: bool):
            out_axes = (handle_axes, 0, 0, 0) if with_metrics else (handle_axes, 0, 0)
            return jax.vmap(fn, in_axes=(handle_axes, 0, None), out_axes=out_axes)

        # Init runs outside shard_map, as on the vmap runtime, from each pool's reset observations: the orthogonal
        # initialisers' LAPACK calls hang when several host devices run them at once (jaxlib 0.10 on CPU).
        reset_obs = jnp.stack([p.initial_obs.reshape((S, E, *spec.obs_shape)) for p in pools], axis=1)
        lane_sharding = jax.sharding.NamedSharding(mesh, _P(None, WORKERS))

        def init_replicas(keys: jax.Array) -> Lane:
            return jax.vmap(lambda k, hp, o: jax.vmap(lambda w, ow: init_lane(k, w, hp, ow))(workers, o))(
                keys, hparams, reset_obs)

        init_replicas = jax.jit(init_replicas)  # on one device, then laid out over the mesh

        def init(keys: jax.Array) -> Lane:
            chex.assert_shape(keys, (S, 2))
            return jax.device_put(init_replicas(keys), lane_sharding)
    else:
        def over_lanes(fn, with_metrics: bool):
            out_axes = (handle_axes, 0, 0, 0) if with_metrics else (handle_axes, 0, 0)
            return vmap_lanes(fn, (handle_axes, 0, None), out_axes, single=S * N == 1)

        def init(keys: jax.Array) -> Lane:
            chex.assert_shape(keys, (S, 2))
            return jax.vmap(lambda k, hp: jax.vmap(lambda w: init_lane(k, w, hp))(workers))(keys, hparams)

    # XLA:CPU runs convolution gradients 10-60x slower inside a loop (jax-ml/jax#12868; measured here: a batch-32
    # Nature-CNN gradient 30 ms alone, ~300 ms in a scan, even of length 1). For CNNs on CPU each chunk is one
    # iteration with the scan unrolled (no loop around the learner); the host loop calls it repeatedly.
    unroll = cnn_on_cpu(cfg, spec)
    steps_per_iteration = cfg.steps_per_iteration
    lane_iteration = over_lanes(iteration, with_metrics=True)

    def chunk_fn(handle, lanes: Lane, start_iteration: jax.Array, length: int):
        def body(carry, i):
            h, ln = carry
            env_steps = (start_iteration + i) * steps_per_iteration
            h, ln, info, metrics = lane_iteration(h, ln, env_steps)
            return (h, ln), (info, metrics)

        if not unroll:
            (handle, lanes), out = jax.lax.scan(body, (handle, lanes), jnp.arange(length))
            return handle, lanes, out
        # No loop at all: scan's `unroll` still leaves a one-trip while loop, which keeps XLA:CPU's slow path.
        outs = []
        for i in range(length):
            (handle, lanes), o = body((handle, lanes), jnp.int32(i))
            outs.append(o)
        return handle, lanes, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    if chunk_iterations is None:
        chunk_iterations = 1 if unroll else default_chunk_iterations(cfg)
    random_play = cfg.learning_starts // steps_per_iteration if warmup_iteration is not None else 0
    warmup_fn = None
    if warmup_iteration is not None:
        lane_warmup = over_lanes(lambda h, ln, _: warmup_iteration(h, ln), with_metrics=False)

        def warmup_fn(handle, lanes, length: int):
            def body(carry, _):
                h, ln = carry
                h, ln, info = lane_warmup(h, ln, None)
                return (h, ln), info

            (handle, lanes), info = jax.lax.scan(body, (handle, lanes), None, length=length)
            return handle, lanes, info

    if on_devices:
        chunk_fn = _on_mesh(chunk_fn, mesh, with_start=True)
        warmup_fn = None if warmup_fn is None else _on_mesh(warmup_fn, mesh, with_start=False)
    warmup = None if warmup_fn is None else jax.jit(warmup_fn, static_argnums=2, donate_argnums=1)
    chunk = jax.jit(chunk_fn, static_argnums=3, donate_argnums=1)
    if cfg.pipeline == "overlap":
        init, warmup, chunk = _overlap(cfg, fns, S * N == 1, init, warmup_fn, random_play, initial_handle)
    warmup_iters, learn_iters = cfg.acting_only_iterations, cfg.learning_iterations
    num_chunks = max(1, math.ceil(learn_iters / chunk_iterations))
    total_iterations = warmup_iters + learn_iters
    return Trainer(cfg=cfg, env=env, initial_handle=initial_handle, init=init if on_devices else jax.jit(init),
                   warmup=warmup, chunk=chunk,
                   chunk_iterations=chunk_iterations, warmup_iterations=warmup_iters, num_chunks=num_chunks,
                   total_iterations=total_iterations,
                   env_steps_per_iteration=steps_per_iteration, network=network)


def vmap_lanes(fn: Callable, in_axes: tuple, out_axes: tuple, *, single: bool) -> Callable:
    """``fn``, written for one lane, over the ``[seeds, workers]`` lane axes (axis 0 of the ``in_axes``/``out_axes``
    entries that are 0; ``None`` entries are shared): workers are a vmap named ``WORKERS`` for the strategies'
    collectives, seeds a vmap without a name.

    ``single`` (one seed, one worker): the lane axes are squeezed away and ``fn`` runs unbatched under a size-1 vmap
    that only binds the ``WORKERS`` name. The arithmetic is the same, but vmapping a convolution over batched
    weights wraps its input, kernel and output in reshapes and transposes (the batching rule's layout), which
    XLA:CPU runs ~12% slower even for one lane (measured: the A2C update of a 128-frame Pong rollout, 59 vs 53 ms
    on the 2-core EPYC; Pong training +9% A2C, +7% DQN).
    """
    if not single:
        per_seed = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, axis_name=WORKERS)
        return jax.vmap(per_seed, in_axes=in_axes, out_axes=out_axes)

    def on_lane_axes(axes, trees, edit):
        return jax.tree.map(lambda axis, tree: tree if axis is None else jax.tree.map(edit, tree), axes, trees,
                            is_leaf=lambda axis: axis is None)

    unbatched = jax.vmap(fn, in_axes=None, out_axes=None, axis_size=1, axis_name=WORKERS)

    def single_lane(*args):
        out = unbatched(*on_lane_axes(in_axes, args, lambda x: x[0, 0]))
        return on_lane_axes(out_axes, out, lambda x: x[None, None])

    return single_lane


# ---------------------------------------------------------------------------------------------------------------
# --pipeline overlap: acting and learning at the same time, with parameters one update old (Cleanba's schedule).
# ---------------------------------------------------------------------------------------------------------------
_ACTING = ("obs", "first", "stats", "key", "hparams")  # what `act` changes (and the sweep's values it reads)
_SHARED = ("params", "target_params", "key", "updates", "hparams")  # read by the learner (params, key, hparams: by
# the actor too)
_OWNED = ("opt_state", "replay")  # the learner's alone: donated to it


def _only(lanes: Lane, fields: tuple[str, ...]) -> Lane:
    """``lanes`` with every field outside ``fields`` set to ``None`` (a pytree with no leaves; not ``()``, which
    is a real value here: A2C's replay, an empty optimizer state)."""
    return Lane(*(getattr(lanes, f) if f in fields else None for f in Lane._fields))


def _merge(*parts: Lane) -> Lane:
    """One Lane from parts that each hold some fields (the first value that is not ``None`` wins)."""
    return Lane(*(next((v for v in values if v is not None), None) for values in zip(*parts)))


def _ready(fn: Callable, *args):
    out = fn(*args)
    jax.block_until_ready(out)
    return out


def _overlap(cfg: TrainConfig, fns: LaneFunctions, single: bool, base_init: Callable, random_play_fn,
             random_play: int, initial_handle: Callable) -> tuple[Callable, Callable, Callable]:
    """``(init, warmup, chunk)`` of ``--pipeline overlap``, for the vmap runtime.

    Iteration ``k`` acts with the parameters before update ``k - 1`` and, at the same time, learns the data acted
    in iteration ``k - 1`` -- an actor thread and the learner (the calling thread) each run one jitted program
    and block on it (one thread blocking on both gains nothing: XLA:CPU runs them one after the other). The
    schedule is fixed, not "whatever parameters are ready", so a run is as deterministic as a fused one:

        data_0 = act(θ_0)                                   (warmup: the last acting-only iteration)
        data_k = act(θ_{k-1})  ||  θ_k = learn(θ_{k-1}, data_{k-1})     for k = 1, 2, ...

    The data acted but not learned yet rides in ``Lane.pending`` (so it is checkpointed); the data of the last
    iteration is never learned, so a run takes exactly ``--total-steps`` env steps and one update fewer than
    fused. Acting changes only (obs, first, stats, key), learning only (params, target_params, opt_state,
    replay, updates); the learner draws its random numbers (DQN's minibatches) from ``fold_in(key, 1)``, a stream
    apart from the actor's. Nothing the actor reads is donated to the learner.
    """
    handle_axes = envs_lib.XlaHandle(pool=None, pending_reset=0)
    steps_per_iteration = cfg.steps_per_iteration
    lane_act = vmap_lanes(fns.act, (handle_axes, 0, None), (handle_axes, 0, 0, 0), single=single)

    def learn_apart(lane: Lane, data, env_steps):
        lane, metrics = fns.learn(lane._replace(key=jax.random.fold_in(lane.key, 1)), data, env_steps)
        return lane, metrics

    lane_learn = vmap_lanes(learn_apart, (0, 0, None), (0, 0), single=single)

    def act_program(handle, params, acting: Lane, iteration):
        env_steps = iteration * steps_per_iteration
        handle, lanes, data, info = lane_act(handle, acting._replace(params=params), env_steps)
        return handle, _only(lanes, _ACTING), data, info

    def learn_program(shared: Lane, owned: Lane, data, iteration):
        lanes, metrics = lane_learn(_merge(shared, owned), data, iteration * steps_per_iteration)
        return _only(lanes, ("params", "target_params", "opt_state", "replay", "updates")), metrics

    act_jit = jax.jit(act_program)
    learn_jit = jax.jit(learn_program, donate_argnums=1)
    actor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxdp-actor")

    def init(keys: jax.Array) -> Lane:
        lanes = base_init(keys)
        data = jax.eval_shape(lane_act, initial_handle(), lanes, 0)[2]
        return lanes._replace(pending=jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), data))

    def warmup_fn(handle, lanes: Lane, length: int):
        """The acting-only iterations left: DQN's random play, then the first data (acted into ``pending``)."""
        infos = []
        if length > 1:
            handle, lanes, info = random_play_fn(handle, lanes, length - 1)
            infos.append(info)
        handle, acted, data, info = lane_act(handle, lanes, random_play * steps_per_iteration)
        infos.append(jax.tree.map(lambda x: x[None], info))
        lanes = _merge(_only(acted, _ACTING), lanes)._replace(pending=data)
        return handle, lanes, jax.tree.map(lambda *xs: jnp.concatenate(xs), *infos)

    def chunk(handle, lanes: Lane, start_iteration, length: int):
        """``length`` overlapped iterations from ``start_iteration`` (host code: two programs per iteration)."""
        infos, metrics = [], []
        for i in range(length):
            k = int(start_iteration) + i
            acting = actor.submit(_ready, act_jit, handle, lanes.params, _only(lanes, _ACTING), jnp.int32(k))
            try:
                learned, m = _ready(learn_jit, _only(lanes, _SHARED), _only(lanes, _OWNED), lanes.pending,
                                    jnp.int32(k - 1))
            finally:
                handle, acted, data, info = acting.result()  # never leave the actor running on a failure
            lanes = _merge(learned, acted)._replace(pending=data)
            infos.append(info)
            metrics.append(m)
        return handle, lanes, jax.tree.map(lambda *xs: jnp.stack(xs), *zip(infos, metrics))

    warmup = jax.jit(warmup_fn, static_argnums=2, donate_argnums=1)
    return init, warmup, chunk


# ---------------------------------------------------------------------------------------------------------------
# The devices runtime: one worker per device, the same lane code under shard_map.
# ---------------------------------------------------------------------------------------------------------------
def _P(*axes):
    from jax.sharding import PartitionSpec

    return PartitionSpec(*axes)


def device_env(pools: list) -> envs_lib.XlaEnv:
    """One env for every device of a ``"workers"`` mesh: on device w it steps ``pools[w]`` and no other.

    envpool bakes its pool into the XLA custom call (a static attribute, not the handle's bytes), so a pool cannot
    be chosen by sharding data: the pools' steps are the branches of a ``lax.switch`` on
    ``lax.axis_index("workers")``; each device runs only its own branch. Each pool holds the S seed lanes of its
    worker, so seeds stay a ``vmap`` inside the device (``custom_vmap`` batches through the switch). Use inside
    ``shard_map`` over a mesh with axis ``"workers"`` of ``len(pools)`` devices.
    """
    first = pools[0]
    if len({(p.spec, p.lanes) for p in pools}) != 1:
        raise ValueError("device_env: every pool must have the same spec and lanes")
    steps = [p.step for p in pools]
    initial = [p.initial_observation for p in pools]

    def step(handle, actions):
        return jax.lax.switch(jax.lax.axis_index(WORKERS), steps, handle, actions)

    def initial_observation(key):
        return jax.lax.switch(jax.lax.axis_index(WORKERS), initial, key)

    return first._replace(step=step, initial_observation=initial_observation)


def _on_mesh(fn: Callable, mesh, *, with_start: bool) -> Callable:
    """``fn(handle, lanes, [start,] length)`` written for lanes [S, ...] per device, as a function of the global
    lanes [S, N, ...] sharded over the workers axis (outputs [iterations, S, N, ...]).

    ``check_vma`` is off: envpool's custom call has no varying-axes rule, and every value here is per worker by
    construction (parameters carry the worker axis; see :mod:`jaxdp.runtime.devices` for why).
    """
    from jaxdp.runtime import devices as devices_runtime

    handle_spec = envs_lib.XlaHandle(pool=_P(), pending_reset=_P(None, WORKERS))
    lane_spec = _P(None, WORKERS)
    squeeze = lambda tree: jax.tree.map(lambda x: x[:, 0], tree)  # noqa: E731
    expand = lambda tree, axis: jax.tree.map(lambda x: jnp.expand_dims(x, axis), tree)  # noqa: E731

    def wrapped(handle, lanes, *rest):
        *start, length = rest

        def per_device(handle, lanes, *start):
            handle = handle._replace(pending_reset=handle.pending_reset[:, 0])
            handle, lanes, out = fn(handle, squeeze(lanes), *start, length)
            handle = handle._replace(pending_reset=handle.pending_reset[:, None])
            return handle, expand(lanes, 1), expand(out, 2)

        in_specs = (handle_spec, lane_spec) + ((_P(),) if with_start else ())
        out_specs = (handle_spec, lane_spec, _P(None, None, WORKERS))
        sharded = devices_runtime.shard_map_unchecked(per_device, mesh, in_specs=in_specs, out_specs=out_specs)
        return sharded(handle, lanes, *start)

    return wrapped


def train(trainer: Trainer, keys: jax.Array):
    """The whole run as one pure function of ``keys[S]`` (no logging): returns the final lanes and every episode.

    Jittable (with ``pipeline="fused"``); the env step is batched by ``custom_vmap`` so this may itself be vmapped
    when the pool was built with enough lanes.
    """
    handle = trainer.initial_handle()
    lanes = trainer.init(keys)
    warm_info = None
    if trainer.warmup is not None and trainer.warmup_iterations > 0:
        handle, lanes, warm_info = trainer.warmup(handle, lanes, trainer.warmup_iterations)
    outs = []
    start = trainer.warmup_iterations
    while start < trainer.total_iterations:
        length = min(trainer.chunk_iterations, trainer.total_iterations - start)
        handle, lanes, out = trainer.chunk(handle, lanes, jnp.int32(start), length)
        outs.append(out)
        start += length
    return lanes, warm_info, outs


class TrainOutput(NamedTuple):
    """What :func:`make_train_fn`'s ``train`` returns for one seed."""

    lanes: Lane  # final per-worker state, leading axis N
    episodes: StepInfo  # every env step's episode ends, [iterations, N, (k,) E]
    metrics: dict  # learner metrics per iteration, [iterations, N]


def _batched_like(key: jax.Array, hparams: Hyperparams) -> jax.Array:
    """``key``, batched also over the vmapped axes of ``hparams``.

    Every vmapped call is a lane of the env pool: a sweep over (keys x learning rates) must step keys x learning
    rates x workers lanes, so the key, which the lanes' state comes from, has to carry the hyperparameters' axes.
    Adding a zero computed from each hyperparameter does that without changing the key's value."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    for leaf in jax.tree.leaves(hparams):
        # isnan, not x * 0: a zero whatever the value (inf * 0 is NaN, and NaN has no integer value).
        data = data + jnp.isnan(jnp.sum(jax.lax.stop_gradient(jnp.asarray(leaf)))).astype(data.dtype) * 0
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


def make_train_fn(cfg: TrainConfig, *, lanes: int = 1,
                  inner: optax.GradientTransformation | None = None) -> tuple[Callable[..., TrainOutput], Any]:
    """The whole run of ONE seed as a pure function ``train(key, hparams=None) -> TrainOutput``.

    PureJaxRL's ``make_train``: ``jax.jit(train)(key)`` is one program (warmup and learning scans, no host loop);
    ``jax.vmap(train)(keys)`` trains ``lanes`` seeds at once, and ``hparams``, a :class:`Hyperparams` of numbers or
    arrays, sweeps the learning rate, DQN's ε schedule and the stale-gradient delays::

        hp = Hyperparams(learning_rate=jnp.array([1e-3, 3e-3]))
        jax.vmap(train, in_axes=(None, Hyperparams(learning_rate=0)))(key, hp)

    Every vmapped call is a lane of the env pool, which holds ``lanes`` × workers × E envs and whose step is batched
    by ``custom_vmap``: exactly ``lanes`` vmapped calls must share it (nested vmaps multiply). Lane ``l`` plays the
    envs of a single-seed run with seed ``cfg.seeds[0] + l`` (see :func:`env_seed`). The pool is stateful C++: build
    a new function (``make_train_fn`` again) to replay a run. ``inner``: the learner's own optax chain, as for
    :func:`make_train` (then ``Hyperparams.learning_rate`` cannot be given).

    Returns:
      ``(train, env)``.
    """
    if cfg.pipeline != "fused":
        raise ValueError(f"make_train_fn: the whole run is one program, so acting and learning cannot overlap "
                         f"(pipeline={cfg.pipeline!r}); use make_train, or pipeline='fused'")
    if cfg.sweep:
        raise ValueError("make_train_fn: train is one run; sweep it with jax.vmap over Hyperparams (cfg.sweep is "
                         "the grid of make_train and jaxdp train)")
    N, E = cfg.workers, cfg.envs_per_worker
    env = envs_lib.make_xla(cfg.env, E, seed=env_seed(cfg), lanes=lanes * N, episodic_life=True)
    check_replay_memory(cfg, env.spec, lanes=lanes)  # the replays are allocated inside train, lanes x N of them
    network = make_network(cfg, env.spec)
    steps_per_iteration = cfg.steps_per_iteration
    handle_axes = envs_lib.XlaHandle(pool=None, pending_reset=0)
    workers = jnp.arange(N)

    def train(key: jax.Array, hparams: Hyperparams | None = None) -> TrainOutput:
        hp = check_hyperparams(cfg, Hyperparams() if hparams is None else hparams)
        _check_inner(inner, swept_lr=hp.learning_rate is not None)
        tx = make_optimizer(cfg, hp.learning_rate, delay=hp.delay, inner=inner)
        fns = lane_functions(cfg, env, network, tx, hp)
        warmup_iteration, iteration = fns.warmup_iteration, fns.iteration
        init_lane = _make_init_lane(cfg, env, network, tx)
        lane_key = _batched_like(key, hp)
        state = jax.vmap(lambda w: init_lane(lane_key, w))(workers)
        # Derive the pending-reset flags from the lanes so they carry the same (possibly vmapped) batching.
        handle = envs_lib.XlaHandle(pool=env.handle.pool, pending_reset=jnp.zeros_like(state.first))
        warmup_iters = 0
        if warmup_iteration is not None:
            warmup_iters = cfg.learning_starts // steps_per_iteration
            per_worker_warmup = jax.vmap(warmup_iteration, in_axes=(handle_axes, 0),
                                         out_axes=(handle_axes, 0, 0), axis_name=WORKERS)

            def warm_body(carry, _):
                h, st = carry
                h, st, _ = per_worker_warmup(h, st)
                return (h, st), None

            (handle, state), _ = jax.lax.scan(warm_body, (handle, state), None, length=warmup_iters)
        per_worker = jax.vmap(iteration, in_axes=(handle_axes, 0, None), out_axes=(handle_axes, 0, 0, 0),
                              axis_name=WORKERS)

        def body(carry, i):
            h, st = carry
            h, st, info, metrics = per_worker(h, st, (warmup_iters + i) * steps_per_iteration)
            return (h, st), (info, metrics)

        learn_iters = max(1, cfg.num_iterations - warmup_iters)
        (_, state), (info, metrics) = jax.lax.scan(body, (handle, state), jnp.arange(learn_iters))
        return TrainOutput(lanes=state, episodes=info, metrics=metrics)

    return train, env


def seed_keys(cfg: TrainConfig) -> jax.Array:
    """The key of every run (``cfg.runs``): ``PRNGKey(seed)``, the key of that seed's run alone."""
    return jnp.stack([jax.random.PRNGKey(seed) for _, seed in cfg.runs])


def run(cfg: TrainConfig):
    """Trains ``cfg`` on its runtime, with logging and checkpoints; returns the summary dict.

    * vmap: one program on one device (:mod:`jaxdp.loop`);
    * async_sim: the deterministic asynchronous master (:mod:`jaxdp.train_async`, HSA2C / A3C / Gorila);
    * mpi: this process is one rank under ``mpirun`` (:mod:`jaxdp.runtime.mpi`), the agent as a Workload;
    * distributed: this process is one of a ``jax.distributed`` job (:mod:`jaxdp.runtime.distributed`).
    """
    if cfg.runtime == "async_sim":
        from jaxdp import train_async

        return train_async.run(cfg, comm_time=cfg.comm_time)
    if cfg.runtime == "mpi":
        return run_mpi(cfg)
    if cfg.runtime == "distributed":
        return run_distributed(cfg)
    from jaxdp import loop  # host side: progress, metrics files, checkpoints

    return loop.run(cfg)


def run_mpi(cfg: TrainConfig):
    """One rank of ``mpirun -n K jaxdp train --runtime mpi --strategy {sync,async,dpsgd}``.

    sync: all K ranks are workers that all-reduce every gradient; async (Downpour, B = 1) and dpsgd (B local
    steps): rank 0 is the parameter server, ranks 1..K-1 are workers, each with its own envs. ``--total-steps``
    counts env steps of all workers together; the world size decides the workers (``jaxdp train`` refuses a
    ``--workers`` that differs).
    """
    from mpi4py import MPI

    from jaxdp.loop import remover_of_new_files
    from jaxdp.runtime import mpi as mpi_runtime
    from jaxdp.workloads.rl import rl_workload

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # What rank 0 would remove after a full disk met before any checkpoint (_stops_in_env_steps), taken before any
    # rank writes there. The folder is its own: each rank stamped its default --logdir, and rank 0's is the job's.
    forget_run = remover_of_new_files(cfg.logdir) if rank == 0 and not cfg.resume else None
    # Every rank has checked --logdir (jaxdp.cli.resolve_logdir); rank 0 writes nothing there before all have.
    comm.Barrier()
    # One folder for the job: each rank stamped its own default --logdir, maybe a second apart.
    cfg = dataclasses.replace(cfg, logdir=comm.bcast(cfg.logdir, root=0))
    mode = cfg.strategy
    worker_id = rank if mode == "sync" else max(rank - 1, 0)
    # The world size decides the workers (the epsilon schedule and learning-starts count all workers' env steps).
    cfg = dataclasses.replace(cfg, workers=size if mode == "sync" else max(1, size - 1))
    if mode != "sync" and cfg.master_batch > cfg.workers:  # known now, before anything is written (validate left it)
        raise ConfigError(f"--master-batch M={cfg.master_batch} is larger than this job's {cfg.workers} worker"
                          f"{'s' * (cfg.workers != 1)}: start it with mpirun -n {cfg.master_batch + 1} or more "
                          f"(rank 0 serves the parameters)")
    if cfg.is_dqn and jax.default_backend() == "cpu":  # the worker ranks of one host share its memory
        from jaxdp import memory

        holds_replay = mode == "sync" or rank != 0  # the parameter server plays no envs
        check_shared_replay_memory(cfg, envs_lib.make_spec(cfg.env, cfg.envs_per_worker),
                                   comm.allgather((f"host {MPI.Get_processor_name()}", memory.host_available_bytes(),
                                                   holds_replay)))
    _save_run_config(cfg, rank)
    # The master (rank 0) holds no envs of its own and evaluates nothing while the job runs (the workers report their
    # episodes); the greedy games of the final θ follow the run (_write_rl_summary).
    workload = rl_workload(cfg, worker_id, eval_steps=0)
    per_local_step = cfg.envs_per_worker * (cfg.env_steps_per_update if cfg.is_dqn else cfg.rollout)
    if mode == "sync":
        per_update = per_local_step * size
        outer = None
    else:
        b = cfg.local_steps if mode == "dpsgd" else 1
        per_update = per_local_step * b * cfg.master_batch
        # The master's step on the arrivals: η_g, for Downpour's gradients as for DPSGD's update vectors (async_sim's
        # async master scales its steps by --global-lr too).
        outer = optax.sgd(cfg.global_lr)
    total_updates = max(1, cfg.total_steps // per_update)
    # Each worker's own optimizer steps over the run (the annealing horizon): all env steps / its share.
    worker_steps = max(1, cfg.total_steps // (per_local_step * cfg.workers))
    record_hook = lambda record, steps: {**record, **_in_env_steps(record, per_update)}  # noqa: E731
    with (_stops_in_env_steps(per_update, forget_run),
          _mirrored_to_tensorboard(cfg, record_hook, rank == 0) as record_hook):
        summary = mpi_runtime.run_mpi(
            workload, mode=mode, inner=make_inner_optimizer(cfg, decay_steps=worker_steps), outer=outer,
            local_steps=cfg.local_steps if mode == "dpsgd" else 1, master_batch=cfg.master_batch,
            total_updates=total_updates, seed=cfg.seeds[0], logdir=cfg.logdir,
            # A point and a checkpoint every 2% and 10% of the run, and every --log-interval and --checkpoint-interval
            # seconds (rank 0's clock), as in every jaxdp train run.
            log_every=max(1, total_updates // 50), log_seconds=cfg.log_interval, print_points=cfg.progress,
            checkpoint_every=max(1, total_updates // 10), checkpoint_seconds=cfg.checkpoint_interval,
            resume=cfg.resume, config=dataclasses.asdict(cfg),
            record_hook=record_hook)
    if rank != 0 or summary is None:
        return None
    return _write_rl_summary(cfg, summary, per_update)


def _save_run_config(cfg: TrainConfig, rank: int) -> None:
    """Every process of a multi-process job checks a ``--resume`` against the saved config, now that the job's size
    (``cfg.workers``) is known; process 0 then saves ``cfg`` for the next one. Every process reads the same file,
    so all of them stop, with the same ConfigError, before any collective."""
    from jaxdp import config as config_lib

    if rank == 0:
        config_lib.save_run_config(cfg, cfg.logdir)
    else:
        config_lib.check_resumable(cfg, cfg.logdir)


def _in_env_steps(record: dict, per_update: int) -> dict:
    """A multi-process runtime's log record (``step`` = updates, ``sps`` = updates/s) counted as every ``jaxdp
    train`` run counts: ``step`` and ``sps`` in env steps of all workers, the updates and their rate beside them."""
    updates, rate = record["step"], record.get("sps")
    return {"step": updates * per_update, "updates": updates, "sps": None if rate is None else rate * per_update,
            "updates_per_second": rate}


@contextlib.contextmanager
def _stops_in_env_steps(per_update: int, forget_run: Callable[[], None] | None = None) -> Iterator[None]:
    """A multi-process runtime's :class:`~jaxdp.stopping.RunStopped` and :class:`~jaxdp.stopping.WriteFailed`
    (counted in updates) counted in env steps, as every ``jaxdp train`` run counts. A full disk met before the first
    checkpoint leaves nothing to resume, and what the run wrote would make ``--logdir`` refuse the same command:
    ``forget_run`` (process 0's) removes it, as a single-process run does (:func:`jaxdp.loop.writes_in`)."""
    from jaxdp.stopping import RunStopped, WriteFailed

    try:
        yield
    except RunStopped as stop:
        raise RunStopped(stop.signum, stop.step * per_update, stop.total_steps * per_update, stop.logdir,
                         report=stop.report, evaluating=stop.evaluating) from None
    except WriteFailed as failed:
        removed = failed.checkpoint_step is None and forget_run is not None
        if removed:
            forget_run()
        raise failed.counted(per_update, removed) from failed.__cause__


@contextlib.contextmanager
def _mirrored_to_tensorboard(cfg: TrainConfig, record_hook: Callable[[dict, int], dict], writes_outputs: bool
                             ) -> Iterator[Callable[[dict, int], dict]]:
    """``record_hook``, and on the process that writes the outputs each record it returns also written to
    TensorBoard (``logdir/tb``, unless ``--no-tensorboard``), as a single-process run's are: the multi-process
    runtimes write metrics.jsonl themselves and pass every record through the hook first."""
    if not (writes_outputs and cfg.tensorboard and cfg.logdir):
        yield record_hook
        return
    import os

    from tensorboardX import SummaryWriter

    from jaxdp.loop import add_scalars

    tb = SummaryWriter(os.path.join(cfg.logdir, "tb"))

    def mirrored(record: dict, steps_since: int) -> dict:
        out = record_hook(record, steps_since)
        add_scalars(tb, out)
        return out

    try:
        yield mirrored
    finally:
        tb.close()


def _write_rl_summary(cfg: TrainConfig, summary: dict, per_update: int) -> dict:
    """Process 0 of a multi-process run: adds RL's summary fields and writes summary.json.

    ``total_steps``, ``start_step`` (where a ``--resume`` began) and ``sps`` count env steps (``per_update`` per
    update); ``total_updates`` and ``start_update`` count updates. The final return is the mean episodic
    return of the log points in the last 10% of the run's env steps (:func:`jaxdp.loop.final_return`, each point the
    mean of its episodes), read back from metrics.jsonl (the master sees the workers' episodes only as per-step
    sums). ``eval_return`` is the mean of ``--eval-episodes`` greedy games of the final parameters (the
    server's θ, or the all-reduced θ every worker holds), played here as a single-process run plays them, after the
    other processes are done, and timed apart (``eval_seconds``). The runtime's ``params`` stay out: they are the
    checkpoint's (as JSON, a Nature CNN's would be 60 MB).
    """
    import json
    import os

    from jaxdp import atomic, provenance
    from jaxdp import envs as envs_lib
    from jaxdp.loop import divergence_fields, diverged, evaluate_runs, evaluation_fields, final_return, writes_in

    with open(os.path.join(cfg.logdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    points = [(r["step"], r["episodic_return"]) for r in records if r.get("episodic_return") is not None]
    network = make_network(cfg, envs_lib.make_spec(cfg.env, cfg.envs_per_worker))
    (eval_returns,), eval_seconds = evaluate_runs(cfg, network, [summary["params"]], [cfg.seeds[0]])
    divergence = divergence_fields(summary["params"], records)
    summary = {k: v for k, v in summary.items() if k != "params"}
    updates, start_update = int(summary["total_updates"]), int(summary["start_step"])
    # Steps in env steps, as in every jaxdp train summary; the runtime's update counts stand beside them.
    summary.update(total_steps=updates * per_update, start_step=start_update * per_update, start_update=start_update,
                   final_return=final_return([st for st, _ in points], [r for _, r in points], updates * per_update),
                   **evaluation_fields(eval_returns), eval_seconds=eval_seconds,
                   **divergence, diverged_runs=int(diverged(divergence)),
                   sps=(updates - start_update) * per_update / max(summary["wall_seconds"], 1e-9),
                   provenance=provenance.describe())
    # The checkpoint at the last update is whole: a full disk now loses only the summary, which --resume rewrites.
    with writes_in(cfg.logdir, "writing the summary", checkpoint_step=lambda: summary["total_steps"]):
        atomic.write_json(os.path.join(cfg.logdir, "summary.json"), summary)
    return summary


def run_distributed(cfg: TrainConfig):
    """One process of ``jaxdp train --runtime distributed --strategy sync`` (multi-controller JAX).

    Every process runs this; each of its devices is one worker with its own envs (seeded like worker w of the vmap
    runtime), all-reducing gradients over every device of every process each step
    (:func:`jaxdp.runtime.distributed.run_distributed`, gloo on CPU, NCCL on GPUs). One local device per process:
    a process's envpool pool belongs to one worker. ``--total-steps`` counts env steps of all workers;
    the job's device count decides the workers (``jaxdp train`` refuses a ``--workers`` that differs). Process 0
    writes the outputs.
    """
    import jax

    from jaxdp.loop import remover_of_new_files
    from jaxdp.runtime import distributed as dist
    from jaxdp.workloads.rl import rl_workload

    given = cfg.num_processes > 0
    try:
        dist.initialize(cfg.coordinator if given else None, cfg.num_processes if given else None,
                        cfg.process_id if given else None)
    except ValueError as e:  # auto-detection found no cluster: nothing has started, and nothing was written
        if given:
            raise
        raise ConfigError(f"--runtime distributed found no cluster to join ({e}): give --coordinator "
                          f"HOST:PORT, --num-processes and --process-id, or launch it under srun") from e
    if jax.local_device_count() != 1:
        raise SystemExit(f"jaxdp train: error: --runtime distributed runs one worker per process, but this process "
                         f"has {jax.local_device_count()} devices: restrict each process to one (e.g. "
                         f"CUDA_VISIBLE_DEVICES) or use --runtime devices within a process")
    num_workers = jax.device_count()
    worker_id = jax.devices().index(jax.local_devices()[0])
    cfg = dataclasses.replace(cfg, workers=num_workers)
    if cfg.is_dqn:  # checked here, not by the command line: asking the device would have started JAX's backend
        check_shared_replay_memory(cfg, envs_lib.make_spec(cfg.env, cfg.envs_per_worker), dist.memories())
    # What process 0 would remove after a full disk met before any checkpoint (_stops_in_env_steps); the others write
    # nothing in --logdir.
    forget_run = remover_of_new_files(cfg.logdir) if jax.process_index() == 0 and not cfg.resume else None
    _save_run_config(cfg, jax.process_index())
    per_update = cfg.steps_per_iteration  # env steps of all workers per synchronous update
    total_updates = max(1, cfg.total_steps // per_update)
    workload = rl_workload(cfg, worker_id, eval_steps=0)

    def record_hook(record: dict, steps_since: int) -> dict:
        # train_* are means over workers and the steps since the last point: ratios of means are ratios of sums.
        episodes = record.pop("train_episodes", None)
        return_sum = record.pop("train_episode_return_sum", None)
        out = _in_env_steps(record, per_update)
        out.update(episodic_return=return_sum / episodes if episodes else None,
                   episodes=round((episodes or 0.0) * num_workers * steps_since))
        out.update({k.removeprefix("train_"): v for k, v in record.items() if k not in ("step", "sps")})
        return out

    with (_stops_in_env_steps(per_update, forget_run),
          _mirrored_to_tensorboard(cfg, record_hook, jax.process_index() == 0) as record_hook):
        summary = dist.run_distributed(
            workload, inner=make_inner_optimizer(cfg, decay_steps=total_updates), total_updates=total_updates,
            seed=cfg.seeds[0], logdir=cfg.logdir, log_every=max(1, total_updates // 100), log_seconds=cfg.log_interval,
            print_points=cfg.progress,
            checkpoint_every=max(1, total_updates // 10), checkpoint_seconds=cfg.checkpoint_interval,
            resume=cfg.resume, config=dataclasses.asdict(cfg),
            check_vma=False, record_hook=record_hook)
    if summary.get("process_id") != 0:
        return None
    return _write_rl_summary(cfg, summary, per_update)


__all__ = [
    "Hyperparams", "check_hyperparams", "run_hyperparams", "swept_lane_functions", "Lane", "LaneFunctions",
    "StepInfo", "lane_functions", "vmap_lanes",
    "TrainOutput", "Trainer", "make_train_fn", "make_inner_optimizer", "make_network", "make_optimizer",
    "make_train", "run", "seed_keys", "train", "env_seed", "lane_env_seed", "device_env", "network_apply",
    "cnn_on_cpu", "rollout", "delay_distribution",
]
