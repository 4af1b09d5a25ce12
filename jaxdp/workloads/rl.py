"""An RL agent as a :class:`~jaxdp.workloads.base.Workload`: what one worker of a multi-process run computes.

A worker owns its own envpool pool (``E`` envs, seeded apart from the other workers'), its episode statistics and,
for DQN, its replay buffer and target network -- all in ``worker_state``. ``local_step(worker_state, params, key)``
acts with ``params`` (one A2C/REINFORCE rollout, or ``train_frequency`` DQN env steps), and returns the gradient at
``params`` (:func:`jaxdp.train.lane_functions`' ``gradient_step``): the runtime (MPI parameter server, all-reduce,
async simulator) decides how gradients become parameters. Its metrics report the real-game episodes that ended
(``episodes``, ``episode_return_sum``) so a master can log the episodic return, and DQN's ``epsilon`` and
``learning`` (1 when the step's gradient counts, 0 while the replay fills).
``restart(worker_state, params, n)`` places a fresh worker of a resumed run at its ``n`` local steps: on the ε
schedule and the target network's period, with θ⁻ = the restored θ, its empty replay refilled before it learns
(its gradients are zero meanwhile; an optimizer with momentum, restored with the run, still moves θ along its
decaying momentum for those steps).

``evaluate(params)`` plays the greedy policy for ``eval_steps`` steps on a separate pool (no episodic life) and
returns the mean return of the games that ended in that call (NaN when none did). The pool carries on from call to
call, so a game that spans two calls counts whole; ``evaluate`` runs on the host and refuses to be traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdp import envs as envs_lib
from jaxdp import train as train_lib
from jaxdp.agents import replay as replay_lib
from jaxdp.config import TrainConfig
from jaxdp.workloads.base import Workload


def rl_workload(cfg: TrainConfig, worker_id: int = 0, *, eval_steps: int = 1000, eval_envs: int = 4) -> Workload:
    """The worker ``worker_id`` of ``cfg`` (algo, env, envs per worker, hyperparameters) as a Workload.

    ``cfg.workers`` must be the job's worker count: the DQN exploration schedule and ``--learning-starts`` count the
    env steps of all workers (a DQN gradient is zero until then).

    Args:
      cfg: a validated TrainConfig; its optimizer is NOT used here (the runtime owns the update rule).
      worker_id: this worker's index: it plays the envs of worker ``worker_id`` of the vmap runtime
        (:func:`jaxdp.train.lane_env_seed`).
      eval_steps: greedy steps per ``evaluate`` call (0: ``evaluate`` returns ``{}``).
      eval_envs: envs of the evaluation pool.
    """
    E = cfg.envs_per_worker
    seed = train_lib.lane_env_seed(cfg, cfg.seeds[0], worker_id)
    env = envs_lib.make_xla(cfg.env, E, seed=seed, episodic_life=True)
    network = train_lib.make_network(cfg, env.spec)
    no_optimizer = optax.identity()  # lanes keep an optimizer state slot; workers here never apply updates
    init_lane = train_lib._make_init_lane(cfg, env, network, no_optimizer)
    gradient_step = train_lib.lane_functions(cfg, env, network, no_optimizer).gradient_step
    steps_per_local_step = cfg.envs_per_worker * (cfg.env_steps_per_update if cfg.is_dqn else cfg.rollout)

    def init(key: jax.Array):
        lane = init_lane(key, jnp.int32(worker_id))
        handle = envs_lib.XlaHandle(pool=env.handle.pool, pending_reset=jnp.zeros_like(lane.first))
        return lane.params, (handle, lane)

    def local_step(worker_state, params, key):
        handle, lane = worker_state
        # Env steps so far drive the DQN epsilon schedule (updates count local steps of this worker).
        env_steps = lane.updates * steps_per_local_step * cfg.workers
        stored = replay_lib.size(lane.replay) if cfg.is_dqn else None  # before this step's play is stored
        lane = lane._replace(params=params, key=key)
        handle, lane, grads, info, metrics = gradient_step(handle, lane, env_steps)
        if cfg.is_dqn:
            # Random play fills the replay until --learning-starts (all workers' steps): no learning signal yet.
            # A restarted worker (a resumed run) refills its empty replay as far first: in a fresh run the second
            # condition follows from the first (stored · N = env_steps until the buffer is full), so it changes
            # nothing there.
            capacity = lane.replay.action.shape[0] * lane.replay.action.shape[1]
            refilled = stored * cfg.workers >= min(cfg.learning_starts, capacity * cfg.workers)
            learning = (env_steps >= cfg.learning_starts) & refilled
            grads = jax.tree.map(lambda g: jnp.where(learning, g, jnp.zeros_like(g)), grads)
            metrics = {**metrics, "learning": learning.astype(jnp.float32)}  # logged: the share of steps that learn
        else:  # actor-critic counts its update here (DQN's gradient_step counts its own, for the target refresh)
            lane = lane._replace(updates=lane.updates + 1)
        finished = info.finished
        metrics = dict(metrics)
        metrics["episodes"] = jnp.sum(finished).astype(jnp.float32)
        metrics["episode_return_sum"] = jnp.sum(jnp.where(finished, info.returns, 0.0))
        return (handle, lane), grads, metrics

    def restart(worker_state, params, local_steps_done: int):
        # `updates` counts this worker's local steps (DQN: its gradient steps), which place it on the ε schedule
        # and the target network's refresh period; the target network starts from the restored θ, the newest
        # parameters there are (an uninterrupted run's is at most a refresh period older).
        handle, lane = worker_state
        lane = lane._replace(updates=jnp.asarray(local_steps_done, lane.updates.dtype),
                             target_params=params if cfg.is_dqn else lane.target_params)
        return handle, lane

    evaluate = _make_evaluate(cfg, network, eval_steps, eval_envs, seed=10_000 + worker_id)
    return Workload(init=init, local_step=local_step, evaluate=evaluate, name=f"{cfg.algo}:{cfg.env}",
                    unroll_local_steps=train_lib.cnn_on_cpu(cfg, env.spec), restart=restart)


def _make_evaluate(cfg: TrainConfig, network, eval_steps: int, eval_envs: int, seed: int):
    if eval_steps <= 0:
        return lambda params: {}
    env = envs_lib.make_xla(cfg.env, eval_envs, seed=seed, episodic_life=False)
    state = {"handle": env.handle, "obs": env.initial_obs, "stats": envs_lib.episode_stats_init(eval_envs)}

    def play(params, handle, obs, stats):
        def body(carry, _):
            h, o, st = carry
            out = network.apply(params, o)
            logits = out if cfg.is_dqn else out[0]
            h, step = env.step(h, jnp.argmax(logits, axis=-1).astype(jnp.int32))
            st, finished, returns, _ = envs_lib.episode_stats_update(st, step)
            return (h, step.obs, st), (finished, returns)

        (handle, obs, stats), (finished, returns) = jax.lax.scan(body, (handle, obs, stats), None,
                                                                 length=eval_steps)
        n = jnp.sum(finished)
        mean = jnp.where(n > 0, jnp.sum(jnp.where(finished, returns, 0.0)) / jnp.maximum(n, 1), jnp.nan)
        return handle, obs, stats, mean

    play = jax.jit(play)

    def evaluate(params):
        # The eval pool is stateful: its handle, last observations and running episode statistics are carried
        # from call to call on the host, so an episode that spans two calls is reported whole. Traced, the state
        # would be baked in as constants (every call replaying the first call's start) and tracers would leak.
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
            raise TypeError(f"rl_workload({cfg.algo}:{cfg.env}).evaluate plays a stateful env pool on the host; "
                            "call it outside jit/vmap (the runtimes do)")
        handle, obs, stats, mean = play(params, state["handle"], state["obs"], state["stats"])
        state.update(handle=handle, obs=obs, stats=stats)
        return {"eval_return": mean}

    return evaluate
